"""The target's durable watermark (issue 16, "durable means durable"), on
real directories: what the applier says is synced was fsynced after it was
written, the queue's sync covers every put, the source side's SYNC and ACK2,
and the applied-sequence file after a lost write."""
import os
import socket
import threading
import time
from collections import defaultdict

import pytest

from smirror.kernels.frames import encode_frame
from smirror.ops import Op
from smirror.stream import wire
from smirror.stream.apply import Applier
from smirror.stream.receiver import TargetConnection
from support.daemons import wait_for
from support.handoff import Source

pytestmark = pytest.mark.usefixtures("queue_impl")


def _spy(monkeypatch, base, events):
    """Log writes to files under ``base``, every fsync, and each op the
    applier records, in the order they happen (any thread)."""
    base = os.fsencode(os.path.realpath(base)) + b"/"

    def ino(fd):
        st = os.fstat(fd)
        return st.st_dev, st.st_ino

    def under(fd):
        try:
            return os.readlink(f"/proc/self/fd/{fd}").encode().startswith(base)
        except OSError:
            return False

    def wrap(name, kind, only_base):
        real = getattr(os, name)

        def spy(fd, *args):
            out = real(fd, *args)
            if not only_base or under(fd):
                events.append((kind, ino(fd)))
            return out
        monkeypatch.setattr(os, name, spy)
    for name in ("pwrite", "pwritev", "ftruncate"):
        wrap(name, "w", True)
    wrap("fsync", "f", False)
    applied = Applier._applied
    synced = Applier.sync_durable

    def on_applied(self, seq, count):
        applied(self, seq, count)
        events.append(("a", seq))

    def on_synced(self):
        seq = synced(self)
        events.append(("s", seq))
        return seq
    monkeypatch.setattr(Applier, "_applied", on_applied)
    monkeypatch.setattr(Applier, "sync_durable", on_synced)


def _check_synced_claims(events):
    """Every ("s", D): each file an op <= D wrote before it was fsynced
    between that write and the claim. Returns how many claims covered a write."""
    pending, written, fsyncs, covering = [], [], defaultdict(list), 0
    for i, ev in enumerate(list(events)):
        if ev[0] == "w":
            pending.append((ev[1], i))
        elif ev[0] == "a":
            written += [(ev[1], ino, at) for ino, at in pending]
            pending = []
        elif ev[0] == "f":
            fsyncs[ev[1]].append(i)
        elif ev[0] == "s":
            claimed = [(seq, ino, at) for seq, ino, at in written if seq <= ev[1]]
            covering += bool(claimed)
            for seq, ino, at in claimed:
                assert any(at < f < i for f in fsyncs[ino]), \
                    f"op seq {seq} wrote inode {ino} at event {at}; synced claimed up to {ev[1]} " \
                    f"at event {i} without an fsync of it in between"
            written = [w for w in written if w[0] > ev[1]]
    return covering


def test_the_durable_watermark_never_passes_an_op_whose_file_is_not_synced(tmp_path, monkeypatch):
    events = []
    dst = tmp_path / "dst"
    dst.mkdir()
    _spy(monkeypatch, dst, events)
    target = TargetConnection(1, dst, tmp_path / "state")
    target.applier.use_syncfs = False       # file by file, as on FUSE (syncfs: below)
    target.DURABLE_INTERVAL = 0.005
    src = Source(target)
    seq = 0
    for burst in range(30):
        for i in range(8):
            seq += 1
            name = f"f{(burst * 8 + i) % 13}".encode()
            src.link.send(wire.MsgType.FRAME, encode_frame(
                [Op.create(seq, name, 0o644)] if burst == 0 and i < 8 and seq <= 13 else
                [Op.write(seq, name, (seq % 5) * 100, bytes([seq % 256]) * 100)], False))
        if burst % 10 == 5:
            target.pause()              # a stretch through the durable queue
        elif burst % 10 == 8:
            target.resume()
        time.sleep(0.02)
    target.resume()
    assert target.wait_applied(seq, 20)
    wait_for(lambda: target.durable_seq == seq, 10, "every op durable")
    src.close()
    target.close()
    assert _check_synced_claims(events) >= 3        # several passes covered writes
    assert target.status()["seq_durable"] == seq


