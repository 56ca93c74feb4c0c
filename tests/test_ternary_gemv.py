"""The 2-bit decode layout and its GEMV kernels (``kernels/ternary_gemv.py``), and the layers'
inference copy.

Pure tests (no Triton): the layout round-trips the base-3 state exactly and puts every trit
where the docstring says; the torch reference equals the fp64 dequantised oracle; the decode
constants hold; bad input is refused naming the argument. Kernel tests run on two backends:
``interpreter`` (CPU tensors under TRITON_INTERPRET=1, in a child process started by
``test_interpreter_suite``) and ``cuda``. They call the launcher directly, on fresh random
inputs, K not a multiple of 5 or 16, N = 1, odd shapes, split-K forced on and off, with the
output buffer poisoned with NaN before the launch. Layer tests check that ``prepare_inference``
leaves ``state_dict`` unchanged and that ``train()`` drops the copy.
"""

from __future__ import annotations

import pathlib
import struct
import sys

import pytest
import torch
from conftest import dequantized, interpreting, run_interpreter_suite

from ternary_graph.kernels import ternary_gemv as tg
from ternary_graph.ternary.packing import pack_trits, random_packed, unpack_trits
from ternary_graph.ternary.state import exponent_to_scale

BACKENDS = [pytest.param("interpreter", marks=pytest.mark.interpreter), pytest.param("cuda", marks=pytest.mark.cuda)]
# (N, K, plane_words): K not a multiple of 5 or 16; 256 with L = 8 is the unmasked ("EVEN") path;
# 1100 spans nine blocks of 128 columns (several K steps, so split-K has work to split)
# N = 1, K below one word, K not a multiple of 5 or 16, every plane width; kept small because the
# interpreter runs each case on 2 CPU cores in CI (large shapes: test_cuda_untuned_shapes_every_variant)
SHAPES = [(1, 5, 8), (3, 7, 8), (33, 130, 8), (20, 515, 16), (9, 1003, 32)]


def _device(backend: str) -> str:
    return "cpu" if backend == "interpreter" else "cuda"


def _weights(n: int, k: int, gen: torch.Generator, device: str = "cpu"):
    packed = random_packed(n, k, generator=gen).to(device)
    E = torch.randint(-14, 6, (n,), generator=gen, dtype=torch.int8).to(device)
    return packed, E


def _rms(ref: torch.Tensor) -> float:
    return float(ref.double().pow(2).mean().sqrt()) if ref.numel() else 0.0


def _tolerance(dtype: torch.dtype, ref: torch.Tensor) -> dict:
    """Products x·t are exact and every kernel accumulates in fp32, so results differ from the
    reference by fp32 summation order (a few 1e-7 of the row's magnitude) and, in 16 bits, by one
    rounding of the output: rtol of the dtype, atol tied to the reference's RMS."""
    rms = _rms(ref)
    rtol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 1e-3}[dtype]
    return dict(rtol=rtol, atol=1e-5 * max(rms, 1.0))


def _oracle(x2d: torch.Tensor, packed: torch.Tensor, E: torch.Tensor, k: int) -> torch.Tensor:
    return x2d.double().cpu() @ dequantized(packed, E, k).T


# ------------------------------------------------------------------------------------------------
# the layout, pure
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 5, 7, 16, 64, 130, 515, 1100, 1120, 4096])
@pytest.mark.parametrize("plane_words", [8, 16, 32])
def test_pack_2bit_round_trips_the_base3_state(k, plane_words, gen):
    packed, _ = _weights(6, k, gen)
    words = tg.pack_2bit(packed, k, plane_words=plane_words)
    assert words.dtype == torch.int32 and words.shape == (6, tg.words_per_row(k, plane_words))
    assert torch.equal(tg.unpack_2bit(words, k, plane_words), unpack_trits(packed, k))
    assert torch.equal(packed, random_packed(6, k, generator=torch.Generator().manual_seed(1234)))  # input untouched


@pytest.mark.parametrize("plane_words", [8, 32])
def test_every_trit_sits_where_the_docstring_says(plane_words):
    L, k = plane_words, 3 * 16 * plane_words - 7
    zero_word = 0x55555555  # sixteen fields d = 1: sixteen zero trits
    for c in (0, 1, L - 1, L, 5 * L + 3, 16 * L - 1, 16 * L, k - 1):
        for t in (-1, 1):
            trits = torch.zeros(1, k, dtype=torch.int8)
            trits[0, c] = t
            words = tg.pack_2bit(pack_trits(trits), k, plane_words=L)[0].to(torch.int64) & 0xFFFFFFFF
            block, within = divmod(c, 16 * L)
            field, j = divmod(within, L)
            expected = torch.full_like(words, zero_word)
            expected[block * L + j] = (zero_word & ~(3 << (2 * field))) | ((t + 1) << (2 * field))
            assert torch.equal(words, expected), (c, t)


