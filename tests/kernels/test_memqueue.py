"""SpillQueue: FIFO order across the spill boundary, byte bounds, limits,
acks, rewind, inputs; the compiled kernel against the pure-Python reference."""
import array
import mmap
import os
import shutil
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import smirror.kernels._memqueue as native
import smirror.kernels._memqueue_py as reference
from smirror.errors import QueueClosed, QueueError, QueueFull
from support.memqueue import IMPLS, drain, frame_for, segment_bytes, segment_files


@pytest.fixture(params=IMPLS)
def mq(request):
    return request.param


def test_compiled_module_is_really_compiled():
    assert native.__file__.endswith(".so"), native.__file__
    assert type(native.SpillQueue.put).__name__ != "function"
    import smirror.kernels.memqueue
    assert smirror.kernels.memqueue.SpillQueue is native.SpillQueue


# ---------------------------------------------------------------- format

GOLDEN_RECORD = bytes.fromhex(
    "534d51520500000007000000000000001b9e824eda3e681f32a82ebe7049cb0a68656c6c6f")


def test_record_format_is_pinned(mq):
    # future optimizations must not change this
    import xxhash
    assert mq.encode_record(7, b"hello") == GOLDEN_RECORD
    assert GOLDEN_RECORD[16:24] == xxhash.xxh3_64(b"hello", seed=7).intdigest().to_bytes(8, "little")
    assert mq.decode_header(GOLDEN_RECORD[:32]) == (7, 5, int.from_bytes(GOLDEN_RECORD[16:24], "little"))


@settings(max_examples=200, deadline=None)
@given(seq=st.integers(0, 2**64 - 1), payload=st.binary(max_size=300))
def test_record_codec_matches_reference(seq, payload):
    rec = native.encode_record(seq, payload)
    assert rec == reference.encode_record(seq, payload)
    assert native.encode_record(seq, bytearray(payload)) == rec
    assert native.encode_record(seq, memoryview(payload)) == rec
    assert native.decode_header(rec[:32]) == reference.decode_header(rec[:32])
    assert native.decode_header(rec[:32])[:2] == (seq, len(payload))


