"""Coalescing on the target (Applier.plan) and the reclaimer of removed
inodes, on real directories: a coalesced frame ends in the tree op by op
application gives, a restart inside it converges, the library API's exact
order is never coalesced, and what a delete frees is freed off the
applier's path."""
import os
import random
import subprocess

import pytest

from smirror.capture.recorder import Recorder
from smirror.kernels.memqueue import SpillQueue
from smirror.ops import Op, OpKind
from smirror.stream import wire
from smirror.stream.apply import Applier, Moot, WriteRun
from smirror.stream.journal import ConnectionJournal
from smirror.stream.receiver import TargetConnection
from smirror.stream.reclaim import Reclaimer
from smirror.stream.sender import Sender
from support.endpoints import TargetEndpoint, settle
from support.treestate import diff, snapshot


class Numbered(list):
    def __call__(self, op):
        self.append(op._replace(seq=len(self) + 1))


def kinds(steps):
    return [("moot " if s.__class__ is Moot else "run " if s.__class__ is WriteRun else "")
            + OpKind(s.kind).name for s in steps]


def applied(dst, ops, coalesce, frame=None, state=None):
    app = Applier(dst, state_path=state)
    frame = frame or len(ops)
    for i in range(0, len(ops), frame):
        for step in app.plan(ops[i:i + frame], coalesce):
            app.apply(step)
    app.close()
    return app


def test_without_coalescing_the_plan_is_the_frame(tmp_path):
    ops = [Op.create(1, b"a"), Op.write(2, b"a", 0, b"x"), Op.delete(3, b"a")]
    assert Applier(tmp_path / "t").plan(ops, False) is ops


def test_what_a_file_created_and_deleted_in_the_frame_had_is_moot(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ops = Numbered()
    rec = Recorder(src, ops)
    rec.create("a")
    rec.write("a", 0, b"x" * 5000)
    rec.setattr("a", mode=0o600, mtime_ns=10**18)
    rec.create("b")
    rec.write("b", 0, b"kept")
    rec.delete("a")
    app = Applier(tmp_path / "dst")
    steps = app.plan(ops, True)
    moot = [s.op for s in steps if s.__class__ is Moot]
    # a's changes between its CREATE and its DELETE; of b's, only an mtime
    # the next SETATTR sets again
    assert {(o.path, OpKind(o.kind).name) for o in moot} == {
        (b"a", "WRITE"), (b"a", "SETATTR"), (b"b", "SETATTR")}
    assert [s.kind for s in steps if s.__class__ is not Moot and s.path == b"a"] == [
        OpKind.CREATE, OpKind.DELETE]
    for s in steps:
        app.apply(s)
    app.flush()
    assert diff(snapshot(src), snapshot(tmp_path / "dst")) == []
    # every op counts as applied once (status: ops_applied grows as seq_applied)
    assert app.applied_seq == len(ops) and app.stats["ops"] == len(ops)
    assert app.stats["coalesced"] == len(moot) and app.stats["bytes"] == 4


def test_a_file_with_other_names_keeps_its_writes(tmp_path):
    """CREATE truncates a file in place: its other names see the writes
    that follow, even when this name is deleted in the same frame."""
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "x").write_bytes(b"old")
    os.link(dst / "x", dst / "y")
    ops = [Op.create(1, b"x"), Op.write(2, b"x", 0, b"new"), Op.delete(3, b"x")]
    app = Applier(dst)
    assert kinds(app.plan(ops, True)) == ["CREATE", "WRITE", "DELETE"]
    applied(dst, ops, True)
    assert (dst / "y").read_bytes() == b"new" and not (dst / "x").exists()


def test_a_name_linked_in_the_frame_keeps_its_writes(tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "x").write_bytes(b"old")
    ops = [Op.hardlink(1, b"y", b"x"), Op.create(2, b"y"), Op.write(3, b"y", 0, b"new"),
           Op.delete(4, b"y")]
    assert not any(s.__class__ is Moot for s in Applier(dst).plan(ops, True))
    applied(dst, ops, True)
    assert (dst / "x").read_bytes() == b"new" and not (dst / "y").exists()


def test_a_setattr_is_moot_only_under_one_that_sets_all_it_set(tmp_path):
    ops = [Op.create(1, b"f"),
           Op.setattr(2, b"f", mode=0o600),
           Op.write(3, b"f", 0, b"data"),
           Op.setattr(4, b"f", mode=0o640, mtime_ns=10**18),
           Op.setattr(5, b"f", mode=0o644)]      # sets less: 4 stays
    steps = Applier(tmp_path / "t").plan(ops, True)
    assert kinds(steps) == ["CREATE", "moot SETATTR", "WRITE", "SETATTR", "SETATTR"]
    applied(tmp_path / "t", ops, True)
    st = os.stat(tmp_path / "t" / "f")
    assert st.st_mode & 0o7777 == 0o644 and st.st_mtime_ns == 10**18


