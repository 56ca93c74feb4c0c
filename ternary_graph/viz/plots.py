"""Pictures of what a model learned: routing graph, routing statistics, loss curves, KG.

Every function draws on its own :class:`matplotlib.figure.Figure` with an explicit Agg
canvas (``FigureCanvasAgg``): nothing here imports ``matplotlib.pyplot``, selects a backend
or touches ``rcParams``, so calling them from a training loop, a notebook or a server
changes no global state. Figures are not registered anywhere and are freed once the
function returns. The output format follows the suffix of the path (``.png``, ``.svg``,
``.pdf``); a PNG is exactly ``size[0]·dpi × size[1]·dpi`` pixels (no tight bounding box).

Legibility at a few hundred nodes: graph pictures cap what they draw (``top`` codes,
``max_nodes`` entities), label only as many nodes as fit (``max_labels``, highest degree
first), and write in the title what they dropped.

Functions:

* :func:`plot_routing_graph` — MoEGraph active subgraph (codes → experts), edges coloured by
  ternary sign and sized by |score|, experts sized by load.
* :func:`export_routing_graph` — the same subgraph as GraphML / GEXF (Gephi, Cytoscape).
* :func:`plot_routing_stats` — expert load, edge scores, active edges over training, code usage.
* :func:`plot_loss_curves` — train / validation bits per byte of one or several runs.
* :func:`plot_kg_neighbourhood` — k-hop neighbourhood of a KG entity, predicted links dashed.
* :func:`top_predicted_links` — the best-scored unknown triples around an entity, for any
  broadcasting triple scorer (the convention of ``kg/metrics.py``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import networkx as nx
import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch
from matplotlib.ticker import MaxNLocator

from ..kg.graph import KnowledgeGraph
from ..graph.moegraph import MoEGraph
from ..models.model import TernaryGraphLM

__all__ = [
    "FORMATS",
    "SIGN_COLORS",
    "export_routing_graph",
    "plot_kg_neighbourhood",
    "plot_loss_curves",
    "plot_routing_graph",
    "plot_routing_stats",
    "read_metrics",
    "shorten_name",
    "top_predicted_links",
]

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}  # picture suffix -> matplotlib format
GRAPH_FORMATS = (".graphml", ".gexf")
NATS_TO_BITS = 1.0 / math.log(2.0)
# Ternary edge sign -> colour: colour-blind-safe blue / grey / vermillion (Okabe-Ito).
SIGN_COLORS = {1: "#0072B2", 0: "#A0A0A0", -1: "#D55E00"}
SIGN_LABELS = {1: "+1 edge (raises the expert)", 0: "0 edge (neutral)", -1: "−1 edge (suppresses the expert)"}
_CODE_COLOR, _EXPERT_COLOR = "#7F7F7F", "#E69F00"
_KIND_STYLE = {"module": ("s", "#4C72B0"), "class": ("D", "#DD8452"), "function": ("o", "#55A868")}
_MAX_CODE_LABELS = 60  # bipartite code labels stay readable up to this many rows at the default size


# ------------------------------------------------------------------------------------------------
# small shared helpers
# ------------------------------------------------------------------------------------------------
def _check_size_dpi(size: object, dpi: object) -> tuple[tuple[float, float], int]:
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"size must be (width, height) in inches, both > 0, got {size!r}")
    if not isinstance(dpi, int) or isinstance(dpi, bool) or dpi < 1:
        raise ValueError(f"dpi must be a positive int, got {dpi!r}")
    return (float(size[0]), float(size[1])), dpi


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _picture_path(out: str | os.PathLike[str]) -> tuple[Path, str]:
    path = Path(out)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"out path must end with one of {sorted(FORMATS)}, got {str(out)!r}")
    return path, fmt


def _new_figure(size: tuple[float, float], dpi: int) -> Figure:
    # A Figure with its own Agg canvas: no pyplot figure manager, no global backend choice.
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path, fmt: str, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt, dpi=dpi)
    fig.clear()  # drop the artists now; the figure itself is garbage once we return
    return path


def _note(ax, text: str) -> None:
    """Centered grey message in an otherwise empty panel."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _cull_overlapping(fig: Figure, texts: list) -> int:
    """Remove every label whose box overlaps a label earlier in ``texts`` (priority order);
    returns how many stay. Runs the figure's layout first so the boxes are final; the labels
    are kept out of the layout so removing some cannot move the others."""
    for t in texts:
        t.set_in_layout(False)
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    placed = []
    for t in texts:
        box = t.get_window_extent(renderer)
        if any(box.overlaps(p) for p in placed):
            t.remove()
        else:
            placed.append(box)
    return len(placed)


def shorten_name(name: str, max_len: int = 32) -> str:
    """A qualified name cut to at most ``max_len`` characters, keeping its last components:
    ``json.decoder.JSONDecoder.raw_decode`` -> ``…JSONDecoder.raw_decode``."""
    if len(name) <= max_len:
        return name
    parts = name.split(".")
    kept = parts[-1]
    for part in reversed(parts[:-1]):
        if len(part) + 1 + len(kept) + 1 > max_len:
            break
        kept = f"{part}.{kept}"
    if len(kept) + 1 > max_len:  # the last component alone is too long: cut its end
        return kept[: max_len - 1] + "…"
    return "…" + kept


