"""Exact nearest-code search over packed ternary codes: ``argmin_c ||z - s_c·T_c||²``.

Code ``c`` is the row ``T_c`` of packed trits (5 per byte, see ``ternary/packing.py``) scaled by
``s_c = 2 ** (E_c / E_STEP)``. Since ``||z - s_c T_c||² = ||z||² - 2 s_c z·T_c + s_c² nnz(T_c)``
and ``||z||²`` does not depend on ``c``, the search minimises ``s_c² nnz_c - 2 s_c (z·T_c)``.

The function computed (by every path here):

* ``z`` is first rounded to the *compute precision*: ``"bf16"`` (one bf16 value per element,
  8 significant bits) or ``"bf16x2"`` (``z ≈ hi + lo`` with both parts bf16, 16 significant
  bits, relative error ≤ 2**-17 per element). Products of such values with trits are exact,
  so every path sums the same exact products in fp32 and only the summation order differs.
* ids are the smallest code id among the codes of minimal score (ties go to the smallest id);
  ``dist`` is ``max(||z_r||² + min score, 0)`` in fp32, ``z_r`` the rounded query.

Exact ties (identical codes, or dyadic queries) resolve identically on every path. Two
*different* scores within fp32 summation rounding of each other may resolve differently
between paths (measured: 0 id mismatches in 256 random queries over 10M codes on an H100).

Layers, as in every kernel file:

* ``nearest_codes_reference``: chunked plain torch, the CPU path and the test oracle. It holds at
  most ``max_chunk_elems`` scores at a time, never a queries×codes matrix.
* ``_tile_min_kernel`` + ``_refine_kernel`` (Triton) and their launcher
  ``nearest_codes_triton``. Phase 1 streams tiles of ``BLOCK_C`` packed codes, decodes them in
  registers (five base-3 digits per byte, one ``tl.dot`` of K = 16 bytes per digit, bf16
  operands, fp32 accumulation), applies the per-code epilogue ``score = s²·nnz - 2s·dot`` and
  keeps, per query, only the running minimum and the *tile* that holds it: a row-min per tile
  costs one ``min`` per score, where a running argmin costs a compare and two selects (at
  dim 64 that bookkeeping, not the dot, was the limit, see KERNEL_NOTES). The code range is
  split across programs (split-N) so that a few query blocks still fill every SM. Phase 2, one
  program per query, picks the best split (ties: the earlier split, i.e. smaller ids) and
  rescans only the winning tile in fp32 to find the code and its distance. Neither phase
  materialises a queries×codes score matrix: phase 1 writes ``splits × queries`` values.
  ``_tile_min_fma_kernel`` is an alternative phase 1 for decode batches (``phase1="fma"``): one
  query per program row, the trits times the fp32 query in FMAs instead of ``tl.dot``, so no
  query is padded to 16 rows and a program needs half the registers of the 16-query tile. It
  is no faster: the work both share, loading and base-3 decoding the code tiles, bounds them
  (the 16-query dot tile takes the same time at 1 and at 16 queries), so it is not the default.
* the ``torch.library`` custom op ``ternary_graph::nearest_codes`` (with a fake impl so that
  ``torch.compile`` traces through it): CUDA tensors go to Triton, the rest to the reference.

:func:`nearest_codes` is the checked public entry point.
"""

from __future__ import annotations

import math
import os

import torch

from ..checks import check_finite
from ..ternary.packing import TRITS_PER_BYTE, packed_cols, unpack_trits
from ..ternary.state import E_STEP, exponent_to_scale

try:  # optional backend: CPU-only installs run the reference and never need Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None
    tl = None

