"""Base-3 packing and saturating accumulators: property tests and error messages."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ternary_graph.ternary.packing import (
    MAX_PACKED_BYTE,
    count_zero_trits,
    pack_trits,
    packed_cols,
    padding_byte_offset,
    random_packed,
    unpack_trits,
)
from ternary_graph.ternary.saturating import accumulator_limit, decay_magnitude, saturating_add, saturating_add_


@st.composite
def trit_tensors(draw):
    lead = draw(st.lists(st.integers(0, 4), min_size=0, max_size=2))
    cols = draw(st.integers(0, 23))
    n = cols
    for d in lead:
        n *= d
    values = draw(st.lists(st.integers(-1, 1), min_size=n, max_size=n))
    dtype = draw(st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64]))
    return torch.tensor(values, dtype=dtype).reshape(*lead, cols)


@settings(max_examples=150, deadline=None)
@given(trit_tensors())
def test_pack_unpack_round_trip(trits):
    before = trits.clone()
    packed = pack_trits(trits)
    assert torch.equal(trits, before), "pack_trits must not modify its input"
    cols = trits.shape[-1]
    assert packed.dtype == torch.uint8 and packed.shape == (*trits.shape[:-1], packed_cols(cols))
    if packed.numel():
        assert int(packed.max()) <= MAX_PACKED_BYTE
    out = unpack_trits(packed, cols)
    assert out.dtype == torch.int8 and torch.equal(out, trits.to(torch.int8))
    # padding trits decode to zero
    full = unpack_trits(packed, packed.shape[-1] * 5)
    assert not full[..., cols:].any()


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 242))
def test_byte_is_the_base3_number_of_its_trits(byte):
    trits = unpack_trits(torch.tensor([byte], dtype=torch.uint8), 5)
    assert sum((int(t) + 1) * 3**i for i, t in enumerate(trits)) == byte
    assert int(pack_trits(trits)[0]) == byte


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 37), st.one_of(st.none(), st.floats(0.0, 1.0)), st.integers(0, 2**31 - 1))
def test_random_packed_is_valid_and_reproducible(rows, cols, zero_fraction, seed):
    a = random_packed(rows, cols, zero_fraction=zero_fraction, generator=torch.Generator().manual_seed(seed),
                      chunk_rows=7)
    b = random_packed(rows, cols, zero_fraction=zero_fraction, generator=torch.Generator().manual_seed(seed),
                      chunk_rows=7)
    assert torch.equal(a, b) and a.shape == (rows, packed_cols(cols)) and int(a.max()) <= MAX_PACKED_BYTE
    assert not unpack_trits(a, packed_cols(cols) * 5)[:, cols:].any(), "padding trits must be zero"


def test_random_packed_trit_statistics():
    gen = torch.Generator().manual_seed(0)
    uniform = unpack_trits(random_packed(400, 333, generator=gen), 333).float()
    for value in (-1.0, 0.0, 1.0):
        assert abs((uniform == value).float().mean().item() - 1 / 3) < 0.01
    sparse = unpack_trits(random_packed(400, 333, zero_fraction=0.8, generator=gen, chunk_rows=64), 333)
    assert abs((sparse == 0).float().mean().item() - 0.8) < 0.01
    assert abs(sparse.float().mean().item()) < 0.01


def test_padding_byte_offset():
    for r in range(6):
        trits = torch.zeros(5, dtype=torch.int8)  # all-zero trits: every digit is 1
        assert padding_byte_offset(r) == int(pack_trits(trits)[0]) - sum(3**i for i in range(r))


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([0, 2, -1]), r"\[-1, 2\]"),
    (torch.tensor([-3, 0]), r"\[-3, 0\]"),
    (torch.tensor([0.0, 1.0]), "dtype=torch.float32"),
    (torch.tensor([True, False]), "dtype=torch.bool"),
    (torch.tensor(1, dtype=torch.int8), r"shape \(\)"),
])
def test_pack_rejects_bad_trits_quoting_them(bad, message):
    with pytest.raises(ValueError, match=message):
        pack_trits(bad)


def test_pack_rejects_non_tensor():
    with pytest.raises(TypeError, match="list"):
        pack_trits([1, 0, -1])


def test_unpack_rejects_bad_packing_quoting_it():
    with pytest.raises(ValueError, match=r"3 bytes per row, but cols=7 needs 2"):
        unpack_trits(torch.zeros(2, 3, dtype=torch.uint8), 7)
    with pytest.raises(ValueError, match="byte value 250"):
        unpack_trits(torch.tensor([[250]], dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        unpack_trits(torch.zeros(2, 1, dtype=torch.int8), 5)
    with pytest.raises(ValueError, match="-1"):
        packed_cols(-1)
    with pytest.raises(ValueError, match="zero_fraction.*1.5"):
        random_packed(2, 5, zero_fraction=1.5)


# ------------------------------------------------------------------------------------------------
# saturating accumulators
# ------------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-127, 127), min_size=1, max_size=30), st.lists(st.integers(-1000, 1000), min_size=1,
                                                                           max_size=30))
def test_saturating_add_never_wraps(acc_values, vote_values):
    n = min(len(acc_values), len(vote_values))
    acc = torch.tensor(acc_values[:n], dtype=torch.int8)
    votes = torch.tensor(vote_values[:n], dtype=torch.int32)
    out = saturating_add(acc, votes)
    expected = [max(-127, min(127, a + v)) for a, v in zip(acc_values[:n], vote_values[:n])]
    assert out.dtype == torch.int8 and out.tolist() == expected
    assert acc.tolist() == acc_values[:n], "saturating_add must not modify its input"
    saturating_add_(acc, votes)
    assert acc.tolist() == expected


def test_saturating_add_int16_and_limits():
    acc = torch.tensor([32000, -32000], dtype=torch.int16)
    assert saturating_add(acc, torch.tensor([5000, -5000])).tolist() == [32767, -32767]
    assert accumulator_limit(torch.int8) == 127
    with pytest.raises(ValueError, match="torch.float32"):
        accumulator_limit(torch.float32)
    with pytest.raises(ValueError, match="torch.float32"):
        saturating_add(torch.zeros(2, dtype=torch.int8), torch.ones(2))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-127, 127), min_size=1, max_size=40), st.integers(1, 7))
def test_decay_is_symmetric_on_magnitudes(values, shift):
    acc = torch.tensor(values, dtype=torch.int8)
    decayed = decay_magnitude(acc, shift)
    assert torch.equal(decay_magnitude(-acc, shift), -decayed)
    assert (decayed.abs() <= acc.abs()).all() and (torch.sign(decayed) * torch.sign(acc) >= 0).all()
    assert decayed.tolist() == [v - (1 if v > 0 else -1) * (abs(v) >> shift) if v else 0 for v in values]


def test_decay_rejects_bad_shift():
    with pytest.raises(ValueError, match="0"):
        decay_magnitude(torch.zeros(2, dtype=torch.int8), 0)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 10), (2, 3, 13)])
def test_count_zero_trits_matches_the_unpacked_count(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    trits = torch.randint(-1, 2, shape, generator=gen, dtype=torch.int8)
    assert count_zero_trits(pack_trits(trits), shape[-1]) == int((trits == 0).sum())
