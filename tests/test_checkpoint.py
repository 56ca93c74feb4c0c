"""Tests of atomic safetensors checkpoints, strict state loading and RNG capture/restore."""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from ternary_graph.train.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    RunLockedError,
    atomic_write_text,
    capture_rng_state,
    checkpoint_paths,
    latest_checkpoint,
    load_checkpoint,
    load_state_dict_strict,
    restore_rng_state,
    run_dir_lock,
    save_checkpoint,
)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(-128, 128, (4, 6), dtype=torch.int8, generator=g)
    return {
        "packed": torch.randint(0, 243, (7, 3), dtype=torch.uint8, generator=g),
        "T_accum": shared,
        "T_accum_view": shared[1:3],  # shares storage with T_accum
        "usage": torch.randint(-(2**15), 2**15, (11,), dtype=torch.int16, generator=g),
        "edge_src": torch.randint(0, 1000, (5,), dtype=torch.int32, generator=g),
        "edge_index": torch.empty(2, 0, dtype=torch.int64),
        "scale": torch.randn(3, 2, generator=g),
        "scale_t": torch.randn(2, 3, generator=g).t(),  # non-contiguous
        "bf16": torch.randn(4, generator=g).to(torch.bfloat16),
        "f64": torch.randn(2, generator=g, dtype=torch.float64),
        "flag": torch.tensor([True, False]),
    }


def _meta() -> dict:
    return {"config": {"dim": 64, "name": "tiny"}, "data_step": 12, "optimizer": {"theta": 32}}


def test_round_trip_all_dtypes(tmp_path: pathlib.Path):
    tensors = _tensors()
    originals = {k: v.clone() for k, v in tensors.items()}
    path = save_checkpoint(tmp_path, 12, tensors, _meta())
    assert path == tmp_path / "ckpt_00000012.json"
    assert (tmp_path / "ckpt_00000012.safetensors").is_file()
    for k, v in tensors.items():  # inputs untouched
        assert torch.equal(v, originals[k]) and v.dtype == originals[k].dtype

    for p in (path, tmp_path / "ckpt_00000012.safetensors", tmp_path):
        loaded, meta = load_checkpoint(p)
        assert meta == _meta()
        assert set(loaded) == set(tensors)
        for k, v in tensors.items():
            assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape, k
            assert torch.equal(loaded[k], v), k
    # Shared inputs come back as independent tensors.
    loaded["T_accum"][1, 0] += 1
    assert not torch.equal(loaded["T_accum"][1:3], loaded["T_accum_view"])

    record = json.loads(path.read_text())
    assert record["format_version"] == FORMAT_VERSION and record["step"] == 12
    assert record["tensor_file"] == "ckpt_00000012.safetensors"
    assert record["tensor_bytes"] == (tmp_path / "ckpt_00000012.safetensors").stat().st_size
    assert record["tensors"]["usage"] == {"dtype": "int16", "shape": [11]}
    assert record["tensors"]["edge_index"] == {"dtype": "int64", "shape": [2, 0]}
    assert not list(tmp_path.glob("*.tmp"))


def test_loaded_tensors_do_not_follow_the_file(tmp_path: pathlib.Path):
    path = save_checkpoint(tmp_path, 1, {"a": torch.arange(16, dtype=torch.int8)}, {})
    loaded, _ = load_checkpoint(path)
    tensor_file = tmp_path / "ckpt_00000001.safetensors"
    with open(tensor_file, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x7f")
    assert torch.equal(loaded["a"], torch.arange(16, dtype=torch.int8))


def test_keep_last_prunes_both_files(tmp_path: pathlib.Path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"w": torch.full((3,), step)}, {"s": step}, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "ckpt_00000004.json",
        "ckpt_00000004.safetensors",
        "ckpt_00000005.json",
        "ckpt_00000005.safetensors",
    ]
    tensors, meta = load_checkpoint(tmp_path)
    assert meta == {"s": 5} and torch.equal(tensors["w"], torch.full((3,), 5))


def test_saving_an_earlier_step_keeps_it(tmp_path: pathlib.Path):
    for step in (10, 20):
        save_checkpoint(tmp_path, step, {"w": torch.zeros(1)}, {}, keep_last=2)
    save_checkpoint(tmp_path, 15, {"w": torch.ones(1)}, {}, keep_last=2)
    assert (tmp_path / "ckpt_00000015.json").is_file()
    assert (tmp_path / "ckpt_00000020.json").is_file()
    assert not (tmp_path / "ckpt_00000010.json").exists()


def test_resave_same_step_replaces(tmp_path: pathlib.Path):
    save_checkpoint(tmp_path, 3, {"w": torch.zeros(2)}, {"v": 1})
    save_checkpoint(tmp_path, 3, {"w": torch.ones(4)}, {"v": 2})
    tensors, meta = load_checkpoint(tmp_path)
    assert meta == {"v": 2} and torch.equal(tensors["w"], torch.ones(4))


