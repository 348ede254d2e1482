"""Per-sample deadlines in a child process that can be killed: a hang, a crash and a refused result
each become the sample's error; the worker goes on with a fresh child."""
import os
import pickle
import signal
import time

import numpy as np
import pytest

from pipeline.contract.isolate import SampleCrashed, SampleTimeout, Sandbox


def add(a, b):
    return a + b


def pid():
    return os.getpid()


def hang(seconds):
    time.sleep(seconds)          # stands for a decoder stuck inside C: no Python runs until it returns
    return "woke"


def segfault():
    os.kill(os.getpid(), signal.SIGSEGV)


def missing(path):
    raise FileNotFoundError(f"no such file: {path}")


def custom():
    raise pickle.PickleError("made up")


class Sneaky:
    def __reduce__(self):
        return (os.system, ("true",))


def sneaky():
    return {"ok": Sneaky()}


def arrays():
    return {"x": np.arange(3, dtype=np.float32), "s": np.float64(2.5), "b": b"\x00\xff", "n": None}


def allocate(mb):
    return len(bytearray(mb * 1024 * 1024))


@pytest.fixture
def box():
    b = Sandbox(timeout_s=2.0, memory_mb=1024)
    yield b
    b.close()


def test_results_come_back_and_the_child_is_reused(box):
    assert box.run(add, 2, 3) == 5
    first = box.run(pid)
    assert first != os.getpid() and box.run(pid) == first
    got = box.run(arrays)
    assert got["x"].tolist() == [0.0, 1.0, 2.0] and got["x"].dtype == np.float32
    assert got["s"] == 2.5 and got["b"] == b"\x00\xff" and got["n"] is None


def test_a_hang_is_killed_at_the_deadline_and_the_next_sample_runs(box):
    child = box.run(pid)
    t = time.time()
    with pytest.raises(SampleTimeout, match="more than 2 s"):
        box.run(hang, 60)
    assert 1.9 < time.time() - t < 10
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)                                # the stuck child is gone
    assert box.run(add, 1, 1) == 2 and box.run(pid) != child


def test_a_crash_is_the_samples_error_not_the_workers(box):
    with pytest.raises(SampleCrashed, match="signal SIGSEGV"):
        box.run(segfault)
    assert box.run(add, 2, 2) == 4


def test_errors_come_back_by_class_and_results_only_as_plain_data(box):
    with pytest.raises(FileNotFoundError, match="no such file: x.mp4"):
        box.run(missing, "x.mp4")
    with pytest.raises(RuntimeError, match="PickleError: made up"):   # not a class winnow raises again
        box.run(custom)
    with pytest.raises(pickle.UnpicklingError, match="may not hold posix.system"):
        box.run(sneaky)                                   # a child that reads hostile input is not trusted
    assert box.run(add, 3, 3) == 6


def test_the_memory_cap_fails_the_sample(box):
    with pytest.raises(MemoryError):
        box.run(allocate, 4096)
    assert box.run(allocate, 16) == 16 * 1024 * 1024


def test_no_deadline_runs_in_this_process():
    assert Sandbox(0).run(pid) == os.getpid()


def test_a_stuck_child_dies_with_its_parent(tmp_path):
    """A worker killed while its child is stuck (node loss, a stopped job) leaves no child behind."""
    import subprocess
    import sys

    code = ("import sys, tests.test_isolate as t; from pipeline.contract.isolate import Sandbox; "
            "b = Sandbox(600); print(b.run(t.pid), flush=True); b.run(t.hang, 600)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": root})
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(10)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the child outlived its killed parent")
