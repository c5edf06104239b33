"""The planner: which (pp, dp, tp, ZeRO-1, micro-batches, schedule) layout fits on N devices, and which is fastest.

It models this code, not a textbook transformer: memory comes from the same functions that allocate (param_specs,
GradientSync's buckets, each layer's cache as modules.py builds it; memory.py, checked against real allocations in
tests/plan/test_plan.py), time from a few machine figures (cluster.py: GEMM rates, elementwise bandwidth, links) applied
to the operations each layer runs (compute.py), the pipeline timed by simulating the schedule's own op lists
(simulate.py), and everything put together in predict.py and searched in search.py. docs/planning.md states the
formulas, the validation against measured runs, and the extrapolation to large machines.
"""
