#!/usr/bin/env bash
# One entry point that sets itself up on a fresh machine with nothing but Python 3.10+.
#   bash run.sh train [ternary-graph train options]   # the main job (default: tiny preset, stdlib corpus)
#   bash run.sh test  [pytest options]                # the test suite
#   bash run.sh <any ternary-graph subcommand> ...    # trace, eval, viz, bench
set -euo pipefail
cd "$(dirname "$0")"
VENV="${TERNARY_GRAPH_VENV:-.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"

if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ]; then
    echo "[run.sh] installing ternary-graph and its dependencies into $VENV ..." >&2
    "$PY" -m pip install -q --upgrade pip >&2
    # torch first and pinned: the CPU build lies on this machine's disk; an unpinned
    # torch would pull a multi-GB CUDA build.
    "$PY" -m pip install -q "torch==2.13.0" >&2
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
