"""winnow sweep: grid arithmetic on a table with known quantiles, manifests, plots and sheets."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.commands import sweep
from pipeline.contract.config import ConfigError
from tests.helpers import run_curate


@pytest.fixture()
def table_path(tmp_path):
    """1,000 kept rows with aesthetic = i and ocr = (7 i mod 1000) / 1000, plus 10 rejected rows
    and 5 kept rows without an aesthetic score."""
    i = np.arange(1000)
    rows = {"key": [f"{k:09d}" for k in range(1015)],
            "status": ["kept"] * 1000 + ["rejected"] * 10 + ["kept"] * 5,
            "partition": [0] * 1015,
            "aesthetic_score": list(i.astype(float)) + [5000.0] * 10 + [None] * 5,
            "ocr_area_ratio": list((7 * i % 1000) / 1000) + [0.0] * 15}
    path = tmp_path / "annotations.parquet"
    pq.write_table(pa.table(rows), path)
    return str(path)


def spec(path, out, **extra):
    data = {"annotations": [path], "output": out, "plots": False, "sheets": {"per_side": 0},
            "filters": [{"column": "aesthetic_score", "drop_fractions": [0.125, 0.25, 0.5], "thresholds": [900]},
                        {"column": "ocr_area_ratio", "drop_fractions": [0.25]}]}
    data.update(extra)
    return sweep.parse(data)


def test_grid_counts_thresholds_and_combinations(table_path, tmp_path):
    r = sweep.run(spec(table_path, str(tmp_path / "s")))
    assert r.rows == 1005                                     # kept rows only
    by_name = {c.name: c for c in r.cells}
    # 1,000 scored rows: dropping the bottom p keeps the rows >= the value of rank floor(p n)
    assert by_name["aesthetic_score>=125(drop0.125)"].count == 875
    assert by_name["aesthetic_score>=250(drop0.25)"].count == 750
    assert by_name["aesthetic_score>=500(drop0.5)"].count == 500
    assert by_name["aesthetic_score>=900(abs)"].count == 100
    # 1,005 scored rows (the 5 unscored have ocr 0): the top 251 are dropped
    assert by_name["ocr_area_ratio<=0.748(drop0.25)"].count == 754
    assert by_name["all"].count == 1005
    combo = by_name["aesthetic_score>=500(drop0.5) & ocr_area_ratio<=0.748(drop0.25)"]
    want = sum(1 for i in range(500, 1000) if (7 * i % 1000) / 1000 <= 0.748)
    assert combo.count == want == 357
    assert len(r.cells) == 1 + 5 + 4 * 1                      # all, 5 single levels, 4 x 1 combinations


def test_selection_manifests_round_trip(table_path, tmp_path):
    out = str(tmp_path / "s")
    r = sweep.run(spec(table_path, out))
    rows = {row["filters"]: row for row in _csv(os.path.join(out, "cells.csv"))}
    cell = rows["aesthetic_score>=900(abs)"]["cell"]
    sel = pq.read_table(os.path.join(out, "selections", f"{cell}.parquet"))
    assert sel.column("key").to_pylist() == [f"{k:09d}" for k in range(900, 1000)]
    meta = json.loads(sel.schema.metadata[b"winnow_thresholds"])
    assert meta == {"aesthetic_score": {"keep": "high", "threshold": 900.0, "drop_fraction": None}}
    ov = np.loadtxt(os.path.join(out, "overlap.csv"), delimiter=",", skiprows=1)
    assert ov.shape == (6, 6) and np.allclose(np.diag(ov), 1)
    assert ov[1, 3] == pytest.approx(500 / 875, abs=1e-4)     # drop 0.5 inside drop 0.125
    assert "| aesthetic_score>=900(abs) | 100 | 10.0 % |" in open(os.path.join(out, "cells.md")).read()
    assert r.seconds["cells"] < 60


def _csv(path):
    import csv
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_bad_sweep_specs(table_path, tmp_path):
    with pytest.raises(ConfigError, match="which end of 'width' is good"):
        spec(table_path, "o", filters=[{"column": "width", "drop_fractions": [0.5]}])
    with pytest.raises(ConfigError, match=r"drop_fractions: \[1.5\] must be between 0 and 1"):
        spec(table_path, "o", filters=[{"column": "aesthetic_score", "drop_fractions": [1.5]}])
    with pytest.raises(ConfigError, match="has no column 'motion_score'"):
        sweep.run(spec(table_path, str(tmp_path / "o"), filters=[{"column": "motion_score", "thresholds": [1]}]))


def test_sweep_of_a_curated_run_writes_plots_and_contact_sheets(ray_local, corpus, tmp_path):
    from PIL import Image

    root, _ = corpus
    run_dir = str(tmp_path / "run")
    run_curate(root, run_dir, samples_per_shard=16)
    out = str(tmp_path / "sweep")
    r = sweep.run(sweep.parse({"annotations": [run_dir], "output": out, "sheets": {"per_side": 3, "thumb": 64},
                               "filters": [{"column": "width", "keep": "high", "drop_fractions": [0.25]},
                                           {"column": "height", "keep": "high", "drop_fractions": [0.5]}]}))
    assert r.rows == 46
    assert os.path.exists(os.path.join(out, "plots", "histograms_survival.png"))
    assert os.path.exists(os.path.join(out, "plots", "correlation.png"))
    with Image.open(os.path.join(out, "sheets", "width_0.jpg")) as im:
        assert im.size == (3 * 64, 2 * (64 + 14) + 2 * 14)
        px = np.asarray(im.convert("L"))
    assert px[14:78, :64].std() > 5                           # a real thumbnail, not the grey placeholder


def test_jobs_sweep_specs_parse():
    import glob

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import yaml

    files = sorted(f for f in glob.glob(os.path.join(root, "jobs", "sweep_*.yaml"))
                   if yaml.safe_load(open(f))["kind"] == "sweep")          # sweep_train_eval.yaml is a study
    assert len(files) == 2
    specs = {os.path.basename(f): sweep.load(f) for f in files}
    svd = specs["sweep_svd_filters.yaml"]
    assert [f.column for f in svd.filters] == ["clip_similarity", "aesthetic_score", "ocr_area_ratio", "motion_score"]
    assert [f.keep for f in svd.filters] == ["high", "high", "low", "high"]
    assert all(f.drop_fractions == [0.125, 0.25, 0.5] for f in svd.filters)
    assert specs["sweep_laion_aesthetic.yaml"].filters[0].thresholds == [4.5, 5.0, 5.5, 6.0]


def test_empty_cells_are_flagged_and_the_plot_reads_well(tmp_path):
    """The demo's case: scores in a narrow band (4.9-5.2) swept at absolute thresholds far from it and at
    drop fractions close together. Cells that keep nothing are warned about and marked; the plot's x-axis
    comes from the scores (not stretched to 4.5-6), and no two texts in the rendered figure overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    rng = np.random.default_rng(0)
    scores = rng.uniform(4.9, 5.2, 300)
    path = tmp_path / "annotations.parquet"
    pq.write_table(pa.table({"key": [f"{k:09d}" for k in range(300)], "status": ["kept"] * 300, "partition": [0] * 300,
                             "aesthetic_score": scores}), path)
    s = spec(str(path), str(tmp_path / "sw"), plots=True,
             filters=[{"column": "aesthetic_score", "drop_fractions": [0.1, 0.12, 0.125, 0.25],
                       "thresholds": [4.5, 5.5, 6.0]}])
    r = sweep.run(s)
    assert [c.count for c in r.cells] == [300, 270, 264, 263, 225, 300, 0, 0]
    text = sweep.format_summary(r)
    assert "warning: 2 of 8 cells keep 0 rows" in text and "aesthetic_score>=5.5(abs)" in text
    md = open(tmp_path / "sw" / "cells.md").read()
    assert md.count("**0: empty**") == 2
    assert json.load(open(tmp_path / "sw" / "sweep.json"))["empty_cells"] == ["cell_006", "cell_007"]
    assert os.path.exists(tmp_path / "sw" / "plots" / "histograms_survival.png")

    fig = sweep.histogram_figure(pa.table({"aesthetic_score": scores}), s, r.levels)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    hist = fig.axes[0]
    lo, hi = hist.get_xlim()
    span = scores.max() - scores.min()
    assert scores.min() - 0.1 * span <= lo < scores.min() and scores.max() < hi <= scores.max() + 0.1 * span
    texts = []
    for ax in fig.axes:        # what is drawn: titles, axis labels, the ticks inside the limits, legend entries
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
        texts += [
            t for t, v in zip(ax.get_xticklabels(), ax.get_xticks(), strict=True) if min(x0, x1) <= v <= max(x0, x1)
        ]
        texts += [
            t for t, v in zip(ax.get_yticklabels(), ax.get_yticks(), strict=True) if min(y0, y1) <= v <= max(y0, y1)
        ]
        texts += ax.get_legend().get_texts() if ax.get_legend() else []
    texts = [t for t in texts if isinstance(t, Text) and t.get_visible() and t.get_text().strip()]
    labels = [t.get_text() for t in texts]
    assert sum("beyond the scores" in x for x in labels) == 3            # 4.5, 5.5 and 6.0 are off the scores
    assert any("keeps 0" in x for x in labels)
    boxes = [t.get_window_extent(renderer) for t in texts]
    overlaps = [(labels[i], labels[j]) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
                if boxes[i].x0 < boxes[j].x1 - 1 and boxes[j].x0 < boxes[i].x1 - 1
                and boxes[i].y0 < boxes[j].y1 - 1 and boxes[j].y0 < boxes[i].y1 - 1]
    plt.close(fig)
    assert overlaps == []


