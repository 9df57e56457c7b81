"""clipsr: CLIP-aware domain-adaptive super-resolution."""
__version__ = "0.1.0"