def test_truncated_tensor_file_names_the_file(tmp_path: pathlib.Path):
    path = save_checkpoint(tmp_path, 7, _tensors(), _meta())
    tensor_file = tmp_path / "ckpt_00000007.safetensors"
    size = tensor_file.stat().st_size
    with open(tensor_file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match="ckpt_00000007.safetensors") as info:
        load_checkpoint(path)
    assert "truncated" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_corrupted_byte_is_a_sha_mismatch(tmp_path: pathlib.Path):
    path = save_checkpoint(tmp_path, 7, _tensors(), _meta())
    tensor_file = tmp_path / "ckpt_00000007.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[-3] ^= 0x01  # same size, one bit flipped in the tensor data
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"ckpt_00000007\.safetensors.*sha256"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path)  # a corrupted latest checkpoint is not silently skipped


def test_broken_json_and_declarations(tmp_path: pathlib.Path):
    path = save_checkpoint(tmp_path, 2, _tensors(), _meta())
    good = path.read_text()

    path.write_text(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"ckpt_00000002\.json.*JSON"):
        load_checkpoint(path)

    record = json.loads(good)
    record["tensors"]["usage"]["shape"] = [12]
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"'usage'.*\[11\].*\[12\]"):
        load_checkpoint(path)

    record = json.loads(good)
    record["tensors"]["ghost"] = {"dtype": "int8", "shape": [1]}
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="ghost"):
        load_checkpoint(path)

    record = json.loads(good)
    record["tensor_file"] = "../elsewhere.safetensors"
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="bare file name"):
        load_checkpoint(path)

    record = json.loads(good)
    del record["tensor_sha256"]
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="tensor_sha256"):
        load_checkpoint(path)


def test_missing_pieces(tmp_path: pathlib.Path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "not_there") is None

    save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, {"s": 1})
    save_checkpoint(tmp_path, 2, {"w": torch.ones(1)}, {"s": 2})
    tensor2, json2 = checkpoint_paths(tmp_path, 2)
    json2.unlink()  # an uncommitted save
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_00000001.json"
    assert load_checkpoint(tmp_path)[1] == {"s": 1}
    with pytest.raises(CheckpointError, match=r"ckpt_00000002\.json.*missing"):
        load_checkpoint(tensor2)

    tensor1, json1 = checkpoint_paths(tmp_path, 1)
    tensor1.unlink()
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match=r"ckpt_00000001\.safetensors.*does not exist"):
        load_checkpoint(json1)


def test_tmp_leftovers_ignored_and_cleaned(tmp_path: pathlib.Path):
    save_checkpoint(tmp_path, 5, {"w": torch.zeros(1)}, {})
    (tmp_path / "ckpt_00000009.safetensors.tmp").write_bytes(b"partial")
    (tmp_path / "ckpt_00000009.json.tmp").write_text("{")
    (tmp_path / "ckpt_00000009.safetensors").write_bytes(b"never committed")
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_00000005.json"
    save_checkpoint(tmp_path, 10, {"w": torch.ones(1)}, {})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "ckpt_00000005.json",
        "ckpt_00000005.safetensors",
        "ckpt_00000010.json",
        "ckpt_00000010.safetensors",
    ]


