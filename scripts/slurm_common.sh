# shellcheck shell=bash
# Sourced by scripts/slurm_cluster.sh (one node) and scripts/vcluster_slurm.sh (one slurmd per virtual node): what
# their throw-away Slurms share. Every file lives under the caller's STATE_DIR ($1 below), none in /etc.

# Stop the processes whose pids are in the given files (each removed): TERM to all at once (each takes about 2 s to
# exit), up to 10 s, then KILL.
stop_pidfiles() {
    local f pid pids=() i
    for f in "$@"; do
        [ -f "$f" ] || continue
        pid=$(cat "$f" 2>/dev/null || true)
        rm -f "$f"
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for i in $(seq 100); do
        local alive=()
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive+=("$pid")
        done
        [ ${#alive[@]} -eq 0 ] && return 0
        pids=("${alive[@]}")
        sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
}

# munged with its own key, socket, pid and log files in STATE_DIR/munge (made 0700 beforehand by the caller).
# --force: run as root, accept a socket under a world-writable /tmp. Non-zero if any step fails (set -e does not
# reach inside a function its caller tests).
start_munged() {
    local m=$1/munge
    dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none &&
        chmod 0400 "$m/munge.key" &&
        munged --force --key-file="$m/munge.key" --socket="$m/munge.socket" \
            --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed"
}

# slurm.conf's lines both clusters share: root daemons, munge through STATE_DIR's socket, the controller's state in
# STATE_DIR/ctld, and what was seen working on this machine kind: proctrack/linuxproc and task/none (no cgroups in a
# container), select/cons_tres with CR_CPU, no accounting, MinJobAge=5 (sbatch --wait returns soon), cred_expire=10
# and sched_interval=5 (a requeued job starts again within seconds, not 35-50 s).
slurm_conf_shared() {
    cat <<CONF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$1/munge/munge.socket,cred_expire=10
StateSaveLocation=$1/ctld
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=5
KillWait=10
SchedulerParameters=sched_interval=5,bf_interval=5
CONF
}
