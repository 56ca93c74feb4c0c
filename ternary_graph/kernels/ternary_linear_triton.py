"""Triton kernels and launchers for ``y = x · (T ⊙ s)ᵀ`` over base-3 packed trits.

Imported lazily by ``ternary_linear.py`` when a CUDA tensor arrives (and directly by the tests,
which run these kernels on CPU tensors under ``TRITON_INTERPRET=1``). The torch references
live in ``ternary_linear.py``; ``docs/kernels.md`` has the measurements behind every choice.

Layout. ``packed`` is (N, KB) uint8, KB = ceil(K / 5); byte ``b`` of row ``n`` at byte column
``j`` holds the trits of columns ``5j .. 5j+4`` as ``b = Σ (t_i + 1)·3^i``. A tile of bytes is
therefore five *digit planes*: plane ``i`` holds columns ``5j + i``. The matrix kernels multiply
plane by plane: the small-M kernels issue five ``tl.dot`` per byte tile and read the activation
tile of plane ``i`` as the strided columns ``5j + i``; the large-M "plane" kernels first get a
plane-major (M, 5, KBp) copy of x (``plane_major``) so that those loads are contiguous.

Decoding (per byte, no division and no int→float conversion instruction):
  * ``q = (b·17261 + 16383) >> 14`` equals ``ceil(b·256/243)``, an 8-bit fixed-point fraction
    ``b / 243`` (checked exhaustively in the tests);
  * ``t = 3q; digit = t >> 8; q = t & 255`` pops base-3 digits, most significant (plane 4) first;
  * ``float(digit) - 1`` is built as ``bitcast(0x4B000000 | digit) - 8388609.0`` (2^23 + digit).

Kernels:
  * ``_forward_dot_kernel``: small-M path, a (BM, BN) output tile, five dots per byte tile.
  * ``_plane_gemm_kernel`` / ``_plane_grad_input_kernel`` / ``_plane_votes_kernel``: large-M
    variants over the plane-major copy of x, one ``tl.dot`` per step (the decoded trits as the
    register operand).
  * ``_dequant_kernel``: dense ``T ⊙ s`` workspace for the "dequant" paths (forward and
    grad_input through torch matmul for large M; measured faster than the fused GEMMs).
  * ``_gemv_fma_kernel``: M = 1, decode + fp32 FMA, row sums.
  * ``_gemv_lut_kernel``: M = 1, per group of five activations the 243 partial sums (built in
    registers by the program), one ``tl.gather`` + add per packed byte; split-K over programs.
  * ``_grad_input_kernel``: grad_input = (grad·s) · T, five accumulators (one per digit plane).
  * ``_votes_kernel``: dW tile by tile in registers, cast straight into int8 ``T_accum`` votes
    (saturating at ±127; NaN/Inf cast none) and the per-row Σ_k dW·T into an fp32 N-vector
    (atomics); the launcher turns that vector into ``E_accum`` votes. No fp32 dW is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ternary.packing import packed_cols
from ..ternary.saturating import saturating_add_
from ._triton import check_kernel_tensors, interpreting
from .ternary_linear_reference import linear_backward_reference, linear_forward_reference, sign_votes

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FORWARD_PATHS = ("auto", "gemv_lut", "gemv_fma", "dot", "gemm", "dequant")
BACKWARD_PATHS = ("auto", "dot", "plane", "dequant", "cublas")
SMALL_M = 16  # M at or below which the backward uses the skinny five-accumulator kernels
# Which M = 1 kernel "auto" takes; chosen from the measurements in docs/kernels.md.
DEFAULT_GEMV = "gemv_fma"
GEMV_FMA_CONFIG = dict(BN=8, BKB=128, warps=2)  # best of the sweep in docs/kernels.md
VOTES_CONFIG = dict(BN=64, BJ=128, BM=64, warps=4, stages=4)  # best of the sweep in docs/kernels.md
# Transient dW workspace of the "cublas" votes path, in elements: dW is computed by cuBLAS (or
# torch._grouped_mm for stacked experts) in row chunks of at most this many elements, and each
# chunk is turned into votes by _dw_votes_kernel before the next one is computed. 32M elements
# are 64 MiB in bf16 (128 MiB in fp32), whatever the size of the matrix (docs/memory.md).
DW_CHUNK_ELEMENTS = 1 << 25
DW_VOTES_CONFIG = dict(BR=2, BC=512, warps=4)  # best of the sweep in docs/kernels.md
# From this M on, "auto" forward takes the dense workspace + torch matmul (0.79-0.87x bf16 at
# M = 4096, against 0.19-0.24x for the fused plane GEMM); below it the fused "dot" kernel, whose
# cost grows with M/16 weight decodes. The crossover is estimated from the M = 1 and M = 4096
# timings, not measured at intermediate M (docs/kernels.md).
DEQUANT_MIN_M = 64
_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite fp32


# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _row_scale(e):
    """fp32 ``2 ** (E / 4)`` built exactly: a power of two times one of four constants."""
    e = e.to(tl.int32)
    p2 = (((e >> 2) + 127) << 23).to(tl.float32, bitcast=True)  # 2**floor(E/4); E/4 in [-32, 32)
    r = e & 3
    frac = tl.where(r == 0, 1.0, tl.where(r == 1, 1.189207115002721,
                                          tl.where(r == 2, 1.4142135623730951, 1.681792830507429)))
    return p2 * frac


@triton.jit
def _q_of_byte(b):
    """ceil(b·256/243) for b in 0..242: the byte as an 8-bit base-3 fixed-point fraction."""
    return (b * 17261 + 16383) >> 14


@triton.jit
def _next_trit(q):
    """Pop the most significant remaining digit: returns (trit as fp32 in {-1, 0, 1}, rest)."""
    t = q * 3
    w = ((t >> 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388609.0
    return w, t & 255


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the CPU interpreter multiplies bf16 tiles as raw uint16 words (numpy has no bf16),
    # so under it 16-bit tiles are widened first; values are exact in fp32, the maths identical.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _grouped_pid(pid, num_a, num_b, GROUP: tl.constexpr):
    """Map a linear program id to (a, b) tiles, GROUP tiles of ``a`` at a time (L2 reuse)."""
    per_group = GROUP * num_b
    first_a = (pid // per_group) * GROUP
    size = tl.minimum(num_a - first_a, GROUP)
    a = first_a + (pid % per_group) % size
    b = (pid % per_group) // size
    return a, b


@triton.jit
def _load_plane(x_rows, row_mask, j, i: tl.constexpr, K, stride_xi, stride_xj, X_PADDED: tl.constexpr):
    """Activation tile of digit plane ``i``: columns ``5j + i`` (zeros past K)."""
    ptrs = x_rows + i * stride_xi + j[None, :] * stride_xj
    if X_PADDED:  # plane-major copy, zero-padded to a whole number of byte tiles
        return tl.load(ptrs, mask=row_mask, other=0.0)
    else:
        return tl.load(ptrs, mask=row_mask & (5 * j[None, :] + i < K), other=0.0)


# --------------------------------------------------------------------------------------------
# forward kernels
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M", "N", "K", "KB"])  # sizes vary per call; recompiling per value buys nothing
def _forward_dot_kernel(x_ptr, p_ptr, e_ptr, y_ptr, M, N, K, KB,
                        stride_xm, stride_xi, stride_xj, stride_pn, stride_ym,
                        BM: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr, GROUP_M: tl.constexpr,
                        X_PADDED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_j = tl.arange(0, BKB)
    m_mask = offs_m[:, None] < M
    n_mask = offs_n[:, None] < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    p_rows = p_ptr + offs_n[:, None].to(tl.int64) * stride_pn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb0 in range(0, KB, BKB):
        j = kb0 + offs_j
        # masked bytes read as 121 = five zero trits
        b = tl.load(p_rows + j[None, :], mask=n_mask & (j[None, :] < KB), other=121).to(tl.int32)
        q = _q_of_byte(b)
        for r in tl.static_range(5):
            w, q = _next_trit(q)
            xi = _load_plane(x_rows, m_mask, j, 4 - r, K, stride_xi, stride_xj, X_PADDED)
            acc = _dot(xi, tl.trans(w.to(xi.dtype)), acc, PREC, UPCAST)
    e = tl.load(e_ptr + offs_n, mask=offs_n < N, other=0)
    y = acc * _row_scale(e)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_mask & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["N", "K", "KB"])  # sizes vary per call; recompiling per value buys nothing
def _gemv_fma_kernel(x_ptr, p_ptr, e_ptr, y_ptr, N, K, KB, stride_pn,
                     BN: tl.constexpr, BKB: tl.constexpr):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_j = tl.arange(0, BKB)
    n_mask = offs_n[:, None] < N
    p_rows = p_ptr + offs_n[:, None].to(tl.int64) * stride_pn
    acc = tl.zeros((BN, BKB), dtype=tl.float32)
    for kb0 in range(0, KB, BKB):
        j = kb0 + offs_j
        b = tl.load(p_rows + j[None, :], mask=n_mask & (j[None, :] < KB), other=121).to(tl.int32)
        q = _q_of_byte(b)
        for r in tl.static_range(5):
            w, q = _next_trit(q)
            col = 5 * j + (4 - r)
            xi = tl.load(x_ptr + col, mask=col < K, other=0.0).to(tl.float32)
            acc += w * xi[None, :]
    e = tl.load(e_ptr + offs_n, mask=offs_n < N, other=0)
    y = tl.sum(acc, axis=1) * _row_scale(e)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit(do_not_specialize=["N", "K", "KB", "KB_PER_SPLIT"])  # sizes vary per call; recompiling per value buys nothing
def _gemv_lut_kernel(x_ptr, p_ptr, e_ptr, out_ptr, N, K, KB, stride_pn, KB_PER_SPLIT,
                     BN: tl.constexpr, G: tl.constexpr, ATOMIC: tl.constexpr):
    pid_n = tl.program_id(0)
    kb_start = tl.program_id(1) * KB_PER_SPLIT
    kb_end = tl.minimum(kb_start + KB_PER_SPLIT, KB)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_g = tl.arange(0, G)
    n_mask = offs_n[:, None] < N
    p_rows = p_ptr + offs_n[:, None].to(tl.int64) * stride_pn
    # trit planes of every byte value 0..255 (243..255 never occur in valid packings; they
    # keep any corrupt byte inside the table)
    code = tl.arange(0, 256)[:, None]
    t0 = (code % 3 - 1).to(tl.float32)
    t1 = (code // 3 % 3 - 1).to(tl.float32)
    t2 = (code // 9 % 3 - 1).to(tl.float32)
    t3 = (code // 27 % 3 - 1).to(tl.float32)
    t4 = (code // 81 % 3 - 1).to(tl.float32)
    acc = tl.zeros((BN, G), dtype=tl.float32)
    for kb0 in range(kb_start, kb_end, G):
        g = kb0 + offs_g
        g_ok = g < kb_end
        col = 5 * g
        x0 = tl.load(x_ptr + col, mask=g_ok & (col < K), other=0.0).to(tl.float32)[None, :]
        x1 = tl.load(x_ptr + col + 1, mask=g_ok & (col + 1 < K), other=0.0).to(tl.float32)[None, :]
        x2 = tl.load(x_ptr + col + 2, mask=g_ok & (col + 2 < K), other=0.0).to(tl.float32)[None, :]
        x3 = tl.load(x_ptr + col + 3, mask=g_ok & (col + 3 < K), other=0.0).to(tl.float32)[None, :]
        x4 = tl.load(x_ptr + col + 4, mask=g_ok & (col + 4 < K), other=0.0).to(tl.float32)[None, :]
        lut = t0 * x0 + t1 * x1 + t2 * x2 + t3 * x3 + t4 * x4  # (256, G): byte value -> partial sum
        b = tl.load(p_rows + g[None, :], mask=n_mask & g_ok[None, :], other=121).to(tl.int32)
        acc += tl.gather(lut, b, axis=0)
    e = tl.load(e_ptr + offs_n, mask=offs_n < N, other=0)
    part = tl.sum(acc, axis=1) * _row_scale(e)
    if ATOMIC:
        tl.atomic_add(out_ptr + offs_n, part, mask=offs_n < N)
    else:
        tl.store(out_ptr + offs_n, part.to(out_ptr.dtype.element_ty), mask=offs_n < N)


# --------------------------------------------------------------------------------------------
# backward kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _store_plane(out_rows, row_mask, acc, offs_j, i: tl.constexpr, K):
    col = 5 * offs_j + i
    tl.store(out_rows + col[None, :], acc.to(out_rows.dtype.element_ty), mask=row_mask & (col[None, :] < K))


@triton.jit(do_not_specialize=["M", "N", "K", "KB"])  # sizes vary per call; recompiling per value buys nothing
def _grad_input_kernel(g_ptr, p_ptr, e_ptr, gi_ptr, M, N, K, KB, stride_gm, stride_pn, stride_gim,
                       BM: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr, GROUP_M: tl.constexpr,
                       PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m, pid_j = _grouped_pid(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(KB, BKB), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_j = pid_j * BKB + tl.arange(0, BKB)
    offs_n0 = tl.arange(0, BN)
    m_mask = offs_m[:, None] < M
    j_mask = offs_j[None, :] < KB
    g_rows = g_ptr + offs_m[:, None].to(tl.int64) * stride_gm
    acc4 = tl.zeros((BM, BKB), dtype=tl.float32)
    acc3 = tl.zeros((BM, BKB), dtype=tl.float32)
    acc2 = tl.zeros((BM, BKB), dtype=tl.float32)
    acc1 = tl.zeros((BM, BKB), dtype=tl.float32)
    acc0 = tl.zeros((BM, BKB), dtype=tl.float32)
    for n0 in range(0, N, BN):
        n = n0 + offs_n0
        n_ok = n < N
        g = tl.load(g_rows + n[None, :], mask=m_mask & n_ok[None, :], other=0.0)
        s = _row_scale(tl.load(e_ptr + n, mask=n_ok, other=0))
        gs = (g.to(tl.float32) * s[None, :]).to(g.dtype)
        b = tl.load(p_ptr + n[:, None].to(tl.int64) * stride_pn + offs_j[None, :],
                    mask=n_ok[:, None] & j_mask, other=121).to(tl.int32)
        q = _q_of_byte(b)
        w, q = _next_trit(q)
        acc4 = _dot(gs, w.to(gs.dtype), acc4, PREC, UPCAST)
        w, q = _next_trit(q)
        acc3 = _dot(gs, w.to(gs.dtype), acc3, PREC, UPCAST)
        w, q = _next_trit(q)
        acc2 = _dot(gs, w.to(gs.dtype), acc2, PREC, UPCAST)
        w, q = _next_trit(q)
        acc1 = _dot(gs, w.to(gs.dtype), acc1, PREC, UPCAST)
        w, q = _next_trit(q)
        acc0 = _dot(gs, w.to(gs.dtype), acc0, PREC, UPCAST)
    out_rows = gi_ptr + offs_m[:, None].to(tl.int64) * stride_gim
    _store_plane(out_rows, m_mask, acc4, offs_j, 4, K)
    _store_plane(out_rows, m_mask, acc3, offs_j, 3, K)
    _store_plane(out_rows, m_mask, acc2, offs_j, 2, K)
    _store_plane(out_rows, m_mask, acc1, offs_j, 1, K)
    _store_plane(out_rows, m_mask, acc0, offs_j, 0, K)


@triton.jit
def _cast_plane_votes(acc, w, t_rows, n_mask, offs_j, i, K, magnitude):
    """Saturating sign votes of one dW plane into int8 T_accum; returns the plane's Σ dW·T."""
    col = 5 * offs_j + i
    mask = n_mask & (col[None, :] < K)
    finite = tl.abs(acc) <= _FLT_MAX  # False for NaN and ±Inf: those cast no vote
    vote = tl.where(finite & (acc > 0), magnitude, tl.where(finite & (acc < 0), -magnitude, 0))
    ptrs = t_rows + col[None, :]
    old = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
    new = tl.minimum(tl.maximum(old + vote, -127), 127)
    tl.store(ptrs, new.to(tl.int8), mask=mask)
    return tl.sum(tl.where(mask, acc * w, 0.0), axis=1)


