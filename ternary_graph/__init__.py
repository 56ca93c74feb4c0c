"""ternary_graph: true-ternary models with packed trits, int8-vote training and graph routing."""

__version__ = "0.1.0"
