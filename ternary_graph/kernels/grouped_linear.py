"""Grouped ternary linear: the stacked matrices of G experts applied to rows sorted by expert.

    y[r] = x[r] · (T_g ⊙ s_g)ᵀ   for the rows r of group g: offsets[g-1] <= r < offsets[g]

``packed`` is (G·N, ceil(K/5)): group g owns state rows g·N .. g·N + N - 1 (one TernaryState
for all experts, so the optimizer steps them in one launch). ``offsets`` (G,) holds the
cumulative row counts and stays on the device: no host sync decides how many rows a group has.

Layers:
  * plain-torch references ``grouped_forward_reference`` / ``grouped_backward_reference``: one
    ``linear_*_reference`` per non-empty group (the CPU path and the oracle; they read the
    offsets on the host);
  * the GPU path (``grouped_forward_gpu`` / ``grouped_backward_gpu``): a transient dense bf16 stack of the G
    matrices (``dequantize_triton``) and ``torch._grouped_mm`` for the output and grad_input;
    dW by ``torch._grouped_mm`` in bounded row chunks, each cast into votes by the Triton
    epilogue ``dw_votes_`` (no dW of a whole expert stack ever exists). It needs bf16
    activations and N, K multiples of 8 (16-byte rows); other inputs take the per-group
    Triton kernels, which read the offsets on the host;
  * ``torch.library`` custom ops with fake implementations, and ``TernaryGroupedLinearFunction``.
"""

from __future__ import annotations

import torch

from ..ternary.packing import packed_cols
from .ternary_linear import _triton_module
from .ternary_linear_reference import linear_backward_reference, linear_forward_reference


def check_grouped_args(x2d: torch.Tensor, packed: torch.Tensor, offsets: torch.Tensor, in_features: int) -> int:
    """Validate shapes (never values: that would sync the host); returns the group count G."""
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.dtype not in (torch.int32, torch.int64):
        got = f"dtype={offsets.dtype} shape={tuple(offsets.shape)}" if isinstance(offsets, torch.Tensor) \
            else type(offsets).__name__
        raise ValueError(f"offsets must be a 1-D int32/int64 tensor of cumulative row counts, got {got}")
    groups = offsets.shape[0]
    if groups < 1 or packed.shape[0] % groups:
        raise ValueError(f"packed has {packed.shape[0]} rows, which do not split into {groups} groups (offsets)")
    if x2d.dim() != 2 or x2d.shape[1] != in_features:
        raise ValueError(f"x must have shape (M, in_features={in_features}), got {tuple(x2d.shape)}")
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != packed_cols(in_features):
        raise ValueError(f"packed must be uint8 of shape (G*N, {packed_cols(in_features)}), "
                         f"got dtype={packed.dtype} shape={tuple(packed.shape)}")
    return groups


