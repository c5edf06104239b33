"""The kernel layer: the elementwise work of a block and of the optimizer, one module per kernel family, each with
its NumPy twin (any array module: the reference) and a numba-compiled implementation for NumPy arrays; dispatch.py
chooses (HPC_LLM_KERNELS=numba|numpy). The CUDA versions are the device path's (kernels/cuda)."""
