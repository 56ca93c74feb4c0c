"""Fair KG baselines (ternary_graph/kg/baselines.py): PyG models under both recipes, the shared
early-stopping protocol, and the closed-form scores the CE recipe and ranking go through.

Runs on the knowledge graph of the real stdlib ``json``, ``tomllib`` and ``html`` packages
(~200 triples).
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import pytest
import torch

from ternary_graph.kg.baselines import (
    LOSSES,
    PYG_MODELS,
    FitConfig,
    build_pyg_model,
    candidate_scores,
    early_stopping,
    evaluate_pyg,
    fit_early_stopping,
    sampled_ce_loss,
    train_config,
)
from ternary_graph.kg.graph import KnowledgeGraph, build_kg_from_roots
from ternary_graph.kg.scorer import TernaryKGScorer
from ternary_graph.kg.task import evaluate_scorer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def kg() -> KnowledgeGraph:
    return build_kg_from_roots([STDLIB / "json", STDLIB / "tomllib", STDLIB / "html"], STDLIB)


def test_subgraph_is_small_and_split(kg):
    split = kg.split()
    assert 150 <= kg.num_triples <= 300
    assert len(split.train) and len(split.valid) and len(split.test)


# ---- early stopping -----------------------------------------------------------------------------


def test_early_stopping_picks_the_best_and_stops_after_patience():
    scores = [0.10, 0.30, 0.20, 0.25]
    assert early_stopping(scores, patience=2) == (1, True)
    assert early_stopping(scores, patience=3) == (1, False)
    assert early_stopping(scores[:2], patience=1) == (1, False)
    # Ties go to the earliest evaluation; a NaN is never the best.
    assert early_stopping([0.1, 0.3, 0.3], patience=1) == (1, True)
    assert early_stopping([float("nan"), 0.2, float("nan")], patience=5) == (1, False)


def test_early_stopping_rejects_bad_arguments():
    with pytest.raises(ValueError, match="patience must be a positive int, got 0"):
        early_stopping([0.1], patience=0)
    with pytest.raises(ValueError, match="valid_scores is empty"):
        early_stopping([], patience=1)


def _counting_module() -> torch.nn.Module:
    module = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.zero_()
    return module


def test_fit_early_stopping_keeps_the_weights_of_the_best_epoch():
    module = _counting_module()
    valid = iter([0.1, 0.5, 0.2, 0.3, 0.9])  # the 0.9 is never reached: patience 2 stops at epoch 4

    def train_one_epoch() -> float:
        with torch.no_grad():
            module.weight.add_(1.0)  # weight == epoch number
        return 1.0

    fit = fit_early_stopping(train_one_epoch, lambda: next(valid), module, max_epochs=10, eval_every=1, patience=2)
    assert (fit.best_epoch, fit.best_valid_mrr, fit.epochs_run) == (2, 0.5, 4)
    assert fit.stopped_early and not fit.diverged
    assert [e for e, _ in fit.evals] == [1, 2, 3, 4]
    assert float(module.weight.detach()) == 2.0  # restored to the state after epoch 2


def test_fit_early_stopping_evaluates_every_k_epochs_and_at_the_end_and_stops_on_divergence():
    module = _counting_module()
    epochs = []

    def train_one_epoch() -> float:
        with torch.no_grad():
            module.weight.add_(1.0)
        epochs.append(len(epochs) + 1)
        return 1.0

    fit = fit_early_stopping(train_one_epoch, lambda: float(module.weight.detach()), module, max_epochs=7, eval_every=3,
                             patience=5)
    assert [e for e, _ in fit.evals] == [3, 6, 7] and fit.best_epoch == 7 and not fit.stopped_early

    module = _counting_module()
    losses = iter([1.0, 0.5, float("nan"), 0.1])
    fit = fit_early_stopping(lambda: next(losses), lambda: 0.2, module, max_epochs=4, eval_every=1, patience=3)
    assert fit.diverged and fit.epochs_run == 3 and fit.best_epoch == 1


# ---- the recipes --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PYG_MODELS))
def test_candidate_scores_match_forward_on_both_sides(kg, name):
    torch.manual_seed(0)
    model = build_pyg_model(name, kg.num_entities, kg.num_relations, 8)
    tri = kg.triples[:5].long()
    cand = torch.arange(kg.num_entities)
    with torch.no_grad():
        tails = candidate_scores(model, tri[:, 0], tri[:, 1], cand, tails=True)
        heads = candidate_scores(model, tri[:, 2], tri[:, 1], cand, tails=False)
        h, r, c = torch.broadcast_tensors(tri[:, 0:1], tri[:, 1:2], cand.unsqueeze(0))
        ref_tails = model(h.reshape(-1), r.reshape(-1), c.reshape(-1)).reshape(h.shape)
        c, r, t = torch.broadcast_tensors(cand.unsqueeze(0), tri[:, 1:2], tri[:, 2:3])
        ref_heads = model(c.reshape(-1), r.reshape(-1), t.reshape(-1)).reshape(t.shape)
    torch.testing.assert_close(tails, ref_tails, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(heads, ref_heads, rtol=1e-5, atol=1e-5)


def test_sampled_ce_on_pyg_distmult_is_the_ternary_scorers_loss(kg):
    """Same embeddings, same seed: PyG DistMult under the CE recipe and the scorer's own loss agree."""
    torch.manual_seed(0)
    model = build_pyg_model("distmult", kg.num_entities, kg.num_relations, 8)
    scorer = TernaryKGScorer(kg.num_entities, kg.num_relations, 8, weights="float", logit_scale=1.0)
    with torch.no_grad():
        scorer.entities.weight.copy_(model.node_emb.weight)
        scorer.relations.weight.copy_(model.rel_emb.weight)
    batch = kg.triples[:32].long()
    ours = sampled_ce_loss(model, batch, 16, generator=torch.Generator().manual_seed(3))
    theirs = scorer.loss(batch, num_negatives=16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", sorted(PYG_MODELS))
def test_pyg_models_train_with_both_recipes(kg, name, loss):
    cfg = FitConfig(model=name, loss=loss, dim=16, lr=1e-2, negatives=32, batch_size=64, max_epochs=4,
                    eval_every=2, patience=2, seed=0)
    before = torch.get_rng_state()
    report, model = train_config(cfg, kg)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is seeded in a fork only
    assert report.fit["epochs_run"] == 4 and all(math.isfinite(x) for x in report.fit["losses"])
    assert 0 < report.valid["mrr"] <= 1 and 0 < report.test["mrr"] <= 1
    # The model leaves with the weights of its best evaluation.
    assert evaluate_pyg(model, kg, kg.split().valid)["mrr"] == pytest.approx(report.fit["best_valid_mrr"])
    assert report.param_bytes == sum(p.numel() * 4 for p in model.parameters())


def test_ternary_scorer_trains_under_the_same_protocol(kg):
    cfg = FitConfig(model="ternary", dim=16, negatives=32, batch_size=64, max_epochs=4, eval_every=2, patience=2)
    report, scorer = train_config(cfg, kg)
    assert all(math.isfinite(x) for x in report.fit["losses"])
    assert 0 < report.valid["mrr"] <= 1 and 0 < report.test["mrr"] <= 1
    assert evaluate_scorer(scorer, kg, kg.split().valid)["mrr"] == pytest.approx(report.fit["best_valid_mrr"])
    # Packed trits (ceil(16/5) = 4 bytes) + one int8 scale per row, both tables.
    assert report.param_bytes == (kg.num_entities + kg.num_relations) * 5


def test_runs_are_reproducible_per_seed(kg):
    cfg = FitConfig(model="transe", loss="native", dim=8, negatives=16, batch_size=64, max_epochs=2, eval_every=2)
    a, _ = train_config(cfg, kg, evaluate_test=False)
    b, _ = train_config(cfg, kg, evaluate_test=False)
    assert a.fit["losses"] == b.fit["losses"] and a.valid == b.valid and a.test is None


def test_bad_configs_name_the_argument_and_value():
    with pytest.raises(ValueError, match="FitConfig.model must be .*'bogus'"):
        FitConfig(model="bogus")
    with pytest.raises(ValueError, match="FitConfig.loss must be 'sampled_ce' for model='ternary', got 'native'"):
        FitConfig(model="ternary", loss="native")
    with pytest.raises(ValueError, match="FitConfig.patience must be a positive int, got 0"):
        FitConfig(model="distmult", patience=0)
    with pytest.raises(ValueError, match="FitConfig.lr must be a positive finite number, got -1"):
        FitConfig(model="distmult", lr=-1)
    with pytest.raises(TypeError, match="no closed-form scores for Linear"):
        candidate_scores(torch.nn.Linear(1, 1), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                         torch.zeros(1, dtype=torch.long), tails=True)
