from .moegraph import GraphUpdateStats, MoEGraph, RoutePlan, update_graphs
from .routing import GraphRule, Routing

__all__ = ["GraphRule", "GraphUpdateStats", "MoEGraph", "RoutePlan", "Routing", "update_graphs"]
