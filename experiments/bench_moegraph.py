"""Benchmark MoEGraph routing against a plain-torch top-k MoE of the same sizes, in one run.

What is timed (forward, no autograd), per batch of ``--tokens`` tokens, top-2:

* ``route+dispatch+combine``: MoEGraph's candidate building, selection, PyG softmax gates, sort
  by expert and PyG scatter combine, with identity experts, so only the routing machinery is
  measured; against what a user writes today (dense float router ``x @ W``, softmax, ``topk``,
  pairs sorted by expert once, ``index_add_`` combine), also with identity experts.
* ``full layer``: the same two with real experts: MoEGraph with its grouped ternary SwiGLU
  experts, the plain MoE with bf16 SwiGLU experts in one ``torch._grouped_mm`` per projection.
* ``route vs codebook size``: ``MoEGraph.route`` in large mode with the same ``--capacity``
  active edges (filled at random) over codebooks of 100k and 10M codes.

On CUDA, times are ``triton.testing.do_bench`` medians with inputs rotated over buffers that
together exceed 50 MB (larger than L2). On CPU (``--small`` or no GPU) a plain timer takes the
median of a few runs and a warning says these numbers are not the ones to report.

    python experiments/bench_moegraph.py                 # CUDA, full sizes
    python experiments/bench_moegraph.py --small         # CPU smoke test, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ternary_graph.graph.moegraph import MoEGraph
from ternary_graph.graph.routing import dispatch_combine

ROTATE_BYTES = 50 * 2**20


@dataclass
class Row:
    what: str
    experts: int
    codebook: int
    moegraph_ms: float
    baseline_ms: float | None

    @property
    def speedup(self) -> float | None:
        return None if self.baseline_ms is None else self.baseline_ms / self.moegraph_ms


class PlainMoE(nn.Module):
    """The baseline a user would write today: a dense float router, softmax, top-k, pairs sorted
    by expert once, and every expert in one ``torch._grouped_mm`` per projection (a loop over
    experts' slices where ``_grouped_mm`` does not apply: CPU float32). No host sync on CUDA."""

    def __init__(self, dim: int, num_experts: int, hidden: int, top_k: int, *, identity: bool,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.top_k, self.identity = top_k, identity
        self.router = nn.Linear(dim, num_experts, bias=False, device=device, dtype=dtype)
        if not identity:
            self.gate_up = nn.Parameter(torch.randn(num_experts, dim, 2 * hidden, device=device, dtype=dtype) * dim**-0.5)
            self.down = nn.Parameter(torch.randn(num_experts, hidden, dim, device=device, dtype=dtype) * hidden**-0.5)
        self.num_experts, self.hidden = num_experts, hidden

    def _mm(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == torch.bfloat16:
            return torch._grouped_mm(x, w, offs=offsets)
        ends = offsets.tolist()
        return torch.cat([x[a:b] @ w[e] for e, (a, b) in enumerate(zip([0] + ends[:-1], ends))])

    def experts(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return xs
        g, u = self._mm(xs, self.gate_up, offsets).split(self.hidden, dim=-1)
        return self._mm(F.silu(g) * u, self.down, offsets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.router(x).float(), dim=-1)
        gates, chosen = probs.topk(self.top_k, dim=-1)
        gates = (gates / gates.sum(dim=-1, keepdim=True)).to(x.dtype).reshape(-1)
        expert = chosen.reshape(-1)
        order = torch.argsort(expert, stable=True)
        token = order // self.top_k
        offsets = torch.searchsorted(expert[order], torch.arange(self.num_experts, device=x.device),
                                     right=True).to(torch.int32)
        ys = self.experts(x.index_select(0, token), offsets) * gates[order, None]
        return torch.zeros_like(x).index_add_(0, token, ys)


def _timer(device: torch.device, reps: int):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, return_mode="median"))

    def cpu_time(fn) -> float:
        fn()
        runs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(runs)

    return cpu_time


def _rotating(make, bytes_each: int, device: torch.device):
    """A callable returning the next of enough inputs to exceed L2 (one input on CPU)."""
    n = max(1, math.ceil(ROTATE_BYTES / max(1, bytes_each))) if device.type == "cuda" else 1
    items = [make() for _ in range(n)]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % n
        return items[state["i"]]

    return nxt


def _fill_edges(moe: MoEGraph, n_codes: int, gen: torch.Generator) -> torch.Tensor:
    """Give ``n_codes`` random codes ``fanout`` random edges each (random scores); returns the
    codes, from which the benchmark draws its tokens' code ids (so every token finds edges)."""
    codes = torch.randperm(moe.codebook_size, generator=gen)[:n_codes].sort().values
    src = codes.repeat_interleave(moe.fanout)
    dst = torch.rand(n_codes, moe.num_experts, generator=gen).argsort(dim=1)[:, :moe.fanout].reshape(-1)
    score = torch.randint(-127, 128, (src.numel(),), generator=gen, dtype=torch.int8)
    moe.set_edges(src, dst, score)
    return codes


def run(args) -> list[Row]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = _timer(device, args.reps)
    gen = torch.Generator().manual_seed(0)
    rows: list[Row] = []
    T, D, k = args.tokens, args.dim, 2
    x_bytes = T * D * torch.tensor([], dtype=dtype).element_size()

    # Same number of edge-holding codes for every codebook size, so that only the codebook differs.
    n_codes = min(args.capacity // 4, min(args.codebooks))

    def tokens(codes_with_edges: torch.Tensor):
        def make():
            x = torch.randn(T, D, generator=gen).to(device=device, dtype=dtype)
            pick = torch.randint(0, codes_with_edges.numel(), (T,), generator=gen)
            return x, codes_with_edges[pick].to(device)
        return _rotating(make, x_bytes, device)

    for E in args.experts:
        moe = MoEGraph(D, E, args.hidden, codebook_size=args.codebooks[0], top_k=k, fanout=4,
                       capacity=args.capacity, mode="large", device=device, generator=gen).eval()
        def identity(xs, offsets):
            return xs
        nxt = tokens(_fill_edges(moe, n_codes, gen))

        def moegraph_routing():
            x, c = nxt()
            plan = moe.route(x, c)
            return dispatch_combine(x, plan.token, plan.expert, plan.gate, identity, E)

        def moegraph_full():
            x, c = nxt()
            return moe(x, c)

        plain_id = PlainMoE(D, E, args.hidden, k, identity=True, device=device, dtype=dtype)
        plain = PlainMoE(D, E, args.hidden, k, identity=False, device=device, dtype=dtype)
        with torch.no_grad():
            r_moe = timer(moegraph_routing)
            r_plain = timer(lambda: plain_id(nxt()[0]))
            rows.append(Row("route+dispatch+combine", E, args.codebooks[0], r_moe, r_plain))
            f_moe = timer(moegraph_full)
            f_plain = timer(lambda: plain(nxt()[0]))
            rows.append(Row(f"full layer (ternary vs {str(dtype)[6:]} experts)", E, args.codebooks[0], f_moe, f_plain))
        del moe, plain, plain_id

    E = args.experts[0]
    for codebook in args.codebooks:
        moe = MoEGraph(D, E, args.hidden, codebook_size=codebook, top_k=k, fanout=4, capacity=args.capacity,
                       mode="large", device=device, generator=gen).eval()
        nxt = tokens(_fill_edges(moe, n_codes, gen))
        with torch.no_grad():
            rows.append(Row("route only (large mode)", E, codebook, timer(lambda: moe.route(*nxt())), None))
        del moe
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CPU smoke test with small sizes")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --small)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024, help="expert hidden width (full-layer rows)")
    p.add_argument("--experts", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--codebooks", type=int, nargs="+", default=[100_000, 10_000_000])
    p.add_argument("--capacity", type=int, default=1 << 20)
    p.add_argument("--reps", type=int, default=5, help="CPU timing repetitions")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.small:
        args.tokens, args.dim, args.hidden = 512, 64, 64
        args.experts, args.codebooks, args.capacity = [8, 32], [1000, 10_000_000], 4096
        args.device = args.device or "cpu"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    if not args.device.startswith("cuda"):
        warnings.warn("timing on CPU with a plain timer: a smoke test, not numbers to report", stacklevel=1)
    rows = run(args)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"# MoEGraph vs plain-torch top-2 MoE: {args.tokens} tokens, dim {args.dim}, hidden {args.hidden}, "
          f"activations {'bfloat16' if args.device.startswith('cuda') else 'float32'}, "
          f"capacity {args.capacity}, device {device_name}, {datetime.date.today()}")
    print(f"{'what':<40} {'experts':>7} {'codebook':>10} {'moegraph ms':>12} {'plain ms':>10} {'speedup':>8}")
    for r in rows:
        base = f"{r.baseline_ms:10.3f}" if r.baseline_ms is not None else f"{'-':>10}"
        sp = f"{r.speedup:7.2f}x" if r.speedup is not None else f"{'-':>8}"
        print(f"{r.what:<40} {r.experts:>7} {r.codebook:>10} {r.moegraph_ms:12.3f} {base} {sp}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "date": str(datetime.date.today()), "args": vars(args),
                       "rows": [dict(asdict(r), speedup=r.speedup) for r in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
