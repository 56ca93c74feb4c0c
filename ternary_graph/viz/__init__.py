"""Pictures and graph files of what a model learned (see ``plots.py``; CLI in ``cli.py``)."""

from .plots import (
    export_routing_graph,
    plot_kg_neighbourhood,
    plot_loss_curves,
    plot_routing_graph,
    plot_routing_stats,
    read_metrics,
    shorten_name,
    top_predicted_links,
)

__all__ = [
    "export_routing_graph",
    "plot_kg_neighbourhood",
    "plot_loss_curves",
    "plot_routing_graph",
    "plot_routing_stats",
    "read_metrics",
    "shorten_name",
    "top_predicted_links",
]
