"""Grouped linear layers: the stacked matrices of G experts, applied to rows sorted by expert.

``TernaryGroupedLinear`` keeps all G matrices in one TernaryState of G·out_features rows (one
optimizer launch for every expert); ``FloatGroupedLinear`` is its float-baseline counterpart, a
(G, out_features, in_features) parameter. Both take ``offsets``, the (G,) cumulative row counts
of the groups, as a device tensor: nothing reads it on the host on the GPU path.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..kernels.grouped_linear import TernaryGroupedLinearFunction, grouped_gemm_applies, grouped_linear_forward
from ..kernels.ternary_gemv import DecodeWeights
from ..ternary.state import TernaryState
from .factory import check_weights
from .linear import DecodeCopyHolder, check_activation, grad_anchor


def _check_sizes(num_groups: int, in_features: int, out_features: int) -> None:
    for arg, value in (("num_groups", num_groups), ("in_features", in_features), ("out_features", out_features)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")


class TernaryGroupedLinear(DecodeCopyHolder):
    """G ternary matrices ``y[r] = x[r] · (T_g ⊙ s_g)ᵀ`` for the rows r of group g.

    ``weight`` is one TernaryState of ``num_groups · out_features`` rows; group g owns rows
    ``g·out_features .. (g+1)·out_features - 1`` (:meth:`group_rows`). With ``draw_now=False``
    the trits start at zero and the owner draws each group with :meth:`reset_group`.
    :meth:`prepare_inference` adds a decode copy of the stack, as ``TernaryLinear`` does.

    Shapes:
        x: (M, in_features), rows sorted by group; offsets: (G,) int32/int64 cumulative counts
        returns: (M, out_features), x's dtype
    """

    def __init__(self, num_groups: int, in_features: int, out_features: int, *, zero_fraction: float | None = None,
                 device: torch.device | str | None = None, generator: torch.Generator | None = None,
                 draw_now: bool = True) -> None:
        super().__init__()
        _check_sizes(num_groups, in_features, out_features)
        self.num_groups, self.in_features, self.out_features = num_groups, in_features, out_features
        self.weight = TernaryState(num_groups * out_features, in_features, zero_fraction=zero_fraction,
                                   device=device, generator=generator, draw=draw_now)
        self.inference_copy: DecodeWeights | None = None  # transient, see prepare_inference

    def prepare_inference(self) -> None:
        """Build the decode copy of all groups' current weights (call in eval mode, after training)."""
        self.inference_copy = DecodeWeights.from_state(self.weight.packed, self.weight.E, self.in_features,
                                                       groups=self.num_groups)

    def group_rows(self, group: int) -> slice:
        return slice(group * self.out_features, (group + 1) * self.out_features)

    def reset_group(self, group: int, generator: torch.Generator | None = None) -> None:
        rows = self.group_rows(group)
        self.weight.reset_rows(rows.start, rows.stop, generator)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        check_activation(x, self.in_features, self.weight.packed.device)
        if x.dim() != 2:
            raise ValueError(f"x must have shape (M, in_features={self.in_features}), got {tuple(x.shape)}")
        if tuple(offsets.shape) != (self.num_groups,):
            raise ValueError(f"offsets must have shape ({self.num_groups},), got {tuple(offsets.shape)}")
        w = self.weight
        if not torch.is_grad_enabled():
            copy = self.inference_copy
            if copy is not None and not self.training and copy.applies(x):
                return copy(x, offsets)
            return grouped_linear_forward(x, w.packed, w.E, offsets, self.in_features)
        return TernaryGroupedLinearFunction.apply(x, grad_anchor(x), w.packed, w.E, w.T_accum, w.E_accum, offsets,
                                                  self.in_features, w.vote_magnitude)

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, in_features={self.in_features}, out_features={self.out_features}"


class FloatGroupedLinear(nn.Module):
    """Float counterpart: ``weight`` (G, out_features, in_features), each group initialised as an
    ``nn.Linear`` of that shape. On the GPU with bf16 activations it runs one
    ``torch._grouped_mm``; elsewhere one ``F.linear`` per non-empty group (host-read offsets)."""

    def __init__(self, num_groups: int, in_features: int, out_features: int, *,
                 device: torch.device | str | None = None, draw_now: bool = True) -> None:
        super().__init__()
        _check_sizes(num_groups, in_features, out_features)
        self.num_groups, self.in_features, self.out_features = num_groups, in_features, out_features
        self.weight = nn.Parameter(torch.zeros(num_groups, out_features, in_features, device=device))
        if draw_now:
            for g in range(num_groups):
                self.reset_group(g)

    def reset_group(self, group: int, generator: torch.Generator | None = None) -> None:
        # nn.Linear's own init, drawn from the global RNG as nn.Linear draws it
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight[group], a=math.sqrt(5))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (M, in_features={self.in_features}), got {tuple(x.shape)}")
        if tuple(offsets.shape) != (self.num_groups,):
            raise ValueError(f"offsets must have shape ({self.num_groups},), got {tuple(offsets.shape)}")
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if x.is_cuda and grouped_gemm_applies(x, self.out_features, self.in_features):
            return torch._grouped_mm(x, self.weight.to(x.dtype).transpose(1, 2), offs=offsets.to(torch.int32))
        if torch.compiler.is_compiling():
            return _grouped_linear_static(x, self.weight.to(x.dtype), offsets)
        ends = offsets.tolist()
        pieces = [F.linear(x[a:b], self.weight[g].to(x.dtype))
                  for g, (a, b) in enumerate(zip([0] + ends[:-1], ends)) if b > a]
        return torch.cat(pieces) if pieces else F.linear(x, self.weight[0].to(x.dtype))  # (0, N), in the graph

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, in_features={self.in_features}, out_features={self.out_features}"


def _grouped_linear_static(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The grouped product without reading ``offsets`` on the host (the host-read group slices
    would make a compiled graph recompile for every new split). Up to one row per group (a
    decode step) each row is multiplied by its own group's matrix, gathered; more rows cost one
    masked product per group. Shapes: x (M, K), weight (G, N, K), offsets (G,) -> (M, N)."""
    rows = torch.arange(x.shape[0], device=x.device)
    group = torch.searchsorted(offsets.to(torch.int64), rows, right=True)  # (M,); offsets' last is M
    if x.shape[0] <= weight.shape[0]:
        return torch.bmm(weight[group], x.unsqueeze(-1)).squeeze(-1)
    out = x.new_zeros(x.shape[0], weight.shape[1])
    for g in range(weight.shape[0]):
        out = out + (group == g).unsqueeze(-1).to(x.dtype) * F.linear(x, weight[g])
    return out


def make_grouped_linear(num_groups: int, in_features: int, out_features: int, weights: str = "ternary", *,
                        zero_fraction: float | None = None, device: torch.device | str | None = None,
                        generator: torch.Generator | None = None, draw_now: bool = True) -> nn.Module:
    """TernaryGroupedLinear, or FloatGroupedLinear for ``weights='float'``."""
    if check_weights(weights) == "float":
        return FloatGroupedLinear(num_groups, in_features, out_features, device=device, draw_now=draw_now)
    return TernaryGroupedLinear(num_groups, in_features, out_features, zero_fraction=zero_fraction, device=device,
                                generator=generator, draw_now=draw_now)
