"""The run lock on an output prefix: one live run at a time, stale locks taken over, locally and on S3."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from clipsr import storage
from clipsr.enhance.lock import LockHeldError, RunLock


class Clock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def _holder(uri):
    return json.loads(storage.read_bytes(uri))


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.fixture(params=["local", "s3"])
def lock_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out" / "_lock")
    return f"{request.getfixturevalue('s3_bucket')}/out/_lock"


def test_a_second_run_is_refused_while_the_first_holds_the_lock(lock_uri):
    clock = Clock()
    first = RunLock(lock_uri, "run-1", ttl_s=60, clock=clock)
    first.acquire()
    assert _holder(lock_uri)["run_id"] == "run-1"
    clock.now += 30
    with pytest.raises(LockHeldError, match="locked by run run-1"):
        RunLock(lock_uri, "run-2", ttl_s=60, clock=clock).acquire()
    first.release()
    assert not storage.exists(lock_uri)
    second = RunLock(lock_uri, "run-2", ttl_s=60, clock=clock)
    second.acquire()
    assert _holder(lock_uri)["run_id"] == "run-2"
    second.release()


def test_a_lock_whose_heartbeat_expired_is_taken_over_and_its_holder_notices(lock_uri):
    clock = Clock()
    dead = RunLock(lock_uri, "run-1", ttl_s=60, clock=clock)
    dead.acquire()
    clock.now += 61
    taker = RunLock(lock_uri, "run-2", ttl_s=60, clock=clock)
    taker.acquire()
    assert _holder(lock_uri)["run_id"] == "run-2"
    dead.refresh()  # the old holder wakes up: its conditional write fails, it must not go on
    assert dead.lost and _holder(lock_uri)["run_id"] == "run-2"
    dead.release()  # releasing a lost lock leaves the new holder's lock alone
    assert _holder(lock_uri)["run_id"] == "run-2"
    clock.now += 30
    taker.refresh()
    assert not taker.lost and _holder(lock_uri)["heartbeat"] == clock.now
    taker.release()


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    uri = str(tmp_path / "_lock")
    storage.write_bytes_atomic(uri, json.dumps({"run_id": "killed", "host": socket.gethostname(),
                                                "pid": _dead_pid(), "heartbeat": 1e12, "ttl_s": 600}).encode())
    with RunLock(uri, "rerun", ttl_s=600) as lock:
        assert _holder(uri)["run_id"] == "rerun" and not lock.lost
    assert not storage.exists(uri)


def test_lock_needs_a_store_with_conditional_writes():
    with pytest.raises(ValueError, match="local path or s3"):
        RunLock("gs://bucket/out/_lock", "run-1")