@triton.jit(do_not_specialize=["M", "N", "K", "KB", "magnitude"])  # sizes vary per call; recompiling per value buys nothing
def _votes_kernel(g_ptr, x_ptr, p_ptr, t_ptr, esum_ptr, M, N, K, KB,
                  stride_gm, stride_xm, stride_xi, stride_xj, stride_pn, stride_tn, magnitude,
                  BM: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr, GROUP_N: tl.constexpr,
                  X_PADDED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_n, pid_j = _grouped_pid(tl.program_id(0), tl.cdiv(N, BN), tl.cdiv(KB, BKB), GROUP_N)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_j = pid_j * BKB + tl.arange(0, BKB)
    offs_m0 = tl.arange(0, BM)
    n_mask = offs_n[:, None] < N
    acc4 = tl.zeros((BN, BKB), dtype=tl.float32)
    acc3 = tl.zeros((BN, BKB), dtype=tl.float32)
    acc2 = tl.zeros((BN, BKB), dtype=tl.float32)
    acc1 = tl.zeros((BN, BKB), dtype=tl.float32)
    acc0 = tl.zeros((BN, BKB), dtype=tl.float32)
    for m0 in range(0, M, BM):
        m = m0 + offs_m0
        m_ok = m < M
        g_t = tl.load(g_ptr + m[None, :].to(tl.int64) * stride_gm + offs_n[:, None],
                      mask=n_mask & m_ok[None, :], other=0.0)  # (BN, BM) = gradᵀ tile
        x_rows = x_ptr + m[:, None].to(tl.int64) * stride_xm
        row_ok = m_ok[:, None]
        acc4 = _dot(g_t, _load_plane(x_rows, row_ok, offs_j, 4, K, stride_xi, stride_xj, X_PADDED), acc4, PREC, UPCAST)
        acc3 = _dot(g_t, _load_plane(x_rows, row_ok, offs_j, 3, K, stride_xi, stride_xj, X_PADDED), acc3, PREC, UPCAST)
        acc2 = _dot(g_t, _load_plane(x_rows, row_ok, offs_j, 2, K, stride_xi, stride_xj, X_PADDED), acc2, PREC, UPCAST)
        acc1 = _dot(g_t, _load_plane(x_rows, row_ok, offs_j, 1, K, stride_xi, stride_xj, X_PADDED), acc1, PREC, UPCAST)
        acc0 = _dot(g_t, _load_plane(x_rows, row_ok, offs_j, 0, K, stride_xi, stride_xj, X_PADDED), acc0, PREC, UPCAST)
    b = tl.load(p_ptr + offs_n[:, None].to(tl.int64) * stride_pn + offs_j[None, :],
                mask=n_mask & (offs_j[None, :] < KB), other=121).to(tl.int32)
    q = _q_of_byte(b)
    t_rows = t_ptr + offs_n[:, None].to(tl.int64) * stride_tn
    w, q = _next_trit(q)
    esum = _cast_plane_votes(acc4, w, t_rows, n_mask, offs_j, 4, K, magnitude)
    w, q = _next_trit(q)
    esum += _cast_plane_votes(acc3, w, t_rows, n_mask, offs_j, 3, K, magnitude)
    w, q = _next_trit(q)
    esum += _cast_plane_votes(acc2, w, t_rows, n_mask, offs_j, 2, K, magnitude)
    w, q = _next_trit(q)
    esum += _cast_plane_votes(acc1, w, t_rows, n_mask, offs_j, 1, K, magnitude)
    w, q = _next_trit(q)
    esum += _cast_plane_votes(acc0, w, t_rows, n_mask, offs_j, 0, K, magnitude)
    tl.atomic_add(esum_ptr + offs_n, esum, mask=offs_n < N)


# --------------------------------------------------------------------------------------------
# plane-major kernels (large M): one big tl.dot per step, the decoded trits as the register operand
# --------------------------------------------------------------------------------------------
@triton.jit
def _plane_divisor_magic(i):
    """Multiplier with ``(b * magic) >> 16 == b // 3**i`` for every byte b (checked in the tests)."""
    return tl.where(i == 0, 65536, tl.where(i == 1, 21846, tl.where(i == 2, 7282, tl.where(i == 3, 2428, 810))))


@triton.jit
def _plane_trit(b, magic):
    """Trit of digit plane i of bytes ``b`` as fp32, with ``magic = _plane_divisor_magic(i)``."""
    t = (b * magic) >> 16
    d = t - 3 * ((t * 21846) >> 16)
    return (d | 0x4B000000).to(tl.float32, bitcast=True) - 8388609.0


@triton.jit(do_not_specialize=["M", "N", "KB"])  # sizes vary per call; recompiling per value buys nothing
def _plane_gemm_kernel(x_ptr, p_ptr, e_ptr, y_ptr, M, N, KB, stride_xm, stride_xi, stride_pn, stride_ym,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                       PREC: tl.constexpr, UPCAST: tl.constexpr):
    """yᵀ tile (BN, BM) = Σ over planes i and byte blocks of W_i (BN, BK) · X_iᵀ (BK, BM).

    x is the plane-major copy (M, 5, KBp), zero-padded so that its byte blocks need no mask.
    """
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    n_mask = offs_n[:, None] < N
    m_mask = offs_m[:, None] < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    p_rows = p_ptr + offs_n[:, None].to(tl.int64) * stride_pn
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for i in tl.static_range(5):
        magic = _plane_divisor_magic(i)
        for j0 in range(0, KB, BK):
            j = j0 + offs_k
            b = tl.load(p_rows + j[None, :], mask=n_mask & (j[None, :] < KB), other=121).to(tl.int32)
            xt = tl.load(x_rows + i * stride_xi + j[None, :], mask=m_mask, other=0.0)
            acc = _dot(_plane_trit(b, magic).to(xt.dtype), tl.trans(xt), acc, PREC, UPCAST)
    e = tl.load(e_ptr + offs_n, mask=offs_n < N, other=0)
    y = acc * _row_scale(e)[:, None]
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=n_mask & (offs_m[None, :] < M))


