"""Routing maths of MoEGraph as pure functions on tensors.

Nothing here owns state: the layer (``moegraph.py``) passes its integer buffers in and writes
what these functions return back into them. The pieces, in the order a step uses them:

1. **Edge lookup.** Edges are kept sorted by source code, so the edges of a batch's codes are
   found with one ``torch.searchsorted`` (O(tokens · log capacity)); every code has at most
   ``fanout`` edges, so the candidates of a token fit a fixed (tokens, fanout) window.
2. **Selection.** Candidates are the token's edge experts plus its top ``centroid_candidates``
   experts by centroid score (duplicates merge into one candidate). Selection logit
   ``= centroid score + edge bonus + load bias · load_unit``; the top ``top_k`` are routed.
3. **Gates.** ``torch_geometric.utils.softmax`` over each token's routed experts of
   ``centroid score + edge bonus``. The load bias steers selection only, never the gate
   values (as in auxiliary-loss-free balancing), so it does not distort the outputs.
4. **Dispatch / combine.** Pairs are sorted by expert, all experts run in one grouped call
   on the sorted rows (offsets stay on the device), and
   ``torch_geometric.utils.scatter(reduce='sum')`` adds the gated outputs back per token.
5. **Votes.** The edge bonus of each routed pair enters the gate logit through
   :class:`EdgeVoteFunction` (``centroid score + bonus``), whose backward receives
   ``∂L/∂logit`` of every pair and turns it into the int32 vote ``-sign(∂L/∂logit)``
   (+1: raising this pair's gate lowers the loss), summed per (code, expert) pair into a
   :class:`VoteSink`. No float is kept.
6. **Graph update.** Matched edges move their int8 score by the clamped net vote (saturating);
   unmatched pairs with enough positive votes are inserted; per code at most ``fanout``
   edges and in all at most ``capacity`` edges survive, the lowest scores evicted first.

Edge bonus (the exact formula, ``edge_bonus``)::

    attr  = +1 if score > attr_threshold, -1 if score < -attr_threshold, else 0
    bonus = bonus_scale * attr * (1 + |score| / score_unit)

with the defaults ``attr_threshold = 8``, ``score_unit = 32``, ``bonus_scale = 1``: a
neutral edge adds 0, a confirmed edge adds between +1.28 and +4.97 logits, a suppressing one
subtracts as much. Centroid scores are unit-variance at init (see ``MoEGraph``), so a
confirmed edge outweighs typical centroid differences without making them irrelevant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch_geometric.utils import scatter, softmax

from ..ternary.saturating import saturating_add

INACTIVE_SRC = 2**31 - 1  # src of an unused slot in the sorted active-edge arrays; above every code id
MAX_CODEBOOK_SIZE = INACTIVE_SRC  # code ids must stay below the sentinel


@dataclass
class GraphRule:
    """Hyper-parameters of edge bonus, edge learning and load balancing (all integer state)."""

    attr_threshold: int = 8  # |score| above which an edge's ternary attr is ±1
    score_unit: int = 32  # score units per extra logit of bonus: bonus = a·scale·(1 + |s|/unit)
    bonus_scale: float = 1.0  # logits of bonus of an edge just past the threshold (before |s|/unit)
    max_score_step: int = 2  # most an edge score moves in one update, whatever the net vote
    insert_min_votes: int = 2  # net positive votes a non-edge pair needs in one update to be inserted
    load_step: int = 1  # how much an expert's int8 load bias moves per update
    load_unit: float = 1.0 / 32  # selection logits per unit of load bias (±127 -> ±3.97)
    load_tolerance: float = 0.1  # no nudge while |load - mean| <= load_tolerance · mean

    def __post_init__(self) -> None:
        if not isinstance(self.attr_threshold, int) or not 0 <= self.attr_threshold < 127:
            raise ValueError(f"attr_threshold must be an int in 0..126, got {self.attr_threshold!r}")
        if not isinstance(self.score_unit, int) or self.score_unit < 1:
            raise ValueError(f"score_unit must be a positive int, got {self.score_unit!r}")
        if not self.bonus_scale >= 0:
            raise ValueError(f"bonus_scale must be >= 0, got {self.bonus_scale!r}")
        if not isinstance(self.max_score_step, int) or not 1 <= self.max_score_step <= 127:
            raise ValueError(f"max_score_step must be an int in 1..127, got {self.max_score_step!r}")
        if not isinstance(self.insert_min_votes, int) or self.insert_min_votes < 1:
            raise ValueError(f"insert_min_votes must be a positive int, got {self.insert_min_votes!r}")
        if not isinstance(self.load_step, int) or not 0 <= self.load_step <= 127:
            raise ValueError(f"load_step must be an int in 0..127, got {self.load_step!r}")
        if not self.load_unit >= 0:
            raise ValueError(f"load_unit must be >= 0, got {self.load_unit!r}")
        if not self.load_tolerance >= 0:
            raise ValueError(f"load_tolerance must be >= 0, got {self.load_tolerance!r}")


# --------------------------------------------------------------------------------------------
# edge attributes and bonus
# --------------------------------------------------------------------------------------------
def edge_attr_from_score(score: torch.Tensor, threshold: int) -> torch.Tensor:
    """Ternary edge sign: +1 where score > threshold, -1 where score < -threshold, else 0.

    Shapes: score (n,) int8 -> (n,) int8
    """
    s = score.to(torch.int16)
    return ((s > threshold).to(torch.int8) - (s < -threshold).to(torch.int8))


def edge_bonus(attr: torch.Tensor, score: torch.Tensor, rule: GraphRule,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``bonus_scale · attr · (1 + |score| / score_unit)`` (see the module docstring).

    Shapes: attr, score (*) int8 -> (*) ``dtype``
    """
    mag = 1.0 + score.to(dtype).abs() / rule.score_unit
    return attr.to(dtype) * mag * rule.bonus_scale


