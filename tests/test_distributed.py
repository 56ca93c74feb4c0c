"""Data-parallel training on gloo: 2 CPU processes spawned here, on real text (the stdlib json package).

Checked: every rank ends a step with byte-identical state (VQ re-seeding and usage decay
included); a 2-rank run equals a 1-process run of the same config (micro_batches backward
passes in sequence) bit for bit, and their checkpoints resume in each other; the float
baseline's averaged gradients match; the sparse exchange carries only touched rows; a killed or
hung rank makes the other stop non-zero within the timeout, leaving the last checkpoint intact.

Run as a script (``python tests/test_distributed.py --worker OUT ...``) this file is the worker
that drives ``train_step`` with a VoteSync directly and dumps each rank's state.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = pathlib.Path(__file__).resolve().parents[1]
STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
FAST = ["--batch-size", "4", "--seq-len", "32", "--eval-windows", "4", "--no-progress", "--threads", "1",
        "--preset", "tiny", "--micro-batches", "2", "--log-every", "1"]
RUN_TIMEOUT_S = 80


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_ranks(cmd: list[str], world: int = 2) -> list[subprocess.Popen]:
    """Start ``world`` processes of ``cmd`` with the environment torchrun would give them."""
    port = str(_free_port())
    return [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for r in range(world)]


def _wait_all(procs: list[subprocess.Popen], timeout: float = RUN_TIMEOUT_S) -> list[tuple[int, str, str]]:
    deadline = time.time() + timeout
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.time()))
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def _wait_until(procs: list[subprocess.Popen], ready, what: str) -> None:
    """Poll until ready() while every rank runs; on failure kill them all and show their stderr."""
    deadline = time.time() + RUN_TIMEOUT_S
    while not ready():
        if any(p.poll() is not None for p in procs) or time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            errs = [p.communicate()[1][-2000:] for p in procs]
            pytest.fail(f"{what} did not happen (exit codes {[p.returncode for p in procs]}):\n" + "\n".join(errs))
        time.sleep(0.05)


def train_ranks(*args: str, world: int = 2) -> list[tuple[int, str, str]]:
    return _wait_all(_spawn_ranks([sys.executable, "-m", "ternary_graph.train", "--distributed",
                                   "--dist-timeout", "60", *args], world))


def train_one(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ternary_graph.train", *args], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, env=_env(), cwd=REPO)


def _ok(results) -> None:
    for rank, (rc, out, err) in enumerate(results):
        assert rc == 0, f"rank {rank} exited {rc}:\n{err[-3000:]}"


def _checkpoint(run: pathlib.Path, step: int) -> dict[str, torch.Tensor]:
    """Model and optimizer tensors of a checkpoint (the RNG state of each process is not compared)."""
    return {k: v for k, v in load_file(run / f"ckpt_{step:08d}.safetensors").items() if not k.startswith("rng.")}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:5]}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(STDLIB / "json", root / "json", ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture(scope="module")
def two_runs(corpus, tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """The same ternary config for 4 steps (checkpoints at 2 and 4): on 2 ranks, and in one process."""
    root = tmp_path_factory.mktemp("runs")
    args = [*FAST, "--steps", "4", "--eval-every", "2", "--checkpoint-every", "2", "--data", str(corpus)]
    _ok(train_ranks(*args, "--out", str(root / "two")))
    res = train_one(*args, "--out", str(root / "one"))
    assert res.returncode == 0, res.stderr
    return root / "two", root / "one"


def test_two_ranks_equal_one_process_bit_for_bit(two_runs):
    two, one = two_runs
    for step in (2, 4):
        _assert_same(_checkpoint(two, step), _checkpoint(one, step))
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # rank 0 alone writes the run folder
    ex = records[-1]["exchange"]
    assert ex["dense_bytes"] > 0 and ex["sparse_rows"] > 0 and ex["graph_pairs"] > 0
    assert (two / "loss.png").exists() and (two / "routing.png").exists()


def test_checkpoints_resume_across_world_sizes(two_runs, tmp_path):
    two, one = two_runs
    args = [*FAST, "--steps", "4", "--eval-every", "2", "--checkpoint-every", "2", "--resume"]
    # 2 ranks -> 1 process: resume the 2-rank run from its step-2 checkpoint in one process
    a = tmp_path / "a"
    shutil.copytree(two, a)
    for suffix in ("json", "safetensors"):
        (a / f"ckpt_00000004.{suffix}").unlink()
    res = train_one(*args, "--data", json.loads((two / "config.json").read_text())["train"]["data"], "--out", str(a))
    assert res.returncode == 0, res.stderr
    _assert_same(_checkpoint(a, 4), _checkpoint(two, 4))
    # 1 process -> 2 ranks
    b = tmp_path / "b"
    shutil.copytree(one, b)
    for suffix in ("json", "safetensors"):
        (b / f"ckpt_00000004.{suffix}").unlink()
    _ok(train_ranks(*args, "--data", json.loads((one / "config.json").read_text())["train"]["data"], "--out", str(b)))
    _assert_same(_checkpoint(b, 4), _checkpoint(one, 4))


def test_float_baseline_averages_gradients(corpus, tmp_path):
    args = [*FAST, "--weights", "float", "--steps", "3", "--eval-every", "3", "--checkpoint-every", "3",
            "--data", str(corpus)]
    _ok(train_ranks(*args, "--out", str(tmp_path / "two")))
    res = train_one(*args, "--out", str(tmp_path / "one"))
    assert res.returncode == 0, res.stderr
    a, b = _checkpoint(tmp_path / "two", 3), _checkpoint(tmp_path / "one", 3)
    assert a.keys() == b.keys()
    floats = [k for k in a if a[k].dtype.is_floating_point]
    assert any(k.startswith("model.") for k in floats) and any(k.startswith("optim.float.") for k in floats)
    for k in a:
        if k in floats:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
        else:  # integer state (VQ codes, routing graph) follows from the same float activations
            assert torch.equal(a[k], b[k]), k


def _worker(out: pathlib.Path, data: str, steps: int, micro_batches: int, reseed_window: int,
            decay_interval: int) -> None:
    """One rank (or the single process, without WORLD_SIZE) of the direct train_step driver."""
    from ternary_graph.models.model import build_model
    from ternary_graph.train.distributed import init_distributed, shutdown
    from ternary_graph.train.loop import TrainConfig, build_optimizer, prepare_data, train_step

    torch.set_num_threads(1)
    cfg = TrainConfig(preset="tiny", batch_size=4, seq_len=32, micro_batches=micro_batches, data=data, out=str(out))
    sync, rank, world = None, 0, 1
    if "WORLD_SIZE" in os.environ:
        sync, _ = init_distributed("gloo", timeout_s=60)
        rank, world = sync.rank, sync.world_size
    train_ds, _, _ = prepare_data(cfg)  # the test prepared the cache before starting the ranks
    model = build_model(cfg.model_config(), seed=cfg.seed)
    opt = build_optimizer(model, cfg)
    model.shared_vq.reseed_window = reseed_window
    model.shared_vq.usage_decay_interval = decay_interval
    model.train()
    records = []
    for step in range(steps):
        x, y = train_ds.sample_batch(step, cfg.batch_size, cfg.seq_len, cfg.seed)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        train_step(model, opt, x, y, cfg.micro_batches // world, sync)
        if sync is not None:
            records.append({"stats": sync.last_stats.as_dict(), "embed_rows": int(torch.unique(x).numel()),
                            "tokens": x.numel()})
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors["optim.generator"] = opt.state_dict()["generator"]
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(records))
    if sync is not None:
        shutdown()


def test_ranks_stay_identical_through_reseeds_and_the_exchange_moves_only_touched_rows(corpus, tmp_path):
    from ternary_graph.train.data import collect_text_files, corpus_fingerprint, default_cache_dir, prepare_corpus
    files = collect_text_files(str(corpus))
    prepare_corpus(files, default_cache_dir(corpus_fingerprint(files, 0.05)), 0.05)
    steps, micro_batches = 4, 4  # 2 backward passes per rank: rows voted by one are kept for the other
    _ok(_wait_all(_spawn_ranks([sys.executable, str(pathlib.Path(__file__)), "--worker", str(tmp_path), str(corpus),
                                str(steps), str(micro_batches), "5", "2"])))
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    _assert_same(r0, r1)
    # the events happened: codes were re-seeded (every 5 calls, 16 calls of 2) and usage halved
    assert int(r0["model.shared_vq.reseeded_total"]) > 0
    assert int(r0["model.shared_vq.step"]) == steps * 2 * micro_batches  # 2 quantising blocks
    stats0, stats1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    cols = 64  # embedding and code width of the tiny preset
    for a, b in zip(stats0, stats1):
        for rec in (a, b):
            s = rec["stats"]
            assert s["rows"]["embed.weight"] == rec["embed_rows"]  # touched rows = distinct bytes of the chunk
            assert 0 < s["rows"]["shared_vq.codes.weight"] <= rec["tokens"] * 2  # one id per token and quantising block
            assert s["rows"]["kg_vq.codes.weight"] == 0  # the KG codebook is not in the LM loss
            # payload per touched row: int32 id + 1 byte per trit vote + 1 byte of scale vote
            widths = {"embed.weight": 128, "shared_vq.codes.weight": cols}
            assert s["sparse_bytes"] == sum(n * (4 + widths.get(name, 128) + 1) for name, n in s["rows"].items())
            assert s["graph_bytes"] == 12 * s["graph_pairs"]
            assert s["sparse_bytes"] < 4096 * (cols + 1)  # far below the dense codebook accumulators
        pad = max(rec["stats"]["sparse_bytes"] + rec["stats"]["graph_bytes"] for rec in (a, b))
        assert a["stats"]["gather_bytes"] == b["stats"]["gather_bytes"] == pad
        assert a["stats"]["union"] == b["stats"]["union"]
        assert a["stats"]["dense_bytes"] == b["stats"]["dense_bytes"] == 2 * a["stats"]["dense_elements"]
        for name in a["stats"]["rows"]:
            assert max(a["stats"]["rows"][name], b["stats"]["rows"][name]) <= a["stats"]["union"][name] \
                <= a["stats"]["rows"][name] + b["stats"]["rows"][name]


def _reseed_case(out: pathlib.Path) -> None:
    """A code one rank voted on is re-seeded later in the same step (both ranks dump their codebook).

    Call 1: rank 0's input is code 1, rank 1's is code 0, so only rank 1 holds (and zeroes) row 0.
    Call 2 assigns codes 8 and 9; its re-seed check finds 0 and 1 dead and re-seeds them, which
    zeroes their accumulators on both ranks: rank 1 must not restore row 0's old value.
    """
    from torch import nn
    from ternary_graph.nn.vq import TernaryVQCodebook
    from ternary_graph.train.distributed import init_distributed, shutdown

    sync, _ = init_distributed("gloo", timeout_s=60)
    model = nn.Module()
    model.vq = TernaryVQCodebook(16, 8, reseed_window=2, usage_decay_interval=0,
                                 generator=torch.Generator().manual_seed(0))
    model.vq.codes.weight.T_accum.fill_(5)
    model.train()
    sync.begin_step(model)
    for codes in ((1, 0), (8, 9)):
        z = model.vq.indices_to_codes(torch.tensor([codes[sync.rank]]))
        q = model.vq(z)
        assert int(q.ids[0]) == codes[sync.rank], (q.ids, codes)
        q.commitment_loss.backward()
    sync.all_reduce(model)
    assert int(model.vq.reseeded_total) == 4  # 2 and 3 at call 1, then 0 and 1
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"case{sync.rank}.safetensors"))
    shutdown()


def test_a_row_kept_by_one_rank_and_reseeded_later_in_the_step_stays_identical(tmp_path):
    _ok(_wait_all(_spawn_ranks([sys.executable, str(pathlib.Path(__file__)), "--reseed-case", str(tmp_path)])))
    a, b = (load_file(tmp_path / f"case{r}.safetensors") for r in (0, 1))
    _assert_same(a, b)
    assert int(a["vq.codes.weight.T_accum"][0].abs().max()) < 5  # row 0 lost its old votes with its reseed


@pytest.mark.parametrize("victim,how", [(1, "kill"), (0, "kill"), (1, "hang")])
def test_a_dead_or_hung_rank_stops_the_other_within_the_timeout(corpus, tmp_path, victim, how):
    from ternary_graph.train.checkpoint import latest_checkpoint, load_checkpoint
    out = tmp_path / "run"
    timeout = 8
    procs = _spawn_ranks([sys.executable, "-m", "ternary_graph.train", "--distributed", "--dist-timeout", str(timeout),
                          *FAST, "--steps", "1000", "--eval-every", "1000", "--checkpoint-every", "2",
                          "--data", str(corpus), "--out", str(out)])
    try:
        _wait_until(procs, (out / "ckpt_00000004.json").exists, "a checkpoint at step 4")
        procs[victim].send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.time()
        survivor = procs[1 - victim]
        _, err = survivor.communicate(timeout=timeout + 30)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert survivor.returncode == 3, err[-3000:]
    assert "peer rank died" in err and f"rank {1 - victim} of 2" in err, err[-3000:]
    assert elapsed < timeout + 20
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and int(ckpt.stem.split("_")[1]) >= 4
    tensors, meta = load_checkpoint(ckpt)  # verifies the recorded size and sha256
    assert meta["data_position"]["next_step"] == int(ckpt.stem.split("_")[1])


def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    procs = _spawn_ranks([sys.executable, "-m", "ternary_graph.train", "--distributed", "--dist-timeout", "30",
                          *FAST, "--steps", "1000", "--eval-every", "1000", "--checkpoint-every", "500",
                          "--data", str(corpus), "--out", str(out)])
    try:
        metrics = out / "metrics.jsonl"
        _wait_until(procs, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, "two steps")
        procs[1].send_signal(signal.SIGINT)  # rank 1 alone sees the interrupt
        results = _wait_all(procs, timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [rc for rc, _, _ in results] == [130, 130], [err[-2000:] for _, _, err in results]
    from ternary_graph.train.checkpoint import latest_checkpoint, load_checkpoint
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    step = load_checkpoint(ckpt)[1]["data_position"]["next_step"]
    assert 2 <= step < 1000
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step


def test_micro_batches_must_split_over_the_ranks(corpus, tmp_path):
    args = [*FAST, "--steps", "2", "--data", str(corpus), "--out", str(tmp_path / "run")]
    args[args.index("--micro-batches") + 1] = "1"
    for rc, _, err in train_ranks(*args):
        assert rc == 2 and "micro_batches=1 must be a multiple of the 2 ranks" in err, err[-2000:]


def test_launch_errors_are_clear(monkeypatch):
    from ternary_graph.train.distributed import VoteSync, init_distributed
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        init_distributed()
    with pytest.raises(ValueError, match="backend"):
        init_distributed("mpi")
    with pytest.raises(ValueError, match="process group"):
        VoteSync()


@pytest.fixture
def one_thread():
    """Two threads on a shared 2-core machine are far slower than one; restore after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_one_rank_sync_changes_nothing(one_thread):
    """A VoteSync over a world of one is the identity: same state as a run without it."""
    import torch.distributed as dist
    from ternary_graph.config import get_preset
    from ternary_graph.models.model import build_model
    from ternary_graph.train.distributed import VoteSync
    from ternary_graph.train.loop import TrainConfig, build_optimizer, train_step

    cfg = TrainConfig(preset="tiny", micro_batches=2)
    text = b"".join(p.read_bytes() for p in sorted((STDLIB / "json").glob("*.py")))
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sync = VoteSync()
        states, models = [], []
        for s in (None, sync, VoteSync(wire_dtype=torch.int32)):
            model = build_model(get_preset("tiny"), seed=0)
            opt = build_optimizer(model, cfg)
            model.train()
            for step in range(3):
                starts = torch.arange(4) * 997 + step * 131
                x = torch.stack([data[i:i + 32] for i in starts])
                y = torch.stack([data[i + 1:i + 33] for i in starts])
                train_step(model, opt, x, y, 2, s)
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            models.append((model, opt))
        _assert_same(states[0], states[1])
        _assert_same(states[0], states[2])
        assert sync.last_stats.dense_bytes > 0 and sync.last_stats.union_rows == sync.last_stats.sparse_rows
        with pytest.raises(ValueError, match="wire_dtype"):
            VoteSync(wire_dtype=torch.int16)
        model, opt = models[1]
        with pytest.raises(RuntimeError, match="without begin_step"):
            sync.all_reduce(model, opt)
        sync.begin_step(model)
        with pytest.raises(RuntimeError, match="twice"):
            sync.begin_step(model)
        sync.detach()
        assert model.shared_vq.tracking_sync is None
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(pathlib.Path(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:8]))
    elif sys.argv[1:2] == ["--reseed-case"]:
        _reseed_case(pathlib.Path(sys.argv[2]))