def test_caption_columns_filter_by_words_chars_and_banned_matches(tmp_path):
    """Text measures on generated captions: empty, None, other scripts, control characters, long text."""
    rng = np.random.default_rng(0)
    vocab = ["a", "dog", "猫", "на", "ковре", "WATERMARK", "logo", "photo", "\u202e", "logos"]
    texts = [None, "", "   "] + [" ".join(rng.choice(vocab, size=int(k))) for k in rng.integers(1, 30, 297)]
    path = tmp_path / "annotations.parquet"
    pq.write_table(pa.table({"key": [f"{k:09d}" for k in range(300)], "status": ["kept"] * 300,
                             "partition": [0] * 300, "caption_vlm": texts}), path)
    pattern = r"(?i)\b(watermark|logo)\b"
    s = sweep.parse({"annotations": [str(path)], "output": str(tmp_path / "s"), "plots": False,
                     "sheets": {"per_side": 0}, "combine": False,
                     "filters": [{"column": "words(caption_vlm)", "thresholds": [1, 10]},
                                 {"column": "chars(caption_vlm)", "keep": "low", "thresholds": [60]},
                                 {"column": "matches(caption_vlm)", "pattern": pattern, "thresholds": [0]}]})
    assert [f.keep for f in s.filters] == ["high", "low", "low"]             # auto: longer is better, no matches
    cells = {c.name: c.count for c in sweep.run(s).cells}
    import re
    t = [x or "" for x in texts]
    assert cells["words(caption_vlm)>=1(abs)"] == sum(1 for x in t if x.split()) == 297
    assert cells["words(caption_vlm)>=10(abs)"] == sum(1 for x in t if len(x.split()) >= 10)
    assert cells["chars(caption_vlm)<=60(abs)"] == sum(1 for x in t if len(x) <= 60)
    banned = sum(1 for x in t if re.search(pattern, x))
    assert cells["matches(caption_vlm)<=0(abs)"] == 300 - banned and 0 < banned < 300   # 'logos' is not 'logo'
    for bad, msg in (({"column": "matches(caption_vlm)", "thresholds": [0]}, "give pattern"),
                     ({"column": "words(caption_vlm)", "pattern": "x", "thresholds": [1]}, "drop pattern"),
                     ({"column": "caption_vlm", "pattern": "x", "thresholds": [1]}, "only a matches"),
                     ({"column": "matches(caption_vlm)", "pattern": "(", "thresholds": [0]}, "not an RE2 regular"),
                     ({"column": "matches(caption_vlm)", "pattern": r"(a)\1", "thresholds": [0]}, "not an RE2")):
        with pytest.raises(ConfigError, match=msg):
            sweep.parse({"annotations": [str(path)], "output": str(tmp_path / "x"), "filters": [bad]})
    # a pattern that backtracks exponentially in Python's re, on the caption that triggers it: RE2
    # counts it in linear time (here, instead of never returning)
    hostile = pa.table({"caption": ["a" * 20_000 + "!", None]})
    f = sweep.FilterSpec(column="matches(caption)", pattern=r"(a+)+$", thresholds=[0])
    assert sweep.derive_text(hostile, [f]).column("matches(caption)").to_pylist() == [0.0, 0.0]
    with pytest.raises(ConfigError, match="has no column 'caption_coca'"):
        sweep.run(sweep.parse({"annotations": [str(path)], "output": str(tmp_path / "y"), "plots": False,
                               "filters": [{"column": "words(caption_coca)", "thresholds": [1]}]}))


