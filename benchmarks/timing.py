"""Timing shared by the benchmarks (run as scripts: `python benchmarks/<name>.py`)."""

import time


def best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` calls, after one warm-up call (first-call allocations, lookup tables)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
