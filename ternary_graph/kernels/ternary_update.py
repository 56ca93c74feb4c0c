"""The trit update step: where an accumulator reaches the threshold, step the trit one level.

Rule (per trit, and likewise per row scale E with its own threshold):
    fire  = |acc| >= threshold            (and, with flip_prob < 1, a coin flip)
    t    <- clamp(t - sign(acc), -1, 1)   where fire   (-1 -> 0 -> +1 against the gradient)
    acc  <- 0                             where fire
    acc  <- acc - sign(acc) * (|acc| >> decay_shift)   elsewhere, if decay_shift is set

Three layers, as for every kernel: ``_update_kernel`` (Triton, in place over packed bytes:
decode five trits, step, re-encode), the launcher ``_update_triton`` and the plain-torch
``update_reference``. :func:`ternary_update_` dispatches on the device: CUDA tensors take the
kernel, CPU tensors the reference. Deterministic updates (``flip_prob = 1``) agree bit for bit;
stochastic ones draw their coins from different streams (Philox in the kernel, torch on CPU).
"""

from __future__ import annotations

import torch

from ..ternary.packing import check_packed, pack_trits, unpack_trits
from ..ternary.saturating import decay_magnitude
from ..ternary.state import E_MAX, E_MIN
from ._triton import HAS_TRITON, check_kernel_tensors, tl, triton


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
    check_packed(packed, cols, check_values=False)  # a full scan per step would cost O(table)
    rows = packed.shape[0]
    for name, t, shape in (("T_accum", T_accum, (rows, cols)), ("E", E, (rows,)), ("E_accum", E_accum, (rows,))):
        if t.dtype != torch.int8 or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be int8 of shape {shape}, got dtype={t.dtype} shape={tuple(t.shape)}")
        if t.device != packed.device:
            raise ValueError(f"{name} is on {t.device} but packed is on {packed.device}")
    if isinstance(threshold, torch.Tensor):
        # a device-resident θ (read by the kernel at launch, so a CUDA graph replays a θ schedule);
        # its value was checked when the host wrote it (UpdateRule): reading it here would sync
        if threshold.dtype != torch.int32 or threshold.numel() != 1 or threshold.device != packed.device:
            raise ValueError(f"threshold tensor must be one int32 element on {packed.device}, got "
                             f"dtype={threshold.dtype} shape={tuple(threshold.shape)} device={threshold.device}")
    elif isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= 127:
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
    threshold: int | torch.Tensor,
    scale_threshold: int,
    decay_shift: int | None = None,
    flip_prob: float = 1.0,
    seed: int = 0,
    rows: torch.Tensor | None = None,
) -> int | torch.Tensor:
    """Apply the update rule in place to all rows, or only to ``rows`` (int64 ids, each at most
    once; negative ids are padding and skipped).

    ``threshold`` is θ as an int, or as a one-element int32 tensor on the state's device that
    the CUDA kernel reads when it runs (a captured step then follows a θ schedule).

    Returns the number of trits that changed value: an int from the CPU reference, a 0-dim
    device tensor from the CUDA kernel (the host reads it only when a statistic is logged).
    """
    check_update_args(packed, T_accum, E, E_accum, cols, threshold, scale_threshold, decay_shift, flip_prob)
    if packed.is_cuda and _update_triton is not None:
        return _update_triton(packed, T_accum, E, E_accum, cols, threshold=threshold,
                              scale_threshold=scale_threshold, decay_shift=decay_shift,
                              flip_prob=flip_prob, seed=seed, rows=rows)
    if isinstance(threshold, torch.Tensor):
        threshold = int(threshold)  # CPU: no device to keep it on
    if rows is None:
        new = update_reference(packed, T_accum, E, E_accum, cols, threshold=threshold,
                               scale_threshold=scale_threshold, decay_shift=decay_shift,
                               flip_prob=flip_prob, seed=seed)
        for dst, src in zip((packed, T_accum, E, E_accum), new[:4]):
            dst.copy_(src)
        return new[4]
    rows = rows.to(device=packed.device, dtype=torch.long)
    rows = rows[rows >= 0]  # negative ids are padding (see TernaryState.take_touched_rows)
    if rows.numel() == 0:
        return 0
    new = update_reference(packed[rows], T_accum[rows], E[rows], E_accum[rows], cols, threshold=threshold,
                           scale_threshold=scale_threshold, decay_shift=decay_shift,
                           flip_prob=flip_prob, seed=seed)
    for dst, src in zip((packed, T_accum, E, E_accum), new[:4]):
        dst.index_copy_(0, rows, src)
    return new[4]


