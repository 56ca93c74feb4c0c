"""TernaryVQCodebook / KGVQCodebook: integer-only state, exact assignment, sparse votes,
usage and re-seeding, ids <-> codes, and training quality on real data (stdlib sources)."""

from __future__ import annotations

import math
import pathlib
import sysconfig

import pytest
import torch

from ternary_graph.config import KGVQ_CODEBOOK_DIM, KGVQ_CODEBOOK_SIZE
from ternary_graph.nn import KGVQCodebook, TernaryVQCodebook, VQOutput
from ternary_graph.nn.vq import assignment_perplexity, reseed_candidates, ternary_fit
from ternary_graph.ternary import TernaryOptimizer, UpdateRule, pack_trits, unpack_trits
from ternary_graph.ternary.state import E_STEP, exponent_to_scale


def _vq(num_codes=64, dim=16, seed=0, **kw):
    return TernaryVQCodebook(num_codes, dim, generator=torch.Generator().manual_seed(seed), **kw)


def _code_vectors(vq):
    w = vq.codes.weight
    return unpack_trits(w.packed, vq.dim).double() * exponent_to_scale(w.E).double()[:, None]


def _float_state(module):
    floats = [k for k, v in module.state_dict().items() if v.dtype.is_floating_point]
    floats += [n for n, b in module.named_buffers() if b.dtype.is_floating_point]
    floats += [n for n, p in module.named_parameters()]
    return floats


