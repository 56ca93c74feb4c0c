"""The assembled model: config validation, presets, zero float state, trace, float baseline."""

import subprocess
import sys

import pytest
import torch

from ternary_graph.config import (CODEBOOK_DIM, KGVQ_CODEBOOK_DIM, KGVQ_CODEBOOK_SIZE, PRESETS, SHARED_VQ_SIZE,
                                  ModelConfig, get_preset, logical_parameter_counts)
from ternary_graph.models.model import build_model
from ternary_graph.models.trace import format_trace, trace_model
from ternary_graph.ternary import TernaryOptimizer, UpdateRule, float_parameters, ternary_states

SMALL = get_preset("tiny").replace(n_layers=2, codebook_size=256, kg_codebook_size=256, expert_hidden=64)


def float_elements(model: torch.nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values() if t.dtype.is_floating_point)


def test_default_3b_keeps_the_agreed_sizes_and_totals_3b():
    cfg = get_preset("default_3b")
    assert (cfg.codebook_size, cfg.codebook_dim) == (SHARED_VQ_SIZE, CODEBOOK_DIM) == (10_000_000, 64)
    assert (cfg.kg_codebook_size, cfg.kg_codebook_dim) == (KGVQ_CODEBOOK_SIZE, KGVQ_CODEBOOK_DIM) == (5_000_000, 64)
    total = sum(logical_parameter_counts(cfg).values())
    assert abs(total - 3.0e9) <= 0.01 * 3.0e9


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_trace_counts_match_config_arithmetic_and_hold_no_floats(name):
    report = trace_model(name)
    assert report.logical == report.expected
    assert report.float_elements == 0
    text = format_trace(report)
    assert text.splitlines()[-1] == f"logical ternary total: {report.total_logical:,}"


def test_default_3b_trace_state_is_under_1_3_bytes_per_param():
    report = trace_model("default_3b")
    assert report.bytes_per_logical_param <= 1.3
    assert report.bytes_by_dtype["uint8"] / report.total_logical == pytest.approx(0.2, abs=0.005)


