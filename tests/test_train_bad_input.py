"""Bad input to ``ternary-graph train`` / ``eval`` (issue 16, part 3): each case gives one clear
line naming the argument and the value, or works correctly.

Runs that train go through the CLI in a subprocess (as a user runs them); argument errors that
stop before any training call ``main()`` in this process, which is much faster.
"""

import functools
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from ternary_graph.cli import main
from ternary_graph.train.loop import TrainConfig, config_differences

REPO = pathlib.Path(__file__).resolve().parents[1]
STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
FAST = ["--batch-size", "2", "--seq-len", "32", "--eval-windows", "4", "--no-progress", "--preset", "tiny"]
BASE_STEPS = ["--steps", "2", "--eval-every", "2", "--checkpoint-every", "2", "--log-every", "1"]
RUN_FOREVER = ["--steps", "100000", "--eval-every", "100000", "--checkpoint-every", "100000", "--log-every", "1"]


def cli(*args: str, cwd: pathlib.Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "ternary_graph.cli", *args, "--threads", "1"],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def start_cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "ternary_graph.cli", *args, "--threads", "1"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, what: str, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.05)


def one_error_line(stderr: str, command: str = "train") -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"ternary-graph {command}: error: "), stderr[-3000:]
    return lines[0]


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse refusals
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> pathlib.Path:
    """Real text: a copy of the stdlib's json/decoder.py."""
    path = tmp_path_factory.mktemp("corpus") / "decoder.py"
    shutil.copyfile(STDLIB / "json" / "decoder.py", path)
    return path


@pytest.fixture(scope="module")
def base_run(corpus_file, tmp_path_factory) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
    """One 2-step run with a checkpoint at step 2; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("base") / "run"
    res = cli("train", *FAST, *BASE_STEPS, "--data", str(corpus_file), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


@pytest.fixture()
def run_copy(base_run, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(base_run[0], tmp_path / "run"))


def steps_in(metrics: pathlib.Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()]


@functools.cache
def can_mount_tmpfs() -> bool:
    """Unprivileged user + mount namespaces (``unshare -rm``) let a test mount a tmpfs."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


