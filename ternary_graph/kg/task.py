"""Knowledge-graph tasks: train the ternary link-prediction scorer alone, and the composite
LM + KG loss that the LM loop adds.

``train_kg(KGTrainConfig(...))`` builds the stdlib knowledge graph (cached), splits it
deterministically, trains a :class:`~ternary_graph.kg.scorer.TernaryKGScorer` with
:class:`~ternary_graph.ternary.optimizer.TernaryOptimizer` (or, with ``weights="float"``, the
same scorer with float tables and Adam: a control with the same loss), fits the KG VQ
codebook to the trained entity vectors, and reports filtered MRR / Hits@1/3/10 on the test
split with the raw entity vectors and with their KG codes. The run folder ``out`` holds
``config.json``, ``metrics.jsonl`` (one line per epoch: loss, flips, seconds, and valid
MRR every ``eval_every`` epochs) and a safetensors checkpoint of the scorer (see
:func:`ternary_graph.train.checkpoint.save_checkpoint`), loadable with :func:`load_kg_scorer`.

Defaults were picked on the VALID split of the Python 3.11 stdlib graph (dim 64, batch
1024, 256 negatives, seed 0, logit scale 0.25, frozen row scales unless noted); valid MRR:

| variant | epochs | valid MRR |
|---|---|---|
| learned row scales (scale_threshold 64), θ 16, logit scale 1/8 | 20 | 0.076 (0.082 at epoch 15) |
| learned row scales, θ 32 | 30 | 0.057 |
| frozen row scales, θ 16 | 30 | 0.176 |
| θ 8 constant | 100 | 0.193 |
| θ 8 -> 16 ramp (default) | 100 | **0.203** |
| default with a ComplEx-style score | 100 | 0.194 |
| default at dim 128 (logit scale 2/sqrt(128)) | 100 | 0.204 |
| θ 8, accumulator decay_shift 2 | 30 | 0.189 (θ 8 without decay: 0.190) |
| θ 4 (one ±4 vote flips a trit) | 30 | 0.0005 (oscillates) |
| 64 / 1024 negatives, θ 16 | 30 | 0.152 / 0.111 (256: 0.176) |
| proportional vote sampling, θ 8, 256 / 1024 negatives | 30 | 0.134 / 0.137 |
| 1-N (every entity a candidate), learned scales, θ 16, logit scale 1/8 | 10 | 0.008 (diverges; 40 s/epoch on CPU) |

Learned row scales grow (entity E up to +14, i.e. x11) and the loss rises, so scales are
frozen (``scale_threshold=0``). With sign votes every candidate votes as loudly as the true
answer, which is why a few hundred shared negatives beat many and 1-N diverges. The float
control (``weights="float"``) uses Adam lr 1e-2 and init std 0.01, the best of six (lr,
init std) pairs from {1e-3, 3e-3, 1e-2} x {1, 0.1, 0.01} at 30 epochs (valid MRR 0.163 at
epoch 10, 0.152 at 30: it overfits); Adam weight decay 1e-5 or 1e-4 shrank its tables to zero.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .graph import KGSplit, KnowledgeGraph, build_stdlib_kg
from .metrics import filtered_ranks, mrr_hits, random_ranking_mrr
from .scorer import SCORE_FUNCTIONS, VOTE_SAMPLINGS, TernaryKGScorer, hashed_entity_codes
from ..nn.vq import KGVQCodebook
from ..ternary.optimizer import TernaryOptimizer, UpdateRule
from ..train.checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint

logger = logging.getLogger(__name__)

# Entity names fed to the LM in the composite loss: the last NAME_BYTES bytes of the UTF-8
# qualified name, right-aligned (the last byte at the last position, where the hidden state
# that scores the entity is read), left-padded with PAD_BYTE. A space is ordinary source
# text to a byte LM trained on the stdlib, unlike a NUL byte it never saw. Of the 17,929
# entities of the Python 3.11 stdlib graph, names longer than 32 bytes lose their leading
# (package) bytes; the trailing ones name the entity most specifically.
NAME_BYTES = 32
PAD_BYTE = ord(" ")


@dataclass
class KGTrainConfig:
    """Everything that defines a KG training run."""

    epochs: int = 100  # passes over the training triples
    batch_size: int = 1024  # training triples per optimizer step
    dim: int = 64  # entity / relation row width (= KG code dim when a codebook is used)
    negatives: int = 256  # shared uniformly drawn negatives per step; 0 scores every entity (1-N)
    score: str = "distmult"  # "distmult" or "complex" (see kg/scorer.py)
    logit_scale: float | None = None  # logits = logit_scale · φ; None: 2 / sqrt(dim)
    threshold: int = 8  # θ at step 0: |T_accum| that makes a trit step
    threshold_final: int | None = 16  # θ at the last step, ramped linearly (None: constant θ)
    scale_threshold: int = 0  # |E_accum| that makes a row scale step; 0 freezes the scales
    decay_shift: int | None = None  # accumulators shrink by |acc| >> decay_shift each step (None: no decay)
    vote_magnitude: int = 4  # ±votes cast per backward pass
    flip_prob: float = 1.0  # probability that a trit at threshold steps
    vote_sampling: str = "sign"  # "sign", or "proportional" (keep a vote with prob ∝ |grad|)
    zero_fraction: float | None = None  # initial fraction of zero trits (None: uniform trits)
    lr: float = 1e-2  # Adam learning rate (weights="float" only)
    float_init_scale: float = 0.01  # std of the float tables' init (weights="float" only)
    kg_codebook_size: int = 4096  # KG VQ codes fitted after training (0: no codebook)
    codebook_passes: int = 10  # passes over the entity vectors when fitting the codebook (error plateaus by ~10)
    eval_every: int = 20  # epochs between validation MRR passes (and at the end)
    seed: int = 0  # init, batch order, negatives, optimizer coins
    device: str = "cpu"  # "cpu", "cuda", ...
    out: str = "runs/kg"  # run folder
    weights: str = "ternary"  # "ternary" (int8 votes) or "float" (same scorer and loss, Adam)
    stdlib: str | None = None  # stdlib folder to parse (None: this interpreter's)
    cache_dir: str | None = None  # where the extracted graph is cached (None: ~/.cache/ternary_graph/kg)
    threads: int = 0  # torch CPU threads (0: torch's default)
    progress: bool = True  # tqdm bar over epochs

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "dim", "eval_every", "codebook_passes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KGTrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("negatives", "kg_codebook_size", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"KGTrainConfig.{name} must be a non-negative int, got {value!r}")
        if self.weights not in ("ternary", "float"):
            raise ValueError(f"KGTrainConfig.weights must be 'ternary' or 'float', got {self.weights!r}")
        if self.score not in SCORE_FUNCTIONS:
            raise ValueError(f"KGTrainConfig.score must be one of {SCORE_FUNCTIONS}, got {self.score!r}")
        if self.vote_sampling not in VOTE_SAMPLINGS:
            raise ValueError(f"KGTrainConfig.vote_sampling must be one of {VOTE_SAMPLINGS}, "
                             f"got {self.vote_sampling!r}")
        if not (self.lr > 0 and self.float_init_scale > 0):
            raise ValueError(f"KGTrainConfig.lr and float_init_scale must be positive, got {self.lr!r}, "
                             f"{self.float_init_scale!r}")
        self.update_rule(1)  # validates θ, decay, votes, flip_prob now rather than after the graph is built

    def steps_per_epoch(self, num_train: int) -> int:
        return max(1, math.ceil(num_train / self.batch_size))

    def update_rule(self, total_steps: int) -> UpdateRule:
        ramp = total_steps if self.threshold_final is not None else 0
        return UpdateRule(threshold=self.threshold, threshold_final=self.threshold_final, threshold_ramp_steps=ramp,
                          scale_threshold=self.scale_threshold, decay_shift=self.decay_shift,
                          flip_prob=self.flip_prob, vote_magnitude=self.vote_magnitude)


@dataclass
class KGSummary:
    """What :func:`train_kg` measured."""

    test: dict  # filtered test metrics (mrr, mean_rank, hits@1/3/10, count), tail and head ranks averaged
    valid_mrr: float  # filtered valid MRR after the last epoch
    test_quantized: dict | None  # test metrics scoring with the entities' KG code vectors (None: no codebook)
    codebook_live_fraction: float | None  # distinct codes used by entities / codebook size
    inference_bytes: int  # ternary: packed trits + E of both tables; float: float32 parameters
    training_bytes: int  # ternary: + T_accum and E_accum; float: parameters + grads + 2 Adam moments
    codebook_bytes: int  # packed + E of the KG codebook (0 without one)
    random_mrr: float  # expected MRR of random ranking over all entities
    epochs: int
    train_seconds: float  # the training epochs alone (no evaluation, no codebook fit)
    seconds: float  # the whole call: graph, training, evaluations, codebook fit, checkpoint
    final_loss: float
    run_dir: str
    history: list = field(default_factory=list)  # one dict per epoch (the metrics.jsonl lines)


# --------------------------------------------------------------------------------------------
# Building blocks (used by train_kg and experiments/kg_link_prediction.py)


_FIT_CHUNK = 4096  # entity vectors per codebook training call in fit_codebook


def default_kg_cache_dir() -> pathlib.Path:
    """``~/.cache/ternary_graph/kg`` (nothing is created here)."""
    return pathlib.Path.home() / ".cache" / "ternary_graph" / "kg"


def load_kg(cfg: KGTrainConfig) -> KnowledgeGraph:
    """The stdlib knowledge graph named by ``cfg`` (cached between runs)."""
    cache = pathlib.Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_kg_cache_dir()
    return build_stdlib_kg(cfg.stdlib, cache_dir=cache)


def build_scorer(cfg: KGTrainConfig, num_entities: int, num_relations: int) -> TernaryKGScorer:
    """A fresh scorer (with a KG codebook of ``cfg.kg_codebook_size`` codes, if any).

    The codebook re-seeds its dead codes once per pass of :meth:`TernaryKGScorer.fit_codebook`
    (``reseed_window`` = chunks per pass), so every code ends up on some entity vector.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    codebook = None
    if cfg.kg_codebook_size:
        # Its own generator, so that the scorer's init does not depend on the codebook size.
        cb_gen = torch.Generator().manual_seed(cfg.seed + 1)
        chunks = max(1, math.ceil(num_entities / _FIT_CHUNK))
        codebook = KGVQCodebook(cfg.kg_codebook_size, cfg.dim, reseed_window=chunks, usage_decay_interval=0,
                                device=cfg.device, generator=cb_gen)
    init_scale = 1.0 if cfg.weights == "ternary" else cfg.float_init_scale
    return TernaryKGScorer(num_entities, num_relations, cfg.dim, kg_codebook=codebook, score=cfg.score,
                           logit_scale=cfg.logit_scale, weights=cfg.weights, zero_fraction=cfg.zero_fraction,
                           init_scale=init_scale, device=cfg.device, generator=gen)