def test_million_code_codebook_trains_sparsely_with_integer_state():
    vq = _vq(1_000_000, 64, seed=1, reseed_window=0)
    assert _float_state(vq) == []
    w = vq.codes.weight
    opt = TernaryOptimizer(vq, UpdateRule(threshold=1, scale_threshold=1))
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    z = torch.randn(96, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = vq(z)
    assert isinstance(out, VQOutput)
    (out.quantized.square().mean() + out.commitment_loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    stats = opt.step()
    assigned = set(out.ids.tolist())
    assert stats.trits_updated == len(assigned) * 64  # only assigned rows visited
    assert stats.flips > 0
    changed_rows = (w.packed != before["codes.weight.packed"]).any(dim=1) | (w.E != before["codes.weight.E"])
    changed = set(changed_rows.nonzero().squeeze(1).tolist())
    assert changed and changed <= assigned
    acc_rows = (w.T_accum != before["codes.weight.T_accum"]).any(dim=1).nonzero().squeeze(1).tolist()
    assert set(acc_rows) <= assigned
    assert _float_state(vq) == []
    assert int(vq.step) == 1 and int((vq.usage > 0).sum()) == len(assigned)


def test_assignment_is_exact_nearest_scaled_code():
    vq = _vq(300, 24, seed=3)
    z = torch.randn(5, 7, 24, generator=torch.Generator().manual_seed(4)) * 0.8
    out = vq(z)
    assert out.ids.shape == (5, 7) and out.ids.dtype == torch.int64
    d = torch.cdist(z.reshape(-1, 24).double(), _code_vectors(vq)) ** 2
    assert torch.equal(out.ids.reshape(-1), d.argmin(dim=1))


def test_quantized_values_straight_through_gradient_and_commitment_loss():
    vq = _vq(40, 8, seed=5, commitment_weight=0.5)
    z = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(6), requires_grad=True)
    out = vq(z)
    q = vq.indices_to_codes(out.ids)
    assert out.quantized.shape == z.shape
    torch.testing.assert_close(out.quantized, q, rtol=0, atol=1e-6)
    expected = 0.5 * ((z.detach() - q) ** 2).sum(-1).mean()
    torch.testing.assert_close(out.commitment_loss, expected)
    upstream = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    (out.quantized * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)  # straight through: identity
    z.grad = None
    out = vq(z)
    out.commitment_loss.backward()
    torch.testing.assert_close(z.grad, 0.5 * 2 * (z.detach() - q) / 12)


def test_votes_pull_each_assigned_code_toward_its_inputs():
    vq = _vq(16, 10, seed=8)
    w = vq.codes.weight
    z = torch.randn(64, 10, generator=torch.Generator().manual_seed(9))
    out = vq(z)
    out.commitment_loss.backward()
    q = vq.indices_to_codes(out.ids)
    expected = torch.zeros(16, 10, dtype=torch.int8)
    for c in out.ids.unique().tolist():
        sel = out.ids == c
        expected[c] = torch.sign((q[sel] - z[sel]).sum(0)).to(torch.int8)  # ∂||sg(z) - q||²/∂q
    assert torch.equal(w.T_accum, expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_raise_and_change_nothing(bad):
    vq = _vq()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    z = torch.randn(4, 16)
    z[2, 3] = bad
    with pytest.raises(ValueError, match="finite"):
        vq(z)
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_inputs_raise():
    vq = _vq()
    with pytest.raises(ValueError, match=r"dim=16.*\(4, 15\)"):
        vq(torch.zeros(4, 15))
    with pytest.raises(TypeError, match="int64"):
        vq(torch.zeros(4, 16, dtype=torch.int64))
    for kw in (dict(reseed_window=-1), dict(usage_decay_interval=1.5), dict(commitment_weight=float("nan")),
               dict(precision="fp32")):
        with pytest.raises(ValueError):
            _vq(**kw)
    with pytest.raises(ValueError, match="num_codes"):
        TernaryVQCodebook(0, 4)


def test_usage_saturates_and_decays():
    vq = _vq(8, 16, seed=10, usage_decay_interval=3, reseed_window=0)
    code = vq.indices_to_codes(torch.tensor([5]))
    vq.usage[5] = 32760
    vq(code.expand(100, 16))
    assert int(vq.usage[5]) == 32767 and vq.usage.dtype == torch.int16
    vq(code.expand(100, 16))
    assert int(vq.usage[5]) == 32767
    vq(code.expand(1, 16))  # third call: decay halves every magnitude
    assert int(vq.usage[5]) == 32767 // 2
    assert int((vq.usage > 0).sum()) == 1


def test_code_accumulators_saturate():
    vq = _vq(1, 6, seed=11)
    w = vq.codes.weight
    w.vote_magnitude = 100
    z = vq.indices_to_codes(torch.tensor([0, 0])) + 5.0  # every trit of the code is too small
    for _ in range(3):
        vq(z).commitment_loss.backward()
    assert torch.all(w.T_accum == -127) and w.T_accum.dtype == torch.int8
    assert int(w.E_accum[0]) in (-127, 127)


def test_eval_calls_change_no_state():
    vq = _vq(reseed_window=1, usage_decay_interval=1).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    with torch.no_grad():
        vq(torch.randn(32, 16))
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dead_codes_are_reseeded_from_the_worst_inputs():
    vq = _vq(32, 16, seed=12, reseed_window=2, usage_decay_interval=0)
    w = vq.codes.weight
    live = torch.tensor([0, 1, 2])
    x_live = vq.indices_to_codes(live)
    outlier = torch.full((1, 16), 9.0)
    outlier[0, :4] = -9.0
    outlier[0, 4:6] = 0.1
    vq(x_live)
    assert int(vq.reseeded_total) == 0
    out = vq(torch.cat([x_live, outlier]))  # second call: the window ends
    used = {0, 1, 2, int(out.ids[-1])}
    assert int(vq.dead_codes) == 32 - len(used)
    assert int(vq.reseeded_total) == 4  # one per input of the call (fewer inputs than dead codes)
    # the outlier (worst reconstructed) seeded the first dead code with its best ternary fit
    first_dead = min(set(range(32)) - used)
    trits, E = ternary_fit(outlier)
    assert torch.equal(w.packed[first_dead], pack_trits(trits)[0])
    assert int(w.E[first_dead]) == int(E[0]) == round(E_STEP * math.log2(9.0))
    assert int(w.T_accum[first_dead].abs().sum()) == 0 and int(vq.usage[first_dead]) == 0
    # now the outlier has a code of its own
    with torch.no_grad():
        assert int(vq.eval()(outlier).ids[0]) == first_dead
    assert not vq.used_in_window.any()


def test_reseed_candidates_worst_first_or_a_step_seeded_permutation():
    dist = torch.tensor([0.5, 3.0, 0.1, 2.0, 2.0])
    assert reseed_candidates(dist, "worst", step=7).tolist() == [1, 3, 4, 0, 2]  # ties keep row order
    a, b, c = (reseed_candidates(dist, "random", step=s) for s in (7, 7, 8))
    assert sorted(a.tolist()) == list(range(5)) and torch.equal(a, b)  # a permutation, fixed by the step
    assert not all(torch.equal(reseed_candidates(dist, "random", step=s), a) for s in range(8, 14))
    with pytest.raises(ValueError, match="reseed_from must be one of .*got 'best'"):
        reseed_candidates(dist, "best", step=0)
    with pytest.raises(ValueError, match="reseed_from must be one of .*got 'best'"):
        _vq(reseed_from="best")


def test_random_reseeding_fits_dead_codes_to_the_step_seeded_sample():
    """With reseed_from="random" the first dead code gets the ternary fit of the first row of the
    step-seeded permutation, not of the worst-reconstructed row."""
    vq = _vq(32, 16, seed=12, reseed_window=2, usage_decay_interval=0, reseed_from="random")
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(3)) * 4
    first_ids = vq(x[:3]).ids
    second_ids = vq(x).ids  # the second call ends the window: its 6 rows re-seed dead codes
    dead = sorted(set(range(32)) - set(first_ids.tolist()) - set(second_ids.tolist()))
    order = reseed_candidates(torch.zeros(6), "random", step=2)
    trits, E = ternary_fit(x[order[:1]])
    w = vq.codes.weight
    assert int(vq.reseeded_total) == 6
    assert torch.equal(w.packed[dead[0]], pack_trits(trits)[0]) and int(w.E[dead[0]]) == int(E[0])


def test_ternary_fit_is_optimal():
    x = torch.randn(50, 9, generator=torch.Generator().manual_seed(13)) * 3
    trits, E = ternary_fit(x)
    fitted = trits.double() * exponent_to_scale(E).double()[:, None]
    # against every support size m with its optimal continuous scale
    mags = x.double().abs().sort(dim=1, descending=True).values
    best_err = torch.stack([(x.double() ** 2).sum(1) - mags[:, :m].sum(1) ** 2 / m for m in range(1, 10)]).min(0).values
    err = ((x.double() - fitted) ** 2).sum(1)
    # E rounds the scale to 2**(1/4) steps: at most (2**(1/8) - 1)**2 of relative scale error
    assert torch.all(err <= best_err + ((2 ** (1 / 8) - 1) ** 2) * (x.double() ** 2).sum(1) + 1e-9)
    assert torch.equal(ternary_fit(torch.zeros(2, 5))[0], torch.zeros(2, 5, dtype=torch.int8))


def test_codes_and_indices_round_trip():
    vq = _vq(500, 64, seed=14)
    ids = torch.randint(0, 500, (4, 25), generator=torch.Generator().manual_seed(15))
    codes = vq.indices_to_codes(ids)
    assert codes.shape == (4, 25, 64) and codes.dtype == torch.float32
    assert torch.equal(vq.codes_to_indices(codes), ids)
    assert torch.equal(vq.indices_to_codes(vq.codes_to_indices(codes)), codes)
    assert torch.equal(vq.indices_to_codes(ids.to(torch.int32)), codes)
    # identical codes map to the smallest id
    w = vq.codes.weight
    w.packed[400], w.E[400] = w.packed[7], w.E[7]
    assert int(vq.codes_to_indices(vq.indices_to_codes(torch.tensor([400])))[0]) == 7
    with pytest.raises(ValueError, match="got 500"):
        vq.indices_to_codes(torch.tensor([500]))


def test_stats_perplexity_and_live_fraction():
    assert assignment_perplexity(torch.tensor([5, 5, 5, 5])) == pytest.approx(4.0)
    assert assignment_perplexity(torch.tensor([7])) == pytest.approx(1.0)
    vq = _vq(16, 16, seed=16, reseed_window=0)
    assert vq.stats().perplexity == 0.0 and vq.stats().live_fraction == 0.0
    x = vq.indices_to_codes(torch.tensor([1, 1, 2, 2, 3, 3, 4, 4]))
    vq(x)
    s = vq.stats()
    assert s.perplexity == pytest.approx(4.0) and s.live_fraction == pytest.approx(4 / 16)


def test_dead_codes_count_the_codes_not_hit_in_the_window():
    """dead_codes, logged with the stats, is the fixed-window count the ablation report turns into
    "codes hit in the last window" (1 - dead_codes / num_codes)."""
    vq = _vq(16, 16, seed=16, reseed_window=2, usage_decay_interval=0)
    codes = vq.indices_to_codes(torch.arange(16))
    vq(codes[[1, 2]])
    assert vq.stats().dead_codes == 0  # the first window has not ended
    vq(codes[[2, 3, 5]])  # ends it: codes 1, 2, 3, 5 were hit, the other 12 are re-seeded
    assert vq.stats().dead_codes == 12 and vq.stats().reseeded_total == 3  # one per input row of the call


def test_empty_batch():
    vq = _vq()
    out = vq(torch.zeros(0, 16, requires_grad=True))
    assert out.quantized.shape == (0, 16) and out.ids.shape == (0,)
    assert float(out.commitment_loss.detach()) == 0.0
    out.commitment_loss.backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_float_input_dtypes(dtype):
    vq = _vq()
    z = torch.randn(6, 16, generator=torch.Generator().manual_seed(17)).to(dtype)
    out = vq(z)
    assert out.quantized.dtype == dtype and out.commitment_loss.dtype == torch.float32
    assert torch.equal(out.ids, vq(z.float()).ids)


def test_state_dict_round_trip():
    a = _vq(seed=18, reseed_window=2)
    a(torch.randn(8, 16))
    a(torch.randn(8, 16))
    b = _vq(seed=19, reseed_window=2)
    b.load_state_dict(a.state_dict())
    z = torch.randn(20, 16)
    assert torch.equal(a.eval()(z).ids, b.eval()(z).ids)
    assert int(b.step) == 2 and int(b.reseeded_total) == int(a.reseeded_total)


def test_kg_codebook_defaults_and_meta_construction():
    kg = KGVQCodebook(device="meta")
    assert (kg.num_codes, kg.dim) == (KGVQ_CODEBOOK_SIZE, KGVQ_CODEBOOK_DIM) == (5_000_000, 64)
    for name, buf in kg.named_buffers():
        assert buf.device.type == "meta", name
    assert _float_state(kg) == []
    assert {n for n, _ in kg.named_buffers()} == {n for n, _ in TernaryVQCodebook(3, 4, device="meta").named_buffers()}
    big = TernaryVQCodebook(10_000_000, 64, device="meta")
    assert big.codes.weight.T_accum.shape == (10_000_000, 64)
    small = KGVQCodebook(100, 8, reseed_window=5, generator=torch.Generator().manual_seed(0))
    assert small.reseed_window == 5 and small(torch.randn(3, 8)).ids.shape == (3,)


# --------------------------------------------------------------------------------------------
# quality on real structured data
# --------------------------------------------------------------------------------------------

def stdlib_window_features(n_windows: int = 4096, window: int = 64, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Byte uni+bigram features of consecutive 64-byte windows of the stdlib's top-level modules.

    Each window is the sum of fixed random ±N(0,1) projections of its bytes and of its hashed
    byte pairs, standardised per feature: real text, deterministic, no download.
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    data = bytearray()
    for path in sorted(root.glob("*.py")):
        data += path.read_bytes()
        if len(data) >= n_windows * window:
            break
    buf = torch.frombuffer(data[: n_windows * window], dtype=torch.uint8).long().reshape(n_windows, window)
    proj = torch.randn(256, dim, generator=torch.Generator().manual_seed(seed))
    pairs = (buf[:, :-1] * 31 + buf[:, 1:]) % 256
    x = proj[buf].sum(1) + proj[pairs].sum(1)
    return (x - x.mean(0)) / x.std(0)


def _train(x, reseed_window, steps=80, num_codes=512, batch=256):
    vq = _vq(num_codes, x.shape[1], seed=1, reseed_window=reseed_window, usage_decay_interval=10)
    opt = TernaryOptimizer(vq, UpdateRule(threshold=4, scale_threshold=4))
    g = torch.Generator().manual_seed(2)

    def mse():
        with torch.no_grad():
            q = vq.indices_to_codes(vq.eval()(x).ids)
        vq.train()
        return float(((q - x) ** 2).sum(1).mean())

    start = mse()
    for _ in range(steps):
        out = vq(x[torch.randint(0, x.shape[0], (batch,), generator=g)])
        out.commitment_loss.backward()
        opt.step()
    return start, mse(), vq.stats()


def test_quality_on_stdlib_features_with_and_without_reseeding():
    # Inputs narrower than the unit-scale initial codes: without re-seeding most codes are
    # never chosen and never move (collapse); re-seeding keeps the codebook in use.
    x = stdlib_window_features() * 0.5
    start_on, end_on, stats_on = _train(x, reseed_window=10)
    start_off, end_off, stats_off = _train(x, reseed_window=0)
    assert start_on == start_off
    assert end_on < 0.5 * start_on  # reconstruction MSE falls
    assert end_off < start_off
    assert stats_on.live_fraction >= 0.6  # stated floor with re-seeding
    assert stats_off.live_fraction <= 0.3  # collapse without it
    assert stats_on.reseeded_total > 0 and stats_off.reseeded_total == 0
    assert end_on < end_off
    assert stats_on.perplexity > 2 * stats_off.perplexity


def test_input_norm_keeps_a_shrunken_input_from_collapsing_onto_the_smallest_code():
    """Raw search: inputs scaled down by 1e-3 are nearest to the smallest codes, whatever their
    direction (the collapse seen in training). Unit-norm search: the direction decides."""
    raw, unit = _vq(num_codes=32, dim=16, seed=4), _vq(num_codes=32, dim=16, seed=4, input_norm=1.0)
    codes = _code_vectors(raw)
    picked = torch.tensor([3, 7, 11, 19, 23, 29])
    z = codes[picked] / codes[picked].norm(dim=1, keepdim=True) * 1e-3
    raw.eval()
    unit.eval()
    norms = codes.norm(dim=1)
    assert torch.allclose(norms[raw(z).ids], norms.min().expand(len(picked)))  # only the smallest codes win
    assert not torch.allclose(norms[picked], norms.min().expand(len(picked)))
    assert torch.equal(unit(z).ids, unit(z * 1e6).ids)  # the scale of the input no longer matters
    assert (unit(z).ids == picked).float().mean() >= 0.8  # ternary codes: a direction may tie nearby
    with pytest.raises(ValueError, match="input_norm must be None or a positive finite number, got 0"):
        _vq(input_norm=0)


def test_live_codes_of_a_crafted_batch():
    """A training batch that hits exactly five codes leaves exactly five live codes."""
    vq = _vq(num_codes=32, dim=16, seed=5, input_norm=1.0)
    codes = _code_vectors(vq)
    hit = torch.tensor([0, 5, 6, 17, 30])
    z = (codes[hit] / codes[hit].norm(dim=1, keepdim=True)).repeat(3, 1)
    vq.train()
    ids = vq(z).ids
    assert set(ids.tolist()) == set(hit.tolist())
    assert vq.stats().live_fraction == pytest.approx(5 / 32)
