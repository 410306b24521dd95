"""Source journal -> source queue -> sender => TCP on 127.0.0.1 => receiver ->
durable target queue -> applier: order, resume after cuts, restarts."""
import socket
import threading
import time

import pytest

from smirror.capture.recorder import Recorder
from smirror.ops import Op
from smirror.stream import sender as sender_mod
from smirror.stream import wire
from smirror.stream.journal import ConnectionJournal
from smirror.stream.receiver import TargetConnection
from smirror.stream.sender import Sender
from support.daemons import wait_for
from support.endpoints import TargetEndpoint, settle
from support.treestate import diff, snapshot
from support.workload import Workload


@pytest.fixture
def pair(tmp_path, queue_impl):
    src = tmp_path / "src"
    src.mkdir()
    made = []

    def make(memory_limit=1 << 20, target_memory=1 << 20, state="tstate", queue_cls=None):
        target = TargetConnection(1, tmp_path / "dst", tmp_path / state, memory_limit=target_memory)
        endpoint = TargetEndpoint(target)
        queue = (queue_cls or queue_impl)(str(tmp_path / "squeue"), memory_limit, 1 << 30)
        journal = ConnectionJournal(queue, max_ops=64)
        sender = Sender(1, str(tmp_path / "dst"), journal, endpoint.dial, retry_interval=0.05).start()
        made.append((sender, endpoint, target, queue))
        return src, tmp_path / "dst", journal, sender, target, endpoint
    yield make
    for sender, endpoint, target, queue in made:
        sender.stop()
        endpoint.close()
        target.close()
        queue.close()


def test_workload_replicates_in_order(pair):
    src, dst, journal, sender, target, endpoint = pair()
    Workload(Recorder(src, journal.append), seed=1).run(400)
    settle(journal, sender, target)
    assert diff(snapshot(src), snapshot(dst)) == []
    assert target.applier.stats["repairs"] == 0 and not endpoint.errors


def test_an_idle_sender_waits_unpolled_and_the_first_op_wakes_it(pair, queue_impl, monkeypatch):
    """Idle, the sender waits on its queue until woken (it asked every
    millisecond: 3% of a CPU for an idle daemon). Its idle wait is made a
    minute here: in half a second of idle it asks the queue at most twice;
    the first op of a frame wakes it (the op is acknowledged, not left
    for a minute); stop() ends the wait too."""
    monkeypatch.setattr(sender_mod, "IDLE_WAIT", 60.0)
    gets: list = []

    class CountingQueue(queue_impl):
        def get(self, timeout=None):
            gets.append(timeout)
            return super().get(timeout)

    src, dst, journal, sender, target, endpoint = pair(queue_cls=CountingQueue)
    journal.append(Op.mark(0, b"first"))
    settle(journal, sender, target)
    wait_for(lambda: gets and gets[-1] == 60.0, what="the sender's idle wait")
    asked = len(gets)
    quiet_until = time.monotonic() + 0.5
    wait_for(lambda: time.monotonic() >= quiet_until, what="half a second of idle")
    assert len(gets) - asked <= 2, gets[asked:]
    journal.append(Op.mark(0, b"second"))
    assert sender.wait_acked(journal.last_seq, 20), sender.status()
    wait_for(lambda: gets[-1] == 60.0, what="the sender idle again")
    t = sender._thread
    sender.stop()
    assert t is not None and not t.is_alive()


def test_ops_woken_while_frames_flow_share_a_frame(pair):
    """The first op of a frame wakes the idle sender; when a frame went
    out less than idle_flush before, the sender gathers ops for
    idle_flush (fewer, fuller frames under load: sent at once, pgbench
    through two daemons sent 3.5 times the frames and lost 0.07 of its
    TPS); after a quiet spell it sends at once (the lag benchmark: p50
    0.4 ms). Two ops appended 0.3 s apart right after a frame went travel
    together (idle_flush made 5 s; sent at once, the first would go alone)."""
    src, dst, journal, sender, target, endpoint = pair()
    sender.idle_flush = 5.0
    journal.append(Op.mark(0, b"a"))
    settle(journal, sender, target)      # (its own flush: a frame just went)
    frames = sender.frames_sent
    journal.append(Op.mark(0, b"b"))
    later = time.monotonic() + 0.3
    wait_for(lambda: time.monotonic() >= later, what="0.3 s")
    journal.append(Op.mark(0, b"c"))
    assert sender.wait_acked(journal.last_seq, 30), sender.status()
    assert sender.frames_sent == frames + 1


def test_spilling_source_queue_keeps_order(pair):
    src, dst, journal, sender, target, endpoint = pair(memory_limit=64 * 1024)
    sender.stop()                       # let the queue fill up and spill first
    w = Workload(Recorder(src, journal.append), seed=2)
    w.run(300)
    journal.flush()
    assert journal.queue.disk_bytes > 0
    sender.state = "idle"
    sender._stop.clear()
    sender.start()
    w.run(100)
    settle(journal, sender, target)
    assert diff(snapshot(src), snapshot(dst)) == []


def test_cut_links_resume_without_loss_or_repeat(pair):
    src, dst, journal, sender, target, endpoint = pair()
    w = Workload(Recorder(src, journal.append), seed=3)
    applied = []
    target.applier.on_mark = lambda op: applied.append(bytes(op.path))
    for i in range(20):
        deadline = time.monotonic() + 10
        while sender.connects <= i and time.monotonic() < deadline:
            time.sleep(0.005)
        w.run(20)
        journal.append(Op.mark(0, f"m{i}".encode()))
        journal.flush()
        sender.cut()                    # mid-stream: frames are in flight
    settle(journal, sender, target)
    assert diff(snapshot(src), snapshot(dst)) == []
    assert applied == [f"m{i}".encode() for i in range(20)]      # each exactly once, in order
    assert sender.connects >= 15


