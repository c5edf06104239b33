"""Which matmul kernel NumPy's OpenBLAS runs, and whether the environment holds it below the CPU.

OpenBLAS picks its kernel for the CPU at load time unless OPENBLAS_CORETYPE names one. Some sites set it (with
OPENBLAS_L2_SIZE) to an AVX2 kernel such as Haswell, because older OpenBLAS builds computed wrong results or crashed
on newer processors. On a CPU with AVX-512 that halves every float32 matmul (measured on an AMD EPYC, one core:
130 GFLOP/s with Haswell's kernel, 254 with SkylakeX's), so a run says which kernel it got and warns when the
environment forced a kernel without AVX-512 on a CPU that has it. Nothing is changed: the user decides.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

# OpenBLAS's x86 kernels that use AVX-512 (OPENBLAS_CORETYPE's names, as get_corename reports them, lower case)
AVX512_KERNELS = frozenset({"skylakex", "cooperlake", "sapphirerapids"})
_state: dict = {}


def _openblas():
    """The loaded OpenBLAS library (NumPy's), or None."""
    if "lib" not in _state:
        _state["lib"] = None
        import numpy  # noqa: F401 (loads the BLAS)

        try:
            maps = Path("/proc/self/maps").read_text().splitlines()
        except OSError:
            return None
        libs = {line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1].lower()}
        for lib in sorted(libs):
            try:
                _state["lib"] = ctypes.CDLL(lib)
                break
            except OSError:
                continue
    return _state["lib"]


def _symbol(names):
    lib = _openblas()
    return next((getattr(lib, n) for n in names if lib is not None and hasattr(lib, n)), None)


def openblas_kernel() -> str | None:
    """The kernel the loaded OpenBLAS runs (its get_corename), or None when NumPy's BLAS is not a loaded OpenBLAS."""
    fn = _symbol(
        ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename")
    )
    if fn is None:
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def set_openblas_threads(n: int) -> bool:
    """OpenBLAS's thread count for this process from now on (as OPENBLAS_NUM_THREADS at start would); False when
    NumPy's BLAS is not an OpenBLAS."""
    names = (
        "scipy_openblas_set_num_threads64_",
        "scipy_openblas_set_num_threads",
        "openblas_set_num_threads",
    )
    fn = _symbol(names)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int]
    fn(n)
    return True


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo; empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return flags


def cpu_has_avx512(cpuinfo: str | None = None) -> bool:
    """Whether the CPU reports avx512f."""
    return "avx512f" in cpu_flags(cpuinfo)


def blas_lines(kernel: str | None, env=None, avx512: bool | None = None) -> tuple[str, str | None]:
    """(the line naming the kernel, a warning or None). The warning: OPENBLAS_CORETYPE forces a kernel without
    AVX-512 on a CPU with it."""
    env = os.environ if env is None else env
    avx512 = cpu_has_avx512() if avx512 is None else avx512
    forced = env.get("OPENBLAS_CORETYPE")
    if kernel is None:
        return "BLAS: not a loaded OpenBLAS (kernel unknown)", None
    line = f"BLAS: OpenBLAS, {kernel} kernel" + (f" (OPENBLAS_CORETYPE={forced})" if forced else "")
    if forced and avx512 and kernel.lower() not in AVX512_KERNELS:
        return line, (
            f"OPENBLAS_CORETYPE={forced} holds OpenBLAS to its {kernel} kernel on a CPU with AVX-512: float32 "
            "matmuls run at about half speed; unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE for this job unless "
            "this OpenBLAS is an old build that needs them"
        )
    return line, None
