"""Where a batch-1 decode step's GPU time goes: the CUDA kernels of a few eager steps, by self device
time, from torch.profiler, and their sums by what they do (weight products, VQ search, routing's
top-k and sorts, attention). bench_decode says how long a step takes and how much of it is weight
products; this says what the rest is.

    PYTHONPATH=. python3 experiments/decode_kernels.py default_3b ternary --out /tmp/dk
    PYTHONPATH=. python3 experiments/decode_kernels.py small float --compile --top 20
    PYTHONPATH=. python3 experiments/decode_kernels.py --from /tmp/dk/decode_kernels_default_3b_ternary.json

``--from`` prints a table written by ``--out`` again, without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from ternary_graph.config import PRESETS, get_preset
from ternary_graph.models.decode_graph import StepDecoder
from ternary_graph.models.model import build_model


# kernel-name pieces of each group; a kernel belongs to the first group one of whose pieces its
# name contains. Inductor names its fused kernels after the ops they hold ("..._decode_gemv_mul..."),
# so the decode GEMVs are matched by their Triton kernel names, which start with "_gemv".
KERNEL_GROUPS = {
    "weight products": ("cutlass", "nvjet", "prepare_grouped_gemm", "gemm"),
    "VQ search": ("_tile_min_kernel", "_tile_min_fma_kernel", "_refine_kernel"),
    "top-k / sorts": ("gatherTopK", "bitonicSort", "radixSort"),
    "attention": ("sdpa", "flash"),
}


def kernel_group(name: str) -> str | None:
    """The KERNEL_GROUPS entry of a CUDA kernel's name, or None for the rest."""
    if name.startswith("_gemv"):
        return "weight products"
    return next((group for group, pieces in KERNEL_GROUPS.items() if any(p in name for p in pieces)), None)


def group_ms(kernels: list[dict]) -> dict[str, float]:
    """ms per step of each group (and "other"), from kernel_table's ``kernels``."""
    sums = dict.fromkeys([*KERNEL_GROUPS, "other"], 0.0)
    for k in kernels:
        sums[kernel_group(k["name"]) or "other"] += k["ms_per_step"]
    return sums


def kernel_table(preset: str, weights: str, steps: int, backend: str | None, prompt_bytes: int) -> dict:
    """The CUDA kernels of ``steps`` decode steps after a prefill of ``prompt_bytes`` random bytes:
    ``kernels`` (name, ms and launches per step, slowest first), ``total_ms_per_step``, and what
    was profiled (preset, weights, backend, device)."""
    device = torch.device("cuda")
    model = build_model(get_preset(preset), weights=weights, device=device, seed=0, compute_dtype=torch.bfloat16)
    if weights == "float":
        model = model.to(torch.bfloat16)
    else:
        model.prepare_inference()
    model.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (1, prompt_bytes), generator=gen).to(device)
    decoder = StepDecoder(model, 1, backend)
    with torch.no_grad():
        token = decoder.prefill(ids).argmax(-1)
        for _ in range(3):  # compiles every kernel (and the step, under a backend)
            token = decoder.step(token).argmax(-1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                token = decoder.step(token).argmax(-1)
            torch.cuda.synchronize()
    rows = [(e.key, e.self_device_time_total / 1e3 / steps, e.count / steps)
            for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    rows.sort(key=lambda row: -row[1])
    return {"preset": preset, "weights": weights, "backend": backend, "device": torch.cuda.get_device_name(),
            "total_ms_per_step": sum(row[1] for row in rows),
            "kernels": [{"name": n, "ms_per_step": ms, "launches_per_step": c} for n, ms, c in rows]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", nargs="?", choices=sorted(PRESETS))
    ap.add_argument("weights", nargs="?", choices=("ternary", "float"))
    ap.add_argument("--from", dest="from_json", type=Path, default=None,
                    help="print a table written by --out instead of profiling")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompt-bytes", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="profile the step compiled with inductor")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path, default=None, help="folder for the full table as JSON")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if args.from_json is not None:
        if not args.from_json.is_file():
            ap.error(f"--from {args.from_json}: no such file")
        table = json.loads(args.from_json.read_text())
    else:
        if args.preset is None or args.weights is None:
            ap.error("give a preset and the weights (ternary or float), or --from a saved table")
        if not torch.cuda.is_available():
            print("decode_kernels.py profiles CUDA kernels and needs a GPU", file=sys.stderr)
            return 2
        table = kernel_table(args.preset, args.weights, args.steps, "inductor" if args.compile else None,
                             args.prompt_bytes)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            name = f"decode_kernels_{args.preset}_{args.weights}{'_compiled' if args.compile else ''}.json"
            (args.out / name).write_text(json.dumps(table, indent=1))
    total = table["total_ms_per_step"]
    launches = sum(k["launches_per_step"] for k in table["kernels"])
    print(f"{table['preset']} {table['weights']}{' compiled' if table['backend'] else ''} on {table['device']}: "
          f"{total:.3f} ms of kernels per step, {launches:.0f} launches")
    print("  ".join(f"{group} {ms:.3f}" for group, ms in group_ms(table["kernels"]).items()))
    for row in table["kernels"][:args.top]:
        print(f"{row['ms_per_step']:8.3f} ms {100 * row['ms_per_step'] / total:5.1f}% "
              f"{row['launches_per_step']:6.1f}x  {row['name'][:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
