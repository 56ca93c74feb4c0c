"""Nearest-code search and sparse table steps at 10M × 64 codes (the numbers of docs/results.md).

Measures, in one run on one GPU:

1. correctness of the fused kernel against the exact chunked reference on a subset of queries;
1b. a decode step's search (``--decode-batches``, 1, 2 and 16 queries): the default tile for that
   batch, four other small tiles, five tiles of the one-query phase 1 (``phase1="fma"``) and the
   training tile against torch's bf16 addmm, same run, in interleaved rounds (``--decode-rounds``);
2. a small sweep of kernel configurations at 8,192 queries (both query precisions);
3. exact assignment throughput (queries/s) of the best configuration for 1,024, 8,192 and
   65,536 queries, against torch chunked ``addmm`` + max/argmax over a bf16 copy of the same
   (scaled) codes, timed in the same run; peak GPU memory of each;
4. device memory of a 10M × 64 TernaryVQCodebook (bytes per trit);
5. forward + backward + update of a TernaryEmbeddingTable for an 8,192-id batch at 1M and 10M
   rows, and one TernaryVQCodebook training step (search + votes + update) at 10M codes.

Timings are ``triton.testing.do_bench`` medians (do_bench flushes L2 between runs; the codes,
130 MB packed, are larger than L2 anyway). Fresh random data. A short table is printed last;
everything goes to ``--out`` as JSON.

    PYTHONPATH=. python3 experiments/bench_vq.py --out /tmp/vq
    PYTHONPATH=. python3 experiments/bench_vq.py --skip sweep table step   # correctness + decode batches

``--smoke`` runs the same code paths at toy sizes on CPU under ``TRITON_INTERPRET=1`` (timings
meaningless) to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
import traceback

import torch

from ternary_graph.kernels.vq_search import default_search_tile, nearest_codes_reference, nearest_codes_triton
from ternary_graph.nn import TernaryEmbeddingTable, TernaryVQCodebook
from ternary_graph.ternary import TernaryOptimizer, UpdateRule, unpack_trits
from ternary_graph.ternary.state import exponent_to_scale

# (block_q, block_c, num_warps, num_stages, magic_decode)
SWEEP = [
    (256, 64, 8, 2, True),
    (256, 64, 8, 3, True),
    (256, 32, 8, 2, True),
    (512, 64, 16, 2, True),
    (128, 64, 4, 2, True),
]
SWEEP_X2 = [(256, 64, 8, 2, True), (512, 64, 16, 2, True)]
# (block_q, block_c, num_warps) timed beside the default at decode batches; their registers at
# sm_90: `PYTHONPATH=. python3 experiments/gemv_registers.py` (102, 128, 168, 104 with Triton 3.9)
DECODE_TILES = [(16, 64, 4), (16, 128, 4), (32, 128, 4), (16, 128, 8)]
# (block_c, num_warps, waves) of the one-query phase 1 (phase1="fma") at decode batches: 128 codes
# x 4 warps and 64 x 2 take 64 registers (8 and 16 programs an SM, so more waves fit), 256 x 4
# takes 128 and 256 x 8 takes 64 (4 programs each; gemv_registers.py, Triton 3.9)
DECODE_FMA_TILES = [(128, 4, 4), (128, 4, 8), (64, 2, 16), (256, 4, 4), (256, 8, 4)]


def log(*args) -> None:
    print(*args, flush=True)


class Timer:
    """do_bench median on CUDA; a 3-run wall-clock median in --smoke mode."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def __call__(self, fn, *, warmup: int = 25, rep: int = 100) -> float:
        """Median seconds per call."""
        if self.cuda:
            from triton.testing import do_bench
            return do_bench(fn, warmup=warmup, rep=rep, return_mode="median") / 1e3
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(fn, device: torch.device) -> int:
    """Bytes allocated at the peak of one call, above what was allocated before it."""
    if device.type != "cuda":
        return 0
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def torch_chunked_search(zb: torch.Tensor, codes_bf16: torch.Tensor, neg_sq_norm: torch.Tensor,
                         max_scores: int = 1 << 28) -> torch.Tensor:
    """Baseline: argmax_c (2 z·q_c - ||q_c||²) with bf16 addmm per chunk of codes + max."""
    n_q, n_codes = zb.shape[0], codes_bf16.shape[0]
    chunk = max(1024, max_scores // max(1, n_q))
    best = torch.full((n_q,), -math.inf, dtype=torch.bfloat16, device=zb.device)
    ids = torch.zeros(n_q, dtype=torch.int64, device=zb.device)
    for c0 in range(0, n_codes, chunk):
        c1 = min(n_codes, c0 + chunk)
        scores = torch.addmm(neg_sq_norm[None, c0:c1], zb, codes_bf16[c0:c1].T, alpha=2.0)
        v, i = scores.max(dim=1)
        better = v > best
        best = torch.where(better, v, best)
        ids = torch.where(better, i + c0, ids)
    return ids


def bf16_scaled_codes(packed: torch.Tensor, E: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch baseline's operands: the *scaled* codes in bf16 (2 B/trit, never kept by the
    library) and their negated squared norms, built 2^20 codes at a time."""
    n_codes = packed.shape[0]
    codes_bf16 = torch.empty(n_codes, dim, dtype=torch.bfloat16, device=packed.device)
    neg_sq = torch.empty(n_codes, dtype=torch.bfloat16, device=packed.device)
    for c0 in range(0, n_codes, 1 << 20):
        c1 = min(n_codes, c0 + (1 << 20))
        q = unpack_trits(packed[c0:c1], dim).float() * exponent_to_scale(E[c0:c1])[:, None]
        codes_bf16[c0:c1] = q.to(torch.bfloat16)
        neg_sq[c0:c1] = (-(q * q).sum(1)).to(torch.bfloat16)
    return codes_bf16, neg_sq


def bench_search(args, device, timer, results) -> None:
    n_codes, dim = args.codes, args.dim
    gen = torch.Generator(device=device).manual_seed(0)
    t0 = time.time()
    vq = TernaryVQCodebook(n_codes, dim, device=device, generator=gen, reseed_window=0)
    w = vq.codes.weight
    w.E.copy_(torch.randint(-4, 5, (n_codes,), generator=gen, device=device, dtype=torch.int8))
    sync(device)
    buffers = {n: b.numel() * b.element_size() for n, b in vq.named_buffers()}
    trits = n_codes * dim
    mem = {
        "construct_s": time.time() - t0,
        "buffers_bytes": buffers,
        "packed_B_per_trit": buffers["codes.weight.packed"] / trits,
        "accumulators_B_per_trit": (buffers["codes.weight.T_accum"] + buffers["codes.weight.E_accum"]) / trits,
        "other_B_per_trit": (sum(buffers.values()) - buffers["codes.weight.packed"] - buffers["codes.weight.T_accum"]
                             - buffers["codes.weight.E_accum"]) / trits,
        "total_B_per_trit": sum(buffers.values()) / trits,
        "cuda_allocated_after_construct": torch.cuda.memory_allocated(device) if device.type == "cuda" else 0,
    }
    results["codebook_memory"] = mem
    log("codebook memory", json.dumps(mem))

    packed, E = w.packed, w.E
    # correctness at full size on a subset, against the exact fp32 chunked reference
    zc = torch.randn(args.check_queries, dim, generator=gen, device=device)
    check = {}
    for precision in ("bf16", "bf16x2"):
        ids, dist = nearest_codes_triton(zc, packed, E, dim, precision=precision)
        rids, rdist = nearest_codes_reference(zc, packed, E, dim, precision=precision)
        mism = int((ids != rids).sum())
        check[precision] = {"queries": args.check_queries, "id_mismatches": mism,
                            "max_dist_abs_err": float((dist - rdist).abs().max()),
                            "max_dist_gap_on_mismatch": float((dist - rdist)[ids != rids].abs().max()) if mism else 0.0}
    results["correctness_full_size"] = check
    log("correctness", json.dumps(check))

    codes_bf16, neg_sq = bf16_scaled_codes(packed, E, dim)  # the torch baseline of both sections below
    bench_decode_batches(args, device, timer, results, packed, E, codes_bf16, neg_sq)
    if "sweep" in args.skip:
        return vq

    # sweep at the middle batch
    q_sweep = args.sizes[1] if len(args.sizes) > 1 else args.sizes[0]
    zs = torch.randn(q_sweep, dim, generator=gen, device=device)
    sweep = []
    best_cfg = {}
    for precision, configs in (("bf16", SWEEP), ("bf16x2", SWEEP_X2)):
        for cfg in configs[: args.max_configs]:
            bq, bc, nw, ns, magic = cfg
            entry = {"precision": precision, "block_q": bq, "block_c": bc, "num_warps": nw, "num_stages": ns,
                     "magic_decode": magic, "queries": q_sweep}
            try:
                fn = lambda: nearest_codes_triton(zs, packed, E, dim, precision=precision, block_q=bq, block_c=bc,  # noqa: E731
                                                  num_warps=nw, num_stages=ns, magic_decode=magic)
                fn()
                sec = timer(fn, warmup=10, rep=60)
                entry.update(seconds=sec, qps=q_sweep / sec)
                if precision not in best_cfg or entry["qps"] > best_cfg[precision]["qps"]:
                    best_cfg[precision] = entry
            except Exception as exc:  # a config that fails to compile is reported, not fatal
                entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
                traceback.print_exc()
            sweep.append(entry)
            log("sweep", json.dumps(entry))
    results["sweep"] = sweep
    results["best_config"] = best_cfg

    # throughput at each size: best fused config per precision vs torch chunked bf16 addmm
    rows = []
    for n_q in args.sizes:
        z = torch.randn(n_q, dim, generator=gen, device=device)
        zb = z.to(torch.bfloat16)
        row = {"queries": n_q}
        base_fn = lambda: torch_chunked_search(zb, codes_bf16, neg_sq)  # noqa: E731
        base_ids = base_fn()
        row["torch_s"] = timer(base_fn, warmup=5, rep=30)
        row["torch_qps"] = n_q / row["torch_s"]
        row["torch_peak_bytes"] = peak_memory(base_fn, device)
        for precision, cfg in best_cfg.items():
            fn = lambda: nearest_codes_triton(z, packed, E, dim, precision=precision, block_q=cfg["block_q"],  # noqa: E731
                                              block_c=cfg["block_c"], num_warps=cfg["num_warps"],
                                              num_stages=cfg["num_stages"], magic_decode=cfg["magic_decode"])
            ids, _ = fn()
            sec = timer(fn, warmup=5, rep=60)
            row[f"{precision}_s"] = sec
            row[f"{precision}_qps"] = n_q / sec
            row[f"{precision}_speedup"] = row["torch_s"] / sec
            row[f"{precision}_peak_bytes"] = peak_memory(fn, device)
            row[f"{precision}_agree_with_torch_bf16"] = float((ids == base_ids).float().mean())
        rows.append(row)
        log("size", json.dumps(row))
    results["throughput"] = rows
    del codes_bf16, neg_sq

    return vq


def bench_decode_batches(args, device, timer, results, packed, E, codes_bf16, neg_sq) -> None:
    """A decode step's search (1 to 16 queries): the default tile for that batch against the other
    DECODE_TILES, the fma phase 1's DECODE_FMA_TILES, the training tile (512 queries x 64 codes,
    16 warps) and torch's bf16 addmm over a bf16 copy of the scaled codes, timed in the same run;
    ids checked against the exact reference."""
    if not args.decode_batches:
        return
    dim = args.dim
    gen = torch.Generator(device=device).manual_seed(3)
    rows = []
    for n_q in args.decode_batches:
        z = torch.randn(n_q, dim, generator=gen, device=device)
        zb = z.to(torch.bfloat16)
        rids, _ = nearest_codes_reference(z, packed, E, dim, precision="bf16x2")
        bq, bc, nw = default_search_tile(n_q)
        row = {"queries": n_q, "tile": f"{bq}x{bc}w{nw}"}
        tiles = [("default", {}), ("training_tile", {"block_q": 512, "block_c": 64, "num_warps": 16})]
        tiles += [(f"tile_{q}x{c}w{w}", {"block_q": q, "block_c": c, "num_warps": w}) for q, c, w in DECODE_TILES
                  if (q, c, w) != (bq, bc, nw)]
        tiles += [(f"fma_{c}w{w}v{v}", {"phase1": "fma", "block_c": c, "num_warps": w, "waves": v})
                  for c, w, v in DECODE_FMA_TILES]
        fns = {name: (lambda kw=kw: nearest_codes_triton(z, packed, E, dim, precision="bf16x2", **kw))
               for name, kw in tiles}
        for name, fn in fns.items():
            row[f"{name}_id_mismatches"] = int((fn()[0] != rids).sum())
        fns["torch"] = lambda: torch_chunked_search(zb, codes_bf16, neg_sq)
        # rounds over all of them, so that a drift of the GPU's clocks during the run reaches
        # every tile alike; each tile's figure is the median of its rounds' medians
        rounds = {name: [] for name in fns}
        for _ in range(args.decode_rounds):
            for name, fn in fns.items():
                rounds[name].append(timer(fn, warmup=10, rep=100))
        for name, times in rounds.items():
            row[f"{name}_s"] = statistics.median(times)
            row[f"{name}_round_seconds"] = times
        rows.append(row)
        log("decode batch", json.dumps(row))
    results["decode_batches"] = rows


def bench_table(args, device, timer, results) -> None:
    out = []
    for n_rows in args.table_rows:
        gen = torch.Generator(device=device).manual_seed(1)
        table = TernaryEmbeddingTable(n_rows, args.dim, device=device, generator=gen)
        opt = TernaryOptimizer(table, UpdateRule(threshold=4, scale_threshold=4))
        ids = [torch.randint(0, n_rows, (args.step_batch,), generator=gen, device=device) for _ in range(8)]
        grads = [torch.randn(args.step_batch, args.dim, generator=gen, device=device) for _ in range(8)]
        k = [0]

        def fwd_bwd():
            i = k[0] % 8
            k[0] += 1
            table(ids[i]).backward(grads[i])

        def fwd_bwd_update():
            fwd_bwd()
            opt.step()

        fwd_bwd_update()
        entry = {"rows": n_rows, "batch": args.step_batch,
                 "fwd_bwd_s": None, "fwd_bwd_update_s": timer(fwd_bwd_update, warmup=5, rep=50)}
        entry["fwd_bwd_s"] = timer(fwd_bwd, warmup=5, rep=50)
        opt.step()  # drain the touched rows recorded by the fwd_bwd-only runs
        out.append(entry)
        log("table", json.dumps(entry))
        del table, opt
    results["table_step"] = out


def bench_vq_step(args, device, timer, results, vq) -> None:
    # one codebook training step at full size: search + gather + votes + sparse update
    gen = torch.Generator(device=device).manual_seed(2)
    opt = TernaryOptimizer(vq, UpdateRule(threshold=4, scale_threshold=4))
    zt = [torch.randn(args.step_batch, args.dim, generator=gen, device=device) for _ in range(4)]
    k = [0]

    def vq_step():
        out = vq(zt[k[0] % 4])
        k[0] += 1
        out.commitment_loss.backward()
        opt.step()

    vq_step()
    results["vq_train_step"] = {"codes": args.codes, "batch": args.step_batch, "precision": vq.precision,
                                "seconds": timer(vq_step, warmup=5, rep=50)}
    log("vq step", json.dumps(results["vq_train_step"]))


def summary(results) -> str:
    lines = [f"device: {results['device']}  torch {results['torch']}  triton {results['triton']}  date {results['date']}"]
    mem = results.get("codebook_memory")
    if mem:
        lines.append(f"codebook {results['args']['codes']:,}x{results['args']['dim']}: packed {mem['packed_B_per_trit']:.3f} B/trit, "
                     f"accumulators {mem['accumulators_B_per_trit']:.3f} B/trit, E+usage+flags {mem['other_B_per_trit']:.3f} B/trit, "
                     f"total {mem['total_B_per_trit']:.3f} B/trit")
    for prec, chk in results.get("correctness_full_size", {}).items():
        lines.append(f"correctness {prec}: {chk['id_mismatches']} id mismatches / {chk['queries']} vs exact reference")
    for prec, cfg in results.get("best_config", {}).items():
        lines.append(f"best {prec} config: BQ={cfg['block_q']} BC={cfg['block_c']} warps={cfg['num_warps']} "
                     f"stages={cfg['num_stages']} magic={cfg['magic_decode']}")
    rows = results.get("throughput", [])
    if rows:
        lines.append("| queries | torch bf16 addmm q/s | fused bf16 q/s (x torch) | fused bf16x2 q/s (x torch) | peak MB torch / bf16 / bf16x2 |")
        lines.append("|---|---|---|---|---|")
        for r in rows:
            def cell(p):
                return f"{r[p + '_qps']:,.0f} ({r[p + '_speedup']:.2f}x)" if p + "_qps" in r else "-"

            def mb(key):
                return f"{r[key] / 2**20:.0f}" if key in r else "-"
            lines.append(f"| {r['queries']:,} | {r['torch_qps']:,.0f} | {cell('bf16')} | {cell('bf16x2')} | "
                         f"{mb('torch_peak_bytes')} / {mb('bf16_peak_bytes')} / {mb('bf16x2_peak_bytes')} |")
    dec = results.get("decode_batches", [])
    if dec:
        lines.append("| decode queries | default tile | default µs | fastest other small tile µs | fastest fma phase 1 µs "
                     "| training tile (512x64w16) µs | torch bf16 addmm µs | id mismatches, all tiles |")
        lines.append("|---|---|---|---|---|---|---|---|")

        def fastest(r, prefix):
            timed = {k[len(prefix):-2]: v for k, v in r.items() if k.startswith(prefix) and k.endswith("_s")}
            best = min(timed, key=timed.get) if timed else None
            return f"{best} {timed[best] * 1e6:.1f}" if best else "-"
        for r in dec:
            mismatches = sum(v for k, v in r.items() if k.endswith("_id_mismatches"))
            lines.append(f"| {r['queries']} | {r['tile']} | {r['default_s'] * 1e6:.1f} | {fastest(r, 'tile_')} | "
                         f"{fastest(r, 'fma_')} | {r['training_tile_s'] * 1e6:.1f} | {r['torch_s'] * 1e6:.1f} | {mismatches} |")
    step = results.get("vq_train_step")
    if step:
        lines.append(f"VQ train step ({step['codes']:,} codes, batch {step['batch']}, {step['precision']}): {step['seconds'] * 1e3:.2f} ms")
    for t in results.get("table_step", []):
        lines.append(f"table {t['rows']:,}x64, batch {t['batch']}: fwd+bwd {t['fwd_bwd_s'] * 1e3:.3f} ms, "
                     f"fwd+bwd+update {t['fwd_bwd_update_s'] * 1e3:.3f} ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codes", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192, 65536])
    p.add_argument("--table-rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--step-batch", type=int, default=8192)
    p.add_argument("--check-queries", type=int, default=256)
    p.add_argument("--max-configs", type=int, default=len(SWEEP))
    p.add_argument("--decode-batches", type=int, nargs="*", default=[1, 2, 16],
                   help="query counts of the decode-step section (none: skip it)")
    p.add_argument("--decode-rounds", type=int, default=5,
                   help="interleaved timing rounds of the decode-batch tiles (median of the rounds)")
    p.add_argument("--skip", nargs="*", default=[], choices=["search", "sweep", "table", "step"],
                   help="sections to skip: search (all of it), sweep (the tile sweep and the throughput "
                        "sizes; the decode batches stay), table, step (the codebook training step)")
    p.add_argument("--out", type=pathlib.Path, default=None)
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    bad = [n for n in args.decode_batches if n < 1]
    if bad:
        p.error(f"--decode-batches takes query counts >= 1, got {bad[0]}")
    if args.decode_rounds < 1:
        p.error(f"--decode-rounds must be >= 1, got {args.decode_rounds}")
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
        args.codes, args.sizes, args.table_rows = 3000, [16, 32, 48], [500, 5000]
        args.step_batch, args.check_queries, args.max_configs = 64, 16, 2
        args.decode_batches = [n for n in args.decode_batches if n <= 2]
        args.decode_rounds = min(args.decode_rounds, 2)
        DECODE_TILES[:] = DECODE_TILES[:1]
        DECODE_FMA_TILES[:] = DECODE_FMA_TILES[:1]
        SWEEP[:] = [(16, 32, 4, 2, True), (32, 64, 4, 2, False)]
        SWEEP_X2[:] = [(16, 32, 4, 2, True)]
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_vq.py measures a GPU; use --smoke to exercise it on CPU")
        device = torch.device("cuda")
    import triton
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "args": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
    }
    timer = Timer(device.type == "cuda")
    try:
        vq = bench_search(args, device, timer, results) if "search" not in args.skip else None
        if "table" not in args.skip:
            bench_table(args, device, timer, results)
        if vq is not None and "step" not in args.skip:
            bench_vq_step(args, device, timer, results, vq)
    finally:
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "bench_vq.json").write_text(json.dumps(results, indent=2))
            (args.out / "bench_vq_summary.md").write_text(summary(results) + "\n")
    log("\n" + summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
