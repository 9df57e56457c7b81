"""The progress line people read: plain lines in a log, a live line on a terminal."""
from __future__ import annotations

import io

from clipsr.progress import Progress


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_full_line_every_interval_and_at_the_end():
    out, clock = io.StringIO(), _Clock()
    bar = Progress("clipsr enhance", 100, stream=out, every_s=10, clock=clock)
    for done in range(1, 101):
        clock.now = done * 0.5  # two images a second
        bar.update(done, {"ok": done - done // 10, "failed": done // 10})
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and "\r" not in out.getvalue()  # at 10, 20, 30, 40 s and the end (50 s), once each
    assert lines[0] == "clipsr enhance: 20/100 images (20%), ok 18, failed 2, 2.00 images/s, about 40s left"
    assert lines[-1] == "clipsr enhance: 100/100 images (100%), ok 90, failed 10, 2.00 images/s"


def test_a_terminal_gets_one_line_rewritten_in_place():
    out, clock = _Terminal(), _Clock()
    bar = Progress("clipsr enhance", 3, stream=out, clock=clock)
    for done in (1, 2, 3):
        clock.now += 1
        bar.update(done, {"ok": done})
    bar.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") == 3
    assert text.rstrip().rsplit("\r", 1)[-1].startswith("clipsr enhance: 3/3 images (100%), ok 3")
