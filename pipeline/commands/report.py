"""The curation report: one self-contained HTML file per run (``RUN_DIR/report.html``).

Sections: the funnel (inputs, kept, rejected per reason), score histograms (kept and rejected),
aspect-ratio, size and training-bucket distributions of the kept samples, per-stage throughput
and phase times, example thumbnails of kept samples and of each rejection reason, the shards, and
the spec that produced the run. Plots and thumbnails are embedded as data URIs, so the file opens
anywhere with no network and no folder beside it. It reads only the run folder (and, for
rejected samples, whose bytes are not in the shards, the source files where they still exist).
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from pipeline.contract import layout, media, storage
from pipeline.contract.schema import (
    CAPTION,
    CAPTION_COLUMNS,
    CAPTION_ISSUE,
    CLIP_END,
    CLIP_START,
    DUPLICATE_OF,
    HEIGHT,
    KEPT,
    KEY,
    OCR_TEXT,
    PARTITION,
    REJECT_REASON,
    SCORE_GOOD_END,
    SOURCE,
    STATUS,
    VIDEO_EXTENSIONS,
    WIDTH,
)
from pipeline.contract.stage import reason_category

TEXT_COLUMNS = (CAPTION, *CAPTION_COLUMNS, CAPTION_ISSUE, OCR_TEXT)   # read for the examples shown only
NAME = "report"
DESCRIPTION = """\
Write the HTML report of a `winnow curate` (or `winnow select`) output folder.

  winnow report RUN_DIR [--out FILE] [--examples N]

