"""MoEGraph: reference equivalence, integer-only state, graph learning, exports, bad input."""

from __future__ import annotations

import copy
import pathlib
import sysconfig

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from ternary_graph.graph.moegraph import MoEGraph, update_graphs
from ternary_graph.graph.routing import INACTIVE_SRC, GraphRule
from ternary_graph.nn.ffn import TernarySwiGLU
from ternary_graph.ternary import TernaryOptimizer, UpdateRule


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _float_entries(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values() if t.dtype.is_floating_point)


def _random_edges(moe: MoEGraph, gen: torch.Generator, fill: float = 0.7):
    """Distinct random edges (≤ fanout per code) with scores spread over the whole int8 range."""
    n_codes, E, Fo = moe.codebook_size, moe.num_experts, moe.fanout
    dst = torch.rand(n_codes, E, generator=gen).argsort(dim=1)[:, :Fo].reshape(-1)
    src = torch.arange(n_codes).repeat_interleave(Fo)
    if moe.mode == "large":
        keep = torch.rand(src.numel(), generator=gen) < fill
        src, dst = src[keep][:moe.capacity], dst[keep][:moe.capacity]
    score = torch.randint(-127, 128, (src.numel(),), generator=gen, dtype=torch.int8)
    return src, dst, score


# ------------------------------------------------------------------------------------------------
# reference: the same routing written as a plain-torch loop over tokens
# ------------------------------------------------------------------------------------------------
def reference_forward(moe: MoEGraph, x2: torch.Tensor, codes: torch.Tensor):
    """Loop over tokens with dequantised float weights as leaves; returns the output and leaves."""
    C = moe.centroids.weight.dequantize().requires_grad_()
    gu, down = moe.experts.gate_up, moe.experts.down
    W1 = [gu.weight.dequantize()[gu.group_rows(e)].requires_grad_() for e in range(moe.num_experts)]
    W2 = [down.weight.dequantize()[down.group_rows(e)].requires_grad_() for e in range(moe.num_experts)]
    src, dst, attr, score = (t.tolist() for t in moe.active_edges())
    bias = moe.load_bias.float() * moe.rule.load_unit
    H, k, m = moe.expert_hidden, moe.top_k, moe.centroid_candidates
    ys, bonus_leaves, pairs = [], [], []
    for t in range(x2.shape[0]):
        c = int(codes[t])
        s = C @ x2[t]
        sel = s.detach() + bias
        cands = {int(e): 0.0 for e in sel.topk(m).indices} if m else {}
        for j in range(len(src)):
            if src[j] == c:
                cands[dst[j]] = attr[j] * (1 + abs(score[j]) / 32) * moe.rule.bonus_scale
        ranked = sorted(cands, key=lambda e: -(float(sel[e]) + cands[e]))[:k]
        b = torch.tensor([cands[e] for e in ranked], requires_grad=True)
        g = torch.softmax(s[ranked] + b, dim=0)
        y = 0
        for i, e in enumerate(ranked):
            h = W1[e] @ x2[t]
            y = y + g[i] * (W2[e] @ (F.silu(h[:H]) * h[H:]))
        ys.append(y)
        bonus_leaves.append(b)
        pairs += [(c, e) for e in ranked]
    return torch.stack(ys), C, W1, W2, bonus_leaves, pairs


def _sign_agrees(votes: torch.Tensor, grad: torch.Tensor) -> None:
    """int8 votes cast from zero equal sign(grad) wherever the gradient is not a rounding hair."""
    clear = grad.abs() > 1e-5 * grad.abs().max()
    assert int(clear.sum()) > 0
    assert torch.equal(votes[clear].long(), torch.sign(grad[clear]).long())


