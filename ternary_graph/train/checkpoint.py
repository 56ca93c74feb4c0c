"""Atomic, verifiable training checkpoints: safetensors for tensors, a JSON sidecar for the rest.

A checkpoint of step ``s`` in a run folder is two files:

- ``ckpt_{s:08d}.safetensors``: every tensor (model state, optimizer accumulators, RNG states),
  no pickle;
- ``ckpt_{s:08d}.json``: the commit marker. It holds ``format_version``, ``step``,
  ``tensor_file`` with its byte size and sha256, the dtype and shape of every tensor, and the
  caller's ``meta`` (config, data position, optimizer settings, ...) under the key ``"meta"``.

Both are written under a ``.tmp`` name in the same folder, flushed, fsynced and renamed, and
the folder is fsynced after each rename. The tensor file goes first and the JSON last, so a
crash at any point leaves either a complete checkpoint or one without JSON, which
:func:`latest_checkpoint` ignores. :func:`load_checkpoint` verifies size, sha256, names, dtypes
and shapes before returning anything, and raises :class:`CheckpointError` naming the file
otherwise.

Layout of one JSON sidecar::

    {"format_version": 1, "step": 1200, "tensor_file": "ckpt_00001200.safetensors",
     "tensor_bytes": 123456, "tensor_sha256": "ab12...",
     "tensors": {"layer.packed": {"dtype": "uint8", "shape": [64, 26]}, ...},
     "meta": {...}}
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import random
import re
from collections.abc import Mapping

import numpy as np
import safetensors
import safetensors.torch
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "RunLockedError",
    "atomic_write_text",
    "capture_rng_state",
    "checkpoint_paths",
    "latest_checkpoint",
    "load_checkpoint",
    "load_state_dict_strict",
    "restore_rng_state",
    "run_dir_lock",
    "save_checkpoint",
]

FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^ckpt_(\d{8,})\.json$")
_TENSOR_NAME_RE = re.compile(r"^ckpt_(\d{8,})\.safetensors$")
_TMP_RE = re.compile(r"^ckpt_(\d{8,})\.(?:json|safetensors)\.tmp$")
_HASH_CHUNK = 1 << 24


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupted or inconsistent; the message names the file."""


class RunLockedError(ValueError):
    """Another process holds the run folder's lock; the message names the folder and the holder."""


LOCK_NAME = "run.lock"


# --------------------------------------------------------------------------------------------
# Small file helpers


def checkpoint_paths(run_dir: str | os.PathLike[str], step: int) -> tuple[pathlib.Path, pathlib.Path]:
    """``(tensor_path, json_path)`` of the checkpoint of ``step`` in ``run_dir``."""
    step = _check_step(step)
    base = pathlib.Path(run_dir) / f"ckpt_{step:08d}"
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return int(step)


