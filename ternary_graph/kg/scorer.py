"""TernaryKGScorer: ternary relational link prediction trained with int8 votes, and KG VQ codes.

Entities and relations are rows of :class:`~ternary_graph.nn.embedding.TernaryEmbeddingTable`
(``e = s_e · T_e`` with trits ``T_e`` packed 5 per byte and an int8 log-scale), so the scorer
holds no floating-point state at all (``weights="float"`` swaps in float tables, for a control): backward casts sign votes into the tables' int8
accumulators and :class:`~ternary_graph.ternary.optimizer.TernaryOptimizer` steps the trits.

Two scoring functions (``score=``):

* ``"distmult"``: ``φ(h, r, t) = Σ_k h_k r_k t_k`` (Yang et al. 2015). Symmetric in h and t,
  so ``defines`` and its inverse score alike.
* ``"complex"``: the first and second halves of a row are the real and imaginary parts of a
  ``dim/2``-dim complex vector and ``φ = Re <h, r, conj(t)>`` (Trouillon et al. 2016). With
  ternary rows a relation component is one of ``{-1,0,1} + i{-1,0,1}`` times the row scale:
  a sign flip, a quarter turn, a 45-degree turn with gain √2, or a projection. It models
  asymmetric relations at the same bytes.

Logits are ``logit_scale · φ`` (a fixed float hyper-parameter; the learned row scales
multiply into φ). Training (:meth:`TernaryKGScorer.loss`) is cross-entropy of the true tail
given ``(h, r)`` and of the true head given ``(r, t)``, either over every entity ("1-N") or
over ``num_negatives`` uniformly sampled entities shared by the batch.

Votes. A table row's vote is the sign of its summed gradient, whatever its size. Optional
*proportional vote sampling* (``vote_sampling="proportional"``) keeps each gradient entry
with probability ``min(1, |g| / (c · mean|g|))`` (``c = vote_sampling_c``) and zeroes the
rest, so a trit's expected vote follows the size of its gradient (an unbiased-up-to-scale
sign estimate, like stochastic rounding to {-1, 0, 1}); without it the many entities that
get a tiny gradient from every query vote as loudly as the few that matter. Measured on the
stdlib KG it helps with 1024 negatives but not with the default 256 (kg/task.py).

KG VQ. With a :class:`~ternary_graph.nn.vq.KGVQCodebook` (``kg_codebook=``, of the same
``dim``) every entity vector maps to its nearest code (:meth:`entity_codes`), the codebook
is fitted to the entity vectors by its own vote path (:meth:`fit_codebook`), and the KG
becomes a graph between codes (:meth:`kg_edges`) that can be drawn and joined with the
routing graph. Scoring itself uses the raw entity vectors; :meth:`score_fn` with
``quantized=True`` scores with each entity's code vector instead (same code, same score),
which is what a model that only stores codes can do.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.embedding import gather_rows_reference
from ..kernels.vq_search import nearest_codes
from ..nn.embedding import TernaryEmbeddingTable
from ..nn.factory import check_weights, make_embedding
from ..nn.vq import KGVQCodebook
from .graph import KnowledgeGraph

SCORE_FUNCTIONS: tuple[str, ...] = ("distmult", "complex")
VOTE_SAMPLINGS: tuple[str, ...] = ("sign", "proportional")
# Rows decoded per chunk in whole-table passes (entity_codes, fit_codebook, ranking):
# bounds the float temporaries to chunk x dim.
DEFAULT_CHUNK = 8192


class KGEdges(NamedTuple):
    """The KG as edges between KG codes, deduplicated and sorted by (src, dst, relation).

    Shapes:
        src: (M,) int32 code ids; dst: (M,) int32 code ids; relation: (M,) int8.
    """

    src: Tensor
    dst: Tensor
    relation: Tensor


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def draw_shared_negatives(num_entities: int, num_negatives: int, *, generator: torch.Generator | None = None,
                          device: torch.device | str | None = None) -> Tensor:
    """(num_negatives,) int64 entity ids drawn uniformly, shared by every row of a batch.

    Drawn on the CPU, where ``generator`` lives, so a seed gives the same negatives on any
    device; then moved to ``device``. Used by :meth:`TernaryKGScorer.loss` and by the float
    baselines trained with the same recipe (kg/baselines.py).
    """
    _check_positive_int("num_entities", num_entities)
    _check_positive_int("num_negatives", num_negatives)
    return torch.randint(0, num_entities, (num_negatives,), generator=generator, device="cpu").to(device)


def two_sided_sampled_cross_entropy(pos_tail: Tensor, neg_tail: Tensor, clash_tail: Tensor,
                                    pos_head: Tensor, neg_head: Tensor, clash_head: Tensor) -> Tensor:
    """The scorer's training loss from its logits: mean of the tail and head cross-entropies.

    Row ``i`` of each side is the softmax over ``[pos_i, neg_i1, ..., neg_iK]`` with the true
    answer in column 0; a negative flagged in ``clash`` (it is the row's true answer, so it
    would be scored as a positive) is masked to ``-inf``. Pure; shared by
    :meth:`TernaryKGScorer.loss` and the float baselines of kg/baselines.py.

    Shapes:
        pos_*: (B,) logits of the true triples; neg_*: (B, K) logits of the shared negatives;
        clash_*: (B, K) bool (broadcastable). Returns () float.
    """
    b = pos_tail.shape[0]
    for name, pos, neg in (("tail", pos_tail, neg_tail), ("head", pos_head, neg_head)):
        if pos.dim() != 1 or neg.dim() != 2 or neg.shape[0] != pos.shape[0] or pos.shape[0] != b:
            raise ValueError(f"pos_{name} must be (B,) and neg_{name} (B, K) with one B, got "
                             f"{tuple(pos.shape)} and {tuple(neg.shape)} (B={b})")
    pad = torch.zeros(b, 1, dtype=torch.bool, device=pos_tail.device)
    target = torch.zeros(b, dtype=torch.long, device=pos_tail.device)
    losses = []
    for pos, neg, clash in ((pos_tail, neg_tail, clash_tail), (pos_head, neg_head, clash_head)):
        logits = torch.cat([pos.unsqueeze(1), neg], dim=1)
        mask = torch.cat([pad, clash.expand(neg.shape)], dim=1)
        losses.append(F.cross_entropy(logits.masked_fill(mask, float("-inf")), target))
    return 0.5 * (losses[0] + losses[1])


class _ProportionalVoteGate(torch.autograd.Function):
    """Identity forward; backward keeps each gradient entry with probability
    ``min(1, |g| / (c · mean|g|))`` and zeroes the rest (the sign of a kept entry is kept)."""

    @staticmethod
    def forward(ctx, x: Tensor, c: float, generator: torch.Generator | None) -> Tensor:
        ctx.c, ctx.generator = c, generator
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        mag = grad.abs()
        mean = mag.mean()
        if not bool(mean > 0):
            return grad, None, None
        keep_p = (mag / (ctx.c * mean)).clamp_(max=1.0)
        # Coins drawn on the CPU (where the caller's generator lives), then moved.
        coin = torch.rand(grad.shape, generator=ctx.generator).to(device=grad.device, dtype=grad.dtype)
        return torch.where(coin < keep_p, grad, torch.zeros_like(grad)), None, None


class TernaryKGScorer(nn.Module):
    """Ternary relational scorer: entities and relations as ternary rows (see module docstring).

    Args:
        num_entities, num_relations: table sizes.
        dim: row width (even for ``score="complex"``); must equal ``kg_codebook.dim``.
        kg_codebook: optional KG codebook whose codes the entities map to (it becomes a
            submodule: its state is saved with the scorer).
        score: ``"distmult"`` or ``"complex"``.
        logit_scale: logits = ``logit_scale · φ``; default ``2 / sqrt(dim)`` (0.25 at dim 64,
            the best of 0.125 / 0.25 / 0.5 / 1.0 on the stdlib KG's valid split).
        weights: ``"ternary"`` (TernaryEmbeddingTable rows, int8 votes) or ``"float"``
            (nn.Embedding rows drawn from ``N(0, init_scale²)``, for a float control trained
            with the same loss by an ordinary optimizer).
        zero_fraction: initial fraction of zero trits (None: uniform trits, a third zero).
        init_scale: initial row scale of both tables.
        device, generator: allocation and initial weights.

    Shapes:
        triples: (B, 3) int32/int64 rows ``[head, relation, tail]``.
        :meth:`score`: h, r, t int64 broadcasting to S -> (S,) float32 scores.
    """

    def __init__(self, num_entities: int, num_relations: int, dim: int = 64, *,
                 kg_codebook: KGVQCodebook | None = None, score: str = "distmult",
                 logit_scale: float | None = None, weights: str = "ternary",
                 zero_fraction: float | None = None, init_scale: float = 1.0, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_positive_int("num_entities", num_entities)
        _check_positive_int("num_relations", num_relations)
        _check_positive_int("dim", dim)
        if score not in SCORE_FUNCTIONS:
            raise ValueError(f"score must be one of {SCORE_FUNCTIONS}, got {score!r}")
        if score == "complex" and dim % 2:
            raise ValueError(f"score='complex' needs an even dim (real and imaginary halves), got {dim}")
        if kg_codebook is not None:
            if not isinstance(kg_codebook, KGVQCodebook):
                raise TypeError(f"kg_codebook must be a KGVQCodebook, got {type(kg_codebook).__name__}")
            if kg_codebook.dim != dim:
                raise ValueError(f"kg_codebook.dim={kg_codebook.dim} must equal the scorer's dim={dim}")
        check_weights(weights)
        if logit_scale is None:
            logit_scale = 2.0 / math.sqrt(dim)
        if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
            raise ValueError(f"logit_scale must be a positive finite number, got {logit_scale!r}")
        self.num_entities, self.num_relations, self.dim = num_entities, num_relations, dim
        self.score_function, self.weights = score, weights
        self.logit_scale = float(logit_scale)
        if weights == "ternary":
            self.entities = TernaryEmbeddingTable(num_entities, dim, zero_fraction=zero_fraction,
                                                  init_scale=init_scale, device=device, generator=generator)
            self.relations = TernaryEmbeddingTable(num_relations, dim, zero_fraction=zero_fraction,
                                                   init_scale=init_scale, device=device, generator=generator)
        else:
            self.entities = make_embedding(num_entities, dim, "float", device=device)
            self.relations = make_embedding(num_relations, dim, "float", device=device)
            with torch.no_grad():
                for table in (self.entities, self.relations):
                    table.weight.copy_(init_scale * torch.randn(table.weight.shape, generator=generator)
                                       .to(table.weight.device))
        self.kg_codebook = kg_codebook

    @property
    def device(self) -> torch.device:
        w = self.entities.weight
        return w.packed.device if self.weights == "ternary" else w.device

    @torch.no_grad()
    def _decode(self, table: nn.Module, ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """(n, dim) rows of ``table`` without autograd or votes."""
        if self.weights == "ternary":
            return gather_rows_reference(table.weight.packed, table.weight.E, ids, self.dim, dtype)
        return table.weight.detach().index_select(0, ids).to(dtype)

    # --- validation ------------------------------------------------------------------------
    def check_triples(self, triples: Tensor, *, name: str = "triples") -> Tensor:
        """Validate ``[head, relation, tail]`` rows; returns them as int64 on the scorer's device."""
        if not isinstance(triples, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(triples).__name__}")
        if triples.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            raise TypeError(f"{name} must be an integer tensor, got dtype={triples.dtype}")
        if triples.dim() != 2 or triples.shape[1] != 3:
            raise ValueError(f"{name} must have shape (B, 3), got {tuple(triples.shape)}")
        out = triples.to(device=self.device, dtype=torch.long)
        for col, what, bound in ((0, "head", self.num_entities), (1, "relation", self.num_relations),
                                 (2, "tail", self.num_entities)):
            values = out[:, col]
            bad = values[(values < 0) | (values >= bound)]
            if bad.numel():
                raise ValueError(f"{name}[:, {col}] ({what} ids) must lie in [0, {bound}), got {int(bad[0])} "
                                 f"({bad.numel()} out of range)")
        return out

    # --- maths: queries of both sides ----------------------------------------------------------
    def tail_query(self, head: Tensor, rel: Tensor) -> Tensor:
        """``q`` with ``φ(h, r, t) = <q, t>``. Shapes: (..., dim), (..., dim) -> (..., dim)."""
        if self.score_function == "distmult":
            return head * rel
        h_re, h_im = head.chunk(2, dim=-1)
        r_re, r_im = rel.chunk(2, dim=-1)
        return torch.cat([h_re * r_re - h_im * r_im, h_im * r_re + h_re * r_im], dim=-1)  # h ∘ r

    def head_query(self, rel: Tensor, tail: Tensor) -> Tensor:
        """``q`` with ``φ(h, r, t) = <q, h>``. Shapes: (..., dim), (..., dim) -> (..., dim)."""
        if self.score_function == "distmult":
            return rel * tail
        t_re, t_im = tail.chunk(2, dim=-1)
        r_re, r_im = rel.chunk(2, dim=-1)
        return torch.cat([r_re * t_re + r_im * t_im, r_re * t_im - r_im * t_re], dim=-1)  # conj(r) ∘ t

    # --- training -------------------------------------------------------------------------------
    def loss(self, triples: Tensor, *, num_negatives: int | None = None, generator: torch.Generator | None = None,
             vote_sampling: str = "sign", vote_sampling_c: float = 1.0) -> Tensor:
        """Mean cross-entropy of the true tail and the true head of every triple.

        ``num_negatives=None`` scores every entity (1-N); an int ``K`` scores the true answer
        against ``K`` entities drawn uniformly (with ``generator``) and shared by the batch;
        a drawn entity equal to a row's true answer is masked out of that row. Each entity
        row is gathered once per call, so its vote is the sign of its summed gradient.

        Shapes: triples (B, 3) integer -> () float32.
        """
        if vote_sampling not in VOTE_SAMPLINGS:
            raise ValueError(f"vote_sampling must be one of {VOTE_SAMPLINGS}, got {vote_sampling!r}")
        if not (isinstance(vote_sampling_c, (int, float)) and vote_sampling_c > 0):
            raise ValueError(f"vote_sampling_c must be a positive number, got {vote_sampling_c!r}")
        tri = self.check_triples(triples)
        if tri.shape[0] == 0:
            raise ValueError("triples is empty: no loss to compute")
        h, r, t = tri.unbind(dim=1)
        if num_negatives is None:
            ids = torch.arange(self.num_entities, device=self.device)
            inv_h, inv_t, inv_c = h, t, ids
        else:
            neg = draw_shared_negatives(self.num_entities, num_negatives, generator=generator, device=self.device)
            ids, inverse = torch.unique(torch.cat([h, t, neg]), return_inverse=True)
            b = h.shape[0]
            inv_h, inv_t, inv_c = inverse[:b], inverse[b:2 * b], inverse[2 * b:]
        rows = self.entities(ids)
        if vote_sampling == "proportional":
            rows = _ProportionalVoteGate.apply(rows, float(vote_sampling_c), generator)
        rel = self.relations(r)
        e_h, e_t, e_c = rows[inv_h], rows[inv_t], rows[inv_c]
        q_tail, q_head = self.tail_query(e_h, rel), self.head_query(rel, e_t)
        if num_negatives is None:
            logits_t = self.logit_scale * (q_tail @ e_c.t())
            logits_h = self.logit_scale * (q_head @ e_c.t())
            return 0.5 * (F.cross_entropy(logits_t, t) + F.cross_entropy(logits_h, h))
        cand = inv_c.unsqueeze(0)
        s = self.logit_scale
        return two_sided_sampled_cross_entropy(
            s * (q_tail * e_t).sum(-1), s * (q_tail @ e_c.t()), cand == inv_t.unsqueeze(1),
            s * (q_head * e_h).sum(-1), s * (q_head @ e_c.t()), cand == inv_h.unsqueeze(1))

    # --- scoring (no votes) -----------------------------------------------------------------
    @torch.no_grad()
    def entity_matrix(self, *, quantized: bool = False, dtype: torch.dtype = torch.float32) -> Tensor:
        """(num_entities, dim) entity vectors ``s_e · T_e``, or with ``quantized`` their codes' vectors."""
        if not quantized:
            return self._decode(self.entities, torch.arange(self.num_entities, device=self.device), dtype)
        codebook = self._require_codebook("entity_matrix(quantized=True)")
        return codebook.indices_to_codes(self.entity_codes(), dtype=dtype)

    @torch.no_grad()
    def relation_matrix(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(num_relations, dim) relation vectors ``s_r · T_r``."""
        return self._decode(self.relations, torch.arange(self.num_relations, device=self.device), dtype)

    def score_fn(self, *, quantized: bool = False):
        """A broadcasting ``score(h, r, t) -> φ`` for :func:`~ternary_graph.kg.metrics.filtered_ranks`.

        The entity (or, with ``quantized``, code) vectors are decoded once, now; the
        returned function keeps them, so call this again after training further.
        """
        ent = self.entity_matrix(quantized=quantized)
        rel = self.relation_matrix()

        def score(h: Tensor, r: Tensor, t: Tensor) -> Tensor:
            h, r, t = (x.to(device=ent.device, dtype=torch.long) for x in (h, r, t))
            if h.dim() == 2 and r.dim() == 2 and t.dim() == 2 and r.shape[1] == 1:
                if h.shape[1] == 1 and t.shape[0] == 1:  # rank tails: (B,1),(B,1),(1,C)
                    return self.tail_query(ent[h[:, 0]], rel[r[:, 0]]) @ ent[t[0]].t()
                if t.shape[1] == 1 and h.shape[0] == 1:  # rank heads: (1,C),(B,1),(B,1)
                    return self.head_query(rel[r[:, 0]], ent[t[:, 0]]) @ ent[h[0]].t()
            hb, rb, tb = torch.broadcast_tensors(h, r, t)
            return (self.tail_query(ent[hb], rel[rb]) * ent[tb]).sum(-1)

        return score

    @torch.no_grad()
    def score(self, h: Tensor, r: Tensor, t: Tensor) -> Tensor:
        """φ of broadcasting index tensors (decodes the tables on every call; see :meth:`score_fn`)."""
        return self.score_fn()(h, r, t)

    # --- KG VQ ------------------------------------------------------------------------------
    def _require_codebook(self, what: str) -> KGVQCodebook:
        if self.kg_codebook is None:
            raise ValueError(f"{what} needs a kg_codebook; this scorer was built with kg_codebook=None")
        return self.kg_codebook

    @torch.no_grad()
    def entity_codes(self, chunk: int = DEFAULT_CHUNK) -> Tensor:
        """(num_entities,) int64: the nearest KG code of every entity vector.

        Exact nearest-code search in chunks of ``chunk`` entities; changes nothing (no usage
        count, no re-seed), unlike a training call of the codebook.
        """
        codebook = self._require_codebook("entity_codes")
        _check_positive_int("chunk", chunk)
        cw = codebook.codes.weight
        out = torch.empty(self.num_entities, dtype=torch.long, device=self.device)
        for start in range(0, self.num_entities, chunk):
            ids = torch.arange(start, min(start + chunk, self.num_entities), device=self.device)
            z = self._decode(self.entities, ids)
            out[start:start + ids.numel()], _ = nearest_codes(z, cw.packed, cw.E, self.dim,
                                                              precision=codebook.precision)
        return out

    def fit_codebook(self, optimizer, passes: int = 4, chunk: int = 4096,
                     generator: torch.Generator | None = None) -> list[float]:
        """Fit the KG codebook to the (fixed) entity vectors through its own vote path.

        Each pass feeds every entity vector, in a random order and in chunks of ``chunk``, to
        the codebook in training mode (so usage is counted and dead codes are re-seeded from
        the worst-reconstructed vectors); the commitment loss's backward votes into the
        assigned codes and ``optimizer`` (a TernaryOptimizer over the codebook) steps them.
        The entity table gets no vote. Returns the mean squared quantisation error
        ``||z - q||²`` of each pass, measured before that pass's updates.
        """
        codebook = self._require_codebook("fit_codebook")
        _check_positive_int("passes", passes)
        _check_positive_int("chunk", chunk)
        was_training = codebook.training
        codebook.train()
        errors = []
        try:
            for _ in range(passes):
                order = torch.randperm(self.num_entities, generator=generator).to(self.device)
                total = 0.0
                for start in range(0, self.num_entities, chunk):
                    ids = order[start:start + chunk]
                    z = self._decode(self.entities, ids)
                    out = codebook(z)
                    with torch.no_grad():
                        total += float(((z - out.quantized) ** 2).sum())
                    out.commitment_loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                errors.append(total / self.num_entities)
        finally:
            codebook.train(was_training)
        return errors

    @torch.no_grad()
    def kg_edges(self, kg: KnowledgeGraph, entity_code: Tensor | None = None) -> KGEdges:
        """The triples of ``kg`` as edges between the KG codes of their entities.

        ``entity_code`` (num_entities,) maps entities to codes (default: :meth:`entity_codes`).
        Edges that coincide once entities share codes are kept once.
        """
        if not isinstance(kg, KnowledgeGraph):
            raise TypeError(f"kg must be a KnowledgeGraph, got {type(kg).__name__}")
        if kg.num_entities != self.num_entities or kg.num_relations != self.num_relations:
            raise ValueError(f"kg has {kg.num_entities} entities and {kg.num_relations} relations, the scorer "
                             f"{self.num_entities} and {self.num_relations}")
        codebook = self._require_codebook("kg_edges")
        codes = self.entity_codes() if entity_code is None else entity_code
        return edges_between_codes(kg.triples, codes, codebook.num_codes)


def edges_between_codes(triples: Tensor, entity_code: Tensor, num_codes: int) -> KGEdges:
    """Pure: map ``[head, relation, tail]`` rows to (code(head), code(tail), relation) edges,
    deduplicate and sort them by (src, dst, relation).

    Shapes: triples (E, 3) integer, entity_code (N,) integer in [0, num_codes) -> KGEdges of (M,).
    """
    if not isinstance(entity_code, Tensor) or entity_code.dim() != 1 or entity_code.is_floating_point():
        raise TypeError(f"entity_code must be a 1-D integer tensor, got {entity_code!r:.80}")
    codes = entity_code.detach().cpu().long()
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= num_codes):
        raise ValueError(f"entity_code values must lie in [0, {num_codes}), got range "
                         f"[{int(codes.min())}, {int(codes.max())}]")
    tri = triples.detach().cpu().long()
    if tri.numel() and (int(tri[:, [0, 2]].max()) >= codes.numel() or int(tri[:, [0, 2]].min()) < 0):
        raise ValueError(f"triples reference entity ids outside [0, {codes.numel()}): range "
                         f"[{int(tri[:, [0, 2]].min())}, {int(tri[:, [0, 2]].max())}]")
    if tri.numel() and int(tri[:, 1].max()) > 127:
        raise ValueError(f"int8 relation ids hold at most 128 relations, got relation id {int(tri[:, 1].max())}")
    src, dst, rel = codes[tri[:, 0]], codes[tri[:, 2]], tri[:, 1]
    num_rel = int(rel.max()) + 1 if rel.numel() else 1
    key = (src * num_codes + dst) * num_rel + rel  # < 2**63 for any codebook below ~10**9 codes
    key = torch.unique(key)  # sorted ascending = sorted by (src, dst, relation)
    rel_u = key % num_rel
    pair = key // num_rel
    return KGEdges(src=(pair // num_codes).to(torch.int32), dst=(pair % num_codes).to(torch.int32),
                   relation=rel_u.to(torch.int8))


def hashed_entity_codes(entity_names: list[str], num_codes: int) -> Tensor:
    """(N,) int64: each entity's code from a BLAKE2b hash of its qualified name, modulo ``num_codes``.

    A mapping that needs no trained scorer and never changes: stable across processes and
    graph versions (an entity keeps its code when others are added). Distinct entities
    collide at random, unlike the codes of :meth:`TernaryKGScorer.entity_codes`, where
    entities that play similar relational roles share a code.
    """
    import hashlib

    _check_positive_int("num_codes", num_codes)
    if not isinstance(entity_names, (list, tuple)) or not all(isinstance(n, str) for n in entity_names):
        raise TypeError("entity_names must be a list of str")
    values = [int.from_bytes(hashlib.blake2b(n.encode(), digest_size=8).digest(), "big") % num_codes
              for n in entity_names]
    return torch.tensor(values, dtype=torch.long)
