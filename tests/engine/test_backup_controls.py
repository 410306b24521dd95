"""Backup controls in the embedded engine and their parts: files in use on
the target delay their ops (and every later one), ignore-deletes (keep and
move, a move out of the set still deletes), the orphan policy's ops, the
queue alert."""
import json
import os
import subprocess
import time

import pytest

from smirror.fs.keep import KeepDirs
from smirror.fs.tree import DIR, FILE, Entry
from smirror.kernels.memqueue import SpillQueue, queue_alert
from smirror.ops import MARK_ORPHAN_MOVE, Op, OpKind
from smirror.replication import Replication
from smirror.stream.inuse import InUseGate, holders, in_use
from smirror.stream.orphans import orphan_ops
from support.treestate import diff, snapshot


def hold_open(path, mode="r"):
    """Another process with ``path`` open (a backup reading it)."""
    return subprocess.Popen(["sleep", "60"], stdin=open(path, mode))


# -- files in use -----------------------------------------------------------------
def test_in_use_sees_other_processes_only_while_they_hold_the_file(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x")
    assert not in_use(f)
    p = hold_open(f)
    try:
        assert in_use(f)
        assert any("sleep" in h for h in holders(f))
    finally:
        p.kill()
        p.wait()
    assert not in_use(f)
    assert not in_use(tmp_path / "missing") and not in_use(tmp_path)
    os.symlink(f, tmp_path / "link")
    assert not in_use(tmp_path / "link")        # never followed


def test_ops_of_a_file_in_use_wait_and_so_do_later_ones(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    with Replication(src, dst, capture="api", mirror="none", state_dir=tmp_path / "state",
                     in_use_max_delay=60) as rep:
        rep.journal.create("db")
        rep.journal.write("db", 0, b"version 1")
        assert rep.wait(10)
        backup = hold_open(dst / "db")
        try:
            rep.journal.write("db", 0, b"version 2")
            rep.journal.create("later")            # another file: must wait too (order)
            time.sleep(0.6)
            assert (dst / "db").read_bytes() == b"version 1" and not (dst / "later").exists()
            st = rep.target.status()
            assert st["apply_state"] == "in-use wait"
            assert st["waiting"]["path"] == "db" and "sleep" in st["waiting"]["why"]
        finally:
            backup.kill()
            backup.wait()
        assert rep.wait(10)
        assert (dst / "db").read_bytes() == b"version 2" and (dst / "later").exists()
        assert rep.target.status()["in_use"]["delays"] == 1
        assert diff(snapshot(src), snapshot(dst)) == []


def test_in_use_gives_up_after_the_maximum_delay(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    with Replication(src, dst, capture="api", mirror="none", state_dir=tmp_path / "state",
                     in_use_max_delay=0.5) as rep:
        rep.journal.create("f")
        assert rep.wait(10)
        p = hold_open(dst / "f")
        try:
            t0 = time.monotonic()
            rep.journal.write("f", 0, b"new")
            assert rep.wait(10)
            assert time.monotonic() - t0 >= 0.45
            assert (dst / "f").read_bytes() == b"new"
            assert rep.target.status()["in_use"]["gave_up"] == 1
        finally:
            p.kill()
            p.wait()


def test_gate_checks_each_file_once_per_frame_and_skips_directories(tmp_path):
    (tmp_path / "a").write_bytes(b"a")
    gate = InUseGate(5)
    calls = []

    def open_of(rel, flags):
        calls.append(rel)
        return os.open(os.path.join(os.fsencode(tmp_path), rel), flags | os.O_NOFOLLOW)

    gate.begin_frame()
    for op in (Op.write(1, b"a", 0, b"x"), Op.write(2, b"a", 1, b"y"), Op.mkdir(3, b"d"),
               Op.rename(4, b"a", b"b")):
        assert gate.wait(op, open_of)
    assert calls == [b"a", b"b"]
    assert InUseGate(0).wait(Op.write(1, b"a", 0, b"x"), open_of)   # disabled: no check


# -- ignore deletes --------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["inotify", "fanotify"])
def test_ignore_deletes_keep_and_move_out_still_deletes(tmp_path, monkeypatch, backend):
    from smirror.capture import fanotify
    if backend == "fanotify" and fanotify.unavailable_reason(str(tmp_path)):
        pytest.skip(f"fanotify: {fanotify.unavailable_reason(str(tmp_path))}")
    monkeypatch.setenv("SMIRROR_CAPTURE_BACKEND", backend)
    src, dst, outside = tmp_path / "src", tmp_path / "dst", tmp_path / "outside"
    (src / "dir").mkdir(parents=True)
    outside.mkdir()
    for name in ("a", "b", "dir/c", "moved-away"):
        (src / name).write_text(name)
    with Replication(src, dst, state_dir=tmp_path / "state", ignore_deletes="keep") as rep:
        os.unlink(src / "a")
        os.unlink(src / "dir" / "c")
        os.rmdir(src / "dir")
        (src / "b").write_text("edited")              # edits still apply
        os.rename(src / "moved-away", outside / "moved-away")
        os.rename(src / "b", src / "b2")             # renames inside still rename
        assert rep.wait(20)
        st = rep.target.status()
        assert rep.tree_capture.status()["backend"] == backend
    assert (dst / "a").read_text() == "a" and (dst / "dir" / "c").read_text() == "dir/c"
    assert not (dst / "moved-away").exists()         # a move out of the set deletes
    assert (dst / "b2").read_text() == "edited" and not (dst / "b").exists()
    assert st["marks"]["ignored_deletes"] == 3       # a, dir/c, dir


def test_ignore_deletes_move_puts_them_aside_and_purges(tmp_path):
    src, dst, state = tmp_path / "src", tmp_path / "dst", tmp_path / "state"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "x").write_text("x")
    (src / "y").write_text("y")
    with Replication(src, dst, state_dir=state, capture="api", mirror="full",
                     ignore_deletes="move", deleted_keep_days=30) as rep:
        rep.journal.delete("sub/x")
        rep.journal.rmdir("sub")
        rep.journal.delete("y")
        assert rep.wait(10)
        st = rep.target.status()
    kept = state / "deleted" / "local-1"
    assert (kept / "sub" / "x").read_text() == "x" and (kept / "y").read_text() == "y"
    assert not (dst / "sub").exists() and not (dst / "y").exists()
    assert st["marks"] == {"ignored_deletes": 3, "deleted_moved": 2, "orphans_moved": 0}
    keep = KeepDirs(state / "orphans", state / "deleted")
    assert keep.purge(os.fsencode(kept), 30, force=True) == 0        # young: kept
    assert keep.purge(os.fsencode(kept), 1e-9, force=True) == 2      # older than the limit
    assert not (kept / "y").exists() and not (kept / "sub").exists()


def test_keep_dirs_never_overwrite_and_stay_confined(tmp_path):
    src, dst, state = tmp_path / "src", tmp_path / "dst", tmp_path / "state"
    src.mkdir()
    with Replication(src, dst, state_dir=state, capture="api", mirror="none") as rep:
        tc = rep.target
        keep = tc.keep_dirs
        for round_ in range(2):
            (dst / "o").write_text(f"orphan {round_}")
            assert keep.move_orphan(tc, b"o")
        moved = sorted(p.name for p in (state / "orphans" / "local-1").iterdir())
        assert moved[0] == "o" and moved[1].startswith("o.") and len(moved) == 2
        assert not keep.move_orphan(tc, b"../../etc/passwd")          # refused, logged
        assert not keep.move_orphan(tc, b"missing")


# -- orphans -------------------------------------------------------------------------
DAY = 86400 * 10**9


def _known(entries, now):
    out = {}
    for rel, kind, size, age_days in entries:
        out[rel] = Entry(DIR if kind == "d" else FILE, 0o644, 0, 0, size,
                         now - int(age_days * DAY), None, None, 1)
    return out


def test_orphan_ops_for_each_policy():
    now = 1000 * DAY
    known = _known([(b"keep", "f", 1, 0), (b"old", "f", 10, 40), (b"new", "f", 20, 1),
                    (b"od", "d", 0, 50), (b"od/a", "f", 5, 50), (b"od/b", "f", 7, 2)], now)
    orphans = [b"new", b"od", b"od/a", b"od/b", b"old"]
    ops, st = orphan_ops(orphans, known, "report")
    assert ops == [] and st["orphans"] == 5 and st["orphan_bytes"] == 42
    # delete, no age limit: whole subtrees, deepest first
    ops, st = orphan_ops(orphans, known, "delete", now_ns=now)
    assert [(OpKind(o.kind).name, bytes(o.path)) for o in ops] == [
        ("DELETE", b"od/a"), ("DELETE", b"od/b"), ("DELETE", b"new"), ("DELETE", b"old"),
        ("RMDIR", b"od")]
    # delete, older than 30 days: od/b is young, so od stays
    ops, st = orphan_ops(orphans, known, "delete", older_than_days=30, now_ns=now)
    assert [bytes(o.path) for o in ops] == [b"od/a", b"old"] and st["orphans_deleted"] == 2
    assert st["orphan_bytes_acted"] == 15
    # move, no age limit: top-level orphans as a whole
    ops, st = orphan_ops(orphans, known, "move", now_ns=now)
    assert all(o.kind == OpKind.MARK and bytes(o.path) == MARK_ORPHAN_MOVE for o in ops)
    assert [json.loads(bytes(o.data))["path"] for o in ops] == ["new", "od", "old"]
    ops, st = orphan_ops(orphans, known, "move", older_than_days=30, now_ns=now)
    assert [json.loads(bytes(o.data))["path"] for o in ops] == ["od/a", "old"]
    with pytest.raises(ValueError, match="orphan policy"):
        orphan_ops(orphans, known, "shred")


# -- queue alert ---------------------------------------------------------------------
def test_queue_alert_at_the_threshold_and_low_free_space(tmp_path):
    q = SpillQueue(str(tmp_path / "q"), 0, 1 << 20)
    try:
        assert queue_alert(q, 1 << 20, 50, tmp_path, 0) == ""
        for i in range(1, 9):
            q.put(i, b"x" * 70_000)
        alert = queue_alert(q, 1 << 20, 50, tmp_path, 0)
        assert "% of its limit" in alert and "threshold 50%" in alert
        assert "below the" in queue_alert(q, 1 << 40, 50, tmp_path, 1 << 62)
    finally:
        q.close()
