"""Decode speed on one GPU: the 2-bit decode GEMVs against bf16 ``F.linear``, and batch-1 decoding.

    PYTHONPATH=. python3 experiments/bench_decode.py [--out DIR] [--budget-s 240]

Sections, all in one run (every variant in its own try/except: a failure is logged, the run
goes on; a section that would overrun ``--budget-s`` is skipped and says so):

1. GEMV, M = 1, at K->N 4096->4096, 8192->8192, 4096->14336: bf16 ``F.linear`` against every
   variant / block config of ``kernels/ternary_gemv.py`` (2-bit layout: "fma", "dot", "dot1", "i8", "i8f")
   and the training path's base-3 ``gemv_fma``. Every variant is checked against its torch
   reference (and the 2-bit reference against the base-3 one) before it is timed.
2. Small M (2, 4, 8, 16) at 8192², and the stacked experts of default_3b (16 experts, 2048->2240
   and 1120->2048, M = 2 rows on two experts) against bf16 (``torch._grouped_mm``, the float
   twin's path).
3. Models (small, default_3b, bf16 activations): time to first token of a 512-byte prompt, and
   batch-1 greedy decode tokens/s through ``decode_stream`` (the loop ``model.generate`` runs),
   for the ternary model without and with ``prepare_inference()`` and for the float twin with
   bf16 weights, each with the eager decode step (``cuda_graph=False``) and with the step
   replayed as a CUDA graph (``models/decode_graph.py``; its capture time is reported apart,
   and with the step compiled by inductor inside the graph (capture time includes compilation),
   and its device time per replay by CUDA events); GPU kernel time and kernel launches per
   decode step (torch.profiler); how far the decode-step logits with the copy are from those of
   the training kernels, and those of a replay from the eager step's.

Timing. Operands are fresh random trits / normals, rotated over copies that together exceed
200 MB (L2 is 50 MB), so no timed call finds its weights in cache. A GEMV here takes a few µs,
less than Python needs to launch it, so each rotation sequence (one call per copy) is captured
in one CUDA graph and timed as ``triton.testing.do_bench`` median of its replays divided by the
number of calls; baseline and variants alike. If a capture fails, the variant is timed eagerly
(marked "eager": then launch overhead is included). "TB/s" is weight bytes read / time.

Writes ``bench_decode.json`` and ``bench_decode.log`` to ``--out`` (default: $OUT, else
runs/bench_decode) and prints the tables last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import re
import statistics
import sys
import sysconfig
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROTATE_BYTES = 200e6
SHAPES = ((4096, 4096), (8192, 8192), (4096, 14336))  # (K, N)
# (variant, config) pairs of the sweep; the first fma and dot entries are the library defaults
FMA_CONFIGS = [dict(BN=64, BW=32, warps=4, per_sm=8), dict(BN=64, BW=32, warps=4, per_sm=4),
               dict(BN=64, BW=32, warps=4, per_sm=16), dict(BN=32, BW=32, warps=2, per_sm=8),
               dict(BN=128, BW=32, warps=8, per_sm=4), dict(BN=64, BW=64, warps=8, per_sm=4),
               dict(BN=16, BW=32, warps=1, per_sm=16), dict(BN=64, BW=32, warps=4, split=1),
               # latency hiding: Triton's pipeliner told how deep it may go (stages; its default is 3).
               # (A hand prefetch of the next step's words, measured 2026-12-02, was slower and is gone.)
               dict(BN=64, BW=32, warps=4, per_sm=8, stages=1), dict(BN=64, BW=32, warps=4, per_sm=8, stages=4),
               dict(BN=64, BW=32, warps=4, split=1, stages=4), dict(BN=64, BW=32, warps=4, split=4, stages=4),
               # registers capped (168 by default: 3 programs of 4 warps per SM), so more programs fit
               dict(BN=64, BW=32, warps=4, per_sm=8, maxnreg=128), dict(BN=64, BW=32, warps=4, per_sm=8, maxnreg=96),
               dict(BN=64, BW=32, warps=4, per_sm=8, maxnreg=80), dict(BN=32, BW=32, warps=2, per_sm=16, maxnreg=96),
               # more rows per thread (each activation load feeds more FMAs), 4 warps
               dict(BN=128, BW=32, warps=4, per_sm=4),
               # fewer elements per thread, so fewer registers (experiments/gemv_registers.py): 8 or 4
               dict(BN=32, BW=32, warps=4, per_sm=8), dict(BN=32, BW=32, warps=4, per_sm=16),
               dict(BN=64, BW=32, warps=8, per_sm=8), dict(BN=16, BW=32, warps=4, per_sm=16),
               # the word slice asked into L2 up front (as the i8f prefetch tiles)
               dict(BN=64, BW=32, warps=4, per_sm=8, prefetch=True), dict(BN=64, BW=32, warps=4, per_sm=4, prefetch=True),
               dict(BN=32, BW=32, warps=4, per_sm=8, prefetch=True)]
DOT_CONFIGS = [("dot", dict(BN=64, BW=32, warps=4, per_sm=4)), ("dot", dict(BN=128, BW=32, warps=4, per_sm=4)),
               ("dot", dict(BN=64, BW=32, warps=4, per_sm=8)), ("dot", dict(BN=128, BW=32, warps=8, per_sm=2)),
               ("dot1", dict(BN=64, BW=32, warps=4, per_sm=4))]
# "i8": activations in 16-bit fixed point, two dp4a per four trits (one program per activation row)
I8_CONFIGS = [("i8", dict(BN=64, BW=32, warps=4, per_sm=8)), ("i8", dict(BN=64, BW=32, warps=4, per_sm=4)),
              ("i8", dict(BN=128, BW=32, warps=4, per_sm=4)), ("i8", dict(BN=32, BW=32, warps=2, per_sm=8)),
              ("i8", dict(BN=64, BW=32, warps=4, per_sm=16)), ("i8", dict(BN=64, BW=64, warps=4, per_sm=4)),
              ("i8", dict(BN=64, BW=32, warps=4, split=1)), ("i8", dict(BN=64, BW=32, warps=4, per_sm=8, stages=4)),
              ("i8", dict(BN=64, BW=32, warps=4, per_sm=8, maxnreg=96)), ("i8", dict(BN=32, BW=32, warps=4, per_sm=8)),
              ("i8", dict(BN=32, BW=32, warps=4, per_sm=16)), ("i8", dict(BN=64, BW=32, warps=8, per_sm=8)),
              ("i8", dict(BN=16, BW=32, warps=4, per_sm=16))]
# "i8f": "i8" with the activation pack fused into the GEMV (one launch; per-K-slice scales)
I8F_CONFIGS = [("i8f", dict(BN=64, BW=32, warps=4, per_sm=4)), ("i8f", dict(BN=64, BW=32, warps=4, per_sm=8)),
               ("i8f", dict(BN=64, BW=32, warps=4, per_sm=2)), ("i8f", dict(BN=128, BW=32, warps=4, per_sm=4)),
               ("i8f", dict(BN=32, BW=32, warps=4, per_sm=8)), ("i8f", dict(BN=64, BW=32, warps=8, per_sm=4)),
               ("i8f", dict(BN=128, BW=32, warps=8, per_sm=2)), ("i8f", dict(BN=64, BW=64, warps=4, per_sm=4)),
               ("i8f", dict(BN=64, BW=32, warps=4, split=1)), ("i8f", dict(BN=32, BW=32, warps=4, per_sm=16)),
               ("i8f", dict(BN=16, BW=32, warps=4, per_sm=16)),
               # the words of the first 1, 2 or 4 K steps loaded before the activation pack (one wave of
               # programs: without it no weight bytes are in flight while every program packs its slice);
               # tiles and programs per SM chosen so that the early tile's registers still let them fit
               # (experiments/gemv_registers.py)
               ("i8f", dict(BN=64, BW=32, warps=4, per_sm=4, early=1)),
               ("i8f", dict(BN=64, BW=32, warps=4, per_sm=2, early=1)),
               ("i8f", dict(BN=64, BW=32, warps=4, per_sm=2, early=2)),
               ("i8f", dict(BN=128, BW=32, warps=8, per_sm=2, early=1)),
               ("i8f", dict(BN=64, BW=32, warps=8, per_sm=4, early=1)),
               ("i8f", dict(BN=64, BW=32, warps=8, per_sm=2, early=2)),
               ("i8f", dict(BN=32, BW=32, warps=4, per_sm=4, early=2)),
               ("i8f", dict(BN=32, BW=32, warps=4, per_sm=4, early=4)),
               ("i8f", dict(BN=32, BW=32, warps=4, per_sm=8, early=1)),
               ("i8f", dict(BN=16, BW=32, warps=4, per_sm=8, early=2)),
               ("i8f", dict(BN=16, BW=32, warps=4, per_sm=8, early=4)),
               # the program's whole word slice asked into L2 up front (cp.async.bulk.prefetch), holding no
               # registers, so the weight stream runs from the first instruction while x is packed; with
               # memory parallelism no longer tied to the tile, smaller tiles and more programs per SM too
               ("i8f", dict(BN=64, BW=32, warps=4, per_sm=4, prefetch=True)),
               ("i8f", dict(BN=64, BW=32, warps=4, per_sm=2, prefetch=True)),
               ("i8f", dict(BN=64, BW=32, warps=4, per_sm=8, prefetch=True)),
               ("i8f", dict(BN=128, BW=32, warps=8, per_sm=2, prefetch=True)),
               ("i8f", dict(BN=128, BW=32, warps=8, per_sm=1, prefetch=True)),
               ("i8f", dict(BN=64, BW=32, warps=8, per_sm=4, prefetch=True)),
               ("i8f", dict(BN=32, BW=32, warps=4, per_sm=8, prefetch=True)),
               ("i8f", dict(BN=32, BW=32, warps=4, per_sm=4, prefetch=True)),
               ("i8f", dict(BN=32, BW=32, warps=2, per_sm=8, prefetch=True)),
               ("i8f", dict(BN=64, BW=64, warps=4, per_sm=2, prefetch=True)),
               ("i8f", dict(BN=64, BW=32, warps=4, per_sm=4, early=1, prefetch=True))]
SMALL_M = (2, 4, 8, 16)
EXPERTS = ((2048, 2240), (1120, 2048))  # default_3b: gate_up and down of each of 16 experts
PRESETS = (("small", 64), ("default_3b", 32))  # preset, new tokens decoded
PROMPT_BYTES = 512
FLOOR = "floor:"  # rows that bound the kernels, never a variant (not in the best-of summary)
MAX_REL_ERR = 1e-2  # a variant further than this from its reference is reported, not timed
# "cuda" for the measurements; "cpu" (with TRITON_INTERPRET=1 and tiny --shapes) only dry-runs the
# script's logic on a machine without a GPU
DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _copies(bytes_per_set: float) -> int:
    return max(2, math.ceil(ROTATE_BYTES / bytes_per_set))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def cfg_name(variant: str, cfg: dict | None) -> str:
    if not cfg:
        return variant
    parts = [f"{cfg['BN']}x{cfg['BW']}w{cfg['warps']}"]
    parts.append(f"split{cfg['split']}" if "split" in cfg else f"sm{cfg['per_sm']}")
    if cfg.get("stages") is not None:
        parts.append(f"st{cfg['stages']}")
    if cfg.get("maxnreg") is not None:
        parts.append(f"r{cfg['maxnreg']}")
    if cfg.get("early"):
        parts.append(f"early{cfg['early']}")
    if cfg.get("prefetch"):
        parts.append("pf")
    return f"{variant}/{'/'.join(parts)}"


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.t_start = time.monotonic()
        self.lines: list[str] = []
        self.gemv_rows: list[dict] = []
        self.model_rows: list[dict] = []
        self.skipped: list[str] = []
        self.failures: list[str] = []

    # ---- bookkeeping ----------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        print(msg, flush=True)
        self.lines.append(msg)

    def elapsed(self) -> float:
        return time.monotonic() - self.t_start

    def has_time(self, need_s: float, what: str) -> bool:
        left = self.args.budget_s - self.elapsed()
        if left < need_s:
            msg = f"SKIPPED {what}: {left:.0f} s of the {self.args.budget_s:.0f} s budget left, needs ~{need_s:.0f} s"
            self.log(msg)
            self.skipped.append(msg)
            return False
        return True

    def fail(self, what: str, exc: BaseException) -> None:
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        msg = f"FAILED {what}: {type(exc).__name__}: {str(exc)[:300]}"
        self.log(msg)
        self.log("  " + "".join(tb[-3:]).replace("\n", "\n  ")[:1500])
        self.failures.append(msg)

    # ---- timing -------------------------------------------------------------------------------
    def time_calls(self, calls: list) -> tuple[float, str]:
        """Median µs per call of ``calls`` run in sequence (one per rotated copy)."""
        from triton.testing import do_bench

        for c in calls:  # compile, and allocate outside any capture
            c()
        sync()
        if DEVICE != "cuda":  # dry run: wall-clock of one pass
            t0 = time.perf_counter()
            for c in calls:
                c()
            return (time.perf_counter() - t0) * 1e6 / len(calls), "cpu"
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for c in calls:
                    c()
            graph.replay()
            sync()
            t = do_bench(graph.replay, warmup=10, rep=self.args.reps_ms, return_mode="median")
            return t * 1e3 / len(calls), "graph"
        except Exception as exc:  # timed eagerly instead: launch overhead then counts
            self.log(f"  CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:200]}); timing eagerly")
            sync()
        state = {"i": 0}

        def run():
            calls[state["i"] % len(calls)]()
            state["i"] += 1
        return do_bench(run, warmup=10, rep=self.args.reps_ms, return_mode="median") * 1e3, "eager"

    def add_gemv(self, section: str, shape: str, m: int, variant: str, t_us: float, base_us: float,
                 weight_bytes: float, err: float, mode: str, note: str = "") -> None:
        row = dict(section=section, shape=shape, M=m, variant=variant, time_us=round(t_us, 2),
                   bf16_us=round(base_us, 2), speedup=round(base_us / t_us, 3),
                   TBps=round(weight_bytes / (t_us * 1e-6) / 1e12, 3), rel_err=err, timing=mode, note=note)
        self.gemv_rows.append(row)
        self.log(json.dumps(row))


# --------------------------------------------------------------------------------------------
# 1 + 2: GEMV
# --------------------------------------------------------------------------------------------
def gemv_shape(b: Bench, K: int, N: int, gen: torch.Generator) -> dict:
    """M = 1 sweep at one shape; returns {name: time_us} of the 2-bit variants."""
    from ternary_graph.kernels import ternary_gemv as tg
    from ternary_graph.kernels import ternary_linear_triton as base3
    from ternary_graph.kernels.ternary_linear_reference import linear_forward_reference

    dev = torch.device(DEVICE)
    shape = f"{K}->{N}"
    KB = -(-K // 5)
    x = torch.randn(1, K, generator=gen, device=dev, dtype=torch.bfloat16)
    # bf16 baseline
    n_w = _copies(2 * N * K)
    w_sets = [torch.randn(N, K, generator=gen, device=dev, dtype=torch.bfloat16) for _ in range(n_w)]
    base, base_mode = b.time_calls([lambda w=w: F.linear(x, w) for w in w_sets])
    b.log(f"=== {shape}: bf16 F.linear {base:.2f} us ({base_mode}, {n_w} copies, "
          f"{2 * N * K / (base * 1e-6) / 1e12:.2f} TB/s)")
    del w_sets
    # ternary copies: base-3 state and its 2-bit decode copy
    words_bytes = 4 * N * tg.words_per_row(K, tg.choose_plane_words(K))
    n_p = _copies(words_bytes)
    sets = []
    for _ in range(n_p):
        packed = torch.randint(0, 243, (N, KB), generator=gen, device=dev, dtype=torch.uint8)
        E = torch.randint(-16, -8, (N,), generator=gen, device=dev, dtype=torch.int8)
        sets.append((packed, E, tg.DecodeWeights.from_state(packed, E, K)))
    packed0, E0, copy0 = sets[0]
    ref3 = linear_forward_reference(x, packed0, E0, K)
    ref2 = tg.gemv_2bit_reference(x, copy0.words, copy0.E, K, copy0.plane_words)
    layout_err = rel_err(ref2, ref3)
    b.log(f"{shape}: {n_p} ternary copies; 2-bit words {words_bytes / 1e6:.1f} MB, plane_words={copy0.plane_words}; "
          f"2-bit reference vs base-3 reference rel err {layout_err:.1e}")
    results = {}
    try:  # the training path (base-3 state, no copy)
        err = rel_err(base3.forward_triton(x, packed0, E0, K, path="gemv_fma"), ref3)
        outs = [torch.empty(1, N, device=dev, dtype=torch.bfloat16) for _ in sets]
        t, mode = b.time_calls([lambda p=p, e=e, o=o: base3.forward_triton(x, p, e, K, path="gemv_fma", out=o)
                                for (p, e, _), o in zip(sets, outs)])
        b.add_gemv("gemv", shape, 1, "base3 gemv_fma (training path)", t, base, N * KB, err, mode)
    except Exception as exc:
        b.fail(f"{shape} base3 gemv_fma", exc)
    try:  # a floor for the 2-bit kernels: one read of the same words by torch's own reduction, timed alike
        t, mode = b.time_calls([lambda c=c: c.words.sum(dtype=torch.int32) for _, _, c in sets])
        b.add_gemv("gemv", shape, 1, f"{FLOOR} read the words (torch sum)", t, base, words_bytes, 0.0, mode)
    except Exception as exc:
        b.fail(f"{shape} read floor", exc)
    variants = I8F_CONFIGS + I8_CONFIGS + [("fma", c) for c in FMA_CONFIGS] + DOT_CONFIGS
    if b.args.variants:  # the chosen kinds; fma always keeps its default config, the baseline of the 2-bit kernels
        kinds = b.args.variants.split(",")
        variants = [(v, c) for v, c in variants if v in kinds or (v == "fma" and c == FMA_CONFIGS[0])]
    if b.args.tiles:  # and of those, the tiles whose names match (fma's default still timed)
        variants = [(v, c) for v, c in variants
                    if re.search(b.args.tiles, cfg_name(v, c)) or (v == "fma" and c == FMA_CONFIGS[0])]
    for variant, cfg in variants:
        name = cfg_name(variant, cfg)
        try:
            y = tg.gemv_2bit_triton(x, copy0.words, copy0.E, K, copy0.plane_words, variant=variant, config=cfg,
                                    ws=copy0.ws, counters=copy0.counters)
            err = rel_err(y, ref2)
            if not err < MAX_REL_ERR:
                b.log(f"WRONG {shape} {name}: rel err {err:.2e} against the reference; not timed")
                b.failures.append(f"{shape} {name}: rel err {err:.2e}")
                continue
            outs = [torch.empty(1, N, device=dev, dtype=torch.bfloat16) for _ in sets]
            t, mode = b.time_calls([lambda c=c, o=o, v=variant, g=cfg: tg.gemv_2bit_triton(
                x, c.words, c.E, K, c.plane_words, variant=v, config=g, out=o, ws=c.ws, counters=c.counters)
                for (_, _, c), o in zip(sets, outs)])
            b.add_gemv("gemv", shape, 1, name, t, base, words_bytes, err, mode)
            results[name] = t
        except Exception as exc:
            b.fail(f"{shape} {name}", exc)
    base2, _ = b.time_calls([lambda w=w: F.linear(x, w) for w in
                             [torch.randn(N, K, generator=gen, device=dev, dtype=torch.bfloat16) for _ in range(n_w)]])
    b.log(f"{shape}: bf16 F.linear again {base2:.2f} us (spread between two timings of the same baseline)")
    del sets
    free()
    return results


def gemv_small_m(b: Bench, gen: torch.Generator, best_fma: dict | None, K: int, N: int) -> None:
    from ternary_graph.kernels import ternary_gemv as tg

    dev = torch.device(DEVICE)
    shape = f"{K}->{N}"
    n_w = _copies(2 * N * K)
    w_sets = [torch.randn(N, K, generator=gen, device=dev, dtype=torch.bfloat16) for _ in range(n_w)]
    words_bytes = 4 * N * tg.words_per_row(K, tg.choose_plane_words(K))
    n_p = _copies(words_bytes)
    copies = []
    for _ in range(n_p):
        packed = torch.randint(0, 243, (N, -(-K // 5)), generator=gen, device=dev, dtype=torch.uint8)
        E = torch.randint(-16, -8, (N,), generator=gen, device=dev, dtype=torch.int8)
        copies.append(tg.DecodeWeights.from_state(packed, E, K))
    c0 = copies[0]
    variants = [("fma", None), ("dot", None), ("dot1", None), ("i8", None), ("i8f", None)]
    if best_fma:
        variants.append(("fma", best_fma))
    for m in SMALL_M:
        if not b.has_time(20, f"small-M GEMV at M={m}"):
            break
        x = torch.randn(m, K, generator=gen, device=dev, dtype=torch.bfloat16)
        try:
            base, _ = b.time_calls([lambda w=w: F.linear(x, w) for w in w_sets])
            b.log(f"=== {shape} M={m}: bf16 F.linear {base:.2f} us")
        except Exception as exc:
            b.fail(f"{shape} M={m} bf16", exc)
            continue
        ref = tg.gemv_2bit_reference(x, c0.words, c0.E, K, c0.plane_words)
        for variant, cfg in variants:
            name = cfg_name(variant, cfg) + (" (default)" if cfg is None else " (best M=1)")
            try:
                err = rel_err(tg.gemv_2bit_triton(x, c0.words, c0.E, K, c0.plane_words, variant=variant, config=cfg,
                                                  ws=c0.ws, counters=c0.counters), ref)
                if not err < MAX_REL_ERR:
                    b.log(f"WRONG {shape} M={m} {name}: rel err {err:.2e}; not timed")
                    b.failures.append(f"{shape} M={m} {name}: rel err {err:.2e}")
                    continue
                outs = [torch.empty(m, N, device=dev, dtype=torch.bfloat16) for _ in copies]
                t, mode = b.time_calls([lambda c=c, o=o, v=variant, g=cfg: tg.gemv_2bit_triton(
                    x, c.words, c.E, K, c.plane_words, variant=v, config=g, out=o, ws=c.ws, counters=c.counters)
                    for c, o in zip(copies, outs)])
                b.add_gemv("small M", shape, m, name, t, base, words_bytes, err, mode)
            except Exception as exc:
                b.fail(f"{shape} M={m} {name}", exc)
    del w_sets, copies
    free()


def gemv_experts(b: Bench, gen: torch.Generator, best_fma: dict | None, experts) -> None:
    from ternary_graph.kernels import ternary_gemv as tg

    dev = torch.device(DEVICE)
    G, picked = 16, (3, 12)
    counts = [1 if g in picked else 0 for g in range(G)]
    offsets = torch.tensor(counts, device=dev).cumsum(0).to(torch.int32)
    for K, N in experts:
        if not b.has_time(25, f"expert GEMV {K}->{N}"):
            return
        shape = f"16x {K}->{N}"
        x = torch.randn(2, K, generator=gen, device=dev, dtype=torch.bfloat16)
        try:
            n_w = _copies(2 * G * N * K)
            w_sets = [torch.randn(G, N, K, generator=gen, device=dev, dtype=torch.bfloat16) for _ in range(n_w)]
            if hasattr(torch, "_grouped_mm"):
                base, _ = b.time_calls([lambda w=w: torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)
                                        for w in w_sets])
                base_name = "torch._grouped_mm"
            else:
                base, _ = b.time_calls([lambda w=w: torch.cat([F.linear(x[i:i + 1], w[g]) for i, g in enumerate(picked)])
                                        for w in w_sets])
                base_name = "2x F.linear"
            loop, _ = b.time_calls([lambda w=w: [F.linear(x[i:i + 1], w[g]) for i, g in enumerate(picked)]
                                    for w in w_sets])
            b.log(f"=== {shape}, M=2 on experts {picked}: bf16 {base_name} {base:.2f} us; two bf16 F.linear {loop:.2f} us")
            del w_sets
        except Exception as exc:
            b.fail(f"{shape} bf16 baseline", exc)
            continue
        L = tg.choose_plane_words(K)
        stack_bytes = 4 * G * N * tg.words_per_row(K, L)
        read_bytes = stack_bytes * len(picked) / G  # the kernel reads only the routed experts' rows
        copies = []
        for _ in range(_copies(stack_bytes)):
            packed = torch.randint(0, 243, (G * N, -(-K // 5)), generator=gen, device=dev, dtype=torch.uint8)
            E = torch.randint(-16, -8, (G * N,), generator=gen, device=dev, dtype=torch.int8)
            copies.append(tg.DecodeWeights.from_state(packed, E, K, groups=G))
        c0 = copies[0]
        ref = tg.gemv_2bit_reference(x, c0.words, c0.E, K, c0.plane_words, offsets)
        for cfg in [None] + ([best_fma] if best_fma else []):
            name = cfg_name("fma", cfg) + (" (default)" if cfg is None else " (best M=1)")
            try:
                err = rel_err(tg.gemv_2bit_triton(x, c0.words, c0.E, K, c0.plane_words, offsets=offsets, variant="fma",
                                                  config=cfg, ws=c0.ws, counters=c0.counters), ref)
                if not err < MAX_REL_ERR:
                    b.log(f"WRONG {shape} {name}: rel err {err:.2e}; not timed")
                    b.failures.append(f"{shape} {name}: rel err {err:.2e}")
                    continue
                outs = [torch.empty(2, N, device=dev, dtype=torch.bfloat16) for _ in copies]
                t, mode = b.time_calls([lambda c=c, o=o, g=cfg: tg.gemv_2bit_triton(
                    x, c.words, c.E, K, c.plane_words, offsets=offsets, variant="fma", config=g, out=o, ws=c.ws,
                    counters=c.counters) for c, o in zip(copies, outs)])
                b.add_gemv("experts", shape, 2, name, t, base, read_bytes, err, mode,
                           f"L={L}; bf16 baseline {base_name}; two F.linear {loop:.1f} us")
            except Exception as exc:
                b.fail(f"{shape} {name}", exc)
        del copies
        free()


# --------------------------------------------------------------------------------------------
# 3: models
# --------------------------------------------------------------------------------------------
def prompt_ids(device: torch.device, n: int) -> tuple[torch.Tensor, str]:
    """``n`` bytes of real text: the start of the interpreter's os.py (random bytes if unreadable)."""
    try:
        data = (Path(sysconfig.get_paths()["stdlib"]) / "os.py").read_bytes()[:n]
        source = "stdlib os.py"
    except OSError:
        data = b""
        source = "random bytes"
    if len(data) < n:
        gen = torch.Generator().manual_seed(0)
        data = bytes(torch.randint(0, 256, (n,), generator=gen).tolist())
        source = "random bytes"
    return torch.tensor(list(data), dtype=torch.long, device=device)[None], source


