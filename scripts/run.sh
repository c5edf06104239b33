#!/usr/bin/env bash
# The main job on the embedded default: set up, prepare a corpus from the Python standard library's own sources,
# train a small GPT-2 for a few minutes, write a checkpoint, print a generated sample.
# Usage: scripts/run.sh [--set section.key=value ...]   (extra arguments go to `hpc-llm train`)
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
"$HPC" train "$CONFIG" --set data.path="$DATA" --set train.out_dir="$OUT" "$@"
echo "--- a sample from the newest checkpoint in $OUT"
"$HPC" generate "$OUT" --prompt "def " --max-new-tokens 300 --temperature 0.8 --top-k 40
