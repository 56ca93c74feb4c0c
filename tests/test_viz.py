"""Pictures and graph files of ternary_graph.viz, from real models, real runs and the stdlib KG.

Picture content is checked where it can be read back exactly: PNG pixel sizes via
``matplotlib.image.imread``, and in SVG output, where matplotlib writes every text as an XML
comment and every edge of a LineCollection as a path with its own stroke colour and width.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import matplotlib.image as mpimg
import networkx as nx
import numpy as np
import pytest
import torch

from ternary_graph.cli import main as cli_main
from ternary_graph.config import get_preset
from ternary_graph.kg.graph import build_kg_from_roots
from ternary_graph.graph.moegraph import MoEGraph
from ternary_graph.models.model import build_model
from ternary_graph.ternary.optimizer import TernaryOptimizer
from ternary_graph.train.loop import TrainConfig, load_model_from_checkpoint, train
from ternary_graph.viz import (
    export_routing_graph,
    plot_kg_neighbourhood,
    plot_loss_curves,
    plot_routing_graph,
    plot_routing_stats,
    read_metrics,
    shorten_name,
    top_predicted_links,
)
from ternary_graph.viz.cli import load_checkpoint_for_viz
from ternary_graph.viz.plots import SIGN_COLORS

REPO_ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
JSON_DIR = STDLIB / "json"


# ------------------------------------------------------------------------------------------------
# helpers and fixtures
# ------------------------------------------------------------------------------------------------
def png_shape(path: Path) -> tuple[int, ...]:
    img = mpimg.imread(path)
    assert img.size and float(img[..., :3].std()) > 0.01, f"{path} is blank"
    return img.shape


def expected_shape(size, dpi) -> tuple[int, int]:
    return (round(size[1] * dpi), round(size[0] * dpi))


def svg_texts(path: Path) -> list[str]:
    return re.findall(r"<!-- (.*?) -->", path.read_text(encoding="utf-8"))


def trained_tiny_model(steps: int = 3, device: str = "cpu"):
    """A fresh tiny model after a few real optimizer steps on the bytes of the stdlib json package."""
    cfg = get_preset("tiny").replace(n_layers=2, codebook_size=256, kg_codebook_size=256)
    model = build_model(cfg, seed=0, device=device)
    data = b"".join(p.read_bytes() for p in sorted(JSON_DIR.glob("*.py")))
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).long().to(device)
    opt = TernaryOptimizer(model)
    model.train()
    for step in range(steps):
        starts = torch.arange(4, device=device) * 9973 + step * 131
        windows = buf[starts[:, None] + torch.arange(33, device=device)]
        out = model(windows[:, :-1], windows[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_graph()
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real 4-step tiny training run (checkpoints, metrics.jsonl) on a few stdlib files."""
    root = tmp_path_factory.mktemp("viz_run")
    data = root / "data"
    data.mkdir()
    for p in sorted(JSON_DIR.glob("*.py")):
        # copy2 keeps the mtime, so the corpus fingerprint (names, sizes, mtimes) and with it
        # the prepared-corpus cache in ~/.cache/ternary_graph is reused across test runs.
        shutil.copy2(p, data / p.name)
    out = root / "run"
    train(TrainConfig(steps=4, eval_every=2, checkpoint_every=2, log_every=1, batch_size=2, seq_len=32,
                      eval_windows=4, data=str(data), out=str(out),
                      model_overrides=dict(n_layers=2, codebook_size=256, kg_codebook_size=256)),
          progress=False)
    return out


@pytest.fixture(scope="module")
def json_kg():
    return build_kg_from_roots([JSON_DIR], STDLIB)


# ------------------------------------------------------------------------------------------------
# loss curves
# ------------------------------------------------------------------------------------------------
def test_training_loop_wrote_its_pictures(run_dir):
    assert png_shape(run_dir / "loss.png")[:2] == expected_shape((8, 5), 120)
    assert png_shape(run_dir / "routing.png")[:2] == expected_shape((10, 7), 120)