@pytest.mark.parametrize("barrier", [Op.mark(3, b"label", b""), Op.rename(3, b"f", b"g"),
                                     Op.rmdir(3, b"d"), Op.hardlink(3, b"f", b"h")])
def test_nothing_is_moot_across_a_barrier(tmp_path, barrier):
    """A MARK or TASK (a task point), a RENAME or RMDIR (paths move), a
    HARDLINK (names share an inode): nothing coalesces across them."""
    ops = [Op.create(1, b"f"), Op.write(2, b"f", 0, b"x"), barrier,
           Op.setattr(4, b"f", mode=0o600), Op.delete(5, b"f"),
           Op.setattr(6, b"f", mode=0o600)]
    steps = Applier(tmp_path / "t").plan(ops, True)
    assert not any(s.__class__ is Moot for s in steps), kinds(steps)


def test_adjacent_writes_of_a_file_are_one_pwritev(tmp_path):
    ops = [Op.create(1, b"f"), Op.write(2, b"f", 0, b"a" * 4096), Op.write(3, b"f", 4096, b"b" * 10),
           Op.write(4, b"f", 5000, b"c"),          # not contiguous: a run of its own
           Op.write(5, b"g", 5001, b"d")]          # another file
    app = Applier(tmp_path / "t")
    steps = app.plan(ops, True)
    assert kinds(steps) == ["CREATE", "run WRITE", "WRITE", "WRITE"]
    assert [o.seq for o in steps[1].ops] == [2, 3] and steps[1].seq == 3
    for s in steps:
        app.apply(s)
    app.close()
    assert (tmp_path / "t" / "f").read_bytes() == b"a" * 4096 + b"b" * 10 + b"\0" * 894 + b"c"
    assert app.stats["ops"] == 5 and app.stats["coalesced"] == 1


def storm(src, seed, steps=400):
    """Random ops over a few names, so creates, writes, setattrs and deletes
    of one file meet in a frame; sometimes a rename, a hard link, a MARK."""
    rng = random.Random(seed)
    ops = Numbered()
    rec = Recorder(src, ops)
    names = ["a", "b", "c", "d/e", "d/f"]
    rec.mkdir("d")
    have = set()
    for _ in range(steps):
        p = rng.choice(names)
        r = rng.random()
        if p not in have:
            rec.create(p, rng.choice([0o644, 0o600]))
            have.add(p)
        elif r < 0.35:
            rec.write(p, rng.randrange(0, 9000), rng.randbytes(rng.randrange(1, 5000)))
        elif r < 0.45:
            rec.setattr(p, mode=rng.choice([0o644, 0o600, 0o640]),
                        **({"mtime_ns": rng.randrange(10**18)} if rng.random() < 0.5 else {}))
        elif r < 0.55:
            rec.truncate(p, rng.randrange(0, 6000))
        elif r < 0.75:
            rec.delete(p)
            have.discard(p)
        elif r < 0.8:
            q = rng.choice(names)
            if q != p:
                rec.rename(p, q)
                have.discard(p)
                have.add(q)
        elif r < 0.83:
            q = rng.choice(names)
            if q not in have:
                rec.hardlink(q, p)
                have.add(q)
        elif r < 0.86:
            ops(Op.mark(0, b"label", b""))
        else:
            rec.create(p)
    return ops


@pytest.mark.parametrize("seed", range(6))
def test_coalesced_frames_end_in_the_tree_op_by_op_gives(tmp_path, seed):
    src = tmp_path / "src"
    src.mkdir()
    ops = storm(src, seed)
    want = snapshot(src)
    app = applied(tmp_path / "one", ops, False)
    assert diff(want, snapshot(tmp_path / "one")) == []
    for frame in (7, 64, len(ops)):
        app = applied(tmp_path / f"c{frame}", ops, True, frame=frame)
        assert diff(want, snapshot(tmp_path / f"c{frame}")) == [], frame
        assert app.stats["ops"] == len(ops)
    assert app.stats["coalesced"] > 0