@triton.jit(do_not_specialize=["M", "N", "K", "KB"])  # sizes vary per call; recompiling per value buys nothing
def _plane_grad_input_kernel(g_ptr, p_ptr, e_ptr, gi_ptr, M, N, K, KB, stride_gm, stride_pn, stride_gim,
                             BM: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr, GROUP_M: tl.constexpr,
                             PREC: tl.constexpr, UPCAST: tl.constexpr):
    """grad_inputᵀ tile of plane i (BJ, BM) = Σ_n (T_i ⊙ s)ᵀ (BJ, BN) · gradᵀ (BN, BM)."""
    num_j = tl.cdiv(KB, BJ)
    pid_m, pid_c = _grouped_pid(tl.program_id(0), tl.cdiv(M, BM), 5 * num_j, GROUP_M)
    i = pid_c // num_j
    offs_j = (pid_c % num_j) * BJ + tl.arange(0, BJ)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n0 = tl.arange(0, BN)
    magic = _plane_divisor_magic(i)
    m_mask = offs_m[:, None] < M
    j_mask = offs_j[:, None] < KB
    g_rows = g_ptr + offs_m[:, None].to(tl.int64) * stride_gm
    acc = tl.zeros((BJ, BM), dtype=tl.float32)
    for n0 in range(0, N, BN):
        n = n0 + offs_n0
        n_ok = n < N
        bt = tl.load(p_ptr + n[None, :].to(tl.int64) * stride_pn + offs_j[:, None], mask=j_mask & n_ok[None, :],
                     other=121).to(tl.int32)  # (BJ, BN) bytes, transposed
        s = _row_scale(tl.load(e_ptr + n, mask=n_ok, other=0))
        g = tl.load(g_rows + n[None, :], mask=m_mask & n_ok[None, :], other=0.0)
        acc = _dot((_plane_trit(bt, magic) * s[None, :]).to(g.dtype), tl.trans(g), acc, PREC, UPCAST)
    col = 5 * offs_j + i
    gi_ptrs = gi_ptr + offs_m[None, :].to(tl.int64) * stride_gim + col[:, None]
    tl.store(gi_ptrs, acc.to(gi_ptr.dtype.element_ty), mask=(offs_m[None, :] < M) & (col[:, None] < K))


