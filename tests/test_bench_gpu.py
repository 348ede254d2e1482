"""bench/gpu.py must run unattended on a GPU machine nobody watches: its --smoke mode runs every
measurement at tiny sizes on any machine, so the script cannot rot between GPU sessions."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.mark.slow
def test_the_gpu_bench_runs_end_to_end_in_smoke_mode(tmp_path):
    out = tmp_path / "gpu.json"
    res = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(out.read_text())
    names = [r["bench"] for r in doc["results"]]
    assert doc["smoke"] is True and len(names) == 9
    assert sum(n.startswith(("sd unet", "sdxl unet")) for n in names) == 4 and any("svd" in n for n in names)
    trains = [r for r in doc["results"] if "step_s" in r]
    assert all(r["samples_per_s"] > 0 and r["tflops_per_step"] > 0 for r in trains)
    assert [r["gradient_checkpointing"] for r in trains[:4]] == [False, True, False, True]
    assert any("tokens_per_s" in r for r in doc["results"]) and any("frames_per_s" in r for r in doc["results"])