# ------------------------------------------------------------------------------------------------
# models and routing graph
# ------------------------------------------------------------------------------------------------
def _resolve_moe(model_or_moe: object, layer: object) -> tuple[MoEGraph, torch.Tensor | None]:
    """The MoEGraph to draw and the code usage to rank codes by (the shared VQ's, if any)."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"layer must be an int, got {layer!r}")
    if isinstance(model_or_moe, MoEGraph):
        if layer != 0:
            raise ValueError(f"layer={layer} was given with a single MoEGraph; pass the model to pick a layer")
        return model_or_moe, None
    if isinstance(model_or_moe, TernaryGraphLM):
        layers = model_or_moe.moe_layers()
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer must lie in [0, {len(layers)}) for this model, got {layer}")
        return layers[layer], model_or_moe.shared_vq.usage
    raise TypeError(f"model_or_moe must be a TernaryGraphLM or a MoEGraph, got {type(model_or_moe).__name__}")


def _expert_load(moe: MoEGraph, dst: torch.Tensor) -> tuple[np.ndarray, str]:
    """Per-expert load: routed pairs of the last batch, else in-degree of the active edges."""
    routing = moe.last_routing
    if routing is not None and routing.token.numel():
        return routing.load().cpu().numpy(), "routed pairs of the last batch"
    return torch.bincount(dst.long().cpu(), minlength=moe.num_experts).numpy(), "active-edge in-degree"


def _choose_codes(moe: MoEGraph, codes: object, top: int,
                  usage: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
    """Validated given codes, capped at ``top`` (most used first); and how many were asked for."""
    if codes is None:
        return None, 0
    c = torch.as_tensor(codes)
    if c.dtype.is_floating_point or c.dtype == torch.bool or c.dtype.is_complex:
        raise ValueError(f"codes must be integer code ids, got dtype={c.dtype}")
    c = torch.unique(c.reshape(-1).long().cpu())
    if c.numel() == 0:
        raise ValueError("codes must name at least one code, got an empty list")
    if int(c.min()) < 0 or int(c.max()) >= moe.codebook_size:
        raise ValueError(f"codes must lie in [0, {moe.codebook_size}), got values in [{int(c.min())}, {int(c.max())}]")
    asked = c.numel()
    if asked > top:
        weight = usage.cpu().long()[c] if usage is not None else torch.zeros_like(c)
        c = c[torch.argsort(-weight, stable=True)[:top]].sort().values
    # to_networkx matches them against the edge buffers: same device (a model may be on CUDA).
    return c.to(moe.load_bias.device), asked


def _routing_subgraph(model_or_moe: object, layer: int, codes: object, top: int | None) -> tuple[nx.DiGraph, dict]:
    """The capped code → expert subgraph with node attributes for drawing and export.

    Nodes gain ``label``; code nodes ``usage`` (when the model has a shared VQ); expert nodes
    ``load`` (see :func:`_expert_load`) and ``in_degree`` (active edges into the expert, whole
    graph). Edges gain ``weight = |score|``. Returns the graph and counts of what was dropped.
    """
    moe, usage = _resolve_moe(model_or_moe, layer)
    if top is not None:
        _check_int("top", top, 1)
    src, dst, _attr, _score = moe.active_edges()
    chosen, asked = _choose_codes(moe, codes, top if top is not None else moe.codebook_size, usage)
    g = moe.to_networkx(codes=chosen, top=top, usage=usage)
    load, load_source = _expert_load(moe, dst)
    in_degree = torch.bincount(dst.long().cpu(), minlength=moe.num_experts).tolist()
    code_nodes = [d for _, d in g.nodes(data=True) if d["kind"] == "code"]
    if usage is not None and code_nodes:
        ids = torch.tensor([d["code_id"] for d in code_nodes], dtype=torch.long)
        for d, u in zip(code_nodes, usage.cpu()[ids].tolist()):
            d["usage"] = int(u)
    for node, data in g.nodes(data=True):
        if data["kind"] == "code":
            data["label"] = f"c{data['code_id']}"
        else:
            e = data["expert_id"]
            data["label"] = f"E{e}"
            data["load"] = int(load[e])
            data["in_degree"] = int(in_degree[e])
    for _, _, data in g.edges(data=True):
        data["weight"] = abs(int(data["score"]))
    n_codes_total = asked if chosen is not None else int(torch.unique(src).numel())
    shown_codes = sum(1 for _, d in g.nodes(data=True) if d["kind"] == "code")
    info = {
        "moe": moe, "usage": usage, "load": load, "load_source": load_source,
        "codes_total": n_codes_total, "codes_shown": shown_codes,
        "edges_total": moe.num_active_edges, "edges_shown": g.number_of_edges(),
        "ranked_by": "given codes" if chosen is not None else
                     ("shared-VQ usage" if usage is not None else "total |edge score|"),
    }
    g.graph.update(layer=layer, mode=moe.mode, num_experts=moe.num_experts, codebook_size=moe.codebook_size,
                   codes_dropped=n_codes_total - shown_codes, edges_dropped=info["edges_total"] - info["edges_shown"])
    return g, info


def _bipartite_positions(g: nx.DiGraph) -> dict:
    """Codes in a left column, experts in a right one; codes ordered by the expert their
    strongest edge goes to, so most edges run roughly horizontally."""
    experts = sorted((n for n, d in g.nodes(data=True) if d["kind"] == "expert"),
                     key=lambda n: g.nodes[n]["expert_id"])
    codes = [n for n, d in g.nodes(data=True) if d["kind"] == "code"]

    def code_key(n):
        out = list(g.out_edges(n, data=True))
        if not out:
            return (math.inf, g.nodes[n]["code_id"])
        best = max(out, key=lambda e: (abs(e[2]["score"]), -g.nodes[e[1]]["expert_id"]))
        return (g.nodes[best[1]]["expert_id"], g.nodes[n]["code_id"])

    codes.sort(key=code_key)
    pos = {}
    for column, nodes in ((0.0, codes), (1.0, experts)):
        n = len(nodes)
        for i, node in enumerate(nodes):
            pos[node] = (column, 1.0 - (i + 0.5) / n)
    return pos


def _spring_positions(g: nx.DiGraph) -> dict:
    """Force layout with the experts pinned on a circle: each code settles between the experts
    it has edges to (free experts would collapse into one clump, every code pulling them in)."""
    experts = sorted((n for n, d in g.nodes(data=True) if d["kind"] == "expert"),
                     key=lambda n: g.nodes[n]["expert_id"])
    angle = 2 * math.pi / len(experts)
    pinned = {n: (math.cos(math.pi / 2 - i * angle), math.sin(math.pi / 2 - i * angle))
              for i, n in enumerate(experts)}
    n_codes = g.number_of_nodes() - len(experts)
    # weight=None: a neutral edge (|score| = 0) must still pull its code toward its expert.
    return nx.spring_layout(g.to_undirected(), pos=pinned, fixed=experts, weight=None, seed=0,
                            k=1.0 / math.sqrt(max(n_codes, 1)), iterations=100)


def plot_routing_graph(model_or_moe: TernaryGraphLM | MoEGraph, out_png: str | os.PathLike[str], *, layer: int = 0,
                       codes: Sequence[int] | torch.Tensor | None = None, top: int = 40, layout: str = "bipartite",
                       size: tuple[float, float] = (10, 7), dpi: int = 120) -> Path:
    """Draw the active code → expert subgraph of one MoEGraph layer.

    Codes: the given ``codes``, else the ``top`` codes with edges ranked by the shared VQ's
    usage (when given a :class:`TernaryGraphLM`) or by the total |score| of their edges (a
    lone :class:`MoEGraph`); given codes beyond ``top`` keep the most used. Edges are coloured
    by their ternary sign (:data:`SIGN_COLORS`), with width growing with |score|; expert
    squares are sized by load (routed pairs of the last batch, else active-edge in-degree) and
    labelled with their share. The title says how many codes and edges were left out.

    Args:
        model_or_moe: the model (layer ``layer`` is drawn) or one MoEGraph (``layer`` must be 0).
        out_png: ``.png``, ``.svg`` or ``.pdf`` path (parent folders are created).
        layout: ``"bipartite"`` (codes left, experts right) or ``"spring"`` (force layout).

    Returns the written path.
    """
    path, fmt = _picture_path(out_png)
    size, dpi = _check_size_dpi(size, dpi)
    if layout not in ("bipartite", "spring"):
        raise ValueError(f"layout must be 'bipartite' or 'spring', got {layout!r}")
    _check_int("top", top, 1)
    g, info = _routing_subgraph(model_or_moe, layer, codes, top)
    moe = info["moe"]
    if layout == "bipartite":
        pos = _bipartite_positions(g)
    else:
        pos = _spring_positions(g)

    fig = _new_figure(size, dpi)
    ax = fig.add_subplot()
    ax.set_axis_off()
    edges = list(g.edges(data=True))
    max_abs = max([abs(d["score"]) for _, _, d in edges] + [1])
    # Thinner strokes when there are many edges, so that they do not merge into one band.
    extra_width = 3.0 * min(1.0, math.sqrt(150 / max(len(edges), 1)))
    # Neutral edges first, signed ones on top: the learned structure stays visible.
    for sign in (0, -1, 1):
        sel = [(u, v, d) for u, v, d in edges if d["attr"] == sign]
        if not sel:
            continue
        segments = [(pos[u], pos[v]) for u, v, _ in sel]
        widths = [0.5 + extra_width * abs(d["score"]) / max_abs for _, _, d in sel]
        ax.add_collection(LineCollection(segments, colors=SIGN_COLORS[sign], linewidths=widths,
                                         alpha=0.45 if sign == 0 else 0.85, zorder=1))

    code_nodes = [n for n, d in g.nodes(data=True) if d["kind"] == "code"]
    expert_nodes = sorted((n for n, d in g.nodes(data=True) if d["kind"] == "expert"),
                          key=lambda n: g.nodes[n]["expert_id"])
    if code_nodes:
        xy = np.array([pos[n] for n in code_nodes])
        if info["usage"] is not None:
            u = np.array([g.nodes[n]["usage"] for n in code_nodes], dtype=float)
            sizes = 15 + 120 * np.sqrt(u / max(u.max(), 1.0))
        else:
            sizes = np.full(len(code_nodes), 40.0)
        ax.scatter(xy[:, 0], xy[:, 1], s=sizes, c=_CODE_COLOR, edgecolors="white", linewidths=0.5, zorder=2)
    load = info["load"].astype(float)
    total_load = max(load.sum(), 1.0)
    exy = np.array([pos[n] for n in expert_nodes])
    # Marker area in points²; the largest side is capped so that many experts stay apart.
    side = min(45.0, 0.7 * size[1] * 72 / len(expert_nodes))
    esizes = side ** 2 * (0.15 + 0.85 * load / max(load.max(), 1.0))
    ax.scatter(exy[:, 0], exy[:, 1], s=esizes, marker="s", c=_EXPERT_COLOR, edgecolors="black",
               linewidths=0.8, zorder=3)
    for n, (x, y), s in zip(expert_nodes, exy, esizes):
        e = g.nodes[n]["expert_id"]
        # Marker size is an area in points²: start the label half a side plus a gap away.
        sep = "\n" if side >= 25 else " "  # one line per expert when the rows are tight
        ax.annotate(f"E{e}{sep}{load[e] / total_load:.0%}", (x, y), xytext=(math.sqrt(s) / 2 + 5, 0),
                    textcoords="offset points",
                    ha="left", va="center", fontsize=9, fontweight="bold", zorder=4)
    label_codes = len(code_nodes) <= _MAX_CODE_LABELS
    code_texts = []
    if label_codes:
        # Most used codes first: they keep their label if the spring layout packs labels together.
        ranked = sorted(code_nodes, key=lambda n: (-g.nodes[n].get("usage", 0), g.nodes[n]["code_id"]))
        for n in ranked:
            x, y = pos[n]
            offset, ha = ((-8, 0), "right") if layout == "bipartite" else ((4, 4), "left")
            code_texts.append(ax.annotate(str(g.nodes[n]["code_id"]), (x, y), xytext=offset,
                                          textcoords="offset points", ha=ha, va="center", fontsize=7, color="0.25",
                                          zorder=4))
    if layout == "bipartite":
        ax.text(0.0, 1.02, "codes", ha="center", va="bottom", fontsize=10, transform=ax.transData)
        ax.text(1.0, 1.02, "experts", ha="center", va="bottom", fontsize=10, transform=ax.transData)
        ax.set_xlim(-0.3, 1.3)
        ax.set_ylim(-0.02, 1.07)
    else:
        ax.autoscale_view()
        ax.margins(0.08)

    dropped_c = info["codes_total"] - info["codes_shown"]
    dropped_e = info["edges_total"] - info["edges_shown"]
    line1 = (f"MoEGraph layer {layer} ({moe.mode} mode): {info['codes_shown']} codes → {moe.num_experts} experts, "
             f"{info['edges_shown']} active edges shown")
    if info["ranked_by"] == "given codes":
        line2 = (f"{info['codes_total']:,} codes given" +
                 (f", {dropped_c:,} dropped (top={top}, most used kept)" if dropped_c else "") +
                 f"; {dropped_e:,} of {info['edges_total']:,} edges not shown")
    elif dropped_c or dropped_e:
        line2 = (f"dropped {dropped_c:,} of {info['codes_total']:,} codes and {dropped_e:,} of "
                 f"{info['edges_total']:,} edges (top {top} codes by {info['ranked_by']})")
    else:
        line2 = f"nothing dropped (codes by {info['ranked_by']})"
    line3 = f"expert size: {info['load_source']}" + ("" if label_codes or not code_nodes else
                                                      f"; code labels hidden above {_MAX_CODE_LABELS} codes")
    ax.set_title(f"{line1}\n{line2}\n{line3}", fontsize=10)
    handles = [Line2D([], [], color=SIGN_COLORS[s], lw=2.5, label=SIGN_LABELS[s]) for s in (1, 0, -1)]
    handles += [Line2D([], [], ls="", marker="o", color=_CODE_COLOR, label="code (size: usage)"
                       if info["usage"] is not None else "code"),
                Line2D([], [], ls="", marker="s", color=_EXPERT_COLOR, markeredgecolor="black",
                       label="expert (size: load)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    if layout == "spring" and code_texts:
        _cull_overlapping(fig, code_texts)
    return _save(fig, path, fmt, dpi)


def export_routing_graph(model_or_moe: TernaryGraphLM | MoEGraph, path: str | os.PathLike[str], *, layer: int = 0,
                         top: int | None = 200, codes: Sequence[int] | torch.Tensor | None = None) -> Path:
    """Write the active code → expert subgraph (as :func:`plot_routing_graph` selects it,
    ``top=None`` for every code with edges) as GraphML (``.graphml``) or GEXF (``.gexf``).

    Node ids ``"code:<id>"`` / ``"expert:<e>"``; node attributes ``kind``, ``label``,
    ``code_id`` + ``usage`` (codes; usage only from a model) or ``expert_id``, ``load_bias``,
    ``load``, ``in_degree`` (experts); edge attributes ``attr`` (ternary sign), ``score`` (int8)
    and ``weight = |score|``; all integers. Returns the written path.
    """
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in GRAPH_FORMATS:
        raise ValueError(f"path must end with one of {list(GRAPH_FORMATS)}, got {str(path)!r}")
    g, _ = _routing_subgraph(model_or_moe, layer, codes, top)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".graphml":
        nx.write_graphml(g, os.fspath(out))
    else:
        nx.write_gexf(g, os.fspath(out))
    return out


# ------------------------------------------------------------------------------------------------
# metrics and statistics
# ------------------------------------------------------------------------------------------------
def _metrics_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"metrics file {str(p)!r} does not exist (give a metrics.jsonl or a run folder)")
    return p


def read_metrics(path: str | os.PathLike[str]) -> list[dict]:
    """The records of a ``metrics.jsonl`` (or of ``<run folder>/metrics.jsonl``), sorted by step.

    Blank lines are skipped; a line that is not a JSON object with an integer ``step`` raises
    ValueError naming the file and line.
    """
    p = _metrics_file(path)
    records = []
    for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}:{number}: not valid JSON ({err.msg})") from err
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise ValueError(f"{p}:{number}: expected a JSON object with an integer 'step', got {line[:80]!r}")
        records.append(rec)
    return sorted(records, key=lambda r: r["step"])


def _bits(rec: dict, bits_key: str, nats_key: str) -> float | None:
    if bits_key in rec:
        return float(rec[bits_key])
    if nats_key in rec:
        return float(rec[nats_key]) * NATS_TO_BITS
    return None


def plot_loss_curves(metrics_paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
                     out_png: str | os.PathLike[str], labels: Sequence[str] | None = None, *,
                     size: tuple[float, float] = (8, 5), dpi: int = 120) -> Path:
    """Train (thin line) and validation (thick line with markers) loss in bits per byte
    against step, one colour per run, on one linear-scale plot (e.g. ternary vs float).

    Args:
        metrics_paths: ``metrics.jsonl`` files or run folders (a single path is accepted too).
        labels: one per run (default: the run folder's name).

    A run without validation lines shows its train curve only; an empty file draws a note.
    Returns the written path.
    """
    path, fmt = _picture_path(out_png)
    size, dpi = _check_size_dpi(size, dpi)
    if isinstance(metrics_paths, (str, os.PathLike)):
        metrics_paths = [metrics_paths]
    paths = list(metrics_paths)
    if not paths:
        raise ValueError("metrics_paths must name at least one metrics file, got an empty list")
    if labels is not None:
        labels = list(labels)
        if len(labels) != len(paths):
            raise ValueError(f"labels must have one entry per metrics file ({len(paths)}), got {len(labels)}")
    runs = [(_metrics_file(p), read_metrics(p)) for p in paths]
    if labels is None:
        labels = [f.parent.name or str(f) for f, _ in runs]

    fig = _new_figure(size, dpi)
    ax = fig.add_subplot()
    palette = colormaps["tab10"]
    drawn = 0
    for i, ((_, records), label) in enumerate(zip(runs, labels)):
        color = palette(i % 10)
        train = [(r["step"], b) for r in records if (b := _bits(r, "train_bits_per_byte", "train_loss")) is not None]
        val = [(r["step"], b) for r in records if (b := _bits(r, "val_bits_per_byte", "val_loss")) is not None]
        if train:
            s, b = zip(*train)
            ax.plot(s, b, color=color, lw=1.0, alpha=0.6, label=f"{label} train"
                    + ("" if val else " (no validation yet)"))
            drawn += 1
        if val:
            s, b = zip(*val)
            ax.plot(s, b, color=color, lw=2.4, marker="o", ms=5, label=f"{label} validation (last {b[-1]:.3f})")
            drawn += 1
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel("loss (bits per byte)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9)
    else:
        _note(ax, "no losses logged yet")
    ax.set_title("Loss vs step: train (thin) and validation (markers)", fontsize=11)
    return _save(fig, path, fmt, dpi)


def _layers_of(model: object) -> tuple[list[MoEGraph], torch.Tensor | None]:
    if isinstance(model, TernaryGraphLM):
        return model.moe_layers(), model.shared_vq.usage
    if isinstance(model, MoEGraph):
        return [model], None
    raise TypeError(f"model must be a TernaryGraphLM or a MoEGraph, got {type(model).__name__}")


def _panel_load(ax, layers: list[MoEGraph]) -> None:
    n = len(layers)
    width = 0.8 / n
    sources = set()
    for i, moe in enumerate(layers):
        load, source = _expert_load(moe, moe.active_edges()[1])
        sources.add(source)
        share = load / max(load.sum(), 1)
        x = np.arange(moe.num_experts) + (i - (n - 1) / 2) * width
        ax.bar(x, share, width=width, label=f"layer {i}")
    num_experts = layers[0].num_experts
    ax.axhline(1.0 / num_experts, color="black", ls="--", lw=1, label="uniform")
    ax.set_xticks(range(num_experts))
    ax.set_xlabel("expert")
    ax.set_ylabel("share of load")
    ax.set_title("Expert load: " + " / ".join(sorted(sources)), fontsize=10)
    ax.legend(fontsize=8, ncol=2)


def _panel_scores(ax, layers: list[MoEGraph]) -> None:
    lo = hi = 0
    for i, moe in enumerate(layers):
        _, _, attr, score = moe.active_edges()
        s = score.long().cpu()
        if s.numel() == 0:
            continue
        counts = torch.bincount(s + 128, minlength=256).numpy()
        nz = np.nonzero(counts)[0]
        lo, hi = min(lo, int(nz[0]) - 128), max(hi, int(nz[-1]) - 128)
        a = attr.long().cpu()
        plus, zero, minus = int((a > 0).sum()), int((a == 0).sum()), int((a < 0).sum())
        ax.step(np.arange(-128, 128), counts, where="mid", lw=1.5,
                label=f"layer {i}: {s.numel():,} edges; sign +1: {plus:,}, 0: {zero:,}, −1: {minus:,}")
    if not ax.lines:
        _note(ax, "no active edges")
        ax.set_title("Edge scores (int8)", fontsize=10)
        return
    thr = layers[0].rule.attr_threshold
    lo, hi = min(lo, -thr) - 2, max(hi, thr) + 2
    ax.axvspan(lo, -thr - 0.5, color=SIGN_COLORS[-1], alpha=0.12, lw=0)
    ax.axvspan(thr + 0.5, hi, color=SIGN_COLORS[1], alpha=0.12, lw=0)
    for x, text, ha in ((-thr - 0.5, "sign −1 ", "right"), (thr + 0.5, " sign +1", "left")):
        ax.text(x, 0.97, text, ha=ha, va="top", fontsize=8, color="0.3", transform=ax.get_xaxis_transform())
    ax.set_xlim(lo, hi)
    ax.set_yscale("log")
    ax.set_xlabel("edge score (|score| > %d gives a ±1 sign)" % thr)
    ax.set_ylabel("active edges (log)")
    ax.set_title("Edge score distribution", fontsize=10)
    ax.legend(fontsize=7)


def _panel_active_edges(ax, records: list[dict] | None) -> None:
    ax.set_title("Active edges, routing via edges and live VQ codes over training", fontsize=10)
    if records is None:
        _note(ax, "no metrics.jsonl given")
        return
    series: dict[str, list[tuple[int, float]]] = {}
    via: dict[str, list[tuple[int, float]]] = {}
    live: list[tuple[int, float]] = []
    for r in records:
        routing = r.get("routing")
        if not isinstance(routing, dict):
            continue
        vq = routing.get("shared_vq")
        if isinstance(vq, dict) and "live_fraction" in vq:
            live.append((r["step"], vq["live_fraction"]))
        for key, layer in routing.items():
            if key.startswith("layer") and isinstance(layer, dict):
                if "active_edges" in layer:
                    series.setdefault(key, []).append((r["step"], layer["active_edges"]))
                if "via_edge_fraction" in layer:
                    via.setdefault(key, []).append((r["step"], layer["via_edge_fraction"]))
    if not series:
        _note(ax, "the metrics hold no routing records")
        return
    palette = colormaps["tab10"]
    order = sorted(series, key=lambda k: int(k[5:]) if k[5:].isdigit() else 0)
    for i, key in enumerate(order):
        s, v = zip(*series[key])
        ax.plot(s, v, color=palette(i % 10), lw=1.8, label=f"{key} active edges")
    ax.set_xlabel("step")
    ax.set_ylabel("active edges")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if via or live:
        twin = ax.twinx()
        for i, key in enumerate(order):
            if key in via:
                s, v = zip(*via[key])
                twin.plot(s, v, color=palette(i % 10), lw=1.0, ls="--", label=f"{key} routed via edge")
        if live:
            s, v = zip(*live)
            twin.plot(s, v, color="black", lw=1.4, ls=":", label="shared-VQ live codes")
        twin.set_ylabel("routed via an edge (dashed) / live VQ codes (dotted)")
        twin.set_ylim(0, 1)
        h2, l2 = twin.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=7, loc="best")


def _panel_usage(ax, usage: torch.Tensor | None) -> None:
    if usage is None:
        ax.set_title("Code usage", fontsize=10)
        _note(ax, "no VQ codebook (a lone MoEGraph was given)")
        return
    u = usage.cpu().numpy()
    n_live = int((u > 0).sum())
    ax.set_title(f"Shared VQ usage (int16): {n_live / max(u.size, 1):.2%} live "
                 f"({n_live:,} of {u.size:,} codes)", fontsize=10)
    if n_live == 0:
        _note(ax, "no code used yet")
        return
    live = u[u > 0].astype(np.int64)
    top = int(live.max())
    # Log-spaced integer bins: usage spans 1 .. 32767 and most codes sit at the low end.
    edges = np.unique(np.round(np.logspace(0, math.log10(top + 1), num=min(40, top + 1))).astype(np.int64))
    if edges[-1] <= top:
        edges = np.append(edges, top + 1)
    counts, _ = np.histogram(live, bins=edges)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4C72B0", edgecolor="white", lw=0.3)
    ax.set_xscale("log")
    if counts.max() > 50:
        ax.set_yscale("log")
    else:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("usage counter of a live code (int16, saturates at 32767)")
    ax.set_ylabel("codes" + (" (log)" if counts.max() > 50 else ""))


def plot_routing_stats(model_or_metrics: TernaryGraphLM | MoEGraph | str | os.PathLike[str],
                       out_png: str | os.PathLike[str], *, metrics: str | os.PathLike[str] | None = None,
                       size: tuple[float, float] = (12, 8), dpi: int = 120) -> Path:
    """A 2×2 figure of routing statistics.

    Panels: expert load per layer (routed pairs of the model's last batch, else active-edge
    in-degree), active-edge score distribution per layer, active edges (and the fraction of
    pairs routed through an edge) over training from ``metrics.jsonl``, and the shared VQ's
    int16 usage distribution with the live fraction in its title.

    Args:
        model_or_metrics: a model / MoEGraph, or a ``metrics.jsonl`` (or run folder) alone, in
            which case only the training panel is drawn.
        metrics: ``metrics.jsonl`` or run folder for the training panel when a model is given.

    Returns the written path.
    """
    path, fmt = _picture_path(out_png)
    size, dpi = _check_size_dpi(size, dpi)
    if isinstance(model_or_metrics, (str, os.PathLike)):
        if metrics is not None:
            raise ValueError("metrics was given twice: as model_or_metrics and as metrics=")
        model, metrics = None, model_or_metrics
    else:
        model = model_or_metrics
        _layers_of(model)  # type check before any drawing
    records = read_metrics(metrics) if metrics is not None else None

    fig = _new_figure(size, dpi)
    axes = fig.subplots(2, 2)
    if model is not None:
        layers, usage = _layers_of(model)
        _panel_load(axes[0, 0], layers)
        _panel_scores(axes[0, 1], layers)
        _panel_usage(axes[1, 1], usage)
    else:
        for ax, title in ((axes[0, 0], "Expert load"), (axes[0, 1], "Edge scores"), (axes[1, 1], "Code usage")):
            ax.set_title(title, fontsize=10)
            _note(ax, "no model given (metrics only)")
    _panel_active_edges(axes[1, 0], records)
    fig.suptitle("Routing statistics", fontsize=12)
    return _save(fig, path, fmt, dpi)


# ------------------------------------------------------------------------------------------------
# knowledge graph
# ------------------------------------------------------------------------------------------------
def _check_predicted(kg: KnowledgeGraph, predicted: object) -> list[tuple[str, str, str]]:
    if predicted is None:
        return []
    if isinstance(predicted, (str, bytes)) or not isinstance(predicted, Sequence):
        raise TypeError(f"predicted must be a list of (head, relation, tail) name triples, got {predicted!r}")
    out = []
    for i, triple in enumerate(predicted):
        if not (isinstance(triple, (tuple, list)) and len(triple) == 3 and all(isinstance(x, str) for x in triple)):
            raise ValueError(f"predicted[{i}] must be a (head, relation, tail) triple of names, got {triple!r}")
        h, r, t = triple
        try:
            kg.entity_id(h)
            kg.relation_id(r)
            kg.entity_id(t)
        except ValueError as err:
            raise ValueError(f"predicted[{i}]: {err}") from err
        out.append((h, r, t))
    return out


def top_predicted_links(kg: KnowledgeGraph, entity: str,
                        score_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], *,
                        k: int = 5, relations: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """The ``k`` best-scored triples ``(entity, relation, tail)`` that are not in ``kg``.

    ``score_fn(h, r, t)`` takes int64 id tensors that broadcast to a common shape and returns
    scores of that shape, higher = more plausible (the convention of ``kg/metrics.py``;
    PyG's KGE models qualify). It is called once with ``h (1, 1)``, ``r (R, 1)``, ``t (1, N)``.
    Known triples and self-links are excluded; ties go to the lower relation, then entity id.
    """
    _check_int("k", k, 1)
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
    head = kg.entity_id(entity)
    if isinstance(relations, str):
        raise TypeError(f"relations must be a list of relation names, got the string {relations!r}")
    rel_names = list(kg.relation_names if relations is None else relations)
    if not rel_names:
        raise ValueError("relations must name at least one relation, got an empty list")
    rel_ids = torch.tensor([kg.relation_id(r) for r in rel_names], dtype=torch.long)
    n = kg.num_entities
    with torch.no_grad():
        scores = score_fn(torch.tensor([[head]]), rel_ids[:, None], torch.arange(n)[None, :])
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (len(rel_names), n):
        raise ValueError(f"score_fn must return scores of shape ({len(rel_names)}, {n}), "
                         f"got {tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    scores = scores.detach().to(torch.float64).cpu().clone()
    known = kg.triples[kg.triples[:, 0] == head].long()
    for j, r in enumerate(rel_ids.tolist()):
        scores[j, known[known[:, 1] == r][:, 2]] = -math.inf
    scores[:, head] = -math.inf
    flat = scores.reshape(-1)
    order = torch.argsort(-flat, stable=True)
    order = order[torch.isfinite(flat[order])][:k]
    return [(entity, rel_names[int(i) // n], kg.entity_names[int(i) % n]) for i in order]


def plot_kg_neighbourhood(kg: KnowledgeGraph, entity: str, out_png: str | os.PathLike[str], *, hops: int = 1,
                          max_nodes: int = 150, max_labels: int = 40,
                          predicted: Sequence[tuple[str, str, str]] | None = None,
                          size: tuple[float, float] = (12, 9), dpi: int = 120) -> Path:
    """Draw the ``hops``-hop neighbourhood of ``entity`` in a knowledge graph.

    Edges are arrows head → tail coloured by relation (legend); node shape and colour give the
    entity type; ``predicted`` ``(head, relation, tail)`` name triples are drawn dashed (their
    end points are always kept, inside the neighbourhood or not). Past ``max_nodes`` entities,
    the nearest ones (fewest hops, then highest degree) are kept; past ``max_labels`` only the
    entity, the predicted end points and the highest-degree entities are labelled. Labels are
    qualified names shortened by :func:`shorten_name`; the title says what was dropped or
    left unlabelled. Self-loops (recursive calls) are counted, not drawn.

    Raises ValueError for an unknown entity (with close matches) or an unknown name in
    ``predicted``. Returns the written path.
    """
    path, fmt = _picture_path(out_png)
    size, dpi = _check_size_dpi(size, dpi)
    if not isinstance(kg, KnowledgeGraph):
        raise TypeError(f"kg must be a KnowledgeGraph, got {type(kg).__name__}")
    _check_int("max_nodes", max_nodes, 1)
    _check_int("max_labels", max_labels, 0)
    _check_int("hops", hops, 0)
    kg.entity_id(entity)  # unknown names raise ValueError with close matches
    pred = _check_predicted(kg, predicted)

    sub = kg.neighbourhood(entity, hops)
    named = sub.named_triples()
    und = nx.Graph()
    und.add_nodes_from(sub.entity_names)
    und.add_edges_from((h, t) for h, _, t in named if h != t)
    dist = nx.single_source_shortest_path_length(und, entity)
    degree = dict(und.degree())
    must = [entity] + [x for h, _, t in pred for x in (h, t)]
    must = list(dict.fromkeys(must))
    must_set = set(must)
    rest = sorted((n for n in sub.entity_names if n not in must_set),
                  key=lambda n: (dist.get(n, hops + 1), -degree.get(n, 0), n))
    room = max(0, max_nodes - len(must))
    kept = must + rest[:room]
    kept_set = set(kept)
    total = len(set(sub.entity_names) | must_set)
    dropped = total - len(kept)

    type_names = kg.entity_type_names
    types = {n: type_names[int(kg.entity_types[kg.entity_id(n)])] for n in kept}
    edges = [(h, r, t) for h, r, t in named if h in kept_set and t in kept_set]
    self_loops = sum(1 for h, _, t in edges if h == t)
    edges = [e for e in edges if e[0] != e[2]]
    layout_graph = nx.Graph()
    layout_graph.add_nodes_from(kept)
    layout_graph.add_edges_from((h, t) for h, _, t in edges + pred if h != t)
    n = len(kept)
    pos = nx.spring_layout(layout_graph, seed=0, k=1.6 / math.sqrt(max(n, 1)), iterations=150)

    fig = _new_figure(size, dpi)
    ax = fig.add_subplot()
    ax.set_axis_off()
    rel_colors = {r: colormaps["tab10"](i % 10) for i, r in enumerate(kg.relation_names)}
    # Several relations between one pair: fan the arrows out so each stays visible.
    pair_count: dict[frozenset, int] = {}
    drawn = [(h, r, t, False) for h, r, t in edges] + [(h, r, t, True) for h, r, t in pred if h != t]
    for h, r, t, is_pred in drawn:
        key = frozenset((h, t))
        i = pair_count.get(key, 0)
        pair_count[key] = i + 1
        rad = 0.0 if i == 0 else 0.18 * ((i + 1) // 2) * (1 if i % 2 else -1)
        ax.add_patch(FancyArrowPatch(pos[h], pos[t], arrowstyle="-|>", mutation_scale=9,
                                     connectionstyle=f"arc3,rad={rad}", color=rel_colors[r],
                                     lw=1.8 if is_pred else 0.9, ls="--" if is_pred else "-",
                                     alpha=1.0 if is_pred else 0.7, shrinkA=5, shrinkB=5, zorder=1))
    node_size = {m: 30 + 12 * min(degree.get(m, 0), 20) for m in kept}
    for kind, (marker, color) in _KIND_STYLE.items():
        nodes = [m for m in kept if types[m] == kind and m != entity]
        if nodes:
            xy = np.array([pos[m] for m in nodes])
            ax.scatter(xy[:, 0], xy[:, 1], s=[node_size[m] for m in nodes], marker=marker, c=color,
                       edgecolors="white", linewidths=0.6, zorder=2)
    cmarker, ccolor = _KIND_STYLE.get(types[entity], ("o", "#999999"))
    ax.scatter([pos[entity][0]], [pos[entity][1]], s=420, marker=cmarker, c=ccolor, edgecolors="black",
               linewidths=2.0, zorder=3)

    if n <= max_labels:
        labelled = kept
    else:
        by_degree = sorted((m for m in kept if m not in must_set), key=lambda m: (-degree.get(m, 0), m))
        labelled = must[:max_labels] + by_degree[:max(0, max_labels - len(must))]
    texts = []
    for m in labelled:
        x, y = pos[m]
        # Marker sizes are areas in points²: lift the label clear of its node.
        lift = math.sqrt(420 if m == entity else node_size[m]) / 2 + 2
        texts.append(ax.annotate(shorten_name(m, 28), (x, y), xytext=(0, lift), textcoords="offset points", ha="center",
                                 va="bottom", fontsize=9 if m == entity else 7,
                                 fontweight="bold" if m == entity else "normal",
                                 bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.7), zorder=4))
    ax.autoscale_view()
    ax.margins(x=0.12, y=0.06)  # room for labels centred on the outermost nodes

    line1 = (f"KG neighbourhood of {entity} ({hops} hop{'s' if hops != 1 else ''}): "
             f"{n} entities, {len(edges)} triples" + (f", {len(pred)} predicted links (dashed)" if pred else ""))
    notes = [f"dropped {dropped} of {total} entities (max_nodes={max_nodes}, nearest and best connected kept)"
             if dropped else "nothing dropped"]
    if self_loops:
        notes.append(f"{self_loops} self-loops not drawn")

    def title(labels_shown: int) -> str:
        extra = [] if labels_shown == n else [f"labels on {labels_shown} of {n} entities "
                                              "(highest degree first, overlapping ones skipped)"]
        return line1 + "\n" + "; ".join(notes + extra)

    ax.set_title(title(len(labelled)), fontsize=10)
    present = sorted({r for _, r, _ in edges} | {r for _, r, _ in pred}, key=kg.relation_names.index)
    handles = [Line2D([], [], color=rel_colors[r], lw=2, label=r) for r in present]
    if pred:
        handles.append(Line2D([], [], color="black", lw=1.8, ls="--", label="predicted link"))
    handles += [Line2D([], [], ls="", marker=_KIND_STYLE[k][0], color=_KIND_STYLE[k][1], label=k)
                for k in _KIND_STYLE if k in set(types.values())]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=9, frameon=False)
    shown = _cull_overlapping(fig, texts)
    if shown != len(labelled):
        ax.title.set_text(title(shown))  # same number of lines: the layout does not move
    return _save(fig, path, fmt, dpi)
