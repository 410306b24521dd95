"""Watcher start-up on a large tree beside its baseline, a plain os.walk of
the same tree (the least any recursive watcher must do).

    SMIRROR_BENCH_DIRS=10000 python -m pytest benchmarks/bench_watch.py -q -s
"""
import os
import time

import pytest

from smirror.inotify import Watcher

DIRS = int(os.environ.get("SMIRROR_BENCH_DIRS", "10000"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    for i in range(DIRS):
        os.makedirs(root / f"d{i // 200}" / f"e{i % 200}", exist_ok=True)
    return root


def test_watcher_start_vs_walk(tree):
    t0 = time.perf_counter()
    walked = sum(1 for _ in os.walk(tree))
    walk = time.perf_counter() - t0
    t0 = time.perf_counter()
    with Watcher(tree) as w:
        start = time.perf_counter() - t0
        watched, failures = w.watched_dirs, w.watch_failures
    limit = open("/proc/sys/fs/inotify/max_user_watches").read().strip()
    print(f"\nwatcher start on {watched} directories: {start:.3f} s ({watched / start:,.0f} dirs/s); "
          f"os.walk of the same tree: {walk:.3f} s; ratio {start / walk:.1f}x the walk; "
          f"watch failures {failures}; max_user_watches {limit}")
    assert watched == walked and failures == 0
