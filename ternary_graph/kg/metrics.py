"""Filtered link-prediction metrics for any triple scorer.

A scorer is any callable ``score(h, r, t) -> Tensor`` over int64 index tensors that
*broadcast* to a common shape ``S`` and returns real scores of shape ``S`` (higher = more
plausible). :func:`filtered_ranks` calls it with ``h (B, 1), r (B, 1), t (1, C)`` to rank
tails and ``h (1, C), r (B, 1), t (B, 1)`` to rank heads. PyG's ``DistMult`` and ``TransE``
broadcast as they are; a scorer that only takes 1-D inputs (PyG's ``RotatE``) can be
wrapped with :func:`broadcast_score_fn`. Integer scores are allowed (ternary scorers tie
often, which is why ties are handled explicitly).

Protocol ("filtered" setting of Bordes et al. 2013): for a test triple ``(h, r, t)`` the
tail ``t`` is ranked against every entity ``e`` after removing the candidates ``e != t``
for which ``(h, r, e)`` is a known true triple; likewise the head against ``(e, r, t)``.
Ties: the rank is the mean of the optimistic rank (``1 + #higher``) and the pessimistic
rank (``1 + #higher + #equal``), i.e. ``1 + #higher + #equal / 2``, which is the expected
rank under a uniformly random tie break. A scorer that gives every entity the same score
therefore ranks at ``(n + 1) / 2``, not at 1. The true score is read from the same scored
row as the candidates, so tie detection never depends on two code paths rounding alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def filtered_ranks(
    score_fn: ScoreFn,
    test_triples: Tensor,
    known_triples: Tensor,
    num_entities: int,
    batch_size: int = 1 << 16,
    device: torch.device | str | None = None,
) -> Tensor:
    """Filtered tail and head ranks of every test triple.

    Args:
        score_fn: broadcasting scorer, see the module docstring.
        test_triples: ``[head, relation, tail]`` rows to rank.
        known_triples: every triple known to be true (train + valid + test, typically);
            used only for filtering. The test triple itself need not be excluded.
        num_entities: candidates are the entity ids ``0 .. num_entities - 1``.
        batch_size: most scores requested from ``score_fn`` per call (queries x
            candidates); bounds memory. Results do not depend on it.
        device: where the index tensors given to ``score_fn`` live (default CPU); ranks
            are counted on the device of the returned scores and returned on the CPU.

    Shapes:
        test_triples: (T, 3) integer; known_triples: (K, 3) integer.
        returns: (T, 2) float64; column 0 is the tail rank, column 1 the head rank;
        ranks lie in [1, num_entities] and may be half-integers (ties).
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
    if isinstance(num_entities, bool) or not isinstance(num_entities, int) or num_entities < 1:
        raise ValueError(f"num_entities must be a positive int, got {num_entities!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    test = _check_triples("test_triples", test_triples, num_entities)
    known = _check_triples("known_triples", known_triples, num_entities)
    num_relations = 1 + max(
        int(test[:, 1].max()) if test.numel() else 0, int(known[:, 1].max()) if known.numel() else 0
    )
    ranks = torch.empty(test.shape[0], 2, dtype=torch.float64)
    if test.shape[0] == 0:
        return ranks
    # Tail side: the query is (h, r) and candidates replace t; head side: (t, r) and h.
    for side, (q_col, a_col) in enumerate(((0, 2), (2, 0))):
        index = _FilterIndex(known[:, q_col], known[:, 1], known[:, a_col], num_relations)
        queries_per_step = max(1, batch_size // num_entities)
        for start in range(0, test.shape[0], queries_per_step):
            rows = test[start : start + queries_per_step]
            scores = _score_rows(score_fn, rows, side, num_entities, batch_size, device)
            excluded = index.mask(rows[:, q_col], rows[:, 1], num_entities)
            answer = rows[:, a_col]
            excluded[torch.arange(rows.shape[0]), answer] = True
            # Rank where the scores are (a GPU scorer never ships its score rows to the host).
            rank = _tie_averaged_rank(scores, answer.to(scores.device), excluded.to(scores.device))
            ranks[start : start + rows.shape[0], side] = rank.cpu()
    return ranks


def mrr_hits(ranks: Tensor, ks: Sequence[int] = (1, 3, 10)) -> dict[str, float]:
    """Mean reciprocal rank, mean rank and Hits@k over all ranks given.

    Pass the (T, 2) output of :func:`filtered_ranks` to average the tail and head sides
    (each test triple counts twice, once per side), or one column for one side. A
    tie-averaged rank counts as a hit at k when it is <= k (rank 1.5 is not a Hits@1).

    Shapes:
        ranks: any shape, every value >= 1.
    """
    if not isinstance(ranks, Tensor) or ranks.dtype == torch.bool or ranks.is_complex():
        got = ranks.dtype if isinstance(ranks, Tensor) else type(ranks).__name__
        raise TypeError(f"ranks must be a real tensor, got {got}")
    flat = ranks.detach().reshape(-1).to(torch.float64)
    if flat.numel() == 0:
        raise ValueError("ranks is empty: nothing to average")
    if not bool(torch.isfinite(flat).all()) or float(flat.min()) < 1:
        raise ValueError(f"ranks must be finite and >= 1, got min {float(flat.min())}")
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    out = {
        "mrr": float((1.0 / flat).mean()),
        "mean_rank": float(flat.mean()),
        "count": int(flat.numel()),
    }
    for k in ks:
        out[f"hits@{k}"] = float((flat <= k).to(torch.float64).mean())
    return out


def random_ranking_mrr(num_candidates: int) -> float:
    """Expected MRR of a rank drawn uniformly from 1..n: the harmonic number H_n over n."""
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
        raise ValueError(f"num_candidates must be a positive int, got {num_candidates!r}")
    harmonic = float(torch.arange(1, num_candidates + 1, dtype=torch.float64).reciprocal().sum())
    return harmonic / num_candidates


def broadcast_score_fn(flat_score_fn: ScoreFn) -> ScoreFn:
    """Wrap a scorer of 1-D index tensors into a broadcasting one.

    The wrapped scorer broadcasts ``h, r, t`` to a common shape, scores the flattened
    triples with ``flat_score_fn`` (1-D in, 1-D out) and reshapes the result back.
    """
    if not callable(flat_score_fn):
        raise TypeError(f"flat_score_fn must be callable, got {type(flat_score_fn).__name__}")

    def score(h: Tensor, r: Tensor, t: Tensor) -> Tensor:
        hb, rb, tb = torch.broadcast_tensors(h, r, t)
        out = flat_score_fn(hb.reshape(-1), rb.reshape(-1), tb.reshape(-1))
        return out.reshape(hb.shape)

    return score


# --------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------


class _FilterIndex:
    """Known answers of each (entity, relation) query, as sorted keys for searchsorted."""

    def __init__(self, query_entity: Tensor, relation: Tensor, answer: Tensor, num_relations: int):
        self.num_relations = num_relations
        keys = query_entity * num_relations + relation
        self.keys, order = torch.sort(keys, stable=True)
        self.answers = answer[order]

    def mask(self, query_entity: Tensor, relation: Tensor, num_entities: int) -> Tensor:
        """(B, num_entities) bool, True where the candidate is a known answer of the query."""
        b = query_entity.shape[0]
        keys = query_entity * self.num_relations + relation
        lo = torch.searchsorted(self.keys, keys, right=False)
        hi = torch.searchsorted(self.keys, keys, right=True)
        counts = hi - lo
        total = int(counts.sum())
        out = torch.zeros(b, num_entities, dtype=torch.bool)
        if total:
            rows = torch.repeat_interleave(torch.arange(b), counts)
            first = torch.repeat_interleave(lo, counts)
            offset = torch.arange(total) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
            out[rows, self.answers[first + offset]] = True
        return out


def _score_rows(
    score_fn: ScoreFn, rows: Tensor, side: int, num_entities: int, batch_size: int, device
) -> Tensor:
    """Scores (B, num_entities) of every candidate tail (side 0) or head (side 1)."""
    b = rows.shape[0]
    on_device = rows.to(device) if device is not None else rows
    h, r, t = on_device[:, 0:1], on_device[:, 1:2], on_device[:, 2:3]
    chunk = max(1, min(num_entities, batch_size // b))
    parts = []
    for start in range(0, num_entities, chunk):
        cand = torch.arange(start, min(start + chunk, num_entities), device=on_device.device).unsqueeze(0)
        with torch.no_grad():
            s = score_fn(h, r, cand) if side == 0 else score_fn(cand, r, t)
        if not isinstance(s, Tensor) or s.shape != (b, cand.shape[1]):
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(
                f"score_fn must broadcast its index tensors and return shape {(b, cand.shape[1])}, "
                f"got {got}"
            )
        if s.dtype == torch.bool or s.is_complex():
            raise TypeError(f"score_fn must return real scores, got dtype {s.dtype}")
        parts.append(s.detach())
    scores = torch.cat(parts, dim=1)
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError("score_fn returned NaN scores; ranks would be meaningless")
    return scores


def _tie_averaged_rank(scores: Tensor, answer: Tensor, excluded: Tensor) -> Tensor:
    """1 + #higher + #equal/2 over the candidates not excluded (the answer is excluded)."""
    target = scores.gather(1, answer.unsqueeze(1))
    kept = ~excluded
    higher = ((scores > target) & kept).sum(dim=1, dtype=torch.float64)
    equal = ((scores == target) & kept).sum(dim=1, dtype=torch.float64)
    return 1.0 + higher + 0.5 * equal


def _check_triples(arg: str, triples: Tensor, num_entities: int) -> Tensor:
    if not isinstance(triples, Tensor) or triples.is_floating_point() or triples.dtype == torch.bool or triples.is_complex():
        got = triples.dtype if isinstance(triples, Tensor) else type(triples).__name__
        raise TypeError(f"{arg} must be an integer tensor, got {got}")
    if triples.dim() != 2 or triples.shape[1] != 3:
        raise ValueError(f"{arg} must have shape (n, 3), got {tuple(triples.shape)}")
    out = triples.detach().cpu().long()
    if out.numel():
        ends = out[:, [0, 2]]
        if int(ends.min()) < 0 or int(ends.max()) >= num_entities:
            raise ValueError(
                f"{arg} has entity ids outside [0, {num_entities}): range "
                f"[{int(ends.min())}, {int(ends.max())}]"
            )
        if int(out[:, 1].min()) < 0:
            raise ValueError(f"{arg} has negative relation ids: min {int(out[:, 1].min())}")
    return out
