"""SpillQueue after a crash: torn tails are cut away, damage elsewhere raises
QueueCorrupt naming file and offset, acks persist, a SIGKILLed producer
loses nothing that put() had returned for."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from smirror.errors import QueueCorrupt
from support.memqueue import IMPLS, drain, frame_for, segment_files

HDR = 32


@pytest.fixture(params=IMPLS)
def mq(request):
    return request.param


def make_durable(mq, path, sizes, **kw):
    """A closed durable queue holding one record per size; returns the
    segment offsets of the records."""
    offsets = []
    off = 32                    # after the segment header
    with mq.SpillQueue(path, 1 << 20, 1 << 30, durable=True, **kw) as q:
        for seq, size in enumerate(sizes):
            q.put(seq, frame_for(seq, size))
            offsets.append(off)
            off += HDR + size
    return offsets


def test_reopen_recovers_everything_in_order(mq, tmp_path):
    sizes = [100, 0, 3000, 17, 500]
    make_durable(mq, tmp_path, sizes, segment_size=1000)
    assert len(segment_files(tmp_path)) == 3
    with mq.SpillQueue(tmp_path, 1 << 20, 1 << 30, durable=True, segment_size=1000) as q:
        assert len(q) == 5 and q.stats()["recovered"] == 5 and q.mem_bytes == 0
        assert (q.first_seq, q.last_seq) == (0, 4)
        with pytest.raises(ValueError, match="not above the last seq 4"):
            q.put(4, b"again")
        q.put(5, b"new")
        assert drain(q) == [(s, frame_for(s, n)) for s, n in enumerate(sizes)] + [(5, b"new")]


def test_torn_last_record_at_every_offset(mq, tmp_path):
    sizes = [50, 70, 90]
    src = tmp_path / "src"
    offsets = make_durable(mq, src, sizes)
    (name,) = segment_files(src)
    last_start = offsets[-1]
    end = last_start + HDR + sizes[-1]
    for cut in range(last_start, end):
        work = tmp_path / f"cut{cut}"
        shutil.copytree(src, work)
        os.truncate(work / name, cut)
        with mq.SpillQueue(work, 1 << 20, 1 << 30, durable=True) as q:
            assert q.stats()["torn_bytes"] == cut - last_start
            assert os.path.getsize(work / name) == last_start
            assert q.last_seq == 1
            q.put(2, b"retry")
        with mq.SpillQueue(work, 1 << 20, 1 << 30, durable=True) as q:
            assert q.stats()["torn_bytes"] == 0
            assert drain(q) == [(0, frame_for(0, 50)), (1, frame_for(1, 70)), (2, b"retry")]
        shutil.rmtree(work)


def test_zero_filled_tail_counts_as_torn(mq, tmp_path):
    # a power cut after the file grew but before the data reached the disk
    offsets = make_durable(mq, tmp_path, [100, 5000])
    (name,) = segment_files(tmp_path)
    path = tmp_path / name
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek((size - 1) // 4096 * 4096)
        f.write(b"\0" * (size - (size - 1) // 4096 * 4096))
    with mq.SpillQueue(tmp_path, 1 << 20, 1 << 30, durable=True) as q:
        assert drain(q) == [(0, frame_for(0, 100))]
    # zeros where a header should be, to the end of the file
    with open(path, "ab") as f:
        f.write(b"\0" * 100)
    with mq.SpillQueue(tmp_path, 1 << 20, 1 << 30, durable=True) as q:
        assert q.stats()["torn_bytes"] == 100
        assert len(q) == 1
    assert os.path.getsize(path) == offsets[1]


@pytest.mark.parametrize("where", ["payload", "header", "length", "last-payload"])
def test_corrupt_record_raises_with_file_and_offset(mq, tmp_path, where):
    offsets = make_durable(mq, tmp_path, [40, 40, 40, 40, 40])
    (name,) = segment_files(tmp_path)
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    victim = 4 if where == "last-payload" else 2
    if where in ("payload", "last-payload"):
        data[offsets[victim] + HDR + 10] ^= 0x40
    elif where == "header":
        data[offsets[victim] + 9] ^= 0x01          # a seq bit
    else:
        data[offsets[victim] + 4] = 0xFF           # length runs far past the end
    path.write_bytes(bytes(data))
    with pytest.raises(QueueCorrupt) as info:
        mq.SpillQueue(tmp_path, 1 << 20, 1 << 30, durable=True)
    msg = str(info.value)
    assert name in msg and f"offset {offsets[victim]}" in msg
    # nothing was cut away: the data stays for a human to look at
    assert path.read_bytes() == bytes(data)
    # and the directory is not left locked
    shutil.rmtree(tmp_path)


def test_corrupt_end_of_older_segment_is_not_a_torn_tail(mq, tmp_path):
    make_durable(mq, tmp_path, [100] * 6, segment_size=300)
    first, *rest = segment_files(tmp_path)
    assert rest
    os.truncate(tmp_path / first, os.path.getsize(tmp_path / first) - 5)
    with pytest.raises(QueueCorrupt, match=f"{first}.*runs past the end"):
        mq.SpillQueue(tmp_path, 1 << 20, 1 << 30, durable=True)


def test_out_of_order_records_are_corrupt(mq, tmp_path):
    make_durable(mq, tmp_path / "a", [10, 10])
    rec = mq.encode_record(0, b"late")        # seq 0 again after seq 1
    (name,) = segment_files(tmp_path / "a")
    with open(tmp_path / "a" / name, "ab") as f:
        f.write(rec)
    with pytest.raises(QueueCorrupt, match="seq 0, not above the previous record's 1"):
        mq.SpillQueue(tmp_path / "a", 1 << 20, 1 << 30, durable=True)


def test_damaged_ack_file(mq, tmp_path):
    make_durable(mq, tmp_path, [10, 10])
    (tmp_path / "ack").write_bytes(b"\x07" * 64)
    with pytest.raises(QueueCorrupt, match="no valid ack slot"):
        mq.SpillQueue(tmp_path, 1 << 20, 1 << 30, durable=True)
    (tmp_path / "ack").write_bytes(b"\0" * 20)   # torn first write: no ack yet
    with mq.SpillQueue(tmp_path, 1 << 20, 1 << 30, durable=True) as q:
        assert q.acked_seq is None and len(q) == 2


def test_ack_persists_across_reopen(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 1 << 20, 1 << 30, durable=True, segment_size=500) as q:
        for seq in range(10):
            q.put(seq, frame_for(seq, 100))
        for _ in range(6):
            q.get()
        q.ack(4)
        q.ack(5)            # the second slot
        q.ack(3)            # older: ignored
    with mq.SpillQueue(tmp_path, 1 << 20, 1 << 30, durable=True, segment_size=500) as q:
        assert q.acked_seq == 5 and len(q) == 4 and q.first_seq == 6
        assert [s for s, _ in drain(q)] == [6, 7, 8, 9]
        q.ack(9)
        assert segment_files(tmp_path) == ["0000000000000003.seg"]   # small, active
    with mq.SpillQueue(tmp_path, 1 << 20, 1 << 30, durable=True) as q:
        assert len(q) == 0 and q.acked_seq == 9 and q.last_seq == 9
        assert segment_files(tmp_path) == []
        with pytest.raises(ValueError, match="not above the last seq 9"):
            q.put(9, b"dup")


def test_acked_slot_torn_falls_back_to_previous(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 1 << 20, 1 << 30, durable=True) as q:
        for seq in range(10):
            q.put(seq, b"x")
        q.ack(2)            # generation 1 -> slot 1
        q.ack(6)            # generation 2 -> slot 0
    data = bytearray((tmp_path / "ack").read_bytes())
    data[10] ^= 0xFF        # tear the newest slot
    (tmp_path / "ack").write_bytes(bytes(data))
    with mq.SpillQueue(tmp_path, 1 << 20, 1 << 30, durable=True) as q:
        assert q.acked_seq == 2 and q.first_seq == 3


def test_non_durable_queue_recovers_its_spilled_part(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 300, 1 << 30) as q:
        for seq in range(8):
            q.put(seq, frame_for(seq, 100))
        q.get()
        q.get()
        q.get()
        q.get()
        q.ack(3)
    # memory items are gone with the process; spilled ones come back
    with mq.SpillQueue(tmp_path, 300, 1 << 30) as q:
        assert [s for s, _ in drain(q)] == [4, 5, 6, 7]


def test_files_from_other_tools_are_left_alone(mq, tmp_path):
    make_durable(mq, tmp_path, [10])
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "zzzz.seg").write_text("not a segment name")
    with mq.SpillQueue(tmp_path, 1 << 20, 1 << 30, durable=True) as q:
        assert len(q) == 1
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "zzzz.seg").exists()


CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {src!r})
    sys.path.insert(0, {tests!r})
    from smirror.kernels import {module} as mq
    from support.memqueue import frame_for
    q = mq.SpillQueue({path!r}, 64 * 1024, 1 << 30, durable=True, segment_size=256 * 1024)
    seq = 0
    out = sys.stdout
    while True:
        q.put(seq, frame_for(seq, 100 + seq % 3000))
        if seq % 500 == 499:
            q.ack(seq - 400)
            out.write(f"ack {{seq - 400}}\\n")
        out.write(f"put {{seq}}\\n")
        out.flush()
        seq += 1
""")


