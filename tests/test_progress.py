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


def test_a_log_gets_a_full_line_every_interval():
    out, clock = io.StringIO(), _Clock()
    bar = Progress("clipsr enhance", 10_000, stream=out, every_s=10, clock=clock)
    for done in range(1, 101):
        clock.now = done * 0.5  # two images a second, far from a twentieth of the work (500 images)
        bar.update(done, {"ok": done - done // 10, "failed": done // 10})
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and "\r" not in out.getvalue()  # at 10, 20, 30, 40 and 50 s; close() adds none
    assert lines[0] == "clipsr enhance: 20/10000 images (0%), ok 18, failed 2, 2.00 images/s, about 1h23m left"
    assert lines[-1].startswith("clipsr enhance: 100/10000 images (1%), ok 90, failed 10, 2.00 images/s")


def test_a_log_gets_a_line_at_every_twentieth_of_the_work():
    out, clock = io.StringIO(), _Clock()
    bar = Progress("clipsr enhance", 100, stream=out, every_s=10, clock=clock)
    for done in range(1, 101):
        clock.now = done * 0.01  # fast: the interval never passes
        bar.update(done, {"ok": done})
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" ", 3)[2] for line in lines] == [f"{n}/100" for n in range(5, 101, 5)]


def test_a_log_of_a_few_images_gets_a_line_per_image():
    out, clock = io.StringIO(), _Clock()
    bar = Progress("clipsr enhance", 3, stream=out, every_s=10, clock=clock)
    for done, counts in ((1, {"ok": 1}), (2, {"ok": 1, "failed": 1}), (3, {"ok": 2, "failed": 1})):
        clock.now += 1
        bar.update(done, counts)
    bar.close()
    assert out.getvalue().splitlines() == [
        "clipsr enhance: 1/3 images (33%), ok 1, 1.00 images/s, about 2s left",
        "clipsr enhance: 2/3 images (67%), ok 1, failed 1, 1.00 images/s, about 1s left",
        "clipsr enhance: 3/3 images (100%), ok 2, failed 1, 1.00 images/s",
    ]


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


def test_notes_follow_the_live_line_and_a_message_keeps_its_own_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out, clock = _Terminal(), _Clock()
    bar = Progress("adapt", 100, unit="steps", stream=out, clock=clock)
    clock.now = 1
    bar.update(10, {"running": 1}, ["manga: 10/100 steps"])
    bar.message("[urban] ok: v1 gain +0.250 dB (9s)")
    clock.now = 2
    bar.update(20, {"running": 1}, ["manga: 20/100 steps"])
    bar.close()
    text = out.getvalue()
    # the live line was wiped before the message, which stays on a line of its own, then redrawn
    assert "\r[urban] ok: v1 gain +0.250 dB (9s)\n\radapt: 10/100 steps" in text.replace(" " * 80, "")
    last = text.rstrip("\n").rsplit("\r", 1)[-1]
    assert last.startswith("adapt: 20/100 steps (20%), running 1") and last.rstrip().endswith("| manga: 20/100 steps")
    # a narrow terminal: the line is cut to its width rather than wrapped
    monkeypatch.setenv("COLUMNS", "40")
    narrow = _Terminal()
    Progress("adapt", 100, unit="steps", stream=narrow, clock=clock).update(100, {}, ["manga: 100/100 steps"])
    assert len(narrow.getvalue().strip("\r")) == 39
