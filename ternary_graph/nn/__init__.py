"""Ternary layers."""

from .embedding import TernaryEmbeddingTable
from .linear import TernaryLinear
from .vq import KGVQCodebook, TernaryVQCodebook, VQOutput, VQStats

__all__ = ["TernaryEmbeddingTable", "TernaryLinear"]
__all__ += ["KGVQCodebook", "TernaryVQCodebook", "VQOutput", "VQStats"]
from .ffn import TernarySwiGLU
__all__ += ["TernarySwiGLU"]
