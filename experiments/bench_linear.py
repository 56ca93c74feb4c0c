"""Benchmark the TernaryLinear Triton kernels against torch bf16 ``F.linear`` on one GPU.

    PYTHONPATH=. python3 experiments/bench_linear.py [--out DIR] [--reps-ms 100]

For each shape (K -> N): forward at M = 1 (every GEMV variant) and M = 4096 (GEMM), and the
backward at M = 4096 (grad_input + votes: the fused plane kernel, and cuBLAS dW chunks with the votes epilogue), each beside its bf16 baseline timed in the
same run (``F.linear``; for the backward ``grad @ W`` plus ``gradᵀ @ x``). Timings are
``triton.testing.do_bench`` medians; data are fresh random trits/normals, and every operand
set is rotated over enough copies that the copies together exceed 200 MB (L2 is 50 MB), so
no timed call finds its weights in cache. Each variant's output is checked against the
reference before it is timed. Effective bandwidth is packed weight bytes / time.

Writes ``bench_linear.json`` and ``bench_linear.log`` to ``--out`` (default: $OUT, else
runs/bench_linear) and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROTATE_BYTES = 200e6
# block-size sweeps (one tuning round; see docs/kernels.md)
GEMV_FMA_CONFIGS = [dict(BN=8, BKB=128, warps=2), dict(BN=4, BKB=128, warps=1), dict(BN=8, BKB=256, warps=2),
                    dict(BN=16, BKB=256, warps=4), dict(BN=4, BKB=256, warps=1)]
GEMM_CONFIGS = [dict(BM=256, BN=128, BK=64, warps=8, stages=3)]
# epilogue of the cuBLAS votes path: rows per program, columns per step, warps
DW_VOTES_CONFIGS = [dict(BR=4, BC=256, warps=4), dict(BR=2, BC=512, warps=4), dict(BR=1, BC=1024, warps=4),
                    dict(BR=2, BC=1024, warps=8), dict(BR=4, BC=512, warps=8)]
# dW chunk sizes (elements): 8M bf16 = 16 MB stays in the 50 MB L2 between the GEMM and the epilogue
DW_CHUNKS = [1 << 23, 1 << 25]


def _copies(bytes_per_set: float) -> int:
    return max(2, math.ceil(ROTATE_BYTES / bytes_per_set))


class Rotator:
    """Calls ``fn(*operands[i])`` with i cycling over the copies, one copy per call."""

    def __init__(self, sets):
        self.sets, self.i = sets, 0

    def __call__(self, fn):
        def run():
            args = self.sets[self.i % len(self.sets)]
            self.i += 1
            return fn(*args)
        return run


def bench(fn, reps_ms: int) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=reps_ms, return_mode="median") * 1e3  # µs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench_linear"))
    ap.add_argument("--reps-ms", type=int, default=100)
    ap.add_argument("--shapes", default="4096x4096,8192x8192,4096x14336", help="KxN list")
    ap.add_argument("--gemm-m", type=int, default=4096)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_linear needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    from ternary_graph.kernels import ternary_linear_triton as kern
    from ternary_graph.kernels.ternary_linear_reference import linear_forward_reference
    from ternary_graph.ternary.packing import unpack_trits

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    dev = torch.device("cuda")
    meta = dict(device=torch.cuda.get_device_name(), date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton.__version__, command=" ".join(sys.argv))
    log(json.dumps(meta))
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []

    # copy bandwidth, for the floor
    src = torch.empty(int(512e6), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t_copy = bench(lambda: dst.copy_(src), args.reps_ms)
    copy_tbs = 2 * src.numel() / (t_copy * 1e-6) / 1e12
    log(f"device copy: {copy_tbs:.2f} TB/s (read+write)")
    del src, dst

    def add(shape, op, variant, t_us, base_us, packed_bytes, err, note=""):
        row = dict(shape=shape, op=op, variant=variant, time_us=round(t_us, 2), baseline_us=round(base_us, 2),
                   speedup=round(base_us / t_us, 3), packed_TBps=round(packed_bytes / (t_us * 1e-6) / 1e12, 3),
                   rel_err=err, note=note)
        rows.append(row)
        log(json.dumps(row))

    for spec in args.shapes.split(","):
        K, N = (int(v) for v in spec.split("x"))
        shape = f"{K}->{N}"
        KB = -(-K // 5)
        packed_bytes = N * KB
        log(f"=== shape K={K} N={N}: packed {packed_bytes / 1e6:.1f} MB, bf16 weight {2 * N * K / 1e6:.1f} MB")

        def new_packed():
            return torch.randint(0, 243, (N, KB), generator=gen, device=dev, dtype=torch.uint8)

        def new_E():
            return torch.randint(-16, -8, (N,), generator=gen, device=dev, dtype=torch.int8)

        # ---- forward, M = 1 -------------------------------------------------------------------
        n_w = _copies(2 * N * K)
        w_sets = [torch.randn(N, K, generator=gen, device=dev, dtype=torch.bfloat16) for _ in range(n_w)]
        x1 = torch.randn(1, K, generator=gen, device=dev, dtype=torch.bfloat16)
        base = bench(Rotator([(x1, w) for w in w_sets])(F.linear), args.reps_ms)
        n_p = _copies(packed_bytes)
        p_sets = [(x1, new_packed(), new_E()) for _ in range(n_p)]
        log(f"M=1: bf16 F.linear {base:.1f} us over {n_w} weight copies; packed rotated over {n_p} copies")
        ref = linear_forward_reference(x1, *p_sets[0][1:], K)
        gemv_variants = [("gemv_lut", None), ("dot", None)] + [("gemv_fma", c) for c in GEMV_FMA_CONFIGS]
        for path, cfg in gemv_variants:
            name = path if cfg is None else f"fma{cfg['BN']}/{cfg['BKB']}/w{cfg['warps']}"
            try:
                err = rel_err(kern.forward_triton(*p_sets[0], K, path=path, config=cfg), ref)
                t = bench(Rotator(p_sets)(lambda x, p, e, path=path, cfg=cfg: kern.forward_triton(
                    x, p, e, K, path=path, config=cfg)), args.reps_ms)
                add(shape, "fwd M=1", name, t, base, packed_bytes, err)
            except Exception as exc:  # a variant that fails to build is reported, the others still run
                log(f"{shape} fwd M=1 {name}: FAILED {type(exc).__name__}: {str(exc)[:400]}")
        base2 = bench(Rotator([(x1, w) for w in w_sets])(F.linear), args.reps_ms)
        log(f"M=1: bf16 F.linear again {base2:.1f} us (spread between two timings of the same baseline)")
        del w_sets, p_sets

        # ---- forward, M = 4096 and backward --------------------------------------------------------
        M = args.gemm_m
        set_bytes = 2 * M * K + 2 * N * K + 2 * M * N
        n_b = _copies(set_bytes)
        b_sets = [(torch.randn(M, K, generator=gen, device=dev, dtype=torch.bfloat16),
                   torch.randn(N, K, generator=gen, device=dev, dtype=torch.bfloat16) * 0.01,
                   torch.randn(M, N, generator=gen, device=dev, dtype=torch.bfloat16)) for _ in range(n_b)]
        base_f = bench(Rotator([s[:2] for s in b_sets])(F.linear), args.reps_ms)
        base_b = bench(Rotator(b_sets)(lambda x, w, g: (g @ w, g.t() @ x)), args.reps_ms)
        flop = 2 * M * N * K
        log(f"M={M}: bf16 F.linear {base_f:.1f} us ({flop / base_f / 1e6:.0f} TFLOP/s); "
            f"bf16 dX+dW {base_b:.1f} us; {n_b} copies")
        t_sets = [(s[0], new_packed(), new_E(), s[2]) for s in b_sets]
        del b_sets
        x, p, e, g = t_sets[0]
        ref = linear_forward_reference(x, p, e, K)
        for path, cfg in [("gemm", c) for c in GEMM_CONFIGS] + [("dequant", None)]:
            name = path if cfg is None else f"gemm{cfg['BM']}x{cfg['BN']}x{cfg['BK']}"
            try:
                err = rel_err(kern.forward_triton(x, p, e, K, path=path, config=cfg), ref)
                t = bench(Rotator(t_sets)(lambda x, p, e, g, path=path, cfg=cfg: kern.forward_triton(
                    x, p, e, K, path=path, config=cfg)), args.reps_ms)
                add(shape, f"fwd M={M}", name, t, base_f, packed_bytes, err, f"{flop / t / 1e6:.0f} TFLOP/s")
            except Exception as exc:
                log(f"{shape} fwd {name}: FAILED {type(exc).__name__}: {str(exc)[:400]}")
        del ref
        # backward: check grad_input and votes on a slice, then time with rotated accumulators
        def backward_case() -> None:
            # check grad_input and votes on a 256-row slice (default path for this M: dequant)
            ms = 256
            T_acc = torch.zeros(N, K, dtype=torch.int8, device=dev)
            E_acc = torch.zeros(N, dtype=torch.int8, device=dev)
            gi = kern.backward_triton(g[:ms], x[:ms], p, e, T_acc, E_acc, K, 1, True, path="dequant")
            trits = unpack_trits(p, K).to(torch.float32)
            s = torch.exp2(e.float() / 4)
            gi_ref = (g[:ms].float() * s) @ trits
            dW = g[:ms].float().t() @ x[:ms].float()
            decided = dW.abs() > 1e-3 * (g[:ms].float().abs().t() @ x[:ms].float().abs())
            vote_ok = float((T_acc.float() == torch.sign(dW))[decided].float().mean())
            err = rel_err(gi, gi_ref)
            del trits, dW, decided, T_acc, gi
            acc_sets = [(x_, p_, e_, g_, torch.zeros(N, K, dtype=torch.int8, device=dev),
                         torch.zeros(N, dtype=torch.int8, device=dev)) for (x_, p_, e_, g_) in t_sets]
            # previous default: dX by workspace + matmul, votes by the fused plane kernel
            t = bench(Rotator(acc_sets)(lambda x, p, e, g, ta, ea: kern.backward_triton(
                g, x, p, e, ta, ea, K, 1, True, path="dequant")), args.reps_ms)
            add(shape, f"bwd M={M}", "dequant+plane", t, base_b, packed_bytes, err,
                f"dX+votes (fused plane votes, {kern.VOTES_CONFIG})")
            # default: dW by cuBLAS in bounded chunks, votes in the epilogue kernel
            T_acc = torch.zeros(N, K, dtype=torch.int8, device=dev)
            E_acc = torch.zeros(N, dtype=torch.int8, device=dev)
            kern.backward_triton(g[:ms], x[:ms], p, e, T_acc, E_acc, K, 1, False, path="cublas")
            dW = g[:ms].float().t() @ x[:ms].float()
            decided = dW.abs() > 1e-3 * (g[:ms].float().abs().t() @ x[:ms].float().abs())
            cublas_ok = float((T_acc.float() == torch.sign(dW))[decided].float().mean())
            del dW, decided, T_acc, E_acc
            default_cfg = dict(kern.DW_VOTES_CONFIG)
            default_chunk = kern.DW_CHUNK_ELEMENTS
            for chunk in DW_CHUNKS:
                kern.DW_CHUNK_ELEMENTS = chunk
                for cfg in DW_VOTES_CONFIGS:
                    kern.DW_VOTES_CONFIG.update(cfg)
                    t = bench(Rotator(acc_sets)(lambda x, p, e, g, ta, ea: kern.backward_triton(
                        g, x, p, e, ta, ea, K, 1, True, path="cublas")), args.reps_ms)
                    add(shape, f"bwd M={M}", f"cublas{chunk >> 20}M BR{cfg['BR']}BC{cfg['BC']}w{cfg['warps']}", t,
                        base_b, packed_bytes, err, f"dX+votes, dW chunks of {chunk} elements; "
                        f"vote agreement {cublas_ok:.6f} (prev. path {vote_ok:.6f})")
            kern.DW_CHUNK_ELEMENTS = default_chunk
            kern.DW_VOTES_CONFIG.clear()
            kern.DW_VOTES_CONFIG.update(default_cfg)

        try:
            backward_case()
        except Exception as exc:
            log(f"{shape} bwd: FAILED {type(exc).__name__}: {str(exc)[:400]}")
        del t_sets
        torch.cuda.empty_cache()

    (out_dir / "bench_linear.json").write_text(json.dumps(dict(meta=meta, copy_TBps=copy_tbs, rows=rows), indent=1))
    header = f"{'shape':>12} {'op':>12} {'variant':>16} {'ours us':>9} {'bf16 us':>9} {'speedup':>8} {'TB/s pk':>8} {'rel err':>9}"
    log("")
    log(f"{meta['device']}  {meta['date']}  torch {meta['torch']}  triton {meta['triton']}")
    log(header)
    for r in rows:
        log(f"{r['shape']:>12} {r['op']:>12} {r['variant']:>16} {r['time_us']:>9.1f} {r['baseline_us']:>9.1f} "
            f"{r['speedup']:>7.2f}x {r['packed_TBps']:>8.3f} {r['rel_err']:>9.1e} {r['note']}")
    (out_dir / "bench_linear.log").write_text("\n".join(log_lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
