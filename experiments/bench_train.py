"""Training-step throughput on one GPU: the ternary model, its float twin, and a plain bf16 reference.

    PYTHONPATH=. python3 experiments/bench_train.py [--out DIR] [--presets tiny,small,default_3b]

For each preset at its batch shape (tiny 64×256, small 32×512, default_3b 8×1024 tokens a step)
it times, in the same run:

* ``ternary``: ``TernaryGraphLM`` with bf16 activations, one ``train_step`` (forward, backward
  casting int8 votes, ``TernaryOptimizer.step()``, ``update_graph()``);
* ``ternary+graph``: the same step replayed as a CUDA graph (``train/capture.py``, ``--cuda-graph``);
* ``float``: the same architecture with float weights (AdamW, fused), the float twin;
* ``reference``: what a user would pick instead: a nanoGPT-style dense transformer of the same
  dim / layers / heads whose SwiGLU FFN is as wide as the active experts (top_k × expert_hidden),
  bf16 autocast, fused AdamW, ``torch.compile``.

Each reports the median step time over ``--steps`` steps after ``--warmup`` (CUDA events around
every step, fresh random bytes every step), tokens/s, CUDA kernel launches in one profiled step,
and peak allocated memory. ``--sync-report`` also lists every host synchronisation that two
training steps of the ternary small preset make (``torch.cuda.set_sync_debug_mode``).

Writes ``bench_train.json`` and ``bench_train.log`` under ``--out`` (default $OUT) and prints the
table last.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import gc
import json
import os
import statistics
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ternary_graph.config import get_preset
from ternary_graph.models.model import build_model
from ternary_graph.train.capture import CapturedTrainStep
from ternary_graph.train.loop import TrainConfig, build_optimizer, train_step

SHAPES = {"tiny": (64, 256), "small": (32, 512), "default_3b": (8, 1024)}


class RefBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, hidden: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.n1, self.n2 = nn.RMSNorm(dim), nn.RMSNorm(dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.n_heads, D // self.n_heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, D))
        g, u = self.gate_up(self.n2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


class RefLM(nn.Module):
    """nanoGPT-style dense byte LM (learned positions, pre-norm, SwiGLU)."""

    def __init__(self, dim: int, n_layers: int, n_heads: int, hidden: int, seq_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(RefBlock(dim, n_heads, hidden) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)

    def forward(self, ids, targets):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().reshape(-1, 256), targets.reshape(-1))


def _batch(B: int, T: int, gen: torch.Generator):
    ids = torch.randint(0, 256, (B, T + 1), generator=gen, device="cuda")
    return ids[:, :-1], ids[:, 1:]


def _make_step(kind: str, preset: str, B: int, T: int):
    cfg = get_preset(preset).replace(max_seq_len=max(T, get_preset(preset).max_seq_len))
    if kind == "reference":
        model = RefLM(cfg.dim, cfg.n_layers, cfg.n_heads, cfg.top_k * cfg.expert_hidden, T).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        compiled = torch.compile(model)

        def step(x, y):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = compiled(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return model, step
    weights = "ternary" if kind == "ternary+graph" else kind
    model = build_model(cfg, weights=weights, device="cuda", seed=0, compute_dtype=torch.bfloat16)
    opt = build_optimizer(model, TrainConfig(preset=preset, weights=weights, device="cuda"))
    model.train()
    if kind == "ternary+graph":
        captured = CapturedTrainStep(model, opt, train_step)

        def step(x, y):
            return captured(x, y)[0].lm_loss
        return model, step

    def step(x, y):
        out, _, _ = train_step(model, opt, x, y)
        return out.lm_loss
    return model, step


def _profile_step(step, x, y) -> tuple[int, list[str]]:
    """Kernel launches of one step, and its ten most expensive CUDA kernels."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(x, y)
        torch.cuda.synchronize()
    names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in names)
    gpu = sorted((e for e in events if getattr(e, "device_time_total", 0) > 0 and e.key not in names),
                 key=lambda e: -e.self_device_time_total)[:10]
    top = [f"{e.self_device_time_total / 1e3:8.2f} ms {e.count:5d}x  {e.key[:90]}" for e in gpu]
    return launches, top


def measure(kind: str, preset: str, steps: int, warmup: int, log) -> dict:
    B, T = SHAPES[preset]
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, step = _make_step(kind, preset, B, T)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for _ in range(warmup):
        step(*_batch(B, T, gen))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    loss = None
    for _ in range(steps):
        x, y = _batch(B, T, gen)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step(x, y)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    peak = torch.cuda.max_memory_allocated()
    launches, top = _profile_step(step, *_batch(B, T, gen))
    ms = statistics.median(times)
    row = dict(preset=preset, kind=kind, batch=B, seq=T, median_ms=ms, min_ms=min(times), max_ms=max(times),
               tokens_per_s=B * T / ms * 1e3, launches=launches, peak_gb=peak / 1e9, state_gb=state_bytes / 1e9,
               final_loss=float(loss))
    log(json.dumps(row))
    log(f"  top CUDA time of one {preset}/{kind} step:")
    for line in top:
        log("    " + line)
    del model, step
    gc.collect()
    torch.cuda.empty_cache()
    return row


def sync_report(log) -> list[str]:
    """Where two ternary training steps of the small preset synchronise the host."""
    B, T = SHAPES["small"]
    gen = torch.Generator(device="cuda").manual_seed(1)
    model, step = _make_step("ternary", "small", B, T)
    step(*_batch(B, T, gen))
    torch.cuda.synchronize()
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "ternary_graph" in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-3:])) or f"{filename}:{lineno}"
        sites[where] += 1

    old = warnings.showwarning
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            for _ in range(2):
                step(*_batch(B, T, gen))
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = old
    lines = [f"{n:5d}  {where}" for where, n in sites.most_common()]
    log(f"host syncs in 2 ternary small steps: {sum(sites.values())}")
    for line in lines:
        log("  " + line)
    del model, step
    gc.collect()
    torch.cuda.empty_cache()
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench_train"))
    ap.add_argument("--presets", default="tiny,small,default_3b")
    ap.add_argument("--kinds", default="ternary,ternary+graph,float,reference")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sync-report", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_train: error: needs a CUDA device", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    meta = dict(device=torch.cuda.get_device_name(), date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, steps=args.steps, warmup=args.warmup)
    log(json.dumps(meta))
    rows = []
    for preset in args.presets.split(","):
        for kind in args.kinds.split(","):
            try:
                rows.append(measure(kind, preset, args.steps, args.warmup, log))
            except Exception as exc:  # one failing configuration must not hide the others' numbers
                log(f"{preset}/{kind}: FAILED {type(exc).__name__}: {str(exc)[:600]}")
                log(traceback.format_exc()[-3000:])
                gc.collect()
                torch.cuda.empty_cache()
    syncs = sync_report(log) if args.sync_report else []
    (out / "bench_train.json").write_text(json.dumps(dict(meta=meta, rows=rows, syncs=syncs), indent=1))
    log("")
    log(f"{meta['device']}  {meta['date']}  torch {meta['torch']}  median of {args.steps} steps after {args.warmup}")
    log(f"{'preset':>10} {'model':>10} {'tokens':>10} {'ms/step':>9} {'tokens/s':>11} {'launches':>9} {'peak GB':>8}")
    for r in rows:
        log(f"{r['preset']:>10} {r['kind']:>10} {r['batch']}x{r['seq']:<7} {r['median_ms']:9.2f} "
            f"{r['tokens_per_s']:11,.0f} {r['launches']:9d} {r['peak_gb']:8.2f}")
    (out / "bench_train.log").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
