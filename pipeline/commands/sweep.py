"""Filtering sweeps over annotation tables: choose thresholds without re-running a model.

The SVD paper (Blattmann et al., 2023, sec. 3 and app. E) chose its LVD-F filters by removing the
bottom 12.5 %, 25 % and 50 % of the data per annotation (CLIP score, aesthetic score, OCR rate,
motion) and comparing. ``winnow sweep`` automates that loop on the annotation table:

* per annotation, *levels*: drop fractions from its bad end (the threshold each implies is the
  value at that quantile) and/or absolute thresholds;
* *cells*: each level alone, and (``combine: true``) every AND-combination across annotations;
* per cell: surviving count and fraction, its thresholds, a selection manifest (parquet of keys),
  and the overlap (Jaccard) between single-annotation cells;
* a table of all cells (CSV and Markdown), plots (histograms with the cut lines, survival curves,
  score correlations) and contact sheets of samples just above and below each cut.

Everything is vectorised numpy on the swept columns, the only part of the tables held in memory
(8 bytes per row and filter); keys are read again one annotation file at a time while the
manifests are written. No Ray, no model.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.commands.sheets import contact_sheets
from pipeline.contract import layout, storage
from pipeline.contract.config import ConfigError, apply_overrides, build, load_yaml, option, take_kind
from pipeline.contract.layout import MANIFEST_RUNS, atomic_path, atomic_write, claim_output, fingerprint
from pipeline.contract.schema import KEPT, KEY, SCORE_GOOD_END, STATUS
from pipeline.contract.storage import join

NAME = "sweep"
DESCRIPTION = """\
Sweep filter thresholds over annotation tables, without re-running a model.

  winnow sweep SPEC.yaml [--set dotted.key=value ...]

