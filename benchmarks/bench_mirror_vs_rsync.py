"""smirror mirror vs rsync as a pytest-benchmark suite (small scale by
default; the full-size side-by-side run is ``python tools/compare_rsync.py``).

    SMIRROR_BENCH_SCALE=0.1 PYTHONPATH=src python -m pytest \\
        benchmarks/bench_mirror_vs_rsync.py -q -s --benchmark-disable-gc

Each case times the smirror command with pytest-benchmark and rsync (the
baseline) in the same test, best of the same number of rounds, and prints
the ratio smirror / rsync. Both run as whole commands (process start counts).
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from support import gen_tree  # noqa: E402

RSYNC = shutil.which("rsync")
SCALE = float(os.environ.get("SMIRROR_BENCH_SCALE", "0.05"))
ROUNDS = int(os.environ.get("SMIRROR_BENCH_ROUNDS", "3"))
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV["PYTHONPATH"] = str(REPO / "src")

pytestmark = pytest.mark.skipif(RSYNC is None, reason="rsync not installed")


def smirror(*args):
    subprocess.run([sys.executable, "-m", "smirror", "mirror", "--quiet", *map(str, args)],
                   check=True, env=ENV, stdout=subprocess.DEVNULL)


def rsync(*args):
    subprocess.run([RSYNC, *map(str, args)], check=True, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench")
    info = gen_tree.make_bench_tree(base / "src", scale=SCALE)
    subprocess.run([sys.executable, "-c", "import smirror.mirror.engine, smirror.kernels.checksum"],
                   env=ENV, check=True)          # write the .pyc files once
    smirror(base / "src", base / "dst-s")
    rsync("-a", f"{base / 'src'}/", f"{base / 'dst-r'}/")
    return base, info


def best_of(fn, setup=None):
    times = []
    for _ in range(ROUNDS):
        if setup:
            setup()
        os.sync()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def compare(benchmark, name, run_s, run_r, setup=None):
    def pedantic_setup():
        if setup:
            setup()
        os.sync()
    benchmark.pedantic(run_s, setup=pedantic_setup, rounds=ROUNDS, iterations=1)
    t_s = benchmark.stats.stats.min
    t_r = best_of(run_r, setup)
    print(f"\n{name}: smirror {t_s:.3f} s, rsync {t_r:.3f} s, ratio {t_s / t_r:.2f}")
    benchmark.extra_info.update(rsync_s=t_r, ratio=t_s / t_r)


def test_1_initial_copy(benchmark, tree, tmp_path):
    base, _ = tree
    dst_s, dst_r = tmp_path / "s", tmp_path / "r"

    def clear():
        shutil.rmtree(dst_s, ignore_errors=True)
        shutil.rmtree(dst_r, ignore_errors=True)
    compare(benchmark, "initial full copy",
            lambda: smirror(base / "src", dst_s),
            lambda: rsync("-a", f"{base / 'src'}/", f"{dst_r}/"), setup=clear)


def test_2_unchanged_checksum(benchmark, tree):
    base, _ = tree
    compare(benchmark, "unchanged tree, --checksum",
            lambda: smirror("--checksum", base / "src", base / "dst-s"),
            lambda: rsync("-a", "--checksum", f"{base / 'src'}/", f"{base / 'dst-r'}/"))


def test_3_unchanged_quick_check(benchmark, tree):
    base, _ = tree
    compare(benchmark, "unchanged tree, quick check",
            lambda: smirror("--different", base / "src", base / "dst-s"),
            lambda: rsync("-a", f"{base / 'src'}/", f"{base / 'dst-r'}/"))


def test_4_one_percent_blocks(benchmark, tree):
    base, info = tree
    state = {"seed": 10}

    def change():
        state["seed"] += 1
        gen_tree.change_blocks(info["big"], 0.01, 8192, seed=state["seed"])
    # each round changes fresh blocks; both tools see the same changes
    rounds = []

    def run_s():
        smirror("--different", "--checksum", base / "src", base / "dst-s")

    def run_r():
        rsync("-a", "--no-whole-file", "--inplace", f"{base / 'src'}/", f"{base / 'dst-r'}/")
    for _ in range(ROUNDS):
        change()
        os.sync()
        t0 = time.perf_counter()
        run_s()
        t_s = time.perf_counter() - t0
        os.sync()
        t0 = time.perf_counter()
        run_r()
        rounds.append((t_s, time.perf_counter() - t0))
    benchmark.pedantic(run_s, rounds=1, iterations=1)    # unchanged now: recorded for the table
    t_s, t_r = min(r[0] for r in rounds), min(r[1] for r in rounds)
    print(f"\n1% of 8 KiB blocks changed: smirror {t_s:.3f} s, rsync {t_r:.3f} s, "
          f"ratio {t_s / t_r:.2f}")
    benchmark.extra_info.update(smirror_s=t_s, rsync_s=t_r, ratio=t_s / t_r)


def test_5_small_files_changed(benchmark, tree):
    base, info = tree
    count = max(1, int(200 * min(1.0, len(info["files"]) / 2000)))
    rounds = []
    for i in range(ROUNDS):
        gen_tree.change_small(info["files"], count, seed=300 + i)
        os.sync()
        t0 = time.perf_counter()
        smirror("--different", base / "src", base / "dst-s")
        t_s = time.perf_counter() - t0
        os.sync()
        t0 = time.perf_counter()
        rsync("-a", f"{base / 'src'}/", f"{base / 'dst-r'}/")
        rounds.append((t_s, time.perf_counter() - t0))
    benchmark.pedantic(lambda: smirror("--different", base / "src", base / "dst-s"),
                       rounds=1, iterations=1)
    t_s, t_r = min(r[0] for r in rounds), min(r[1] for r in rounds)
    print(f"\n{count} small files changed: smirror {t_s:.3f} s, rsync {t_r:.3f} s, "
          f"ratio {t_s / t_r:.2f}")
    benchmark.extra_info.update(smirror_s=t_s, rsync_s=t_r, ratio=t_s / t_r)
