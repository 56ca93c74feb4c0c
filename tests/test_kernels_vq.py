"""Nearest-code search: the chunked torch reference against brute force, the Triton kernels
against the reference (under TRITON_INTERPRET=1 in a subprocess, and on CUDA), the custom op."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from ternary_graph.kernels.vq_search import (PRECISIONS, nearest_codes, nearest_codes_op,
                                             nearest_codes_reference, round_queries)
from ternary_graph.ternary.packing import pack_trits, random_packed, unpack_trits
from ternary_graph.ternary.state import exponent_to_scale

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _codebook(n, dim, seed, e_range=(-6, 6)):
    g = torch.Generator().manual_seed(seed)
    packed = random_packed(n, dim, generator=g)
    E = torch.randint(e_range[0], e_range[1], (n,), generator=g, dtype=torch.int8)
    return packed, E, g


def _brute_force(z, packed, E, dim, precision):
    """float64 distances to every code: the exact answer for the rounded queries."""
    zr = round_queries(z, precision).double()
    codes = unpack_trits(packed, dim).double() * exponent_to_scale(E).double()[:, None]
    d = ((zr[:, None, :] - codes[None, :, :]) ** 2).sum(-1)
    return d


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dim", [64, 7, 13])
def test_reference_matches_brute_force(precision, dim):
    packed, E, g = _codebook(500, dim, seed=dim)
    z = torch.randn(40, dim, generator=g) * 1.5
    ids, dist = nearest_codes_reference(z, packed, E, dim, precision=precision, max_chunk_elems=3000)
    d = _brute_force(z, packed, E, dim, precision)
    best = d.min(dim=1)
    # the found code is at the minimal distance (up to fp32 rounding of the score)...
    torch.testing.assert_close(d.gather(1, ids[:, None]).squeeze(1), best.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dist.double(), best.values, rtol=1e-5, atol=1e-4)
    # ...and on fresh random queries there are no near-ties, so it is the same code
    assert torch.equal(ids, best.indices)


def test_reference_is_chunk_invariant_and_breaks_ties_to_smallest_id():
    dim = 64
    packed, E, g = _codebook(300, dim, seed=1)
    # duplicates of codes 3 and 17 at higher ids, across chunk boundaries
    dup_src = torch.tensor([3, 3, 17, 17])
    dup_dst = torch.tensor([150, 299, 40, 260])
    E[torch.tensor([3, 17])] = torch.tensor([4, -8], dtype=torch.int8)  # scales 2 and 1/4: exact
    packed[dup_dst] = packed[dup_src]
    E[dup_dst] = E[dup_src]
    # queries that sit exactly on those codes (dyadic values: every sum is exact)
    z = unpack_trits(packed[dup_src], dim).float() * exponent_to_scale(E[dup_src])[:, None]
    z = torch.cat([z, torch.randn(20, dim, generator=g)])
    results = [nearest_codes_reference(z, packed, E, dim, max_chunk_elems=m) for m in (1, 5000, 1 << 22)]
    for ids, dist in results[1:]:
        assert torch.equal(ids, results[0][0])
        assert torch.equal(dist, results[0][1])
    assert results[0][0][:4].tolist() == [3, 3, 17, 17]
    assert torch.all(results[0][1][:4] == 0)


def test_empty_batch_and_single_query():
    packed, E, g = _codebook(10, 9, seed=2)
    ids, dist = nearest_codes(torch.zeros(0, 9), packed, E, 9)
    assert ids.shape == (0,) and ids.dtype == torch.int64 and dist.shape == (0,) and dist.dtype == torch.float32
    ids, dist = nearest_codes(torch.zeros(2, 0, 9), packed, E, 9)
    assert ids.shape == (2, 0)
    z = torch.randn(9, generator=g)
    ids, dist = nearest_codes(z, packed, E, 9)
    assert ids.shape == () and int(ids) == int(_brute_force(z[None], packed, E, 9, "bf16x2").argmin())


def test_leading_dims_are_kept():
    packed, E, g = _codebook(50, 16, seed=3)
    z = torch.randn(2, 3, 4, 16, generator=g)
    ids, dist = nearest_codes(z, packed, E, 16)
    flat_ids, flat_dist = nearest_codes(z.reshape(-1, 16), packed, E, 16)
    assert ids.shape == (2, 3, 4) and torch.equal(ids.reshape(-1), flat_ids)
    assert torch.equal(dist.reshape(-1), flat_dist)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_queries_raise(bad):
    packed, E, _ = _codebook(20, 8, seed=4)
    z = torch.zeros(3, 8)
    z[1, 2] = bad
    with pytest.raises(ValueError, match="finite"):
        nearest_codes(z, packed, E, 8)


def test_argument_errors_name_the_value():
    packed, E, _ = _codebook(20, 8, seed=5)
    with pytest.raises(ValueError, match=r"dim=8.*\(3, 7\)"):
        nearest_codes(torch.zeros(3, 7), packed, E, 8)
    with pytest.raises(TypeError, match="int64"):
        nearest_codes(torch.zeros(3, 8, dtype=torch.int64), packed, E, 8)
    with pytest.raises(ValueError, match="uint8"):
        nearest_codes(torch.zeros(3, 8), packed.to(torch.int16), E, 8)
    with pytest.raises(ValueError, match="E must be int8"):
        nearest_codes(torch.zeros(3, 8), packed, E[:5], 8)
    with pytest.raises(ValueError, match="precision"):
        nearest_codes(torch.zeros(3, 8), packed, E, 8, precision="fp8")


def test_custom_op_fake_impl_and_opcheck():
    packed, E, g = _codebook(40, 12, seed=6)
    z = torch.randn(5, 12, generator=g)
    torch.library.opcheck(nearest_codes_op, (z, packed, E, 12, "bf16x2"))
    ids, dist = nearest_codes_op(z.to("meta"), packed.to("meta"), E.to("meta"), 12, "bf16")
    assert ids.device.type == "meta" and ids.shape == (5,) and ids.dtype == torch.int64
    assert dist.shape == (5,) and dist.dtype == torch.float32


def test_inputs_are_not_modified():
    packed, E, g = _codebook(30, 10, seed=7)
    z = torch.randn(4, 10, generator=g)
    copies = [t.clone() for t in (z, packed, E)]
    nearest_codes(z, packed, E, 10)
    for t, c in zip((z, packed, E), copies):
        assert torch.equal(t, c)


# --------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (subprocess: TRITON_INTERPRET must be set before
# triton is imported, and must not leak into this process)
# --------------------------------------------------------------------------------------------

_INTERPRET_SCRIPT = r"""
import json, torch
from ternary_graph.kernels.vq_search import nearest_codes_triton, nearest_codes_reference
from ternary_graph.ternary.packing import random_packed, unpack_trits
from ternary_graph.ternary.state import exponent_to_scale

