"""Exports of the MoEGraph routing graph: PyG HeteroData, networkx, GraphML.

Functions take plain edge tensors (what ``MoEGraph.active_edges()`` returns), so they do not
depend on the layer. Only codes that have edges become nodes, with a ``code_id`` mapping back
to the codebook row: an export of a 10M-code graph stays the size of its active edges.

About dtypes: the exported ``edge_index`` is int32, like the layer's state. PyG's
``HeteroData.validate()`` checks shape and index ranges, not dtype, so int32 passes; PyG's
message-passing layers and most ``torch_geometric.utils`` still expect int64, so call
``.long()`` on ``edge_index`` before feeding the graph to such a layer.
"""

from __future__ import annotations

import os

import networkx as nx
import torch
from torch_geometric.data import HeteroData

from .routing import Routing

EDGE_TYPE = ("code", "routes_to", "expert")
ROUTING_EDGE_TYPE = ("token", "routed_to", "expert")


def _check_edges(src: torch.Tensor, dst: torch.Tensor, attr: torch.Tensor, score: torch.Tensor,
                 num_experts: int) -> None:
    n = src.numel()
    for name, t, dtype in (("src", src, torch.int32), ("dst", dst, torch.int32), ("attr", attr, torch.int8),
                           ("score", score, torch.int8)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != n:
            raise ValueError(f"{name} must be a 1-D tensor of {n} edges, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype != dtype:
            raise ValueError(f"{name} must have dtype {dtype}, got dtype={t.dtype}")
    if n and (int(dst.min()) < 0 or int(dst.max()) >= num_experts):
        raise ValueError(f"dst must lie in [0, {num_experts}), got values in [{int(dst.min())}, {int(dst.max())}]")


def edges_to_heterodata(src: torch.Tensor, dst: torch.Tensor, attr: torch.Tensor, score: torch.Tensor,
                        num_experts: int, *, load_bias: torch.Tensor | None = None) -> HeteroData:
    """The code → expert graph as a PyG ``HeteroData``.

    Node types: ``code`` (``num_nodes`` = distinct codes with edges, ``code_id`` int64 maps a
    local index back to the codebook row) and ``expert`` (``num_nodes`` = num_experts, with the
    int8 ``load_bias`` when given). Edge type ``('code', 'routes_to', 'expert')`` carries int32
    ``edge_index`` (local code index, expert), int8 ``edge_attr`` and int8 ``edge_score``.

    Shapes: src, dst (n,) int32; attr, score (n,) int8; load_bias (E,) int8
    """
    _check_edges(src, dst, attr, score, num_experts)
    code_id, local = torch.unique(src.long(), return_inverse=True)
    data = HeteroData()
    data["code"].num_nodes = int(code_id.numel())
    data["code"].code_id = code_id
    data["expert"].num_nodes = num_experts
    if load_bias is not None:
        data["expert"].load_bias = load_bias.detach().clone()
    store = data[EDGE_TYPE]
    store.edge_index = torch.stack([local.to(torch.int32), dst.to(torch.int32)])
    store.edge_attr = attr.clone()
    store.edge_score = score.clone()
    return data


def select_codes(src: torch.Tensor, score: torch.Tensor, *, codes: torch.Tensor | None = None, top: int | None = 50,
                 usage: torch.Tensor | None = None) -> torch.Tensor:
    """Codes of an active subgraph: the given ``codes``; else the ``top`` codes with edges by
    ``usage[code]`` (e.g. a VQ codebook's usage counter); else by the sum of |score| of their
    edges. ``top=None`` keeps every code with edges.

    Shapes: src (n,) int32; score (n,) int8; codes (m,) int; usage (codebook,) int -> (k,) int64
    """
    if codes is not None:
        return torch.unique(codes.reshape(-1).long())
    if top is not None and (not isinstance(top, int) or top < 1):
        raise ValueError(f"top must be a positive int or None, got {top!r}")
    present, local = torch.unique(src.long(), return_inverse=True)
    if top is None or present.numel() <= top:
        return present
    if usage is not None:
        if usage.dim() != 1 or int(present.max()) >= usage.numel():
            raise ValueError(f"usage must be 1-D with an entry for every code id, got shape {tuple(usage.shape)}")
        weight = usage.long()[present]
    else:
        weight = torch.zeros(present.numel(), dtype=torch.long, device=src.device)
        weight.index_add_(0, local, score.long().abs())
    # Stable tie-break by code id (present is sorted): same input, same subgraph.
    order = torch.argsort(-weight, stable=True)[:top]
    return present[order].sort().values


def edges_to_networkx(src: torch.Tensor, dst: torch.Tensor, attr: torch.Tensor, score: torch.Tensor,
                      num_experts: int, *, codes: torch.Tensor | None = None, top: int | None = 50,
                      usage: torch.Tensor | None = None, load_bias: torch.Tensor | None = None) -> nx.DiGraph:
    """An active subgraph as a ``networkx.DiGraph`` (codes chosen by :func:`select_codes`).

    Nodes ``"code:<id>"`` (``kind='code'``, ``code_id``) and ``"expert:<e>"`` (``kind='expert'``,
    ``expert_id``, ``load_bias``); every expert is a node, so idle experts show. Edges carry
    ``attr`` and ``score`` as Python ints (GraphML-safe).
    """
    _check_edges(src, dst, attr, score, num_experts)
    chosen = select_codes(src, score, codes=codes, top=top, usage=usage)
    g = nx.DiGraph()
    bias = load_bias.tolist() if load_bias is not None else [0] * num_experts
    for e in range(num_experts):
        g.add_node(f"expert:{e}", kind="expert", expert_id=e, load_bias=int(bias[e]))
    keep = torch.isin(src.long(), chosen)
    for c in chosen.tolist():
        g.add_node(f"code:{c}", kind="code", code_id=int(c))
    for s, d, a, sc in zip(src[keep].tolist(), dst[keep].tolist(), attr[keep].tolist(), score[keep].tolist()):
        g.add_edge(f"code:{s}", f"expert:{d}", attr=int(a), score=int(sc))
    return g


def write_graphml(graph: nx.Graph, path: str | os.PathLike[str]) -> None:
    """Write ``graph`` as GraphML (readable with ``networkx.read_graphml``)."""
    nx.write_graphml(graph, os.fspath(path))


def routing_to_heterodata(routing: Routing) -> HeteroData:
    """The per-batch bipartite routing graph as ``HeteroData``.

    Node types ``token`` (``code_id`` int64 per token) and ``expert``; edge type
    ``('token', 'routed_to', 'expert')`` with int64 ``edge_index``, float ``gate`` and bool
    ``via_edge``. (int64 here: this is transient per-batch data meant for PyG layers.)
    """
    data = HeteroData()
    data["token"].num_nodes = routing.num_tokens
    code_of_token = torch.zeros(routing.num_tokens, dtype=torch.long, device=routing.code.device)
    code_of_token[routing.token] = routing.code
    data["token"].code_id = code_of_token
    data["expert"].num_nodes = routing.num_experts
    store = data[ROUTING_EDGE_TYPE]
    store.edge_index = torch.stack([routing.token, routing.expert])
    store.gate = routing.gate
    store.via_edge = routing.via_edge
    return data
