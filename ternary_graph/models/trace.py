"""No-allocation trace: build a preset on the meta device and count what it would hold."""

from __future__ import annotations

import resource
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from ..config import ModelConfig, get_preset, logical_parameter_counts
from ..ternary.state import TernaryState
from .model import build_model


@dataclass
class TraceReport:
    name: str
    logical: dict[str, int]  # logical ternary parameters per component, counted on the meta model
    expected: dict[str, int]  # the same by arithmetic from the config (config.logical_parameter_counts)
    bytes_by_dtype: dict[str, int]  # persistent state bytes per dtype (everything in state_dict)
    float_elements: int  # floating-point elements in state_dict (0 for the ternary model)
    seconds: float  # time to build and count
    peak_rss_bytes: int  # process peak resident memory after the trace

    @property
    def total_logical(self) -> int:
        return sum(self.logical.values())

    @property
    def state_bytes(self) -> int:
        return sum(self.bytes_by_dtype.values())

    @property
    def bytes_per_logical_param(self) -> float:
        return self.state_bytes / max(1, self.total_logical)


def _component(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "embed":
        return "token embedding"
    if parts[0] == "shared_vq":
        return "shared vq codebook"
    if parts[0] == "kg_vq":
        return "kg vq codebook"
    if parts[0] == "head":
        return "lm head" if parts[1] == "lm" else "kg head (projection + relations)"
    if parts[0] == "blocks":
        if parts[2] == "attn":
            return "attention q/k/v/o"
        if parts[2] == "vq_proj":
            return "vq projections"
        if parts[2] == "moe":
            return "moe centroids" if "centroid" in name else "moe experts"
    return "other"


def trace_model(preset: str | ModelConfig, *, weights: str = "ternary") -> TraceReport:
    """Build ``preset`` on the meta device (no storage is allocated) and count it."""
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    t0 = time.perf_counter()
    model = build_model(cfg, weights=weights, device="meta")
    logical: dict[str, int] = defaultdict(int)
    for name, module in model.named_modules():
        if isinstance(module, TernaryState):
            logical[_component(name)] += module.rows * module.cols
    for name, p in model.named_parameters():
        if p.dtype.is_floating_point:  # the float baseline: its weights are "logical" too
            logical[_component(name)] += p.numel()
    by_dtype: dict[str, int] = defaultdict(int)
    float_elements = 0
    for tensor in model.state_dict().values():
        by_dtype[str(tensor.dtype).replace("torch.", "")] += tensor.numel() * tensor.element_size()
        if tensor.dtype.is_floating_point:
            float_elements += tensor.numel()
    seconds = time.perf_counter() - t0
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    name = preset if isinstance(preset, str) else "custom"
    return TraceReport(name, dict(logical), logical_parameter_counts(cfg), dict(by_dtype), float_elements,
                       seconds, peak)


def format_trace(r: TraceReport) -> str:
    lines = [f"trace of preset {r.name!r} on the meta device ({r.seconds:.2f} s, peak RSS {r.peak_rss_bytes / 2**20:,.0f} MiB)",
             "", f"{'component':<36}{'logical ternary params':>24}{'share':>8}"]
    for comp, n in sorted(r.logical.items(), key=lambda kv: -kv[1]):
        mark = "" if r.expected.get(comp) == n else f"   (config arithmetic says {r.expected.get(comp, 0):,})"
        lines.append(f"{comp:<36}{n:>24,}{n / r.total_logical:>8.1%}{mark}")
    lines += ["", f"{'persistent state by dtype':<36}{'bytes':>24}{'B/param':>8}"]
    for dtype, b in sorted(r.bytes_by_dtype.items(), key=lambda kv: -kv[1]):
        lines.append(f"{dtype:<36}{b:>24,}{b / r.total_logical:>8.3f}")
    lines += [f"{'total':<36}{r.state_bytes:>24,}{r.bytes_per_logical_param:>8.3f}",
              "",
              f"floating-point elements in state_dict: {r.float_elements:,}",
              f"estimated training state: {r.bytes_per_logical_param:.3f} bytes per logical parameter "
              f"(bf16 + AdamW: 16 bytes per parameter = {16 * r.total_logical / 1e9:,.1f} GB)",
              f"logical ternary total: {r.total_logical:,}"]
    return "\n".join(lines)
