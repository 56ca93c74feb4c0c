"""Fair float baselines for the ternary KG scorer: PyG's KGE models under two recipes, and one
early-stopped fit loop for every model, the ternary scorer included.

Models: PyG's :class:`~torch_geometric.nn.kge.DistMult`, :class:`~torch_geometric.nn.kge.ComplEx`,
:class:`~torch_geometric.nn.kge.RotatE` and :class:`~torch_geometric.nn.kge.TransE`, each with
its own init and score. Two training recipes (``loss=``):

* ``"native"``: the model's own ``model.loss`` (margin ranking for DistMult/TransE, binary
  cross-entropy for ComplEx/RotatE, one corrupted head or tail per positive).
* ``"sampled_ce"``: the ternary scorer's recipe: cross-entropy of the true tail given
  ``(h, r)`` and of the true head given ``(r, t)`` against ``negatives`` entities drawn
  uniformly and shared by the batch, a negative equal to the true answer masked out. The
  negatives and the loss come from :func:`~ternary_graph.kg.scorer.draw_shared_negatives`
  and :func:`~ternary_graph.kg.scorer.two_sided_sampled_cross_entropy`, the functions that
  :meth:`~ternary_graph.kg.scorer.TernaryKGScorer.loss` itself calls.

:func:`fit_early_stopping` is the shared tuning protocol: train, evaluate filtered valid MRR
every ``eval_every`` epochs, keep a copy of the weights of the best evaluation, stop after
``patience`` evaluations without improvement, and restore the best weights.
:func:`train_pyg` and :func:`train_ternary` run one config under it and report valid and test
metrics (:mod:`ternary_graph.kg.metrics`) and parameter bytes. ``experiments/kg_baselines.py``
runs the grid.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch_geometric.nn.kge import ComplEx, DistMult, KGEModel, RotatE, TransE

from .graph import KnowledgeGraph
from .metrics import filtered_ranks, mrr_hits
from .scorer import draw_shared_negatives, two_sided_sampled_cross_entropy
from .task import KGTrainConfig, build_kg_optimizer, build_scorer, evaluate_scorer, scorer_bytes, train_epoch

# name -> (class, constructor kwargs). RotatE's margin 9 follows PyG's examples/kge_fb15k_237.py;
# TransE uses the L1 distance of the TransE paper (PyG's default p_norm is also 1).
PYG_MODELS: dict[str, tuple[type[KGEModel], dict]] = {
    "distmult": (DistMult, {}),
    "complex": (ComplEx, {}),
    "rotate": (RotatE, {"margin": 9.0}),
    "transe": (TransE, {"p_norm": 1.0}),
}
LOSSES: tuple[str, ...] = ("native", "sampled_ce")


# --------------------------------------------------------------------------------------------
# Early stopping (pure)


def early_stopping(valid_scores: Sequence[float], patience: int) -> tuple[int, bool]:
    """``(best, stop)`` after the evaluations ``valid_scores`` (higher is better).

    ``best`` is the index of the highest score (the earliest one on ties: the same quality
    with less training); ``stop`` is True once ``patience`` evaluations have followed it
    without beating it. A NaN score never counts as an improvement.

    Shapes: valid_scores: a non-empty sequence of floats.
    """
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be a positive int, got {patience!r}")
    scores = list(valid_scores)
    if not scores:
        raise ValueError("valid_scores is empty: no evaluation to pick from")
    best = 0
    for i, s in enumerate(scores):
        # `not (s <= best)` would let a NaN win; compare explicitly instead.
        if not math.isnan(s) and (math.isnan(scores[best]) or s > scores[best]):
            best = i
    return best, len(scores) - 1 - best >= patience


@dataclass
class FitResult:
    """What :func:`fit_early_stopping` did."""

    best_epoch: int  # epoch whose weights were kept (0: the initial weights)
    best_valid_mrr: float
    epochs_run: int
    stopped_early: bool  # stopped by patience before max_epochs
    diverged: bool  # a non-finite epoch loss stopped training
    train_seconds: float  # training epochs only
    evals: list = field(default_factory=list)  # [(epoch, valid MRR)] in order
    losses: list = field(default_factory=list)  # mean loss of every epoch run


def fit_early_stopping(train_one_epoch: Callable[[], float], valid_mrr: Callable[[], float],
                       module: torch.nn.Module, *, max_epochs: int, eval_every: int, patience: int,
                       log: Callable[[str], None] | None = None) -> FitResult:
    """Train ``module`` for up to ``max_epochs`` epochs with early stopping on valid MRR.

    ``train_one_epoch()`` runs one epoch and returns its mean loss; ``valid_mrr()`` scores the
    current weights. Evaluations happen every ``eval_every`` epochs and after the last epoch;
    the state of the best evaluation is copied (every tensor of ``module.state_dict()``) and
    copied back at the end, so ``module`` leaves with its best weights. A non-finite loss
    stops training (``diverged``) and keeps the best weights evaluated before it.
    """
    for name, value in (("max_epochs", max_epochs), ("eval_every", eval_every), ("patience", patience)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    # state_dict() is read afresh at every copy: an optimizer step may rebind a buffer.
    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    evals: list[tuple[int, float]] = []
    losses: list[float] = []
    train_s, stopped, diverged, best_epoch = 0.0, False, False, 0
    for epoch in range(1, max_epochs + 1):
        t0 = time.perf_counter()
        loss = float(train_one_epoch())
        train_s += time.perf_counter() - t0
        losses.append(loss)
        if not math.isfinite(loss):
            diverged = True
            if log:
                log(f"  epoch {epoch}: loss {loss}: diverged, keeping epoch {best_epoch}")
            break
        if epoch % eval_every and epoch != max_epochs:
            continue
        mrr = float(valid_mrr())
        evals.append((epoch, mrr))
        best, stop = early_stopping([m for _, m in evals], patience)
        if best == len(evals) - 1:
            best_epoch = epoch
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if log:
            log(f"  epoch {epoch:3d}: loss {loss:.4f}  valid MRR {mrr:.4f}  (best {evals[best][1]:.4f} "
                f"at epoch {evals[best][0]})")
        if stop:
            stopped = epoch < max_epochs
            break
    with torch.no_grad():
        for k, v in module.state_dict().items():
            v.copy_(best_state[k])
    best_mrr = max((m for e, m in evals if e == best_epoch), default=float("nan"))
    return FitResult(best_epoch=best_epoch, best_valid_mrr=best_mrr, epochs_run=len(losses),
                     stopped_early=stopped, diverged=diverged, train_seconds=train_s, evals=evals, losses=losses)


# --------------------------------------------------------------------------------------------
# PyG models: construction, scores of many candidates, the two recipes


def build_pyg_model(name: str, num_entities: int, num_relations: int, dim: int) -> KGEModel:
    """PyG model ``name`` with its own ``reset_parameters`` init (from torch's global generator)."""
    if name not in PYG_MODELS:
        raise ValueError(f"model must be one of {sorted(PYG_MODELS)}, got {name!r}")
    cls, kwargs = PYG_MODELS[name]
    return cls(num_entities, num_relations, hidden_channels=dim, **kwargs)


def candidate_scores(model: KGEModel, fixed: Tensor, rel: Tensor, cand: Tensor, *, tails: bool) -> Tensor:
    """Scores of the queries ``(fixed, rel)`` against candidate entities, equal to ``model(...)``.

    With ``tails`` the candidates are tails (``model(fixed, rel, cand)``), else heads
    (``model(cand, rel, fixed)``). A closed form per model (a matmul, or ``torch.cdist``)
    avoids the (B, C, dim) tensor that broadcasting ``forward`` would build; it is
    differentiable, so the sampled-negative recipe trains through it.

    Shapes: fixed (B,), rel (B,), cand (C,) int64 -> (B, C).
    """
    if isinstance(model, ComplEx):
        f_re, f_im = model.node_emb(fixed), model.node_emb_im(fixed)
        r_re, r_im = model.rel_emb(rel), model.rel_emb_im(rel)
        if tails:  # Re<h ∘ r, conj(t)>: q = h ∘ r
            q_re, q_im = f_re * r_re - f_im * r_im, f_im * r_re + f_re * r_im
        else:  # the coefficients of h_re and h_im: q = conj(r) ∘ t
            q_re, q_im = r_re * f_re + r_im * f_im, r_re * f_im - r_im * f_re
        return q_re @ model.node_emb(cand).t() + q_im @ model.node_emb_im(cand).t()
    if isinstance(model, DistMult):
        return (model.node_emb(fixed) * model.rel_emb(rel)) @ model.node_emb(cand).t()  # symmetric in h, t
    if isinstance(model, TransE):
        p = model.p_norm
        e_fixed = torch.nn.functional.normalize(model.node_emb(fixed), p=p, dim=-1)
        e_cand = torch.nn.functional.normalize(model.node_emb(cand), p=p, dim=-1)
        r = model.rel_emb(rel)
        # tails: -||h + r - t||; heads: -||h + r - t|| = -||(t - r) - h||
        return -torch.cdist(e_fixed + r if tails else e_fixed - r, e_cand, p=p)
    if isinstance(model, RotatE):
        re, im = model.node_emb(fixed), model.node_emb_im(fixed)
        theta = model.rel_emb(rel)
        c, s = torch.cos(theta), torch.sin(theta)
        if tails:  # h ∘ r
            q_re, q_im = c * re - s * im, c * im + s * re
        else:  # |h ∘ r - t| = |h - t ∘ conj(r)| since |r| = 1
            q_re, q_im = c * re + s * im, c * im - s * re
        q = torch.cat([q_re, q_im], dim=-1)
        c_vec = torch.cat([model.node_emb(cand), model.node_emb_im(cand)], dim=-1)
        # ||q - c||² through one matmul (4x faster than cdist with its backward on CPU); the
        # clamp keeps sqrt's gradient finite where rounding gives a squared distance <= 0.
        sq = (q * q).sum(-1, keepdim=True) + (c_vec * c_vec).sum(-1) - 2.0 * (q @ c_vec.t())
        return model.margin - sq.clamp_min(1e-12).sqrt()
    raise TypeError(f"no closed-form scores for {type(model).__name__}; expected one of "
                    f"{[c.__name__ for c, _ in PYG_MODELS.values()]}")


def pyg_score_fn(model: KGEModel):
    """A broadcasting ``score(h, r, t)`` for :func:`~ternary_graph.kg.metrics.filtered_ranks`.

    The two ranking layouts ``(B,1),(B,1),(1,C)`` and ``(1,C),(B,1),(B,1)`` go through
    :func:`candidate_scores`; any other layout through ``forward`` on the broadcast indices.
    """

    def score(h: Tensor, r: Tensor, t: Tensor) -> Tensor:
        if h.dim() == 2 and r.dim() == 2 and t.dim() == 2 and r.shape[1] == 1:
            if h.shape[1] == 1 and t.shape[0] == 1:
                return candidate_scores(model, h[:, 0], r[:, 0], t[0], tails=True)
            if t.shape[1] == 1 and h.shape[0] == 1:
                return candidate_scores(model, t[:, 0], r[:, 0], h[0], tails=False)
        hb, rb, tb = torch.broadcast_tensors(h, r, t)
        return model(hb.reshape(-1), rb.reshape(-1), tb.reshape(-1)).reshape(hb.shape)

    return score


def sampled_ce_loss(model: KGEModel, batch: Tensor, num_negatives: int, *, generator: torch.Generator | None = None,
                    logit_scale: float = 1.0) -> Tensor:
    """The ternary scorer's training loss applied to a PyG model (see the module docstring).

    Shapes: batch (B, 3) int64 ``[head, relation, tail]`` -> () float32.
    """
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale must be a positive finite number, got {logit_scale!r}")
    h, r, t = batch.long().unbind(dim=1)
    neg = draw_shared_negatives(model.num_nodes, num_negatives, generator=generator, device=h.device)
    cand = neg.unsqueeze(0)
    s = logit_scale
    pos = s * model(h, r, t)  # tail and head sides share the true triple's score
    return two_sided_sampled_cross_entropy(
        pos, s * candidate_scores(model, h, r, neg, tails=True), cand == t.unsqueeze(1),
        pos, s * candidate_scores(model, t, r, neg, tails=False), cand == h.unsqueeze(1))


def pyg_train_epoch(model: KGEModel, optimizer: torch.optim.Optimizer, train: Tensor, *, loss: str,
                    batch_size: int, negatives: int, generator: torch.Generator) -> float:
    """One pass over ``train`` in a random order (from ``generator``); returns the mean loss.

    ``loss="native"`` calls ``model.loss`` (its negatives come from torch's global generator,
    as PyG draws them); ``"sampled_ce"`` calls :func:`sampled_ce_loss`.

    Shapes: train (E_train, 3) integer.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    order = torch.randperm(train.shape[0], generator=generator)
    total, count = 0.0, 0
    model.train()
    for start in range(0, train.shape[0], batch_size):
        batch = train[order[start:start + batch_size]].long()
        if loss == "native":
            value = model.loss(batch[:, 0], batch[:, 1], batch[:, 2])
        else:
            value = sampled_ce_loss(model, batch, negatives, generator=generator)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        total += float(value.detach()) * batch.shape[0]
        count += batch.shape[0]
    model.eval()
    return total / max(1, count)


def evaluate_pyg(model: KGEModel, kg: KnowledgeGraph, triples: Tensor) -> dict:
    """Filtered MRR / mean rank / Hits@1/3/10 (tail and head averaged, ties averaged) of ``triples``."""
    model.eval()
    ranks = filtered_ranks(pyg_score_fn(model), triples, kg.triples, kg.num_entities, batch_size=1 << 22)
    return mrr_hits(ranks)


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters as stored (float32 for PyG's models)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# One config under the shared protocol


@dataclass
class FitConfig:
    """One training config; ``lr`` applies to float models, ``threshold``/``threshold_final`` to the ternary one."""

    model: str  # a key of PYG_MODELS, or "ternary" (TernaryKGScorer, DistMult score)
    loss: str = "sampled_ce"  # "native" or "sampled_ce" (the ternary scorer has only "sampled_ce")
    dim: int = 64  # PyG hidden_channels (ComplEx/RotatE hold two tables of it per entity) / ternary row width
    lr: float = 1e-3  # Adam learning rate (float models)
    threshold: int = 8  # θ at step 0 (ternary)
    threshold_final: int | None = 16  # θ at the last step of max_epochs, ramped linearly (ternary)
    negatives: int = 256  # shared negatives per step (sampled_ce)
    batch_size: int = 1024
    max_epochs: int = 100
    eval_every: int = 5
    patience: int = 3  # evaluations without a better valid MRR before stopping
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model != "ternary" and self.model not in PYG_MODELS:
            raise ValueError(f"FitConfig.model must be 'ternary' or one of {sorted(PYG_MODELS)}, got {self.model!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"FitConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.model == "ternary" and self.loss != "sampled_ce":
            raise ValueError(f"FitConfig.loss must be 'sampled_ce' for model='ternary', got {self.loss!r}")
        for name in ("dim", "negatives", "batch_size", "max_epochs", "eval_every", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FitConfig.{name} must be a positive int, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"FitConfig.lr must be a positive finite number, got {self.lr!r}")

    def label(self) -> str:
        """The tuned knobs, e.g. ``dim=64 lr=0.001`` or ``dim=64 θ=8->16``."""
        if self.model == "ternary":
            return f"dim={self.dim} θ={self.threshold}->{self.threshold_final or self.threshold}"
        return f"dim={self.dim} lr={self.lr:g}"


@dataclass
class FitReport:
    """Valid and test results of one config, at its early-stopped best epoch."""

    config: dict
    fit: dict  # FitResult as a dict
    valid: dict  # {"mrr": filtered valid MRR of the kept weights}
    test: dict | None  # filtered test metrics (None when not requested)
    param_bytes: int  # inference bytes: float32 parameters, or packed trits + int8 row scales
    seconds: float


def _kept_valid(fit: FitResult, evaluate: Callable[[], float]) -> dict:
    """Valid MRR of the kept weights: the best evaluation's (the weights were copied back, so a
    re-evaluation would repeat it exactly), or a fresh one when no evaluation ran (an early divergence)."""
    return {"mrr": fit.best_valid_mrr if fit.evals and fit.best_epoch else evaluate()}


def train_pyg(cfg: FitConfig, kg: KnowledgeGraph, *, evaluate_test: bool = True,
              log: Callable[[str], None] | None = None) -> tuple[FitReport, KGEModel]:
    """Train PyG model ``cfg.model`` with recipe ``cfg.loss`` under :func:`fit_early_stopping`.

    Seeds: the init and PyG's native negatives draw from torch's global generator, seeded
    with ``cfg.seed`` inside :func:`torch.random.fork_rng` so the caller's global RNG state is
    left as it was; batch order and shared negatives use a ``torch.Generator`` seeded with
    ``cfg.seed``.
    """
    if cfg.model == "ternary":
        raise ValueError("train_pyg got model='ternary'; use train_ternary")
    t0 = time.perf_counter()
    split = kg.split()
    train = split.train.long()
    if train.shape[0] == 0 or split.valid.shape[0] == 0:
        raise ValueError(f"the graph needs train and valid triples, got {train.shape[0]} and {split.valid.shape[0]}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_pyg_model(cfg.model, kg.num_entities, kg.num_relations, cfg.dim)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        fit = fit_early_stopping(
            lambda: pyg_train_epoch(model, opt, train, loss=cfg.loss, batch_size=cfg.batch_size,
                                    negatives=cfg.negatives, generator=gen),
            lambda: evaluate_pyg(model, kg, split.valid)["mrr"], model,
            max_epochs=cfg.max_epochs, eval_every=cfg.eval_every, patience=cfg.patience, log=log)
    valid = _kept_valid(fit, lambda: evaluate_pyg(model, kg, split.valid)["mrr"])
    test = evaluate_pyg(model, kg, split.test) if evaluate_test and len(split.test) else None
    return FitReport(config=dataclasses.asdict(cfg), fit=dataclasses.asdict(fit), valid=valid, test=test,
                     param_bytes=param_bytes(model), seconds=time.perf_counter() - t0), model


def train_ternary(cfg: FitConfig, kg: KnowledgeGraph, *, evaluate_test: bool = True,
                  log: Callable[[str], None] | None = None):
    """Train the ternary scorer (kg/task.py's build_scorer, optimizer and train_epoch; no KG
    codebook) under :func:`fit_early_stopping`. The θ ramp spans ``cfg.max_epochs``, as in
    ``train_kg``; an early stop ends it part-way. Returns ``(FitReport, scorer)``."""
    if cfg.model != "ternary":
        raise ValueError(f"train_ternary got model={cfg.model!r}; use train_pyg")
    t0 = time.perf_counter()
    split = kg.split()
    train = split.train.long()
    if train.shape[0] == 0 or split.valid.shape[0] == 0:
        raise ValueError(f"the graph needs train and valid triples, got {train.shape[0]} and {split.valid.shape[0]}")
    task_cfg = KGTrainConfig(epochs=cfg.max_epochs, batch_size=cfg.batch_size, dim=cfg.dim, negatives=cfg.negatives,
                             threshold=cfg.threshold, threshold_final=cfg.threshold_final, kg_codebook_size=0,
                             eval_every=cfg.eval_every, seed=cfg.seed, progress=False)
    scorer = build_scorer(task_cfg, kg.num_entities, kg.num_relations)
    opt = build_kg_optimizer(scorer, task_cfg, cfg.max_epochs * task_cfg.steps_per_epoch(train.shape[0]))
    gen = torch.Generator().manual_seed(cfg.seed)
    fit = fit_early_stopping(lambda: train_epoch(scorer, opt, train, task_cfg, gen)[0],
                             lambda: evaluate_scorer(scorer, kg, split.valid)["mrr"], scorer,
                             max_epochs=cfg.max_epochs, eval_every=cfg.eval_every, patience=cfg.patience, log=log)
    valid = _kept_valid(fit, lambda: evaluate_scorer(scorer, kg, split.valid)["mrr"])
    test = evaluate_scorer(scorer, kg, split.test) if evaluate_test and len(split.test) else None
    return FitReport(config=dataclasses.asdict(cfg), fit=dataclasses.asdict(fit), valid=valid, test=test,
                     param_bytes=scorer_bytes(scorer)[0], seconds=time.perf_counter() - t0), scorer


def train_config(cfg: FitConfig, kg: KnowledgeGraph, *, evaluate_test: bool = True,
                 log: Callable[[str], None] | None = None):
    """:func:`train_ternary` or :func:`train_pyg`, by ``cfg.model``."""
    fn = train_ternary if cfg.model == "ternary" else train_pyg
    return fn(cfg, kg, evaluate_test=evaluate_test, log=log)
