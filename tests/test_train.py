"""End-to-end training runs through the CLI, on real text: outputs, resume, corruption."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import pytest
from safetensors.torch import load_file

REPO = pathlib.Path(__file__).resolve().parents[1]
STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
FAST = ["--batch-size", "2", "--seq-len", "32", "--eval-windows", "4", "--no-progress", "--threads", "1",
        "--preset", "tiny"]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "ternary_graph.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    """A small real corpus: the stdlib json package, plus a binary and an empty file to skip."""
    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(STDLIB / "json", root / "json", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (root / "empty.txt").write_text("")
    return root


def test_train_writes_metrics_plots_config_and_checkpoints(corpus, tmp_path):
    out = tmp_path / "run"
    res = cli("train", *FAST, "--steps", "6", "--eval-every", "3", "--checkpoint-every", "3", "--log-every", "1",
              "--data", str(corpus), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "validation loss" in res.stdout and "bits/byte" in res.stdout
    for name in ("metrics.jsonl", "loss.png", "routing.png", "config.json", "ckpt_00000006.json",
                 "ckpt_00000006.safetensors", "ckpt_00000003.json"):
        assert (out / name).exists(), name
    assert (out / "loss.png").stat().st_size > 1000
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert {"step", "train_loss", "train_bits_per_byte", "tokens_per_s", "memory_bytes", "threshold",
                "flip_rate", "routing"} <= set(r)
        assert {"active_edges", "via_edge_fraction", "load_max_share"} <= set(r["routing"]["layer0"])
    assert {"val_loss", "val_bits_per_byte"} <= set(records[2]) and "val_loss" not in records[1]
    config = json.loads((out / "config.json").read_text())
    assert config["corpus"]["files_skipped_binary"] + config["corpus"]["files_skipped_undecodable"] == 1
    assert config["corpus"]["files_skipped_empty"] == 1
    # tensors are safetensors, all integer for the ternary model
    tensors = load_file(out / "ckpt_00000006.safetensors")
    assert not any(v.dtype.is_floating_point for k, v in tensors.items() if k.startswith("model."))


def _final_model(run: pathlib.Path, step: int) -> dict:
    return {k: v for k, v in load_file(run / f"ckpt_{step:08d}.safetensors").items() if not k.startswith("rng.")}


def test_resume_after_sigkill_is_bit_identical(corpus, tmp_path):
    args = [*FAST, "--steps", "8", "--eval-every", "4", "--checkpoint-every", "4", "--data", str(corpus)]
    straight = tmp_path / "straight"
    assert cli("train", *args, "--out", str(straight)).returncode == 0

    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "ternary_graph.cli", "train", *args, "--out", str(killed)],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "ckpt_00000004.json").exists():
        assert proc.poll() is None, "run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (killed / "ckpt_00000008.json").unlink(missing_ok=True)  # if it got that far, resume from step 4 anyway
    (killed / "ckpt_00000008.safetensors").unlink(missing_ok=True)
    res = cli("train", *args, "--out", str(killed), "--resume")
    assert res.returncode == 0, res.stderr
    a, b = _final_model(straight, 8), _final_model(killed, 8)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and bool((a[key] == b[key]).all()), key
    steps_a = [json.loads(x)["step"] for x in (straight / "metrics.jsonl").read_text().splitlines()]
    steps_b = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps_a == steps_b


def test_corrupted_checkpoint_gives_a_clear_error_naming_the_file(corpus, tmp_path):
    out = tmp_path / "run"
    assert cli("train", *FAST, "--steps", "2", "--eval-every", "2", "--checkpoint-every", "2", "--data", str(corpus),
               "--out", str(out)).returncode == 0
    tensor_file = out / "ckpt_00000002.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    res = cli("eval", "--checkpoint", str(out))
    assert res.returncode != 0
    assert "ckpt_00000002" in res.stderr
    tensor_file.write_bytes(bytes(data[: len(data) // 3]))
    res = cli("eval", "--checkpoint", str(out / "ckpt_00000002.json"))
    assert res.returncode != 0 and "ckpt_00000002" in res.stderr


def test_eval_reports_nats_and_bits(corpus, tmp_path):
    out = tmp_path / "run"
    assert cli("train", *FAST, "--steps", "2", "--eval-every", "2", "--checkpoint-every", "2", "--data", str(corpus),
               "--out", str(out)).returncode == 0
    res = cli("eval", "--checkpoint", str(out))
    assert res.returncode == 0, res.stderr
    nats, bits = map(float, re.search(r"([\d.]+) nats/byte = ([\d.]+) bits/byte", res.stdout).groups())
    assert bits == pytest.approx(nats / 0.6931471805599453, abs=2e-4)


def test_float_baseline_trains_through_the_same_cli(corpus, tmp_path):
    out = tmp_path / "float"
    res = cli("train", *FAST, "--weights", "float", "--steps", "3", "--eval-every", "3", "--checkpoint-every", "3",
              "--data", str(corpus), "--out", str(out))
    assert res.returncode == 0, res.stderr
    tensors = load_file(out / "ckpt_00000003.safetensors")
    assert any(k.startswith("optim.float.") for k in tensors)  # AdamW moments are checkpointed


def test_bad_arguments_get_clear_errors(tmp_path):
    res = cli("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--steps", "1")
    assert res.returncode != 0 and "missing" in res.stderr
    res = cli("train", "--steps", "0", "--out", str(tmp_path / "y"))
    assert res.returncode != 0 and "steps" in res.stderr
    res = cli("train", "--resume", "--out", str(tmp_path / "empty"), "--steps", "1")
    assert res.returncode != 0 and "checkpoint" in res.stderr


def test_readme_main_command_runs_with_few_steps(tmp_path):
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^(bash run\.sh \w+)", readme, flags=re.M)
    assert commands[:2] == ["bash run.sh train", "bash run.sh test"]
    res = subprocess.run(commands[0].split() + ["--steps", "2", "--eval-every", "2", "--checkpoint-every", "2",
                                                "--batch-size", "2", "--seq-len", "32", "--eval-windows", "2",
                                                "--no-progress", "--out", str(tmp_path / "readme")],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "validation loss" in res.stdout


def test_lm_plus_kg_task_logs_the_kg_loss(corpus, tmp_path):
    out = tmp_path / "lmkg"
    res = cli("train", *FAST, "--task", "lm+kg", "--steps", "2", "--eval-every", "2", "--checkpoint-every", "2",
              "--log-every", "1", "--data", str(corpus), "--out", str(out))
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kg_loss"] > 0 for r in records)


def test_kg_task_trains_the_ternary_scorer_above_random(tmp_path):
    res = cli("train", "--task", "kg", "--epochs", "3", "--no-progress", "--out", str(tmp_path / "kg"))
    assert res.returncode == 0, res.stderr
    mrr = float(re.search(r"test filtered MRR\s+([\d.]+)", res.stdout).group(1))
    random_mrr = float(re.search(r"random ranking MRR\s+([\d.]+)", res.stdout).group(1))
    assert mrr > 3 * random_mrr
    # its top predicted links can be drawn into a KG neighbourhood picture
    res = cli("viz", "--checkpoint", str(tmp_path / "kg"), "--what", "kg", "--entity", "json.decoder.JSONDecoder",
              "--kg-scorer", str(tmp_path / "kg"), "--out", str(tmp_path / "pictures"))
    assert res.returncode == 0, res.stderr
    picture = pathlib.Path(res.stdout.strip().splitlines()[-1])
    assert picture.exists() and picture.stat().st_size > 1000
