#!/usr/bin/env bash
# The planner's predicted step time against the measured one on the virtual cluster (docs/planning.md, "Across
# nodes: the planner against shaped links"): 2 nodes x 2 ranks, at each link rate a calibration (`hpc-llm bench
# calibrate` across the nodes: link.intra, link.inter, 2 devices a node) and six layouts through
# scripts/bench/validate_plan.py, one JSON line each; then the tables. Needs root; takes ~20 min on 2 cores.
#
#   scripts/bench/vcluster_validate.sh DATA [OUT]     # DATA: a prepared char-level corpus (vocab 65)
#   OUT (default docs/planning_data/vcluster): cluster-RATE.toml, validation-RATE.jsonl
# Environment: RATES (default "none 1gbit 100mbit"), VCLUSTER_NAME / VCLUSTER_SUBNET as for vcluster.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=$1
OUT=${2:-docs/planning_data/vcluster}
mkdir -p "$OUT"
trap 'scripts/vcluster.sh down >/dev/null' EXIT
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
run() { scripts/vcluster.sh mpiexec -n 4 --host node1:2,node2:2 "$@"; }
# label: validate_plan.py's layout flags (ranks packed per node: TP groups, then DP, then PP neighbours)
LAYOUTS=(
    "dp4|"
    "dp4 zero1|--zero 1"
    "dp2 tp2|--tp 2"
    "tp4 (across nodes)|--tp 4"
    "pp2 tp2 (pipeline across)|--tp 2 --pp 2 --accum 4"
    "pp2 dp2 (pipeline across)|--pp 2 --accum 4"
)
for rate in ${RATES:-none 1gbit 100mbit}; do
    scripts/vcluster.sh up 2 --rate "$rate"
    cl="$OUT/cluster-$rate.toml"
    [ -f "$cl" ] || run python -m hpc_llm bench calibrate --out "$cl"
    rm -f "$OUT/validation-$rate.jsonl"
    for entry in "${LAYOUTS[@]}"; do
        # shellcheck disable=SC2086
        run python scripts/bench/validate_plan.py --data "$DATA" --preset shakespeare-char --batch 12 \
            --warmup 1 --steps 4 --cluster "$cl" --share 1 --out "$OUT/validation-$rate.jsonl" ${entry#*|} |
            tail -1
    done
done
for rate in ${RATES:-none 1gbit 100mbit}; do
    echo "### link $rate"
    python scripts/bench/validate_plan.py --table "$OUT/validation-$rate.jsonl"
done
