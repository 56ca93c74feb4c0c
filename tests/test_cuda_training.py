"""The GPU training step: bf16 activations end to end, and no host synchronisation inside a step.

CUDA only (skipped without a GPU); run by ``experiments/gpu_train_speed.sh`` on the device.
"""

from __future__ import annotations

import math

import pytest
import torch

from ternary_graph.config import get_preset
from ternary_graph.models.model import build_model
from ternary_graph.train.loop import TrainConfig, build_optimizer, train_step

pytestmark = pytest.mark.cuda


def _small_model(weights: str = "ternary", **rule):
    cfg = get_preset("small")
    model = build_model(cfg, weights=weights, device="cuda", seed=0, compute_dtype=torch.bfloat16)
    opt = build_optimizer(model, TrainConfig(preset="small", weights=weights, device="cuda", **rule))
    model.train()
    return model, opt


def _batch(step: int, B: int = 8, T: int = 256):
    gen = torch.Generator(device="cuda").manual_seed(step)
    ids = torch.randint(0, 256, (B, T + 1), generator=gen, device="cuda")
    return ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("weights", ["ternary", "float"])
def test_bf16_training_steps(weights):
    model, opt = _small_model(weights)
    gu = model.blocks[0].moe.experts.gate_up
    before = gu.weight.detach().clone() if weights == "float" else None
    losses = []
    for step in range(4):
        out, _, _ = train_step(model, opt, *_batch(step))
        assert out.logits.dtype == torch.bfloat16 and out.lm_loss.dtype == torch.float32
        losses.append(float(out.lm_loss))
    assert all(math.isfinite(v) for v in losses) and abs(losses[0] - math.log(256)) < 1.0, losses
    if weights == "float":
        assert not torch.equal(before, gu.weight.detach()), "the grouped experts did not learn"
    else:  # four steps of ±4 votes stay below θ = 24: the votes are there, the flips come later
        assert (gu.weight.T_accum != 0).float().mean() > 0.5, "the grouped experts cast no votes"


def test_train_step_does_not_synchronise_the_host():
    """Two steps of the small preset (forward, backward, optimizer, graph update) under
    ``set_sync_debug_mode('error')``: any host read of a device value raises."""
    model, opt = _small_model()
    train_step(model, opt, *_batch(0))  # warm-up: Triton compiles, allocator settles
    batches = [_batch(1), _batch(2)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches:
            out, stats, _ = train_step(model, opt, x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(float(out.lm_loss)) and int(stats.trits_updated) > 0  # device statistics read after the step


def test_captured_step_matches_eager_steps():
    """The same 5 batches through eager steps and through a CUDA-graph replay (step 0 eager +
    capture, then replays) leave the same trits, the same edges and nearly the same votes
    (CUDA float atomics may tip ties). θ moves every step (4 -> 12): one capture follows it."""
    from ternary_graph.train.capture import CapturedTrainStep

    rule = dict(steps=5, threshold=4, threshold_final=12)
    batches = [_batch(10 + i) for i in range(5)]
    eager, eager_opt = _small_model(**rule)
    losses_eager = [float(train_step(eager, eager_opt, x, y)[0].lm_loss) for x, y in batches]
    graphed, graphed_opt = _small_model(**rule)
    step = CapturedTrainStep(graphed, graphed_opt, train_step)
    losses_graph, thresholds, flips = [], [], 0
    for x, y in batches:
        out, stats = step(x, y)
        losses_graph.append(float(out.lm_loss))
        thresholds.append(stats.threshold)
        flips += int(stats.flips)
    assert step.captures == 1 and graphed_opt.step_count == eager_opt.step_count == 5
    assert thresholds == [graphed_opt.rule.threshold_at(i) for i in range(5)] and len(set(thresholds)) >= 4
    assert flips > 0
    assert losses_graph == pytest.approx(losses_eager, rel=2e-3)
    for (name, a), (_, b) in zip(eager.state_dict().items(), graphed.state_dict().items()):
        if a.numel() == 0:
            continue
        if name.endswith("T_accum"):
            assert (a == b).float().mean() > 0.99, name
        elif name.endswith(("packed", "edge_index", "E")):
            assert (a == b).float().mean() > 0.999, name
    vq_e, vq_g = eager.shared_vq, graphed.shared_vq
    assert int(vq_e.step) == int(vq_g.step) and vq_g._host_step == vq_e._host_step


def test_capture_refuses_what_a_graph_would_freeze():
    from ternary_graph.train.capture import CapturedTrainStep
    from ternary_graph.ternary.optimizer import TernaryOptimizer, UpdateRule

    model, _ = _small_model()
    with pytest.raises(ValueError, match="flip_prob=1.0"):
        CapturedTrainStep(model, TernaryOptimizer(model, UpdateRule(flip_prob=0.5)), train_step)
    float_model, float_opt = _small_model("float")
    with pytest.raises(ValueError, match="ternary models only"):
        CapturedTrainStep(float_model, float_opt, train_step)


@pytest.mark.parametrize("routing", ["frozen", "topk", "hash"])
def test_captured_step_of_each_ablation_router_matches_eager(routing):
    """The routing ablation replays its steps as CUDA graphs: each edge-free router (and its
    balance loss) must capture and replay like the eager step."""
    from ternary_graph.train.capture import CapturedTrainStep

    cfg = get_preset("tiny").replace(routing=routing)
    batches = [_batch(20 + i, B=4, T=64) for i in range(4)]
    losses = {}
    for mode in ("eager", "graph"):
        model = build_model(cfg, device="cuda", seed=0, compute_dtype=torch.bfloat16)
        opt = build_optimizer(model, TrainConfig(device="cuda", routing=routing))
        model.train()
        step = CapturedTrainStep(model, opt, train_step) if mode == "graph" else None
        losses[mode] = [float((step(x, y) if step else train_step(model, opt, x, y))[0].loss) for x, y in batches]
    assert all(math.isfinite(v) for v in losses["graph"])
    assert losses["graph"] == pytest.approx(losses["eager"], rel=2e-3)
