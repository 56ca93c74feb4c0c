"""The knowledge graph in one place: the stdlib KG (``graph.py``), filtered ranking metrics
(``metrics.py``), the ternary link-prediction scorer (``scorer.py``) and its training task and
the composite LM + KG loss (``task.py``).

``task`` is not imported here: it depends on ``train/`` (checkpoints), and the graph, metrics
and scorer are used without it (viz, experiments).
"""

from .graph import KGSplit, KnowledgeGraph, build_kg_from_roots, build_stdlib_kg
from .metrics import broadcast_score_fn, filtered_ranks, mrr_hits, random_ranking_mrr
from .scorer import KGEdges, TernaryKGScorer, edges_between_codes, hashed_entity_codes

__all__ = ["KGEdges", "KGSplit", "KnowledgeGraph", "TernaryKGScorer", "broadcast_score_fn", "build_kg_from_roots",
           "build_stdlib_kg", "edges_between_codes", "filtered_ranks", "hashed_entity_codes", "mrr_hits",
           "random_ranking_mrr"]
