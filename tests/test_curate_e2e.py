"""End to end on a local Ray with 2 CPUs: folder, img2dataset and LAION-parquet inputs."""
import glob
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.contract.config import ConfigError
from tests.helpers import annotations, run_curate, shard_stats


@pytest.fixture(scope="module")
def folder_run(ray_local, corpus, tmp_path_factory):
    root, expected = corpus
    out = str(tmp_path_factory.mktemp("run") / "out")
    result = run_curate(root, out, samples_per_shard=10)
    return root, expected, out, result


def test_every_input_is_a_row_and_counts_reconcile(folder_run):
    root, expected, out, result = folder_run
    df = annotations(out)
    assert len(df) == len(expected) == 54
    assert (result.inputs, result.kept, result.rejected) == (54, 46, 8)
    assert result.reasons == {"duplicate": 4, "decode_error": 3, "decompression_bomb": 1}
    assert df["key"].is_unique
    got = dict(zip(df["source"], df["reject_reason"], strict=True))
    for source, outcome in expected.items():
        if outcome is None:
            assert pd.isna(got[source]), (source, got[source])
        else:
            assert got[source].startswith(outcome), (source, got[source])
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["inputs"] == 54 and summary["kept"] == 46 and summary["shards"] == 6
    assert set(summary["stage_seconds"]) == {"load", "decode", "phash_dedup"}
    assert set(summary["stage_rss_mb"]) == {"load", "decode", "phash_dedup"}
    assert all(50 < v < 8000 for v in summary["stage_rss_mb"].values())     # a worker's peak RSS, in MB
    assert not os.path.exists(os.path.join(out, "_work"))


def test_duplicates_point_at_the_kept_original(folder_run):
    _, _, out, _ = folder_run
    df = annotations(out).set_index("source")
    for d in range(4):
        dup = df.loc[f"dup_{d:02d}_of_img_{d:04d}.jpg"]
        original = df.loc[next(s for s in df.index if s.startswith(f"part{d % 3}/img_{d:04d}."))]
        assert dup["duplicate_of"] == original["key"]
        assert original["status"] == "kept"


def test_shards_hold_exactly_the_kept_samples(folder_run):
    _, _, out, _ = folder_run
    df = annotations(out)
    kept = set(df.loc[df.status == "kept", "key"])
    tars = sorted(glob.glob(os.path.join(out, "shards", "*.tar")))
    assert [os.path.basename(t) for t in tars] == [f"{i:05d}.tar" for i in range(6)]
    seen = []
    for sample in wds.WebDataset(tars, shardshuffle=False).decode("pil"):
        seen.append(sample["__key__"])
        meta = sample["json"]
        assert meta["key"] == sample["__key__"] and meta["status"] == "kept"
        assert max(sample["jpg"].size) <= 1024
        assert sample["jpg"].size == (meta["stored_width"], meta["stored_height"])
        assert sample["txt"] == (meta["caption"] or "")
        assert "image" not in meta and "raw_bytes" not in meta and not any(k.startswith("_time") for k in meta)
    assert sorted(seen) == sorted(kept)
    stats = shard_stats(out)
    assert sum(s["count"] for s in stats) == 54 and sum(s["kept"] for s in stats) == 46
    for s in stats:
        part = pq.read_table(os.path.join(out, "shards", f"{s['shard']}.parquet"))
        assert part.num_rows == s["count"]


def test_odd_images_are_normalised(folder_run):
    _, _, out, _ = folder_run
    df = annotations(out).set_index("source")
    assert tuple(df.loc["bad/odd_exif_rotated.jpg", ["width", "height"]]) == (300, 400)
    assert df.loc["bad/odd_cmyk.jpg", "caption"] == "café au lait, crème brûlée"
    schema = pq.read_schema(os.path.join(out, "shards", "00000.parquet"))
    assert {n: str(schema.field(n).type) for n in ("width", "height", "stored_width", "status", "phash")} == {
        "width": "int64", "height": "int64", "stored_width": "int64", "status": "string", "phash": "string"}


def test_rerun_of_finished_output_changes_nothing(folder_run):
    root, _, out, result = folder_run
    before = {f: os.path.getmtime(f) for f in glob.glob(os.path.join(out, "shards", "*"))}
    again = run_curate(root, out, samples_per_shard=10)
    assert (again.inputs, again.kept) == (result.inputs, result.kept)
    assert again.already_complete and not result.already_complete
    from pipeline.commands.curate import format_summary

    assert format_summary(again).splitlines()[1] == ("  already complete: every shard was written by an earlier run; "
                                                    "nothing was redone")
    assert before == {f: os.path.getmtime(f) for f in glob.glob(os.path.join(out, "shards", "*"))}
    with pytest.raises(ConfigError, match="holds a run made by a different spec"):
        run_curate(root, out, samples_per_shard=7)


def test_img2dataset_shards_as_input(folder_run, tmp_path):
    _, _, out, result = folder_run
    out2 = str(tmp_path / "out2")
    res = run_curate(os.path.join(out, "shards"), out2, stages=[{"name": "decode", "max_side": 256}, "phash_dedup"])
    assert (res.inputs, res.kept) == (46, 46)
    df = annotations(out2)
    assert df["stored_width"].max() <= 256 and df["key"].str[:5].nunique() == 6   # one shard per input shard
    src = annotations(out).set_index("key")
    for _, row in df.iterrows():   # captions and sizes survive the round trip
        orig = src.loc[row["source_key"]]
        assert row["caption"] == orig["caption"] or (pd.isna(row["caption"]) and pd.isna(orig["caption"]))


def test_laion_parquet_with_sd1_filters(ray_local, corpus, tmp_path):
    root, expected = corpus
    sources = sorted(expected)
    rng = np.random.default_rng(7)
    aesthetic = np.round(rng.uniform(3.5, 7.5, len(sources)), 2)
    watermark = np.round(rng.uniform(0, 1, len(sources)), 2)
    paths = [os.path.join(root, s) for s in sources] + ["does/not/exist.jpg"]
    pq.write_table(pa.table({"path": paths, "TEXT": [f"t{i}" for i in range(len(paths))],
                             "AESTHETIC_SCORE": list(aesthetic) + [9.0], "pwatermark": list(watermark) + [0.0]}),
                   tmp_path / "laion.parquet")
    stages = [{"name": "metadata_filter", "rules": [{"column": "AESTHETIC_SCORE", "op": ">=", "value": 5},
                                                    {"column": "pwatermark", "op": "<", "value": 0.5}]},
              {"name": "decode"}]
    # the images live outside the parquet's folder: base_dir says where inputs may come from
    res = run_curate(str(tmp_path / "laion.parquet"), str(tmp_path / "out"), samples_per_shard=20, stages=stages,
                     input={"base_dir": root})
    passes = (aesthetic >= 5) & (watermark < 0.5)
    bad = {s for s, o in expected.items() if o in ("decode_error", "decompression_bomb")}
    want_kept = sum(1 for s, ok in zip(sources, passes, strict=True) if ok and s not in bad)
    assert res.inputs == len(sources) + 1
    assert res.kept == want_kept
    df = annotations(str(tmp_path / "out"))
    assert df.loc[df.source == "laion.parquet"].shape[0] == len(sources) + 1
    assert df.iloc[-1]["reject_reason"] == "missing_file: not found"
    assert df["AESTHETIC_SCORE"].tolist()[:3] == list(aesthetic[:3])
    assert res.reasons["metadata"] == int((~passes).sum())