@settings(max_examples=200, deadline=None)
@given(seq=st.integers(0, 2**64 - 1), payload=st.binary(max_size=40), flip=st.integers(0, 32 * 8 - 1))
def test_header_damage_is_detected(seq, payload, flip):
    head = bytearray(native.encode_header(seq, payload))
    head[flip // 8] ^= 1 << (flip % 8)
    assert native.decode_header(head) is None
    assert reference.decode_header(head) is None


def test_decode_header_rejects_wrong_length(mq):
    with pytest.raises(ValueError, match="32 bytes"):
        mq.decode_header(b"SMQR")


# ---------------------------------------------------------------- basics

def test_fifo_in_memory(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 1 << 20, 1 << 20) as q:
        for seq in range(1, 11):
            q.put(seq, frame_for(seq, 100))
        assert len(q) == q.count == 10 and q.mem_bytes == 1000 and q.disk_bytes == 0
        assert (q.first_seq, q.last_seq, q.acked_seq) == (1, 10, None)
        got = drain(q)
        assert got == [(s, frame_for(s, 100)) for s in range(1, 11)]
        assert q.get(timeout=0) is None
        assert segment_files(tmp_path) == []
        q.ack(10)
        assert len(q) == 0 and q.mem_bytes == 0 and q.first_seq is None


def test_spills_past_memory_limit_and_keeps_order(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 1000, 1 << 20, segment_size=600) as q:
        for seq in range(30):
            q.put(seq, frame_for(seq, 100))
            assert q.mem_bytes <= 1000
        assert q.mem_bytes == 1000
        # 4 records of 132 B a segment, each segment with a 32 B header
        assert q.disk_bytes == 20 * (32 + 100) + 5 * 32 == segment_bytes(tmp_path)
        assert len(segment_files(tmp_path)) == 5
        # memory frees up, but items keep going to disk while disk items wait
        assert q.get()[0] == 0
        q.ack(0)
        q.put(30, frame_for(30, 100))
        assert q.mem_bytes == 900
        assert [s for s, _ in drain(q)] == list(range(1, 31))
        q.ack(30)
        # full segments went (kept as spares); the small active one stays
        assert segment_files(tmp_path) == ["0000000000000005.seg"]
        assert q.disk_bytes == segment_bytes(tmp_path) == 32 + 132
        assert q.stats()["spares"] == 2
        # drained: memory again
        q.put(31, b"x" * 10)
        assert q.mem_bytes == 10 and q.disk_bytes == 32 + 132


def test_memory_resumes_after_disk_items_are_handed_out(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 300, 1 << 20) as q:
        for seq in range(6):
            q.put(seq, frame_for(seq, 100))     # 0-2 memory, 3-5 disk
        assert [s for s, _ in drain(q)] == list(range(6))
        q.ack(2)                                # memory free, disk items unacked
        q.put(6, frame_for(6, 100))             # disk backlog all handed out: memory
        assert q.mem_bytes == 100
        q.rewind()                              # resend: disk items first, then memory
        assert drain(q) == [(s, frame_for(s, 100)) for s in range(3, 7)]
        q.ack(6)
        assert len(q) == 0 and q.mem_bytes == 0
        assert q.disk_bytes == segment_bytes(tmp_path)


def test_frames_larger_than_memory_segment_and_read_buffer(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 1000, 1 << 20, segment_size=2000, read_buffer=4096) as q:
        sizes = [10, 5000, 0, 3000, 10000, 7, 2500]
        for seq, size in enumerate(sizes):
            q.put(seq, frame_for(seq, size))
        assert drain(q) == [(s, frame_for(s, n)) for s, n in enumerate(sizes)]
        q.rewind()
        assert drain(q) == [(s, frame_for(s, n)) for s, n in enumerate(sizes)]


def test_inputs_bytes_bytearray_memoryview_mmap(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 64, 1 << 20) as q:
        data = frame_for(1, 40)
        buf = bytearray(data)
        ints = array.array("i", range(10))
        m = mmap.mmap(-1, 40)
        m[:] = data
        q.put(1, data)
        q.put(2, buf)                    # memory: must be copied
        q.put(3, memoryview(buf)[5:25])  # over the limit: disk
        q.put(4, ints)                   # non-byte format
        q.put(5, m)
        buf[:] = b"\0" * 40              # the queue must not see later changes
        got = drain(q)
        assert got == [(1, data), (2, data), (3, data[5:25]), (4, ints.tobytes()), (5, data)]
        assert all(type(f) is bytes for _, f in got)
        m.close()


def test_put_rejects_bad_seq_and_frames(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 1000, 1000) as q:
        q.put(5, b"a")
        with pytest.raises(ValueError, match=r"put seq 5 is not above the last seq 5"):
            q.put(5, b"b")
        with pytest.raises(ValueError, match=r"put seq 3 is not above the last seq 5"):
            q.put(3, b"b")
        with pytest.raises(ValueError, match="between 0 and 2"):
            q.put(-1, b"b")
        with pytest.raises(ValueError, match="between 0 and 2"):
            q.put(2**64, b"b")
        with pytest.raises(TypeError, match="seq must be an int"):
            q.put("6", b"b")
        with pytest.raises(TypeError):
            q.put(6, "text is not bytes")
        assert len(q) == 1 and q.last_seq == 5
        q.put(2**64 - 1, b"max")
        assert q.last_seq == 2**64 - 1


def test_bad_constructor_arguments(mq, tmp_path):
    with pytest.raises(ValueError, match="fsync must be one of"):
        mq.SpillQueue(tmp_path / "a", 10, 10, fsync="sometimes")
    with pytest.raises(ValueError, match="memory_limit must be >= 0"):
        mq.SpillQueue(tmp_path / "b", -1, 10)
    with pytest.raises(ValueError, match="segment_size must be >= 1"):
        mq.SpillQueue(tmp_path / "c", 1, 10, segment_size=0)
    with pytest.raises(TypeError, match="disk_limit must be an int"):
        mq.SpillQueue(tmp_path / "d", 1, 10.5)


def test_second_queue_on_same_dir_is_refused(mq, tmp_path):
    q = mq.SpillQueue(tmp_path, 10, 10)
    with pytest.raises(QueueError, match="in use by another queue"):
        mq.SpillQueue(tmp_path, 10, 10)
    q.close()
    mq.SpillQueue(tmp_path, 10, 10).close()


def test_ack_rules(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 250, 1 << 20) as q:
        with pytest.raises(ValueError, match="beyond the last put seq None"):
            q.ack(0)
        for seq in range(0, 20, 2):
            q.put(seq, frame_for(seq, 50))
        with pytest.raises(ValueError, match="ack seq 19 is beyond the last put seq 18"):
            q.ack(19)
        q.ack(5)                  # between seqs, nothing handed out yet
        assert q.first_seq == 6 and len(q) == 7 and q.acked_seq == 5
        q.ack(3)                  # older ack: no-op
        assert q.acked_seq == 5 and len(q) == 7
        assert [s for s, _ in drain(q)] == [6, 8, 10, 12, 14, 16, 18]
        q.ack(13)                 # inside the disk part, after handing out
        assert q.first_seq == 14 and len(q) == 3
        q.rewind()
        assert [s for s, _ in drain(q)] == [14, 16, 18]


def test_ack_inside_disk_part_before_and_after_reads(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 0, 1 << 20, segment_size=300) as q:
        for seq in range(20):
            q.put(seq, frame_for(seq, 60))
        assert q.mem_bytes == 0
        assert [q.get()[0] for _ in range(8)] == list(range(8))
        q.ack(3)                  # among the handed-out records
        assert q.first_seq == 4 and q.unread == 12
        assert q.get()[0] == 8    # reading goes on where it was
        q.ack(11)                 # past the read position
        assert q.first_seq == 12 and len(q) == 8 and q.unread == 8
        assert [s for s, _ in drain(q)] == list(range(12, 20))
        q.rewind()
        assert q.get()[0] == 12
        before = len(segment_files(tmp_path))
        q.ack(16)
        assert len(segment_files(tmp_path)) < before
        assert q.disk_bytes == segment_bytes(tmp_path)


def test_rewind_resends_from_first_unacked(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 500, 1 << 20) as q:
        for seq in range(10):
            q.put(seq, frame_for(seq, 100))
        first = [q.get() for _ in range(7)]
        q.ack(2)
        q.rewind()
        again = drain(q)
        assert again == [(s, frame_for(s, 100)) for s in range(3, 10)]
        assert first[3:] == again[:4]
        q.rewind()
        q.rewind()
        assert q.get() == (3, frame_for(3, 100))


def test_queue_full_at_disk_limit_nothing_half_written(mq, tmp_path):
    seg = 32 + 2 * 132                  # segment header + 2 records
    limit = 5 * seg + 50
    with mq.SpillQueue(tmp_path, 200, limit, segment_size=seg, spare_segments=0) as q:
        accepted = 0
        with pytest.raises(QueueFull) as info:
            for seq in range(100):
                q.put(seq, frame_for(seq, 100))
                accepted += 1
        msg = str(info.value)
        assert "disk limit" in msg and str(limit) in msg and "1480 B on disk + 164 B" in msg
        assert accepted == 12                      # 2 in memory + 10 on disk
        assert q.disk_bytes == segment_bytes(tmp_path) == 5 * seg
        assert len(q) == 12 and q.last_seq == 11
        # room again once a whole segment (records 2 and 3) is acked
        assert [q.get()[0] for _ in range(4)] == [0, 1, 2, 3]
        q.ack(3)
        assert q.disk_bytes == 4 * seg
        q.put(12, frame_for(12, 100))
        assert [s for s, _ in drain(q)] == list(range(4, 13))
    with mq.SpillQueue(tmp_path, 200, limit, segment_size=seg) as q:
        assert q.stats()["torn_bytes"] == 0
        assert drain(q) == [(s, frame_for(s, 100)) for s in range(4, 13)]


def test_queue_full_when_free_space_minimum_reached(mq, tmp_path):
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    with mq.SpillQueue(tmp_path, 100, 1 << 40, min_free_bytes=free + (1 << 30)) as q:
        q.put(0, b"m" * 100)                       # memory: no disk check
        with pytest.raises(QueueFull, match="free space minimum") as info:
            q.put(1, b"d" * 100)
        assert "min_free_bytes" in str(info.value)
        assert segment_files(tmp_path) == [] and q.disk_bytes == 0 and len(q) == 1
    with mq.SpillQueue(tmp_path / "ok", 0, 1 << 40, min_free_bytes=1 << 20) as q:
        for seq in range(100):
            q.put(seq, b"d" * 1000)
        assert q.stats()["disk_bytes"] == 32 + 100 * 1032


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size=256k tmpfs {mnt} 2>/dev/null") != 0:
        pytest.skip("needs root to mount a tmpfs")
    try:
        yield mnt
    finally:
        os.system(f"umount {mnt}")


def test_full_volume_raises_queue_full_and_leaves_whole_records(mq, tiny_tmpfs):
    # disk_limit and min_free_bytes out of the way: the write itself fails
    spill = tiny_tmpfs / "q"
    with mq.SpillQueue(spill, 0, 1 << 40, durable=True) as q:
        seq = 0
        with pytest.raises(QueueFull, match="no space left"):
            while seq < 10000:
                q.put(seq, frame_for(seq, 3000))
                seq += 1
        assert 40 < seq < 100
        assert q.disk_bytes == segment_bytes(spill) == 32 + seq * 3032
    with mq.SpillQueue(spill, 0, 1 << 40, durable=True) as q:
        assert q.stats()["torn_bytes"] == 0
        assert drain(q) == [(s, frame_for(s, 3000)) for s in range(seq)]
    with mq.SpillQueue(tiny_tmpfs / "q2", 0, 1 << 40, min_free_bytes=128 * 1024) as q:
        # the volume is full now: refused before anything is written
        with pytest.raises(QueueFull, match="free space minimum"):
            q.put(0, b"x")
        assert len(q) == 0
    shutil.rmtree(spill)
    with mq.SpillQueue(tiny_tmpfs / "q3", 0, 1 << 40, min_free_bytes=128 * 1024) as q:
        with pytest.raises(QueueFull, match="free space minimum"):
            for s in range(10000):
                q.put(s, frame_for(s, 3000))
        assert 10 < len(q) < 50
        st = os.statvfs(tiny_tmpfs)
        assert st.f_bavail * st.f_frsize >= 128 * 1024 - 2 * 4096


def test_closed_queue_refuses_everything(mq, tmp_path):
    q = mq.SpillQueue(tmp_path, 100, 100)
    q.put(1, b"x")
    q.close()
    q.close()
    assert q.closed
    for call in (lambda: q.put(2, b"y"), lambda: q.get(0), q.rewind, lambda: q.ack(1)):
        with pytest.raises(QueueClosed, match="closed queue"):
            call()


def test_segments_rotate_and_go_when_acked(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 0, 1 << 20, segment_size=1000) as q:
        for seq in range(30):
            q.put(seq, frame_for(seq, 200))        # 4 records of 232 B a segment
        assert len(segment_files(tmp_path)) == 8
        assert all(os.path.getsize(tmp_path / n) <= 1000 for n in segment_files(tmp_path))
        drain(q)
        q.ack(11)
        assert len(segment_files(tmp_path)) == 5
        assert q.disk_bytes == segment_bytes(tmp_path)
        q.ack(29)
        # the last, small, active segment stays to be appended to
        assert segment_files(tmp_path) == ["0000000000000007.seg"]
        assert q.disk_bytes == segment_bytes(tmp_path) == 32 + 2 * 232


def test_durable_queue_serves_its_memory_cache_without_disk_reads(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 1000, 1 << 20, durable=True) as q:
        for seq in range(15):
            q.put(seq, frame_for(seq, 100))
        assert q.mem_bytes == 1000 and q.disk_bytes == 32 + 15 * 132   # all written through
        assert drain(q) == [(s, frame_for(s, 100)) for s in range(15)]
        assert q.stats()["disk_reads"] == 5                            # only the overflow
        q.rewind()
        drain(q)
        assert q.stats()["disk_reads"] == 10


def test_stats_snapshot(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 100, 10000, durable=True, fsync="always") as q:
        for seq in range(3):
            q.put(seq, b"z" * 60)
        q.get()
        s = q.stats()
        assert s["count"] == 3 and s["unread"] == 2 and s["mem_bytes"] == 60
        assert s["disk_bytes"] == 32 + 3 * 92 and s["segments"] == 1
        assert (s["first_seq"], s["last_seq"], s["acked_seq"]) == (0, 2, None)
        assert s["puts"] == 3 and s["gets"] == 1 and s["durable"] and s["fsync"] == "always"
        assert "count=3" in repr(q)


# ------------------------------------------------ real memory stays bounded

@pytest.mark.parametrize("durable", [False, True])
def test_python_heap_stays_within_memory_limit_plus_one_frame(mq, tmp_path, durable):
    limit, frame_size = 512 * 1024, 64 * 1024
    template = frame_for(1, frame_size)
    q = mq.SpillQueue(tmp_path, limit, 1 << 30, segment_size=1 << 20, durable=durable)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        slack = 64 * 1024       # deques, tuples, ints, the stats counters
        peak_over = 0
        seq = 0
        for _round in range(6):
            for _ in range(40):             # 40 x 64 KiB = 2.5 MiB > limit
                q.put(seq, bytes(template))  # a fresh object the queue owns
                seq += 1
                peak_over = max(peak_over, tracemalloc.get_traced_memory()[0] - base)
            for _ in range(30):
                item = q.get(0)
                assert item is not None
                del item
                peak_over = max(peak_over, tracemalloc.get_traced_memory()[0] - base)
            q.ack(seq - 15)
            assert q.mem_bytes <= limit
        assert peak_over <= limit + frame_size + slack, peak_over
    finally:
        tracemalloc.stop()
        q.close()


# ---------------------------------------------- random ops vs a list model

op_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 400), st.integers(1, 3)),
        st.tuples(st.just("get")),
        st.tuples(st.just("ack"), st.integers(0, 50)),
        st.tuples(st.just("rewind")),
        st.tuples(st.just("reopen")),
    ),
    max_size=80,
)


