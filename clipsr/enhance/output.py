"""A run's output settings as the planner records and compares them: size (:mod:`.resize`) and
encoder (:mod:`.encoder`).

Every plan row carries them, so each stage reads its settings off the row, and the manifest and
the index keep them: a rerun with another ``--outscale``, ``--max-long-edge`` or ``--quality``
enhances the inputs whose outputs those settings change again, like a rerun with another model.
Rows written before these settings existed (null) were made with today's defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clipsr.enhance.encoder import DEFAULT_QUALITY, LOSSY_FORMATS, check_quality
from clipsr.enhance.resize import check_options


@dataclass(frozen=True)
class OutputSettings:
    outscale: float | None = None
    max_long_edge: int | None = None
    quality: int = DEFAULT_QUALITY

    def __post_init__(self) -> None:
        check_options(self.outscale, self.max_long_edge)
        check_quality(self.quality)

    def columns(self) -> dict[str, Any]:
        """The plan row's columns (``quality`` as asked: the write stage records what applied)."""
        return {"outscale": self.outscale, "max_long_edge": self.max_long_edge, "quality": self.quality}

    def unchanged(self, outscale: float | None, max_long_edge: int | None, quality: int | None,
                  output_format: str) -> bool:
        """Whether an earlier output with these recorded settings is what this run would write.

        A null quality is a lossless output (or one written before quality was recorded, at the
        default): only a JPEG's null quality is compared, as the default."""
        if (outscale, max_long_edge) != (self.outscale, self.max_long_edge):
            return False
        if output_format.upper() not in LOSSY_FORMATS:
            return True
        if quality is None:
            return output_format.upper() == "WEBP" or self.quality == DEFAULT_QUALITY
        return quality == self.quality
