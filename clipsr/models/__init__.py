"""SR networks: backbones (one per file), the CLIP-guided domain-adaptive module, the CDASR wrapper.

Backbones register themselves by name so architecture configs (JSON data under
``clipsr/model_configs``) can name them; see :mod:`clipsr.models.factory`.
"""
from clipsr.models.registry import BACKBONES, register_backbone
from clipsr.models import rescnn, rcan_lite  # noqa: F401  (register backbones)
from clipsr.models.cdasr import CDASR

__all__ = ["BACKBONES", "register_backbone", "CDASR"]
