"""One run at a time per output prefix: a lock object created with an exclusive write.

``<output>/_lock`` holds JSON: the run id, host, pid, and a heartbeat the holder refreshes every
ttl/4 seconds. A second run (a nightly while a backfill runs) finds it and stops with exit status
1 and a message naming the holder. A lock is stale, and is taken over, when its heartbeat is older
than its ttl, or at once when it was written on this host by a process that no longer exists (a
killed local run). Every write is conditional, so two runs racing for a stale lock cannot both win:

- S3: ``PutObject`` with ``If-None-Match: *`` to create, ``If-Match: <ETag>`` to refresh or take over
  (conditional writes, supported by AWS S3 since 2024 and by moto).
- local disks: create by hard-linking a complete temporary file (atomic, fails if the name
  exists); refresh and take over under an exclusive file lock around read-compare-replace.

The primitives are :mod:`clipsr.storage`'s conditional writes; other protocols are refused there,
and :func:`require_conditional_store` refuses a store that accepts the headers but ignores them.

Losing it: the lock is lost when another run replaced it, or when renewals keep failing (an S3
outage, expired credentials, a paused driver) until the last good one is ``LOST_AFTER`` of the ttl
old. Another run may take it over at the full ttl; the rest is a margin for clock skew and for
stopping. The run calls :meth:`RunLock.check` before it writes state, which raises
:class:`LockLostError` from then on (also when the heartbeat thread is stuck in a slow request).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Callable

from clipsr import storage

log = logging.getLogger(__name__)


# A holder counts its lock as gone once its last good renewal is this part of the ttl old.
LOST_AFTER = 0.75
ALLOW_FLAG = "--allow-unconditional-writes"


class LockHeldError(RuntimeError):
    """Another live run holds the output prefix."""


class LockLostError(RuntimeError):
    """This run can no longer show that it holds its lock, so another run may be writing: stop."""


def require_conditional_store(folder_uri: str, allow: bool = False) -> None:
    """Refuse to lock a store that ignores conditional writes, unless the operator allowed it.

    Such a store answers every lock write with success: two runs would both hold the lock, and
    the index fence would let a stale run replace a newer run's index.
    """
    problem = storage.probe_conditional_writes(folder_uri)
    if problem is None:
        return
    if not allow:
        raise storage.ConditionalWritesIgnoredError(
            f"{folder_uri} does not honour conditional writes ({problem}), so the run lock cannot keep "
            f"two runs apart; use a store that does (AWS S3 does), or pass {ALLOW_FLAG} if nothing "
            "else can ever write this output prefix while a run is going")
    log.warning("%s does not honour conditional writes (%s); going on because of %s: the run lock and "
                "the index fence do not protect this run", folder_uri, problem, ALLOW_FLAG)


class _Conflict(Exception):
    """A conditional write found the object changed (or present) since it was read."""


# --- conditional object primitives (storage's, with the lock's version token) -------------------


def _read(uri: str) -> tuple[bytes, str] | None:
    """The lock document and its version token, or None if there is none."""
    try:
        return storage.read_bytes_with_etag(uri)
    except FileNotFoundError:
        return None


def _token_of(uri: str, data: bytes) -> str:
    """The version token of the document this run just wrote (re-read: S3 assigns the ETag)."""
    current = _read(uri)
    if current is None or current[0] != data:
        raise _Conflict(f"{uri} changed right after it was written")
    return current[1]


def _create(uri: str, data: bytes) -> str:
    """Create the object only if absent; returns its version token; raises _Conflict if present."""
    if not storage.write_bytes_if_absent(uri, data):
        raise _Conflict(f"{uri} exists")
    return _token_of(uri, data)


def _replace(uri: str, data: bytes, token: str) -> str:
    """Replace the object only if it is still at version ``token``; returns the new token."""
    if not storage.write_bytes_if_match(uri, data, token):
        raise _Conflict(f"{uri} changed")
    return _token_of(uri, data)


# --- the lock --------------------------------------------------------------------------------


class RunLock:
    """The lock of one output prefix, held by one run (use as a context manager)."""

    def __init__(self, uri: str, run_id: str, ttl_s: float = 600.0, clock: Callable[[], float] = time.time) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lock ttl must be positive, got {ttl_s}")
        storage.require_conditional_writes(uri)
        self.uri, self.run_id, self.ttl_s, self.clock = uri, run_id, ttl_s, clock
        self._lost: str | None = None  # why, once lost
        self._token: str | None = None
        self._renewed = 0.0  # clock time in the last document this run wrote successfully
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def _document(self, now: float) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "heartbeat": now, "ttl_s": self.ttl_s,
                           "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + self.ttl_s))}).encode()

    def stale_reason(self, holder: dict) -> str | None:
        """Why a lock document no longer protects a live run, or None if it does."""
        age = self.clock() - float(holder.get("heartbeat", 0))
        if age > float(holder.get("ttl_s", self.ttl_s)):
            return f"heartbeat {age:.0f} s old"
        if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
            return f"its process {holder.get('pid')} on this host has exited"
        return None

    def acquire(self) -> None:
        now = self.clock()
        try:
            self._token, self._renewed = _create(self.uri, self._document(now)), now
            return
        except _Conflict:
            pass
        current = _read(self.uri)
        if current is None:  # released between our two calls: try once more
            now = self.clock()
            self._token, self._renewed = _create_or_raise(self.uri, self._document(now), self.run_id), now
            return
        data, token = current
        try:
            holder = json.loads(data)
        except ValueError:
            holder = {}
        reason = self.stale_reason(holder)
        if reason is None:
            age = self.clock() - float(holder.get("heartbeat", 0))
            raise LockHeldError(
                f"output prefix is locked by run {holder.get('run_id')} (host {holder.get('host')}, "
                f"heartbeat {age:.0f} s ago, expires {holder.get('expires')}); two runs on one output "
                f"prefix would corrupt its index. Wait for it, or remove {self.uri} if that run is dead")
        now = self.clock()
        try:
            self._token, self._renewed = _replace(self.uri, self._document(now), token), now
        except _Conflict:
            raise LockHeldError(f"another run took over the stale lock {self.uri} first") from None
        log.warning("took over the lock of run %s (%s)", holder.get("run_id"), reason)

    def refresh(self) -> None:
        """Renew the heartbeat. Never raises: a failure is retried at the next beat until the last
        good renewal is LOST_AFTER of the ttl old; a replaced lock is lost at once."""
        with self._mutex:
            if self._token is None or self.lost:
                return
            now = self.clock()
            try:
                self._token, self._renewed = _replace(self.uri, self._document(now), self._token), now
            except _Conflict:
                self._lose("another run replaced it")
            except Exception as e:  # noqa: BLE001  any storage error: the renewal did not happen
                age = self.clock() - self._renewed
                reason = f"renewals failed for {age:.1f} s of its {self.ttl_s:g} s ttl (last: {type(e).__name__}: {e})"
                if age >= LOST_AFTER * self.ttl_s:
                    self._lose(" ".join(reason.split()))
                else:
                    log.warning("lock heartbeat failed, retrying at the next beat: %s", reason)

    def check(self) -> None:
        """Raise LockLostError unless this run still holds the lock; call it before writing state.

        No I/O. Besides a loss the heartbeat saw, it catches a heartbeat that has not renewed
        for LOST_AFTER of the ttl (stuck in a slow request, or starved)."""
        if self._token is None and not self.lost:
            raise LockLostError(f"run lock {self.uri} is not held by run {self.run_id}")
        age = self.clock() - self._renewed
        if not self.lost and age >= LOST_AFTER * self.ttl_s:
            self._lose(f"not renewed for {age:.1f} s of its {self.ttl_s:g} s ttl")
        if self._lost is not None:
            raise LockLostError(f"lost the run lock {self.uri}: {self._lost}; stopped writing (a rerun folds "
                                "in this run's finished work)")

    def _lose(self, reason: str) -> None:
        if self._lost is None:
            self._lost = reason
            log.error("lost the run lock %s: %s", self.uri, reason)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4) and not self.lost:
            self.refresh()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            if self._token is None or self.lost:
                return
            current = _read(self.uri)
            if current is not None and current[1] == self._token:
                storage.delete(self.uri)
            self._token = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        self._thread = threading.Thread(target=self._beat, name="clipsr-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _create_or_raise(uri: str, data: bytes, run_id: str) -> str:
    try:
        return _create(uri, data)
    except _Conflict:
        raise LockHeldError(f"output prefix lock {uri} was taken by another run while run {run_id} started") from None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

