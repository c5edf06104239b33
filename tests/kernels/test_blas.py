"""The matmul kernel check: which OpenBLAS kernel runs, and the warning when the environment holds it below the CPU."""

import os
import subprocess
import sys

import pytest

from hpc_llm.kernels import blas
from hpc_llm.kernels.blas import blas_lines, cpu_has_avx512, openblas_kernel

pytestmark = pytest.mark.timeout(60)


def kernel_under(coretype: str | None) -> str:
    env = {
        k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    }
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    code = "from hpc_llm.kernels.blas import openblas_kernel; print(openblas_kernel())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_the_kernel_reported_is_the_one_forced():
    """NumPy's OpenBLAS reports the kernel OPENBLAS_CORETYPE names (read from the loaded library, not the env)."""
    if openblas_kernel() is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS with get_corename")
    assert kernel_under("Haswell") == "Haswell"
    assert kernel_under("Sandybridge") == "Sandybridge"


@pytest.mark.parametrize(
    "kernel, env, avx512, warns",
    [
        ("Haswell", {"OPENBLAS_CORETYPE": "Haswell"}, True, True),  # forced below the CPU
        (
            "Haswell",
            {"OPENBLAS_CORETYPE": "Haswell"},
            False,
            False,
        ),  # the CPU has no AVX-512: nothing lost
        ("Haswell", {}, True, False),  # OpenBLAS's own choice: not the environment's doing
        ("SkylakeX", {"OPENBLAS_CORETYPE": "SkylakeX"}, True, False),
    ],
)
def test_warns_only_when_the_environment_holds_the_kernel_below_the_cpu(kernel, env, avx512, warns):
    line, warning = blas_lines(kernel, env, avx512)
    assert kernel in line
    assert (warning is not None) == warns
    if warns:
        assert "OPENBLAS_CORETYPE=Haswell" in warning and "unset" in warning


def test_cpu_flags_parsed():
    assert cpu_has_avx512("processor : 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert not cpu_has_avx512("flags\t\t: fpu sse avx2 avx512_bf16\n")  # avx512f itself is the test
    assert blas_lines(None, {}, True) == ("BLAS: not a loaded OpenBLAS (kernel unknown)", None)


def test_openblas_threads_set_at_run_time():
    """set_openblas_threads changes the loaded OpenBLAS's count (oneDNN's bf16 path leaves OpenBLAS one thread)."""
    if openblas_kernel() is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS")
    get = blas._symbol(("scipy_openblas_get_num_threads64_", "openblas_get_num_threads"))
    before = get()
    try:
        assert blas.set_openblas_threads(1) and get() == 1
    finally:
        blas.set_openblas_threads(before)