@triton.jit(do_not_specialize=["M", "N", "K", "KB", "magnitude"])  # sizes vary per call
def _plane_votes_kernel(g_ptr, x_ptr, p_ptr, t_ptr, esum_ptr, M, N, K, KB,
                        stride_gm, stride_xm, stride_xi, stride_pn, stride_tn, magnitude,
                        BM: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr, GROUP_N: tl.constexpr,
                        PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dW tile of plane i (BN, BJ) = gradᵀ (BN, BM) · X_i (BM, BJ) summed over M, then votes."""
    num_j = tl.cdiv(KB, BJ)
    pid_n, pid_c = _grouped_pid(tl.program_id(0), tl.cdiv(N, BN), 5 * num_j, GROUP_N)
    i = pid_c // num_j
    offs_j = (pid_c % num_j) * BJ + tl.arange(0, BJ)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m0 = tl.arange(0, BM)
    n_mask = offs_n[:, None] < N
    x_cols = x_ptr + i * stride_xi + offs_j[None, :]
    acc = tl.zeros((BN, BJ), dtype=tl.float32)
    for m0 in range(0, M, BM):
        m = m0 + offs_m0
        m_ok = m[:, None] < M
        g = tl.load(g_ptr + m[:, None].to(tl.int64) * stride_gm + offs_n[None, :],
                    mask=m_ok & (offs_n[None, :] < N), other=0.0)  # (BM, BN)
        xt = tl.load(x_cols + m[:, None].to(tl.int64) * stride_xm, mask=m_ok, other=0.0)  # (BM, BJ)
        acc = _dot(tl.trans(g), xt, acc, PREC, UPCAST)
    b = tl.load(p_ptr + offs_n[:, None].to(tl.int64) * stride_pn + offs_j[None, :],
                mask=n_mask & (offs_j[None, :] < KB), other=121).to(tl.int32)
    w = _plane_trit(b, _plane_divisor_magic(i))
    t_rows = t_ptr + offs_n[:, None].to(tl.int64) * stride_tn
    esum = _cast_plane_votes(acc, w, t_rows, n_mask, offs_j, i, K, magnitude)
    tl.atomic_add(esum_ptr + offs_n, esum, mask=offs_n < N)


@triton.jit(do_not_specialize=["N", "K"])  # sizes vary per call; recompiling per value buys nothing
def _dequant_kernel(p_ptr, e_ptr, w_ptr, N, K, stride_pn, stride_wn, BN: tl.constexpr, BC: tl.constexpr):
    """Dense (N, K) weights T ⊙ s, tiled over output columns so that every store is contiguous
    (each byte is read five times, from L1)."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    n_mask = offs_n[:, None] < N
    c_ok = offs_c[None, :] < K
    j = offs_c // 5
    magic = _plane_divisor_magic(offs_c - 5 * j)
    b = tl.load(p_ptr + offs_n[:, None].to(tl.int64) * stride_pn + j[None, :], mask=n_mask & c_ok,
                other=121).to(tl.int32)
    s = _row_scale(tl.load(e_ptr + offs_n, mask=offs_n < N, other=0))
    w = _plane_trit(b, magic[None, :]) * s[:, None]
    tl.store(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_c[None, :], w.to(w_ptr.dtype.element_ty),
             mask=n_mask & c_ok)


@triton.jit(do_not_specialize=["R", "K", "rows_per_group", "group_rows", "row0", "magnitude"])
def _dw_votes_kernel(dw_ptr, p_ptr, t_ptr, ea_ptr, R, K, stride_dw, stride_pn, stride_tn,
                     rows_per_group, group_rows, row0, magnitude, BR: tl.constexpr, BC: tl.constexpr):
    """Votes of a dense dW chunk: the epilogue of a cuBLAS / grouped-GEMM weight gradient.

    Chunk row ``i`` is state row ``(i // rows_per_group) · group_rows + row0 + i % rows_per_group``
    (one matrix: rows_per_group = R, group_rows = 0; G stacked experts: rows n0..n1 of each).
    Each program owns BR whole rows: it adds ``±magnitude`` to T_accum (saturating, NaN/Inf
    cast none) and, having seen every column, casts the row-scale vote sign(Σ_k dW·T) into
    E_accum itself, so no second pass and no atomics are needed.
    """
    offs_i = tl.program_id(0) * BR + tl.arange(0, BR)
    i_ok = offs_i < R
    row = (offs_i // rows_per_group) * group_rows + row0 + offs_i % rows_per_group
    row64 = row.to(tl.int64)
    offs_c = tl.arange(0, BC)
    esum = tl.zeros((BR,), dtype=tl.float32)
    for c0 in range(0, K, BC):
        c = c0 + offs_c
        mask = i_ok[:, None] & (c[None, :] < K)
        g = tl.load(dw_ptr + offs_i[:, None].to(tl.int64) * stride_dw + c[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        j = c // 5
        b = tl.load(p_ptr + row64[:, None] * stride_pn + j[None, :], mask=mask, other=121).to(tl.int32)
        w = _plane_trit(b, _plane_divisor_magic(c - 5 * j)[None, :])
        finite = tl.abs(g) <= _FLT_MAX  # False for NaN and ±Inf: those cast no vote
        vote = tl.where(finite & (g > 0), magnitude, tl.where(finite & (g < 0), -magnitude, 0))
        t_ptrs = t_ptr + row64[:, None] * stride_tn + c[None, :]
        old = tl.load(t_ptrs, mask=mask, other=0).to(tl.int32)
        tl.store(t_ptrs, tl.minimum(tl.maximum(old + vote, -127), 127).to(tl.int8), mask=mask)
        esum += tl.sum(tl.where(mask, g * w, 0.0), axis=1)  # a NaN/Inf dW makes the row's sum cast no vote
    e_ok = tl.abs(esum) <= _FLT_MAX
    e_vote = tl.where(e_ok & (esum > 0), magnitude, tl.where(e_ok & (esum < 0), -magnitude, 0))
    old_e = tl.load(ea_ptr + row64, mask=i_ok, other=0).to(tl.int32)
    tl.store(ea_ptr + row64, tl.minimum(tl.maximum(old_e + e_vote, -127), 127).to(tl.int8), mask=i_ok)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _dot_options(dtype: torch.dtype) -> tuple[str, bool]:
    """(input_precision, upcast) for tl.dot on tiles of ``dtype``."""
    prec = "ieee" if dtype == torch.float32 else "tf32"  # fp32 must stay fp32; tf32 is ignored for 16-bit
    return prec, interpreting() and dtype != torch.float32


def _check_linear_args(x2d: torch.Tensor, packed: torch.Tensor, E: torch.Tensor, in_features: int) -> None:
    if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    if x2d.dim() != 2 or x2d.shape[1] != in_features:
        raise ValueError(f"x2d must have shape (M, in_features={in_features}), got {tuple(x2d.shape)}")
    if x2d.dtype not in KERNEL_DTYPES + (torch.float64,):
        raise TypeError(f"x2d must be float32, bfloat16, float16 or float64, got dtype={x2d.dtype}")
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != packed_cols(in_features):
        raise ValueError(f"packed must be uint8 of shape (N, {packed_cols(in_features)}), "
                         f"got dtype={packed.dtype} shape={tuple(packed.shape)}")
    if E.dtype != torch.int8 or tuple(E.shape) != (packed.shape[0],):
        raise ValueError(f"E must be int8 of shape ({packed.shape[0]},), got dtype={E.dtype} shape={tuple(E.shape)}")


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def plane_major(x2d: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """Copy (M, K) activations into (M, 5, KBp): ``out[m, i, j] = x[m, 5j + i]``, zero-padded.

    KBp is ceil(K/5) rounded up to a multiple of ``block_bytes`` (and of 8, so every plane row
    starts 16-byte aligned): the matrix kernels then load each digit plane contiguously,
    without column masks.
    """
    M, K = x2d.shape
    kb = packed_cols(K)
    kbp = -(-kb // block_bytes) * block_bytes
    kbp = -(-kbp // 8) * 8
    out = x2d.new_zeros(M, 5, kbp)
    padded = torch.nn.functional.pad(x2d, (0, 5 * kb - K)) if 5 * kb != K else x2d
    out[:, :, :kb] = padded.reshape(M, kb, 5).transpose(1, 2)
    return out


def _check_out(out: torch.Tensor | None, shape: tuple[int, int], like: torch.Tensor, name: str) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != like.dtype \
            or out.device != like.device or not out.is_contiguous():
        got = (f"shape={tuple(out.shape)} dtype={out.dtype} device={out.device} contiguous={out.is_contiguous()}"
               if isinstance(out, torch.Tensor) else type(out).__name__)
        raise ValueError(f"{name} must be a contiguous {like.dtype} tensor of shape {shape} on {like.device}, got {got}")
    return out


def dequantize_triton(packed: torch.Tensor, E: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense (N, K) weights ``T ⊙ s`` in ``dtype`` (a transient workspace, never stored on a module)."""
    N, KB = packed.shape
    w = torch.empty(N, in_features, dtype=dtype, device=packed.device)
    if N and KB:
        BN, BC = 16, 256
        _dequant_kernel[(triton.cdiv(N, BN), triton.cdiv(in_features, BC))](packed, E, w, N, in_features,
                                                                           packed.stride(0), w.stride(0), BN=BN,
                                                                           BC=BC, num_warps=4)
    return w


def dw_votes_(dw: torch.Tensor, packed: torch.Tensor, T_accum: torch.Tensor, E_accum: torch.Tensor,
              vote_magnitude: int, *, rows_per_group: int, group_rows: int = 0, row0: int = 0) -> None:
    """Cast the votes of a dense dW chunk into the state rows it stands for (see ``_dw_votes_kernel``).

    Shapes: dw (R, K) float, row-major; packed (rows, ceil(K/5)) uint8; T_accum (rows, K) int8;
    E_accum (rows,) int8. Chunk row i is state row (i // rows_per_group)·group_rows + row0 +
    i % rows_per_group.
    """
    R, K = dw.shape
    if R == 0 or K == 0:
        return
    if dw.stride(1) != 1:
        raise ValueError(f"dw must be row-major, got strides {dw.stride()}")
    cfg = DW_VOTES_CONFIG
    _dw_votes_kernel[(triton.cdiv(R, cfg["BR"]),)](dw, packed, T_accum, E_accum, R, K, dw.stride(0),
                                                    packed.stride(0), T_accum.stride(0), rows_per_group,
                                                    group_rows, row0, vote_magnitude, BR=cfg["BR"], BC=cfg["BC"],
                                                    num_warps=cfg["warps"])


def dw_chunk_rows(rows: int, cols: int) -> int:
    """Rows per dW chunk: at most DW_CHUNK_ELEMENTS elements, a multiple of 8 (so that column
    slices of a 16-bit gradient stay 16-byte aligned, as torch._grouped_mm requires)."""
    per_chunk = max(8, (DW_CHUNK_ELEMENTS // max(cols, 1)) // 8 * 8)
    return min(rows, per_chunk)


def cublas_votes_(grad2d: torch.Tensor, x2d: torch.Tensor, packed: torch.Tensor, T_accum: torch.Tensor,
                  E_accum: torch.Tensor, vote_magnitude: int) -> None:
    """Votes of ``dW = gradᵀ·x`` computed by cuBLAS in row chunks, each turned into votes at once.

    The transient workspace is one (chunk, K) tensor in x's dtype, chunk·K <= DW_CHUNK_ELEMENTS;
    no dW of the whole matrix ever exists. cuBLAS accumulates in fp32 and rounds to x's dtype,
    which keeps the sign: T votes equal sign(dW) of the fp32 product wherever it is not a tie.
    """
    M, K = x2d.shape
    N = grad2d.shape[1]
    chunk = dw_chunk_rows(N, K)
    workspace = torch.empty(chunk, K, dtype=x2d.dtype, device=x2d.device)
    for n0 in range(0, N, chunk):
        r = min(chunk, N - n0)
        dw = torch.mm(grad2d[:, n0:n0 + r].t(), x2d, out=workspace[:r])
        dw_votes_(dw, packed, T_accum, E_accum, vote_magnitude, rows_per_group=r, row0=n0)


def forward_triton(x2d: torch.Tensor, packed: torch.Tensor, E: torch.Tensor, in_features: int, *,
                   path: str = "auto", out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """Launcher of the forward kernels.

    Shapes:
        x2d: (M, K) float32 / bfloat16 / float16 (float64 runs the torch reference)
        packed: (N, ceil(K/5)) uint8;  E: (N,) int8
        returns: (M, N) in x2d.dtype
    ``path``: "auto" (M == 1: ``DEFAULT_GEMV``, M < ``DEQUANT_MIN_M``: "dot", else "dequant"), or one variant:
    "gemv_fma" / "gemv_lut" (M == 1 only), "dot" (five plane dots per byte tile, x read in place),
    "gemm" (plane-major copy of x, one dot per step), "dequant" (dense workspace + torch matmul).
    ``out``: optional (M, N) contiguous result buffer (the tests poison it to catch unwritten outputs).
    ``config``: optional block sizes for "gemv_fma" (BN, BKB, warps) or "gemm" (BM, BN, BK, warps, stages),
    used by the benchmark's sweeps.
    """
    _check_linear_args(x2d, packed, E, in_features)
    if path not in FORWARD_PATHS:
        raise ValueError(f"path must be one of {FORWARD_PATHS}, got {path!r}")
    check_kernel_tensors(x2d=x2d, packed=packed, E=E)
    M, K = x2d.shape
    N, KB = packed.shape
    y = _check_out(out, (M, N), x2d, "out")
    if x2d.dtype == torch.float64:
        return y.copy_(linear_forward_reference(x2d, packed, E, in_features))
    x2d, packed = _row_major(x2d), _row_major(packed)
    if path == "auto":
        path = DEFAULT_GEMV if M == 1 else ("dot" if M < DEQUANT_MIN_M else "dequant")
    if path in ("gemv_lut", "gemv_fma") and M != 1:
        raise ValueError(f"path={path!r} handles M == 1 only, got M={M}")
    if M == 0 or N == 0:
        return y
    if path == "gemv_fma":
        cfg = dict(GEMV_FMA_CONFIG) | (config or {})
        _gemv_fma_kernel[(triton.cdiv(N, cfg["BN"]),)](x2d, packed, E, y, N, K, KB, packed.stride(0),
                                                       BN=cfg["BN"], BKB=cfg["BKB"], num_warps=cfg["warps"])
        return y
    if path == "gemv_lut":
        BN, G = 256, 16
        n_blocks = triton.cdiv(N, BN)
        # enough programs to fill the GPU; each builds its (256, G) table once per byte group
        split = max(1, min(triton.cdiv(KB, G), triton.cdiv(264, n_blocks)))
        kb_per_split = triton.cdiv(triton.cdiv(KB, split), G) * G
        split = triton.cdiv(KB, kb_per_split)
        if split == 1:
            _gemv_lut_kernel[(n_blocks, 1)](x2d, packed, E, y, N, K, KB, packed.stride(0), kb_per_split,
                                            BN=BN, G=G, ATOMIC=False, num_warps=8)
            return y
        # split-K partial sums meet in an fp32 buffer (the output itself when it is fp32)
        y32 = y.zero_() if y.dtype == torch.float32 else torch.zeros(1, N, dtype=torch.float32, device=y.device)
        _gemv_lut_kernel[(n_blocks, split)](x2d, packed, E, y32, N, K, KB, packed.stride(0), kb_per_split,
                                            BN=BN, G=G, ATOMIC=True, num_warps=8)
        return y if y32 is y else y.copy_(y32)
    if path == "dequant":
        return torch.matmul(x2d, dequantize_triton(packed, E, K, x2d.dtype).t(), out=y)
    prec, upcast = _dot_options(x2d.dtype)
    if path == "dot":
        BM, BN, BKB = 16, 64, 64
        grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
        _forward_dot_kernel[grid](x2d, packed, E, y, M, N, K, KB, x2d.stride(0), 1, 5, packed.stride(0), y.stride(0),
                                  BM=BM, BN=BN, BKB=BKB, GROUP_M=8, X_PADDED=False, PREC=prec, UPCAST=upcast,
                                  num_warps=4, num_stages=3)
        return y
    cfg = dict(BM=128, BN=128, BK=64, warps=8, stages=3) | (config or {})
    xp = plane_major(x2d, cfg["BK"])
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    _plane_gemm_kernel[grid](xp, packed, E, y, M, N, KB, xp.stride(0), xp.stride(1), packed.stride(0), y.stride(0),
                             BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP_M=8, PREC=prec, UPCAST=upcast,
                             num_warps=cfg["warps"], num_stages=cfg["stages"])
    return y


def backward_triton(grad2d: torch.Tensor, x2d: torch.Tensor, packed: torch.Tensor, E: torch.Tensor,
                    T_accum: torch.Tensor, E_accum: torch.Tensor, in_features: int, vote_magnitude: int,
                    needs_input_grad: bool, *, out: torch.Tensor | None = None, path: str = "auto",
                    config: dict | None = None) -> torch.Tensor | None:
    """Launcher of the backward kernels: grad_input and the fused votes.

    Shapes:
        grad2d: (M, N), x2d: (M, K), packed: (N, ceil(K/5)) uint8, E: (N,) int8,
        T_accum: (N, K) int8 (updated in place), E_accum: (N,) int8 (updated in place)
        returns: grad_input (M, K) in x2d.dtype, or None when ``needs_input_grad`` is False
    ``out``: optional (M, K) contiguous buffer for grad_input.
    ``path``: "auto" (M <= 16: "dot", else "cublas"), "dot" (five plane accumulators, x read in
    place), "plane" (plane-major copy of x, one dot per step), "dequant" (grad_input through a
    dense workspace and torch matmul; votes as "plane") or "cublas" (grad_input as "dequant"; dW
    by cuBLAS in bounded row chunks, each cast into votes by ``_dw_votes_kernel``).
    ``config``: optional block sizes of the plane votes kernel (BN, BJ, BM, warps, stages).
    """
    _check_linear_args(x2d, packed, E, in_features)
    M, K = x2d.shape
    N, KB = packed.shape
    if path not in BACKWARD_PATHS:
        raise ValueError(f"path must be one of {BACKWARD_PATHS}, got {path!r}")
    if grad2d.dim() != 2 or tuple(grad2d.shape) != (M, N):
        raise ValueError(f"grad2d must have shape ({M}, {N}), got {tuple(grad2d.shape)}")
    for name, t, shape in (("T_accum", T_accum, (N, K)), ("E_accum", E_accum, (N,))):
        if t.dtype != torch.int8 or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be int8 of shape {shape}, got dtype={t.dtype} shape={tuple(t.shape)}")
    if not isinstance(vote_magnitude, int) or not 1 <= vote_magnitude <= 127:
        raise ValueError(f"vote_magnitude must be an int in 1..127, got {vote_magnitude!r}")
    check_kernel_tensors(grad2d=grad2d, x2d=x2d, packed=packed, E=E, T_accum=T_accum, E_accum=E_accum)
    grad_input = _check_out(out, (M, K), x2d, "out") if needs_input_grad else None
    if x2d.dtype == torch.float64:
        gi = linear_backward_reference(grad2d, x2d, packed, E, T_accum, E_accum, in_features,
                                       vote_magnitude, needs_input_grad)
        return grad_input.copy_(gi) if needs_input_grad else None
    if T_accum.stride(1) != 1:
        raise ValueError(f"T_accum must be row-major (stride 1 along columns), got strides {T_accum.stride()}")
    grad2d = _row_major(grad2d.to(x2d.dtype))
    x2d, packed = _row_major(x2d), _row_major(packed)
    prec, upcast = _dot_options(x2d.dtype)
    if M == 0 or N == 0:  # dW = 0: no votes; grad_input of an empty reduction is zero
        if grad_input is not None:
            grad_input.zero_()
        return grad_input
    if path == "auto":  # the plane grad_input kernel is slower than workspace + matmul at every M measured
        path = "dot" if M <= SMALL_M else "cublas"
    if path == "cublas":
        if needs_input_grad:
            torch.matmul(grad2d, dequantize_triton(packed, E, K, x2d.dtype), out=grad_input)
        cublas_votes_(grad2d, x2d, packed, T_accum, E_accum, vote_magnitude)
        return grad_input
    esum = torch.zeros(N, dtype=torch.float32, device=x2d.device)
    if path == "dot":
        if needs_input_grad:
            BM, BN, BKB = 16, 64, 32
            grid = (triton.cdiv(M, BM) * triton.cdiv(KB, BKB),)
            _grad_input_kernel[grid](grad2d, packed, E, grad_input, M, N, K, KB, grad2d.stride(0), packed.stride(0),
                                     grad_input.stride(0), BM=BM, BN=BN, BKB=BKB, GROUP_M=8, PREC=prec,
                                     UPCAST=upcast, num_warps=4, num_stages=3)
        BN, BKB, BM = 64, 32, 16
        grid = (triton.cdiv(N, BN) * triton.cdiv(KB, BKB),)
        _votes_kernel[grid](grad2d, x2d, packed, T_accum, esum, M, N, K, KB, grad2d.stride(0), x2d.stride(0), 1, 5,
                            packed.stride(0), T_accum.stride(0), vote_magnitude, BM=BM, BN=BN, BKB=BKB, GROUP_N=8,
                            X_PADDED=False, PREC=prec, UPCAST=upcast, num_warps=4, num_stages=3)
    else:
        if needs_input_grad and path == "dequant":
            torch.matmul(grad2d, dequantize_triton(packed, E, K, x2d.dtype), out=grad_input)
        elif needs_input_grad:
            BM, BN, BJ = 128, 64, 128
            grid = (triton.cdiv(M, BM) * 5 * triton.cdiv(KB, BJ),)
            _plane_grad_input_kernel[grid](grad2d, packed, E, grad_input, M, N, K, KB, grad2d.stride(0),
                                           packed.stride(0), grad_input.stride(0), BM=BM, BN=BN, BJ=BJ, GROUP_M=8,
                                           PREC=prec, UPCAST=upcast, num_warps=8, num_stages=3)
        cfg = dict(VOTES_CONFIG) | (config or {})
        xp = plane_major(x2d, cfg["BJ"])
        grid = (triton.cdiv(N, cfg["BN"]) * 5 * triton.cdiv(KB, cfg["BJ"]),)
        _plane_votes_kernel[grid](grad2d, xp, packed, T_accum, esum, M, N, K, KB, grad2d.stride(0), xp.stride(0),
                                  xp.stride(1), packed.stride(0), T_accum.stride(0), vote_magnitude, BM=cfg["BM"],
                                  BN=cfg["BN"], BJ=cfg["BJ"], GROUP_N=8, PREC=prec, UPCAST=upcast,
                                  num_warps=cfg["warps"], num_stages=cfg["stages"])
    saturating_add_(E_accum, sign_votes(esum, vote_magnitude))
    return grad_input
