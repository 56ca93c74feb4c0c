"""TernaryEmbeddingTable: a table of ternary rows, packed-first, sparse in every phase."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_in_range
from ..kernels.embedding import TernaryGatherFunction, gather_rows_reference
from ..ternary.state import TernaryState
from .linear import grad_anchor

FLOAT_OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class TernaryEmbeddingTable(nn.Module):
    """``num_rows`` ternary vectors of length ``dim``, each with an int8 log-scale.

    Construction draws random bytes in [0, 243) straight into the packed table (five uniform
    trits per byte), so a 10M×64 table never has a float or unpacked copy. Forward decodes
    only the requested rows; backward votes only into them; the optimizer step visits only
    rows voted on since the last step.

    Shapes:
        ids: any shape, int32 or int64, values in [0, num_rows)
        returns: (*ids.shape, dim) in ``dtype`` (float32 by default)
    """

    def __init__(self, num_rows: int, dim: int, *, zero_fraction: float | None = None,
                 init_scale: float | None = None, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.num_rows, self.dim = num_rows, dim
        # Unit-variance rows by default: the scale of a row does not depend on the table's size.
        scale = init_scale if init_scale is not None else 1.0
        self.weight = TernaryState(num_rows, dim, zero_fraction=zero_fraction, init_scale=scale,
                                   device=device, generator=generator)
        self.weight.sparse_updates = True

    def check_ids(self, ids: torch.Tensor, *, name: str = "ids") -> torch.Tensor:
        """Validate ids and return them flattened as int64."""
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got dtype={ids.dtype}")
        if ids.device != self.weight.packed.device:
            raise ValueError(f"{name} is on {ids.device} but the table is on {self.weight.packed.device}")
        flat = ids.reshape(-1).to(torch.long)
        check_in_range(flat, 0, self.num_rows, name)
        return flat

    def forward(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if dtype not in FLOAT_OUTPUT_DTYPES:
            raise TypeError(f"dtype must be a float dtype, got {dtype}")
        rows = self.check_ids(ids)
        if torch.is_grad_enabled():
            out = TernaryGatherFunction.apply(rows, grad_anchor(rows), self.weight, dtype)
        else:
            out = gather_rows_reference(self.weight.packed, self.weight.E, rows, self.dim, dtype)
        return out.reshape(*ids.shape, self.dim)

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim}"
