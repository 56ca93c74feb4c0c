"""A real knowledge graph: the Python standard library, parsed with :mod:`ast`.

Entities are modules, classes and functions (methods are functions), named by stable
dotted qualified names (``json.decoder``, ``json.decoder.JSONDecoder``,
``json.decoder.JSONDecoder.decode``). Relations (ids in alphabetical order):

* ``calls``          function -> function, resolved statically where possible (see below)
* ``defines``        module -> class/function, class -> method/nested class
* ``imports``        module -> module (every ``import``/``from`` in the file, local ones too)
* ``inherits_from``  class -> class (base classes that resolve to a class of the graph)

Only entities defined in the parsed sources are nodes: references that leave the graph
(builtins, C extension modules such as ``_json``, anything outside the given roots) are
dropped and counted, never invented.

Call resolution is static and deliberately conservative. A call ``a.b.c(...)`` inside a
function is resolved through, in order: the method's first parameter (``self.m()`` /
``cls.m()`` / ``super().m()`` look the method up in the class and then its base classes,
breadth-first), imports local to the function, the module namespace (names bound by
``def``/``class``/``import``/``from ... import``, definitions winning over imports so that a
pure-Python fallback shadowed by an optional C import still resolves), and ``from x import
*`` sources. Names that are parameters or assigned locally are not resolved (they are
values, not the module-level binding). Re-exports are followed (``from json import
JSONDecoder`` resolves to ``json.decoder.JSONDecoder`` through ``json/__init__.py``).
Calling a class resolves to its ``__init__`` (found through its bases); calls that end at
a module, an unknown name or an expression that is not a dotted name are dropped. The
numbers of resolved and dropped call sites, bases and imports are logged and kept in
:attr:`KnowledgeGraph.stats`.

Determinism: files are read in sorted order, entity names are sorted (entity id = position
in the sorted list), relation ids follow the sorted relation names, and triples are sorted
lexicographically by (head, relation, tail) id. The same sources and Python version give
byte-identical tensors. The train/valid/test split hashes each triple's *names* with
BLAKE2b (not Python's salted ``hash()``), so a triple keeps its split when the graph
around it changes.

Storage: ``safetensors`` for the tensors plus JSON for names and counts; no pickle.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import json
import logging
import os
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

logger = logging.getLogger(__name__)

ENTITY_TYPE_NAMES: tuple[str, ...] = ("module", "class", "function")
MODULE, CLASS, FUNCTION = 0, 1, 2
RELATION_NAMES: tuple[str, ...] = ("calls", "defines", "imports", "inherits_from")
CALLS, DEFINES, IMPORTS, INHERITS_FROM = 0, 1, 2, 3

# Folders never parsed: test suites (huge, and partly deliberately malformed sources),
# installed third-party packages, the IDLE application, bytecode caches.
DEFAULT_EXCLUDED_DIRS: frozenset[str] = frozenset(
    {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__"}
)
DEFAULT_SPLIT: tuple[float, float, float] = (0.8, 0.1, 0.1)

# Bumped whenever extraction rules change, so cached graphs of older rules are not reused.
EXTRACTOR_VERSION = 1
_FORMAT_VERSION = 1
_TENSORS_FILE = "kg.safetensors"
_NAMES_FILE = "kg.json"
# Bound on alias chains (re-export of a re-export ...); real chains are 2-3 long, the
# bound only stops cycles such as two modules star-importing each other.
_MAX_RESOLVE_DEPTH = 16
# Exceptions that mark a source file as unparsable (null bytes give ValueError on 3.11,
# SyntaxError on 3.12+; absurd nesting gives RecursionError).
_PARSE_ERRORS = (SyntaxError, UnicodeDecodeError, ValueError, RecursionError)


# --------------------------------------------------------------------------------------
# Public containers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KGSplit:
    """Disjoint train/valid/test triples of one graph.

    Shapes:
        train: (E_train, 3) int32, valid: (E_valid, 3) int32, test: (E_test, 3) int32,
        rows ``[head, relation, tail]`` in the graph's sorted triple order.
    """

    train: Tensor
    valid: Tensor
    test: Tensor


@dataclass(eq=False)
class KnowledgeGraph:
    """A typed multi-relational graph with named entities and relations.

    Shapes:
        entity_types: (N,) int8, an index into ``entity_type_names``.
        triples: (E, 3) int32, rows ``[head, relation, tail]``.

    ``stats`` holds extraction counts (files parsed/skipped, calls resolved/dropped, ...);
    it is provenance, saved and loaded, but not part of equality.
    """

    entity_names: list[str]
    entity_types: Tensor
    relation_names: list[str]
    triples: Tensor
    entity_type_names: list[str] = field(default_factory=lambda: list(ENTITY_TYPE_NAMES))
    stats: dict[str, int] = field(default_factory=dict)
    _entity_index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_name_list("entity_names", self.entity_names)
        _check_name_list("relation_names", self.relation_names)
        _check_name_list("entity_type_names", self.entity_type_names)
        n = len(self.entity_names)
        if not isinstance(self.entity_types, Tensor) or self.entity_types.dtype != torch.int8:
            raise TypeError(f"entity_types must be an int8 tensor, got {_describe(self.entity_types)}")
        if self.entity_types.shape != (n,):
            raise ValueError(
                f"entity_types must have shape ({n},) to match entity_names, "
                f"got {tuple(self.entity_types.shape)}"
            )
        if n and not (0 <= int(self.entity_types.min()) and int(self.entity_types.max()) < len(self.entity_type_names)):
            raise ValueError(
                f"entity_types must lie in [0, {len(self.entity_type_names)}), got range "
                f"[{int(self.entity_types.min())}, {int(self.entity_types.max())}]"
            )
        if not isinstance(self.triples, Tensor) or self.triples.dtype != torch.int32:
            raise TypeError(f"triples must be an int32 tensor, got {_describe(self.triples)}")
        if self.triples.dim() != 2 or self.triples.shape[1] != 3:
            raise ValueError(f"triples must have shape (E, 3), got {tuple(self.triples.shape)}")
        if self.triples.numel():
            ends = self.triples[:, [0, 2]]
            if int(ends.min()) < 0 or int(ends.max()) >= n:
                raise ValueError(
                    f"triples reference entity ids outside [0, {n}): range "
                    f"[{int(ends.min())}, {int(ends.max())}]"
                )
            rels = self.triples[:, 1]
            if int(rels.min()) < 0 or int(rels.max()) >= len(self.relation_names):
                raise ValueError(
                    f"triples reference relation ids outside [0, {len(self.relation_names)}): range "
                    f"[{int(rels.min())}, {int(rels.max())}]"
                )
        if not isinstance(self.stats, dict) or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in self.stats.items()
        ):
            raise TypeError(f"stats must be a dict[str, int], got {self.stats!r}")
        self._entity_index = {name: i for i, name in enumerate(self.entity_names)}
        if len(self._entity_index) != n:
            dupes = sorted({x for x in self.entity_names if self.entity_names.count(x) > 1})
            raise ValueError(f"entity_names must be unique, duplicated: {dupes[:10]}")

    # ---- sizes and look-ups ----------------------------------------------------------

    @property
    def num_entities(self) -> int:
        return len(self.entity_names)

    @property
    def num_relations(self) -> int:
        return len(self.relation_names)

    @property
    def num_triples(self) -> int:
        return int(self.triples.shape[0])

    def entity_id(self, name: str) -> int:
        """Id of an entity; unknown names raise ValueError listing close matches."""
        if not isinstance(name, str):
            raise TypeError(f"entity name must be a str, got {type(name).__name__}: {name!r}")
        idx = self._entity_index.get(name)
        if idx is None:
            close = difflib.get_close_matches(name, self.entity_names, n=5)
            hint = f"; close matches: {close}" if close else ""
            raise ValueError(f"unknown entity {name!r}{hint}")
        return idx

    def relation_id(self, name: str) -> int:
        """Id of a relation; unknown names raise ValueError listing the known ones."""
        if name not in self.relation_names:
            raise ValueError(f"unknown relation {name!r}; known relations: {self.relation_names}")
        return self.relation_names.index(name)

    def has_triple(self, head: str, relation: str, tail: str) -> bool:
        """Whether the named triple is in the graph."""
        row = torch.tensor(
            [self.entity_id(head), self.relation_id(relation), self.entity_id(tail)], dtype=torch.int32
        )
        return bool((self.triples == row).all(dim=1).any())

    def named_triples(self, triples: Tensor | None = None) -> list[tuple[str, str, str]]:
        """``(head, relation, tail)`` names of ``triples`` (default: all triples)."""
        rows = self.triples if triples is None else triples
        return [
            (self.entity_names[h], self.relation_names[r], self.entity_names[t])
            for h, r, t in rows.tolist()
        ]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KnowledgeGraph):
            return NotImplemented
        return (
            self.entity_names == other.entity_names
            and self.relation_names == other.relation_names
            and self.entity_type_names == other.entity_type_names
            and torch.equal(self.entity_types, other.entity_types)
            and torch.equal(self.triples, other.triples)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable container of tensors

    # ---- split and views ---------------------------------------------------------------

    def split_assignment(self, fractions: Sequence[float] = DEFAULT_SPLIT) -> Tensor:
        """Split id of every triple: 0 train, 1 valid, 2 test.

        A triple's bucket depends only on its names (BLAKE2b of ``head\\x1frel\\x1ftail``
        mapped to [0, 1)), so it is the same in every process and every build of a graph
        that contains the triple. Bucket sizes follow ``fractions`` up to sampling noise.

        Shapes:
            returns: (E,) int8
        """
        f_train, f_valid, _ = _check_fractions(fractions)
        buckets = []
        for h, r, t in self.named_triples():
            u = _unit_hash(h, r, t)
            buckets.append(0 if u < f_train else (1 if u < f_train + f_valid else 2))
        return torch.tensor(buckets, dtype=torch.int8)

    def split(self, fractions: Sequence[float] = DEFAULT_SPLIT) -> KGSplit:
        """Deterministic, seed-free train/valid/test split of the triples (see split_assignment)."""
        bucket = self.split_assignment(fractions)
        return KGSplit(
            train=self.triples[bucket == 0].contiguous(),
            valid=self.triples[bucket == 1].contiguous(),
            test=self.triples[bucket == 2].contiguous(),
        )

    def to_pyg(self, fractions: Sequence[float] = DEFAULT_SPLIT):
        """The graph as a :class:`torch_geometric.data.Data`.

        Attributes: ``edge_index`` (2, E) int32, ``edge_type`` (E,) int8, ``node_type`` (N,)
        int8, ``num_nodes``, boolean edge masks ``train_edge_mask``/``val_edge_mask``/
        ``test_edge_mask`` (E,) from :meth:`split_assignment`, and the python lists
        ``entity_names``, ``relation_names``, ``node_type_names``.
        """
        from torch_geometric.data import Data

        if self.num_relations > 127 or len(self.entity_type_names) > 127:
            raise ValueError(
                f"int8 edge_type/node_type hold at most 127 kinds, got {self.num_relations} "
                f"relations and {len(self.entity_type_names)} entity types"
            )
        bucket = self.split_assignment(fractions)
        return Data(
            edge_index=self.triples[:, [0, 2]].t().contiguous(),
            edge_type=self.triples[:, 1].to(torch.int8),
            node_type=self.entity_types.clone(),
            num_nodes=self.num_entities,
            train_edge_mask=bucket == 0,
            val_edge_mask=bucket == 1,
            test_edge_mask=bucket == 2,
            entity_names=list(self.entity_names),
            relation_names=list(self.relation_names),
            node_type_names=list(self.entity_type_names),
        )

    def neighbourhood(self, entity: str | int, hops: int = 1) -> KnowledgeGraph:
        """The subgraph induced by the entities within ``hops`` edges of ``entity``.

        Edges are followed in both directions; every triple between two kept entities is
        kept. Entity ids are renumbered, keeping the original relative order.
        """
        if isinstance(hops, bool) or not isinstance(hops, int) or hops < 0:
            raise ValueError(f"hops must be a non-negative int, got {hops!r}")
        if isinstance(entity, str):
            center = self.entity_id(entity)
        elif isinstance(entity, int) and not isinstance(entity, bool):
            if not 0 <= entity < self.num_entities:
                raise ValueError(f"entity id must lie in [0, {self.num_entities}), got {entity}")
            center = entity
        else:
            raise TypeError(f"entity must be a name or an id, got {type(entity).__name__}: {entity!r}")
        heads, tails = self.triples[:, 0].long(), self.triples[:, 2].long()
        keep = torch.zeros(self.num_entities, dtype=torch.bool)
        keep[center] = True
        for _ in range(hops):
            grown = keep.clone()
            grown[tails[keep[heads]]] = True
            grown[heads[keep[tails]]] = True
            if torch.equal(grown, keep):
                break
            keep = grown
        new_id = torch.cumsum(keep.long(), 0) - 1
        edge_keep = keep[heads] & keep[tails]
        sub = self.triples[edge_keep].long()
        sub[:, 0] = new_id[sub[:, 0]]
        sub[:, 2] = new_id[sub[:, 2]]
        kept = keep.nonzero().flatten().tolist()
        return KnowledgeGraph(
            entity_names=[self.entity_names[i] for i in kept],
            entity_types=self.entity_types[keep].clone(),
            relation_names=list(self.relation_names),
            triples=sub.to(torch.int32),
            entity_type_names=list(self.entity_type_names),
        )

    def relation_counts(self) -> dict[str, int]:
        """Number of triples per relation name."""
        counts = torch.bincount(self.triples[:, 1].long(), minlength=self.num_relations)
        return {name: int(c) for name, c in zip(self.relation_names, counts.tolist())}

    # ---- persistence ---------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``kg.safetensors`` (tensors) and ``kg.json`` (names, stats) into directory ``path``.

        Each file is written to a temporary name and moved into place, so a reader never
        sees a half-written file.
        """
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"triples": self.triples.contiguous(), "entity_types": self.entity_types.contiguous()}
        meta = {
            "format_version": _FORMAT_VERSION,
            "entity_names": self.entity_names,
            "relation_names": self.relation_names,
            "entity_type_names": self.entity_type_names,
            "stats": self.stats,
        }
        _atomic_write(directory / _TENSORS_FILE, lambda p: save_file(tensors, str(p)))
        _atomic_write(
            directory / _NAMES_FILE,
            lambda p: p.write_text(json.dumps(meta, indent=0, sort_keys=True), encoding="utf-8"),
        )
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike) -> KnowledgeGraph:
        """Read a graph written by :meth:`save` (no pickle involved)."""
        directory = Path(path)
        tensor_path, names_path = directory / _TENSORS_FILE, directory / _NAMES_FILE
        for p in (tensor_path, names_path):
            if not p.is_file():
                raise ValueError(f"no saved knowledge graph at {str(directory)!r}: missing {p.name}")
        meta = json.loads(names_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"{str(names_path)!r} is not a knowledge graph of format version {_FORMAT_VERSION}"
            )
        missing_keys = {"entity_names", "relation_names", "entity_type_names", "stats"} - meta.keys()
        if missing_keys:
            raise ValueError(f"{str(names_path)!r} lacks keys {sorted(missing_keys)}")
        tensors = load_file(str(tensor_path))
        missing = {"triples", "entity_types"} - tensors.keys()
        if missing:
            raise ValueError(f"{str(tensor_path)!r} lacks tensors {sorted(missing)}")
        return cls(
            entity_names=meta["entity_names"],
            entity_types=tensors["entity_types"],
            relation_names=meta["relation_names"],
            triples=tensors["triples"],
            entity_type_names=meta["entity_type_names"],
            stats=meta["stats"],
        )


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------


