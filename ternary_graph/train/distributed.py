"""Data-parallel training on torch.distributed: every rank applies identical integer votes.

Launch one process per device with torchrun (NCCL on GPUs, gloo on CPU)::

    torchrun --nproc-per-node 8 -m ternary_graph.train --distributed --micro-batches 8 ...

Every rank samples the same global batch of ``batch_size`` sequences and takes its chunk
``x.chunk(world)[rank]``; ``micro_batches`` counts the backward passes of the whole step over
all ranks, so each rank runs ``micro_batches / world`` of them. A run is then the same
function of its config whatever the number of ranks (see "Equivalence" below), and its
checkpoints resume in a run of any other size.

:class:`VoteSync` is the hook ``train_step`` calls: ``begin_step(model)`` before the forward
passes, ``all_reduce(model, opt)`` after the backward passes and before ``opt.step()``. Per
step it exchanges:

========================== ============================================================================
state                      exchange
========================== ============================================================================
dense TernaryStates        all-reduce (SUM) of the int8 accumulators ``T_accum``/``E_accum``, sent as
                           float16 (exact: every partial sum of int8 values is an integer of magnitude
                           at most 127·world ≤ 2048 for world ≤ 16; int32 beyond), then saturated
                           back to int8. Rank 0 contributes its accumulators, ranks ≥ 1 their votes
                           alone (they zero their accumulators in ``begin_step``), so no rank needs a
                           snapshot: the extra memory is one bucket (``bucket_bytes``), not 1 B/param.
sparse TernaryStates       (embedding tables, VQ codes, MoE centroids: ``sparse_updates=True``) one
                           all-gather of each rank's touched row ids (int32) with their T/E votes
                           (int8), padded to the largest rank; every rank sums them into the union of
                           rows and marks that union touched, so the update visits identical rows.
                           Ranks ≥ 1 zero a row's accumulators the first time a step gathers it (a
                           forward pre-hook on TernaryEmbeddingTable) and keep its old value, O(rows
                           gathered), to restore rows nobody voted on.
MoEGraph edge votes, load  in the same all-gather (code, expert, votes as int32) and a header all-gather
                           (sizes, load counts); the summed pairs go back with ``add_pending`` so that
                           ``update_graph()`` does the same thing everywhere.
VQ usage / re-seeding      inside each training forward of a TernaryVQCodebook (``tracking_sync``):
                           an all-gather of the assigned ids, so usage, ``used_in_window`` and ``step``
                           (which advances by ``world`` per call) are identical on every rank; a
                           re-seed gathers every rank's worst-reconstructed inputs and re-seeds from
                           the global worst, identically everywhere.
float parameters           (``--weights float`` and any float parameter) all-reduce of ``.grad``,
                           averaged, in buckets; parameters without a gradient on every rank keep none.
========================== ============================================================================

Equivalence. Ranks start every step with identical state (checked at the start of a run), see
identical packed weights during the step (nothing but the update changes them) and end it with
identical accumulators, so they stay identical. Against one process running the same config
(``micro_batches`` backward passes in sequence): votes are summed identically, so with two ranks
the packed weights and accumulators are equal bit for bit (rank 0's accumulator plus rank 1's
votes is exactly the sequential saturating sum); with more ranks they are equal unless an
accumulator saturates in the middle of a step. VQ usage and ``step`` are equal too, except in
a step where a usage halving or a re-seed fires: it applies after the counts of one call of
every rank (one process: after the calls so far of its micro batches, in another order), and a
re-seed draws from all ranks' inputs of that call rather than from one micro batch's.
Float gradients are averaged: equal bit for bit with two ranks (halving is exact), to float
rounding beyond.

Failure. Collectives that fail (a peer died: gloo raises at once; a peer hangs: the process
group's timeout) raise :class:`DistributedError`. Ranks ≥ 1 zero accumulators at the start of a
step, so after an error only rank 0's state (the one that checkpoints) is meaningful.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..graph.moegraph import MoEGraph
from ..nn.embedding import TernaryEmbeddingTable
from ..nn.vq import TernaryVQCodebook, reseed_candidates
from ..ternary.state import TernaryState, float_parameters

DEFAULT_TIMEOUT_S = 600.0  # torch's NCCL default; a checkpoint of rank 0 must fit inside it
DEFAULT_BUCKET_BYTES = 32 << 20  # largest buffer one dense or float all-reduce sends
FP16_EXACT_WORLD = 16  # 127 · 16 = 2032 ≤ 2048: sums of int8 values stay exact float16 integers
INT8_MAX = 127
BACKENDS = ("auto", "nccl", "gloo")
_MAX_INT32 = 2**31 - 1
# torch 2.13 deprecates all_gather_into_tensor in favour of all_gather_single; older releases lack the latter
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class DistributedError(RuntimeError):
    """A collective failed: a peer rank died or hung past the timeout, or the ranks disagree."""


@dataclass
class ExchangeStats:
    """What this rank handed to collectives during one step, in bytes of payload.

    Payload is the size of the tensor a rank contributes. On the wire a ring all-reduce sends
    about ``2·(world-1)/world`` times its payload per rank and an all-gather ``world-1`` times
    (the padded buffer) per rank; ``docs/distributed.md`` turns these into traffic.
    """

    dense_bytes: int = 0  # dense accumulators (T and E), float16 (int32 past 16 ranks)
    dense_elements: int = 0  # accumulator elements in the dense all-reduce
    sparse_bytes: int = 0  # own touched rows of sparse tables: 4 B id + cols B of T votes + 1 B of E vote
    sparse_rows: int = 0  # own touched rows, all sparse tables
    union_rows: int = 0  # rows of the union every rank applies, all sparse tables
    graph_bytes: int = 0  # own MoEGraph pairs, 12 B each (code, expert, votes as int32)
    graph_pairs: int = 0
    gather_bytes: int = 0  # the padded all-gather buffer (sparse rows + graph pairs) this rank sent
    float_bytes: int = 0  # float gradients
    vq_bytes: int = 0  # VQ assignments (int32 ids, every training call) and re-seed candidates
    control_bytes: int = 0  # headers: sizes, load counts, gradient flags
    rows: dict = field(default_factory=dict)  # sparse table name -> own touched rows
    union: dict = field(default_factory=dict)  # sparse table name -> rows of the union

    @property
    def total_bytes(self) -> int:
        """Everything this rank contributed (the gather counted padded)."""
        return self.dense_bytes + self.gather_bytes + self.float_bytes + self.vq_bytes + self.control_bytes

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["total_bytes"] = self.total_bytes
        return out


@dataclass
class _Prepared:
    """Rows of one sparse state a rank ≥ 1 zeroed in this step, with their values before."""

    rows: list = field(default_factory=list)  # (n_i,) int64 chunks, disjoint
    T: list = field(default_factory=list)  # (n_i, cols) int8
    E: list = field(default_factory=list)  # (n_i,) int8

    def cat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if not self.rows:
            return None
        return torch.cat(self.rows), torch.cat(self.T), torch.cat(self.E)


def state_checksums(module: nn.Module) -> tuple[list[str], torch.Tensor]:
    """Names and (n,) int64 position-weighted byte checksums of every ``state_dict`` tensor.

    Cheap on the device (chunks of 16 MiB), for checking that ranks hold the same state; not a
    cryptographic hash.
    """
    names, sums = [], []
    for name, t in sorted(module.state_dict().items()):
        data = t.detach().contiguous().reshape(-1).view(torch.uint8) if t.numel() else t.new_zeros(0, dtype=torch.uint8)
        total = t.numel() * 1_000_003
        chunk = 1 << 24
        for start in range(0, data.numel(), chunk):
            part = data[start:start + chunk].to(torch.int64)
            pos = torch.arange(start, start + part.numel(), device=part.device, dtype=torch.int64)
            weights = ((pos & 0x7FFFFFFF) * 0x9E3779B1) & 0x7FFFFFFF
            total = (total + int((part * (weights + 1)).sum())) % (1 << 62)
        names.append(name)
        sums.append(total)
    return names, torch.tensor(sums, dtype=torch.int64)


class VoteSync:
    """Exchanges one step's votes between the ranks of an initialised process group.

    Args:
        group: the process group (default: the default group). Must be initialised.
        bucket_bytes: largest buffer of one dense-accumulator or float-gradient all-reduce.
        timeout_s: the group's timeout, quoted in error messages.
        wire_dtype: dtype of the dense vote all-reduce: ``torch.float16`` (2 B per accumulator,
            exact up to 16 ranks) or ``torch.int32`` (4 B); default: float16 when exact.
        local_rank: this rank's index on its node (torchrun's LOCAL_RANK; default: the rank).

    Every rank must call the same methods in the same order, with the same model (same config)
    and batches of the same shape. ``last_stats`` holds the :class:`ExchangeStats` of the last
    step.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 timeout_s: float | None = None, wire_dtype: torch.dtype | None = None,
                 local_rank: int | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("VoteSync needs an initialised process group: call init_distributed() or "
                             "torch.distributed.init_process_group() first")
        if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes < 1024:
            raise ValueError(f"bucket_bytes must be an int >= 1024, got {bucket_bytes!r}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if local_rank is not None and (not isinstance(local_rank, int) or local_rank < 0):
            raise ValueError(f"local_rank must be a non-negative int, got {local_rank!r}")
        self.local_rank = self.rank if local_rank is None else local_rank
        self.backend = str(dist.get_backend(group))
        self.comm_device = (torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl"
                            else torch.device("cpu"))
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        exact_fp16 = self.world_size <= FP16_EXACT_WORLD
        if wire_dtype is None:
            wire_dtype = torch.float16 if exact_fp16 else torch.int32
        if wire_dtype not in (torch.float16, torch.int32) or (wire_dtype == torch.float16 and not exact_fp16):
            raise ValueError(f"wire_dtype must be torch.int32, or torch.float16 with at most {FP16_EXACT_WORLD} "
                             f"ranks; got {wire_dtype} with {self.world_size} ranks")
        # int16 would do, but neither NCCL nor gloo reduces int16
        self.wire_dtype = wire_dtype
        self.last_stats = ExchangeStats()
        self._stats = ExchangeStats()
        self._model: nn.Module | None = None
        self._dense: list[tuple[str, TernaryState]] = []
        self._sparse: list[tuple[str, TernaryState]] = []
        self._vqs: list[TernaryVQCodebook] = []
        self._moes: list[MoEGraph] = []
        self._floats: list[nn.Parameter] = []
        self._hooks: list = []
        self._prepared: dict[int, _Prepared] = {}
        self._in_step = False

    # ------------------------------------------------------------------------------------------
    # collectives
    # ------------------------------------------------------------------------------------------
    def _collective(self, what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except RuntimeError as exc:
            limit = f"the {self.timeout_s:g} s" if self.timeout_s is not None else "the process group's"
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed: a peer rank died, hung past "
                f"{limit} timeout, or the ranks run different configs ({type(exc).__name__}: {exc})") from exc

    def _all_gather(self, what: str, local: torch.Tensor) -> torch.Tensor:
        """(world, *local.shape) on the comm device; every rank must pass the same shape."""
        local = local.to(self.comm_device).contiguous()
        out = torch.empty((self.world_size, *local.shape), dtype=local.dtype, device=self.comm_device)
        self._collective(what, lambda: _ALL_GATHER(out.view(-1), local.view(-1), group=self.group))
        return out

    def _all_reduce(self, what: str, t: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        self._collective(what, lambda: dist.all_reduce(t, op=op, group=self.group))

    def barrier(self) -> None:
        """Wait for every rank (e.g. rank 0 prepares the corpus cache, then the others read it)."""
        flag = torch.zeros(1, dtype=torch.int32, device=self.comm_device)
        self._all_reduce("barrier", flag)  # an all-reduce: NCCL barriers guess the device

    def agree(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (e.g. an interrupt seen by one)."""
        t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=self.comm_device)
        self._all_reduce("agree", t, dist.ReduceOp.MAX)
        return bool(int(t.item()))

    def check_same(self, what: str, text: str) -> None:
        """Raise :class:`DistributedError` unless every rank passes the same ``text`` (e.g. a config)."""
        digest = torch.frombuffer(bytearray(hashlib.sha256(text.encode()).digest()), dtype=torch.uint8)
        gathered = self._all_gather(f"check_same({what})", digest).cpu()
        differ = [r for r in range(self.world_size) if not torch.equal(gathered[r], gathered[0])]
        if differ:
            raise DistributedError(f"rank {self.rank}: ranks {differ} have a different {what} than rank 0")

    def check_identical(self, model: nn.Module, when: str = "") -> None:
        """Raise :class:`DistributedError` naming the tensors where any rank's state differs."""
        names, sums = state_checksums(model)
        gathered = self._all_gather("check_identical", sums).cpu()
        bad = (gathered != gathered[0]).any(dim=0).nonzero().squeeze(1).tolist()
        if bad:
            listed = ", ".join(names[i] for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise DistributedError(f"rank {self.rank}: ranks hold different state{' ' + when if when else ''}: "
                                   f"{listed}")

    # ------------------------------------------------------------------------------------------
    # attach
    # ------------------------------------------------------------------------------------------
    def _attach(self, model: nn.Module) -> None:
        if self._model is model:
            return
        self.detach()
        seen: dict[int, TernaryState] = {}
        for name, sub in model.named_modules():
            if isinstance(sub, TernaryState) and id(sub) not in seen and not sub.frozen:  # frozen: no votes to sum
                seen[id(sub)] = sub
                if sub.rows > _MAX_INT32:
                    raise ValueError(f"{name} has {sub.rows} rows; row ids travel as int32 (at most 2**31 - 1)")
                (self._sparse if sub.sparse_updates else self._dense).append((name, sub))
        for sub in model.modules():
            if isinstance(sub, TernaryVQCodebook):
                if sub.tracking_sync is not None and sub.tracking_sync is not self:
                    raise ValueError("a TernaryVQCodebook of this model is already attached to another VoteSync")
                sub.tracking_sync = self
                self._vqs.append(sub)
            elif isinstance(sub, MoEGraph):
                self._moes.append(sub)
            elif isinstance(sub, TernaryEmbeddingTable) and sub.weight.sparse_updates and self.rank != 0:
                self._hooks.append(sub.register_forward_pre_hook(self._prepare_rows, with_kwargs=True))
        self._floats = float_parameters(model)
        self._model = model

    def detach(self) -> None:
        """Remove the hooks this sync installed on its model (a later step re-attaches)."""
        for h in self._hooks:
            h.remove()
        for vq in self._vqs:
            if vq.tracking_sync is self:
                vq.tracking_sync = None
        self._hooks, self._vqs, self._moes, self._dense, self._sparse, self._floats = [], [], [], [], [], []
        self._model = None
        self._prepared = {}
        self._in_step = False

    def _prepare_rows(self, table: TernaryEmbeddingTable, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (ranks ≥ 1): zero the accumulators of rows this step gathers for the
        first time, keeping their values, so that after backward they hold this rank's votes."""
        if not (self._in_step and torch.is_grad_enabled()):
            return None
        ids = args[0] if args else kwargs["ids"]
        rows = torch.unique(table.check_ids(ids))
        state = table.weight
        prep = self._prepared.setdefault(id(state), _Prepared())
        if prep.rows:
            rows = rows[~torch.isin(rows, torch.cat(prep.rows))]
        if rows.numel():
            prep.rows.append(rows)
            prep.T.append(state.T_accum.index_select(0, rows))
            prep.E.append(state.E_accum.index_select(0, rows))
            state.T_accum.index_fill_(0, rows, 0)
            state.E_accum.index_fill_(0, rows, 0)
        return None

    # ------------------------------------------------------------------------------------------
    # VQ tracking (called by TernaryVQCodebook._track inside training forwards)
    # ------------------------------------------------------------------------------------------
    def merge_assignments(self, vq: TernaryVQCodebook, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """All ranks' assigned codes of this call: (unique ids, counts, calls = world).

        Shapes: ids (n,) int64, the same n on every rank -> (u,) int64, (u,) int64.
        """
        wire = torch.int32 if vq.num_codes <= _MAX_INT32 else torch.int64
        local = ids.reshape(-1).to(wire)
        gathered = self._all_gather("VQ assignment all-gather", local)
        self._stats.vq_bytes += local.numel() * local.element_size()
        unique, counts = torch.unique(gathered.reshape(-1).to(ids.device, torch.int64), return_counts=True)
        return unique, counts, self.world_size

    def reseed_inputs(self, vq: TernaryVQCodebook, z2d: torch.Tensor, dist_: torch.Tensor):
        """Every rank's re-seed candidates (``reseed_candidates`` order), enough of them for the
        dead codes, in rank order.

        Shapes: z2d (n, dim), dist_ (n,) -> (world·k, dim) float32, (world·k,) float32.
        """
        dead = int((~vq.used_in_window).sum())  # identical on every rank: the window is merged
        k = min(dead, z2d.shape[0])
        rows = reseed_candidates(dist_, vq.reseed_from, vq.schedule_step)[:k]
        payload = torch.cat([z2d.index_select(0, rows).to(torch.float32),
                             dist_.index_select(0, rows).to(torch.float32)[:, None]], dim=1)
        gathered = self._all_gather("VQ re-seed all-gather", payload).reshape(-1, z2d.shape[1] + 1)
        self._stats.vq_bytes += payload.numel() * payload.element_size()
        gathered = gathered.to(z2d.device)
        return gathered[:, :-1], gathered[:, -1]

    def codes_reseeded(self, vq: TernaryVQCodebook, targets: torch.Tensor) -> None:
        """Re-seeded codes start from zero accumulators: so must the values kept for them."""
        prep = self._prepared.get(id(vq.codes.weight))
        if prep is None or targets.numel() == 0:
            return
        for rows, T, E in zip(prep.rows, prep.T, prep.E):
            hit = torch.isin(rows, targets)
            T[hit] = 0
            E[hit] = 0

    # ------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------
    def begin_step(self, model: nn.Module) -> None:
        """Call before the step's first forward: ranks ≥ 1 start their dense votes from zero."""
        if self._in_step:
            raise RuntimeError("VoteSync.begin_step called twice without all_reduce: a step was abandoned "
                               "half way, and ranks >= 1 no longer hold the model's accumulators")
        self._attach(model)
        self._stats = ExchangeStats()
        self._prepared = {}
        if self.rank != 0:
            for _, state in self._dense:
                state.T_accum.zero_()
                state.E_accum.zero_()
        self._in_step = True

    @torch.no_grad()
    def all_reduce(self, model: nn.Module, opt=None) -> ExchangeStats:
        """Call after the step's last backward, before ``opt.step()``: afterwards every rank holds
        identical accumulators, touched rows, pending graph votes and float gradients."""
        if not self._in_step:
            raise RuntimeError("VoteSync.all_reduce called without begin_step")
        if model is not self._model:
            raise ValueError("VoteSync.all_reduce got a different model than begin_step")
        if opt is not None:
            known = {id(s) for _, s in self._dense + self._sparse}
            missing = [i for i, s in enumerate(getattr(opt, "states", [])) if id(s) not in known]
            if missing:
                raise ValueError(f"the optimizer trains TernaryStates that are not in the model (indices {missing})")
        self._sync_float_grads()
        self._sync_dense()
        self._sync_variable()
        self._in_step = False
        self._prepared = {}
        self.last_stats = self._stats
        return self.last_stats

    def _sync_float_grads(self) -> None:
        params = self._floats
        if not params:
            return
        flags = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.comm_device)
        self._all_reduce("gradient-flag all-reduce", flags)
        self._stats.control_bytes += flags.numel() * flags.element_size()
        active = [p for p, f in zip(params, flags.tolist()) if f]
        for p in active:
            if p.grad is None:  # another rank has a gradient: this rank's share is zero
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list] = {}
        for p in active:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for dtype, grads in by_dtype.items():
            for bucket in _buckets(grads, self.bucket_bytes // torch.empty((), dtype=dtype).element_size()):
                flat = torch.cat([g.reshape(-1)[a:b] for g, a, b in bucket]).to(self.comm_device)
                self._all_reduce("gradient all-reduce", flat)
                flat.div_(self.world_size)
                self._stats.float_bytes += flat.numel() * flat.element_size()
                _scatter_back(bucket, flat)

    def _sync_dense(self) -> None:
        tensors = [t for _, s in self._dense for t in (s.T_accum, s.E_accum)]
        if not tensors:
            return
        wire = self.wire_dtype
        for bucket in _buckets(tensors, self.bucket_bytes // torch.empty((), dtype=wire).element_size()):
            flat = torch.cat([t.reshape(-1)[a:b] for t, a, b in bucket]).to(self.comm_device, wire)
            self._all_reduce("dense vote all-reduce", flat)
            self._stats.dense_bytes += flat.numel() * flat.element_size()
            self._stats.dense_elements += flat.numel()
            # exact integers (see FP16_EXACT_WORLD); saturate back to the int8 range
            _scatter_back(bucket, flat.to(torch.int32).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8))

    def _sync_variable(self) -> None:
        """Sparse touched rows and MoEGraph pending votes/loads: a header all-gather, then one
        padded byte all-gather of every rank's rows and pairs."""
        rows_local = []
        for name, state in self._sparse:
            rows = state.take_touched_rows()
            if self.rank and rows.numel():
                self._check_prepared(name, state, rows)
            rows_local.append(rows)
        pending = [moe.take_pending() for moe in self._moes]
        loads = [load.to(self.comm_device) if load is not None else
                 torch.zeros(moe.num_experts, dtype=torch.int64, device=self.comm_device)
                 for moe, (*_, load) in zip(self._moes, pending)]
        header = torch.cat([torch.tensor([r.numel() for r in rows_local] + [p[0].numel() for p in pending]
                                         + [p[3] is not None for p in pending], dtype=torch.int64,
                                         device=self.comm_device), *loads])
        headers = self._all_gather("header all-gather", header).cpu()
        self._stats.control_bytes += header.numel() * header.element_size()
        n_s, n_m = len(self._sparse), len(self._moes)
        cols = [state.cols for _, state in self._sparse]

        def layout(h: torch.Tensor) -> tuple[int, int]:
            """(int32 elements, int8 elements) of a rank's payload with header h."""
            sizes = h[:n_s].tolist()
            pairs = h[n_s:n_s + n_m].tolist()
            return sum(sizes) + 3 * sum(pairs), sum(n * (c + 1) for n, c in zip(sizes, cols))

        layouts = [layout(headers[r]) for r in range(self.world_size)]
        lengths = [4 * a + b for a, b in layouts]
        max_len = max(lengths)
        i32_parts = [r.to(torch.int32) for r in rows_local]
        for code, expert, votes, _ in pending:
            i32_parts += [code.to(torch.int32), expert.to(torch.int32), votes.to(torch.int32)]
        i8_parts = [t for (_, s), r in zip(self._sparse, rows_local)
                    for t in (s.T_accum.index_select(0, r).reshape(-1), s.E_accum.index_select(0, r))]
        own_sparse_rows = sum(r.numel() for r in rows_local)
        own_pairs = sum(p[0].numel() for p in pending)
        self._stats.sparse_rows += own_sparse_rows
        self._stats.sparse_bytes += sum(r.numel() * (4 + c + 1) for r, c in zip(rows_local, cols))
        self._stats.graph_pairs += own_pairs
        self._stats.graph_bytes += 12 * own_pairs
        empty = (torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int8))
        blocks = [empty] * self.world_size
        if max_len:
            buf = torch.zeros(max_len, dtype=torch.uint8, device=self.comm_device)
            parts = [p.to(self.comm_device).contiguous().view(torch.uint8) for p in i32_parts + i8_parts if p.numel()]
            if parts:
                own = torch.cat(parts)
                buf[:own.numel()] = own
            gathered = self._all_gather("sparse-row and graph-vote all-gather", buf)
            self._stats.gather_bytes += max_len
            # clone: a view as int32 needs its own, aligned storage
            blocks = [(gathered[r, :4 * a].clone().view(torch.int32),
                       gathered[r, 4 * a:4 * a + b].clone().view(torch.int8)) for r, (a, b) in enumerate(layouts)]
        sparse_in: list[list] = [[] for _ in self._sparse]  # [table][rank] -> (ids, T, E)
        graph_in: list[list] = [[] for _ in self._moes]  # [moe][rank] -> (3, n) int32
        for r, (i32, i8) in enumerate(blocks):
            sizes = headers[r, :n_s].tolist()
            pairs = headers[r, n_s:n_s + n_m].tolist()
            o32 = o8 = 0
            for i, (n, c) in enumerate(zip(sizes, cols)):  # the order the parts were packed in
                T, E = i8[o8:o8 + n * c].reshape(n, c), i8[o8 + n * c:o8 + n * (c + 1)]
                sparse_in[i].append((i32[o32:o32 + n], T, E))
                o32 += n
                o8 += n * (c + 1)
            for j, n in enumerate(pairs):
                graph_in[j].append(i32[o32:o32 + 3 * n].reshape(3, n))
                o32 += 3 * n
        for (name, state), per_rank in zip(self._sparse, sparse_in):
            self._merge_sparse(name, state, per_rank)
        for j, moe in enumerate(self._moes):
            device = moe.load_bias.device
            triples = torch.cat(graph_in[j], dim=1).to(device)
            present = headers[:, n_s + n_m + j] > 0
            offset = n_s + 2 * n_m + sum(m.num_experts for m in self._moes[:j])
            load = headers[:, offset:offset + moe.num_experts].sum(dim=0).to(device) if bool(present.any()) else None
            moe.add_pending(triples[0], triples[1], triples[2], load)

    def _check_prepared(self, name: str, state: TernaryState, rows: torch.Tensor) -> None:
        prep = self._prepared.get(id(state))
        known = torch.cat(prep.rows) if prep is not None and prep.rows else rows.new_zeros(0)
        stray = rows[~torch.isin(rows, known)]
        if stray.numel():
            raise RuntimeError(
                f"{name}: {stray.numel()} row(s) received votes without passing through "
                f"TernaryEmbeddingTable.forward in this step (e.g. row {int(stray[0])}); VoteSync cannot "
                f"separate their votes from the accumulator")

    def _merge_sparse(self, name: str, state: TernaryState, per_rank: list) -> None:
        """Sum every rank's votes into the union of touched rows, identically on every rank.

        Row r of the union starts from rank 0's value if rank 0 sent it (its accumulator), else
        from the value every rank had before the step; ranks ≥ 1 add their votes.
        """
        device = state.T_accum.device
        ids = [p[0].to(device, torch.int64) for p in per_rank]
        union = torch.unique(torch.cat(ids)) if ids else torch.zeros(0, dtype=torch.int64, device=device)
        prep = self._prepared.get(id(state))
        kept = prep.cat() if prep is not None else None
        self._stats.rows[name] = int(ids[self.rank].numel())
        self._stats.union[name] = int(union.numel())
        self._stats.union_rows += int(union.numel())
        if union.numel():
            T = state.T_accum.index_select(0, union).to(torch.int32)
            E = state.E_accum.index_select(0, union).to(torch.int32)
            if kept is not None:  # this rank zeroed these rows: their old value is the base
                k_rows, k_T, k_E = kept
                order = torch.argsort(k_rows)
                k_sorted = k_rows[order]
                pos = torch.searchsorted(k_sorted, union).clamp_(max=max(0, k_sorted.numel() - 1))
                hit = k_sorted[pos] == union
                T[hit] = k_T[order[pos[hit]]].to(torch.int32)
                E[hit] = k_E[order[pos[hit]]].to(torch.int32)
            p0 = torch.searchsorted(union, ids[0])
            T[p0] = per_rank[0][1].to(device, torch.int32)
            E[p0] = per_rank[0][2].to(device, torch.int32)
            for r in range(1, self.world_size):
                pr = torch.searchsorted(union, ids[r])
                T.index_add_(0, pr, per_rank[r][1].to(device, torch.int32))
                E.index_add_(0, pr, per_rank[r][2].to(device, torch.int32))
            state.T_accum.index_copy_(0, union, T.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8))
            state.E_accum.index_copy_(0, union, E.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8))
        if kept is not None:  # rows this rank zeroed that nobody voted on get their value back
            k_rows, k_T, k_E = kept
            back = ~torch.isin(k_rows, union)
            state.T_accum.index_copy_(0, k_rows[back], k_T[back])
            state.E_accum.index_copy_(0, k_rows[back], k_E[back])
        state.mark_touched_rows(union)


def _buckets(tensors: list[torch.Tensor], cap: int) -> list[list[tuple[torch.Tensor, int, int]]]:
    """Split the flattened tensors into buckets of at most ``cap`` elements: (tensor, start, stop)."""
    out: list[list[tuple[torch.Tensor, int, int]]] = [[]]
    used = 0
    for t in tensors:
        n, start = t.numel(), 0
        while start < n:
            take = min(n - start, cap - used)
            out[-1].append((t, start, start + take))
            used += take
            start += take
            if used == cap:
                out.append([])
                used = 0
    return [b for b in out if b]


def _scatter_back(bucket: list[tuple[torch.Tensor, int, int]], flat: torch.Tensor) -> None:
    offset = 0
    for t, a, b in bucket:
        t.view(-1)[a:b].copy_(flat[offset:offset + b - a].to(t.device, t.dtype))
        offset += b - a


# ----------------------------------------------------------------------------------------------
# process group
# ----------------------------------------------------------------------------------------------
def init_distributed(backend: str = "auto", *, device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S,
                     bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> tuple[VoteSync, str]:
    """Join the process group that torchrun describes and return (VoteSync, this rank's device).

    Reads (never writes) ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``. ``backend='auto'`` takes NCCL for a CUDA ``device`` and gloo otherwise;
    ``device='cuda'`` becomes ``cuda:LOCAL_RANK``, which is made the current CUDA device.
    ``timeout_s`` bounds every collective: a rank whose peer hangs stops after it (a peer
    that dies is noticed at once by gloo, and by NCCL's watchdog after the timeout).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"--distributed needs the environment torchrun sets (missing {', '.join(missing)}); "
                         f"launch with: torchrun --nproc-per-node N -m ternary_graph.train --distributed ...")
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed")
    cuda = device.startswith("cuda")
    backend = ("nccl" if cuda else "gloo") if backend == "auto" else backend
    if backend == "nccl" and not cuda:
        raise ValueError(f"the nccl backend needs a CUDA device, got device={device!r}; use --backend gloo")
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if cuda:
        if device == "cuda":
            device = f"cuda:{local_rank}"
        elif world > 1 and torch.device(device).index != local_rank:
            raise ValueError(f"with several ranks pass --device cuda (each rank takes cuda:LOCAL_RANK), got {device!r}")
        torch.cuda.set_device(device)
    kwargs = {"device_id": torch.device(device)} if backend == "nccl" else {}
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    except RuntimeError as exc:
        raise DistributedError(f"could not join the process group ({backend}, rank {os.environ['RANK']} of "
                               f"{world}) within {timeout_s:g} s: {exc}") from exc
    return VoteSync(bucket_bytes=bucket_bytes, timeout_s=timeout_s, local_rank=local_rank), device


def shutdown() -> None:
    """Leave the process group (after a clean run; after a failure just exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
