"""Approximate Top-k selectors, one file per family, built from spec strings: ``make("ivf:nlist=256,nprobe=16")``."""

from topklab.indexers.base import Cost, Indexer, KeyBuffer, StoredKeysIndexer
from topklab.indexers.registry import available, default_specs, make, parameters, parse_spec, register

# Importing a family's module registers it.
from topklab.indexers import exact, oracle  # noqa: E402,F401  isort: skip

__all__ = [
    "Cost", "Indexer", "KeyBuffer", "StoredKeysIndexer",
    "available", "default_specs", "make", "parameters", "parse_spec", "register",
]