One self-contained file (images embedded, no network): the funnel, score histograms, aspect-ratio
and bucket distribution, per-stage throughput, kept and rejected examples per reason, and the spec.
`winnow curate` writes RUN_DIR/report.html at the end of every run.
"""

MAX_SOURCE_BYTES = 64 << 20     # a rejected sample's source larger than this is not opened for a thumbnail
THUMB = 144
KEPT_COLOR, REJECTED_COLOR = "#3b7dd8", "#d8593b"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232b;background:#f5f6f8}
header{background:#1d232b;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header .sub{color:#b9c2cf;font-size:13px}main{padding:8px 28px 40px;max-width:1280px}
section{background:#fff;border-radius:8px;padding:14px 20px;margin:16px 0;box-shadow:0 1px 3px rgba(0,0,0,.08)}
h2{font-size:17px;margin:2px 0 10px}h3{font-size:14px;margin:14px 0 6px}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{background:#f0f3f7;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:22px}.card span{color:#5b6573;font-size:12px}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 10px;border-bottom:1px solid #e3e6ea;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}img.plot{max-width:100%}
.grid{display:flex;flex-wrap:wrap;gap:8px}.ex{width:144px;font-size:11px;color:#3a4350;word-break:break-all}
.cap{color:#5a6470;word-break:normal}.cap b{color:#1d6fa5;font-weight:600}
.ex img{width:144px;height:144px;border-radius:4px;display:block;background:#222}
pre{background:#f0f3f7;padding:10px;border-radius:6px;overflow:auto;font-size:12px}
.note{color:#5b6573;font-size:12px}.warn{background:#fff4d6;border-left:4px solid #d89b00;padding:6px 10px}
nav a{color:#b9c2cf;margin-right:14px;font-size:13px}
"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _jpeg(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(table, col: str) -> np.ndarray:
    return table.column(col).to_numpy(zero_copy_only=False).astype(np.float64)


def _placeholder(text: str) -> Image.Image:
    im = Image.new("RGB", (THUMB, THUMB), (52, 56, 62))
    d = ImageDraw.Draw(im)
    for i, line in enumerate([text[j:j + 22] for j in range(0, min(len(text), 110), 22)]):
        d.text((6, 8 + 14 * i), line, fill=(225, 225, 225))
    return im


def _fit(im: Image.Image) -> Image.Image:
    im = im.convert("RGB")
    im.thumbnail((THUMB, THUMB))
    out = Image.new("RGB", (THUMB, THUMB), (30, 30, 30))
    out.paste(im, ((THUMB - im.width) // 2, (THUMB - im.height) // 2))
    return out


def source_thumbnail(root: str | None, row: dict) -> Image.Image | None:
    """A rejected sample's thumbnail from its source file (its bytes are not in the shards), or None.
    Opened through the house's bounded opener with preview limits: a source too big to preview (by
    file size, pixels or decoded bytes, read from its header) gets no thumbnail."""
    src = row.get(SOURCE)
    reason = row.get(REJECT_REASON) or ""
    if not src or reason.startswith("decompression_bomb") or "://" in src:
        return None
    path = src if os.path.isabs(src) or not root else os.path.join(root, src)
    try:
        if path.lower().endswith(VIDEO_EXTENSIONS):
            frame = media.video_frame(path, float(row.get(CLIP_START) or 0.0),
                                      replace(media.VIDEO_PREVIEW, max_file_bytes=MAX_SOURCE_BYTES))
            return _fit(frame) if frame is not None else None
        with media.open_image(path, replace(media.PREVIEW, max_file_bytes=MAX_SOURCE_BYTES),
                              draft=(THUMB * 2, THUMB * 2)) as im:
            return _fit(im)
    except Exception:   # noqa: BLE001 - the sample was rejected for a reason: unreadable is expected
        return None


REPORT_ROWS = 250_000     # a larger run's plots and examples come from a uniform sample of this many rows


def _row_count(file: str) -> int:
    import pyarrow.parquet as pq

    if storage.is_url(file):
        return layout.read_table(file, [KEY]).num_rows
    return pq.ParquetFile(storage.local(file)).metadata.num_rows


def read_bounded(run_dir: str, columns: list[str], limit: int = REPORT_ROWS, seed: int = 0) -> tuple[pa.Table, dict]:
    """(rows, counts): the annotation table's ``columns`` sorted by key -- every row when the run
    has at most ``limit``, else a seeded uniform sample of about ``limit`` rows, read file by file
    -- and exact counts over every row: ``{"rows", "kept", "reasons"}``. The driver's memory then
    stops growing with the run; the funnel's numbers stay exact."""
    files = layout.annotation_files(run_dir)
    total = sum(_row_count(f) for f in files)
    share = 1.0 if total <= limit else limit / total
    rng = np.random.default_rng(seed)
    counts: dict = {"rows": 0, "kept": 0, "reasons": {}}
    parts = []
    for f in files:
        t = layout.read_table(f, columns=columns, present=True)
        counts["rows"] += t.num_rows
        if STATUS in t.column_names:
            kept = pc.equal(t.column(STATUS), KEPT)
            counts["kept"] += int(pc.sum(kept).as_py() or 0)
        if REJECT_REASON in t.column_names:
            for item in pc.value_counts(t.column(REJECT_REASON)).to_pylist():
                if item["values"]:
                    counts["reasons"][item["values"]] = counts["reasons"].get(item["values"], 0) + item["counts"]
        parts.append(t if share >= 1 else t.filter(pa.array(rng.random(t.num_rows) < share)))
    table = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
    return (table.sort_by(KEY) if KEY in table.column_names else table), counts


def _shown(path: str) -> str:
    """A run folder as the report names it: a URL as given, a local folder absolute."""
    return path if storage.is_url(path) else os.path.abspath(path)


