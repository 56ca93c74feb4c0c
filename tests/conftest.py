"""Shared fixtures: seeded generators, the dequantised fp64 oracle, and the Triton interpreter.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when its module is imported,
so the interpreter cannot be switched on inside a running test process that may already have
imported the kernels compiled. Kernel test modules therefore mark their interpreter tests
``interpreter`` and hold one driver test that re-runs just those tests in a child
``python -m pytest`` with ``TRITON_INTERPRET=1`` (see :func:`run_interpreter_suite`). The
variable is set only in the child's environment, never in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: Triton kernel test that runs only under TRITON_INTERPRET=1")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_collection_modifyitems(config, items):
    # Interpreter tests are not skipped but moved: the *_suite driver test runs them in a child
    # process with TRITON_INTERPRET=1, so here they are deselected (and reported as such).
    if not interpreting():
        moved = [item for item in items if "interpreter" in item.keywords]
        if moved:
            config.hook.pytest_deselected(items=moved)
            items[:] = [item for item in items if "interpreter" not in item.keywords]
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and (not torch.cuda.is_available() or interpreting()):
            item.add_marker(skip_cuda)


def run_interpreter_suite(test_file: str | Path, timeout_s: float = 240.0) -> None:
    """Run the ``interpreter``-marked tests of ``test_file`` in a child pytest with the
    interpreter on; fail with the child's output if any of them fails."""
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "pytest", str(test_file), "-m", "interpreter", "-q", "-x",
           "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        pytest.fail(f"interpreter suite failed (rc={proc.returncode}):\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}",
                    pytrace=False)
    assert " passed" in proc.stdout, proc.stdout[-2000:]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-op tests: on two shared cores OpenMP spin-waiting
    makes tiny scatter ops take ~50 ms with 2 threads. Restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh, seeded CPU generator per test (tests never share random state)."""
    return torch.Generator().manual_seed(1234)


def dequantized(packed: torch.Tensor, E: torch.Tensor, cols: int) -> torch.Tensor:
    """(rows, cols) float64 weights T ⊙ s: the oracle every linear kernel is compared against."""
    from ternary_graph.ternary.packing import unpack_trits

    return unpack_trits(packed.cpu(), cols).double() * torch.exp2(E.cpu().double() / 4)[:, None]
