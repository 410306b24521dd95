"""SpillQueue with real threads: one producer and one consumer at once,
blocking get with timeout, close waking a waiter, the GIL released."""
import threading
import time

import pytest

from smirror.errors import QueueClosed
from support.memqueue import IMPLS, frame_for


@pytest.fixture(params=IMPLS)
def mq(request):
    return request.param


@pytest.mark.parametrize("durable", [False, True])
def test_producer_consumer_move_100k_items_in_order(mq, tmp_path, durable):
    total = 100_000 if mq.__name__.endswith("_memqueue") else 30_000
    # a small memory limit: the stream keeps crossing the spill boundary
    q = mq.SpillQueue(tmp_path, 16 * 1024, 1 << 30, segment_size=256 * 1024, durable=durable)
    errors = []

    def produce():
        try:
            for seq in range(total):
                q.put(seq, frame_for(seq, 8 + seq % 200))
                if seq % 5000 == 4999:
                    time.sleep(0.002)   # let the consumer catch up now and then
        except Exception as exc:       # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    got_seqs = []
    bad = []

    def consume():
        try:
            while len(got_seqs) < total:
                item = q.get(timeout=10)
                if item is None:
                    errors.append(AssertionError(f"get timed out after {len(got_seqs)} items"))
                    return
                seq, frame = item
                if frame != frame_for(seq, 8 + seq % 200):
                    bad.append(seq)
                got_seqs.append(seq)
                if seq % 100 == 99:
                    q.ack(seq)
        except Exception as exc:       # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert not errors, errors
        assert got_seqs == list(range(total))
        assert not bad
        assert q.stats()["spilled"] > 0, "the test meant to cross the spill boundary"
        q.ack(total - 1)
        assert len(q) == 0 and q.mem_bytes == 0
        assert q.disk_bytes <= 256 * 1024      # at most the active segment stays
    finally:
        q.close()


def test_acks_retire_segments_while_puts_write(mq, tmp_path):
    """A durable queue whose consumer acks every item at once: the active
    segment is fully acked (and would be retired) again and again while the
    next put is writing into it outside the lock, and rotations leave their
    fsync to the put. Nothing is lost or reordered, and a reopen holds
    exactly what was not acked."""
    total = 20_000 if mq.__name__.endswith("_memqueue") else 5_000
    # segments above RECYCLE_MIN: a fully acked active one is retired at once
    q = mq.SpillQueue(tmp_path, 64 * 1024, 1 << 30, segment_size=3 << 20,
                      durable=True, fsync="segment")
    errors, got = [], []
    keep = 50                       # the last ones stay unacked for the reopen

    def produce():
        try:
            for seq in range(total):
                q.put(seq, frame_for(seq, 16 + seq % 3000))
        except Exception as exc:       # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def consume():
        try:
            while len(got) < total:
                item = q.get(timeout=10)
                if item is None:
                    errors.append(AssertionError(f"get timed out after {len(got)} items"))
                    return
                seq, frame = item
                if frame != frame_for(seq, 16 + seq % 3000):
                    errors.append(AssertionError(f"item {seq} damaged"))
                got.append(seq)
                if seq < total - keep:
                    q.ack(seq)
        except Exception as exc:       # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    q.close()
    assert not errors, errors[:3]
    assert got == list(range(total))
    with mq.SpillQueue(tmp_path, 64 * 1024, 1 << 30, segment_size=3 << 20,
                       durable=True) as again:
        left = []
        while (item := again.get(timeout=0)) is not None:
            left.append(item)
    assert left == [(s, frame_for(s, 16 + s % 3000)) for s in range(total - keep, total)]


def test_blocking_get_times_out_in_time(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 100, 100) as q:
        t0 = time.monotonic()
        assert q.get(timeout=0.2) is None
        elapsed = time.monotonic() - t0
        assert 0.19 <= elapsed < 1.0, elapsed
        t0 = time.monotonic()
        assert q.get(timeout=0) is None
        assert time.monotonic() - t0 < 0.05


def test_blocked_get_wakes_on_put(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 100, 100) as q:
        result = []
        t = threading.Thread(target=lambda: result.append(q.get(timeout=5)))
        t.start()
        time.sleep(0.1)
        t0 = time.monotonic()
        q.put(1, b"wake")
        t.join(5)
        assert result == [(1, b"wake")]
        assert time.monotonic() - t0 < 1.0


def test_rewind_wakes_a_waiter(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 100, 100) as q:
        q.put(1, b"a")
        assert q.get(0) == (1, b"a")
        result = []
        t = threading.Thread(target=lambda: result.append(q.get(timeout=5)))
        t.start()
        time.sleep(0.1)
        q.rewind()
        t.join(5)
        assert result == [(1, b"a")]


def test_wake_ends_a_wait_without_a_timeout_whenever_it_comes(mq, tmp_path):
    """wake() before the get() or during its wait: either way the get
    returns None at once (the sender's long idle wait, told to look again);
    the wake is used up by that get; an item that is there beats it."""
    with mq.SpillQueue(tmp_path, 100, 100) as q:
        q.wake()
        assert q.get() is None              # no timeout: it would wait forever
        result: list = []
        t = threading.Thread(target=lambda: result.append(q.get()))
        t.start()
        q.wake()                            # before or during its wait
        t.join(30)
        assert not t.is_alive() and result == [None]
        q.put(1, b"a")
        q.wake()
        assert q.get() == (1, b"a")
        assert q.get(timeout=0) is None


def test_close_wakes_a_waiter_with_queue_closed(mq, tmp_path):
    q = mq.SpillQueue(tmp_path, 100, 100)
    outcome = []

    def wait():
        try:
            q.get()                      # no timeout: only close() ends this
            outcome.append("returned")
        except QueueClosed as exc:
            outcome.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.1)
    assert t.is_alive()
    t0 = time.monotonic()
    q.close()
    t.join(5)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 1.0
    assert len(outcome) == 1 and isinstance(outcome[0], QueueClosed)
    assert "closed queue" in str(outcome[0])


def test_disk_write_and_read_release_the_gil(tmp_path):
    """One put and one get of a 64 MiB spilled frame in the compiled queue
    (pwritev / pread, copy, checksum) let a pure-Python thread run meanwhile;
    a GIL-holding call of similar length (bytes.replace) is the control."""
    import sys

    from smirror.kernels import _memqueue as native
    frame = bytes(64 << 20)
    q = native.SpillQueue(tmp_path, 0, 1 << 32, read_buffer=64 * 1024)
    stop = threading.Event()
    ticks = [0]

    def spin():
        while not stop.is_set():
            ticks[0] += 1

    def ticks_during(call):
        before = ticks[0]
        call()
        return ticks[0] - before

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)     # the GIL changes hands quickly when asked
    t = threading.Thread(target=spin)
    t.start()
    try:
        while ticks[0] < 1000:      # the spinner is running
            time.sleep(0.001)
        # a busy machine may give the spinner no CPU during one call: tried
        # again (each round a put and a get) until the GIL's release shows,
        # or the deadline says it never does
        put = get = control = 0
        seq = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            put = max(put, ticks_during(lambda seq=seq: q.put(seq, frame)))
            get = max(get, ticks_during(lambda: q.get(0)))
            control = max(control, ticks_during(lambda: frame.replace(b"\0", b"\1")))
            q.ack(seq)              # the spill files stay one frame large
            seq += 1
            if seq >= 2 and put > 5 * control and get > 5 * control:
                break
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old_interval)
        q.close()
    assert put > 5 * control and get > 5 * control, (put, get, control)
