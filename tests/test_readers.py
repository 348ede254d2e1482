import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import readers
from pipeline.contract.config import ConfigError
from pipeline.contract.inputs import decode_text
from pipeline.readers import InputSpec, LoadSource


def plan_batch(plan, rows=None):
    t = plan.table if rows is None else plan.table.slice(0, rows)
    return {c: np.array(t.column(c).to_pylist(), dtype=object) for c in t.column_names}


def write_img(path, size=(64, 48), color="red"):
    Image.new("RGB", size, color).save(path)


def test_folder_plan_keys_captions_and_partitions(tmp_path):
    for i in range(5):
        write_img(tmp_path / f"a{i}.jpg")
    (tmp_path / "a1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "notes.md").write_text("counted")        # not an image: a row (decode rejects it), never skipped
    plan = readers.plan(InputSpec(path=str(tmp_path)), samples_per_shard=2)
    assert plan.format == "images" and plan.sidecars == 1
    assert plan.table.column("key").to_pylist() == ["000000000", "000000001", "000010000", "000010001", "000020000",
                                                    "000020001"]
    assert plan.table.column("source").to_pylist()[-1] == "notes.md"
    assert plan.counts == {0: 2, 1: 2, 2: 2}
    out = LoadSource()(plan_batch(plan))
    assert out["caption"].tolist() == [None, "café", None, None, None, None]
    assert all(isinstance(b, bytes) and len(b) > 100 for b in out["raw_bytes"][:5])
    assert out["raw_bytes"][5] == b"counted"


def test_parquet_plan_missing_files_urls_and_laion_columns(tmp_path):
    write_img(tmp_path / "x.jpg")
    pq.write_table(pa.table({
        "filepath": ["x.jpg", "missing.jpg", "http://example.com/a.jpg", None],
        "TEXT": ["one", "two", "three", "four"],
        "AESTHETIC_SCORE": [5.5, 4.0, 6.0, 7.0], "pwatermark": [0.1, 0.2, 0.3, 0.4], "other": [1, 2, 3, 4]}),
        tmp_path / "meta.parquet")
    plan = readers.plan(InputSpec(path=str(tmp_path / "meta.parquet")), samples_per_shard=10)
    assert plan.format == "laion_parquet"
    out = LoadSource()(plan_batch(plan))
    assert out["status"].tolist() == ["kept", "rejected", "rejected", "rejected"]
    assert out["reject_reason"].tolist()[1:] == [
        "missing_file: not found",
        "not_downloaded: a http URL is not read by winnow; download with img2dataset and give winnow its output folder",
        "missing_file: empty path"]
    assert out["caption"].tolist() == ["one", "two", "three", "four"]
    assert out["AESTHETIC_SCORE"].tolist() == [5.5, 4.0, 6.0, 7.0]
    assert "other" not in out
    with pytest.raises(ConfigError, match="input.caption_column: column 'caption' is not in"):
        readers.plan(InputSpec(path=str(tmp_path / "meta.parquet"), caption_column="caption"), 10)
    plan2 = readers.plan(InputSpec(path=str(tmp_path / "meta.parquet"), keep_columns=["other", "aesthetic"],
                                   rename_columns={"AESTHETIC_SCORE": "aesthetic"}), 10)
    assert plan2.table.column("aesthetic").to_pylist() == [5.5, 4.0, 6.0, 7.0]
    assert plan2.table.column("other").to_pylist() == [1, 2, 3, 4]
    assert "AESTHETIC_SCORE" not in plan2.table.column_names


def _streamed_inputs(folder, rng):
    """Two LAION parquet files of 41 and 30 rows in row groups of 7: the second lacks a carried column
    and has a caption column of numbers; paths of every kind (kept, missing, URL, empty, not text)."""
    os.makedirs(folder / "meta")
    kinds = ["x.jpg", "missing_{}.jpg", "https://example.com/{}.jpg", "", None, "s3://b/{}.jpg", "../out_{}.jpg"]
    write_img(folder / "x.jpg")
    paths = [kinds[k].format(i) if kinds[k] else kinds[k] for i, k in enumerate(rng.integers(0, len(kinds), 71))]
    pq.write_table(pa.table({"url": paths[:41], "caption": [f"c{i}" for i in range(41)],
                             "AESTHETIC_SCORE": rng.random(41)}), folder / "meta" / "a.parquet", row_group_size=7)
    pq.write_table(pa.table({"url": paths[41:], "caption": list(range(30))}), folder / "meta" / "b.parquet",
                   row_group_size=7)
    return str(folder / "meta")


@pytest.mark.parametrize("piece_rows, block_rows", [(7, 3), (14, 5), (1000, 64)])
def test_a_streamed_parquet_plan_makes_the_eager_plans_rows(tmp_path, monkeypatch, piece_rows, block_rows):
    """The plan Ray tasks make piece by piece (``StreamedParquet``) holds the rows, keys, partitions
    and plan errors of the plan made whole on the driver, across files, row groups and pieces; rows
    of finished partitions and done keys are left out; ``take`` reads exactly the rows asked for."""
    monkeypatch.setattr(readers, "PIECE_ROWS", piece_rows)
    spec = InputSpec(path=_streamed_inputs(tmp_path, np.random.default_rng(0)), base_dir=str(tmp_path),
                     protocols=["s3"])
    eager = readers.plan(spec, samples_per_shard=10)
    lazy = readers.plan(spec, samples_per_shard=10, stream=True)
    assert lazy.table is None and lazy.num_inputs == eager.num_inputs == 71 and lazy.counts == eager.counts
    assert len(lazy.streamed.pieces) == (11 if piece_rows == 7 else 6 if piece_rows == 14 else 2)
    st = lazy.streamed
    blocks = [b for piece in st.pieces for b in st.blocks(piece, block_rows, None, [])]
    got = pa.concat_tables(blocks)
    assert all(b.num_rows <= block_rows for b in blocks) and got.num_rows == 71
    want = eager.table.select(got.column_names)
    assert got.column_names == eager.table.column_names
    for c in got.column_names:
        assert got.column(c).to_pylist() == want.column(c).to_pylist(), c
    assert got.column("plan_error").null_count < 71 and got.column("AESTHETIC_SCORE").null_count == 30
    done = pa.array(["00001" + f"{j:04d}" for j in (0, 3, 9)] + ["00005" + "0000"])
    assert readers.row_numbers(done, 10).tolist() == [10, 13, 19, 50]
    rows = readers.row_numbers(done, 10)
    left = pa.concat_tables([b for piece in st.pieces for b in st.blocks(piece, block_rows, rows, [0, 6])])
    keys = eager.table.column("key").to_pylist()
    assert left.column("key").to_pylist() == [k for k in keys if k not in done.to_pylist()
                                              and int(k[:5]) not in (0, 6)]
    idx = [70, 0, 6, 7, 40, 41, 6]
    assert st.take(idx).column("key").to_pylist() == eager.table.take(pa.array(idx)).column("key").to_pylist()
    assert readers.partition_of_keys(keys[::7], 10) == {k: int(k[:5]) for k in keys[::7]}


def test_a_streamed_plan_refuses_paths_all_outside_the_folder_before_ray(tmp_path):
    """``_check_base`` reads the paths chunk by chunk: every local path outside the folder is a
    config error, as in the eager plan; one inside is enough."""
    os.makedirs(tmp_path / "meta")
    pq.write_table(pa.table({"path": ["/elsewhere/a.jpg", "/elsewhere/b.jpg"]}), tmp_path / "meta" / "m.parquet")
    with pytest.raises(ConfigError, match="all 2 local paths"):
        readers.plan(InputSpec(path=str(tmp_path / "meta" / "m.parquet")), 10, stream=True)
    pq.write_table(pa.table({"path": ["/elsewhere/a.jpg", "ok.jpg"]}), tmp_path / "meta" / "m.parquet")
    assert readers.plan(InputSpec(path=str(tmp_path / "meta" / "m.parquet")), 10, stream=True).num_inputs == 2


def make_img2dataset_tar(path, n, broken_last=False):
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            key = f"{i:09d}"
            buf = io.BytesIO()
            Image.new("RGB", (40 + i, 30), (i * 20 % 255, 0, 0)).save(buf, "JPEG")
            members = {f"{key}.jpg": buf.getvalue(), f"{key}.txt": f"caption {i}".encode(),
                       f"{key}.json": json.dumps({"key": key, "url": f"http://x/{i}.jpg", "similarity": 0.3 + i / 100,
                                                  "caption": f"caption {i}"}).encode()}
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    if broken_last:
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])


