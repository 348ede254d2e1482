"""Helpers for end-to-end tests: run a curate spec in-process and read its outputs back."""
from __future__ import annotations

import glob
import json
import os
import tarfile
import time

from pipeline.commands import curate
from pipeline.commands import curate_spec as specmod


def run_curate(input_path: str, output: str, samples_per_shard: int = 10, stages=None, **extra):
    data = {"input": {"path": input_path, **extra.pop("input", {})},
            "output": {"path": output, "samples_per_shard": samples_per_shard, "report": False,
                       **extra.pop("output_options", {})},
            "ray": {"block_rows": 4}}
    if stages is not None:
        data["stages"] = stages
    return curate.run(specmod.parse(data), log=None)


def annotations(output: str):
    from pipeline.contract import layout

    return layout.read_annotations(output).to_pandas()


def tar_members(output: str) -> dict[str, list[str]]:
    out = {}
    for tar in sorted(glob.glob(os.path.join(output, "shards", "*.tar"))):
        with tarfile.open(tar) as tf:
            out[os.path.basename(tar)] = tf.getnames()
    return out


def shard_stats(output: str) -> list[dict]:
    return [json.load(open(f)) for f in sorted(glob.glob(os.path.join(output, "shards", "*_stats.json")))]


def kill_at_checkpoint(proc, run_dir: str, step: int, timeout: float = 240) -> None:
    """SIGKILL ``proc``'s process group (the CLI and its Ray) once Ray Train has recorded the
    checkpoint of ``step`` of the train run in ``run_dir``; fails if the run ends first."""
    import time

    from pipeline.contract import storage

    snapshot = storage.join(run_dir, "ray", "train", "checkpoint_manager_snapshot.json")
    deadline = time.time() + timeout

    def registered() -> bool:
        try:
            return f"checkpoint_{step:07d}" in storage.read_text(snapshot)
        except (OSError, UnicodeDecodeError):
            return False

    while not registered():
        assert proc.poll() is None and time.time() < deadline, f"the run ended before the step-{step} checkpoint"
        time.sleep(0.05 if storage.is_url(run_dir) else 0.01)
    kill_tree(proc)


def kill_marked(key: str, value: str, quiet_s: float = 1.0, wait_s: float = 20.0) -> list[int]:
    """SIGKILL every process (but this one) whose environment has ``key`` = ``value``, scanning again
    until none has turned up for ``quiet_s``: a worker the raylet was forking while its tree was
    killed is in no snapshot of the tree, and lives on as an orphan (a Train controller that outlived
    its cluster). Returns the pids killed."""
    import psutil

    killed: list[int] = []
    me, deadline, quiet_since = os.getpid(), time.time() + wait_s, time.time()
    while time.time() < deadline and time.time() - quiet_since < quiet_s:
        found = []
        for p in psutil.process_iter():
            try:
                if p.pid != me and p.environ().get(key) == value:
                    p.kill()
                    found.append(p)
            except psutil.Error:
                pass
        if found:
            killed += [p.pid for p in found]
            psutil.wait_procs(found, timeout=10)
            quiet_since = time.time()
        time.sleep(0.1)
    return killed


def kill_tree(proc) -> None:
    """SIGKILL ``proc``, its process group and every process descended from it, as a machine that
    loses power would: Ray's raylet starts its workers (the Train controller among them) in process
    groups of their own, so killing the group alone leaves them running on, writing checkpoints.
    A process of ``killable_env`` is marked by its own TMPDIR: whatever carries that mark afterwards
    (a worker forked while the tree was being killed) is killed too."""
    import signal

    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
        mark = psutil.Process(proc.pid).environ().get("TMPDIR")
    except psutil.Error:
        tree, mark = [], None
    os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait()
    psutil.wait_procs(tree, timeout=30)
    if mark in KILLED_SCRATCH:
        kill_marked("TMPDIR", mark)


# scratch folders of subprocesses a test may SIGKILL (``killable_env``); the session's leftover check
# removes them before it looks (a killed process cannot remove its own temporary files)
KILLED_SCRATCH: list[str] = []


def killable_env(root: str) -> dict:
    """The environment of a winnow subprocess a test may SIGKILL (its Ray too): its temporary files (a
    training worker's scratch folder, multiprocessing's pymp-*) go to a folder of their own, short
    enough for the AF_UNIX socket paths made under it (107 bytes), listed in ``KILLED_SCRATCH``."""
    import os
    import tempfile

    scratch = tempfile.mkdtemp(prefix="k-")
    KILLED_SCRATCH.append(scratch)
    return {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": root, "TMPDIR": scratch}
