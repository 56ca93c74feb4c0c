"""The in-place Triton update kernel against ``update_reference``.

Deterministic updates (flip_prob = 1) must agree exactly on packed bytes, T_accum, E, E_accum
and the flip count, for all rows and for a row subset. Stochastic updates draw different coins
than the reference, so they are checked for the rule's invariants and their flip rate.
Backends as in test_kernels_linear.py: ``interpreter`` (child process) and ``cuda``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import interpreting, run_interpreter_suite

from ternary_graph.kernels.ternary_update import update_reference
from ternary_graph.ternary.packing import random_packed, unpack_trits

BACKENDS = [pytest.param("interpreter", marks=pytest.mark.interpreter), pytest.param("cuda", marks=pytest.mark.cuda)]
SHAPES = [(1, 5), (3, 7), (17, 64), (33, 130), (64, 320)]  # (rows, cols)


def _launcher():
    from ternary_graph.kernels.ternary_update import _update_triton

    assert _update_triton is not None, "Triton is importable here, so the launcher must exist"
    return _update_triton


def _state(rows, cols, gen, device, spread=127):
    packed = random_packed(rows, cols, generator=gen)
    T = torch.randint(-spread, spread + 1, (rows, cols), generator=gen, dtype=torch.int8)
    E = torch.randint(-127, 128, (rows,), generator=gen, dtype=torch.int8)
    E[0] = 127  # a row scale at the top of its range must saturate, not wrap
    Ea = torch.randint(-127, 128, (rows,), generator=gen, dtype=torch.int8)
    Ea[0] = -127  # a vote to raise E (negative gradient) at E = 127
    return [t.to(device) for t in (packed, T, E, Ea)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("decay_shift", [None, 2])
@pytest.mark.parametrize("scale_threshold", [0, 30])
def test_deterministic_update_matches_reference(backend, shape, decay_shift, scale_threshold, gen):
    device = "cpu" if backend == "interpreter" else "cuda"
    rows, cols = shape
    state = _state(rows, cols, gen, device)
    kwargs = dict(threshold=40, scale_threshold=scale_threshold, decay_shift=decay_shift)
    expected = update_reference(*[t.cpu() for t in state], cols, **kwargs)
    work = [t.clone() for t in state]
    flips = _launcher()(*work, cols, **kwargs)
    for name, got, want in zip(("packed", "T_accum", "E", "E_accum"), work, expected[:4]):
        assert torch.equal(got.cpu(), want), name
    assert flips == expected[4] and flips > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 7), (33, 130)])
@pytest.mark.parametrize("padded", [False, True])
def test_row_subset_updates_only_those_rows(backend, shape, padded, gen):
    """Only the listed rows move; -1 entries (the padding of fixed-size row lists) are skipped."""
    device = "cpu" if backend == "interpreter" else "cuda"
    rows, cols = shape
    state = _state(rows, cols, gen, device)
    subset = torch.tensor(sorted({0, rows - 1, rows // 2}), dtype=torch.long)
    listed = torch.cat([torch.tensor([-1]), subset, torch.tensor([-1, -1])]) if padded else subset
    kwargs = dict(threshold=30, scale_threshold=20, decay_shift=3)
    expected = update_reference(*[t.cpu()[subset] for t in state], cols, **kwargs)
    work = [t.clone() for t in state]
    flips = _launcher()(*work, cols, rows=listed.to(device), **kwargs)
    untouched = torch.ones(rows, dtype=torch.bool)
    untouched[subset] = False
    for got, before, want in zip(work, state, expected[:4]):
        assert torch.equal(got.cpu()[subset], want)
        assert torch.equal(got.cpu()[untouched], before.cpu()[untouched])
    assert flips == expected[4]
    assert _launcher()(*work, cols, rows=torch.empty(0, dtype=torch.long, device=device), **kwargs) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_update_keeps_the_rule_and_its_rate(backend, gen):
    device = "cpu" if backend == "interpreter" else "cuda"
    rows, cols = 64, 320
    state = _state(rows, cols, gen, device)
    packed0, T0, E0, Ea0 = [t.cpu() for t in state]
    runs = []
    for seed in (7, 7, 8):
        work = [t.clone() for t in state]
        flips = _launcher()(*work, cols, threshold=40, scale_threshold=30, flip_prob=0.5, seed=seed)
        runs.append(([t.cpu() for t in work], flips))
    (packed, T, E, Ea), flips = runs[0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0])), "same seed, same coins"
    assert not torch.equal(runs[0][0][1], runs[2][0][1]), "another seed, other coins"
    eligible = T0.short().abs() >= 40
    fired = eligible & (T == 0) & (T0 != 0)
    # no decay: an element either fired (accumulator reset) or kept its accumulator
    assert torch.equal(T[~fired], T0[~fired])
    rate = fired.sum().item() / eligible.sum().item()
    assert 0.4 < rate < 0.6, rate
    trits0, trits = unpack_trits(packed0, cols), unpack_trits(packed, cols)
    step = -torch.sign(T0.short())
    assert torch.equal(trits[fired], (trits0[fired].short() + step[fired]).clamp(-1, 1).to(torch.int8))
    assert torch.equal(trits[~fired], trits0[~fired])
    assert flips == int((trits != trits0).sum())
    assert E.abs().max() <= 127 and E[0] == 127  # saturates at the top, never wraps


def test_interpreter_suite():
    """Runs every ``interpreter`` test of this file in a TRITON_INTERPRET=1 child process."""
    if interpreting():
        pytest.skip("already inside the interpreter run")
    run_interpreter_suite(__file__)
