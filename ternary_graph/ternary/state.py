"""TernaryState: the whole persistent state of one ternary matrix, all integer.

| buffer    | dtype | shape                 | meaning                                   |
|-----------|-------|-----------------------|-------------------------------------------|
| packed    | uint8 | (rows, ceil(cols/5))  | the trits, 5 per byte (see packing.py)    |
| E         | int8  | (rows,)               | per-row log-scale: scale = 2 ** (E / E_STEP) |
| T_accum   | int8  | (rows, cols)          | saturating gradient votes per trit        |
| E_accum   | int8  | (rows,)               | saturating gradient votes per row scale   |

``E_STEP = 4`` units per octave: one step of E changes a row's scale by 2**(1/4) ≈ 1.19, and
int8 E spans scales from 2**-32 to 2**31.75, far more than any layer needs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .packing import ZERO_BYTE, packed_cols, random_packed, unpack_trits

E_STEP = 4
E_MIN, E_MAX = -127, 127


def scale_to_exponent(scale: float) -> int:
    """Nearest int8 log-scale code ``E`` with ``2 ** (E / E_STEP) ≈ scale``."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return max(E_MIN, min(E_MAX, round(E_STEP * math.log2(scale))))


def exponent_to_scale(E: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-row scale ``2 ** (E / E_STEP)`` as a float tensor of ``dtype``."""
    # float64 callers (the reference oracle) get the scale computed in float64, not rounded via fp32
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.exp2(E.to(wide) / E_STEP).to(dtype)


def default_row_scale(fan_in: int, nonzero_fraction: float = 2.0 / 3.0) -> float:
    """Row scale that gives unit output variance for unit-variance inputs.

    A row of ``fan_in`` trits with a fraction ``p`` of nonzeros has ``E[(t·x)^2] = p·fan_in``.
    """
    if fan_in < 1:
        raise ValueError(f"fan_in must be positive, got {fan_in!r}")
    return 1.0 / math.sqrt(max(nonzero_fraction, 1e-3) * fan_in)


class TernaryState(nn.Module):
    """Packed trits, per-row log-scales and their int8 vote accumulators.

    Args:
        rows, cols: logical shape of the ternary matrix.
        init_scale: initial row scale (default: unit-variance scale for ``cols`` inputs).
        zero_fraction: target fraction of zero trits at init; ``None`` draws uniform trits
            straight from random bytes (a third are zero).
        device: where to allocate; ``"meta"`` allocates nothing.
        generator: RNG for the initial trits.

    ``vote_magnitude`` is how much one backward pass adds to an accumulator (±magnitude per
    trit); it is set by the optimizer that trains this state, and is not part of the state_dict.
    ``frozen`` (set by the owner, not part of the state_dict) marks a matrix that is never
    trained, such as the model's fixed VQ projection: TernaryOptimizer leaves it out. Its
    accumulators stay (zero) so that checkpoints keep one layout.
    """

    packed: torch.Tensor
    E: torch.Tensor
    T_accum: torch.Tensor
    E_accum: torch.Tensor

    def __init__(
        self,
        rows: int,
        cols: int,
        *,
        init_scale: float | None = None,
        zero_fraction: float | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        draw: bool = True,
    ) -> None:
        super().__init__()
        for arg, value in (("rows", rows), ("cols", cols)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        self.rows, self.cols = rows, cols
        self.zero_fraction = zero_fraction
        nonzero = 2.0 / 3.0 if zero_fraction is None else 1.0 - zero_fraction
        self.init_scale = init_scale if init_scale is not None else default_row_scale(cols, nonzero)
        self.vote_magnitude = 1
        self.frozen = False
        self.sparse_updates = False
        self._touched_rows: list[torch.Tensor] = []
        device = torch.device(device) if device is not None else None
        self.register_buffer("packed", torch.empty(rows, packed_cols(cols), dtype=torch.uint8, device=device))
        self.register_buffer("E", torch.empty(rows, dtype=torch.int8, device=device))
        self.register_buffer("T_accum", torch.empty(rows, cols, dtype=torch.int8, device=device))
        self.register_buffer("E_accum", torch.empty(rows, dtype=torch.int8, device=device))
        if draw:
            self.reset_parameters(generator)
        else:  # the owner draws the trits itself, block by block (see reset_rows)
            if self.packed.device.type != "meta":
                self.packed.fill_(ZERO_BYTE)
                self.E.fill_(scale_to_exponent(self.init_scale))
                self.T_accum.zero_()
                self.E_accum.zero_()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Redraw the trits packed-first, reset the scales and zero the accumulators."""
        if self.packed.device.type == "meta":
            return
        self.packed.copy_(random_packed(self.rows, self.cols, zero_fraction=self.zero_fraction,
                                        generator=generator, device=self.packed.device))
        self.E.fill_(scale_to_exponent(self.init_scale))
        self.T_accum.zero_()
        self.E_accum.zero_()

    def reset_rows(self, start: int, stop: int, generator: torch.Generator | None = None) -> None:
        """Redraw rows ``start .. stop - 1`` as :meth:`reset_parameters` draws a whole state (a
        stack of expert matrices draws expert by expert, in the order separate layers would)."""
        if not 0 <= start <= stop <= self.rows:
            raise ValueError(f"rows {start}..{stop} must lie in 0..{self.rows}")
        if self.packed.device.type == "meta" or stop == start:
            return
        self.packed[start:stop] = random_packed(stop - start, self.cols, zero_fraction=self.zero_fraction,
                                                generator=generator, device=self.packed.device)
        self.E[start:stop] = scale_to_exponent(self.init_scale)
        self.T_accum[start:stop] = 0
        self.E_accum[start:stop] = 0

    # --- sparse bookkeeping ---------------------------------------------------------------
    def mark_touched_rows(self, rows: torch.Tensor) -> None:
        """Record rows whose accumulators received votes (only for ``sparse_updates`` states)."""
        if self.sparse_updates:
            self._touched_rows.append(rows.detach().reshape(-1).to(torch.long))

    def take_touched_rows(self) -> torch.Tensor | None:
        """Rows voted on since the last call, or ``None`` for a dense state (all rows).

        CPU: the distinct ids. CUDA: a fixed-size tensor holding each distinct id once and -1
        elsewhere (no host sync decides its length; the update kernel skips negative ids).
        """
        if not self.sparse_updates:
            return None
        if not self._touched_rows:
            return torch.empty(0, dtype=torch.long, device=self.packed.device)
        rows, self._touched_rows = torch.cat(self._touched_rows), []
        if not rows.is_cuda:
            return torch.unique(rows[rows >= 0])
        rows = rows.sort().values
        keep = rows >= 0
        keep[1:] &= rows[1:] != rows[:-1]
        return torch.where(keep, rows, -1)

    # --- views -------------------------------------------------------------------------
    def scale(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(rows,) float row scales."""
        return exponent_to_scale(self.E, dtype)

    def trits(self) -> torch.Tensor:
        """(rows, cols) int8 unpacked trits (a new tensor; O(rows×cols) memory)."""
        return unpack_trits(self.packed, self.cols)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(rows, cols) float weights ``trits * scale[:, None]`` (for references and tests)."""
        return self.trits().to(dtype) * self.scale(dtype)[:, None]

    @property
    def logical_params(self) -> int:
        return self.rows * self.cols

    def extra_repr(self) -> str:
        zf = "uniform" if self.zero_fraction is None else f"{self.zero_fraction:g}"
        return f"rows={self.rows}, cols={self.cols}, init_trits={zf}, E_STEP={E_STEP}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Wrong shapes or dtypes must fail loudly, not be cast: a float E would be silently
        # truncated by copy_.
        for name in ("packed", "E", "T_accum", "E_accum"):
            key = prefix + name
            if key in state_dict:
                value, own = state_dict[key], getattr(self, name)
                if value.dtype != own.dtype or tuple(value.shape) != tuple(own.shape):
                    raise ValueError(
                        f"checkpoint tensor {key!r} has dtype={value.dtype} shape={tuple(value.shape)}, "
                        f"expected dtype={own.dtype} shape={tuple(own.shape)}"
                    )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def ternary_states(module: nn.Module) -> list[TernaryState]:
    """Every TernaryState inside ``module`` (each once, in module order)."""
    seen: dict[int, TernaryState] = {}
    for sub in module.modules():
        if isinstance(sub, TernaryState):
            seen.setdefault(id(sub), sub)
    return list(seen.values())


def float_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Floating-point parameters left in ``module`` (to train beside the ternary optimizer)."""
    return [p for p in module.parameters() if p.requires_grad and p.dtype.is_floating_point]
