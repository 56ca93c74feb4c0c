"""Ternary layers."""

from .embedding import TernaryEmbeddingTable
from .linear import TernaryLinear

__all__ = ["TernaryEmbeddingTable", "TernaryLinear"]
