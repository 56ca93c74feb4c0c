"""Generation: sampling filters, the KV-cached decode loop against full forwards, and the CLI."""

import ast
import gc
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import sysconfig
import weakref

import pytest
import torch

from ternary_graph.cli import main
from ternary_graph.config import get_preset
from ternary_graph.models.decode_graph import DecodeGraph, StepDecoder, clear_decode_graphs, decode_graph
from ternary_graph.models.generate import check_sampling_args, decode_stream, filter_top_k, filter_top_p, sample_next
from ternary_graph.models.model import build_model
from ternary_graph.nn.attention import KVCache, apply_rotary
from ternary_graph.nn.grouped import FloatGroupedLinear
from ternary_graph.train.loop import load_model_from_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
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


# --- the fixed-shape decode step (the one the CUDA graph captures), run eagerly ------------------
@pytest.mark.parametrize("weights", ["ternary", "float"])
def test_decode_step_logits_match_a_full_forward_at_every_position(weights):
    """Prefill 5 bytes, then one fixed-shape step per byte up to the last position of max_seq_len:
    each step's logits are those of a full forward over the same prefix."""
    model = build_model(SMALL, weights=weights, seed=3).eval()
    ids = prompt_ids(2, SMALL.max_seq_len, seed=1)
    with torch.no_grad():
        full = model(ids).logits
    decoder = StepDecoder(model, 2)
    got = [decoder.prefill(ids[:, :5])]
    for t in range(5, SMALL.max_seq_len):
        got.append(decoder.step(ids[:, t]))
    assert decoder.length == SMALL.max_seq_len
    torch.testing.assert_close(torch.stack(got, dim=1), full[:, 4:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", ["ternary", "float"])
@pytest.mark.parametrize("prefix", [1, 17, 63])
def test_one_decode_step_after_a_prefill_matches_a_full_forward(weights, prefix):
    model = build_model(SMALL, weights=weights, seed=9).eval()
    ids = prompt_ids(1, prefix + 1, seed=prefix)
    with torch.no_grad():
        expected = model(ids).logits[:, -1]
        cache = model.new_kv_cache(1)
        model(ids[:, :prefix], kv_cache=cache)
        position = torch.tensor(prefix)
        got = model.decode_step(ids[:, prefix:], cache, position)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert cache[0].length == prefix and int(position) == prefix  # decode_step changes no host state


def test_host_length_and_device_position_agree():
    model = build_model(SMALL, seed=2).eval()
    decoder = StepDecoder(model, 1)
    decoder.prefill(prompt_ids(1, SMALL.max_seq_len - 3))
    assert int(decoder.position) == decoder.length == SMALL.max_seq_len - 3
    for _ in range(3):
        decoder.step(torch.tensor([7]))
        assert int(decoder.position) == decoder.length
        assert all(cache.length == decoder.length for cache in decoder.caches)
    with pytest.raises(ValueError, match="the KV cache holds 64 positions, its max_len=64: no room for another token"):
        decoder.step(torch.tensor([7]))
    assert int(decoder.position) == decoder.length == 64  # the refused step changed nothing


def test_a_new_prefill_restarts_the_decoder():
    """A decoder is reused for every generation (the CUDA graph's caches are fixed): stale keys
    and values past the new prompt are masked out, so a restart equals a fresh decoder."""
    model = build_model(SMALL, seed=4).eval()
    used, fresh = StepDecoder(model, 2), StepDecoder(model, 2)
    used.prefill(prompt_ids(2, 30, seed=5))
    for t in range(6):
        used.step(torch.tensor([t, 255 - t]))
    ids = prompt_ids(2, 8, seed=6)
    torch.testing.assert_close(used.prefill(ids), fresh.prefill(ids), rtol=0, atol=0)
    assert used.length == 8 and int(used.position) == 8
    for t in range(4):
        token = torch.tensor([t, 3 * t])
        torch.testing.assert_close(used.step(token), fresh.step(token), rtol=0, atol=0)


def test_decode_step_and_decoder_refuse_bad_arguments():
    model = build_model(SMALL, seed=1)
    with pytest.raises(ValueError, match="the decode step needs the model in eval mode"):
        StepDecoder(model, 1)
    model.eval()
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        StepDecoder(model, 0)
    cache = model.new_kv_cache(1)
    with pytest.raises(ValueError, match=r"ids must have shape \(batch, 1\), got \(1, 2\)"):
        model.decode_step(torch.zeros(1, 2, dtype=torch.long), cache, torch.tensor(0))
    with pytest.raises(ValueError, match="position must be a 0-dim int64 tensor, got int"):
        model.decode_step(torch.zeros(1, 1, dtype=torch.long), cache, 0)
    with pytest.raises(ValueError, match=r"position must be a 0-dim int64 tensor, got dtype=torch.int64 shape=\(1,\)"):
        model.decode_step(torch.zeros(1, 1, dtype=torch.long), cache, torch.tensor([0]))
    decoder = StepDecoder(model, 2)
    with pytest.raises(ValueError, match=r"ids must have shape \(batch_size=2, T >= 1\), got \(1, 4\)"):
        decoder.prefill(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token must hold one id per row \(batch_size=2\), got \(3,\)"):
        decoder.step(torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("weights,backend", [("ternary", "aot_eager"), ("float", "aot_eager"),
                                            pytest.param("ternary", "inductor", marks=pytest.mark.slow)])
def test_compiled_decode_step_matches_a_full_forward_without_recompiling(weights, backend):
    """The step under torch.compile: one compilation at the first step (fixed shapes; the
    position and the group sizes stay on the device), the full forward's logits at every later
    position, and no reference to the model once the decoder is gone."""
    model = build_model(SMALL, weights=weights, seed=3).eval()
    ids = prompt_ids(2, SMALL.max_seq_len, seed=1)
    with torch.no_grad():
        full = model(ids).logits
    decoder = StepDecoder(model, 2, compile_backend=backend)
    got = [decoder.prefill(ids[:, :5]), decoder.step(ids[:, 5])]
    torch.compiler.set_stance("fail_on_recompile")
    try:
        got += [decoder.step(ids[:, t]) for t in range(6, SMALL.max_seq_len)]
    finally:
        torch.compiler.set_stance("default")
    torch.testing.assert_close(torch.stack(got, dim=1), full[:, 4:], rtol=1e-5, atol=1e-5)
    alive = weakref.ref(model)
    del model, decoder
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("weights", ["ternary", "float"])
def test_decode_step_traces_as_one_graph(weights):
    """No graph break anywhere in the step (fullgraph=True raises at the first), so inductor can
    fuse across layers and a CUDA graph records one compiled region."""
    model = build_model(SMALL, weights=weights, seed=2).eval()
    decoder = StepDecoder(model, 1)
    decoder.prefill(prompt_ids(1, 7))
    step = torch.compile(model.decode_step, backend="aot_eager", dynamic=False, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(step(decoder.ids, decoder.caches, decoder.position),
                                   model.decode_step(decoder.ids, decoder.caches, decoder.position),
                                   rtol=1e-5, atol=1e-5)  # float: the static grouped form sums in another order


def test_models_of_one_configuration_share_the_compiled_step():
    """The compiled step guards on shapes, not on the model: a second model of the same
    configuration (other weights) steps without compiling again, and gets its own logits."""
    ids = prompt_ids(1, 6)
    logits = []
    try:
        for seed in (20, 21):
            model = build_model(SMALL, seed=seed).eval()
            decoder = StepDecoder(model, 1, compile_backend="aot_eager")
            decoder.prefill(ids)
            logits.append(decoder.step(torch.tensor([9])))
            torch.compiler.set_stance("fail_on_recompile")  # from the second model's first step on
    finally:
        torch.compiler.set_stance("default")
    with torch.no_grad():
        torch.testing.assert_close(logits[1], model(torch.cat([ids, torch.tensor([[9]])], 1)).logits[:, -1],
                                   rtol=1e-5, atol=1e-5)
    assert not torch.equal(logits[0], logits[1])


def test_compile_backend_is_checked():
    model = build_model(SMALL, seed=1).eval()
    with pytest.raises(ValueError, match="compile_backend must be None or a torch.compile backend .*got 'fast'"):
        StepDecoder(model, 1, compile_backend="fast")
    with pytest.raises(ValueError, match="compile_backend='cudagraphs' would capture CUDA graphs of its own"):
        StepDecoder(model, 1, compile_backend="cudagraphs")


@pytest.mark.parametrize("splits", [([2, 0, 0, 0], [0, 1, 0, 1], [1, 1, 0, 0]),  # rows <= groups: gathered
                                    ([11, 0, 0, 0], [0, 1, 9, 1], [0, 10, 0, 1])])  # more: masked products
def test_float_grouped_linear_compiles_without_reading_the_group_sizes(splits, gen):
    """The static form equals the host-sliced eager one, empty groups included, and one graph
    serves every split of the rows among the groups."""
    layer = FloatGroupedLinear(4, 6, 5)
    compiled = torch.compile(layer, backend="aot_eager", dynamic=False, fullgraph=True)
    try:
        for counts in splits:
            x = torch.randn(sum(counts), 6, generator=gen)
            offsets = torch.tensor(counts).cumsum(0)
            with torch.no_grad():
                torch.testing.assert_close(compiled(x, offsets), layer(x, offsets), rtol=1e-6, atol=1e-6)
            torch.compiler.set_stance("fail_on_recompile")
    finally:
        torch.compiler.set_stance("default")


def test_kv_cache_write_at_checks_the_shape():
    cache = KVCache.empty(1, 2, 4, 8, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"k and v must have shape \(batch=1, heads=2, 1, head_dim=8\), "
                                         r"got \(1, 2, 2, 8\)"):
        cache.write_at(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8), torch.tensor(0))
    cache.write_at(torch.ones(1, 2, 1, 8), torch.full((1, 2, 1, 8), 2.0), torch.tensor(3))
    assert cache.length == 0 and float(cache.k[0, :, 3].min()) == 1.0 and float(cache.v[0, :, 3].min()) == 2.0
    assert float(cache.k[0, :, :3].abs().sum()) == 0.0


def test_cuda_graph_argument_is_checked():
    model = build_model(SMALL, seed=1)
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device, got cpu"):
        model.generate(prompt_ids(1, 4), 2, cuda_graph=True)
    with pytest.raises(ValueError, match=r"cuda_graph must be True, False or None \(auto\), got 'yes'"):
        decode_stream(model, prompt_ids(1, 4), 2, cuda_graph="yes")
    with pytest.raises(ValueError, match="a CUDA-graph decode step needs a model on a CUDA device, got cpu"):
        DecodeGraph(model.eval(), 1)
    assert torch.equal(model.generate(prompt_ids(1, 4), 3, temperature=0, cuda_graph=False),
                       model.generate(prompt_ids(1, 4), 3, temperature=0))


# --- the CUDA graph (GPU only) -------------------------------------------------------------------
def cuda_model(weights: str, seed: int, dtype: torch.dtype = torch.bfloat16):
    model = build_model(SMALL, weights=weights, seed=seed, device="cuda", compute_dtype=dtype)
    return (model.to(torch.bfloat16) if weights == "float" else model).eval()


@pytest.mark.cuda
@pytest.mark.parametrize("weights,prepared", [("ternary", False), ("ternary", True), ("float", False)])
def test_cuda_graph_decoding_equals_the_eager_step(weights, prepared):
    model = cuda_model(weights, seed=12)
    if prepared:
        model.prepare_inference()
    ids = prompt_ids(2, 9, seed=3).cuda()
    eager, graph = StepDecoder(model, 2), DecodeGraph(model, 2)
    torch.testing.assert_close(graph.prefill(ids), eager.prefill(ids), rtol=0, atol=0)
    for t in range(SMALL.max_seq_len - 9):
        token = torch.tensor([t, (7 * t) % 256], device="cuda")
        # The same kernels on the same inputs; the split-K GEMVs of the decode copies add their
        # partial sums with atomics, whose order may change the last bit of a bf16 output.
        torch.testing.assert_close(graph.step(token), eager.step(token), rtol=2e-2, atol=2e-2)
        assert graph.length == eager.length == t + 10
    assert int(graph.position) == graph.length == SMALL.max_seq_len
    with pytest.raises(ValueError, match="no room for another token"):
        graph.step(torch.tensor([0, 0], device="cuda"))
    out = model.generate(ids, 20, temperature=0)  # auto: the cached graph
    assert out.shape == (2, 29) and torch.equal(out[:, :9], ids)
    if weights == "float":  # no atomics anywhere: the greedy bytes are exactly the eager loop's
        assert torch.equal(out, model.generate(ids, 20, temperature=0, cuda_graph=False))


@pytest.mark.cuda
@pytest.mark.parametrize("weights", ["ternary", "float"])
def test_compiled_cuda_graph_decoding_equals_the_eager_step(weights):
    """Inductor's fused step, recorded in the CUDA graph: the eager step's logits (bf16 tolerance:
    fused elementwise ops round differently) and its greedy bytes, with no recompilation."""
    model = cuda_model(weights, seed=12)
    if weights == "ternary":
        model.prepare_inference()
    ids = prompt_ids(2, 9, seed=3).cuda()
    eager, graph = StepDecoder(model, 2), DecodeGraph(model, 2, compile_backend="inductor")
    torch.testing.assert_close(graph.prefill(ids), eager.prefill(ids), rtol=0, atol=0)
    torch.compiler.set_stance("fail_on_recompile")
    try:
        for t in range(20):
            token = torch.tensor([t, (7 * t) % 256], device="cuda")
            torch.testing.assert_close(graph.step(token), eager.step(token), rtol=3e-2, atol=3e-2)
        first = model.generate(ids, 20, top_k=8, seed=5, compile_backend="inductor")  # the cached graph
        again = model.generate(ids, 20, top_k=8, seed=5, compile_backend="inductor")
    finally:
        torch.compiler.set_stance("default")
    assert first.shape == (2, 29) and torch.equal(first[:, :9], ids) and torch.equal(first, again)


@pytest.mark.cuda
def test_cached_cuda_graph_is_reused_and_recaptured_when_the_weights_move():
    model = cuda_model("ternary", seed=14)
    clear_decode_graphs(model)
    first = decode_graph(model, 1)
    assert decode_graph(model, 1) is not first  # busy: a private graph for an interleaved generation
    first.release()
    assert decode_graph(model, 1) is first  # free and current: reused
    first.release()
    model.prepare_inference()  # new decode copies: the graph would read the old ones
    second = decode_graph(model, 1)
    assert second is not first and second.matches(model) and not first.matches(model)
    second.release()
    model.generate(prompt_ids(1, 5).cuda(), 8, top_k=5, seed=3)  # auto: replays the cached graph, releases it
    assert not second.busy and decode_graph(model, 1) is second
    second.release()
    model.train()  # drops the decode copies
    model.generate(prompt_ids(1, 5).cuda(), 8, seed=3)
    assert decode_graph(model, 1) is not second


# --- the CLI ------------------------------------------------------------------------------------
def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "ternary_graph.cli", *args], capture_output=True, timeout=timeout,
                          env=env, cwd=REPO)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
    """A tiny checkpoint trained for a few steps on the stdlib json package, and the train run."""
    root = tmp_path_factory.mktemp("gen")
    shutil.copytree(STDLIB / "json", root / "corpus", ignore=shutil.ignore_patterns("__pycache__"))
    run = root / "run"
    res = cli("train", "--preset", "tiny", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
              "--eval-every", "3", "--checkpoint-every", "3", "--eval-windows", "4", "--no-progress",
              "--threads", "1", "--data", str(root / "corpus"), "--out", str(run))
    assert res.returncode == 0, res.stderr.decode()
    return run, res


def test_train_ends_with_a_sample_continuation(trained):
    out = trained[1].stdout.decode()
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  sample  "))
    assert lines[at].startswith("  sample              64 bytes, temperature 0.8, seed 0 (")
    prompt, continuation = lines[at + 1], lines[at + 2]
    assert prompt.startswith("    prompt            ") and len(ast.literal_eval(prompt.split(maxsplit=1)[1])) > 0
    assert continuation.startswith("    continuation      ") and len(ast.literal_eval(continuation.split(maxsplit=1)[1])) > 0


def test_cli_streams_the_seeded_continuation_of_the_checkpoint(trained):
    run = trained[0]
    res = cli("generate", "--checkpoint", str(run), "--prompt", "import json\n", "--max-new-bytes", "20",
              "--seed", "3", "--top-k", "40", "--threads", "1")
    assert res.returncode == 0, res.stderr.decode()
    model = load_model_from_checkpoint(run)[0]
    ids = torch.tensor([list(b"import json\n")])
    expected = bytes(model.generate(ids, 20, top_k=40, seed=3)[0, ids.shape[1]:].tolist())
    assert res.stdout == expected.decode("utf-8", errors="replace").encode("utf-8")
    err = res.stderr.decode()
    assert "20 bytes in" in err and "tokens/s" in err and "12-byte prompt" in err


@pytest.mark.cuda
def test_cli_generates_on_cuda_with_the_decode_copies_and_a_compiled_step(trained):
    run = trained[0]
    res = cli("generate", "--checkpoint", str(run), "--prompt", "import json\n", "--max-new-bytes", "20",
              "--temperature", "0", "--device", "cuda", "--compile")
    assert res.returncode == 0, res.stderr.decode()
    assert len(res.stdout) > 0 and "20 bytes in" in res.stderr.decode()


def test_ctrl_c_prints_what_was_generated_and_exits_130(trained):
    """SIGINT once the stream has started. A loaded machine can deschedule this process for the
    whole (sub-second) generation between the first byte and the signal; such a run ends with
    all 500 bytes and exit 0, and the check is repeated (the interrupt must land at least once)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-m", "ternary_graph.cli", "generate", "--checkpoint",
                                 str(trained[0]), "--prompt", "a", "--max-new-bytes", "500", "--temperature", "0",
                                 "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO,
                                # a suite started in the background inherits SIGINT ignored (the Unix
                                # convention generate honours, as Python does); the user at a terminal does not
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        first = proc.stdout.read(1)  # the stream has started: generation is under way
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
        err = err.decode()
        if proc.returncode == 0 and err.startswith("500 bytes in"):
            continue  # finished before the signal arrived
        break
    assert proc.returncode == 130, err
    assert err.startswith("interrupted: ") and "Traceback" not in err
    written = int(err.split()[1])
    assert 1 <= written < 500 and len(first + rest) >= 1


def run_main(capsys, *args: str) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("extra,needle", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "x", "--max-new-bytes", "0"], "--max-new-bytes must be an int >= 1, got 0"),
    (["--prompt", "x", "--max-new-bytes", "-5"], "--max-new-bytes must be an int >= 1, got -5"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be a finite number >= 0, got -1.0"),
    (["--prompt", "x", "--top-p", "0"], r"--top-p must lie in (0, 1] (or None), got 0.0"),
    (["--prompt", "x", "--top-p", "1.5"], r"--top-p must lie in (0, 1] (or None), got 1.5"),
    (["--prompt", "x", "--top-k", "0"], "--top-k must be an int >= 1 (or None), got 0"),
    (["--prompt", "x", "--device", "nonsense"], "--device must be auto, cpu, cuda or cuda:N, got 'nonsense'"),
])
def test_bad_generate_arguments_get_one_line_errors(capsys, trained, extra, needle):
    rc, err = run_main(capsys, "generate", "--checkpoint", str(trained[0]), *extra)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("ternary-graph generate: error: ") and needle in err, err


def test_empty_or_missing_prompt_file_is_named(capsys, trained, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    rc, err = run_main(capsys, "generate", "--checkpoint", str(trained[0]), "--prompt-file", str(empty))
    assert rc == 2 and f"--prompt-file {str(empty)!r} is empty" in err
    rc, err = run_main(capsys, "generate", "--checkpoint", str(trained[0]), "--prompt-file", str(tmp_path / "nope"))
    assert rc == 2 and f"--prompt-file {str(tmp_path / 'nope')!r}: cannot read it" in err


def test_prompt_longer_than_max_seq_len_says_the_maximum(capsys, trained, tmp_path):
    long = tmp_path / "long.txt"
    long.write_bytes(b"x" * 600)
    rc, err = run_main(capsys, "generate", "--checkpoint", str(trained[0]), "--prompt-file", str(long))
    assert rc == 2 and "has 600 bytes; the model's max_seq_len is 512, so a prompt may have at most 511" in err, err


def test_prompt_plus_new_bytes_beyond_max_seq_len_is_refused_up_front(capsys, trained):
    rc, err = run_main(capsys, "generate", "--checkpoint", str(trained[0]), "--prompt", "x" * 500,
                       "--max-new-bytes", "20")
    assert rc == 2 and "--max-new-bytes 20 after a 500-byte prompt exceeds the model's max_seq_len=512" in err
    assert "at most 12 new bytes fit" in err


def test_checkpoint_folder_without_a_checkpoint(capsys, tmp_path):
    rc, err = run_main(capsys, "generate", "--checkpoint", str(tmp_path), "--prompt", "x")
    assert rc == 2 and err.startswith("ternary-graph generate: error: --checkpoint") and "no complete checkpoint" in err
    assert str(tmp_path) in err and err.count("\n") == 1


def test_decode_op_census_names_the_library_functions_of_a_step():
    """experiments/decode_ops.py: every op of a decode step is attributed to the library function
    that issued it, views are not counted, and the routing and attention functions are among them."""
    sys.path.insert(0, str(REPO / "experiments"))
    import decode_ops

    census = decode_ops.decode_step_census(SMALL, "float")
    assert not set(census.by_op) & decode_ops.NO_KERNEL_OPS
    one_call = decode_ops.OpCensus()  # q and k of every layer rotate once per step
    head_dim = SMALL.dim // SMALL.n_heads
    with one_call, torch.no_grad():
        apply_rotary(torch.zeros(1, SMALL.n_heads, 1, head_dim, dtype=torch.bfloat16),
                     torch.ones(1, head_dim // 2), torch.zeros(1, head_dim // 2))
    assert census.by_site["nn/attention.py:apply_rotary"] == 2 * SMALL.n_layers * one_call.by_site[
        "nn/attention.py:apply_rotary"] > 0
    assert census.by_site["graph/routing.py:select_experts"] > 0
    assert census.by_site["nn/attention.py:rms_norm"] > 0


def test_bench_decode_counts_each_weight_product_once():
    """experiments/bench_decode.py: the decode GEMV kernels count by name, the float products by
    their outermost launching op (aten::linear's inner aten::mm and its cuBLAS kernel are not
    counted again), other kernels not at all; and the bound that split puts on the ratio."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    sys.path.insert(0, str(REPO / "experiments"))
    import bench_decode

    def op(name, us, parent=None):
        return SimpleNamespace(name=name, device_type=DeviceType.CPU, device_time_total=us, cpu_parent=parent)

    def kernel(name, us):
        return SimpleNamespace(name=name, device_type=DeviceType.CUDA, device_time_total=us, cpu_parent=None)

    linear = op("aten::linear", 5.0)
    events = [linear, op("aten::mm", 5.0, linear), kernel("sm90_xmma_gemm_bf16", 5.0),
              op("aten::add", 2.0), kernel("elementwise_add", 2.0),
              kernel("_gemv2_i8f_kernel", 3.0), kernel("_pack_x16_kernel", 1.0),
              op("aten::_grouped_mm", 7.0, op("aten::index_select", 0.0))]
    assert bench_decode.linear_kernel_us(events) == 5.0 + 3.0 + 1.0 + 7.0
    assert bench_decode.free_products_bound(2.5, 0.5) == pytest.approx(1.25)
    assert bench_decode.free_products_bound(1.0, 1.0) == float("inf")


def test_decode_kernel_profile_refuses_bad_steps_and_a_machine_without_a_gpu(capsys):
    sys.path.insert(0, str(REPO / "experiments"))
    import decode_kernels

    with pytest.raises(SystemExit):
        decode_kernels.main(["tiny", "ternary", "--steps", "0"])
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert decode_kernels.main(["tiny", "ternary"]) == 2
        assert "needs a GPU" in capsys.readouterr().err


def test_decode_kernel_groups_name_the_decode_gemvs_and_not_the_kernels_inductor_fused_around_them(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "experiments"))
    import decode_kernels

    kernels = [{"name": n, "ms_per_step": ms, "launches_per_step": 1.0} for n, ms in (
        ("_gemv2_i8f_kernel", 0.5), ("nvjet_sm90_tst_64x8", 0.25), ("triton_poi_fused_decode_gemv_mul_silu", 4.0),
        ("_tile_min_kernel", 2.0), ("_tile_min_fma_kernel", 0.5), ("_refine_kernel", 1.0),
        ("void at::native::sbtopk::gatherTopK<float>", 8.0), ("cudnn_generated_fort_native_sdpa_sm80", 16.0))]
    assert decode_kernels.group_ms(kernels) == {"weight products": 0.75, "VQ search": 3.5, "top-k / sorts": 8.0,
                                                 "attention": 16.0, "other": 4.0}
    table = {"preset": "tiny", "weights": "ternary", "backend": None, "device": "X", "total_ms_per_step": 32.25,
             "kernels": kernels}
    (tmp_path / "t.json").write_text(json.dumps(table))
    assert decode_kernels.main(["--from", str(tmp_path / "t.json"), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "32.250 ms of kernels per step, 8 launches" in out and "weight products 0.750" in out


@pytest.mark.cuda
def test_decode_kernel_profile_sums_the_kernels_of_a_step():
    sys.path.insert(0, str(REPO / "experiments"))
    import decode_kernels

    table = decode_kernels.kernel_table("tiny", "ternary", steps=2, backend=None, prompt_bytes=8)
    times = [k["ms_per_step"] for k in table["kernels"]]
    assert table["total_ms_per_step"] == pytest.approx(sum(times)) and min(times) > 0
    assert times == sorted(times, reverse=True)
    assert any("gemv" in k["name"] for k in table["kernels"])  # the decode copies' GEMVs ran
