"""Generation: sampling filters, the KV-cached decode loop against full forwards, and the CLI."""

import ast
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import sysconfig

import pytest
import torch

from ternary_graph.cli import main
from ternary_graph.config import get_preset
from ternary_graph.models.generate import check_sampling_args, filter_top_k, filter_top_p, sample_next
from ternary_graph.models.model import build_model
from ternary_graph.nn.attention import KVCache
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


def test_ctrl_c_prints_what_was_generated_and_exits_130(trained):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "ternary_graph.cli", "generate", "--checkpoint", str(trained[0]),
                             "--prompt", "a", "--max-new-bytes", "500", "--temperature", "0", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    first = proc.stdout.read(1)  # the stream has started: generation is under way
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    err = err.decode()
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
