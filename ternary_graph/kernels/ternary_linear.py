"""y = x · (T ⊙ s)ᵀ over packed trits, with a backward that turns dW into int8 votes.

Layers (as in every kernel file):
  * plain-torch references ``linear_forward_reference`` / ``linear_backward_reference``: the
    CPU path and the test oracle, in ``ternary_linear_reference.py`` (imported by this file and
    by the Triton launchers, so that neither imports the other at module level);
  * Triton kernels and their launchers (``_forward_triton`` / ``_backward_triton``) for CUDA
    tensors, in ``ternary_linear_triton.py`` (imported lazily, only when a CUDA tensor arrives);
  * ``torch.library`` custom ops ``ternary_graph::linear_forward`` / ``linear_backward`` with
    fake (meta) implementations, so ``torch.compile`` traces through them;
  * ``TernaryLinearFunction``, the autograd.Function that ``nn.TernaryLinear`` applies.

The weight gradient never leaves this file as a tensor: backward casts ``sign(dW)`` votes into
``T_accum`` and ``sign(Σ_k dW·T)`` votes into ``E_accum`` (saturating at ±127). Elements whose
gradient is NaN or ±Inf cast no vote.
"""

from __future__ import annotations

import torch

from .ternary_linear_reference import linear_backward_reference, linear_forward_reference


def _triton_module():
    # Imported on first CUDA use: CPU-only installs never need a working Triton.
    from . import ternary_linear_triton
    return ternary_linear_triton


@torch.library.custom_op("ternary_graph::linear_forward", mutates_args=())
def linear_forward(x: torch.Tensor, packed: torch.Tensor, E: torch.Tensor, in_features: int) -> torch.Tensor:
    x2d = x.reshape(-1, in_features)
    if x.is_cuda:
        y2d = _triton_module().forward_triton(x2d, packed, E, in_features)
    else:
        y2d = linear_forward_reference(x2d, packed, E, in_features)
    return y2d.reshape(*x.shape[:-1], packed.shape[0])


@linear_forward.register_fake
def _(x, packed, E, in_features):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


@torch.library.custom_op("ternary_graph::linear_backward", mutates_args=("T_accum", "E_accum"))
def linear_backward(grad_out: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, E: torch.Tensor,
                    T_accum: torch.Tensor, E_accum: torch.Tensor, in_features: int, vote_magnitude: int,
                    needs_input_grad: bool) -> torch.Tensor:
    """Returns grad_input shaped like x, or an empty (0,) tensor when it is not needed."""
    x2d = x.reshape(-1, in_features)
    grad2d = grad_out.reshape(-1, packed.shape[0])
    if x.is_cuda:
        gi = _triton_module().backward_triton(grad2d, x2d, packed, E, T_accum, E_accum, in_features,
                                               vote_magnitude, needs_input_grad)
    else:
        gi = linear_backward_reference(grad2d, x2d, packed, E, T_accum, E_accum, in_features,
                                       vote_magnitude, needs_input_grad)
    return gi.reshape(x.shape) if gi is not None else x.new_empty(0)


@linear_backward.register_fake
def _(grad_out, x, packed, E, T_accum, E_accum, in_features, vote_magnitude, needs_input_grad):
    return torch.empty_like(x) if needs_input_grad else x.new_empty(0)


class TernaryLinearFunction(torch.autograd.Function):
    """autograd glue. ``anchor`` is a zero-size tensor that requires grad, so that backward (and
    with it the votes) runs even when ``x`` itself needs no gradient, e.g. a first layer."""

    @staticmethod
    def forward(ctx, x, anchor, packed, E, T_accum, E_accum, in_features: int, vote_magnitude: int):
        ctx.save_for_backward(x, packed, E)
        # Accumulators are not saved through save_for_backward: a state used twice in one
        # graph (a shared codebook) is voted into by the first backward before the second runs.
        ctx.accumulators = (T_accum, E_accum)
        ctx.in_features, ctx.vote_magnitude = in_features, vote_magnitude
        return linear_forward(x, packed, E, in_features)

    @staticmethod
    def backward(ctx, grad_out):
        x, packed, E = ctx.saved_tensors
        T_accum, E_accum = ctx.accumulators
        needs = bool(ctx.needs_input_grad[0])
        grad_input = linear_backward(grad_out.contiguous(), x, packed, E, T_accum, E_accum, ctx.in_features,
                                     ctx.vote_magnitude, needs)
        return (grad_input if needs else None), None, None, None, None, None, None, None
