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
# SIGTERM/SIGINT to Open MPI's mpiexec kill the ranks within 0.5 s (PRRTE: SIGCONT, 0.25 s, SIGTERM, 0.25 s, SIGKILL,
# not configurable: docs/reliability.md). So mpiexec runs in the background and this script turns its own SIGTERM
# into SIGUSR1 for mpiexec, which forwards it to every rank: checkpoint, exit 75 (resume with --resume auto). A
# signal sent to mpiexec itself (Ctrl-C in a terminal reaches it too) still kills the ranks: `kill -TERM` this script.
mpiexec --oversubscribe -n "$NP" "$HPC" train "$CONFIG" --set data.path="$DATA" --set train.out_dir="$OUT" "$@" &
LAUNCHER=$!
trap 'echo "run.sh: stop signal: SIGUSR1 to mpiexec (pid $LAUNCHER), waiting for the checkpoint" >&2
      kill -USR1 "$LAUNCHER" 2>/dev/null || true' TERM
status=0
wait "$LAUNCHER" || status=$?
while kill -0 "$LAUNCHER" 2>/dev/null; do  # `wait` returns early when a trapped signal arrives
    status=0
    wait "$LAUNCHER" || status=$?
done
if [ "$status" -gt 128 ]; then  # the last wait may have been interrupted just as mpiexec ended
    again=0
    wait "$LAUNCHER" 2>/dev/null || again=$?
    [ "$again" = 127 ] || status=$again
fi
trap - TERM
if [ "$status" -ne 0 ]; then
    echo "run.sh: training ended with status $status (75: stopped with a checkpoint; rerun with --resume auto)" >&2
    exit "$status"
fi
echo "--- a sample from the newest checkpoint in $OUT"
"$HPC" generate "$OUT" --prompt "def " --max-new-tokens 300 --temperature 0.8 --top-k 40
