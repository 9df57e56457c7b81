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

The primitives are :mod:`clipsr.storage`'s conditional writes; other protocols are refused there.
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


class LockHeldError(RuntimeError):
    """Another live run holds the output prefix."""


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
        self.lost = False
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _document(self) -> bytes:
        now = self.clock()
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
        try:
            self._token = _create(self.uri, self._document())
            return
        except _Conflict:
            pass
        current = _read(self.uri)
        if current is None:  # released between our two calls: try once more
            self._token = _create_or_raise(self.uri, self._document(), self.run_id)
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
        try:
            self._token = _replace(self.uri, self._document(), token)
        except _Conflict:
            raise LockHeldError(f"another run took over the stale lock {self.uri} first") from None
        log.warning("took over the lock of run %s (%s)", holder.get("run_id"), reason)

    def refresh(self) -> None:
        """Renew the heartbeat; marks the lock lost if someone else replaced it."""
        with self._mutex:
            if self._token is None or self.lost:
                return
            try:
                self._token = _replace(self.uri, self._document(), self._token)
            except _Conflict:
                self.lost = True
                log.error("lost the run lock %s: another run replaced it", self.uri)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001  a failed heartbeat is retried at the next beat
                log.warning("lock heartbeat failed (will retry): %s", e)

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

