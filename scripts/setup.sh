#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install hpc_llm into it with the given extras.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh test,local-mpi,import
# Environment: VENV (default .venv), PYTHON (default python3, must be >= 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${1:-local-mpi}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: $PYTHON is $("$PYTHON" --version 2>&1); hpc_llm needs Python >= 3.11 (tomllib)" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# Reinstall only when setup.cfg changed since the last install into this venv.
stamp="$VENV/.hpc_llm-installed-$EXTRAS"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$EXTRAS]"
    touch "$stamp"
fi
