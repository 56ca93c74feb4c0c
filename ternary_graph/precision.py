"""The precision policy: which float dtype activations take on which device.

On CUDA the model runs its activations and matmuls in bfloat16 (the ternary kernels read bf16
tiles; float-twin ``nn.Linear`` layers run under autocast); softmax statistics, norms, losses
and every vote decision that compares magnitudes stay in float32. On CPU the default is
float32, so CPU results are exactly those of a float32 model.
"""

from __future__ import annotations

import contextlib

import torch

DTYPE_CHOICES = ("auto", "bf16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """``"auto"``: bfloat16 on CUDA, float32 elsewhere; ``"bf16"`` / ``"fp32"`` as named."""
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return _DTYPES[dtype]


def autocast_for(compute_dtype: torch.dtype, device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast for the float layers (the float twin's ``nn.Linear``) when ``compute_dtype`` is
    16-bit; a no-op context for float32. Ternary ops are custom ops: autocast leaves them alone,
    they run in the dtype of the activations they receive."""
    device_type = torch.device(device).type
    if compute_dtype == torch.float32 or device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=compute_dtype)
