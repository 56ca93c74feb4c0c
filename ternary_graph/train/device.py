"""Which device a run uses: ``--device auto`` (the default) takes CUDA when it is there.

Only the resolved name is stored in a run's config: a run folder then says where it ran.
"""

from __future__ import annotations

import torch

DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N"


class DeviceError(ValueError):
    """A ``--device`` that does not name a usable device; the message quotes the value."""


def resolve_device(device: str) -> str:
    """``"auto"`` → ``"cuda"`` when ``torch.cuda.is_available()``, else ``"cpu"``; ``"cpu"``,
    ``"cuda"`` and ``"cuda:N"`` are checked against this machine and returned as given.

    Raises:
        DeviceError: an unknown device type, a device type other than cpu/cuda, CUDA asked
            for without CUDA, or a CUDA index this machine does not have.
    """
    if not isinstance(device, str):
        raise DeviceError(f"device must be a string ({DEVICE_HELP}), got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"device must be {DEVICE_HELP}; got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device must be {DEVICE_HELP}; got {device!r} (type {dev.type!r})")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                              f"built with CUDA {torch.version.cuda}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"device {device!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0..cuda:{count - 1}")
    return device