def default_stdlib_dir() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def build_stdlib_kg(
    stdlib_dir: str | os.PathLike | None = None,
    *,
    exclude_dirs: Iterable[str] = DEFAULT_EXCLUDED_DIRS,
    cache_dir: str | os.PathLike | None = None,
) -> KnowledgeGraph:
    """The knowledge graph of the running interpreter's standard library.

    ``stdlib_dir`` defaults to ``sysconfig.get_paths()["stdlib"]``; folders named in
    ``exclude_dirs`` (tests, site-packages, idlelib, ...) are skipped. With ``cache_dir``
    the built graph is stored there, keyed by Python version and a fingerprint of the
    sources, and reused on the next call.
    """
    root = default_stdlib_dir() if stdlib_dir is None else Path(stdlib_dir)
    return build_kg_from_roots([root], root, exclude_dirs=exclude_dirs, cache_dir=cache_dir)


def build_kg_from_roots(
    roots: Sequence[str | os.PathLike],
    package_root: str | os.PathLike,
    *,
    exclude_dirs: Iterable[str] = DEFAULT_EXCLUDED_DIRS,
    cache_dir: str | os.PathLike | None = None,
) -> KnowledgeGraph:
    """The knowledge graph of the ``.py`` files under ``roots``.

    Module names are the file paths relative to ``package_root`` (``<package_root>/json/
    decoder.py`` -> ``json.decoder``; ``__init__.py`` names its package). Every root (a
    folder or a single ``.py`` file) must lie inside ``package_root``. Files whose path is
    not a dotted identifier are skipped (counted in ``stats["files_skipped_name"]``);
    malformed files (syntax errors, bad encodings, null bytes) are skipped and counted in
    ``stats["files_skipped_malformed"]``.
    """
    if isinstance(roots, (str, os.PathLike)) or not isinstance(roots, Sequence) or not roots:
        raise ValueError(f"roots must be a non-empty list of paths, got {roots!r}")
    base = Path(package_root)
    if not base.is_dir():
        raise ValueError(f"package_root must be an existing folder, got {str(base)!r}")
    base = base.resolve()
    excluded = frozenset(exclude_dirs)
    files, skipped_name = _collect_files([Path(r) for r in roots], base, excluded)
    sources = [(module, is_pkg, path, path.read_bytes()) for module, is_pkg, path in files]

    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / _cache_key(sources, excluded)
        if (cache_path / _NAMES_FILE).is_file():
            try:
                kg = KnowledgeGraph.load(cache_path)
            except (OSError, ValueError) as err:
                logger.warning("ignoring unreadable cached graph at %s: %s", cache_path, err)
            else:
                logger.info("loaded cached knowledge graph from %s", cache_path)
                return kg

    kg = _Extractor(sources, skipped_name).build()
    if cache_path is not None:
        kg.save(cache_path)
    return kg