def _group_bounds(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    """(group, start, stop) of every non-empty group (reads the offsets on the host)."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    return [(g, a, b) for g, (a, b) in enumerate(zip(starts, ends)) if b > a]


def grouped_forward_reference(x2d: torch.Tensor, packed: torch.Tensor, E: torch.Tensor, offsets: torch.Tensor,
                              in_features: int) -> torch.Tensor:
    """Shapes: x2d (M, K) rows sorted by group, packed (G·N, ceil(K/5)), E (G·N,), offsets (G,) -> (M, N)."""
    G = offsets.shape[0]
    N = packed.shape[0] // G
    y = x2d.new_zeros(x2d.shape[0], N)
    for g, a, b in _group_bounds(offsets):
        rows = slice(g * N, (g + 1) * N)
        y[a:b] = linear_forward_reference(x2d[a:b], packed[rows], E[rows], in_features)
    return y


def grouped_backward_reference(grad2d: torch.Tensor, x2d: torch.Tensor, packed: torch.Tensor, E: torch.Tensor,
                               T_accum: torch.Tensor, E_accum: torch.Tensor, offsets: torch.Tensor, in_features: int,
                               vote_magnitude: int, needs_input_grad: bool) -> torch.Tensor | None:
    """grad_input (M, K) or None; each non-empty group votes into its own rows of T_accum / E_accum."""
    G = offsets.shape[0]
    N = packed.shape[0] // G
    grad_input = x2d.new_zeros(x2d.shape) if needs_input_grad else None
    for g, a, b in _group_bounds(offsets):
        rows = slice(g * N, (g + 1) * N)
        gi = linear_backward_reference(grad2d[a:b], x2d[a:b], packed[rows], E[rows], T_accum[rows], E_accum[rows],
                                       in_features, vote_magnitude, needs_input_grad)
        if grad_input is not None:
            grad_input[a:b] = gi
    return grad_input


def grouped_gemm_applies(x2d: torch.Tensor, out_features: int, in_features: int) -> bool:
    """Whether the torch._grouped_mm path takes these inputs (else the per-group kernels do)."""
    return (x2d.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and out_features % 8 == 0
            and in_features % 8 == 0)


def _dense_stack(packed: torch.Tensor, E: torch.Tensor, groups: int, in_features: int) -> torch.Tensor:
    """Transient (G, N, K) bf16 weights T ⊙ s of every group."""
    w = _triton_module().dequantize_triton(packed, E, in_features, torch.bfloat16)
    return w.view(groups, packed.shape[0] // groups, in_features)


def grouped_forward_gpu(x2d: torch.Tensor, packed: torch.Tensor, E: torch.Tensor, offsets: torch.Tensor,
                 in_features: int) -> torch.Tensor:
    G = offsets.shape[0]
    N = packed.shape[0] // G
    if not grouped_gemm_applies(x2d, N, in_features):
        tri = _triton_module()
        y = x2d.new_zeros(x2d.shape[0], N)
        for g, a, b in _group_bounds(offsets):
            rows = slice(g * N, (g + 1) * N)
            y[a:b] = tri.forward_triton(x2d[a:b], packed[rows], E[rows], in_features)
        return y
    w = _dense_stack(packed, E, G, in_features)
    return torch._grouped_mm(x2d, w.transpose(1, 2), offs=offsets.to(torch.int32))


def grouped_cublas_votes_(grad2d: torch.Tensor, x2d: torch.Tensor, packed: torch.Tensor, T_accum: torch.Tensor,
                          E_accum: torch.Tensor, offsets: torch.Tensor, vote_magnitude: int) -> None:
    """Votes of every group's dW_g = grad_gᵀ·x_g, from ``torch._grouped_mm`` in chunks of rows.

    A chunk is rows n0..n0+r of every group at once, (G, r, K): at most DW_CHUNK_ELEMENTS
    elements of transient workspace. Groups without rows get dW = 0 and cast no vote.
    """
    tri = _triton_module()
    G = offsets.shape[0]
    M, K = x2d.shape
    N = packed.shape[0] // G
    offs = offsets.to(torch.int32)
    chunk = tri.dw_chunk_rows(N, G * K)
    for n0 in range(0, N, chunk):
        r = min(chunk, N - n0)
        dw = torch._grouped_mm(grad2d[:, n0:n0 + r].t(), x2d, offs=offs)  # (G, r, K)
        tri.dw_votes_(dw.view(G * r, K), packed, T_accum, E_accum, vote_magnitude, rows_per_group=r,
                      group_rows=N, row0=n0)


def grouped_backward_gpu(grad2d: torch.Tensor, x2d: torch.Tensor, packed: torch.Tensor, E: torch.Tensor,
                  T_accum: torch.Tensor, E_accum: torch.Tensor, offsets: torch.Tensor, in_features: int,
                  vote_magnitude: int, needs_input_grad: bool) -> torch.Tensor | None:
    G = offsets.shape[0]
    N = packed.shape[0] // G
    grad2d = grad2d.to(x2d.dtype).contiguous()
    if not grouped_gemm_applies(x2d, N, in_features):
        tri = _triton_module()
        grad_input = x2d.new_zeros(x2d.shape) if needs_input_grad else None
        for g, a, b in _group_bounds(offsets):
            rows = slice(g * N, (g + 1) * N)
            gi = tri.backward_triton(grad2d[a:b], x2d[a:b], packed[rows], E[rows], T_accum[rows], E_accum[rows],
                                     in_features, vote_magnitude, needs_input_grad)
            if grad_input is not None:
                grad_input[a:b] = gi
        return grad_input
    grad_input = None
    if needs_input_grad:
        w = _dense_stack(packed, E, G, in_features)
        grad_input = torch._grouped_mm(grad2d, w, offs=offsets.to(torch.int32))
    if x2d.shape[0]:
        grouped_cublas_votes_(grad2d, x2d.contiguous(), packed, T_accum, E_accum, offsets, vote_magnitude)
    return grad_input


@torch.library.custom_op("ternary_graph::grouped_linear_forward", mutates_args=())
def grouped_linear_forward(x: torch.Tensor, packed: torch.Tensor, E: torch.Tensor, offsets: torch.Tensor,
                           in_features: int) -> torch.Tensor:
    if x.is_cuda:
        return grouped_forward_gpu(x, packed, E, offsets, in_features)
    return grouped_forward_reference(x, packed, E, offsets, in_features)


@grouped_linear_forward.register_fake
def _(x, packed, E, offsets, in_features):
    return x.new_empty(x.shape[0], packed.shape[0] // offsets.shape[0])


@torch.library.custom_op("ternary_graph::grouped_linear_backward", mutates_args=("T_accum", "E_accum"))
def grouped_linear_backward(grad_out: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, E: torch.Tensor,
                            T_accum: torch.Tensor, E_accum: torch.Tensor, offsets: torch.Tensor, in_features: int,
                            vote_magnitude: int, needs_input_grad: bool) -> torch.Tensor:
    """Returns grad_input (M, K), or an empty (0,) tensor when it is not needed."""
    fn = grouped_backward_gpu if x.is_cuda else grouped_backward_reference
    gi = fn(grad_out, x, packed, E, T_accum, E_accum, offsets, in_features, vote_magnitude, needs_input_grad)
    return gi if gi is not None else x.new_empty(0)


@grouped_linear_backward.register_fake
def _(grad_out, x, packed, E, T_accum, E_accum, offsets, in_features, vote_magnitude, needs_input_grad):
    return torch.empty_like(x) if needs_input_grad else x.new_empty(0)


class TernaryGroupedLinearFunction(torch.autograd.Function):
    """autograd glue; ``anchor`` and the accumulators as in ``TernaryLinearFunction``."""

    @staticmethod
    def forward(ctx, x, anchor, packed, E, T_accum, E_accum, offsets, in_features: int, vote_magnitude: int):
        ctx.save_for_backward(x, packed, E, offsets)
        ctx.accumulators = (T_accum, E_accum)
        ctx.in_features, ctx.vote_magnitude = in_features, vote_magnitude
        return grouped_linear_forward(x, packed, E, offsets, in_features)

    @staticmethod
    def backward(ctx, grad_out):
        x, packed, E, offsets = ctx.saved_tensors
        T_accum, E_accum = ctx.accumulators
        needs = bool(ctx.needs_input_grad[0])
        gi = grouped_linear_backward(grad_out.contiguous(), x, packed, E, T_accum, E_accum, offsets,
                                     ctx.in_features, ctx.vote_magnitude, needs)
        return (gi if needs else None), None, None, None, None, None, None, None, None
