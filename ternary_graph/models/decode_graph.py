"""The one-token decode step at a device-held position, run eagerly or replayed as a CUDA graph.

A batch-1 decode step of a small model is launch-bound: on an H200 the small preset spends
~2.5 ms of GPU time but ~40 ms of wall time per byte in ~1,550 kernel launches. Replaying the
step as one CUDA graph removes the per-launch CPU cost.

    prompt ─ prefill: the ordinary forward (training kernels), filling the KV caches; position := T
    byte   ─ copy into the static input ─ step ─ static logits ─ sample (outside the step) ─ …
             step = TernaryGraphLM.decode_step(ids, caches, position); position += 1

The step (:meth:`StepDecoder._step`) has fixed shapes and reads no device value on the host:
the position lives in a 0-dim int64 device tensor, the rotary angles and the attention mask are
computed from it on the device, the new key/value is written with ``index_copy_`` at it, and
attention covers the whole preallocated cache under the mask. It advances the device position
itself. The host mirrors the count in every cache's ``KVCache.length`` (advanced after each
step, never read from the device), which the error messages and the ordinary forward use.

:class:`StepDecoder` runs that step eagerly (CPU, or ``cuda_graph=False``); :class:`DecodeGraph`
records the same call once and replays it, so CPU tests of the eager decoder check the maths of
the captured step. ``compile_backend`` (e.g. ``"inductor"``) runs the step through
``torch.compile`` first: a graph replay still launches every kernel the step issues (~1,500 for
the small preset, most of them elementwise ops of a single token), and inductor fuses those into
a few generated kernels; the decode GEMVs and the training kernels are custom ops it calls as
they are. Compilation happens at the first step (in a graph's warm-up steps, before the
capture). Its guards are on shapes and dtypes, not on the model, so every model of one
configuration and batch size reuses the code; each other configuration compiles anew, and past
``torch._dynamo.config.recompile_limit`` (8) of them torch runs the step eagerly with a warning.

In eval mode the step changes no host state: the VQ codebook tracks usage and
MoEGraph counts load only in training mode (refused here), its input range checks are device-side
asserts on CUDA, and ``MoEGraph._last_routing`` is a Python attribute overwritten by each call
(after a capture it holds the graph's tensors, rewritten by every replay).

What a graph freezes, and how it is kept right: the addresses of every weight, buffer, decode
copy (``prepare_inference``) and KV cache it read at capture. :func:`decode_graph` keeps one
graph per (model, batch size), checks before each generation that the model still holds the same
tensors and decode copies (``prepare_inference``, ``train()``, ``to()`` and module assignment
change them; in-place updates such as ``load_state_dict`` or optimizer steps do not need a new
graph) and captures anew when not.
"""

from __future__ import annotations

import functools
import itertools
import weakref

import torch
from torch import nn

WARMUP_STEPS = 3  # eager steps on a side stream before capture: Triton compiles, cuBLAS/SDPA workspaces


def _model_device(model: nn.Module) -> torch.device:
    return next(itertools.chain(model.buffers(), model.parameters())).device


def _decode_step(model: nn.Module, ids: torch.Tensor, caches: list, position: torch.Tensor) -> torch.Tensor:
    # a function of the model, not its bound method: a compiled step held by a cached DecodeGraph
    # must not keep the model alive
    return model.decode_step(ids, caches, position)


@functools.cache
def compiled_decode_step(backend: str):
    """:func:`_decode_step` under ``torch.compile`` with ``backend``, at fixed shapes; one compiled
    function per backend, so every decoder of a model reuses its code."""
    return torch.compile(_decode_step, backend=backend, dynamic=False)