def open_decoder(model, graph: bool, backend: str | None = None):
    """The decoder ``decode_stream`` uses: the model's cached CUDA graph, or the eager step
    (``backend``: the step compiled with torch.compile)."""
    from ternary_graph.models.decode_graph import StepDecoder, decode_graph

    return decode_graph(model, 1, backend) if graph else StepDecoder(model, 1, backend)


def ttft_ms(model, ids: torch.Tensor, graph: bool, reps: int = 3, backend: str | None = None) -> float:
    """Prefill (the ordinary forward, the same with or without a graph) to the first token on the host."""
    times = []
    decoder = open_decoder(model, graph, backend)
    try:
        for _ in range(reps + 1):
            sync()
            t0 = time.perf_counter()
            decoder.prefill(ids).argmax(-1).item()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        decoder.release()
    return statistics.median(times[1:])  # the first run warms up


def decode_tokens_per_s(model, ids: torch.Tensor, new_tokens: int, graph: bool, reps: int = 2,
                        backend: str | None = None) -> float:
    from ternary_graph.models.generate import decode_stream

    rates = []
    for _ in range(reps):
        stream = decode_stream(model, ids, new_tokens, temperature=0.0, cuda_graph=graph, compile_backend=backend)
        next(stream).item()  # prefill and the first token: not decode steps
        t0 = time.perf_counter()
        steps = sum(1 for _ in stream)
        sync()
        rates.append(steps / (time.perf_counter() - t0))
    return max(rates)


