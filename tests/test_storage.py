"""The storage module against a real S3 API (moto's server on 127.0.0.1) and the local disk: the
same calls give the same answers, writes are whole or absent, deletion stays inside its prefix, and a
store that cannot be used fails in one line before any work."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from pipeline.contract import layout, storage
from pipeline.contract.config import ConfigError
from tests.s3server import SECRET_KEY
from tests.s3server import SERVER as S3

TREE = {"a.txt": b"a", "sub/b.bin": b"bb", "sub/deeper/c.parquet": b"ccc", "d.parquet": b"dddd"}


def _plant(root: str) -> None:
    for rel, data in TREE.items():
        storage.makedirs(storage.parent(storage.join(root, rel)))
        storage.write_once(storage.join(root, rel), data)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, bucket):
    return str(tmp_path / "root") if request.param == "local" else f"{bucket}/root"


def test_listing_reads_the_same_on_disk_and_on_the_store(root):
    _plant(root)
    # a sibling whose name starts like the folder's is not in it
    storage.makedirs(root + "2")
    storage.write_once(storage.join(root + "2", "x.txt"), b"x")
    assert storage.listdir(root) == ["a.txt", "d.parquet", "sub"]
    assert [storage.name(f) for f in storage.files_in(root)] == ["a.txt", "d.parquet"]
    assert [storage.name(f) for f in storage.files_in(root, ".parquet")] == ["d.parquet"]
    found = storage.find(root, ".parquet")
    assert [f[len(root) + 1:] for f in found] == ["d.parquet", "sub/deeper/c.parquet"]
    assert storage.read_bytes(storage.join(root, "sub", "b.bin")) == b"bb"
    assert storage.isdir(storage.join(root, "sub")) and not storage.isfile(storage.join(root, "sub"))
    assert storage.isfile(storage.join(root, "a.txt")) and storage.exists(storage.join(root, "a.txt"))
    assert not storage.exists(storage.join(root, "nope"))
    assert storage.listdir(storage.join(root, "nope")) == [] and storage.find(storage.join(root, "nope")) == []
    with pytest.raises(ValueError):
        storage.read_bytes(storage.join(root, "d.parquet"), limit=3)
    storage.write_once(storage.join(root, "empty"), b"")  # a ranged read of nothing is nothing
    assert (
        storage.read_bytes(storage.join(root, "empty"), limit=10)
        == b""
        == storage.read_bytes(storage.join(root, "empty"))
    )
    storage.remove(storage.join(root, "empty"))
    with storage.open_read(storage.join(root, "d.parquet")) as fh:
        fh.seek(2)
        assert fh.read(1) == b"d"
    # deleting a folder deletes what is under it and nothing that merely shares its name's prefix
    assert storage.remove_tree(storage.join(root, "sub")) == 2
    assert storage.listdir(root) == ["a.txt", "d.parquet"]
    assert storage.read_bytes(storage.join(root + "2", "x.txt")) == b"x"


def test_local_target_publishes_only_a_finished_file(root):
    storage.makedirs(root)
    path = storage.join(root, "plot.bin")
    with pytest.raises(RuntimeError):
        with storage.local_target(path) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"half")
            raise RuntimeError("writer died")
    assert not storage.exists(path)
    with storage.local_target(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"whole")
    assert storage.read_bytes(path) == b"whole"
    assert storage.listdir(root) == ["plot.bin"]


def test_a_streamed_write_that_fails_leaves_no_object_and_no_upload(bucket):
    """Bigger than one part, so it is a multipart upload; the writer dies after two parts."""
    path = f"{bucket}/big.bin"
    part = b"x" * storage.PART_BYTES

    def chunks():
        yield part
        yield part
        raise OSError("the source went away")

    with pytest.raises(OSError):
        storage.write_once(path, chunks())
    name = bucket[len("s3://"):]
    assert S3.keys(name) == [] and S3.uploads(name) == []
    assert storage.write_once(path, iter([part, part, b"end"])) == 2 * len(part) + 3
    assert storage.read_bytes(path)[-3:] == b"end" and S3.uploads(name) == []


def test_uploads_a_killed_writer_left_are_aborted_inside_the_prefix_only(bucket):
    name = bucket[len("s3://"):]
    c = S3.client()
    for key in ("out/shards/00000.tar", "elsewhere/x.tar"):
        up = c.create_multipart_upload(Bucket=name, Key=key)
        c.upload_part(Bucket=name, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"p" * 1024)
    assert storage.abort_uploads(f"{bucket}/out") == 1
    assert S3.uploads(name) == ["elsewhere/x.tar"]


def test_overwrite_on_a_bucket_deletes_only_what_winnow_wrote(bucket):
    out = f"{bucket}/runs/r1"
    name = bucket[len("s3://"):]
    entries = ["spec.yaml", "shards", "summary.json"]

    def claim(fp, overwrite=False):
        layout.claim_output(
            out, storage.join(out, "spec.yaml"), fp, {"x": fp}, overwrite, "run", "x", entries, "curate"
        )

    claim("one")
    storage.write_once(storage.join(out, "shards", "00000.tar"), b"t")
    storage.write_once(f"{bucket}/runs/r1-beside.txt", b"foreign, beside the prefix")
    storage.write_once(f"{bucket}/runs/r1x/keep.txt", b"foreign, a sibling prefix")
    owner = json.loads(storage.read_bytes(storage.join(out, ".winnow", "owner.json")))
    assert owner["entries"] == sorted(entries)
    claim("one")                                           # the same spec resumes
    assert storage.exists(storage.join(out, "shards", "00000.tar"))
    with pytest.raises(ConfigError, match="different spec"):
        claim("two")
    claim("two", overwrite=True)
    assert S3.keys(name, "runs/r1/") == ["runs/r1/.winnow/owner.json", "runs/r1/spec.yaml"]
    assert S3.keys(name, "runs/r1-") == ["runs/r1-beside.txt"] and S3.keys(name, "runs/r1x/") == ["runs/r1x/keep.txt"]
    # a key winnow did not write inside the prefix: overwrite refuses and deletes nothing
    storage.write_once(storage.join(out, "notes.txt"), b"mine")
    with pytest.raises(ConfigError, match="notes.txt"):
        claim("three", overwrite=True)
    assert "runs/r1/notes.txt" in S3.keys(name) and "runs/r1/spec.yaml" in S3.keys(name)
    # a prefix holding objects and no ownership record is not winnow's
    storage.write_once(f"{bucket}/theirs/data.bin", b"d")
    with pytest.raises(ConfigError, match="not a winnow run"):
        layout.claim_output(
            f"{bucket}/theirs", f"{bucket}/theirs/spec.yaml", "f", {}, True, "run", "x", entries, "curate"
        )
    assert S3.keys(name, "theirs/") == ["theirs/data.bin"]


def test_a_store_that_cannot_be_used_fails_in_one_line_before_any_work(bucket, monkeypatch):
    with pytest.raises(ConfigError, match="bucket 'wt-no-such-bucket' does not exist"):
        storage.check_writable("s3://wt-no-such-bucket/out", "output.path")
    storage.write_once(f"{bucket}/afile", b"x")
    with pytest.raises(ConfigError, match="is a file on the store"):
        storage.check_writable(f"{bucket}/afile", "output.path")
    storage.check_writable(f"{bucket}/fine/prefix", "output.path")
    assert S3.keys(bucket[len("s3://"):]) == ["afile"]          # the probe is gone
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")   # nothing listens on the discard port
    t = time.monotonic()
    with pytest.raises(ConfigError) as err:
        storage.check_writable(f"{bucket}/out", "output.path")
    assert time.monotonic() - t < 30 and "\n" not in str(err.value) and "127.0.0.1:9" in str(err.value)
    assert SECRET_KEY not in str(err.value)


def test_credentials_in_a_spec_are_refused_and_secrets_redacted():
    with pytest.raises(ConfigError, match="credential"):
        storage.check_options({"s3": {"endpoint_url": "http://x", "secret": "abc"}}, "storage_options")
    with pytest.raises(ConfigError, match="credential"):
        storage.check_options({"key": "abc"}, "input.storage_options")
    assert storage.check_options({"anon": True}, "input.storage_options") == {"anon": True}
    assert storage.redact(f"failed with {SECRET_KEY} in it") == "failed with *** in it"


def test_writes_wait_out_a_store_that_stops_answering(bucket, monkeypatch):
    """The server stops for 3 s; a write started meanwhile retries with backoff and lands once."""
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "60")
    path = f"{bucket}/during-outage.bin"
    S3.stop()
    restarted = threading.Timer(3.0, S3.start)
    restarted.start()
    try:
        t = time.monotonic()
        storage.write_once(path, b"payload")
        waited = time.monotonic() - t
    finally:
        restarted.join()
    assert waited >= 2.0
    assert storage.read_bytes(path) == b"payload" and S3.keys(bucket[len("s3://"):]) == ["during-outage.bin"]


def test_scratch_is_node_local_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.SCRATCH_ENV, str(tmp_path / "scratch"))
    with storage.scratch() as d:
        assert d.startswith(str(tmp_path / "scratch")) and os.path.isdir(d)
        open(os.path.join(d, "f"), "wb").close()
    assert os.listdir(tmp_path / "scratch") == []


def test_fetch_local_copy_and_copy_tree_agree_on_disk_and_on_the_store(root, tmp_path):
    _plant(root)
    got = storage.fetch(root, str(tmp_path / "fetched"))
    assert {os.path.relpath(f, got): open(f, "rb").read() for f in storage.find(got)} == TREE
    with storage.local_copy(storage.join(root, "sub")) as d:
        held = {os.path.relpath(f, d): open(f, "rb").read() for f in storage.find(d)}
    assert held == {"b.bin": b"bb", "deeper/c.parquet": b"ccc"}
    assert storage.is_url(root) == (not os.path.exists(d))        # a store's copy is gone, a local folder stays
    other = root + "-copy"
    assert storage.copy_tree(root, other, last=("a.txt",)) == 4
    assert {f[len(other) + 1:].replace(os.sep, "/"): storage.read_bytes(f) for f in storage.find(other)} == TREE
    with pytest.raises(FileNotFoundError):
        storage.fetch(storage.join(root, "nothing-here"), str(tmp_path / "none"))


def _shard_on(bucket: str, tmp_path, n: int = 3):
    """``n`` tar shards of 5 members each on the bucket, and their index (shard, offset, size)."""
    import io
    import tarfile

    import pyarrow as pa

    rows = {"shard": [], "offset": [], "size": [], "want": []}
    for s in range(n):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for m in range(5):
                data = bytes([s * 16 + m]) * (300 + 97 * m)
                info = tarfile.TarInfo(f"{m:03d}.bin")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        url = f"{bucket}/shards/{s:05d}.tar"
        storage.write_once(url, buf.getvalue())
        with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
            for m in tf:
                rows["shard"].append(url)
                rows["offset"].append(m.offset_data)
                rows["size"].append(m.size)
                rows["want"].append(tf.extractfile(m).read())
    return pa.table({k: rows[k] for k in ("shard", "offset", "size")}), rows["want"]


def test_shards_on_a_store_are_copied_whole_when_they_fit_and_read_by_range_when_not(bucket, tmp_path, monkeypatch):
    """With room for every shard, the reader copies them into scratch and then needs no store at all
    (the server is stopped and every sample still reads); without room it copies nothing and reads
    each sample by one range request. Either way the bytes are the tar members', and close() leaves
    the scratch folder empty."""
    from training.loader import SampleReader

    monkeypatch.setenv(storage.SCRATCH_ENV, str(tmp_path / "scratch"))
    index, want = _shard_on(bucket, tmp_path)
    ranged = SampleReader(index, copy_bytes=100)
    assert ranged.copy_plan["copied"] is False and ranged.copy_plan["shards"] == 3
    ranged.prefetch(list(range(0, 15, 2)))
    assert [ranged.read(i) for i in range(15)] == want
    ranged.close()
    reader = SampleReader(index, copy_bytes=1 << 20)
    ends = {}
    for sh, off, size in zip(*(index.column(c).to_pylist() for c in ("shard", "offset", "size")), strict=True):
        ends[sh] = max(ends.get(sh, 0), off + size)
    assert reader.copy_plan["copied"] is True and reader.copy_plan["bytes"] == sum(ends.values())
    deadline = time.monotonic() + 60
    while reader.copied() < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "1")
    S3.stop()
    try:
        reader.prefetch([3, 4])
        assert [reader.read(i) for i in reversed(range(15))] == want[::-1]
    finally:
        S3.start()
    reader.close()
    assert os.listdir(tmp_path / "scratch") == []
