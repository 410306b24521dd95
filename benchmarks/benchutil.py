"""Timing helpers shared by the benchmark suites."""
import time


def best_of(fn, rounds):
    """Best wall time of ``rounds`` calls of ``fn`` (a baseline's time)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def subject_time(benchmark, fn, rounds, fallback_rounds=2):
    """Run ``fn`` under pytest-benchmark; its best time (timed here when
    pytest-benchmark is disabled)."""
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return best_of(fn, fallback_rounds)
    return stats.stats.min
