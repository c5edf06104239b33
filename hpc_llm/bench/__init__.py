"""Measuring the machine: timers and the matmul peak (calibrate), the communication benchmark (comm)."""