# --------------------------------------------------------------------------------------
# Extraction internals
# --------------------------------------------------------------------------------------


@dataclass
class _ClassInfo:
    qualname: str
    module: str
    enclosing_class: str | None
    bases: list[str | None]  # dotted base expressions; None for ones that are not names


@dataclass
class _FunctionInfo:
    qualname: str
    module: str
    owner_class: str | None
    self_name: str | None  # first parameter of a non-static method
    is_classmethod: bool
    local_imports: dict[str, str]
    local_names: frozenset[str]
    calls: list[tuple[bool, str]]  # (through super(), dotted name)
    unresolvable_calls: int  # call sites whose callee is not a dotted name


@dataclass
class _ModuleInfo:
    name: str
    is_package: bool
    defined: dict[str, str] = field(default_factory=dict)  # local name -> qualname
    imported: dict[str, str] = field(default_factory=dict)  # local name -> dotted target
    star_sources: list[str] = field(default_factory=list)
    imports: list[tuple[str | None, tuple[str, ...]]] = field(default_factory=list)

    def binding(self, name: str) -> str | None:
        # Definitions win over imports: `try: from _c import f except ImportError: def f()`
        # style fallbacks then resolve to the Python definition that is in the graph.
        return self.defined.get(name) or self.imported.get(name)