# --------------------------------------------------------------------------------------------
# lookup
# --------------------------------------------------------------------------------------------
def lookup_sorted_edges(src: torch.Tensor, codes: torch.Tensor, fanout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge slots out of each code, for edges sorted by ``src`` (inactive slots hold INACTIVE_SRC).

    Shapes:
        src: (capacity,) int32, non-decreasing
        codes: (T,) int64
        returns: slots (T, fanout) int64 in [0, capacity), valid (T, fanout) bool
    """
    n = src.shape[0]
    offsets = torch.arange(fanout, device=codes.device)
    if n == 0:
        empty = torch.zeros(codes.shape[0], fanout, dtype=torch.long, device=codes.device)
        return empty, empty.bool()
    q = codes.to(src.dtype)
    lo = torch.searchsorted(src, q)
    hi = torch.searchsorted(src, q, right=True)
    slots = lo[:, None] + offsets
    valid = slots < hi[:, None]
    return slots.clamp_(max=n - 1), valid


def lookup_dense_edges(codes: torch.Tensor, fanout: int) -> torch.Tensor:
    """Dense layout: code ``c`` owns slots ``c·fanout .. c·fanout + fanout - 1``.

    Shapes: codes (T,) int64 -> (T, fanout) int64
    """
    return codes[:, None] * fanout + torch.arange(fanout, device=codes.device)


# --------------------------------------------------------------------------------------------
# selection, gates, dispatch
# --------------------------------------------------------------------------------------------
@dataclass
class Selection:
    """Routed experts of every token. Shapes: all (T, top_k)."""

    expert: torch.Tensor  # int64, best first
    bonus: torch.Tensor  # float, edge bonus of the pair (0 where no edge)
    via_edge: torch.Tensor  # bool, the pair is an edge of the token's code


@torch.no_grad()
def select_experts(scores: torch.Tensor, select_bias: torch.Tensor | None, edge_expert: torch.Tensor,
                   edge_bonus_: torch.Tensor, edge_valid: torch.Tensor, top_k: int,
                   centroid_candidates: int) -> Selection:
    """Top-k over each token's candidates (edge experts ∪ top centroid experts), duplicates merged.

    Works in candidate space, (T, centroid_candidates + fanout), not over all experts: the only
    (T, E) pass is the centroid top-k. An expert proposed both by its centroid and by an edge
    becomes one candidate carrying the edge's bonus. The edges of one code are distinct
    experts, and invalid edge slots score -inf; the caller guarantees ``top_k`` never exceeds
    the distinct candidates.

    Shapes:
        scores: (T, E) float centroid scores
        select_bias: (E,) float load term added for selection only, or None
        edge_expert: (T, F) int64; edge_bonus_: (T, F) float; edge_valid: (T, F) bool
        returns: :class:`Selection` of (T, top_k)
    """
    sel = scores.detach().float()
    if select_bias is not None:
        sel = sel + select_bias.float()
    edge_expert = torch.where(edge_valid, edge_expert, 0)
    bonus = torch.where(edge_valid, edge_bonus_.float(), 0.0)
    c_val, c_idx = sel.topk(centroid_candidates, dim=1)  # (T, m)
    dup = (c_idx[:, :, None] == edge_expert[:, None, :]) & edge_valid[:, None, :]  # (T, m, F)
    c_bonus = (dup.float() * bonus[:, None, :]).sum(dim=2)
    e_keep = edge_valid & ~dup.any(dim=1)  # the centroid entry already stands for a duplicate
    e_val = torch.where(e_keep, sel.gather(1, edge_expert) + bonus, float("-inf"))
    cand_expert = torch.cat([c_idx, edge_expert], dim=1)
    cand_logit = torch.cat([c_val + c_bonus, e_val], dim=1)
    cand_bonus = torch.cat([c_bonus, bonus], dim=1)
    cand_edge = torch.cat([dup.any(dim=2), edge_valid], dim=1)
    top = cand_logit.topk(top_k, dim=1).indices
    return Selection(expert=cand_expert.gather(1, top), bonus=cand_bonus.gather(1, top).to(scores.dtype),
                     via_edge=cand_edge.gather(1, top))


_HASH_MULTIPLIER = 0x9E3779B1  # Knuth's multiplicative hash (2**32 / golden ratio, odd)


def hash_experts(codes: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """Routing by code id alone (the ablation's hash router): ``top_k`` distinct experts per code,
    the same for every token and every step.

    Shapes: codes (T,) int64 in [0, 2**31) -> (T, top_k) int64 in [0, num_experts)
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must lie in 1..num_experts={num_experts}, got {top_k!r}")
    first = ((codes.long() * _HASH_MULTIPLIER) & 0xFFFFFFFF) % num_experts
    return (first[:, None] + torch.arange(top_k, device=codes.device)) % num_experts


def switch_balance_loss(probs: torch.Tensor, expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The Switch Transformer load-balancing loss ``E · Σ_e f_e · P_e`` (Fedus et al. 2021, eq. 4):
    ``f_e`` is the share of the routed (token, expert) assignments that went to ``e`` (all top-k
    choices counted), ``P_e`` the mean router probability of ``e``. It is 1 for a uniform router
    and grows as load and probability concentrate; gradients flow through ``P`` only.

    Shapes: probs (T, E) float, rows summing to 1; expert (T, k) int64 -> () float32
    """
    counts = torch.zeros(num_experts, dtype=torch.float32, device=probs.device)
    counts.index_add_(0, expert.reshape(-1), torch.ones(expert.numel(), dtype=torch.float32, device=probs.device))
    share = counts / max(1, expert.numel())
    return num_experts * (share * probs.float().mean(dim=0)).sum()


def code_expert_mutual_information(code: torch.Tensor, expert: torch.Tensor, num_experts: int) -> float:
    """Plug-in estimate, in bits, of the mutual information between a routed pair's code and its
    expert: ``Σ p(c, e) · log2(p(c, e) / (p(c) · p(e)))`` over the observed pairs (no table of
    all codes: cost O(pairs)). 0 when the expert ignores the code; at most log2(num_experts).
    Biased upward when codes are seen only a few times each.

    Shapes: code, expert (P,) int
    """
    if code.numel() == 0:
        return 0.0
    code, expert = code.reshape(-1).long(), expert.reshape(-1).long()
    pair, pair_count = torch.unique(code * num_experts + expert, return_counts=True)
    code_values, code_count = torch.unique(code, return_counts=True)
    expert_count = torch.bincount(expert, minlength=num_experts).double()
    n = float(code.numel())
    p_code = code_count.double()[torch.searchsorted(code_values, pair // num_experts)] / n
    p_expert = expert_count[pair % num_experts] / n
    p_pair = pair_count.double() / n
    return float((p_pair * torch.log2(p_pair / (p_code * p_expert))).sum())


def gate_softmax(logits: torch.Tensor, token: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Gates: softmax of the pair logits over each token's routed experts (PyG sparse softmax).

    Shapes: logits (P,) float, token (P,) int64 in [0, num_tokens) -> (P,) float
    """
    return softmax(logits, token, num_nodes=num_tokens)


def expert_offsets(expert_sorted: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) int32 cumulative pair counts of expert-sorted pairs: expert e owns rows
    ``offsets[e-1] .. offsets[e] - 1`` (a device tensor: no host sync).

    Shapes: expert_sorted (P,) int64, non-decreasing -> (E,) int32
    """
    bounds = torch.arange(num_experts, device=expert_sorted.device, dtype=expert_sorted.dtype)
    return torch.searchsorted(expert_sorted, bounds, right=True).to(torch.int32)


def dispatch_combine(x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor, gate: torch.Tensor,
                     experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], num_experts: int) -> torch.Tensor:
    """``y[t] = Σ_{pairs p of t} gate[p] · experts_e(x[t])`` with ``e = expert[p]``.

    Pairs are sorted by expert once; ``experts(xs, offsets)`` runs every expert on its rows of
    the sorted copy in one call (a grouped layer, e.g. :class:`~ternary_graph.nn.GroupedSwiGLU`),
    with ``offsets`` the (E,) cumulative counts on the device; a PyG scatter adds the gated
    outputs back per token. Nothing here reads a device value on the host.

    Shapes:
        x: (T, D_in); token, expert: (P,) int64; gate: (P,) float
        returns: (T, D_out), dtype of the expert outputs
    """
    order = torch.argsort(expert, stable=True)
    tok_sorted = token.index_select(0, order)
    offsets = expert_offsets(expert.index_select(0, order), num_experts)
    ys = experts(x.index_select(0, tok_sorted), offsets)
    ys = ys * gate.index_select(0, order).to(ys.dtype)[:, None]
    return scatter(ys, tok_sorted, dim=0, dim_size=x.shape[0], reduce="sum")


# --------------------------------------------------------------------------------------------
# votes
# --------------------------------------------------------------------------------------------
def pair_votes(grad: torch.Tensor) -> torch.Tensor:
    """int32 vote ``-sign(∂L/∂logit)`` per pair; NaN/Inf gradients vote 0.

    Shapes: grad (P,) float -> (P,) int32
    """
    finite = torch.isfinite(grad)
    return (-torch.sign(torch.where(finite, grad, torch.zeros_like(grad)))).to(torch.int32)


def aggregate_votes(code: torch.Tensor, expert: torch.Tensor, votes: torch.Tensor,
                    num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum votes per unique (code, expert) pair; pairs come out sorted by (code, expert).

    The compacted form of :func:`aggregate_votes_padded` (the compaction reads the count of
    distinct pairs on the host).

    Shapes: code, expert (P,) int64; votes (P,) int -> (n,) int64, (n,) int64, (n,) int32
    """
    code, expert, summed, valid = aggregate_votes_padded(code, expert, votes, num_experts)
    return code[valid], expert[valid], summed[valid]


def aggregate_votes_padded(code: torch.Tensor, expert: torch.Tensor, votes: torch.Tensor, num_experts: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`aggregate_votes` with a fixed output length P (no host sync): the n distinct pairs
    first, sorted by (code, expert), then padding marked invalid.

    Shapes: code, expert (P,) int64; votes (P,) int -> code, expert (P,) int64, votes (P,) int32,
    valid (P,) bool
    """
    P = code.numel()
    key = code.long() * num_experts + expert.long()
    sorted_key, order = torch.sort(key, stable=True)
    first = torch.ones(P, dtype=torch.bool, device=key.device)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    run = torch.cumsum(first, 0) - 1
    summed = torch.zeros(P, dtype=torch.int32, device=key.device)
    summed.index_add_(0, run, votes.index_select(0, order).to(torch.int32))
    unique = torch.full((P,), -1, dtype=torch.long, device=key.device).scatter_(0, run, sorted_key)
    valid = unique >= 0
    unique = unique.clamp(min=0)
    return unique // num_experts, unique % num_experts, summed, valid


class VoteSink:
    """Transient holder of the votes per (code, expert) pair until the graph update takes them.

    Not a buffer and not in any state_dict: it lives between a backward and the next
    ``update_graph()``. ``add`` only appends (a backward never waits for the host); the pairs
    are summed when the votes are taken: :meth:`take_padded` with fixed shapes for the
    training step, :meth:`take` compacted for callers that need the distinct pairs.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, code: torch.Tensor, expert: torch.Tensor, votes: torch.Tensor) -> None:
        self._pending.append((code.long(), expert.long(), votes.to(torch.int32)))

    def _take_raw(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._pending:
            z = torch.zeros(0, dtype=torch.long, device=device)
            return z, z.clone(), z.to(torch.int32)
        pending, self._pending = self._pending, []
        return tuple(torch.cat(parts) for parts in zip(*pending))  # type: ignore[return-value]

    def take(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pending (code, expert, votes) summed per distinct pair, sorted; emptied."""
        return aggregate_votes(*self._take_raw(device), self.num_experts)

    def take_padded(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`take`, with fixed shapes: see :func:`aggregate_votes_padded`; emptied."""
        return aggregate_votes_padded(*self._take_raw(device), self.num_experts)

    def clear(self) -> None:
        self._pending = []

    def __len__(self) -> int:
        """Distinct pairs pending (sums them on the host: for tests and diagnostics)."""
        if not self._pending:
            return 0
        code, expert, _ = (torch.cat(parts) for parts in zip(*self._pending))
        return int(torch.unique(code * self.num_experts + expert).numel())


class EdgeVoteFunction(torch.autograd.Function):
    """``centroid_logit + bonus`` per routed pair, whose backward also casts the pairs' votes.

    The bonus comes from int8 edge state and needs no gradient; the gradient that arrives is
    ``∂L/∂logit`` of each routed (token, expert) pair: it flows on to the centroid score
    unchanged and is turned into ``pair_votes`` summed per (code, expert) in ``sink``. Riding
    on the centroid logit (which requires grad whenever the centroid table records votes)
    means no extra anchor tensor is needed to make backward run.

    Shapes: centroid_logit, bonus (P,) float; code, expert (P,) int64 -> (P,) float
    """

    @staticmethod
    def forward(ctx, centroid_logit, bonus, code, expert, sink: VoteSink):
        ctx.code, ctx.expert, ctx.sink = code, expert, sink
        return centroid_logit + bonus

    @staticmethod
    def backward(ctx, grad):
        ctx.sink.add(ctx.code, ctx.expert, pair_votes(grad))
        return grad, None, None, None, None


# --------------------------------------------------------------------------------------------
# graph update
# --------------------------------------------------------------------------------------------
def match_edges(src: torch.Tensor, dst: torch.Tensor, code: torch.Tensor, expert: torch.Tensor,
                fanout: int) -> torch.Tensor:
    """Slot of edge (code → expert) in src-sorted edge arrays, or -1 where there is none.

    Shapes: src, dst (N,) int32 (src non-decreasing); code, expert (n,) int64 -> (n,) int64
    """
    if code.numel() == 0 or src.numel() == 0:
        return torch.full_like(code, -1)
    slots, valid = lookup_sorted_edges(src, code, fanout)
    hit = valid & (dst.long()[slots] == expert[:, None])
    found = hit.any(dim=1)
    first = slots.gather(1, hit.to(torch.int8).argmax(dim=1, keepdim=True)).squeeze(1)
    return torch.where(found, first, -1)


def apply_score_votes(score: torch.Tensor, slots: torch.Tensor, votes: torch.Tensor, max_step: int,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """New int8 scores: ``score[slots] += clamp(votes, ±max_step)``, saturating at ±127, for the
    entries where ``mask`` holds (all by default). ``score`` is not modified.

    The masked-in ``slots`` must be unique (one vote total per edge).

    Shapes: score (N,) int8; slots (n,) int64; votes (n,) int32; mask (n,) bool -> (N,) int8
    """
    if slots.numel() == 0:
        return score.clone()
    N = score.shape[0]
    step = votes.clamp(-max_step, max_step).to(torch.int32)
    target = slots if mask is None else torch.where(mask, slots, N)  # slot N: a sink for masked entries
    delta = torch.zeros(N + 1, dtype=torch.int32, device=score.device).index_add_(0, target, step)
    return saturating_add(score, delta[:N])


def top_per_code(src: torch.Tensor, score: torch.Tensor, is_new: torch.Tensor, fanout: int) -> torch.Tensor:
    """Mask keeping, for every code, its ``fanout`` best edges (higher score first; on a tie an
    existing edge beats a new one, then the earlier entry wins).

    Shapes: src (n,) int, score (n,) int, is_new (n,) bool -> (n,) bool
    """
    n = src.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=src.device)
    # Lexicographic order by successive stable sorts, least significant key first.
    order = torch.argsort(is_new.to(torch.int8), stable=True)
    order = order[torch.argsort(-score.long()[order], stable=True)]
    order = order[torch.argsort(src.long()[order], stable=True)]
    s_sorted = src.long()[order]
    rank = torch.arange(n, device=src.device) - torch.searchsorted(s_sorted, s_sorted)
    keep = torch.zeros(n, dtype=torch.bool, device=src.device)
    keep[order] = rank < fanout
    return keep


@dataclass
class MergeResult:
    """Edges after an insertion round; arrays are full buffers (capacity,) sorted by (src, dst).
    The counts are 0-dim int64 tensors on the edges' device (read them only when logging)."""

    src: torch.Tensor  # int32, INACTIVE_SRC in unused slots
    dst: torch.Tensor  # int32
    score: torch.Tensor  # int8
    num_active: torch.Tensor
    inserted: torch.Tensor
    evicted: torch.Tensor


def merge_active_edges(src: torch.Tensor, dst: torch.Tensor, score: torch.Tensor, num_active: int | torch.Tensor,
                       new_src: torch.Tensor, new_dst: torch.Tensor, new_score: torch.Tensor, *,
                       fanout: int, capacity: int, num_experts: int,
                       new_valid: torch.Tensor | None = None) -> MergeResult:
    """Insert new edges into the bounded active set, with fixed shapes (no host sync).

    The pool (existing ∪ new, where ``new_valid``) keeps at most ``fanout`` edges per code, then
    at most ``capacity`` edges in all, dropping the lowest scores first (an existing edge wins a
    tie against a new one, then the earlier entry wins). ``new_*`` must not repeat an existing
    or another new (src, dst) pair.

    Shapes:
        src, dst: (capacity,) int32; score: (capacity,) int8; the first ``num_active`` valid
        new_src, new_dst: (m,) int64; new_score: (m,) int8; new_valid: (m,) bool or None (all)
    """
    device = src.device
    m = new_src.numel()
    old_valid = torch.arange(src.shape[0], device=device) < num_active
    new_valid = torch.ones(m, dtype=torch.bool, device=device) if new_valid is None else new_valid
    p_valid = torch.cat([old_valid, new_valid])
    p_src = torch.where(p_valid, torch.cat([src.long(), new_src.long()]), INACTIVE_SRC)
    p_dst = torch.cat([dst.long(), new_dst.long()])
    p_score = torch.cat([score, new_score.to(torch.int8)])
    p_new = torch.cat([torch.zeros(src.shape[0], dtype=torch.bool, device=device),
                       torch.ones(m, dtype=torch.bool, device=device)])
    keep = top_per_code(p_src, p_score, p_new, fanout) & p_valid
    # capacity: the best `capacity` of the kept survive (score, then existing before new, then pool order)
    rank_key = torch.where(keep, ((127 - p_score.long()) << 1) | p_new.long(), 1 << 20)
    best = torch.argsort(rank_key, stable=True)[:capacity]
    survive = torch.zeros_like(keep).index_fill_(0, best, True) & keep  # index_fill_: no host-side value copy
    final_key = torch.where(survive, p_src * num_experts + p_dst, torch.iinfo(torch.int64).max)
    idx = torch.argsort(final_key, stable=True)[:capacity]
    ok = survive[idx]
    out_src = torch.where(ok, p_src[idx], INACTIVE_SRC).to(torch.int32)
    out_dst = torch.where(ok, p_dst[idx], 0).to(torch.int32)
    out_score = torch.where(ok, p_score[idx], 0).to(torch.int8)
    kept = survive.sum()
    inserted = (survive & p_new).sum()
    return MergeResult(out_src, out_dst, out_score, kept, inserted, old_valid.sum() - (kept - inserted))


def rewire_dense_edges(edge_index: torch.Tensor, score: torch.Tensor, new_src: torch.Tensor,
                       new_dst: torch.Tensor, new_score: torch.Tensor, *, fanout: int, num_experts: int,
                       new_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense layout: a new edge replaces its code's lowest-score edge if that score is lower.

    Each code keeps exactly ``fanout`` edges (it had ``fanout``; a merge keeps the best
    ``fanout`` per code and never needs the capacity cut), stored sorted by dst within the
    code's slots. Inputs are not modified; no host sync.

    Shapes:
        edge_index: (2, codes·fanout) int32; score: (codes·fanout,) int8
        new_src, new_dst: (m,) int64 (pairs not already edges); new_score: (m,) int8;
        new_valid: (m,) bool or None (all)
        returns: new edge_index, new score, number of edges replaced (0-dim tensor)
    """
    full = edge_index.shape[1]
    res = merge_active_edges(edge_index[0], edge_index[1], score, full, new_src, new_dst, new_score,
                             fanout=fanout, capacity=full, num_experts=num_experts, new_valid=new_valid)
    return torch.stack([edge_index[0], res.dst]), res.score, res.inserted


def load_bias_update(bias: torch.Tensor, load: torch.Tensor, step: int, tolerance: float) -> torch.Tensor:
    """Nudge each expert's int8 bias against the sign of its load deviation (saturating).

    An expert more than ``tolerance`` above the mean load loses ``step``; one more than
    ``tolerance`` below gains ``step``; no load moves nothing. ``bias`` is not modified, and
    nothing is read on the host.

    Shapes: bias (E,) int8; load (E,) int64 tokens routed per expert -> (E,) int8
    """
    total = load.sum()
    dev = load.double() * load.numel() - total  # (load - mean) · E, exact in float64 for any real count
    band = tolerance * total
    direction = (dev < -band).to(torch.int32) - (dev > band).to(torch.int32)
    return saturating_add(bias, direction * step)


# --------------------------------------------------------------------------------------------
# the routing of one batch
# --------------------------------------------------------------------------------------------
@dataclass
class Routing:
    """The routing of one batch: a bipartite token → expert graph (detached, on the input's device).

    Shapes: every field (P,) with P = tokens · top_k, ordered token-major, best expert first.
    """

    token: torch.Tensor  # int64 token index in the flattened batch
    expert: torch.Tensor  # int64
    gate: torch.Tensor  # float32 gate weight
    via_edge: torch.Tensor  # bool: the pair is an edge of the token's code
    code: torch.Tensor  # int64 code id of the token
    num_tokens: int
    num_experts: int

    def load(self) -> torch.Tensor:
        """(E,) int64 routed pairs per expert."""
        return torch.bincount(self.expert, minlength=self.num_experts)
