"""Byte-level text corpora: file selection, a cached flat-binary split, memory-mapped sampling.

The pipeline has three stages, each usable on its own:

1. **Select files.** :func:`stdlib_source_files` lists the running interpreter's standard
   library sources (the default corpus, shipped with every Python); :func:`collect_text_files`
   lists the file or folder given with ``--data PATH``.
2. **Prepare.** :func:`prepare_corpus` streams the files, one bounded chunk at a time, into two
   flat byte files ``train.bin`` and ``val.bin`` in a cache folder, skipping empty, binary
   and non-UTF-8 files, and records what it did in ``corpus.json``. A later call with files of
   the same content reuses the cache.
3. **Sample.** :class:`ByteDataset` memory-maps one ``.bin`` file and draws training batches
   that depend only on ``(seed, step)``, so a run's data position is its step number, and
   yields the validation windows in a fixed order.

:func:`unigram_bits_per_byte` is the trivial baseline reported beside the models.

Nothing here loads a whole corpus into memory: reads and bincounts go chunk by chunk, and
datasets are ``numpy.memmap`` views of the prepared files.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import struct
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import fsync_path

logger = logging.getLogger(__name__)

__all__ = [
    "STDLIB_EXCLUDED_DIRS",
    "ByteDataset",
    "CorpusStats",
    "PreparedCorpus",
    "collect_text_files",
    "corpus_fingerprint",
    "default_cache_dir",
    "prepare_corpus",
    "stdlib_source_files",
    "unigram_bits_per_byte",
]

# Folders of the standard library left out of the default corpus. Tests and test data are
# not representative source (and hold deliberately odd encodings); idlelib, turtledemo and
# lib2to3 are applications / a deprecated tool (lib2to3 is gone in 3.13, so leaving it out
# keeps the corpus comparable across versions); site-packages / dist-packages are third-party
# code; __pycache__ holds bytecode. A path is excluded when any folder between the stdlib root
# and the file carries one of these names. tkinter is kept: it is ordinary library source.
STDLIB_EXCLUDED_DIRS: frozenset[str] = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "turtledemo",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "__pycache__",
    }
)

# Bumped whenever the layout of train.bin / val.bin / corpus.json changes, so an old cache is
# rebuilt instead of misread.
_CACHE_FORMAT_VERSION = 1
# Bytes read per step while streaming files and while counting bytes: bounds memory use.
_CHUNK_BYTES = 1 << 20
_COUNT_CHUNK_BYTES = 1 << 24


@dataclass(frozen=True)
class CorpusStats:
    """What :func:`prepare_corpus` kept and skipped."""

    files_used: int  # files written to train.bin or val.bin
    files_skipped_empty: int  # zero-length files
    files_skipped_binary: int  # files containing a NUL byte
    files_skipped_undecodable: int  # files that are not valid UTF-8
    train_bytes: int  # size of train.bin
    val_bytes: int  # size of val.bin


@dataclass(frozen=True)
class PreparedCorpus:
    """Paths and bookkeeping of a prepared (cached) corpus."""

    train_path: pathlib.Path  # flat uint8 file of the training bytes
    val_path: pathlib.Path  # flat uint8 file of the validation bytes
    meta_path: pathlib.Path  # corpus.json
    fingerprint: str  # hex sha256 identifying the inputs (see corpus_fingerprint)
    stats: CorpusStats
    train_files: tuple[str, ...]  # relative paths, in corpus order
    val_files: tuple[str, ...]  # relative paths, in corpus order; disjoint from train_files
    # True when the last val_fraction of a *single* usable file was split off by bytes,
    # because a split by file needs at least two usable files (then train_files and
    # val_files both name that one file).
    split_within_file: bool = False


# --------------------------------------------------------------------------------------------
# File selection


def _sort_key(root: pathlib.Path, path: pathlib.Path) -> str:
    # Sort by the POSIX string of the relative path: the same order on every OS and Python
    # version (pathlib's own ordering changed between versions).
    return path.relative_to(root).as_posix()


def stdlib_source_files() -> list[pathlib.Path]:
    """The running interpreter's standard-library ``.py`` files: the default text corpus.

    Files under any folder named in :data:`STDLIB_EXCLUDED_DIRS` (relative to the stdlib root)
    are left out. Only regular files count; symlinked folders are not followed.

    Returns:
        Absolute paths sorted by their POSIX path relative to
        ``sysconfig.get_paths()["stdlib"]``.
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()
    found: list[pathlib.Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        # Pruning dirnames in place is how os.walk is told not to descend; it is os.walk's
        # own list, not an input of ours.
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = pathlib.Path(dirpath, name)
                # a symlinked file is another name for a file that is in the corpus already (some
                # distributions' stdlib links one module to another): counting it would duplicate it
                if path.is_file() and not path.is_symlink():
                    found.append(path)
    if not found:
        raise ValueError(f"no .py files found under the standard library path {str(root)!r}")
    return sorted(found, key=lambda p: _sort_key(root, p))


def collect_text_files(path: str | os.PathLike[str]) -> list[pathlib.Path]:
    """The files named by ``--data PATH``: the file itself, or every regular file below a folder.

    Folders are walked recursively without following symlinked folders (no cycles); files
    (symlinks to files included) are kept whatever their extension — binary or non-UTF-8 ones
    are skipped later by :func:`prepare_corpus`, with a count.

    Returns:
        Absolute paths sorted by POSIX path relative to the folder.

    Raises:
        ValueError: ``path`` does not exist, is neither file nor folder, or holds no files.
    """
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"data path {str(path)!r} does not exist")
    p = p.resolve()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ValueError(f"data path {str(path)!r} is neither a regular file nor a folder")
    found = [
        pathlib.Path(dirpath, name)
        for dirpath, _dirnames, filenames in os.walk(p, followlinks=False)
        for name in filenames
        if pathlib.Path(dirpath, name).is_file()
    ]
    if not found:
        raise ValueError(f"data folder {str(path)!r} contains no regular files")
    return sorted(found, key=lambda f: _sort_key(p, f))