class Model:
    def __init__(self):
        self.items = []      # unacked (seq, frame)
        self.read = 0
        self.last = None
        self.acked = None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=op_strategy,
       memory_limit=st.integers(0, 1500),
       segment_size=st.integers(50, 1500),
       read_buffer=st.integers(32, 700),
       disk_limit=st.sampled_from([1500, 4000, 1 << 30]),
       durable=st.booleans(),
       fsync=st.sampled_from(["none", "segment", "always"]),
       spare_segments=st.integers(0, 2))
def test_random_ops_match_model_and_reference(tmp_path_factory, ops, memory_limit, segment_size,
                                              read_buffer, disk_limit, durable, fsync,
                                              spare_segments):
    dirs = [tmp_path_factory.mktemp("native"), tmp_path_factory.mktemp("ref")]
    kw = dict(segment_size=segment_size, durable=durable, read_buffer=read_buffer,
              fsync=fsync, spare_segments=spare_segments)
    impls = (native, reference)
    queues = [m.SpillQueue(d, memory_limit, disk_limit, **kw) for m, d in zip(impls, dirs, strict=True)]
    model = Model()
    seq = 0
    try:
        for op in ops:
            kind = op[0]
            if kind == "put":
                seq += op[2]
                frame = frame_for(seq, op[1])
                results = []
                for q in queues:
                    try:
                        q.put(seq, frame)
                        results.append("ok")
                    except QueueFull:
                        results.append("full")
                assert results[0] == results[1]
                if results[0] == "ok":
                    model.items.append((seq, frame))
                    model.last = seq
            elif kind == "get":
                got = [q.get(timeout=0) for q in queues]
                want = model.items[model.read] if model.read < len(model.items) else None
                assert got[0] == got[1] == want
                if want is not None:
                    model.read += 1
            elif kind == "ack":
                if model.last is None:
                    continue
                # ack a seq near the unacked items (handed out or not)
                target = max(0, model.last - op[1])
                for q in queues:
                    q.ack(target)
                if model.acked is None or target > model.acked:
                    dropped = sum(1 for s, _ in model.items if s <= target)
                    model.items = model.items[dropped:]
                    model.read = max(0, model.read - dropped)
                    model.acked = target
            elif kind == "rewind":
                for q in queues:
                    q.rewind()
                model.read = 0
            elif kind == "reopen":
                if not durable:
                    continue
                for q in queues:
                    q.close()
                queues = [m.SpillQueue(d, memory_limit, disk_limit, **kw)
                          for m, d in zip(impls, dirs, strict=True)]
                model.read = 0
            s0, s1 = (q.stats() for q in queues)
            for key in ("disk_reads", "recovered"):
                s0.pop(key), s1.pop(key)
            assert s0 == s1
            assert s0["mem_bytes"] <= memory_limit
            assert s0["disk_bytes"] <= disk_limit
            assert s0["count"] == len(model.items)
            assert s0["unread"] == len(model.items) - model.read
            assert s0["first_seq"] == (model.items[0][0] if model.items else None)
            assert s0["last_seq"] == model.last
            assert s0["acked_seq"] == model.acked
            # a recycled segment file may still be longer than its records
            assert segment_bytes(dirs[0]) == segment_bytes(dirs[1]) >= s0["disk_bytes"]
        # whatever is left comes out in order after a rewind
        for q in queues:
            q.rewind()
            assert drain(q) == model.items
    finally:
        for q in queues:
            q.close()