# the weight products of a decode step: the decode GEMVs' kernels (prepare_inference) by name, and
# the float twin's by the op that launched them (outermost only: aten::linear calls aten::mm)
GEMV_KERNEL_PREFIXES = ("_gemv2_", "_pack_x16")
LINEAR_OPS = ("aten::linear", "aten::_grouped_mm", "aten::mm", "aten::addmm", "aten::matmul")


def linear_kernel_us(events) -> float:
    """Kernel µs of the weight products among a profiler's events (see LINEAR_OPS)."""
    from torch.autograd import DeviceType

    total = 0.0
    for e in events:
        if e.device_type == DeviceType.CUDA:
            if e.name.startswith(GEMV_KERNEL_PREFIXES):
                total += e.device_time_total
            continue
        if e.name in LINEAR_OPS:
            parent = e.cpu_parent
            while parent is not None and parent.name not in LINEAR_OPS:
                parent = parent.cpu_parent
            if parent is None:
                total += e.device_time_total
    return total


def free_products_bound(float_step_ms: float, float_products_ms: float) -> float:
    """The most a step whose weight products cost nothing can gain over the float step: what
    both run besides the products is shared (inf when the products are the whole step)."""
    rest = float_step_ms - float_products_ms
    return float_step_ms / rest if rest > 0 else float("inf")


