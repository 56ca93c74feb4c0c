"""Sizes that the whole library agrees on, and the model configs with their named presets."""

from __future__ import annotations

CODEBOOK_DIM = 64  # dimension of every VQ code (shared router codebook and KG codebook)
SHARED_VQ_SIZE = 10_000_000  # codes in the one shared router codebook of the default model
KGVQ_CODEBOOK_SIZE = 5_000_000  # codes in the knowledge-graph entity codebook
KGVQ_CODEBOOK_DIM = 64  # dimension of the KG codes
