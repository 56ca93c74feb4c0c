"""TernaryLinear through its CPU (torch reference) path: maths, votes, state hygiene, compile,
bad input, and a learning test."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import dequantized
from torch import nn

from ternary_graph.kernels.ternary_linear_reference import linear_backward_reference, linear_forward_reference
from ternary_graph.nn.linear import TernaryLinear
from ternary_graph.ternary.optimizer import TernaryOptimizer, UpdateRule
from ternary_graph.ternary.packing import unpack_trits

SHAPES = [(5, 1), (7, 3), (64, 17), (130, 33), (320, 64)]  # (in_features, out_features)
LEADS = [(), (2,), (2, 3)]


def _layer(k: int, n: int, seed: int = 0) -> TernaryLinear:
    layer = TernaryLinear(k, n, generator=torch.Generator().manual_seed(seed))
    # spread the row scales so that a wrong per-row scale cannot pass unnoticed
    layer.weight.E.copy_(torch.randint(-14, 6, (n,), generator=torch.Generator().manual_seed(seed + 1)))
    return layer


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_output_and_grad_input_match_fp64_dequantised_layer(shape, lead, dtype, gen):
    k, n = shape
    layer = _layer(k, n)
    w = dequantized(layer.weight.packed, layer.weight.E, k)
    x = torch.randn(*lead, k, generator=gen).to(dtype).requires_grad_(True)
    y = layer(x)
    assert y.shape == (*lead, n) and y.dtype == dtype
    ref = (x.detach().double() @ w.T).to(dtype)
    tol = {} if dtype != torch.float32 else dict(rtol=1.3e-6, atol=1e-5 * max(1.0, float(ref.abs().max())))
    torch.testing.assert_close(y.detach(), ref, **tol)
    grad = torch.randn(*lead, n, generator=gen).to(dtype)
    y.backward(grad)
    gref = (grad.double() @ w).to(dtype)
    # the reference path computes in fp32 from 16-bit operands: rounding only at the end
    torch.testing.assert_close(x.grad, gref, **tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_votes_are_the_sign_of_dW_and_of_the_row_sum(shape, gen):
    k, n = shape
    layer = _layer(k, n)
    x = torch.randn(4, k, generator=gen, dtype=torch.float64)
    grad = torch.randn(4, n, generator=gen, dtype=torch.float64)
    layer(x).backward(grad)
    dW = grad.T @ x  # gradient w.r.t. the effective weight s·T (same sign as w.r.t. T)
    trits = unpack_trits(layer.weight.packed, k).double()
    assert torch.equal(layer.weight.T_accum, torch.sign(dW).to(torch.int8))
    assert torch.equal(layer.weight.E_accum, torch.sign((dW * trits).sum(1)).to(torch.int8))


def test_vote_magnitude_and_saturation(gen):
    layer = _layer(12, 4)
    layer.weight.vote_magnitude = 100
    x = torch.randn(3, 12, generator=gen)
    grad = torch.randn(3, 4, generator=gen)
    for _ in range(3):  # 300 per element would wrap an int8 three times over
        layer(x).backward(grad)
    sign = torch.sign(grad.T @ x).to(torch.int8)
    assert torch.equal(layer.weight.T_accum, sign * 127)


def _float_tensors(obj, seen: set, path: str = "") -> list[str]:
    """Paths of floating-point tensors reachable from obj's attributes (modules, dicts, lists, ctx)."""
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [path] if obj.dtype.is_floating_point or obj.dtype.is_complex else []
    found = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            found += _float_tensors(value, seen, f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple, set)):
        for i, value in enumerate(obj):
            found += _float_tensors(value, seen, f"{path}[{i}]")
    elif isinstance(obj, nn.Module) or hasattr(obj, "__dict__"):
        for key, value in vars(obj).items():
            found += _float_tensors(value, seen, f"{path}.{key}")
    return found


def test_no_float_activation_or_gradient_retained_after_backward(gen):
    model = nn.Sequential(_layer(20, 16), nn.ReLU(), _layer(16, 8, seed=3))
    x = torch.randn(5, 20, generator=gen, requires_grad=True)
    loss = model(x).square().sum()
    loss.backward()
    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU):
            continue
        found = _float_tensors(module, set(), name or "model")
        assert not found, f"floating tensors kept on modules after backward: {found}"