def test_loss_curves_several_runs_and_no_validation(run_dir, tmp_path):
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert sum("val_bits_per_byte" in r for r in records) == 2
    # The same real run without its validation lines: a run that has not evaluated yet.
    no_val = tmp_path / "early" / "metrics.jsonl"
    no_val.parent.mkdir()
    no_val.write_text("".join(json.dumps({k: v for k, v in r.items() if not k.startswith("val_")}) + "\n"
                              for r in records))
    out = plot_loss_curves([run_dir / "metrics.jsonl", no_val], tmp_path / "loss.svg", labels=["ternary", "early"])
    texts = svg_texts(out)
    last_val = records[-1]["val_bits_per_byte"]
    assert f"ternary validation (last {last_val:.3f})" in texts
    assert "early train (no validation yet)" in texts
    assert not any(t.startswith("early validation") for t in texts)
    png = plot_loss_curves([no_val], tmp_path / "one.png", size=(6, 4), dpi=50)
    assert png_shape(png)[:2] == expected_shape((6, 4), 50)


def test_loss_curves_bad_input(run_dir, tmp_path):
    missing = tmp_path / "nowhere" / "metrics.jsonl"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        plot_loss_curves([missing], tmp_path / "x.png")
    with pytest.raises(ValueError, match="labels"):
        plot_loss_curves([run_dir], tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(ValueError, match="must end with"):
        plot_loss_curves([run_dir], tmp_path / "x.jpg")
    broken = tmp_path / "broken.jsonl"
    broken.write_text((run_dir / "metrics.jsonl").read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:2"):
        plot_loss_curves([broken], tmp_path / "x.png")


# ------------------------------------------------------------------------------------------------
# routing graph
# ------------------------------------------------------------------------------------------------
def test_routing_graph_png_size_and_title(tmp_path):
    model = trained_tiny_model()
    png = plot_routing_graph(model, tmp_path / "r.png")
    assert png_shape(png)[:2] == expected_shape((10, 7), 120)
    svg = plot_routing_graph(model, tmp_path / "r.svg", layer=1, top=25, layout="spring")
    texts = svg_texts(svg)
    moe = model.moe_layers()[1]
    n_edges = moe.num_active_edges
    # Dense mode: every one of the 256 codes has fanout=2 edges; 25 codes shown, 50 edges.
    assert any(t.startswith("MoEGraph layer 1 (dense mode): 25 codes → 4 experts, 50 active edges") for t in texts)
    assert f"dropped 231 of 256 codes and {n_edges - 50:,} of {n_edges:,} edges (top 25 codes by shared-VQ usage)" \
        in texts
    assert "expert size: routed pairs of the last batch" in texts
    # The 25 codes are the most used ones of the shared VQ.
    usage = model.shared_vq.usage
    shown = sorted(int(t) for t in texts if t.isdigit())
    cutoff = int(torch.sort(usage, descending=True).values[24])
    assert len(shown) <= 25 and all(int(usage[c]) >= cutoff for c in shown)


def _signed_moe() -> tuple[MoEGraph, dict[int, int]]:
    """A large-mode MoEGraph holding 12 edges of known scores: 4 positive, 4 zero-sign, 4 negative."""
    moe = MoEGraph(16, 4, 8, codebook_size=100, top_k=2, fanout=2, mode="large", capacity=64,
                   generator=torch.Generator().manual_seed(0))
    src = torch.tensor([3, 3, 10, 10, 20, 20, 31, 31, 47, 47, 60, 60])
    dst = torch.tensor([0, 1, 1, 2, 2, 3, 3, 0, 0, 2, 1, 3])
    score = torch.tensor([40, 20, 9, 30, 0, 5, -3, 8, -9, -20, -60, -127], dtype=torch.int8)
    moe.set_edges(src, dst, score)
    return moe, {1: 4, 0: 4, -1: 4}


def test_routing_graph_edge_colours_and_widths(tmp_path):
    moe, per_sign = _signed_moe()
    svg = plot_routing_graph(moe, tmp_path / "signed.svg", top=40)
    text = svg.read_text(encoding="utf-8")
    for sign, count in per_sign.items():
        # Edges carry a stroke-opacity; the legend's sample lines do not.
        edges = re.findall(rf"stroke: {SIGN_COLORS[sign].lower()}; stroke-opacity: [0-9.]+; stroke-width: ([0-9.]+)",
                           text)
        assert len(edges) == count, (sign, edges)
    widths = [float(w) for w in re.findall(r"stroke-opacity: [0-9.]+; stroke-width: ([0-9.]+)", text)]
    # width = 0.5 + 3·|score| / max|score| up to 150 edges (SVG units are points at 72 dpi).
    assert max(widths) == pytest.approx(3.5) and min(widths) == pytest.approx(0.5)
    texts = svg_texts(svg)
    assert "nothing dropped (codes by total |edge score|)" in texts
    assert "expert size: active-edge in-degree" in texts


def test_routing_graph_given_codes_are_capped(tmp_path):
    moe, _ = _signed_moe()
    svg = plot_routing_graph(moe, tmp_path / "codes.svg", codes=[3, 10, 20, 99], top=2)
    texts = svg_texts(svg)
    assert any(t.startswith("MoEGraph layer 0 (large mode): 2 codes") for t in texts)
    assert "4 codes given, 2 dropped (top=2, most used kept); 8 of 12 edges not shown" in texts
    svg = plot_routing_graph(moe, tmp_path / "codes2.svg", codes=[99, 3])
    texts = svg_texts(svg)
    # Code 99 has no edge: it is drawn alone; code 3's two edges are the ones shown.
    assert any(t.startswith("MoEGraph layer 0 (large mode): 2 codes → 4 experts, 2 active edges") for t in texts)
    assert {"3", "99"} <= set(texts)


def test_routing_graph_bad_input(tmp_path):
    model = trained_tiny_model(steps=1)
    with pytest.raises(ValueError, match="layer must lie in"):
        plot_routing_graph(model, tmp_path / "r.png", layer=2)
    with pytest.raises(TypeError, match="TernaryGraphLM or a MoEGraph"):
        plot_routing_graph(torch.nn.Linear(2, 2), tmp_path / "r.png")
    with pytest.raises(ValueError, match="codes must lie in"):
        plot_routing_graph(model, tmp_path / "r.png", codes=[256])
    with pytest.raises(ValueError, match="top must be"):
        plot_routing_graph(model, tmp_path / "r.png", top=0)
    with pytest.raises(ValueError, match="must end with"):
        plot_routing_graph(model, tmp_path / "r.gif")
    with pytest.raises(ValueError, match="layer=1 was given with a single MoEGraph"):
        plot_routing_graph(model.moe_layers()[0], tmp_path / "r.png", layer=1)


@pytest.mark.parametrize("suffix", [".graphml", ".gexf"])
def test_export_round_trip(tmp_path, suffix):
    model = trained_tiny_model()
    moe = model.moe_layers()[0]
    path = export_routing_graph(model, tmp_path / f"routing{suffix}", top=30)
    back = nx.read_graphml(path) if suffix == ".graphml" else nx.read_gexf(path)
    reference = moe.to_networkx(top=30, usage=model.shared_vq.usage)
    assert back.is_directed()
    assert back.number_of_nodes() == reference.number_of_nodes() == 30 + 4
    assert back.number_of_edges() == reference.number_of_edges() == 60
    load = moe.last_routing.load()
    usage = model.shared_vq.usage
    for node, data in reference.nodes(data=True):
        got = back.nodes[node]
        assert got["kind"] == data["kind"]
        if data["kind"] == "code":
            assert int(got["code_id"]) == data["code_id"]
            assert int(got["usage"]) == int(usage[data["code_id"]])
        else:
            e = data["expert_id"]
            assert int(got["expert_id"]) == e and int(got["load_bias"]) == data["load_bias"]
            assert int(got["load"]) == int(load[e])
    for u, v, data in reference.edges(data=True):
        got = back.edges[u, v]
        assert int(got["attr"]) == data["attr"] and int(got["score"]) == data["score"]
        assert int(got["weight"]) == abs(data["score"])
    with pytest.raises(ValueError, match="must end with one of"):
        export_routing_graph(model, tmp_path / "routing.json")


@pytest.mark.cuda
def test_plots_and_export_of_a_cuda_model(tmp_path):
    model = trained_tiny_model(device="cuda")
    assert model.shared_vq.usage.is_cuda
    png = plot_routing_graph(model, tmp_path / "cuda.png", codes=list(range(0, 256, 3)), top=30)
    assert png_shape(png)[:2] == expected_shape((10, 7), 120)
    assert png_shape(plot_routing_stats(model, tmp_path / "cuda_stats.png"))[:2] == expected_shape((12, 8), 120)
    back = nx.read_graphml(export_routing_graph(model, tmp_path / "cuda.graphml", top=10))
    assert sum(d["kind"] == "code" for _, d in back.nodes(data=True)) == 10


# ------------------------------------------------------------------------------------------------
# routing statistics
# ------------------------------------------------------------------------------------------------
def test_routing_stats_from_model_and_metrics(run_dir, tmp_path):
    model = trained_tiny_model()
    png = plot_routing_stats(model, tmp_path / "stats.png", metrics=run_dir)
    assert png_shape(png)[:2] == expected_shape((12, 8), 120)
    svg = plot_routing_stats(model, tmp_path / "stats.svg", metrics=run_dir / "metrics.jsonl")
    texts = svg_texts(svg)
    usage = model.shared_vq.usage
    live = int((usage > 0).sum())
    assert f"Shared VQ usage (int16): {live / 256:.2%} live ({live:,} of 256 codes)" in texts
    assert "Expert load: routed pairs of the last batch" in texts
    assert "layer0 active edges" in texts and "layer1 routed via edge" in texts and "shared-VQ live codes" in texts
    for i, moe in enumerate(model.moe_layers()):
        attr = moe.active_edges()[2]
        assert (f"layer {i}: {moe.num_active_edges:,} edges; sign +1: {int((attr > 0).sum()):,}, "
                f"0: {int((attr == 0).sum()):,}, −1: {int((attr < 0).sum()):,}") in texts
    # Metrics alone, and a lone MoEGraph without metrics, still give the full 2x2 figure.
    only = plot_routing_stats(run_dir / "metrics.jsonl", tmp_path / "only.png", size=(8, 6), dpi=60)
    assert png_shape(only)[:2] == expected_shape((8, 6), 60)
    moe, _ = _signed_moe()
    texts = svg_texts(plot_routing_stats(moe, tmp_path / "moe.svg"))
    assert "no metrics.jsonl given" in texts and "no VQ codebook (a lone MoEGraph was given)" in texts


# ------------------------------------------------------------------------------------------------
# checkpoints and the CLI
# ------------------------------------------------------------------------------------------------
def test_plots_from_a_real_checkpoint(run_dir, tmp_path):
    model, cfg, meta, _ = load_model_from_checkpoint(run_dir / "ckpt_00000002.json")
    assert meta["data_position"]["next_step"] == 2
    png = plot_routing_graph(model, tmp_path / "ckpt_routing.png", size=(6, 5), dpi=80)
    assert png_shape(png)[:2] == expected_shape((6, 5), 80)
    # A model loaded from disk has routed nothing yet: expert sizes fall back to in-degree.
    assert "expert size: active-edge in-degree" in svg_texts(plot_routing_graph(model, tmp_path / "c.svg"))
    loaded, _, found_run = load_checkpoint_for_viz(run_dir)
    assert found_run == run_dir
    assert loaded.moe_layers()[0].last_routing is not None  # one validation batch was routed
    assert torch.equal(loaded.shared_vq.usage, load_model_from_checkpoint(run_dir)[0].shared_vq.usage)


def test_cli_writes_every_picture(run_dir, tmp_path, capsys, json_kg):
    out = tmp_path / "viz"
    rc = cli_main(["viz", "--checkpoint", str(run_dir), "--out", str(out), "--what", "routing,stats,curves,kg",
                   "--entity", "json.decoder.JSONDecoder", "--hops", "2", "--kg-source", str(JSON_DIR),
                   "--kg-cache", "none", "--top", "20"])
    assert rc == 0
    printed = capsys.readouterr().out.split()
    names = {"routing_layer0.png": (10, 7), "routing_stats.png": (12, 8), "loss.png": (8, 5),
             "kg_json.decoder.JSONDecoder.png": (12, 9)}
    assert sorted(Path(p).name for p in printed) == sorted(names)
    for name, size in names.items():
        assert png_shape(out / name)[:2] == expected_shape(size, 120)
    rc = cli_main(["viz", "--checkpoint", str(run_dir / "ckpt_00000004.safetensors"), "--out", str(out),
                   "--what", "routing", "--format", "gexf", "--layer", "1", "--top", "7", "--no-batch"])
    assert rc == 0
    graph = nx.read_gexf(out / "routing_layer1.gexf")
    assert sum(d["kind"] == "code" for _, d in graph.nodes(data=True)) == 7


def test_bad_checkpoint_path_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        load_checkpoint_for_viz(missing)
    rc = cli_main(["viz", "--checkpoint", str(missing), "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "ternary-graph viz: error" in err and str(missing) in err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_run.*no complete checkpoint"):
        load_checkpoint_for_viz(empty)
    assert cli_main(["viz", "--what", "routing", "--out", str(tmp_path)]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# knowledge graph
# ------------------------------------------------------------------------------------------------
def test_kg_neighbourhood_of_json(json_kg, tmp_path):
    png = plot_kg_neighbourhood(json_kg, "json.decoder.JSONDecoder", tmp_path / "kg.png", hops=2)
    assert png_shape(png)[:2] == expected_shape((12, 9), 120)
    sub = json_kg.neighbourhood("json.decoder.JSONDecoder", 2)
    texts = svg_texts(plot_kg_neighbourhood(json_kg, "json.decoder.JSONDecoder", tmp_path / "kg.svg", hops=2))
    assert (f"KG neighbourhood of json.decoder.JSONDecoder (2 hops): {sub.num_entities} entities, "
            f"{sub.num_triples} triples") in texts
    assert "nothing dropped" in texts
    assert {"calls", "defines", "imports"} <= set(texts)  # relation legend
    assert "json.decoder.JSONDecoder" in texts and "…JSONDecoder.raw_decode" in texts  # qualified, shortened


def test_kg_neighbourhood_caps_labels_and_draws_predictions(json_kg, tmp_path):
    sub = json_kg.neighbourhood("json", 2)
    assert sub.num_entities > 12
    predicted = [("json", "calls", "json.tool.main")]
    assert not json_kg.has_triple(*predicted[0])
    svg = plot_kg_neighbourhood(json_kg, "json", tmp_path / "cap.svg", hops=2, max_nodes=12, max_labels=5,
                                predicted=predicted)
    texts = svg_texts(svg)
    title = [t for t in texts if t.startswith("dropped")]
    assert title and title[0].startswith(f"dropped {sub.num_entities - 12} of {sub.num_entities} entities")
    labels_note = re.search(r"labels on (\d+) of 12 entities", title[0])
    assert labels_note and 1 <= int(labels_note.group(1)) <= 5
    assert any(t.startswith("KG neighbourhood of json (2 hops): 12 entities") and "1 predicted links (dashed)" in t
               for t in texts)
    assert "predicted link" in texts
    text = svg.read_text(encoding="utf-8")
    assert "stroke-dasharray" in text  # the predicted link is dashed


def test_kg_unknown_names_are_clear_errors(json_kg, tmp_path):
    with pytest.raises(ValueError, match=r"json\.decoder\.JSONDecodr.*JSONDecoder"):
        plot_kg_neighbourhood(json_kg, "json.decoder.JSONDecodr", tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"predicted\[0\].*json\.nowhere"):
        plot_kg_neighbourhood(json_kg, "json", tmp_path / "x.png", predicted=[("json", "calls", "json.nowhere")])
    with pytest.raises(ValueError, match=r"predicted\[0\].*relation"):
        plot_kg_neighbourhood(json_kg, "json", tmp_path / "x.png", predicted=[("json", "likes", "json.tool")])
    with pytest.raises(TypeError, match="KnowledgeGraph"):
        plot_kg_neighbourhood({"json": []}, "json", tmp_path / "x.png")


def test_top_predicted_links_with_a_pyg_scorer(json_kg):
    from torch_geometric.nn.kge import DistMult

    torch.manual_seed(0)
    scorer = DistMult(json_kg.num_entities, json_kg.num_relations, hidden_channels=16)
    links = top_predicted_links(json_kg, "json.decoder", scorer, k=6)
    assert len(links) == 6
    head = json_kg.entity_id("json.decoder")
    scores = []
    for h, r, t in links:
        assert h == "json.decoder" and t != "json.decoder"
        assert not json_kg.has_triple(h, r, t)
        with torch.no_grad():
            scores.append(float(scorer(torch.tensor([head]), torch.tensor([json_kg.relation_id(r)]),
                                       torch.tensor([json_kg.entity_id(t)]))))
    assert scores == sorted(scores, reverse=True)
    # Nothing unknown scores higher than the last one returned.
    with torch.no_grad():
        every = scorer(torch.tensor([[head]]), torch.arange(json_kg.num_relations)[:, None],
                       torch.arange(json_kg.num_entities)[None, :])
    known = {(r, t) for h, r, t in json_kg.triples.tolist() if h == head}
    better = [(r, t) for r in range(json_kg.num_relations) for t in range(json_kg.num_entities)
              if t != head and (r, t) not in known and float(every[r, t]) > scores[-1] + 1e-6]
    assert len(better) <= 5


def test_shorten_name():
    assert shorten_name("json.decoder") == "json.decoder"
    assert shorten_name("json.decoder.JSONDecoder.raw_decode", 24) == "…JSONDecoder.raw_decode"
    assert len(shorten_name("a." + "x" * 50, 20)) == 20


# ------------------------------------------------------------------------------------------------
# no global matplotlib state
# ------------------------------------------------------------------------------------------------
def test_plots_leave_matplotlib_global_state_alone(run_dir, tmp_path):
    code = f"""
import sys, matplotlib
before = matplotlib.rcParams.copy()  # copy() reads without resolving the backend
from ternary_graph.viz import plot_loss_curves, plot_kg_neighbourhood
from ternary_graph.kg.graph import build_kg_from_roots
plot_loss_curves([{str(run_dir)!r}], {str(tmp_path / 'a.png')!r})
kg = build_kg_from_roots([{str(JSON_DIR)!r}], {str(STDLIB)!r})
plot_kg_neighbourhood(kg, 'json.decoder', {str(tmp_path / 'b.png')!r})
assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'
assert matplotlib.rcParams.copy() == before, 'rcParams changed'
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert np.asarray(mpimg.imread(tmp_path / "b.png")).shape[:2] == expected_shape((12, 9), 120)
