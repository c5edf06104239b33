#!/usr/bin/env bash
# A throw-away one-node Slurm cluster on this machine, for tests/scripts/test_slurm.py (and for trying the slurm/
# scripts).
#
#   scripts/slurm_cluster.sh start STATE_DIR   # wipe STATE_DIR's daemon state, write slurm.conf, start munged,
#                                              # slurmctld and slurmd, wait until the node is idle
#   scripts/slurm_cluster.sh stop STATE_DIR    # cancel the jobs left, stop the three daemons by their pid files
#
# Then point the client commands at it:  export SLURM_CONF=STATE_DIR/slurm.conf
#
# Everything lives in STATE_DIR: its own munged (socket, key, pid file), free TCP ports, the daemons' logs, state and
# spool directories, so it neither needs nor touches /etc/slurm or a system munged. The node also declares two fake
# GPUs (gres/gpu backed by copies of /dev/null) so that slurm/train_gpu.sbatch's request can be scheduled; nothing
# here has a real GPU. Needs root (SlurmUser=root) and
# the Debian packages slurm-wlm, munge and libpmix-dev (scripts/install_slurm.sh); `srun --mpi=pmix` works only if
# libpmix-dev was installed before slurmd starts. Exit status of start: 0 = node idle; 3 = Slurm or munge is not
# installed; 1 = a daemon did not come up (the reason and the log's tail on stderr).
#
# The configuration follows what was seen working on this machine kind (scripts/slurm_common.sh, shared with
# scripts/vcluster_slurm.sh).
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/slurm_common.sh"

usage() { echo "usage: $0 start|stop STATE_DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
S=$(mkdir -p "$2" && cd "$2" && pwd)
CONF=$S/slurm.conf
export SLURM_CONF=$CONF

die() { echo "slurm_cluster: $*" >&2; exit 1; }

stop() {
    if [ -f "$S/slurmctld.pid" ] && [ -f "$CONF" ] && command -v scancel >/dev/null; then
        # Jobs left running: cancel them so their steps (slurmstepd and the tasks) end before slurmd does.
        if [ -n "$(timeout 10 squeue -h -o %i 2>/dev/null || true)" ]; then
            timeout 10 scancel --full --user="$(id -un)" 2>/dev/null || true
            for _ in $(seq 30); do
                [ -z "$(timeout 10 squeue -h -o %i 2>/dev/null || true)" ] && break
                sleep 0.5
            done
        fi
    fi
    stop_pidfiles "$S/slurmd.pid" "$S/slurmctld.pid" "$S/munge/munged.pid"
}

free_port() {
    "${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

show_log() {
    if [ -f "$1" ]; then
        echo "--- tail of $1" >&2
        tail -n 15 "$1" >&2
    fi
}

start() {
    local missing=()
    for b in munged slurmctld slurmd sbatch srun scontrol sinfo; do
        command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] || missing+=("$b")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "slurm_cluster: not installed: ${missing[*]} (apt-get install slurm-wlm munge libpmix-dev)" >&2
        exit 3
    fi
    [ "$(id -u)" = 0 ] || { echo "slurm_cluster: needs root (SlurmUser=root)" >&2; exit 3; }
    export PATH="$PATH:/usr/sbin:/sbin"

    stop  # a previous cluster in the same directory
    rm -rf "$S/munge" "$S/ctld" "$S/spool" "$S"/*.log "$CONF" "$S/gres.conf" "$S"/fakegpu*
    mkdir -p "$S/munge" "$S/ctld" "$S/spool"
    chmod 0700 "$S/munge"

    start_munged "$S" || { show_log "$S/munge/munged.log"; die "munged did not start"; }

    local host cpus ctld_port slurmd_port FAKE_GPUS=2
    host=$(hostname -s)
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    local overrides=""
    if [ "$cpus" -lt 2 ]; then  # the tests run 2 ranks: declare 2 CPUs and let slurmd accept more than it finds
        cpus=2
        overrides="SlurmdParameters=config_overrides"
    fi
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done
    cat >"$CONF" <<EOF
# One-node test cluster written by scripts/slurm_cluster.sh
ClusterName=hpcllmtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/slurmctld.log
SlurmdLogFile=$S/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$(slurm_conf_shared "$S")
$overrides
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus Gres=gpu:$FAKE_GPUS State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

    # Fake GPUs (a count, no device files): enough for slurm/train_gpu.sbatch's request to be scheduled and its srun
    # line to start tasks; nothing here has a real GPU.
    # Character devices (copies of /dev/null) where mknod is allowed; gres/gpu warns about plain files but works.
    for i in 0 1; do
        mknod "$S/fakegpu$i" c 1 3 2>/dev/null || touch "$S/fakegpu$i"
    done
    echo "AutoDetect=off" >"$S/gres.conf"
    echo "NodeName=$host Name=gpu File=$S/fakegpu[0-1]" >>"$S/gres.conf"

    slurmctld -f "$CONF" || { show_log "$S/slurmctld.log"; die "slurmctld did not start"; }
    slurmd -f "$CONF" || { show_log "$S/slurmd.log"; die "slurmd did not start"; }

    local state="" i
    for i in $(seq 60); do
        state=$(timeout 5 sinfo -h -N -n "$host" -o %T 2>/dev/null || true)
        case "$state" in
            idle) echo "slurm_cluster: node $host idle ($cpus CPUs), SLURM_CONF=$CONF"; return 0 ;;
            down* | drain*) timeout 5 scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    show_log "$S/slurmctld.log"
    show_log "$S/slurmd.log"
    die "node $host not idle after 30 s (state: ${state:-none})"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
