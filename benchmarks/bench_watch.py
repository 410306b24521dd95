"""Watcher start-up on a large tree beside its baseline, a plain os.walk of
the same tree (the least any recursive watcher must do): the inotify
watcher (one watch per directory) and the fanotify watcher (one filesystem
mark, one file handle noted per directory), each started ``ROUNDS`` times.

    SMIRROR_BENCH_DIRS=10000 python -m pytest benchmarks/bench_watch.py -q -s
    SMIRROR_BENCH_DIRS=100000 python -m pytest benchmarks/bench_watch.py -q -s

fanotify needs root (CAP_SYS_ADMIN); without it its line says why it was
skipped. The machine may be shared: best and worst of the rounds are printed.
"""
import os
import time

import pytest

from smirror.capture import fanotify
from smirror.capture.inotify import Watcher

DIRS = int(os.environ.get("SMIRROR_BENCH_DIRS", "10000"))
ROUNDS = int(os.environ.get("SMIRROR_BENCH_ROUNDS", "3"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    for i in range(DIRS):
        os.makedirs(root / f"d{i // 200}" / f"e{i % 200}", exist_ok=True)
    return root


def timed(start, rounds=ROUNDS):
    """(best, worst) seconds of ``start()`` (which returns what it counted)
    and the last count."""
    times, count = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        count = start()
        times.append(time.perf_counter() - t0)
    return min(times), max(times), count


def start_inotify(tree):
    with Watcher(tree) as w:
        return w.watched_dirs, w.watch_failures


def start_fanotify(tree):
    with fanotify.Watcher(tree) as w:
        return w.watched_dirs, 0


def test_watcher_start_vs_walk(tree):
    walk_best, walk_worst, walked = timed(lambda: sum(1 for _ in os.walk(tree)))
    limit = open("/proc/sys/fs/inotify/max_user_watches").read().strip()
    print(f"\n{walked} directories, best/worst of {ROUNDS} rounds (shared machine)")
    print(f"  os.walk            {walk_best:7.3f} s / {walk_worst:7.3f} s")
    ino_best, ino_worst, (watched, failures) = timed(lambda: start_inotify(tree))
    print(f"  inotify start      {ino_best:7.3f} s / {ino_worst:7.3f} s  "
          f"{ino_best / walk_best:4.1f}x the walk, {watched / ino_best:9,.0f} dirs/s; "
          f"{watched} watched, {failures} failures (max_user_watches {limit})")
    missing = fanotify.unavailable_reason(tree)
    if missing:
        print(f"  fanotify start     skipped: {missing}")
    else:
        fan_best, fan_worst, (mapped, _) = timed(lambda: start_fanotify(tree))
        print(f"  fanotify start     {fan_best:7.3f} s / {fan_worst:7.3f} s  "
              f"{fan_best / walk_best:4.1f}x the walk, {mapped / fan_best:9,.0f} dirs/s; "
              f"{mapped} mapped, no per-directory limit")
        assert mapped == walked
    assert watched + failures == walked


FILES = int(os.environ.get("SMIRROR_BENCH_FILES", "5000"))


def capture_run(root, backend):
    """Seconds from the first of FILES creates (4 KiB each, half of them then
    renamed) to the capture having sent all of it; and the op count."""
    from smirror.capture.watch import TreeCapture
    ops = []
    cap = TreeCapture(root, ops.append, capture_backend=backend)
    try:
        t0 = time.perf_counter()
        for i in range(FILES):
            with open(root / f"f{i}", "wb") as f:
                f.write(b"%08d" % i * 512)
        for i in range(0, FILES, 2):
            os.rename(root / f"f{i}", root / f"g{i}")
        cap.sync()
        return time.perf_counter() - t0, len(ops)
    finally:
        cap.close()


def test_capture_throughput_by_backend(tmp_path):
    """The same burst of changes captured by each backend (fanotify also
    reads every other event of the filesystem and skips it)."""
    results = {}
    backends = ["inotify"] + ([] if fanotify.unavailable_reason(tmp_path) else ["fanotify"])
    for backend in backends:
        best, n_ops = float("inf"), None
        for r in range(ROUNDS):
            root = tmp_path / f"{backend}{r}"
            root.mkdir()
            seconds, n_ops = capture_run(root, backend)
            best = min(best, seconds)
        results[backend] = (best, n_ops)
        print(f"\n  {backend:8s} {FILES} creates + {FILES // 2} renames: best {best:.3f} s, "
              f"{n_ops} ops")
    if "fanotify" in results:
        print(f"  fanotify / inotify: {results['fanotify'][0] / results['inotify'][0]:.2f}x")
        assert results["fanotify"][1] == results["inotify"][1]
