"""topklab: measure, plug in and study approximate Top-k sparse attention indexers."""

__version__ = "0.1.0"
