"""Run one sample's work in a child process that can be killed: a per-sample deadline that holds
whatever the work is doing (a demuxer spinning inside C, a decoder stuck on a hostile stream),
and a crash (a segfault in a codec) that ends as the sample's rejection instead of the worker's.

SIGALRM cannot do this: its handler runs only between Python bytecodes, never inside a C call
that does not return, and only on the main thread. The child is started with ``spawn`` (a Ray
worker has gRPC threads, and ``fork`` would copy their held locks), reused for every sample the
worker hands it, and replaced only after a timeout or a crash. Each call pays a pipe round trip
and pickling of its arguments and result, so it suits work of tens of milliseconds or more (a
video window, a probe), not a 1 ms image resize.
"""
from __future__ import annotations

import atexit
import importlib
import io
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

# what a result may hold: plain data and numpy arrays (the child reads hostile input, so the parent
# unpickles only these; an exception comes back as its class's name and message)
_SAFE = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int",
                                    "float", "complex", "bool", "slice", "range")}
_SAFE |= {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
          ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "_reconstruct"),
          ("numpy._core.multiarray", "scalar"), ("numpy._core.numeric", "_frombuffer"),
          ("numpy.core.numeric", "_frombuffer")}
# exception classes raised again by name; anything else comes back as RuntimeError("Name: message")
_ERROR_MODULES = ("builtins", "pipeline.", "video.", "curation.", "training.")


STARTUP_S = 120.0


class SampleTimeout(Exception):
    """The work ran past its deadline; the child running it was killed."""


class SampleCrashed(Exception):
    """The child died while running the work (a signal, or an exit)."""


class _Plain(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a sandboxed result may not hold {module}.{name}")


def _error(module: str, name: str, message: str) -> BaseException:
    if module == "builtins" or module.startswith(_ERROR_MODULES[1:]):
        try:
            cls = getattr(importlib.import_module(module), name)
            if isinstance(cls, type) and issubclass(cls, Exception):
                return cls(message)
        except Exception:  # noqa: BLE001 - a class that cannot be rebuilt from a message
            pass
    return RuntimeError(f"{name}: {message}")


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when its parent dies (a killed Ray worker must not leave a child
    spinning in a stuck decoder; one that is reading its pipe would see EOF, one stuck would not)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)    # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _child_main(fd: int, memory_mb: int, preload: str) -> None:
    """The child: import ``preload`` (outside any deadline), say so, then read (fn, args) and reply
    (True, result) or (False, (module, class, message)) until the parent goes."""
    _die_with_parent()
    conn = Connection(fd)
    if preload:
        importlib.import_module(preload)
    if memory_mb:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send_bytes(b"ready")
    while True:
        try:
            fn, args = pickle.loads(conn.recv_bytes())      # from the parent: its own call
        except (EOFError, OSError):      # the parent is gone
            return
        try:
            reply = pickle.dumps((True, fn(*args)), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent as the sample's error
            reply = pickle.dumps((False, (type(exc).__module__, type(exc).__name__, str(exc)[:2000])))
        conn.send_bytes(reply)


class Sandbox:
    """``run(fn, *args)`` -> ``fn(*args)``, computed in the child within ``timeout_s`` seconds.
    ``fn`` must be importable (a module-level function) and return plain data (numbers, strings,
    bytes, lists, dicts, numpy arrays); exceptions it raises are raised here by class name.
    ``timeout_s`` 0 runs ``fn`` in this process, with no deadline. ``memory_mb`` caps the child's
    address space (a decoder asked for a 64 GB frame fails there, with MemoryError)."""

    def __init__(self, timeout_s: float, memory_mb: int | None = None):
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None

    def _start(self, preload: str) -> None:
        mine, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        code = (f"from pipeline.contract.isolate import _child_main; "
                f"_child_main({theirs.fileno()}, {int(self.memory_mb or 0)}, {preload!r})")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code],
            pass_fds=[theirs.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr.fileno() if _has_fd(sys.stderr) else None,
        )
        theirs.close()
        self._conn = Connection(mine.detach())
        # start-up (an interpreter, numpy, PyAV) is not the sample's time: wait for it apart
        if not self._conn.poll(STARTUP_S) or self._conn.recv_bytes() != b"ready":
            code = self._stop()
            raise SampleCrashed(f"the worker's child process did not start within {STARTUP_S} s (exit code {code})")

    def _stop(self) -> int | None:
        proc, self._proc = self._proc, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        try:
            return proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a kill that did not land
            return None

    def run(self, fn: Callable, *args: Any) -> Any:
        if not self.timeout_s:
            return fn(*args)
        if self._proc is None or self._proc.poll() is not None:
            self._stop()
            self._start(getattr(fn, "__module__", "") or "")
        self._conn.send_bytes(pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL))
        if not self._conn.poll(self.timeout_s):
            self._stop()
            raise SampleTimeout(f"more than {self.timeout_s:g} s")
        try:
            ok, value = _Plain(io.BytesIO(self._conn.recv_bytes())).load()
        except (EOFError, OSError):
            code = self._stop()
            how = (
                f"signal {signal.Signals(-code).name}"
                if code is not None and code < 0 and -code in signal.valid_signals()
                else f"exit code {code}"
            )
            raise SampleCrashed(f"the worker's child process died ({how})") from None
        if ok:
            return value
        raise _error(*value)

    def close(self) -> None:
        self._stop()

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self._stop()
        except Exception:  # noqa: BLE001
            pass


def _has_fd(stream) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


_shared: dict[tuple, Sandbox] = {}


def close_shared() -> None:
    """Stop this process's shared sandboxes' children (at exit, and wherever a process that ran
    stages in-line goes on living: a test session, a notebook)."""
    for box in list(_shared.values()):
        box.close()
    _shared.clear()


atexit.register(close_shared)


def shared(timeout_s: float, memory_mb: int | None = None) -> Sandbox:
    """One sandbox per setting per process: a Ray worker that runs many tasks keeps its child."""
    key = (float(timeout_s), memory_mb)
    if key not in _shared:
        _shared[key] = Sandbox(timeout_s, memory_mb)
    return _shared[key]