def codebook(n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return random_packed(n, dim, generator=g), torch.randint(-6, 6, (n,), generator=g, dtype=torch.int8), g

results = []
def compare(name, z, packed, E, dim, **kw):
    prec = kw.get("precision", "bf16x2")
    ids, dist = nearest_codes_triton(z, packed, E, dim, **kw)
    rids, rdist = nearest_codes_reference(z, packed, E, dim, precision=prec)
    results.append(dict(name=name, n=int(z.shape[0]), ids_equal=bool(torch.equal(ids, rids)),
                        ids_dtype=str(ids.dtype), dist_dtype=str(dist.dtype),
                        max_dist_err=float((dist - rdist).abs().max()) if z.shape[0] else 0.0,
                        ids=ids[:8].tolist()))

for prec in ("bf16", "bf16x2"):
    for magic in (False, True):
        packed, E, g = codebook(300, 64, 1)
        z = torch.randn(37, 64, generator=g) * 2
        compare(f"random-{prec}-magic{magic}", z, packed, E, 64, precision=prec, block_q=16,
                block_c=32, splits=3, magic_decode=magic)
packed, E, g = codebook(77, 64, 2)   # 77 codes: not a multiple of the 32-code tile
compare("codes-not-multiple-of-tile", torch.randn(20, 64, generator=g), packed, E, 64,
        block_q=16, block_c=32, splits=2)
packed, E, g = codebook(150, 7, 3)   # dim 7: not a multiple of 5
compare("dim-7", torch.randn(19, 7, generator=g), packed, E, 7, block_q=16, block_c=32)
packed, E, g = codebook(90, 13, 4)
compare("dim-13-single-query", torch.randn(1, 13, generator=g), packed, E, 13, block_q=16, block_c=32)
compare("empty-batch", torch.zeros(0, 13), packed, E, 13, block_q=16, block_c=32)
packed, E, g = codebook(1, 64, 5)
compare("one-code", torch.randn(3, 64, generator=g), packed, E, 64, block_q=16, block_c=32)
# ties: copies of codes 5 and 9 in later tiles and later splits; queries exactly on them
packed, E, g = codebook(200, 64, 6)
src, dst = torch.tensor([5, 5, 9, 9]), torch.tensor([60, 199, 33, 150])
packed[dst] = packed[src]; E[dst] = E[src]
zt = unpack_trits(packed[src], 64).float() * exponent_to_scale(E[src])[:, None]
for prec in ("bf16", "bf16x2"):
    compare(f"ties-{prec}", torch.cat([zt, torch.randn(12, 64, generator=g)]), packed, E, 64,
            precision=prec, block_q=16, block_c=32, splits=4)
# the default tiles (None: default_search_tile): a decode step's batch, and one query past it
packed, E, g = codebook(3000, 64, 7)
compare("default-tile-single-query", torch.randn(1, 64, generator=g), packed, E, 64)
compare("default-tile-16-queries", torch.randn(16, 64, generator=g), packed, E, 64)
compare("default-tile-17-queries", torch.randn(17, 64, generator=g), packed, E, 64)
# more splits than the refine kernel compares per load (REFINE_BLOCK_S = 256): one tile per
# split, the winners in the second chunk of splits, a tie across the chunks
packed, E, g = codebook(300 * 16, 64, 8)
packed[4500] = packed[5]; E[4500] = E[5]
src = torch.tensor([5, 4490, 4100])
zt = unpack_trits(packed[src], 64).float() * exponent_to_scale(E[src])[:, None]
compare("splits-past-one-refine-load", torch.cat([zt, torch.randn(2, 64, generator=g)]), packed, E, 64,
        block_c=16, splits=300)
# phase 1 by FMAs (one query per program row): the same cases that decide the dot kernel's
for prec in ("bf16", "bf16x2"):
    for magic in (False, True):
        packed, E, g = codebook(300, 64, 1)
        compare(f"fma-random-{prec}-magic{magic}", torch.randn(5, 64, generator=g) * 2, packed, E, 64,
                precision=prec, block_c=32, splits=3, magic_decode=magic, phase1="fma")
packed, E, g = codebook(77, 64, 2)
compare("fma-codes-not-multiple-of-tile", torch.randn(3, 64, generator=g), packed, E, 64, block_c=32, splits=2,
        phase1="fma")
packed, E, g = codebook(150, 7, 3)
compare("fma-dim-7", torch.randn(2, 7, generator=g), packed, E, 7, block_c=32, phase1="fma")
compare("fma-empty-batch", torch.zeros(0, 7), packed, E, 7, phase1="fma")
packed, E, g = codebook(200, 64, 6)
src, dst = torch.tensor([5, 5, 9, 9]), torch.tensor([60, 199, 33, 150])
packed[dst] = packed[src]; E[dst] = E[src]
zt = unpack_trits(packed[src], 64).float() * exponent_to_scale(E[src])[:, None]
compare("fma-ties", zt, packed, E, 64, block_c=32, splits=4, phase1="fma")
packed, E, g = codebook(3000, 64, 7)
compare("fma-default-tile", torch.randn(1, 64, generator=g), packed, E, 64, phase1="fma")
packed, E, g = codebook(300 * 16, 64, 8)
packed[4500] = packed[5]; E[4500] = E[5]
src = torch.tensor([5, 4490, 4100])
zt = unpack_trits(packed[src], 64).float() * exponent_to_scale(E[src])[:, None]
compare("fma-splits-past-one-refine-load", zt, packed, E, 64, block_c=16, splits=300, phase1="fma")
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["name"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}


def test_interpreter_covers_every_case(interpreter_results):
    expected = {f"random-{p}-magic{m}" for p in PRECISIONS for m in (False, True)}
    expected |= {"codes-not-multiple-of-tile", "dim-7", "dim-13-single-query", "empty-batch", "one-code",
                 "ties-bf16", "ties-bf16x2", "default-tile-single-query", "default-tile-16-queries",
                 "default-tile-17-queries", "splits-past-one-refine-load"}
    expected |= {f"fma-random-{p}-magic{m}" for p in PRECISIONS for m in (False, True)}
    expected |= {"fma-codes-not-multiple-of-tile", "fma-dim-7", "fma-empty-batch", "fma-ties", "fma-default-tile",
                 "fma-splits-past-one-refine-load"}
    assert set(interpreter_results) == expected


def test_interpreter_ids_equal_reference(interpreter_results):
    for name, r in interpreter_results.items():
        assert r["ids_equal"], name
        assert r["ids_dtype"] == "torch.int64" and r["dist_dtype"] == "torch.float32", name
        assert r["max_dist_err"] <= 1e-3, name


def test_interpreter_ties_go_to_smallest_id(interpreter_results):
    for prec in PRECISIONS:
        assert interpreter_results[f"ties-{prec}"]["ids"][:4] == [5, 5, 9, 9]
    assert interpreter_results["fma-ties"]["ids"] == [5, 5, 9, 9]


def test_interpreter_refine_finds_the_winner_past_its_first_load(interpreter_results):
    # code 5 and its copy 4500 (split 281, second load) tie: the earlier split wins; codes
    # 4490 and 4100 win only in splits 280 and 256, both past the first 256
    assert interpreter_results["splits-past-one-refine-load"]["ids"][:3] == [5, 4490, 4100]
    assert interpreter_results["fma-splits-past-one-refine-load"]["ids"] == [5, 4490, 4100]


def test_decode_batches_take_the_small_tile():
    from ternary_graph.kernels.ternary_gemv import DECODE_MAX_M
    from ternary_graph.kernels.vq_search import SMALL_BATCH_QUERIES, default_search_tile

    assert SMALL_BATCH_QUERIES == DECODE_MAX_M  # every batch the decode step takes
    assert default_search_tile(1) == default_search_tile(SMALL_BATCH_QUERIES) == (16, 128, 4)
    assert default_search_tile(SMALL_BATCH_QUERIES + 1) == (512, 64, 16)


def test_phase1_kernel_arguments_are_checked():
    from ternary_graph.kernels.vq_search import nearest_codes_triton

    packed, E, g = _codebook(10, 64, seed=0)
    z = torch.randn(1, 64, generator=g)
    with pytest.raises(ValueError, match=r"phase1 must be one of \('dot', 'fma'\), got 'mma'"):
        nearest_codes_triton(z, packed, E, 64, phase1="mma")
    with pytest.raises(ValueError, match=r"block_q applies to phase1='dot' only .*got 16"):
        nearest_codes_triton(z, packed, E, 64, phase1="fma", block_q=16)


def test_interpreter_edge_shapes(interpreter_results):
    assert interpreter_results["empty-batch"]["n"] == 0
    assert interpreter_results["fma-empty-batch"]["n"] == 0
    assert interpreter_results["dim-13-single-query"]["n"] == 1
    assert interpreter_results["one-code"]["ids"] == [0, 0, 0]


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
_CUDA_SHAPES = [(100_003, 64, 1000), (5000, 7, 1), (777, 13, 300), (4096, 64, 65), (300_007, 64, 2), (300_007, 64, 16)]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("magic", [False, True])
@pytest.mark.parametrize("n_codes,dim,n_q,phase1", [
    *[(n, d, q, "dot") for n, d, q in _CUDA_SHAPES],
    *[(n, d, q, "fma") for n, d, q in _CUDA_SHAPES if q <= 16],  # the fma phase 1 serves decode batches
])
def test_cuda_kernel_matches_reference(precision, magic, n_codes, dim, n_q, phase1):
    from ternary_graph.kernels.vq_search import nearest_codes_triton

    packed, E, g = _codebook(n_codes, dim, seed=n_codes + dim)
    z = torch.randn(n_q, dim, generator=g) * 2
    packed, E, z = packed.cuda(), E.cuda(), z.cuda()
    ids, dist = nearest_codes_triton(z, packed, E, dim, precision=precision, magic_decode=magic, phase1=phase1)
    rids, rdist = nearest_codes_reference(z, packed, E, dim, precision=precision)
    mismatch = (ids != rids).nonzero().squeeze(1)
    if mismatch.numel():  # only a near-tie within fp32 rounding may differ
        d = _brute_force(z[mismatch].cpu(), packed.cpu(), E.cpu(), dim, precision)
        gap = (d.gather(1, ids[mismatch].cpu()[:, None]) - d.gather(1, rids[mismatch].cpu()[:, None])).abs()
        assert float(gap.max()) <= 1e-4 * float(d.min(dim=1).values.abs().max() + 1), mismatch.tolist()
    assert mismatch.numel() <= max(1, n_q // 1000)
    torch.testing.assert_close(dist, rdist, rtol=1e-4, atol=1e-3)


@pytest.mark.cuda
@cuda
def test_cuda_ties_and_empty():
    packed, E, g = _codebook(70_000, 64, seed=11)
    src, dst = torch.tensor([5, 5, 9]), torch.tensor([33_000, 69_999, 40_000])
    packed[dst] = packed[src]
    E[dst] = E[src]
    zt = unpack_trits(packed[src], 64).float() * exponent_to_scale(E[src])[:, None]
    ids, _ = nearest_codes(zt.cuda(), packed.cuda(), E.cuda(), 64)
    assert ids.tolist() == [5, 5, 9]
    ids, dist = nearest_codes(torch.zeros(0, 64, device="cuda"), packed.cuda(), E.cuda(), 64)
    assert ids.shape == (0,) and dist.shape == (0,)