def test_choose_plane_words_keeps_padding_small():
    assert tg.choose_plane_words(8192) == 32 and tg.choose_plane_words(4096) == 32
    assert tg.choose_plane_words(1120) == 8  # default_3b's expert down projection: 1152 columns, not 1536
    for k in (100, 512, 1000, 1120, 2048, 2240, 5000, 14336):
        L = tg.choose_plane_words(k)
        padding = tg.words_per_row(k, L) * 16 - k
        assert padding <= k // 16 or L == 8, (k, L, padding)
    assert tg.decode_bytes_per_param(8192) == 0.25
    with pytest.raises(ValueError, match="in_features must be a positive int, got 0"):
        tg.choose_plane_words(0)


def test_decode_constants_are_exact():
    def f32(bits):
        return struct.unpack("<f", struct.pack("<I", bits))[0]

    def f16(bits):
        return struct.unpack("<e", struct.pack("<H", bits))[0]

    for d in range(3):
        assert f32(0x3F800000 | (d << 19)) == 1 + d / 16  # fma: even fields at bits 19..20
        assert f32(0x3F800000 | (d << 21)) == 1 + d / 4  # fma: odd fields at bits 21..22
        assert f32((0x3F80 | (d << 5)) << 16) == 1 + d / 4  # dot, bf16: bits 5..6 (a bf16 is a truncated fp32)
        assert f16(0x3C00 | (d << 8)) == 1 + d / 4  # dot, fp16: bits 8..9
        assert 4 * (1 + d / 4) - 5 == d - 1 and 16 * (d / 16) + 0 == d


