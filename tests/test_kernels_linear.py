"""Triton kernels of TernaryLinear against an fp64 layer built from the dequantised weights.

Each kernel test runs on two backends: ``interpreter`` (CPU tensors under TRITON_INTERPRET=1,
in a child process started by ``test_interpreter_suite``) and ``cuda`` (the compiled kernels,
skipped without a GPU). The launchers are called directly: the custom ops send CPU tensors to
the torch reference, so only a direct call exercises the kernels on CPU.

What is checked, on fresh random inputs: outputs and grad_input (assert_close against fp64),
every output element written (buffers poisoned with NaN before the launch), votes equal to
sign(dW) wherever |dW| is not a tie, E votes equal to sign(Σ_k dW·T), saturation at ±127, and
no vote from NaN/Inf gradients.
"""

from __future__ import annotations

import pytest
import torch
from conftest import dequantized, interpreting, run_interpreter_suite

from ternary_graph.ternary.packing import random_packed

BACKENDS = [pytest.param("interpreter", marks=pytest.mark.interpreter), pytest.param("cuda", marks=pytest.mark.cuda)]
SHAPES = [(1, 5), (3, 7), (17, 64), (33, 130), (64, 320)]  # (out_features N, in_features K)
LEADS = [(), (2,), (2, 3), (40,)]  # leading dims of x; (40,) takes the GEMM path
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _kernels():
    from ternary_graph.kernels import ternary_linear_triton

    return ternary_linear_triton


def _device(backend: str) -> str:
    return "cpu" if backend == "interpreter" else "cuda"


def _layer(n: int, k: int, gen: torch.Generator, device: str):
    packed = random_packed(n, k, generator=gen).to(device)
    E = torch.randint(-14, 6, (n,), generator=gen, dtype=torch.int8).to(device)
    return packed, E


def _tolerance(dtype: torch.dtype, ref: torch.Tensor, *, rounded_operand: bool = False) -> dict:
    """assert_close tolerances. Forward products x·t are exact (t in {-1,0,1}) and accumulate in
    fp32, so the dtype's default tolerances hold. grad_input rounds g·s to the 16-bit tile dtype
    before the tensor-core product: its error scales with the whole row, not with each element
    (about 2^-9·RMS typical for bf16, with tails to ~5σ over 10^5 elements), hence an atol tied
    to the reference's RMS: 2^-6·RMS for bf16, 2^-8·RMS for fp16."""
    rms = float(ref.double().pow(2).mean().sqrt()) if ref.numel() else 0.0
    if dtype == torch.float32:
        # fp32 sums of K terms differ from fp64 by a few ulps of the row's magnitude, which
        # exceeds 1e-5 absolute for long rows of large values
        return dict(rtol=1.3e-6, atol=max(1e-5, 1e-5 * rms))
    rtol = 1.6e-2 if dtype == torch.bfloat16 else 1e-3
    atol = (2.0**-6 if dtype == torch.bfloat16 else 2.0**-8) * rms if rounded_operand else 1e-5
    return dict(rtol=rtol, atol=max(atol, 1e-5))


def _paths(m: int) -> list[str]:
    common = ["auto", "dot", "gemm", "dequant"]
    return common + ["gemv_lut", "gemv_fma"] if m == 1 else common


BACKWARD_PATHS = ["dot", "plane", "dequant", "cublas"]


