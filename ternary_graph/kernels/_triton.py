"""The one place that detects Triton and its CPU interpreter.

Triton is optional at run time: CPU-only installs run every op through its plain-torch
reference. Kernel launchers accept CUDA tensors, and CPU tensors only while Triton's
interpreter is on (``TRITON_INTERPRET=1`` set before Triton was imported), which is how the
tests run the kernels on machines without a GPU. Nothing here changes process state.
"""

from __future__ import annotations

import os

import torch

try:  # an optional backend, detected once
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without Triton
    triton = None
    tl = None

HAS_TRITON = triton is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_kernel_tensors(**tensors: torch.Tensor) -> torch.device:
    """Check that every tensor can be handed to a Triton kernel; return their common device.

    Raises ValueError naming the argument when tensors sit on different devices, or on the
    CPU while the interpreter is off (a compiled kernel would read host pointers).
    """
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed; use the torch reference path instead")
    device = None
    first = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}")
    if device is not None and device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                         f"got tensors on {device}")
    return device
