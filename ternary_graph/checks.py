"""Value checks on tensors that never make the host wait for the GPU.

On the CPU a failed check raises ``ValueError`` quoting an offending value. On CUDA, reading a
value would synchronise the host inside the training step, so the check is queued on the
device instead (``torch._assert_async``): a failure stops the program at its next
synchronisation with a device-side assertion carrying the same message (run with
``CUDA_LAUNCH_BLOCKING=1`` to see where).
"""

from __future__ import annotations

import torch


def _skip(values: torch.Tensor) -> bool:
    return values.numel() == 0 or values.device.type == "meta" or torch.compiler.is_compiling()


def check_in_range(values: torch.Tensor, low: int, high: int, name: str) -> None:
    """Every element of integer ``values`` lies in ``[low, high)``."""
    if _skip(values):
        return
    ok = (values >= low) & (values < high)
    if values.is_cuda:
        torch._assert_async(ok.all(), f"{name} must lie in [{low}, {high})")
        return
    if not bool(ok.all()):
        bad = values[~ok]
        raise ValueError(f"{name} must lie in [{low}, {high}), got {int(bad[0])} ({bad.numel()} value(s) out of range)")


def check_finite(values: torch.Tensor, name: str) -> None:
    """Every element of float ``values`` is finite (no NaN, no ±Inf)."""
    if _skip(values):
        return
    ok = torch.isfinite(values)
    if values.is_cuda:
        torch._assert_async(ok.all(), f"{name} must be finite")
        return
    if not bool(ok.all()):
        raise ValueError(f"{name} must be finite, got a non-finite value {values[~ok][0].item()}")
