"""Generation: sampling filters and the KV-cached decode loop against full forwards."""

import pytest
import torch

from ternary_graph.config import get_preset
from ternary_graph.models.generate import check_sampling_args, filter_top_k, filter_top_p, sample_next
from ternary_graph.models.model import build_model
from ternary_graph.nn.attention import KVCache

SMALL = get_preset("tiny").replace(n_layers=2, codebook_size=256, kg_codebook_size=256, expert_hidden=64,
                                   max_seq_len=64)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def prompt_ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def full_forward_greedy(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy continuation without a cache: a full forward over the whole prefix per byte."""
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


# --- sampling filters ---------------------------------------------------------------------------
def test_top_k_keeps_exactly_the_k_largest_logits(gen):
    logits = torch.randn(3, 50, generator=gen)
    out = filter_top_k(logits, 5)
    kept = torch.isfinite(out)
    assert kept.sum(-1).tolist() == [5, 5, 5]
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(5).indices, True))
    assert torch.equal(out[kept], logits[kept])
    assert filter_top_k(logits, 50) is logits


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    logits = probs.log()
    assert torch.isfinite(filter_top_p(logits, 0.8)).tolist() == [[False, True, True, False]]
    assert torch.isfinite(filter_top_p(logits, 0.81)).tolist() == [[False, True, True, True]]
    assert torch.isfinite(filter_top_p(logits, 0.01)).tolist() == [[False, True, False, False]]
    assert filter_top_p(logits, 1.0) is logits


def test_sampling_draws_only_allowed_tokens(gen):
    logits = torch.randn(4, 256, generator=gen).repeat(16, 1)
    top3 = logits.topk(3).indices
    draws = sample_next(logits, 1.0, top_k=3, generator=gen)
    assert bool((draws[:, None] == top3).any(-1).all())
    assert torch.equal(sample_next(logits, 5.0, top_p=1e-6, generator=gen), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 0.0, top_k=7, top_p=0.5), logits.argmax(-1))


@pytest.mark.parametrize("args,needle", [
    ((0, 1.0, None, None), "max_new_tokens must be an int >= 1, got 0"),
    ((-2, 1.0, None, None), "max_new_tokens must be an int >= 1, got -2"),
    ((4, -0.5, None, None), "temperature must be a finite number >= 0, got -0.5"),
    ((4, float("nan"), None, None), "temperature must be a finite number >= 0, got nan"),
    ((4, 1.0, 0, None), "top_k must be an int >= 1"),
    ((4, 1.0, None, 0.0), r"top_p must lie in \(0, 1\]"),
    ((4, 1.0, None, 1.5), r"top_p must lie in \(0, 1\] \(or None\), got 1.5"),
])
def test_bad_sampling_arguments_name_argument_and_value(args, needle):
    with pytest.raises(ValueError, match=needle):
        check_sampling_args(*args)


# --- the decode loop ----------------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["ternary", "float"])
def test_kv_cache_logits_match_a_full_forward(weights):
    model = build_model(SMALL, weights=weights, seed=3).eval()
    ids = prompt_ids(2, 24)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_kv_cache(2)
        # prefill, a multi-token chunk after a prefix (offset causal mask), then single steps
        pieces = [model(ids[:, :9], kv_cache=cache).logits, model(ids[:, 9:14], kv_cache=cache).logits]
        pieces += [model(ids[:, t:t + 1], kv_cache=cache).logits for t in range(14, 24)]
    assert cache[0].length == 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", ["ternary", "float"])
def test_greedy_generation_equals_argmax_of_full_forwards(weights):
    model = build_model(SMALL, weights=weights, seed=4)
    ids = prompt_ids(2, 10)
    out = model.generate(ids, 12, temperature=0)
    assert out.shape == (2, 22) and torch.equal(out[:, :10], ids)
    assert torch.equal(out, full_forward_greedy(model.eval(), ids, 12))


def test_top_k_one_equals_greedy():
    model = build_model(SMALL, seed=5)
    ids = prompt_ids(1, 8)
    assert torch.equal(model.generate(ids, 16, top_k=1, seed=11), model.generate(ids, 16, temperature=0))


def test_generation_is_deterministic_for_a_seed():
    model = build_model(SMALL, seed=6)
    ids = prompt_ids(2, 6)
    a = model.generate(ids, 24, temperature=1.0, top_p=0.95, seed=7)
    b = model.generate(ids, 24, temperature=1.0, top_p=0.95, seed=7)
    c = model.generate(ids, 24, temperature=1.0, top_p=0.95, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generation_changes_no_model_state_and_restores_the_mode():
    model = build_model(SMALL, seed=7)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.generate(prompt_ids(1, 5), 10, seed=0)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # VQ usage, step, load bias, edges, accumulators
    for moe in model.moe_layers():
        code, _, _, load = moe.take_pending()
        assert code.numel() == 0 and load is None  # no votes, no load counts


def test_prompt_plus_new_tokens_beyond_max_seq_len_is_refused():
    model = build_model(SMALL, seed=8)
    with pytest.raises(ValueError, match="prompt length 60 \\+ max_new_tokens 5 exceeds max_seq_len=64"):
        model.generate(prompt_ids(1, 60), 5)


def test_kv_cache_refuses_positions_past_its_length():
    cache = KVCache.empty(1, 2, 4, 8, dtype=torch.float32, device="cpu")
    cache.append(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match="KV cache holds 3 positions; 2 more exceed its max_len=4"):
        cache.append(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8))