@pytest.mark.parametrize("mode", ["dense", "large"])
def test_forward_backward_matches_loop_reference(mode):
    gen = torch.Generator().manual_seed(11)
    moe = MoEGraph(12, 6, 10, codebook_size=20, top_k=2, fanout=3, mode=mode,
                   capacity=40 if mode == "large" else None, centroid_candidates=2, generator=gen)
    moe.set_edges(*_random_edges(moe, gen))
    moe.load_bias.copy_(torch.randint(-60, 60, (6,), generator=gen, dtype=torch.int8))
    x = torch.randn(48, 12, generator=gen)
    codes = torch.randint(0, 20, (48,), generator=gen)
    w = torch.randn(48, 12, generator=gen)

    xa = x.clone().requires_grad_()
    y = moe(xa, codes)
    (y * w).sum().backward()
    code_v, exp_v, votes = moe._votes.take(x.device)

    xb = x.clone().requires_grad_()
    y_ref, C, W1, W2, bonus_leaves, pairs = reference_forward(moe, xb, codes)
    (y_ref * w).sum().backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    routing = moe.last_routing
    assert routing.expert.tolist() == [e for _, e in pairs]
    # The edges decide part of the routing: some pair is an edge outside the centroid top-2.
    assert bool(routing.via_edge.any()) and bool((~routing.via_edge).any())
    # Votes: the centroid table and the experts got sign(dW) of the reference; the edges got
    # -sign(∂L/∂bonus) summed per (code, expert).
    _sign_agrees(moe.centroids.weight.T_accum, C.grad)
    for e in set(routing.expert.tolist()):
        gu, down = moe.experts.gate_up, moe.experts.down
        _sign_agrees(gu.weight.T_accum[gu.group_rows(e)], W1[e].grad)
        _sign_agrees(down.weight.T_accum[down.group_rows(e)], W2[e].grad)
    ref_votes: dict[tuple[int, int], int] = {}
    for (c, e), g in zip(pairs, torch.cat([b.grad for b in bonus_leaves]).tolist()):
        ref_votes[(c, e)] = ref_votes.get((c, e), 0) - (g > 0) + (g < 0)
    assert dict(zip(zip(code_v.tolist(), exp_v.tolist()), votes.tolist())) == ref_votes


def test_batched_input_shape_and_dtypes():
    gen = torch.Generator().manual_seed(12)
    moe = MoEGraph(8, 4, 8, codebook_size=30, generator=gen)
    x = torch.randn(3, 5, 8, generator=gen)
    codes = torch.randint(0, 30, (3, 5), generator=gen, dtype=torch.int32)
    y = moe(x, codes)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.reshape(15, 8), moe(x.reshape(15, 8), codes.reshape(15)))
    yb = moe(x.to(torch.bfloat16), codes)
    assert yb.dtype == torch.bfloat16 and bool(torch.isfinite(yb).all())
    assert moe(x[:0], codes[:0]).shape == (0, 5, 8)


def test_large_mode_over_ten_million_codes_is_integer_and_bounded():
    gen = torch.Generator().manual_seed(13)
    moe = MoEGraph(16, 8, 16, codebook_size=10_000_000, capacity=4096, generator=gen)
    assert moe.mode == "large"
    assert moe.edge_index.shape == (2, 0) and moe.edge_index.dtype == torch.int32
    assert _float_entries(moe) == 0
    assert all(not b.dtype.is_floating_point for b in moe.buffers())
    edge_state = {k: v for k, v in moe.state_dict().items() if k.startswith(("active_edge", "num_active"))}
    assert sum(v.numel() * v.element_size() for v in edge_state.values()) == 10 * 4096 + 8
    small = MoEGraph(16, 8, 16, codebook_size=100_000, capacity=4096, mode="large", generator=gen)
    assert {k: (v.shape, v.dtype) for k, v in small.state_dict().items()} == \
           {k: (v.shape, v.dtype) for k, v in moe.state_dict().items()}
    # Forward / backward / update with codes at the far end of the codebook.
    x = torch.randn(64, 16, generator=gen, requires_grad=True)
    codes = 9_999_990 + torch.randint(0, 10, (64,), generator=gen)
    for _ in range(3):
        y = moe(x, codes)
        assert bool(torch.isfinite(y).all())
        (y ** 2).mean().backward()
        stats = moe.update_graph()
    assert bool(torch.isfinite(x.grad).all()) and bool(x.grad.abs().sum() > 0)
    assert int(moe.centroids.weight.T_accum.abs().sum()) > 0
    assert stats.num_active == int(moe.num_active) <= 4096
    src = moe.active_edges()[0]
    assert bool(((src >= 9_999_990) & (src < 10_000_000)).all())


