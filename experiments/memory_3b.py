"""Memory and step time of the default_3b model on one GPU, against bf16 + AdamW.

    PYTHONPATH=. python experiments/memory_3b.py [--batch 4] [--seq 512] [--steps 3] [--json out.json]

Builds ``default_3b`` on the GPU, runs full training steps (forward, backward with votes,
TernaryOptimizer update, graph update) at batch × seq tokens, and reports persistent state
bytes, peak GPU memory (torch.cuda.max_memory_allocated) and the median step time. Beside it:
the bf16 + AdamW arithmetic for the same logical size (16 bytes/parameter: bf16 weight and
gradient, fp32 master weight, two fp32 moments), and a truly allocated float model with AdamW
(fp32 weights: also 16 B/param) at ~1B parameters, measured the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ternary_graph.config import get_preset
from ternary_graph.models.model import build_model
from ternary_graph.ternary.optimizer import TernaryOptimizer, UpdateRule


def state_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def ternary_step_numbers(batch: int, seq: int, steps: int) -> dict:
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_model(get_preset("default_3b"), device="cuda", seed=0)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    logical = sum(s.rows * s.cols for s in TernaryOptimizer(model).states)
    persistent = state_bytes(model)
    after_build = torch.cuda.memory_allocated()
    opt = TernaryOptimizer(model, UpdateRule(threshold=24, decay_shift=4, vote_magnitude=4))
    gen = torch.Generator(device="cuda").manual_seed(0)
    times = []
    for step in range(steps + 1):
        ids = torch.randint(0, 256, (batch, seq + 1), device="cuda", generator=gen)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(ids[:, :-1], ids[:, 1:])
        out.loss.backward()
        opt.step()
        model.update_graph()
        torch.cuda.synchronize()
        if step:  # the first step compiles the Triton kernels
            times.append(time.perf_counter() - t)
    return {"logical_params": logical, "persistent_state_bytes": persistent,
            "persistent_bytes_per_param": persistent / logical, "allocated_after_build": after_build,
            "peak_bytes": torch.cuda.max_memory_allocated(), "step_s_median": statistics.median(times),
            "step_s_all": times, "build_s": build_s, "loss": float(out.lm_loss.detach()), "tokens": batch * seq}


def float_adamw_per_param(width: int = 8192, layers: int = 15) -> dict:
    """A truly allocated fp32 model + AdamW after one step: bytes per parameter."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(8, width, device="cuda")
    model(x).float().pow(2).mean().backward()
    opt.step()
    torch.cuda.synchronize()
    params = sum(p.numel() for p in model.parameters())
    persistent = torch.cuda.memory_allocated() - base
    return {"params": params, "persistent_bytes": persistent, "bytes_per_param": persistent / params,
            "peak_bytes": torch.cuda.max_memory_allocated() - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("memory_3b.py needs a CUDA device")
    tern = ternary_step_numbers(args.batch, args.seq, args.steps)
    flt = float_adamw_per_param()
    bf16_adamw_bytes = 16 * tern["logical_params"]
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "ternary": tern, "float_adamw_measured": flt,
              "bf16_adamw_arithmetic_bytes": bf16_adamw_bytes}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    gb = 1e9
    print(f"\ndefault_3b on {result['device']}, {result['date']}, torch {torch.__version__}, "
          f"{args.batch}x{args.seq} tokens per step")
    print(f"{'':44}{'value':>16}")
    print(f"{'logical ternary parameters':44}{tern['logical_params']:>16,}")
    print(f"{'persistent state (GB)':44}{tern['persistent_state_bytes'] / gb:>16.3f}")
    print(f"{'persistent state (bytes / logical param)':44}{tern['persistent_bytes_per_param']:>16.3f}")
    print(f"{'peak GPU memory in a training step (GB)':44}{tern['peak_bytes'] / gb:>16.3f}")
    print(f"{'step time, median of ' + str(args.steps) + ' (s)':44}{tern['step_s_median']:>16.3f}")
    print(f"{'build time on the GPU (s)':44}{tern['build_s']:>16.1f}")
    print(f"{'bf16 + AdamW state, arithmetic (GB)':44}{bf16_adamw_bytes / gb:>16.1f}")
    print(f"{'fp32 + AdamW measured (bytes / param)':44}{flt['bytes_per_param']:>16.2f}  "
          f"({flt['params'] / 1e9:.2f}B params)")


if __name__ == "__main__":
    main()
