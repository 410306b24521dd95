"""Benchmarks of the block-checksum kernel, each against a baseline measured
in the same run; every test prints its rate and ratio.

    PYTHONPATH=src python -m pytest benchmarks/bench_checksum.py -q -s --benchmark-disable-gc

SMIRROR_BENCH_MB sets the buffer size (default 1024 MiB; the delta uses a
quarter of it, 256 MiB by default).

Goals: strong-only signature >= 0.5 x xxh3_128 over the whole buffer, two
threads >= 1.7 x one thread; weak+strong signature >= 3 GB/s; file signature
from the page cache >= 0.8 x plain readinto; rolling delta >= 2 GB/s.
"""
from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import xxhash

import benchutil
from smirror.kernels import _checksum, checksum

MB = int(os.environ.get("SMIRROR_BENCH_MB", "1024"))
SIZE = MB << 20
BLOCK = checksum.block_size_for(1 << 30)     # 8 KiB, the default for 1 GiB
ROUNDS = 5


def best_of(fn, rounds=None):
    return benchutil.best_of(fn, rounds or ROUNDS)


def subject_time(benchmark, fn):
    return benchutil.subject_time(benchmark, fn, ROUNDS, 2)




def report(benchmark, name, nbytes, seconds, base_name, base_seconds, goal=None, goal_text=""):
    rate = nbytes / seconds / 1e9
    base_rate = nbytes / base_seconds / 1e9
    ratio = base_seconds / seconds
    benchmark.extra_info.update(rate_gbps=round(rate, 2), baseline_gbps=round(base_rate, 2),
                                ratio=round(ratio, 3))
    verdict = "" if goal is None else (" OK" if goal(rate, ratio) else " BELOW GOAL")
    print(f"\n{name}: {rate:.2f} GB/s; {base_name}: {base_rate:.2f} GB/s; "
          f"ratio {ratio:.2f} ({goal_text}){verdict}")


@pytest.fixture(scope="module")
def big():
    # allocated and touched once for the whole module
    return np.random.default_rng(1).integers(0, 256, SIZE, dtype=np.uint8)


@pytest.fixture(scope="module")
def big_file(big, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "big.bin"
    with open(path, "wb") as f:
        f.write(memoryview(big))
    with open(path, "rb") as f:   # make sure it is all in the page cache
        while f.read(64 << 20):
            pass
    yield path
    path.unlink()


def test_strong_signature_vs_xxh3(benchmark, big):
    base = best_of(lambda: xxhash.xxh3_128(big).digest())
    mine = subject_time(benchmark, lambda: _checksum.block_signature(big, BLOCK, False))
    report(benchmark, f"strong signature ({BLOCK} B blocks)", SIZE, mine,
           "xxh3_128 whole buffer", base, lambda r, q: q >= 0.5, "goal >= 0.5")


def test_strong_signature_two_threads(benchmark, big):
    halves = [big[: SIZE // 2], big[SIZE // 2:]]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda h: None, halves))     # threads exist before timing

        def two():
            list(pool.map(lambda h: _checksum.block_signature(h, BLOCK, False), halves))

        one = best_of(lambda: _checksum.block_signature(big, BLOCK, False))
        mine = subject_time(benchmark, two)
    report(benchmark, "strong signature, 2 threads", SIZE, mine, "1 thread", one,
           lambda r, q: q >= 1.7, "goal >= 1.7")


def test_weak_and_strong_signature(benchmark, big):
    base = best_of(lambda: xxhash.xxh3_128(big).digest())
    mine = subject_time(benchmark, lambda: _checksum.block_signature(big, BLOCK, True))
    report(benchmark, f"weak+strong signature ({BLOCK} B blocks)", SIZE, mine,
           "xxh3_128 whole buffer", base, lambda r, q: r >= 3.0, "goal >= 3 GB/s")


def test_weak_only_rate(benchmark, big):
    # not a goal by itself: shows what the weak sums cost next to XXH3
    base = best_of(lambda: xxhash.xxh3_128(big).digest())
    mine = subject_time(benchmark, lambda: _checksum.weak_checksum(big))
    report(benchmark, f"weak checksum ({_checksum.WEAK_SIMD})", SIZE, mine,
           "xxh3_128 whole buffer", base)


@pytest.fixture(params=[True, False], ids=["reader-thread", "inline"])
def reader_thread(request):
    old = _checksum._use_reader_thread(request.param)
    yield request.param
    _checksum._use_reader_thread(old)


@pytest.mark.parametrize("weak", [True, False], ids=["weak+strong", "strong"])
def test_file_signature_vs_readinto(benchmark, big_file, weak, reader_thread):
    # with reader-thread, fd_signature overlaps its preads with hashing (a
    # second thread fills the next slots of its buffer); inline does both on
    # one core. The baseline is one thread only copying.
    chunk = _checksum.READ_CHUNK_SIZE
    # page-aligned, as the kernel's own buffer: a bytearray this large sits
    # 16 B past a page and makes the kernel's copy several times slower here
    buf = memoryview(mmap.mmap(-1, chunk))

    def read_all():
        with open(big_file, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    # the first reads after a while can be slow for reasons outside both
    # sides (host memory); warm up, and time the baseline before and after
    for _ in range(3):
        read_all()
    base = best_of(read_all)
    mine = subject_time(benchmark, lambda: checksum.file_signature(big_file, BLOCK, weak=weak))
    base = min(base, best_of(read_all))
    mode = "reader thread" if reader_thread else "inline reads"
    report(benchmark, f"file signature ({'weak+strong' if weak else 'strong'}, {mode})", SIZE, mine,
           f"readinto {chunk >> 20} MiB buffer", base, lambda r, q: q >= 0.8, "goal >= 0.8")


@pytest.fixture(scope="module")
def delta_case(big):
    """256 MiB target; the source has 1% of its 8 KiB blocks overwritten and
    100 bytes inserted in the middle."""
    size = SIZE // 4
    target = big[:size]
    source = bytearray(target.tobytes())
    rng = np.random.default_rng(2)
    blocks = size // 8192
    for b in rng.choice(blocks, size=max(1, blocks // 100), replace=False):
        source[b * 8192:(b + 1) * 8192] = rng.integers(0, 256, 8192, dtype=np.uint8).tobytes()
    mid = size // 2 + 4321
    source[mid:mid] = rng.integers(0, 256, 100, dtype=np.uint8).tobytes()
    sig = checksum.signature(target, 8192)
    return target, bytes(source), sig


def test_rolling_delta(benchmark, delta_case):
    target, source, sig = delta_case
    base = best_of(lambda: xxhash.xxh3_128(source).digest())
    mine = subject_time(benchmark, lambda: _checksum.delta_ops(
        source, sig.block_size, sig.length, sig.weak, sig.strong))
    ops = _checksum.delta_ops(source, sig.block_size, sig.length, sig.weak, sig.strong)
    literal = sum(n for k, _, n in ops if k == checksum.LITERAL)
    benchmark.extra_info.update(ops=len(ops), literal_bytes=literal)
    report(benchmark, f"rolling delta of {len(source) >> 20} MiB ({len(ops)} ops, "
           f"{literal} literal B)", len(source), mine, "xxh3_128 of the source", base,
           lambda r, q: r >= 2.0, "goal >= 2 GB/s")
