"""The target's handoff (apply-through) path: a verified frame goes straight
to the applier while the durable queue is empty, and is acknowledged only
once applied (DESIGN invariant 5: applied or durable). Whenever the applier
cannot go on (a file in use, paused, an apply error, a new link) the
handoff's frames move into the durable queue, in order, and are
acknowledged from there."""
import os
import shutil
import threading
import time

import pytest

from smirror.kernels.frames import encode_frame
from smirror.ops import Op
from smirror.stream import wire
from smirror.stream.receiver import TargetConnection
from support.handoff import Source

# every test here, with the target queue of both twins (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("queue_impl")


def held_target(tmp_path, **kw):
    """A target whose applier waits (in-use gate) while the test holds dst/f open."""
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "f").write_bytes(b"")
    holder = os.open(dst / "f", os.O_RDONLY)
    target = TargetConnection(1, dst, tmp_path / "state", in_use_max_delay=60, **kw)
    return target, holder


def test_a_handed_frame_is_acknowledged_once_applied_not_before(tmp_path):
    target = TargetConnection(1, tmp_path / "dst", tmp_path / "state")
    src = Source(target)
    acked_before_applied = []
    for seq in range(1, 51):
        src.send_write(seq)
    got = src.acks_until(50)
    # every ACK came after its frames were applied, and none of them went
    # through the durable queue (it never held a frame)
    for a in got:
        acked_before_applied.append(target.applied_seq < a)
    assert not any(acked_before_applied)
    assert target.queue.stats()["puts"] == 0       # not one frame was written to the queue
    assert (tmp_path / "dst" / "f").read_bytes() == b"".join(bytes([s]) * 100 for s in range(1, 51))
    assert target.status()["handoff_bytes"] == 0
    src.close()
    assert src.error is None
    target.close()


def test_an_applier_waiting_on_a_file_in_use_gets_the_handoff_made_durable(tmp_path):
    target, holder = held_target(tmp_path)
    src = Source(target)
    try:
        src.send_write(1)
        # the applier holds frame 1 (file in use): the handoff is made
        # durable and acknowledged at once instead of waiting up to 60 s
        assert src.ack(5) == 1
        assert target.applied_seq == 0
        assert target.queue.last_seq == 1
        # later frames go straight to the durable queue, behind it, in order
        for seq in (2, 3):
            src.send_write(seq)
        assert src.acks_until(3)[-1] == 3
        assert target.applied_seq == 0 and target.queue.count == 3
        assert target.status()["handoff_bytes"] == 0
    finally:
        os.close(holder)
    assert target.wait_applied(3, 10)
    assert (tmp_path / "dst" / "f").read_bytes() == b"\x01" * 100 + b"\x02" * 100 + b"\x03" * 100
    # the queue drained: the next frame takes the handoff again
    deadline = time.monotonic() + 5
    while target.queue.count and time.monotonic() < deadline:
        time.sleep(0.01)
    src.send_write(4)
    assert src.ack(5) == 4
    assert target.queue.last_seq == 3          # frame 4 never entered the queue
    assert target.applied_seq == 4
    src.close()
    target.close()


def test_pause_moves_the_handoff_into_the_durable_queue_and_acknowledges_it(tmp_path):
    target, holder = held_target(tmp_path)
    target.gate.max_delay = 0       # no gate: the applier is slowed by the pause alone
    src = Source(target)
    try:
        # the applier is stopped by hand between take and apply: a frame
        # sits in the handoff, unacknowledged
        target._paused.set()
        target._handoff_enabled = True
        with target._handoff:
            target._through.append((1, encode_frame([Op.write(1, b"f", 0, b"a" * 10)], False), None))
            target._through_bytes += 10
        target.received_seq = 1
        assert src.ack(0.3) is None
        target.pause("test")
        assert src.ack(5) == 1
        assert target.queue.last_seq == 1 and not target._through
        target.resume()
        assert target.wait_applied(1, 10)
        assert (tmp_path / "dst" / "f").read_bytes() == b"a" * 10
    finally:
        os.close(holder)
    src.close()
    target.close()


def test_a_new_link_gets_ready_only_for_what_is_applied_or_durable(tmp_path):
    """READY's last_seq covers the handoff only after it is in the durable
    queue; a frame that finds no room is forgotten and sent again."""
    target, holder = held_target(tmp_path, memory_limit=1 << 16, disk_limit=1 << 16)
    target.gate.max_delay = 0
    target._paused.set()
    frames = [(s, encode_frame([Op.write(s, b"f", (s - 1) * 30000, os.urandom(30000))], False), None)
              for s in (1, 2, 3, 4)]
    with target._handoff:
        target._through.extend(frames)
        target._through_bytes = sum(len(f) for _, f, _ in frames)
    target.received_seq = 4
    src = Source(target)        # _settle_handoff: the paused queue takes what fits
    os.close(holder)
    last = src.ready["last_seq"]
    assert last < 4
    assert target.queue.last_seq == last
    assert not target._through and target.received_seq == last
    # the source sends the rest again; it is accepted and applied in order
    target.resume()
    for _, f, _ in frames[last:]:
        src.link.send(wire.MsgType.FRAME, f)
    assert src.acks_until(4)[-1] == 4, target.status()
    assert target.wait_applied(4, 10)
    want = b"".join(bytes(f[-30000:]) for _, f, _ in frames)
    assert (tmp_path / "dst" / "f").read_bytes() == want
    src.close()
    assert src.error is None
    target.close()


