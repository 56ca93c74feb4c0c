"""MoEGraph: a Mixture-of-Experts layer whose router is a learned, bounded code → expert graph.

Tokens arrive with code ids of the one shared VQ codebook (MoEGraph owns no codebook). Each
expert has a ternary routing centroid; each active edge (code → expert) carries an int8
ternary sign and an int8 score. A token's candidates are the edges out of its code plus its
top experts by centroid score; the top ``top_k`` are routed, gated by a PyG softmax, run on
ternary SwiGLU experts grouped by expert and combined with a PyG scatter. The maths lives in
``routing.py``; this file holds the state and the glue.

Persistent state (all integer; ``state_dict()`` has no floating-point tensor):

=================== ======= ====================== =============================================
buffer              dtype   shape                  meaning
=================== ======= ====================== =============================================
centroids.weight.*  (ternary state of a TernaryEmbeddingTable(num_experts, dim))
experts.gate_up.*   (one ternary state: the stacked (E·2·hidden, dim) gate/up matrices)
experts.down.*      (one ternary state: the stacked (E·dim, hidden) down matrices)
load_bias           int8    (num_experts,)         selection bias, nudged by load-deviation sign
dense mode:
edge_index          int32   (2, codebook·fanout)   code → expert, ``fanout`` per code, sorted
edge_score          int8    (codebook·fanout,)     residual score of each edge
edge_attr           int8    (codebook·fanout,)     ternary sign derived from the score
large mode:
active_edge_src     int32   (capacity,)            sorted; unused slots hold 2**31 - 1
active_edge_dst     int32   (capacity,)
active_edge_attr    int8    (capacity,)
active_edge_score   int8    (capacity,)
num_active          int64   ()                     used slots (a prefix of the arrays)
edge_index          int32   (2, 0)                 empty, kept for compatibility
=================== ======= ====================== =============================================

How edges learn (DESIGN §3b). The bonus of every routed pair enters its gate logit through
``routing.EdgeVoteFunction``; its backward receives ``∂L/∂logit`` per pair and stores the int32
votes ``-sign(∂L/∂logit)``, summed per (code, expert), in a transient ``VoteSink`` (a Python
attribute, not a buffer). The training loop calls :meth:`MoEGraph.update_graph` after
``optimizer.step()``: matched edges move their score by the clamped net vote, unmatched pairs
(reached through centroid routing) with ``≥ insert_min_votes`` net positive votes are inserted,
and eviction keeps at most ``fanout`` edges per code and ``capacity`` in all. The same call
nudges ``load_bias`` with the tokens routed since the previous call. Votes are only recorded
in ``train()`` mode.

torch.compile: the layer compiles and matches eager (outputs, input gradients, votes and
accumulators; ``backend='aot_eager'`` in the tests, inductor checked by hand on CPU), with
graph breaks. MoEGraph's own is the vote backward, which aggregates pairs with
``torch.unique`` (data-dependent output shape); the experts run in one grouped call whose
per-expert offsets stay on the device. The others come from the ternary layers it
uses: ``TernaryEmbeddingTable.check_ids`` (boolean-mask indexing) and ``grad_anchor`` (a
``requires_grad`` tensor created inside the graph); ``check_packed`` skips its value scan while
compiling. The input range check of ``forward`` is skipped while compiling.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import networkx as nx
import torch
from torch import nn
from torch_geometric.data import HeteroData

from ..checks import check_in_range
from ..config import ROUTINGS
from ..nn.embedding import TernaryEmbeddingTable
from ..nn.ffn import GroupedSwiGLU
from ..ternary.state import default_row_scale
from . import export
from .routing import (
    INACTIVE_SRC,
    MAX_CODEBOOK_SIZE,
    EdgeVoteFunction,
    GraphRule,
    Routing,
    VoteSink,
    apply_score_votes,
    dispatch_combine,
    edge_attr_from_score,
    edge_bonus,
    gate_softmax,
    hash_experts,
    load_bias_update,
    lookup_dense_edges,
    lookup_sorted_edges,
    match_edges,
    merge_active_edges,
    rewire_dense_edges,
    select_experts,
    switch_balance_loss,
)

DEFAULT_LARGE_CAPACITY = 1 << 20  # 1M active edges = 10 MiB of edge state
MODES = ("auto", "dense", "large")
# How a token's experts are chosen (the routing ablation, experiments/routing_ablation.py):
#   graph       learned code -> expert edges plus centroid scores (MoEGraph proper)
#   frozen      the same candidates with every edge frozen neutral (score 0, no votes): centroids only
#   topk        the plain top-k softmax router over the ternary centroids, Switch load-balancing loss
#   topk-float  the same router with a float (dim -> E) weight: float parameters in the model
#   hash        experts fixed by a hash of the code id; gates from the centroid scores
# (ROUTINGS lives in config.py, which ModelConfig validates against without importing this file.)
_DENSE_INIT_CHUNK = 1 << 14  # codes per chunk when drawing dense edges: temporaries O(chunk · experts)


@dataclass
class RoutePlan:
    """Routing of a batch before the experts run. Shapes: (P,) with P = tokens · top_k."""

    token: torch.Tensor  # int64
    expert: torch.Tensor  # int64
    gate: torch.Tensor  # float32, differentiable in the centroid scores (and carries the votes)
    via_edge: torch.Tensor  # bool


@dataclass
class GraphUpdateStats:
    """What one :meth:`MoEGraph.update_graph` call did. Every field is a 0-dim tensor on the
    layer's device (reading one synchronises the host: do it when logging, not every step)."""

    pairs_voted: torch.Tensor  # distinct (code, expert) pairs with votes
    edges_up: torch.Tensor  # existing edges whose score rose
    edges_down: torch.Tensor  # existing edges whose score fell
    inserted: torch.Tensor  # new edges (large mode) or rewired slots (dense mode)
    evicted: torch.Tensor  # edges dropped to make room
    num_active: torch.Tensor  # active edges after the update
    tokens: torch.Tensor  # routed (token, expert) pairs counted for load balance
    load_max_share: torch.Tensor  # largest fraction of routed pairs taken by one expert (0 if none)
    load_min_share: torch.Tensor  # smallest fraction


