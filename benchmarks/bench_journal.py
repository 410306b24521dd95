"""Benchmarks of the journal frame kernel, each against a baseline measured
in the same run; every test prints its rate and ratio.

    PYTHONPATH=src python -m pytest benchmarks/bench_journal.py -q -s --benchmark-disable-gc

Goals: encode, and decode+verify, of frames of 4 KiB and of 64 KiB write ops
>= 0.5 x the throughput of a plain ``b"".join`` of the same data bytes;
>= 1 million small ops/s (64-byte writes, setattrs) batched, both ways.
"""
from __future__ import annotations

import pytest

import benchutil
from smirror.kernels import _journal
from smirror.ops import Op

ROUNDS = 15


def best_of(fn, rounds=None):
    return benchutil.best_of(fn, rounds or ROUNDS)


def subject_time(benchmark, fn):
    return benchutil.subject_time(benchmark, fn, ROUNDS, 3)



def interleaved(benchmark, base_fn, fn):
    """Best times of baseline and subject, the baseline measured before and
    after the subject so a noisy neighbour hurts both alike."""
    base = best_of(base_fn)
    t = subject_time(benchmark, fn)
    return min(base, best_of(base_fn)), min(t, best_of(fn))



def writes(count, size):
    # distinct, mildly compressible contents, a few files
    return [Op.write(i + 1, b"data/file-%d.bin" % (i % 8), i * size,
                     (i.to_bytes(4, "little") * (size // 4)))
            for i in range(count)]


BULK = {"4KiB": writes(2048, 4096), "64KiB": writes(128, 65536)}   # 8 MiB each


@pytest.mark.parametrize("name", list(BULK))
def test_encode_bulk_writes_vs_join(benchmark, name):
    ops = BULK[name]
    datas = [op.data for op in ops]
    nbytes = sum(map(len, datas))
    base, t = interleaved(benchmark, lambda: b"".join(datas),
                          lambda: _journal.encode_frame(ops, False))
    ratio = base / t
    benchmark.extra_info.update(ratio=round(ratio, 3))
    print(f"\nencode {len(ops)} x {name} writes: {nbytes / t / 1e9:.2f} GB/s; "
          f"b''.join: {nbytes / base / 1e9:.2f} GB/s; ratio {ratio:.2f} "
          f"(goal >= 0.5){' OK' if ratio >= 0.5 else ' BELOW GOAL'}")


@pytest.mark.parametrize("name", list(BULK))
def test_decode_bulk_writes_vs_join(benchmark, name):
    ops = BULK[name]
    datas = [op.data for op in ops]
    nbytes = sum(map(len, datas))
    frame = _journal.encode_frame(ops, False)
    base, t = interleaved(benchmark, lambda: b"".join(datas),
                          lambda: _journal.decode_frame(frame))
    ratio = base / t
    benchmark.extra_info.update(ratio=round(ratio, 3))
    print(f"\ndecode+verify {len(ops)} x {name} writes: {nbytes / t / 1e9:.2f} GB/s; "
          f"b''.join: {nbytes / base / 1e9:.2f} GB/s; ratio {ratio:.2f} "
          f"(goal >= 0.5){' OK' if ratio >= 0.5 else ' BELOW GOAL'}")


@pytest.mark.parametrize("name", list(BULK))
def test_lz4_bulk_round_trip(benchmark, name):
    """Compressed frames: reported beside lz4.block alone (no goal)."""
    import lz4.block
    ops = BULK[name]
    datas = [op.data for op in ops]
    nbytes = sum(map(len, datas))
    joined = b"".join(datas)
    base = best_of(lambda: lz4.block.decompress(lz4.block.compress(joined, store_size=False),
                                                uncompressed_size=len(joined)), 3)

    def round_trip():
        _journal.decode_frame(_journal.encode_frame(ops, True))

    t = subject_time(benchmark, round_trip)
    frame_len = len(_journal.encode_frame(ops, True))
    print(f"\nlz4 frame round trip {name}: {nbytes / t / 1e9:.2f} GB/s "
          f"(ratio {frame_len / nbytes:.3f} of raw); lz4.block alone: "
          f"{nbytes / base / 1e9:.2f} GB/s; ratio {base / t:.2f}")


SMALL = {
    "64B-writes": [Op.write(i + 1, b"db/table-%d.ibd" % (i % 4), i * 64, b"r" * 64)
                   for i in range(5000)],
    "setattrs": [Op.setattr(i + 1, b"home/user/file%d" % (i % 50), mode=0o644,
                            mtime_ns=1_700_000_000_000_000_000 + i) for i in range(5000)],
}


@pytest.mark.parametrize("name", list(SMALL))
def test_encode_small_ops_rate(benchmark, name):
    ops = SMALL[name]
    base = best_of(lambda: [tuple(op) for op in ops])     # touching every op once
    t = subject_time(benchmark, lambda: _journal.encode_frame(ops, False))
    rate = len(ops) / t
    benchmark.extra_info.update(ops_per_s=round(rate))
    print(f"\nencode {len(ops)} {name}: {rate / 1e6:.2f} M ops/s "
          f"(goal >= 1.0){' OK' if rate >= 1e6 else ' BELOW GOAL'}; "
          f"copying each op tuple: {len(ops) / base / 1e6:.2f} M ops/s; ratio {base / t:.2f}")


@pytest.mark.parametrize("name", list(SMALL))
def test_decode_small_ops_rate(benchmark, name):
    ops = SMALL[name]
    frame = _journal.encode_frame(ops, False)
    base = best_of(lambda: [Op(*op) for op in ops])       # building the op tuples alone
    t = subject_time(benchmark, lambda: _journal.decode_frame(frame))
    rate = len(ops) / t
    benchmark.extra_info.update(ops_per_s=round(rate))
    print(f"\ndecode+verify {len(ops)} {name}: {rate / 1e6:.2f} M ops/s "
          f"(goal >= 1.0){' OK' if rate >= 1e6 else ' BELOW GOAL'}; "
          f"Op(*fields) alone: {len(ops) / base / 1e6:.2f} M ops/s; ratio {base / t:.2f}")


def test_two_threads_decode_big_frames(benchmark):
    """GIL released around the hash and the record walk: two threads decoding
    64 KiB-write frames vs one thread doing the same work (2 cores here,
    shared with everything else on the machine; reported, no goal)."""
    from concurrent.futures import ThreadPoolExecutor
    frame = _journal.encode_frame(BULK["64KiB"], False)
    jobs = 16

    def one_thread():
        for _ in range(jobs):
            _journal.decode_frame(frame)

    pool = ThreadPoolExecutor(2)

    def two_threads():
        list(pool.map(lambda _: _journal.decode_frame(frame), range(jobs)))

    base, t = interleaved(benchmark, one_thread, two_threads)
    pool.shutdown()
    print(f"\ndecode {jobs} x 8 MiB frames: 1 thread {base * 1e3:.1f} ms, 2 threads "
          f"{t * 1e3:.1f} ms; speed-up {base / t:.2f}")


def test_auto_compression_on_incompressible_data(benchmark):
    """compress='auto' (the engine's default) on noise: the 64 KiB sample
    should make it cost about what compress=False costs."""
    import os
    noise = os.urandom(8 << 20)
    ops = [Op.write(i + 1, b"f", i << 16, noise[i << 16:(i + 1) << 16]) for i in range(128)]
    base, t = interleaved(benchmark, lambda: _journal.encode_frame(ops, False),
                          lambda: _journal.encode_frame(ops, "auto"))
    print(f"\nencode 8 MiB of noise: auto {len(noise) / t / 1e9:.2f} GB/s, "
          f"False {len(noise) / base / 1e9:.2f} GB/s; ratio {base / t:.2f}")