def gpu_per_step(model, ids: torch.Tensor, graph: bool, steps: int = 8,
                 backend: str | None = None) -> tuple[float, float, float]:
    """(GPU kernel ms, kernel launches, weight-product kernel ms) per decode step (token copy, step,
    argmax), from torch.profiler. A graph replay counts as one launch (cudaGraphLaunch); its kernels
    count in the GPU time, but not in the weight products (a replay's kernels have no launching op)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    decoder = open_decoder(model, graph, backend)
    try:
        token = decoder.prefill(ids).argmax(-1)
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                token = decoder.step(token).argmax(-1)
            sync()
    finally:
        decoder.release()
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
    names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
    launches = sum(e.count for e in events if e.key in names)
    return kernel_us / 1e3 / steps, launches / steps, linear_kernel_us(prof.events()) / 1e3 / steps


def replay_ms(model, ids: torch.Tensor, steps: int = 16, backend: str | None = None) -> float:
    """Device time per graph replay, by CUDA events around back-to-back steps (the host queues a
    replay in microseconds, so the GPU never waits for it): the step's GPU time including the gaps
    between its kernels, which the profiler's kernel sum leaves out."""
    decoder = open_decoder(model, True, backend)
    try:
        decoder.prefill(ids)
        token = torch.zeros(1, dtype=torch.long, device=ids.device)
        steps = min(steps, decoder.max_len - decoder.length)
        decoder.step(token)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps - 1):
            decoder.step(token)
        end.record()
        sync()
    finally:
        decoder.release()
    return start.elapsed_time(end) / max(steps - 1, 1)


