"""The stdlib knowledge graph (ternary_graph.kg.graph) and filtered ranking metrics.

Everything runs on the real standard library sources of the running interpreter: the
`json` and `email` packages for extraction details, the whole stdlib once for scale.
"""

from __future__ import annotations

import ast
import logging
import math
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from ternary_graph.kg.graph import (
    ENTITY_TYPE_NAMES,
    RELATION_NAMES,
    KnowledgeGraph,
    build_kg_from_roots,
    build_stdlib_kg,
)
from ternary_graph.kg.metrics import (
    broadcast_score_fn,
    filtered_ranks,
    mrr_hits,
    random_ranking_mrr,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _json_email() -> KnowledgeGraph:
    return build_kg_from_roots([STDLIB / "json", STDLIB / "email"], STDLIB)


@pytest.fixture(scope="module")
def kg() -> KnowledgeGraph:
    return _json_email()


def _entity_type(kg: KnowledgeGraph, name: str) -> str:
    return kg.entity_type_names[int(kg.entity_types[kg.entity_id(name)])]


# ---- extraction -------------------------------------------------------------------------


def test_all_four_relations_present(kg):
    counts = kg.relation_counts()
    assert kg.relation_names == list(RELATION_NAMES)
    assert set(counts) == {"imports", "inherits_from", "defines", "calls"}
    assert all(c > 0 for c in counts.values()), counts
    assert sum(counts.values()) == kg.num_triples


@pytest.mark.parametrize(
    "head, relation, tail",
    [
        ("json.decoder", "defines", "json.decoder.JSONDecoder"),
        ("json.decoder.JSONDecoder", "defines", "json.decoder.JSONDecoder.decode"),
        ("json", "defines", "json.loads"),
        # `from .decoder import JSONDecoder` in json/__init__.py (relative import)
        ("json", "imports", "json.decoder"),
        # `from json import scanner` names a submodule
        ("json.decoder", "imports", "json.scanner"),
        # self.method inside the class
        ("json.decoder.JSONDecoder.decode", "calls", "json.decoder.JSONDecoder.raw_decode"),
        # a name bound in the module by def
        ("json.load", "calls", "json.loads"),
        # module.attr through `import json`
        ("json.tool.main", "calls", "json.load"),
        # self.method found in a base class of a base class, in another module
        ("email.mime.text.MIMEText.__init__", "calls", "email.message.Message.set_payload"),
        # super().method resolves in the base class
        ("email.feedparser.BytesFeedParser.feed", "calls", "email.feedparser.FeedParser.feed"),
        # calling a class resolves to its __init__
        ("json.decoder.JSONDecoder.decode", "calls", "json.decoder.JSONDecodeError.__init__"),
        ("email.errors.HeaderParseError", "inherits_from", "email.errors.MessageParseError"),
    ],
)
def test_known_edges(kg, head, relation, tail):
    assert kg.has_triple(head, relation, tail)


def test_inheritance_read_from_the_source(kg):
    # Ground the expected edge in the file itself: MIMEText's base name and the module it
    # is imported from, as written in email/mime/text.py.
    tree = ast.parse((STDLIB / "email" / "mime" / "text.py").read_bytes())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MIMEText")
    (base,) = [b.id for b in cls.bases]
    origin = next(
        n.module for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and any(a.name == base for a in n.names)
    )
    assert kg.has_triple("email.mime.text.MIMEText", "inherits_from", f"{origin}.{base}")


def test_entity_types_and_sorted_names(kg):
    assert kg.entity_type_names == list(ENTITY_TYPE_NAMES)
    assert _entity_type(kg, "json.decoder") == "module"
    assert _entity_type(kg, "json") == "module"
    assert _entity_type(kg, "json.decoder.JSONDecoder") == "class"
    assert _entity_type(kg, "json.decoder.JSONDecoder.decode") == "function"
    assert kg.entity_names == sorted(kg.entity_names)
    rows = kg.triples.tolist()
    assert rows == sorted(rows) and len(set(map(tuple, rows))) == len(rows)


def test_relation_endpoint_types(kg):
    types = kg.entity_types.long()
    h, r, t = kg.triples.long().unbind(1)
    module, cls, fn = (ENTITY_TYPE_NAMES.index(x) for x in ("module", "class", "function"))
    rid = {name: i for i, name in enumerate(kg.relation_names)}
    imports = r == rid["imports"]
    assert bool((types[h[imports]] == module).all() & (types[t[imports]] == module).all())
    inherits = r == rid["inherits_from"]
    assert bool((types[h[inherits]] == cls).all() & (types[t[inherits]] == cls).all())
    calls = r == rid["calls"]
    assert bool((types[h[calls]] == fn).all() & (types[t[calls]] == fn).all())
    defines = r == rid["defines"]
    assert bool((types[h[defines]] != fn).all() & (types[t[defines]] != module).all())


def test_resolution_counts_are_logged(caplog):
    with caplog.at_level(logging.INFO, logger="ternary_graph.kg.graph"):
        kg = build_kg_from_roots([STDLIB / "json"], STDLIB)
    assert kg.stats["calls_resolved"] > 0 and kg.stats["calls_dropped"] > 0
    message = "\n".join(r.getMessage() for r in caplog.records)
    assert f"calls resolved {kg.stats['calls_resolved']} / dropped {kg.stats['calls_dropped']}" in message
    # json/__init__.py, decoder, encoder, scanner, tool, __main__ (3.12+ has it too)
    assert kg.stats["files_parsed"] == len(list((STDLIB / "json").glob("*.py")))


def test_deterministic_across_builds(kg):
    again = _json_email()
    assert again == kg
    assert again.entity_names == kg.entity_names
    assert torch.equal(again.triples, kg.triples)


def test_malformed_files_are_skipped_with_a_count(tmp_path):
    root = tmp_path / "lib"
    shutil.copytree(STDLIB / "json", root / "json", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "json" / "broken_syntax.py").write_text("def f(:\n    return 1\n")
    (root / "json" / "null_bytes.py").write_bytes(b"x = 1\x00\n")
    (root / "json" / "bad_encoding.py").write_bytes(b"# -*- coding: utf-8 -*-\ns = '\xff\xfe'\n")
    clean = build_kg_from_roots([STDLIB / "json"], STDLIB)
    dirty = build_kg_from_roots([root / "json"], root)
    assert dirty.stats["files_skipped_malformed"] == 3
    assert clean.stats["files_skipped_malformed"] == 0
    assert dirty == clean  # the bad files contribute nothing, the rest is untouched
    with pytest.raises(ValueError, match="broken_syntax"):
        dirty.entity_id("json.broken_syntax")


def test_bad_roots_raise(tmp_path):
    with pytest.raises(ValueError, match="not inside package_root"):
        build_kg_from_roots([STDLIB / "json"], tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        build_kg_from_roots([STDLIB / "no_such_package_xyz"], STDLIB)
    with pytest.raises(ValueError, match="non-empty list"):
        build_kg_from_roots([], STDLIB)


def test_unknown_entity_names_it_and_suggests(kg):
    with pytest.raises(ValueError, match=r"'json\.decoder\.JSONDecodr'") as info:
        kg.entity_id("json.decoder.JSONDecodr")
    assert "json.decoder.JSONDecoder" in str(info.value)
    with pytest.raises(TypeError):
        kg.entity_id(3)


def test_neighbourhood(kg):
    center = "json.decoder.JSONDecoder"
    sub = kg.neighbourhood(center, hops=1)
    assert {"json.decoder", "json.decoder.JSONDecoder.decode", center} <= set(sub.entity_names)
    assert set(sub.named_triples()) <= set(kg.named_triples())
    assert sub.num_entities < kg.num_entities
    assert kg.neighbourhood(center, hops=0).entity_names == [center]
    bigger = kg.neighbourhood(center, hops=2)
    assert set(sub.entity_names) < set(bigger.entity_names)


# ---- split, PyG view, persistence ---------------------------------------------------------


def test_split_disjoint_covering_and_deterministic(kg):
    split = kg.split()
    parts = [set(map(tuple, p.tolist())) for p in (split.train, split.valid, split.test)]
    assert all(p.dtype == torch.int32 and p.shape[1] == 3 for p in (split.train, split.valid, split.test))
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(map(tuple, kg.triples.tolist()))
    assert sum(map(len, parts)) == kg.num_triples
    assert 0.7 < len(parts[0]) / kg.num_triples < 0.9  # 80/10/10 up to hash noise
    again = _json_email().split()
    assert all(torch.equal(a, b) for a, b in zip((split.train, split.valid, split.test),
                                                  (again.train, again.valid, again.test)))


def test_split_follows_names_not_graph(kg):
    # A triple's bucket depends on its names only: the json-only graph agrees with the
    # json+email graph on every triple they share.
    small = build_kg_from_roots([STDLIB / "json"], STDLIB)
    big_bucket = dict(zip(kg.named_triples(), kg.split_assignment().tolist()))
    small_bucket = dict(zip(small.named_triples(), small.split_assignment().tolist()))
    # json never references email, so the json graph is a subgraph of the json+email one
    assert small_bucket.keys() <= big_bucket.keys() and len(small_bucket) > 30
    assert all(small_bucket[t] == big_bucket[t] for t in small_bucket)
    with pytest.raises(ValueError, match="fractions"):
        kg.split((0.5, 0.5, 0.5))


def test_to_pyg_dtypes_and_content(kg):
    data = kg.to_pyg()
    assert data.edge_index.dtype == torch.int32 and data.edge_index.shape == (2, kg.num_triples)
    assert data.edge_type.dtype == torch.int8 and data.edge_type.shape == (kg.num_triples,)
    assert data.node_type.dtype == torch.int8 and data.node_type.shape == (kg.num_entities,)
    assert data.num_nodes == kg.num_entities and data.num_edges == kg.num_triples
    assert data.entity_names == kg.entity_names and data.relation_names == kg.relation_names
    masks = torch.stack([data.train_edge_mask, data.val_edge_mask, data.test_edge_mask])
    assert bool((masks.sum(0) == 1).all())
    e = kg.entity_id
    edge = (data.edge_index[0] == e("json")) & (data.edge_index[1] == e("json.decoder")) & (
        data.edge_type == kg.relation_id("imports"))
    assert int(edge.sum()) == 1
    split = kg.split()
    assert torch.equal(kg.triples[data.test_edge_mask], split.test)


def test_save_load_round_trip(kg, tmp_path):
    kg.save(tmp_path / "g")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["kg.json", "kg.safetensors"]
    back = KnowledgeGraph.load(tmp_path / "g")
    assert back == kg
    assert back.stats == kg.stats
    assert back.triples.dtype == torch.int32 and back.entity_types.dtype == torch.int8
    with pytest.raises(ValueError, match="missing"):
        KnowledgeGraph.load(tmp_path / "nothing_here")


def test_cache_reuses_the_saved_graph(tmp_path, caplog):
    first = build_kg_from_roots([STDLIB / "json"], STDLIB, cache_dir=tmp_path)
    (entry,) = list(tmp_path.iterdir())
    assert entry.name.startswith("kg-")
    with caplog.at_level(logging.INFO, logger="ternary_graph.kg.graph"):
        second = build_kg_from_roots([STDLIB / "json"], STDLIB, cache_dir=tmp_path)
    assert "loaded cached knowledge graph" in caplog.text
    assert second == first


def test_constructor_rejects_bad_tensors():
    with pytest.raises(TypeError, match="int32"):
        KnowledgeGraph(["a", "b"], torch.zeros(2, dtype=torch.int8), ["r"], torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="outside"):
        KnowledgeGraph(["a", "b"], torch.zeros(2, dtype=torch.int8), ["r"], torch.tensor([[0, 0, 2]], dtype=torch.int32))
    with pytest.raises(ValueError, match="unique"):
        KnowledgeGraph(["a", "a"], torch.zeros(2, dtype=torch.int8), ["r"], torch.zeros(0, 3, dtype=torch.int32))


@pytest.mark.slow
def test_whole_stdlib():
    kg = build_stdlib_kg()
    assert kg.num_entities > 5000 and kg.num_triples > 10000
    assert kg.stats["files_parsed"] > 300
    assert not any(n.split(".")[0] in {"test", "idlelib"} for n in kg.entity_names)
    assert kg.has_triple("json", "imports", "json.decoder")
    # `os.path.join` goes through os's `import posixpath as path` (ntpath on Windows)
    assert kg.has_triple("mailbox.Maildir.remove", "calls", "posixpath.join") or \
        kg.has_triple("mailbox.Maildir.remove", "calls", "ntpath.join")


# ---- filtered ranking metrics -------------------------------------------------------------


def _table_scorer(table: torch.Tensor):
    # Advanced indexing broadcasts h, r, t exactly as filtered_ranks requires.
    return lambda h, r, t: table[h, r, t]


def _tiny_table() -> torch.Tensor:
    table = torch.zeros(4, 1, 4)
    table[0, 0] = torch.tensor([0.5, 0.9, 1.0, 0.9])  # tails of (0, r0, ?)
    table[:, 0, 1] = torch.tensor([0.9, 2.0, 0.9, 5.0])  # heads of (?, r0, 1)
    return table


def test_filtered_ranks_hand_example():
    test = torch.tensor([[0, 0, 1]])
    known = torch.tensor([[0, 0, 1], [0, 0, 2], [3, 0, 1]])
    ranks = filtered_ranks(_table_scorer(_tiny_table()), test, known, num_entities=4)
    # tail: 1.0 (entity 2) is higher but (0,0,2) is known -> filtered; entity 3 ties at 0.9,
    #       entity 0 is lower: rank = 1 + 0 + 1/2.
    # head: entity 1 (2.0) is higher; entity 3 (5.0) is higher but (3,0,1) is known ->
    #       filtered; entity 2 ties: rank = 1 + 1 + 1/2.
    assert ranks.dtype == torch.float64
    assert ranks.tolist() == [[1.5, 2.5]]
    raw = filtered_ranks(_table_scorer(_tiny_table()), test, test, num_entities=4)
    assert raw.tolist() == [[2.5, 3.5]]  # nothing filtered but the answer itself
    metrics = mrr_hits(ranks)
    assert metrics["mrr"] == pytest.approx((1 / 1.5 + 1 / 2.5) / 2)
    assert metrics["hits@1"] == 0.0 and metrics["hits@3"] == 1.0 and metrics["count"] == 2
    assert metrics["mean_rank"] == pytest.approx(2.0)


def test_all_ties_give_the_middle_rank():
    n = 9
    flat = lambda h, r, t: torch.zeros(torch.broadcast_shapes(h.shape, r.shape, t.shape), dtype=torch.int32)
    ranks = filtered_ranks(flat, torch.tensor([[1, 0, 2], [3, 0, 4]]), torch.zeros(0, 3, dtype=torch.long), n)
    assert torch.equal(ranks, torch.full((2, 2), (n + 1) / 2, dtype=torch.float64))


def _reference_ranks(table, test, known):
    known_set = set(map(tuple, known.tolist()))
    out = []
    for h, r, t in test.tolist():
        row = []
        for side in ("tail", "head"):
            target = table[h, r, t].item()
            higher = equal = 0
            for e in range(table.shape[0]):
                cand = (h, r, e) if side == "tail" else (e, r, t)
                if (side == "tail" and e == t) or (side == "head" and e == h) or cand in known_set:
                    continue
                s = table[cand].item()
                higher += s > target
                equal += s == target
            row.append(1 + higher + equal / 2)
        out.append(row)
    return out


def test_filtered_ranks_match_a_naive_loop_at_any_batch_size():
    gen = torch.Generator().manual_seed(0)
    n, num_rel = 13, 3
    table = torch.randint(-2, 3, (n, num_rel, n), generator=gen).float()  # many ties
    known = torch.unique(torch.stack([
        torch.randint(0, n, (60,), generator=gen),
        torch.randint(0, num_rel, (60,), generator=gen),
        torch.randint(0, n, (60,), generator=gen),
    ], dim=1), dim=0)
    test = known[::4]
    expected = _reference_ranks(table, test, known)
    for batch_size in (1, 5, 13, 40, 1 << 16):
        ranks = filtered_ranks(_table_scorer(table), test, known, n, batch_size=batch_size)
        assert ranks.tolist() == expected, batch_size


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_filtered_ranks_with_a_cuda_scorer_match_cpu():
    gen = torch.Generator().manual_seed(1)
    n = 37
    table = torch.randint(-3, 4, (n, 2, n), generator=gen).float()
    known = torch.unique(torch.stack([
        torch.randint(0, n, (200,), generator=gen),
        torch.randint(0, 2, (200,), generator=gen),
        torch.randint(0, n, (200,), generator=gen),
    ], dim=1), dim=0)
    cpu = filtered_ranks(_table_scorer(table), known, known, n, batch_size=100)
    gpu = filtered_ranks(_table_scorer(table.cuda()), known, known, n, batch_size=100, device="cuda")
    assert gpu.device.type == "cpu"
    assert torch.equal(cpu, gpu)


def test_broadcast_score_fn_wraps_a_flat_scorer():
    table = _tiny_table()
    seen_dims = []

    def flat(h, r, t):
        seen_dims.append((h.dim(), r.dim(), t.dim()))
        return table[h, r, t]

    test, known = torch.tensor([[0, 0, 1]]), torch.tensor([[0, 0, 1], [0, 0, 2], [3, 0, 1]])
    ranks = filtered_ranks(broadcast_score_fn(flat), test, known, 4)
    assert ranks.tolist() == [[1.5, 2.5]]
    assert set(seen_dims) == {(1, 1, 1)}


def test_metric_input_errors():
    table = _tiny_table()
    good = torch.tensor([[0, 0, 1]])
    with pytest.raises(ValueError, match="outside"):
        filtered_ranks(_table_scorer(table), torch.tensor([[0, 0, 4]]), good, 4)
    with pytest.raises(ValueError, match="shape"):
        filtered_ranks(lambda h, r, t: torch.zeros(3), good, good, 4)
    with pytest.raises(ValueError, match="NaN"):
        filtered_ranks(lambda h, r, t: torch.full(torch.broadcast_shapes(h.shape, t.shape), math.nan), good, good, 4)
    with pytest.raises(TypeError, match="integer"):
        filtered_ranks(_table_scorer(table), good.float(), good, 4)
    with pytest.raises(ValueError, match=">= 1"):
        mrr_hits(torch.tensor([0.5, 2.0]))
    with pytest.raises(ValueError, match="ks"):
        mrr_hits(torch.tensor([1.0]), ks=(0,))


def test_random_ranking_mrr():
    assert random_ranking_mrr(1) == 1.0
    assert random_ranking_mrr(2) == pytest.approx(0.75)
    assert random_ranking_mrr(1000) == pytest.approx(sum(1 / k for k in range(1, 1001)) / 1000)


# ---- PyG float baseline ---------------------------------------------------------------------


def test_pyg_distmult_beats_random_ranking(kg):
    from torch_geometric.nn.kge import DistMult

    split = kg.split()
    train = split.train.long()
    with torch.random.fork_rng():  # PyG samples negatives from the global generator
        torch.manual_seed(0)
        model = DistMult(kg.num_entities, kg.num_relations, hidden_channels=32)
        loader = model.loader(head_index=train[:, 0], rel_type=train[:, 1], tail_index=train[:, 2],
                              batch_size=256, shuffle=True)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(30):
            for head_index, rel_type, tail_index in loader:
                optimizer.zero_grad()
                model.loss(head_index, rel_type, tail_index).backward()
                optimizer.step()
    model.eval()
    held_out = torch.cat([split.valid, split.test])
    ranks = filtered_ranks(model, held_out, kg.triples, kg.num_entities)  # DistMult broadcasts
    mrr = mrr_hits(ranks)["mrr"]
    random_mrr = random_ranking_mrr(kg.num_entities)  # H_N / N
    assert mrr > 3 * random_mrr, (mrr, random_mrr)
