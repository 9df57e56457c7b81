"""A driver's local Ray ends with the driver, however the driver ends.

When a driver that started its own local Ray is killed (SIGKILL, the kernel's out-of-memory
killer), Ray's GCS and raylet go with it, and its workers within seconds, but the raylet's two
agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) stay about a minute: they try to
report the raylet's death to the GCS, which died first, until their GCS client gives up.

So the driver starts a small watcher process (``python -m clipsr.reaper <driver pid>``) beside
its local Ray. The watcher notes the driver's descendants every second; when its pipe from the
driver closes without a goodbye (the driver is gone), it kills the descendants it noted that
are still alive, each checked by its start time so that a reused process id is never hit. A
driver that ends normally says goodbye first (atexit), and the watcher exits without killing
anything. Linux only (it reads /proc); elsewhere nothing is started.
"""
from __future__ import annotations

import atexit
import os
import select
import signal
import subprocess
import sys

#: Seconds between looks at the driver's descendants.
REFRESH_S = 1.0
_GOODBYE = b"q"
_watcher: subprocess.Popen | None = None


def start() -> None:
    """Watch this process's descendants from now on (once per process; Linux only)."""
    global _watcher
    if (_watcher is not None and _watcher.poll() is None) or not sys.platform.startswith("linux"):
        return
    _watcher = subprocess.Popen([sys.executable, "-m", "clipsr.reaper", str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
    atexit.register(_goodbye, _watcher)


def _goodbye(watcher: subprocess.Popen) -> None:
    try:
        watcher.stdin.write(_GOODBYE)
        watcher.stdin.close()
    except OSError:
        pass


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None: gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of ``root``: process id -> start time."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        children.setdefault(int(stat[stat.rindex(b")") + 2:].split()[1]), []).append(int(name))
    found: dict[int, int] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        started = _start_time(pid)
        if started is not None:
            found[pid] = started
        stack += children.get(pid, [])
    return found


def _watch(driver: int) -> None:
    noted: dict[int, int] = {}
    me = os.getpid()
    while True:
        ready, _, _ = select.select([sys.stdin.buffer], [], [], REFRESH_S)
        if ready:
            if os.read(sys.stdin.fileno(), 1) == _GOODBYE:
                return
            break  # the pipe closed: the driver is gone
        noted.update((pid, started) for pid, started in descendants(driver).items() if pid != me)
    for pid, started in noted.items():
        if _start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
