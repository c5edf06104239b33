#!/usr/bin/env bash
# The test suite: set up (venv + package with its test extras), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,local-mpi,import
VENV=${VENV:-.venv}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec "$VENV/bin/python" -m pytest -q "$@"