class Report:
    def __init__(self, run_dir: str, examples: int = 8, seed: int = 0):
        self.dir = run_dir
        self.examples = examples
        self.rng = np.random.default_rng(seed)
        # free text (captions, OCR text) is most of a row's bytes and only the examples show it: it
        # is read for the rows shown, one column at a time (bench/scale.py: the driver's memory)
        names = layout.annotation_columns(run_dir)
        self.text_columns = [c for c in names if c in TEXT_COLUMNS]
        self.table, self.counts = read_bounded(run_dir, [c for c in names if c not in TEXT_COLUMNS], seed=seed)
        self.sampled = self.table.num_rows < self.counts["rows"]
        self.summary = self._json("summary.json") or {}
        self.spec_text = self._text("spec.yaml")
        self.kept = pc.equal(self.table.column(STATUS), KEPT).to_numpy(zero_copy_only=False)
        self.is_video = "video_key" in self.table.column_names
        self.is_selection = self.summary.get("kind") == "selection"
        self.input_root = self._input_root()

    def _at(self, column: str, rows) -> list:
        """``column``'s values at ``rows`` (positions in the key-sorted table); a text column is read
        from the shard tables now, alone with the key."""
        idx = pa.array(np.asarray(rows, dtype=np.int64))
        if column in self.text_columns:          # by key, file by file: the shown rows' text only
            keys = self.table.column(KEY).take(idx)
            found: dict = {}
            for f in layout.annotation_files(self.dir):
                t = layout.read_table(f, columns=[KEY, column], present=True)
                if column in t.column_names:
                    t = t.filter(pc.is_in(t.column(KEY), value_set=keys))
                    found.update(zip(t.column(KEY).to_pylist(), t.column(column).to_pylist(), strict=True))
            return [found.get(k) for k in keys.to_pylist()]
        if column not in self.table.column_names:
            return [None] * len(idx)
        return self.table.column(column).take(idx).to_pylist()

    def _reason_counts(self) -> dict[str, int]:
        """Rejected rows per reason category over every row (not the sample), most frequent first."""
        cats: dict[str, int] = {}
        for r, c in self.counts["reasons"].items():
            cats[reason_category(r)] = cats.get(reason_category(r), 0) + c
        return dict(sorted(cats.items(), key=lambda kv: -kv[1]))

    def _json(self, name: str):
        text = self._text(name)
        return json.loads(text) if text else None

    def _text(self, name: str) -> str:
        try:
            return storage.read_bytes(storage.join(self.dir, name), limit=64 << 20).decode("utf-8")
        except FileNotFoundError:
            return ""

    def _input_root(self) -> str | None:
        import yaml

        try:
            path = ((yaml.safe_load(self.spec_text) or {}).get("input") or {}).get("path")
        except yaml.YAMLError:
            return None
        if not path:
            return None
        if storage.is_url(path):
            return None            # rejected sources on a store get placeholders, not downloads
        return path if os.path.isdir(path) else os.path.dirname(path)

    # ---- sections -------------------------------------------------------------------------
    def funnel(self) -> str:
        n, kept = self.counts["rows"], self.counts["kept"]
        reasons = self.summary.get("reasons") or {}
        if not reasons:
            reasons = self._reason_counts()
        unit = "clips" if self.is_video else "samples"
        if self.is_selection:
            cards = [("source kept", self.summary.get("source_kept", n)), ("selected", n),
                     ("shards", self.summary.get("shards", 0))]
        else:
            cards = [("inputs", n), ("kept", kept), ("rejected", n - kept)]
        out = [f'<p class="warn">warning: {html.escape(w)}</p>' for w in self.summary.get("warnings") or []]
        out += ['<div class="cards">']
        out += [f'<div class="card"><b>{v:,}</b><span>{html.escape(k)} {unit if k != "shards" else ""}</span></div>'
                for k, v in cards]
        if not self.is_selection:
            out.append(f'<div class="card"><b>{100 * kept / max(1, n):.1f} %</b><span>kept</span></div>')
        out.append("</div>")
        videos = self.summary.get("videos")
        if videos:
            out.append("<h3>Videos</h3><table><tr><th>videos</th><th class=n>count</th></tr>")
            out.append(f"<tr><td>input videos</td><td class=n>{videos['inputs']:,}</td></tr>"
                       f"<tr><td>with clips</td><td class=n>{videos['with_clips']:,}</td></tr>"
                       f"<tr><td>without clips</td><td class=n>{videos['without_clips']:,}</td></tr>")
            out += [f"<tr><td>&nbsp;&nbsp;{html.escape(r)}</td><td class=n>{c:,}</td></tr>"
                    for r, c in videos.get("reasons", {}).items()]
            out.append("</table>")
        if self.is_selection:
            sel = self.summary.get("selection") or {}
            out.append(f"<h3>Selection</h3><pre>{html.escape(json.dumps(sel, indent=2))}</pre>")
            out.append(
                "<p class=note>Sources: "
                + ", ".join(html.escape(r) for r in self.summary.get("source_runs", []))
                + "</p>"
            )
            return "\n".join(out)
        plt = _plt()
        items = sorted(reasons.items(), key=lambda kv: -kv[1])
        labels = [f"inputs ({n:,})"] + [f"- {r} ({c:,})" for r, c in items] + [f"kept ({kept:,})"]
        fig, ax = plt.subplots(figsize=(8.5, 0.42 * len(labels) + 0.9))
        left = n
        ax.barh(0, n, color="#8a96a6")
        for i, (_, c) in enumerate(items, start=1):
            left -= c
            ax.barh(i, c, left=left, color=REJECTED_COLOR)
        ax.barh(len(labels) - 1, kept, color=KEPT_COLOR)
        ax.set_yticks(range(len(labels)), labels, fontsize=9)
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.set_title("funnel: each rejection reason removes its rows from what is left", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        out.append(f'<img class="plot" alt="funnel" src="{_png(fig)}">')
        out.append("<table><tr><th>reason</th><th class=n>rows</th><th class=n>share of inputs</th></tr>")
        out += [f"<tr><td>{html.escape(r)}</td><td class=n>{c:,}</td><td class=n>{100 * c / max(1, n):.1f} %</td></tr>"
                for r, c in items]
        out.append("</table>")
        return "\n".join(out)

    def scores(self) -> str:
        series = [(c, _num(self.table, c)) for c in SCORE_GOOD_END if c in self.table.column_names]
        series = [(c, v) for c, v in series if np.isfinite(v).any()]
        if self.is_video and CLIP_START in self.table.column_names:
            series.append(("clip duration (s)", _num(self.table, CLIP_END) - _num(self.table, CLIP_START)))
        if not series:
            return "<p class=note>No score columns in this run (its stages wrote none).</p>"
        plt = _plt()
        ncol = min(3, len(series))
        nrow = (len(series) + ncol - 1) // ncol
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 2.9 * nrow), squeeze=False)
        rows = []
        for ax, (name, v) in zip(axes.ravel()[:len(series)], series, strict=True):
            ok = np.isfinite(v)
            k, r = v[ok & self.kept], v[ok & ~self.kept]
            bins = np.histogram_bin_edges(v[ok], bins=40) if ok.any() else 10
            ax.hist([k, r], bins=bins, stacked=True, color=[KEPT_COLOR, REJECTED_COLOR], label=["kept", "rejected"])
            ax.set_title(f"{name} (n={int(ok.sum()):,})", fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.25)
            if len(k):
                q = np.percentile(k, [0, 12.5, 25, 50, 75, 100])
                rows.append(f"<tr><td>{html.escape(name)}</td><td class=n>{len(k):,}</td>"
                            + "".join(f"<td class=n>{x:.4g}</td>" for x in q) + "</tr>")
        for ax in axes.ravel()[len(series):]:
            ax.axis("off")
        fig.tight_layout()
        sampled = (f"<p class=note>Histograms and quantiles from a uniform sample of {self.table.num_rows:,} of the "
                   f"run's {self.counts['rows']:,} rows (the driver's memory stays bounded; the funnel counts every "
                   f"row).</p>") if self.sampled else ""
        table = sampled + ("<table><tr><th>kept rows</th><th class=n>scored</th><th class=n>min</th>"
                           "<th class=n>p12.5</th>"
                 "<th class=n>p25</th><th class=n>median</th><th class=n>p75</th><th class=n>max</th></tr>"
                 + "".join(rows) + "</table><p class=note>The p12.5 / p25 / median columns are the thresholds that "
                 "drop SVD's bottom 12.5 / 25 / 50 % (winnow sweep explores them).</p>")
        return f'<img class="plot" alt="score histograms" src="{_png(fig)}">' + table

    def aspect(self) -> str:
        from training.buckets import assign, bucket_table

        if WIDTH not in self.table.column_names:
            return "<p class=note>No sizes in this run.</p>"
        w, h = _num(self.table, WIDTH), _num(self.table, HEIGHT)
        ok = self.kept & np.isfinite(w) & np.isfinite(h) & (w > 0) & (h > 0)
        if not ok.any():
            return "<p class=note>No kept samples with a size.</p>"
        w, h = w[ok], h[ok]
        plt = _plt()
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.9), gridspec_kw={"width_ratios": [1, 1, 1.3, 1.3]})
        ratios = np.log2(w / h)
        axes[0].hist(ratios, bins=40, color=KEPT_COLOR)
        ticks = [-2, -1, -np.log2(4 / 3), 0, np.log2(4 / 3), np.log2(16 / 9), 1, 2]
        axes[0].set_xticks(ticks, ["1:4", "1:2", "3:4", "1:1", "4:3", "16:9", "2:1", "4:1"], fontsize=8, rotation=45)
        axes[0].set_xlim(min(-1.2, ratios.min() - 0.1), max(1.2, ratios.max() + 0.1))
        axes[0].set_title("aspect ratio (w:h), kept", fontsize=9)
        axes[1].hist(np.minimum(w, h), bins=40, color=KEPT_COLOR)
        axes[1].set_title("shorter side (px, original), kept", fontsize=9)
        lines = []
        for ax, base in zip(axes[2:], (512, 1024), strict=True):
            table = bucket_table(base, 64, 2.0)
            ids = assign(w, h, table)
            counts = np.bincount(ids, minlength=len(table))
            used = [i for i in range(len(table)) if counts[i]]
            ax.bar(range(len(used)), counts[used], color=KEPT_COLOR)
            ax.set_xticks(range(len(used)), [f"{table[i].width}x{table[i].height}" for i in used], rotation=60,
                          fontsize=8)
            ax.set_title(f"training buckets at base {base} (max aspect 2)", fontsize=9)
            top = sorted(used, key=lambda i: -counts[i])[:3]
            lines.append(f"base {base}: {len(used)} of {len(table)} buckets used; largest " +
                         ", ".join(f"{table[i].width}x{table[i].height} ({counts[i]:,})" for i in top))
        fig.tight_layout()
        return (f'<img class="plot" alt="aspect ratios and buckets" src="{_png(fig)}">'
                + "".join(f"<p class=note>{html.escape(x)}</p>" for x in lines))

    def throughput(self) -> str:
        s = self.summary
        n = self.counts["rows"]
        out = []
        stage = s.get("stage_seconds") or {}
        if stage:
            total = sum(stage.values()) or 1.0
            rss = s.get("stage_rss_mb") or {}
            out.append("<table><tr><th>stage</th><th class=n>worker seconds</th><th class=n>share</th>"
                       "<th class=n>rows/s per worker</th><th class=n>peak worker RSS</th></tr>")
            for k, v in stage.items():
                rate = f"{n / v:,.0f}" if v >= 0.005 else "negligible"
                mem = f"{rss[k]:,.0f} MB" if k in rss else "-"
                out.append(
                    f"<tr><td>{html.escape(k)}</td><td class=n>{v:,.2f}</td>"
                    f"<td class=n>{100 * v / total:.1f} %</td><td class=n>{rate}</td><td class=n>{mem}</td></tr>"
                )
            out.append("</table><p class=note>Worker seconds are summed over all workers (each row carries its "
                       "share of its batch's time). Peak RSS is the largest resident memory of a worker process "
                       "that ran the stage (fused task stages share a process, so they share a figure). On a "
                       "cluster the same numbers stream as Ray metrics: winnow_stage_rows_total, "
                       "winnow_stage_seconds_total and winnow_stage_worker_rss_mb, tagged by stage; Ray Data's "
                       "own per-operator metrics show the queues between them.</p>")
        phases = {k: v for k, v in (s.get("phases") or {}).items() if not k.startswith("reduce:")}
        if phases:
            plt = _plt()
            fig, ax = plt.subplots(figsize=(8.5, 0.38 * len(phases) + 0.9))
            ax.barh(range(len(phases)), list(phases.values()), color="#6b7a8f")
            ax.set_yticks(range(len(phases)), list(phases), fontsize=9)
            ax.invert_yaxis()
            ax.set_xlabel("wall seconds")
            ax.set_title(f"phases (run wall time {s.get('wall_seconds', 0):.1f} s, "
                         f"{n / max(1e-9, s.get('wall_seconds') or 1e-9):,.1f} rows/s end to end)", fontsize=10)
            fig.tight_layout()
            out.append(f'<img class="plot" alt="phases" src="{_png(fig)}">')
        if not out:
            return "<p class=note>No timing recorded.</p>"
        return "\n".join(out)

    def _pick(self, idx: np.ndarray) -> np.ndarray:
        if len(idx) <= self.examples:
            return idx
        return np.sort(self.rng.choice(idx, self.examples, replace=False))

    def examples_html(self) -> str:
        from pipeline.commands.sheets import ShardImages

        images = ShardImages([self.dir], THUMB)
        out = []
        try:
            kept_idx = self._pick(np.flatnonzero(self.kept))
            out.append(f"<h3>kept ({self.counts['kept']:,})</h3><div class=grid>")
            keys, parts = self._at(KEY, kept_idx), self._at(PARTITION, kept_idx)
            caption = self._at(CAPTION, kept_idx) if CAPTION in self.text_columns else None
            synthetic = {c[len("caption_"):]: self._at(c, kept_idx) for c in CAPTION_COLUMNS if c in self.text_columns}
            for j in range(len(kept_idx)):
                im = images.thumbnail(0, int(parts[j] or 0), keys[j])
                label = html.escape(keys[j]) + (f"<br>{html.escape((caption[j] or '')[:60])}" if caption else "")
                label += "".join(f"<br><span class=cap><b>{name}</b> {html.escape((texts[j] or '')[:120])}</span>"
                                 for name, texts in synthetic.items())
                out.append(f'<div class=ex><img src="{_jpeg(im)}" alt="{html.escape(keys[j])}">{label}</div>')
            out.append("</div>")
            rejected = np.flatnonzero(~self.kept)
            cats: dict[str, list[int]] = {}
            for i, r in zip(rejected, self._at(REJECT_REASON, rejected), strict=True):
                if r:
                    cats.setdefault(reason_category(r), []).append(int(i))
            exact = self._reason_counts()
            for cat, idx in sorted(cats.items(), key=lambda kv: -exact.get(kv[0], len(kv[1]))):
                out.append(f"<h3>rejected: {html.escape(cat)} ({exact.get(cat, len(idx)):,})</h3><div class=grid>")
                for i in self._pick(np.asarray(idx)):
                    row = self.table.slice(int(i), 1).to_pylist()[0]
                    im = source_thumbnail(self.input_root, row) or _placeholder(row[REJECT_REASON] or cat)
                    detail = row[REJECT_REASON] or ""
                    if row.get(DUPLICATE_OF):
                        detail += f" (of {row[DUPLICATE_OF]})"
                    out.append(f'<div class=ex><img src="{_jpeg(im)}" alt="{html.escape(row[KEY])}">'
                               f"{html.escape(row[KEY])}<br>{html.escape(detail[:90])}</div>")
                out.append("</div>")
        finally:
            images.close()
        return "\n".join(out)

    def shards_html(self) -> str:
        stats = []
        for f in storage.files_in(storage.join(self.dir, layout.SHARDS_DIR), "_stats.json"):
            stats.append(json.loads(storage.read_bytes(f)))
        if not stats:
            return "<p class=note>No shards.</p>"
        total = sum(s.get("tar_bytes", 0) for s in stats)
        out = [f"<p>{len(stats)} shards, {sum(s['kept'] for s in stats):,} samples, {total / 1e6:,.1f} MB of tar in "
               f"<code>{html.escape(storage.join(_shown(self.dir), 'shards'))}</code></p>",
               "<table><tr><th>shard</th><th class=n>rows</th><th class=n>kept</th><th class=n>rejected</th>"
               "<th class=n>MB</th></tr>"]
        for s in stats[:50]:
            out.append(f"<tr><td>{s['shard']}.tar</td><td class=n>{s['count']:,}</td><td class=n>{s['kept']:,}</td>"
                       f"<td class=n>{s['rejected']:,}</td><td class=n>{s.get('tar_bytes', 0) / 1e6:.2f}</td></tr>")
        out.append("</table>")
        if len(stats) > 50:
            out.append(f"<p class=note>... and {len(stats) - 50} more (shards/*_stats.json).</p>")
        return "\n".join(out)

    def render(self) -> str:
        sections = [("funnel", "Funnel", self.funnel), ("scores", "Scores", self.scores),
                    ("aspect", "Aspect ratios, sizes and buckets", self.aspect),
                    ("throughput", "Throughput and time", self.throughput),
                    ("examples", "Examples", self.examples_html), ("shards", "Shards", self.shards_html)]
        body = []
        for sid, title, fn in sections:
            try:
                content = fn()
            except Exception as exc:   # one broken section must not cost the others
                content = f"<p class=note>This section failed: {html.escape(repr(exc))}</p>"
            body.append(f'<section id="{sid}"><h2>{title}</h2>\n{content}\n</section>')
        body.append(f'<section id="spec"><h2>Spec</h2><pre>{html.escape(self.spec_text or "(no spec.yaml)")}</pre>'
                    f"</section>")
        kind = "selection" if self.is_selection else ("video clips" if self.is_video else "images")
        when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        nav = "".join(f'<a href="#{sid}">{sid}</a>' for sid in
                      ("funnel", "scores", "aspect", "throughput", "examples", "shards", "spec"))
        title = html.escape(_shown(self.dir))
        return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>winnow report: {title}</title>"
                f"<style>{CSS}</style></head><body><header><h1>winnow report</h1><div class=sub>{title} · {kind} · "
                f"{self.table.num_rows:,} rows · written {when}</div><nav>{nav}</nav></header><main>"
                + "\n".join(body) + "</main></body></html>")


