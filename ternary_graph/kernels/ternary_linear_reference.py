"""Plain-torch references of ``y = x · (T ⊙ s)ᵀ`` and of its voting backward.

The CPU path of the ternary linear ops and the oracle of every kernel test. Kept apart from the
custom ops (``ternary_linear.py``) and the Triton launchers (``ternary_linear_triton.py``) so
that both import it and neither imports the other at module level: no import cycle.
"""

from __future__ import annotations

import torch

from ..ternary.packing import unpack_trits
from ..ternary.saturating import saturating_add_
from ..ternary.state import exponent_to_scale

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_forward_reference(x2d: torch.Tensor, packed: torch.Tensor, E: torch.Tensor, in_features: int) -> torch.Tensor:
    """Shapes: x2d (M, K), packed (N, ceil(K/5)) uint8, E (N,) int8 -> (M, N) in x2d.dtype."""
    cdt = _compute_dtype(x2d.dtype)
    weight = unpack_trits(packed, in_features).to(cdt)
    return ((x2d.to(cdt) @ weight.T) * exponent_to_scale(E, cdt)).to(x2d.dtype)


def sign_votes(grad: torch.Tensor, magnitude: int) -> torch.Tensor:
    """int32 votes ``sign(grad) * magnitude``; NaN/Inf entries vote 0."""
    finite = torch.isfinite(grad)
    return (torch.sign(torch.where(finite, grad, torch.zeros_like(grad))) * magnitude).to(torch.int32)


def linear_backward_reference(grad2d: torch.Tensor, x2d: torch.Tensor, packed: torch.Tensor, E: torch.Tensor,
                              T_accum: torch.Tensor, E_accum: torch.Tensor, in_features: int,
                              vote_magnitude: int, needs_input_grad: bool) -> torch.Tensor | None:
    """Returns grad_input (M, K) or None; adds votes into ``T_accum`` (N, K) and ``E_accum`` (N,)."""
    cdt = _compute_dtype(x2d.dtype)
    trits = unpack_trits(packed, in_features).to(cdt)
    scale = exponent_to_scale(E, cdt)
    grad = grad2d.to(cdt)
    grad_input = ((grad * scale) @ trits).to(x2d.dtype) if needs_input_grad else None
    dW = grad.T @ x2d.to(cdt)  # gradient w.r.t. the effective weight s·T; same sign as w.r.t. T
    saturating_add_(T_accum, sign_votes(dW, vote_magnitude))
    saturating_add_(E_accum, sign_votes((dW * trits).sum(dim=1), vote_magnitude))
    return grad_input