def step_logits(model, ids: torch.Tensor, graph: bool, backend: str | None = None) -> torch.Tensor:
    """Logits of one decode step (the prompt's last byte again) after prefilling the prompt."""
    decoder = open_decoder(model, graph, backend)
    try:
        decoder.prefill(ids)
        return decoder.step(ids[:, -1]).float().clone()
    finally:
        decoder.release()


def model_section(b: Bench, preset: str, new_tokens: int, ids: torch.Tensor) -> None:
    from ternary_graph.config import get_preset
    from ternary_graph.models.decode_graph import clear_decode_graphs, decode_graph
    from ternary_graph.models.model import build_model

    cfg = get_preset(preset)
    for kind in ("ternary", "float"):
        need = 75 if preset == "default_3b" else 25
        if not b.has_time(need, f"{preset} {kind} decode"):
            return
        model = None
        try:
            t0 = time.monotonic()
            model = build_model(cfg, weights=kind, device=DEVICE, seed=0, compute_dtype=torch.bfloat16)
            if kind == "float":
                model = model.to(torch.bfloat16)  # the float twin with bf16 weights
            model.eval()
            sync()
            mem = torch.cuda.memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
            b.log(f"=== {preset} {kind}: built in {time.monotonic() - t0:.1f} s, {mem:.1f} GiB allocated")
            # warm-up: compiles every kernel of prefill and of the eager decode step
            decode_tokens_per_s(model, ids, 4, False, reps=1)
            base = "float twin, bf16 weights" if kind == "float" else None
            # (label, prepare_inference first?, CUDA graph?, torch.compile backend); a compiled
            # row's capture_s includes the compilation
            runs = [(base, None, False, None), (f"{base}, CUDA graph", None, True, None),
                    (f"{base}, compiled, CUDA graph", None, True, "inductor")] if kind == "float" else [
                ("ternary, training kernels", False, False, None),
                ("ternary, training kernels, CUDA graph", False, True, None),
                ("ternary, prepare_inference", True, False, None),
                ("ternary, prepare_inference, CUDA graph", True, True, None),
                ("ternary, prepare_inference, compiled, CUDA graph", True, True, "inductor")]
            is_prepared = False
            logits_plain = None  # the training kernels' step logits
            logits_eager = None  # the eager step's logits of the current weights (a graph row compares)
            if b.args.skip_training_kernels:
                runs = [run for run in runs if run[1] is not False]
            for label, prepared, graph, backend in runs:
                if graph and DEVICE != "cuda":
                    b.log(f"{preset} {label}: skipped (a CUDA graph needs --device cuda)")
                    continue
                # an eager row decodes at a few tens of tokens/s; a graph row mostly waits for its capture
                row_need = (90 if backend else 8 if graph else 15) * (2 if preset == "default_3b" else 1)
                if not b.has_time(row_need, f"{preset} {label}"):
                    break
                if prepared and not is_prepared:
                    t1 = time.monotonic()
                    model.prepare_inference()
                    is_prepared = True
                    sync()
                    copy_bytes = sum(m.inference_copy.nbytes for m in model.modules()
                                     if getattr(m, "inference_copy", None) is not None)
                    b.log(f"{preset}: prepare_inference {time.monotonic() - t1:.2f} s, decode copies "
                          f"{copy_bytes / 2**20:.0f} MiB")
                    decode_tokens_per_s(model, ids, 4, False, reps=1)  # compile the decode kernels
                row = dict(preset=preset, model=label)
                if graph:
                    try:  # capture now, so that no timing below includes it
                        clear_decode_graphs(model)
                        t1 = time.monotonic()
                        decode_graph(model, 1, backend).release()
                        sync()
                        row["capture_s"] = round(time.monotonic() - t1, 2)
                    except Exception as exc:
                        b.fail(f"{preset} {label} capture", exc)
                        b.model_rows.append(row)
                        continue
                try:
                    row["ttft_ms"] = round(ttft_ms(model, ids, graph, backend=backend), 2)
                    row["tokens_per_s"] = round(decode_tokens_per_s(model, ids, new_tokens, graph, backend=backend), 1)
                except Exception as exc:
                    b.fail(f"{preset} {label} timing", exc)
                try:
                    gpu_ms, launches, linear_ms = gpu_per_step(model, ids, graph, backend=backend)
                    row["gpu_ms_per_token"] = round(gpu_ms, 3)
                    row["launches_per_token"] = round(launches, 1)
                    if not graph and (kind == "float" or prepared):  # the training kernels go unnamed
                        row["linear_gpu_ms_per_token"] = round(linear_ms, 3)
                    if graph:
                        row["replay_ms_per_token"] = round(replay_ms(model, ids, backend=backend), 3)
                except Exception as exc:
                    b.fail(f"{preset} {label} profile", exc)
                try:
                    logits = step_logits(model, ids, graph, backend)
                    if graph and logits_eager is not None:
                        row["logits_rel_err_vs_eager_step"] = rel_err(logits, logits_eager)
                        row["same_argmax_as_eager"] = bool((logits.argmax(-1) == logits_eager.argmax(-1)).all())
                    elif not graph:
                        logits_eager = logits
                        if kind == "ternary" and prepared and logits_plain is not None:
                            row["logits_rel_err_vs_training_kernels"] = rel_err(logits, logits_plain)
                            row["same_argmax"] = bool((logits.argmax(-1) == logits_plain.argmax(-1)).all())
                        elif kind == "ternary":
                            logits_plain = logits
                except Exception as exc:
                    b.fail(f"{preset} {label} logits", exc)
                b.model_rows.append(row)
                b.log(json.dumps(row))
        except Exception as exc:
            b.fail(f"{preset} {kind}", exc)
        finally:
            if model is not None:
                clear_decode_graphs(model)
            del model
            free()