def write(run_dir: str, out: str | None = None, examples: int = 8) -> str:
    """Write the report of ``run_dir`` (a curate or select output) and return its path."""
    return run(ReportSpec(run_dir, out, examples))


@dataclass
class ReportSpec:
    run_dir: str
    out: str | None = None
    examples: int = 8


def arguments(parser) -> None:
    parser.add_argument("run_dir", help="a `winnow curate` or `winnow select` output folder")
    parser.add_argument("--out", help="report file (default RUN_DIR/report.html)")
    parser.add_argument("--examples", type=int, default=8, help="example thumbnails per reason (default 8)")


def from_args(args) -> ReportSpec:
    return ReportSpec(args.run_dir, args.out, args.examples)


def plan(spec: ReportSpec) -> str:
    """The file the report goes to; refuses a folder that is not a finished run."""
    from pipeline.contract.config import ConfigError

    if not storage.isdir(spec.run_dir) or not layout.annotation_files(spec.run_dir):
        raise ConfigError(
            f"{spec.run_dir!r} has no annotation table (shards/NNNNN.parquet): give a finished `winnow curate` or "
            f"`winnow select` output folder"
        )
    return spec.out or storage.join(spec.run_dir, layout.REPORT_FILE)


def run(spec: ReportSpec, log=None) -> str:
    path = plan(spec)
    layout.atomic_write(path, Report(spec.run_dir, spec.examples).render().encode("utf-8"))
    return path


def format_summary(path: str) -> str:
    return f"winnow report: {path}"


__all__ = ["Report", "source_thumbnail", "write"]