# --- Triton kernel and launcher (defined only where Triton is importable) --------------------
if HAS_TRITON:
    _E_LO = tl.constexpr(E_MIN)
    _E_HI = tl.constexpr(E_MAX)

    @triton.jit
    def _step_accumulator(acc, fire, DECAY: tl.constexpr, decay_shift):
        """New accumulator: 0 where the element fired, else (optionally) decayed on its magnitude."""
        if DECAY:
            sgn = tl.where(acc > 0, 1, tl.where(acc < 0, -1, 0))
            acc = acc - sgn * (tl.abs(acc) >> decay_shift)
        return tl.where(fire, 0, acc)

    @triton.jit(do_not_specialize=["R", "cols", "KB", "scale_threshold", "decay_shift", "flip_prob", "seed"])
    def _update_kernel(p_ptr, t_ptr, e_ptr, ea_ptr, rows_ptr, flips_ptr, R, cols, KB, stride_pn, stride_tn,
                       theta_ptr, scale_threshold, decay_shift, flip_prob, seed,
                       HAS_ROWS: tl.constexpr, DECAY: tl.constexpr, STOCHASTIC: tl.constexpr,
                       UPDATE_E: tl.constexpr, BR: tl.constexpr, BKB: tl.constexpr):
        pid_r = tl.program_id(0)
        pid_j = tl.program_id(1)
        threshold = tl.load(theta_ptr)
        ridx = pid_r * BR + tl.arange(0, BR)
        r_ok = ridx < R
        if HAS_ROWS:  # negative ids are padding (fixed-size row lists): skipped
            row = tl.load(rows_ptr + ridx, mask=r_ok, other=-1).to(tl.int64)
            r_ok = r_ok & (row >= 0)
            row = tl.maximum(row, 0)
        else:
            row = ridx.to(tl.int64)
        j = pid_j * BKB + tl.arange(0, BKB)
        tile_ok = r_ok[:, None] & (j[None, :] < KB)
        p_ptrs = p_ptr + row[:, None] * stride_pn + j[None, :]
        b = tl.load(p_ptrs, mask=tile_ok, other=121).to(tl.int32)
        rest = b
        new_b = tl.zeros((BR, BKB), dtype=tl.int32)
        changed = tl.zeros((BR, BKB), dtype=tl.int32)
        power = 1
        for i in tl.static_range(5):
            digit = rest % 3
            rest = rest // 3
            col = 5 * j[None, :] + i
            ok = tile_ok & (col < cols)  # padding trits have no accumulator and never move
            t_ptrs = t_ptr + row[:, None] * stride_tn + col
            acc = tl.load(t_ptrs, mask=ok, other=0).to(tl.int32)
            fire = ok & (tl.abs(acc) >= threshold)
            if STOCHASTIC:
                fire = fire & (tl.rand(seed, row[:, None] * cols + col) < flip_prob)
            sgn = tl.where(acc > 0, 1, tl.where(acc < 0, -1, 0))
            new_digit = tl.where(fire, tl.minimum(tl.maximum(digit - sgn, 0), 2), digit)
            tl.store(t_ptrs, _step_accumulator(acc, fire, DECAY, decay_shift).to(tl.int8), mask=ok)
            changed += (new_digit != digit).to(tl.int32)
            new_b += new_digit * power
            power = power * 3
        tl.store(p_ptrs, new_b.to(tl.uint8), mask=tile_ok)
        tl.atomic_add(flips_ptr, tl.sum(tl.sum(changed, axis=1), axis=0))
        if UPDATE_E:
            if pid_j == 0:
                e_acc = tl.load(ea_ptr + row, mask=r_ok, other=0).to(tl.int32)
                e_val = tl.load(e_ptr + row, mask=r_ok, other=0).to(tl.int32)
                fire_e = r_ok & (tl.abs(e_acc) >= scale_threshold)
                if STOCHASTIC:
                    # the row-scale coins use a second seed so they never share draws with trits
                    fire_e = fire_e & (tl.rand(seed ^ 0x5BD1E995, row) < flip_prob)
                sgn_e = tl.where(e_acc > 0, 1, tl.where(e_acc < 0, -1, 0))
                e_new = tl.where(fire_e, tl.minimum(tl.maximum(e_val - sgn_e, _E_LO), _E_HI), e_val)
                tl.store(e_ptr + row, e_new.to(tl.int8), mask=r_ok)
                tl.store(ea_ptr + row, _step_accumulator(e_acc, fire_e, DECAY, decay_shift).to(tl.int8), mask=r_ok)

    def _update_triton(packed: torch.Tensor, T_accum: torch.Tensor, E: torch.Tensor, E_accum: torch.Tensor,
                       cols: int, *, threshold: int | torch.Tensor, scale_threshold: int, decay_shift: int | None = None,
                       flip_prob: float = 1.0, seed: int = 0, rows: torch.Tensor | None = None) -> int:
        """In-place Triton update of all rows, or of ``rows`` (unique ids); returns the flip count
        as a 0-dim int32 device tensor (no host sync).

        Shapes:
            packed: (R, ceil(cols/5)) uint8;  T_accum: (R, cols) int8;  E, E_accum: (R,) int8
            rows: (n,) integer ids or None
        Same rule as :func:`update_reference`; with ``flip_prob < 1`` the coins come from
        Triton's Philox stream (``tl.rand(seed, row * cols + col)``), so they differ from the
        reference's torch stream but depend only on (seed, element), not on the launch shape.
        """
        check_update_args(packed, T_accum, E, E_accum, cols, threshold, scale_threshold, decay_shift, flip_prob)
        check_kernel_tensors(packed=packed, T_accum=T_accum, E=E, E_accum=E_accum)
        for name, t in (("packed", packed), ("T_accum", T_accum), ("E", E), ("E_accum", E_accum)):
            if t.stride(-1) != 1:
                raise ValueError(f"{name} must be contiguous along its last dim, got strides {t.stride()}")
        if not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
        if rows is not None:
            rows = rows.to(device=packed.device, dtype=torch.int64).contiguous()
            if rows.dim() != 1:
                raise ValueError(f"rows must be a 1-D tensor of row ids, got shape {tuple(rows.shape)}")
        n_rows = packed.shape[0] if rows is None else rows.numel()
        kb = packed.shape[1]
        flips = torch.zeros(1, dtype=torch.int32, device=packed.device)
        if n_rows == 0 or kb == 0:
            return flips[0]
        if not isinstance(threshold, torch.Tensor):
            threshold = torch.full((1,), threshold, dtype=torch.int32, device=packed.device)
        BR, BKB = 16, 64
        grid = (triton.cdiv(n_rows, BR), triton.cdiv(kb, BKB))
        _update_kernel[grid](packed, T_accum, E, E_accum, rows if rows is not None else packed, flips, n_rows, cols,
                             kb, packed.stride(0), T_accum.stride(0), threshold, scale_threshold,
                             decay_shift or 0, float(flip_prob), seed,
                             HAS_ROWS=rows is not None, DECAY=bool(decay_shift), STOCHASTIC=flip_prob < 1.0,
                             UPDATE_E=scale_threshold > 0, BR=BR, BKB=BKB, num_warps=4)
        return flips[0]  # stays on the device: reading it would synchronise the host

else:  # pragma: no cover - installs without Triton use the torch reference everywhere
    _update_triton = None
