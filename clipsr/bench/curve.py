"""The training curve of a pretraining run, from its log: loss and validation Y-PSNR per step.

Reads the progress lines the training loop logs (``step N/T loss X ... val/NAME/psnr_y=Y``), so
it works on the log of any run, local or submitted; plotting needs matplotlib (the ``docs`` extra).
"""
from __future__ import annotations

import re
from typing import Any

STEP = re.compile(r"step (\d+)/(\d+) loss ([0-9.]+)")
VAL = re.compile(r"val/([\w.-]+)/psnr_y=([0-9.]+)")


def parse_log(text: str) -> dict[str, Any]:
    """{"steps": [...], "loss": [...], "val": {name: [(step, psnr), ...]}}; a resumed run's repeated
    steps keep their latest value."""
    loss: dict[int, float] = {}
    val: dict[str, dict[int, float]] = {}
    for line in text.splitlines():
        m = STEP.search(line)
        if not m:
            continue
        step = int(m.group(1))
        loss[step] = float(m.group(3))
        for name, psnr in VAL.findall(line):
            val.setdefault(name, {})[step] = float(psnr)
    steps = sorted(loss)
    return {"steps": steps, "loss": [loss[s] for s in steps],
            "val": {n: sorted(v.items()) for n, v in val.items()}}


def plot(curve: dict[str, Any], out: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install -e '.[docs]'") from None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(curve["steps"], curve["loss"], lw=1)
    a.set(xlabel="step", ylabel="training loss (L1, mean per log interval)", title="loss")
    a.grid(alpha=0.3)
    for name, points in curve["val"].items():
        xs, ys = zip(*points)
        b.plot(xs, ys, marker="o", label=name)
    b.set(xlabel="step", ylabel="Y-PSNR (dB), EMA weights", title="validation")
    b.grid(alpha=0.3)
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
