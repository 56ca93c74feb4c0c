"""Ternary VQ codebooks: millions of scaled ternary codes, exact search, integer-only state.

A code is a row of a :class:`TernaryEmbeddingTable`: trits ``T_c`` packed 5 per byte and an
int8 log-scale, ``q_c = s_c · T_c`` with ``s_c = 2 ** (E_c / E_STEP)``. The module holds no
floating-point buffer or parameter at all:

| buffer            | dtype | shape        | meaning                                                  |
|-------------------|-------|--------------|----------------------------------------------------------|
| codes.weight.*    | uint8/int8 | see TernaryState | packed trits, E, T_accum, E_accum               |
| usage             | int16 | (num_codes,) | assignments, saturating at 32767, halved every ``usage_decay_interval`` training calls |
| used_in_window    | bool  | (num_codes,) | assigned at least once since the last re-seed check      |
| step              | int64 | ()           | training forward calls so far                            |
| dead_codes        | int64 | ()           | codes found unused at the last re-seed check             |
| reseeded_total    | int64 | ()           | codes re-seeded so far                                   |

"Unused for a window" needs no per-code timestamp: ``used_in_window`` is set for the (few)
assigned codes on every call, and only every ``reseed_window`` calls is the whole flag vector
read (the codes never assigned since the previous check are dead) and cleared. That O(codes)
pass, and the usage halving, are the only whole-codebook work, and both are periodic.

Learning. The assignment is the exact nearest code (``kernels/vq_search.py``). The codes learn
through the same sparse vote path as every ternary table: ``commitment_loss`` carries, beside
its value ``commitment_weight · mean ||z - sg(q)||²``, a zero-valued term ``cb - sg(cb)`` with
``cb = mean ||sg(z) - q||²``, so that its backward sends ``∂cb/∂q_c ∝ Σ_{i→c} (q_c - z_i)`` to
the codes' gather, whose backward sums it per assigned code and casts one sign vote per trit
(and one per scale) into only those rows; the optimizer step then visits only them.
Dead codes are re-seeded from the inputs of the call that finds them, those worst reconstructed
first: each such input is fitted with the best ternary approximation ``s·T`` (support = its
``m`` largest magnitudes, ``m`` chosen to minimise the error) and packed directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..config import KGVQ_CODEBOOK_DIM, KGVQ_CODEBOOK_SIZE, RESEED_WINDOW, VQ_RESEED_FROM
from ..kernels.embedding import gather_rows_reference
from ..kernels.vq_search import PRECISIONS, check_search_args, nearest_codes
from ..ternary.packing import pack_trits
from ..ternary.saturating import saturating_add
from ..ternary.state import E_MAX, E_MIN, E_STEP
from .embedding import TernaryEmbeddingTable

USAGE_MAX = 32767


class VQOutput(NamedTuple):
    """What :meth:`TernaryVQCodebook.forward` returns.

    Shapes (for z of shape (..., dim)):
        quantized: (..., dim), z's dtype; straight-through: ``z + sg(q - z)``
        ids: (...) int64
        commitment_loss: () float32
    """

    quantized: torch.Tensor
    ids: torch.Tensor
    commitment_loss: torch.Tensor


@dataclass(frozen=True)
class VQStats:
    """Statistics of a codebook (see :meth:`TernaryVQCodebook.stats`)."""

    perplexity: float  # exp(entropy) of the last training batch's assignment histogram
    live_fraction: float  # fraction of codes with usage > 0
    dead_codes: int  # codes found unused at the last re-seed check
    reseeded_total: int  # codes re-seeded so far


def ternary_fit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best scaled ternary approximation of each row: ``x ≈ 2**(E/E_STEP) · T``.

    For a support of the ``m`` largest ``|x_k|`` the optimal scale is their mean and the error
    is ``||x||² - (Σ_top-m |x_k|)² / m``, so ``m`` maximises ``cumsum² / m``. A zero row gives
    zero trits (and E = 0).

    Shapes: x (k, D) float -> trits (k, D) int8, E (k,) int8
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, dim), got shape {tuple(x.shape)}")
    xf = x.to(torch.float32)
    mag, order = xf.abs().sort(dim=1, descending=True, stable=True)
    csum = mag.cumsum(dim=1)
    m = torch.arange(1, xf.shape[1] + 1, device=x.device, dtype=torch.float32)
    best = (csum * csum / m).argmax(dim=1)  # index of the last kept magnitude
    keep_sorted = torch.arange(xf.shape[1], device=x.device)[None, :] <= best[:, None]
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    trits = (torch.sign(xf) * keep).to(torch.int8)
    scale = csum.gather(1, best[:, None]).squeeze(1) / (best + 1).to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    E = torch.round(E_STEP * torch.log2(safe)).clamp_(E_MIN, E_MAX).to(torch.int8)
    return trits, E


def assignment_perplexity(counts: torch.Tensor) -> float:
    """``exp(entropy)`` of a histogram given as the counts of the codes that occur."""
    total = counts.sum()
    if counts.numel() == 0 or int(total) == 0:
        return 0.0
    p = counts.to(torch.float64) / total.to(torch.float64)
    return float(torch.exp(-(p * p.log()).sum()))


def _check_reseed_from(reseed_from: str) -> None:
    if reseed_from not in VQ_RESEED_FROM:
        raise ValueError(f"reseed_from must be one of {VQ_RESEED_FROM}, got {reseed_from!r}")


def reseed_candidates(dist: torch.Tensor, reseed_from: str, step: int) -> torch.Tensor:
    """The order in which a batch's rows re-seed dead codes: ``"worst"`` reconstructed first, or
    ``"random"``, a permutation seeded by the codebook's step (so identical on every rank and
    after a resume; it runs between training steps, never inside a captured one).

    Shapes: dist (n,) -> (n,) int64 row indices on dist's device.
    """
    _check_reseed_from(reseed_from)
    if reseed_from == "worst":
        return torch.argsort(dist, descending=True, stable=True)
    order = torch.randperm(dist.shape[0], generator=torch.Generator().manual_seed(int(step)))
    return order.to(dist.device)


def _check_nonneg_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int (0 disables), got {value!r}")


class TernaryVQCodebook(nn.Module):
    """``num_codes`` scaled ternary codes of length ``dim`` with exact nearest-code assignment.

    Args:
        num_codes, dim: codebook size.
        commitment_weight: weight of ``mean ||z - sg(q)||²`` in ``commitment_loss``.
        reseed_window: every this many training calls, codes not assigned since the previous
            check are re-seeded from that call's inputs (0 disables re-seeding).
        usage_decay_interval: every this many training calls, ``usage`` is halved (0: never).
        init_scale, zero_fraction: initial code scale and trit sparsity (see TernaryState).
        precision: query rounding of the search, ``"bf16x2"`` (16 significant bits) or
            ``"bf16"`` (see ``kernels/vq_search.py``).
        reseed_from: which inputs of the re-seeding batch dead codes are fitted to first: the
            ``"worst"`` reconstructed (outliers, which few later tokens are near) or a
            ``"random"`` sample (inputs where the data is dense); see :func:`reseed_candidates`.
        input_norm: rescale every input row to this L2 norm before the search (None: search the
            raw rows). Without it a shrinking input makes the smallest codes the nearest to
            everything: the codebook collapses onto a handful of codes (docs/results.md).
        device: ``"meta"`` allocates nothing.
        generator: RNG of the initial codes.

    Shapes:
        z: (..., dim) float (float32 / bfloat16 / float16 / float64), finite
        returns: :class:`VQOutput`

    Training calls (``self.training``) also update ``usage``, re-seed and record the
    histogram that :meth:`stats` reports; eval calls change nothing.
    """

    usage: torch.Tensor
    used_in_window: torch.Tensor
    step: torch.Tensor
    dead_codes: torch.Tensor
    reseeded_total: torch.Tensor

    def __init__(self, num_codes: int, dim: int, *, commitment_weight: float = 0.25,
                 reseed_window: int = RESEED_WINDOW, usage_decay_interval: int = 100,
                 init_scale: float | None = None, zero_fraction: float | None = None,
                 precision: str = "bf16x2", input_norm: float | None = None, reseed_from: str = "worst",
                 device: torch.device | str | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if input_norm is not None and not (isinstance(input_norm, (int, float)) and math.isfinite(input_norm)
                                           and input_norm > 0):
            raise ValueError(f"input_norm must be None or a positive finite number, got {input_norm!r}")
        for name, value in (("num_codes", num_codes), ("dim", dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(commitment_weight, (int, float)) and math.isfinite(commitment_weight)
                and commitment_weight >= 0):
            raise ValueError(f"commitment_weight must be a finite number >= 0, got {commitment_weight!r}")
        _check_nonneg_int("reseed_window", reseed_window)
        _check_nonneg_int("usage_decay_interval", usage_decay_interval)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        _check_reseed_from(reseed_from)
        self.num_codes, self.dim = num_codes, dim
        self.commitment_weight = float(commitment_weight)
        self.reseed_window = reseed_window
        self.usage_decay_interval = usage_decay_interval
        self.precision = precision
        self.reseed_from = reseed_from
        self.input_norm = None if input_norm is None else float(input_norm)
        self.codes = TernaryEmbeddingTable(num_codes, dim, zero_fraction=zero_fraction, init_scale=init_scale,
                                           device=device, generator=generator)
        self.register_buffer("usage", torch.zeros(num_codes, dtype=torch.int16, device=device))
        self.register_buffer("used_in_window", torch.zeros(num_codes, dtype=torch.bool, device=device))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("dead_codes", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("reseeded_total", torch.zeros((), dtype=torch.int64, device=device))
        # Histogram of the last training batch (a count per code; all codes without a sync): a statistic,
        # not state, so it is an attribute and never enters the state_dict.
        self._last_counts: torch.Tensor | None = None
        self._host_step: int | None = None
        # Set by a captured training step: _track then only accumulates, and the decay/re-seed
        # schedule runs in run_schedule() between replays. _deferred: (z2d, dist, calls) pending.
        self.defer_schedule = False
        self._deferred: tuple[torch.Tensor, torch.Tensor, int] | None = None
        # Data-parallel training (train/distributed.py) sets this to an object that merges the
        # assignments of every rank and picks the re-seed inputs identically on every rank; it
        # is transient, like the histogram, and None means one process.
        self.tracking_sync = None

    # --- assignment ------------------------------------------------------------------------
    def _check_z(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if z.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"z must be float32 / bfloat16 / float16 / float64, got dtype={z.dtype}")
        w = self.codes.weight
        check_search_args(z, w.packed, w.E, self.dim)

    def forward(self, z: torch.Tensor) -> VQOutput:
        self._check_z(z)
        w = self.codes.weight
        z2d = z.reshape(-1, self.dim)
        if self.input_norm is not None:
            norms = z2d.float().norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            z2d = z2d * (self.input_norm / norms).to(z2d.dtype)
        ids, dist = nearest_codes(z2d, w.packed, w.E, self.dim, precision=self.precision)
        q = self.codes(ids, dtype=z.dtype)  # votes flow back into these rows only
        if z2d.shape[0] == 0:
            loss = z2d.new_zeros((), dtype=torch.float32) + q.float().sum() * 0.0
        else:
            diff = z2d.to(torch.float32) - q.detach().to(torch.float32)
            loss = self.commitment_weight * (diff * diff).sum(dim=-1).mean()
            if q.requires_grad:
                cb = ((z2d.detach().to(torch.float32) - q.to(torch.float32)) ** 2).sum(dim=-1).mean()
                loss = loss + (cb - cb.detach())
        quantized = z2d + (q - z2d).detach()
        if self.training:
            with torch.no_grad():
                self._track(ids, z2d, dist)
        return VQOutput(quantized.reshape(z.shape), ids.reshape(z.shape[:-1]), loss)

    @torch.no_grad()
    def _track(self, ids: torch.Tensor, z2d: torch.Tensor, dist: torch.Tensor) -> None:
        sync = self.tracking_sync
        if sync is None:
            calls = 1
            # A histogram over the whole codebook has a fixed shape (no host sync); on a GPU it
            # costs one pass over num_codes counters, microseconds even at 10M codes.
            counts = torch.zeros(self.num_codes, dtype=torch.int32, device=ids.device)
            counts.index_add_(0, ids.reshape(-1), torch.ones(ids.numel(), dtype=torch.int32, device=ids.device))
            self.usage.copy_(saturating_add(self.usage, counts))
            self.used_in_window.logical_or_(counts > 0)
        else:  # the assignments of all ranks' calls, which count as `calls` calls
            unique, counts, calls = sync.merge_assignments(self, ids)
            self.usage.index_copy_(0, unique, saturating_add(self.usage.index_select(0, unique), counts))
            self.used_in_window.index_fill_(0, unique, True)
        self._last_counts = counts
        self.step.add_(calls)
        if self.defer_schedule:  # a captured step: the owner calls run_schedule() after each replay
            self._deferred = (z2d, dist, self._deferred[2] + calls if self._deferred else calls)
            return
        self._run_schedule(calls, z2d, dist)

    def run_schedule(self) -> None:
        """Apply the usage decay and dead-code re-seeding due for the forwards tracked since the
        last call, using the last tracked batch (``defer_schedule`` mode, e.g. a training step
        replayed as a CUDA graph, where nothing can be decided on the host inside the step)."""
        if self._deferred is None:
            return
        z2d, dist, calls = self._deferred
        self._deferred = None
        self._run_schedule(calls, z2d, dist)

    @torch.no_grad()
    def _run_schedule(self, calls: int, z2d: torch.Tensor, dist: torch.Tensor) -> None:
        sync = self.tracking_sync
        # The step count is mirrored on the host so that the decay and re-seed schedule never
        # reads the device buffer inside a step (it is read once, after construction or a load).
        step = int(self.step) if self._host_step is None else self._host_step + calls
        before, self._host_step = step - calls, step
        # "crossed a multiple" is "step % interval == 0" when calls == 1
        if self.usage_decay_interval and step // self.usage_decay_interval > before // self.usage_decay_interval:
            self.usage.bitwise_right_shift_(1)  # usage is never negative: a shift halves it
        if self.reseed_window and step // self.reseed_window > before // self.reseed_window:
            if sync is not None:
                z2d, dist = sync.reseed_inputs(self, z2d, dist)
            targets, reseeded = self._reseed(z2d, dist)
            if sync is not None:
                sync.codes_reseeded(self, targets[reseeded])

    @property
    def schedule_step(self) -> int:
        """Training calls so far, from the host mirror when there is one (no device read)."""
        return int(self.step) if self._host_step is None else self._host_step

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_step = None  # re-read from the loaded buffer at the next training forward

    @torch.no_grad()
    def _reseed(self, z2d: torch.Tensor, dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-seed dead codes from rows of z2d in :func:`reseed_candidates` order.

        Fixed shapes (no host sync): ``n = min(rows, num_codes)`` candidate targets, the dead
        codes first in id order; the first ``min(dead, n)`` are re-seeded, the others are
        rewritten with their own values. Returns (targets (n,) int64, reseeded (n,) bool).
        """
        dead = ~self.used_in_window
        self.dead_codes.copy_(dead.sum())
        n = min(z2d.shape[0], self.num_codes)
        targets = torch.argsort(dead.to(torch.int8), descending=True, stable=True)[:n]
        reseeded = dead.index_select(0, targets)
        rows = reseed_candidates(dist, self.reseed_from, self.schedule_step)[:n]
        trits, E = ternary_fit(z2d.index_select(0, rows))
        w = self.codes.weight
        keep = ~reseeded
        w.packed.index_copy_(0, targets, torch.where(keep[:, None], w.packed.index_select(0, targets),
                                                     pack_trits(trits)))
        w.E.index_copy_(0, targets, torch.where(keep, w.E.index_select(0, targets), E))
        for acc in (w.T_accum, w.E_accum):
            acc.index_copy_(0, targets, acc.index_select(0, targets) * keep.reshape(-1, *[1] * (acc.dim() - 1)))
        self.usage.index_copy_(0, targets, self.usage.index_select(0, targets) * keep)
        self.reseeded_total.add_(reseeded.sum())
        self.used_in_window.zero_()
        return targets, reseeded

    # --- ids <-> codes -----------------------------------------------------------------------
    def indices_to_codes(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The scaled code vectors ``s_c · T_c`` of ``ids`` (no autograd, no votes).

        Shapes: ids (...) int32/int64 -> (..., dim) in ``dtype``.
        """
        rows = self.codes.check_ids(ids)
        w = self.codes.weight
        return gather_rows_reference(w.packed, w.E, rows, self.dim, dtype).reshape(*ids.shape, self.dim)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`indices_to_codes`: the id of the (nearest) code of each vector.

        ``indices_to_codes(codes_to_indices(v)) == v`` for every code vector ``v``, and
        ``codes_to_indices(indices_to_codes(ids)) == ids`` whenever the codes of ``ids`` are
        distinct (identical codes map to the smallest id among them).

        Shapes: codes (..., dim) float -> (...) int64.
        """
        self._check_z(codes)
        w = self.codes.weight
        ids, _ = nearest_codes(codes, w.packed, w.E, self.dim, precision=self.precision)
        return ids

    # --- statistics --------------------------------------------------------------------------
    @torch.no_grad()
    def stats(self) -> VQStats:
        """Perplexity of the last training batch, live-code fraction (one pass over ``usage``)."""
        counts = self._last_counts
        perplexity = assignment_perplexity(counts[counts > 0]) if counts is not None else 0.0
        live = float((self.usage > 0).sum()) / self.num_codes
        return VQStats(perplexity=perplexity, live_fraction=live, dead_codes=int(self.dead_codes),
                       reseeded_total=int(self.reseeded_total))

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, commitment_weight={self.commitment_weight:g}, "
                f"reseed_window={self.reseed_window}, usage_decay_interval={self.usage_decay_interval}, "
                f"precision={self.precision!r}, reseed_from={self.reseed_from!r}")


class KGVQCodebook(TernaryVQCodebook):
    """The knowledge-graph entity codebook: a :class:`TernaryVQCodebook` with the KG defaults
    (``KGVQ_CODEBOOK_SIZE`` codes of ``KGVQ_CODEBOOK_DIM``) and no state of its own."""

    def __init__(self, num_codes: int = KGVQ_CODEBOOK_SIZE, dim: int = KGVQ_CODEBOOK_DIM, **kwargs) -> None:
        super().__init__(num_codes, dim, **kwargs)
