"""pathopeft: whole-slide tiling, multiple-instance learning and parameter-efficient adapters."""

__version__ = "0.1.0"
