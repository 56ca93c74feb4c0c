"""Routing ablation (issue 14): the same model, tokens and seeds with each MoEGraph router.

    (a) graph-learned-vq  MoEGraph as it was: learned code -> expert edges plus centroid scores,
                          codes of a learned VQ projection (which collapses onto a few codes)
    (e) graph             the same router over codes of a frozen random projection (the default
                          since 2026-12-02: the codebook lives, so edges have codes to learn for)
        graph-random-reseed  (e) with dead codes re-seeded from a random sample of the batch
        graph-1m-codes, graph-10m-codes  (e) with 2^20 and 10^7 codes (the default model's size):
                          the report's last column is the codes hit in a re-seed window against
                          the most a window can hit, min(codes, tokens in the window)
        graph-1m-codes-reseed12  2^20 codes re-seeded every 12 calls instead of 100 (8x the
                          re-seeding budget: at most one call's inputs per check)
        graph-1m-codes-random-reseed  2^20 codes re-seeded from a random sample of the batch
        graph-reseed400, graph-1m-codes-reseed400  65,536 and 2^20 codes checked every 400 calls:
                          a re-seeded code gets 4x as long to win inputs before it counts as dead
                          (at 2^20 codes every 12 calls left fewer codes live than every 100; every
                          400 left fewer at both sizes, H100 2026-12-07)
    (b) frozen            centroids only: the same candidates with every edge frozen neutral
    (c) topk              a plain top-k softmax router over the ternary centroids, Switch balance loss
        topk-float        the same router with a float weight (a model with float parameters: eager)
    (d) hash              experts fixed by a hash of the code id, gates from the centroid scores

Every run trains with the update rule named by ``run --rule`` (a rule_study.py variant): by default
``old``, the CLI's default rule, which trains the small preset best (1.269 val bits/byte over 3
seeds, +6.8% over the float twin; docs/results.md). The ablation of 2026-12-02 ran with
``--rule cool24-64``, then thought best and since found worse at small (1.37-1.51); runs of
different rules need different ``--root``s. The report gives val bits/byte (mean ± std over
seeds), the code -> expert mutual information and the largest and smallest expert share on the
validation windows, and the shared VQ's live-code fraction.

    PYTHONPATH=. python3 experiments/routing_ablation.py run --root /tmp/routing --preset small \\
        --steps 3052 --batch-size 32 --seq-len 512 --eval-every 200 --variants graph,frozen,topk,hash
    PYTHONPATH=. python3 experiments/routing_ablation.py report --root /tmp/routing --out docs/measurements

A resumed or extended ablation keeps its runs: a run folder made with another router is refused
by ``ternary-graph train --resume`` (its config names the ``routing`` field).
"""

from __future__ import annotations

import sys

from rule_study import ROUTING_COLUMNS, run_cli

from ternary_graph.config import SHARED_VQ_SIZE

DEFAULT_RULE = "old"


def _router(routing: str, *extra: str) -> list[str]:
    return ["--routing", routing, *extra]


ROUTING_VARIANTS: dict[str, list[str]] = {
    "graph": _router("graph"),
    "graph-learned-vq": _router("graph", "--model", "vq_projection=learned"),
    "graph-random-reseed": _router("graph", "--model", "vq_reseed_from=random"),
    "graph-1m-codes": _router("graph", "--model", f"codebook_size={1 << 20}"),
    "graph-1m-codes-reseed12": _router("graph", "--model", f"codebook_size={1 << 20}", "--model", "vq_reseed_window=12"),
    "graph-1m-codes-random-reseed": _router("graph", "--model", f"codebook_size={1 << 20}",
                                            "--model", "vq_reseed_from=random"),
    "graph-reseed400": _router("graph", "--model", "vq_reseed_window=400"),
    "graph-1m-codes-reseed400": _router("graph", "--model", f"codebook_size={1 << 20}", "--model",
                                        "vq_reseed_window=400"),
    "graph-10m-codes": _router("graph", "--model", f"codebook_size={SHARED_VQ_SIZE}"),
    "frozen": _router("frozen"),
    "topk": _router("topk"),
    "topk-float": _router("topk-float", "--eager"),
    "hash": _router("hash"),
}

if __name__ == "__main__":
    sys.exit(run_cli(table=ROUTING_VARIANTS, doc=__doc__, prog="routing_ablation", baseline="frozen",
                     columns=ROUTING_COLUMNS, rule=DEFAULT_RULE))
