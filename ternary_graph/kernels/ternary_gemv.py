"""Decode-time GEMV over a 2-bit inference copy of ternary weights: ``y = x · (T ⊙ s)ᵀ`` for M <= 16.

The training state stays base-3 packed (5 trits per byte, ``ternary/packing.py``). For decoding,
:func:`pack_2bit` repacks it once into a layout whose trits come out of a word with one shift and
one bitwise op, and :class:`DecodeWeights` holds that copy (plus a copy of ``E`` and a small
split-K workspace). Nothing here is module state: the nn layers keep the copy as a plain
attribute and drop it when training resumes.

Layout ("2-bit planar"). ``words`` is (R, KW) int32. Columns are cut into blocks of ``16·L``
(``L = plane_words``, a power of two in {8, 16, 32}, chosen per layer by
:func:`choose_plane_words` to keep row padding small); block ``b`` holds ``L`` words per row, and
bits ``2i, 2i+1`` of word ``j`` of block ``b`` hold ``d = t + 1`` (0, 1, 2) of column
``b·16L + i·L + j``. So field ``i`` of the ``L`` words of a block is a contiguous run of ``L``
columns (a "plane"): the kernels load each plane's activations as one contiguous vector.
Padding columns (up to the block boundary) hold d = 1, i.e. zero trits. KW = ceil(K / 16L)·L.

Decoding without any int→float conversion (the float's mantissa *is* the 2-bit field):
  * ``fma`` (M = 1 .. 16, one program per activation row; also the stacked experts): shift the
    word so that a nibble (fields 2h, 2h+1) lands at bits 19..22, then
    ``bitcast(0x3F800000 | (v & 0x180000)) = 1 + d/16`` and ``bitcast(0x3F800000 | (v & 0x600000))
    = 1 + d/4``: one shift per two trits, one LOP3 + one FFMA per trit. The chains start at
    ``-Σx`` of their columns, so they accumulate ``d·x/16`` (resp. ``/4``) nearly exactly; the
    program adds ``16·chain_a + 4·chain_b`` (= Σ d·x) and finally subtracts Σ x (t = d - 1).
  * ``dot`` (M <= 16 in one tile, 16-bit activations, tensor cores): one shift + one AND/OR of a
    word gives two bf16 (fp16) values ``1 + d/4`` at once, fields p and p+8 in the low and high
    halves; ``tl.interleave`` makes them a (BN, 2·BW) operand and ``tl.dot`` multiplies it with
    the matching (2·BW, 16) activation tile (rows past M are zeros). y = 4·acc - 5·Σx.
  * ``dot1``: as ``dot`` but one field per 16-bit element and one dot per field (no interleave).
  * ``i8`` (one program per activation row, 16-bit activations, one group): a small kernel packs
    the activations as per-row 16-bit fixed point, signed high and unsigned low bytes four per
    word (:func:`pack_x16`); ``(w >> 2j) & 0x03030303`` puts four fields of a word in four bytes,
    and two dp4a multiply them by their four activations into exact int32 sums (no float decode,
    and half the ALU work of ``fma``). Its result is the exact product with the fixed-point
    activations (:func:`gemv_x16_reference`), within ``sx/2·Σ|t|·s`` of the float one.
  * ``i8f``: ``i8`` in one launch. Each program quantises its own K slice of the row with that
    slice's absmax (a finer scale than the row's), writes the packed words to a buffer of its own
    (shared ones made the row blocks contend for L2 lines), and runs the ``i8`` loop over them: no pack
    kernel to launch and wait for, at the cost of re-reading x's slice once per row block.
The row scale ``2^(E/4)`` is applied once per output, after the reduction.

Split-K. When the N blocks alone give too few programs to keep the GPU's memory system busy, the
K range is split over programs. Partial sums meet in a float32 workspace by atomic adds; a per
tile counter (atomic, acq_rel) tells the last program of a tile, which reads the sum, scales
and stores y, and puts the workspace and the counter back to zero. So one launch does it all
(no memset and no second kernel: at ~5 µs per GEMV a launch costs as much as the work), and
the workspace is clean after every launch. :class:`DecodeWeights` owns one workspace per
layer, so layers never share one.

Layers of this file: the pure-torch layout functions and references (:func:`pack_2bit`,
:func:`unpack_2bit`, :func:`gemv_2bit_reference`, :func:`pack_x16`, :func:`gemv_x16_reference`);
the Triton kernels and their launcher :func:`gemv_2bit_triton` (defined when Triton is
importable); the ``torch.library`` op ``ternary_graph::decode_gemv`` with a fake implementation
(CPU tensors take the reference); :class:`DecodeWeights`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ternary.packing import check_packed, unpack_trits
from ..ternary.state import exponent_to_scale
from ._triton import HAS_TRITON, check_kernel_tensors, interpreting, tl, triton

TRITS_PER_WORD = 16
PLANE_WORD_CHOICES = (32, 16, 8)  # tried largest first by choose_plane_words
DECODE_MAX_M = 16  # activation rows the decode path takes (the layers fall back above it)
MIN_BN = 16  # smallest row block of any kernel: the split-K counters are sized for it
VARIANTS = ("auto", "fma", "dot", "dot1", "i8", "i8f")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Which kernel "auto" takes, from experiments/bench_decode.py (docs/kernels.md): at M <= 2 with
# 16-bit activations and one group "i8f" (H100, 2026-12-05: 2.36-3.94x bf16 at M = 1 where "fma"
# gives 1.64-2.46x in the same run; H100, 2026-12-06, 8192^2, M = 2: 20.5 us against dot1's 24.8,
# bench_decode_i8f_auto2_h100_2026-12-06.log); for 3 <= M <= 16 "dot1" (H200: 1.22-1.58x, where "fma", one
# program per row, falls to 0.19x at M = 16, and "i8f" re-reads the words per row), or "dot" where
# the planes are too narrow for "dot1" (plane_words 8: K = 1120, say); fp32 and groups take "fma".
DEFAULT_FEW_M = "i8f"
FEW_M_MAX = 2  # rows of x up to which "auto" takes DEFAULT_FEW_M
DEFAULT_FALLBACK = "fma"
DEFAULT_SMALL_M = "dot1"
DEFAULT_SMALL_M_NARROW = "dot"
# BN rows x BW words per step, warps, and the split-K target: programs per SM.
FMA_CONFIG = dict(BN=64, BW=32, warps=4, per_sm=8)
DOT_CONFIG = dict(BN=64, BW=32, warps=4, per_sm=4)
I8_CONFIG = dict(BN=64, BW=32, warps=4, per_sm=4)  # sm4 16.9 µs vs sm8 18.6 at 8192², H200
I8F_CONFIG = dict(BN=64, BW=32, warps=4, per_sm=4)  # the H100 sweep's best at 8192² (bench_decode_i8f_private_h100.log)
PACK_BLOCK = 8192  # activations per step of the i8 variant's x pack (a whole 8192-wide row: 32 per thread)
EARLY_CHOICES = (0, 1, 2, 4)  # "i8f": K steps of words loaded before the activation pack (one tile)
CONFIG_KEYS = ("BN", "BW", "warps", "per_sm", "split", "stages", "maxnreg", "early", "prefetch")
PREFETCH_VARIANTS = ("fma", "i8f")  # kernels that can ask L2 for their word slice up front (config prefetch)
X16_MAX = 32767  # "i8": activations as 16-bit fixed point, x ≈ sx · (256·hi + lo), |256·hi + lo| <= X16_MAX
X16_ABSMAX_FLOOR = 2.0 ** -100  # keeps X16_MAX / absmax finite (all-zero rows quantise to zeros, not NaN)
_CHUNK_ELEMENTS = 1 << 22  # trits repacked per step by pack_2bit (bounds its int64 temporaries)


# --------------------------------------------------------------------------------------------
# layout: pure functions
# --------------------------------------------------------------------------------------------
def _check_plane_words(plane_words: int) -> None:
    if plane_words not in PLANE_WORD_CHOICES:
        raise ValueError(f"plane_words must be one of {PLANE_WORD_CHOICES}, got {plane_words!r}")


def choose_plane_words(in_features: int) -> int:
    """The largest ``L`` in PLANE_WORD_CHOICES whose row padding (to a multiple of 16·L columns)
    stays within 1/16 of ``in_features``; the smallest choice if none does."""
    if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    for L in PLANE_WORD_CHOICES:
        block = TRITS_PER_WORD * L
        if -(-in_features // block) * block - in_features <= in_features // 16:
            return L
    return PLANE_WORD_CHOICES[-1]


def words_per_row(in_features: int, plane_words: int) -> int:
    """KW: int32 words per row of the 2-bit layout (a multiple of ``plane_words``)."""
    _check_plane_words(plane_words)
    block = TRITS_PER_WORD * plane_words
    return -(-in_features // block) * plane_words


def _as_int32(w: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit words -> the same bits as int32 (read as signed, so the cast is exact)."""
    return (w - ((w >> 31) & 1) * (1 << 32)).to(torch.int32)