def test_a_pass_that_skips_the_file_sync_is_caught(tmp_path, monkeypatch):
    """The check above can fail: a synced claim without the files' fsync."""
    events = []
    dst = tmp_path / "dst"
    dst.mkdir()
    _spy(monkeypatch, dst, events)
    app = Applier(dst, state_path=tmp_path / "applied")
    app.use_syncfs = False
    app.apply(Op.create(1, b"a", 0o644))
    app.apply(Op.write(2, b"a", 0, b"data"))
    monkeypatch.setattr(app, "_sync_noted", lambda: None)      # the bug
    app.sync_durable()
    with pytest.raises(AssertionError, match="without an fsync"):
        _check_synced_claims(events)
    app.close()


def test_the_queue_sync_covers_every_put_whatever_its_fsync_policy(tmp_path):
    from smirror.kernels import memqueue
    for policy in ("none", "segment", "always"):
        q = memqueue.SpillQueue(str(tmp_path / policy), 1 << 20, 1 << 30, fsync=policy,
                                durable=True, segment_size=4096)
        assert q.sync() is None
        for seq in range(1, 40):
            q.put(seq, b"x" * 300)
        assert q.sync() == 39
        q.ack(20)
        assert q.sync() == 39
        q.close()
        with pytest.raises(Exception, match="closed"):
            q.sync()


def test_an_applied_state_file_that_lost_its_writes_resumes_from_what_is_durable(tmp_path):
    """A power loss can leave the applied-sequence file empty, zeros or as
    last synced: never a crash, never an op skipped."""
    state = tmp_path / "applied"
    app = Applier(tmp_path / "dst", state_path=state)
    app.apply(Op.create(1, b"a", 0o644))
    app.sync_durable()
    app.apply(Op.write(2, b"a", 0, b"x"))
    app.close()
    for lost in (b"", bytes(40)):
        state.write_bytes(lost)
        assert Applier(tmp_path / "dst", state_path=state).applied_seq == 0
    # the last synced version, written in another boot: only the synced seq counts
    state.write_bytes(b"SMAPPLY2" + (5).to_bytes(8, "little") + (3).to_bytes(8, "little")
                      + b"\x01" * 16)
    app = Applier(tmp_path / "dst", state_path=state)
    assert app.applied_seq == 3 and app.synced_seq == 3
    app.close()
    # an older smirror's file is carried over
    state.write_bytes(b"SMAPPLY1" + (7).to_bytes(8, "little"))
    app = Applier(tmp_path / "dst", state_path=state)
    assert app.applied_seq == 7 and state.stat().st_size == 48
    app.close()


def test_sync_asks_the_target_for_a_durable_pass_at_once(tmp_path):
    """A source that said durable in its OPEN gets READY with durable_seq,
    ACK2 (received, durable), and a SYNC makes the target durable long
    before its periodic pass."""
    target = TargetConnection(1, tmp_path / "dst", tmp_path / "state")
    target.DURABLE_INTERVAL = 30.0          # no periodic pass within the test
    a, b = socket.socketpair()
    src, dst = wire.Link(a, "source"), wire.Link(b, "target")
    served = threading.Thread(target=target.serve, args=(dst,), kwargs={"durable": True}, daemon=True)
    served.start()
    _, ready = src.recv_json(wire.MsgType.READY)
    assert ready == {"last_seq": 0, "durable": True, "durable_seq": 0}
    time.sleep(0.2)         # the durable thread is waiting out its (long) interval
    src.send(wire.MsgType.FRAME, encode_frame([Op.create(1, b"f", 0o644)], False))
    src.send(wire.MsgType.SYNC, wire.SYNC.pack(1))
    t0 = time.monotonic()
    durable = 0
    while durable < 1:
        mtype, payload = src.recv()
        assert mtype == wire.MsgType.ACK and len(payload) == wire.ACK2.size
        received, durable = wire.ACK2.unpack(payload)
        assert received >= 1 or durable == 0
    assert time.monotonic() - t0 < 5
    src.send(wire.MsgType.BYE)
    served.join(5)
    src.close()
    target.close()


