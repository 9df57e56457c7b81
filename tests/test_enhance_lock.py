"""The run lock on an output prefix: one live run at a time, stale locks taken over, a lost lock
noticed and fenced out of the index, locally and on S3."""
from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from clipsr import storage
from clipsr.enhance import index as idx
from clipsr.enhance.lock import LockHeldError, LockLostError, RunLock


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


# --- losing the lock ---------------------------------------------------------------------------


def _wait_for(condition, what: str, limit_s: float = 60.0) -> None:
    """Poll until ``condition()`` holds; the limit only stops a broken test from hanging."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_a_holder_whose_heartbeat_is_stuck_stops_before_its_lock_can_be_taken_over(lock_uri):
    clock = Clock()
    lock = RunLock(lock_uri, "run-1", ttl_s=100, clock=clock)
    lock.acquire()
    clock.now += 74  # nothing renewed it (no heartbeat thread here), but others wait for 100 s
    lock.check()
    clock.now += 1
    with pytest.raises(LockLostError, match=r"lost the run lock .*not renewed for 75\.0 s of its 100 s ttl"):
        lock.check()
    assert lock.lost
    taker = RunLock(lock_uri, "run-2", ttl_s=100, clock=clock)
    with pytest.raises(LockHeldError):  # ... and it stopped while the lock was still its own
        taker.acquire()


def test_renewals_failing_for_three_quarters_of_the_ttl_lose_the_lock(s3_bucket, s3_proxy):
    uri = f"{s3_bucket}/out/_lock"
    clock = Clock()
    lock = RunLock(uri, "run-1", ttl_s=100, clock=clock)
    lock.acquire()
    s3_proxy.deny_writes = True  # expired credentials: every renewal is refused (403)
    clock.now += 30
    lock.refresh()
    assert not lock.lost  # one failed beat: retried at the next
    s3_proxy.deny_writes = False
    clock.now += 30
    lock.refresh()  # renewed at 60
    clock.now += 70
    lock.check()  # 70 s since the last good renewal: still held
    assert _holder(uri)["heartbeat"] == 1_000_060.0
    s3_proxy.deny_writes = True
    clock.now += 5
    lock.refresh()
    assert lock.lost
    with pytest.raises(LockLostError, match=r"renewals failed for 75\.0 s .*PermissionError"):
        lock.check()
    s3_proxy.deny_writes = False
    lock.release()  # a lost lock is left for its ttl to expire
    assert _holder(uri)["run_id"] == "run-1"


def test_a_lock_replaced_by_another_run_is_noticed_by_the_running_heartbeat(tmp_path):
    uri = str(tmp_path / "_lock")
    with RunLock(uri, "run-1", ttl_s=1.0) as lock:
        lock.check()
        later = Clock(time.time() + 60)  # a run that finds run-1's heartbeat a minute old
        RunLock(uri, "run-2", ttl_s=1.0, clock=later).acquire()
        _wait_for(lambda: lock.lost, "the heartbeat to notice the takeover")
        with pytest.raises(LockLostError, match="another run replaced it"):
            lock.check()
    assert _holder(uri)["run_id"] == "run-2"


def test_a_run_whose_renewals_fail_stops_and_its_index_commit_cannot_undo_the_next_run(s3_bucket, s3_proxy):
    """Item by item what the nightly relies on: the stale run notices by itself, the next run takes
    over, and the stale run's commit neither replaces the new index.json nor deletes its parts."""
    lock_uri, index_uri = f"{s3_bucket}/out/_lock", f"{s3_bucket}/out/_index"
    old_id, stale_id, new_id = "20261101T000000Z-000000", "20261102T000000Z-aaaaaa", "20261102T001000Z-bbbbbb"
    previous = idx.IndexStore(index_uri)
    previous.begin(old_id, "m")
    previous.commit(_index_db(("a.png", old_id)), old_id, [old_id])

    stale_index = idx.IndexStore(index_uri)
    with RunLock(lock_uri, stale_id, ttl_s=1.5) as stale:  # a real heartbeat every 0.375 s
        stale_index.begin(stale_id, "m")
        s3_proxy.deny_writes = True  # the stale run's renewals now fail (403)...
        _wait_for(lambda: stale.lost, "the heartbeat to give the lock up")
        assert _holder(lock_uri)["run_id"] == stale_id  # ... without anyone having replaced the lock
        with pytest.raises(LockLostError, match="renewals failed"):
            stale.check()
        s3_proxy.deny_writes = False

        new = RunLock(lock_uri, new_id, ttl_s=1.5)
        _wait_for(lambda: _acquired(new), "the next run to take the stale lock over")
        new_index = idx.IndexStore(index_uri)
        assert new_index.begin(new_id, "m") == [{"run_id": stale_id, "manifest": "m"}]
        with pytest.raises(idx.IndexFencedError, match="lost its lock"):
            stale_index.commit(_index_db(("a.png", stale_id), ("b.png", stale_id)), stale_id, [stale_id])
        assert _generations(index_uri) == {old_id}  # the stale run wrote and removed its own parts only
        new_index.commit(_index_db(("a.png", new_id)), new_id, [stale_id, new_id])
        new.release()
    meta = idx.IndexStore(index_uri).read_meta()
    assert meta.generation == new_id and meta.in_progress == [] and _generations(index_uri) == {new_id}
    loaded = _index_db()
    assert idx.IndexStore(index_uri).load(loaded, meta) == 1
    assert loaded.execute("SELECT key, run_id FROM idx").fetchall() == [("a.png", new_id)]
    assert not storage.exists(lock_uri)  # the stale run left the new run's lock alone


def _acquired(lock: RunLock) -> bool:
    try:
        lock.acquire()
        return True
    except LockHeldError:
        return False


def _index_db(*keys: tuple[str, str]) -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    idx.create_table(db)
    idx.upsert(db, [(key, 1, "e", 0, "m", None, "d", 4, f"s3://out/{key}", 1, run, None, None, None, None, "ok", None, None)
                    for key, run in keys])
    return db


def _generations(index_uri: str) -> set[str]:
    return {o.key.split("/", 1)[0][len("gen="):] for o in storage.iter_objects(index_uri) if o.key.startswith("gen=")}
