"""TernaryOptimizer: applies the int8-vote update rule to every TernaryState of a model.

Gradients never exist as float tensors on ternary modules: backward casts them straight into
the int8 ``T_accum`` / ``E_accum`` accumulators as votes. ``step()`` turns accumulators that
reached the threshold into trit steps (see ``kernels/ternary_update.py`` for the rule).

Float parameters that remain (if a model has any) are trained by an ordinary torch optimizer
passed as ``float_optimizer``; ``step``/``zero_grad``/``state_dict`` drive both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Iterable

import torch
from torch import nn

# Module import, not a name: kernels.ternary_update imports ternary.packing, whose package
# __init__ imports this file, so the name may not exist yet when this line runs.
from ..kernels import ternary_update as _update_kernels
from .packing import count_zero_trits
from .state import TernaryState, ternary_states


@dataclass
class UpdateRule:
    """Hyper-parameters of the vote-and-threshold rule."""

    threshold: int = 16  # |T_accum| at which a trit steps one level (θ); 1..127
    threshold_final: int | None = None  # θ at the end of the ramp (None: θ stays constant)
    threshold_ramp_steps: int = 0  # step at which θ reaches threshold_final (linear ramp)
    threshold_ramp_start: int = 0  # step at which the ramp begins (θ = threshold before it): a cool-down
    scale_threshold: int = 64  # |E_accum| at which a row scale steps by 2**(1/E_STEP); 0 freezes E
    decay_shift: int | None = None  # each step |acc| shrinks by |acc| >> decay_shift (None: no decay)
    flip_prob: float = 1.0  # probability that a trit at threshold actually steps (stochastic flips)
    vote_magnitude: int = 1  # what one backward pass adds to an accumulator, ±1..±127

    def __post_init__(self) -> None:
        for name in ("threshold", "threshold_final"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 1 <= value <= 127):
                raise ValueError(f"{name} must be an int in 1..127, got {value!r}")
        if not isinstance(self.threshold_ramp_steps, int) or self.threshold_ramp_steps < 0:
            raise ValueError(f"threshold_ramp_steps must be a non-negative int, got {self.threshold_ramp_steps!r}")
        if (not isinstance(self.threshold_ramp_start, int) or self.threshold_ramp_start < 0
                or (self.threshold_ramp_steps and self.threshold_ramp_start >= self.threshold_ramp_steps)):
            raise ValueError(f"threshold_ramp_start must be an int in 0..threshold_ramp_steps-1 "
                             f"({self.threshold_ramp_steps - 1}), got {self.threshold_ramp_start!r}")
        if not isinstance(self.scale_threshold, int) or not 0 <= self.scale_threshold <= 127:
            raise ValueError(f"scale_threshold must be an int in 0..127, got {self.scale_threshold!r}")
        if self.decay_shift is not None and (not isinstance(self.decay_shift, int) or not 1 <= self.decay_shift <= 7):
            raise ValueError(f"decay_shift must be None or an int in 1..7, got {self.decay_shift!r}")
        if not 0.0 < self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must lie in (0, 1], got {self.flip_prob!r}")
        if not isinstance(self.vote_magnitude, int) or not 1 <= self.vote_magnitude <= 127:
            raise ValueError(f"vote_magnitude must be an int in 1..127, got {self.vote_magnitude!r}")

    def threshold_at(self, step: int) -> int:
        """θ for optimizer step ``step`` (0-based): ``threshold`` until ``threshold_ramp_start``,
        then a linear ramp that reaches ``threshold_final`` at ``threshold_ramp_steps``, then constant."""
        if self.threshold_final is None or self.threshold_ramp_steps == 0:
            return self.threshold if self.threshold_final is None else self.threshold_final
        start = self.threshold_ramp_start
        frac = min(1.0, max(0, step - start) / (self.threshold_ramp_steps - start))
        return round(self.threshold + frac * (self.threshold_final - self.threshold))


@dataclass
class StepStats:
    """What one optimizer step did."""

    step: int
    threshold: int
    flips: int | torch.Tensor  # trits that changed value (on CUDA a 0-dim device tensor: read it lazily)
    trits_updated: int | torch.Tensor  # trits in the rows the step visited (a 0-dim tensor for sparse states)
    float_params: int  # float parameters stepped by the float optimizer

    @property
    def flip_rate(self) -> float:
        return int(self.flips) / max(1, int(self.trits_updated))


class TernaryOptimizer:
    """Steps every TernaryState of ``params`` with :class:`UpdateRule`.

    Args:
        params: a module (all its TernaryStates) or an iterable of TernaryStates.
        rule: the update rule (default ``UpdateRule()``).
        float_optimizer: optional torch optimizer over the model's remaining float parameters
            (e.g. ``torch.optim.AdamW(float_parameters(model))``), stepped alongside.
        seed: seeds the coin flips of stochastic updates.

    Sparse states (embedding tables) record the rows their backward touched; only those rows
    are visited by ``step()``, so its cost grows with the batch, not the table. States marked
    ``frozen`` are left out.
    """

    def __init__(self, params: nn.Module | Iterable[TernaryState], rule: UpdateRule | None = None, *,
                 float_optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        states = ternary_states(params) if isinstance(params, nn.Module) else list(params)
        for i, s in enumerate(states):
            if not isinstance(s, TernaryState):
                raise TypeError(f"params[{i}] must be a TernaryState, got {type(s).__name__}")
        states = [s for s in states if not s.frozen]
        if not states and float_optimizer is None:
            raise ValueError("TernaryOptimizer got no trainable TernaryState and no float_optimizer: nothing to train")
        self.states = states
        self.rule = rule if rule is not None else UpdateRule()
        self.float_optimizer = float_optimizer
        self.step_count = 0
        self._generator = torch.Generator().manual_seed(seed)
        # θ lives on each accelerator as one int32 that the update kernel reads when it runs: a
        # captured step (train/capture.py) then follows the θ schedule without a new capture.
        self._threshold_on: dict[torch.device, torch.Tensor] = {
            dev: torch.zeros(1, dtype=torch.int32, device=dev)
            for dev in {s.packed.device for s in states} if dev.type == "cuda"}
        for s in self.states:
            s.vote_magnitude = self.rule.vote_magnitude

    @torch.no_grad()
    def write_threshold(self) -> int:
        """Write this step's θ into the device copies the update kernels read; returns θ. ``step()``
        does it itself, except while a CUDA graph records it: a replay reads what the caller
        wrote before it (see CapturedTrainStep)."""
        threshold = self.rule.threshold_at(self.step_count)
        for buf in self._threshold_on.values():
            buf.fill_(threshold)
        return threshold

    @torch.no_grad()
    def step(self) -> StepStats:
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        threshold = self.rule.threshold_at(self.step_count) if capturing else self.write_threshold()
        flips = visited = 0
        for state in self.states:
            rows = state.take_touched_rows()
            if rows is not None and rows.numel() == 0:
                continue
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self._generator))
            theta = self._threshold_on.get(state.packed.device, threshold)
            flips += _update_kernels.ternary_update_(state.packed, state.T_accum, state.E, state.E_accum, state.cols,
                                     threshold=theta, scale_threshold=self.rule.scale_threshold,
                                     decay_shift=self.rule.decay_shift, flip_prob=self.rule.flip_prob,
                                     seed=seed, rows=rows)
            visited += state.cols * (state.rows if rows is None else (rows >= 0).sum())
        n_float = 0
        if self.float_optimizer is not None:
            self.float_optimizer.step()
            n_float = sum(p.numel() for g in self.float_optimizer.param_groups for p in g["params"])
        stats = StepStats(self.step_count, threshold, flips, visited, n_float)
        self.step_count += 1
        return stats

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """Health of the trits and accumulators, over all states (read at evaluation time: it
        synchronises the host and scans every byte of state once).

        zero_fraction: trits at 0. saturated_fraction: trit accumulators pinned at ±127.
        armed_fraction: trit accumulators at or past the current θ (would step if voted on again).
        scale_exponent_mean / _std: the row log-scales E (in 1/E_STEP octaves).
        """
        threshold = self.rule.threshold_at(self.step_count)
        trits = zeros = saturated = armed = rows = 0
        e_sum = e_sq = 0.0
        for s in self.states:
            zeros += count_zero_trits(s.packed, s.cols)
            for block in s.T_accum.split(max(1, (1 << 24) // s.cols)):
                mag = block.to(torch.int16).abs_()
                saturated += int((mag == 127).sum())
                armed += int((mag >= threshold).sum())
            e = s.E.to(torch.float64)
            e_sum, e_sq, rows = e_sum + float(e.sum()), e_sq + float((e * e).sum()), rows + s.rows
            trits += s.rows * s.cols
        if trits == 0:
            return {}
        mean = e_sum / rows
        return {"zero_fraction": zeros / trits, "saturated_fraction": saturated / trits,
                "armed_fraction": armed / trits, "scale_exponent_mean": mean,
                "scale_exponent_std": max(0.0, e_sq / rows - mean * mean) ** 0.5}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears float gradients. Votes are not gradients: they persist in the accumulators."""
        if self.float_optimizer is not None:
            self.float_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        out = {"step_count": self.step_count, "rule": asdict(self.rule),
               "generator": self._generator.get_state()}
        if self.float_optimizer is not None:
            out["float_optimizer"] = self.float_optimizer.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        known = {f.name for f in fields(UpdateRule)}
        unknown = set(state.get("rule", {})) - known
        if unknown:
            raise ValueError(f"optimizer state has unknown rule fields {sorted(unknown)}")
        if ("float_optimizer" in state) != (self.float_optimizer is not None):
            raise ValueError("optimizer state and this optimizer disagree on having a float_optimizer")
        rule = UpdateRule(**state["rule"])
        step_count = int(state["step_count"])
        if step_count < 0:
            raise ValueError(f"step_count must be non-negative, got {step_count}")
        self._generator.set_state(state["generator"])
        self.rule, self.step_count = rule, step_count
        for s in self.states:
            s.vote_magnitude = rule.vote_magnitude
        if self.float_optimizer is not None:
            self.float_optimizer.load_state_dict(state["float_optimizer"])