def test_dense_mode_state_and_auto_choice():
    gen = torch.Generator().manual_seed(14)
    moe = MoEGraph(8, 6, 8, codebook_size=50, fanout=3, generator=gen)
    assert moe.mode == "dense" and moe.edge_index.shape == (2, 150) and moe.edge_index.dtype == torch.int32
    assert moe.edge_score.dtype == torch.int8 and _float_entries(moe) == 0
    src, dst = moe.edge_index.long()
    assert torch.equal(src, torch.arange(50).repeat_interleave(3))
    assert bool((dst.view(50, 3).diff(dim=1) > 0).all())  # distinct experts per code, sorted
    assert MoEGraph(8, 6, 8, codebook_size=50, fanout=3, dense_limit=149).mode == "large"
    assert MoEGraph(8, 6, 8, codebook_size=50, fanout=3, capacity=100).mode == "large"


def test_meta_device_construction():
    moe = MoEGraph(64, 16, 128, codebook_size=10_000_000, device="meta")
    assert moe.active_edge_src.device.type == "meta" and moe.capacity == 1 << 20


def test_state_dict_round_trip_and_strict_dtypes():
    gen = torch.Generator().manual_seed(15)
    moe = MoEGraph(8, 4, 8, codebook_size=40, mode="large", capacity=32, generator=gen)
    moe.set_edges(*_random_edges(moe, gen))
    x = torch.randn(30, 8, generator=gen)
    codes = torch.randint(0, 40, (30,), generator=gen)
    (moe(x, codes) ** 2).sum().backward()
    moe.update_graph()
    other = MoEGraph(8, 4, 8, codebook_size=40, mode="large", capacity=32, generator=torch.Generator().manual_seed(99))
    other.load_state_dict(moe.state_dict())
    moe.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(moe(x, codes), other(x, codes), rtol=0, atol=0)
    bad = dict(moe.state_dict())
    bad["active_edge_score"] = bad["active_edge_score"].float()
    with pytest.raises(ValueError, match="active_edge_score"):
        other.load_state_dict(bad)


def test_eval_mode_casts_no_votes_and_no_load():
    gen = torch.Generator().manual_seed(16)
    moe = MoEGraph(8, 4, 8, codebook_size=10, generator=gen).eval()
    before = {k: v.clone() for k, v in moe.state_dict().items() if not k.startswith(("experts", "centroids"))}
    x = torch.randn(20, 8, generator=gen, requires_grad=True)
    moe(x, torch.randint(0, 10, (20,), generator=gen)).sum().backward()
    stats = moe.update_graph()
    assert stats.pairs_voted == 0 and stats.tokens == 0
    for k, v in before.items():
        assert torch.equal(moe.state_dict()[k], v)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), capacity=st.integers(1, 24), rounds=st.integers(1, 10))
def test_capacity_invariant_over_update_rounds(seed, capacity, rounds):
    gen = torch.Generator().manual_seed(seed)
    moe = MoEGraph(8, 5, 4, codebook_size=1_000_000, fanout=2, capacity=capacity,
                   rule=GraphRule(insert_min_votes=1), generator=gen)
    for _ in range(rounds):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        # Votes as a backward would cast them, straight into the layer's sink: codes from a
        # small set so that existing edges get votes too, experts and signs at random.
        code = torch.randint(0, 12, (n,), generator=gen) * 83_333
        expert = torch.randint(0, 5, (n,), generator=gen)
        votes = torch.randint(-3, 6, (n,), generator=gen, dtype=torch.int32)
        moe._votes.add(code, expert, votes)
        stats = moe.update_graph()
        n_act = int(moe.num_active)
        assert stats.num_active == n_act <= capacity
        src, dst, attr, score = moe.active_edges()
        assert bool((moe.active_edge_src[n_act:] == INACTIVE_SRC).all())
        key = src.long() * 5 + dst.long()
        assert bool((key[1:] > key[:-1]).all())
        if n_act:
            assert int(torch.bincount(src.long()).max()) <= 2
        assert torch.equal(attr, (score > 8).to(torch.int8) - (score < -8).to(torch.int8))


