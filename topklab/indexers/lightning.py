"""DeepSeek DSA's Lightning Indexer: I[t, s] = sum_j w[t, j] * ReLU(q_I[t, j] . k_I[s]), then the Top-k of I.

``lightning`` learns small projections of the attention-input hidden states (H_I index queries of dim d_I, one
shared index key per token, followed by LayerNorm, and per-head weights) by distillation from the layer's dense
attention (see :mod:`topklab.training.indexer_distill`) and selects one key set per token, shared by all heads.
``lightning-qk`` is training-free: it runs the model's own query and key through the same scoring path (one head,
weight 1, so the score is ReLU(q . k)), which isolates what Hadamard + FP8 + ReLU cost from what learning costs.
With ReLU, keys with q . k <= 0 all score 0, so when fewer than k keys score above 0 the rest are ties (broken
arbitrarily); ``relu=false`` removes ReLU to separate its cost from FP8's.

Training runs in full precision; FP8 is inference only (as in DSA). With ``fp8=true`` index keys are stored
Hadamard-rotated as FP8 e4m3 with one fp32 scale per key (per (token, head) for queries): block = d_I, which is
DSA's 128-element block at d_I = 128, and ``pow2=true`` rounds scales up to powers of two (UE8M0). ``fp8=false``
stores and scores in fp32, so the recall that FP8 costs can be measured.

Positions (only with ``rope > 0``, RoPE on the first ``rope`` index dims as DSA does on half of them): the indexed
tokens are positions 0..n-1 and the M queries of a search are the newest M of them, n-M..n-1 (decoding adds the
current token before it searches). Search does not mask future keys: like every indexer it ranks all n keys.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from topklab.fidelity.traces import LayerTrace
from topklab.indexers.base import Indexer, KeyBuffer
from topklab.indexers.registry import register
from topklab.io import atomic_write
from topklab.kernels.fp8_index import MAX_INDEX_DIM, fp8_index_scores, hadamard_rotate, quantize_fp8
from topklab.training.indexer_distill import distill

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "topklab-lightning/1"
#: Parameters that define the learned projections; a checkpoint must match the spec on each of them.
ARCHITECTURE = ("heads", "dim", "rope")


def relu_weighted_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Full-precision I: q ``[B, M, H, d]``, weights ``[B, M, H]``, keys ``[B, N, d]`` -> ``[B, M, N]``."""
    b, m, h, d = q.shape
    dots = torch.relu(torch.matmul(q.reshape(b, m * h, d), keys.transpose(1, 2))).view(b, m, h, -1)
    return torch.matmul(weights.unsqueeze(2), dots).squeeze(2)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, dims: int, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE on the first ``dims`` features of ``x [B, P, ..., d]`` at ``positions [P]``."""
    if dims == 0:
        return x
    inv_freq = base ** (-torch.arange(0, dims, 2, device=x.device, dtype=torch.float32) / dims)
    angles = positions.float()[:, None] * inv_freq  # [P, dims/2]
    angles = angles.reshape(1, len(positions), *([1] * (x.dim() - 3)), dims // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    part = x[..., :dims]
    half1, half2 = part[..., : dims // 2], part[..., dims // 2 :]
    rotated = part * cos + torch.cat([-half2, half1], -1) * sin
    return torch.cat([rotated, x[..., dims:]], -1)


class LightningProjections(torch.nn.Module):
    """The learned part: hidden ``D`` -> H index queries of dim d, one LayerNorm'd index key, H head weights."""

    def __init__(self, hidden_size: int, heads: int, dim: int, rope: int):
        super().__init__()
        self.heads, self.dim, self.rope = heads, dim, rope
        self.wq = torch.nn.Linear(hidden_size, heads * dim, bias=False)
        self.wk = torch.nn.Linear(hidden_size, dim, bias=False)
        self.k_norm = torch.nn.LayerNorm(dim)
        self.ww = torch.nn.Linear(hidden_size, heads, bias=False)

    @property
    def hidden_size(self) -> int:
        return self.wk.in_features

    def keys(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` -> index keys ``[B, N, d]``."""
        return apply_rope(self.k_norm(self.wk(hidden)), positions, self.rope)

    def queries(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, M, D]`` -> index queries ``[B, M, H, d]`` and weights ``[B, M, H]`` (times H^-1/2 d^-1/2, as DSA)."""
        q = self.wq(hidden).unflatten(-1, (self.heads, self.dim))
        weights = self.ww(hidden) * (self.heads * self.dim) ** -0.5
        return apply_rope(q, positions, self.rope), weights

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Training scores ``[B, R, T]`` of the query positions ``rows`` against every key of ``hidden [B, T, D]``."""
        keys = self.keys(hidden, torch.arange(hidden.shape[1], device=hidden.device))
        q, weights = self.queries(hidden[:, rows], rows)
        return relu_weighted_scores(q, weights, keys)


class IndexKeys:
    """Index keys ``[B, N, d]`` as held for search: Hadamard-rotated FP8 plus one fp32 scale per key, or fp32."""

    def __init__(self, keys: torch.Tensor, fp8: bool, pow2: bool):
        self.fp8, self.pow2, self.dim = fp8, pow2, keys.shape[-1]
        if fp8 and (self.dim & (self.dim - 1) or self.dim > MAX_INDEX_DIM):
            raise ValueError(f"FP8 index scoring needs a power-of-two dim <= {MAX_INDEX_DIM} (Hadamard rotation, one "
                             f"scale per vector), got d = {self.dim}; use fp8=false")
        values, scales = self._encode(keys)
        self.values = KeyBuffer(values)
        self.scales = KeyBuffer(scales) if fp8 else None

    @property
    def bytes_per_vector(self) -> int:
        """FP8: d bytes + a 4-byte scale (132 B at d = 128, as DSA's key cache); fp32: 4 d bytes."""
        return self.dim + 4 if self.fp8 else 4 * self.dim

    def nbytes(self) -> int:
        return self.values.nbytes() + (self.scales.nbytes() if self.fp8 else 0)

    def append(self, keys: torch.Tensor) -> None:
        values, scales = self._encode(keys)
        self.values.append(values)
        if self.fp8:
            self.scales.append(scales)

    def scores(self, q: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """I ``[B, M, N]`` for queries ``[B, M, H, d]`` with head weights ``[B, M, H]``."""
        if not self.fp8:
            return relu_weighted_scores(q.float(), weights.float(), self.values.data)
        q_fp8, q_scale = quantize_fp8(hadamard_rotate(q.float()), block=self.dim, pow2_scale=self.pow2)
        return fp8_index_scores(q_fp8, q_scale[..., 0], self.values.data, self.scales.data[..., 0], weights.float())

    def _encode(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.fp8:
            return keys.float(), None
        return quantize_fp8(hadamard_rotate(keys.float()), block=self.dim, pow2_scale=self.pow2)


@register
@dataclass
class Lightning(Indexer):
    """Learned Lightning indexer on hidden states. ``heads``/``dim``: H_I and d_I; ``rope``: leading index dims
    under RoPE (0 = none; DSA rotates half; on SmolLM2 it lifts recall a lot, attention being local);
    ``fp8``/``pow2``: inference precision; ``steps``/``lr``/``seed``: distillation (Adam, ``fit``);
    ``ckpt``: load a trained indexer saved with ``save(path)`` instead of fitting."""

    heads: int = 4
    dim: int = 64
    rope: int = 32
    fp8: bool = True
    pow2: bool = False
    steps: int = 300
    lr: float = 1e-2
    seed: int = 0
    ckpt: str = ""

    name = "lightning"
    source = "hidden"
    trainable = True
    examples = ("lightning", "lightning:fp8=false")  # two fits per layer keep `topklab recall` within minutes

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.heads < 1:
            raise ValueError(f"lightning: heads must be >= 1, got {self.heads}")
        if self.dim < 1 or self.dim & (self.dim - 1) or self.dim > MAX_INDEX_DIM:
            raise ValueError(f"lightning: dim must be a power of two in [1, {MAX_INDEX_DIM}] (Hadamard rotation, one "
                             f"FP8 scale per vector), got {self.dim}")
        if self.rope < 0 or self.rope % 2 or self.rope > self.dim:
            raise ValueError(f"lightning: rope (index dims under RoPE) must be even and in [0, dim={self.dim}], "
                             f"got {self.rope}")
        if self.steps < 0 or not self.lr > 0:
            raise ValueError(f"lightning: need steps >= 0 and lr > 0, got steps={self.steps}, lr={self.lr:g}")
        if "net" not in self.__dict__:  # build() re-runs __post_init__; the trained projections survive it
            self.net: LightningProjections | None = self._load(self.ckpt) if self.ckpt else None
            self.history: list[float] = []

    def fit(self, layers: Sequence[LayerTrace]) -> "Lightning":
        """Distil the projections from one layer's traces (KL to its dense attention); a loaded ckpt is kept."""
        if self.ckpt:
            log.info("%s: loaded from %s, not fitting again", self.spec, self.ckpt)
            return self
        if not layers or layers[0].hidden is None:
            raise ValueError("lightning: fit needs LayerTraces with hidden states (capture them with hidden=True)")
        hidden = layers[0].hidden
        # manual_seed seeds every device: fork them all, or a fit on the CPU would reset the CUDA generators
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
            torch.manual_seed(self.seed)
            net = LightningProjections(hidden.shape[-1], self.heads, self.dim, self.rope).to(hidden.device)
        self.history = distill(net, layers, self.steps, self.lr, self.seed)
        self.net = net
        self.fitted_layer = layers[0].layer
        return self

    def save(self, path: str | Path) -> Path:
        """Safetensors with the projections, and the architecture parameters in the metadata."""
        from safetensors.torch import save_file

        net = self._trained()
        metadata = {"format": CHECKPOINT_FORMAT, "hidden_size": str(net.hidden_size), "spec": self.spec}
        if self.fitted_layer is not None:
            metadata["layer"] = str(self.fitted_layer)
        metadata.update({key: str(getattr(self, key)) for key in ARCHITECTURE})
        state = {key: value.detach().cpu().contiguous() for key, value in net.state_dict().items()}
        return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))

    def _load(self, path: str) -> LightningProjections:
        from safetensors import safe_open

        if not Path(path).is_file():
            raise FileNotFoundError(f"lightning: no checkpoint at ckpt={path}; write one with Lightning.save(path)")
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                state = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
            raise ValueError(f"lightning: checkpoint {path} is unreadable (truncated or corrupt?): {err}; write it "
                             "again with Lightning.save(path)") from err
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"lightning: {path} is not a Lightning indexer checkpoint ({CHECKPOINT_FORMAT})")
        wrong = [f"{key}={metadata[key]} (spec says {getattr(self, key)})" for key in ARCHITECTURE
                 if int(metadata[key]) != getattr(self, key)]
        if wrong:
            raise ValueError(f"lightning: checkpoint {path} was trained with {', '.join(wrong)}; set these "
                             "parameters in the spec to the checkpoint's values")
        net = LightningProjections(int(metadata["hidden_size"]), self.heads, self.dim, self.rope)
        net.load_state_dict(state)
        self.fitted_layer = int(metadata["layer"]) if "layer" in metadata else None
        return net.eval()

    @property
    def fitted(self) -> bool:
        return self.net is not None

    def _trained(self) -> LightningProjections:
        self.require_fitted()
        return self.net

    def _index_keys(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        net = self._trained()
        if hidden.shape[-1] != net.hidden_size:
            raise ValueError(f"{self.spec} was trained on hidden size {net.hidden_size}, got {hidden.shape[-1]}")
        self.net = net.to(hidden.device)
        with torch.no_grad():
            return net.keys(hidden.float(), torch.arange(start, start + hidden.shape[1], device=hidden.device))

    def _build(self, hidden: torch.Tensor) -> None:
        self.index = IndexKeys(self._index_keys(hidden, 0), self.fp8, self.pow2)
        self.cost.index_bytes = self.index.nbytes()

    def _add(self, hidden: torch.Tensor) -> None:
        self.index.append(self._index_keys(hidden, self.n))
        self.cost.index_bytes = self.index.nbytes()

    def _search(self, hidden_q: torch.Tensor, k: int) -> torch.Tensor:
        positions = torch.arange(self.n - hidden_q.shape[1], self.n, device=hidden_q.device)
        with torch.no_grad():
            q, weights = self._trained().queries(hidden_q.float(), positions)
        query_bytes = self.heads * (self.index.bytes_per_vector + 4)  # index queries + their fp32 head weights
        self._charge(bytes_read=self.n * self.index.bytes_per_vector + query_bytes, keys_scored=0)
        return torch.topk(self.index.scores(q, weights), k, dim=-1).indices


@register
@dataclass
class LightningQK(Indexer):
    """Training-free: the model's own q and k through Lightning's scoring path, score ReLU(q . k) (one head, w = 1).

    ``relu=false`` scores q . k itself through the same FP8 path, as two heads (q, w = 1) and (-q, w = -1):
    ReLU(x) - ReLU(-x) = x. So ``lightning-qk:relu=false`` measures what FP8 alone costs, and ReLU's share is
    the difference (real models' logits are mostly negative, which ReLU flattens to ties at 0)."""

    fp8: bool = True
    pow2: bool = False
    relu: bool = True

    name = "lightning-qk"
    examples = ("lightning-qk", "lightning-qk:relu=false")

    def _build(self, keys: torch.Tensor) -> None:
        self.index = IndexKeys(keys.reshape(-1, *keys.shape[-2:]), self.fp8, self.pow2)
        self.cost.index_bytes = self.index.nbytes()

    def _add(self, keys: torch.Tensor) -> None:
        self.index.append(keys.reshape(-1, *keys.shape[-2:]))
        self.cost.index_bytes = self.index.nbytes()

    def _search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        q = queries.reshape(-1, queries.shape[-2], 1, queries.shape[-1])
        weights = torch.ones(q.shape[:-1], device=q.device)
        if not self.relu:
            q, weights = torch.cat([q, -q], dim=2), torch.cat([weights, -weights], dim=2)
        self._charge(bytes_read=(self.n + 1) * self.index.bytes_per_vector, keys_scored=0)
        scores = self.index.scores(q, weights)
        return torch.topk(scores, k, dim=-1).indices.reshape(*queries.shape[:-1], k)


__all__ = ["IndexKeys", "Lightning", "LightningProjections", "LightningQK", "apply_rope", "relu_weighted_scores"]