def check_compile_backend(compile_backend: str | None) -> None:
    """Raise ValueError unless ``compile_backend`` is None or a backend the step can be compiled with."""
    if compile_backend is None:
        return
    if not isinstance(compile_backend, str) or compile_backend not in torch.compiler.list_backends(exclude_tags=()):
        raise ValueError(f"compile_backend must be None or a torch.compile backend "
                         f"({', '.join(torch.compiler.list_backends())}), got {compile_backend!r}")
    if compile_backend == "cudagraphs":  # its own graphs cannot be recorded inside DecodeGraph's
        raise ValueError("compile_backend='cudagraphs' would capture CUDA graphs of its own; a DecodeGraph "
                         "(cuda_graph) already replays the step as one: use 'inductor'")


def step_function(compile_backend: str | None):
    """The decode step function for ``compile_backend`` (None: eager), which is checked."""
    check_compile_backend(compile_backend)
    return _decode_step if compile_backend is None else compiled_decode_step(compile_backend)


class StepDecoder:
    """Prefill with the ordinary forward, then fixed-shape one-token steps, run eagerly.

    Args:
        model: a :class:`~ternary_graph.models.model.TernaryGraphLM` in eval mode.
        batch_size: rows decoded together (every generation with this decoder has this many).
        compile_backend: None (the eager step), or the ``torch.compile`` backend of the step
            (``"inductor"`` fuses its elementwise ops; the first step compiles).

    Shapes: prefill ids (batch_size, T) -> logits (batch_size, vocab); step token (batch_size,)
    or (batch_size, 1) -> logits (batch_size, vocab). The logits returned by :meth:`step` may be
    a buffer that the next step overwrites (:class:`DecodeGraph`): read them before then.
    """

    def __init__(self, model: nn.Module, batch_size: int, compile_backend: str | None = None) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self._check_eval(model)
        self.batch_size = batch_size
        self._decode = step_function(compile_backend)
        self.caches = model.new_kv_cache(batch_size)
        device = self.caches[0].k.device
        # The step's only inputs: the byte and where it goes. Allocated once, so that a captured
        # step keeps reading them.
        self.ids = torch.zeros(batch_size, 1, dtype=torch.int64, device=device)
        self.position = torch.zeros((), dtype=torch.int64, device=device)
        self._model = model

    @staticmethod
    def _check_eval(model: nn.Module) -> None:
        if model.training:
            raise ValueError("the decode step needs the model in eval mode (call model.eval()): in training mode "
                             "the VQ codebook tracks usage and MoEGraph counts load on every call")

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def max_len(self) -> int:
        return self.caches[0].max_len

    @property
    def length(self) -> int:
        """Positions filled so far (the host's count; the device position holds the same)."""
        return self.caches[0].length

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Restart from the prompt ``ids`` (batch_size, T): one ordinary forward into the caches
        (earlier contents are overwritten or masked), the device position set to T. Returns the
        logits of the last prompt position, (batch_size, vocab)."""
        model = self.model
        self._check_eval(model)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != self.batch_size or ids.shape[1] < 1:
            got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids must have shape (batch_size={self.batch_size}, T >= 1), got {got}")
        for cache in self.caches:
            cache.length = 0
        logits = model(ids, kv_cache=self.caches).logits[:, -1]
        self.position.fill_(self.length)
        return logits

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Decode one byte per row at the next position; returns its logits (batch_size, vocab)."""
        if self.length >= self.max_len:
            raise ValueError(f"the KV cache holds {self.length} positions, its max_len={self.max_len}: "
                             f"no room for another token")
        if not isinstance(token, torch.Tensor) or token.numel() != self.batch_size:
            got = tuple(token.shape) if isinstance(token, torch.Tensor) else type(token).__name__
            raise ValueError(f"token must hold one id per row (batch_size={self.batch_size}), got {got}")
        self.ids.copy_(token.reshape(self.batch_size, 1))
        logits = self._run()
        for cache in self.caches:  # the host's count of what the device position now holds
            cache.length += 1
        return logits

    def _run(self) -> torch.Tensor:
        self._check_eval(self.model)  # a replayed graph keeps the eval-mode step it recorded
        return self._step()

    def _step(self) -> torch.Tensor:
        """The step itself, the region a CUDA graph records: device work only, no host reads."""
        logits = self._decode(self.model, self.ids, self.caches, self.position)
        self.position.add_(1)
        return logits

    def release(self) -> None:
        """Hand the decoder back after a generation (see :func:`decode_graph`)."""


