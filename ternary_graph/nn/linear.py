"""TernaryLinear: a linear layer whose weight is a TernaryState (packed trits + int8 scale)."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.ternary_gemv import DecodeWeights
from ..kernels.ternary_linear import TernaryLinearFunction, linear_forward
from ..kernels.ternary_linear_reference import SUPPORTED_DTYPES
from ..ternary.state import TernaryState


def grad_anchor(like: torch.Tensor) -> torch.Tensor:
    """A zero-size float tensor that requires grad (call only while autograd records).

    Passing it to a ternary autograd.Function makes its backward (which casts the votes) run
    even when no float input of the layer requires a gradient.
    """
    return torch.empty(0, device=like.device, dtype=torch.float32, requires_grad=True)


def check_activation(x: torch.Tensor, features: int, weight_device: torch.device, *, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be one of {[str(d) for d in SUPPORTED_DTYPES]}, got dtype={x.dtype}")
    if x.dim() < 1 or x.shape[-1] != features:
        raise ValueError(f"{name} must have last dimension in_features={features}, got shape {tuple(x.shape)}")
    if x.device != weight_device and weight_device.type != "meta":
        raise ValueError(f"{name} is on {x.device} but the ternary weights are on {weight_device}")


class DecodeCopyHolder(nn.Module):
    """Lifecycle of a transient decode copy (``inference_copy``, built by ``prepare_inference``):
    dropped when training resumes (the next optimizer step would leave it stale) and when new
    weights are loaded. Never a buffer: ``state_dict`` does not see it."""

    inference_copy: DecodeWeights | None

    def train(self, mode: bool = True):
        if mode:
            self.inference_copy = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.inference_copy = None
        super()._load_from_state_dict(*args, **kwargs)


class TernaryLinear(DecodeCopyHolder):
    """``y = x · (T ⊙ s)ᵀ`` with T in {-1,0,1} packed 5 per byte and s = 2**(E/4) per output row.

    The weight gradient is never materialised: backward votes ``sign(dW)`` into the int8
    ``weight.T_accum`` (and row-scale votes into ``weight.E_accum``); a
    :class:`~ternary_graph.ternary.optimizer.TernaryOptimizer` turns votes into trit steps.

    :meth:`prepare_inference` adds a decode copy of the weights (2-bit layout,
    ``kernels/ternary_gemv.py``): a plain attribute, not state, used by no-grad eval forwards of at
    most 16 rows on CUDA, and dropped by ``train()`` and by loading a state dict.

    Shapes:
        x: (*, in_features) float32 / bfloat16 / float16 / float64
        returns: (*, out_features), same dtype as x
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 zero_fraction: float | None = None, init_scale: float | None = None,
                 device: torch.device | str | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if bias:
            raise ValueError("bias=True is not supported: a float bias would be persistent float state; "
                             "add a separate float nn.Parameter if you need one")
        self.in_features, self.out_features = in_features, out_features
        self.weight = TernaryState(out_features, in_features, zero_fraction=zero_fraction,
                                   init_scale=init_scale, device=device, generator=generator)
        self.inference_copy: DecodeWeights | None = None  # transient, see prepare_inference

    def prepare_inference(self) -> None:
        """Build the decode copy of the current weights (call in eval mode, after training)."""
        self.inference_copy = DecodeWeights.from_state(self.weight.packed, self.weight.E, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_activation(x, self.in_features, self.weight.packed.device)
        w = self.weight
        if not torch.is_grad_enabled():
            copy = self.inference_copy
            if copy is not None and not self.training and copy.applies(x):
                return copy(x)
            return linear_forward(x, w.packed, w.E, self.in_features)
        return TernaryLinearFunction.apply(x, grad_anchor(x), w.packed, w.E, w.T_accum, w.E_accum,
                                           self.in_features, w.vote_magnitude)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
