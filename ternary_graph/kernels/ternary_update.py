"""The trit update step: where an accumulator reaches the threshold, step the trit one level.

Rule (per trit, and likewise per row scale E with its own threshold):
    fire  = |acc| >= threshold            (and, with flip_prob < 1, a coin flip)
    t    <- clamp(t - sign(acc), -1, 1)   where fire   (-1 -> 0 -> +1 against the gradient)
    acc  <- 0                             where fire
    acc  <- acc - sign(acc) * (|acc| >> decay_shift)   elsewhere, if decay_shift is set

Three layers, as for every kernel: ``_update_kernel`` (Triton, in place over packed bytes:
decode five trits, step, re-encode), the launcher ``_update_triton`` and the plain-torch
``update_reference``. :func:`ternary_update_` dispatches on the device.
"""

from __future__ import annotations

import torch

from ..ternary.packing import check_packed, pack_trits, unpack_trits
from ..ternary.saturating import decay_magnitude
from ..ternary.state import E_MAX, E_MIN


def _step_levels(values: torch.Tensor, acc: torch.Tensor, threshold: int, low: int, high: int,
                 decay_shift: int | None, coin: torch.Tensor | None):
    """Pure rule on unpacked values; returns (new_values, new_acc, changed_mask)."""
    fire = acc.to(torch.int16).abs() >= threshold
    if coin is not None:
        fire &= coin
    step = -torch.sign(acc.to(torch.int16)) * fire
    new_values = (values.to(torch.int16) + step).clamp_(low, high).to(values.dtype)
    new_acc = torch.where(fire, torch.zeros_like(acc), acc)
    if decay_shift:
        new_acc = torch.where(fire, new_acc, decay_magnitude(new_acc, decay_shift))
    return new_values, new_acc, new_values != values


def update_reference(
    packed: torch.Tensor,
    T_accum: torch.Tensor,
    E: torch.Tensor,
    E_accum: torch.Tensor,
    cols: int,
    *,
    threshold: int,
    scale_threshold: int,
    decay_shift: int | None = None,
    flip_prob: float = 1.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Plain-torch update of a block of rows; returns new (packed, T_accum, E, E_accum, flips).

    Shapes:
        packed: (R, ceil(cols/5)) uint8;  T_accum: (R, cols) int8;  E, E_accum: (R,) int8
    ``scale_threshold = 0`` leaves E and E_accum unchanged. Inputs are not modified.
    """
    coin_t = coin_e = None
    if flip_prob < 1.0:
        gen = torch.Generator(device=packed.device).manual_seed(seed)
        coin_t = torch.rand(T_accum.shape, generator=gen, device=packed.device) < flip_prob
        coin_e = torch.rand(E_accum.shape, generator=gen, device=packed.device) < flip_prob
    trits = unpack_trits(packed, cols)
    new_trits, new_T, changed = _step_levels(trits, T_accum, threshold, -1, 1, decay_shift, coin_t)
    new_packed = pack_trits(new_trits)
    if scale_threshold > 0:
        new_E, new_Eacc, _ = _step_levels(E, E_accum, scale_threshold, E_MIN, E_MAX, decay_shift, coin_e)
    else:
        new_E, new_Eacc = E.clone(), E_accum.clone()
    return new_packed, new_T, new_E, new_Eacc, int(changed.sum())


def check_update_args(packed, T_accum, E, E_accum, cols: int, threshold: int, scale_threshold: int,
                      decay_shift: int | None, flip_prob: float) -> None:
    check_packed(packed, cols)
    rows = packed.shape[0]
    for name, t, shape in (("T_accum", T_accum, (rows, cols)), ("E", E, (rows,)), ("E_accum", E_accum, (rows,))):
        if t.dtype != torch.int8 or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be int8 of shape {shape}, got dtype={t.dtype} shape={tuple(t.shape)}")
        if t.device != packed.device:
            raise ValueError(f"{name} is on {t.device} but packed is on {packed.device}")
    if not isinstance(threshold, int) or not 1 <= threshold <= 127:
        raise ValueError(f"threshold must be an int in 1..127, got {threshold!r}")
    if not isinstance(scale_threshold, int) or not 0 <= scale_threshold <= 127:
        raise ValueError(f"scale_threshold must be an int in 0..127 (0 disables), got {scale_threshold!r}")
    if decay_shift is not None and (not isinstance(decay_shift, int) or not 1 <= decay_shift <= 7):
        raise ValueError(f"decay_shift must be None or an int in 1..7, got {decay_shift!r}")
    if not 0.0 < flip_prob <= 1.0:
        raise ValueError(f"flip_prob must lie in (0, 1], got {flip_prob!r}")


def ternary_update_(
    packed: torch.Tensor,
    T_accum: torch.Tensor,
    E: torch.Tensor,
    E_accum: torch.Tensor,
    cols: int,
    *,
    threshold: int,
    scale_threshold: int,
    decay_shift: int | None = None,
    flip_prob: float = 1.0,
    seed: int = 0,
    rows: torch.Tensor | None = None,
) -> int:
    """Apply the update rule in place to all rows, or only to ``rows`` (unique int64 ids).

    Returns the number of trits that changed value.
    """
    check_update_args(packed, T_accum, E, E_accum, cols, threshold, scale_threshold, decay_shift, flip_prob)
    if packed.is_cuda and _update_triton is not None:
        return _update_triton(packed, T_accum, E, E_accum, cols, threshold=threshold,
                              scale_threshold=scale_threshold, decay_shift=decay_shift,
                              flip_prob=flip_prob, seed=seed, rows=rows)
    if rows is None:
        new = update_reference(packed, T_accum, E, E_accum, cols, threshold=threshold,
                               scale_threshold=scale_threshold, decay_shift=decay_shift,
                               flip_prob=flip_prob, seed=seed)
        for dst, src in zip((packed, T_accum, E, E_accum), new[:4]):
            dst.copy_(src)
        return new[4]
    rows = rows.to(device=packed.device, dtype=torch.long)
    if rows.numel() == 0:
        return 0
    new = update_reference(packed[rows], T_accum[rows], E[rows], E_accum[rows], cols, threshold=threshold,
                           scale_threshold=scale_threshold, decay_shift=decay_shift,
                           flip_prob=flip_prob, seed=seed)
    for dst, src in zip((packed, T_accum, E, E_accum), new[:4]):
        dst.index_copy_(0, rows, src)
    return new[4]


# The Triton launcher is defined below when Triton is importable; CPU tensors never need it.
_update_triton = None
