"""Parameter-free RMSNorm, rotary positions and causal self-attention over ternary projections."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .factory import make_linear


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension (no learned gain: no float state).

    The reduction runs in float32 whatever ``x``'s dtype; the result has ``x``'s dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)


def rotary_tables(seq_len: int, head_dim: int, base: float, device: torch.device,
                  start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim / 2) for positions start .. start+seq_len-1,
    computed on the fly (not buffers). Integer positions are exact in float32, so a table with
    an offset equals the same rows of a longer table from 0."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(start, start + seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]). Shapes: x (B, H, T, hd), cos/sin (T, hd/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


@dataclass
class KVCache:
    """Keys and values of one attention layer for incremental decoding.

    The buffers are preallocated to ``max_len`` positions, so every decode step writes into
    tensors of the same shape (a later CUDA-graph decode step needs static shapes); ``length``
    counts the filled prefix. It is a plain object, not a buffer: the model's ``state_dict``
    keeps no float state.

    Shapes: k, v (B, n_heads, max_len, head_dim) in the activation dtype.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, n_heads: int, max_len: int, head_dim: int, *, dtype: torch.dtype,
              device: torch.device | str) -> "KVCache":
        shape = (batch, n_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H, T, hd) keys/values after the filled prefix; return views of all filled
        positions (B, H, length, hd)."""
        start, T = self.length, k.shape[2]
        if k.shape[0] != self.k.shape[0]:
            raise ValueError(f"batch size {k.shape[0]} does not match the KV cache's batch size {self.k.shape[0]}")
        if start + T > self.max_len:
            raise ValueError(f"KV cache holds {start} positions; {T} more exceed its max_len={self.max_len}")
        self.k[:, :, start:start + T] = k
        self.v[:, :, start:start + T] = v
        self.length = start + T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


def offset_causal_mask(q_len: int, start: int, device: torch.device) -> torch.Tensor:
    """(q_len, start + q_len) bool mask: query i (at position start + i) sees keys 0 .. start + i."""
    return torch.ones(q_len, start + q_len, dtype=torch.bool, device=device).tril(diagonal=start)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention: ternary q/k/v/o projections, rotary positions, torch SDPA.

    With a :class:`KVCache`, ``x`` holds the T positions after the cache's filled prefix:
    rotary positions start at ``cache.length``, the new keys/values are appended, and the
    queries attend over the whole prefix (prompt prefill, then one position per decode step).

    Shapes:
        x: (B, T, dim) -> (B, T, dim)
    """

    def __init__(self, dim: int, n_heads: int, *, rope_base: float = 10_000.0, weights: str = "ternary",
                 device=None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if dim % n_heads or (dim // n_heads) % 2:
            raise ValueError(f"n_heads={n_heads} must divide dim={dim} into an even head dim")
        self.dim, self.n_heads, self.head_dim, self.rope_base = dim, n_heads, dim // n_heads, rope_base
        self.q, self.k, self.v, self.o = (make_linear(dim, dim, weights, device=device, generator=generator)
                                          for _ in range(4))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        start = 0 if cache is None else cache.length
        cos, sin = rotary_tables(T, self.head_dim, self.rope_base, x.device, start=start)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

        q = apply_rotary(heads(self.q(x)), cos, sin)
        k = apply_rotary(heads(self.k(x)), cos, sin)
        v = heads(self.v(x))
        if cache is not None:
            k, v = cache.append(k, v)
        if start == 0:  # no prefix: plain causal attention, the same call as training
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:  # one new position sees the whole prefix: no mask
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # is_causal aligns the mask top-left, which is wrong when keys outnumber queries
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=offset_causal_mask(T, start, x.device))
        return self.o(y.transpose(1, 2).reshape(B, T, self.dim))