@pytest.mark.parametrize("seed", range(3))
def test_a_restart_inside_a_coalesced_frame_converges(tmp_path, seed):
    """Killed after any step, with its seq recorded or not yet (the one
    step a kill may leave unrecorded): the restarted target replays from
    the recorded seq and ends in the source's tree."""
    src = tmp_path / "src"
    src.mkdir()
    ops = storm(src, 50 + seed, steps=150)
    want = snapshot(src)
    steps = Applier(tmp_path / "plan").plan(ops, True)
    assert any(s.__class__ is Moot for s in steps)
    for cut in range(1, len(steps), 5):
        target, state = tmp_path / f"t{cut}", tmp_path / f"t{cut}.applied"
        app = Applier(target, state_path=state)
        for s in app.plan(ops, True)[:cut]:
            app.apply(s)
        before = steps[cut - 2].seq if cut > 1 else 0
        app.close()
        for recorded in (steps[cut - 1].seq, before):
            with open(state, "r+b") as f:
                f.seek(8)
                f.write(recorded.to_bytes(8, "little"))
            app = Applier(target, state_path=state)
            for s in app.plan(ops, True):
                app.apply(s)
            app.close()
            assert diff(want, snapshot(target)) == [], (cut, recorded)


def frame_through_a_link(tmp_path, order):
    """One frame that creates, writes and deletes a file, sent by a Sender
    over TCP to a TargetConnection; the target's status."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(parents=True)
    target = TargetConnection(1, dst, tmp_path / "tstate")
    endpoint = TargetEndpoint(target)
    queue = SpillQueue(str(tmp_path / "squeue"), 1 << 20, 1 << 30)
    journal = ConnectionJournal(queue)
    rec = Recorder(src, journal.append)
    rec.create("gone")
    rec.write("gone", 0, b"x" * 10000)
    rec.create("kept")
    rec.write("kept", 0, b"y" * 4096)
    rec.write("kept", 4096, b"z" * 100)
    rec.delete("gone")
    journal.flush()                     # all of it in one frame, before the sender runs
    sender = Sender(1, str(dst), journal, endpoint.dial, retry_interval=0.05, order=order).start()
    try:
        settle(journal, sender, target)
        assert diff(snapshot(src), snapshot(dst)) == [] and not endpoint.errors
        return dict(target.status(), ops=journal.last_seq)
    finally:
        sender.stop()
        endpoint.close()
        target.close()
        queue.close()


def test_a_watchers_stream_is_coalesced_the_library_apis_never(tmp_path):
    st = frame_through_a_link(tmp_path / "watch", wire.ORDER_PER_FILE)
    # gone's write and mtimes, kept's mtimes set again, kept's second write
    assert st["ops_coalesced"] == 6 and st["ops_applied"] == st["seq_applied"] == st["ops"]
    st = frame_through_a_link(tmp_path / "api", None)
    assert st["ops_coalesced"] == 0 and st["ops_applied"] == st["seq_applied"] == st["ops"]


# -- the reclaimer ---------------------------------------------------------------------

def test_a_deleted_files_blocks_are_freed_off_the_applier(tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    for name in ("f", "linked"):
        with open(dst / name, "wb") as f:
            f.write(os.urandom(64 << 10))
            os.fsync(f.fileno())
    os.link(dst / "linked", dst / "other")
    app = Applier(dst)
    app.reclaimer = Reclaimer(workers=0)        # nothing closes what it holds
    app.apply(Op.delete(1, b"f"))
    app.apply(Op.delete(2, b"linked"))          # another name keeps it: nothing to hold
    assert not (dst / "f").exists()
    assert app.reclaimer.pending == 1
    assert app.reclaimer.drain(5) and app.reclaimer.pending == 0
    app.close()


def test_its_threads_close_what_it_holds(tmp_path):
    r = Reclaimer(limit=4)
    fds = [os.open(tmp_path, os.O_PATH) for _ in range(6)]
    for fd in fds:
        r.hold(fd)
    assert r.drain(5) and r.pending == 0
    assert r.stats["held"] + r.stats["closed_inline"] == 6
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (root only)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_a_full_disk_waits_for_the_space_being_freed(small_fs):
    """The space a DELETE frees comes back when the reclaimer closes the
    inode: a write that finds the disk full waits for it, then goes on."""
    (small_fs / "big").write_bytes(b"b" * (700 << 10))
    app = Applier(small_fs)
    app.reclaimer = Reclaimer(workers=0)
    app.apply(Op.delete(1, b"big"))
    assert app.reclaimer.pending == 1
    app.apply(Op.create(2, b"new"))
    app.apply(Op.write(3, b"new", 0, b"n" * (700 << 10)))
    app.close()
    assert (small_fs / "new").stat().st_size == 700 << 10 and app.reclaimer.pending == 0