def build_kg_optimizer(scorer: TernaryKGScorer, cfg: KGTrainConfig, total_steps: int) -> TernaryOptimizer:
    """TernaryOptimizer over the scorer's two tables (ternary), or Adam wrapped in one (float)."""
    if cfg.weights == "float":
        adam = torch.optim.Adam(list(scorer.entities.parameters()) + list(scorer.relations.parameters()), lr=cfg.lr)
        return TernaryOptimizer([], float_optimizer=adam, seed=cfg.seed)
    states = [scorer.entities.weight, scorer.relations.weight]
    return TernaryOptimizer(states, cfg.update_rule(total_steps), seed=cfg.seed)


def evaluate_scorer(scorer: TernaryKGScorer, kg: KnowledgeGraph, triples: Tensor, *, quantized: bool = False) -> dict:
    """Filtered MRR / mean rank / Hits@1/3/10 (tail and head ranks averaged, ties averaged),
    plus ``mrr_tail`` and ``mrr_head``. Filtering uses every triple of ``kg``."""
    ranks = filtered_ranks(scorer.score_fn(quantized=quantized), triples, kg.triples, kg.num_entities,
                           batch_size=1 << 22, device=scorer.device)
    out = mrr_hits(ranks)
    out["mrr_tail"] = mrr_hits(ranks[:, 0])["mrr"]
    out["mrr_head"] = mrr_hits(ranks[:, 1])["mrr"]
    return out


