"""Text generation: sampling filters as pure functions, and a KV-cached decode loop.

    prompt ids ─ prefill (one forward over the prompt, filling each block's KVCache)
               ─ logits of the last position ─ sample ─ next byte ─ decode step of that byte ─ …

The decode step is the fixed-shape one of ``models/decode_graph.py`` (position on the device,
attention over the whole preallocated cache under a mask): on CUDA it is replayed as one CUDA
graph per byte (``cuda_graph``, default: whenever the model is on CUDA), elsewhere it runs
eagerly. Sampling runs outside the step, on its logits.

The decode loop runs the model in eval mode under ``torch.no_grad()``: no votes are cast, the
VQ codebook does not track usage (its tracking is gated on ``training``) and MoEGraph records
no pending load (also gated on ``training``). MoEGraph does overwrite its ``last_routing``
diagnostic in any mode, so after generation it shows the last decode step.

Each new byte is quantised by the shared VQ codebook and routed by MoEGraph exactly as in a
full forward: every computation but attention is position-local, and attention reads the
cached keys and values of the prefix. Prompt plus new bytes must fit in ``max_seq_len``
(rotary positions past it were never trained); there is no sliding window.

Sampling order: temperature, then top-k, then top-p (nucleus), then a draw from the softmax.
``temperature=0`` is greedy (argmax; top-k and top-p then change nothing).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Sequence

import torch

from .decode_graph import StepDecoder, _model_device, check_compile_backend, decode_graph

SAMPLING_ARG_NAMES = ("max_new_tokens", "temperature", "top_k", "top_p")


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, *,
                        names: Sequence[str] = SAMPLING_ARG_NAMES) -> None:
    """Raise ValueError naming the argument (``names``: how the caller calls them, e.g. CLI
    flags) and the value received."""
    n_new, n_temp, n_top_k, n_top_p = names
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"{n_new} must be an int >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{n_temp} must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"{n_top_k} must be an int >= 1 (or None), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"{n_top_p} must lie in (0, 1] (or None), got {top_p!r}")


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row, the rest -inf. Shapes: (..., V) -> (..., V)."""
    if k >= logits.shape[-1]:
        return logits
    values, index = logits.topk(k, dim=-1)
    return torch.full_like(logits, -math.inf).scatter(-1, index, values)


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens of each row until their probability mass
    reaches ``p`` (the most likely token always stays), the rest -inf. Shapes: (..., V)."""
    if p >= 1:  # cumulative sums can round past 1 - ε and drop tail tokens: skip instead
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row. Shapes: logits (B, V) -> (B,) int64."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_k is not None:
        scaled = filter_top_k(scaled, top_k)
    if top_p is not None:
        scaled = filter_top_p(scaled, top_p)
    return torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _check_ids(ids: torch.Tensor, max_new_tokens: int, max_seq_len: int) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        got = f"dtype={ids.dtype} shape={tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"ids must be an int32/int64 tensor of shape (batch, seq_len), got {got}")
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"ids must hold at least one token per row, got shape {tuple(ids.shape)}")
    if ids.shape[1] + max_new_tokens > max_seq_len:
        raise ValueError(f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                         f"max_seq_len={max_seq_len}")


def _use_cuda_graph(model, ids: torch.Tensor, cuda_graph: bool | None) -> bool:
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be True, False or None (auto), got {cuda_graph!r}")
    device = _model_device(model)
    if ids.device != device:
        raise ValueError(f"ids is on {ids.device} but the model is on {device}")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device, got {device}")
    return device.type == "cuda" if cuda_graph is None else cuda_graph


def decode_stream(model, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  cuda_graph: bool | None = None, compile_backend: str | None = None) -> Iterator[torch.Tensor]:
    """An iterator of the (B,) int64 next tokens, one step at a time: the first after the
    prompt prefill, then one per cached decode step. ``seed`` fixes the draws (None: torch's
    global RNG). ``cuda_graph``: replay the decode step as a CUDA graph (captured at the first
    generation of a model and batch size, kept for later ones); None: whenever the model is on
    CUDA, falling back to the eager step with a warning if the capture fails; True: a failed
    capture raises. ``compile_backend``: run the step through ``torch.compile`` with this
    backend (``"inductor"`` fuses the step's many small ops; it compiles at the first step of a
    model configuration, see ``models/decode_graph.py``). The arguments are checked here, before
    the first step; the model is in eval mode while the stream runs and gets its mode back when
    the stream ends or is closed."""
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    _check_ids(ids, max_new_tokens, model.cfg.max_seq_len)
    use_graph = _use_cuda_graph(model, ids, cuda_graph)
    generator = None if seed is None else torch.Generator(device=ids.device).manual_seed(seed)
    check_compile_backend(compile_backend)
    return _decode(model, ids, max_new_tokens, temperature, top_k, top_p, generator, use_graph,
                   strict=cuda_graph is True, compile_backend=compile_backend)


def _open_decoder(model, batch_size: int, use_graph: bool, strict: bool, compile_backend: str | None) -> StepDecoder:
    if not use_graph:
        return StepDecoder(model, batch_size, compile_backend)
    try:
        return decode_graph(model, batch_size, compile_backend)
    except RuntimeError as exc:  # a capture the CUDA runtime refused: the eager step computes the same
        if strict:
            raise
        warnings.warn(f"CUDA-graph capture of the decode step failed ({type(exc).__name__}: {exc}); decoding "
                      f"eagerly. Pass cuda_graph=False to skip the attempt, True to make it an error.",
                      RuntimeWarning, stacklevel=3)
        return StepDecoder(model, batch_size, compile_backend)


@torch.no_grad()
def _decode(model, ids: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
            top_p: float | None, generator: torch.Generator | None, use_graph: bool,
            strict: bool, compile_backend: str | None) -> Iterator[torch.Tensor]:
    was_training = model.training
    model.eval()
    decoder = None
    try:
        decoder = _open_decoder(model, ids.shape[0], use_graph, strict, compile_backend)
        logits = decoder.prefill(ids)
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            yield token
            if step + 1 < max_new_tokens:  # the last token needs no step of its own
                logits = decoder.step(token)
    finally:
        if decoder is not None:
            decoder.release()
        model.train(was_training)


def generate(model, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, cuda_graph: bool | None = None,
             compile_backend: str | None = None) -> torch.Tensor:
    """``ids`` followed by ``max_new_tokens`` sampled tokens. Shapes: (B, T) -> (B, T + new).
    ``cuda_graph``, ``compile_backend``: see :func:`decode_stream`."""
    new = list(decode_stream(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed, cuda_graph=cuda_graph, compile_backend=compile_backend))
    return torch.cat([ids, torch.stack(new, dim=1).to(ids.dtype)], dim=1)