@pytest.mark.parametrize("n,k,plane_words", SHAPES)
def test_reference_equals_dequantized_oracle(n, k, plane_words, gen):
    packed, E = _weights(n, k, gen)
    words = tg.pack_2bit(packed, k, plane_words=plane_words)
    x = torch.randn(3, k, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(tg.gemv_2bit_reference(x, words, E, k, plane_words), _oracle(x, packed, E, k))
    counts = torch.tensor([2, 0, 1])
    stack, E3 = _weights(3 * n, k, gen)
    words3 = tg.pack_2bit(stack, k, plane_words=plane_words)
    y = tg.gemv_2bit_reference(x, words3, E3, k, plane_words, offsets=counts.cumsum(0))
    torch.testing.assert_close(y[:2], _oracle(x[:2], stack[:n], E3[:n], k))
    torch.testing.assert_close(y[2:], _oracle(x[2:], stack[2 * n:], E3[2 * n:], k))


def _unpack_x16(q: dict, k: int, plane_words: int) -> torch.Tensor:
    """Per-column 16-bit activations back out of pack_x16's words (the byte order of its docstring)."""
    L = plane_words
    M, KQ = q["hi"].shape
    x16 = torch.zeros(M, KQ * 4, dtype=torch.int64)
    for word in range(KQ):
        b, j, c = word // (4 * L), (word // L) % 4, word % L
        for i in range(4):
            hi = (q["hi"][:, word].long() >> (8 * i)) & 0xFF
            lo = (q["lo"][:, word].long() >> (8 * i)) & 0xFF
            x16[:, b * 16 * L + (4 * i + j) * L + c] = 256 * (hi - 256 * (hi >= 128)) + lo
    return x16[:, :k]


@pytest.mark.parametrize("k,plane_words", [(5, 8), (130, 8), (515, 16), (1003, 32)])
def test_x16_words_hold_each_column_where_the_docstring_says(k, plane_words, gen):
    x = torch.randn(3, k, generator=gen)
    x[1] *= 1e-3  # a row scale of its own
    q = tg.pack_x16(x, k, plane_words)
    x16 = _unpack_x16(q, k, plane_words)
    assert int(x16.abs().max()) == tg.X16_MAX  # each row's absmax maps to the top of the range
    assert torch.equal(q["xsum"].long(), x16.sum(dim=1))
    # round to nearest: within half a unit, plus the fp32 rounding of sx and 1/sx (X16_MAX·2^-23 units)
    assert ((x16.double() * q["sx"].double()[:, None] - x.double()).abs() <= q["sx"].double()[:, None] * 0.51).all()
    assert torch.equal(_unpack_x16(tg.pack_x16(torch.zeros(2, k), k, plane_words), k, plane_words),
                       torch.zeros(2, k, dtype=torch.int64))  # all-zero rows stay zero (no 0/0)


@pytest.mark.parametrize("n,k,plane_words", SHAPES)
def test_x16_reference_is_within_its_rounding_bound_of_the_float_one(n, k, plane_words, gen):
    packed, E = _weights(n, k, gen)
    words = tg.pack_2bit(packed, k, plane_words=plane_words)
    x = torch.randn(4, k, generator=gen, dtype=torch.float64)
    y16 = tg.gemv_x16_reference(x, words, E, k, plane_words)
    y = tg.gemv_2bit_reference(x, words, E, k, plane_words)
    _, sx = tg._x16(x)
    # each activation is off by at most sx/2, so an output by at most sx/2 · Σ|t| · its row scale
    nonzero = unpack_trits(packed, k).double().abs().sum(dim=1)
    bound = sx.double()[:, 0, None] / 2 * (nonzero * exponent_to_scale(E, torch.float64))[None, :]
    assert ((y16 - y).abs() <= bound * 1.0001 + 1e-12).all()
    assert (y16 - y).abs().max() > 0  # the fixed point is not the float product
    # "i8f"'s slices: each has a scale of its own, never coarser than the row's, so the same bound holds
    y_sliced = tg.gemv_x16_reference(x, words, E, k, plane_words, slice_words=plane_words)
    assert ((y_sliced - y).abs() <= bound * 1.0001 + 1e-12).all()


def test_x16_slices_have_scales_of_their_own():
    """A hand-made row: slice 0 (columns 0..127 at L = 8) holds 1.0 at most, slice 1 holds 100.0;
    per slice each maps to X16_MAX, with one scale for the row the small values lose 100x."""
    x = torch.zeros(1, 200, dtype=torch.float64)
    x[0, 3], x[0, 130] = 1.0, 100.0
    x16, sx = tg._x16(x, slice_cols=128)
    assert sx.shape == (1, 2)
    assert x16[0, 3] == tg.X16_MAX and x16[0, 130] == tg.X16_MAX
    assert torch.allclose(sx[0], torch.tensor([1.0, 100.0]) / tg.X16_MAX)
    x16_row, sx_row = tg._x16(x)
    assert x16_row[0, 3] == round(tg.X16_MAX / 100) and sx_row.shape == (1, 1)
    # a slice covering the whole row is the per-row fixed point
    words = tg.pack_2bit(random_packed(3, 200), 200, plane_words=8)
    E = torch.zeros(3, dtype=torch.int8)
    assert torch.equal(tg.gemv_x16_reference(x, words, E, 200, 8, slice_words=16),
                       tg.gemv_x16_reference(x, words, E, 200, 8))


def test_bad_input_is_refused_naming_the_argument(gen):
    packed, E = _weights(4, 40, gen)
    words = tg.pack_2bit(packed, 40, plane_words=8)
    x = torch.randn(2, 40)
    with pytest.raises(ValueError, match="plane_words must be one of .* got 12"):
        tg.pack_2bit(packed, 40, plane_words=12)
    with pytest.raises(ValueError, match="x must have shape \\(M, in_features=41\\)"):
        tg.check_gemv_args(x, words, E, 41, 8)
    with pytest.raises(ValueError, match="words must be int32 of shape \\(R, 8\\)"):
        tg.check_gemv_args(x, words.to(torch.int64), E, 40, 8)
    with pytest.raises(ValueError, match="E must be int8 of shape \\(4,\\)"):
        tg.check_gemv_args(x, words, E[:3], 40, 8)
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        tg.check_gemv_args(x, words, E, 40, 8, offsets=torch.tensor([1, 2, 2]))
    with pytest.raises(ValueError, match="groups=3"):
        tg.DecodeWeights.from_state(packed, E, 40, groups=3)
    with pytest.raises(ValueError, match="meta device"):
        tg.DecodeWeights.from_state(packed.to("meta"), E.to("meta"), 40)
    copy = tg.DecodeWeights.from_state(packed, E, 40)
    with pytest.raises(ValueError, match="offsets must be given exactly when groups > 1"):
        copy(x, torch.tensor([2]))
    if tg.gemv_2bit_triton is None:
        return
    with pytest.raises(ValueError, match="variant must be one of .* got 'fastest'"):
        tg.gemv_2bit_triton(x, words, E, 40, 8, variant="fastest")
    with pytest.raises(ValueError, match="variant='dot' needs bfloat16/float16 x"):
        tg.gemv_2bit_triton(x, words, E, 40, 8, variant="dot")
    with pytest.raises(ValueError, match="needs plane_words >= 16"):
        tg.gemv_2bit_triton(x.bfloat16(), words, E, 40, 8, variant="dot1")
    with pytest.raises(ValueError, match="takes one group"):
        tg.gemv_2bit_triton(x.bfloat16(), words, E, 40, 8, variant="dot", offsets=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="at most 16 rows of x, got M=17"):
        tg.gemv_2bit_triton(torch.randn(17, 40).bfloat16(), words, E, 40, 8, variant="dot")
    with pytest.raises(ValueError, match="config BN must be a power of two >= 16, got 8"):
        tg.gemv_2bit_triton(x, words, E, 40, 8, config=dict(BN=8))
    with pytest.raises(ValueError, match="config BW must be a power of two >= plane_words=8, got 4"):
        tg.gemv_2bit_triton(x, words, E, 40, 8, config=dict(BW=4))
    with pytest.raises(ValueError, match="x must have shape \\(M, in_features=41\\), got shape \\(2, 40\\)"):
        tg.pack_x16(x, 41, 8)
    with pytest.raises(ValueError, match="variant='i8' needs bfloat16/float16 x"):
        tg.gemv_2bit_triton(x, words, E, 40, 8, variant="i8")
    with pytest.raises(ValueError, match="variant='i8' takes one group"):
        tg.gemv_2bit_triton(x.bfloat16(), words, E, 40, 8, variant="i8", offsets=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="variant='i8f' needs bfloat16/float16 x"):
        tg.gemv_2bit_triton(x, words, E, 40, 8, variant="i8f")
    with pytest.raises(ValueError, match="slice_words must be a positive multiple of plane_words=8, got 12"):
        tg.gemv_x16_reference(x, words, E, 40, 8, slice_words=12)
    with pytest.raises(ValueError, match="config stages must be a positive int .* got 0"):
        tg.gemv_2bit_triton(x, words, E, 40, 8, config=dict(stages=0))
    with pytest.raises(ValueError, match=r"config keys must be among .* got \['pf'\]"):
        tg.gemv_2bit_triton(x, words, E, 40, 8, config=dict(pf=True))
    with pytest.raises(ValueError, match="config prefetch must be a bool .* got 1"):
        tg.gemv_2bit_triton(x, words, E, 40, 8, config=dict(prefetch=1))
    with pytest.raises(ValueError, match=r"config prefetch applies to variants \('fma', 'i8f'\) only, got variant='i8'"):
        tg.gemv_2bit_triton(x.bfloat16(), words, E, 40, 8, variant="i8", config=dict(prefetch=True))
    for early in (3, True):
        with pytest.raises(ValueError, match=rf"config early must be one of \(0, 1, 2, 4\) .* got {early}"):
            tg.gemv_2bit_triton(x.bfloat16(), words, E, 40, 8, variant="i8f", config=dict(early=early))
    with pytest.raises(ValueError, match="config early applies to variant 'i8f' only, got variant='fma'"):
        tg.gemv_2bit_triton(x, words, E, 40, 8, variant="fma", config=dict(early=1))
    with pytest.raises(ValueError, match="config maxnreg must be an int in 32..255 .* got 16"):
        tg.gemv_2bit_triton(x, words, E, 40, 8, config=dict(maxnreg=16))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        tg.gemv_2bit_triton(x, words, E, 40, 8, out=torch.empty(2, 5))
    if not interpreting():
        with pytest.raises(ValueError, match="CUDA"):
            tg.gemv_2bit_triton(x, words, E, 40, 8)


# ------------------------------------------------------------------------------------------------
# kernels against the reference (interpreter and CUDA)
# ------------------------------------------------------------------------------------------------
def _run(variant, x2d, words, E, k, plane_words, config, offsets=None, ws=None, counters=None):
    out = torch.full((x2d.shape[0], words.shape[0] // (1 if offsets is None else offsets.shape[0])), float("nan"),
                     dtype=x2d.dtype, device=x2d.device)
    y = tg.gemv_2bit_triton(x2d, words, E, k, plane_words, variant=variant, out=out, config=config, offsets=offsets,
                            ws=ws, counters=counters)
    assert y.data_ptr() == out.data_ptr()
    assert torch.isfinite(y).all(), f"{variant} {config}: unwritten (NaN-poisoned) outputs remain"
    return y


def _splits(plane_words: int) -> list[dict]:
    bw = max(16, plane_words)
    return [dict(BN=16, BW=bw, split=1), dict(BN=32, BW=bw, split=3), dict(BN=16, BW=bw),  # automatic split
            dict(BN=16, BW=bw, split=2, stages=1, maxnreg=96)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,plane_words", SHAPES)
@pytest.mark.parametrize("m", [1, 3])
# (variant, activation dtype): fma against the float reference (itself checked against the fp64
# oracle), i8 against its fixed-point reference (integer products: exact up to the output rounding)
@pytest.mark.parametrize("variant,dtype", [("fma", torch.float32), ("fma", torch.bfloat16),
                                           ("i8", torch.bfloat16), ("i8", torch.float16),
                                           ("i8f", torch.bfloat16), ("i8f", torch.float16)])
def test_per_row_kernels_match_their_reference(backend, n, k, plane_words, m, variant, dtype, gen):
    device = _device(backend)
    packed, E = _weights(n, k, gen, device)
    words = tg.pack_2bit(packed, k, plane_words=plane_words)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    if variant == "fma":
        ref = tg.gemv_2bit_reference(x, words, E, k, plane_words)
        torch.testing.assert_close(ref.double().cpu(), _oracle(x, packed, E, k), **_tolerance(dtype, ref))
    configs = _splits(plane_words) if m == 1 else _splits(plane_words)[1::2]
    if variant == "i8f":  # words of the first steps loaded before the activation pack: 1 step without a
        # split over K, 2 steps where some slices are shorter (split=3: the last slice may have 1 step)
        configs += [dict(configs[0], early=1), dict(configs[1], early=2), dict(configs[1], early=4)]
    # the L2 prefetch of each program's word slice (a PTX hint on CUDA, skipped by the interpreter):
    # with and without a split over K, and beside an early tile
    if variant in tg.PREFETCH_VARIANTS:
        configs += [dict(c, prefetch=True) for c in configs[:2]] + ([dict(configs[1], early=1, prefetch=True)]
                                                                    if variant == "i8f" else [])
    for cfg in configs:
        if variant != "fma":  # i8 quantises per row, i8f per K slice of the launch
            slices = (tg.i8f_slice_words(m, n, words.shape[1], plane_words, x.device, cfg)
                      if variant == "i8f" else None)
            ref = tg.gemv_x16_reference(x, words, E, k, plane_words, slice_words=slices)
        y = _run(variant, x, words, E, k, plane_words, cfg)
        torch.testing.assert_close(y, ref, **_tolerance(dtype, ref), msg=lambda s: f"{cfg}: {s}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_i8_pack_takes_rows_longer_than_one_pack_step(backend, gen):
    """The x pack covers a row in steps of PACK_BLOCK activations: a row one step and a bit long,
    its absmax in the second step, must give the same words as a row that fits in one."""
    device = _device(backend)
    n, k, L = 3, tg.PACK_BLOCK + 37, 32
    packed, E = _weights(n, k, gen, device)
    words = tg.pack_2bit(packed, k, plane_words=L)
    x = torch.randn(2, k, generator=gen)
    x[:, -5] = 40.0  # the absmax of both rows lies past the first step
    x = x.to(device=device, dtype=torch.bfloat16)
    ref = tg.gemv_x16_reference(x, words, E, k, L)
    y = _run("i8", x, words, E, k, L, dict(BN=16, BW=32, split=3))
    torch.testing.assert_close(y, ref, **_tolerance(torch.bfloat16, ref))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,plane_words", SHAPES)
@pytest.mark.parametrize("m", [1, 5])
def test_dot_kernels_match_reference(backend, n, k, plane_words, m, gen):
    device = _device(backend)
    packed, E = _weights(n, k, gen, device)
    words = tg.pack_2bit(packed, k, plane_words=plane_words)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=torch.bfloat16)
    ref = tg.gemv_2bit_reference(x, words, E, k, plane_words)
    variants = ["dot", "dot1"] if plane_words >= 16 else ["dot"]
    for variant in variants:
        for cfg in _splits(plane_words)[:2]:
            y = _run(variant, x, words, E, k, plane_words, cfg)
            torch.testing.assert_close(y, ref, **_tolerance(torch.bfloat16, ref), msg=lambda s: f"{variant} {cfg}: {s}")


@pytest.mark.parametrize("m,plane_words,dtype,grouped,want", [
    (1, 32, torch.bfloat16, False, "i8f"), (1, 8, torch.float16, False, "i8f"),
    (1, 32, torch.float32, False, "fma"), (1, 32, torch.bfloat16, True, "fma"),
    (2, 32, torch.bfloat16, False, "i8f"), (3, 32, torch.bfloat16, False, "dot1"),
    (16, 16, torch.float16, False, "dot1"), (2, 8, torch.bfloat16, False, "i8f"),
    (4, 8, torch.bfloat16, False, "dot"), (17, 32, torch.bfloat16, False, "fma"), (4, 32, torch.float32, False, "fma")])
def test_auto_variant_choice(m, plane_words, dtype, grouped, want):
    assert tg.auto_variant(m, plane_words, dtype, grouped) == want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,plane_words", [(300, 8), (515, 16), (1003, 32)])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_takes_a_kernel_for_every_plane_width(backend, k, plane_words, m, dtype, gen):
    """"auto" must never pick a kernel that refuses the layout (dot1 needs planes of >= 16 words)."""
    device = _device(backend)
    packed, E = _weights(12, k, gen, device)
    words = tg.pack_2bit(packed, k, plane_words=plane_words)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    ref = tg.gemv_2bit_reference(x, words, E, k, plane_words)
    torch.testing.assert_close(_run("auto", x, words, E, k, plane_words, None), ref, **_tolerance(dtype, ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_every_variant(backend, gen):
    device = _device(backend)
    n, k, L = 20, 515, 16
    packed, E = _weights(n, k, gen, device)
    words = tg.pack_2bit(packed, k, plane_words=L)
    x = torch.randn(4, k, generator=gen).to(device=device, dtype=torch.float16)
    ref = tg.gemv_2bit_reference(x, words, E, k, L)
    ref16 = tg.gemv_x16_reference(x, words, E, k, L)  # "i8" multiplies by x in 16-bit fixed point
    cfg = dict(BN=16, BW=16, split=2)
    ref16f = tg.gemv_x16_reference(x, words, E, k, L, slice_words=tg.i8f_slice_words(4, n, words.shape[1], L,
                                                                                      x.device, cfg))
    for variant in ("fma", "dot", "dot1", "i8", "i8f", "auto"):
        y = _run(variant, x, words, E, k, L, cfg)
        want = {"i8": ref16, "i8f": ref16f}.get(variant, ref)
        torch.testing.assert_close(y, want, **_tolerance(torch.float16, want), msg=lambda s: f"{variant}: {s}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("counts", [(0, 2, 0, 1), (3, 0, 0, 0), (0, 0, 0, 1), (1, 1, 1, 1), (0, 0, 0, 0)])
def test_grouped_fma_matches_reference_and_leaves_the_workspace_clean(backend, counts, gen):
    device = _device(backend)
    G, n, k = len(counts), 24, 300
    packed, E = _weights(G * n, k, gen, device)
    copy = tg.DecodeWeights.from_state(packed, E, k, groups=G)
    offsets = torch.tensor(counts).cumsum(0).to(device=device, dtype=torch.int32)
    x = torch.randn(sum(counts), k, generator=gen).to(device)
    ref = tg.gemv_2bit_reference(x, copy.words, copy.E, k, copy.plane_words, offsets)
    for cfg in (dict(BN=16, BW=16, split=1), dict(BN=16, BW=16, split=2),
                dict(BN=16, BW=16, split=2, prefetch=True)):
        for _ in range(2):  # a second launch over the same workspace: it must have been left at zero
            y = _run("fma", x, copy.words, copy.E, k, copy.plane_words, cfg, offsets, copy.ws, copy.counters)
            torch.testing.assert_close(y, ref, **_tolerance(torch.float32, ref), msg=lambda s: f"{cfg}: {s}")
        assert not copy.ws.any() and not copy.counters.any(), "split-K workspace not reset"


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_strided_input(backend, gen):
    device = _device(backend)
    packed, E = _weights(9, 23, gen, device)
    words = tg.pack_2bit(packed, 23, plane_words=8)
    assert tg.gemv_2bit_triton(torch.empty(0, 23, device=device), words, E, 23, 8).shape == (0, 9)
    wide = torch.randn(2, 46, generator=gen).to(device)
    x = wide[:, ::2]  # stride 2 along K
    ref = tg.gemv_2bit_reference(x, words, E, 23, 8)
    torch.testing.assert_close(tg.gemv_2bit_triton(x, words, E, 23, 8), ref, **_tolerance(torch.float32, ref))


# ------------------------------------------------------------------------------------------------
# the layers' inference copy
# ------------------------------------------------------------------------------------------------
def _state_snapshot(module: torch.nn.Module) -> dict:
    return {name: t.clone() for name, t in module.state_dict().items()}


def _assert_same_state(before: dict, module: torch.nn.Module) -> None:
    after = module.state_dict()
    assert list(after) == list(before)
    for name, t in after.items():
        assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name


def test_linear_prepare_inference_keeps_state_dict_and_train_drops_it(gen):
    from ternary_graph.nn.linear import TernaryLinear

    torch.manual_seed(0)
    layer = TernaryLinear(130, 33)
    before = _state_snapshot(layer)
    layer.eval()
    layer.prepare_inference()
    copy = layer.inference_copy
    assert isinstance(copy, tg.DecodeWeights)
    _assert_same_state(before, layer)
    assert all(t.data_ptr() != copy.words.data_ptr() for t in layer.buffers())  # an attribute, not a buffer
    x = torch.randn(2, 130, generator=gen)
    with torch.no_grad():  # on CPU the layer keeps its own path; the copy computes the same map
        torch.testing.assert_close(copy(x), layer(x), rtol=1e-5, atol=1e-5)
    layer.weight.packed.fill_(121)  # a later weight change leaves the snapshot as it was
    assert torch.equal(tg.unpack_2bit(copy.words, 130, copy.plane_words), unpack_trits(before["weight.packed"], 130))
    layer.eval()
    assert layer.inference_copy is copy
    layer.train()
    assert layer.inference_copy is None
    layer.prepare_inference()
    layer.load_state_dict(before)
    assert layer.inference_copy is None


def test_grouped_prepare_inference_keeps_state_dict_and_train_drops_it(gen):
    from ternary_graph.nn.grouped import TernaryGroupedLinear

    torch.manual_seed(0)
    layer = TernaryGroupedLinear(3, 12, 7)
    before = _state_snapshot(layer)
    layer.prepare_inference()
    _assert_same_state(before, layer)
    copy = layer.inference_copy
    assert copy.groups == 3 and copy.out_features == 7
    x = torch.randn(4, 12, generator=gen)
    offsets = torch.tensor([1, 1, 4])
    with torch.no_grad():
        torch.testing.assert_close(copy(x, offsets), layer(x, offsets), rtol=1e-5, atol=1e-5)
    layer.train()
    assert layer.inference_copy is None


def test_model_prepare_inference_covers_every_ternary_linear(one_torch_thread):
    from ternary_graph.config import get_preset
    from ternary_graph.models.model import build_model
    from ternary_graph.nn.grouped import TernaryGroupedLinear
    from ternary_graph.nn.linear import TernaryLinear

    model = build_model(get_preset("tiny"))
    before = _state_snapshot(model)
    assert model.prepare_inference() is model and not model.training
    layers = [m for m in model.modules() if isinstance(m, (TernaryLinear, TernaryGroupedLinear))]
    assert layers and all(isinstance(m.inference_copy, tg.DecodeWeights) for m in layers)
    _assert_same_state(before, model)
    assert sum(t.numel() for t in model.state_dict().values() if t.is_floating_point()) == 0
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    model.eval()  # eval keeps the copies; train drops them
    assert all(m.inference_copy is not None for m in layers)
    model.train()
    assert all(m.inference_copy is None for m in layers)
    float_model = build_model(get_preset("tiny"), weights="float")
    float_model.prepare_inference()  # nothing to build, and no error


def test_register_counts_compile_for_hopper_without_a_gpu():
    """experiments/gemv_registers.py: Triton compiles the kernels for sm_90 here, and a tile with a
    quarter of the elements per thread needs fewer registers."""
    pytest.importorskip("triton")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
    import gemv_registers as gr

    def fma(BN, warps):
        consts = dict(L=32, BN=BN, BW=32, GP=1, HAS_GROUPS=False, SPLIT=True, EVEN=True, PREFETCH=False,
                      ASM=True)
        return gr.registers(tg._gemv2_fma_kernel, gr.FMA_POINTERS, consts, warps)
    big, small = fma(64, 4), fma(16, 4)
    assert 16 <= small < big <= 255


# ------------------------------------------------------------------------------------------------
# CUDA only: larger untuned shapes, the layers' fast path, a CUDA graph
# ------------------------------------------------------------------------------------------------
def _oracle_of(variant: str, x: torch.Tensor, copy, k: int, exact: torch.Tensor | None = None) -> torch.Tensor:
    """The exact oracle of the kernel ``variant`` runs ("auto" resolved as the launcher does): the
    16-bit fixed-point reference for "i8" / "i8f" (with "i8f"'s K slices), else the exact product
    (``exact`` where the caller has it already)."""
    m, n = x.shape[0], copy.words.shape[0]
    if variant == "auto":
        variant = tg.auto_variant(m, copy.plane_words, x.dtype, grouped=False)
    if variant not in ("i8", "i8f"):
        return exact if exact is not None else tg.gemv_2bit_reference(x, copy.words, copy.E, k, copy.plane_words)
    slices = tg.i8f_slice_words(m, n, copy.words.shape[1], copy.plane_words, x.device) if variant == "i8f" else None
    return tg.gemv_x16_reference(x, copy.words, copy.E, k, copy.plane_words, slice_words=slices)


def _bf16_tolerance(ref: torch.Tensor) -> dict:
    """Agreement within bf16: one rounding of each output (rtol) and half a bf16 ulp (2^-8) of the RMS
    (atol). The "i8" kernels' 16-bit fixed-point x is off by at most sx/2 per element, an error
    of ~3e-5 of the RMS at K = 4096: far inside it, and far outside :func:`_tolerance`'s 1e-5."""
    return dict(rtol=1.6e-2, atol=2.0 ** -8 * max(_rms(ref), 1e-30))


@pytest.mark.cuda
@pytest.mark.parametrize("n,k", [(4099, 1003), (257, 2049), (8192, 8192), (14336, 4096), (2240, 2048), (2048, 1120)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_untuned_shapes_every_variant(n, k, dtype, gen):
    packed, E = _weights(n, k, gen, "cuda")
    copy = tg.DecodeWeights.from_state(packed, E, k)
    for m in (1, 2, 3, 16):  # each side of auto's switches
        x = torch.randn(m, k, generator=gen).to(device="cuda", dtype=dtype)
        ref = tg.gemv_2bit_reference(x, copy.words, copy.E, k, copy.plane_words)
        variants = ["auto", "fma"] + (["dot", "i8", "i8f"] + (["dot1"] if copy.plane_words >= 16 else [])
                                      if dtype != torch.float32 else [])
        for variant in variants:
            y = _run(variant, x, copy.words, copy.E, k, copy.plane_words, None, ws=copy.ws, counters=copy.counters)
            want = _oracle_of(variant, x, copy, k, exact=ref)
            torch.testing.assert_close(y, want, **_tolerance(dtype, want), msg=lambda s: f"m={m} {variant}: {s}")
            # and every kernel, "i8f" with its 16-bit fixed-point x included, is within bf16 of the exact product
            if dtype == torch.bfloat16:
                torch.testing.assert_close(y, ref, **_bf16_tolerance(ref), msg=lambda s: f"m={m} {variant}: {s}")
            if variant in tg.PREFETCH_VARIANTS:  # the L2 prefetch is a hint: the same oracle holds
                y_pf = _run(variant, x, copy.words, copy.E, k, copy.plane_words, dict(prefetch=True), ws=copy.ws,
                            counters=copy.counters)
                torch.testing.assert_close(y_pf, want, **_tolerance(dtype, want),
                                           msg=lambda s: f"m={m} {variant} prefetch: {s}")
        assert not copy.ws.any() and not copy.counters.any()


@pytest.mark.cuda
def test_cuda_layers_take_the_copy_and_match_the_training_path(gen):
    from ternary_graph.kernels.grouped_linear import grouped_linear_forward
    from ternary_graph.kernels.ternary_linear import linear_forward
    from ternary_graph.nn.grouped import TernaryGroupedLinear
    from ternary_graph.nn.linear import TernaryLinear

    torch.manual_seed(0)
    layer = TernaryLinear(1003, 4099, device="cuda").eval()
    x = torch.randn(1, 1, 1003, generator=gen).to(device="cuda", dtype=torch.bfloat16)
    layer.prepare_inference()
    assert layer.inference_copy.applies(x)
    with torch.no_grad():
        y = layer(x)
        ref = linear_forward(x, layer.weight.packed, layer.weight.E, 1003)
        exact = _oracle_of("auto", x.reshape(1, 1003), layer.inference_copy, 1003).reshape(ref.shape)
    torch.testing.assert_close(y, exact, **_tolerance(torch.bfloat16, exact))  # the copy runs "auto"'s kernel
    torch.testing.assert_close(y, ref, **_bf16_tolerance(ref))  # ... within bf16 of the training path
    grouped = TernaryGroupedLinear(16, 2048, 2240, device="cuda").eval()
    grouped.prepare_inference()
    xg = torch.randn(2, 2048, generator=gen).to(device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([0] * 3 + [1] * 9 + [2] * 4, device="cuda")  # rows on experts 3 and 12
    with torch.no_grad():
        yg = grouped(xg, offsets)
        refg = grouped_linear_forward(xg, grouped.weight.packed, grouped.weight.E, offsets, 2048)
    torch.testing.assert_close(yg, refg, **_tolerance(torch.bfloat16, refg))
    big = torch.randn(17, 1003, device="cuda", dtype=torch.bfloat16)
    assert not layer.inference_copy.applies(big)  # above DECODE_MAX_M rows the training kernels run


@pytest.mark.cuda
def test_cuda_graph_replay_of_the_decode_gemv(gen):
    packed, E = _weights(4096, 4096, gen, "cuda")
    copy = tg.DecodeWeights.from_state(packed, E, 4096)
    x = torch.randn(1, 4096, generator=gen).to(device="cuda", dtype=torch.bfloat16)
    copy(x)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = copy(x)
    for _ in range(3):
        x.copy_(torch.randn(1, 4096, generator=gen).to(device="cuda", dtype=torch.bfloat16))
        graph.replay()
        ref = _oracle_of("auto", x, copy, 4096)
        torch.testing.assert_close(y, ref, **_tolerance(torch.bfloat16, ref))
    assert not copy.ws.any() and not copy.counters.any()


def test_interpreter_suite():
    """Runs every ``interpreter`` test of this file in a TRITON_INTERPRET=1 child process."""
    if interpreting():
        pytest.skip("already inside the interpreter run")
    run_interpreter_suite(__file__, timeout_s=600.0)
