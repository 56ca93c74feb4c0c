"""Parameter-free RMSNorm, rotary positions and causal self-attention over ternary projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .factory import make_linear


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension (no learned gain: no float state)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def rotary_tables(seq_len: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim / 2), computed on the fly (not buffers)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]). Shapes: x (B, H, T, hd), cos/sin (T, hd/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention: ternary q/k/v/o projections, rotary positions, torch SDPA.

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = rotary_tables(T, self.head_dim, self.rope_base, x.device)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

        q = apply_rotary(heads(self.q(x)), cos, sin)
        k = apply_rotary(heads(self.k(x)), cos, sin)
        y = F.scaled_dot_product_attention(q, k, heads(self.v(x)), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, self.dim))