def test_update_graph_moves_scores_inserts_and_evicts():
    moe = MoEGraph(8, 4, 4, codebook_size=100, fanout=2, capacity=3, generator=torch.Generator().manual_seed(17),
                   rule=GraphRule(max_score_step=4, insert_min_votes=2, attr_threshold=3))
    moe.set_edges(torch.tensor([1, 1, 7]), torch.tensor([0, 2, 3]), torch.tensor([10, -5, 0], dtype=torch.int8))
    moe._votes.add(torch.tensor([1, 1, 7, 9, 9]), torch.tensor([0, 2, 3, 1, 2]),
                   torch.tensor([9, -1, 0, 3, 1], dtype=torch.int32))
    stats = moe.update_graph()
    # (1,0): 10+4 (clamped step); (1,2): -5-1; (7,3): 0. (9,1) earns insertion with score 3 and
    # evicts the lowest, (1,2) at -6; (9,2) has one vote, below insert_min_votes.
    src, dst, attr, score = moe.active_edges()
    assert list(zip(src.tolist(), dst.tolist(), score.tolist(), attr.tolist())) == [
        (1, 0, 14, 1), (7, 3, 0, 0), (9, 1, 3, 0)]
    assert (stats.edges_up, stats.edges_down, stats.inserted, stats.evicted) == (1, 1, 1, 1)


def test_dense_update_rewires_lowest_slot_of_a_code():
    moe = MoEGraph(8, 5, 4, codebook_size=3, fanout=2, generator=torch.Generator().manual_seed(25),
                   rule=GraphRule(insert_min_votes=2, max_score_step=3))
    moe.set_edges(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 2, 3, 0, 4]),
                  torch.tensor([5, -4, 1, 2, 0, 0], dtype=torch.int8))
    moe._votes.add(torch.tensor([0, 1, 2]), torch.tensor([3, 0, 1]), torch.tensor([4, 1, -5], dtype=torch.int32))
    stats = moe.update_graph()
    # (0,3) earns 4 votes -> enters at score 3 in place of (0,1) at -4; (1,0) has one vote, not
    # enough; (2,1) is negative: never inserted.
    assert moe.edge_index.tolist() == [[0, 0, 1, 1, 2, 2], [0, 3, 2, 3, 0, 4]]
    assert moe.edge_score.tolist() == [5, 3, 1, 2, 0, 0]
    assert (stats.inserted, stats.evicted, stats.num_active) == (1, 1, 6)


def test_load_bias_moves_against_load():
    gen = torch.Generator().manual_seed(18)
    moe = MoEGraph(8, 4, 4, codebook_size=10, generator=gen)
    # Tokens in a tight bunch: the same two experts win nearly every token, until the bias
    # spreads them. No backward: only the load bias acts.
    x = torch.randn(1, 8, generator=gen) + 0.2 * torch.randn(256, 8, generator=gen)
    codes = torch.zeros(256, dtype=torch.long)
    shares = []
    with torch.no_grad():
        for _ in range(120):
            moe(x, codes)
            shares.append(moe.update_graph().load_max_share)
    assert shares[0] > 0.4
    assert max(shares[-20:]) < 0.32  # uniform is 0.25
    assert int(moe.load_bias.max()) > 0 > int(moe.load_bias.min())


# ------------------------------------------------------------------------------------------------
# learning on real data: byte-trigram features of stdlib sources in 4 clusters
# ------------------------------------------------------------------------------------------------
_STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
_CLUSTERS = (  # four kinds of Python source that byte statistics tell apart
    lambda: sorted((_STDLIB / "encodings").glob("cp*.py")),  # codec tables
    lambda: [_STDLIB / "html" / "entities.py"],  # a big dict literal
    lambda: sorted((_STDLIB / "asyncio").glob("*.py")),  # ordinary code
    lambda: [_STDLIB / "pydoc_data" / "topics.py"],  # English prose in strings
)


