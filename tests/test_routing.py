"""Pure routing maths of MoEGraph (ternary_graph/graph/routing.py), against brute force."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ternary_graph.graph.routing import (
    INACTIVE_SRC,
    EdgeVoteFunction,
    GraphRule,
    VoteSink,
    aggregate_votes,
    apply_score_votes,
    dispatch_combine,
    edge_attr_from_score,
    edge_bonus,
    gate_softmax,
    load_bias_update,
    lookup_dense_edges,
    lookup_sorted_edges,
    match_edges,
    merge_active_edges,
    pair_votes,
    rewire_dense_edges,
    select_experts,
    top_per_code,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sorted_edges(gen: torch.Generator, codes: int, experts: int, fanout: int, n: int, capacity: int):
    """Random distinct edges, ≤ fanout per code, as full (capacity,) buffers sorted by (src, dst)."""
    per_code = torch.rand(codes, experts, generator=gen).argsort(dim=1)[:, :fanout]
    keep = torch.rand(codes, fanout, generator=gen) < 0.6
    src = torch.arange(codes).repeat_interleave(fanout)[keep.reshape(-1)]
    dst = per_code.reshape(-1)[keep.reshape(-1)]
    pick = torch.randperm(src.numel(), generator=gen)[:n]
    src, dst = src[pick], dst[pick]
    order = torch.argsort(src * experts + dst)
    src, dst = src[order], dst[order]
    k = src.numel()
    full_src = torch.full((capacity,), INACTIVE_SRC, dtype=torch.int32)
    full_dst = torch.zeros(capacity, dtype=torch.int32)
    full_score = torch.zeros(capacity, dtype=torch.int8)
    full_src[:k], full_dst[:k] = src.to(torch.int32), dst.to(torch.int32)
    full_score[:k] = torch.randint(-127, 128, (k,), generator=gen, dtype=torch.int8)
    return full_src, full_dst, full_score, k


def test_edge_attr_and_bonus_formula():
    score = torch.tensor([-127, -9, -8, 0, 8, 9, 40, 127], dtype=torch.int8)
    attr = edge_attr_from_score(score, 8)
    assert attr.dtype == torch.int8
    assert attr.tolist() == [-1, -1, 0, 0, 0, 1, 1, 1]
    rule = GraphRule()
    bonus = edge_bonus(attr, score, rule)
    expected = [-(1 + 127 / 32), -(1 + 9 / 32), 0, 0, 0, 1 + 9 / 32, 1 + 40 / 32, 1 + 127 / 32]
    torch.testing.assert_close(bonus, torch.tensor(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(edge_bonus(attr, score, GraphRule(bonus_scale=0.5)), torch.tensor(expected) * 0.5)


def test_lookup_sorted_edges_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    src, dst, score, k = _sorted_edges(gen, codes=50, experts=8, fanout=3, n=90, capacity=128)
    codes = torch.randint(0, 60, (200,), generator=gen)  # some codes have no edge, some are unseen
    slots, valid = lookup_sorted_edges(src, codes, 3)
    for t in range(codes.numel()):
        want = sorted(i for i in range(k) if int(src[i]) == int(codes[t]))
        got = sorted(int(s) for s, v in zip(slots[t], valid[t]) if v)
        assert got == want
    assert int(slots.max()) < 128


def test_lookup_dense_edges():
    codes = torch.tensor([0, 3, 1])
    assert lookup_dense_edges(codes, 2).tolist() == [[0, 1], [6, 7], [2, 3]]


def test_select_experts_merges_duplicates_and_applies_bonus():
    gen = torch.Generator().manual_seed(1)
    T, E, F, m, k = 64, 10, 3, 2, 3
    scores = torch.randn(T, E, generator=gen)
    bias = torch.randn(E, generator=gen) * 0.1
    edge_expert = torch.stack([torch.randperm(E, generator=gen)[:F] for _ in range(T)])
    edge_bonus_ = torch.randn(T, F, generator=gen) * 2
    valid = torch.rand(T, F, generator=gen) < 0.7
    sel = select_experts(scores, bias, edge_expert, edge_bonus_, valid, k, m)
    for t in range(T):
        s = scores[t] + bias
        cands = {int(e): 0.0 for e in s.topk(m).indices}
        for e, b, v in zip(edge_expert[t].tolist(), edge_bonus_[t].tolist(), valid[t].tolist()):
            if v:
                cands[e] = b
        ranked = sorted(cands, key=lambda e: -(float(s[e]) + cands[e]))
        if len(ranked) >= k:
            assert sel.expert[t].tolist() == ranked[:k]
            torch.testing.assert_close(sel.bonus[t], torch.tensor([cands[e] for e in ranked[:k]]))
            edge_set = {e for e, v in zip(edge_expert[t].tolist(), valid[t].tolist()) if v}
            assert sel.via_edge[t].tolist() == [e in edge_set for e in ranked[:k]]
        assert len(set(sel.expert[t].tolist())) == k  # no expert twice


def test_gate_softmax_normalises_per_token():
    gen = torch.Generator().manual_seed(2)
    token = torch.arange(20).repeat_interleave(3)
    logits = torch.randn(60, generator=gen)
    gates = gate_softmax(logits, token, 20)
    torch.testing.assert_close(gates.view(20, 3), torch.softmax(logits.view(20, 3), dim=1))


def test_dispatch_combine_matches_loop():
    gen = torch.Generator().manual_seed(3)
    T, D, E, k = 30, 5, 6, 2
    x = torch.randn(T, D, generator=gen)
    mats = [torch.randn(D, 4, generator=gen) for _ in range(E)]
    fns = [lambda z, w=w: z @ w for w in mats]
    token = torch.arange(T).repeat_interleave(k)
    expert = torch.stack([torch.randperm(E - 1, generator=gen)[:k] for _ in range(T)]).reshape(-1)  # expert E-1 idle
    gate = torch.rand(T * k, generator=gen)
    calls = []

    def grouped(xs, offsets):  # a grouped layer: rows of expert e are offsets[e-1]..offsets[e]
        calls.append(offsets.clone())
        ends = offsets.tolist()
        return torch.cat([fns[e](xs[a:b]) for e, (a, b) in enumerate(zip([0] + ends[:-1], ends))])

    y = dispatch_combine(x, token, expert, gate, grouped, E)
    ref = torch.zeros(T, 4)
    for p in range(T * k):
        ref[token[p]] += gate[p] * (x[token[p]] @ mats[expert[p]])
    torch.testing.assert_close(y, ref)
    assert len(calls) == 1  # all experts in one call
    counts = torch.bincount(expert, minlength=E)
    assert torch.equal(calls[0], counts.cumsum(0).to(torch.int32)) and counts[E - 1] == 0


def test_pair_votes_and_aggregation():
    grad = torch.tensor([0.5, -2.0, 0.0, float("nan"), -1e-9, float("inf")])
    assert pair_votes(grad).tolist() == [-1, 1, 0, 0, 1, 0]
    assert pair_votes(grad).dtype == torch.int32
    code = torch.tensor([3, 1, 3, 1, 3, 0])
    expert = torch.tensor([2, 0, 2, 0, 1, 2])
    votes = torch.tensor([1, 1, 1, -1, -1, 1], dtype=torch.int32)
    c, e, v = aggregate_votes(code, expert, votes, num_experts=4)
    assert list(zip(c.tolist(), e.tolist(), v.tolist())) == [(0, 2, 1), (1, 0, 0), (3, 1, -1), (3, 2, 2)]


def test_vote_sink_accumulates_and_empties():
    sink = VoteSink(num_experts=3)
    sink.add(torch.tensor([0, 1]), torch.tensor([2, 2]), torch.tensor([1, -1], dtype=torch.int32))
    sink.add(torch.tensor([0]), torch.tensor([2]), torch.tensor([1], dtype=torch.int32))
    assert len(sink) == 2
    c, e, v = sink.take(torch.device("cpu"))
    assert list(zip(c.tolist(), e.tolist(), v.tolist())) == [(0, 2, 2), (1, 2, -1)]
    assert len(sink) == 0 and sink.take(torch.device("cpu"))[0].numel() == 0


def test_edge_vote_function_passes_gradient_and_votes():
    logit = torch.tensor([0.3, -0.2, 1.0], requires_grad=True)
    bonus = torch.tensor([1.0, 0.0, -2.0])
    sink = VoteSink(num_experts=4)
    out = EdgeVoteFunction.apply(logit, bonus, torch.tensor([5, 5, 7]), torch.tensor([1, 2, 1]), sink)
    torch.testing.assert_close(out, logit.detach() + bonus)
    (out * torch.tensor([-1.0, 2.0, 0.0])).sum().backward()
    torch.testing.assert_close(logit.grad, torch.tensor([-1.0, 2.0, 0.0]))
    c, e, v = sink.take(torch.device("cpu"))
    assert list(zip(c.tolist(), e.tolist(), v.tolist())) == [(5, 1, 1), (5, 2, -1), (7, 1, 0)]


def test_match_edges_matches_brute_force():
    gen = torch.Generator().manual_seed(4)
    src, dst, score, k = _sorted_edges(gen, codes=40, experts=6, fanout=3, n=70, capacity=100)
    code = torch.randint(0, 45, (300,), generator=gen)
    expert = torch.randint(0, 6, (300,), generator=gen)
    slot = match_edges(src, dst, code, expert, 3)
    for i in range(300):
        want = [j for j in range(k) if int(src[j]) == int(code[i]) and int(dst[j]) == int(expert[i])]
        assert int(slot[i]) == (want[0] if want else -1)


def test_apply_score_votes_clamps_and_saturates():
    score = torch.tensor([0, 126, -126, 5, 7], dtype=torch.int8)
    new = apply_score_votes(score, torch.tensor([0, 1, 2, 3]), torch.tensor([50, 3, -9, -1], dtype=torch.int32), 2)
    assert new.tolist() == [2, 127, -127, 4, 7]
    assert score.tolist() == [0, 126, -126, 5, 7]  # input untouched


def test_top_per_code_tie_breaks():
    src = torch.tensor([1, 1, 1, 2, 1])
    score = torch.tensor([5, 3, 5, 0, 3], dtype=torch.int8)
    is_new = torch.tensor([True, False, False, True, True])
    # code 1 keeps its two best: the existing 5 beats the new 5; then the new 5 beats both 3s.
    assert top_per_code(src, score, is_new, 2).tolist() == [True, False, True, True, False]
    assert top_per_code(src, score, is_new, 1).tolist() == [False, False, True, True, False]


def _check_active(src, dst, score, n, capacity, fanout, experts):
    assert src.shape == (capacity,) and src.dtype == torch.int32
    assert 0 <= n <= capacity
    assert bool((src[n:] == INACTIVE_SRC).all())
    key = src[:n].long() * experts + dst[:n].long()
    assert bool((key[1:] > key[:-1]).all())  # sorted, distinct
    if n:
        assert int(torch.bincount(src[:n].long()).max()) <= fanout


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), capacity=st.integers(1, 40), fanout=st.integers(1, 4),
       rounds=st.integers(1, 12))
def test_merge_active_edges_never_exceeds_capacity(seed, capacity, fanout, rounds):
    gen = torch.Generator().manual_seed(seed)
    E, codes = 6, 25
    src = torch.full((capacity,), INACTIVE_SRC, dtype=torch.int32)
    dst = torch.zeros(capacity, dtype=torch.int32)
    score = torch.zeros(capacity, dtype=torch.int8)
    n = 0
    for _ in range(rounds):
        m = int(torch.randint(0, 30, (1,), generator=gen))
        key = torch.unique(torch.randint(0, codes * E, (m,), generator=gen))
        existing = src[:n].long() * E + dst[:n].long()
        key = key[~torch.isin(key, existing)]
        new_score = torch.randint(-127, 128, (key.numel(),), generator=gen, dtype=torch.int8)
        before = {(int(s), int(d)): int(c) for s, d, c in zip(src[:n], dst[:n], score[:n])}
        res = merge_active_edges(src, dst, score, n, key // E, key % E, new_score, fanout=fanout,
                                 capacity=capacity, num_experts=E)
        _check_active(res.src, res.dst, res.score, res.num_active, capacity, fanout, E)
        after = {(int(s), int(d)): int(c) for s, d, c in zip(res.src[:res.num_active], res.dst[:res.num_active],
                                                             res.score[:res.num_active])}
        pool = dict(before)
        pool.update({(int(k) // E, int(k) % E): int(c) for k, c in zip(key, new_score)})
        assert set(after) <= set(pool) and all(pool[p] == after[p] for p in after)
        assert res.inserted == len(set(after) - set(before))
        assert res.evicted == len(set(before) - set(after))
        # Everything dropped scored no higher than every kept edge of the same code (per-code
        # cap) or than the global minimum kept (capacity cap).
        if len(pool) > len(after) and after:
            lowest_kept = min(after.values())
            for p in set(pool) - set(after):
                same_code = [after[q] for q in after if q[0] == p[0]]
                assert pool[p] <= lowest_kept or (len(same_code) == fanout and pool[p] <= min(same_code))
        src, dst, score, n = res.src, res.dst, res.score, res.num_active


def test_rewire_dense_edges_keeps_fanout_and_replaces_lowest():
    E, F = 6, 2
    edge_index = torch.tensor([[0, 0, 1, 1, 2, 2], [1, 4, 0, 5, 2, 3]], dtype=torch.int32)
    score = torch.tensor([3, -2, 10, 9, 0, 0], dtype=torch.int8)
    ei, sc, replaced = rewire_dense_edges(edge_index, score, torch.tensor([0, 1, 0]), torch.tensor([0, 1, 5]),
                                          torch.tensor([2, 2, 1], dtype=torch.int8), fanout=F, num_experts=E)
    # code 0: (0,4,-2) is replaced by the new (0,0,2); (0,5,1) loses to (0,1,3) and (0,0,2).
    # code 1: its scores 10, 9 beat the new 2. code 2 untouched.
    assert ei.tolist() == [[0, 0, 1, 1, 2, 2], [0, 1, 0, 5, 2, 3]]
    assert sc.tolist() == [2, 3, 10, 9, 0, 0]
    assert replaced == 1
    assert edge_index[1].tolist() == [1, 4, 0, 5, 2, 3]  # inputs untouched


def test_load_bias_update_signs_and_saturation():
    bias = torch.tensor([0, 0, 127, -127], dtype=torch.int8)
    load = torch.tensor([100, 10, 5, 85])  # mean 50
    new = load_bias_update(bias, load, step=3, tolerance=0.1)
    assert new.tolist() == [-3, 3, 127, -127]  # both ends saturate
    assert load_bias_update(bias, torch.tensor([50, 52, 48, 50]), 3, 0.1).tolist() == bias.tolist()
    assert load_bias_update(bias, torch.zeros(4, dtype=torch.long), 3, 0.1).tolist() == bias.tolist()


def test_graph_rule_rejects_bad_values():
    with pytest.raises(ValueError, match="attr_threshold"):
        GraphRule(attr_threshold=200)
    with pytest.raises(ValueError, match="max_score_step"):
        GraphRule(max_score_step=0)
    with pytest.raises(ValueError, match="insert_min_votes"):
        GraphRule(insert_min_votes=0)