def scorer_bytes(scorer: TernaryKGScorer) -> tuple[int, int]:
    """``(inference, training)`` bytes of the scorer's entity and relation tables.

    Ternary: inference = packed trits + int8 E; training adds the int8 T_accum and E_accum.
    Float: inference = float32 parameters; training = parameters + gradients + Adam's two moments.
    """
    tables = (scorer.entities, scorer.relations)
    if scorer.weights == "float":
        params = sum(t.weight.numel() * t.weight.element_size() for t in tables)
        return params, 4 * params
    infer = sum(t.weight.packed.numel() + t.weight.E.numel() for t in tables)
    accum = sum(t.weight.T_accum.numel() + t.weight.E_accum.numel() for t in tables)
    return infer, infer + accum


def train_epoch(scorer: TernaryKGScorer, opt: TernaryOptimizer, train: Tensor, cfg: KGTrainConfig,
                generator: torch.Generator) -> tuple[float, int]:
    """One pass over ``train`` in a random order; returns (mean loss, trits flipped).

    Shapes: train (E_train, 3) integer.
    """
    order = torch.randperm(train.shape[0], generator=generator)
    total, count, flips = 0.0, 0, 0
    negatives = cfg.negatives or None
    scorer.train()
    for start in range(0, train.shape[0], cfg.batch_size):
        batch = train[order[start:start + cfg.batch_size]]
        loss = scorer.loss(batch, num_negatives=negatives, generator=generator, vote_sampling=cfg.vote_sampling)
        opt.zero_grad()
        loss.backward()
        flips += opt.step().flips
        total += float(loss.detach()) * batch.shape[0]
        count += batch.shape[0]
    return total / max(1, count), flips


