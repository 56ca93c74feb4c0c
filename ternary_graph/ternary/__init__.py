"""Packed trits, ternary state and the int8-vote optimizer."""

from .packing import MAX_PACKED_BYTE, TRITS_PER_BYTE, pack_trits, packed_cols, random_packed, unpack_trits
from .saturating import decay_magnitude, saturating_add, saturating_add_
from .state import E_STEP, TernaryState, float_parameters, ternary_states
from .optimizer import StepStats, TernaryOptimizer, UpdateRule

__all__ = [
    "E_STEP", "MAX_PACKED_BYTE", "TRITS_PER_BYTE", "StepStats", "TernaryOptimizer", "TernaryState", "UpdateRule",
    "decay_magnitude", "float_parameters", "pack_trits", "packed_cols", "random_packed", "saturating_add",
    "saturating_add_", "ternary_states", "unpack_trits",
]
