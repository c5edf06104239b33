"""One thread pool for a step's products and its elementwise kernels, on one thread or several.

NumPy's OpenBLAS keeps its own threads; after each product they spin, waiting for the next one, while the NumPy
passes and compiled kernels between products run on one core. Two pools on the same cores is worse still: OpenBLAS's
threads and an OpenMP team each spin while the other computes (a GEMM + parallel LayerNorm chain at 2 threads took
27x longer than either alone, scripts/bench/bench_pool.py). So with the pool on, the float32 products run on
oneDNN's `dnnl_sgemm` (kernels/gemm.py), whose threads are GNU OpenMP's; the row kernels run their parallel variant
on numba's `omp` threading layer, which links the same libgomp, so both are one team of threads; and OpenBLAS keeps
one thread (the products left to it are the small per-head ones).

`HPC_LLM_POOL` chooses: "auto" (the default) or "on" (the same): on wherever oneDNN loads and numba has its omp
layer, on any thread count (OMP_NUM_THREADS, else the cores); or "off". HPC_LLM_KERNELS=numpy turns it off too (the
twins everywhere). On one thread (a rank of a data-parallel job) there is no second pool to spin against, and
oneDNN's products are what count: on the Intel Xeon of docs/performance.md they run 8-12% faster than OpenBLAS's at
one thread (the 6 x 384 step 1312 -> 1148-1214 ms, shakespeare-char's 56 -> 48-50 ms, float32); on the AMD EPYC
before it 0.96-1.12x.
"""

from __future__ import annotations

import ctypes
import os

from hpc_llm.kernels.dispatch import env_choice, kernels_choice

CHOICES = ("auto", "on", "off")
_state: dict = {}


def pool_choice() -> str:
    """The shared pool's setting, from HPC_LLM_POOL; a bad value is a UserError."""
    return env_choice("HPC_LLM_POOL", CHOICES)


def omp_threads() -> int:
    """OpenMP's thread count for a parallel region as GNU OpenMP reads it at load: OMP_NUM_THREADS's first entry,
    else the CPUs this process may run on."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if first.isdigit() and int(first) > 0:
        return int(first)
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


def _omp_layer(n: int) -> bool:
    """numba's parallel loops on its omp layer with n threads; False where numba or the layer is missing, or
    another layer was chosen."""
    try:
        import numba
        import numba.np.ufunc.omppool  # noqa: F401 (the layer's library links libgomp)
    except ImportError:
        return False
    layer = numba.config.THREADING_LAYER
    if layer not in ("omp", "default"):
        return False
    numba.config.THREADING_LAYER = "omp"
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    # starting the layer set OpenMP's default team to NUMBA_NUM_THREADS (the node's cores): oneDNN's products would
    # run that many threads in every rank of a node, oversubscribing its cores; back to the process's own count
    gomp = _libgomp()
    if gomp is not None:
        gomp.omp_set_num_threads(n)
    return True


def _libgomp():
    """The GNU OpenMP runtime this process has loaded (numba's omp layer and oneDNN share it), or None."""
    try:
        return ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
    except OSError:
        return None


def pool_threads() -> int:
    """The shared pool's thread count, or 0 when it is off (decided once per process)."""
    if "threads" not in _state:
        from hpc_llm.kernels.blas import set_openblas_threads
        from hpc_llm.kernels.gemm import onednn_sgemm

        _state["threads"] = 0
        if pool_choice() != "off" and kernels_choice() != "numpy":
            n = omp_threads()
            if onednn_sgemm() is not None and _omp_layer(n):
                _state["threads"] = n
                set_openblas_threads(1)
    return _state["threads"]
