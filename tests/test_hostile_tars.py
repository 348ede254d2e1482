"""Tar shards from elsewhere: one key rule (webdataset's), every image member accounted, no
member name that escapes a folder is ever written."""
from __future__ import annotations

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
from pipeline.contract import tar as tars
from pipeline.contract.config import ConfigError
from pipeline.readers import InputSpec


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 32, 3), seed * 30 % 255, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tar(path, members, fmt=tarfile.USTAR_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


HOSTILE = [("a.b.jpg", _jpeg(1)), ("a.c.jpg", _jpeg(2)),              # two images under webdataset's key 'a'
           ("x.jpg", _jpeg(3)), ("x.txt", b"x caption"), ("x.JPG", _jpeg(4)),   # case twins
           ("y.jpg", _jpeg(5)), ("y.jpg", _jpeg(6)),                  # a repeated name
           ("../../up.jpg", _jpeg(7)), ("dir/z.jpg", _jpeg(8)),       # paths inside member names
           ("w.json", b'{"caption": "json only"}'), (".hidden.jpg", _jpeg(9))]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
def test_every_image_member_is_a_sample_or_a_named_rejected_row(tmp_path, fmt):
    _tar(tmp_path / "00000.tar", HOSTILE, fmt)
    plan = readers.plan(InputSpec(path=str(tmp_path / "00000.tar")), samples_per_shard=100)
    rows = plan.table.select(["source_key", "plan_error"]).to_pylist()
    assert [(r["source_key"], r["plan_error"]) for r in rows] == [
        ("a.b.jpg", "ambiguous_key: 'a.b.jpg' and 'a.c.jpg' share the key 'a' (webdataset's key: the name up to the "
                    "first dot)"),
        ("a.c.jpg", "ambiguous_key: 'a.b.jpg' and 'a.c.jpg' share the key 'a' (webdataset's key: the name up to the "
                    "first dot)"),
        ("a", "missing_image: no .jpg/.png/.webp member"),
        ("x", None),
        ("x.JPG", "duplicate_member: 'x.JPG' repeats 'x.jpg'"),
        ("y", None),
        ("y.jpg", "duplicate_member: 'y.jpg' repeats 'y.jpg'"),
        ("../../up", None),
        ("dir/z", None),
        ("w", "missing_image: no .jpg/.png/.webp member"),
        (".hidden.jpg", "ambiguous_key: '.hidden.jpg' has no sample key (its file name starts with a dot)"),
    ]
    keys = plan.table.column("key").to_pylist()          # strays share keys: rows are numbered instead
    assert keys == [f"00000{j:04d}" for j in range(11)]
    images = sum(1 for n, _ in HOSTILE if n.lower().endswith(".jpg"))
    accounted = sum(1 for r in rows if r["plan_error"] is None or r["plan_error"].split(":")[0] in
                    ("duplicate_member", "ambiguous_key"))
    assert accounted == images == 9
    # the sample 'y' reads the first of the repeated members
    y = plan.table.filter(pa.array([r["source_key"] == "y" for r in rows])).to_pylist()[0]
    with open(tmp_path / "00000.tar", "rb") as fh:
        fh.seek(y["ref_offset"])
        assert fh.read(y["ref_size"]) == _jpeg(5)


def test_the_key_rule_is_webdataset_s():
    import webdataset as wds

    for name in ["a.b.jpg", "dir/x.tar.gz", "k.jpg", "noext", ".hidden", "p.q/r.s.t"]:
        ours = tars.split_name(name)
        m = wds.tariterators.base_plus_ext(name)
        theirs = None if m == (None, None) or m[0] is None else m
        if name.rpartition("/")[2].startswith("."):
            assert ours is None
        else:
            assert ours == theirs, name


@pytest.mark.parametrize("name", ["../x.jpg", "a/b.jpg", "/etc/x.jpg", "..jpg", "a\\b.jpg", "a\nb.jpg", ""])
def test_unsafe_member_names_are_never_written(name):
    with pytest.raises(ValueError, match="refusing to write tar member"):
        tars.block(name, b"x")


def test_select_refuses_keys_that_name_paths(tmp_path):
    from pipeline.commands import select as selection

    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    keys = ["000000000", "../../../tmp/evil"]
    pq.write_table(pa.table({"key": keys, "status": ["kept"] * 2, "partition": [0, 0],
                             "aesthetic_score": [1.0, 2.0]}), run / "annotations.parquet")
    spec = selection.parse({"runs": [str(run)], "output": {"path": str(tmp_path / "out")},
                            "filters": [{"column": "aesthetic_score", "thresholds": [0.5]}]})
    with pytest.raises(ConfigError, match=r"the key '../../../tmp/evil' holds a path separator"):
        selection.plan(spec)


def test_the_index_and_sheets_read_shards_by_the_same_rule(tmp_path):
    from pipeline.commands.sheets import ShardImages
    from training.index import index_shard

    shards = tmp_path / "run" / "shards"
    shards.mkdir(parents=True)
    members = [("000000000.jpg", _jpeg(1)), ("000000000.txt", b"one"), ("000000000.jpg", _jpeg(2)),
               ("000000001.png", _jpeg(3)), ("000000001.jpg", _jpeg(4)), ("000000002.jpg", _jpeg(5))]
    _tar(shards / "00000.tar", members)
    pq.write_table(pa.table({"key": ["000000000", "000000001", "000000002"], "status": ["kept"] * 3,
                             "caption": ["one", "two", "three"], "width": [32] * 3, "height": [24] * 3,
                             "stored_width": [32] * 3, "stored_height": [24] * 3}), shards / "00000.parquet")
    index = index_shard(str(shards / "00000.tar")).to_pylist()
    assert [(r["key"], r["ext"]) for r in index] == [("000000000", "jpg"), ("000000002", "jpg")]
    with open(shards / "00000.tar", "rb") as fh:
        fh.seek(index[0]["offset"])
        assert fh.read(index[0]["size"]) == _jpeg(1)            # the first of a repeated name
    sheets = ShardImages([str(tmp_path / "run" / "annotations.parquet")], thumb=32)
    try:
        assert sheets._member(0, 0, "000000000") == (_jpeg(1), "jpg")
        assert sheets._member(0, 0, "000000001") is None        # two images under one key: none is shown
    finally:
        sheets.close()
    assert json.loads(json.dumps(index[0]))["caption"] == "one"
    assert os.path.exists(shards / "00000.tar")


def test_img2dataset_failed_rows_start_the_funnel_at_the_url_count(tmp_path):
    """img2dataset's parquet beside each tar lists every URL; the failed ones become rejected rows."""
    _tar(tmp_path / "00000.tar", [("000000000.jpg", _jpeg(1)), ("000000000.txt", b"a"),
                                  ("000000002.jpg", _jpeg(2)), ("000000002.txt", b"c")])
    pq.write_table(pa.table({"key": ["000000000", "000000001", "000000002", "000000003"],
                             "url": [f"http://x/{i}.jpg" for i in range(4)], "caption": ["a", "b", "c", "d"],
                             "status": ["success", "failed_to_download", "success", "failed_to_resize"],
                             "error_message": [None, "HTTP Error 404", None, "image too small"]}),
                   tmp_path / "00000.parquet")
    plan = readers.plan(InputSpec(path=str(tmp_path)), samples_per_shard=100)
    rows = plan.table.select(["key", "source_key", "plan_error", "url"]).to_pylist()
    assert [(r["source_key"], r["plan_error"], r["url"]) for r in rows] == [
        ("000000000", None, None), ("000000002", None, None),
        ("000000001", "not_downloaded: img2dataset failed_to_download: HTTP Error 404", "http://x/1.jpg"),
        ("000000003", "not_downloaded: img2dataset failed_to_resize: image too small", "http://x/3.jpg")]
    assert plan.num_inputs == 4
    # unique img2dataset keys stay the keys: a join on key with img2dataset's parquet is right
    assert [r["key"] for r in rows] == [r["source_key"] for r in rows]
    # a winnow run's own shard parquet (status kept / rejected) is not img2dataset's: nothing added
    pq.write_table(pa.table({"key": ["000000000"], "status": ["kept"]}), tmp_path / "00000.parquet")
    assert readers.plan(InputSpec(path=str(tmp_path)), samples_per_shard=100).num_inputs == 2
