"""A driver's processes end with the driver: the watcher started beside a local Ray."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watcher reads /proc")

# A driver that starts the watcher and a child that would outlive it by ten minutes, prints the
# child's pid once the watcher has had time to note it (two of its looks), then waits or exits.
DRIVER = """
import subprocess, sys, time
from clipsr import reaper
reaper.start()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(2.5 * reaper.REFRESH_S)
print(child.pid, reaper._watcher.pid, flush=True)
if sys.argv[1] == "wait":
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, limit_s: float = 60.0) -> bool:
    deadline = time.monotonic() + limit_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_killed_driver_takes_the_processes_it_started_with_it():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, "wait"], stdout=subprocess.PIPE, text=True)
    child, _ = map(int, driver.stdout.readline().split())
    try:
        assert _alive(child)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        assert _wait_gone(child), "the driver's child outlived it"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_driver_that_ends_normally_leaves_its_processes_alone():
    driver = subprocess.run([sys.executable, "-c", DRIVER, "exit"], capture_output=True, text=True, timeout=120)
    child, watcher = map(int, driver.stdout.split())
    try:
        assert _wait_gone(watcher), "the watcher outlived a driver that said goodbye"
        assert _alive(child)
    finally:
        os.kill(child, signal.SIGKILL)
