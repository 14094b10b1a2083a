"""Spec strings -> indexers, in the spirit of FAISS's index_factory.

A spec is ``name`` or ``name:param=value,param=value``; parameters are the indexer dataclass's fields and values
are parsed by the field's type. The same string names the configuration in Python, on the CLI and in result tables.
"""

from __future__ import annotations

import dataclasses
import math
import typing

from topklab.indexers.base import Indexer

INT_PARAM_LIMIT = 2**63 - 1  # what a C int64 (and a torch seed) holds

REGISTRY: dict[str, type[Indexer]] = {}


def register(cls: type[Indexer]) -> type[Indexer]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute `name`")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"indexer name {cls.name!r} is registered twice ({REGISTRY[cls.name].__name__}, {cls.__name__})")
    REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Registered indexer names."""
    return sorted(REGISTRY)


def parameters(name: str) -> dict[str, object]:
    """The parameters of indexer ``name`` with their defaults."""
    cls = _lookup(name)
    return {f.name: f.default for f in dataclasses.fields(cls) if f.init}


def default_specs() -> list[str]:
    """The specs `topklab recall` evaluates when none are given: every registered family's examples."""
    return [spec for name in available() for spec in REGISTRY[name].examples]


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"ivf:nlist=256,nprobe=16"`` -> ``("ivf", {"nlist": "256", "nprobe": "16"})``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"an indexer spec must be a non-empty string such as 'exact' or 'oracle:p=0.5', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"bad parameter {item!r} in spec {spec!r}: write parameters as name=value")
        if key.strip() in params:
            raise ValueError(f"parameter {key.strip()!r} is given twice in spec {spec!r}")
        params[key.strip()] = value.strip()
    return name.strip(), params


def make(spec: str) -> Indexer:
    """Build an (unbuilt) indexer from its spec string."""
    name, raw = parse_spec(spec)
    cls = _lookup(name)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        valid = ", ".join(f"{f}={_show(fields[f].default)}" for f in fields) or "(none)"
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for indexer {name!r}; valid: {valid}")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _convert(name, key, value, hints[key]) for key, value in raw.items()}
    return cls(**kwargs)


def _lookup(name: str) -> type[Indexer]:
    if name not in REGISTRY:
        raise ValueError(f"unknown indexer {name!r}; available: {', '.join(available())}")
    return REGISTRY[name]


def _convert(name: str, key: str, value: str, typ) -> object:
    parse = {bool: _parse_bool, int: int, float: float}.get(typ, str)
    try:
        parsed = parse(value)
    except ValueError:
        raise ValueError(f"{name}: parameter {key}={value!r} is not a valid {getattr(typ, '__name__', typ)}") from None
    if typ is int and abs(parsed) > INT_PARAM_LIMIT:
        raise ValueError(f"{name}: parameter {key}={value} is out of range (|value| <= {INT_PARAM_LIMIT})")
    if typ is float and not math.isfinite(parsed):
        raise ValueError(f"{name}: parameter {key}={value} must be a finite number")
    return parsed


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
