"""Timing shared by the benchmarks (run as scripts: `python benchmarks/<name>.py`)."""

import time


def best_seconds(fn, repeats: int, clock=time.perf_counter) -> float:
    """The fastest of `repeats` calls, after one warm-up call (first-call allocations, lookup tables).
    clock=time.thread_time: the calling thread's CPU time, which time spent descheduled on a shared
    machine does not count (meaningful only when all the work runs on that thread)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best
