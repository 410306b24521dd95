"""The watcher capture when a call fails for a passing reason (here the
real one: the process has no free descriptor): what it could not read is
never taken for gone or empty, and is looked at again once it can be.
(The fanotify watcher's own lookups: tests/engine/test_fanotify.py.)"""
import ctypes
import errno
import os
import threading
import time

from smirror.capture import fanotify, inotify
from smirror.capture.inotify import Kind
from smirror.capture.watch import TreeCapture
from smirror.ops import OpKind
from support.applying import applier_of
from support.descriptors import no_free_descriptors
from support.events import collect
from support.treestate import diff, snapshot


def test_a_resync_that_cannot_list_a_directory_keeps_it_and_lists_it_later(tmp_path, backend,
                                                                          caplog):
    """A resync (a periodic verification, an overflow's rescan) that meets
    a directory it cannot list for lack of descriptors: before, the
    directory counted as empty and the target lost all of it (DELETE and
    RMDIR sent); now what the target has stays, the capture's status names
    the directory, and the capture thread resyncs it once it can be listed."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "e" / "f").write_bytes(b"f" * 1000)
    (src / "top").write_bytes(b"top")
    ops = []
    cap = TreeCapture(src, ops.append, capture_backend=backend, verify_interval=None)
    apply_new = applier_of(ops, dst)

    thread = None
    try:
        cap.resync(b"", "initial")
        apply_new()
        assert diff(snapshot(src), snapshot(dst)) == []
        before = len(ops)
        with no_free_descriptors():
            cap.resync(b"", "a verification while descriptors ran out")
        removed = [(op.kind, bytes(op.path)) for op in ops[before:]
                   if op.kind in (OpKind.DELETE, OpKind.RMDIR)]
        assert removed == []
        assert cap.status()["unlisted"] == {"": "Too many open files"}
        assert "cannot list" in caplog.text
        apply_new()
        assert diff(snapshot(src), snapshot(dst)) == []
        # the capture thread lists it again (UNREADABLE_RETRY) and sends what
        # changed meanwhile without an event of its own: nothing here
        thread = threading.Thread(target=cap.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        # (the retry takes the directory off the list before its resync,
        # and logs once that is done: wait for the log)
        while cap.unlisted or "can be listed now" not in caplog.text:
            assert time.monotonic() < deadline, f"still unlisted: {cap.unlisted}"
            time.sleep(0.05)
        assert "could not be listed (Too many open files)" in cap.last_rescan_reason
        (src / "d" / "e" / "g").write_bytes(b"g")
        while True:
            cap.sync()
            apply_new()
            left = diff(snapshot(src), snapshot(dst))
            if not left:
                break
            assert time.monotonic() < deadline, f"the target did not converge: {left}"
            time.sleep(0.05)
    finally:
        cap.stop()
        if thread is not None:
            thread.join(10)
        cap.close()


def test_a_tree_moved_in_while_descriptors_ran_out_is_rescanned_once_they_are_back(
        tmp_path, backend, caplog):
    """Both watchers: a directory tree moved into the set is read while the
    process has no free descriptor, so it cannot be listed (nor, for
    fanotify, its handles looked up). It is held, not taken for empty:
    once descriptors are back it is rescanned, and what happens below it
    is reported (before: its content never was, and the events of its
    subdirectory were lost for good)."""
    root, beside = tmp_path / "root", tmp_path / "beside"
    root.mkdir()
    (beside / "t" / "sub").mkdir(parents=True)
    (beside / "t" / "f").write_bytes(b"f")
    cls = fanotify.Watcher if backend == "fanotify" else inotify.Watcher
    with cls(root) as w:
        os.rename(beside / "t", root / "t")
        with no_free_descriptors():
            during = w.read(timeout=5)
        assert (Kind.CREATED, b"t") in [(e.kind, e.path) for e in during]
        assert w.lookups_held >= 1 and w.watch_failures >= 1
        after, deadline = [], time.monotonic() + 10
        while not any(e.kind is Kind.RESCAN for e in after):
            assert time.monotonic() < deadline, f"no rescan of t: {during + after}"
            after += w.read(timeout=0.2)
        rescan, = [e for e in during + after if e.kind is Kind.RESCAN]
        assert rescan.path == b"t" and "Too many open files" in rescan.reason
        (root / "t" / "sub" / "h").write_bytes(b"h")
        assert (Kind.CREATED, b"t/sub/h") in [(e.kind, e.path) for e in collect(w)]
        assert w.lookups_held == 0
    assert "Too many open files" in caplog.text


class _AddWatchFails:
    """inotify's libc binding, with inotify_add_watch failing with ``err``
    for one path while ``on`` (everything else is the real call)."""

    def __init__(self, real, path: bytes, err: int):
        self.real, self.path, self.err, self.on = real, path, err, True

    def __getattr__(self, name):
        return getattr(self.real, name)

    def inotify_add_watch(self, fd, path, mask):
        if self.on and path == self.path:
            ctypes.set_errno(self.err)
            return -1
        return self.real.inotify_add_watch(fd, path, mask)


def test_a_watch_that_fails_for_a_passing_reason_is_placed_later(tmp_path, monkeypatch):
    """inotify_add_watch failing with ENOMEM (not the watch limit): the
    directory is held and watched again once that works, then rescanned;
    before, it was rescanned once and never watched: every later change
    in it was lost until the periodic verification."""
    root = tmp_path / "root"
    root.mkdir()
    with inotify.Watcher(root) as w:
        libc = _AddWatchFails(inotify._libc, os.fsencode(root / "new"), errno.ENOMEM)
        monkeypatch.setattr(inotify, "_libc", libc)
        (root / "new").mkdir()
        during = collect(w)
        assert (Kind.CREATED, b"new") in [(e.kind, e.path) for e in during]
        assert w.lookups_held == 1 and not any(e.kind is Kind.RESCAN for e in during)
        libc.on = False
        after, deadline = [], time.monotonic() + 10
        while not any(e.kind is Kind.RESCAN for e in after):
            assert time.monotonic() < deadline, f"no rescan of new: {during + after}"
            after += w.read(timeout=0.2)
        rescan, = [e for e in after if e.kind is Kind.RESCAN]
        assert rescan.path == b"new" and "Cannot allocate memory" in rescan.reason
        (root / "new" / "f").write_bytes(b"f")
        assert (Kind.CREATED, b"new/f") in [(e.kind, e.path) for e in collect(w)]


def test_a_file_that_cannot_be_opened_for_lack_of_descriptors_is_read_later(tmp_path, backend,
                                                                           caplog):
    """A file overwritten in place (same size) whose change is handled
    while the process has no free descriptor: it cannot be opened, which
    is not "gone". Before, its new mtime was sent alone (the cache took
    it, so no size/mtime check looked again: the target kept the old
    bytes under the new mtime); now it waits with the unreadable files,
    named in status, and is sent once it can be opened."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"a" * 4096)
    ops = []
    cap = TreeCapture(src, ops.append, capture_backend=backend, verify_interval=None)
    apply_new = applier_of(ops, dst)

    thread = None
    try:
        cap.resync(b"", "initial")
        apply_new()
        time.sleep(0.01)                # (a new mtime, whatever the clock's grain)
        with open(src / "f", "r+b") as f:
            f.write(b"b" * 4096)
        before = len(ops)
        with no_free_descriptors():
            cap.sync()                  # the event is handled, the file not opened
        assert [op for op in ops[before:] if bytes(op.path) == b"f"] == []
        st = cap.status()
        # (or, when the fanotify queue overflowed meanwhile on this busy
        # file system, its rescan could not list the root)
        assert st["unreadable"] == {"f": "Too many open files"} \
            or st["unlisted"] == {"": "Too many open files"}, st
        apply_new()
        thread = threading.Thread(target=cap.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while True:
            cap.sync()
            apply_new()
            left = diff(snapshot(src), snapshot(dst))
            if not left:
                break
            assert time.monotonic() < deadline, f"the target did not converge: {left}"
            time.sleep(0.05)
        assert not cap.unreadable
    finally:
        cap.stop()
        if thread is not None:
            thread.join(10)
        cap.close()