# --------------------------------------------------------------------------------------------
# Preparation (files -> train.bin / val.bin)


def _common_root(files: Sequence[pathlib.Path]) -> pathlib.Path:
    if len(files) == 1:
        return files[0].parent
    return pathlib.Path(os.path.commonpath([str(f) for f in files]))


def _check_files(files: Sequence[pathlib.Path]) -> list[pathlib.Path]:
    if isinstance(files, (str, os.PathLike)) or not isinstance(files, Sequence):
        raise TypeError(f"files must be a list of paths, got {type(files).__name__}")
    if len(files) == 0:
        raise ValueError("files must not be empty, got an empty list")
    out = [pathlib.Path(f).resolve() for f in files]
    if len(set(out)) != len(out):
        raise ValueError("files must not contain the same file twice")
    return out


def _check_val_fraction(val_fraction: float) -> float:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise TypeError(f"val_fraction must be a float, got {type(val_fraction).__name__}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction!r}")
    return float(val_fraction)


def _content_digest(path: pathlib.Path) -> bytes:
    """BLAKE2b-128 of a file's bytes, read in bounded chunks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_COUNT_CHUNK_BYTES):
            h.update(chunk)
    return h.digest()


def corpus_fingerprint(files: Sequence[str | os.PathLike[str]], val_fraction: float = 0.05) -> str:
    """Hex sha256 identifying a corpus by content: every file's relative path, size and bytes, plus the split.

    Relative paths are taken from the files' common folder, so the same tree elsewhere has the
    same fingerprint. ``val_fraction`` and the cache format version are included because they
    change the prepared bytes. Every file's bytes are hashed (BLAKE2b, about 50 ms for the
    11 MB stdlib corpus): a stat-based key (size, mtime) reused a stale cache for a different
    file that happened to share name, size and mtime.
    """
    paths = _check_files(files)  # type: ignore[arg-type]
    val_fraction = _check_val_fraction(val_fraction)
    root = _common_root(paths)
    h = hashlib.sha256()
    h.update(f"ternary_graph-corpus-v{_CACHE_FORMAT_VERSION}\0{val_fraction!r}\0".encode())
    for p in paths:
        try:
            size, digest = p.stat().st_size, _content_digest(p)
        except OSError as exc:
            raise ValueError(f"cannot read corpus file {str(p)!r}: {exc}") from exc
        rel = p.relative_to(root).as_posix().encode("utf-8", "surrogateescape")
        h.update(struct.pack("<Q", len(rel)) + rel + struct.pack("<Q", size) + digest)
    return h.hexdigest()


def default_cache_dir(
    fingerprint: str, root: str | os.PathLike[str] | None = None
) -> pathlib.Path:
    """Where a prepared corpus is cached: ``<root>/<first 16 hex digits of fingerprint>``.

    ``root`` defaults to ``~/.cache/ternary_graph/corpus``; pass it explicitly to cache
    elsewhere. Nothing is created here and no environment variable is read or changed.
    """
    if not isinstance(fingerprint, str) or len(fingerprint) < 16 or any(
        c not in "0123456789abcdef" for c in fingerprint
    ):
        raise ValueError(f"fingerprint must be a hex digest (>= 16 hex digits), got {fingerprint!r}")
    base = (
        pathlib.Path.home() / ".cache" / "ternary_graph" / "corpus"
        if root is None
        else pathlib.Path(root).expanduser()
    )
    return base / fingerprint[:16]


class _SkipFile(Exception):
    """A file is unusable; ``reason`` is one of "empty", "binary", "undecodable"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _append_file(src: pathlib.Path, out) -> int:
    """Stream ``src`` onto the end of ``out``, checking it is non-empty text; return bytes written.

    The check and the copy happen in one pass, chunk by chunk; when a problem shows up the
    partial copy is truncated away, so ``out`` is exactly as before. A file is classified by
    the first problem met while streaming (NUL checked before UTF-8 within each chunk).
    """
    start = out.tell()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    written = 0
    last = b""
    try:
        with open(src, "rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                if b"\0" in chunk:
                    raise _SkipFile("binary")
                try:
                    decoder.decode(chunk, final=False)
                except UnicodeDecodeError as exc:
                    raise _SkipFile("undecodable") from exc
                out.write(chunk)
                written += len(chunk)
                last = chunk[-1:]
        if written == 0:
            raise _SkipFile("empty")
        try:
            decoder.decode(b"", final=True)  # a truncated multi-byte sequence at the very end
        except UnicodeDecodeError as exc:
            raise _SkipFile("undecodable") from exc
    except _SkipFile:
        out.seek(start)
        out.truncate(start)
        raise
    if last != b"\n":
        # Files are separated by one newline so the last line of one file never runs into
        # the first line of the next.
        out.write(b"\n")
        written += 1
    return written


def _copy_tail(src, start: int, dst) -> None:
    """Copy bytes ``[start, end)`` of the open file ``src`` onto ``dst`` in bounded chunks."""
    src.flush()
    src.seek(start)
    while chunk := src.read(_CHUNK_BYTES):
        dst.write(chunk)


def _single_file_cut(tmp, size: int, val_fraction: float) -> int:
    """Byte offset where the validation tail of a single-file corpus starts.

    The nominal cut ``size - round(size * val_fraction)`` is moved forward to the next line
    start when one exists before the end, so validation begins on a whole line.
    """
    cut = size - max(1, round(size * val_fraction))
    if cut <= 0:
        raise ValueError(
            f"a single usable file of {size} bytes is too small to split off a validation part"
        )
    tmp.flush()
    tmp.seek(cut)
    pos = cut
    while chunk := tmp.read(_CHUNK_BYTES):
        i = chunk.find(b"\n")
        if i >= 0:
            line_start = pos + i + 1
            return line_start if line_start < size else cut
        pos += len(chunk)
    return cut


def _read_meta(meta_path: pathlib.Path) -> dict | None:
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable corpus cache %s (%s); rebuilding", meta_path, exc)
        return None


def _cached(cache_dir: pathlib.Path, fingerprint: str) -> PreparedCorpus | None:
    meta_path = cache_dir / "corpus.json"
    meta = _read_meta(meta_path)
    if meta is None:
        return None
    try:
        if meta["format_version"] != _CACHE_FORMAT_VERSION or meta["fingerprint"] != fingerprint:
            return None
        stats = CorpusStats(**meta["stats"])
        train_path, val_path = cache_dir / "train.bin", cache_dir / "val.bin"
        if (
            train_path.stat().st_size != stats.train_bytes
            or val_path.stat().st_size != stats.val_bytes
        ):
            logger.warning("corpus cache %s has files of unexpected size; rebuilding", cache_dir)
            return None
        return PreparedCorpus(
            train_path=train_path,
            val_path=val_path,
            meta_path=meta_path,
            fingerprint=fingerprint,
            stats=stats,
            train_files=tuple(meta["train_files"]),
            val_files=tuple(meta["val_files"]),
            split_within_file=bool(meta["split_within_file"]),
        )
    except (KeyError, TypeError, OSError) as exc:
        logger.warning("corpus cache %s is incomplete (%r); rebuilding", cache_dir, exc)
        return None


def _publish(tmp_name: str, final: pathlib.Path) -> None:
    fd = os.open(tmp_name, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp_name, final)


def prepare_corpus(
    files: Sequence[str | os.PathLike[str]],
    cache_dir: str | os.PathLike[str],
    val_fraction: float = 0.05,
) -> PreparedCorpus:
    """Stream ``files`` into ``cache_dir/train.bin`` and ``cache_dir/val.bin`` (or reuse them).

    Files are read one at a time in bounded chunks (never the whole corpus); empty files, files
    with a NUL byte and non-UTF-8 files are skipped and counted in the log. A file that does not
    end with ``b"\\n"`` is followed by one. The usable files are split by file, in the given
    order: the last ``max(1, round(n * val_fraction))`` of the ``n`` usable files go to
    validation, the rest to training. With a single usable file (``--data one.txt``) the split
    is by bytes instead: its last ``val_fraction``, starting at a line boundary, is validation.

    Output files are written under temporary names, fsynced and renamed, and ``corpus.json``
    (the commit marker) comes last, so an interrupted prepare never leaves a half file in use.
    The cache is reused when ``corpus.json`` carries the same :func:`corpus_fingerprint` (a hash
    of the files' content) and both ``.bin`` files have the recorded sizes; otherwise it is
    rebuilt.

    Raises:
        ValueError: no file is usable, or the usable files cannot be split into a non-empty
            training and validation part.
    """
    paths = _check_files(files)  # type: ignore[arg-type]
    val_fraction = _check_val_fraction(val_fraction)
    cache = pathlib.Path(cache_dir).expanduser()
    fingerprint = corpus_fingerprint(paths, val_fraction)
    cached = _cached(cache, fingerprint)
    if cached is not None:
        logger.info(
            "reusing prepared corpus %s (%d train bytes, %d val bytes)",
            cache, cached.stats.train_bytes, cached.stats.val_bytes,
        )
        return cached

    cache.mkdir(parents=True, exist_ok=True)
    root = _common_root(paths)
    skipped = {"empty": 0, "binary": 0, "undecodable": 0}
    used: list[tuple[str, int, int]] = []  # (relative path, source size, offset in train tmp)
    train_tmp = tempfile.NamedTemporaryFile(
        dir=cache, prefix="train.bin.", suffix=".tmp", delete=False
    )
    val_tmp = tempfile.NamedTemporaryFile(dir=cache, prefix="val.bin.", suffix=".tmp", delete=False)
    published = False
    try:
        with train_tmp, val_tmp:
            # Everything goes to train first; the validation tail is a contiguous suffix, so it
            # is moved to val afterwards (one extra copy of ~val_fraction of the bytes) instead
            # of reading every file twice to learn which files are usable.
            for p in paths:
                offset = train_tmp.tell()
                try:
                    written = _append_file(p, train_tmp)
                except _SkipFile as skip:
                    skipped[skip.reason] += 1
                    logger.debug("skipping %s file %s", skip.reason, p)
                    continue
                except OSError as exc:
                    raise ValueError(f"cannot read corpus file {str(p)!r}: {exc}") from exc
                used.append((p.relative_to(root).as_posix(), written, offset))
            total = train_tmp.tell()
            if not used:
                raise ValueError(
                    f"none of the {len(paths)} files under {str(root)!r} is usable text "
                    f"(skipped: {skipped['empty']} empty, {skipped['binary']} binary, "
                    f"{skipped['undecodable']} not UTF-8)"
                )
            split_within_file = len(used) == 1
            if split_within_file:
                cut = _single_file_cut(train_tmp, total, val_fraction)
                train_files = val_files = (used[0][0],)
            else:
                n_val = min(len(used) - 1, max(1, round(len(used) * val_fraction)))
                cut = used[len(used) - n_val][2]
                train_files = tuple(u[0] for u in used[: len(used) - n_val])
                val_files = tuple(u[0] for u in used[len(used) - n_val :])
            _copy_tail(train_tmp, cut, val_tmp)
            train_tmp.seek(cut)
            train_tmp.truncate(cut)
        stats = CorpusStats(
            files_used=len(used),
            files_skipped_empty=skipped["empty"],
            files_skipped_binary=skipped["binary"],
            files_skipped_undecodable=skipped["undecodable"],
            train_bytes=cut,
            val_bytes=total - cut,
        )
        train_path, val_path, meta_path = cache / "train.bin", cache / "val.bin", cache / "corpus.json"
        # Un-commit an older cache before replacing its data files.
        meta_path.unlink(missing_ok=True)
        _publish(train_tmp.name, train_path)
        _publish(val_tmp.name, val_path)
        meta = {
            "format_version": _CACHE_FORMAT_VERSION,
            "fingerprint": fingerprint,
            "root": str(root),
            "val_fraction": val_fraction,
            "split_within_file": split_within_file,
            "stats": dataclasses.asdict(stats),
            "files": [{"path": rel, "bytes": size} for rel, size, _ in used],
            "train_files": list(train_files),
            "val_files": list(val_files),
        }
        with tempfile.NamedTemporaryFile(
            "w", dir=cache, prefix="corpus.json.", suffix=".tmp", delete=False, encoding="utf-8"
        ) as meta_tmp:
            json.dump(meta, meta_tmp, indent=1)
        _publish(meta_tmp.name, meta_path)
        fsync_path(cache)
        published = True
    finally:
        if not published:
            for name in (train_tmp.name, val_tmp.name):
                pathlib.Path(name).unlink(missing_ok=True)

    n_skipped = sum(skipped.values())
    # Empty files are routine (empty __init__.py); binary or mis-encoded ones deserve a look.
    logger.log(
        logging.WARNING if skipped["binary"] or skipped["undecodable"] else logging.INFO,
        "prepared corpus in %s: %d files used, %d skipped (%d empty, %d binary, %d not UTF-8); "
        "%d train bytes, %d val bytes",
        cache, len(used), n_skipped, skipped["empty"], skipped["binary"], skipped["undecodable"],
        stats.train_bytes, stats.val_bytes,
    )
    return PreparedCorpus(
        train_path=train_path,
        val_path=val_path,
        meta_path=meta_path,
        fingerprint=fingerprint,
        stats=stats,
        train_files=train_files,
        val_files=val_files,
        split_within_file=split_within_file,
    )


# --------------------------------------------------------------------------------------------
# Sampling


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _step_seed(seed: int, step: int) -> int:
    # A cryptographic hash (not Python's salted hash()) so the seed of a step is the same in
    # every process and on every machine; 63 bits keeps it a valid manual_seed.
    digest = hashlib.blake2b(
        f"ternary_graph.sample_batch:{seed}:{step}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class ByteDataset:
    """A read-only, memory-mapped flat byte file (``train.bin`` / ``val.bin``).

    The bytes are never copied whole into memory: batches gather their windows straight from
    the ``numpy.memmap``. Pickling (e.g. into DataLoader workers) re-opens the file by path
    instead of copying the data.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise ValueError(f"byte dataset file {str(path)!r} does not exist or is not a file")
        size = self.path.stat().st_size
        if size == 0:
            # numpy cannot map an empty file; an empty corpus is unusable anyway.
            raise ValueError(f"byte dataset file {str(path)!r} is empty")
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")

    @property
    def data(self) -> np.memmap:
        """The read-only uint8 memory map of the file."""
        return self._data

    def __len__(self) -> int:
        return int(self._data.shape[0])

    def __repr__(self) -> str:
        return f"ByteDataset(path={str(self.path)!r}, bytes={len(self)})"

    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def _check_window(self, seq_len: int) -> None:
        if len(self) < seq_len + 1:
            raise ValueError(
                f"corpus {str(self.path)!r} has {len(self)} bytes, fewer than seq_len + 1 = "
                f"{seq_len + 1} needed for one (input, target) window"
            )

    def _windows(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
        windows = torch.from_numpy(np.asarray(self._data[idx], dtype=np.int64))
        return windows[:, :-1], windows[:, 1:]

    def sample_batch(
        self, step: int, batch_size: int, seq_len: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random training windows that depend only on ``(seed, step)``.

        Window starts are uniform over every position that leaves room for ``seq_len + 1``
        bytes, drawn from a ``torch.Generator`` seeded by a hash of ``(seed, step)``: resuming
        at step ``s`` replays exactly the batches of an uninterrupted run. Give each
        data-parallel rank its own ``seed`` for different batches.

        Shapes:
            inputs: (batch_size, seq_len), int64 byte values 0..255
            targets: (batch_size, seq_len), int64; ``targets[:, t]`` is the byte after
            ``inputs[:, t]``
        """
        step = _check_int("step", step, 0)
        batch_size = _check_int("batch_size", batch_size, 1)
        seq_len = _check_int("seq_len", seq_len, 1)
        seed = _check_int("seed", seed, -(1 << 63))
        self._check_window(seq_len)
        gen = torch.Generator().manual_seed(_step_seed(seed, step))
        starts = torch.randint(0, len(self) - seq_len, (batch_size,), generator=gen)
        return self._windows(starts.numpy(), seq_len)

    def num_validation_windows(self, seq_len: int, max_windows: int | None = None) -> int:
        """How many windows :meth:`validation_batches` yields for these arguments."""
        seq_len = _check_int("seq_len", seq_len, 1)
        self._check_window(seq_len)
        n = (len(self) - 1) // seq_len
        if max_windows is not None:
            n = min(n, _check_int("max_windows", max_windows, 1))
        return n

    def validation_batches(
        self, batch_size: int, seq_len: int, max_windows: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows from the start of the file, in order.

        Window ``w`` has inputs ``bytes[w*seq_len : (w+1)*seq_len]`` and targets shifted by one,
        so every byte after the first is predicted exactly once (until ``max_windows`` or the
        end of the file; a tail shorter than a window is left out). The last batch may be
        smaller than ``batch_size``.

        Shapes:
            inputs, targets: (≤ batch_size, seq_len), int64
        """
        batch_size = _check_int("batch_size", batch_size, 1)
        n = self.num_validation_windows(seq_len, max_windows)
        return self._validation_iter(batch_size, seq_len, n)

    def _validation_iter(
        self, batch_size: int, seq_len: int, n: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for first in range(0, n, batch_size):
            starts = np.arange(first, min(first + batch_size, n), dtype=np.int64) * seq_len
            yield self._windows(starts, seq_len)


def _byte_counts(ds: ByteDataset) -> np.ndarray:
    counts = np.zeros(256, dtype=np.int64)
    data = ds.data
    for start in range(0, len(ds), _COUNT_CHUNK_BYTES):
        counts += np.bincount(data[start : start + _COUNT_CHUNK_BYTES], minlength=256)
    return counts


def unigram_bits_per_byte(train: ByteDataset, val: ByteDataset) -> float:
    """Cross-entropy (bits/byte) of ``val`` under the add-one-smoothed byte unigram of ``train``.

    ``p(b) = (count_train(b) + 1) / (len(train) + 256)``; the result is
    ``-sum_b count_val(b) * log2 p(b) / len(val)``. This is the baseline a byte model must beat
    to have learnt anything beyond byte frequencies. Counting goes chunk by chunk over the
    memory maps.
    """
    for name, ds in (("train", train), ("val", val)):
        if not isinstance(ds, ByteDataset):
            raise TypeError(f"{name} must be a ByteDataset, got {type(ds).__name__}")
    train_counts = _byte_counts(train)
    val_counts = _byte_counts(val)
    log2_p = np.log2(train_counts + 1.0) - math.log2(len(train) + 256)
    return float(-(val_counts * log2_p).sum() / len(val))
