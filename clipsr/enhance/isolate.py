"""Run a function in a child process whose death is an error for the caller, not its own death.

A decoder that crashes natively (a bug in a C library, met by one odd file) or needs more memory
than the node has kills the process it runs in. In a Ray Data task that process is the worker:
Ray retries the task, the same input kills it again, and the run stalls or fails whole. Here the
function runs in a child process instead, started once and reused for call after call (its start
is paid once; a call costs the copy of its arguments and result through a pipe), with its address
space capped, so that an input needing more memory fails in the child before the node runs short
and the kernel or Ray's memory monitor picks a victim. When the child dies, the call raises
:class:`ChildDied` saying how, and the next call starts a new child.

The child is a fresh interpreter (``python -m clipsr.enhance.isolate``), not a fork: a fork of a
Ray worker would copy its threads' locks in an unknown state. It exits when its parent does.
"""
from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import IO, Any, TypeVar

T = TypeVar("T")

_LENGTH = struct.Struct("<Q")
# One thread per library in the child: thread pools reserve address space, which the cap counts.
_CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "MALLOC_ARENA_MAX": "2"}


class ChildDied(RuntimeError):
    """The child process ended during a call; str(e) says how ("was killed by signal 9 (SIGKILL...)",
    "exited with status 1")."""


class Isolated:
    """Calls ``fn(*args)`` in a long-lived child process; not for concurrent use from threads
    (calls are serialised)."""

    def __init__(self, memory_bytes: int | None = None) -> None:
        self.memory_bytes = memory_bytes
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the child (both must pickle); its exceptions are raised here as they
        are, and its death as ChildDied."""
        request = pickle.dumps((fn, args), protocol=5)
        with self._lock:
            proc = self._start()
            try:
                _send(proc.stdin, request)
                ok, value = pickle.loads(_receive(proc.stdout))
            except (EOFError, OSError) as e:  # the pipe broke: the child is gone or going
                raise ChildDied(self._reap()) from e
        if not ok:
            raise value
        return value

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._proc.kill()
                self._reap()

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            env = {**os.environ, **_CHILD_ENV,
                   "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # import what the parent imports
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "clipsr.enhance.isolate", str(os.getpid()), str(self.memory_bytes or 0)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        return self._proc

    def _reap(self) -> str:
        """Wait for the child to end; how it ended, in words."""
        proc, self._proc = self._proc, None
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a child that closed its pipe but lingers
            proc.kill()
            code = proc.wait()
        return describe_exit(code)


def describe_exit(code: int) -> str:
    """A Popen return code in words, to follow "the process": a negative one is a signal."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        hint = ", as the kernel's out-of-memory killer sends" if -code == signal.SIGKILL else ""
        return f"was killed by signal {-code} ({name}{hint})"
    return f"exited with status {code}"


def _send(stream: IO[bytes], payload: bytes) -> None:
    stream.write(_LENGTH.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _receive(stream: IO[bytes]) -> bytes:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError("the child closed its pipe")
    (size,) = _LENGTH.unpack(head)
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError("the child closed its pipe mid-answer")
    return payload


def _die_with(parent: int) -> None:
    """Linux: have the kernel kill this process when its parent dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before that took effect
        os._exit(0)


def _serve(parent: int, memory_bytes: int) -> None:
    """The child's loop: read a call, answer it, until the parent closes the pipe."""
    _die_with(parent)
    requests = sys.stdin.buffer
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a library that prints must not corrupt the pipe
    if memory_bytes:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    while True:
        try:
            fn, args = pickle.loads(_receive(requests))
        except EOFError:
            return
        try:
            answer = pickle.dumps((True, fn(*args)), protocol=5)
        except MemoryError as e:  # numpy's subclass does not pickle: the plain one says the same
            answer = pickle.dumps((False, MemoryError(str(e))), protocol=5)
        except BaseException as e:  # noqa: BLE001  every failure goes back to the caller
            try:
                answer = pickle.dumps((False, e), protocol=5)
            except Exception:  # noqa: BLE001  an exception that does not pickle
                answer = pickle.dumps((False, RuntimeError(f"{type(e).__name__}: {e}")), protocol=5)
        _send(answers, answer)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
