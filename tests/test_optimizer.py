"""TernaryOptimizer and UpdateRule: the rule, θ schedule, decay, saturation, state round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ternary_graph.kernels import ternary_update as update_kernels
from ternary_graph.kernels.ternary_update import update_reference
from ternary_graph.ternary.packing import pack_trits
from ternary_graph.nn.linear import TernaryLinear
from ternary_graph.ternary.optimizer import TernaryOptimizer, UpdateRule
from ternary_graph.ternary.state import float_parameters, ternary_states


def _model(seed: int = 0) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    return nn.Sequential(TernaryLinear(23, 16, generator=gen), nn.ReLU(), TernaryLinear(16, 4, generator=gen))


def _fill_accumulators(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for state in ternary_states(model):
        state.T_accum.copy_(torch.randint(-127, 128, state.T_accum.shape, generator=gen, dtype=torch.int8))
        state.E_accum.copy_(torch.randint(-127, 128, state.E_accum.shape, generator=gen, dtype=torch.int8))


@pytest.mark.parametrize("field, value", [
    ("threshold", 0), ("threshold", 128), ("threshold_final", 300), ("threshold_ramp_steps", -1),
    ("scale_threshold", -1), ("decay_shift", 0), ("decay_shift", 8), ("flip_prob", 0.0), ("flip_prob", 1.5),
    ("vote_magnitude", 0), ("vote_magnitude", 128), ("threshold_ramp_start", -1),
])
def test_rule_rejects_bad_values_quoting_them(field, value):
    with pytest.raises(ValueError, match=f"{field}.*{value}"):
        UpdateRule(**{field: value})


def test_threshold_schedule():
    rule = UpdateRule(threshold=4, threshold_final=20, threshold_ramp_steps=8)
    assert [rule.threshold_at(s) for s in (0, 2, 4, 8, 100)] == [4, 8, 12, 20, 20]
    assert UpdateRule(threshold=9).threshold_at(1000) == 9
    model = _model()
    opt = TernaryOptimizer(model, rule)
    seen = []
    for _ in range(10):
        seen.append(opt.step().threshold)
    assert seen == [rule.threshold_at(s) for s in range(10)]


def test_cool_down_holds_theta_then_ramps():
    rule = UpdateRule(threshold=4, threshold_final=20, threshold_ramp_steps=12, threshold_ramp_start=4)
    assert [rule.threshold_at(s) for s in (0, 3, 4, 6, 8, 10, 12, 50)] == [4, 4, 4, 8, 12, 16, 20, 20]
    with pytest.raises(ValueError, match="threshold_ramp_start.*12"):
        UpdateRule(threshold=4, threshold_final=20, threshold_ramp_steps=12, threshold_ramp_start=12)


def test_threshold_as_a_tensor_steps_like_the_int():
    """CPU: a one-element int32 θ (what the optimizer keeps on a GPU) applies the same rule."""
    model_a, model_b = _model(), _model()
    _fill_accumulators(model_a, 5)
    _fill_accumulators(model_b, 5)
    for a, b in zip(ternary_states(model_a), ternary_states(model_b)):
        flips_a = update_kernels.ternary_update_(a.packed, a.T_accum, a.E, a.E_accum, a.cols, threshold=40,
                                                 scale_threshold=64, decay_shift=4)
        flips_b = update_kernels.ternary_update_(b.packed, b.T_accum, b.E, b.E_accum, b.cols,
                                                 threshold=torch.tensor([40], dtype=torch.int32),
                                                 scale_threshold=64, decay_shift=4)
        assert flips_a == flips_b > 0
        assert torch.equal(a.packed, b.packed) and torch.equal(a.T_accum, b.T_accum)
    with pytest.raises(ValueError, match="threshold tensor must be one int32"):
        update_kernels.ternary_update_(a.packed, a.T_accum, a.E, a.E_accum, a.cols,
                                       threshold=torch.tensor([40, 41], dtype=torch.int32), scale_threshold=64)


def test_diagnostics_count_zeros_saturation_and_armed_accumulators():
    state = TernaryLinear(7, 3).weight  # 7 columns: the last packed byte holds 3 padding trits
    trits = torch.tensor([[0, 0, 1, -1, 0, 1, 1], [1, 1, 1, 1, 1, 1, 0], [-1, 0, 0, 0, 0, 0, 0]], dtype=torch.int8)
    state.packed.copy_(pack_trits(trits))
    state.T_accum.zero_()
    state.T_accum[0, :3] = torch.tensor([127, -127, 30], dtype=torch.int8)  # 2 saturated, 3 at or past θ=30
    state.E.copy_(torch.tensor([-4, 0, 4], dtype=torch.int8))
    opt = TernaryOptimizer([state], UpdateRule(threshold=30))
    d = opt.diagnostics()
    assert d["zero_fraction"] == pytest.approx(10 / 21)  # 3 + 1 + 6 zeros
    assert d["saturated_fraction"] == pytest.approx(2 / 21)
    assert d["armed_fraction"] == pytest.approx(3 / 21)
    assert d["scale_exponent_mean"] == pytest.approx(0.0)
    assert d["scale_exponent_std"] == pytest.approx((32 / 3) ** 0.5)


def test_step_applies_the_reference_rule_and_counts_flips():
    model = _model()
    _fill_accumulators(model, 1)
    rule = UpdateRule(threshold=50, scale_threshold=40, decay_shift=3)
    before = [[t.clone() for t in (s.packed, s.T_accum, s.E, s.E_accum)] for s in ternary_states(model)]
    stats = TernaryOptimizer(model, rule).step()
    flips = 0
    for state, old in zip(ternary_states(model), before):
        expected = update_reference(*old, state.cols, threshold=50, scale_threshold=40, decay_shift=3)
        for got, want in zip((state.packed, state.T_accum, state.E, state.E_accum), expected[:4]):
            assert torch.equal(got, want)
        flips += expected[4]
    assert stats.flips == flips > 0
    assert stats.trits_updated == 23 * 16 + 16 * 4
    assert 0 < stats.flip_rate < 1


def test_decay_is_symmetric_in_sign():
    layer = TernaryLinear(10, 2, generator=torch.Generator().manual_seed(0))
    values = torch.arange(1, 11, dtype=torch.int8) * 9  # 9..90, under the threshold
    layer.weight.T_accum.copy_(torch.stack([values, -values]))
    TernaryOptimizer(layer, UpdateRule(threshold=127, scale_threshold=0, decay_shift=2)).step()
    T = layer.weight.T_accum
    assert torch.equal(T[1], -T[0])
    assert torch.equal(T[0], values - (values >> 2))


def test_accumulators_saturate_and_never_wrap_during_training():
    layer = TernaryLinear(12, 3, generator=torch.Generator().manual_seed(0))
    opt = TernaryOptimizer(layer, UpdateRule(threshold=127, vote_magnitude=127, scale_threshold=0))
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    for _ in range(4):  # 4 × 127 votes of the same sign: a wrapping int8 would flip sign
        layer(x).backward(grad)
    sign = torch.sign(grad.T @ x).to(torch.int8)
    assert torch.equal(layer.weight.T_accum, sign * 127)
    trits_before = layer.weight.trits()
    stats = opt.step()  # |acc| = 127 reaches θ = 127 everywhere: every non-saturated trit steps
    moved = (trits_before - sign).clamp(-1, 1)
    assert torch.equal(layer.weight.trits(), moved)
    assert stats.flips == int((moved != trits_before).sum())
    assert not layer.weight.T_accum.any()


def test_state_dict_round_trip_reproduces_stochastic_steps():
    rule = UpdateRule(threshold=30, threshold_final=60, threshold_ramp_steps=5, flip_prob=0.5, scale_threshold=20)
    model_a = _model(3)
    opt_a = TernaryOptimizer(model_a, rule, seed=11)
    for i in range(3):
        _fill_accumulators(model_a, 100 + i)
        opt_a.step()
    saved_model, saved_opt = copy.deepcopy(model_a.state_dict()), copy.deepcopy(opt_a.state_dict())

    model_b = _model(99)
    model_b.load_state_dict(saved_model)
    opt_b = TernaryOptimizer(model_b, UpdateRule(), seed=0)
    opt_b.load_state_dict(saved_opt)
    assert opt_b.rule == rule and opt_b.step_count == 3
    for model, opt in ((model_a, opt_a), (model_b, opt_b)):
        _fill_accumulators(model, 7)
        opt.step()
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(a, b)


def test_load_state_dict_rejects_bad_state():
    opt = TernaryOptimizer(_model())
    good = opt.state_dict()
    with pytest.raises(ValueError, match="bogus"):
        opt.load_state_dict(good | {"rule": good["rule"] | {"bogus": 1}})
    with pytest.raises(ValueError, match="-4"):
        opt.load_state_dict(good | {"step_count": -4})
    with pytest.raises(ValueError, match="threshold.*0"):
        opt.load_state_dict(good | {"rule": good["rule"] | {"threshold": 0}})
    with pytest.raises(ValueError, match="float_optimizer"):
        opt.load_state_dict(good | {"float_optimizer": {}})


def test_float_parameters_train_beside_the_ternary_ones():
    torch.manual_seed(0)
    model = nn.Sequential(TernaryLinear(8, 6), nn.LayerNorm(6))
    floats = float_parameters(model)
    assert len(floats) == 2  # LayerNorm weight and bias; the ternary layer has none
    opt = TernaryOptimizer(model, UpdateRule(threshold=1), float_optimizer=torch.optim.SGD(floats, lr=0.1))
    weight_before = model[1].weight.detach().clone()
    model(torch.randn(4, 8)).square().sum().backward()
    stats = opt.step()
    assert stats.float_params == 12 and stats.flips > 0
    assert not torch.equal(model[1].weight, weight_before)
    opt.zero_grad()
    assert all(p.grad is None for p in floats)
    assert "float_optimizer" in opt.state_dict()


def test_constructor_errors():
    with pytest.raises(ValueError, match="nothing to train"):
        TernaryOptimizer([])
    with pytest.raises(TypeError, match="Linear"):
        TernaryOptimizer([nn.Linear(2, 2)])