def _check_pos_int(name: str, value: object, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class MoEGraph(nn.Module):
    """Graph-routed Mixture of ternary SwiGLU experts.

    Args:
        dim: token width (input and output).
        num_experts: number of experts E.
        expert_hidden: hidden width of each SwiGLU expert (all experts: one GroupedSwiGLU).
        codebook_size: number of codes in the shared VQ codebook the code ids come from.
        top_k: experts routed per token.
        fanout: most edges out of one code (dense mode: exactly this many per code).
        capacity: most active edges in large mode (default ``min(codebook·fanout, 2**20)``).
            Dense mode holds exactly ``codebook·fanout`` edges; a smaller ``capacity`` makes
            ``mode='auto'`` choose large mode.
        mode: ``'dense'``, ``'large'`` or ``'auto'`` (large when ``codebook·fanout > dense_limit``).
        dense_limit: see ``mode``.
        centroid_candidates: experts per token proposed by centroid score (default ``top_k``).
        rule: edge bonus / learning / load-balance hyper-parameters (:class:`GraphRule`).
        routing: how experts are chosen, one of :data:`ROUTINGS` (``'graph'``: MoEGraph proper;
            the others are the routing ablation's baselines and keep the same state layout).
        balance_weight: weight of the Switch load-balancing loss of the ``topk`` routers.
        weights: "ternary" experts, or "float" nn.Linear experts for the float baseline (the
            centroids and the edge state stay integer either way).
        zero_fraction: initial zero-trit fraction of centroids and experts (None: uniform trits).
        device, generator: where to allocate (``'meta'`` allocates nothing) and the init RNG.

    Gates are a softmax over each token's *routed* experts, so with ``top_k=1`` every gate is
    exactly 1 and neither the centroids nor the edges receive a routing signal (the votes are
    all 0): edge learning needs ``top_k >= 2``.

    Centroid rows start at the unit-variance scale ``1/sqrt(2/3 · dim)``, so for unit-variance
    tokens the centroid score ``x · c_e`` has unit variance and the edge bonus (see
    ``routing.edge_bonus``) is measured in the same logit units.

    Shapes:
        x: (T, dim) or (B, S, dim) (any leading shape), float
        code_ids: int32/int64 of shape ``x.shape[:-1]``, values in [0, codebook_size)
        returns: same shape and dtype as x
    """

    def __init__(self, dim: int, num_experts: int, expert_hidden: int, *, codebook_size: int, top_k: int = 2,
                 fanout: int = 4, capacity: int | None = None, mode: str = "auto", dense_limit: int = 1_000_000,
                 centroid_candidates: int | None = None, rule: GraphRule | None = None,
                 routing: str = "graph", balance_weight: float = 0.01, weights: str = "ternary",
                 zero_fraction: float | None = None, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_pos_int("dim", dim)
        _check_pos_int("num_experts", num_experts)
        _check_pos_int("expert_hidden", expert_hidden)
        _check_pos_int("codebook_size", codebook_size)
        if codebook_size > MAX_CODEBOOK_SIZE:
            raise ValueError(f"codebook_size must be <= 2**31 - 1 (int32 edge ids), got {codebook_size}")
        _check_pos_int("top_k", top_k)
        _check_pos_int("fanout", fanout)
        _check_pos_int("dense_limit", dense_limit, minimum=0)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} is larger than num_experts={num_experts}")
        if fanout > num_experts:
            raise ValueError(f"fanout={fanout} is larger than num_experts={num_experts}")
        if capacity is not None:
            _check_pos_int("capacity", capacity)
        centroid_candidates = top_k if centroid_candidates is None else centroid_candidates
        _check_pos_int("centroid_candidates", centroid_candidates, minimum=0)
        if centroid_candidates > num_experts:
            raise ValueError(f"centroid_candidates={centroid_candidates} is larger than num_experts={num_experts}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        if not balance_weight >= 0:
            raise ValueError(f"balance_weight must be >= 0, got {balance_weight!r}")
        full = codebook_size * fanout
        if mode == "auto":
            mode = "large" if full > dense_limit or (capacity is not None and capacity < full) else "dense"
        if mode == "dense" and capacity is not None and capacity != full:
            raise ValueError(f"dense mode holds codebook_size·fanout={full} edges, got capacity={capacity}")
        # A token always has at least this many distinct candidates: top_k beyond it could
        # route some tokens to nothing.
        guaranteed = max(centroid_candidates, fanout) if mode == "dense" else centroid_candidates
        if top_k > guaranteed:
            raise ValueError(
                f"top_k={top_k} is larger than the candidate set a token is guaranteed "
                f"({guaranteed}: centroid_candidates={centroid_candidates}"
                f"{f', fanout={fanout}' if mode == 'dense' else ''}); raise centroid_candidates")
        self.dim, self.num_experts, self.expert_hidden = dim, num_experts, expert_hidden
        self.codebook_size, self.top_k, self.fanout = codebook_size, top_k, fanout
        self.centroid_candidates = centroid_candidates
        self.mode = mode
        self.capacity = full if mode == "dense" else (capacity if capacity is not None
                                                      else min(full, DEFAULT_LARGE_CAPACITY))
        self.rule = rule if rule is not None else GraphRule()
        self.routing, self.balance_weight = routing, float(balance_weight)
        self.zero_fraction = zero_fraction
        device = torch.device(device) if device is not None else None

        nonzero = 2.0 / 3.0 if zero_fraction is None else 1.0 - zero_fraction
        self.centroids = TernaryEmbeddingTable(num_experts, dim, zero_fraction=zero_fraction,
                                               init_scale=default_row_scale(dim, nonzero), device=device,
                                               generator=generator)
        self.experts = GroupedSwiGLU(num_experts, dim, expert_hidden, weights=weights, zero_fraction=zero_fraction,
                                     device=device, generator=generator)
        self.register_buffer("load_bias", torch.zeros(num_experts, dtype=torch.int8, device=device))
        self.float_router = nn.Linear(dim, num_experts, bias=False, device=device) if routing == "topk-float" else None
        if mode == "dense":
            self.register_buffer("edge_index", torch.empty(2, full, dtype=torch.int32, device=device))
            self.register_buffer("edge_score", torch.zeros(full, dtype=torch.int8, device=device))
            self.register_buffer("edge_attr", torch.zeros(full, dtype=torch.int8, device=device))
        else:
            cap = self.capacity
            self.register_buffer("active_edge_src", torch.full((cap,), INACTIVE_SRC, dtype=torch.int32, device=device))
            self.register_buffer("active_edge_dst", torch.zeros(cap, dtype=torch.int32, device=device))
            self.register_buffer("active_edge_attr", torch.zeros(cap, dtype=torch.int8, device=device))
            self.register_buffer("active_edge_score", torch.zeros(cap, dtype=torch.int8, device=device))
            self.register_buffer("num_active", torch.zeros((), dtype=torch.int64, device=device))
            self.register_buffer("edge_index", torch.empty(2, 0, dtype=torch.int32, device=device))
        # Transient, per step; never in the state_dict.
        self._votes = VoteSink(num_experts)
        self._pending_load: torch.Tensor | None = None
        self._last_routing: Routing | None = None
        self._balance_loss: torch.Tensor | None = None
        self._init_edges(generator)

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------
    def _init_edges(self, generator: torch.Generator | None) -> None:
        """Dense mode: each code gets ``fanout`` distinct random experts (score 0, neutral).
        Large mode starts empty: edges are earned."""
        if self.mode != "dense" or self.edge_index.device.type == "meta":
            return
        device = self.edge_index.device
        gen_device = generator.device if generator is not None else device
        F = self.fanout
        for start in range(0, self.codebook_size, _DENSE_INIT_CHUNK):
            stop = min(self.codebook_size, start + _DENSE_INIT_CHUNK)
            u = torch.rand(stop - start, self.num_experts, generator=generator, device=gen_device)
            dst = u.topk(F, dim=1).indices.sort(dim=1).values
            self.edge_index[1, start * F:stop * F] = dst.reshape(-1).to(device=device, dtype=torch.int32)
        self.edge_index[0] = torch.arange(self.codebook_size, device=device, dtype=torch.int32).repeat_interleave(F)
        self.edge_score.zero_()
        self.edge_attr.zero_()

    def _edge_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full (src, dst, attr, score) buffers, sorted by src (large mode: with unused slots)."""
        if self.mode == "dense":
            return self.edge_index[0], self.edge_index[1], self.edge_attr, self.edge_score
        return self.active_edge_src, self.active_edge_dst, self.active_edge_attr, self.active_edge_score

    @property
    def num_active_edges(self) -> int:
        return self.capacity if self.mode == "dense" else int(self.num_active)

    def active_edges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(src int32, dst int32, attr int8, score int8) of the active edges, sorted by (src, dst)."""
        n = self.num_active_edges
        return tuple(t[:n] for t in self._edge_arrays())  # type: ignore[return-value]

    @torch.no_grad()
    def set_edges(self, src: torch.Tensor, dst: torch.Tensor, score: torch.Tensor) -> None:
        """Replace every edge (e.g. to load a graph learned elsewhere, or in tests/benchmarks).

        Large mode: at most ``capacity`` edges, at most ``fanout`` per code. Dense mode: exactly
        ``fanout`` edges for every code. Pairs must be distinct. ``attr`` follows from ``score``.

        Shapes: src, dst (n,) int; score (n,) int8
        """
        device = self._edge_arrays()[0].device
        n = src.numel()
        if dst.numel() != n or score.numel() != n:
            raise ValueError(f"src, dst and score must have the same length, got {n}, {dst.numel()}, {score.numel()}")
        if score.dtype != torch.int8:
            raise ValueError(f"score must be int8, got dtype={score.dtype}")
        src, dst = src.reshape(-1).long().to(device), dst.reshape(-1).long().to(device)
        score = score.reshape(-1).to(device)
        if n:
            if int(src.min()) < 0 or int(src.max()) >= self.codebook_size:
                raise ValueError(f"src must lie in [0, {self.codebook_size}), got [{int(src.min())}, {int(src.max())}]")
            if int(dst.min()) < 0 or int(dst.max()) >= self.num_experts:
                raise ValueError(f"dst must lie in [0, {self.num_experts}), got [{int(dst.min())}, {int(dst.max())}]")
        if n > self.capacity:
            raise ValueError(f"{n} edges exceed capacity={self.capacity}")
        key = src * self.num_experts + dst
        order = torch.argsort(key)
        key, src, dst, score = key[order], src[order], dst[order], score[order]
        if n > 1 and bool((key[1:] == key[:-1]).any()):
            raise ValueError("edges must be distinct (code, expert) pairs; got duplicates")
        # Counts per present code (src is sorted): no O(codebook) temporary.
        per_code = torch.unique_consecutive(src, return_counts=True)[1]
        if self.mode == "dense":
            if n != self.capacity or per_code.numel() != self.codebook_size or bool((per_code != self.fanout).any()):
                raise ValueError(f"dense mode needs exactly fanout={self.fanout} edges for each of "
                                 f"{self.codebook_size} codes, got {n} edges")
            self.edge_index[1].copy_(dst.to(torch.int32))
            self.edge_score.copy_(score)
            self.edge_attr.copy_(edge_attr_from_score(score, self.rule.attr_threshold))
            return
        if n and int(per_code.max()) > self.fanout:
            raise ValueError(f"a code has {int(per_code.max())} edges, more than fanout={self.fanout}")
        self.active_edge_src.fill_(INACTIVE_SRC)
        self.active_edge_dst.zero_()
        self.active_edge_score.zero_()
        self.active_edge_src[:n] = src.to(torch.int32)
        self.active_edge_dst[:n] = dst.to(torch.int32)
        self.active_edge_score[:n] = score
        self.active_edge_attr.copy_(edge_attr_from_score(self.active_edge_score, self.rule.attr_threshold))
        self.num_active.fill_(n)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # copy_ would silently cast a float checkpoint into the integer edge state.
        for name, own in self._buffers.items():
            key = prefix + name
            if own is not None and key in state_dict:
                value = state_dict[key]
                if value.dtype != own.dtype or tuple(value.shape) != tuple(own.shape):
                    raise ValueError(f"checkpoint tensor {key!r} has dtype={value.dtype} shape={tuple(value.shape)}, "
                                     f"expected dtype={own.dtype} shape={tuple(own.shape)}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor, code_ids: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be a float tensor, got dtype={x.dtype}")
        if x.dim() < 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., dim={self.dim}) with at least 2 dims, got {tuple(x.shape)}")
        if not isinstance(code_ids, torch.Tensor):
            raise TypeError(f"code_ids must be a torch.Tensor, got {type(code_ids).__name__}")
        if code_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"code_ids must be int32 or int64, got dtype={code_ids.dtype}")
        if tuple(code_ids.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"code_ids must have shape x.shape[:-1]={tuple(x.shape[:-1])}, "
                             f"got {tuple(code_ids.shape)}")
        if code_ids.device != x.device:
            raise ValueError(f"code_ids is on {code_ids.device} but x is on {x.device}")
        check_in_range(code_ids, 0, self.codebook_size, "code_ids")

    def centroid_scores(self, x2: torch.Tensor) -> torch.Tensor:
        """(T, E) float32 centroid scores ``x · c_e`` (differentiable in x and the centroids)."""
        ids = torch.arange(self.num_experts, device=x2.device)
        return x2.float() @ self.centroids(ids, dtype=torch.float32).T

    def route(self, x2: torch.Tensor, codes: torch.Tensor) -> RoutePlan:
        """Candidates, selection and gates for flattened tokens (no expert runs, no input checks:
        ``forward`` validates; this is the routing alone, e.g. for benchmarks).

        Shapes: x2 (T, dim) float; codes (T,) int64 -> :class:`RoutePlan` of (T · top_k,)
        """
        T, k = x2.shape[0], self.top_k
        if self.routing in ("topk", "topk-float", "hash"):
            return self._route_without_edges(x2, codes)
        scores = self.centroid_scores(x2)
        src, dst, attr, score = self._edge_arrays()
        if self.mode == "dense":
            slots = lookup_dense_edges(codes, self.fanout)
            valid = torch.ones_like(slots, dtype=torch.bool)
        else:
            slots, valid = lookup_sorted_edges(src, codes, self.fanout)
        bonus = edge_bonus(attr[slots], score[slots], self.rule)
        select_bias = self.load_bias.float() * self.rule.load_unit
        sel = select_experts(scores, select_bias, dst[slots].long(), bonus, valid, k, self.centroid_candidates)
        expert = sel.expert.reshape(-1)
        centroid_logit = scores.gather(1, sel.expert).reshape(-1)
        if self.training and centroid_logit.requires_grad and self.routing == "graph":
            pair_code = codes[:, None].expand(T, k).reshape(-1)
            logits = EdgeVoteFunction.apply(centroid_logit, sel.bonus.reshape(-1), pair_code, expert, self._votes)
        else:
            logits = centroid_logit + sel.bonus.reshape(-1)
        token = torch.arange(T, device=x2.device)[:, None].expand(T, k).reshape(-1)
        gate = gate_softmax(logits, token, T)
        return RoutePlan(token=token, expert=expert, gate=gate, via_edge=sel.via_edge.reshape(-1))

    def _route_without_edges(self, x2: torch.Tensor, codes: torch.Tensor) -> RoutePlan:
        """The ablation's edge-free routers: top-k softmax (Switch balance loss) or hash by code."""
        T, k = x2.shape[0], self.top_k
        if self.routing == "topk-float":
            scores = self.float_router(x2.to(self.float_router.weight.dtype)).float()
        else:
            scores = self.centroid_scores(x2)
        if self.routing == "hash":
            expert = hash_experts(codes, self.num_experts, k)
        else:
            expert = scores.detach().topk(k, dim=1).indices
            if self.training:
                self._balance_loss = switch_balance_loss(scores.softmax(dim=1), expert, self.num_experts)
        token = torch.arange(T, device=x2.device)[:, None].expand(T, k).reshape(-1)
        gate = gate_softmax(scores.gather(1, expert).reshape(-1), token, T)
        return RoutePlan(token=token, expert=expert.reshape(-1), gate=gate,
                         via_edge=torch.zeros(T * k, dtype=torch.bool, device=x2.device))

    def take_balance_loss(self) -> torch.Tensor | None:
        """``balance_weight`` × the load-balancing loss of the last training forward (``topk``
        routers only; None otherwise), emptied: the model adds it to its auxiliary loss."""
        loss, self._balance_loss = self._balance_loss, None
        return None if loss is None else self.balance_weight * loss

    def forward(self, x: torch.Tensor, code_ids: torch.Tensor) -> torch.Tensor:
        self._check_inputs(x, code_ids)
        x2 = x.reshape(-1, self.dim)
        codes = code_ids.reshape(-1).long()
        plan = self.route(x2, codes)
        out = dispatch_combine(x2, plan.token, plan.expert, plan.gate, self.experts, self.num_experts)
        self._last_routing = Routing(token=plan.token, expert=plan.expert, gate=plan.gate.detach().float(),
                                     via_edge=plan.via_edge, code=codes.index_select(0, plan.token),
                                     num_tokens=x2.shape[0], num_experts=self.num_experts)
        if self.training:
            # index_add, not bincount: a static output shape keeps torch.compile in one graph here.
            load = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
            load.index_add_(0, plan.expert, torch.ones_like(plan.expert))
            self._pending_load = load if self._pending_load is None else self._pending_load + load
        return out.to(x.dtype).reshape(x.shape)

    # ------------------------------------------------------------------------------------------
    # graph learning
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_graph(self) -> GraphUpdateStats:
        """Apply the votes cast since the last call to the edges, and nudge the load bias.

        Call once per optimizer step, after ``backward()`` (e.g. right after
        ``optimizer.step()``). Safe to call with no pending votes. Every shape here is fixed by
        the batch and the capacity, so on CUDA the update never waits for the host; the
        returned statistics are device tensors, read when they are logged.
        """
        rule = self.rule
        src, dst, attr, score = self._edge_arrays()
        if self.routing != "graph":
            return self._update_load_only(src.device)
        # .to(): votes or loads cast before the module moved device follow it.
        code, expert, votes, valid = (t.to(src.device) for t in self._votes.take_padded(src.device))
        slots = match_edges(src, dst, code, expert, self.fanout)
        matched = valid & (slots >= 0)
        score.copy_(apply_score_votes(score, slots.clamp(min=0), votes, rule.max_score_step, mask=matched))
        edges_up, edges_down = (matched & (votes > 0)).sum(), (matched & (votes < 0)).sum()
        cand = valid & ~matched & (votes >= rule.insert_min_votes)
        new_score = votes.clamp(max=rule.max_score_step).to(torch.int8)
        if self.mode == "dense":
            ei, sc, inserted = rewire_dense_edges(self.edge_index, self.edge_score, code, expert, new_score,
                                                  fanout=self.fanout, num_experts=self.num_experts, new_valid=cand)
            self.edge_index.copy_(ei)
            self.edge_score.copy_(sc)
            evicted = inserted
        else:
            res = merge_active_edges(src, dst, score, self.num_active, code, expert, new_score, fanout=self.fanout,
                                     capacity=self.capacity, num_experts=self.num_experts, new_valid=cand)
            src.copy_(res.src)
            dst.copy_(res.dst)
            score.copy_(res.score)
            self.num_active.copy_(res.num_active)
            inserted, evicted = res.inserted, res.evicted
        attr.copy_(edge_attr_from_score(score, rule.attr_threshold))
        return self._apply_load(src.device, nudge_bias=True, pairs_voted=valid.sum(), edges_up=edges_up,
                                edges_down=edges_down, inserted=inserted, evicted=evicted)

    def _update_load_only(self, device: torch.device) -> GraphUpdateStats:
        """update_graph of the ablation routers: edges stay as they are; the load bias moves only
        for ``frozen``, the one whose selection reads it (the others balance by their loss, or not
        at all)."""
        self._votes.clear()
        zero = torch.zeros((), dtype=torch.long, device=device)
        return self._apply_load(device, nudge_bias=self.routing == "frozen", pairs_voted=zero, edges_up=zero,
                                edges_down=zero, inserted=zero, evicted=zero)

    def _apply_load(self, device: torch.device, *, nudge_bias: bool, **edge_stats: torch.Tensor) -> GraphUpdateStats:
        """Take the load counted since the last update, nudge ``load_bias`` with it (if asked) and
        return the update's statistics (``edge_stats``: the edge fields of GraphUpdateStats)."""
        load, self._pending_load = self._pending_load, None
        load = torch.zeros(self.num_experts, dtype=torch.long, device=device) if load is None else load.to(device)
        total = load.sum()
        if nudge_bias:
            self.load_bias.copy_(load_bias_update(self.load_bias, load, self.rule.load_step, self.rule.load_tolerance))
        shares = load.double() / total.clamp(min=1)
        num_active = torch.tensor(self.capacity) if self.mode == "dense" else self.num_active.clone()
        return GraphUpdateStats(num_active=num_active, tokens=total, load_max_share=shares.max(),
                                load_min_share=shares.min(), **edge_stats)

    def clear_pending(self) -> None:
        """Drop votes and load counts not yet applied (e.g. after an evaluation backward)."""
        self._votes.clear()
        self._pending_load = None

    def take_pending(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The votes and load counts cast since the last :meth:`update_graph`, emptied (data-parallel
        training exchanges them between ranks and hands the sum back with :meth:`add_pending`).

        Shapes: code, expert (n,) int64 and votes (n,) int32, one entry per distinct pair, sorted
        by (code, expert); load (num_experts,) int64, or None if no training forward ran.
        """
        code, expert, votes = self._votes.take(self.load_bias.device)
        load, self._pending_load = self._pending_load, None
        return code, expert, votes, load

    def add_pending(self, code: torch.Tensor, expert: torch.Tensor, votes: torch.Tensor,
                    load: torch.Tensor | None) -> None:
        """Add votes per (code, expert) pair and load counts to the pending ones, as if cast here.

        Shapes: code, expert (n,) int; votes (n,) int (pairs may repeat: they are summed);
        load (num_experts,) int or None.
        """
        if code.numel():
            self._votes.add(code.long(), expert.long(), votes.to(torch.int32))
        if load is not None:
            if tuple(load.shape) != (self.num_experts,):
                raise ValueError(f"load must have shape ({self.num_experts},), got {tuple(load.shape)}")
            load = load.long()
            self._pending_load = load if self._pending_load is None else self._pending_load + load

    # ------------------------------------------------------------------------------------------
    # graphs out
    # ------------------------------------------------------------------------------------------
    @property
    def last_routing(self) -> Routing | None:
        """Routing of the last forward (detached), or None before the first."""
        return self._last_routing

    def routing_graph(self) -> HeteroData:
        """The last batch's token → expert routing as a PyG ``HeteroData``."""
        if self._last_routing is None:
            raise ValueError("routing_graph() needs a forward pass first; no batch has been routed")
        return export.routing_to_heterodata(self._last_routing)

    def to_pyg(self) -> HeteroData:
        """The learned code → expert graph as ``HeteroData`` (see ``export.edges_to_heterodata``)."""
        return export.edges_to_heterodata(*self.active_edges(), self.num_experts, load_bias=self.load_bias)

    def to_networkx(self, codes: torch.Tensor | None = None, top: int | None = 50,
                    usage: torch.Tensor | None = None) -> nx.DiGraph:
        """An active subgraph: the given codes, else the ``top`` codes by ``usage`` (e.g. the VQ
        codebook's usage counter), else by total |score| of their edges."""
        return export.edges_to_networkx(*self.active_edges(), self.num_experts, codes=codes, top=top,
                                        usage=usage, load_bias=self.load_bias)

    def write_graphml(self, path: str | os.PathLike[str], codes: torch.Tensor | None = None,
                      top: int | None = 50, usage: torch.Tensor | None = None) -> None:
        """Write :meth:`to_networkx` (same selection arguments) as GraphML."""
        export.write_graphml(self.to_networkx(codes=codes, top=top, usage=usage), path)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, expert_hidden={self.expert_hidden}, "
                f"codebook_size={self.codebook_size}, top_k={self.top_k}, fanout={self.fanout}, mode={self.mode}, "
                f"capacity={self.capacity}, centroid_candidates={self.centroid_candidates}, routing={self.routing}")


def update_graphs(model: nn.Module) -> list[GraphUpdateStats]:
    """Call :meth:`MoEGraph.update_graph` on every MoEGraph in ``model`` (once each, in module
    order); the one call a training loop needs after ``optimizer.step()``."""
    seen: dict[int, MoEGraph] = {}
    for sub in model.modules():
        if isinstance(sub, MoEGraph):
            seen.setdefault(id(sub), sub)
    return [m.update_graph() for m in seen.values()]