def test_trace_cli_allocates_nothing_and_ends_with_total():
    code = ("import resource, sys; from ternary_graph.cli import main; rc = main(['trace', '--preset', 'default_3b']);"
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    lines = out.strip().splitlines()
    rss_kib = int(lines[-1].split()[1])
    assert rss_kib < 1024 * 1024, f"peak RSS {rss_kib} KiB"
    assert lines[-2].startswith("logical ternary total: 2,99")


@pytest.mark.parametrize("field,value,needle", [
    ("n_heads", 3, "n_heads=3"), ("top_k", 9, "top_k=9"), ("dim", 0, "dim"), ("fanout", 99, "fanout=99"),
    ("expert_hidden", -1, "expert_hidden"),
])
def test_inconsistent_config_names_field_and_value(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig(**{field: value})


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="default_3b.*small.*tiny"):
        get_preset("huge")


def test_tiny_ternary_model_has_zero_float_state_and_trains_a_step():
    torch.manual_seed(0)
    model = build_model(SMALL, seed=0)
    assert float_elements(model) == 0 and float_parameters(model) == []
    opt = TernaryOptimizer(model, UpdateRule(threshold=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (2, 33))
    out = model(ids[:, :-1], ids[:, 1:])
    assert out.logits.shape == (2, 32, 256) and torch.isfinite(out.loss)
    out.loss.backward()
    stats = opt.step()
    model.update_graph()
    assert stats.flips > 0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("blocks.0.attn.q.weight.packed") for k in changed)
    assert any(k.startswith("embed.weight") for k in changed)
    assert any("experts" in k and k.endswith("packed") for k in changed)
    # no float activation or gradient is kept on a module after backward
    for module in model.modules():
        for name, value in vars(module).items():
            if torch.is_tensor(value) and value.dtype.is_floating_point and name != "_last_routing":
                pytest.fail(f"{type(module).__name__}.{name} keeps a float tensor")


@pytest.mark.parametrize("projection", ["frozen", "learned"])
def test_a_frozen_vq_projection_never_changes_while_the_codes_learn(projection):
    """vq_projection="frozen": the projection gets no votes and keeps its trits over training
    steps, while the codes it feeds still learn; "learned" votes into the projection."""
    torch.manual_seed(0)
    model = build_model(SMALL.replace(vq_projection=projection), seed=0)
    opt = TernaryOptimizer(model, UpdateRule(threshold=1))
    proj = model.blocks[0].vq_proj.weight
    packed, codes = proj.packed.clone(), model.shared_vq.codes.weight.packed.clone()
    ids = torch.randint(0, 256, (4, 65))
    for _ in range(3):
        model(ids[:, :-1], ids[:, 1:]).loss.backward()
        proj_votes = int(proj.T_accum.abs().sum())
        opt.step()
        model.update_graph()
        if projection == "frozen":
            assert proj_votes == 0
        else:
            assert proj_votes > 0
    assert torch.equal(proj.packed, packed) == (projection == "frozen")
    assert not torch.equal(model.shared_vq.codes.weight.packed, codes)
    # the optimizer steps exactly the trainable states: a frozen projection is left out
    assert (proj in opt.states) == (projection == "learned")
    assert len(opt.states) == len(ternary_states(model)) - (projection == "frozen") * len(SMALL.quantize_layers)


def test_unknown_vq_projection_lists_the_valid_ones():
    with pytest.raises(ValueError, match="vq_projection must be one of frozen, learned, got 'random'"):
        ModelConfig(vq_projection="random")


@pytest.mark.parametrize("window", [0, 12])
def test_the_shared_vq_takes_the_configured_reseed_window(window):
    model = build_model(get_preset("tiny").replace(vq_reseed_window=window), device="meta")
    assert model.shared_vq.reseed_window == window
    assert get_preset("tiny").vq_reseed_window == build_model(get_preset("tiny"), device="meta").shared_vq.reseed_window


def test_meta_default_3b_has_zero_float_elements():
    model = build_model(get_preset("default_3b"), device="meta")
    assert float_elements(model) == 0
    assert all(t.device.type == "meta" for t in model.state_dict().values())


def test_float_baseline_has_same_architecture_with_float_weights():
    tern = build_model(SMALL, weights="ternary", seed=0)
    flt = build_model(SMALL, weights="float", seed=0)
    n_float = sum(p.numel() for p in float_parameters(flt))
    n_tern_linear = sum(s.rows * s.cols for name, s in tern.named_modules()  # trainable: frozen VQ projection out
                        if type(s).__name__ == "TernaryState" and "vq" not in name.split(".")[0]
                        and "centroids" not in name and not s.frozen)
    assert n_float == n_tern_linear
    ids = torch.randint(0, 256, (2, 17))
    out = flt(ids[:, :-1], ids[:, 1:])
    out.loss.backward()
    with_grad = {name for name, p in flt.named_parameters() if p.grad is not None}
    # every weight on the LM path has a gradient (the KG head is not on it; unrouted experts may
    # idle); the frozen VQ projection (the default) has none
    for name in ("embed.weight", "blocks.0.attn.q.weight", "blocks.1.attn.o.weight", "head.lm.weight"):
        assert name in with_grad, name
    assert "blocks.0.vq_proj.weight" not in with_grad
    assert any(".experts." in name for name in with_grad)


def test_composite_head_scores_kg_candidates_from_the_same_hidden_state():
    model = build_model(SMALL, seed=0)
    ids = torch.randint(0, 256, (1, 8))
    hidden = model(ids).hidden.reshape(-1, SMALL.dim)
    candidates = torch.randint(0, SMALL.kg_codebook_size, (8, 5))
    scores = model.kg_scores(hidden, torch.zeros(8, dtype=torch.long), candidates)
    assert scores.shape == (8, 5) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert model.kg_vq.codes.weight.T_accum.abs().sum() > 0


def test_bad_sequence_shapes_are_rejected():
    model = build_model(SMALL, seed=0)
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, SMALL.max_seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_row_scale_E_round_trips_through_forward_backward_and_update(device):
    """The tscale path: E sets the forward scale exactly, backward votes on it, the update moves it."""
    from ternary_graph.nn import TernaryLinear
    from ternary_graph.ternary.state import E_STEP
    torch.manual_seed(0)
    layer = TernaryLinear(40, 24, device=device, generator=torch.Generator().manual_seed(3))
    x = torch.randn(5, 40, device=device)
    with torch.no_grad():
        y0 = layer(x)
        layer.weight.E.add_(E_STEP)  # one octave: every row's scale doubles, exactly
        torch.testing.assert_close(layer(x), 2 * y0, rtol=1e-6, atol=1e-6)
        layer.weight.E.sub_(E_STEP)
    # loss = <y, g>: dL/ds_n = Σ_m g_mn (x·T_n)_m, so the E vote of row n is its sign
    g = torch.randn(5, 24, device=device)
    (layer(x) * g).sum().backward()
    trits = layer.weight.trits().float()
    expected = torch.sign(((x @ trits.T) * g).sum(0)).to(torch.int8)
    assert torch.equal(layer.weight.E_accum, expected)
    E_before = layer.weight.E.clone()
    TernaryOptimizer(layer, UpdateRule(threshold=127, scale_threshold=1)).step()
    assert torch.equal(layer.weight.E, E_before - expected)  # a positive gradient shrinks the scale
    assert torch.equal(layer.weight.E_accum, torch.zeros_like(expected))
    with torch.no_grad():
        factor = torch.exp2(-expected.float() / E_STEP)
        torch.testing.assert_close(layer(x), y0 * factor, rtol=1e-5, atol=1e-5)