def test_a_run_of_several_shard_tables_is_cut_file_by_file_with_sheets_from_the_right_rows(tmp_path):
    """Two shard tables (rejected rows among them, one without the OCR column): counts, manifests
    and the overlap match a brute-force cut of the whole table, and the contact sheet shows the
    images of the rows next to the cut (each image's grey level is its score)."""
    import io

    from PIL import Image

    from pipeline.contract import tar as tars
    from pipeline.contract.schema import KEY

    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    rows_all = []
    for p in range(2):
        blocks, rows = [], []
        for i in range(10):
            key, score = f"{p}{i:08d}", 10 * p + i             # scores 0..19, one per image
            buf = io.BytesIO()
            Image.new("RGB", (40, 40), (score * 12,) * 3).save(buf, "JPEG", quality=95)
            blocks.append(tars.block(f"{key}.jpg", buf.getvalue()))
            row = {"key": key, "partition": p, "status": "rejected" if i == 3 else "kept",
                   "aesthetic_score": float(score)}
            if p == 0:
                row["ocr_area_ratio"] = (7 * score % 10) / 10
            rows.append(row)
        blocks.append(tars.end(sum(len(b) for b in blocks)))
        (run / "shards" / f"{p:05d}.tar").write_bytes(b"".join(blocks))
        pq.write_table(pa.Table.from_pylist(rows), str(run / "shards" / f"{p:05d}.parquet"))
        rows_all += rows
    out = tmp_path / "sw"
    r = sweep.run(sweep.parse({"annotations": [str(run)], "output": str(out), "plots": True,
                               "sheets": {"per_side": 2, "thumb": 32},
                               "filters": [{"column": "aesthetic_score", "thresholds": [9.5], "drop_fractions": [0.5]},
                                           {"column": "ocr_area_ratio", "thresholds": [0.45]}]}))
    kept = [x for x in rows_all if x["status"] == "kept"]
    assert r.rows == 18
    score = {x["key"]: x["aesthetic_score"] for x in kept}
    ocr = {x["key"]: x.get("ocr_area_ratio", float("nan")) for x in kept}
    want = {"aesthetic_score>=9.5(abs)": {k for k in score if score[k] >= 9.5},
            "aesthetic_score>=10(drop0.5)": {k for k in score if score[k] >= 10},     # rank 9 of 18 sorted
            "ocr_area_ratio<=0.45(abs)": {k for k in ocr if ocr[k] <= 0.45}}
    want["aesthetic_score>=9.5(abs) & ocr_area_ratio<=0.45(abs)"] = \
        want["aesthetic_score>=9.5(abs)"] & want["ocr_area_ratio<=0.45(abs)"]
    rows = {row["filters"]: row for row in _csv(str(out / "cells.csv"))}
    for name, keys in want.items():
        sel = pq.read_table(str(out / "selections" / f"{rows[name]['cell']}.parquet"))
        assert sorted(sel.column(KEY).to_pylist()) == sorted(keys) and int(rows[name]["count"]) == len(keys), name
        assert set(sel.column("run").to_pylist()) <= {0}
    ov = np.loadtxt(str(out / "overlap.csv"), delimiter=",", skiprows=1)
    a, b = want["aesthetic_score>=9.5(abs)"], want["ocr_area_ratio<=0.45(abs)"]
    assert ov[1, 3] == pytest.approx(len(a & b) / len(a | b), abs=1e-4)
    # the sheet of the cut at 9.5: dropped 9 then 8, kept 10 then 11 (nearest first)
    sheet = np.asarray(Image.open(out / "sheets" / "aesthetic_score_0.jpg").convert("L"), np.float64)
    label = 14
    for r_, scores in enumerate(([9, 8], [10, 11])):
        y = r_ * (32 + 2 * label) + label + 16
        for i, s in enumerate(scores):
            assert sheet[y, i * 32 + 16] == pytest.approx(s * 12, abs=6)
