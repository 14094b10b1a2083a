"""Attention traces: one layer's queries, keys, values and attention-input hidden states, captured from a model."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from topklab.io import atomic_write


@dataclass
class LayerTrace:
    """One layer's captured attention for a batch of sequences (post-RoPE, GQA layout as the model stores it).

    q ``[B, Hq, T, d]``, k and v ``[B, Hkv, T, d]`` (query head h reads KV head h // (Hq // Hkv)), hidden ``[B, T, D]``
    (the input of the attention block, after its norm: what a learned indexer projects), ``scale`` the softmax
    scale, ``prompt_len`` the number of leading positions that were prefill (later ones are decode positions).
    """

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    hidden: torch.Tensor | None
    scale: float
    prompt_len: int

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    @property
    def length(self) -> int:
        return self.k.shape[2]


FORMAT = "topklab-trace"
FORMAT_VERSION = 2  # 2: the header carries its own checksum
_FIELDS = ("q", "k", "v", "hidden")
_HEADER_TYPES = {"layers": list, "scale": (int, float), "prompt_len": int, "length": int, "num_heads": int,
                 "num_kv_heads": int, "head_dim": int, "info": dict, "crc32": dict}


class TraceError(ValueError):
    """A trace file that is truncated, corrupt, not a topklab trace, or from an incompatible version."""


def save_trace(path, layers: dict[int, LayerTrace], input_ids: torch.Tensor, info: dict | None = None,
               dtype: torch.dtype = torch.float16) -> Path:
    """Write ``layers`` to a safetensors file atomically (temp file + rename), with a CRC32 per tensor.

    ``info`` is free-form JSON metadata (model name, text title, ...). Tensors are stored in ``dtype``.
    """
    from safetensors.torch import save_file

    if not layers:
        raise ValueError("no layers to save")
    first = next(iter(layers.values()))
    tensors: dict[str, torch.Tensor] = {"input_ids": input_ids.detach().to("cpu", torch.int64).contiguous()}
    for idx, lt in layers.items():
        for field in _FIELDS:
            value = getattr(lt, field)
            if value is not None:
                tensors[f"layer{idx}.{field}"] = value.detach().to("cpu", dtype).contiguous()
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "layers": sorted(layers),
        "scale": first.scale,
        "prompt_len": first.prompt_len,
        "length": first.length,
        "num_heads": first.q.shape[1],
        "num_kv_heads": first.k.shape[1],
        "head_dim": first.q.shape[-1],
        "info": info or {},
        "crc32": {name: _crc(t) for name, t in tensors.items()},
    }
    header["header_crc32"] = _header_crc(header)
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"topklab": json.dumps(header)}))


class TraceFile:
    """A saved trace, read lazily: ``trace.layer(i)`` loads (and checksums) that layer only."""

    def __init__(self, path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no trace file at {self.path}")
        try:
            self._file = safe_open(str(self.path), framework="pt")
            raw = (self._file.metadata() or {}).get("topklab")
        except Exception as err:  # safetensors raises its own error types for bad headers / truncation
            raise TraceError(f"{self.path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
        if raw is None:
            raise TraceError(f"{self.path} is a safetensors file but not a topklab trace (no 'topklab' metadata)")
        try:
            self.header = json.loads(raw)
        except json.JSONDecodeError as err:
            raise TraceError(f"{self.path}: corrupt trace metadata ({err})") from err
        if self.header.get("format") != FORMAT:
            raise TraceError(f"{self.path}: not a topklab trace (format {self.header.get('format')!r})")
        if self.header.get("version") != FORMAT_VERSION:
            raise TraceError(
                f"{self.path}: trace format version {self.header.get('version')} but this topklab reads version "
                f"{FORMAT_VERSION}; capture the trace again with this version"
            )
        self._check_header()

    def _check_header(self) -> None:
        """The header's own checksum, its fields' types, and every listed layer's q, k, v present: a changed scale
        or layer list would otherwise skew every metric silently."""
        header = self.header
        if header.get("header_crc32") != _header_crc(header):
            raise TraceError(f"{self.path}: the trace metadata fails its checksum (edited or corrupt); capture it again")
        for key, kind in _HEADER_TYPES.items():
            if not isinstance(header.get(key), kind):
                raise TraceError(f"{self.path}: trace metadata field {key!r} is missing or not a {kind}")
        missing = set(header["crc32"]) - set(self._file.keys())
        missing |= {f"layer{i}.{f}" for i in header["layers"] for f in ("q", "k", "v")} - set(header["crc32"])
        if missing:
            raise TraceError(f"{self.path}: tensors the metadata needs are missing: {sorted(missing)[:5]}")

    @property
    def layers(self) -> list[int]:
        return list(self.header["layers"])

    @property
    def info(self) -> dict:
        return dict(self.header["info"])

    @property
    def prompt_len(self) -> int:
        return int(self.header["prompt_len"])

    @property
    def length(self) -> int:
        return int(self.header["length"])

    def verify(self) -> "TraceFile":
        """Read every tensor once and check its checksum (raises TraceError on corruption)."""
        for name in self.header["crc32"]:
            self._tensor(name)
        return self

    def input_ids(self) -> torch.Tensor:
        return self._tensor("input_ids")

    def layer(self, idx: int, dtype: torch.dtype = torch.float32) -> LayerTrace:
        if idx not in self.header["layers"]:
            raise KeyError(f"layer {idx} is not in {self.path} (it holds layers {self.layers})")
        fields = {}
        for field in _FIELDS:
            name = f"layer{idx}.{field}"
            fields[field] = self._tensor(name).to(dtype) if name in self.header["crc32"] else None
        return LayerTrace(layer=idx, scale=float(self.header["scale"]), prompt_len=self.prompt_len, **fields)

    def _tensor(self, name: str) -> torch.Tensor:
        try:
            tensor = self._file.get_tensor(name)
        except Exception as err:
            raise TraceError(f"{self.path}: cannot read tensor {name!r} (truncated or corrupt?): {err}") from err
        if _crc(tensor) != self.header["crc32"][name]:
            raise TraceError(f"{self.path}: checksum mismatch in tensor {name!r}: the file is corrupt; capture it again")
        return tensor


def _header_crc(header: dict) -> int:
    body = {key: value for key, value in header.items() if key != "header_crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True).encode())


def _crc(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.contiguous().view(torch.uint8).numpy().tobytes()) if tensor.numel() else 0
