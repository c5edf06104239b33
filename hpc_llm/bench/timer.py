"""One timer for every benchmark: a call run a few times after a warm-up, and the best or the median of its times.

The best of N is the machine's figure (on a shared machine the slower runs measure the neighbours); the median of N
is a step's typical time, which is what a training run sees."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def run_times(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of fn, after `warmup` untimed calls (threads started, pages touched)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def best_time(fn: Callable[[], object], repeats: int = 9, warmup: int = 1) -> float:
    """The fastest of `repeats` timed calls of fn after `warmup` untimed ones."""
    return min(run_times(fn, repeats, warmup))


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """The median of `repeats` timed calls of fn after `warmup` untimed ones."""
    return float(statistics.median(run_times(fn, repeats, warmup)))
