"""Grouped ternary experts: the stacked layer against the per-expert layers it replaces, and the
GPU path (dense bf16 stack + torch._grouped_mm + chunked dW votes) against the torch reference.

The GPU-path functions run on CPU tensors under TRITON_INTERPRET=1 (``interpreter`` tests, in
a child process started by ``test_interpreter_suite``) and on CUDA (``cuda`` tests).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import interpreting, run_interpreter_suite
from ternary_graph.kernels import grouped_linear as gl
from ternary_graph.nn import GroupedSwiGLU, TernaryGroupedLinear, TernarySwiGLU
from ternary_graph.ternary.packing import random_packed

BACKENDS = [pytest.param("interpreter", marks=pytest.mark.interpreter), pytest.param("cuda", marks=pytest.mark.cuda)]
# Per-expert row counts: empty experts, all rows on one expert, a single row, ragged counts.
COUNTS = [(0, 5, 0, 3), (9, 0, 0, 0), (0, 0, 0, 1), (4, 7, 1, 6), (0, 0, 0, 0)]


def _offsets(counts) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def _stack(groups: int, n: int, k: int, gen: torch.Generator, device: str = "cpu"):
    packed = random_packed(groups * n, k, generator=gen).to(device)
    E = torch.randint(-14, 6, (groups * n,), generator=gen, dtype=torch.int8).to(device)
    return packed, E


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("weights", ["ternary", "float"])
def test_grouped_swiglu_equals_per_expert_layers(counts, weights):
    """Same initial weights as one TernarySwiGLU per expert drawn from the same generator; outputs
    and input gradients equal to fp32 rounding (silu's vectorised and scalar tails differ in the
    last bit), votes equal except for ties that rounding can tip."""
    E, dim, hidden = len(counts), 12, 7  # 12 and 7: K not a multiple of 5
    torch.manual_seed(0)
    grouped = GroupedSwiGLU(E, dim, hidden, weights=weights, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    experts = [TernarySwiGLU(dim, hidden, weights=weights, generator=gen) for _ in range(E)]
    M = sum(counts)
    x = torch.randn(M, dim, generator=torch.Generator().manual_seed(6))
    w_out = torch.randn(M, dim, generator=torch.Generator().manual_seed(7))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = grouped(xa, _offsets(counts))
    ends = _offsets(counts).tolist()
    pieces = [experts[e](xb[a:b]) for e, (a, b) in enumerate(zip([0] + ends[:-1], ends)) if b > a]
    yb = torch.cat(pieces) if pieces else x.new_zeros(0, dim)
    torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
    (ya * w_out).sum().backward()
    if M:
        (yb * w_out).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for e in range(E):
        for mine, theirs in ((grouped.gate_up, experts[e].gate_up), (grouped.down, experts[e].down)):
            rows = slice(e * theirs.out_features, (e + 1) * theirs.out_features)
            if weights == "float":
                assert torch.equal(mine.weight[e], theirs.weight)
                continue
            for name in ("packed", "E"):
                assert torch.equal(getattr(mine.weight, name)[rows], getattr(theirs.weight, name)), (e, name)
            for name in ("T_accum", "E_accum"):
                same = getattr(mine.weight, name)[rows] == getattr(theirs.weight, name)
                assert same.float().mean() >= 0.98, (e, name)
    if weights == "ternary":
        assert (grouped.gate_up.weight.T_accum != 0).any() == (M > 0)


def test_grouped_linear_reference_matches_dense_math(gen):
    G, N, K = 3, 6, 11
    packed, E = _stack(G, N, K, gen)
    counts = (2, 0, 5)
    x = torch.randn(sum(counts), K, generator=gen, dtype=torch.float64)
    y = gl.grouped_forward_reference(x, packed, E, _offsets(counts), K)
    from conftest import dequantized
    W = dequantized(packed, E, K).view(G, N, K)
    ref = torch.cat([x[:2] @ W[0].T, x[2:] @ W[2].T])
    torch.testing.assert_close(y, ref)


def test_grouped_linear_rejects_bad_input(gen):
    layer = TernaryGroupedLinear(3, 10, 4, generator=gen)
    x = torch.randn(5, 10)
    with pytest.raises(ValueError, match=r"offsets must have shape \(3,\), got \(2,\)"):
        layer(x, torch.tensor([2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="in_features=10"):
        layer(torch.randn(5, 9), _offsets((1, 2, 2)))
    with pytest.raises(ValueError, match="num_groups must be a positive int, got 0"):
        TernaryGroupedLinear(0, 10, 4)
    with pytest.raises(ValueError, match="do not split into 5 groups"):
        gl.check_grouped_args(x, layer.weight.packed, torch.zeros(5, dtype=torch.int32), 10)


# ------------------------------------------------------------------------------------------------
# the GPU path against the reference (interpreter on CPU tensors, and CUDA)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("counts", COUNTS[:4])
@pytest.mark.parametrize("nk", [(16, 40), (8, 24)])
def test_gpu_path_matches_reference(backend, counts, nk, gen):
    device = "cpu" if backend == "interpreter" else "cuda"
    n, k = nk
    G = len(counts)
    packed, E = _stack(G, n, k, gen, device)
    M = sum(counts)
    offsets = _offsets(counts).to(device)
    x = torch.randn(M, k, generator=gen).to(device=device, dtype=torch.bfloat16)
    grad = torch.randn(M, n, generator=gen).to(device=device, dtype=torch.bfloat16)
    T0 = torch.randint(-120, 121, (G * n, k), generator=gen, dtype=torch.int8).to(device)
    Ea0 = torch.randint(-120, 121, (G * n,), generator=gen, dtype=torch.int8).to(device)
    assert gl.grouped_gemm_applies(x, n, k)

    y = gl.grouped_forward_gpu(x, packed, E, offsets, k)
    y_ref = gl.grouped_forward_reference(x.float().cpu(), packed.cpu(), E.cpu(), offsets.cpu(), k)
    torch.testing.assert_close(y.float().cpu(), y_ref, rtol=1.6e-2, atol=1e-2)

    T, Ea = T0.clone(), Ea0.clone()
    gi = gl.grouped_backward_gpu(grad, x, packed, E, T, Ea, offsets, k, 3, True)
    T_ref, Ea_ref = T0.cpu().clone(), Ea0.cpu().clone()
    gi_ref = gl.grouped_backward_reference(grad.double().cpu(), x.double().cpu(), packed.cpu(), E.cpu(), T_ref, Ea_ref,
                                           offsets.cpu(), k, 3, True)
    rms = float(gi_ref.pow(2).mean().sqrt()) if M else 0.0
    torch.testing.assert_close(gi.double().cpu(), gi_ref, rtol=1.6e-2, atol=max(2.0**-6 * rms, 1e-5))
    # T votes are sign(dW) exactly wherever dW is not a tie; groups without rows cast none.
    dW = torch.zeros(G * n, k, dtype=torch.float64)
    ends = offsets.tolist()
    for g, (a, b) in enumerate(zip([0] + ends[:-1], ends)):
        dW[g * n:(g + 1) * n] = grad[a:b].double().cpu().T @ x[a:b].double().cpu()
    decided = dW.abs() > 1e-3 * dW.abs().max().clamp(min=1e-30)
    assert torch.equal(T.cpu()[decided], T_ref[decided])
    assert ((T.cpu().int() - T0.cpu().int()).abs() <= 3).all()
    empty = [g for g, c in enumerate(counts) if c == 0]
    for g in empty:
        assert torch.equal(T.cpu()[g * n:(g + 1) * n], T0.cpu()[g * n:(g + 1) * n])
        assert torch.equal(Ea.cpu()[g * n:(g + 1) * n], Ea0.cpu()[g * n:(g + 1) * n])
    assert ((Ea.cpu().int() - Ea0.cpu().int()).abs() <= 3).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dw_votes_chunks_cover_every_row(backend, gen, monkeypatch):
    """A workspace smaller than the matrix: every row still votes exactly once."""
    device = "cpu" if backend == "interpreter" else "cuda"
    from ternary_graph.kernels import ternary_linear_triton as tri
    monkeypatch.setattr(tri, "DW_CHUNK_ELEMENTS", 8 * 24)  # 8 rows of 24 per chunk (16 for 2 groups)
    counts = (3, 4)
    G, n, k = 2, 24, 24
    packed, E = _stack(G, n, k, gen, device)
    x = torch.randn(sum(counts), k, generator=gen).to(device=device, dtype=torch.bfloat16)
    grad = torch.randn(sum(counts), n, generator=gen).to(device=device, dtype=torch.bfloat16)
    T = torch.zeros(G * n, k, dtype=torch.int8, device=device)
    Ea = torch.zeros(G * n, dtype=torch.int8, device=device)
    gl.grouped_cublas_votes_(grad, x, packed, T, Ea, _offsets(counts).to(device), 1)
    assert T.abs().max() == 1 and (T != 0).float().mean() > 0.95  # one vote each, nearly all decided


def test_interpreter_suite():
    """Runs every ``interpreter`` test of this file in a TRITON_INTERPRET=1 child process."""
    if interpreting():
        pytest.skip("already inside the interpreter run")
    run_interpreter_suite(__file__)
