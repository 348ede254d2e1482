import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq

from pipeline.shards import (
    FragmentWriter,
    done_keys,
    fragment_files,
    read_fragments,
    write_shard,
)


def test_fragments_normalise_nan_nulls_and_assemble_a_shard(tmp_path):
    work, out = str(tmp_path / "work"), str(tmp_path / "shards")
    # as Ray hands columns over: all-null columns arrive as float NaN, ints with nulls as floats
    batch = {"key": np.array(["000000000", "000000001", "000000002"], dtype=object),
             "partition": np.array([0, 0, 0]), "caption": np.array([np.nan] * 3),
             "width": np.array([640.0, np.nan, 320.0]), "height": np.array([480.0, np.nan, 200.0]),
             "status": np.array(["kept", "rejected", "kept"], dtype=object),
             "reject_reason": np.array([None, "decode_error: empty file", None], dtype=object),
             "image": np.array([b"\xff\xd8a", None, b"\xff\xd8b"], dtype=object),
             "image_ext": np.array(["jpg", None, "jpg"], dtype=object),
             "raw_bytes": np.array([b"x", b"y", b"z"], dtype=object),
             "_time_decode": np.array([0.5, 0.25, 0.25]), "_rss_decode": np.array([310.0, 310.0, 402.5])}
    tally = FragmentWriter(work)({k: v[:2] for k, v in batch.items()})
    FragmentWriter(work)({k: v[2:] for k, v in batch.items()})
    FragmentWriter(work)({k: v[2:] for k, v in batch.items()})      # a retried task writes row 2 again
    assert tally["key"].tolist() == ["000000000", "000000001"]
    assert len(fragment_files(work, 0)) == 3
    assert read_fragments(fragment_files(work)).num_rows == 3 and done_keys(work) == {
        "000000000",
        "000000001",
        "000000002",
    }
    stats = write_shard(
        work, out, 0, expected=3, reductions={"000000002": ("duplicate: phash distance 1 to 000000000", "000000000")}
    )
    assert stats == {"shard": "00000", "partition": 0, "count": 3, "kept": 1, "rejected": 2,
                     "reasons": {"decode_error": 1, "duplicate": 1}, "stage_seconds": {"decode": 1.0},
                     "stage_rss_mb": {"decode": 402.5}, "tar_bytes": stats["tar_bytes"]}
    with tarfile.open(os.path.join(out, "00000.tar")) as tf:
        assert tf.getnames() == ["000000000.jpg", "000000000.txt", "000000000.json"]
        meta = json.load(tf.extractfile("000000000.json"))
        assert tf.extractfile("000000000.txt").read() == b""
    assert meta == {"key": "000000000", "partition": 0, "caption": None, "width": 640, "height": 480,
                    "status": "kept", "reject_reason": None, "image_ext": "jpg", "duplicate_of": None}
    table = pq.read_table(os.path.join(out, "00000.parquet"))
    assert table.column("duplicate_of").to_pylist() == [None, None, "000000000"]
    assert str(table.schema.field("caption").type) == "string" and str(table.schema.field("width").type) == "int64"
    assert json.load(open(os.path.join(out, "00000_stats.json"))) == stats


def test_a_block_gathered_by_the_writer_is_one_fragment_per_partition(tmp_path):
    """``FragmentWriter.add`` gathers the stage batches of a block; ``flush`` writes one fragment per
    partition and tallies every row added; a retried write of the same rows reads back once, first
    copy first, in Arrow (``first_copies``)."""
    from pipeline.adapter import TimedChain
    from pipeline.shards import first_copies

    work = str(tmp_path / "work")
    keys = [f"{p:05d}{j:04d}" for p in (0, 1) for j in range(5)]
    block = {"key": np.array(keys, dtype=object), "partition": np.array([0] * 5 + [1] * 5),
             "status": np.array(["kept", "rejected"] * 5, dtype=object),
             "caption": np.array([f"c{i}" for i in range(10)], dtype=object)}
    writer = FragmentWriter(work)
    chain = TimedChain([], tail=writer, split=3)            # the stages would see batches of 3
    tally = chain(dict(block))
    assert tally["key"].tolist() == keys and tally["status"].tolist() == ["kept", "rejected"] * 5
    assert [len(fragment_files(work, p)) for p in (0, 1)] == [1, 1]
    writer({k: v[4:6] for k, v in block.items()})                      # a retried task: two rows again
    table = read_fragments(fragment_files(work))
    assert sorted(table.column("key").to_pylist()) == sorted(keys) and table.num_rows == 10
    import pyarrow as pa

    dup = pa.table({"key": ["b", "a", "b", "c", "a"], "v": [1, 2, 3, 4, 5]})
    assert first_copies(dup).to_pydict() == {"key": ["b", "a", "c"], "v": [1, 2, 4]}
