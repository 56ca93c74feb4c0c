"""Registers per thread of the decode GEMV kernels and of the nearest-code search, compiled for Hopper on
a machine without a GPU.

Resident programs per SM, not arithmetic, bound the decode GEMVs (docs/kernels.md: the default
``fma`` tile holds 168 registers on the H200's Triton 3.6, so 3 programs of 4 warps fit an SM).
This compiles each kernel and block config for sm_90 with the installed Triton (its compiler and
ptxas need no GPU) and reads the register count from the cubin with Triton's ``cuobjdump``, so a
tile or a kernel change can be judged before device time is spent on it. Counts depend on the
Triton version: compare configs within one run, and time the candidates on the GPU
(``experiments/bench_decode.py``).

    PYTHONPATH=. python3 experiments/gemv_registers.py
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench_vq import DECODE_FMA_TILES, DECODE_TILES
from ternary_graph.kernels import ternary_gemv as tg
from ternary_graph.kernels import vq_search as vs
from ternary_graph.ternary.state import E_STEP

REGISTERS_PER_SM = 65536
FMA_POINTERS = dict(x_ptr="*bf16", w_ptr="*i32", e_ptr="*i8", off_ptr="*i8", y_ptr="*bf16", ws_ptr="*fp32",
                    cnt_ptr="*i32")
I8_POINTERS = dict(hi_ptr="*i32", lo_ptr="*i32", sx_ptr="*fp32", xs_ptr="*i32", w_ptr="*i32", e_ptr="*i8",
                   y_ptr="*bf16", ws_ptr="*fp32", cnt_ptr="*i32")
I8F_POINTERS = dict(x_ptr="*bf16", xq_ptr="*i32", w_ptr="*i32", e_ptr="*i8", y_ptr="*bf16", ws_ptr="*fp32",
                    cnt_ptr="*i32")
VQ_POINTERS = dict(zh_ptr="*bf16", zl_ptr="*bf16", packed_ptr="*u8", E_ptr="*i8", val_ptr="*fp32", tile_ptr="*i32",
                   ids_ptr="*i64", dist_ptr="*fp32")
# (block_q, block_c, warps) of the nearest-code search: the training tile, then the decode tiles
# that bench_vq.py times at decode batches; (block_c, warps) of its one-query phase 1 there
VQ_TILES = ((512, 64, 16), *DECODE_TILES)
VQ_FMA_TILES = tuple(dict.fromkeys((block_c, warps) for block_c, warps, _ in DECODE_FMA_TILES))
# (BN, BW, warps): the measured default first, then tiles with fewer elements per thread
TILES = ((64, 32, 4), (32, 32, 2), (128, 32, 4), (32, 32, 4), (16, 32, 4), (64, 32, 8))


def registers(kernel, pointers: dict[str, str], constexprs: dict, num_warps: int) -> int:
    """Registers per thread of ``kernel`` compiled for sm_90 (integer arguments as i32)."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        listing = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    found = re.findall(r"REG:(\d+)", listing)
    if not found:
        raise RuntimeError(f"no register count in cuobjdump's listing: {listing[-300:]!r}")
    return int(found[0])


def main() -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's own default; silences its warning
    print(f"triton {triton.__version__}, sm_90, L = 32, split-K on, bf16 activations")
    print(f"{'BN x BW, warps':>16} {'kernel':>10} {'registers':>10} {'programs/SM':>12}")
    for BN, BW, warps in TILES:
        for name, kernel, pointers, consts in (
                *(("fma/pf" if pf else "fma", tg._gemv2_fma_kernel, FMA_POINTERS,
                   dict(L=32, BN=BN, BW=BW, GP=1, HAS_GROUPS=False, SPLIT=True, EVEN=True, PREFETCH=pf, ASM=True))
                  for pf in (False, True)),
                ("i8", tg._gemv2_i8_kernel, I8_POINTERS, dict(L=32, BN=BN, BW=BW, SPLIT=True, EVEN=True, ASM=True)),
                *((f"i8f/early{early}" if early else "i8f", tg._gemv2_i8f_kernel, I8F_POINTERS,
                   dict(L=32, BN=BN, BW=BW, SPLIT=True, EVEN=True, ASM=True, EARLY=early, PREFETCH=False))
                  for early in tg.EARLY_CHOICES),
                ("i8f/pf", tg._gemv2_i8f_kernel, I8F_POINTERS,
                 dict(L=32, BN=BN, BW=BW, SPLIT=True, EVEN=True, ASM=True, EARLY=0, PREFETCH=True))):
            regs = registers(kernel, pointers, consts, warps)
            fit = min(64 // warps, REGISTERS_PER_SM // (regs * 32 * warps))  # 64 warps per SM at most
            print(f"{f'{BN}x{BW}, {warps}':>16} {name:>10} {regs:>10} {fit:>12}")
    print("nearest-code search (vq_search.py), dim 64 (16 packed bytes), bf16x2 queries")
    search = dict(NB=16, TWO_PASS=True, E_STEP_C=E_STEP, DOT_DTYPE=tl.bfloat16, MAGIC_DECODE=True)
    for bq, bc, warps in VQ_TILES:
        regs = registers(vs._tile_min_kernel, VQ_POINTERS, dict(BLOCK_Q=bq, BLOCK_C=bc, **search), warps)
        fit = min(64 // warps, REGISTERS_PER_SM // (regs * 32 * warps))
        print(f"{f'{bq}x{bc}, {warps}':>16} {'tile_min':>10} {regs:>10} {fit:>12}")
    fma_search = dict(NB=16, TWO_PASS=True, E_STEP_C=E_STEP, MAGIC_DECODE=True)
    for bc, warps in VQ_FMA_TILES:
        regs = registers(vs._tile_min_fma_kernel, VQ_POINTERS, dict(BLOCK_C=bc, **fma_search), warps)
        fit = min(64 // warps, REGISTERS_PER_SM // (regs * 32 * warps))
        print(f"{f'1x{bc}, {warps}':>16} {'fma':>10} {regs:>10} {fit:>12}")
    regs = registers(vs._refine_kernel, VQ_POINTERS, dict(BLOCK_C=128, NB=16, TWO_PASS=True, E_STEP_C=E_STEP,
                                                          BLOCK_S=vs.REFINE_BLOCK_S), 4)
    print(f"{'128 codes, 4':>16} {'refine':>10} {regs:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
