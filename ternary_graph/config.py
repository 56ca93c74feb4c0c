"""Sizes that the whole library agrees on, and the model configs with their named presets."""

from __future__ import annotations

CODEBOOK_DIM = 64  # dimension of every VQ code (shared router codebook and KG codebook)
SHARED_VQ_SIZE = 10_000_000  # codes in the one shared router codebook of the default model
KGVQ_CODEBOOK_SIZE = 5_000_000  # codes in the knowledge-graph entity codebook
KGVQ_CODEBOOK_DIM = 64  # dimension of the KG codes

import dataclasses
from dataclasses import dataclass

ROUTINGS = ("graph", "frozen", "topk", "topk-float", "hash")  # MoEGraph routers (see graph/moegraph.py)
RESEED_WINDOW = 100  # VQ training calls between re-seed checks, unless a codebook is given another
VQ_RESEED_FROM = ("worst", "random")  # which inputs re-seed dead VQ codes first (nn/vq.py reseed_candidates)
VQ_PROJECTIONS = ("frozen", "learned")  # how the shared VQ's input projection trains (ModelConfig.vq_projection)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the assembled model. Every weight counted here is a trit."""

    vocab_size: int = 256  # byte-level tokens
    dim: int = 128  # model width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads; dim / n_heads must be even (rotary)
    max_seq_len: int = 512  # longest sequence the rotary table covers
    num_experts: int = 4  # MoEGraph experts per layer
    expert_hidden: int = 256  # SwiGLU hidden width of one expert
    top_k: int = 2  # experts chosen per token
    fanout: int = 2  # dense mode: edges per code; large mode: candidate edges per code looked up
    edge_capacity: int = 65_536  # large mode: active (code -> expert) edges kept per layer
    codebook_size: int = 4_096  # codes in the one shared router codebook
    codebook_dim: int = CODEBOOK_DIM  # dimension of those codes (a ternary projection feeds them)
    quantize_every: int = 2  # blocks l with l % quantize_every == 0 quantise; the rest reuse the ids
    kg_codebook_size: int = 4_096  # codes in the KG entity codebook
    kg_codebook_dim: int = KGVQ_CODEBOOK_DIM  # dimension of the KG codes
    num_relations: int = 8  # KG relation types scored by the composite head
    commitment_weight: float = 0.25  # weight of the VQ commitment loss (per element of the code vector)
    rope_base: float = 10_000.0  # rotary frequency base
    routing: str = "graph"  # how MoEGraph picks experts: one of ROUTINGS (the others are ablation baselines)
    balance_weight: float = 0.01  # weight of the Switch load-balancing loss of the topk routers
    vq_input_norm: bool = False  # the shared VQ searches unit-norm inputs (docs/results.md: 14 codes live instead of 2, not a fix)
    # "frozen": the VQ input is a fixed random ternary projection of the detached hidden state, so
    # the commitment loss trains the codes only; "learned": it also trains the projection (and the
    # stream below), which then shrinks its output onto a few codes (docs/results.md, VQ collapse)
    vq_projection: str = "frozen"
    vq_reseed_from: str = "worst"  # dead shared-VQ codes are re-seeded from the "worst" or "random" inputs
    # shared-VQ training calls between re-seed checks (0: never); each check re-seeds at most one
    # call's inputs. 100 kept the most codes live of the windows tried: at 2^20 codes checks every
    # 12 calls left fewer live than every 100, and every 400 fewer at 65,536 and at 2^20 codes
    # (docs/results.md, re-seeding variants)
    vq_reseed_window: int = RESEED_WINDOW

    def __post_init__(self) -> None:
        positive = ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "num_experts", "expert_hidden",
                    "top_k", "fanout", "edge_capacity", "codebook_size", "codebook_dim", "quantize_every",
                    "kg_codebook_size", "kg_codebook_dim", "num_relations")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelConfig.n_heads={self.n_heads} must divide dim={self.dim}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"ModelConfig head dim {self.dim // self.n_heads} (dim / n_heads) must be even for rotary")
        if self.top_k > self.num_experts:
            raise ValueError(f"ModelConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.fanout > self.num_experts:
            raise ValueError(f"ModelConfig.fanout={self.fanout} exceeds num_experts={self.num_experts}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"ModelConfig.routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if self.vq_projection not in VQ_PROJECTIONS:
            raise ValueError(f"ModelConfig.vq_projection must be one of {', '.join(VQ_PROJECTIONS)}, "
                             f"got {self.vq_projection!r}")
        if self.vq_reseed_from not in VQ_RESEED_FROM:
            raise ValueError(f"ModelConfig.vq_reseed_from must be one of {', '.join(VQ_RESEED_FROM)}, "
                             f"got {self.vq_reseed_from!r}")
        if not isinstance(self.vq_reseed_window, int) or isinstance(self.vq_reseed_window, bool) \
                or self.vq_reseed_window < 0:
            raise ValueError(f"ModelConfig.vq_reseed_window must be a non-negative int (0 disables re-seeding), "
                             f"got {self.vq_reseed_window!r}")
        if not self.balance_weight >= 0:
            raise ValueError(f"ModelConfig.balance_weight must be >= 0, got {self.balance_weight!r}")
        if not self.commitment_weight >= 0:
            raise ValueError(f"ModelConfig.commitment_weight must be >= 0, got {self.commitment_weight!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def quantize_layers(self) -> tuple[int, ...]:
        return tuple(range(0, self.n_layers, self.quantize_every))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # Trains on 2 CPU cores in minutes.
    "tiny": ModelConfig(),
    # A GPU-minutes model.
    "small": ModelConfig(dim=512, n_layers=8, n_heads=8, max_seq_len=1024, num_experts=8, expert_hidden=1024,
                         fanout=4, codebook_size=65_536, kg_codebook_size=65_536, quantize_every=4),
    # ≈3.0B logical ternary parameters: 10M×64 shared VQ + 5M×64 KG VQ + 16 blocks of width 2048
    # with 16 SwiGLU experts of hidden 1120 each (see docs/memory.md for the breakdown).
    "default_3b": ModelConfig(dim=2048, n_layers=16, n_heads=16, max_seq_len=2048, num_experts=16,
                              expert_hidden=1120, fanout=4, edge_capacity=1 << 20, codebook_size=SHARED_VQ_SIZE,
                              kg_codebook_size=KGVQ_CODEBOOK_SIZE, quantize_every=16, num_relations=16),
}


# What a checkpoint made before a ModelConfig field existed was built with (not today's default).
MODEL_FIELDS_BEFORE_THEY_EXISTED = {"routing": "graph", "balance_weight": 0.01, "vq_input_norm": False,
                                    "vq_projection": "learned", "vq_reseed_from": "worst",
                                    "vq_reseed_window": RESEED_WINDOW}


def saved_model_config(fields: dict) -> ModelConfig:
    """The ModelConfig a checkpoint records, fields it predates filled as they were then."""
    return ModelConfig(**{**MODEL_FIELDS_BEFORE_THEY_EXISTED, **fields})


def get_preset(name: str) -> ModelConfig:
    """The named preset; unknown names list the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def logical_parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Logical ternary parameters per component, by arithmetic (the meta-device trace checks it)."""
    d, L = cfg.dim, cfg.n_layers
    expert = 3 * d * cfg.expert_hidden
    return {
        "token embedding": cfg.vocab_size * d,
        "attention q/k/v/o": L * 4 * d * d,
        "moe experts": L * cfg.num_experts * expert,
        "moe centroids": L * cfg.num_experts * d,
        "vq projections": len(cfg.quantize_layers) * d * cfg.codebook_dim,
        "shared vq codebook": cfg.codebook_size * cfg.codebook_dim,
        "kg vq codebook": cfg.kg_codebook_size * cfg.kg_codebook_dim,
        "lm head": d * cfg.vocab_size,
        "kg head (projection + relations)": d * cfg.kg_codebook_dim + cfg.num_relations * cfg.kg_codebook_dim,
    }