def kernel_report(b: Bench) -> None:
    """Registers, spills, shared memory, resident programs per SM and the SASS opcode mix of every
    compiled decode GEMV kernel: what bounds the kernels (occupancy, issue) without a profiler."""
    from collections import Counter

    from ternary_graph.kernels import ternary_gemv as tg

    props = torch.cuda.get_device_properties(0) if DEVICE == "cuda" else None
    for fn_name in ("_gemv2_fma_kernel", "_gemv2_dot_kernel", "_gemv2_i8_kernel", "_pack_x16_kernel",
                    "_gemv2_i8f_kernel"):
        fn = getattr(tg, fn_name)
        for entry in list(getattr(fn, "device_caches", {}).values()):
            for key, k in list(entry[0].items()):
                md = k.metadata
                consts = {n: v for n, v in getattr(getattr(k, "src", None), "constants", {}).items()
                          if isinstance(v, (int, bool))} if hasattr(k, "src") else {}
                threads = 32 * md.num_warps
                regs = getattr(k, "n_regs", 0) or 0
                per_sm = None
                if props is not None and regs:  # threads, registers and shared memory each cap it; 32 CTAs at most
                    per_sm = min(props.max_threads_per_multi_processor // threads,
                                 props.regs_per_multiprocessor // (regs * threads),
                                 (props.shared_memory_per_multiprocessor // md.shared) if md.shared else 32, 32)
                mix = ""
                try:
                    sass = k.asm["sass"]
                    ops = Counter()
                    for line in sass.splitlines():  # triton.tools.disasm: "<control bits>\t<instruction>;"
                        tokens = line.split("\t", 1)[-1].split() if "\t" in line else []
                        if tokens and tokens[0].startswith("@"):
                            tokens = tokens[1:]
                        if tokens:
                            ops[tokens[0].rstrip(";").split(".")[0]] += 1
                    mix = " ".join(f"{op}:{n}" for op, n in ops.most_common(14))
                except Exception as exc:  # nvdisasm may be absent: the rest of the row still says a lot
                    mix = f"(no SASS: {type(exc).__name__}: {str(exc)[:80]})"
                b.log(f"kernel {fn_name} warps={md.num_warps} stages={md.num_stages} regs={regs} "
                      f"spills={getattr(k, 'n_spills', '?')} shared={md.shared} programs/SM={per_sm} consts={consts}")
                b.log(f"  SASS mix: {mix}")


# --------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench_decode"))
    ap.add_argument("--reps-ms", type=int, default=60, help="do_bench time per measurement")
    ap.add_argument("--budget-s", type=float, default=240.0, help="skip sections that would run past this")
    ap.add_argument("--skip-models", action="store_true", help="GEMV sections only")
    ap.add_argument("--models-only", action="store_true", help="the model section only (no GEMV sections)")
    ap.add_argument("--skip-training-kernels", action="store_true",
                    help="model section: no rows of the ternary model without its decode copies")
    ap.add_argument("--variants", default="", help="M = 1 sweep: only these kinds, comma-separated (e.g. i8f,i8; "
                    "the default fma config is always timed); empty: all")
    ap.add_argument("--tiles", default="", help="M = 1 sweep: only the configs whose names (as printed, e.g. "
                    "i8f/64x32w4/sm4/pf) match this regular expression; empty: all")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN list, M = 1 sweep")
    ap.add_argument("--small-m-shape", default="8192x8192", help="KxN of the small-M section")
    ap.add_argument("--experts", default=",".join(f"{k}x{n}" for k, n in EXPERTS), help="KxN of each of 16 experts")
    ap.add_argument("--presets", default=",".join(f"{p}:{n}" for p, n in PRESETS), help="preset:new_tokens list")
    ap.add_argument("--prompt-bytes", type=int, default=PROMPT_BYTES, help="prompt length for TTFT and decoding")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a dry run of the script under TRITON_INTERPRET=1 with tiny shapes (no numbers)")
    args = ap.parse_args()
    if args.skip_models and args.models_only:
        ap.error("--skip-models and --models-only leave nothing to run")
    global DEVICE, ROTATE_BYTES
    DEVICE = args.device
    if DEVICE != "cuda":
        ROTATE_BYTES = 0  # two copies of everything: the dry run checks logic, not caches
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_decode needs a CUDA device", file=sys.stderr)
        return 2

    def pairs(spec: str) -> list[tuple[int, int]]:
        return [tuple(int(v) for v in item.split("x")) for item in spec.split(",") if item]
    import triton

    b = Bench(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(DEVICE)
    meta = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)", date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton.__version__, command=" ".join(sys.argv))
    b.log(json.dumps(meta))
    gen = torch.Generator(device=dev).manual_seed(0)
    copy_tbs = None
    try:
        if DEVICE == "cuda":
            from triton.testing import do_bench

            src = torch.empty(int(512e6), dtype=torch.uint8, device=dev)
            dst = torch.empty_like(src)
            t_copy = do_bench(lambda: dst.copy_(src), rep=args.reps_ms, return_mode="median")
            copy_tbs = 2 * src.numel() / (t_copy * 1e-3) / 1e12
            b.log(f"device copy: {copy_tbs:.2f} TB/s (read+write)")
            del src, dst
    except Exception as exc:
        b.fail("copy bandwidth", exc)

    best_fma, best_time = None, float("inf")
    for K, N in ([] if args.models_only else pairs(args.shapes)):
        if not b.has_time(40, f"GEMV {K}->{N}"):
            continue
        try:
            results = gemv_shape(b, K, N, gen)
            if (K, N) == pairs(args.small_m_shape)[0]:
                for cfg in FMA_CONFIGS:
                    t = results.get(cfg_name("fma", cfg))
                    if t is not None and t < best_time:
                        best_fma, best_time = cfg, t
        except Exception as exc:
            b.fail(f"GEMV {K}->{N}", exc)
    if DEVICE == "cuda":
        try:
            kernel_report(b)
        except Exception as exc:
            b.fail("kernel report", exc)
    if best_fma == FMA_CONFIGS[0]:
        best_fma = None  # the default already runs
    if not args.models_only:
        try:
            if b.has_time(60, "small-M GEMV"):
                gemv_small_m(b, gen, best_fma, *pairs(args.small_m_shape)[0])
        except Exception as exc:
            b.fail("small-M GEMV", exc)
        try:
            gemv_experts(b, gen, best_fma, pairs(args.experts))
        except Exception as exc:
            b.fail("expert GEMV", exc)

    if not args.skip_models:
        ids, source = prompt_ids(dev, args.prompt_bytes)
        b.log(f"prompt: {args.prompt_bytes} bytes of {source}")
        presets = [(item.split(":")[0], int(item.split(":")[1])) for item in args.presets.split(",") if item]
        for preset, new_tokens in presets:
            try:
                model_section(b, preset, new_tokens, ids)
            except Exception as exc:
                b.fail(f"models {preset}", exc)

    # ---- tables ---------------------------------------------------------------------------------
    summary = {}
    for shape in sorted({r["shape"] for r in b.gemv_rows if r["section"] == "gemv"}):
        rows = [r for r in b.gemv_rows if r["section"] == "gemv" and r["shape"] == shape
                and not r["variant"].startswith(FLOOR)]
        best = min(rows, key=lambda r: r["time_us"])
        summary[shape] = dict(best=best["variant"], time_us=best["time_us"], speedup=best["speedup"])
    (out_dir / "bench_decode.json").write_text(json.dumps(
        dict(meta=meta, copy_TBps=copy_tbs, gemv=b.gemv_rows, models=b.model_rows, best_m1=summary,
             best_fma_config=best_fma, skipped=b.skipped, failures=b.failures, elapsed_s=round(b.elapsed(), 1)),
        indent=1))
    for msg in b.skipped + b.failures:
        b.log(msg)
    b.log("")
    b.log(f"{meta['device']}  {meta['date']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"copy {copy_tbs or float('nan'):.2f} TB/s  elapsed {b.elapsed():.0f} s")
    b.log(f"{'section':>8} {'shape':>16} {'M':>3} {'variant':>34} {'ours us':>8} {'bf16 us':>8} {'speedup':>8} "
          f"{'TB/s':>6} {'rel err':>8} {'timing':>6}")
    for r in b.gemv_rows:
        b.log(f"{r['section']:>8} {r['shape']:>16} {r['M']:>3} {r['variant']:>34} {r['time_us']:>8.2f} "
              f"{r['bf16_us']:>8.2f} {r['speedup']:>7.2f}x {r['TBps']:>6.2f} {r['rel_err']:>8.1e} {r['timing']:>6}"
              + (f"  {r['note']}" if r["note"] else ""))
    for shape, s in summary.items():
        b.log(f"best M=1 at {shape}: {s['best']} {s['time_us']:.2f} us = {s['speedup']:.2f}x bf16")
    b.log("")
    b.log("logits rel err: the prepare_inference rows against the training kernels' step, the CUDA graph rows "
          "against the eager step of the same weights (same argmax in parentheses)")
    b.log(f"{'preset':>10} {'model':>50} {'TTFT ms':>8} {'tok/s':>8} {'GPU ms/tok':>10} {'replay ms':>9} "
          f"{'launch/tok':>10} {'capture s':>9} {'logits rel err':>22}")
    nan = float("nan")
    for r in b.model_rows:
        err = r.get("logits_rel_err_vs_training_kernels", r.get("logits_rel_err_vs_eager_step"))
        same = r.get("same_argmax", r.get("same_argmax_as_eager"))
        err_s = "" if err is None else f"{err:.1e} ({same})"
        b.log(f"{r['preset']:>10} {r['model']:>50} {r.get('ttft_ms', nan):>8.1f} {r.get('tokens_per_s', nan):>8.1f} "
              f"{r.get('gpu_ms_per_token', nan):>10.3f} {r.get('replay_ms_per_token', nan):>9.3f} "
              f"{r.get('launches_per_token', nan):>10.1f} {r.get('capture_s', nan):>9.2f} {err_s:>22}")
    for preset in sorted({r["preset"] for r in b.model_rows}):
        by = {r["model"]: r for r in b.model_rows if r["preset"] == preset}
        tern, flt = "ternary, prepare_inference", "float twin, bf16 weights"
        pairs = [(tern, flt, "ternary (prepare_inference) vs float twin"),
                 (f"{tern}, CUDA graph", f"{flt}, CUDA graph",
                  "ternary (prepare_inference) vs float twin, both CUDA graphs"),
                 (f"{tern}, compiled, CUDA graph", f"{flt}, compiled, CUDA graph",
                  "ternary (prepare_inference) vs float twin, both compiled CUDA graphs"),
                 (f"{tern}, compiled, CUDA graph", f"{tern}, CUDA graph",
                  "ternary (prepare_inference): compiled vs plain CUDA graph"),
                 (f"{tern}, CUDA graph", tern, "ternary (prepare_inference): CUDA graph vs eager"),
                 (f"{flt}, CUDA graph", flt, "float twin: CUDA graph vs eager")]
        for ours_name, other_name, what in pairs:
            ours, other = by.get(ours_name, {}), by.get(other_name, {})
            for key, label in (("tokens_per_s", "tokens/s"), ("gpu_ms_per_token", "GPU ms/token")):
                if key in ours and key in other and ours[key] and other[key]:
                    ratio = ours[key] / other[key] if key == "tokens_per_s" else other[key] / ours[key]
                    b.log(f"{preset}: {what}, {label}: {ratio:.2f}x")
        ours, other = by.get(tern, {}), by.get(flt, {})
        key = "linear_gpu_ms_per_token"
        if key in ours and key in other and other["gpu_ms_per_token"]:  # a CPU dry run times no kernel
            b.log(f"{preset}: weight products {ours[key]:.3f} (ternary) / {other[key]:.3f} (float) of "
                  f"{ours['gpu_ms_per_token']:.3f} / {other['gpu_ms_per_token']:.3f} GPU ms per token (eager); "
                  f"with free weight products the ternary step is at most "
                  f"{free_products_bound(other['gpu_ms_per_token'], other[key]):.2f}x the float twin's")
    (out_dir / "bench_decode.log").write_text("\n".join(b.lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
