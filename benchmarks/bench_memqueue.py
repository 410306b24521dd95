"""Benchmarks of the spill-queue kernel, each against a baseline measured in
the same run; every test prints its rate and ratio.

    PYTHONPATH=src python -m pytest benchmarks/bench_memqueue.py -q -s --benchmark-disable-gc

SMIRROR_BENCH_MB sets the bytes moved per round (default 256 MiB).

* in memory: put + get + ack of 64 KiB frames in batches of 32, against
  ``queue.Queue`` put + get of the same frames (information only: the queue
  does more, byte accounting and acks).
* spilling: memory limit 0, so every 64 KiB frame is appended to a segment
  with its header and checksum, read back through the read buffer, checked
  and acked (acked segments deleted), in batches of 16; against a plain
  ``f.write`` of the same frames into one file in the same directory, the
  file deleted at the end. Goal: spilling >= 0.8 x raw append.
* durable: write-through with the cache in memory, against the same raw
  append (information).
* no spares: spilling with ``spare_segments=0`` (every segment a new file,
  deleted when acked), against the same raw append (information: what the
  recycled segments are worth).
* threads: a producer thread and a consumer thread (acking every 16) move
  the frames through a spilling queue, against the same two threads around
  a ``queue.Queue`` plus a raw file append (information).
"""
from __future__ import annotations

import os
import queue
import threading

import pytest

import benchutil
from smirror.kernels import _memqueue, _memqueue_py

MB = int(os.environ.get("SMIRROR_BENCH_MB", "256"))
FRAME = 64 * 1024
COUNT = (MB << 20) // FRAME
ROUNDS = 5


def best_of(fn, rounds=None):
    return benchutil.best_of(fn, rounds or ROUNDS)


def subject_time(benchmark, fn):
    return benchutil.subject_time(benchmark, fn, ROUNDS, 3)




def report(benchmark, name, nbytes, seconds, base_name, base_seconds, goal=None, extra=""):
    rate = nbytes / seconds / 1e9
    base_rate = nbytes / base_seconds / 1e9
    ratio = base_seconds / seconds
    benchmark.extra_info.update(rate_gbps=round(rate, 3), baseline_gbps=round(base_rate, 3),
                                ratio=round(ratio, 3))
    verdict = "" if goal is None else (" OK" if ratio >= goal else " BELOW GOAL")
    goal_text = "information" if goal is None else f"goal >= {goal}"
    print(f"\n{name}: {rate:.2f} GB/s ({nbytes / FRAME / seconds / 1e3:.0f} k frames/s); "
          f"{base_name}: {base_rate:.2f} GB/s; ratio {ratio:.2f} ({goal_text}){verdict}{extra}")


@pytest.fixture(scope="module")
def frames():
    # allocated and touched once; 16 distinct frames cycled
    return [os.urandom(FRAME) for _ in range(16)]


def pump(q, frames, batch):
    """put + get + ack COUNT frames in batches; checks order as it goes."""
    n = len(frames)
    seq = 0
    while seq < COUNT:
        for i in range(seq, seq + batch):
            q.put(i, frames[i % n])
        for i in range(seq, seq + batch):
            got = q.get(0)
            if got[0] != i:
                raise AssertionError(f"expected seq {i}, got {got[0]}")
        seq += batch
        q.ack(seq - 1)


def test_in_memory_put_get(benchmark, frames, tmp_path):
    batch = 32

    def baseline():
        q = queue.Queue()
        n = len(frames)
        for seq in range(0, COUNT, batch):
            for i in range(seq, seq + batch):
                q.put((i, frames[i % n]))
            for _ in range(batch):
                q.get_nowait()

    def run(mod, path):
        q = mod.SpillQueue(path, 64 << 20, 1 << 30)
        pump(q, frames, batch)
        q.close()

    base = best_of(baseline)
    ref = best_of(lambda: run(_memqueue_py, tmp_path / "ref"), 2)
    mine = subject_time(benchmark, lambda: run(_memqueue, tmp_path / "native"))
    report(benchmark, "in-memory put+get+ack 64 KiB", COUNT * FRAME, mine,
           "queue.Queue put+get", base,
           extra=f"; pure-Python reference {COUNT * FRAME / ref / 1e9:.2f} GB/s")


def raw_append(frames, path):
    n = len(frames)
    with open(path, "wb") as f:
        for i in range(COUNT):
            f.write(frames[i % n])
    os.unlink(path)


@pytest.mark.parametrize("durable, spares", [(False, 2), (True, 2), (False, 0)],
                         ids=["spilling", "durable", "no-spares"])
def test_spilling_vs_raw_append(benchmark, frames, tmp_path, durable, spares):
    batch = 16
    counter = [0]

    def run(mod):
        counter[0] += 1
        path = tmp_path / f"q{counter[0]}"
        # spilling: nothing fits in memory; durable: everything written
        # through, the cache in memory serves the reads
        limit = 4 << 20 if durable else 0
        q = mod.SpillQueue(path, limit, 1 << 40, durable=durable, spare_segments=spares)
        pump(q, frames, batch)
        stats = q.stats()
        q.close()
        assert stats["count"] == 0 and stats["disk_bytes"] <= 64 << 20
        if not durable:
            assert stats["disk_reads"] == COUNT

    base_path = tmp_path / "raw.bin"
    base = best_of(lambda: raw_append(frames, base_path))
    mine = subject_time(benchmark, lambda: run(_memqueue))
    base = min(base, best_of(lambda: raw_append(frames, base_path), 2))   # drift check
    name = "durable write-through put+get+ack" if durable else "spilling put+get+ack"
    if not spares:
        name += " without spare segments"
    report(benchmark, f"{name} 64 KiB", COUNT * FRAME, mine, "raw f.write append", base,
           goal=0.8 if not durable and spares else None)


def two_threads(put, get_and_ack):
    errors = []

    def guard(fn):
        try:
            fn()
        except BaseException as exc:     # noqa: BLE001 - any failure, reported below
            errors.append(exc)

    threads = [threading.Thread(target=guard, args=(put,)),
               threading.Thread(target=guard, args=(get_and_ack,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_producer_consumer_threads(benchmark, frames, tmp_path):
    n = len(frames)
    counter = [0]

    def run():
        counter[0] += 1
        q = _memqueue.SpillQueue(tmp_path / f"t{counter[0]}", 0, 1 << 40)

        def produce():
            for i in range(COUNT):
                q.put(i, frames[i % n])

        def consume():
            for i in range(COUNT):
                seq, _ = q.get(timeout=30)
                if seq != i:
                    raise AssertionError(f"expected seq {i}, got {seq}")
                if i % 16 == 15:
                    q.ack(i)

        two_threads(produce, consume)
        q.close()

    def baseline():
        fifo = queue.Queue()
        path = tmp_path / "raw-threads.bin"

        def produce():
            with open(path, "wb") as f:
                for i in range(COUNT):
                    f.write(frames[i % n])
                    fifo.put((i, frames[i % n]))

        def consume():
            for _ in range(COUNT):
                fifo.get(timeout=30)

        two_threads(produce, consume)
        os.unlink(path)

    base = best_of(baseline)
    mine = subject_time(benchmark, run)
    report(benchmark, "producer/consumer threads, spilling 64 KiB", COUNT * FRAME, mine,
           "queue.Queue + raw append", base)