def cli_on_tmpfs(mount_point: pathlib.Path, options: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI in a private mount namespace where ``mount_point`` is a fresh tmpfs mounted with
    ``options`` (``ro``: read-only; ``size=64k``: a disk that fills up)."""
    mount_point.mkdir()
    script = 'mount -t tmpfs -o "$1" tmpfs "$2" && shift 2 && exec "$@"'
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", options, str(mount_point),
                           sys.executable, "-m", "ternary_graph.cli", *args, "--threads", "1"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


needs_tmpfs = pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare -rm to mount a tmpfs")


def retamper(run: pathlib.Path, step: int, edit) -> None:
    """Edit checkpoint tensors in place and recompute the size and sha256 its JSON records, as a
    deliberate tamperer would: the file-level checks then pass."""
    tensor_path, json_path = run / f"ckpt_{step:08d}.safetensors", run / f"ckpt_{step:08d}.json"
    tensors = load_file(tensor_path)
    edit(tensors)
    save_file(tensors, tensor_path, metadata={"format": "pt", "step": str(step)})
    record = json.loads(json_path.read_text())
    record["tensor_bytes"] = tensor_path.stat().st_size
    record["tensor_sha256"] = hashlib.sha256(tensor_path.read_bytes()).hexdigest()
    json_path.write_text(json.dumps(record))


# ------------------------------------------------------------------------------------------
# device and dtype


def test_device_auto_is_the_default_and_the_summary_names_device_and_dtype(base_run):
    expected = "cuda (bf16" if torch.cuda.is_available() else "cpu (fp32"
    assert f"device              {expected} activations)" in base_run[1].stdout
    config = json.loads((base_run[0] / "config.json").read_text())
    assert config["train"]["device"] == expected.split()[0]  # stored resolved, not "auto"


def test_dtype_fp16_is_refused_by_argparse_naming_the_flag(capsys):
    code, _, err = run_main(capsys, "train", "--dtype", "fp16")
    assert code == 2 and "--dtype" in err and "fp16" in err


def test_device_dtype_threads_steps_out_data_may_change_on_resume():
    saved = TrainConfig(device="cpu", dtype="fp32", threads=1, steps=10, out="a", data="x")
    now = TrainConfig(device="auto", dtype="bf16", threads=2, steps=20, out="b", data="y")
    assert config_differences(saved, now) == []
    assert config_differences(saved, TrainConfig(device="cpu", seq_len=64, lr=1e-3)) == [
        "seq_len (saved 128, now 64)", "lr (saved 0.002, now 0.001)"]


# ------------------------------------------------------------------------------------------
# the run folder


def test_second_writer_of_one_out_is_refused(corpus_file, tmp_path):
    out = tmp_path / "run"
    first = start_cli("train", *FAST, *RUN_FOREVER, "--data", str(corpus_file), "--out", str(out))
    try:
        lock = out / "run.lock"
        wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), first, "its lock")
        res = cli("train", *FAST, *BASE_STEPS, "--data", str(corpus_file), "--out", str(out))
        assert res.returncode == 2
        line = one_error_line(res.stderr)
        assert "in use by another training run" in line and f"pid {first.pid}" in line and str(out) in line
    finally:
        first.kill()
        first.communicate()


def test_resume_and_eval_on_another_corpus_are_caught(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copyfile(STDLIB / "json" / "decoder.py", a / "corpus.txt")
    shutil.copyfile(STDLIB / "json" / "encoder.py", b / "corpus.txt")
    out = tmp_path / "run"
    res = cli("train", *FAST, *BASE_STEPS, "--data", "corpus.txt", "--out", str(out), cwd=a)
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["data"] == str(a / "corpus.txt")  # resolved, not as typed
    assert len(config["corpus"]["fingerprint"]) == 64
    # The same relative path from another folder is another corpus: refused.
    res = cli("train", *FAST, *BASE_STEPS, "--steps", "4", "--data", "corpus.txt", "--out", str(out), "--resume",
              cwd=b)
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert "corpus differs" in line and str(a / "corpus.txt") in line and str(b / "corpus.txt") in line
    # eval reads the stored absolute path; when that file changed, it says so loudly.
    with open(a / "corpus.txt", "a") as f:
        f.write("# changed after training\n")
    code, out_text, err = run_main(capsys, "eval", "--checkpoint", str(out))
    assert code == 0 and "validation loss" in out_text
    assert "warning" in err and "corpus differs" in err


def test_torn_last_metrics_line_is_dropped_with_a_warning(run_copy, corpus_file):
    metrics = run_copy / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "train_lo')  # killed mid-write
    res = cli("train", *FAST, *BASE_STEPS, "--steps", "3", "--data", str(corpus_file), "--out", str(run_copy),
              "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "torn last line" in res.stderr and "metrics.jsonl" in res.stderr
    assert steps_in(metrics) == [1, 2, 3]


def test_metrics_rewrite_on_resume_replaces_the_file_never_truncates_it(run_copy, corpus_file, tmp_path):
    metrics = run_copy / "metrics.jsonl"
    with open(metrics, "a") as f:  # logged after the last checkpoint: the resume redoes it
        f.write(json.dumps({"step": 3, "train_loss": 9.0}) + "\n")
    before = metrics.read_text()
    old = tmp_path / "old_metrics"
    os.link(metrics, old)  # a second name for the file as it was
    res = cli("train", *FAST, *BASE_STEPS, "--steps", "3", "--data", str(corpus_file), "--out", str(run_copy),
              "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    # The old file was never truncated or written in place (a kill mid-rewrite keeps it) ...
    assert old.read_text() == before
    # ... and the new one holds the redone history.
    assert steps_in(metrics) == [1, 2, 3]
    assert json.loads(metrics.read_text().splitlines()[-1])["train_loss"] != 9.0


def test_resume_with_steps_not_above_the_checkpoint_is_refused(run_copy, corpus_file):
    res = cli("train", *FAST, *BASE_STEPS, "--steps", "1", "--data", str(corpus_file), "--out", str(run_copy),
              "--resume")
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert "steps 1" in line and "step 2" in line and "ckpt_00000002" in line


def test_config_mismatch_on_resume_names_the_fields(run_copy, corpus_file):
    res = cli("train", *FAST, *BASE_STEPS, "--steps", "4", "--seq-len", "64", "--seed", "3", "--data",
              str(corpus_file), "--out", str(run_copy), "--resume")
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert "seq_len (saved 32, now 64)" in line and "seed (saved 0, now 3)" in line
    assert "vote_magnitude" not in line  # fields that agree are not dumped


# ------------------------------------------------------------------------------------------
# sizes


def test_seq_len_above_the_presets_max_is_refused(capsys):
    code, _, err = run_main(capsys, "train", "--seq-len", "513", "--out", "unused")
    assert code == 2 and "seq_len 513" in err and "max_seq_len 512" in err


@pytest.mark.timeout(60)
def test_huge_seq_len_is_refused_at_once(capsys):
    t0 = time.perf_counter()
    code, _, err = run_main(capsys, "train", "--seq-len", "100000", "--out", "unused")
    assert code == 2 and "seq_len 100000" in err
    assert time.perf_counter() - t0 < 10


def test_negative_eval_windows_is_refused(capsys):
    code, _, err = run_main(capsys, "train", "--eval-windows", "-1", "--out", "unused")
    assert code == 2 and "eval_windows" in err and "-1" in err
    code, _, err = run_main(capsys, "eval", "--checkpoint", "unused", "--windows", "-1")
    assert code == 2 and "--windows" in err and "-1" in err


def test_lr_of_a_ternary_run_without_float_parameters_is_reported_once(corpus_file, tmp_path):
    res = cli("train", *FAST, *BASE_STEPS, "--lr", "0.01", "--data", str(corpus_file), "--out", str(tmp_path / "r"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("has no effect") == 1 and "lr 0.01" in res.stderr


# ------------------------------------------------------------------------------------------
# one-line errors instead of tracebacks


@needs_tmpfs
def test_read_only_out_is_one_line(corpus_file, tmp_path):
    mount = tmp_path / "ro"
    res = cli_on_tmpfs(mount, "ro", "train", *FAST, *BASE_STEPS, "--data", str(corpus_file),
                       "--out", str(mount / "run"))
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert "Read-only file system" in line and str(mount / "run") in line


def test_out_that_is_a_file_is_one_line(capsys, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    code, _, err = run_main(capsys, "train", *FAST, *BASE_STEPS, "--out", str(tmp_path / "afile"))
    assert code == 2
    line = one_error_line(err)
    assert "is a file" in line and str(tmp_path / "afile") in line


@needs_tmpfs
def test_full_disk_is_one_line(corpus_file, tmp_path):
    mount = tmp_path / "small"
    res = cli_on_tmpfs(mount, "size=64k", "train", *FAST, *BASE_STEPS, "--data", str(corpus_file),
                       "--out", str(mount / "run"))
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert "No space left on device" in line and str(mount / "run") in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line(capsys):
    code, _, err = run_main(capsys, "train", "--device", "cuda", "--out", "unused")
    assert code == 2
    line = one_error_line(err)
    assert "'cuda'" in line and "CUDA is not available" in line
    code, _, err = run_main(capsys, "eval", "--checkpoint", "unused", "--device", "cuda:0")
    assert code == 2 and "'cuda:0'" in one_error_line(err, "eval")


def test_bogus_device_is_one_line(capsys):
    code, _, err = run_main(capsys, "train", "--device", "bogus", "--out", "unused")
    assert code == 2
    line = one_error_line(err)
    assert "device" in line and "'bogus'" in line


def test_cuda_graph_on_cpu_is_one_line(corpus_file, tmp_path, capsys):
    code, _, err = run_main(capsys, "train", "--device", "cpu", "--cuda-graph", "--steps", "2", "--data",
                            str(corpus_file), "--out", str(tmp_path / "run"), "--no-progress")
    assert code == 2
    assert "CUDA-graph capture needs a model on a CUDA device, got cpu" in one_error_line(err)


def test_negative_threads_is_one_line(capsys):
    code, _, err = run_main(capsys, "train", "--threads", "-2", "--out", "unused")
    assert code == 2
    line = one_error_line(err)
    assert "threads" in line and "-2" in line


# ------------------------------------------------------------------------------------------
# signals


def test_sigterm_checkpoints_then_stops_like_sigint(corpus_file, tmp_path):
    out = tmp_path / "run"
    proc = start_cli("train", *FAST, *RUN_FOREVER, "--data", str(corpus_file), "--out", str(out))
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, proc, "a first step")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "interrupted" in stdout
    reached = int(stdout.split("interrupted: ")[1].split(" steps")[0])
    assert reached >= 1 and (out / f"ckpt_{reached:08d}.json").exists()
    assert steps_in(metrics)[-1] == reached


# ------------------------------------------------------------------------------------------
# tampered checkpoints (size and sha256 recomputed, so only the values give them away)


def test_tampered_packed_byte_above_242_is_refused(run_copy, capsys):
    def edit(tensors):
        name = next(k for k in sorted(tensors) if k.endswith(".packed"))
        tensors[name][0, 0] = 250
        edit.name = name[len("model."):]

    retamper(run_copy, 2, edit)
    code, _, err = run_main(capsys, "eval", "--checkpoint", str(run_copy))
    assert code == 2
    line = one_error_line(err, "eval")
    assert edit.name in line and "250" in line and "242" in line


def test_tampered_edge_index_out_of_range_is_refused(run_copy, capsys):
    def edit(tensors):
        tensors["model.blocks.0.moe.edge_index"][1, 0] = 99  # expert 99 of 4

    retamper(run_copy, 2, edit)
    code, _, err = run_main(capsys, "eval", "--checkpoint", str(run_copy))
    assert code == 2
    line = one_error_line(err, "eval")
    assert "blocks.0.moe.edge_index" in line and "99" in line


def test_tampered_negative_next_step_is_refused(run_copy, capsys):
    json_path = run_copy / "ckpt_00000002.json"
    record = json.loads(json_path.read_text())
    record["meta"]["data_position"]["next_step"] = -1
    json_path.write_text(json.dumps(record))
    code, _, err = run_main(capsys, "eval", "--checkpoint", str(run_copy))
    assert code == 2
    line = one_error_line(err, "eval")
    assert "next_step" in line and "-1" in line


@pytest.mark.parametrize("flag, value, field", [
    ("--threshold", "-1", "threshold"), ("--threshold", "128", "threshold"),
    ("--threshold-final", "200", "threshold_final"), ("--vote-magnitude", "0", "vote_magnitude"),
    ("--decay-shift", "0", "decay_shift"), ("--decay-shift", "8", "decay_shift"),
    ("--threshold-ramp-from", "1.0", "threshold_ramp_from"),
])
def test_rule_parameters_out_of_range_are_refused_quoting_them(capsys, flag, value, field):
    code, _, err = run_main(capsys, "train", flag, value, "--out", "unused")
    assert code == 2 and field in err and value.rstrip(".0") in err


def test_resume_with_another_rule_names_the_field(run_copy, corpus_file):
    res = cli("train", *FAST, *BASE_STEPS, "--steps", "4", "--threshold-ramp-from", "0.25", "--data",
              str(corpus_file), "--out", str(run_copy), "--resume")
    assert res.returncode == 2
    assert "threshold_ramp_from (saved 0.0, now 0.25)" in one_error_line(res.stderr)


def test_resume_with_another_router_names_the_field(run_copy, corpus_file):
    res = cli("train", *FAST, *BASE_STEPS, "--steps", "4", "--routing", "topk", "--data", str(corpus_file),
              "--out", str(run_copy), "--resume")
    assert res.returncode == 2
    assert "routing (saved 'graph', now 'topk')" in one_error_line(res.stderr)


def test_unknown_router_is_one_line_listing_the_valid_ones(capsys):
    code, _, err = run_main(capsys, "train", "--routing", "switch", "--out", "unused")
    assert code == 2 and "routing must be one of graph, frozen, topk, topk-float, hash, got 'switch'" in err


def test_a_checkpoint_older_than_the_cool_down_resumes_with_its_own_rule():
    from ternary_graph.train.loop import TrainConfig, config_differences, saved_train_config

    old_meta = {"train_config": {"threshold": 24, "threshold_final": 48}}  # written before the field existed
    saved = saved_train_config(old_meta)
    assert saved.threshold_ramp_from == 0.0 and saved.routing == "graph"
    assert not config_differences(saved, TrainConfig())  # the default rule then is the default rule now
    assert "threshold_ramp_from (saved 0.0, now 0.5)" in "; ".join(
        config_differences(saved, TrainConfig(threshold_final=48, threshold_ramp_from=0.5)))


@pytest.mark.parametrize("item, message", [
    ("nosuch=1", "--model takes FIELD=VALUE with FIELD one of vocab_size,"),
    ("vq_input_norm=maybe", "--model vq_input_norm takes true or false, got 'maybe'"),
    ("num_experts=four", "--model num_experts takes int values, got 'four'"),
    ("routing=topk", "choose the router with --routing"),
    ("vq_projection=random", "ModelConfig.vq_projection must be one of frozen, learned, got 'random'"),
    ("vq_reseed_from=best", "ModelConfig.vq_reseed_from must be one of worst, random, got 'best'"),
    ("vq_reseed_window=-1", "ModelConfig.vq_reseed_window must be a non-negative int (0 disables re-seeding), got -1"),
])
def test_bad_model_override_is_one_line(capsys, item, message):
    code, _, err = run_main(capsys, "train", "--model", item, "--out", "unused")
    assert code == 2 and message in err
