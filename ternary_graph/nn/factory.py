"""Build a layer as ternary or as its float counterpart, for the float baseline."""

from __future__ import annotations

import torch
from torch import nn

from .embedding import TernaryEmbeddingTable
from .linear import TernaryLinear

WEIGHT_KINDS = ("ternary", "float")


def check_weights(weights: str) -> str:
    if weights not in WEIGHT_KINDS:
        raise ValueError(f"weights must be one of {WEIGHT_KINDS}, got {weights!r}")
    return weights


def make_linear(in_features: int, out_features: int, weights: str = "ternary", *,
                zero_fraction: float | None = None, device: torch.device | str | None = None,
                generator: torch.Generator | None = None) -> nn.Module:
    """A bias-free TernaryLinear, or an nn.Linear of the same shape for ``weights='float'``
    (``zero_fraction`` only shapes the ternary init)."""
    if check_weights(weights) == "float":
        return nn.Linear(in_features, out_features, bias=False, device=device)
    return TernaryLinear(in_features, out_features, zero_fraction=zero_fraction, device=device, generator=generator)


class FloatEmbedding(nn.Embedding):
    """nn.Embedding that takes int32 ids too, so the float baseline accepts what the table does."""

    def forward(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return super().forward(ids.long()).to(dtype)


def make_embedding(num_rows: int, dim: int, weights: str = "ternary", *,
                   device: torch.device | str | None = None, generator: torch.Generator | None = None) -> nn.Module:
    if check_weights(weights) == "float":
        return FloatEmbedding(num_rows, dim, device=device)
    return TernaryEmbeddingTable(num_rows, dim, device=device, generator=generator)