@pytest.mark.parametrize("seed", range(3))
def test_ops_applied_but_not_synced_are_applied_again_after_a_reboot_and_converge(tmp_path, seed):
    """After a power loss the applied-state file says ops up to K were
    applied but only those up to J were synced: the target applies J+1..
    again, resent by the source, over a tree that already holds them (up to
    K). No op loops on an error: each one is applied, or skipped with a
    resync of its subtree asked of the source; with those resyncs done (the
    subtrees sent again from the source), the target equals the source."""
    import shutil

    from smirror.capture.recorder import Recorder
    from support.treestate import diff, snapshot
    from support.workload import Workload

    class Numbered(list):
        def __call__(self, op):
            self.append(op._replace(seq=len(self) + 1))
    src = tmp_path / "src"
    src.mkdir()
    ops = Numbered()
    Workload(Recorder(src, ops), seed=300 + seed).run(150)
    n = len(ops)
    for j, k in ((0, n // 3), (n // 4, n // 2), (n // 3, n - 1), (n // 2, n)):
        dst, state = tmp_path / f"dst-{j}-{k}", tmp_path / f"state-{j}-{k}"
        app = Applier(dst, state_path=_state_file(state))
        app.apply_all(ops[:j])
        app.sync_durable()
        app.apply_all(ops[j:k])
        j = app.synced_seq              # (a barrier may have synced more: apply.Applier._barrier)
        app.close()
        raw = bytearray(_state_file(state).read_bytes())
        raw[24:40] = b"\x02" * 16                 # written in another boot
        _state_file(state).write_bytes(bytes(raw))
        target = TargetConnection(1, dst, state)
        assert target.applied_seq == j
        source = Source(target)
        for op in ops[j:]:                          # the source resends from its durable point
            source.link.send(wire.MsgType.FRAME, encode_frame([op], False))
        assert target.wait_applied(n, 30), target.status()
        assert target.state != "apply-error" and target.error == ""
        asked = [bytes(p) for p in target._resync.pending]
        source.close()
        target.close()
        for rel in asked:                           # the source's resyncs
            shutil.rmtree(dst / os.fsdecode(rel), ignore_errors=True)
            if (dst / os.fsdecode(rel)).exists() or (dst / os.fsdecode(rel)).is_symlink():
                os.unlink(dst / os.fsdecode(rel))
            if (src / os.fsdecode(rel)).is_dir():
                shutil.copytree(src / os.fsdecode(rel), dst / os.fsdecode(rel), symlinks=True)
            elif (src / os.fsdecode(rel)).exists() or (src / os.fsdecode(rel)).is_symlink():
                shutil.copy2(src / os.fsdecode(rel), dst / os.fsdecode(rel), follow_symlinks=False)
        assert diff(snapshot(src), snapshot(dst)) == [], f"replay of {j + 1}..{k}, resyncs {asked}"


def _state_file(state_dir):
    """Where a TargetConnection of conid 1 keeps its applied-state file."""
    d = state_dir / "target-1"
    d.mkdir(parents=True, exist_ok=True)
    return d / "applied"


def test_on_a_local_file_system_a_pass_is_one_syncfs(tmp_path, monkeypatch):
    """Not FUSE: one syncfs covers every file changed (thousands of small
    files cost one call), and none when nothing changed."""
    from smirror.stream import apply
    calls = []
    real = apply.syncfs
    monkeypatch.setattr(apply, "syncfs", lambda fd: calls.append(fd) or real(fd))
    app = Applier(tmp_path / "dst", state_path=tmp_path / "applied")
    assert app.use_syncfs                    # /tmp here is not FUSE
    for seq in range(1, 201):
        app.apply(Op.create(seq, b"f%d" % seq, 0o644))
    assert app.sync_durable() == 200 and len(calls) == 1
    app.sync_durable()
    assert len(calls) == 1
    app.close()
