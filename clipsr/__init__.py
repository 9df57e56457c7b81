"""clipsr: CLIP-aware domain-adaptive super-resolution."""
__version__ = "0.2.0"
