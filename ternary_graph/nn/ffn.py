"""SwiGLU feed-forward networks: ``TernarySwiGLU`` (one expert) and ``GroupedSwiGLU`` (all the
experts of a MoEGraph layer, stacked, one launch per projection)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .factory import make_linear
from .grouped import make_grouped_linear


class TernarySwiGLU(nn.Module):
    """``y = down(silu(gate(x)) * up(x))`` with every matrix ternary (``weights="float"``: the
    float baseline's nn.Linear layers of the same shapes).

    ``gate`` and ``up`` are one fused ``TernaryLinear(dim, 2 * hidden)`` (rows ``[0, hidden)``
    are the gate, rows ``[hidden, 2 * hidden)`` the up projection): every row has its own
    scale and its own votes, so the fusion is exactly two separate layers, but a routed expert
    launches two kernels instead of three, which matters when a MoE runs many small experts.

    Shapes:
        x: (*, dim) float32 / bfloat16 / float16 / float64
        returns: (*, dim), same dtype as x
    """

    def __init__(self, dim: int, hidden: int, *, weights: str = "ternary", zero_fraction: float | None = None,
                 device: torch.device | str | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        for arg, value in (("dim", dim), ("hidden", hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        self.dim, self.hidden = dim, hidden
        self.gate_up = make_linear(dim, 2 * hidden, weights, zero_fraction=zero_fraction, device=device,
                                   generator=generator)
        self.down = make_linear(hidden, dim, weights, zero_fraction=zero_fraction, device=device, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return self.down(F.silu(gate) * up)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}"


class GroupedSwiGLU(nn.Module):
    """The ``num_experts`` SwiGLU experts of a MoE layer, computed together on rows sorted by expert.

    ``gate_up`` and ``down`` are grouped linears (TernaryGroupedLinear, or FloatGroupedLinear for
    ``weights="float"``): expert e is exactly a :class:`TernarySwiGLU` whose matrices are group e
    of each. The experts are drawn in the order that ``num_experts`` separate TernarySwiGLU
    layers would draw them from the same generator, so a model keeps its initial weights.

    Shapes:
        x: (M, dim), rows sorted by expert; offsets: (num_experts,) cumulative row counts
        returns: (M, dim), x's dtype
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, *, weights: str = "ternary",
                 zero_fraction: float | None = None, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        for arg, value in (("num_experts", num_experts), ("dim", dim), ("hidden", hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.gate_up = make_grouped_linear(num_experts, dim, 2 * hidden, weights, zero_fraction=zero_fraction,
                                           device=device, generator=generator, draw_now=False)
        self.down = make_grouped_linear(num_experts, hidden, dim, weights, zero_fraction=zero_fraction,
                                        device=device, generator=generator, draw_now=False)
        for e in range(num_experts):
            self.gate_up.reset_group(e, generator)
            self.down.reset_group(e, generator)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x, offsets).split(self.hidden, dim=-1)
        return self.down(F.silu(gate) * up, offsets)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}"