class DecodeGraph(StepDecoder):
    """:class:`StepDecoder` whose step is captured once as a CUDA graph and replayed.

    Capture: :data:`WARMUP_STEPS` eager steps on a side stream (they compile the Triton kernels
    and allocate library workspaces outside the capture), then one recorded step. Each
    :meth:`step` copies the token into the static input, replays, and returns the static logits
    (the next replay overwrites them). The graph holds the model only weakly; it keeps the decode
    copies it read alive, so that a replay never reads freed memory.
    """

    def __init__(self, model: nn.Module, batch_size: int, compile_backend: str | None = None) -> None:
        device = _model_device(model)
        if device.type != "cuda":
            raise ValueError(f"a CUDA-graph decode step needs a model on a CUDA device, got {device}")
        super().__init__(model, batch_size, compile_backend)
        self._model_ref = weakref.ref(model)
        del self._model  # a strong reference would keep a cached graph's model alive forever
        self._ptrs, self._copies = _weights_signature(model)
        self.busy = False
        with torch.no_grad(), torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):  # writes positions 0..2 of the caches: prefill overwrites them
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()
        self.position.zero_()  # recording ran no kernel; the warm-up steps moved it

    @property
    def model(self) -> nn.Module:
        model = self._model_ref()
        if model is None:
            raise ValueError("the model of this DecodeGraph has been deleted")
        return model

    def _run(self) -> torch.Tensor:
        # replay() launches on the current device's stream: make that the graph's device
        with torch.cuda.device(self.position.device):
            self.graph.replay()
        return self.logits

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` still holds the tensors and decode copies this graph recorded."""
        if self._model_ref() is not model:
            return False
        ptrs, copies = _weights_signature(model)
        return ptrs == self._ptrs and len(copies) == len(self._copies) and all(
            a is b for a, b in zip(copies, self._copies))

    def release(self) -> None:
        self.busy = False


def _weights_signature(model: nn.Module) -> tuple[tuple[int, ...], tuple]:
    """(addresses of every parameter and buffer, the decode copy object of every module or None)."""
    ptrs = tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))
    copies = tuple(getattr(m, "inference_copy", None) for m in model.modules())
    return ptrs, copies


# One graph per (model, batch size, compile backend); weak keys, so a deleted model takes its
# graphs with it.
_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, str | None], DecodeGraph]]" = \
    weakref.WeakKeyDictionary()


def decode_graph(model: nn.Module, batch_size: int, compile_backend: str | None = None) -> DecodeGraph:
    """The model's cached :class:`DecodeGraph` for ``batch_size`` (and ``compile_backend``, see
    :class:`StepDecoder`), captured anew when the model no longer holds the tensors it recorded,
    marked busy until :meth:`DecodeGraph.release`. While it
    is busy (another generation of the same model and batch size is under way) a private,
    uncached graph is captured instead, so two interleaved generations never share caches."""
    graphs = _GRAPHS.setdefault(model, {})
    key = (batch_size, compile_backend)
    graph = graphs.get(key)
    if graph is not None and graph.busy:
        graph = DecodeGraph(model, batch_size, compile_backend)
    elif graph is None or not graph.matches(model):
        graphs.pop(key, None)
        graph = None  # free the stale graph's memory pool before capturing the next one
        graph = graphs[key] = DecodeGraph(model, batch_size, compile_backend)
    graph.busy = True
    return graph


def clear_decode_graphs(model: nn.Module) -> None:
    """Drop the model's cached graphs (their KV caches and memory pools)."""
    _GRAPHS.pop(model, None)