@pytest.mark.parametrize("module", ["_memqueue", "_memqueue_py"])
def test_sigkill_while_putting_loses_nothing_put_returned(tmp_path, module):
    import smirror
    src = os.path.dirname(os.path.dirname(smirror.__file__))
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # support/
    script = CHILD.format(src=src, tests=tests, module=module, path=str(tmp_path / "q"))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    last_put = last_ack = None
    deadline = time.monotonic() + 30
    try:
        for line in child.stdout:
            kind, seq = line.split()
            if kind == "put":
                last_put = int(seq)
            else:
                last_ack = int(seq)
            if last_put >= 3000 or time.monotonic() > deadline:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert last_put is not None and last_ack is not None, "the child did not run"
    for m in IMPLS:
        mod = m.values[0]
        with mod.SpillQueue(tmp_path / "q", 64 * 1024, 1 << 30, durable=True,
                            segment_size=256 * 1024) as q:
            assert q.acked_seq is not None and q.acked_seq >= last_ack
            got = drain(q)
            seqs = [s for s, _ in got]
            # a contiguous run from just after the ack to at least the last
            # put we saw return (the child went on putting until the kill)
            assert seqs == list(range(q.acked_seq + 1, seqs[-1] + 1))
            assert seqs[-1] >= last_put
            assert all(f == frame_for(s, 100 + s % 3000) for s, f in got)