# ------------------------------------------------------------------------------------------------
# pure checks of the decode constants (no Triton needed)
# ------------------------------------------------------------------------------------------------
def test_fixed_point_decode_is_exact_for_every_byte():
    for b in range(243):
        q = (b * 17261 + 16383) >> 14
        assert q == -(-b * 256 // 243)  # ceil(b·256/243)
        digits = []
        for _ in range(5):
            t = q * 3
            digits.append(t >> 8)
            q = t & 255
        assert digits[::-1] == [(b // 3**i) % 3 for i in range(5)], b


def test_plane_divisor_magic_is_exact():
    for i, magic in enumerate((65536, 21846, 7282, 2428, 810)):
        for b in range(256):
            t = (b * magic) >> 16
            assert t == b // 3**i
            assert t - 3 * ((t * 21846) >> 16) == t % 3


def test_magic_float_decode():
    import struct

    for d in range(3):
        value = struct.unpack("<f", struct.pack("<I", 0x4B000000 | d))[0] - 8388609.0
        assert value == d - 1


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lead", LEADS)
def test_forward_fp32_every_path(backend, shape, lead, gen):
    _forward_case(backend, shape, lead, torch.float32, gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(2, 3), (40,)])
def test_forward_16bit_every_path(backend, shape, dtype, lead, gen):
    _forward_case(backend, shape, lead, dtype, gen)


def _forward_case(backend, shape, lead, dtype, gen):
    kernels = _kernels()
    device = _device(backend)
    n, k = shape
    packed, E = _layer(n, k, gen, device)
    x = torch.randn(*lead, k, generator=gen).to(device=device, dtype=dtype)
    x2d = x.reshape(-1, k)
    ref = (x2d.double().cpu() @ dequantized(packed, E, k).T).to(dtype)
    for path in _paths(x2d.shape[0]):
        out = torch.full((x2d.shape[0], n), float("nan"), dtype=dtype, device=device)
        y = kernels.forward_triton(x2d, packed, E, k, path=path, out=out)
        assert y.data_ptr() == out.data_ptr()
        assert torch.isfinite(y).all(), f"path={path}: unwritten (NaN-poisoned) outputs remain"
        torch.testing.assert_close(y.cpu(), ref, **_tolerance(dtype, ref), msg=lambda m: f"path={path}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_empty_batch_and_noncontiguous_input(backend, gen):
    kernels = _kernels()
    device = _device(backend)
    packed, E = _layer(9, 23, gen, device)
    assert kernels.forward_triton(torch.empty(0, 23, device=device), packed, E, 23).shape == (0, 9)
    wide = torch.randn(6, 46, generator=gen).to(device)
    x2d = wide[:, ::2]  # stride 2 along K
    ref = x2d.double().cpu() @ dequantized(packed, E, 23).T
    torch.testing.assert_close(kernels.forward_triton(x2d, packed, E, 23).double().cpu(), ref, rtol=1.3e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# backward: grad_input and the fused votes
# ------------------------------------------------------------------------------------------------
def _expected_votes(T0, Ea0, grad, x, packed, E, k, magnitude):
    """Reference votes and the mask of elements that are not ties (|dW| above rounding)."""
    from ternary_graph.ternary.packing import unpack_trits

    g, xd = grad.double().cpu(), x.double().cpu()
    dW = g.T @ xd
    bound = g.abs().T @ xd.abs()  # Σ_m |g||x|: fp32 accumulation error is a tiny fraction of it
    trits = unpack_trits(packed.cpu(), k).double()
    T_exp = (T0.cpu().int() + torch.sign(dW).int() * magnitude).clamp(-127, 127).to(torch.int8)
    t_decided = dW.abs() > 1e-4 * bound
    esum = (dW * trits).sum(1)
    Ea_exp = (Ea0.cpu().int() + torch.sign(esum).int() * magnitude).clamp(-127, 127).to(torch.int8)
    e_bound = (bound * trits.abs()).sum(1)
    # The "cublas" path rounds each dW element to the 16-bit dtype before summing Σ dW·T
    # (relative error <= 2^-8 per element): its E votes are decided only past that margin.
    rounding = 2.0**-7 if x.dtype in (torch.bfloat16, torch.float16) else 1e-4
    e_decided = esum.abs() > rounding * e_bound
    return T_exp, t_decided, Ea_exp, e_decided


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_grad_input_and_votes(backend, shape, lead, dtype, gen):
    if dtype != torch.float32 and lead != (2, 3):
        pytest.skip("16-bit dtypes run every path on leading shape (2, 3); fp32 covers the others")
    kernels = _kernels()
    device = _device(backend)
    n, k = shape
    packed, E = _layer(n, k, gen, device)
    x2d = torch.randn(*lead, k, generator=gen).to(device=device, dtype=dtype).reshape(-1, k)
    grad = torch.randn(x2d.shape[0], n, generator=gen).to(device=device, dtype=dtype)
    magnitude = 100  # with accumulators drawn over the whole int8 range, many votes saturate
    T0 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(device)
    Ea0 = torch.randint(-127, 128, (n,), generator=gen, dtype=torch.int8).to(device)
    ref = (grad.double().cpu() @ dequantized(packed, E, k)).to(dtype)
    T_exp, t_decided, Ea_exp, e_decided = _expected_votes(T0, Ea0, grad, x2d, packed, E, k, magnitude)
    for path in BACKWARD_PATHS:
        _check_backward(kernels, path, grad, x2d, packed, E, T0, Ea0, k, magnitude, ref,
                        (T_exp, t_decided, Ea_exp, e_decided))


def _check_backward(kernels, path, grad, x2d, packed, E, T0, Ea0, k, magnitude, ref, expected):
    T_exp, t_decided, Ea_exp, e_decided = expected
    T, Ea = T0.clone(), Ea0.clone()
    out = torch.full(tuple(x2d.shape), float("nan"), dtype=x2d.dtype, device=x2d.device)
    gi = kernels.backward_triton(grad, x2d, packed, E, T, Ea, k, magnitude, True, out=out, path=path)
    assert gi.data_ptr() == out.data_ptr() and torch.isfinite(gi).all(), f"path={path}: unwritten grad_input"
    torch.testing.assert_close(gi.cpu(), ref, **_tolerance(x2d.dtype, ref, rounded_operand=True),
                               msg=lambda m: f"path={path}: {m}")
    T, Ea = T.cpu(), Ea.cpu()
    assert torch.equal(T[t_decided], T_exp[t_decided]), f"path={path}: T votes differ from sign(dW)"
    # ties may vote either way (or not at all), but never beyond one vote
    assert ((T.int() - T0.cpu().int()).abs() <= magnitude).all()
    assert torch.equal(Ea[e_decided], Ea_exp[e_decided]), f"path={path}: E votes differ"
    assert T.abs().max() <= 127 and Ea.abs().max() <= 127
    if T0.numel() > 20 and magnitude >= 100:
        assert (T == 127).any() or (T == -127).any(), "expected some saturated accumulators"


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_without_input_grad_still_votes(backend, gen):
    kernels = _kernels()
    device = _device(backend)
    packed, E = _layer(17, 64, gen, device)
    x2d = torch.randn(6, 64, generator=gen).to(device)
    grad = torch.randn(6, 17, generator=gen).to(device)
    T, Ea = torch.zeros(17, 64, dtype=torch.int8, device=device), torch.zeros(17, dtype=torch.int8, device=device)
    assert kernels.backward_triton(grad, x2d, packed, E, T, Ea, 64, 1, False) is None
    T_exp, decided, Ea_exp, e_decided = _expected_votes(torch.zeros_like(T), torch.zeros_like(Ea), grad, x2d,
                                                        packed, E, 64, 1)
    assert torch.equal(T.cpu()[decided], T_exp[decided]) and decided.float().mean() > 0.99
    assert torch.equal(Ea.cpu()[e_decided], Ea_exp[e_decided])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_casts_no_vote(backend, bad, gen):
    kernels = _kernels()
    device = _device(backend)
    n, k = 33, 130
    packed, E = _layer(n, k, gen, device)
    x2d = torch.randn(5, k, generator=gen).to(device)
    grad = torch.randn(5, n, generator=gen)
    grad[2, 7] = bad  # poisons every dW[7, :] and the E vote of row 7
    grad = grad.to(device)
    T0 = torch.randint(-50, 50, (n, k), generator=gen, dtype=torch.int8).to(device)
    Ea0 = torch.randint(-50, 50, (n,), generator=gen, dtype=torch.int8).to(device)
    for path in BACKWARD_PATHS:
        T, Ea = T0.clone(), Ea0.clone()
        kernels.backward_triton(grad, x2d, packed, E, T, Ea, k, 1, True, path=path)
        assert torch.equal(T[7], T0[7]) and Ea[7] == Ea0[7], path
        others = torch.arange(n, device=device) != 7
        assert (T[others] != T0[others]).float().mean() > 0.99, path  # the finite rows still vote


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_empty_batch_casts_no_vote(backend, gen):
    kernels = _kernels()
    device = _device(backend)
    packed, E = _layer(7, 12, gen, device)
    T, Ea = torch.zeros(7, 12, dtype=torch.int8, device=device), torch.zeros(7, dtype=torch.int8, device=device)
    gi = kernels.backward_triton(torch.empty(0, 7, device=device), torch.empty(0, 12, device=device), packed, E,
                                 T, Ea, 12, 1, True)
    assert gi.shape == (0, 12) and not T.any() and not Ea.any()


# ------------------------------------------------------------------------------------------------
# larger, untuned shapes on the GPU (many tiles, ragged edges)
# ------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("m,n,k", [(1, 4099, 1003), (7, 257, 2049), (300, 1000, 999), (129, 77, 4101)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_untuned_shapes(m, n, k, dtype, gen):
    kernels = _kernels()
    packed, E = _layer(n, k, gen, "cuda")
    x2d = torch.randn(m, k, generator=gen).to(device="cuda", dtype=dtype)
    ref = (x2d.double().cpu() @ dequantized(packed, E, k).T).to(dtype)
    for path in _paths(m):
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        y = kernels.forward_triton(x2d, packed, E, k, path=path, out=out)
        assert torch.isfinite(y).all(), path
        torch.testing.assert_close(y.cpu(), ref, **_tolerance(dtype, ref), msg=lambda s: f"path={path}: {s}")
    grad = torch.randn(m, n, generator=gen).to(device="cuda", dtype=dtype)
    T0 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).cuda()
    Ea0 = torch.randint(-127, 128, (n,), generator=gen, dtype=torch.int8).cuda()
    gref = (grad.double().cpu() @ dequantized(packed, E, k)).to(dtype)
    expected = _expected_votes(T0, Ea0, grad, x2d, packed, E, k, 3)
    for path in BACKWARD_PATHS:
        _check_backward(kernels, path, grad, x2d, packed, E, T0, Ea0, k, 3, gref, expected)


@pytest.mark.cuda
def test_cuda_custom_op_dispatches_to_triton_and_compiles(gen):
    """TernaryLinear on CUDA goes through the kernels, eagerly and under torch.compile."""
    from ternary_graph.nn.linear import TernaryLinear

    torch.manual_seed(0)
    layer = TernaryLinear(130, 33, device="cuda")
    x = torch.randn(4, 3, 130, device="cuda", requires_grad=True)
    ref_w = dequantized(layer.weight.packed, layer.weight.E, 130)
    y = layer(x)
    torch.testing.assert_close(y.double().cpu(), x.detach().double().cpu() @ ref_w.T, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert layer.weight.T_accum.abs().sum() > 0
    compiled = torch.compile(layer)
    torch.testing.assert_close(compiled(x.detach()), layer(x.detach()))


# ------------------------------------------------------------------------------------------------
# bad input (no launch needed)
# ------------------------------------------------------------------------------------------------
def test_launchers_reject_bad_input(gen):
    kernels = _kernels()
    packed, E = _layer(4, 10, gen, "cpu")
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="in_features=11"):
        kernels.forward_triton(x, packed, E, 11)
    with pytest.raises(TypeError, match="int32"):
        kernels.forward_triton(x.to(torch.int32), packed, E, 10)
    with pytest.raises(ValueError, match="path"):
        kernels.forward_triton(x, packed, E, 10, path="fastest")
    with pytest.raises(ValueError, match="E must be int8"):
        kernels.forward_triton(x, packed, E.to(torch.int16), 10)
    with pytest.raises(ValueError, match="vote_magnitude"):
        kernels.backward_triton(torch.randn(3, 4), x, packed, E, torch.zeros(4, 10, dtype=torch.int8),
                                torch.zeros(4, dtype=torch.int8), 10, 0, True)
    with pytest.raises(ValueError, match="grad2d"):
        kernels.backward_triton(torch.randn(3, 5), x, packed, E, torch.zeros(4, 10, dtype=torch.int8),
                                torch.zeros(4, dtype=torch.int8), 10, 1, True)
    if not interpreting():
        with pytest.raises(ValueError, match="CUDA"):
            kernels.forward_triton(x, packed, E, 10)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="packed is on"):
            kernels.forward_triton(x.cuda(), packed, E.cuda(), 10)


def test_interpreter_suite():
    """Runs every ``interpreter`` test of this file in a TRITON_INTERPRET=1 child process."""
    if interpreting():
        pytest.skip("already inside the interpreter run")
    run_interpreter_suite(__file__)
