"""Sparse gather of ternary rows and sparse votes back into them.

Forward decodes only the requested rows; backward sums the gradient of duplicate ids per
unique row, casts one ``sign`` vote per trit of each touched row into ``T_accum`` (and one per
row into ``E_accum``) and records the rows for the sparse update step. Everything is plain
torch (gather / index_add), which is already bandwidth-bound on both CPU and CUDA; the cost
grows with the number of ids, never with the table.
"""

from __future__ import annotations

import torch

from ..ternary.packing import unpack_trits
from ..ternary.saturating import saturating_add
from ..ternary.state import exponent_to_scale
from .ternary_linear_reference import sign_votes


def gather_rows_reference(packed: torch.Tensor, E: torch.Tensor, rows: torch.Tensor, cols: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """Shapes: packed (R, ceil(cols/5)) uint8, E (R,) int8, rows (n,) int64 -> (n, cols) dtype."""
    if rows.numel() == 0:  # unpack_trits cannot reshape zero rows
        return torch.empty(0, cols, dtype=dtype, device=packed.device)
    trits = unpack_trits(packed.index_select(0, rows), cols)
    return trits.to(dtype) * exponent_to_scale(E.index_select(0, rows), dtype)[:, None]


def scatter_votes_(grad: torch.Tensor, rows: torch.Tensor, packed: torch.Tensor, T_accum: torch.Tensor,
                   E_accum: torch.Tensor, cols: int, vote_magnitude: int) -> torch.Tensor:
    """Cast the votes of ``grad`` (n, cols) for ``rows`` (n,); returns the rows touched.

    Duplicate ids are summed first (in fp32, in their original order), then one saturating
    ``sign`` vote per trit. Every shape here is fixed by n, so nothing reads a device value on
    the host: the returned (n,) int64 tensor holds the distinct ids, ascending, then -1 padding.
    """
    n = rows.numel()
    if n == 0:
        return rows.new_empty(0)
    sorted_rows, order = torch.sort(rows, stable=True)
    first = torch.ones(n, dtype=torch.bool, device=rows.device)
    first[1:] = sorted_rows[1:] != sorted_rows[:-1]
    run = torch.cumsum(first, 0) - 1  # which distinct id each sorted entry belongs to
    summed = torch.zeros(n, cols, dtype=torch.float32, device=grad.device)
    summed.index_add_(0, run, grad.index_select(0, order).to(torch.float32))
    unique = torch.full((n,), -1, dtype=torch.long, device=rows.device).scatter_(0, run, sorted_rows)
    valid = unique >= 0
    # Padding entries point at unique[0] and carry its new values: the copies below write every
    # row once in effect, with no host-side count of the distinct ids.
    target = torch.where(valid, unique, unique[0])
    trits = unpack_trits(packed.index_select(0, target), cols).to(torch.float32)
    t_new = saturating_add(T_accum.index_select(0, target), sign_votes(summed, vote_magnitude))
    e_new = saturating_add(E_accum.index_select(0, target), sign_votes((summed * trits).sum(dim=1), vote_magnitude))
    T_accum.index_copy_(0, target, torch.where(valid[:, None], t_new, t_new[0]))
    E_accum.index_copy_(0, target, torch.where(valid, e_new, e_new[0]))
    return unique


class TernaryGatherFunction(torch.autograd.Function):
    """autograd glue for the sparse gather; ``anchor`` as in TernaryLinearFunction."""

    @staticmethod
    def forward(ctx, rows, anchor, state, dtype):
        ctx.rows, ctx.state = rows, state
        return gather_rows_reference(state.packed, state.E, rows, state.cols, dtype)

    @staticmethod
    def backward(ctx, grad):
        s = ctx.state
        touched = scatter_votes_(grad, ctx.rows, s.packed, s.T_accum, s.E_accum, s.cols, s.vote_magnitude)
        s.mark_touched_rows(touched)
        return None, None, None, None
