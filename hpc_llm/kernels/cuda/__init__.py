"""The device path's kernels: CUDA sources (*.cu, compiled by NVRTC through CuPy), their launchers (device.py), and
the launch-counting stand-in for CuPy (launches.py). Nothing here imports CuPy until an array is CuPy's."""
