"""The training loop behind ``ternary-graph train``: data, model, optimizer, eval, checkpoints.

A run folder holds ``config.json`` (the resolved TrainConfig and ModelConfig, and the corpus:
resolved path and content fingerprint), ``metrics.jsonl`` (one JSON object per logged step),
``loss.png``, ``routing.png``, the checkpoints ``ckpt_XXXXXXXX.{safetensors,json}`` and
``run.lock`` (held while a run writes the folder; a second writer is refused). A run is a pure
function of its config: batches depend only on (seed, step) and every RNG state is
checkpointed, so ``--resume`` continues bit-identically; it refuses a checkpoint made with
another config or on another corpus. SIGINT and SIGTERM checkpoint, then stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import pathlib
import resource
import signal
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..config import ModelConfig, get_preset, saved_model_config
from ..graph.moegraph import MoEGraph
from ..graph.routing import INACTIVE_SRC, code_expert_mutual_information
from ..models.model import build_model
from ..precision import DTYPE_CHOICES, resolve_dtype
from ..ternary.optimizer import TernaryOptimizer, UpdateRule
from ..ternary.state import float_parameters
from .capture import CapturedTrainStep
from .checkpoint import (CheckpointError, atomic_write_text, capture_rng_state, latest_checkpoint, load_checkpoint,
                         load_state_dict_strict, restore_rng_state, run_dir_lock, save_checkpoint)
from .device import resolve_device
from ..viz.plots import plot_loss_curves, plot_routing_graph
from ..kg.task import KGTrainConfig, entity_code_map, kg_composite_loss, load_kg
from .data import (ByteDataset, collect_text_files, corpus_fingerprint, default_cache_dir, prepare_corpus,
                   stdlib_source_files, unigram_bits_per_byte)

logger = logging.getLogger(__name__)
NATS_TO_BITS = 1.0 / math.log(2.0)
MAX_PACKED_BYTE = 242  # 3**5 - 1: five trits per byte, base 3
# Fields a --resume may change: they decide where and how long the run goes, not what it
# computes (dtype: a checkpoint holds no float activations and loads at either precision;
# data: the corpus is compared by its content fingerprint instead, so a moved corpus resumes).
RESUMABLE_FIELDS = frozenset({"steps", "device", "dtype", "out", "threads", "data", "cuda_graph"})
# What a checkpoint made before a TrainConfig field existed ran with (not the field's default now).
FIELDS_BEFORE_THEY_EXISTED = {"threshold_ramp_from": 0.0, "routing": "graph"}


@dataclass
class TrainConfig:
    """Everything that defines a training run (the model shape comes from ``preset``)."""

    preset: str = "tiny"  # model preset (see ternary_graph.config.PRESETS)
    weights: str = "ternary"  # "ternary" (int8 votes) or "float" (same architecture, AdamW baseline)
    steps: int = 1500  # optimizer steps
    batch_size: int = 16  # sequences per step
    seq_len: int = 128  # bytes per sequence
    lr: float = 2e-3  # AdamW learning rate of float parameters (cosine decay, 5% warm-up)
    weight_decay: float = 0.1  # AdamW weight decay of float parameters
    threshold: int = 24  # θ at step 0: |T_accum| that makes a trit step
    threshold_final: int | None = 48  # θ at the end of the ramp (None: constant θ)
    threshold_ramp_from: float = 0.0  # fraction of the run after which θ starts its ramp (0: the whole run)
    routing: str = "graph"  # MoEGraph's router: one of config.ROUTINGS (the others are ablation baselines)
    scale_threshold: int = 64  # |E_accum| that makes a row scale step (0 freezes scales)
    decay_shift: int | None = 4  # accumulators shrink by |acc| >> decay_shift each update
    vote_magnitude: int = 4  # votes cast per backward pass, ±vote_magnitude
    flip_prob: float = 1.0  # probability that a trit at threshold steps
    eval_every: int = 250  # steps between validation passes (and at the end)
    eval_windows: int = 256  # validation windows of seq_len bytes per pass (0: all)
    checkpoint_every: int = 500  # steps between checkpoints (and at the end)
    keep_last: int = 3  # checkpoints kept
    log_every: int = 10  # steps between metrics.jsonl lines
    device: str = "auto"  # "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # activation precision (ternary_graph.precision): "auto" (bf16 on CUDA, fp32 on CPU), "bf16", "fp32"
    seed: int = 0  # model init, data order and optimizer coins
    data: str | None = None  # text file or folder; None: the Python standard library sources
    val_fraction: float = 0.05  # share of files held out for validation
    out: str = "runs/tiny"  # run folder
    threads: int = 0  # torch CPU threads (0: torch's default)
    micro_batches: int = 1  # split each batch into this many backward passes (votes cast per micro batch)
    cuda_graph: bool = False  # replay the training step as a CUDA graph (train/capture.py; ternary, CUDA only)
    task: str = "lm"  # "lm", or "lm+kg": add the composite head's KG link-prediction loss every step
    kg_weight: float = 0.1  # lm+kg: weight of the KG loss
    kg_batch: int = 16  # lm+kg: training triples per step (head names encoded through the LM)
    kg_negatives: int = 64  # lm+kg: sampled negative entities per triple
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields to change

    def __post_init__(self) -> None:
        if self.weights not in ("ternary", "float"):
            raise ValueError(f"weights must be 'ternary' or 'float', got {self.weights!r}")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "checkpoint_every", "keep_last", "log_every",
                     "micro_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("eval_windows", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.task not in ("lm", "lm+kg"):
            raise ValueError(f"task must be 'lm' or 'lm+kg' (use train_kg for 'kg'), got {self.task!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if not 0.0 <= self.threshold_ramp_from < 1.0:
            raise ValueError(f"threshold_ramp_from must lie in [0, 1), got {self.threshold_ramp_from!r}")
        self.model_config()  # checks seq_len against the preset now, not after the corpus is prepared
        if self.weights == "ternary":
            self.update_rule()  # rule parameters out of range fail here, before the corpus is prepared

    def model_config(self) -> ModelConfig:
        """The preset with ``model_overrides``; ``seq_len`` must fit its ``max_seq_len`` (the
        rotary table's length): a longer one is refused rather than silently growing the model,
        which also bounds ``seq_len`` (100,000 would build a huge table and stall)."""
        cfg = get_preset(self.preset).replace(routing=self.routing)
        cfg = cfg.replace(**self.model_overrides) if self.model_overrides else cfg
        if self.seq_len > cfg.max_seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds max_seq_len {cfg.max_seq_len} of preset "
                             f"{self.preset!r}; use a seq_len of at most {cfg.max_seq_len}")
        return cfg

    def update_rule(self) -> UpdateRule:
        ramp = self.threshold_final is not None
        return UpdateRule(threshold=self.threshold, threshold_final=self.threshold_final,
                          threshold_ramp_steps=self.steps if ramp else 0,
                          threshold_ramp_start=int(self.threshold_ramp_from * self.steps) if ramp else 0,
                          scale_threshold=self.scale_threshold, decay_shift=self.decay_shift,
                          flip_prob=self.flip_prob, vote_magnitude=self.vote_magnitude)


@dataclass
class RunSummary:
    steps: int
    final_train_loss: float
    val_loss_nats: float
    val_bits_per_byte: float
    unigram_bits_per_byte: float
    tokens_per_second: float
    seconds: float
    run_dir: str
    interrupted: bool
    device: str = "cpu"  # the resolved device the run used
    dtype: str = "fp32"  # the activation dtype the run used ("fp32" or "bf16")
    stop_signal: int = 0  # the signal that interrupted the run (SIGINT or SIGTERM), 0 if none


def resolve_data_path(data: str | None) -> str | None:
    """``--data`` as an absolute path, so that a later ``--resume`` or ``eval`` started from
    another working directory reads the same corpus (None: the stdlib sources)."""
    return None if data is None else str(pathlib.Path(data).expanduser().resolve())


def prepare_data(cfg: TrainConfig) -> tuple[ByteDataset, ByteDataset, dict]:
    """Train and validation bytes of ``cfg.data``, and a dict of the corpus: the counts of
    :class:`~ternary_graph.train.data.CorpusStats`, ``data`` (the resolved path, None for the
    stdlib) and ``fingerprint`` (hash of the content, see ``corpus_fingerprint``)."""
    data = resolve_data_path(cfg.data)
    files = stdlib_source_files() if data is None else collect_text_files(data)
    cache = default_cache_dir(corpus_fingerprint(files, cfg.val_fraction))
    corpus = prepare_corpus(files, cache, cfg.val_fraction)
    info = {**dataclasses.asdict(corpus.stats), "data": data, "fingerprint": corpus.fingerprint}
    return ByteDataset(corpus.train_path), ByteDataset(corpus.val_path), info


def corpus_mismatch(meta: dict, corpus: dict) -> str | None:
    """Why the corpus ``corpus`` (from :func:`prepare_data`) is not the one a checkpoint's
    ``meta`` was trained on, or None when the fingerprints agree. A checkpoint written before
    fingerprints were stored cannot be checked: that is reported too."""
    saved = meta.get("corpus")
    if saved is None:
        return "the checkpoint predates corpus fingerprints, so its corpus cannot be checked"
    if saved["fingerprint"] == corpus["fingerprint"]:
        return None
    return (f"the corpus differs from the one the checkpoint was trained on: saved data {saved['data']!r} "
            f"(fingerprint {saved['fingerprint'][:12]}), now data {corpus['data']!r} "
            f"(fingerprint {corpus['fingerprint'][:12]})")


def cosine_lr(step: int, total: int, base: float) -> float:
    warmup = max(1, total // 20)
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> TernaryOptimizer:
    """Votes for the ternary state, AdamW (lr ``cfg.lr``) for float parameters if the model has any."""
    floats = float_parameters(model)
    # fused: one kernel for all parameters on the GPU (None: torch's default elsewhere)
    fused = True if floats and floats[0].is_cuda else None
    float_opt = torch.optim.AdamW(floats, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95),
                                  fused=fused) if floats else None
    return TernaryOptimizer(model, cfg.update_rule(), float_optimizer=float_opt, seed=cfg.seed)


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: ByteDataset, cfg: TrainConfig, routing: dict | None = None) -> float:
    """Mean validation cross-entropy in nats per byte over ``eval_windows`` windows.

    ``routing``: a dict to fill with each MoE layer's routing over the same windows (code ->
    expert mutual information in bits, largest and smallest expert share of the routed pairs).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    max_windows = cfg.eval_windows if cfg.eval_windows > 0 else None
    layers = model.moe_layers() if routing is not None and hasattr(model, "moe_layers") else []
    pairs: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layers]
    for x, y in val.validation_batches(cfg.batch_size, cfg.seq_len, max_windows):
        out = model(x.to(cfg.device), y.to(cfg.device))
        total += float(out.lm_loss) * y.numel()
        count += y.numel()
        for seen, moe in zip(pairs, layers):
            seen.append((moe.last_routing.code, moe.last_routing.expert))
    model.train(was_training)
    for i, (seen, moe) in enumerate(zip(pairs, layers)):
        code, expert = torch.cat([c for c, _ in seen]), torch.cat([e for _, e in seen])
        load = torch.bincount(expert, minlength=moe.num_experts).double()
        routing[f"layer{i}"] = {"code_expert_mi_bits": code_expert_mutual_information(code, expert, moe.num_experts),
                                "load_max_share": float(load.max() / load.sum()),
                                "load_min_share": float(load.min() / load.sum())}
    return total / max(1, count)


