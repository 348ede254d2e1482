"""Shared fixtures: one local Ray (2 CPUs, like CI) for the session, small seeded corpora, and a
check that the suite leaves no process and no temporary file behind."""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Every temporary folder of the session -- the tests', winnow's own (tempfile), Ray's session folders
# (RAY_TMPDIR), torch's compile cache -- lies in one folder made here, so that what is left in it at
# the end is known to be the suite's. Short, for Ray's socket paths (107 bytes at most).
SESSION_TMP = tempfile.mkdtemp(prefix="wt-")
for var in ("TMPDIR", "RAY_TMPDIR"):
    os.environ[var] = SESSION_TMP
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(SESSION_TMP, "torchinductor")
tempfile.tempdir = SESSION_TMP

# The suite's S3 server answers on 127.0.0.1 before any Ray starts, so every worker inherits the
# standard AWS_* variables that point at it (tests/s3server.py).
from tests.s3server import SERVER as S3  # noqa: E402

S3.start().export()
# What the suite may leave in it until the end (all of it goes with SESSION_TMP): pytest's numbered
# folders (each test's tmp_path), Ray's session folders, torch's compile cache, and ".ses", the
# session file that onnxruntime's built-in telemetry (under RapidOCR) writes into TMPDIR and keeps, and
# "_ray_lockfiles", the lock folder Ray Train makes in RAY_TMPDIR when it restores a checkpoint from
# object storage (ray.air._internal.filelock), and keeps.
EXPECTED_TMP = {f"pytest-of-{os.environ.get('USER') or 'root'}", "ray", "torchinductor", ".ses", "_ray_lockfiles"}
RAY_NAMES = ("ray::", "raylet", "gcs_server", "ray/dashboard", "ray/_private", "default_worker.py", "log_monitor",
             "monitor.py", "runtime_env/agent")


def _ours(proc, me: int, started: float) -> bool:
    """A process this session made: a descendant of pytest, or an orphan of one (parent 1) that is Ray's."""
    try:
        if proc.pid == me or proc.create_time() < started - 1:
            return False
        if any(p.pid == me for p in proc.parents()):
            return True
        return proc.ppid() == 1 and any(n in " ".join(proc.cmdline()) for n in RAY_NAMES)
    except Exception:  # noqa: BLE001 - it went away while we looked
        return False


def _leftover_processes(started: float, wait_s: float) -> list:
    import psutil

    me = os.getpid()
    deadline = time.monotonic() + wait_s
    while True:
        left = [p for p in psutil.process_iter() if _ours(p, me, started)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


@pytest.fixture(scope="session", autouse=True)
def leaves_nothing_behind():
    """Set up first, torn down last (after the shared Ray): fails the run when a process the suite
    started is still alive 60 s after the last test (Ray shuts its workers down asynchronously), or
    when something other than pytest's and Ray's folders is left in the session's temporary folder.
    Either way it cleans up what it found."""
    started = time.time()
    yield
    S3.stop()
    import psutil

    from pipeline.contract import isolate

    isolate.close_shared()        # the sandbox children of stages the tests ran in this process
    from tests.helpers import KILLED_SCRATCH

    for folder in KILLED_SCRATCH:  # what processes the tests killed on purpose could not remove
        shutil.rmtree(folder, ignore_errors=True)

    problems = []
    left = _leftover_processes(started, 60.0)
    if left:
        described = []
        for p in left:
            try:
                described.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
                p.kill()
            except psutil.Error:
                pass
        problems.append(f"processes still running after the suite: {described}")
    extra = sorted(set(os.listdir(SESSION_TMP)) - EXPECTED_TMP)
    if extra:
        problems.append(f"temporary files left in {SESSION_TMP}: {extra}")
    shutil.rmtree(SESSION_TMP, ignore_errors=True)
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


def pytest_collection_modifyitems(config, items):
    """``slow`` tests run with WINNOW_SLOW=1 (CI does) or when ``-m`` asks for them."""
    if os.environ.get("WINNOW_SLOW") == "1" or config.option.markexpr:
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: WINNOW_SLOW=1 make test runs it (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().execution_no_progress_timeout_s = 120  # a hang fails the test
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """40 images + 4 resized duplicates + 10 bad/odd files; returns (root, expected outcomes)."""
    from pipeline.corpus import make_corpus

    root = tmp_path_factory.mktemp("corpus")
    expected = make_corpus(str(root), n_images=40, seed=1, max_side=900)
    return str(root), expected


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A curated image run's shard: 8 JPEGs of 64x64 with captions and their annotation rows."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.contract import tar as tars

    root = tmp_path_factory.mktemp("img_run")
    shards = root / "shards"
    shards.mkdir()
    rng = np.random.default_rng(0)
    blocks, rows = [], []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        key = f"{i:09d}"
        blocks += [tars.block(f"{key}.jpg", buf.getvalue()), tars.block(f"{key}.txt", f"picture {i}".encode())]
        rows.append({"key": key, "status": "kept", "caption": f"picture {i}", "width": 64, "height": 64,
                     "stored_width": 64, "stored_height": 64})
    blocks.append(tars.end(sum(len(b) for b in blocks)))
    (shards / "00000.tar").write_bytes(b"".join(blocks))
    pq.write_table(pa.Table.from_pylist(rows), str(shards / "00000.parquet"))
    return str(root)


@pytest.fixture()
def kill_debris():
    """For a test that SIGKILLs processes of the session's own Ray (a training worker, a whole node):
    what they could not remove (a checkpoint folder being written, multiprocessing's pymp-*) is
    removed after the test: the entries of the session's temporary folder that appeared during it
    with the names winnow and Python give them."""
    before = set(os.listdir(SESSION_TMP))
    yield
    for name in set(os.listdir(SESSION_TMP)) - before:
        if name.startswith(("winnow-", "pymp-")):
            shutil.rmtree(os.path.join(SESSION_TMP, name), ignore_errors=True)


@pytest.fixture()
def bucket():
    """A fresh, empty bucket on the suite's S3 server: ``s3://NAME``; emptied and removed after."""
    name = S3.new_bucket()
    yield f"s3://{name}"
    S3.drop_bucket(name)
