#!/usr/bin/env bash
# One entry point that sets itself up on a fresh machine with nothing but Python 3.10+.
#   bash run.sh train [ternary-graph train options]   # the main job (default: tiny preset, stdlib corpus)
#   bash run.sh test  [pytest options]                # the test suite
#   bash run.sh <any ternary-graph subcommand> ...    # trace, eval, viz, bench
# TERNARY_GRAPH_TORCH_INDEX=URL picks the index torch is installed from on first setup, e.g.
# https://download.pytorch.org/whl/cu130 for a CUDA build (unset: pip's configured indexes).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${TERNARY_GRAPH_VENV:-.venv}"
PY="$VENV/bin/python"
TORCH_INDEX="${TERNARY_GRAPH_TORCH_INDEX:-}"
# The stamp names the torch index too (when one is given), so choosing one reinstalls.
STAMP="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)${TORCH_INDEX:+-$(printf %s "$TORCH_INDEX" | sha1sum | cut -c1-8)}"

if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ]; then
    echo "[run.sh] installing ternary-graph and its dependencies into $VENV ..." >&2
    "$PY" -m pip install -q --upgrade pip >&2
    # torch first and pinned, so the package install below does not pick another version.
    # Which build comes depends on the index: here a local CPU wheel; PyPI's Linux wheel is a
    # CUDA build; TERNARY_GRAPH_TORCH_INDEX names an index explicitly. `--device auto` (the
    # default) then trains on CUDA when the installed torch sees a GPU.
    if [ -n "$TORCH_INDEX" ]; then
        "$PY" -m pip install -q --force-reinstall "torch==2.13.0" --index-url "$TORCH_INDEX" >&2
    else
        "$PY" -m pip install -q "torch==2.13.0" >&2
    fi
    "$PY" -m pip install -q -e ".[test]" >&2
    rm -f "$VENV"/.installed-*
    touch "$STAMP"
fi

cmd="${1:-train}"
shift || true
case "$cmd" in
    test)
        exec "$PY" -m pytest "$@"   # pyproject's testpaths = tests
        ;;
    *)
        exec "$VENV/bin/ternary-graph" "$cmd" "$@"
        ;;
esac
