"""Base-3 packing of trits: five trits in {-1, 0, +1} per uint8.

A byte holds ``sum((t_i + 1) * 3**i for i in range(5))`` for the five trits ``t_0..t_4`` of
five adjacent columns, so its value lies in ``0..242``. A row whose column count is not a
multiple of five is padded with zero trits (digit 1), which keeps every packed byte valid and
makes padding decode to zeros.

Every function here is pure: inputs are never modified, and the only temporaries are the
size of the tensors being converted (callers that must bound memory, such as packed-first
initialisation, work chunk by chunk).
"""

from __future__ import annotations

import math

import torch

TRITS_PER_BYTE = 5
MAX_PACKED_BYTE = 3**TRITS_PER_BYTE - 1  # 242
_POWERS_OF_THREE = (1, 3, 9, 27, 81)
ZERO_BYTE = 121  # the byte of five zero trits: Σ (0 + 1)·3^i


def packed_cols(cols: int) -> int:
    """Number of packed bytes that hold ``cols`` trits."""
    if not isinstance(cols, int) or isinstance(cols, bool) or cols < 0:
        raise ValueError(f"cols must be a non-negative int, got {cols!r}")
    return math.ceil(cols / TRITS_PER_BYTE)


def padding_byte_offset(real_trits_in_last_byte: int) -> int:
    """Value that the zero padding trits contribute to a byte whose first ``r`` trits are real.

    Padding digits are all 1 (trit 0), so they add ``sum(3**i for i in range(r, 5))``.
    """
    r = real_trits_in_last_byte
    return (3**TRITS_PER_BYTE - 3**r) // 2


