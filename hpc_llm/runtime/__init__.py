"""Faults and the watchdog, stop signals, durable files and the run lock: what keeps a job safe."""
