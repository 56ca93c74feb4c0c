"""Ternary layers."""

from .embedding import TernaryEmbeddingTable
from .linear import TernaryLinear
from .vq import KGVQCodebook, TernaryVQCodebook, VQOutput, VQStats

__all__ = ["TernaryEmbeddingTable", "TernaryLinear"]
__all__ += ["KGVQCodebook", "TernaryVQCodebook", "VQOutput", "VQStats"]
from .ffn import GroupedSwiGLU, TernarySwiGLU
from .grouped import FloatGroupedLinear, TernaryGroupedLinear
__all__ += ["GroupedSwiGLU", "TernarySwiGLU", "FloatGroupedLinear", "TernaryGroupedLinear"]
