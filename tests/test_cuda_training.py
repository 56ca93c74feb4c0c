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


def _small_model(weights: str = "ternary"):
    cfg = get_preset("small")
    model = build_model(cfg, weights=weights, device="cuda", seed=0, compute_dtype=torch.bfloat16)
    opt = build_optimizer(model, TrainConfig(preset="small", weights=weights, device="cuda"))
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
    before = (gu.weight.packed.clone() if weights == "ternary" else gu.weight.detach().clone())
    losses = []
    for step in range(4):
        out, stats, _ = train_step(model, opt, *_batch(step))
        assert out.logits.dtype == torch.bfloat16 and out.lm_loss.dtype == torch.float32
        losses.append(float(out.lm_loss))
    assert all(math.isfinite(v) for v in losses) and abs(losses[0] - math.log(256)) < 1.0, losses
    after = gu.weight.packed if weights == "ternary" else gu.weight.detach()
    assert not torch.equal(before, after), "the grouped experts did not learn"
    if weights == "ternary":
        assert int(stats.flips) > 0


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
    assert math.isfinite(float(out.lm_loss)) and int(stats.flips) >= 0
