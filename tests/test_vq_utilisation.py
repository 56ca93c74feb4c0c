"""experiments/vq_utilisation.py: the distinct-code count on a crafted codebook."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

from ternary_graph.ternary.packing import pack_trits

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
from vq_utilisation import distinct_codes  # noqa: E402


def test_distinct_codes_counts_rows_that_differ_in_trits_or_scale():
    trits = torch.tensor([[1, 0, -1, 1, 0, 0, 1], [1, 0, -1, 1, 0, 0, 1], [1, 0, -1, 1, 0, 0, 1],
                          [0, 0, 0, 0, 0, 0, -1], [0, 0, 0, 0, 0, 0, -1]], dtype=torch.int8)
    E = torch.tensor([3, 3, -2, 5, 5], dtype=torch.int8)
    # rows 0 and 1 are one code; row 2 differs only in its scale; rows 3 and 4 are one code
    assert distinct_codes(pack_trits(trits), E) == 3


def test_distinct_codes_refuses_mismatched_shapes():
    packed = pack_trits(torch.zeros(4, 10, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"got \(4, 2\) and \(3,\)"):
        distinct_codes(packed, torch.zeros(3, dtype=torch.int8))
