"""The training step replayed as a CUDA graph.

A small model on a big GPU is launch-bound: a step of thousands of short kernels costs more
CPU time (Python, dispatch, launch) than GPU time. With the step free of host synchronisation
(see ``tests/test_cuda_training.py``), the whole step, forward, backward, ``TernaryOptimizer.step()``
and ``update_graph()``, can be captured once with ``torch.cuda.graph`` and replayed for every
batch of the same shape: one launch per step.

What a graph freezes, and how this class keeps it right:
  * the vote threshold θ is a one-element device tensor the update kernel reads when it runs:
    before every replay the host writes that step's θ into it, so the θ ramp needs no new capture;
  * the optimizer's step counter advances on the host after every replay;
  * the VQ codebooks' usage decay and dead-code re-seeding are host decisions on a schedule:
    inside the graph the codebooks only accumulate (``defer_schedule``), and the schedule runs
    eagerly between replays on the last batch's tensors;
  * stochastic flips (``flip_prob < 1``) would replay one seed forever: refused, as are float
    optimizers (their learning-rate schedule is host state too), ``--task lm+kg`` and data
    parallel training.

A replayed step writes its outputs into the same tensors every time: read the loss and the
statistics of a step before the next one runs.
"""

from __future__ import annotations

import torch

from ..nn.vq import TernaryVQCodebook
from ..ternary.optimizer import StepStats, TernaryOptimizer


class CapturedTrainStep:
    """``step(x, y) -> (output, StepStats)`` like ``train_step``, replayed from a CUDA graph.

    Args:
        model: a ternary model on a CUDA device, in train mode.
        opt: its TernaryOptimizer (no float optimizer; ``flip_prob == 1``).
        step_fn: the eager step, ``step_fn(model, opt, x, y) -> (output, StepStats, ...)``.
    """

    def __init__(self, model: torch.nn.Module, opt: TernaryOptimizer, step_fn) -> None:
        device = next(model.buffers()).device
        if device.type != "cuda":
            raise ValueError(f"CUDA-graph capture needs a model on a CUDA device, got {device}")
        if opt.float_optimizer is not None:
            raise ValueError("CUDA-graph capture supports ternary models only (a float optimizer's learning-rate "
                             "schedule is host state); train the float baseline without --cuda-graph")
        if opt.rule.flip_prob != 1.0:
            raise ValueError(f"CUDA-graph capture needs flip_prob=1.0 (a replay would reuse one coin seed), "
                             f"got flip_prob={opt.rule.flip_prob}")
        self.model, self.opt, self.step_fn = model, opt, step_fn
        self.vqs = [m for m in model.modules() if isinstance(m, TernaryVQCodebook)]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captures = 0
        self._x = self._y = None
        self._outputs = None
        self._vq_refs: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        if self.graph is None or x.shape != self._x.shape:
            return self._eager_then_capture(x, y)
        threshold = self.opt.write_threshold()
        self._x.copy_(x, non_blocking=True)
        self._y.copy_(y, non_blocking=True)
        self.graph.replay()
        self.opt.step_count += 1
        for vq in self.vqs:
            refs = self._vq_refs.get(id(vq))  # None: a codebook the step does not quantise with (the KG one)
            if refs is not None:
                vq._deferred = refs
                vq.run_schedule()
        out, stats = self._outputs
        return out, StepStats(self.opt.step_count - 1, threshold, stats.flips, stats.trits_updated,
                              stats.float_params)

    def _eager_then_capture(self, x: torch.Tensor, y: torch.Tensor):
        """Run this step eagerly on a side stream (it also warms Triton and the allocator up), then
        record the step, for the steps that follow, into a new graph."""
        for vq in self.vqs:
            vq.defer_schedule = True
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = self.step_fn(self.model, self.opt, x, y)
            for vq in self.vqs:
                vq.run_schedule()
        torch.cuda.current_stream().wait_stream(side)
        self._x, self._y = x.clone(), y.clone()
        step_count = self.opt.step_count
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            out, stats = self.step_fn(self.model, self.opt, self._x, self._y)[:2]
        # Recording ran the Python side of a step without executing it: undo its host effects.
        self.opt.step_count = step_count
        self._vq_refs = {}
        for vq in self.vqs:
            self._vq_refs[id(vq)] = vq._deferred
            vq._deferred = None
        self._outputs = (out, stats)
        self.captures += 1
        return result[0], result[1]
