"""Helpers for end-to-end tests: run a curate spec in-process and read its outputs back."""
from __future__ import annotations

import glob
import json
import os
import tarfile

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
    import signal
    import time

    snapshot = os.path.join(run_dir, "ray", "train", "checkpoint_manager_snapshot.json")
    deadline = time.time() + timeout

    def registered() -> bool:
        try:
            with open(snapshot) as fh:
                return f"checkpoint_{step:07d}" in fh.read()
        except OSError:
            return False

    while not registered():
        assert proc.poll() is None and time.time() < deadline, f"the run ended before the step-{step} checkpoint"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def killable_env(root: str, scratch: str) -> dict:
    """The environment of a winnow subprocess a test may SIGKILL: its temporary files (a training
    worker's scratch folder, say, which a killed process cannot remove) go to ``scratch``, inside the
    test's own tmp_path, instead of the session's temporary folder that the suite checks at the end."""
    import os

    os.makedirs(scratch, exist_ok=True)
    return {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": root, "TMPDIR": scratch}
