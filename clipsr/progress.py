"""Progress for people: one live line on a terminal, plain periodic lines in a log.

Driven by the job's own counts (images done out of planned, per status), not by Ray's blocks. On a
terminal the line is rewritten in place at most a few times a second; anywhere else (a log file,
`ray job submit`'s stream, CI) a full line is printed every ``every_s`` seconds, each time another
twentieth of the work is done (so a run of a few images gets a line per image) and when the work
ends: a log shows progress without a wall of carriage returns. Work made of several parts (the
domains of an adaptation) adds a note per part: after the line on a terminal, cut to its width; on
lines of their own in a log.
"""
from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

_TTY_EVERY_S = 0.25
#: A log gets a line at least at every 1/STEPS of the work.
STEPS = 20


def duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``2h05m``: a time left, as people read it."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """``update(done, counts)`` as work finishes; ``close()`` once at the end."""

    def __init__(self, label: str, total: int, unit: str = "images", stream: TextIO | None = None,
                 every_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 steps: int | None = STEPS) -> None:
        """``steps``: a log also gets a line at each 1/steps of the work (None: only every ``every_s``)."""
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = _TTY_EVERY_S if self.live else every_s
        self.clock = clock
        self.start = self._last = clock()
        self._done, self._counts, self._notes = 0, {}, ()
        self._width = 0
        self._shown = -1  # images done at the last line written
        self._step = max(1, -(-total // steps)) if steps else None  # images per 1/steps, rounded up

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self._done / elapsed
        parts = [f"{self.label}: {self._done}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self._done / self.total:.0f}%)"
        parts += [f"{name} {n}" for name, n in self._counts.items() if n]
        parts.append(f"{rate:.2f} {self.unit}/s")
        if 0 < self._done < self.total:
            parts.append(f"about {duration((self.total - self._done) / rate)} left")
        return ", ".join(parts)

    def update(self, done: int, counts: Mapping[str, int], notes: Sequence[str] = ()) -> None:
        self._done, self._counts, self._notes = done, dict(counts), tuple(notes)
        now = self.clock()
        stepped = (not self.live and self._step is not None
                   and done // self._step > max(self._shown, 0) // self._step)
        if now - self._last < self.every_s and done < self.total and not stepped:
            return
        self._last = now
        self._emit()

    def _emit(self) -> None:
        self._shown = self._done
        text = self.line()
        if self.live:
            if self._notes:
                text = (text + " | " + "; ".join(self._notes))[: shutil.get_terminal_size().columns - 1]
            pad = max(0, self._width - len(text))
            self._width = len(text)
            self.stream.write("\r" + text + " " * pad)
        else:
            self.stream.write(text + "\n" + "".join(f"  {note}\n" for note in self._notes))
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (a part finished), kept above a terminal's live line."""
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        if self.live and self._shown >= 0:
            self._emit()
        self.stream.flush()

    def close(self) -> None:
        """The final line (a terminal's live line is ended with a newline)."""
        if self._shown != self._done or self._shown < 0:
            self._emit()
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