def fsync_path(path: pathlib.Path) -> None:
    """fsync a file, or a folder: a rename is durable only once the folder entry is on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text``: a temporary file in the same folder, fsynced,
    then renamed over it. A crash leaves the old file or the new one, never a truncated one."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike[str]):
    """Hold an exclusive lock on ``run_dir`` (``fcntl.flock`` on ``run_dir/run.lock``) while the
    block runs; raise :class:`RunLockedError` at once if another process holds it.

    Two writers of one run folder would interleave ``metrics.jsonl`` and replace each other's
    checkpoints. The kernel drops the lock when its holder exits, however it exits (SIGKILL
    included), so a lock file left behind never blocks a later run. The holder's pid is written
    into the file for the error message only; the lock itself is the flock.
    """
    path = pathlib.Path(run_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            raise RunLockedError(
                f"out folder {str(run_dir)!r} is in use by another training run "
                f"({'pid ' + holder if holder else 'another process'} holds {path}); wait for it to "
                f"end or pass another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _unlink_quiet(path: pathlib.Path) -> None:
    # Pruning is best effort: a file removed meanwhile by someone else is not an error.
    path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Saving


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, dense tensors that share no memory: what safetensors accepts.

    Inputs are never modified; a tensor is copied only when it must be (device move,
    non-contiguous layout, or memory shared with a tensor seen before).
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of str to Tensor, got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] must be a Tensor, got {type(value).__name__}")
        if value.is_meta:
            raise ValueError(f"tensors[{name!r}] is on the meta device and holds no data")
        if value.layout != torch.strided:
            raise ValueError(f"tensors[{name!r}] has layout {value.layout}; only dense tensors")
        t = value.detach().resolve_conj().resolve_neg().to("cpu").contiguous()
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storage:
                # safetensors refuses tensors that share memory (tied weights, views of one
                # buffer); each gets its own copy on disk and loads as an independent tensor.
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen_storage.add(ptr)
        out[name] = t
    return out


def _json_safe_meta(meta: Mapping) -> dict:
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        # The round trip both checks JSON-safety and detaches the saved copy from the caller's.
        return json.loads(json.dumps(dict(meta)))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"meta must be JSON-serialisable: {exc}") from exc


def _existing_steps(run_dir: pathlib.Path, pattern: re.Pattern[str]) -> dict[int, pathlib.Path]:
    found: dict[int, pathlib.Path] = {}
    try:
        entries = list(os.scandir(run_dir))
    except FileNotFoundError:
        return found
    for entry in entries:
        m = pattern.match(entry.name)
        if m and entry.is_file():
            found[int(m.group(1))] = pathlib.Path(entry.path)
    return found


def _prune(run_dir: pathlib.Path, step: int, keep_last: int) -> None:
    """Keep the checkpoint just written plus the ``keep_last - 1`` highest other steps."""
    committed = _existing_steps(run_dir, _NAME_RE)
    others = sorted((s for s in committed if s != step), reverse=True)
    newer = [s for s in others if s > step]
    if newer:
        logger.warning(
            "saved step %d in %s, which already holds later checkpoints %s (a resumed run?); "
            "latest_checkpoint will keep returning the later ones",
            step, run_dir, newer,
        )
    for old in others[keep_last - 1 :]:
        tensor_path, json_path = checkpoint_paths(run_dir, old)
        _unlink_quiet(json_path)  # un-commit first, so a crash mid-prune leaves no dangling JSON
        _unlink_quiet(tensor_path)
    # Leftovers of crashed saves of earlier steps: tensor files never committed, and temps.
    for old, path in _existing_steps(run_dir, _TENSOR_NAME_RE).items():
        if old < step and old not in committed:
            _unlink_quiet(path)
    try:
        entries = list(os.scandir(run_dir))
    except FileNotFoundError:
        return
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if m and int(m.group(1)) < step and entry.is_file(follow_symlinks=False):
            _unlink_quiet(pathlib.Path(entry.path))


def _save_tensors(prepared: dict[str, torch.Tensor], path: pathlib.Path, step: int) -> None:
    try:
        safetensors.torch.save_file(prepared, str(path), metadata={"format": "pt", "step": str(step)})
    except safetensors.SafetensorError as exc:
        # safetensors reports a failed write (full disk, quota, read-only folder) as its own
        # error type, with the OS error number in the text; callers treat it as the OSError it is.
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else errno.EIO
        raise OSError(code, f"{os.strerror(code)} (writing checkpoint tensors)", str(path)) from exc


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping,
    keep_last: int = 3,
) -> pathlib.Path:
    """Write the checkpoint of ``step`` atomically and prune older ones; return the JSON path.

    Tensors are detached, moved to CPU and made contiguous (copies only where needed); tensors
    sharing memory are cloned, because safetensors refuses shared storage. ``meta`` must be
    JSON-serialisable and is stored under ``"meta"``. Saving a step that already exists
    replaces it (its JSON is removed first, so the old pair is never mixed with the new).

    After the commit, checkpoints other than this one beyond the ``keep_last - 1`` highest
    steps are deleted (both files), as are uncommitted tensor files and ``.tmp`` leftovers of
    earlier steps. Assumes one writer per run folder (rank 0).

    Raises:
        TypeError / ValueError: bad ``step``, ``keep_last``, tensor or ``meta``.
        OSError: the filesystem refused a write; no partial checkpoint is committed.
    """
    step = _check_step(step)
    if isinstance(keep_last, bool) or not isinstance(keep_last, int):
        raise TypeError(f"keep_last must be an int, got {type(keep_last).__name__}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    prepared = _prepare_tensors(tensors)
    user_meta = _json_safe_meta(meta)

    run = pathlib.Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tensor_path, json_path = checkpoint_paths(run, step)
    tensor_tmp = tensor_path.with_name(tensor_path.name + ".tmp")
    json_tmp = json_path.with_name(json_path.name + ".tmp")

    if json_path.exists():
        json_path.unlink()
        fsync_path(run)

    try:
        _save_tensors(prepared, tensor_tmp, step)
        fsync_path(tensor_tmp)
        size = tensor_tmp.stat().st_size
        digest = _sha256_file(tensor_tmp)
        os.replace(tensor_tmp, tensor_path)
        fsync_path(run)

        record = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "tensor_file": tensor_path.name,
            "tensor_bytes": size,
            "tensor_sha256": digest,
            "tensors": {
                name: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
                for name, t in prepared.items()
            },
            "meta": user_meta,
        }
        with open(json_tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(json_tmp, json_path)
        fsync_path(run)
    finally:
        # Only our own temp files: something else under that name (a folder) is left alone,
        # and the original error, if any, propagates.
        for tmp in (tensor_tmp, json_tmp):
            if tmp.is_file():
                _unlink_quiet(tmp)

    _prune(run, step, keep_last)
    logger.info("saved checkpoint %s (%d tensors, %d bytes)", json_path, len(prepared), size)
    return json_path


# --------------------------------------------------------------------------------------------
# Loading


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> pathlib.Path | None:
    """JSON path of the highest-step committed checkpoint in ``run_dir``, or None.

    A checkpoint counts when both ``ckpt_N.json`` and ``ckpt_N.safetensors`` exist; ``.tmp``
    leftovers and tensor files without JSON (interrupted saves) are ignored. The files are not
    verified here; :func:`load_checkpoint` does that. A missing folder gives None.
    """
    run = pathlib.Path(run_dir)
    if run.exists() and not run.is_dir():
        raise ValueError(f"run_dir {str(run_dir)!r} is not a folder")
    for step in sorted(_existing_steps(run, _NAME_RE), reverse=True):
        tensor_path, json_path = checkpoint_paths(run, step)
        if tensor_path.is_file():
            return json_path
    return None


def _resolve_json(path: pathlib.Path) -> pathlib.Path:
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(
                f"{path}: no complete checkpoint (ckpt_*.json with its .safetensors) in this folder"
            )
        return found
    if path.suffix == ".safetensors":
        json_path = path.with_suffix(".json")
        if not json_path.is_file():
            raise CheckpointError(
                f"{json_path}: JSON sidecar of {path.name} is missing (save never committed?)"
            )
        return json_path
    if path.suffix == ".json":
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint JSON does not exist")
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint path does not exist")
    raise CheckpointError(f"{path}: expected a run folder, a .json or a .safetensors checkpoint file")


def _read_record(json_path: pathlib.Path) -> dict:
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{json_path}: cannot read checkpoint JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise CheckpointError(f"{json_path}: checkpoint JSON is a {type(record).__name__}, not an object")

    def field(key: str, kind: type | tuple[type, ...]):
        if key not in record:
            raise CheckpointError(f"{json_path}: checkpoint JSON lacks the field {key!r}")
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise CheckpointError(
                f"{json_path}: field {key!r} should be {getattr(kind, '__name__', kind)}, "
                f"got {value!r}"
            )
        return value

    version = field("format_version", int)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{json_path}: format_version {version} is not supported (expected {FORMAT_VERSION})"
        )
    field("step", int)
    name = field("tensor_file", str)
    if pathlib.Path(name).name != name or name in ("", ".", ".."):
        raise CheckpointError(f"{json_path}: tensor_file must be a bare file name, got {name!r}")
    field("tensor_bytes", int)
    field("tensor_sha256", str)
    field("meta", dict)
    declared = field("tensors", dict)
    for tname, spec in declared.items():
        ok = (
            isinstance(spec, dict)
            and isinstance(spec.get("dtype"), str)
            and isinstance(getattr(torch, spec["dtype"], None), torch.dtype)
            and isinstance(spec.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in spec["shape"])
        )
        if not ok:
            raise CheckpointError(f"{json_path}: bad declaration of tensor {tname!r}: {spec!r}")
    return record


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Load and verify a checkpoint; return ``(tensors, meta)`` with ``meta`` as saved.

    ``path`` is a checkpoint's ``.json``, its ``.safetensors``, or a run folder (then the
    latest committed checkpoint, see :func:`latest_checkpoint`; a corrupted latest checkpoint
    raises rather than silently falling back to an older one). Checks, in order: the JSON
    parses and has every field; the tensor file exists with the recorded size and sha256; the
    file holds exactly the declared tensors with the declared dtypes and shapes. Tensors are
    returned on CPU as independent copies (not views of a file mapping).

    Raises:
        CheckpointError: any check fails; the message names the offending file. Nothing is
            returned partially.
    """
    json_path = _resolve_json(pathlib.Path(path))
    record = _read_record(json_path)
    tensor_path = json_path.parent / record["tensor_file"]
    try:
        size = tensor_path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(
            f"{tensor_path}: tensor file named by {json_path.name} does not exist"
        ) from None
    if size != record["tensor_bytes"]:
        raise CheckpointError(
            f"{tensor_path}: size is {size} bytes but {json_path.name} records "
            f"{record['tensor_bytes']} (truncated or replaced file)"
        )
    digest = _sha256_file(tensor_path)
    if digest != record["tensor_sha256"]:
        raise CheckpointError(
            f"{tensor_path}: sha256 mismatch (file {digest}, {json_path.name} records "
            f"{record['tensor_sha256']}): the file is corrupted"
        )

    declared: dict = record["tensors"]
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safetensors.safe_open(str(tensor_path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            if names != set(declared):
                missing = sorted(set(declared) - names)
                extra = sorted(names - set(declared))
                raise CheckpointError(
                    f"{tensor_path}: tensors differ from {json_path.name}: "
                    f"missing {missing}, undeclared {extra}"
                )
            for name in sorted(names):
                t = f.get_tensor(name)
                spec = declared[name]
                if _dtype_name(t.dtype) != spec["dtype"] or list(t.shape) != spec["shape"]:
                    raise CheckpointError(
                        f"{tensor_path}: tensor {name!r} is {_dtype_name(t.dtype)} "
                        f"{list(t.shape)}, {json_path.name} declares {spec['dtype']} {spec['shape']}"
                    )
                # The default loader maps the file; a copy keeps the result independent of it.
                tensors[name] = t.clone()
    except safetensors.SafetensorError as exc:
        raise CheckpointError(f"{tensor_path}: not a valid safetensors file: {exc}") from exc
    return tensors, record["meta"]


def load_state_dict_strict(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into ``module``'s state after checking every key, shape and dtype.

    All checks run before anything is written: on any mismatch the module is left unchanged
    and one ValueError lists every problem (key, expected and received shape/dtype; missing
    and unexpected keys). Tensors may live on another device than the module.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of str to Tensor, got {type(tensors).__name__}")
    expected = module.state_dict()
    problems: list[str] = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for key in sorted(set(expected) & set(tensors)):
        want, got = expected[key], tensors[key]
        if not isinstance(want, torch.Tensor):
            continue  # extra state (get_extra_state) is the module's own business
        if not isinstance(got, torch.Tensor):
            problems.append(f"{key!r}: expected a Tensor, received {type(got).__name__}")
        elif want.shape != got.shape or want.dtype != got.dtype:
            problems.append(
                f"{key!r}: expected {_dtype_name(want.dtype)} {list(want.shape)}, "
                f"received {_dtype_name(got.dtype)} {list(got.shape)}"
            )
    if problems:
        raise ValueError(
            f"state does not match {type(module).__name__}; module left unchanged: "
            + "; ".join(problems)
        )
    module.load_state_dict(dict(tensors), strict=True)


# --------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state() -> dict[str, torch.Tensor]:
    """Every random-number generator a training step touches, as tensors (safetensors-ready).

    Keys: ``torch.cpu`` (uint8), ``torch.cuda.<i>`` (uint8, one per device, only when CUDA is
    already initialised: capturing never initialises it), ``python.state`` (int64, the 625
    words of ``random``'s Mersenne Twister), ``python.extra`` (float64: version, has-gauss,
    gauss), ``numpy.keys`` (int64, 624 words of numpy's legacy global generator),
    ``numpy.extra`` (float64: pos, has-gauss, cached gaussian). Prefix the keys when merging
    them into a model's tensors, and strip the prefix before :func:`restore_rng_state`.
    """
    state: dict[str, torch.Tensor] = {"torch.cpu": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch.cuda.{i}"] = s.clone()
    version, words, gauss = random.getstate()
    state["python.state"] = torch.tensor(words, dtype=torch.int64)
    state["python.extra"] = torch.tensor(
        [float(version), float(gauss is not None), 0.0 if gauss is None else float(gauss)],
        dtype=torch.float64,
    )
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    if kind != "MT19937":
        raise ValueError(f"numpy global generator is {kind!r}, expected 'MT19937'")
    state["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64).copy())
    state["numpy.extra"] = torch.tensor(
        [float(pos), float(has_gauss), float(cached)], dtype=torch.float64
    )
    return state


def _rng_field(state: Mapping[str, torch.Tensor], key: str, dtype: torch.dtype, numel: int | None):
    if key not in state:
        raise ValueError(f"RNG state lacks {key!r}; got keys {sorted(state)}")
    t = state[key]
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1 or (
        numel is not None and t.numel() != numel
    ):
        desc = (
            f"{_dtype_name(t.dtype)} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        )
        raise ValueError(
            f"RNG state {key!r} should be a 1-D {_dtype_name(dtype)} tensor"
            f"{'' if numel is None else f' of {numel} elements'}, got {desc}"
        )
    return t.detach().cpu()


def restore_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    """Set every generator back to a state from :func:`capture_rng_state`.

    Everything is decoded and checked before any generator is touched. CUDA states are
    restored when CUDA is available with enough devices; otherwise they are skipped with a
    warning (a run moved between machines cannot replay GPU randomness anyway).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of str to Tensor, got {type(state).__name__}")
    cpu = _rng_field(state, "torch.cpu", torch.uint8, None)
    words = _rng_field(state, "python.state", torch.int64, 625)
    py_extra = _rng_field(state, "python.extra", torch.float64, 3)
    np_keys = _rng_field(state, "numpy.keys", torch.int64, 624)
    np_extra = _rng_field(state, "numpy.extra", torch.float64, 3)
    cuda_keys = sorted(
        (k for k in state if k.startswith("torch.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1])
    )
    cuda = [_rng_field(state, k, torch.uint8, None) for k in cuda_keys]
    if [int(k.rsplit(".", 1)[1]) for k in cuda_keys] != list(range(len(cuda_keys))):
        raise ValueError(f"CUDA RNG keys must be torch.cuda.0..N-1, got {cuda_keys}")
    word_list = words.tolist()
    if not all(0 <= w < 2**32 for w in word_list[:624]) or not 0 <= word_list[624] <= 624:
        raise ValueError("RNG state 'python.state' holds values outside the Mersenne Twister range")
    version, has_gauss, gauss = py_extra.tolist()
    py_state = (int(version), tuple(word_list), gauss if has_gauss else None)
    pos, np_has_gauss, np_cached = np_extra.tolist()
    np_state = ("MT19937", np_keys.numpy().astype(np.uint32), int(pos), int(np_has_gauss), np_cached)

    torch.set_rng_state(cpu)
    random.setstate(py_state)
    np.random.set_state(np_state)
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda):
            for i, s in enumerate(cuda):
                torch.cuda.set_rng_state(s, device=i)
        else:
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            logger.warning(
                "checkpoint holds CUDA RNG states for %d devices but %d are available; "
                "CUDA generators not restored",
                len(cuda), n,
            )
