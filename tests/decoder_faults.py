"""Faults for the decoder process, importable there (it is another interpreter): a test picks
which input kills it."""
from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from clipsr.enhance.isolate import Isolated


def _die_on(doomed: bytes, fn: Callable[..., Any], data: bytes, *args: Any) -> Any:
    if data == doomed:
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's out-of-memory killer does
    return fn(data, *args)


class DiesOn(Isolated):
    """The real decoder process, killed by SIGKILL while it holds one given input."""

    def __init__(self, doomed: bytes) -> None:
        super().__init__()
        self.doomed = doomed

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return super().call(_die_on, self.doomed, fn, *args)
