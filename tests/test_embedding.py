"""TernaryEmbeddingTable: packed-first construction, sparse gather, sparse votes, sparse update."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from ternary_graph.nn import TernaryEmbeddingTable
from ternary_graph.ternary import TernaryOptimizer, UpdateRule, unpack_trits
from ternary_graph.ternary.state import exponent_to_scale

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _table(rows=50, dim=13, seed=0, **kw):
    return TernaryEmbeddingTable(rows, dim, generator=torch.Generator().manual_seed(seed), **kw)


def _dequantized(table):
    w = table.weight
    return unpack_trits(w.packed, table.dim).float() * exponent_to_scale(w.E)[:, None]


@pytest.mark.parametrize("shape", [(), (1,), (7,), (2, 3), (2, 3, 4), (0,), (3, 0)])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_forward_any_shape_and_id_dtype(shape, id_dtype):
    table = _table()
    ids = torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(1)).to(id_dtype)
    out = table(ids)
    assert out.shape == (*shape, 13) and out.dtype == torch.float32
    assert torch.equal(out, _dequantized(table)[ids.long()])
    with torch.no_grad():
        assert torch.equal(table(ids), out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_forward_output_dtypes(dtype):
    table = _table()
    ids = torch.tensor([0, 5, 49])
    out = table(ids, dtype=dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), _dequantized(table)[ids], rtol=1e-2, atol=0)


@pytest.mark.parametrize("bad", [50, 1000, -1])
def test_out_of_range_ids_name_the_value(bad):
    table = _table()
    with pytest.raises(ValueError, match=rf"\[0, 50\).*got {bad}\b"):
        table(torch.tensor([[1, 2], [bad, 3]]))


def test_bad_id_types_raise():
    table = _table()
    with pytest.raises(TypeError, match="float32"):
        table(torch.tensor([1.0]))
    with pytest.raises(TypeError, match="int16"):
        table(torch.tensor([1], dtype=torch.int16))
    with pytest.raises(TypeError, match="list"):
        table([1, 2])
    with pytest.raises(TypeError, match="dtype"):
        table(torch.tensor([1]), dtype=torch.int8)


def test_backward_votes_only_touched_rows_with_duplicates_summed():
    table = _table(rows=20, dim=6)
    w = table.weight
    ids = torch.tensor([5, 5, 5, 7])
    out = table(ids)
    grad = torch.zeros(4, 6)
    # row 5, trit 0: +1 +1 -3 sums to -1 -> one -1 vote (a per-id vote would give +1)
    grad[0, 0], grad[1, 0], grad[2, 0] = 1.0, 1.0, -3.0
    grad[0, 1] = 2.0  # row 5, trit 1: +1 vote
    grad[3, 2] = -0.5  # row 7, trit 2: -1 vote
    out.backward(grad)
    expected = torch.zeros(20, 6, dtype=torch.int8)
    expected[5, 0], expected[5, 1], expected[7, 2] = -1, 1, -1
    assert torch.equal(w.T_accum, expected)
    # scale votes: sign(Σ_k summed_grad_k · T_k) for the touched rows, 0 elsewhere
    trits = unpack_trits(w.packed, 6).float()
    summed5 = grad[:3].sum(0)
    assert int(w.E_accum[5]) == int(torch.sign((summed5 * trits[5]).sum()))
    assert int(w.E_accum[7]) == int(torch.sign((grad[3] * trits[7]).sum()))
    others = torch.ones(20, dtype=torch.bool)
    others[[5, 7]] = False
    assert torch.all(w.E_accum[others] == 0)
    assert w.take_touched_rows().tolist() == [5, 7]


def test_votes_saturate_instead_of_wrapping():
    table = _table(rows=4, dim=5)
    w = table.weight
    w.T_accum[1] = torch.tensor([127, -127, 126, 0, -126], dtype=torch.int8)
    w.E_accum[1] = 127
    w.vote_magnitude = 3
    for _ in range(2):
        out = table(torch.tensor([1, 1]))
        out.backward(torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0]] * 2))  # summed per row: ±2 -> votes ±3
    assert w.T_accum[1].tolist() == [127, -127, 127, 6, -127]
    assert w.T_accum.dtype == torch.int8
    assert -127 <= int(w.E_accum[1]) <= 127


def test_sparse_update_touches_only_voted_rows():
    table = _table(rows=1000, dim=13, seed=3)
    w = table.weight
    opt = TernaryOptimizer(table, UpdateRule(threshold=1, scale_threshold=1))
    before = {k: v.clone() for k, v in w.state_dict().items()}
    ids = torch.tensor([[3, 999], [3, 500]], dtype=torch.int32)
    out = table(ids)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(4)))
    stats = opt.step()
    assert stats.trits_updated == 3 * 13  # the step visited the three voted rows only
    assert stats.flips > 0
    changed = (w.packed != before["packed"]).any(dim=1) | (w.E != before["E"])
    assert set(changed.nonzero().squeeze(1).tolist()) <= {3, 500, 999}
    assert changed.any()
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[[3, 500, 999]] = False
    assert torch.equal(w.T_accum[untouched], before["T_accum"][untouched])
    # a step with no new votes visits nothing
    assert opt.step().trits_updated == 0


def test_meta_construction_allocates_nothing():
    table = TernaryEmbeddingTable(10_000_000, 64, device="meta")
    for name, buf in table.named_buffers():
        assert buf.device.type == "meta", name
    assert table.weight.packed.shape == (10_000_000, 13)
    out = table(torch.zeros(3, 2, dtype=torch.int64, device="meta"))
    assert out.shape == (3, 2, 64) and out.device.type == "meta"


def test_no_float_state():
    table = _table()
    assert not any(t.dtype.is_floating_point for t in table.state_dict().values())
    assert list(table.parameters()) == []


_RSS_SCRIPT = r"""
import json, resource, torch
from ternary_graph.nn import TernaryEmbeddingTable
def current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
before = current_rss()
table = TernaryEmbeddingTable(10_000_000, 64, generator=torch.Generator().manual_seed(0))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
final = sum(b.numel() * b.element_size() for b in table.buffers())
byte_max = int(table.weight.packed[:100_000].max())
print(json.dumps(dict(before=before, peak=peak, final=final, byte_max=byte_max)))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_10m_table_constructs_with_peak_rss_below_twice_its_size():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["final"] == 10_000_000 * (13 + 64 + 1 + 1)  # packed + T_accum + E + E_accum
    assert r["peak"] - r["before"] < 2 * r["final"], r
    assert r["byte_max"] <= 242
