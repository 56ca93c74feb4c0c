"""Saturating integer arithmetic for the vote accumulators: clamp, never wrap around."""

from __future__ import annotations

import torch

_LIMITS = {torch.int8: 127, torch.int16: 32767, torch.int32: 2**31 - 1}


def accumulator_limit(dtype: torch.dtype) -> int:
    """Symmetric saturation bound of an accumulator dtype (int8: ±127, int16: ±32767)."""
    if dtype not in _LIMITS:
        raise ValueError(f"accumulators must be int8, int16 or int32, got dtype={dtype}")
    return _LIMITS[dtype]


def saturating_add(acc: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:
    """Return ``clamp(acc + votes)`` in ``acc``'s dtype, computed wide enough not to wrap.

    ``votes`` may be any integer dtype (e.g. int32 sums of duplicate ids) and is broadcast.
    """
    limit = accumulator_limit(acc.dtype)
    if votes.dtype.is_floating_point or votes.dtype == torch.bool:
        raise ValueError(f"votes must have an integer dtype, got dtype={votes.dtype}")
    wide = torch.int64 if acc.dtype == torch.int32 or votes.dtype == torch.int64 else torch.int32
    return (acc.to(wide) + votes.to(wide)).clamp_(-limit, limit).to(acc.dtype)


def saturating_add_(acc: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:
    """In-place :func:`saturating_add` into ``acc`` (an accumulator buffer owned by a module)."""
    acc.copy_(saturating_add(acc, votes))
    return acc


def decay_magnitude(acc: torch.Tensor, shift: int) -> torch.Tensor:
    """Shrink every accumulator toward zero by ``|acc| >> shift``, symmetric in sign.

    An arithmetic ``acc >> shift`` rounds negative values toward -inf and would bias trits
    toward -1; shifting the magnitude keeps the decay symmetric.
    """
    if not isinstance(shift, int) or shift < 1:
        raise ValueError(f"decay shift must be a positive int, got {shift!r}")
    wide = acc.to(torch.int32)
    return (wide - torch.sign(wide) * (wide.abs() >> shift)).to(acc.dtype)
