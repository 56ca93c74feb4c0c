"""The ternary KG scorer, its KG VQ codes and edges, the KG task and the composite LM + KG loss.

Everything runs on the knowledge graph of the real stdlib ``json`` and ``email`` packages.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from ternary_graph.config import get_preset
from ternary_graph.kg.graph import KnowledgeGraph, build_kg_from_roots
from ternary_graph.kg.metrics import filtered_ranks, mrr_hits, random_ranking_mrr
from ternary_graph.kg.scorer import TernaryKGScorer, edges_between_codes, hashed_entity_codes
from ternary_graph.models.model import build_model
from ternary_graph.nn.vq import KGVQCodebook
from ternary_graph.ternary.optimizer import TernaryOptimizer, UpdateRule
from ternary_graph.kg.task import (
    NAME_BYTES,
    PAD_BYTE,
    KGTrainConfig,
    encode_entity_names,
    entity_code_map,
    kg_composite_loss,
    load_kg_scorer,
    train_kg,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def kg() -> KnowledgeGraph:
    return build_kg_from_roots([STDLIB / "json", STDLIB / "email"], STDLIB)


@pytest.fixture(scope="module")
def trained(kg, tmp_path_factory):
    """One short KG task run (module-scoped: it is the expensive part); tests only read it."""
    out = tmp_path_factory.mktemp("kg_run")
    cfg = KGTrainConfig(epochs=20, batch_size=256, negatives=64, kg_codebook_size=256, codebook_passes=2,
                        eval_every=10, out=str(out), progress=False)
    return cfg, train_kg(cfg, kg=kg)


def _scorer(kg, *, score="distmult", codes=0, seed=0) -> TernaryKGScorer:
    gen = torch.Generator().manual_seed(seed)
    cb = KGVQCodebook(codes, 64, generator=torch.Generator().manual_seed(seed + 1)) if codes else None
    return TernaryKGScorer(kg.num_entities, kg.num_relations, 64, kg_codebook=cb, score=score, generator=gen)


# ---- learning --------------------------------------------------------------------------------


def test_scorer_learns_above_random_ranking(kg, trained):
    _, summary = trained
    random_mrr = random_ranking_mrr(kg.num_entities)
    assert summary.random_mrr == pytest.approx(random_mrr)
    assert summary.test["count"] == 2 * len(kg.split().test)
    assert summary.test["mrr"] > 3 * random_mrr, (summary.test, random_mrr)
    assert summary.valid_mrr > 3 * random_mrr
    # Scoring with the entities' KG code vectors still ranks far above chance.
    assert summary.test_quantized["mrr"] > 3 * random_mrr
    # The loss fell and the run folder holds what it promises.
    history = summary.history
    assert history[-1]["loss"] < history[0]["loss"]
    lines = (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 20 + 1  # one per epoch, one for the codebook fit
    assert "valid_mrr" in lines[9] and "valid_mrr" not in lines[8]


def test_checkpoint_round_trip_gives_the_same_scores(kg, trained):
    cfg, summary = trained
    scorer, loaded_cfg, meta = load_kg_scorer(summary.run_dir)
    assert loaded_cfg == cfg
    assert meta["summary"]["test"]["mrr"] == pytest.approx(summary.test["mrr"])
    ranks = filtered_ranks(scorer.score_fn(), kg.split().test, kg.triples, kg.num_entities)
    assert mrr_hits(ranks)["mrr"] == pytest.approx(summary.test["mrr"])


def test_loss_backward_votes_only_into_touched_rows(kg):
    scorer = _scorer(kg)
    opt = TernaryOptimizer(scorer, UpdateRule(threshold=8, scale_threshold=0, vote_magnitude=4))
    batch = kg.split().train[:32]
    before = scorer.entities.weight.packed.clone()
    loss = scorer.loss(batch, num_negatives=16, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    acc = scorer.entities.weight.T_accum
    voted = (acc != 0).any(dim=1)
    ends = set(batch[:, 0].tolist()) | set(batch[:, 2].tolist())
    assert ends <= set(voted.nonzero().flatten().tolist())
    assert int(voted.sum()) <= len(ends) + 16  # the batch's entities and the sampled negatives only
    assert int(acc.abs().max()) == 4
    opt.step()
    opt.step()  # the touched rows were consumed by the first step; nothing else moves
    changed = (scorer.entities.weight.packed != before).any(dim=1)
    assert not bool((changed & ~voted).any())


def test_proportional_vote_sampling_keeps_a_subset_of_the_sign_votes(kg):
    batch = kg.split().train[:64]
    acc = {}
    for mode in ("sign", "proportional"):
        scorer = _scorer(kg, seed=5)
        TernaryOptimizer(scorer, UpdateRule(vote_magnitude=1))
        # Same generator seed: the negatives are drawn first, so both modes score the same candidates.
        scorer.loss(batch, num_negatives=32, generator=torch.Generator().manual_seed(9), vote_sampling=mode).backward()
        acc[mode] = scorer.entities.weight.T_accum.clone()
    kept = acc["proportional"] != 0
    assert 0 < int(kept.sum()) < int((acc["sign"] != 0).sum())
    assert torch.equal(acc["proportional"][kept], acc["sign"][kept])  # a kept vote has the gradient's sign


# ---- maths -----------------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["distmult", "complex"])
def test_ranking_fast_path_matches_elementwise_score(kg, score):
    scorer = _scorer(kg, score=score, seed=3)
    fn = scorer.score_fn()
    q = kg.triples[:5].long()
    cand = torch.arange(kg.num_entities).unsqueeze(0)
    ent, rel = scorer.entity_matrix().double(), scorer.relation_matrix().double()
    for side in (0, 1):
        fast = fn(q[:, 0:1], q[:, 1:2], cand) if side == 0 else fn(cand, q[:, 1:2], q[:, 2:3])
        hb, rb, tb = torch.broadcast_tensors(*((q[:, 0:1], q[:, 1:2], cand) if side == 0
                                               else (cand, q[:, 1:2], q[:, 2:3])))
        h, r, t = ent[hb], rel[rb], ent[tb]
        if score == "distmult":
            ref = (h * r * t).sum(-1)
        else:  # Re <h, r, conj(t)>
            hc, rc, tc = (torch.complex(x[..., :32], x[..., 32:]) for x in (h, r, t))
            ref = (hc * rc * tc.conj()).real.sum(-1)
        torch.testing.assert_close(fast.double(), ref, rtol=0, atol=1e-9)  # small integers: exact


def test_complex_score_is_asymmetric_and_distmult_symmetric(kg):
    h, r, t = torch.tensor([0]), torch.tensor([1]), torch.tensor([5])
    dm, cx = _scorer(kg, seed=1), _scorer(kg, score="complex", seed=1)
    assert torch.equal(dm.score(h, r, t), dm.score(t, r, h))
    pairs = torch.arange(50)
    assert not torch.equal(cx.score(pairs, r, pairs.flip(0)), cx.score(pairs.flip(0), r, pairs))


# ---- KG VQ codes and edges --------------------------------------------------------------------


def test_kg_edges_are_int32_int8_in_range_deduplicated_and_sorted(kg):
    scorer = _scorer(kg, codes=64)
    codes = scorer.entity_codes()
    assert codes.dtype == torch.int64 and codes.shape == (kg.num_entities,)
    edges = scorer.kg_edges(kg)
    assert edges.src.dtype == torch.int32 and edges.dst.dtype == torch.int32 and edges.relation.dtype == torch.int8
    assert edges.src.shape == edges.dst.shape == edges.relation.shape
    for ends in (edges.src, edges.dst):
        assert 0 <= int(ends.min()) and int(ends.max()) < 64
    rows = list(zip(edges.src.tolist(), edges.dst.tolist(), edges.relation.tolist()))
    assert len(set(rows)) == len(rows)  # deduplicated
    assert rows == sorted(rows)  # sorted by (src, dst, relation)
    expected = {(int(codes[h]), int(codes[t]), r) for h, r, t in kg.triples.tolist()}
    assert set(rows) == expected  # every triple is there, nothing else
    assert len(rows) < kg.num_triples  # 64 codes for 711 entities: triples merge


def test_entity_codes_are_nearest_codes_and_change_nothing(kg):
    scorer = _scorer(kg, codes=128)
    cb = scorer.kg_codebook
    cb.train()
    before = {k: v.clone() for k, v in cb.state_dict().items()}
    codes = scorer.entity_codes(chunk=100)  # chunking does not change the answer
    assert torch.equal(codes, scorer.entity_codes())
    ent = scorer.entity_matrix().double()
    table = cb.indices_to_codes(torch.arange(128), dtype=torch.float64)
    dist = torch.cdist(ent, table) ** 2
    picked = dist.gather(1, codes.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(picked, dist.min(dim=1).values, rtol=0, atol=1e-6)
    after = cb.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fit_codebook_lowers_quantisation_error(kg):
    scorer = _scorer(kg, codes=256)
    opt = TernaryOptimizer(scorer.kg_codebook, UpdateRule(threshold=8, scale_threshold=0, vote_magnitude=4))
    entity_before = scorer.entities.weight.packed.clone()
    errors = scorer.fit_codebook(opt, passes=3, chunk=128, generator=torch.Generator().manual_seed(0))
    assert len(errors) == 3 and errors[-1] < errors[0]
    assert torch.equal(scorer.entities.weight.packed, entity_before)
    assert int(scorer.entities.weight.T_accum.abs().sum()) == 0  # the entity table got no vote


def test_edges_between_codes_pure_function():
    triples = torch.tensor([[0, 1, 2], [3, 1, 2], [0, 0, 2], [2, 1, 0]], dtype=torch.int32)
    codes = torch.tensor([5, 9, 7, 5])
    e = edges_between_codes(triples, codes, num_codes=10)
    got = list(zip(e.src.tolist(), e.dst.tolist(), e.relation.tolist()))
    assert got == [(5, 7, 0), (5, 7, 1), (7, 5, 1)]  # rows 0 and 1 coincide
    with pytest.raises(ValueError, match="12"):
        edges_between_codes(triples, torch.tensor([5, 9, 12, 5]), num_codes=10)


def test_scorer_state_dict_has_no_float_elements(kg):
    scorer = _scorer(kg, codes=64)
    state = scorer.state_dict()
    assert state, "empty state_dict"
    floats = {k: v.numel() for k, v in state.items() if v.dtype.is_floating_point or v.dtype.is_complex}
    assert floats == {}
    assert any(k.startswith("kg_codebook.") for k in state)


def test_hashed_codes_are_stable_and_in_range(kg):
    a = hashed_entity_codes(kg.entity_names, 100)
    assert torch.equal(a, hashed_entity_codes(list(kg.entity_names), 100))
    assert a.dtype == torch.int64 and int(a.min()) >= 0 and int(a.max()) < 100
    assert torch.equal(entity_code_map(kg, 100), a)
    assert len(torch.unique(a)) > 90  # 711 names spread over almost every code


# ---- composite LM + KG loss ----------------------------------------------------------------------


def _tiny_model():
    cfg = get_preset("tiny").replace(n_layers=2, codebook_size=256, kg_codebook_size=256)
    return build_model(cfg, seed=0)


def test_encode_entity_names_right_aligned():
    ids = encode_entity_names(["json", "x" * 40 + "tail"])
    assert ids.shape == (2, NAME_BYTES) and ids.dtype == torch.int64
    assert bytes(ids[0, -4:].tolist()) == b"json" and set(ids[0, :-4].tolist()) == {PAD_BYTE}
    assert bytes(ids[1].tolist()).endswith(b"tail") and int(ids[1, 0]) == ord("x")  # kept the last 32 bytes


def test_kg_composite_loss_is_finite_and_votes_into_kg_codes(kg):
    model = _tiny_model()
    codes = model.kg_vq.codes.weight
    assert int(codes.T_accum.abs().sum()) == 0
    entity_code = entity_code_map(kg, model.kg_vq.num_codes)
    batch = kg.split().train[:8]
    loss = kg_composite_loss(model, kg, batch, entity_code, num_negatives=7,
                             generator=torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and bool(torch.isfinite(loss))
    assert 0 < float(loss.detach()) < 20
    loss.backward()
    voted_rows = (codes.T_accum != 0).any(dim=1).nonzero().flatten()
    true_codes = set(entity_code[batch[:, 2].long()].tolist())
    assert true_codes <= set(voted_rows.tolist())  # every true tail's code got votes
    assert int(codes.E_accum.abs().sum()) > 0
    # the head's relation table and projection learned too
    assert int(model.head.kg_proj.weight.T_accum.abs().sum()) > 0


def test_kg_composite_loss_with_scorer_codes(kg):
    """Codes from a scorer that shares the model's KG codebook."""
    model = _tiny_model()
    scorer = TernaryKGScorer(kg.num_entities, kg.num_relations, 64, kg_codebook=model.kg_vq,
                             generator=torch.Generator().manual_seed(0))
    entity_code = entity_code_map(kg, model.kg_vq.num_codes, scorer)
    assert torch.equal(entity_code, scorer.entity_codes())
    loss = kg_composite_loss(model, kg, kg.split().train[:4], entity_code, 5, torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(loss))