def test_save_rejects_bad_input(tmp_path: pathlib.Path):
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, {}, {})
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, {}, {}, keep_last=0)
    with pytest.raises(TypeError, match=r"tensors\['x'\]"):
        save_checkpoint(tmp_path, 1, {"x": [1, 2]}, {})
    with pytest.raises(ValueError, match="meta device"):
        save_checkpoint(tmp_path, 1, {"x": torch.empty(3, device="meta")}, {})
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path, 1, {}, {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def _module(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    m.register_buffer("votes", torch.randint(-5, 5, (3, 4), dtype=torch.int8))
    return m


def test_load_state_dict_strict_success_and_mismatch(tmp_path: pathlib.Path):
    src, dst = _module(0), _module(1)
    save_checkpoint(tmp_path, 1, src.state_dict(), {})
    tensors, _ = load_checkpoint(tmp_path)
    load_state_dict_strict(dst, tensors)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k

    target = _module(2)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    def unchanged() -> bool:
        return all(torch.equal(target.state_dict()[k], v) for k, v in before.items())

    wrong_shape = dict(tensors)
    wrong_shape["1.weight"] = torch.zeros(3, 3)  # expected (2, 3); earlier keys are fine
    with pytest.raises(ValueError, match=r"'1\.weight'.*\[2, 3\].*\[3, 3\]"):
        load_state_dict_strict(target, wrong_shape)
    assert unchanged()

    wrong_dtype = dict(tensors)
    wrong_dtype["votes"] = tensors["votes"].to(torch.int16)
    with pytest.raises(ValueError, match=r"'votes'.*int8.*int16"):
        load_state_dict_strict(target, wrong_dtype)
    assert unchanged()

    missing = {k: v for k, v in tensors.items() if k != "0.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['0\.bias'\]"):
        load_state_dict_strict(target, missing)
    extra = dict(tensors, stray=torch.zeros(1))
    with pytest.raises(ValueError, match="unexpected keys"):
        load_state_dict_strict(target, extra)
    assert unchanged()


def test_rng_capture_restore_reproduces_draws(tmp_path: pathlib.Path):
    torch.manual_seed(123)
    random.seed(7)
    np.random.seed(9)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    state = capture_rng_state()
    first = (torch.rand(5), random.random(), random.gauss(0, 1), np.random.rand(3), torch.randn(2))

    # Through a checkpoint, as a trainer would store it.
    save_checkpoint(tmp_path, 1, {f"rng/{k}": v for k, v in state.items()}, {})
    loaded, _ = load_checkpoint(tmp_path)
    restored = {k.removeprefix("rng/"): v for k, v in loaded.items()}

    torch.rand(100)
    random.random()
    np.random.rand(7)
    restore_rng_state(restored)
    second = (torch.rand(5), random.random(), random.gauss(0, 1), np.random.rand(3), torch.randn(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[4], second[4])
    assert first[1] == second[1] and first[2] == second[2]
    np.testing.assert_array_equal(first[3], second[3])


def test_restore_rng_checks_before_touching(tmp_path: pathlib.Path):
    torch.manual_seed(5)
    state = capture_rng_state()
    bad = dict(state)
    bad["numpy.keys"] = bad["numpy.keys"][:10]
    torch.manual_seed(6)
    expected = torch.rand(3)
    torch.manual_seed(6)
    with pytest.raises(ValueError, match="numpy.keys"):
        restore_rng_state(bad)
    assert torch.equal(torch.rand(3), expected)  # torch state not half-restored
    with pytest.raises(ValueError, match="python.state"):
        restore_rng_state({k: v for k, v in state.items() if k != "python.state"})


def test_failed_save_commits_nothing(tmp_path: pathlib.Path):
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, {"s": 1})
    # A folder where the JSON temp file should go makes the final write fail after the
    # tensor file is already in place: the commit marker must not appear.
    (tmp_path / "ckpt_00000002.json.tmp").mkdir()
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, {"w": torch.ones(1)}, {"s": 2})
    assert not (tmp_path / "ckpt_00000002.json").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_00000001.json"
    assert load_checkpoint(tmp_path)[1] == {"s": 1}
    assert not (tmp_path / "ckpt_00000002.safetensors.tmp").exists()


def test_run_dir_lock_refuses_a_second_holder_until_released(tmp_path: pathlib.Path):
    # flock conflicts between two open descriptions of the file, even in one process.
    with run_dir_lock(tmp_path) as lock:
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            with run_dir_lock(tmp_path):
                pass
    with run_dir_lock(tmp_path):  # released on exit; the file left behind does not block
        pass


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path: pathlib.Path):
    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")
    os.link(target, tmp_path / "old")
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n" and (tmp_path / "old").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "old"]


def _can_mount_tmpfs() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-rm", "true"]).returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -rm to mount a tmpfs")
def test_full_disk_is_an_oserror_and_commits_nothing(tmp_path: pathlib.Path):
    # safetensors reports ENOSPC as its own error type; save_checkpoint turns it into OSError.
    mount = tmp_path / "small"
    mount.mkdir()
    code = (
        "import pathlib, sys, torch\n"
        "from ternary_graph.train.checkpoint import latest_checkpoint, save_checkpoint\n"
        "run = pathlib.Path(sys.argv[1]) / 'run'\n"
        "try:\n"
        "    save_checkpoint(run, 1, {'w': torch.zeros(100_000)}, {})\n"
        "except OSError as exc:\n"
        "    print(exc.errno, latest_checkpoint(run), sorted(p.name for p in run.iterdir()))\n"
    )
    script = 'mount -t tmpfs -o size=64k tmpfs "$1" && shift && exec "$@"'
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(mount), sys.executable, "-c", code,
                          str(mount)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1])))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split(None, 2) == ["28", "None", "[]\n"]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@cuda
def test_cuda_tensors_and_rng(tmp_path: pathlib.Path):
    dev = torch.device("cuda")
    tensors = {k: v.to(dev) for k, v in _tensors().items()}
    torch.cuda.manual_seed_all(11)
    torch.rand(1, device=dev)  # CUDA is initialised, so its generator is captured
    state = capture_rng_state()
    assert "torch.cuda.0" in state
    first = torch.rand(64, device=dev)
    save_checkpoint(tmp_path, 1, dict(tensors, **{f"rng/{k}": v for k, v in state.items()}), {})
    loaded, _ = load_checkpoint(tmp_path)
    for k, v in tensors.items():
        assert loaded[k].device.type == "cpu" and torch.equal(loaded[k], v.cpu()), k
    torch.rand(1000, device=dev)
    restore_rng_state({k.removeprefix("rng/"): v for k, v in loaded.items() if k.startswith("rng/")})
    assert torch.equal(torch.rand(64, device=dev), first)

    module = _module(0).to(dev)
    load_state_dict_strict(module, {k: v.cpu() for k, v in _module(3).state_dict().items()})
    for k, v in _module(3).state_dict().items():
        assert torch.equal(module.state_dict()[k].cpu(), v), k