def _stdlib_clusters(per_cluster: int = 400, size: int = 256, dim: int = 32):
    """Features (N, dim), cluster labels (N,) and VQ codes (N,) in [0, 32), all deterministic.

    Each token is a window of ``size`` bytes; its feature is log(1 + count) of hashed byte
    trigrams, standardised. Codes: nearest of 32 evenly spaced tokens (a data-drawn codebook).
    """
    feats, labels = [], []
    for k, files in enumerate(_CLUSTERS):
        paths = files()
        if not paths or not all(p.is_file() for p in paths):
            pytest.skip(f"stdlib files of cluster {k} are missing in this Python")
        data = b"".join(p.read_bytes() for p in paths)
        stride = (len(data) - size) // (per_cluster - 1)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        win = buf.unfold(0, size, stride)[:per_cluster]
        h = (win[:, :-2] * 961 + win[:, 1:-1] * 31 + win[:, 2:]) * 2654435761 % (1 << 32) % dim
        counts = torch.zeros(per_cluster, dim).scatter_add_(1, h, torch.ones(h.shape))
        feats.append(torch.log1p(counts))
        labels += [k] * per_cluster
    X = torch.cat(feats)
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    book = X[torch.arange(0, X.shape[0], X.shape[0] // 32)[:32]]
    return X, torch.tensor(labels), torch.cdist(X, book).argmin(dim=1)


def _train_routing(moe: MoEGraph, X, codes, teacher_of_token, steps: int = 150):
    """Targets are frozen copies of the initial experts, the one named per token; the experts
    stay frozen, so the loss only falls if the routing finds each token's teacher expert.
    Centroids (TernaryOptimizer) and the graph (update_graph) learn."""
    teacher = copy.deepcopy(moe.experts)
    with torch.no_grad():
        target = torch.zeros_like(X)
        for e in range(moe.num_experts):
            m = teacher_of_token == e
            if m.any():  # expert e alone: all rows in group e
                offsets = torch.full((moe.num_experts,), int(m.sum()), dtype=torch.int32)
                offsets[:e] = 0
                target[m] = teacher(X[m], offsets)
    opt = TernaryOptimizer([moe.centroids.weight], UpdateRule(threshold=16))
    gen = torch.Generator().manual_seed(1)

    def evaluate():
        moe.eval()
        with torch.no_grad():
            loss = float(((moe(X, codes) - target) ** 2).mean() / target.var())
        moe.train()
        return loss, moe.last_routing

    first, _ = evaluate()
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (256,), generator=gen)
        out = moe(X[idx], codes[idx])
        (((out - target[idx]) ** 2).mean() / target[idx].var()).backward()
        opt.step()
        update_graphs(moe)
    last, routing = evaluate()
    return first, last, routing


@pytest.mark.parametrize("mode", ["dense", "large"])
def test_learns_consistent_routing_of_stdlib_clusters(mode):
    X, Y, codes = _stdlib_clusters()
    gen = torch.Generator().manual_seed(0)
    moe = MoEGraph(32, 8, 32, codebook_size=64, mode=mode, capacity=128 if mode == "large" else None,
                   generator=gen)
    teacher_of_cluster = torch.tensor([1, 3, 5, 7])
    first, last, routing = _train_routing(moe, X, codes, teacher_of_cluster[Y])
    top1 = routing.expert.view(-1, 2)[:, 0]
    assert last < 0.25 * first
    for k in range(4):
        routed = top1[Y == k]
        consistency = float((routed == torch.bincount(routed).argmax()).float().mean())
        assert consistency > 0.7, (k, consistency)
        assert float((routed == teacher_of_cluster[k]).float().mean()) > 0.7
    # Edges that help: most codes have a confirmed (+1) edge to their cluster's teacher expert.
    src, dst, attr, _ = moe.active_edges()
    confirmed = 0
    for c in codes.unique().tolist():
        k = int(torch.bincount(Y[codes == c]).argmax())
        confirmed += bool(((src == c) & (dst == teacher_of_cluster[k]) & (attr == 1)).any())
    assert confirmed >= 0.75 * codes.unique().numel()
    # Load spread: top-2 pairs over 8 experts (uniform share 0.125).
    share = routing.load().float() / routing.expert.numel()
    assert float(share.max()) < 0.2 and float(share.min()) > 0.05


def test_edges_learn_code_specific_routing_centroids_cannot():
    """Teacher expert chosen per code at random: no linear centroid scoring expresses that map,
    the code → expert edges do. Same run with the edge bonus switched off as the control."""
    X, _, codes = _stdlib_clusters()
    teacher_of_code = torch.randint(0, 8, (64,), generator=torch.Generator().manual_seed(5))
    results = {}
    for bonus_scale in (1.0, 0.0):
        moe = MoEGraph(32, 8, 32, codebook_size=64, mode="large", capacity=64,
                       rule=GraphRule(bonus_scale=bonus_scale), generator=torch.Generator().manual_seed(0))
        first, last, routing = _train_routing(moe, X, codes, teacher_of_code[codes])
        hit = float((routing.expert.view(-1, 2)[:, 0] == teacher_of_code[codes]).float().mean())
        results[bonus_scale] = (first, last, hit, moe)
    _, loss_graph, hit_graph, moe = results[1.0]
    _, loss_plain, hit_plain, _ = results[0.0]
    assert hit_graph > 0.9 and hit_plain < 0.6, (hit_graph, hit_plain)
    assert loss_graph < 0.3 * loss_plain
    # Nearly every token's code ends with a confirmed edge to its teacher (codes seen by only a
    # handful of tokens may not: they get too few votes).
    src, dst, attr, _ = moe.active_edges()
    confirmed = torch.tensor([bool(((src == c) & (dst == teacher_of_code[c]) & (attr == 1)).any())
                              for c in range(64)])
    assert float(confirmed[codes].float().mean()) > 0.9


# ------------------------------------------------------------------------------------------------
# exports
# ------------------------------------------------------------------------------------------------
def test_to_pyg_heterodata_validates():
    gen = torch.Generator().manual_seed(19)
    moe = MoEGraph(8, 5, 4, codebook_size=5_000_000, capacity=64, generator=gen)
    src = torch.tensor([4_999_999, 12, 12, 300])
    dst = torch.tensor([4, 0, 3, 2])
    moe.set_edges(src, dst, torch.tensor([20, -30, 1, 100], dtype=torch.int8))
    data = moe.to_pyg()
    assert data.validate()
    store = data["code", "routes_to", "expert"]
    assert store.edge_index.dtype == torch.int32 and store.edge_attr.dtype == torch.int8
    assert store.edge_score.dtype == torch.int8
    assert data["code"].num_nodes == 3 and data["expert"].num_nodes == 5
    back = data["code"].code_id[store.edge_index[0].long()]
    assert back.tolist() == [12, 12, 300, 4_999_999]
    assert store.edge_index[1].tolist() == [0, 3, 2, 4]
    assert store.edge_attr.tolist() == [-1, 0, 1, 1]
    assert store.edge_score.tolist() == [-30, 1, 100, 20]


def test_routing_graph_is_bipartite_pyg():
    gen = torch.Generator().manual_seed(20)
    moe = MoEGraph(8, 6, 4, codebook_size=10, generator=gen)
    with pytest.raises(ValueError, match="forward"):
        moe.routing_graph()
    codes = torch.randint(0, 10, (25,), generator=gen)
    moe(torch.randn(25, 8, generator=gen), codes)
    data = moe.routing_graph()
    assert data.validate()
    ei = data["token", "routed_to", "expert"].edge_index
    assert ei.shape == (2, 50) and data["token"].num_nodes == 25 and data["expert"].num_nodes == 6
    gates = data["token", "routed_to", "expert"].gate
    torch.testing.assert_close(torch.zeros(25).index_add_(0, ei[0], gates), torch.ones(25))
    assert torch.equal(data["token"].code_id, codes)
    assert "_last_routing" not in str(moe.state_dict().keys())


def test_networkx_subgraph_and_graphml_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(21)
    moe = MoEGraph(8, 6, 4, codebook_size=200, fanout=3, generator=gen)
    moe.set_edges(*_random_edges(moe, gen))
    g = moe.to_networkx(top=5)
    codes = [n for n, d in g.nodes(data=True) if d["kind"] == "code"]
    assert len(codes) == 5 and g.number_of_edges() == 15
    # The 5 codes with the largest total |score| were picked.
    src, _, _, score = moe.active_edges()
    total = torch.zeros(200, dtype=torch.long).index_add_(0, src.long(), score.long().abs())
    assert sorted(int(n.split(":")[1]) for n in codes) == sorted(torch.argsort(-total, stable=True)[:5].tolist())
    chosen = moe.to_networkx(codes=torch.tensor([3, 150]))
    assert chosen.number_of_edges() == 6 and chosen.number_of_nodes() == 2 + 6
    usage = torch.zeros(200, dtype=torch.int16)
    usage[[7, 8]] = 1000
    by_usage = moe.to_networkx(top=2, usage=usage)
    assert {n for n, d in by_usage.nodes(data=True) if d["kind"] == "code"} == {"code:7", "code:8"}

    path = tmp_path / "moe.graphml"
    moe.write_graphml(path, top=5)
    back = nx.read_graphml(path)
    assert back.number_of_nodes() == g.number_of_nodes() and back.number_of_edges() == g.number_of_edges()
    assert dict(back.nodes(data=True)) == dict(g.nodes(data=True))
    assert {(u, v): d for u, v, d in back.edges(data=True)} == {(u, v): d for u, v, d in g.edges(data=True)}


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
def test_torch_compile_matches_eager():
    gen = torch.Generator().manual_seed(22)
    moe = MoEGraph(8, 4, 8, codebook_size=30, generator=gen)
    x = torch.randn(20, 8, generator=gen)
    codes = torch.randint(0, 30, (20,), generator=gen)

    def run(fn):
        for s in (moe.centroids.weight, moe.experts.gate_up.weight, moe.experts.down.weight):
            s.T_accum.zero_()
            s.E_accum.zero_()
        xi = x.clone().requires_grad_()
        y = fn(xi, codes)
        (y ** 2).sum().backward()
        return y.detach(), xi.grad, moe._votes.take(x.device), moe.centroids.weight.T_accum.clone()

    eager = run(moe)
    torch._dynamo.reset()
    compiled = run(torch.compile(moe, backend="aot_eager"))
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    assert all(torch.equal(a, b) for a, b in zip(compiled[2], eager[2]))
    assert torch.equal(compiled[3], eager[3])
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(capacity=0), "capacity"),
    (dict(fanout=9), "fanout=9"),
    (dict(top_k=9), "top_k=9"),
    (dict(top_k=3, centroid_candidates=2, mode="large"), "top_k=3"),
    (dict(top_k=3, centroid_candidates=1, fanout=2, mode="dense"), "top_k=3"),
    (dict(mode="sparse"), "sparse"),
    (dict(codebook_size=0), "codebook_size"),
    (dict(codebook_size=2**31), "codebook_size"),
    (dict(centroid_candidates=-1), "centroid_candidates"),
    (dict(mode="dense", capacity=7), "capacity=7"),
])
def test_bad_construction_raises(kwargs, match):
    args = dict(codebook_size=100)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MoEGraph(8, 8, 8, **args)


