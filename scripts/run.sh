#!/usr/bin/env bash
# The main job on the embedded default: set up, prepare a corpus from the Python standard library's own sources,
# train a small GPT-2 for a few minutes with data parallelism over NP ranks (mpiexec, one BLAS thread per rank),
# write a checkpoint, print a generated sample.
# Usage: scripts/run.sh [--set section.key=value ...]   (extra arguments go to `hpc-llm train`)
# Environment: NP (ranks, default 2), CONFIG, DATA, OUT, VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh local-mpi
VENV=${VENV:-.venv}
HPC="$VENV/bin/hpc-llm"
CONFIG=${CONFIG:-inputs/default.toml}
DATA=${DATA:-data/stdlib}
if [ ! -f "$DATA/meta.json" ]; then
    "$HPC" prepare --stdlib --out "$DATA"
fi
OUT=${OUT:-runs/default}
NP=${NP:-2}
export PATH="$(cd "$VENV" && pwd)/bin:$PATH" OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
if [ "$(id -u)" = 0 ]; then  # Open MPI refuses root unless told
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
mpiexec --oversubscribe -n "$NP" "$HPC" train "$CONFIG" --set data.path="$DATA" --set train.out_dir="$OUT" "$@"
echo "--- a sample from the newest checkpoint in $OUT"
"$HPC" generate "$OUT" --prompt "def " --max-new-tokens 300 --temperature 0.8 --top-k 40
