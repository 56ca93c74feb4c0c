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


def _inv_freq(head_dim: int, base: float, device: torch.device) -> torch.Tensor:
    return base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def rotary_tables(seq_len: int, head_dim: int, base: float, device: torch.device,
                  start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim / 2) for positions start .. start+seq_len-1,
    computed on the fly (not buffers). Integer positions are exact in float32, so a table with
    an offset equals the same rows of a longer table from 0."""
    inv_freq = _inv_freq(head_dim, base, device)
    angles = torch.outer(torch.arange(start, start + seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def rotary_at(position: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (1, head_dim / 2) for the position held in a 0-dim integer tensor, computed
    on its device (nothing is read on the host). The same float32 products as
    :func:`rotary_tables`, so the row equals that table's row at this position."""
    angles = position.to(torch.float32).reshape(1, 1) * _inv_freq(head_dim, base, position.device)[None]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]). Shapes: x (B, H, T, hd), cos/sin (T, hd/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


@dataclass
class KVCache:
    """Keys and values of one attention layer for incremental decoding.

    The buffers are preallocated to ``max_len`` positions, so every decode step writes into
    tensors of the same shape (the CUDA-graph decode step needs static shapes); ``length``
    counts the filled prefix on the host. It is a plain object, not a buffer: the model's
    ``state_dict`` keeps no float state.

    Two ways in: :meth:`append` (the ordinary forward: prefill, or any chunk) writes after
    ``length`` and advances it; :meth:`write_at` (the fixed-shape decode step) writes at a
    position held in a device tensor and leaves ``length`` alone, so that a captured step reads
    and changes no host state: its caller advances ``length`` after each step.

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

    def write_at(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one position's (B, H, 1, hd) keys/values at the index held in ``position`` (a
        0-dim int64 tensor on the cache's device); return the whole buffers (B, H, max_len, hd).

        Nothing is read on the host, so the caller must keep ``position < max_len`` (it knows the
        count: ``length``); past the end, ``index_copy_`` fails (a device-side assertion on CUDA).
        """
        if tuple(k.shape) != (self.k.shape[0], self.k.shape[1], 1, self.k.shape[3]) or k.shape != v.shape:
            raise ValueError(f"k and v must have shape (batch={self.k.shape[0]}, heads={self.k.shape[1]}, 1, "
                             f"head_dim={self.k.shape[3]}), got {tuple(k.shape)} and {tuple(v.shape)}")
        index = position.reshape(1)
        self.k.index_copy_(2, index, k.to(self.k.dtype))
        self.v.index_copy_(2, index, v.to(self.v.dtype))
        return self.k, self.v


@dataclass
class DecodeStep:
    """Where a fixed-shape one-token decode step writes and what it attends to, all on the device:
    built once per step from the position tensor and shared by every layer.

    Shapes: position () int64; cos, sin (1, head_dim / 2) float32; mask (1, max_len) bool, True
    for the keys the new token sees (positions <= position).
    """

    position: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def at(cls, position: torch.Tensor, head_dim: int, base: float, max_len: int) -> "DecodeStep":
        if not isinstance(position, torch.Tensor) or position.dim() != 0 or position.dtype != torch.int64:
            got = (f"dtype={position.dtype} shape={tuple(position.shape)}" if isinstance(position, torch.Tensor)
                   else type(position).__name__)
            raise ValueError(f"position must be a 0-dim int64 tensor, got {got}")
        cos, sin = rotary_at(position, head_dim, base)
        mask = (torch.arange(max_len, device=position.device) <= position)[None]
        return cls(position, cos, sin, mask)


def offset_causal_mask(q_len: int, start: int, device: torch.device) -> torch.Tensor:
    """(q_len, start + q_len) bool mask: query i (at position start + i) sees keys 0 .. start + i."""
    return torch.ones(q_len, start + q_len, dtype=torch.bool, device=device).tril(diagonal=start)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention: ternary q/k/v/o projections, rotary positions, torch SDPA.

    With a :class:`KVCache`, ``x`` holds the T positions after the cache's filled prefix:
    rotary positions start at ``cache.length``, the new keys/values are appended, and the
    queries attend over the whole prefix (prompt prefill, or any chunk of positions).

    With a :class:`DecodeStep` as well, ``x`` is one position (T = 1) at the step's device
    position: its key/value is written there (:meth:`KVCache.write_at`) and the query attends over
    the whole preallocated cache under the step's mask. Every shape is fixed and no host value
    is read or changed: this is the path the CUDA-graph decode step captures.

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

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, step: DecodeStep | None = None) -> torch.Tensor:
        if step is not None:
            return self._decode_step(x, cache, step)
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

    def _decode_step(self, x: torch.Tensor, cache: KVCache | None, step: DecodeStep) -> torch.Tensor:
        B, T, _ = x.shape
        if cache is None or T != 1:
            raise ValueError(f"a decode step takes one position (x of shape (batch, 1, dim)) and a KVCache, "
                             f"got x of shape {tuple(x.shape)} and cache={'None' if cache is None else 'a KVCache'}")

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, 1, self.n_heads, self.head_dim).transpose(1, 2)

        q = apply_rotary(heads(self.q(x)), step.cos, step.sin)
        k = apply_rotary(heads(self.k(x)), step.cos, step.sin)
        k_all, v_all = cache.write_at(k, heads(self.v(x)), step.position)
        # Keys past the position are stale or zero: the mask hides them, so the result is the
        # attention over the filled prefix.
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=step.mask)
        return self.o(y.transpose(1, 2).reshape(B, 1, self.dim))