def test_bad_forward_input_raises():
    moe = MoEGraph(8, 4, 8, codebook_size=50, generator=torch.Generator().manual_seed(23))
    x = torch.randn(6, 8)
    with pytest.raises(ValueError, match=r"code_ids must lie in \[0, 50\), got 50"):
        moe(x, torch.tensor([0, 1, 2, 3, 4, 50]))
    with pytest.raises(ValueError, match="-1"):
        moe(x, torch.tensor([0, 1, -1, 3, 4, 5]))
    with pytest.raises(TypeError, match="float32"):
        moe(x, torch.zeros(6))
    with pytest.raises(ValueError, match=r"\(6,\)"):
        moe(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="dim=8"):
        moe(torch.randn(6, 7), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="fanout=4"):
        moe.set_edges(torch.tensor([1, 1, 1]), torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.int8))
    large = MoEGraph(8, 4, 8, codebook_size=50, fanout=2, capacity=5, generator=torch.Generator().manual_seed(23))
    with pytest.raises(ValueError, match="fanout=2"):
        large.set_edges(torch.tensor([1, 1, 1]), torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="capacity=5"):
        large.set_edges(torch.arange(6), torch.zeros(6), torch.zeros(6, dtype=torch.int8))
    with pytest.raises(ValueError, match="duplicates"):
        large.set_edges(torch.tensor([3, 3]), torch.tensor([1, 1]), torch.zeros(2, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"dst must lie in \[0, 4\)"):
        large.set_edges(torch.tensor([3]), torch.tensor([4]), torch.zeros(1, dtype=torch.int8))


def test_ternary_swiglu():
    gen = torch.Generator().manual_seed(24)
    ffn = TernarySwiGLU(10, 6, generator=gen)
    x = torch.randn(4, 10, generator=gen)
    W1, W2 = ffn.gate_up.weight.dequantize(), ffn.down.weight.dequantize()
    h = x @ W1.T
    torch.testing.assert_close(ffn(x), (F.silu(h[:, :6]) * h[:, 6:]) @ W2.T, rtol=1e-5, atol=1e-5)
    assert _float_entries(ffn) == 0
    with pytest.raises(ValueError, match="hidden"):
        TernarySwiGLU(4, 0)