# ---- bad input ---------------------------------------------------------------------------------


def test_out_of_range_entity_ids_raise_value_error_naming_the_value(kg):
    scorer = _scorer(kg)
    bad = torch.tensor([[0, 0, 1], [kg.num_entities + 5, 0, 1]])
    with pytest.raises(ValueError, match=str(kg.num_entities + 5)):
        scorer.loss(bad, num_negatives=4)
    with pytest.raises(ValueError, match="-3"):
        scorer.loss(torch.tensor([[0, 0, -3]]), num_negatives=4)
    with pytest.raises(ValueError, match="relation ids.*, got 9"):
        scorer.loss(torch.tensor([[0, 9, 1]]))
    model = _tiny_model()
    codes = entity_code_map(kg, model.kg_vq.num_codes)
    with pytest.raises(ValueError, match=str(kg.num_entities + 5)):
        kg_composite_loss(model, kg, bad, codes, 4)
    with pytest.raises(ValueError, match="300"):
        kg_composite_loss(model, kg, torch.tensor([[0, 0, 1]]), torch.full((kg.num_entities,), 300), 4)
    with pytest.raises(TypeError, match="float"):
        scorer.loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape"):
        scorer.loss(torch.zeros(2, 4, dtype=torch.long))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="even dim"):
        TernaryKGScorer(10, 2, 63, score="complex")
    with pytest.raises(ValueError, match="'rotate'"):
        TernaryKGScorer(10, 2, 64, score="rotate")
    with pytest.raises(ValueError, match="kg_codebook.dim=32"):
        TernaryKGScorer(10, 2, 64, kg_codebook=KGVQCodebook(16, 32))
    with pytest.raises(ValueError, match="entity_codes needs a kg_codebook"):
        TernaryKGScorer(10, 2, 64).entity_codes()
    with pytest.raises(ValueError, match="negatives"):
        KGTrainConfig(negatives=-1)
    with pytest.raises(ValueError, match="threshold"):
        KGTrainConfig(threshold=0)
