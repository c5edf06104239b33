#!/usr/bin/env bash
# Install Slurm, munge and PMIx from Debian, for tests/scripts/test_slurm.py (a real one-node Slurm started by
# scripts/slurm_cluster.sh). Best effort: without root, apt-get or the network it says why and exits 0, and the Slurm
# tests then skip with their reason. libpmix-dev must be installed before slurmd starts for `srun --mpi=pmix`.
set -uo pipefail
PACKAGES=(slurm-wlm munge libpmix-dev)
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && dpkg -s libpmix-dev >/dev/null 2>&1; then
    exit 0  # already there
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install_slurm: not root or no apt-get: not installing ${PACKAGES[*]} (the Slurm tests will skip)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if apt-get update -qq >"$log" 2>&1 && apt-get install -y -qq "${PACKAGES[@]}" >>"$log" 2>&1; then
    echo "install_slurm: installed ${PACKAGES[*]}"
else
    echo "install_slurm: apt-get failed (the Slurm tests will skip); its last lines:" >&2
    tail -n 5 "$log" >&2
fi
rm -f "$log"
exit 0