def test_target_restart_resumes_from_its_durable_queue(pair, tmp_path):
    src, dst, journal, sender, target, endpoint = pair()
    w = Workload(Recorder(src, journal.append), seed=4)
    target.pause()                      # frames are received and acked, not applied
    w.run(200)
    journal.flush()
    assert sender.wait_acked(journal.last_seq)
    assert target.applied_seq < journal.last_seq
    # the target goes away with everything acked but not applied
    endpoint.close()
    target.close()
    sender.cut()
    target2 = TargetConnection(1, dst, tmp_path / "tstate")
    assert target2.received_seq == journal.last_seq
    endpoint2 = TargetEndpoint(target2)
    sender.dial = endpoint2.dial
    w.run(50)
    try:
        settle(journal, sender, target2)
        assert diff(snapshot(src), snapshot(dst)) == []
    finally:
        endpoint2.close()
        target2.close()


def test_target_that_lost_its_state_gets_a_reset_and_asks_for_a_mirror(pair, tmp_path):
    src, dst, journal, sender, target, endpoint = pair()
    Workload(Recorder(src, journal.append), seed=5).run(50)
    settle(journal, sender, target)
    endpoint.close()
    target.close()
    sender.cut()
    fresh = TargetConnection(1, tmp_path / "dst2", tmp_path / "fresh-state")
    endpoint2 = TargetEndpoint(fresh)
    sender.dial = endpoint2.dial
    journal.append(Op.mark(0, b"after"))
    try:
        settle(journal, sender, fresh)
        assert sender.needs_mirror
        assert fresh.received_seq == journal.last_seq
    finally:
        endpoint2.close()
        fresh.close()


def test_frames_waiting_on_the_link_share_one_ack(tmp_path, queue_impl):
    """A burst of frames already on the link is acknowledged with fewer ACKs
    than frames (at most ACK_EVERY frames apart), each after its frames are
    in the durable queue, and the burst's last frame is always acknowledged."""
    from smirror.kernels.frames import encode_frame
    from smirror.stream.wire import ACK
    target = TargetConnection(1, tmp_path / "dst", tmp_path / "state", apply=False)
    a, b = socket.socketpair()
    src, dst = wire.Link(a, "source"), wire.Link(b, "target")
    frames = [encode_frame([Op.write(seq, b"f", seq * 10, b"x" * 10)], False)
              for seq in range(1, 101)]
    for frame in frames:                 # all on the link before the target reads
        src.send(wire.MsgType.FRAME, frame)
    served = threading.Thread(target=target.serve, args=(dst,), daemon=True)
    served.start()
    assert src.recv_json(wire.MsgType.READY)[1] == {"last_seq": 0}
    acks = []
    while not acks or acks[-1] < 100:
        mtype, payload = src.recv()
        assert mtype == wire.MsgType.ACK
        acks.append(ACK.unpack(payload)[0])
        assert target.queue.last_seq >= acks[-1]        # durable before acknowledged
    assert acks == sorted(acks) and len(acks) < 100
    assert all(b - a <= TargetConnection.ACK_EVERY for a, b in zip([0] + acks, acks, strict=False))
    src.send(wire.MsgType.BYE)
    served.join(5)
    src.close()
    target.close()


def test_an_op_no_frame_may_carry_is_replaced_by_a_mark_and_the_stream_goes_on(pair):
    """A captured op the journal kernel refuses (a relative path beyond
    PATH_MAX in a very deep tree) must not wedge the connection: a MARK with
    its seq stands in for it and the ops around it arrive."""
    from smirror.stream.journal import REFUSED_OP
    src, dst, journal, sender, target, _ = pair()
    marks = []
    target.applier.on_mark = lambda op: marks.append((op.seq, bytes(op.path)))
    journal.append(Op.create(0, b"before", 0o644))
    bad = journal.append(Op.create(0, b"d/" * 2100 + b"f", 0o644))
    journal.append(Op.create(0, b"after", 0o644))
    settle(journal, sender, target)
    assert (dst / "before").exists() and (dst / "after").exists()
    assert marks == [(bad, REFUSED_OP)]
    assert journal.refused_ops == 1


def test_both_queues_are_the_twin_under_test(pair, queue_impl):
    """The queue_impl parametrization reaches the receiver's own queue."""
    _, _, journal, _, target, _ = pair()
    assert type(journal.queue) is queue_impl and type(target.queue) is queue_impl


def test_the_journal_keeps_a_copy_of_view_data_only_while_its_frame_is_open(tmp_path, queue_impl):
    """The capture mount lends a write's data as a view of a buffer it
    reuses: an op that closes its frame is encoded from the view at once;
    one that waits in the open frame holds a copy, so what the buffer
    holds next never reaches the target under that op."""
    from smirror.kernels.frames import iter_frames
    queue = queue_impl(str(tmp_path / "q"), 8 << 20, 1 << 30)
    try:
        journal = ConnectionJournal(queue, max_bytes=1 << 20)
        lent = bytearray(b"a" * 4096)
        journal.append(Op.write(0, b"small", 0, memoryview(lent)))
        lent[:] = b"b" * 4096                                  # the lender reuses its buffer
        big = bytearray(b"c" * (1 << 20))
        journal.append(Op.write(0, b"big", 0, memoryview(big)))   # closes the frame
        assert journal.pending_ops == 0
        big[:] = b"d" * (1 << 20)
        journal.flush()
        item = queue.get(timeout=0)
        ops = [op for frame in iter_frames(item[1]) for op in frame]
        assert [(op.path, bytes(op.data[:1]), len(op.data)) for op in ops] == \
            [(b"small", b"a", 4096), (b"big", b"c", 1 << 20)]
    finally:
        queue.close()
