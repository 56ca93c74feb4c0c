"""The training loop behind ``ternary-graph train``: data, model, optimizer, eval, checkpoints.

A run folder holds ``config.json`` (the resolved TrainConfig and ModelConfig),
``metrics.jsonl`` (one JSON object per logged step), ``loss.png``, ``routing.png`` and the
checkpoints ``ckpt_XXXXXXXX.{safetensors,json}``. A run is a pure function of its config:
batches depend only on (seed, step) and every RNG state is checkpointed, so ``--resume``
continues bit-identically.
"""

from __future__ import annotations

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

from ..config import ModelConfig, get_preset
from ..models.model import build_model
from ..ternary.optimizer import TernaryOptimizer, UpdateRule
from ..ternary.state import float_parameters
from .checkpoint import (capture_rng_state, latest_checkpoint, load_checkpoint, load_state_dict_strict,
                         restore_rng_state, save_checkpoint)
from ..viz.plots import plot_loss_curves, plot_routing_graph
from ..kg.task import KGTrainConfig, entity_code_map, kg_composite_loss, load_kg
from .data import (ByteDataset, collect_text_files, corpus_fingerprint, default_cache_dir, prepare_corpus,
                   stdlib_source_files, unigram_bits_per_byte)

logger = logging.getLogger(__name__)
NATS_TO_BITS = 1.0 / math.log(2.0)


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
    scale_threshold: int = 64  # |E_accum| that makes a row scale step (0 freezes scales)
    decay_shift: int | None = 4  # accumulators shrink by |acc| >> decay_shift each update
    vote_magnitude: int = 4  # votes cast per backward pass, ±vote_magnitude
    flip_prob: float = 1.0  # probability that a trit at threshold steps
    eval_every: int = 250  # steps between validation passes (and at the end)
    eval_windows: int = 256  # validation windows of seq_len bytes per pass (None-like 0: all)
    checkpoint_every: int = 500  # steps between checkpoints (and at the end)
    keep_last: int = 3  # checkpoints kept
    log_every: int = 10  # steps between metrics.jsonl lines
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    seed: int = 0  # model init, data order and optimizer coins
    data: str | None = None  # text file or folder; None: the Python standard library sources
    val_fraction: float = 0.05  # share of files held out for validation
    out: str = "runs/tiny"  # run folder
    threads: int = 0  # torch CPU threads (0: torch's default)
    micro_batches: int = 1  # split each batch into this many backward passes (votes cast per micro batch)
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
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.task not in ("lm", "lm+kg"):
            raise ValueError(f"task must be 'lm' or 'lm+kg' (use train_kg for 'kg'), got {self.task!r}")

    def model_config(self) -> ModelConfig:
        cfg = get_preset(self.preset)
        cfg = cfg.replace(**self.model_overrides) if self.model_overrides else cfg
        if self.seq_len > cfg.max_seq_len:
            cfg = cfg.replace(max_seq_len=self.seq_len)
        return cfg

    def update_rule(self) -> UpdateRule:
        return UpdateRule(threshold=self.threshold, threshold_final=self.threshold_final,
                          threshold_ramp_steps=self.steps if self.threshold_final is not None else 0,
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


def prepare_data(cfg: TrainConfig) -> tuple[ByteDataset, ByteDataset, dict]:
    files = stdlib_source_files() if cfg.data is None else collect_text_files(cfg.data)
    cache = default_cache_dir(corpus_fingerprint(files, cfg.val_fraction))
    corpus = prepare_corpus(files, cache, cfg.val_fraction)
    stats = dataclasses.asdict(corpus.stats)
    return ByteDataset(corpus.train_path), ByteDataset(corpus.val_path), stats


def cosine_lr(step: int, total: int, base: float) -> float:
    warmup = max(1, total // 20)
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> TernaryOptimizer:
    floats = float_parameters(model)
    float_opt = torch.optim.AdamW(floats, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)) if floats else None
    return TernaryOptimizer(model, cfg.update_rule(), float_optimizer=float_opt, seed=cfg.seed)


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: ByteDataset, cfg: TrainConfig) -> float:
    """Mean validation cross-entropy in nats per byte over ``eval_windows`` windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    max_windows = cfg.eval_windows if cfg.eval_windows > 0 else None
    for x, y in val.validation_batches(cfg.batch_size, cfg.seq_len, max_windows):
        out = model(x.to(cfg.device), y.to(cfg.device))
        total += float(out.lm_loss) * y.numel()
        count += y.numel()
    model.train(was_training)
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


def save_run_checkpoint(run_dir: pathlib.Path, step: int, model, opt, cfg: TrainConfig, keep_last: int) -> pathlib.Path:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    tensors.update(opt_tensors)
    tensors.update({f"rng.{k}": v for k, v in capture_rng_state().items()})
    meta = {"train_config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(cfg.model_config()),
            "optimizer": opt_meta, "data_position": {"next_step": step, "seed": cfg.seed}}
    return save_checkpoint(run_dir, step, tensors, meta, keep_last=keep_last)


def load_model_from_checkpoint(path: str | pathlib.Path, device: str = "cpu"):
    """Model, TrainConfig and checkpoint meta from a checkpoint file or run folder."""
    tensors, meta = load_checkpoint(path)
    cfg = TrainConfig(**meta["train_config"])
    cfg.device = device
    model = build_model(ModelConfig(**meta["model_config"]), weights=cfg.weights, device=device, seed=cfg.seed)
    load_state_dict_strict(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    return model, cfg, meta, tensors


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
    """Run (or resume) a training run; returns its summary. Ctrl-C checkpoints, then stops."""

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Data parallel (train/distributed.py): every rank samples the global batch and takes its
    # chunk, running micro_batches / world backward passes; only rank 0 writes the run folder.
    rank, world = (0, 1) if vote_sync is None else (vote_sync.rank, vote_sync.world_size)
    lead = rank == 0
    if world > 1 and (cfg.micro_batches % world or cfg.batch_size % cfg.micro_batches):
        raise ValueError(f"micro_batches={cfg.micro_batches} must be a multiple of the {world} ranks (each runs "
                         f"micro_batches / world backward passes per step) and divide batch_size={cfg.batch_size}")
    if vote_sync is not None:
        vote_sync.check_same("config", json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                                                   if k not in ("device", "threads")}, sort_keys=True, default=str))
    run_dir = pathlib.Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The corpus cache is filled by rank 0 first, then by the first rank of every other node (a
    # cache not shared with node 0), then read by the rest: no two ranks write one cache at once.
    turn = 0 if lead else (1 if vote_sync.local_rank == 0 else 2)
    for phase in range(3 if vote_sync is not None else 1):
        if phase == turn:
            train_ds, val_ds, corpus_stats = prepare_data(cfg)
        if vote_sync is not None:
            vote_sync.barrier()
    logger.info("corpus: %s", corpus_stats)
    unigram = unigram_bits_per_byte(train_ds, val_ds)
    model_cfg = cfg.model_config()
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, weights=cfg.weights, device=cfg.device, seed=cfg.seed)
    opt = build_optimizer(model, cfg)
    kg_term = kg_loss_term(cfg, model_cfg) if cfg.task == "lm+kg" else None
    metrics_path = run_dir / "metrics.jsonl"
    start = 0
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ValueError(f"--resume: no complete checkpoint in {run_dir}")
        tensors, meta = load_checkpoint(ckpt)
        saved = TrainConfig(**meta["train_config"])
        if dataclasses.replace(saved, steps=cfg.steps, device=cfg.device, out=cfg.out, threads=cfg.threads) != cfg:
            raise ValueError(f"--resume: the run in {run_dir} was made with a different config; "
                             f"saved {dataclasses.asdict(saved)}")
        load_state_dict_strict(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        _load_optimizer(opt, tensors, meta["optimizer"])
        restore_rng_state({k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")})
        start = meta["data_position"]["next_step"]
        if lead:
            _truncate_metrics(metrics_path, start)
    elif lead:
        metrics_path.write_text("")
    if lead:
        (run_dir / "config.json").write_text(json.dumps({"train": dataclasses.asdict(cfg),
                                                         "model": dataclasses.asdict(model_cfg),
                                                         "corpus": corpus_stats}, indent=2))
    if vote_sync is not None:
        vote_sync.check_identical(model, "at the start")

    interrupted = False

    def _on_sigint(signum, frame):
        nonlocal interrupted
        interrupted = True

    previous_handler = signal.signal(signal.SIGINT, _on_sigint)
    model.train()
    tokens_per_step = cfg.batch_size * cfg.seq_len
    t_start = time.perf_counter()
    loss_value, val_nats, tok_s = float("nan"), float("nan"), 0.0
    step = start
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress or not lead, unit="step", dynamic_ncols=True)
    try:
        while step < cfg.steps and not interrupted:
            t0 = time.perf_counter()
            if opt.float_optimizer is not None:
                for group in opt.float_optimizer.param_groups:
                    group["lr"] = cosine_lr(step, cfg.steps, cfg.lr)
            x, y = train_ds.sample_batch(step, cfg.batch_size, cfg.seq_len, cfg.seed)
            if world > 1:
                x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            out, stats, kg_loss = train_step(model, opt, x.to(cfg.device), y.to(cfg.device),
                                             cfg.micro_batches // world, vote_sync,
                                             None if kg_term is None else functools.partial(kg_term, step=step))
            if vote_sync is not None:  # a Ctrl-C seen by one rank stops every rank at the same step
                interrupted = vote_sync.agree(interrupted)
            loss_value = float(out.lm_loss.detach())
            step += 1
            tok_s = tokens_per_step / (time.perf_counter() - t0)
            record = None
            if step % cfg.log_every == 0 or step == cfg.steps:
                record = {"step": step, "train_loss": loss_value, "train_bits_per_byte": loss_value * NATS_TO_BITS,
                          "aux_loss": float(out.aux_loss.detach()), "tokens_per_s": tok_s, "memory_bytes": _memory_bytes(cfg.device),
                          "threshold": stats.threshold, "flip_rate": stats.flip_rate,
                          "routing": model.routing_stats()}
                if vote_sync is not None:
                    record["exchange"] = vote_sync.last_stats.as_dict()
                if kg_term is not None:
                    record["kg_loss"] = kg_loss
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_nats = evaluate(model, val_ds, cfg)
                record = record or {"step": step, "train_loss": loss_value}
                record.update({"val_loss": val_nats, "val_bits_per_byte": val_nats * NATS_TO_BITS})
            if record is not None and lead:
                _append_jsonl(metrics_path, record)
            if lead and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                save_run_checkpoint(run_dir, step, model, opt, cfg, cfg.keep_last)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", val_bpb=f"{val_nats * NATS_TO_BITS:.3f}", tok_s=f"{tok_s:,.0f}")
        if interrupted and step % cfg.checkpoint_every != 0 and lead:
            path = save_run_checkpoint(run_dir, step, model, opt, cfg, cfg.keep_last)
            bar.write(f"interrupted at step {step}: checkpoint written to {path}")
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous_handler)
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
                      run_dir=str(run_dir), interrupted=interrupted)


def _truncate_metrics(path: pathlib.Path, next_step: int) -> None:
    """Drop metric lines past the checkpoint a resume starts from (they will be redone)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= next_step]
    path.write_text("".join(line + "\n" for line in kept))