class _Extractor:
    """One build: parse every module, then resolve names across modules."""

    def __init__(self, sources: list[tuple[str, bool, Path, bytes]], skipped_name: int) -> None:
        self.sources = sources
        self.kinds: dict[str, int] = {}
        self.modules: dict[str, _ModuleInfo] = {}
        self.classes: list[_ClassInfo] = []
        self.functions: list[_FunctionInfo] = []
        self.bases: dict[str, list[str]] = {}
        self._memo: dict[tuple[str, bool], str | None] = {}
        self._active: set[tuple[str, bool]] = set()
        self.triples: set[tuple[str, int, str]] = set()
        self.stats: dict[str, int] = {
            "files_parsed": 0,
            "files_skipped_malformed": 0,
            "files_skipped_name": skipped_name,
            "name_collisions": 0,
            "calls_resolved": 0,
            "calls_dropped": 0,
            "bases_resolved": 0,
            "bases_dropped": 0,
            "imports_resolved": 0,
            "imports_dropped": 0,
        }

    # ---- pass 1: parse and collect ------------------------------------------------------

    def build(self) -> KnowledgeGraph:
        for module, _, _, _ in self.sources:
            if module in self.kinds:
                self.stats["name_collisions"] += 1
            self.kinds.setdefault(module, MODULE)
        for module, is_pkg, path, data in self.sources:
            if module in self.modules:
                continue  # `pkg.py` next to `pkg/__init__.py`: first in sorted order wins
            tree = self._parse(path, data)
            if tree is None:
                self.kinds.pop(module, None)
                continue
            self.kinds[module] = MODULE
            self.stats["files_parsed"] += 1
            info = _ModuleInfo(module, is_pkg)
            self.modules[module] = info
            self._collect_module(info, tree)
        self._resolve_bases()
        self._resolve_calls()
        self._resolve_imports()
        return self._assemble()

    def _parse(self, path: Path, data: bytes) -> ast.Module | None:
        try:
            with warnings.catch_warnings():
                # Invalid escape sequences in old sources warn at parse time; they are the
                # sources' business, not the caller's.
                warnings.simplefilter("ignore", SyntaxWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                return ast.parse(data, filename=str(path))
        except _PARSE_ERRORS as err:
            self.stats["files_skipped_malformed"] += 1
            logger.warning("skipping malformed source %s: %s: %s", path, type(err).__name__, err)
            return None

    def _register(self, qualname: str, kind: int) -> bool:
        """Add an entity; False when the name is taken by an entity of another kind."""
        existing = self.kinds.get(qualname)
        if existing is None:
            self.kinds[qualname] = kind
            return True
        if existing == kind and kind != MODULE:
            return True  # the same def in two branches of an `if`: one entity
        self.stats["name_collisions"] += 1
        return False

    def _collect_module(self, info: _ModuleInfo, tree: ast.Module) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    info.imports.append((alias.name, ()))
            elif isinstance(node, ast.ImportFrom):
                base = _absolute_module(info.name, info.is_package, node.level, node.module)
                info.imports.append((base, tuple(a.name for a in node.names)))
        for stmt in _scope_statements(tree.body):
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = f"{info.name}.{stmt.name}"
                if self._register(qualname, FUNCTION):
                    info.defined.setdefault(stmt.name, qualname)
                    self.triples.add((info.name, DEFINES, qualname))
                    self.functions.append(_function_info(stmt, qualname, info.name, info.is_package, None))
            elif isinstance(stmt, ast.ClassDef):
                qualname = f"{info.name}.{stmt.name}"
                if self._register(qualname, CLASS):
                    info.defined.setdefault(stmt.name, qualname)
                    self.triples.add((info.name, DEFINES, qualname))
                    self._collect_class(stmt, qualname, info, None)
            elif isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if alias.asname:
                        info.imported.setdefault(alias.asname, alias.name)
                    else:
                        top = alias.name.split(".")[0]
                        info.imported.setdefault(top, top)
            elif isinstance(stmt, ast.ImportFrom):
                base = _absolute_module(info.name, info.is_package, stmt.level, stmt.module)
                if base is None:
                    continue
                for alias in stmt.names:
                    if alias.name == "*":
                        info.star_sources.append(base)
                    else:
                        info.imported.setdefault(alias.asname or alias.name, f"{base}.{alias.name}")

    def _collect_class(self, node: ast.ClassDef, qualname: str, info: _ModuleInfo, enclosing: str | None) -> None:
        self.classes.append(_ClassInfo(qualname, info.name, enclosing, [_base_name(b) for b in node.bases]))
        for stmt in _scope_statements(node.body):
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                member = f"{qualname}.{stmt.name}"
                if self._register(member, FUNCTION):
                    self.triples.add((qualname, DEFINES, member))
                    self.functions.append(_function_info(stmt, member, info.name, info.is_package, qualname))
            elif isinstance(stmt, ast.ClassDef):
                member = f"{qualname}.{stmt.name}"
                if self._register(member, CLASS):
                    self.triples.add((qualname, DEFINES, member))
                    self._collect_class(stmt, member, info, qualname)

    # ---- pass 2: resolve names ----------------------------------------------------------

    def _member(self, cls: str, name: str, through_bases: bool) -> str | None:
        """``cls.name`` looked up in ``cls`` then (optionally) its bases, breadth-first.

        Breadth-first order approximates the C3 MRO; it differs only for diamonds whose
        branches both define the name.
        """
        order, seen = [cls], {cls}
        i = 0
        while i < len(order):
            candidate = f"{order[i]}.{name}"
            if candidate in self.kinds:
                return candidate
            if through_bases:
                for base in self.bases.get(order[i], ()):
                    if base not in seen:
                        seen.add(base)
                        order.append(base)
            i += 1
        return None

    def _module_attribute(self, module: str, name: str, through_bases: bool, depth: int) -> str | None:
        info = self.modules.get(module)
        if info is None:
            return None
        bound = info.binding(name)
        if bound is not None:
            return self._resolve(bound, through_bases, depth + 1)
        if not name.startswith("_"):
            for source in info.star_sources:
                found = self._resolve(f"{source}.{name}", through_bases, depth + 1)
                if found is not None:
                    return found
        return None

    def _resolve(self, dotted: str, through_bases: bool, depth: int = 0) -> str | None:
        """The entity a fully qualified dotted name denotes, or None (memoised)."""
        if dotted in self.kinds:
            return dotted
        key = (dotted, through_bases)
        if key in self._memo:
            return self._memo[key]
        if depth > _MAX_RESOLVE_DEPTH or key in self._active:
            return None  # an alias cycle (`from . import x` naming itself, mutual star imports)
        self._active.add(key)
        try:
            found = self._resolve_uncached(dotted, through_bases, depth)
        finally:
            self._active.discard(key)
        self._memo[key] = found
        return found

    def _resolve_uncached(self, dotted: str, through_bases: bool, depth: int) -> str | None:
        parts = dotted.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            kind = self.kinds.get(prefix)
            if kind is None:
                continue
            head, rest = parts[i], parts[i + 1 :]
            if kind == MODULE:
                target = self._module_attribute(prefix, head, through_bases, depth)
            elif kind == CLASS:
                target = self._member(prefix, head, through_bases)
            else:
                return None  # attribute of a function object
            if target is None or not rest:
                return target
            return self._resolve(".".join([target, *rest]), through_bases, depth + 1)
        return None

    def _resolve_in_module(self, module: str, dotted: str, through_bases: bool) -> str | None:
        """Resolve a dotted name as written in ``module``'s global scope."""
        first, _, rest = dotted.partition(".")
        target = self._module_attribute(module, first, through_bases, 0)
        if target is None or not rest:
            return target
        return self._resolve(f"{target}.{rest}", through_bases, 1)

    def _resolve_bases(self) -> None:
        # Bases are resolved without walking bases (they are what is being computed).
        for cls in self.classes:
            resolved: list[str] = []
            for base in cls.bases:
                target = None
                if base is not None:
                    if cls.enclosing_class is not None and "." not in base:
                        target = self._member(cls.enclosing_class, base, False)
                    if target is None:
                        target = self._resolve_in_module(cls.module, base, False)
                if target is not None and self.kinds[target] == CLASS and target != cls.qualname:
                    resolved.append(target)
                    self.triples.add((cls.qualname, INHERITS_FROM, target))
                    self.stats["bases_resolved"] += 1
                else:
                    self.stats["bases_dropped"] += 1
            self.bases[cls.qualname] = resolved

    def _resolve_call(self, fn: _FunctionInfo, through_super: bool, dotted: str) -> str | None:
        first, _, rest = dotted.partition(".")
        if through_super:
            if fn.owner_class is None:
                return None
            for base in self.bases.get(fn.owner_class, ()):
                found = self._member(base, first, True)
                if found is not None:
                    return self._resolve(f"{found}.{rest}", True, 1) if rest else found
            return None
        if fn.self_name is not None and first == fn.self_name:
            if not rest:
                # `cls(...)` in a classmethod constructs the class; `self(...)` is __call__.
                return fn.owner_class if fn.is_classmethod else self._member(fn.owner_class, "__call__", True)
            head, _, tail = rest.partition(".")
            found = self._member(fn.owner_class, head, True)
            if found is None or not tail:
                return found
            return self._resolve(f"{found}.{tail}", True, 1)
        if first in fn.local_imports:
            return self._resolve(".".join(filter(None, [fn.local_imports[first], rest])), True)
        if first in fn.local_names:
            return None  # a parameter or local variable: a value, not the global binding
        return self._resolve_in_module(fn.module, dotted, True)

    def _resolve_calls(self) -> None:
        for fn in self.functions:
            self.stats["calls_dropped"] += fn.unresolvable_calls
            for through_super, dotted in fn.calls:
                target = self._resolve_call(fn, through_super, dotted)
                if target is not None and self.kinds[target] == CLASS:
                    target = self._member(target, "__init__", True)
                if target is not None and self.kinds[target] == FUNCTION:
                    self.triples.add((fn.qualname, CALLS, target))
                    self.stats["calls_resolved"] += 1
                else:
                    self.stats["calls_dropped"] += 1

    def _module_prefix(self, dotted: str) -> str | None:
        """Longest prefix of ``dotted`` that is a module of the graph (`os.path` -> `os`)."""
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if self.kinds.get(prefix) == MODULE:
                return prefix
        return None

    def _resolve_imports(self) -> None:
        for info in self.modules.values():
            for base, names in info.imports:
                targets: list[str | None] = []
                if base is None:
                    targets = [None] * max(1, len(names))
                elif not names:  # `import a.b.c`
                    targets = [self._module_prefix(base)]
                else:  # `from base import x`: x may be a submodule or an attribute of base
                    for name in names:
                        sub = f"{base}.{name}"
                        targets.append(sub if self.kinds.get(sub) == MODULE else self._module_prefix(base))
                for target in targets:
                    if target is None:
                        self.stats["imports_dropped"] += 1
                    else:
                        self.stats["imports_resolved"] += 1
                        if target != info.name:
                            self.triples.add((info.name, IMPORTS, target))

    # ---- output ---------------------------------------------------------------------------

    def _assemble(self) -> KnowledgeGraph:
        names = sorted(self.kinds)
        index = {name: i for i, name in enumerate(names)}
        rows = sorted((index[h], r, index[t]) for h, r, t in self.triples)
        triples = torch.tensor(rows, dtype=torch.int32).reshape(-1, 3)
        types = torch.tensor([self.kinds[n] for n in names], dtype=torch.int8)
        kg = KnowledgeGraph(
            entity_names=names,
            entity_types=types,
            relation_names=list(RELATION_NAMES),
            triples=triples,
            stats=dict(self.stats),
        )
        counts = kg.relation_counts()
        logger.info(
            "knowledge graph: %d entities, %d triples %s; files parsed %d, skipped malformed %d, "
            "skipped (not a module name) %d; calls resolved %d / dropped %d; bases resolved %d / "
            "dropped %d; imports resolved %d / dropped %d",
            kg.num_entities, kg.num_triples, counts, self.stats["files_parsed"],
            self.stats["files_skipped_malformed"], self.stats["files_skipped_name"],
            self.stats["calls_resolved"], self.stats["calls_dropped"], self.stats["bases_resolved"],
            self.stats["bases_dropped"], self.stats["imports_resolved"], self.stats["imports_dropped"],
        )
        return kg


# --------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------


def _scope_statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements of one scope, entering compound statements but not def/class bodies."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, (ast.If, ast.For, ast.AsyncFor, ast.While)):
            yield from _scope_statements(stmt.body)
            yield from _scope_statements(stmt.orelse)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            yield from _scope_statements(stmt.body)
        elif isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar":
            yield from _scope_statements(stmt.body)
            for handler in stmt.handlers:
                yield from _scope_statements(handler.body)
            yield from _scope_statements(stmt.orelse)
            yield from _scope_statements(stmt.finalbody)
        elif isinstance(stmt, ast.Match):
            for case in stmt.cases:
                yield from _scope_statements(case.body)


def _dotted_name(expr: ast.expr) -> tuple[bool, str] | None:
    """``(through_super, "a.b.c")`` for ``a.b.c`` or ``super().b.c``; None otherwise."""
    parts: list[str] = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if isinstance(expr, ast.Name):
        parts.append(expr.id)
        return False, ".".join(reversed(parts))
    if (
        parts
        and isinstance(expr, ast.Call)
        and isinstance(expr.func, ast.Name)
        and expr.func.id == "super"
    ):
        return True, ".".join(reversed(parts))
    return None


def _base_name(expr: ast.expr) -> str | None:
    # `Generic[T]` / `Mapping[str, int]` inherit from the subscripted class.
    if isinstance(expr, ast.Subscript):
        expr = expr.value
    found = _dotted_name(expr)
    return None if found is None or found[0] else found[1]


def _decorator_names(node: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    names = set()
    for dec in node.decorator_list:
        found = _dotted_name(dec)
        if found is not None:
            names.add(found[1].rsplit(".", 1)[-1])
    return names


def _function_info(
    node: ast.FunctionDef | ast.AsyncFunctionDef,
    qualname: str,
    module: str,
    module_is_package: bool,
    owner_class: str | None,
) -> _FunctionInfo:
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    decorators = _decorator_names(node)
    self_name = None
    if owner_class is not None and positional and "staticmethod" not in decorators:
        self_name = positional[0].arg
    local_names = {a.arg for a in (*positional, *args.kwonlyargs)}
    local_names.update(a.arg for a in (args.vararg, args.kwarg) if a is not None)
    global_names: set[str] = set()
    local_imports: dict[str, str] = {}
    calls: list[tuple[bool, str]] = []
    unresolvable = 0
    # Only the body: decorators and defaults run in the enclosing scope at definition time.
    for stmt in node.body:
        for sub in ast.walk(stmt):
            if isinstance(sub, ast.Call):
                found = _dotted_name(sub.func)
                if found is None:
                    unresolvable += 1
                else:
                    calls.append(found)
            elif isinstance(sub, ast.Name):
                if not isinstance(sub.ctx, ast.Load):
                    local_names.add(sub.id)
            elif isinstance(sub, ast.arg):
                local_names.add(sub.arg)  # parameters of nested functions and lambdas
            elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                local_names.add(sub.name)
            elif isinstance(sub, ast.ExceptHandler) and sub.name:
                local_names.add(sub.name)
            elif isinstance(sub, (ast.Global, ast.Nonlocal)):
                global_names.update(sub.names)
            elif isinstance(sub, ast.Import):
                for alias in sub.names:
                    if alias.asname:
                        local_imports.setdefault(alias.asname, alias.name)
                    else:
                        top = alias.name.split(".")[0]
                        local_imports.setdefault(top, top)
            elif isinstance(sub, ast.ImportFrom):
                base = _absolute_module(module, module_is_package, sub.level, sub.module)
                if base is not None:
                    for alias in sub.names:
                        if alias.name != "*":
                            local_imports.setdefault(alias.asname or alias.name, f"{base}.{alias.name}")
    return _FunctionInfo(
        qualname=qualname,
        module=module,
        owner_class=owner_class,
        self_name=self_name,
        is_classmethod="classmethod" in decorators,
        local_imports=local_imports,
        local_names=frozenset(local_names - global_names),
        calls=calls,
        unresolvable_calls=unresolvable,
    )


def _absolute_module(current: str, is_package: bool, level: int, module: str | None) -> str | None:
    """Absolute name of the module a ``from`` import names; None if it climbs above the top.

    ``from ..x import y`` in module ``a.b.c`` (level 2) names ``a.x``; in package ``a.b``
    (``a/b/__init__.py``) it names ``a.x`` as well, since a package is its own level 1.
    """
    if level == 0:
        return module
    parts = current.split(".")
    if not is_package:
        parts = parts[:-1]
    drop = level - 1
    if drop >= len(parts):
        return None
    base = parts[: len(parts) - drop]
    return ".".join([*base, module] if module else base)


def _collect_files(
    roots: list[Path], package_root: Path, excluded: frozenset[str]
) -> tuple[list[tuple[str, bool, Path]], int]:
    """Sorted ``(module name, is package, path)`` of the ``.py`` files under ``roots``."""
    found: dict[Path, None] = {}
    for root in roots:
        if not root.exists():
            raise ValueError(f"source root does not exist: {str(root)!r}")
        resolved = root.resolve()
        if not resolved.is_relative_to(package_root):
            raise ValueError(
                f"source root {str(root)!r} is not inside package_root {str(package_root)!r}"
            )
        if resolved.is_file():
            if resolved.suffix != ".py":
                raise ValueError(f"source root file must be a .py file, got {str(root)!r}")
            found[resolved] = None
            continue
        for dirpath, dirnames, filenames in os.walk(resolved):
            dirnames[:] = sorted(d for d in dirnames if d not in excluded and not d.startswith("."))
            for name in sorted(filenames):
                if name.endswith(".py"):
                    found[Path(dirpath) / name] = None
    files: list[tuple[str, bool, Path]] = []
    skipped = 0
    for path in found:
        parts = list(path.relative_to(package_root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        if not parts or not all(p.isidentifier() for p in parts):
            skipped += 1
            logger.info("skipping %s: its path is not a dotted module name", path)
            continue
        files.append((".".join(parts), is_package, path))
    files.sort(key=lambda f: (f[0], not f[1], str(f[2])))
    return files, skipped


def _cache_key(sources: list[tuple[str, bool, Path, bytes]], excluded: frozenset[str]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"v{EXTRACTOR_VERSION}|{sorted(excluded)}".encode())
    for module, is_pkg, _, data in sources:
        digest.update(f"\0{module}|{is_pkg}|{len(data)}\0".encode())
        digest.update(data)
    version = "{}{}.{}.{}".format(sys.implementation.name, *sys.version_info[:3])
    return f"kg-{version}-{digest.hexdigest()}"


def _unit_hash(head: str, relation: str, tail: str) -> float:
    """A stable pseudo-uniform number in [0, 1) from a triple's names."""
    digest = hashlib.blake2b(f"{head}\x1f{relation}\x1f{tail}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(fractions) if isinstance(fractions, Sequence) else ()
    if (
        len(values) != 3
        or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f >= 0 for f in values)
        or abs(sum(values) - 1.0) > 1e-9
    ):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions!r}")
    return float(values[0]), float(values[1]), float(values[2])


def _check_name_list(arg: str, names: object) -> None:
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{arg} must be a list of str, got {type(names).__name__}")


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"tensor of dtype {x.dtype} and shape {tuple(x.shape)}"
    return f"{type(x).__name__}"


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