# --------------------------------------------------------------------------------------------
# The KG task


def train_kg(cfg: KGTrainConfig, *, kg: KnowledgeGraph | None = None) -> KGSummary:
    """Train and evaluate the KG scorer described by ``cfg``; see the module docstring.

    ``kg`` replaces the stdlib graph (its deterministic split is used the same way).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    graph = load_kg(cfg) if kg is None else kg
    split: KGSplit = graph.split()
    train = split.train.long()
    if train.shape[0] == 0:
        raise ValueError("the knowledge graph's train split is empty: nothing to train on")
    run_dir = pathlib.Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    graph_info = {"entities": graph.num_entities, "relations": graph.relation_names, "triples": graph.num_triples,
                  "split": {"train": len(split.train), "valid": len(split.valid), "test": len(split.test)}}
    (run_dir / "config.json").write_text(json.dumps({"kg_train": dataclasses.asdict(cfg), "graph": graph_info},
                                                    indent=2))
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("")

    scorer = build_scorer(cfg, graph.num_entities, graph.num_relations)
    total_steps = cfg.epochs * cfg.steps_per_epoch(train.shape[0])
    opt = build_kg_optimizer(scorer, cfg, total_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    valid_mrr, loss, train_seconds = float("nan"), float("nan"), 0.0
    bar = tqdm(range(1, cfg.epochs + 1), disable=not cfg.progress, unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        t_epoch = time.perf_counter()
        loss, flips = train_epoch(scorer, opt, train, cfg, gen)
        train_seconds += time.perf_counter() - t_epoch
        record = {"epoch": epoch, "loss": loss, "flips": flips, "seconds": time.perf_counter() - t_start}
        if (epoch % cfg.eval_every == 0 or epoch == cfg.epochs) and len(split.valid):
            valid_mrr = evaluate_scorer(scorer, graph, split.valid)["mrr"]
            record["valid_mrr"] = valid_mrr
        history.append(record)
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{loss:.4f}", valid_mrr=f"{valid_mrr:.4f}", flips=flips)
    bar.close()

    test = evaluate_scorer(scorer, graph, split.test) if len(split.test) else {}
    test_q, live = None, None
    if scorer.kg_codebook is not None:
        cb_opt = TernaryOptimizer(scorer.kg_codebook, UpdateRule(threshold=cfg.threshold_final or cfg.threshold,
                                                                 scale_threshold=0,
                                                                 vote_magnitude=cfg.vote_magnitude), seed=cfg.seed)
        errors = scorer.fit_codebook(cb_opt, passes=cfg.codebook_passes, chunk=_FIT_CHUNK, generator=gen)
        scorer.kg_codebook.eval()
        codes = scorer.entity_codes()
        live = int(torch.unique(codes).numel()) / scorer.kg_codebook.num_codes
        test_q = evaluate_scorer(scorer, graph, split.test, quantized=True) if len(split.test) else {}
        record = {"epoch": cfg.epochs, "codebook_fit_sq_error": errors, "codebook_live_fraction": live,
                  "test_mrr_quantized": test_q.get("mrr")}
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    infer_b, train_b = scorer_bytes(scorer)
    cb_bytes = 0
    if scorer.kg_codebook is not None:
        w = scorer.kg_codebook.codes.weight
        cb_bytes = w.packed.numel() + w.E.numel()
    summary = KGSummary(test=test, valid_mrr=valid_mrr, test_quantized=test_q, codebook_live_fraction=live,
                        inference_bytes=infer_b, training_bytes=train_b, codebook_bytes=cb_bytes,
                        random_mrr=random_ranking_mrr(graph.num_entities), epochs=cfg.epochs,
                        train_seconds=train_seconds, seconds=time.perf_counter() - t_start, final_loss=loss, run_dir=str(run_dir),
                        history=history)
    logger.info("KG scorer (%s): test MRR %.4f, quantised %s, valid MRR %.4f, %.0f s", cfg.weights,
                test.get("mrr", float("nan")), None if test_q is None else round(test_q.get("mrr", float("nan")), 4),
                valid_mrr, summary.seconds)
    meta = {"kg_train_config": dataclasses.asdict(cfg), "graph": graph_info,
            "summary": {k: v for k, v in dataclasses.asdict(summary).items() if k != "history"}}
    save_checkpoint(run_dir, cfg.epochs, {f"scorer.{k}": v for k, v in scorer.state_dict().items()}, meta,
                    keep_last=1)
    return summary


def load_kg_scorer(path: str | pathlib.Path, device: str = "cpu") -> tuple[TernaryKGScorer, KGTrainConfig, dict]:
    """The scorer, its config and the checkpoint meta from a :func:`train_kg` run folder or checkpoint."""
    tensors, meta = load_checkpoint(path)
    if "kg_train_config" not in meta:
        raise ValueError(f"{str(path)!r} is not a KG scorer checkpoint (no 'kg_train_config' in its meta)")
    cfg = KGTrainConfig(**{**meta["kg_train_config"], "device": device})
    scorer = build_scorer(cfg, meta["graph"]["entities"], len(meta["graph"]["relations"]))
    load_state_dict_strict(scorer, {k[len("scorer."):]: v for k, v in tensors.items() if k.startswith("scorer.")})
    return scorer, cfg, meta


# --------------------------------------------------------------------------------------------
# Composite LM + KG loss


def encode_entity_names(names: list[str], length: int = NAME_BYTES, pad: int = PAD_BYTE) -> Tensor:
    """Byte ids of ``names``, right-aligned in ``length`` bytes (see NAME_BYTES).

    Shapes: returns (len(names), length) int64 in [0, 256).
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < 256:
        raise ValueError(f"pad must be a byte value in [0, 256), got {pad!r}")
    out = torch.full((len(names), length), pad, dtype=torch.long)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"names[{i}] must be a str, got {type(name).__name__}")
        data = name.encode("utf-8")[-length:]
        if data:
            out[i, length - len(data):] = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    return out