Per annotation: drop fractions from the bad end (SVD's 12.5/25/50 %) and/or absolute thresholds;
every level alone and every AND-combination. Writes cells.csv / cells.md, a selection manifest per
cell (selections/cell_NNN.parquet), overlap.csv, plots/ and contact sheets/. See
jobs/sweep_svd_filters.yaml and jobs/sweep_laion_aesthetic.yaml.
"""


@dataclass
class FilterSpec:
    column: str = option(help="annotation column, e.g. aesthetic_score, clip_similarity, ocr_area_ratio, motion_score")
    keep: Literal["high", "low", "auto"] = option("auto", "which end is good; auto knows the annotations winnow writes")
    drop_fractions: list[float] = option(
        factory=list, help="drop this share from the bad end (0.125, 0.25, 0.5 as in SVD)"
    )
    thresholds: list[float] = option(factory=list, help="absolute cut values (keep >= t for high, <= t for low)")
    pattern: str | None = option(None, "matches(COLUMN): the RE2 regular expression whose matches are counted, e.g. "
                                 "'(?i)\\b(watermark|logo|stock photo)\\b' (keep low: captions naming them go)")


@dataclass
class SheetSpec:
    per_side: int = option(8, "samples shown on each side of a cut", min=0, max=64)
    thumb: int = option(128, "thumbnail side in pixels", min=32, max=512)


@dataclass
class SweepSpec:
    output: str = option(help="sweep folder: cells.csv, cells.md, selections/, plots/, sheets/")
    overwrite: bool = option(False, "replace the files of a sweep made by a different spec in output (only those)",
                             runtime=True)
    annotations: list[str] = option(factory=list, help="`winnow curate` output folders (or annotation parquet files)")
    filters: list[FilterSpec] = option(factory=list, help="one entry per annotation swept")
    combine: bool = option(True, "also every AND-combination of levels across annotations")
    only_kept: bool = option(True, "sweep the rows curation kept (rejected rows are never selectable)")
    plots: bool = option(True, "histograms, survival curves and the correlation matrix")
    sheets: SheetSpec = field(default_factory=SheetSpec)


@dataclass
class Level:
    column: str
    keep: str              # high | low
    threshold: float
    fraction: float | None  # the drop fraction it came from, or None for an absolute threshold

    @property
    def name(self) -> str:
        op = ">=" if self.keep == "high" else "<="
        src = f"drop{self.fraction:g}" if self.fraction is not None else "abs"
        return f"{self.column}{op}{self.threshold:.6g}({src})"

    def mask(self, values: np.ndarray) -> np.ndarray:
        ok = ~np.isnan(values)
        return ok & (values >= self.threshold if self.keep == "high" else values <= self.threshold)


def parse(data: dict) -> SweepSpec:
    spec = build(SweepSpec, take_kind(data, "sweep"))
    if not spec.annotations:
        raise ConfigError("annotations: give at least one `winnow curate` output folder")
    if not spec.filters:
        raise ConfigError("filters: give at least one {column: ..., drop_fractions: [...]} entry")
    check_filters(spec.filters)
    return spec


# a text column filtered by a number measured on it: words(caption_vlm) >= 1 keeps non-empty
# captions, chars(caption_summary) <= 300 long ones out, matches(caption_coca) <= 0 banned words out
TEXT_MEASURE = re.compile(r"(chars|words|matches)\(([A-Za-z_][A-Za-z0-9_]*)\)")
MAX_PATTERN = 500


def text_measure(column: str) -> tuple[str, str] | None:
    """('words', 'caption_vlm') for 'words(caption_vlm)'; None for a plain column."""
    m = TEXT_MEASURE.fullmatch(column)
    return (m.group(1), m.group(2)) if m else None


def source_column(column: str) -> str:
    """The annotation column a filter reads (the text column inside a measure)."""
    tm = text_measure(column)
    return tm[1] if tm else column


# a word is a run of characters Python's str.split() does not split on (RE2 has no \v in \s, and
# str.split also splits on the information separators and NEL)
WORD = r"[^\s\v\p{Z}\x1c-\x1f\x85]+"


def derive_text(table: pa.Table, filters: list[FilterSpec]) -> pa.Table:
    """Append each text measure the filters name as a float column of that name; a missing or empty
    text measures 0 (it is the empty caption the filter is there to catch). Arrow's kernels do the
    counting (no Python string per row); patterns are RE2, which runs in linear time on any text."""
    for f in filters:
        tm = text_measure(f.column)
        if tm is None or f.column in table.column_names:
            continue
        kind, col = tm
        texts = pc.fill_null(table.column(col).cast(pa.string()), "")
        if kind == "chars":
            v = pc.utf8_length(texts)
        elif kind == "words":
            v = pc.count_substring_regex(texts, pattern=WORD)
        else:
            v = pc.count_substring_regex(texts, pattern=f.pattern or "")
        table = table.append_column(f.column, pc.cast(v, pa.float64()))
    return table


def check_filters(filters: list[FilterSpec]) -> None:
    """Resolve ``keep: auto`` and check the levels (shared by sweep and select specs)."""
    patterns: dict[str, str | None] = {}
    for i, f in enumerate(filters):
        tm = text_measure(f.column)
        if tm is None and f.pattern is not None:
            raise ConfigError(f"filters[{i}].pattern: only a matches(COLUMN) filter reads a pattern; write column: "
                              f"matches({f.column}) or drop it")
        if tm is not None:
            if (tm[0] == "matches") != (f.pattern is not None):
                raise ConfigError(f"filters[{i}]: {'give' if tm[0] == 'matches' else 'drop'} pattern for "
                                  f"{f.column!r} (a regular expression is what matches() counts)")
            if f.pattern is not None:
                if len(f.pattern) > MAX_PATTERN:
                    raise ConfigError(f"filters[{i}].pattern: longer than {MAX_PATTERN} characters")
                try:            # RE2 (Arrow's): linear time on any text, no backreferences or lookaround
                    pc.count_substring_regex(pa.array([""]), pattern=f.pattern)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise ConfigError(f"filters[{i}].pattern: not an RE2 regular expression ({exc})") from None
            if patterns.setdefault(f.column, f.pattern) != f.pattern:
                raise ConfigError(f"filters[{i}]: {f.column!r} is given two patterns; one measure per column")
            if f.keep == "auto":
                f.keep = "low" if tm[0] == "matches" else "high"
        if f.keep == "auto":
            if f.column not in SCORE_GOOD_END:
                raise ConfigError(f"filters[{i}].keep: winnow does not know which end of {f.column!r} is good; "
                                  f"set keep: high or keep: low")
            f.keep = SCORE_GOOD_END[f.column]
        if not f.drop_fractions and not f.thresholds:
            raise ConfigError(f"filters[{i}]: give drop_fractions and/or thresholds for {f.column!r}")
        bad = [p for p in f.drop_fractions if not 0 < p < 1]
        if bad:
            raise ConfigError(f"filters[{i}].drop_fractions: {bad} must be between 0 and 1 (exclusive)")


def load(path: str | None, overrides: list[str] | None = None) -> SweepSpec:
    return parse(apply_overrides(load_yaml(path) if path else {}, overrides or []))


def run_dir(p: str) -> str:
    """The run folder of an ``annotations`` entry (a run folder, or an annotation file inside one)."""
    return storage.absolute(p if storage.isdir(p) else storage.parent(p))


@dataclass
class Part:
    run: int               # index into spec.annotations
    file: str              # one annotation table file (a shard's table)
    rows: int              # its rows the sweep cuts (the kept ones when only_kept)


@dataclass
class Swept:
    """What a sweep holds in memory: each swept column's values (float64, NaN for none) over every
    row it cuts, the rows in file order (run by run, shard table by shard table), and where each
    file's rows sit. 8 bytes per row per filter; keys are read again file by file when the
    manifests are written, so the driver never holds the table."""

    parts: list[Part]
    values: dict[str, np.ndarray]
    only_kept: bool = True

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    def part_table(self, part: Part, columns: list[str]) -> pa.Table:
        return _part_rows(part.file, columns, self.only_kept)

    def refs(self, rows: np.ndarray) -> list[tuple[int, int, str]]:
        """(run, partition, key) of the given rows (row numbers as in ``values``), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        out: dict[int, tuple[int, int, str]] = {}
        start = 0
        for part in self.parts:
            mine = rows[(rows >= start) & (rows < start + part.rows)]
            if len(mine):
                t = self.part_table(part, [KEY, "partition"])
                keys = t.column(KEY).take(pa.array(mine - start)).to_pylist()
                parts = (t.column("partition").take(pa.array(mine - start)).to_pylist()
                         if "partition" in t.column_names else [0] * len(mine))
                for r, k, pn in zip(mine.tolist(), keys, parts, strict=True):
                    out[r] = (part.run, int(pn or 0), k)
            start += part.rows
        return [out[int(r)] for r in rows]


def _part_rows(file: str, columns: list[str], only_kept: bool) -> pa.Table:
    """One annotation file's rows a sweep cuts (the same rows, in the same order, on every read)."""
    t = layout.read_table(file, columns=list(dict.fromkeys([*columns, STATUS])), present=True)
    if only_kept and STATUS in t.column_names:
        t = t.filter(pc.equal(t.column(STATUS), KEPT))
    return t


def read_table(spec: SweepSpec) -> Swept:
    """The swept columns of every annotation table, file by file (checked before anything is written)."""
    sources = list(dict.fromkeys(source_column(f.column) for f in spec.filters))
    text = {source_column(f.column) for f in spec.filters if text_measure(f.column)}
    parts: list[Part] = []
    chunks: dict[str, list[np.ndarray]] = {f.column: [] for f in spec.filters}
    for i, p in enumerate(spec.annotations):
        path = p
        if not storage.exists(path) or not layout.annotation_files(path):
            raise ConfigError(f"annotations[{i}]: {path!r} " + ("does not exist" if not storage.exists(path) else
                              "holds no annotation table (shards/NNNNN.parquet); give a `winnow curate` output folder"))
        names = layout.annotation_columns(path)
        missing = [c for c in sources if c not in names]
        if missing:
            raise ConfigError(f"annotations[{i}]: {path!r} has no column {missing[0]!r}; it has "
                              f"{', '.join(n for n in names if n not in (KEY, STATUS))}")
        for file in layout.annotation_files(path):
            t = _part_rows(file, sources, spec.only_kept)
            for c in sources:            # a shard table without the column: null there
                if c not in t.column_names:
                    t = t.append_column(c, pa.nulls(t.num_rows, pa.string() if c in text else pa.float64()))
            t = derive_text(t, spec.filters)
            for f in spec.filters:
                chunks[f.column].append(values(t, f.column))
            parts.append(Part(i, file, t.num_rows))
    return Swept(parts, {c: np.concatenate(v) if v else np.zeros(0) for c, v in chunks.items()}, spec.only_kept)


def values(table: pa.Table, column: str) -> np.ndarray:
    return table.column(column).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def levels_for(f: FilterSpec, v: np.ndarray) -> list[Level]:
    """Drop fractions become thresholds: dropping the bottom ``p`` of the n scored rows keeps the
    rows at or beyond the value of rank ``floor(p * n)`` from the bad end (ties are kept)."""
    scored = np.sort(v[~np.isnan(v)])
    if f.keep == "low":
        scored = scored[::-1]
    out = []
    for p in f.drop_fractions:
        k = min(int(np.floor(p * len(scored))), len(scored) - 1)
        out.append(Level(f.column, f.keep, float(scored[k]) if len(scored) else float("nan"), p))
    out += [Level(f.column, f.keep, float(t), None) for t in f.thresholds]
    return out


@dataclass
class Cell:
    name: str
    levels: list[Level]
    count: int = 0
    fraction: float = 0.0


@dataclass
class SweepResult:
    output: str
    rows: int
    cells: list[Cell]
    levels: dict[str, list[Level]]
    seconds: dict[str, float] = field(default_factory=dict)


def make_cells(spec: SweepSpec, levels: dict[str, list[Level]]) -> list[Cell]:
    """All rows, each level alone, and (``combine``) every AND-combination across columns."""
    cells = [Cell("all", [])]
    for lvls in levels.values():
        cells += [Cell(lv.name, [lv]) for lv in lvls]
    if spec.combine and len(levels) > 1:
        for combo in itertools.product(*[[None] + lvls for lvls in levels.values()]):
            chosen = [c for c in combo if c is not None]
            if len(chosen) >= 2:
                cells.append(Cell(" & ".join(lv.name for lv in chosen), chosen))
    return cells


def _slug(i: int) -> str:
    return f"cell_{i:03d}"


def _thresholds(c: Cell) -> dict:
    return {lv.column: {"keep": lv.keep, "threshold": lv.threshold, "drop_fraction": lv.fraction} for lv in c.levels}


def cut(swept: Swept, spec: SweepSpec, levels: dict[str, list[Level]], out: str) -> tuple[list[Cell], np.ndarray]:
    """Every cell's manifest (selections/cell_NNN.parquet: run, key), its count, and the
    intersections of the single-level cells, one annotation file at a time: memory follows the
    largest file, not the run."""
    import contextlib

    cells = make_cells(spec, levels)
    singles = [i for i, c in enumerate(cells) if len(c.levels) <= 1]
    inter = np.zeros((len(singles), len(singles)), np.float64)
    counts = np.zeros(len(cells), np.int64)
    storage.makedirs(join(out, "selections"))
    # the run folders the manifests' run indices point to (``winnow select`` reads them from here)
    runs = json.dumps([run_dir(p) for p in spec.annotations])
    schema = pa.schema([("run", pa.int32()), (KEY, pa.string())])
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        writers = []
        for i, c in enumerate(cells):
            tmp = stack.enter_context(atomic_path(join(out, "selections", f"{_slug(i)}.parquet")))
            meta = {"winnow_cell": c.name, "winnow_thresholds": json.dumps(_thresholds(c)), MANIFEST_RUNS: runs}
            # keys are unique: a dictionary would only be built and thrown away
            writers.append(stack.enter_context(pq.ParquetWriter(tmp, schema.with_metadata(meta),
                                                                use_dictionary=["run"], compression="zstd")))
        start = 0
        for part in swept.parts:
            if not part.rows:
                continue
            t = swept.part_table(part, [KEY])
            if t.num_rows != part.rows:
                raise RuntimeError(f"{part.file}: changed while the sweep read it ({t.num_rows} rows, was {part.rows})")
            keys = t.column(KEY).cast(pa.string())
            masks = {lv.name: lv.mask(swept.values[lv.column][start:start + part.rows])
                     for lvls in levels.values() for lv in lvls}
            run = pa.array(np.full(part.rows, part.run, np.int32))

            def one(i: int, cell: Cell, masks=masks, keys=keys, run=run, n=part.rows) -> np.ndarray:
                m = np.logical_and.reduce([masks[lv.name] for lv in cell.levels]) if cell.levels else np.ones(n, bool)
                sel = pa.array(m)
                # Arrow's filter and the parquet writer release the GIL: one cell per core at a time
                writers[i].write_table(pa.Table.from_arrays([run.filter(sel), keys.filter(sel)], schema=schema))
                return m

            got = list(pool.map(lambda ic: one(*ic), enumerate(cells)))
            counts += [int(m.sum()) for m in got]
            m = np.stack([got[i] for i in singles]).astype(np.float32)
            inter += m @ m.T
            start += part.rows
    n = swept.rows
    for c, k in zip(cells, counts, strict=True):
        c.count, c.fraction = int(k), int(k) / max(1, n)
    return cells, inter


def overlap(inter: np.ndarray) -> np.ndarray:
    """Jaccard index between cells' surviving sets from their intersections (the diagonal: counts)."""
    counts = np.diag(inter)
    union = counts[:, None] + counts[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def write_outputs(cells: list[Cell], inter: np.ndarray, out: str) -> None:
    rows = [{"cell": _slug(i), "filters": c.name, "count": c.count, "fraction": round(c.fraction, 6),
             "thresholds": json.dumps(_thresholds(c))} for i, c in enumerate(cells)]
    atomic_write(join(out, "cells.csv"), pa.Table.from_pylist(rows).to_pandas().to_csv(index=False).encode())
    single = [i for i, c in enumerate(cells) if len(c.levels) <= 1]
    buf = io.BytesIO()
    np.savetxt(buf, overlap(inter), delimiter=",", fmt="%.4f", header=",".join(_slug(i) for i in single), comments="")
    atomic_write(join(out, "overlap.csv"), buf.getvalue())
    md = ["| cell | filters | kept | fraction |\n| --- | --- | ---: | ---: |\n"]
    md += [f"| {r['cell']} | {r['filters'].replace('|', '/')} | {r['count'] or '**0: empty**'} | "
           f"{100 * r['fraction']:.1f} % |\n" for r in rows]
    atomic_write(join(out, "cells.md"), "".join(md).encode("utf-8"))


def data_limits(v: np.ndarray) -> tuple[float, float]:
    """The x-axis of a score's plots: the scores' own range with 5 % margins (a threshold far from
    the scores would otherwise stretch it until the histogram is a line)."""
    if not len(v):
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 0.5)
    return lo - pad, hi + pad


def histogram_figure(table: pa.Table, spec: SweepSpec, levels: dict[str, list[Level]]):
    """Per swept column: the histogram over the survival curve, x-axis from the scores; every level is a
    coloured line with its entry (threshold, source, rows kept) in a legend below the plot, so labels
    never overlap; a threshold outside the scores is drawn at the axis edge and its entry says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [f.column for f in spec.filters]
    most = max((len(levels[c]) for c in cols), default=0)
    fig, axes = plt.subplots(2, len(cols), figsize=(4.6 * len(cols), 6.4 + 0.22 * most), squeeze=False)
    colours = plt.get_cmap("tab10")
    for j, col in enumerate(cols):
        v = values(table, col)
        v = v[~np.isnan(v)]
        lo, hi = data_limits(v)
        keep_high = levels[col][0].keep == "high" if levels[col] else True
        ax, surv = axes[0][j], axes[1][j]
        counts, edges = np.histogram(v, bins=60, range=(lo, hi))
        ax.stairs(counts, edges, fill=True, color="#9bb5d6")
        # the survival curve at SURVIVAL_POINTS quantiles: the same line, a bounded number of points
        s = np.sort(v)
        at = np.unique(np.linspace(0, max(len(s) - 1, 0), min(len(s), SURVIVAL_POINTS)).round().astype(np.int64))
        kept = 1 - at / max(1, len(s)) if keep_high else (at + 1) / max(1, len(s))
        surv.plot(s[at] if len(s) else s, kept if len(s) else s, color="#4a7ab7")
        del s
        for k, lv in enumerate(levels[col]):
            n = int(lv.mask(v).sum())
            outside = not lo <= lv.threshold <= hi
            x = min(max(lv.threshold, lo), hi)
            src = f"drop {lv.fraction:g}" if lv.fraction is not None else "absolute"
            label = f"{'>=' if lv.keep == 'high' else '<='} {lv.threshold:.4g} ({src}): keeps {n:,}" + \
                (" - beyond the scores" if outside else "")
            style = dict(color=colours(k % 10), lw=1.4, ls=":" if outside else "-")
            ax.axvline(x, label=label, **style)
            surv.axvline(x, **{**style, "lw": 0.9})
        ax.set_xlim(lo, hi)
        surv.set_xlim(lo, hi)
        ax.set_title(f"{col} (n={len(v)}; keep {'high' if keep_high else 'low'})", fontsize=9)
        surv.set_xlabel(f"threshold on {col}", fontsize=8)
        surv.set_ylabel("fraction kept", fontsize=8)
        surv.grid(alpha=0.3)
        if levels[col]:
            surv.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22),
                        frameon=False)
    fig.tight_layout()
    return fig


def plot(table: pa.Table, spec: SweepSpec, levels: dict[str, list[Level]], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = join(out, "plots")
    storage.makedirs(folder)
    paths = []
    cols = [f.column for f in spec.filters]
    fig = histogram_figure(table, spec, levels)
    paths.append(join(folder, "histograms_survival.png"))
    with atomic_path(paths[-1]) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
    if len(cols) > 1:
        ok = np.flatnonzero(np.logical_and.reduce([~np.isnan(values(table, c)) for c in cols]))
        scored = len(ok)
        if scored > CORRELATION_SAMPLE:      # ranks of a seeded sample: bounded memory, ~0.002 off
            ok = np.sort(np.random.default_rng(0).choice(ok, CORRELATION_SAMPLE, replace=False))
        sample = np.stack([values(table, c)[ok] for c in cols])
        ranks = np.argsort(np.argsort(sample, axis=1), axis=1).astype(np.float64)
        corr = np.corrcoef(ranks) if len(ok) > 2 else np.full((len(cols), len(cols)), np.nan)
        fig, ax = plt.subplots(figsize=(1.4 * len(cols) + 2.5, 1.2 * len(cols) + 2))
        im = ax.imshow(corr, vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(cols)), cols, fontsize=8)
        for a in range(len(cols)):
            for b in range(len(cols)):
                ax.text(b, a, f"{corr[a, b]:.2f}", ha="center", va="center", fontsize=8)
        sample = f"; a sample of {len(ok):,}" if len(ok) < scored else ""
        ax.set_title(f"Spearman correlation ({scored:,} rows with every score{sample})", fontsize=9)
        fig.colorbar(im)
        fig.tight_layout()
        paths.append(join(folder, "correlation.png"))
        with atomic_path(paths[-1]) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
    return paths


CORRELATION_SAMPLE = 1_000_000
SURVIVAL_POINTS = 4_000
SPEC_FILE = "sweep_spec.yaml"
# every top-level name a sweep writes: a re-run or overwrite deletes these and nothing else
ENTRIES = [SPEC_FILE, "cells.csv", "cells.md", "selections", "overlap.csv", "plots", "sheets", "sweep.json"]


def claim(spec: SweepSpec) -> None:
    """Own the output folder. A sweep is cheap and redone whole on every run, so the previous
    sweep's files (its ownership record lists them) are cleared first: no stale cell_NNN.parquet
    from a bigger sweep survives. A different spec needs ``overwrite: true``."""
    from pipeline.contract.config import result_dict

    doc = result_dict(spec)
    fp = fingerprint(doc)
    claim_output(spec.output, join(spec.output, SPEC_FILE), fp, doc, spec.overwrite, "sweep",
                 "annotations or filters", ENTRIES, "sweep",
                 {f"annotations[{i}]": p for i, p in enumerate(spec.annotations)}, fresh=True)


def run(spec: SweepSpec, log=None) -> SweepResult:
    t0 = time.perf_counter()
    swept = plan(spec)
    claim(spec)
    t1 = time.perf_counter()
    levels = {f.column: levels_for(f, swept.values[f.column]) for f in spec.filters}
    cells, inter = cut(swept, spec, levels, spec.output)
    write_outputs(cells, inter, spec.output)
    t3 = time.perf_counter()
    seconds = {"read": t1 - t0, "cells": t3 - t1}
    if spec.plots:
        plot(pa.table(swept.values), spec, levels, spec.output)
        seconds["plots"] = time.perf_counter() - t3
    if spec.sheets.per_side:
        t4 = time.perf_counter()
        contact_sheets(swept.refs, [run_dir(p) for p in spec.annotations], swept.values, levels,
                       spec.sheets.per_side, spec.sheets.thumb, spec.output)
        seconds["sheets"] = time.perf_counter() - t4
    result = SweepResult(spec.output, swept.rows, cells, levels, seconds)
    atomic_write(join(spec.output, "sweep.json"),   # written last: the sweep is complete
                 json.dumps({"rows": swept.rows, "cells": len(cells), "seconds": seconds,
                             "empty_cells": [_slug(i) for i, c in enumerate(cells) if c.count == 0],
                             "annotations": [storage.absolute(p) for p in spec.annotations]}, indent=2).encode())
    return result


def format_summary(r: SweepResult, limit: int = 30) -> str:
    lines = [f"winnow sweep: {r.rows} rows, {len(r.cells)} cells -> {r.output}"]
    empty = [c for c in r.cells if c.count == 0]
    if empty:
        lines.append(f"  warning: {len(empty)} of {len(r.cells)} cells keep 0 rows (marked in cells.md): "
                     + ", ".join(c.name for c in empty[:4]) + (", ..." if len(empty) > 4 else "")
                     + "; no row passes their thresholds")
    singles = [c for c in r.cells if len(c.levels) == 1]
    for c in singles[:limit]:
        lines.append(f"  {c.levels[0].name:<48} kept {c.count:>9} ({100 * c.fraction:5.1f} %)")
    if len(singles) > limit:
        lines.append(f"  ... {len(singles) - limit} more levels (cells.md)")
    combos = [c for c in r.cells if len(c.levels) > 1]
    if combos:
        lines.append(f"  {len(combos)} combinations (cells.md); the smallest: "
                     + ", ".join(f"{c.count}" for c in sorted(combos, key=lambda c: c.count)[:5]))
    lines.append("  time " + ", ".join(f"{k} {v:.2f} s" for k, v in r.seconds.items()))
    lines.append(f"  table {join(r.output, 'cells.md')}; selections in {join(r.output, 'selections')}/")
    lines.append(f"  materialise a cell: winnow select --selection {join(r.output, 'selections', 'cell_NNN.parquet')} "
                 f"--output DIR (or train on it: data.selection)")
    return "\n".join(lines)


__all__ = ["FilterSpec", "Level", "Swept", "SweepSpec", "cut", "derive_text", "levels_for", "load", "make_cells",
           "overlap", "parse", "run", "source_column", "text_measure"]


def plan(spec: SweepSpec) -> Swept:
    """The rows a sweep cuts: the swept columns of every annotation table (checked before anything is written)."""
    return read_table(spec)


def arguments(parser) -> None:
    from pipeline.commands import add_set_argument

    parser.add_argument("spec", help="sweep spec YAML (see jobs/sweep_svd_filters.yaml)")
    add_set_argument(parser)


def from_args(args) -> SweepSpec:
    return load(args.spec, args.set)