def test_state_dict_has_zero_floating_point_elements():
    model = nn.Sequential(_layer(20, 16), nn.ReLU(), _layer(16, 8, seed=3))
    sd = model.state_dict()
    assert sd, "a ternary model still has state"
    assert sum(t.numel() for t in sd.values() if t.dtype.is_floating_point or t.dtype.is_complex) == 0
    assert {t.dtype for t in sd.values()} == {torch.uint8, torch.int8}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_casts_no_vote(bad, gen):
    layer = _layer(30, 9)
    T0 = torch.randint(-50, 50, (9, 30), generator=gen, dtype=torch.int8)
    E0 = torch.randint(-50, 50, (9,), generator=gen, dtype=torch.int8)
    layer.weight.T_accum.copy_(T0)
    layer.weight.E_accum.copy_(E0)
    x = torch.randn(4, 30, generator=gen)
    grad = torch.randn(4, 9, generator=gen)
    grad[1, 5] = bad
    layer(x).backward(grad)
    assert torch.equal(layer.weight.T_accum[5], T0[5]) and layer.weight.E_accum[5] == E0[5]
    assert layer.weight.T_accum.abs().max() <= 127
    others = torch.arange(9) != 5
    assert (layer.weight.T_accum[others] != T0[others]).float().mean() > 0.99


def test_backward_reference_leaves_its_inputs_alone(gen):
    packed = TernaryLinear(13, 6, generator=gen).weight.packed
    E = torch.zeros(6, dtype=torch.int8)
    x, grad = torch.randn(3, 13, generator=gen), torch.randn(3, 6, generator=gen)
    snapshot = [t.clone() for t in (x, grad, packed, E)]
    T, Ea = torch.zeros(6, 13, dtype=torch.int8), torch.zeros(6, dtype=torch.int8)
    linear_backward_reference(grad, x, packed, E, T, Ea, 13, 1, True)
    linear_forward_reference(x, packed, E, 13)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, (x, grad, packed, E)))


def test_first_layer_votes_without_input_grad(gen):
    layer = _layer(10, 4)
    x = torch.randn(3, 10, generator=gen)  # requires no grad: the anchor still triggers backward
    layer(x).sum().backward()
    assert layer.weight.T_accum.abs().sum() > 0


def test_torch_compile_two_layer_model_matches_eager(gen):
    eager = nn.Sequential(_layer(24, 16), nn.ReLU(), _layer(16, 8, seed=5))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    x = torch.randn(6, 24, generator=gen)
    grad = torch.randn(6, 8, generator=gen)
    y_eager = eager(x)
    y_comp = compiled(x)
    torch.testing.assert_close(y_comp, y_eager)
    y_eager.backward(grad)
    y_comp.backward(grad)
    for a, b in zip(eager.modules(), compiled_model.modules()):
        if isinstance(a, TernaryLinear):
            assert torch.equal(a.weight.T_accum, b.weight.T_accum)
            assert torch.equal(a.weight.E_accum, b.weight.E_accum)
            assert a.weight.T_accum.abs().sum() > 0


def test_bad_input_errors_name_the_argument_and_value():
    layer = TernaryLinear(8, 3)
    with pytest.raises(ValueError, match=r"in_features=8.*\(2, 9\)"):
        layer(torch.randn(2, 9))
    with pytest.raises(TypeError, match="torch.int64"):
        layer(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="complex64"):
        layer(torch.randn(2, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match="is on meta"):
        layer(torch.empty(2, 8, device="meta"))
    with pytest.raises(TypeError, match="list"):
        layer([1.0] * 8)
    with pytest.raises(ValueError, match="bias"):
        TernaryLinear(8, 3, bias=True)
    other = TernaryLinear(8, 4).state_dict()
    with pytest.raises(ValueError, match=r"weight.packed.*shape=\(4, 2\)"):
        layer.load_state_dict(other)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_device_mismatch_is_reported():
    layer = TernaryLinear(8, 3)
    with pytest.raises(ValueError, match="cuda"):
        layer(torch.randn(2, 8, device="cuda"))


def _mlp(dims, seed):
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [TernaryLinear(a, b, generator=gen), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_three_layer_student_fits_a_random_ternary_teacher():
    """int8-vote training alone (no float state) halves the loss on a task no one tuned it for."""
    torch.manual_seed(0)
    dims = [32, 64, 64, 8]
    teacher, student = _mlp(dims, 1), _mlp(dims, 2)
    opt = TernaryOptimizer(student, UpdateRule(threshold=8, scale_threshold=32))
    data = torch.Generator().manual_seed(3)
    x_val = torch.randn(1024, 32, generator=data)
    with torch.no_grad():
        y_val = teacher(x_val)

    def val_loss() -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(student(x_val), y_val).item()

    start = val_loss()
    flips = 0
    for _ in range(150):
        x = torch.randn(256, 32, generator=data)
        with torch.no_grad():
            y = teacher(x)
        nn.functional.mse_loss(student(x), y).backward()
        flips += opt.step().flips
    assert flips > 0
    assert val_loss() < 0.5 * start, (start, val_loss())
