"""Census of the tensor operations in one batch-1 decode step, by the library function that issues them.

On a GPU nearly every one of these is a kernel launch, and a small model's decode step is a few
µs of weight reads among ~1,500 launches (docs/kernels.md): this says which code the launches
come from, on CPU, without a GPU. Operations that launch no kernel (views such as reshape, slice
or transpose; allocations) are left out. On CPU the ternary weights, the VQ search and the embedding run their plain-torch
references; on CUDA each of those is one Triton launch, so they are counted apart.

    PYTHONPATH=. python3 experiments/decode_ops.py small float
    PYTHONPATH=. python3 experiments/decode_ops.py tiny ternary --top 20
"""

from __future__ import annotations

import argparse
import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ternary_graph.config import PRESETS, ModelConfig, get_preset
from ternary_graph.models.decode_graph import StepDecoder
from ternary_graph.models.model import build_model

NO_KERNEL_OPS = frozenset({  # views, allocations and host reads of a scalar
    "view", "_unsafe_view", "as_strided", "slice", "select", "t", "transpose", "expand", "unsqueeze", "squeeze",
    "permute", "alias", "detach", "empty", "empty_strided", "lift_fresh", "_local_scalar_dense", "unbind", "split",
    "split_with_sizes", "narrow", "chunk", "reshape", "_reshape_alias", "new_empty", "empty_like"})
# files whose CPU code is a reference of what one Triton kernel does on CUDA
REFERENCE_FILES = ("kernels/", "ternary/packing.py")
PACKAGE = "ternary_graph/"


class OpCensus(TorchDispatchMode):
    """Counts every op dispatched inside it (NO_KERNEL_OPS aside) by the innermost library frame
    that issued it."""

    def __init__(self) -> None:
        super().__init__()
        self.by_site: collections.Counter[str] = collections.Counter()
        self.by_op: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in NO_KERNEL_OPS:
            frames = [f for f in traceback.extract_stack() if PACKAGE in f.filename]
            site = f"{frames[-1].filename.split(PACKAGE)[-1]}:{frames[-1].name}" if frames else "(outside the library)"
            self.by_site[site] += 1
            self.by_op[name] += 1
        return func(*args, **(kwargs or {}))


def decode_step_census(cfg: ModelConfig, weights: str, prompt_len: int = 16) -> OpCensus:
    """The census of the second decode step after a ``prompt_len``-byte prefill (bf16 activations, as
    bench_decode's models; the float twin with bf16 weights)."""
    model = build_model(cfg, weights=weights, device="cpu", seed=0,
                        compute_dtype=torch.bfloat16).eval()
    if weights == "float":
        model = model.to(torch.bfloat16)
    decoder = StepDecoder(model, 1)
    census = OpCensus()
    with torch.no_grad():
        decoder.prefill(torch.randint(0, 256, (1, prompt_len), generator=torch.Generator().manual_seed(0)))
        decoder.step(torch.tensor([65]))
        with census:
            decoder.step(torch.tensor([66]))
    return census


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("weights", choices=("ternary", "float"))
    ap.add_argument("--top", type=int, default=30, help="sites and ops listed")
    args = ap.parse_args()
    if args.top < 1:
        ap.error(f"--top must be >= 1, got {args.top}")
    census = decode_step_census(get_preset(args.preset), args.weights)
    reference = sum(n for site, n in census.by_site.items() if site.startswith(REFERENCE_FILES))
    total = sum(census.by_site.values())
    print(f"{args.preset} {args.weights}: {total} ops in one decode step; {reference} of them in CPU "
          f"references of Triton kernels ({', '.join(REFERENCE_FILES)}), {total - reference} elsewhere")
    by_file = collections.Counter()
    for site, n in census.by_site.items():
        by_file[site.split(":")[0]] += n
    print("by file: " + ", ".join(f"{f} {n}" for f, n in by_file.most_common()))
    print(f"{'ops':>6}  issued by")
    for site, n in census.by_site.most_common(args.top):
        print(f"{n:>6}  {site}" + ("  (reference)" if site.startswith(REFERENCE_FILES) else ""))
    print(f"\n{'ops':>6}  aten op")
    for op, n in census.by_op.most_common(args.top):
        print(f"{n:>6}  {op}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