def test_webdataset_plan_and_load(tmp_path):
    make_img2dataset_tar(tmp_path / "00000.tar", 3)
    make_img2dataset_tar(tmp_path / "00001.tar", 2)
    plan = readers.plan(InputSpec(path=str(tmp_path)), samples_per_shard=1000)
    assert plan.format == "webdataset"
    assert plan.counts == {0: 3, 1: 2}
    assert plan.table.column("source_key").to_pylist() == [
        "000000000",
        "000000001",
        "000000002",
        "000000000",
        "000000001",
    ]
    out = LoadSource()(plan_batch(plan))
    assert out["status"].tolist() == ["kept"] * 5
    assert out["caption"].tolist() == ["caption 0", "caption 1", "caption 2", "caption 0", "caption 1"]
    assert out["url"][4] == "http://x/1.jpg"
    assert out["similarity"][2] == pytest.approx(0.32)
    assert Image.open(io.BytesIO(out["raw_bytes"][2])).size == (42, 30)
    brace = readers.plan(InputSpec(path=str(tmp_path / "{00000..00001}.tar")), 1000)
    assert brace.num_inputs == 5


def test_truncated_tar_is_counted(tmp_path):
    make_img2dataset_tar(tmp_path / "00000.tar", 2)
    make_img2dataset_tar(tmp_path / "00001.tar", 6, broken_last=True)
    plan = readers.plan(InputSpec(path=str(tmp_path)), 1000)
    out = LoadSource()(plan_batch(plan))
    reasons = [r for r in out["reject_reason"].tolist() if r]
    assert plan.counts[0] == 2 and out["status"].tolist()[:2] == ["kept", "kept"]
    assert reasons and all(r.startswith(("broken_shard", "read_error")) for r in reasons)


def test_decode_text_fallbacks():
    assert decode_text("naïve".encode()) == "naïve"
    assert decode_text("\ufeffbom".encode("utf-8")) == "bom"
    assert decode_text("crème".encode("latin-1")) == "crème"
    assert decode_text(b"a\x00b ") == "ab"
    assert decode_text(b"  ") is None


def test_bad_input_paths_fail_before_ray(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        readers.plan(InputSpec(path=str(tmp_path / "nope")), 10)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ConfigError, match="holds no images"):
        readers.plan(InputSpec(path=str(tmp_path / "empty")), 10)
