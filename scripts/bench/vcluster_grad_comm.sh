#!/usr/bin/env bash
# Gradient compression across nodes (docs/planning.md, "Across nodes: the planner against shaped links"): dp 2, one
# rank on each of 2 nodes, scripts/bench/bench_grad_comm.py (fp32, bf16, fp16, PowerSGD r=4 alternating step by step)
# at each link rate, then the measured steps beside the planner's and its predicted crossovers
# (scripts/bench/vcluster_crossover.py). Needs root; ~3 min on 2 cores.
#
#   scripts/bench/vcluster_grad_comm.sh [OUT]     # OUT (default docs/planning_data/vcluster): grad_comm-RATE.out,
#                                                 # cluster-100mbit-pair.toml (calibrated here if missing)
# Environment: RATES (default "none 1gbit 300mbit 100mbit"), VCLUSTER_NAME / VCLUSTER_SUBNET as for vcluster.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-docs/planning_data/vcluster}
mkdir -p "$OUT"
trap 'scripts/vcluster.sh down >/dev/null' EXIT
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
run() { scripts/vcluster.sh mpiexec -n 2 --host node1:1,node2:1 "$@"; }
measured=()
for rate in ${RATES:-none 1gbit 300mbit 100mbit}; do
    scripts/vcluster.sh up 2 --rate "$rate"
    if [ "$rate" = 100mbit ] && [ ! -f "$OUT/cluster-100mbit-pair.toml" ]; then
        run python -m hpc_llm bench calibrate --out "$OUT/cluster-100mbit-pair.toml"
    fi
    run python scripts/bench/bench_grad_comm.py --preset shakespeare-char --steps 5 \
        --schemes fp32,bf16,fp16,powersgd4 >"$OUT/grad_comm-$rate.out"
    measured+=("$rate=$OUT/grad_comm-$rate.out")
done
python scripts/bench/vcluster_crossover.py --cluster "$OUT/cluster-100mbit-pair.toml" --rate-of-cluster 100mbit \
    --measured "${measured[@]}"