def entity_code_map(kg: KnowledgeGraph, num_codes: int, scorer: TernaryKGScorer | None = None) -> Tensor:
    """(num_entities,) int64 KG code of every entity, for :func:`kg_composite_loss`.

    With a trained ``scorer`` (whose ``kg_codebook`` must be the codebook the model scores
    with, e.g. one loaded into ``model.kg_vq``): the nearest code of each entity vector,
    so entities that play alike in the graph share a code. Without one: a BLAKE2b hash of
    the qualified name modulo ``num_codes`` (stable, but collisions are random). With
    fewer codes than entities (the tiny preset: 4,096 codes for ~18k stdlib entities)
    codes are shared either way; ``kg_composite_loss`` masks negatives that share the true
    answer's code.
    """
    if scorer is None:
        return hashed_entity_codes(kg.entity_names, num_codes)
    if scorer.kg_codebook is None or scorer.kg_codebook.num_codes != num_codes:
        got = None if scorer.kg_codebook is None else scorer.kg_codebook.num_codes
        raise ValueError(f"scorer.kg_codebook must have num_codes={num_codes}, got {got}")
    if scorer.num_entities != kg.num_entities:
        raise ValueError(f"scorer has {scorer.num_entities} entities, kg {kg.num_entities}")
    return scorer.entity_codes().cpu()


