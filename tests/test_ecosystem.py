"""A run folder read by the ecosystem's tools as their users would: Hugging Face datasets, DuckDB."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from tests.helpers import annotations, run_curate


@pytest.fixture(scope="module")
def small_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("eco")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 64, 3), dtype=np.uint8)).save(photos / f"p{i}.jpg")
        (photos / f"p{i}.txt").write_text(f"photo {i}")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    out = str(root / "out")
    res = run_curate(str(photos), out, samples_per_shard=3, stages=["decode"])
    return out, res


def test_load_dataset_reads_images_captions_and_rows(small_run, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, res = small_run
    assert os.path.exists(os.path.join(out, ".winnow", "owner.json"))
    for path in (out, os.path.join(out, "shards")):
        ds = datasets.load_dataset(path, cache_dir=str(tmp_path / f"cache{len(path)}"))
        assert list(ds) == ["train"]                     # no file of winnow's is taken for a split
        train = ds["train"]
        assert train.num_rows == res.kept == 7
        assert set(train.column_names) >= {"jpg", "txt", "json", "__key__"}
        row = sorted(train, key=lambda r: r["__key__"])[2]
        assert row["txt"] == "photo 2" and row["json"]["caption"] == "photo 2"
        assert row["jpg"].size == (64, 56) and row["json"]["key"] == row["__key__"]


def test_duckdb_reads_the_shard_parquet_glob_as_one_table(small_run):
    duckdb = pytest.importorskip("duckdb")
    out, res = small_run
    con = duckdb.connect()
    got = con.execute(
        f"SELECT status, count(*) FROM '{out}/shards/*.parquet' GROUP BY status ORDER BY status"
    ).fetchall()
    assert got == [("kept", 7), ("rejected", 1)]
    # each row is on disk once: a glob over the whole output counts every input once (it counted 2x)
    n = con.execute(f"SELECT count(*) FROM '{out}/**/*.parquet'").fetchone()[0]
    assert n == res.inputs == len(annotations(out)) == 8
    assert not os.path.exists(os.path.join(out, "annotations.parquet"))
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "`shards/NNNNN.parquet`: the annotation table" in card and "'**/*.parquet'" in card
