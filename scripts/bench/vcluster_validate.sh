#!/usr/bin/env bash
# The planner's predicted step time against the measured one on the virtual cluster (docs/planning.md, "Across
# nodes: the planner against shaped links"): 2 nodes x 1 rank (each rank a core of its own: with more ranks than
# cores, Open MPI's busy-polling ranks take the cores from the computing ones and a step is the scheduler's), at each
# link rate a calibration (`hpc-llm bench calibrate` across the nodes: each collective kind's table by size, ~1 min
# at 100mbit) and seven layouts through scripts/bench/validate_plan.py, one JSON line each; then the tables. Needs
# root; takes ~5 min on 2 cores. A cluster-RATE.toml already there is used as it is: delete it to calibrate again.
#
#   scripts/bench/vcluster_validate.sh DATA [OUT]     # DATA: a prepared char-level corpus (vocab 65)
#   OUT (default docs/planning_data/vcluster): cluster-RATE.toml, validation-RATE.jsonl
# Environment: RATES (default "none 1gbit 100mbit"), STEPS (default 6), VCLUSTER_NAME / VCLUSTER_SUBNET as for
# vcluster.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=$1
OUT=${2:-docs/planning_data/vcluster}
mkdir -p "$OUT"
trap 'scripts/vcluster.sh down >/dev/null' EXIT
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
run() { scripts/vcluster.sh mpiexec -n 2 --host node1:1,node2:1 "$@"; }
# label: validate_plan.py's layout flags (one rank a node: every group crosses the link)
LAYOUTS=(
    "dp2|"
    "dp2 zero1|--zero 1"
    "dp2 zero3|--zero 3"
    "tp2|--tp 2"
    "tp2 sp|--tp 2 --set parallel.sequence_parallel=true"
    "pp2 1f1b m4|--pp 2 --accum 4"
    "pp2 zb-h1 m4|--pp 2 --accum 4 --schedule zb-h1"
)
for rate in ${RATES:-none 1gbit 100mbit}; do
    scripts/vcluster.sh up 2 --rate "$rate"
    cl="$OUT/cluster-$rate.toml"
    [ -f "$cl" ] || run python -m hpc_llm bench calibrate --out "$cl"
    rm -f "$OUT/validation-$rate.jsonl"
    for entry in "${LAYOUTS[@]}"; do
        # shellcheck disable=SC2086
        run python scripts/bench/validate_plan.py --data "$DATA" --preset shakespeare-char --batch 12 \
            --warmup 1 --steps "${STEPS:-6}" --cluster "$cl" --share 1 --out "$OUT/validation-$rate.jsonl" ${entry#*|} |
            tail -1
    done
done
for rate in ${RATES:-none 1gbit 100mbit}; do
    echo "### link $rate"
    python scripts/bench/validate_plan.py --table "$OUT/validation-$rate.jsonl"
done