def test_stub_and_both_modules_agree():
    import ast
    stub = os.path.join(os.path.dirname(native.__file__), "_memqueue.pyi")
    names = set()
    for node in ast.parse(open(stub).read()).body:
        if isinstance(node, ast.AnnAssign):
            names.add(node.target.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    assert {"SpillQueue", "encode_record", "decode_segment_header"} <= names
    for name in names:
        assert hasattr(native, name) and hasattr(reference, name), name
        if name.isupper():
            assert getattr(native, name) == getattr(reference, name), name


@pytest.mark.parametrize("recycled", [False, True])
def test_segment_header_format_is_pinned(mq, recycled):
    head = mq.encode_segment_header(5, recycled)
    assert head[:16] == b"SMQS\x01\x00" + bytes([recycled, 0]) + (5).to_bytes(8, "little")
    assert head == reference.encode_segment_header(5, recycled)
    assert mq.decode_segment_header(head) == (5, int(recycled))
    assert mq.decode_segment_header(head[:8] + b"\x06" + head[9:]) is None
    # a record of segment 5 does not check out as one of segment 6
    rec = mq.encode_record(1, b"abc", segment=5)
    assert mq.decode_header(rec[:32], 5)[:2] == (1, 3)
    assert mq.decode_header(rec[:32], 6) is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.one_of(st.integers(0, 300), st.integers(15_000, 70_000)), min_size=1, max_size=25),
       batches=st.lists(st.integers(1, 6), min_size=1, max_size=10),
       read_buffer=st.sampled_from([32, 100, 4096, 20_000, 1 << 20]),
       segment_size=st.sampled_from([2000, 50_000, 1 << 20]))
def test_mixed_frame_sizes_read_back_through_every_path(tmp_path_factory, sizes, batches,
                                                        read_buffer, segment_size):
    """Small frames come out of the read buffer, big ones straight into
    their frame with a look-ahead; puts and gets interleave so the buffer
    sometimes ends where the writer had stopped."""
    q = native.SpillQueue(tmp_path_factory.mktemp("mixed"), 0, 1 << 30,
                          segment_size=segment_size, read_buffer=read_buffer)
    try:
        want = [(seq, frame_for(seq, n)) for seq, n in enumerate(sizes)]
        got = []
        put = 0
        for i, batch in enumerate(batches * 3):
            for item in want[put:put + batch]:
                q.put(*item)
            put = min(len(want), put + batch)
            for _ in range(batch if i % 2 else 1):
                item = q.get(0)
                if item is not None:
                    got.append(item)
        for item in want[put:]:
            q.put(*item)
        got += drain(q)
        assert got == want
        q.rewind()
        assert drain(q) == want
    finally:
        q.close()
