"""How far the "i8" decode GEMV's fixed-point activations move a product (CPU, no GPU needed).

The i8 kernel computes exactly ``gemv_x16_reference`` (tests/test_ternary_gemv.py); this compares
that oracle with the float one at one shape on random trits (as bench_decode.py draws them) and
Gaussian bf16 activations, in fp64 (the fixed point's own error) and rounded to bf16 outputs (what
the benchmark's "rel err" column sees, where output roundings that flip dominate).

    PYTHONPATH=. python3 experiments/x16_error.py [--k 8192] [--n 8192] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys

import torch

from ternary_graph.kernels import ternary_gemv as tg


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    packed = torch.randint(0, 243, (args.n, -(-args.k // 5)), generator=gen, dtype=torch.uint8)
    E = torch.randint(-16, -8, (args.n,), generator=gen, dtype=torch.int8)
    L = tg.choose_plane_words(args.k)
    words = tg.pack_2bit(packed, args.k, plane_words=L)
    x = torch.randn(1, args.k, generator=gen).bfloat16()
    for what, xs in (("fp64 outputs", x.double()), ("bf16 outputs", x)):
        err = rel_err(tg.gemv_x16_reference(xs, words, E, args.k, L), tg.gemv_2bit_reference(xs, words, E, args.k, L))
        print(f"{args.k}->{args.n}, {what}: fixed point vs float, relative error (norm) {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