def _optimizer_tensors(opt: TernaryOptimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split the optimizer state into tensors (for safetensors) and JSON-safe metadata."""
    state = opt.state_dict()
    tensors = {"optim.generator": state["generator"]}
    meta = {"step_count": state["step_count"], "rule": state["rule"]}
    if "float_optimizer" in state:
        fo = state["float_optimizer"]
        meta["float_param_groups"] = fo["param_groups"]
        meta["float_state_keys"] = {}
        for pid, pstate in fo["state"].items():
            meta["float_state_keys"][str(pid)] = sorted(pstate)
            for key, value in pstate.items():
                tensors[f"optim.float.{pid}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, meta


def _load_optimizer(opt: TernaryOptimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state = {"step_count": meta["step_count"], "rule": meta["rule"], "generator": tensors["optim.generator"]}
    if "float_param_groups" in meta:
        fstate = {int(pid): {key: tensors[f"optim.float.{pid}.{key}"] for key in keys}
                  for pid, keys in meta["float_state_keys"].items()}
        state["float_optimizer"] = {"state": fstate, "param_groups": meta["float_param_groups"]}
    opt.load_state_dict(state)


def save_run_checkpoint(run_dir: pathlib.Path, step: int, model, opt, cfg: TrainConfig, keep_last: int,
                        corpus: dict | None = None) -> pathlib.Path:
    """Model, optimizer and RNG state of ``step``; ``corpus`` (from :func:`prepare_data`) stores
    the data path and fingerprint that ``--resume`` and ``eval`` check."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    tensors.update(opt_tensors)
    tensors.update({f"rng.{k}": v for k, v in capture_rng_state().items()})
    meta = {"train_config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(cfg.model_config()),
            "optimizer": opt_meta, "data_position": {"next_step": step, "seed": cfg.seed}}
    if corpus is not None:
        meta["corpus"] = {"data": corpus["data"], "fingerprint": corpus["fingerprint"]}
    return save_checkpoint(run_dir, step, tensors, meta, keep_last=keep_last)


def _model_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def _check_range(where: str, name: str, t: torch.Tensor, low: int, high: int, allowed: int | None = None) -> None:
    """Every element of ``t`` in ``[low, high)`` (or equal to ``allowed``)."""
    bad = (t < low) | (t >= high)
    if allowed is not None:
        bad &= t != allowed
    if bool(bad.any()):
        value = int(t[bad][0])
        raise CheckpointError(f"{where}: tensor {name!r} holds {value}, outside [0, {high}): "
                              f"the checkpoint was altered or is not of this model")


def check_checkpoint_values(model: torch.nn.Module, state: dict[str, torch.Tensor], meta: dict, where: str) -> None:
    """Values a checkpoint must hold, beyond the names, dtypes, shapes and sha256 that
    ``load_checkpoint`` and ``load_state_dict_strict`` verify (a file edited and re-hashed
    passes those): packed bytes at most 242, MoEGraph edges between existing codes and
    experts, and a data position ``next_step >= 0``. Raises CheckpointError naming ``where``."""
    position = meta.get("data_position")
    next_step = position.get("next_step") if isinstance(position, dict) else None
    if isinstance(next_step, bool) or not isinstance(next_step, int) or next_step < 0:
        raise CheckpointError(f"{where}: data_position.next_step must be an int >= 0, got {next_step!r}")
    for name, t in state.items():
        if name.endswith(".packed") and t.dtype == torch.uint8 and t.numel() and int(t.max()) > MAX_PACKED_BYTE:
            raise CheckpointError(f"{where}: tensor {name!r} holds byte {int(t.max())}, above {MAX_PACKED_BYTE} "
                                  f"(five trits per byte): the checkpoint was altered")
    for prefix, module in model.named_modules():
        if not isinstance(module, MoEGraph):
            continue
        codes, experts = module.codebook_size, module.num_experts
        edges = state.get(f"{prefix}.edge_index")
        if edges is not None and edges.dim() == 2 and edges.shape[0] == 2:
            _check_range(where, f"{prefix}.edge_index", edges[0], 0, codes)
            _check_range(where, f"{prefix}.edge_index", edges[1], 0, experts)
        src, dst = state.get(f"{prefix}.active_edge_src"), state.get(f"{prefix}.active_edge_dst")
        if src is not None and dst is not None:
            _check_range(where, f"{prefix}.active_edge_src", src, 0, codes, allowed=INACTIVE_SRC)
            _check_range(where, f"{prefix}.active_edge_dst", dst, 0, experts)


def load_model_from_checkpoint(path: str | pathlib.Path, device: str = "cpu", dtype: str = "auto"):
    """Model, TrainConfig and checkpoint meta (and the raw tensors) from a checkpoint file or
    run folder. ``device`` may be "auto"; ``dtype`` is the activation precision
    (``ternary_graph.precision``). The returned config carries the resolved device and dtype."""
    tensors, meta = load_checkpoint(path)
    device = resolve_device(device)
    cfg = dataclasses.replace(saved_train_config(meta), device=device, dtype=dtype)
    model = build_model(saved_model_config(meta["model_config"]), weights=cfg.weights, device=device, seed=cfg.seed,
                        compute_dtype=resolve_dtype(dtype, device))
    state = _model_state(tensors)
    check_checkpoint_values(model, state, meta, str(path))
    load_state_dict_strict(model, state)
    return model, cfg, meta, tensors


def rewrite_metrics(path: pathlib.Path, next_step: int) -> None:
    """Keep the lines of ``metrics.jsonl`` up to ``next_step`` (a resumed run redoes the later
    ones). A torn last line (the run was killed while writing it) is dropped with a warning;
    a bad line elsewhere is an error naming the file and line. The file is replaced atomically:
    a kill during the rewrite leaves the old history, never an emptied file."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                logger.warning("%s: dropping the torn last line %d (%.40r): a run stopped while writing it",
                               path, number, line)
                continue
            raise ValueError(f"{path}: line {number} is not JSON ({exc.msg}); repair or delete that line") from None
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"{path}: line {number} has no integer 'step'; repair or delete that line")
        if step <= next_step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _append_jsonl(path: pathlib.Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def kg_loss_term(cfg: TrainConfig, model_cfg: ModelConfig):
    """The ``--task lm+kg`` term: ``(model, step) -> kg_weight · composite KG loss`` on a batch of
    training triples of the stdlib KG drawn from a generator seeded by the step (so that it is
    resumable). Entities map to KG codes by hashing their names (kg/task.py, entity_code_map)."""
    kg = load_kg(KGTrainConfig())
    triples = kg.split().train.long()
    entity_code = entity_code_map(kg, model_cfg.kg_codebook_size)

    def term(model, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        batch = triples[torch.randint(0, triples.shape[0], (cfg.kg_batch,), generator=gen)]
        loss = kg_composite_loss(model, kg, batch, entity_code, cfg.kg_negatives, gen)
        return cfg.kg_weight * loss

    return term


def train_step(model, opt: TernaryOptimizer, x: torch.Tensor, y: torch.Tensor, micro_batches: int = 1,
               vote_sync=None, extra_loss=None):
    """One optimizer step over the batch (x, y), split into ``micro_batches`` equal parts.

    Each micro batch's backward casts its own votes (and accumulates float gradients, scaled so
    that they average). ``vote_sync`` (data parallel, see ``train/distributed.py``) is told
    when the step's votes start and when they are complete, so that it can all-reduce them
    before the update. ``extra_loss(model) -> Tensor``, if given, is one more backward in the
    same step (the KG term of ``--task lm+kg``). Returns the last micro batch's output, the
    optimizer's StepStats and the extra loss's value (nan without one).
    """
    if x.shape[0] % micro_batches:
        raise ValueError(f"batch of {x.shape[0]} sequences does not split into micro_batches={micro_batches}")
    if vote_sync is not None:
        vote_sync.begin_step(model)
    for xm, ym in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        out = model(xm, ym)
        (out.loss / micro_batches).backward()
    extra_value = float("nan")
    if extra_loss is not None:
        extra = extra_loss(model)
        extra.backward()
        extra_value = float(extra.detach())
    if vote_sync is not None:
        vote_sync.all_reduce(model, opt)
    stats = opt.step()
    opt.zero_grad()
    model.update_graph()
    return out, stats, extra_value


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, vote_sync=None) -> RunSummary:
    """Run (or resume) a training run; returns its summary. SIGINT or SIGTERM checkpoints, then stops.

    ``cfg.device`` ("auto" allowed) and ``cfg.data`` are resolved first and stored resolved. The
    run folder ``cfg.out`` is locked for the whole run (rank 0 only): a second writer is refused.
    """
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device), data=resolve_data_path(cfg.data))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Data parallel (train/distributed.py): every rank samples the global batch and takes its
    # chunk, running micro_batches / world backward passes; only rank 0 writes the run folder.
    rank, world = (0, 1) if vote_sync is None else (vote_sync.rank, vote_sync.world_size)
    if world > 1 and (cfg.micro_batches % world or cfg.batch_size % cfg.micro_batches):
        raise ValueError(f"micro_batches={cfg.micro_batches} must be a multiple of the {world} ranks (each runs "
                         f"micro_batches / world backward passes per step) and divide batch_size={cfg.batch_size}")
    if vote_sync is not None:
        vote_sync.check_same("config", json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                                                   if k not in ("device", "threads")}, sort_keys=True, default=str))
    run_dir = pathlib.Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"out {cfg.out!r} is a file, not a folder; pass a folder for the run")
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_dir_lock(run_dir) if rank == 0 else contextlib.nullcontext():
        return _train_locked(cfg, run_dir, resume=resume, progress=progress, vote_sync=vote_sync)


def saved_train_config(meta: dict) -> TrainConfig:
    """The TrainConfig a checkpoint's metadata records; fields it predates take the value they
    had then (FIELDS_BEFORE_THEY_EXISTED), so an older run resumes with its own rule."""
    return TrainConfig(**{**FIELDS_BEFORE_THEY_EXISTED, **meta["train_config"]})


def config_differences(saved: TrainConfig, cfg: TrainConfig) -> list[str]:
    """``"name (saved X, now Y)"`` for every field outside RESUMABLE_FIELDS where the configs differ."""
    return [f"{f.name} (saved {getattr(saved, f.name)!r}, now {getattr(cfg, f.name)!r})"
            for f in dataclasses.fields(TrainConfig)
            if f.name not in RESUMABLE_FIELDS and getattr(saved, f.name) != getattr(cfg, f.name)]


def _resume_checks(cfg: TrainConfig, saved: TrainConfig, meta: dict, corpus: dict, ckpt: pathlib.Path) -> int:
    """The step a resume starts from, after refusing a checkpoint it must not continue."""
    differ = config_differences(saved, cfg)
    if "model_config" in meta:  # the model the run builds now (preset defaults may have moved since)
        saved_model, model = dataclasses.asdict(saved_model_config(meta["model_config"])), dataclasses.asdict(cfg.model_config())
        differ += [f"model {k} (saved {saved_model[k]!r}, now {model[k]!r})" for k in model if saved_model[k] != model[k]]
    if differ:
        raise ValueError(f"--resume: {ckpt} was made with a different config: {'; '.join(differ)}")
    mismatch = corpus_mismatch(meta, corpus)
    if mismatch is not None and "corpus" not in meta:
        logger.warning("--resume: %s", mismatch)  # an older run: nothing to compare with
    elif mismatch is not None:
        raise ValueError(f"--resume: {mismatch}; pass the --data it was trained on")
    start = meta["data_position"]["next_step"]
    if cfg.steps <= start:
        raise ValueError(f"--resume: steps {cfg.steps} must be above the step {start} that {ckpt} reached")
    return start


def _warn_if_lr_unused(model: torch.nn.Module, cfg: TrainConfig) -> None:
    if cfg.lr != TrainConfig.lr and not float_parameters(model):
        logger.warning("lr %g has no effect: this %s model has no float parameters (its trits move by votes, "
                       "see --threshold)", cfg.lr, cfg.weights)


def _train_locked(cfg: TrainConfig, run_dir: pathlib.Path, *, resume: bool, progress: bool, vote_sync) -> RunSummary:
    rank, world = (0, 1) if vote_sync is None else (vote_sync.rank, vote_sync.world_size)
    lead = rank == 0
    # The corpus cache is filled by rank 0 first, then by the first rank of every other node (a
    # cache not shared with node 0), then read by the rest: no two ranks write one cache at once.
    turn = 0 if lead else (1 if vote_sync.local_rank == 0 else 2)
    for phase in range(3 if vote_sync is not None else 1):
        if phase == turn:
            train_ds, val_ds, corpus = prepare_data(cfg)
        if vote_sync is not None:
            vote_sync.barrier()
    logger.info("corpus: %s", corpus)
    unigram = unigram_bits_per_byte(train_ds, val_ds)
    model_cfg = cfg.model_config()
    compute_dtype = resolve_dtype(cfg.dtype, cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, weights=cfg.weights, device=cfg.device, seed=cfg.seed, compute_dtype=compute_dtype)
    opt = build_optimizer(model, cfg)
    if lead:
        _warn_if_lr_unused(model, cfg)
    kg_term = kg_loss_term(cfg, model_cfg) if cfg.task == "lm+kg" else None
    captured = None
    if cfg.cuda_graph:
        if vote_sync is not None or kg_term is not None:
            raise ValueError("--cuda-graph captures a single-process language-model step; it cannot be combined "
                             f"with --distributed or --task {cfg.task}")
        captured = CapturedTrainStep(model, opt, functools.partial(train_step, micro_batches=cfg.micro_batches))
    metrics_path = run_dir / "metrics.jsonl"
    start = 0
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ValueError(f"--resume: no complete checkpoint in {run_dir}")
        tensors, meta = load_checkpoint(ckpt)
        start = _resume_checks(cfg, saved_train_config(meta), meta, corpus, ckpt)
        state = _model_state(tensors)
        check_checkpoint_values(model, state, meta, str(ckpt))
        load_state_dict_strict(model, state)
        _load_optimizer(opt, tensors, meta["optimizer"])
        restore_rng_state({k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")})
        if lead:
            rewrite_metrics(metrics_path, start)
    elif lead:
        metrics_path.write_text("")
    if lead:
        atomic_write_text(run_dir / "config.json", json.dumps({"train": dataclasses.asdict(cfg),
                                                               "model": dataclasses.asdict(model_cfg),
                                                               "corpus": corpus}, indent=2))
    if vote_sync is not None:
        vote_sync.check_identical(model, "at the start")

    interrupted, stop_signal = False, 0

    def _on_stop(signum, frame):
        # Schedulers send SIGTERM before they kill: it stops the run like Ctrl-C, with a checkpoint.
        nonlocal interrupted, stop_signal
        interrupted, stop_signal = True, signum

    previous_handlers = {sig: signal.signal(sig, _on_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    model.train()
    tokens_per_step = cfg.batch_size * cfg.seq_len
    t_start = time.perf_counter()
    loss_value, val_nats, tok_s = float("nan"), float("nan"), 0.0
    window_start, window_steps = time.perf_counter(), 0  # tokens/s is measured between host reads
    step = start
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress or not lead, unit="step", dynamic_ncols=True)
    try:
        while step < cfg.steps and not interrupted:
            if opt.float_optimizer is not None:
                for group in opt.float_optimizer.param_groups:
                    group["lr"] = cosine_lr(step, cfg.steps, cfg.lr)
            x, y = train_ds.sample_batch(step, cfg.batch_size, cfg.seq_len, cfg.seed)
            if world > 1:
                x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            if captured is not None:
                (out, stats), kg_loss = captured(x.to(cfg.device), y.to(cfg.device)), float("nan")
            else:
                out, stats, kg_loss = train_step(model, opt, x.to(cfg.device), y.to(cfg.device),
                                                 cfg.micro_batches // world, vote_sync,
                                                 None if kg_term is None else functools.partial(kg_term, step=step))
            if vote_sync is not None:  # a Ctrl-C seen by one rank stops every rank at the same step
                interrupted = vote_sync.agree(interrupted)
            step += 1
            window_steps += 1
            record = None
            evaluating = step % cfg.eval_every == 0 or step == cfg.steps
            if step % cfg.log_every == 0 or evaluating or interrupted:
                # The only host reads of the step: on a GPU each waits for the queued work, so
                # they happen once per log interval, never every step.
                loss_value = float(out.lm_loss.detach())
                now = time.perf_counter()
                tok_s = window_steps * tokens_per_step / (now - window_start)
                window_start, window_steps = now, 0
                bar.set_postfix(loss=f"{loss_value:.3f}", val_bpb=f"{val_nats * NATS_TO_BITS:.3f}",
                                tok_s=f"{tok_s:,.0f}")
            if step % cfg.log_every == 0 or step == cfg.steps:
                record = {"step": step, "train_loss": loss_value, "train_bits_per_byte": loss_value * NATS_TO_BITS,
                          "aux_loss": float(out.aux_loss.detach()), "tokens_per_s": tok_s, "memory_bytes": _memory_bytes(cfg.device),
                          "threshold": stats.threshold, "flip_rate": stats.flip_rate,
                          "routing": model.routing_stats()}
                if vote_sync is not None:
                    record["exchange"] = vote_sync.last_stats.as_dict()
                if kg_term is not None:
                    record["kg_loss"] = kg_loss
            if evaluating:
                val_routing: dict = {}
                val_nats = evaluate(model, val_ds, cfg, routing=val_routing)
                record = record or {"step": step, "train_loss": loss_value}
                record.update({"val_loss": val_nats, "val_bits_per_byte": val_nats * NATS_TO_BITS,
                               "val_routing": val_routing})
                if opt.states:
                    record["rule"] = opt.diagnostics()
            if record is not None and lead:
                _append_jsonl(metrics_path, record)
            if lead and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                save_run_checkpoint(run_dir, step, model, opt, cfg, cfg.keep_last, corpus)
            if evaluating or step % cfg.checkpoint_every == 0:
                window_start = time.perf_counter()  # evaluation and checkpoints are not training time
            bar.update(1)
        if interrupted and step % cfg.checkpoint_every != 0 and lead:
            path = save_run_checkpoint(run_dir, step, model, opt, cfg, cfg.keep_last, corpus)
            bar.write(f"interrupted at step {step}: checkpoint written to {path}")
    finally:
        bar.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if math.isnan(val_nats) and step > start:
        val_nats = evaluate(model, val_ds, cfg)
    if vote_sync is not None:
        vote_sync.check_identical(model, f"after step {step}")
    if lead:
        plot_loss_curves([metrics_path], run_dir / "loss.png", labels=[cfg.weights])
        plot_routing_graph(model, run_dir / "routing.png")
    if vote_sync is not None:
        vote_sync.barrier()  # the other ranks return once rank 0's files are complete
    seconds = time.perf_counter() - t_start
    return RunSummary(steps=step, final_train_loss=loss_value, val_loss_nats=val_nats,
                      val_bits_per_byte=val_nats * NATS_TO_BITS, unigram_bits_per_byte=unigram,
                      tokens_per_second=(step - start) * tokens_per_step / max(seconds, 1e-9), seconds=seconds,
                      run_dir=str(run_dir), interrupted=interrupted, device=cfg.device,
                      dtype="bf16" if compute_dtype == torch.bfloat16 else "fp32",
                      stop_signal=stop_signal or (signal.SIGINT if interrupted else 0))
