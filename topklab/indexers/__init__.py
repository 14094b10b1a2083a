"""Approximate Top-k selectors, one file per family, built from spec strings: ``make("ivf:nlist=256,nprobe=16")``.

Every module of this package (except the plumbing: base, registry, private ``_*`` helpers) is a family and is
imported here, which registers it.
"""

import importlib
import pkgutil

from topklab.indexers.base import Cost, Indexer, KeyBuffer, StoredKeysIndexer
from topklab.indexers.registry import available, default_specs, make, parameters, parse_spec, register

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Cost", "Indexer", "KeyBuffer", "StoredKeysIndexer",
    "available", "default_specs", "make", "parameters", "parse_spec", "register",
]
