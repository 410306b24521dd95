"""A replayed op of a stream in exact order (library API, capture mount)
whose directory a later op of the replayed stretch removed: the removal
undid it, so it is done, without a resync (a library source serves none).
A watcher's stream (per-file order) still asks one."""
import socket
import struct
import threading

from smirror.kernels.frames import encode_frame
from smirror.ops import Op
from smirror.stream import wire
from smirror.stream.apply import Applier
from smirror.stream.receiver import TargetConnection

OPS = [Op.mkdir(1, b"a", 0o755),
       # synced up to here; then, lost with the power but for the names:
       Op.mkdir(2, b"a/b", 0o755), Op.create(3, b"a/b/f", 0o644), Op.write(4, b"a/b/f", 0, b"x"),
       Op.delete(5, b"a/b/f"), Op.rmdir(6, b"a/b"), Op.rmdir(7, b"a"), Op.mkdir(8, b"c", 0o755)]


def _after_a_reboot(tmp_path):
    """The target's map base and state as a power loss after op 7 leaves
    them: every name of ops 1-7 applied, op 1 synced, another boot."""
    dst, state = tmp_path / "dst", tmp_path / "state"
    (state / "target-1").mkdir(parents=True)
    app = Applier(dst, state_path=state / "target-1" / "applied")
    app.apply(OPS[0])
    app.sync_durable()
    app.apply_all(OPS[1:7])
    app.close()
    path = state / "target-1" / "applied"
    raw = bytearray(path.read_bytes())
    raw[8:16] = struct.pack("<Q", 1)            # the applied store lost: the synced one
    raw[24:40] = b"\x05" * 16                     # another boot
    path.write_bytes(bytes(raw))
    return dst, state


def _replayed(tmp_path, order):
    """Ops 2-8 resent to the restarted target by a source whose stream has
    ``order`` (None: exact); (its resync counters, the tree)."""
    dst, state = _after_a_reboot(tmp_path)
    target = TargetConnection(1, dst, state)
    assert target.applied_seq == 1 and target.applier.replay_until >= 7
    a, b = socket.socketpair()
    link = wire.Link(a, "source")
    served = threading.Thread(target=target.serve, args=(wire.Link(b, "target"), order),
                              daemon=True)
    served.start()
    link.recv_json(wire.MsgType.READY)
    for op in OPS[1:]:
        link.send(wire.MsgType.FRAME, encode_frame([op], False))
    assert target.wait_applied(OPS[-1].seq, 30), target.status()
    asked = dict(target.resyncs)
    tree = sorted(p.name for p in dst.iterdir())
    link.send(wire.MsgType.BYE)
    served.join(10)
    link.close()
    target.close()
    return asked, tree


def test_a_replayed_op_under_a_directory_removed_later_in_exact_order_is_done(tmp_path):
    asked, tree = _replayed(tmp_path, None)
    assert tree == ["c"]
    assert asked["asked"] == 0 and asked["ops_skipped"] == 0, asked
    assert asked["replays_undone"] == 3, asked        # MKDIR a/b, CREATE and WRITE a/b/f


def test_in_a_watchers_stream_it_still_asks_a_resync(tmp_path):
    asked, tree = _replayed(tmp_path, wire.ORDER_PER_FILE)
    assert tree == ["c"]
    assert asked["asked"] >= 1, asked