# ------------------------------------------------------ recycled segments

def spare_files(path):
    return sorted(n for n in os.listdir(path) if n.endswith(".spare"))


def test_acked_segments_become_spares_and_are_reused(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 0, 1 << 30, segment_size=1000, spare_segments=2) as q:
        for seq in range(20):
            q.put(seq, frame_for(seq, 200))          # 4 records a segment
        drain(q)
        q.ack(11)                                    # segments 0, 1, 2 done
        assert spare_files(tmp_path) == ["0000000000000000.spare", "0000000000000001.spare"]
        assert len(segment_files(tmp_path)) == 2     # the third was deleted
        inodes = {os.stat(tmp_path / n).st_ino for n in spare_files(tmp_path)}
        for seq in range(20, 28):
            q.put(seq, frame_for(seq, 270))          # 3 a segment: 3 new segments
        assert spare_files(tmp_path) == []
        new = segment_files(tmp_path)[-3:]
        assert {os.stat(tmp_path / n).st_ino for n in new[:2]} == inodes
        q.rewind()
        assert drain(q) == ([(s, frame_for(s, 200)) for s in range(12, 20)]
                            + [(s, frame_for(s, 270)) for s in range(20, 28)])
    # close cut the older bytes off the recycled files
    with mq.SpillQueue(tmp_path, 0, 1 << 30, segment_size=1000) as q:
        assert q.stats()["torn_bytes"] == 0
        assert [s for s, _ in drain(q)] == list(range(12, 28))


