#!/usr/bin/env bash
# A Slurm on the virtual cluster (scripts/vcluster.sh): one slurmd per node, inside the node, slurmctld on node1.
#
#   scripts/vcluster.sh up 2
#   scripts/vcluster_slurm.sh start STATE_DIR   # munged, slurmctld, a slurmd per node; waits until all are idle
#   scripts/vcluster.sh exec node1 env SLURM_CONF=STATE_DIR/slurm.conf sbatch --nodes=2 slurm/train_cpu.sbatch ...
#   scripts/vcluster_slurm.sh stop STATE_DIR    # cancels the jobs left, stops the daemons by their pid files
#
# Client commands (sbatch, squeue, ...) run inside a node (node1 is the "login node"): the host is not on the
# cluster's network. Each node declares the machine's CPUs (the nodes share them). What differs from
# scripts/slurm_cluster.sh's one-node Slurm: NodeName=node[1-N] at their bridge addresses, the slurmd spool, pid and
# log files per node (%n), and TmpFS per node (%n): the nodes share one /tmp, where Slurm's PMIx plugin would
# otherwise make the same directory for a step on every node and fail. Exit status of start: 0 = every node idle;
# 3 = Slurm or munge not installed, not root, or no virtual cluster; 1 = a daemon did not come up.
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/slurm_common.sh"

usage() { echo "usage: $0 start|stop STATE_DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
S=$(mkdir -p "$2" && cd "$2" && pwd)
CONF=$S/slurm.conf
VC="$(dirname "$(readlink -f "$0")")/vcluster.sh"
export SLURM_CONF=$CONF PATH="$PATH:/usr/sbin:/sbin"

die() { echo "vcluster_slurm: $*" >&2; exit 1; }

nodes() { { "$VC" status 2>/dev/null || true; } | awk '/^node[0-9]+ /{print $1}'; }

stop() {
    if [ -f "$S/slurmctld.pid" ]; then
        "$VC" exec node1 timeout 10 scancel --full --user=root 2>/dev/null || true
    fi
    stop_pidfiles "$S"/slurmd.*.pid "$S/slurmctld.pid" "$S/munge/munged.pid"
}

start() {
    local b missing=() list n cpus
    for b in munged slurmctld slurmd sbatch srun sinfo; do
        command -v "$b" >/dev/null || missing+=("$b")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "vcluster_slurm: not installed: ${missing[*]} (scripts/install_slurm.sh)" >&2
        exit 3
    fi
    [ "$(id -u)" = 0 ] || { echo "vcluster_slurm: needs root" >&2; exit 3; }
    list=$(nodes | xargs)
    n=$(echo "$list" | wc -w)
    [ "$n" -ge 1 ] || { echo "vcluster_slurm: no virtual cluster (scripts/vcluster.sh up N)" >&2; exit 3; }
    stop
    rm -rf "$S/munge" "$S/ctld" "$S/spool" "$S/tmp" "$S"/*.log "$CONF"
    mkdir -p "$S/munge" "$S/ctld"
    chmod 0700 "$S/munge"
    # munged on the host: the nodes share the file system, so its socket reaches every node
    start_munged "$S" || die "munged did not start"
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    local addr
    addr=$("$VC" exec node1 ip -4 -o addr show dev eth0 | awk '{split($4, a, "/"); print a[1]}')
    cat >"$CONF" <<EOF
# The virtual cluster's Slurm, written by scripts/vcluster_slurm.sh
ClusterName=vcluster
SlurmctldHost=node1($addr)
SlurmdSpoolDir=$S/spool/%n
TmpFS=$S/tmp/%n
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.%n.pid
SlurmctldLogFile=$S/slurmctld.log
SlurmdLogFile=$S/slurmd.%n.log
$(slurm_conf_shared "$S")
EOF
    local node
    for node in $list; do
        mkdir -p "$S/spool/$node" "$S/tmp/$node"
        addr=$("$VC" exec "$node" ip -4 -o addr show dev eth0 | awk '{split($4, a, "/"); print a[1]}')
        echo "NodeName=$node NodeAddr=$addr CPUs=$cpus State=UNKNOWN" >>"$CONF"
    done
    echo "PartitionName=debug Nodes=$(echo "$list" | tr -s ' ' ',' | sed 's/,$//') Default=YES State=UP" >>"$CONF"
    "$VC" exec node1 slurmctld -f "$CONF" || die "slurmctld did not start: $(tail -n 5 "$S/slurmctld.log" 2>&1)"
    for node in $list; do
        "$VC" exec "$node" slurmd -f "$CONF" ||
            die "slurmd on $node did not start: $(tail -n 5 "$S/slurmd.$node.log" 2>&1)"
    done
    local idle i
    for i in $(seq 60); do
        idle=$("$VC" exec node1 timeout 5 sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l || true)
        if [ "$idle" -eq "$n" ]; then
            echo "vcluster_slurm: $n nodes idle ($list), SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    die "$idle of $n nodes idle after 30 s: $(tail -n 5 "$S/slurmctld.log" 2>&1)"
}

case "$cmd" in
start) start ;;
stop) stop ;;
*) usage ;;
esac