def test_a_frame_applied_in_part_before_a_kill_comes_again_whole_and_is_accepted(tmp_path):
    """kill -9 in the middle of a handoff frame leaves applied_seq inside
    it; the source resends the whole frame, the target skips what it applied."""
    dst = tmp_path / "dst"
    dst.mkdir()
    first = TargetConnection(1, dst, tmp_path / "state", apply=False)
    first.applier.apply(Op.write(1, b"f", 0, b"AAAA"))
    first.applier.apply(Op.write(2, b"f", 4, b"BBBB"))
    first.close()
    (dst / "f").write_bytes(b"aaaaBBBB")        # an op applied twice would show
    target = TargetConnection(1, dst, tmp_path / "state")
    assert target.received_seq == 2
    src = Source(target)
    assert src.ready == {"last_seq": 2}
    frame = encode_frame([Op.write(1, b"f", 0, b"AAAA"), Op.write(2, b"f", 4, b"BBBB"),
                          Op.write(3, b"f", 8, b"CCCC")], False)
    src.link.send(wire.MsgType.FRAME, frame)
    assert src.acks_until(3)[-1] == 3
    assert target.wait_applied(3, 10)
    assert (dst / "f").read_bytes() == b"aaaaBBBBCCCC"
    src.close()
    assert src.error is None
    target.close()


def test_fsync_always_keeps_every_frame_in_the_durable_queue(tmp_path):
    (tmp_path / "dst").mkdir()
    target = TargetConnection(1, tmp_path / "dst", tmp_path / "state", fsync="always")
    src = Source(target)
    for seq in range(1, 6):
        src.send_write(seq)
    src.acks_until(5)
    assert target.queue.last_seq == 5
    src.close()
    target.close()


def test_the_handoff_holds_at_most_its_limit_and_then_the_receiver_waits(tmp_path):
    """Bounded memory: a slow applier makes the receiver wait for room in
    the handoff (so the source waits) instead of holding more in memory."""
    target = TargetConnection(1, tmp_path / "dst", tmp_path / "state")
    target.HANDOFF_LIMIT = 1000
    target.HANDOFF_STALL = 30           # slow, not stuck: the handoff keeps the frames
    go = threading.Event()
    apply_op = target.applier.apply

    def slow_apply(op):                 # the real applier, held until the test lets it go
        go.wait(30)
        apply_op(op)
    target.applier.apply = slow_apply
    src = Source(target)
    for seq in range(1, 11):
        src.send_write(seq, offset=(seq - 1) * 300, data=bytes([seq]) * 300)
    time.sleep(0.5)
    st = target.status()
    assert 0 < st["handoff_bytes"] <= 1000
    assert st["seq_received"] < 10 and target.queue.stats()["puts"] == 0
    go.set()
    assert src.acks_until(10)[-1] == 10
    assert target.wait_applied(10, 10)
    assert (tmp_path / "dst" / "f").read_bytes() == b"".join(bytes([s]) * 300 for s in range(1, 11))
    src.close()
    target.close()


def linked_target(tmp_path, idle_close):
    """A target whose applier closes its files after ``idle_close``
    seconds without a frame, and a source linked to it."""
    target = TargetConnection(1, tmp_path / "dst", tmp_path / "state")
    target.IDLE_CLOSE = idle_close
    return target, Source(target)


def test_frames_that_come_close_together_keep_the_applier_s_file_open(tmp_path):
    # each frame is sent once the one before it was applied (the applier
    # waits for the next in between): closing its descriptors at each wake
    # reopened the file at every frame; now only IDLE_CLOSE without a
    # frame closes them (set long here: the test waits for no clock)
    target, src = linked_target(tmp_path, 600.0)
    for seq in range(1, 21):
        src.send_write(seq)
        assert src.ack(10) == seq
    assert target.applied_seq == 20
    assert target.applier.stats["files_opened"] == 1
    assert (tmp_path / "dst" / "f").read_bytes() == b"".join(bytes([s]) * 100 for s in range(1, 21))
    src.close()
    target.close()


def test_an_idle_applier_closes_its_files(tmp_path):
    target, src = linked_target(tmp_path, 0.01)
    src.send_write(1)
    assert src.ack(10) == 1
    deadline = time.monotonic() + 30
    while target.applier._fds and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not target.applier._fds         # no descriptor of a target file kept while idle
    src.send_write(2)
    assert src.ack(10) == 2
    assert target.applier.stats["files_opened"] == 2
    src.close()
    target.close()


def test_a_file_removed_behind_the_target_s_back_is_not_written_through_its_open_descriptor(tmp_path):
    # the applier keeps a file open between frames: a removal of the
    # replica's file by someone else must still be found (a divergence the
    # source resyncs), not written into a file without a name
    target, src = linked_target(tmp_path, 600.0)
    (tmp_path / "dst" / "d").mkdir()
    src.send_write(1, path=b"d/f")
    assert src.ack(10) == 1
    assert b"d/f" in target.applier._fds
    shutil.rmtree(tmp_path / "dst" / "d")
    src.send_write(2, path=b"d/f")
    assert src.ack(10) == 2
    assert target.resyncs["ops_skipped"] == 1
    assert not (tmp_path / "dst" / "d").exists()
    src.close()
    target.close()