def test_no_spares_when_disabled(mq, tmp_path):
    with mq.SpillQueue(tmp_path, 0, 1 << 30, segment_size=500, spare_segments=0) as q:
        for seq in range(10):
            q.put(seq, frame_for(seq, 200))
        drain(q)
        q.ack(7)
        assert spare_files(tmp_path) == []


def crashed_copy(q, src, dst):
    """What a crash would leave: the directory as it is while the queue is
    open (close() is what trims recycled files)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock"))
    return dst


SEG = 4 << 20


def recycled_queue(mq, path):
    """An open queue whose active segment is a recycled file with older
    bytes after its records: returns (queue, active segment name, seqs)."""
    q = mq.SpillQueue(path, 0, 1 << 30, segment_size=SEG, durable=True)
    for seq in range(12):
        q.put(seq, frame_for(seq, 100_000))          # 1.2 MiB: big enough to recycle
    drain(q)
    q.ack(11)                                        # the segment becomes a spare
    assert len(spare_files(path)) == 1
    for seq in range(40, 45):
        q.put(seq, frame_for(seq, 1000))             # into the recycled file
    (name,) = segment_files(path)
    assert os.path.getsize(path / name) > 32 + 5 * 1032
    return q, name, list(range(40, 45))


def test_crash_in_recycled_segment_drops_only_the_older_bytes(mq, tmp_path):
    q, name, seqs = recycled_queue(mq, tmp_path / "q")
    try:
        work = crashed_copy(q, tmp_path / "q", tmp_path / "crash")
    finally:
        q.close()
    with mq.SpillQueue(work, 0, 1 << 30, segment_size=SEG, durable=True) as q2:
        assert q2.stats()["torn_bytes"] > 0
        assert drain(q2) == [(s, frame_for(s, 1000)) for s in seqs]
    assert os.path.getsize(work / name) == 32 + 5 * 1032


def test_torn_record_in_recycled_segment_is_cut(mq, tmp_path):
    q, name, seqs = recycled_queue(mq, tmp_path / "q")
    try:
        work = crashed_copy(q, tmp_path / "q", tmp_path / "crash")
    finally:
        q.close()
    # the last record half written over the older bytes
    with open(work / name, "r+b") as f:
        f.seek(32 + 4 * 1032 + 500)
        f.write(b"\xa5" * 100)
    with mq.SpillQueue(work, 0, 1 << 30, segment_size=SEG, durable=True) as q2:
        assert [s for s, _ in drain(q2)] == seqs[:4]


def test_damage_before_a_valid_record_in_recycled_segment_is_corrupt(mq, tmp_path):
    q, name, seqs = recycled_queue(mq, tmp_path / "q")
    try:
        work = crashed_copy(q, tmp_path / "q", tmp_path / "crash")
    finally:
        q.close()
    bad = 32 + 2 * 1032
    with open(work / name, "r+b") as f:
        f.seek(bad + 40)
        f.write(b"\x00")                             # record seq 42's payload
    with pytest.raises(QueueCorrupt, match=f"{name}: payload checksum mismatch .* at offset {bad}"):
        mq.SpillQueue(work, 0, 1 << 30, segment_size=SEG, durable=True)


def test_crash_right_after_renaming_a_spare(mq, tmp_path):
    # the spare got its new name, but its header still names the old index
    with mq.SpillQueue(tmp_path, 0, 1 << 30, segment_size=500, durable=True) as q:
        for seq in range(6):
            q.put(seq, frame_for(seq, 200))
        drain(q)
        q.ack(3)
    (spare,) = spare_files(tmp_path)[:1]
    os.rename(tmp_path / spare, tmp_path / "00000000000000ff.seg")
    with mq.SpillQueue(tmp_path, 0, 1 << 30, segment_size=500, durable=True) as q:
        assert [s for s, _ in drain(q)] == [4, 5]
        q.put(6, b"after")
        assert q.get() == (6, b"after")
    assert "00000000000000ff.seg" not in segment_files(tmp_path)