def _field_shifts(device: torch.device) -> torch.Tensor:
    return (2 * torch.arange(TRITS_PER_WORD, dtype=torch.int64, device=device)).view(1, 1, TRITS_PER_WORD, 1)


def pack_2bit(packed: torch.Tensor, in_features: int, *, plane_words: int | None = None) -> torch.Tensor:
    """Repack base-3 trits into the 2-bit planar layout (see the module docstring).

    Shapes: packed (R, ceil(K/5)) uint8 -> (R, KW) int32, KW = :func:`words_per_row`.
    Works ``_CHUNK_ELEMENTS`` trits at a time, so temporaries stay bounded whatever R is.
    """
    L = choose_plane_words(in_features) if plane_words is None else plane_words
    _check_plane_words(L)
    if not isinstance(packed, torch.Tensor) or packed.dim() != 2:
        got = f"shape {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {got}")
    check_packed(packed, in_features, check_values=packed.device.type == "cpu")
    R = packed.shape[0]
    KW = words_per_row(in_features, L)
    nb = KW // L
    padded = nb * TRITS_PER_WORD * L
    words = torch.empty(R, KW, dtype=torch.int32, device=packed.device)
    if packed.device.type == "meta" or R == 0:
        return words
    shifts = _field_shifts(packed.device)
    chunk = max(1, _CHUNK_ELEMENTS // padded)
    for r0 in range(0, R, chunk):
        r1 = min(R, r0 + chunk)
        d = unpack_trits(packed[r0:r1], in_features).to(torch.int64) + 1
        d = torch.nn.functional.pad(d, (0, padded - in_features), value=1)  # zero trits
        w = (d.view(r1 - r0, nb, TRITS_PER_WORD, L) << shifts).sum(dim=2)  # disjoint bit fields: sum == or
        words[r0:r1] = _as_int32(w.reshape(r1 - r0, KW))
    return words


def unpack_2bit(words: torch.Tensor, in_features: int, plane_words: int) -> torch.Tensor:
    """Inverse of :func:`pack_2bit`. Shapes: (R, KW) int32 -> (R, in_features) int8 trits."""
    _check_plane_words(plane_words)
    KW = words_per_row(in_features, plane_words)
    if words.dtype != torch.int32 or words.dim() != 2 or words.shape[1] != KW:
        raise ValueError(f"words must be int32 of shape (R, {KW}) for in_features={in_features}, "
                         f"plane_words={plane_words}; got dtype={words.dtype} shape={tuple(words.shape)}")
    R = words.shape[0]
    nb = KW // plane_words
    w = (words.to(torch.int64) & 0xFFFFFFFF).view(R, nb, 1, plane_words)
    d = (w >> _field_shifts(words.device)) & 3
    return (d - 1).reshape(R, nb * TRITS_PER_WORD * plane_words)[:, :in_features].to(torch.int8)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _group_bounds(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    ends = offsets.tolist()
    return [(g, a, b) for g, (a, b) in enumerate(zip([0] + ends[:-1], ends)) if b > a]


def gemv_2bit_reference(x2d: torch.Tensor, words: torch.Tensor, E: torch.Tensor, in_features: int,
                        plane_words: int, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch oracle: unpack, matmul, scale. Shapes: x2d (M, K), words (G·N, KW), E (G·N,),
    offsets None or (G,) cumulative row counts (rows sorted by group) -> (M, N) in x2d's dtype."""
    cdt = _compute_dtype(x2d.dtype)
    trits = unpack_2bit(words, in_features, plane_words).to(cdt)
    scale = exponent_to_scale(E, cdt)
    if offsets is None:
        return ((x2d.to(cdt) @ trits.T) * scale).to(x2d.dtype)
    G = offsets.shape[0]
    N = words.shape[0] // G
    y = x2d.new_zeros(x2d.shape[0], N)
    for g, a, b in _group_bounds(offsets):
        rows = slice(g * N, (g + 1) * N)
        y[a:b] = ((x2d[a:b].to(cdt) @ trits[rows].T) * scale[rows]).to(x2d.dtype)
    return y


def _x16(x2d: torch.Tensor, slice_cols: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """16-bit fixed point: (x16 int32 (M, K), sx float32 (M, S)) with x ≈ sx·x16, one scale per
    row (S = 1) or, with ``slice_cols``, per run of ``slice_cols`` columns of a row (the "i8f"
    variant's K slices; S = ceil(K / slice_cols)). Rounds half away from zero, as the kernels do."""
    xf = x2d.float()
    M, K = xf.shape
    width = K if slice_cols is None else slice_cols
    S = -(-K // width)
    padded = torch.nn.functional.pad(xf, (0, S * width - K)).view(M, S, width)
    absmax = padded.abs().amax(dim=2).clamp_min(X16_ABSMAX_FLOOR)
    v = (padded * (X16_MAX / absmax)[:, :, None]).reshape(M, S * width)[:, :K]
    x16 = torch.where(v >= 0, v + 0.5, v - 0.5).to(torch.int32).clamp_(-X16_MAX, X16_MAX)
    return x16, absmax / X16_MAX


def pack_x16(x2d: torch.Tensor, in_features: int, plane_words: int) -> dict[str, torch.Tensor]:
    """The "i8" variant's activations: 16-bit fixed point split into signed high and unsigned low
    bytes, four per int32 word in the byte order the 2-bit words decode in.

    Word ``q = b·4L + j·L + c`` of a row holds, in byte ``i``, column ``b·16L + (4i + j)·L + c``:
    the column of field ``4i + j`` of word c of block b, which ``(w >> 2j) & 0x03030303`` puts in
    byte i. So one dp4a of the two words multiplies four trits by their four activations.

    Shapes: x2d (M, K) -> hi, lo (M, 4·KW) int32, sx (M,) float32, xsum (M,) int32 (Σ of x16).
    """
    _check_plane_words(plane_words)
    if not isinstance(x2d, torch.Tensor) or x2d.dim() != 2 or x2d.shape[1] != in_features:
        got = f"shape {tuple(x2d.shape)}" if isinstance(x2d, torch.Tensor) else type(x2d).__name__
        raise ValueError(f"x must have shape (M, in_features={in_features}), got {got}")
    L = plane_words
    KW = words_per_row(in_features, L)
    x16, sx = _x16(x2d)
    sx = sx[:, 0]
    M = x2d.shape[0]
    cols = torch.nn.functional.pad(x16, (0, KW * TRITS_PER_WORD - in_features))  # zeros up to the block end
    f = cols.view(M, KW // L, 4, 4, L)  # (row, block, byte i, j, c): column b·16L + (4i + j)·L + c
    hi = torch.zeros(M, KW // L, 4, L, dtype=torch.int64, device=x2d.device)
    lo = torch.zeros_like(hi)
    for i in range(4):
        v = f[:, :, i].to(torch.int64)
        hi |= ((v >> 8) & 0xFF) << (8 * i)
        lo |= (v & 0xFF) << (8 * i)
    return dict(hi=_as_int32(hi.reshape(M, 4 * KW)), lo=_as_int32(lo.reshape(M, 4 * KW)), sx=sx,
                xsum=x16.sum(dim=1, dtype=torch.int64).to(torch.int32))


def gemv_x16_reference(x2d: torch.Tensor, words: torch.Tensor, E: torch.Tensor, in_features: int,
                       plane_words: int, *, slice_words: int | None = None) -> torch.Tensor:
    """Oracle of the "i8" and "i8f" variants: the exact product of the trits with the fixed-point
    activations, ``Σ_slices sx · Σ t·x16``, scaled per row. "i8" quantises each row with one
    scale (``slice_words=None``); "i8f" each K slice of ``slice_words`` words (16 columns per
    word) with its own (:func:`i8f_slice_words` says which).
    Shapes: x2d (M, K), words (N, KW), E (N,) -> (M, N) in x2d's dtype."""
    if slice_words is not None and (not isinstance(slice_words, int) or isinstance(slice_words, bool)
                                    or slice_words < 1 or slice_words % plane_words):
        raise ValueError(f"slice_words must be a positive multiple of plane_words={plane_words}, got {slice_words!r}")
    slice_cols = None if slice_words is None else TRITS_PER_WORD * slice_words
    x16, sx = _x16(x2d, slice_cols)
    trits = unpack_2bit(words, in_features, plane_words).to(torch.float64)
    width = in_features if slice_cols is None else slice_cols
    y = torch.zeros(x2d.shape[0], words.shape[0], dtype=torch.float64, device=x2d.device)
    for s_i, c0 in enumerate(range(0, in_features, width)):
        part = x16[:, c0:c0 + width].to(torch.float64) @ trits[:, c0:c0 + width].T
        y += part * sx[:, s_i].double()[:, None]
    return (y * exponent_to_scale(E, torch.float64)).to(x2d.dtype)


def auto_variant(M: int, plane_words: int, dtype: torch.dtype, grouped: bool) -> str:
    """The kernel ``variant="auto"`` takes for M rows of ``dtype`` activations: the fixed-point
    dp4a kernel "i8f" for M <= FEW_M_MAX, a dot kernel up to DECODE_MAX_M, "fma" for fp32, for
    groups and above DECODE_MAX_M (the kernels that refuse those)."""
    if grouped or dtype == torch.float32 or M > DECODE_MAX_M:
        return DEFAULT_FALLBACK
    if M <= FEW_M_MAX:
        return DEFAULT_FEW_M
    return DEFAULT_SMALL_M_NARROW if plane_words < 16 else DEFAULT_SMALL_M  # dot1's planes: dots of K >= 16


def check_gemv_args(x2d: torch.Tensor, words: torch.Tensor, E: torch.Tensor, in_features: int, plane_words: int,
                    offsets: torch.Tensor | None = None) -> tuple[int, int, int]:
    """Validate shapes and dtypes (never values: that would sync the host); returns (M, N, G)."""
    if not isinstance(x2d, torch.Tensor) or x2d.dim() != 2 or x2d.shape[1] != in_features:
        got = f"shape {tuple(x2d.shape)}" if isinstance(x2d, torch.Tensor) else type(x2d).__name__
        raise ValueError(f"x must have shape (M, in_features={in_features}), got {got}")
    if x2d.dtype not in KERNEL_DTYPES + (torch.float64,):
        raise TypeError(f"x must be float32 / bfloat16 / float16 / float64, got dtype={x2d.dtype}")
    KW = words_per_row(in_features, plane_words)
    if not isinstance(words, torch.Tensor) or words.dtype != torch.int32 or words.dim() != 2 or words.shape[1] != KW:
        got = f"dtype={words.dtype} shape={tuple(words.shape)}" if isinstance(words, torch.Tensor) else type(words).__name__
        raise ValueError(f"words must be int32 of shape (R, {KW}) (in_features={in_features}, "
                         f"plane_words={plane_words}), got {got}")
    if not isinstance(E, torch.Tensor) or E.dtype != torch.int8 or tuple(E.shape) != (words.shape[0],):
        got = f"dtype={E.dtype} shape={tuple(E.shape)}" if isinstance(E, torch.Tensor) else type(E).__name__
        raise ValueError(f"E must be int8 of shape ({words.shape[0]},), got {got}")
    G = 1
    if offsets is not None:
        if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.dtype not in (torch.int32, torch.int64):
            got = f"dtype={offsets.dtype} shape={tuple(offsets.shape)}" if isinstance(offsets, torch.Tensor) \
                else type(offsets).__name__
            raise ValueError(f"offsets must be a 1-D int32/int64 tensor of cumulative row counts, got {got}")
        G = offsets.shape[0]
        if G < 1 or words.shape[0] % G:
            raise ValueError(f"words has {words.shape[0]} rows, which do not split into {G} groups (offsets)")
    return x2d.shape[0], words.shape[0] // G, G


# --------------------------------------------------------------------------------------------
# Triton kernels and launcher (defined only where Triton is importable)
# --------------------------------------------------------------------------------------------
if HAS_TRITON:
    from .ternary_linear_triton import _row_scale

    _F32_ONE = tl.constexpr(0x3F800000)  # bits of 1.0f: OR-ing 2 bits into its mantissa gives 1 + d·2^(p-23)
    _X16_MAX = tl.constexpr(X16_MAX)
    _X16_ABSMAX_FLOOR = tl.constexpr(X16_ABSMAX_FLOOR)

    @triton.jit
    def _shift(v, s: tl.constexpr):
        """``v << s`` for s >= 0, ``v >> -s`` otherwise (the bits kept are masked by the caller)."""
        if s >= 0:
            r = v << s
        else:
            r = v >> (-s)
        return r

    @triton.jit
    def _load_vec(ptrs, cols, K, EVEN: tl.constexpr):
        """float32 activations at ``cols`` (zeros past K unless every column is known in range)."""
        if EVEN:
            v = tl.load(ptrs)
        else:
            v = tl.load(ptrs, mask=cols < K, other=0.0)
        return v.to(tl.float32)

    @triton.jit
    def _load_words(w_rows, wi, n_ok, KW, EVEN: tl.constexpr):
        """One K step's (BN, BW) word tile: zeros for rows past N and, unless every word of every
        step is in range (EVEN), for words past KW."""
        if EVEN:
            wd = tl.load(w_rows + wi[None, :], mask=n_ok[:, None], other=0)
        else:
            wd = tl.load(w_rows + wi[None, :], mask=n_ok[:, None] & (wi[None, :] < KW), other=0)
        return wd

    @triton.jit
    def _row_block(w_ptr, pid_n, N, stride_w8, BN: tl.constexpr):
        """Rows of row block ``pid_n``: (offsets, in range, int64 rows, row pointers). rows ·
        (stride/8) · 8: the literal factor tells the compiler every row is 32-byte aligned, so the
        word tiles load as 16-byte vectors."""
        offs_n = pid_n * BN + tl.arange(0, BN)
        rows = offs_n.to(tl.int64)
        return offs_n, offs_n < N, rows, w_ptr + rows[:, None] * (stride_w8 * 8)

    @triton.jit
    def _prefetch_slice(w_ptr, offs_n, N, row0, stride_w8, w_start, n_it, KW, BW: tl.constexpr, ASM: tl.constexpr):
        """Start copying the program's word slice (rows ``row0 + offs_n``, clamped to the block's N
        rows; ``n_it`` steps of BW words from ``w_start``, cut at KW) into L2 with
        ``cp.async.bulk.prefetch`` (sm_90): a hint that holds no registers and changes no result,
        so the slice streams from memory while the program does other work (the activation pack
        of "i8f") and its loop's loads find it in L2. Rows start 32-byte aligned and slices begin
        and end on multiples of 8 words (plane_words >= 8), the 16-byte alignment the instruction
        needs. The interpreter skips it (no PTX there)."""
        if ASM:
            rows = tl.minimum(offs_n, N - 1).to(tl.int64) + row0
            ptrs = w_ptr + rows * (stride_w8 * 8) + w_start
            nbytes = tl.zeros(rows.shape, dtype=tl.int32) + 4 * tl.minimum(n_it * BW, KW - w_start)
            tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                                      [ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _finish(part, scale, y_ptrs, ws_ptrs, mask, cnt_ptr, n_split, SPLIT: tl.constexpr):
        """Store ``part·scale``, or, split over K, add the partial into the workspace; the tile's
        last program (counter) stores the total and resets workspace and counter to zero."""
        if SPLIT:
            tl.atomic_add(ws_ptrs, part, mask=mask)  # acq_rel, gpu scope (Triton's default)
            # every thread's partial add precedes the counter increment (one thread performs it)
            tl.debug_barrier()
            ticket = tl.atomic_add(cnt_ptr, 1)
            if ticket == n_split - 1:
                # read through an atomic (at L2, where the other programs' adds were performed)
                total = tl.atomic_add(ws_ptrs, tl.zeros_like(part), mask=mask)
                total = tl.where(mask, total, 0.0)  # masked lanes of an atomic return undefined values
                tl.store(ws_ptrs, tl.zeros_like(part), mask=mask)
                tl.store(y_ptrs, (total * scale).to(y_ptrs.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr, 0)
        else:
            tl.store(y_ptrs, (part * scale).to(y_ptrs.dtype.element_ty), mask=mask)

    # sizes vary per call: recompiling for each value buys nothing. stride_w8 stays unspecialised
    # too; the kernels multiply it by the literal 8, which is what proves row alignment. stride_xm
    # is specialised (divisible by 16 or not): it is what lets activation rows load as vectors.
    @triton.jit(do_not_specialize=["N", "K", "KW", "stride_w8", "stride_ym", "G", "iters", "n_split"])
    def _gemv2_fma_kernel(x_ptr, w_ptr, e_ptr, off_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, KW, stride_xm, stride_w8,
                          stride_ym, G, iters, n_split, L: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr,
                          GP: tl.constexpr, HAS_GROUPS: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr,
                          PREFETCH: tl.constexpr, ASM: tl.constexpr):
        m = tl.program_id(0)  # activation row: fastest grid axis, so programs sharing weights run together
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        rows = offs_n.to(tl.int64)
        group_row0 = 0
        if HAS_GROUPS:  # stacked experts: row m belongs to group #{g : offsets[g] <= m}
            gi = tl.arange(0, GP)
            ends = tl.load(off_ptr + gi, mask=gi < G, other=0)
            g = tl.minimum(tl.sum(((ends <= m) & (gi < G)).to(tl.int32), axis=0), G - 1)
            group_row0 = g.to(tl.int64) * N
            rows = rows + group_row0
        w_start = pid_k * (iters * BW)
        n_it = tl.minimum(iters, tl.cdiv(KW - w_start, BW))
        if PREFETCH:
            _prefetch_slice(w_ptr, offs_n, N, group_row0, stride_w8, w_start, n_it, KW, BW, ASM)
        # rows · (stride/8) · 8: the literal factor tells the compiler every row is 32-byte aligned,
        # so the word tile loads as 16-byte vectors
        w_rows = w_ptr + rows[:, None] * (stride_w8 * 8)
        offs_w = tl.arange(0, BW)
        col_base = (offs_w // L) * (16 * L) + offs_w % L  # field 0's column of each word in the step
        x_row = x_ptr + m.to(tl.int64) * stride_xm
        acc = tl.zeros((BN, BW), dtype=tl.float32)  # Σ d·x per (row, word column)
        xsum = tl.zeros((BW,), dtype=tl.float32)  # Σ x per word column
        for it in range(0, n_it):
            w0 = w_start + it * BW
            wi = w0 + offs_w
            wd = _load_words(w_rows, wi, n_ok, KW, EVEN)
            cols = (w0 // L) * (16 * L) + col_base
            # Σ x over the even fields (a) and the odd fields (b) of each word column
            sa = tl.zeros((BW,), dtype=tl.float32)
            sb = tl.zeros((BW,), dtype=tl.float32)
            for h in tl.static_range(8):
                ca = cols + (2 * h) * L
                cb = ca + L
                sa += _load_vec(x_row + ca, ca, K, EVEN)
                sb += _load_vec(x_row + cb, cb, K, EVEN)
            # chains start at -Σx: each FMA adds x·(1 + d/16) (resp. /4), so they hold Σ d·x/16
            # (resp. /4) with magnitudes of single terms, nearly exactly
            pa = tl.zeros((BN, BW), dtype=tl.float32) - sa[None, :]
            pb = tl.zeros((BN, BW), dtype=tl.float32) - sb[None, :]
            for h in tl.static_range(8):
                v = _shift(wd, 19 - 4 * h)  # nibble h (fields 2h, 2h+1) to bits 19..22
                fa = ((v & 0x180000) | _F32_ONE).to(tl.float32, bitcast=True)  # 1 + d/16
                fb = ((v & 0x600000) | _F32_ONE).to(tl.float32, bitcast=True)  # 1 + d/4
                ca = cols + (2 * h) * L
                cb = ca + L
                pa += fa * _load_vec(x_row + ca, ca, K, EVEN)[None, :]
                pb += fb * _load_vec(x_row + cb, cb, K, EVEN)[None, :]
            acc += 16.0 * pa + 4.0 * pb
            xsum += sa + sb
        part = tl.sum(acc, axis=1) - tl.sum(xsum, axis=0)  # Σ t·x = Σ d·x - Σ x
        scale = _row_scale(tl.load(e_ptr + rows, mask=n_ok, other=0))
        _finish(part, scale, y_ptr + m * stride_ym + offs_n, ws_ptr + m * N + offs_n, n_ok,
                cnt_ptr + m * tl.num_programs(1) + pid_n, n_split, SPLIT)

    @triton.jit
    def _dot(a, b, acc, UPCAST: tl.constexpr):
        # UPCAST: the CPU interpreter multiplies 16-bit float tiles as raw integer words (numpy has
        # no bf16), so there the tiles are widened first; the values are exact in fp32
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit(do_not_specialize=["M", "N", "K", "KW", "stride_w8", "stride_ym", "iters", "n_split"])
    def _gemv2_dot_kernel(x_ptr, w_ptr, e_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, KW, stride_xm, stride_w8, stride_ym,
                          iters, n_split, L: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, MP: tl.constexpr,
                          PAIRS: tl.constexpr, POS: tl.constexpr, BASE: tl.constexpr, SPLIT: tl.constexpr,
                          EVEN: tl.constexpr, UPCAST: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        dt = x_ptr.dtype.element_ty
        offs_n, n_ok, rows, w_rows = _row_block(w_ptr, pid_n, N, stride_w8, BN)
        offs_m = tl.arange(0, MP)
        m_ok = offs_m < M
        x_rows = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm  # (1, MP)
        offs_w = tl.arange(0, BW)
        col_base = (offs_w // L) * (16 * L) + offs_w % L
        kk = tl.arange(0, 2 * BW)  # k order of an interleaved pair tile: (word, half)
        o2 = kk // 2
        col_base2 = (o2 // L) * (16 * L) + o2 % L + (kk % 2) * (8 * L)  # high half: field p + 8
        w_start = pid_k * (iters * BW)
        n_it = tl.minimum(iters, tl.cdiv(KW - w_start, BW))
        acc = tl.zeros((BN, MP), dtype=tl.float32)  # Σ (1 + d/4)·x
        xs = tl.zeros((MP,), dtype=tl.float32)  # Σ x per activation row
        for it in range(0, n_it):
            w0 = w_start + it * BW
            wi = w0 + offs_w
            wd = _load_words(w_rows, wi, n_ok, KW, EVEN)
            k0 = (w0 // L) * (16 * L)
            if PAIRS:
                for p in tl.static_range(8):
                    # fields p and p+8 to bits POS.. and POS+16..: two 16-bit floats 1 + d/4 per word
                    v = (_shift(wd, POS - 2 * p) & ((3 << POS) | (3 << (POS + 16)))) | (BASE | (BASE << 16))
                    lo = v.to(tl.int16).to(dt, bitcast=True)
                    hi = (v >> 16).to(tl.int16).to(dt, bitcast=True)
                    a = tl.interleave(lo, hi)  # (BN, 2·BW)
                    cols = k0 + col_base2 + p * L
                    if EVEN:
                        xt = tl.load(x_rows + cols[:, None], mask=m_ok[None, :], other=0.0)
                    else:
                        xt = tl.load(x_rows + cols[:, None], mask=m_ok[None, :] & (cols[:, None] < K), other=0.0)
                    acc = _dot(a, xt, acc, UPCAST)
                    xs += tl.sum(xt.to(tl.float32), axis=0)
            else:
                for i in tl.static_range(16):
                    v = (_shift(wd, POS - 2 * i) & (3 << POS)) | BASE
                    a = v.to(tl.int16).to(dt, bitcast=True)  # (BN, BW)
                    cols = k0 + col_base + i * L
                    if EVEN:
                        xt = tl.load(x_rows + cols[:, None], mask=m_ok[None, :], other=0.0)
                    else:
                        xt = tl.load(x_rows + cols[:, None], mask=m_ok[None, :] & (cols[:, None] < K), other=0.0)
                    acc = _dot(a, xt, acc, UPCAST)
                    xs += tl.sum(xt.to(tl.float32), axis=0)
        part = 4.0 * acc - 5.0 * xs[None, :]  # t = 4·(1 + d/4) - 5
        scale = _row_scale(tl.load(e_ptr + rows, mask=n_ok, other=0))
        mask = n_ok[:, None] & m_ok[None, :]
        _finish(part, scale[:, None], y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None],
                ws_ptr + offs_m[None, :] * N + offs_n[:, None], mask, cnt_ptr + pid_n, n_split, SPLIT)

    @triton.jit
    def _dp4a(a, b, c, B_SIGNED: tl.constexpr, ASM: tl.constexpr):
        """``c + Σ_i byte_i(a)·byte_i(b)`` per element (a's bytes unsigned; b's signed or not): one
        dp4a on the GPU, shifts and masks in the interpreter (which cannot run PTX)."""
        if ASM:
            if B_SIGNED:
                r = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                              dtype=tl.int32, is_pure=True, pack=1)
            else:
                r = tl.inline_asm_elementwise("dp4a.u32.u32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                              dtype=tl.int32, is_pure=True, pack=1)
        else:
            r = c
            for i in tl.static_range(4):
                if B_SIGNED:
                    bi = (b << (24 - 8 * i)) >> 24  # arithmetic shift: the signed byte
                else:
                    bi = (b >> (8 * i)) & 0xFF
                r += ((a >> (8 * i)) & 0xFF) * bi
        return r

    @triton.jit
    def _x16_words(x_row, q, K, q_ok, inv, L: tl.constexpr):
        """Packed x words ``q`` (:func:`pack_x16`'s byte order) of a row quantised by ``inv``:
        (hi, lo, Σ x16 per word)."""
        base = (q // (4 * L)) * (16 * L) + ((q // L) % 4) * L + q % L  # column of byte 0
        hi = tl.zeros(q.shape, dtype=tl.int32)
        lo = tl.zeros(q.shape, dtype=tl.int32)
        xsum = tl.zeros(q.shape, dtype=tl.int32)
        for i in tl.static_range(4):
            cols = base + 4 * i * L
            v = tl.load(x_row + cols, mask=(cols < K) & q_ok, other=0.0).to(tl.float32) * inv
            x16 = tl.where(v >= 0, v + 0.5, v - 0.5).to(tl.int32)
            x16 = tl.minimum(tl.maximum(x16, -_X16_MAX), _X16_MAX)
            xsum += x16
            hi = hi | (((x16 >> 8) & 0xFF) << (8 * i))
            lo = lo | ((x16 & 0xFF) << (8 * i))
        return hi, lo, xsum

    @triton.jit
    def _load_x_word(ptrs, ok, EVEN: tl.constexpr, L2_ONLY: tl.constexpr):
        """Packed x words at ``ptrs`` (zeros where not ``ok``, unless EVEN: all in range)."""
        if EVEN:
            if L2_ONLY:
                v = tl.load(ptrs, cache_modifier=".cg")
            else:
                v = tl.load(ptrs)
        else:
            if L2_ONLY:
                v = tl.load(ptrs, mask=ok, other=0, cache_modifier=".cg")
            else:
                v = tl.load(ptrs, mask=ok, other=0)
        return v

    @triton.jit
    def _i8_step(wd, hi_row, lo_row, wi, w_end, acc_hi, acc_lo, L: tl.constexpr, BN: tl.constexpr,
                 BW: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr, L2_ONLY: tl.constexpr):
        """One K step of the i8 loop: the (BN, BW) word tile ``wd`` of words ``wi`` (contiguous) against
        their x words; x words of words at or past ``w_end`` load as zeros unless EVEN."""
        q = (wi // L) * (4 * L) + wi % L  # the x word of byte group j = 0 of each word column
        for j in tl.static_range(4):
            a = (wd >> (2 * j)) & 0x03030303  # fields 4i + j in byte i: d = 0, 1, 2
            xh = _load_x_word(hi_row + q + j * L, wi < w_end, EVEN, L2_ONLY)
            xl = _load_x_word(lo_row + q + j * L, wi < w_end, EVEN, L2_ONLY)
            acc_hi = _dp4a(a, tl.broadcast_to(xh[None, :], (BN, BW)), acc_hi, True, ASM)
            acc_lo = _dp4a(a, tl.broadcast_to(xl[None, :], (BN, BW)), acc_lo, False, ASM)
        return acc_hi, acc_lo

    @triton.jit
    def _i8_sums(w_rows, hi_row, lo_row, n_ok, w_start, n_it, KW, wd_early, L: tl.constexpr, BN: tl.constexpr,
                 BW: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr, L2_ONLY: tl.constexpr,
                 EARLY: tl.constexpr):
        """The i8 loop over ``n_it`` steps of BW words from ``w_start``: exact (Σ d·hi, Σ d·lo) per
        row. ``L2_ONLY``: x words load through L2 (.cg), for words this kernel wrote itself.
        ``EARLY`` > 0: ``wd_early`` is the (BN, EARLY·BW) tile of the first EARLY steps, loaded by
        the caller (zeros past the slice's end: :func:`_early_words`); else it is unused."""
        offs_w = tl.arange(0, BW)
        acc_hi = tl.zeros((BN, BW), dtype=tl.int32)
        acc_lo = tl.zeros((BN, BW), dtype=tl.int32)
        for it in range(EARLY, n_it):
            wi = w_start + it * BW + offs_w
            wd = _load_words(w_rows, wi, n_ok, KW, EVEN)
            acc_hi, acc_lo = _i8_step(wd, hi_row, lo_row, wi, KW, acc_hi, acc_lo, L, BN, BW, EVEN, ASM, L2_ONLY)
        s_hi = tl.sum(acc_hi, axis=1)
        s_lo = tl.sum(acc_lo, axis=1)
        if EARLY > 0:  # one step as wide as the early tile; a slice shorter than it is masked at its end
            wi = w_start + tl.arange(0, EARLY * BW)
            e_hi, e_lo = _i8_step(wd_early, hi_row, lo_row, wi, tl.minimum(KW, w_start + n_it * BW),
                                  tl.zeros((BN, EARLY * BW), dtype=tl.int32),
                                  tl.zeros((BN, EARLY * BW), dtype=tl.int32), L, BN, EARLY * BW, False, ASM, L2_ONLY)
            s_hi += tl.sum(e_hi, axis=1)
            s_lo += tl.sum(e_lo, axis=1)
        return s_hi, s_lo

    @triton.jit
    def _early_words(w_rows, n_ok, w_start, n_it, KW, BW: tl.constexpr, EARLY: tl.constexpr):
        """The (BN, EARLY·BW) word tile of a slice's first EARLY steps (zeros past the slice)."""
        wi = w_start + tl.arange(0, EARLY * BW)
        return _load_words(w_rows, wi, n_ok, tl.minimum(KW, w_start + n_it * BW), False)

    @triton.jit(do_not_specialize=["K", "KQ", "stride_xm"])
    def _pack_x16_kernel(x_ptr, hi_ptr, lo_ptr, sx_ptr, xs_ptr, K, KQ, stride_xm, L: tl.constexpr,
                         BK: tl.constexpr, BQ: tl.constexpr):
        """One program per activation row: absmax, then the packed words of :func:`pack_x16`. The
        launcher makes BK and BQ cover a decode row in one step each: each step of these loops
        is a round trip to memory that the GEMV after it waits for."""
        m = tl.program_id(0)
        x_row = x_ptr + m.to(tl.int64) * stride_xm
        absmax = tl.zeros((BK,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            absmax = tl.maximum(absmax, tl.abs(tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)))
        amax = tl.maximum(tl.max(absmax, axis=0), _X16_ABSMAX_FLOOR)
        inv = _X16_MAX / amax
        xsum = tl.zeros((BQ,), dtype=tl.int32)
        for q0 in range(0, KQ, BQ):
            q = q0 + tl.arange(0, BQ)
            hi, lo, xs = _x16_words(x_row, q, K, q < KQ, inv, L)
            xsum += xs
            tl.store(hi_ptr + m * KQ + q, hi, mask=q < KQ)
            tl.store(lo_ptr + m * KQ + q, lo, mask=q < KQ)
        tl.store(sx_ptr + m, amax / _X16_MAX)
        tl.store(xs_ptr + m, tl.sum(xsum, axis=0))

    @triton.jit(do_not_specialize=["N", "KW", "stride_w8", "stride_ym", "iters", "n_split"])
    def _gemv2_i8_kernel(hi_ptr, lo_ptr, sx_ptr, xs_ptr, w_ptr, e_ptr, y_ptr, ws_ptr, cnt_ptr, N, KW, stride_w8,
                         stride_ym, iters, n_split, L: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr,
                         SPLIT: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr):
        m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_n, n_ok, rows, w_rows = _row_block(w_ptr, pid_n, N, stride_w8, BN)
        KQ = 4 * KW
        w_start = pid_k * (iters * BW)
        n_it = tl.minimum(iters, tl.cdiv(KW - w_start, BW))
        s_hi, s_lo = _i8_sums(w_rows, hi_ptr + m.to(tl.int64) * KQ, lo_ptr + m.to(tl.int64) * KQ, n_ok, w_start,
                              n_it, KW, 0, L, BN, BW, EVEN, ASM, False, 0)
        # Σ t·x16 = 256·Σ d·hi + Σ d·lo - Σ x16 (t = d - 1); the row's Σ x16 is taken once, by pid_k 0
        total = 256.0 * s_hi.to(tl.float32) + s_lo.to(tl.float32)
        total -= tl.where(pid_k == 0, tl.load(xs_ptr + m).to(tl.float32), 0.0)
        scale = _row_scale(tl.load(e_ptr + rows, mask=n_ok, other=0)) * tl.load(sx_ptr + m)
        _finish(total, scale, y_ptr + m * stride_ym + offs_n, ws_ptr + m * N + offs_n, n_ok,
                cnt_ptr + m * tl.num_programs(1) + pid_n, n_split, SPLIT)

    @triton.jit(do_not_specialize=["N", "K", "KW", "stride_w8", "stride_ym", "iters", "n_split"])
    def _gemv2_i8f_kernel(x_ptr, xq_ptr, w_ptr, e_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, KW, stride_xm, stride_w8,
                          stride_ym, iters, n_split, L: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr,
                          SPLIT: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr, EARLY: tl.constexpr,
                          PREFETCH: tl.constexpr):
        """"i8" with the activation pack fused in: each program quantises its own K slice of x
        with the slice's absmax, writes the packed words to its own part of ``xq`` (row blocks
        sharing one buffer contended for the same L2 lines), and runs the i8 loop over them. No
        second launch to wait for. ``EARLY``: the word tile of the first EARLY steps is loaded before
        the pack, so its memory latency overlaps the pack's instead of following it. ``PREFETCH``:
        the whole word slice is asked into L2 before the pack, holding no registers."""
        m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        x_row = x_ptr + m.to(tl.int64) * stride_xm
        KQ = 4 * KW
        hi_row = xq_ptr + (m * tl.num_programs(1) + pid_n).to(tl.int64) * (2 * KQ)  # this program's own words
        lo_row = hi_row + KQ
        w_start = pid_k * (iters * BW)
        n_it = tl.minimum(iters, tl.cdiv(KW - w_start, BW))
        offs_n, n_ok, rows, w_rows = _row_block(w_ptr, pid_n, N, stride_w8, BN)
        if PREFETCH:
            _prefetch_slice(w_ptr, offs_n, N, 0, stride_w8, w_start, n_it, KW, BW, ASM)
        wd_early = 0
        if EARLY > 0:
            wd_early = _early_words(w_rows, n_ok, w_start, n_it, KW, BW, EARLY)
        # the slice's absmax: columns 16·w_start .. 16·(w_start + n_it·BW), a step of 16·BW at a time
        offs_c = tl.arange(0, 16 * BW)
        absmax = tl.zeros((16 * BW,), dtype=tl.float32)
        for it in range(0, n_it):
            cols = 16 * (w_start + it * BW) + offs_c
            absmax = tl.maximum(absmax, tl.abs(tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)))
        amax = tl.maximum(tl.max(absmax, axis=0), _X16_ABSMAX_FLOOR)
        inv = _X16_MAX / amax
        # the slice's packed words, 4·BW per step
        offs_q = tl.arange(0, 4 * BW)
        xsum = tl.zeros((4 * BW,), dtype=tl.int32)
        for it in range(0, n_it):
            q = 4 * (w_start + it * BW) + offs_q
            hi, lo, xs = _x16_words(x_row, q, K, q < KQ, inv, L)
            xsum += xs
            tl.store(hi_row + q, hi, mask=q < KQ)
            tl.store(lo_row + q, lo, mask=q < KQ)
        # the words were written by this program's threads: after the barrier every thread sees
        # them; loads go to L2 (.cg), not to L1
        tl.debug_barrier()
        s_hi, s_lo = _i8_sums(w_rows, hi_row, lo_row, n_ok, w_start, n_it, KW, wd_early, L, BN, BW, EVEN, ASM, True,
                              EARLY)
        total = 256.0 * s_hi.to(tl.float32) + s_lo.to(tl.float32)
        total -= tl.sum(xsum, axis=0).to(tl.float32)  # this slice's Σ x16 (t = d - 1)
        # slices differ in scale, so each partial carries its own sx into the split-K sum
        total *= amax / _X16_MAX
        scale = _row_scale(tl.load(e_ptr + rows, mask=n_ok, other=0))
        _finish(total, scale, y_ptr + m * stride_ym + offs_n, ws_ptr + m * N + offs_n, n_ok,
                cnt_ptr + m * tl.num_programs(1) + pid_n, n_split, SPLIT)

    _SM_COUNT: dict = {}

    def _sm_count(device: torch.device) -> int:
        if device.type != "cuda":
            return 4  # the interpreter: any small number, so that tests see split-K
        if device not in _SM_COUNT:
            _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
        return _SM_COUNT[device]

    def _split(programs: int, KW: int, BW: int, device: torch.device, cfg: dict) -> tuple[int, int]:
        """(split, iters): K steps of BW words per program, enough programs for ``per_sm`` per SM."""
        steps = -(-KW // BW)
        if cfg.get("split") is not None:
            want = int(cfg["split"])
            if want < 1:
                raise ValueError(f"config split must be >= 1, got {want}")
        else:
            want = -(-_sm_count(device) * int(cfg["per_sm"]) // max(programs, 1))
        split = max(1, min(steps, want))
        iters = -(-steps // split)
        return -(-steps // iters), iters

    def workspace(max_m: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A zeroed split-K workspace (max_m, n) float32 and its tile counters (int32)."""
        return (torch.zeros(max_m, n, dtype=torch.float32, device=device),
                torch.zeros(max_m * -(-n // MIN_BN), dtype=torch.int32, device=device))

    def _check_workspace(ws, counters, M: int, N: int) -> None:
        if ws.dtype != torch.float32 or ws.dim() != 2 or ws.shape[0] < M or ws.shape[1] != N or not ws.is_contiguous():
            raise ValueError(f"ws must be a contiguous float32 tensor of shape (>= {M}, {N}), "
                             f"got dtype={ws.dtype} shape={tuple(ws.shape)}")
        need = M * -(-N // MIN_BN)
        if counters.dtype != torch.int32 or counters.dim() != 1 or counters.numel() < need:
            raise ValueError(f"counters must be int32 with >= {need} elements, "
                             f"got dtype={counters.dtype} shape={tuple(counters.shape)}")

    def _block_config(cfg: dict, L: int) -> tuple[int, int, int]:
        unknown = sorted(set(cfg) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"config keys must be among {CONFIG_KEYS}, got {unknown}")
        BN, BW, warps = int(cfg["BN"]), int(cfg["BW"]), int(cfg["warps"])
        stages, maxnreg = cfg.get("stages"), cfg.get("maxnreg")
        if stages is not None and (not isinstance(stages, int) or isinstance(stages, bool) or stages < 1):
            raise ValueError(f"config stages must be a positive int (Triton's num_stages), got {stages!r}")
        if maxnreg is not None and (not isinstance(maxnreg, int) or isinstance(maxnreg, bool)
                                    or not 32 <= maxnreg <= 255):
            raise ValueError(f"config maxnreg must be an int in 32..255 (registers per thread), got {maxnreg!r}")
        early = cfg.get("early", 0)
        if isinstance(early, bool) or not isinstance(early, int) or early not in EARLY_CHOICES:
            raise ValueError(f"config early must be one of {EARLY_CHOICES} (K steps loaded before the pack), "
                             f"got {early!r}")
        if not isinstance(cfg.get("prefetch", False), bool):
            raise ValueError(f"config prefetch must be a bool (ask L2 for the word slice first), "
                             f"got {cfg['prefetch']!r}")
        if BN < MIN_BN or BN & (BN - 1):
            raise ValueError(f"config BN must be a power of two >= {MIN_BN}, got {BN}")
        if BW < L or BW & (BW - 1):
            raise ValueError(f"config BW must be a power of two >= plane_words={L}, got {BW}")
        if warps < 1 or warps & (warps - 1):
            raise ValueError(f"config warps must be a power of two, got {warps}")
        return BN, BW, warps

    def i8f_slice_words(M: int, N: int, KW: int, plane_words: int, device: torch.device,
                        config: dict | None = None) -> int:
        """Words of each K slice that "i8f" quantises with one scale, for an (M, K) x against N
        rows of KW words: the launcher's split-K step (it depends on the SM count, so the result of
        "i8f" may differ between GPUs by the fixed point's rounding; :func:`gemv_x16_reference`
        with this ``slice_words`` is its exact oracle)."""
        cfg = dict(I8F_CONFIG) | (config or {})
        BN, BW, _ = _block_config(cfg, plane_words)
        _, iters = _split(triton.cdiv(N, BN) * M, KW, BW, device, cfg)
        return iters * BW

    def gemv_2bit_triton(x2d: torch.Tensor, words: torch.Tensor, E: torch.Tensor, in_features: int,
                         plane_words: int, *, offsets: torch.Tensor | None = None, variant: str = "auto",
                         out: torch.Tensor | None = None, ws: torch.Tensor | None = None,
                         counters: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
        """Launcher: ``y = x · (T ⊙ s)ᵀ`` over the 2-bit layout.

        Shapes:
            x2d: (M, K) float32 / bfloat16 / float16 (float64 runs the reference)
            words: (G·N, KW) int32 row-major;  E: (G·N,) int8
            offsets: None, or (G,) int32/int64 cumulative row counts of the groups (rows of x
                sorted by group; the stacked experts), read on the device only
            returns: (M, N) in x2d's dtype
        ``variant``: "auto" (:func:`auto_variant`),
        "fma", "dot" or "dot1" (the dot variants: M <= 16, 16-bit x, no groups, plane_words >= 16
        for "dot1"), or "i8" (16-bit x, no groups: x as 16-bit fixed point, two dp4a per four trits;
        its error against the float product is that of the fixed point: at most sx/2 per activation,
        ~4e-5 of the output's norm at K = 8192, experiments/x16_error.py), or "i8f" (the same, one
        launch: each program quantises its own K slice with the slice's scale, see :func:`i8f_slice_words`).
        ``out``: optional contiguous (M, N) result buffer. ``ws``/``counters``: the split-K
        workspace (:func:`workspace`; zero, and left zero); allocated per call when absent.
        ``config`` (keys CONFIG_KEYS): BN, BW, warps, per_sm, optional split (forced number of K
        splits), optional stages (Triton's ``num_stages``: how deep its software pipeliner may
        prefetch loop loads), optional maxnreg (registers per thread: at the fma kernel's own 168,
        3 programs fit an SM), optional early ("i8f" only: the K steps whose words are loaded
        before the activation pack, one of EARLY_CHOICES), optional prefetch ("fma" and "i8f": each
        program first asks L2 for its whole word slice, ``cp.async.bulk.prefetch``; a hint, the
        result is the same).
        """
        M, N, G = check_gemv_args(x2d, words, E, in_features, plane_words, offsets)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if variant == "auto":
            variant = auto_variant(M, plane_words, x2d.dtype, offsets is not None)
        if variant != "fma":  # dot, dot1, i8
            if x2d.dtype == torch.float32:
                raise ValueError(f"variant={variant!r} needs bfloat16/float16 x, got {x2d.dtype}; use variant='fma'")
            if offsets is not None:
                raise ValueError(f"variant={variant!r} takes one group (offsets=None); use variant='fma'")
        if variant in ("dot", "dot1") and M > DECODE_MAX_M:
            raise ValueError(f"variant={variant!r} takes at most {DECODE_MAX_M} rows of x, got M={M}")
        if variant == "dot1" and plane_words < 16:
            raise ValueError(f"variant='dot1' needs plane_words >= 16 (a dot of K >= 16), got {plane_words}")
        cfg = dict({"fma": FMA_CONFIG, "i8": I8_CONFIG, "i8f": I8F_CONFIG}.get(variant, DOT_CONFIG)) | (config or {})
        BN, BW, warps = _block_config(cfg, plane_words)
        if cfg.get("early") and variant != "i8f":
            raise ValueError(f"config early applies to variant 'i8f' only, got variant={variant!r}")
        prefetch = cfg.get("prefetch", False)
        if prefetch and variant not in PREFETCH_VARIANTS:
            raise ValueError(f"config prefetch applies to variants {PREFETCH_VARIANTS} only, got variant={variant!r}")
        if not words.is_contiguous():
            raise ValueError(f"words must be contiguous, got strides {words.stride()}")
        if out is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != (M, N)
                                or out.dtype != x2d.dtype or out.device != x2d.device or not out.is_contiguous()):
            got = (f"shape={tuple(out.shape)} dtype={out.dtype} device={out.device}"
                   if isinstance(out, torch.Tensor) else type(out).__name__)
            raise ValueError(f"out must be a contiguous {x2d.dtype} tensor of shape ({M}, {N}) on {x2d.device}, got {got}")
        tensors = dict(x2d=x2d, words=words, E=E)
        if offsets is not None:
            tensors["offsets"] = offsets
        check_kernel_tensors(**tensors)
        y = torch.empty(M, N, dtype=x2d.dtype, device=x2d.device) if out is None else out
        if x2d.dtype == torch.float64:
            return y.copy_(gemv_2bit_reference(x2d, words, E, in_features, plane_words, offsets))
        if M == 0 or N == 0:
            return y
        if x2d.stride(1) != 1:
            x2d = x2d.contiguous()
        # launch options: the pipeliner's depth, and a register cap (more resident programs per SM)
        stage_arg = {name: cfg[key] for key, name in (("stages", "num_stages"), ("maxnreg", "maxnreg"))
                     if cfg.get(key) is not None and not (key == "maxnreg" and interpreting())}
        L, K, KW = plane_words, in_features, words.shape[1]
        even = KW % BW == 0 and K == TRITS_PER_WORD * KW  # no column of any step needs a mask
        n_blocks = triton.cdiv(N, BN)
        split, iters = _split(n_blocks * (M if variant in ("fma", "i8", "i8f") else 1), KW, BW, x2d.device, cfg)
        if split > 1:
            if ws is None or counters is None:
                ws, counters = workspace(M, N, x2d.device)
            _check_workspace(ws, counters, M, N)
        else:  # unused by the kernel: any pointer will do
            ws, counters = y, E
        if variant == "fma":
            off = offsets if offsets is not None else E
            _gemv2_fma_kernel[(M, n_blocks, split)](
                x2d, words, E, off, y, ws, counters, N, K, KW, x2d.stride(0), KW // 8, y.stride(0), G, iters, split,
                L=L, BN=BN, BW=BW, GP=triton.next_power_of_2(G), HAS_GROUPS=offsets is not None, SPLIT=split > 1,
                EVEN=even, PREFETCH=prefetch, ASM=not interpreting(), num_warps=warps, **stage_arg)
            return y
        if variant == "i8":
            n_words = M * 4 * KW  # pack_x16's hi and lo words, then sx (float32 bits) and Σx16 per row
            hi, lo, sx, xs = torch.empty(2 * n_words + 2 * M, dtype=torch.int32, device=x2d.device).split(
                [n_words, n_words, M, M])
            sx = sx.view(torch.float32)
            _pack_x16_kernel[(M,)](x2d, hi, lo, sx, xs, K, 4 * KW, x2d.stride(0), L=L,
                                   BK=min(triton.next_power_of_2(K), PACK_BLOCK),
                                   BQ=min(triton.next_power_of_2(4 * KW), PACK_BLOCK // 4), num_warps=8)
            _gemv2_i8_kernel[(M, n_blocks, split)](
                hi, lo, sx, xs, words, E, y, ws, counters, N, KW, KW // 8, y.stride(0), iters, split,
                L=L, BN=BN, BW=BW, SPLIT=split > 1, EVEN=KW % BW == 0, ASM=not interpreting(), num_warps=warps,
                **stage_arg)
            return y
        if variant == "i8f":
            # hi then lo words per (row, row block): each program writes only its slice of its own
            xq = torch.empty(M * n_blocks * 8 * KW, dtype=torch.int32, device=x2d.device)
            _gemv2_i8f_kernel[(M, n_blocks, split)](
                x2d, xq, words, E, y, ws, counters, N, K, KW, x2d.stride(0), KW // 8, y.stride(0), iters, split,
                L=L, BN=BN, BW=BW, SPLIT=split > 1, EVEN=KW % BW == 0, ASM=not interpreting(),
                EARLY=cfg.get("early", 0), PREFETCH=prefetch, num_warps=warps, **stage_arg)
            return y
        pos, base = (5, 0x3F80) if x2d.dtype == torch.bfloat16 else (8, 0x3C00)  # top 2 mantissa bits of 1.0
        _gemv2_dot_kernel[(n_blocks, split)](
            x2d, words, E, y, ws, counters, M, N, K, KW, x2d.stride(0), KW // 8, y.stride(0), iters, split,
            L=L, BN=BN, BW=BW, MP=DECODE_MAX_M, PAIRS=variant == "dot", POS=pos, BASE=base, SPLIT=split > 1,
            EVEN=even, UPCAST=interpreting(), num_warps=warps, **stage_arg)
        return y

else:  # pragma: no cover - installs without Triton use the torch reference everywhere
    gemv_2bit_triton = None
    workspace = None
    i8f_slice_words = None


# --------------------------------------------------------------------------------------------
# custom op and the inference copy
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("ternary_graph::decode_gemv", mutates_args=("ws", "counters"))
def decode_gemv(x2d: torch.Tensor, words: torch.Tensor, E: torch.Tensor, offsets: torch.Tensor | None,
                ws: torch.Tensor, counters: torch.Tensor, in_features: int, plane_words: int) -> torch.Tensor:
    """(M, K) -> (M, N) over the 2-bit layout; ``ws``/``counters`` come back zero (split-K)."""
    if x2d.is_cuda:
        return gemv_2bit_triton(x2d, words, E, in_features, plane_words, offsets=offsets, ws=ws, counters=counters)
    check_gemv_args(x2d, words, E, in_features, plane_words, offsets)
    return gemv_2bit_reference(x2d, words, E, in_features, plane_words, offsets)


@decode_gemv.register_fake
def _(x2d, words, E, offsets, ws, counters, in_features, plane_words):
    groups = 1 if offsets is None else offsets.shape[0]
    return x2d.new_empty(x2d.shape[0], words.shape[0] // groups)


@dataclass(eq=False)
class DecodeWeights:
    """The decode copy of one TernaryState (or of a stack of ``groups`` equal matrices).

    A snapshot: ``words`` (2-bit layout of ``packed``) and a copy of ``E``, plus the split-K
    workspace. It is never module state: layers hold it as a plain attribute and drop it when
    training resumes (the next optimizer step would leave it stale).

    Shapes: words (G·N, KW) int32, E (G·N,) int8, ws (DECODE_MAX_M, N) float32.
    """

    words: torch.Tensor
    E: torch.Tensor
    in_features: int
    plane_words: int
    groups: int
    ws: torch.Tensor
    counters: torch.Tensor

    @classmethod
    def from_state(cls, packed: torch.Tensor, E: torch.Tensor, in_features: int, *, groups: int = 1,
                   plane_words: int | None = None) -> "DecodeWeights":
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        if packed.device.type == "meta":
            raise ValueError("packed is on the meta device: an inference copy needs real weights")
        if packed.dim() != 2 or packed.shape[0] % groups:
            raise ValueError(f"packed must be 2-D with rows divisible by groups={groups}, got shape {tuple(packed.shape)}")
        if E.dtype != torch.int8 or tuple(E.shape) != (packed.shape[0],):
            raise ValueError(f"E must be int8 of shape ({packed.shape[0]},), got dtype={E.dtype} shape={tuple(E.shape)}")
        L = choose_plane_words(in_features) if plane_words is None else plane_words
        words = pack_2bit(packed, in_features, plane_words=L)
        n = packed.shape[0] // groups
        ws = torch.zeros(DECODE_MAX_M, n, dtype=torch.float32, device=packed.device)
        counters = torch.zeros(DECODE_MAX_M * -(-n // MIN_BN), dtype=torch.int32, device=packed.device)
        return cls(words, E.detach().clone(), in_features, L, groups, ws, counters)

    @property
    def device(self) -> torch.device:
        return self.words.device

    @property
    def out_features(self) -> int:
        return self.words.shape[0] // self.groups

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.E, self.ws, self.counters))

    def applies(self, x: torch.Tensor) -> bool:
        """Whether the decode kernels take ``x`` (*, in_features): CUDA, this copy's device, a
        kernel dtype, at most DECODE_MAX_M rows."""
        return (x.is_cuda and x.device == self.device and x.dtype in KERNEL_DTYPES
                and x.numel() <= DECODE_MAX_M * self.in_features)

    def __call__(self, x: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """Shapes: x (*, in_features) -> (*, out_features); ``offsets`` for a stack of groups."""
        if (offsets is None) != (self.groups == 1):
            raise ValueError(f"offsets must be given exactly when groups > 1 (groups={self.groups}), "
                             f"got offsets={'None' if offsets is None else tuple(offsets.shape)}")
        x2d = x.reshape(-1, self.in_features)
        y = decode_gemv(x2d, self.words, self.E, offsets, self.ws, self.counters, self.in_features, self.plane_words)
        return y.reshape(*x.shape[:-1], self.out_features)


def decode_bytes_per_param(in_features: int) -> float:
    """Bytes of ``words`` per logical trit of a row of ``in_features`` (padding included)."""
    L = choose_plane_words(in_features)
    return 4 * words_per_row(in_features, L) / in_features


__all__ = ["DECODE_MAX_M", "DecodeWeights", "auto_variant", "choose_plane_words", "decode_bytes_per_param", "decode_gemv",
           "gemv_2bit_reference", "gemv_2bit_triton", "gemv_x16_reference", "i8f_slice_words", "pack_2bit", "pack_x16", "unpack_2bit",
           "words_per_row", "workspace"]