PRECISIONS = ("bf16", "bf16x2")
PHASE1_KERNELS = ("dot", "fma")  # nearest_codes_triton's tile-minimum kernels
ZERO_TRITS_BYTE = 121  # sum(1 * 3**i): five zero trits, the value masked loads decode to


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def round_queries(z2d: torch.Tensor, precision: str) -> torch.Tensor:
    """The queries as the search sees them: ``bf16(z)`` or ``hi + lo``, returned as fp32.

    Shapes: z2d (Q, D) float -> (Q, D) float32.
    """
    _check_precision(precision)
    zf = z2d.to(torch.float32)
    hi = zf.to(torch.bfloat16).to(torch.float32)
    if precision == "bf16":
        return hi
    # hi and lo have disjoint significant bits, so their fp32 sum is exact.
    return hi + (zf - hi).to(torch.bfloat16).to(torch.float32)


def nearest_codes_reference(z2d: torch.Tensor, packed: torch.Tensor, E: torch.Tensor, dim: int, *,
                            precision: str = "bf16x2", max_chunk_elems: int = 1 << 23,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked torch search; temporaries stay O(max_chunk_elems + chunk of codes × dim).

    Shapes:
        z2d: (Q, dim) float;  packed: (N, ceil(dim/5)) uint8;  E: (N,) int8
        returns: ids (Q,) int64, dist (Q,) float32
    """
    zr = round_queries(z2d, precision)
    n_q, n_codes = zr.shape[0], packed.shape[0]
    device = zr.device
    best = torch.full((n_q,), math.inf, dtype=torch.float32, device=device)
    ids = torch.zeros(n_q, dtype=torch.int64, device=device)
    if n_q == 0:
        return ids, best
    q_chunk = min(n_q, 1024)
    c_chunk = max(1024, max_chunk_elems // q_chunk)
    for c0 in range(0, n_codes, c_chunk):
        c1 = min(n_codes, c0 + c_chunk)
        trits = unpack_trits(packed[c0:c1], dim).to(torch.float32)  # (C, dim)
        scale = exponent_to_scale(E[c0:c1])
        a = -2.0 * scale
        b = scale * scale * trits.abs().sum(dim=1)  # s² · nnz
        for q0 in range(0, n_q, q_chunk):
            q1 = min(n_q, q0 + q_chunk)
            scores = (zr[q0:q1] @ trits.T) * a + b  # (q, C)
            m, arg = scores.min(dim=1)  # documented: the first of equal minima, the smallest id
            better = m < best[q0:q1]  # strict: an earlier chunk keeps its tie
            best[q0:q1] = torch.where(better, m, best[q0:q1])
            ids[q0:q1] = torch.where(better, arg + c0, ids[q0:q1])
    dist = ((zr * zr).sum(dim=1) + best).clamp_min_(0.0)
    return ids, dist


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------

def _digit_planes(z2d: torch.Tensor, nb: int, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries laid out per base-3 digit: ``planes[q, j, b] = z[q, 5b + j]`` (0 past ``dim``).

    Returns (hi, lo), each (Q, 5, nb) bf16 contiguous; ``lo`` is ``hi`` itself for ``"bf16"``.
    """
    n_q, dim = z2d.shape
    zf = torch.nn.functional.pad(z2d.to(torch.float32), (0, nb * TRITS_PER_BYTE - dim))
    zf = zf.reshape(n_q, nb, TRITS_PER_BYTE).transpose(1, 2).contiguous()
    hi = zf.to(torch.bfloat16)
    if precision == "bf16":
        return hi, hi
    return hi, (zf - hi.to(torch.float32)).to(torch.bfloat16)


if triton is not None:

    @triton.jit
    def _next_digit(r, MAGIC_DECODE: tl.constexpr):
        """Peel the lowest base-3 digit off ``r``: returns (r // 3, digit - 1 as an fp32 trit).

        ``r`` is int32 or, with MAGIC_DECODE, an fp32 holding an integer in [0, 243): then
        ``r // 3`` is ``round((r - 1) / 3)`` through the 1.5·2**23 rounding constant, three
        FP32 adds/FMAs instead of an integer division and an int->float conversion.
        """
        if MAGIC_DECODE:
            rn = (r * 0.3333333333333333 - 0.3333333333333333 + 12582912.0) - 12582912.0
            return rn, r - rn * 3.0 - 1.0
        else:
            rn = r // 3
            return rn, (r - rn * 3 - 1).to(tl.float32)

    @triton.jit
    def _dot_digit(acc, h, lo, t, TWO_PASS: tl.constexpr, DOT_DTYPE: tl.constexpr):
        td = t.to(DOT_DTYPE)
        acc = tl.dot(h, td, acc)
        if TWO_PASS:
            acc = tl.dot(lo, td, acc)
        return acc

    @triton.jit
    def _query_planes(zh_ptr, zl_ptr, qi, NB: tl.constexpr, TWO_PASS: tl.constexpr):
        """Query ``qi``'s five digit planes in fp32, (NB,) each: ``hi + lo`` is exact (disjoint
        bits), and a trit times it is exact, so every path sums the same products."""
        zrow = qi.to(tl.int64) * (5 * NB) + tl.arange(0, NB)
        z0 = tl.load(zh_ptr + zrow).to(tl.float32)
        z1 = tl.load(zh_ptr + zrow + NB).to(tl.float32)
        z2 = tl.load(zh_ptr + zrow + 2 * NB).to(tl.float32)
        z3 = tl.load(zh_ptr + zrow + 3 * NB).to(tl.float32)
        z4 = tl.load(zh_ptr + zrow + 4 * NB).to(tl.float32)
        if TWO_PASS:
            z0 += tl.load(zl_ptr + zrow).to(tl.float32)
            z1 += tl.load(zl_ptr + zrow + NB).to(tl.float32)
            z2 += tl.load(zl_ptr + zrow + 2 * NB).to(tl.float32)
            z3 += tl.load(zl_ptr + zrow + 3 * NB).to(tl.float32)
            z4 += tl.load(zl_ptr + zrow + 4 * NB).to(tl.float32)
        return z0, z1, z2, z3, z4

    @triton.jit
    def _fma_dots(p, z0, z1, z2, z3, z4, MAGIC_DECODE: tl.constexpr):
        """(codes, NB) packed bytes against one query's planes: per code ``z·T`` and ``nnz(T)``,
        fp32 (codes,), by FMAs."""
        if MAGIC_DECODE:
            r = p.to(tl.float32)
        else:
            r = p.to(tl.int32)
        r, t0 = _next_digit(r, MAGIC_DECODE)
        dot = t0 * z0[None, :]
        nz = t0 * t0
        r, t1 = _next_digit(r, MAGIC_DECODE)
        dot += t1 * z1[None, :]
        nz += t1 * t1
        r, t2 = _next_digit(r, MAGIC_DECODE)
        dot += t2 * z2[None, :]
        nz += t2 * t2
        r, t3 = _next_digit(r, MAGIC_DECODE)
        dot += t3 * z3[None, :]
        nz += t3 * t3
        t4 = (r - 1).to(tl.float32)  # the last digit is what is left
        dot += t4 * z4[None, :]
        nz += t4 * t4
        nnz = tl.sum(nz, axis=1)  # before the dots: 64 registers at 128 codes x 4 warps, not 72
        return tl.sum(dot, axis=1), nnz

    @triton.jit
    def _load_codes(packed_ptr, E_ptr, codes, code_stop, NBYTES, NB: tl.constexpr, BYTES_IN_ROWS: tl.constexpr):
        """Packed bytes and scale exponents of ``codes``: (NB, codes) bytes for ``tl.dot``'s operand
        if BYTES_IN_ROWS, else (codes, NB); codes at or past ``code_stop`` and the padding bytes
        load as ZERO_TRITS_BYTE (121), which decodes to zero trits, and exponent 0."""
        kb = tl.arange(0, NB)
        cmask = codes < code_stop
        if BYTES_IN_ROWS:
            p = tl.load(packed_ptr + codes[None, :].to(tl.int64) * NBYTES + kb[:, None],
                        mask=(kb[:, None] < NBYTES) & cmask[None, :], other=121)
        else:
            p = tl.load(packed_ptr + codes[:, None].to(tl.int64) * NBYTES + kb[None, :],
                        mask=cmask[:, None] & (kb[None, :] < NBYTES), other=121)
        return p, tl.load(E_ptr + codes, mask=cmask, other=0)

    @triton.jit
    def _tile_min_kernel(zh_ptr, zl_ptr, packed_ptr, E_ptr, val_ptr, tile_ptr,
                         Q, N, NBYTES, n_tiles, tiles_per_split,
                         BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, NB: tl.constexpr,
                         TWO_PASS: tl.constexpr, E_STEP_C: tl.constexpr, DOT_DTYPE: tl.constexpr,
                         MAGIC_DECODE: tl.constexpr):
        pid_q = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        rmask = rows[:, None] < Q
        kb = tl.arange(0, NB)
        # digit plane j of the queries: (BLOCK_Q, NB), loaded once, reused for every tile
        zoff = rows[:, None].to(tl.int64) * (5 * NB) + kb[None, :]
        h0 = tl.load(zh_ptr + zoff, mask=rmask, other=0.0).to(DOT_DTYPE)
        h1 = tl.load(zh_ptr + zoff + NB, mask=rmask, other=0.0).to(DOT_DTYPE)
        h2 = tl.load(zh_ptr + zoff + 2 * NB, mask=rmask, other=0.0).to(DOT_DTYPE)
        h3 = tl.load(zh_ptr + zoff + 3 * NB, mask=rmask, other=0.0).to(DOT_DTYPE)
        h4 = tl.load(zh_ptr + zoff + 4 * NB, mask=rmask, other=0.0).to(DOT_DTYPE)
        if TWO_PASS:
            l0 = tl.load(zl_ptr + zoff, mask=rmask, other=0.0).to(DOT_DTYPE)
            l1 = tl.load(zl_ptr + zoff + NB, mask=rmask, other=0.0).to(DOT_DTYPE)
            l2 = tl.load(zl_ptr + zoff + 2 * NB, mask=rmask, other=0.0).to(DOT_DTYPE)
            l3 = tl.load(zl_ptr + zoff + 3 * NB, mask=rmask, other=0.0).to(DOT_DTYPE)
            l4 = tl.load(zl_ptr + zoff + 4 * NB, mask=rmask, other=0.0).to(DOT_DTYPE)
        else:
            l0, l1, l2, l3, l4 = h0, h1, h2, h3, h4
        cc = tl.arange(0, BLOCK_C)
        best = tl.full([BLOCK_Q], float("inf"), tl.float32)
        best_t = tl.full([BLOCK_Q], -1, tl.int32)
        t_start = pid_s * tiles_per_split
        t_stop = tl.minimum(t_start + tiles_per_split, n_tiles)
        # (NB, BLOCK_C) bytes: byte b of code c; padding bytes and codes past N (or past this
        # split) load as ZERO_TRITS_BYTE and decode to zero trits. The next tile's bytes and
        # scales are loaded one iteration ahead, so their latency hides behind this tile's work
        # (a program with BLOCK_Q = 256 fills an SM on its own: no other warps hide it).
        code_stop = tl.minimum(t_stop * BLOCK_C, N)  # end of this split's code range
        codes_next = t_start * BLOCK_C + cc
        p_next, e_next = _load_codes(packed_ptr, E_ptr, codes_next, code_stop, NBYTES, NB, True)
        for t in range(t_start, t_stop):
            codes = codes_next
            cmask = codes < N
            p = p_next
            e = e_next.to(tl.float32)
            codes_next = codes + BLOCK_C
            p_next, e_next = _load_codes(packed_ptr, E_ptr, codes_next, code_stop, NBYTES, NB, True)
            if MAGIC_DECODE:
                r = p.to(tl.float32)
            else:
                r = p.to(tl.int32)
            acc = tl.zeros([BLOCK_Q, BLOCK_C], dtype=tl.float32)
            r, t0 = _next_digit(r, MAGIC_DECODE)
            acc = _dot_digit(acc, h0, l0, t0, TWO_PASS, DOT_DTYPE)
            nz = t0 * t0
            r, t1 = _next_digit(r, MAGIC_DECODE)
            acc = _dot_digit(acc, h1, l1, t1, TWO_PASS, DOT_DTYPE)
            nz += t1 * t1
            r, t2 = _next_digit(r, MAGIC_DECODE)
            acc = _dot_digit(acc, h2, l2, t2, TWO_PASS, DOT_DTYPE)
            nz += t2 * t2
            r, t3 = _next_digit(r, MAGIC_DECODE)
            acc = _dot_digit(acc, h3, l3, t3, TWO_PASS, DOT_DTYPE)
            nz += t3 * t3
            t4 = (r - 1).to(tl.float32)  # the last digit is what is left
            acc = _dot_digit(acc, h4, l4, t4, TWO_PASS, DOT_DTYPE)
            nz += t4 * t4
            nnz = tl.sum(nz, axis=0)
            s = tl.exp2(e / E_STEP_C)
            b = tl.where(cmask, s * s * nnz, float("inf"))
            score = acc * (-2.0 * s)[None, :] + b[None, :]
            m = tl.min(score, axis=1)
            better = m < best  # strict: an earlier tile keeps a tie
            best = tl.where(better, m, best)
            best_t = tl.where(better, t, best_t)
        out = pid_s * Q + rows
        tl.store(val_ptr + out, best, mask=rows < Q)
        tl.store(tile_ptr + out, best_t, mask=rows < Q)

    @triton.jit
    def _tile_min_fma_kernel(zh_ptr, zl_ptr, packed_ptr, E_ptr, val_ptr, tile_ptr,
                             Q, N, NBYTES, n_tiles, tiles_per_split,
                             BLOCK_C: tl.constexpr, NB: tl.constexpr, TWO_PASS: tl.constexpr,
                             E_STEP_C: tl.constexpr, MAGIC_DECODE: tl.constexpr):
        """Phase 1 for a few queries: one query per program row, the same outputs as
        ``_tile_min_kernel``. The trits of a (BLOCK_C, NB) tile meet the query in fp32 FMAs
        instead of ``tl.dot``: no query padding to 16 rows, no operand layout conversions, and
        far fewer registers, so more programs share an SM."""
        qi = tl.program_id(0)
        pid_s = tl.program_id(1)
        z0, z1, z2, z3, z4 = _query_planes(zh_ptr, zl_ptr, qi, NB, TWO_PASS)
        cc = tl.arange(0, BLOCK_C)
        best = tl.full([], float("inf"), tl.float32)
        best_t = tl.full([], -1, tl.int32)
        t_start = pid_s * tiles_per_split
        t_stop = tl.minimum(t_start + tiles_per_split, n_tiles)
        code_stop = tl.minimum(t_stop * BLOCK_C, N)
        # (BLOCK_C, NB) bytes, each code's bytes contiguous; the next tile is loaded one
        # iteration ahead, as in _tile_min_kernel
        codes_next = t_start * BLOCK_C + cc
        p_next, e_next = _load_codes(packed_ptr, E_ptr, codes_next, code_stop, NBYTES, NB, False)
        for t in range(t_start, t_stop):
            codes = codes_next
            cmask = codes < N
            p = p_next
            e = e_next.to(tl.float32)
            codes_next = codes + BLOCK_C
            p_next, e_next = _load_codes(packed_ptr, E_ptr, codes_next, code_stop, NBYTES, NB, False)
            dots, nnz = _fma_dots(p, z0, z1, z2, z3, z4, MAGIC_DECODE)
            s = tl.exp2(e / E_STEP_C)
            score = tl.where(cmask, s * s * nnz - 2.0 * s * dots, float("inf"))
            m = tl.min(score, axis=0)
            better = m < best  # strict: an earlier tile keeps a tie
            best = tl.where(better, m, best)
            best_t = tl.where(better, t, best_t)
        tl.store(val_ptr + pid_s * Q + qi, best)
        tl.store(tile_ptr + pid_s * Q + qi, best_t)

    @triton.jit
    def _refine_kernel(zh_ptr, zl_ptr, packed_ptr, E_ptr, val_ptr, tile_ptr, ids_ptr, dist_ptr,
                       Q, N, NBYTES, n_splits,
                       BLOCK_C: tl.constexpr, NB: tl.constexpr, TWO_PASS: tl.constexpr,
                       E_STEP_C: tl.constexpr, BLOCK_S: tl.constexpr):
        qi = tl.program_id(0)
        # the best split, BLOCK_S splits per load: a small query batch has hundreds of splits,
        # and one dependent load per split would cost more than the scan (ties: the earlier
        # split, i.e. the smaller ids)
        sidx = tl.arange(0, BLOCK_S)
        v = tl.load(val_ptr + sidx * Q + qi, mask=sidx < n_splits, other=float("inf"))
        best = tl.min(v, axis=0)
        best_s = tl.min(tl.where(v == best, sidx, n_splits), axis=0)
        for s0 in range(BLOCK_S, n_splits, BLOCK_S):
            sidx = s0 + tl.arange(0, BLOCK_S)
            v = tl.load(val_ptr + sidx * Q + qi, mask=sidx < n_splits, other=float("inf"))
            m = tl.min(v, axis=0)
            first = tl.min(tl.where(v == m, sidx, n_splits), axis=0)
            better = m < best  # strict: an earlier chunk keeps a tie
            best = tl.where(better, m, best)
            best_s = tl.where(better, first, best_s)
        best_t = tl.maximum(tl.load(tile_ptr + best_s * Q + qi), 0)
        cc = tl.arange(0, BLOCK_C)
        codes = best_t * BLOCK_C + cc
        cmask = codes < N
        p, e = _load_codes(packed_ptr, E_ptr, codes, N, NBYTES, NB, False)
        z0, z1, z2, z3, z4 = _query_planes(zh_ptr, zl_ptr, qi, NB, TWO_PASS)
        zn = tl.sum(z0 * z0 + z1 * z1 + z2 * z2 + z3 * z3 + z4 * z4, axis=0)
        dots, nnz = _fma_dots(p, z0, z1, z2, z3, z4, False)
        s = tl.exp2(e.to(tl.float32) / E_STEP_C)
        score = tl.where(cmask, s * s * nnz - 2.0 * s * dots, float("inf"))
        m = tl.min(score, axis=0)
        idx = tl.min(tl.where(score == m, codes, N), axis=0)
        tl.store(ids_ptr + qi, idx.to(tl.int64))
        tl.store(dist_ptr + qi, tl.maximum(zn + m, 0.0))


def _interpreting() -> bool:
    # Triton 3.9's interpreter multiplies bf16 dot operands as raw uint16 bits, so under
    # TRITON_INTERPRET=1 the dot runs on fp32 copies: bf16 values and trits are exact in fp32,
    # so it is the same exact products either way.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter runs on CPU tensors: any small grid will do


def _choose_splits(n_qblocks: int, n_tiles: int, sms: int, waves: int, min_tiles: int = 8) -> int:
    """Code-range pieces per query block: at least ``waves`` waves of programs over the SMs,
    and among up to twice that many, the count whose last wave is fullest (at most one
    program per SM fits with large query blocks, so a nearly empty last wave costs a whole
    wave)."""
    low = max(1, triton.cdiv(waves * sms, n_qblocks))
    high = max(low, min(2 * low, n_tiles // min_tiles))
    low = min(low, high)

    def waste(s: int) -> float:
        programs = n_qblocks * s
        return triton.cdiv(programs, sms) * sms / programs

    return min(range(low, high + 1), key=lambda s: (waste(s), s))


REFINE_BLOCK_S = 256  # splits the refine kernel compares per load
SMALL_BATCH_QUERIES = 16  # up to this many queries (a decode step's) take the small tile


def default_search_tile(n_queries: int) -> tuple[int, int, int]:
    """(block_q, block_c, num_warps) of the search for a batch of ``n_queries``.

    Batches of training size take 512 queries × 64 codes with 16 warps, the fastest tile that
    ``experiments/bench_vq.py`` swept at 8,192 queries on an H100 (2026-11-27): decoding a code
    tile is shared by the queries of the block, so large blocks decode less per query. A decode
    step searches 1 to 16 queries; in a 512-row block all but those rows are padding that the
    tensor cores multiply anyway (at 10M codes a batch-1 search was 4.2 ms of default_3b's 10 ms
    decode step, H100, 2026-12-07, ``experiments/decode_kernels.py``), so small batches take the
    smallest block ``tl.dot`` allows, with more codes per tile to keep the loads wide.
    """
    if n_queries <= SMALL_BATCH_QUERIES:
        return 16, 128, 4
    return 512, 64, 16


def nearest_codes_triton(z2d: torch.Tensor, packed: torch.Tensor, E: torch.Tensor, dim: int, *,
                         precision: str = "bf16x2", block_q: int | None = None, block_c: int | None = None,
                         num_warps: int | None = None, num_stages: int = 2, splits: int | None = None,
                         waves: int = 4, magic_decode: bool = True, phase1: str = "dot",
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the two-phase Triton search (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    ``phase1`` picks the tile-minimum kernel: ``"dot"`` (``_tile_min_kernel``, tensor cores over
    ``block_q`` queries at a time) or ``"fma"`` (``_tile_min_fma_kernel``, one query per
    program row; ``block_q`` must stay None, ``block_c`` defaults to 128 and ``num_warps`` to
    4). Both feed the same refine kernel. ``"dot"`` stays the default at every batch size: at
    one query the two take the same time, at 2 and 16 queries the fma kernel is slower
    (H100, 2026-12-07, ``experiments/bench_vq.py --skip sweep table step``; docs/kernels.md).

    ``splits`` (code-range pieces per query block) defaults to at least ``waves`` waves of
    programs over the device's SMs, with a full last wave where possible (``_choose_splits``).
    ``block_q``, ``block_c`` and ``num_warps`` left as None take :func:`default_search_tile`'s
    (the fixed-point "magic" decode is the default of both tiles).

    Shapes: as :func:`nearest_codes_reference`.
    """
    if triton is None:
        raise RuntimeError("nearest_codes_triton needs Triton, which is not importable here")
    _check_precision(precision)
    if phase1 not in PHASE1_KERNELS:
        raise ValueError(f"phase1 must be one of {PHASE1_KERNELS}, got {phase1!r}")
    if phase1 == "fma" and block_q is not None:
        raise ValueError(f"block_q applies to phase1='dot' only (the fma kernel takes one query per row), got {block_q!r}")
    n_q, n_codes, nbytes = z2d.shape[0], packed.shape[0], packed.shape[1]
    device = z2d.device
    ids = torch.empty(n_q, dtype=torch.int64, device=device)
    dist = torch.empty(n_q, dtype=torch.float32, device=device)
    if n_q == 0:
        return ids, dist
    tile = (1, 128, 4) if phase1 == "fma" else default_search_tile(n_q)
    block_q = tile[0] if block_q is None else block_q
    block_c = tile[1] if block_c is None else block_c
    num_warps = tile[2] if num_warps is None else num_warps
    nb = max(16, triton.next_power_of_2(nbytes))
    hi, lo = _digit_planes(z2d, nb, precision)
    packed = packed.contiguous()
    n_tiles = triton.cdiv(n_codes, block_c)
    n_qblocks = triton.cdiv(n_q, block_q)
    if splits is None:
        splits = _choose_splits(n_qblocks, n_tiles, _sm_count(device), waves)
    splits = max(1, min(int(splits), n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)  # no empty pieces
    vals = torch.empty(splits, n_q, dtype=torch.float32, device=device)
    tiles = torch.empty(splits, n_q, dtype=torch.int32, device=device)
    two_pass = precision == "bf16x2"
    if phase1 == "fma":
        _tile_min_fma_kernel[(n_q, splits)](
            hi, lo, packed, E, vals, tiles, n_q, n_codes, nbytes, n_tiles, tiles_per_split,
            BLOCK_C=block_c, NB=nb, TWO_PASS=two_pass, E_STEP_C=E_STEP, MAGIC_DECODE=magic_decode,
            num_warps=num_warps, num_stages=num_stages)
    else:
        _tile_min_kernel[(n_qblocks, splits)](
            hi, lo, packed, E, vals, tiles, n_q, n_codes, nbytes, n_tiles, tiles_per_split,
            BLOCK_Q=block_q, BLOCK_C=block_c, NB=nb, TWO_PASS=two_pass, E_STEP_C=E_STEP,
            DOT_DTYPE=tl.float32 if _interpreting() else tl.bfloat16, MAGIC_DECODE=magic_decode,
            num_warps=num_warps, num_stages=num_stages)
    _refine_kernel[(n_q,)](
        hi, lo, packed, E, vals, tiles, ids, dist, n_q, n_codes, nbytes, splits,
        BLOCK_C=block_c, NB=nb, TWO_PASS=two_pass, E_STEP_C=E_STEP, BLOCK_S=REFINE_BLOCK_S, num_warps=4)
    return ids, dist


# --------------------------------------------------------------------------------------------
# custom op and checked entry point
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("ternary_graph::nearest_codes", mutates_args=())
def nearest_codes_op(z2d: torch.Tensor, packed: torch.Tensor, E: torch.Tensor, dim: int,
                     precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    if z2d.is_cuda:
        return nearest_codes_triton(z2d, packed, E, dim, precision=precision)
    return nearest_codes_reference(z2d, packed, E, dim, precision=precision)


@nearest_codes_op.register_fake
def _(z2d, packed, E, dim, precision):
    n_q = z2d.shape[0]
    return z2d.new_empty(n_q, dtype=torch.int64), z2d.new_empty(n_q, dtype=torch.float32)


def check_search_args(z: torch.Tensor, packed: torch.Tensor, E: torch.Tensor, dim: int) -> None:
    """Shape / dtype / device checks (and finiteness of ``z``) shared by every entry point."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if not z.dtype.is_floating_point:
        raise TypeError(f"z must be a float tensor, got dtype={z.dtype}")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if z.dim() < 1 or z.shape[-1] != dim:
        raise ValueError(f"z must have last dimension dim={dim}, got shape {tuple(z.shape)}")
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != packed_cols(dim):
        raise ValueError(f"packed must be uint8 of shape (N, {packed_cols(dim)}), "
                         f"got dtype={packed.dtype} shape={tuple(packed.shape)}")
    if packed.shape[0] < 1:
        raise ValueError("packed must hold at least one code, got 0 rows")
    if E.dtype != torch.int8 or tuple(E.shape) != (packed.shape[0],):
        raise ValueError(f"E must be int8 of shape ({packed.shape[0]},), got dtype={E.dtype} shape={tuple(E.shape)}")
    for name, t in (("packed", packed), ("E", E)):
        if t.device != z.device:
            raise ValueError(f"{name} is on {t.device} but z is on {z.device}")
    check_finite(z, "z")


def nearest_codes(z: torch.Tensor, packed: torch.Tensor, E: torch.Tensor, dim: int, *,
                  precision: str = "bf16x2") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest scaled ternary code of every query (see the module docstring).

    Shapes:
        z: (..., dim) float, finite;  packed: (N, ceil(dim/5)) uint8;  E: (N,) int8
        returns: ids (...) int64 in [0, N), dist (...) float32 (squared L2 to that code)
    Raises ValueError for non-finite ``z`` (a NaN would otherwise pick an arbitrary code).
    """
    check_search_args(z, packed, E, dim)
    _check_precision(precision)
    z2d = z.detach().reshape(-1, dim)
    ids, dist = nearest_codes_op(z2d, packed, E, dim, precision)
    return ids.reshape(z.shape[:-1]), dist.reshape(z.shape[:-1])