def _decode_table(device: torch.device) -> torch.Tensor:
    """(243, 5) int8 table: row ``b`` holds the five trits encoded by byte value ``b``."""
    values = torch.arange(MAX_PACKED_BYTE + 1, dtype=torch.int16, device=device)
    digits = torch.stack([(values // p) % 3 for p in _POWERS_OF_THREE], dim=-1)
    return (digits - 1).to(torch.int8)


def _check_trits(trits: torch.Tensor) -> None:
    if not isinstance(trits, torch.Tensor):
        raise TypeError(f"trits must be a torch.Tensor, got {type(trits).__name__}")
    if trits.dtype.is_floating_point or trits.dtype.is_complex or trits.dtype == torch.bool:
        raise ValueError(f"trits must have an integer dtype, got dtype={trits.dtype}")
    if trits.dim() < 1:
        raise ValueError(f"trits must have at least one dimension, got shape {tuple(trits.shape)}")
    if trits.numel() and trits.device.type != "meta":
        low, high = int(trits.min()), int(trits.max())
        if low < -1 or high > 1:
            raise ValueError(f"trits must lie in {{-1, 0, 1}}, got values in [{low}, {high}]")


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """Pack trits along the last dimension, five per byte.

    Shapes:
        trits: (..., cols), any integer dtype, values in {-1, 0, 1}
        returns: (..., ceil(cols / 5)) uint8, values in 0..242
    """
    _check_trits(trits)
    cols = trits.shape[-1]
    n_bytes = packed_cols(cols)
    digits = trits.to(torch.int16) + 1
    pad = n_bytes * TRITS_PER_BYTE - cols
    if pad:
        digits = torch.nn.functional.pad(digits, (0, pad), value=1)
    digits = digits.reshape(*trits.shape[:-1], n_bytes, TRITS_PER_BYTE)
    weights = torch.tensor(_POWERS_OF_THREE, dtype=torch.int16, device=trits.device)
    return (digits * weights).sum(dim=-1).to(torch.uint8)


def check_packed(packed: torch.Tensor, cols: int, *, name: str = "packed", check_values: bool = True) -> None:
    """Raise ValueError unless ``packed`` is a valid uint8 packing of ``cols`` trits per row.

    ``check_values=False`` checks dtype and shape only: hot paths over module-owned tables skip
    the full scan (and, on CUDA, the host sync) of the byte values. While torch.compile traces,
    the scan is skipped too: its host read would break the graph.
    """
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"{name} must have dtype torch.uint8, got dtype={packed.dtype}")
    if packed.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension, got shape {tuple(packed.shape)}")
    expected = packed_cols(cols)
    if packed.shape[-1] != expected:
        raise ValueError(
            f"{name} has {packed.shape[-1]} bytes per row, but cols={cols} needs {expected} "
            f"(shape {tuple(packed.shape)})"
        )
    if check_values and packed.numel() and packed.device.type != "meta" and not torch.compiler.is_compiling():
        high = int(packed.max())
        if high > MAX_PACKED_BYTE:
            raise ValueError(f"{name} holds byte value {high}; valid packed bytes are 0..{MAX_PACKED_BYTE}")


def unpack_trits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`.

    Shapes:
        packed: (..., ceil(cols / 5)) uint8
        returns: (..., cols) int8 in {-1, 0, 1}
    """
    # On accelerators the value scan would cost a host sync per call; there (and while compiling)
    # a byte > 242 fails the table lookup below with an index error instead.
    check_packed(packed, cols, check_values=packed.device.type == "cpu")
    table = _decode_table(packed.device)
    trits = table[packed.long()]  # (..., n_bytes, 5)
    # explicit width: a -1 is ambiguous when a leading dim is 0
    return trits.reshape(*packed.shape[:-1], packed.shape[-1] * TRITS_PER_BYTE)[..., :cols]


def count_zero_trits(packed: torch.Tensor, cols: int) -> int:
    """Number of zero trits among the ``cols`` real trits of every row of ``packed`` (a byte-table
    lookup in blocks of rows: no unpacked copy of the whole matrix)."""
    check_packed(packed, cols, check_values=False)
    zeros_per_byte = (_decode_table(packed.device) == 0).sum(dim=1).to(torch.int32)  # (243,)
    pad = packed.shape[-1] * TRITS_PER_BYTE - cols  # padding trits are zeros: not counted
    rows = packed.reshape(-1, packed.shape[-1])
    total = 0
    for block in rows.split(max(1, (1 << 24) // max(1, rows.shape[1]))):
        total += int(zeros_per_byte[block.long()].sum())
    return total - pad * rows.shape[0]


def random_packed(
    rows: int,
    cols: int,
    *,
    zero_fraction: float | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    chunk_rows: int = 1 << 16,
) -> torch.Tensor:
    """Random packed trits of shape (rows, ceil(cols / 5)) uint8, created packed-first.

    With ``zero_fraction=None`` every trit is uniform over {-1, 0, 1}: a uniform byte in
    [0, 243) *is* five uniform trits, so no unpacked tensor is ever made. Otherwise trits are
    0 with probability ``zero_fraction`` and ±1 otherwise, drawn and packed ``chunk_rows`` rows
    at a time so that temporaries stay O(chunk_rows × cols) whatever ``rows`` is.
    Padding trits are always 0. On the meta device only the empty result is made.
    """
    for arg, value in (("rows", rows), ("cols", cols), ("chunk_rows", chunk_rows)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{arg} must be a non-negative int, got {value!r}")
    if chunk_rows == 0:
        raise ValueError("chunk_rows must be positive, got 0")
    if zero_fraction is not None and not 0.0 <= zero_fraction <= 1.0:
        raise ValueError(f"zero_fraction must lie in [0, 1], got {zero_fraction!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    n_bytes = packed_cols(cols)
    out = torch.empty(rows, n_bytes, dtype=torch.uint8, device=device)
    if device.type == "meta" or rows == 0 or n_bytes == 0:
        return out
    gen_device = generator.device if generator is not None else device
    if zero_fraction is None:
        full = cols // TRITS_PER_BYTE
        for start in range(0, rows, chunk_rows):
            stop = min(rows, start + chunk_rows)
            block = torch.randint(0, MAX_PACKED_BYTE + 1, (stop - start, n_bytes), generator=generator,
                                  dtype=torch.uint8, device=gen_device)
            if full < n_bytes:
                r = cols - full * TRITS_PER_BYTE
                block[:, -1] = torch.randint(0, 3**r, (stop - start,), generator=generator, dtype=torch.uint8,
                                             device=gen_device) + padding_byte_offset(r)
            out[start:stop] = block.to(device)
        return out
    nonzero_half = (1.0 - zero_fraction) / 2.0
    for start in range(0, rows, chunk_rows):
        stop = min(rows, start + chunk_rows)
        u = torch.rand(stop - start, cols, generator=generator, device=gen_device)
        trits = (u >= zero_fraction).to(torch.int8) * torch.where(u < zero_fraction + nonzero_half, -1, 1).to(torch.int8)
        out[start:stop] = pack_trits(trits).to(device)
    return out