def kg_composite_loss(model, kg: KnowledgeGraph, triples_batch: Tensor, entity_code: Tensor, num_negatives: int,
                      generator: torch.Generator | None = None, *, name_bytes: int = NAME_BYTES) -> Tensor:
    """Cross-entropy of each triple's true tail among sampled negatives, scored by the LM's
    composite head from the head entity's name.

    For each ``[h, r, t]``: the qualified name of ``h`` is fed to ``model`` as bytes
    (:func:`encode_entity_names`), the final hidden state at the last position is the
    query, and ``model.kg_scores(hidden, r, codes)`` scores ``codes = [code(t)] +
    [code(n_1) .. code(n_K)]`` for ``K = num_negatives`` entities drawn uniformly per row
    with ``generator``; the target is column 0. A negative whose code equals the true
    tail's code would score identically, so it is masked out of its row. Backward votes
    into the model's ternary layers and into the rows of ``model.kg_vq.codes`` that were
    scored. The model's VQ commitment loss of this pass is not included.

    Shapes:
        triples_batch: (B, 3) integer ``[head, relation, tail]`` entity/relation ids of ``kg``.
        entity_code: (kg.num_entities,) int64 codes in [0, model.kg_vq.num_codes).
        returns: () float32.
    """
    if not isinstance(kg, KnowledgeGraph):
        raise TypeError(f"kg must be a KnowledgeGraph, got {type(kg).__name__}")
    if not isinstance(triples_batch, Tensor) or triples_batch.is_floating_point() or triples_batch.is_complex() \
            or triples_batch.dtype == torch.bool:
        got = triples_batch.dtype if isinstance(triples_batch, Tensor) else type(triples_batch).__name__
        raise TypeError(f"triples_batch must be an integer tensor, got {got}")
    if triples_batch.dim() != 2 or triples_batch.shape[1] != 3 or triples_batch.shape[0] == 0:
        raise ValueError(f"triples_batch must have shape (B, 3) with B >= 1, got {tuple(triples_batch.shape)}")
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
        raise ValueError(f"num_negatives must be a positive int, got {num_negatives!r}")
    tri = triples_batch.detach().cpu().long()
    n_rel = min(kg.num_relations, model.cfg.num_relations)
    for col, what, bound in ((0, "head", kg.num_entities), (1, "relation", n_rel), (2, "tail", kg.num_entities)):
        bad = tri[:, col][(tri[:, col] < 0) | (tri[:, col] >= bound)]
        if bad.numel():
            raise ValueError(f"triples_batch[:, {col}] ({what} ids) must lie in [0, {bound}), got {int(bad[0])}")
    num_codes = model.kg_vq.num_codes
    if not isinstance(entity_code, Tensor) or entity_code.dtype != torch.int64 \
            or tuple(entity_code.shape) != (kg.num_entities,):
        got = f"{entity_code.dtype} {tuple(entity_code.shape)}" if isinstance(entity_code, Tensor) \
            else type(entity_code).__name__
        raise ValueError(f"entity_code must be an int64 tensor of shape ({kg.num_entities},), got {got}")
    codes = entity_code.cpu()
    bad = codes[(codes < 0) | (codes >= num_codes)]
    if bad.numel():
        raise ValueError(f"entity_code values must lie in [0, {num_codes}) (model.kg_vq.num_codes), got {int(bad[0])}")
    if name_bytes > model.cfg.max_seq_len:
        raise ValueError(f"name_bytes={name_bytes} exceeds the model's max_seq_len={model.cfg.max_seq_len}")

    device = model.kg_vq.codes.weight.packed.device
    h, r, t = tri.unbind(dim=1)
    ids = encode_entity_names([kg.entity_names[i] for i in h.tolist()], name_bytes).to(device)
    hidden = model(ids).hidden[:, -1]  # (B, dim): the state after the name's last byte
    neg = torch.randint(0, kg.num_entities, (tri.shape[0], num_negatives), generator=generator)
    true_code = codes[t]
    cand = torch.cat([true_code.unsqueeze(1), codes[neg]], dim=1)  # (B, 1 + K)
    scores = model.kg_scores(hidden, r.to(device), cand.to(device)).float()
    clash = torch.cat([torch.zeros(tri.shape[0], 1, dtype=torch.bool), cand[:, 1:] == true_code.unsqueeze(1)], dim=1)
    scores = scores.masked_fill(clash.to(device), float("-inf"))
    return F.cross_entropy(scores, torch.zeros(tri.shape[0], dtype=torch.long, device=device))
