"""The watcher capture when a call fails for a passing reason (here the
real one: the process has no free descriptor): what it could not read is
never taken for gone or empty, and is looked at again once it can be.
(The fanotify watcher's own lookups: tests/engine/test_fanotify.py.)"""
import ctypes
import errno
import json
import os
import threading
import time

from smirror.capture import fanotify, inotify
from smirror.capture.inotify import Kind
from smirror.capture.watch import TreeCapture
from smirror.ops import MARK_RESYNC_DONE, OpKind
from support.applying import ResyncingTarget, applier_of
from support.descriptors import no_free_descriptors
from support.events import collect
from support.faults import rsync_diff
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


# -- a resend (the target asked for a subtree again) that runs out of descriptors --

def _done_marks(ops) -> list[str]:
    return [json.loads(bytes(op.data))["path"] for op in ops
            if op.kind == OpKind.MARK and bytes(op.path) == MARK_RESYNC_DONE]


def _wait_converged(cap, src, targets, deadline=60.0) -> None:
    """Apply what each target was sent (``targets``: (apply_new, dst))
    until rsync -aHAX --checksum finds nothing to change on any of them;
    the capture thread runs meanwhile, if started."""
    end = time.monotonic() + deadline
    while True:
        left = {}
        for apply_new, dst in targets:
            apply_new()
            differs = rsync_diff(src, dst)
            if differs:
                left[str(dst)] = differs
        if not left:
            return
        assert time.monotonic() < end, f"the targets did not converge: {left}; {cap.status()}"
        time.sleep(0.05)


def _wait_done_mark(target, rel: str, deadline=30.0) -> None:
    end = time.monotonic() + deadline
    while _done_marks(target.ops) != [rel]:
        assert time.monotonic() < end, f"no done MARK of {rel!r}: {_done_marks(target.ops)}"
        time.sleep(0.05)
        target.apply_new()


def _run_thread(cap) -> threading.Thread:
    thread = threading.Thread(target=cap.run, daemon=True, name="capture")
    thread.start()
    return thread


def _resend_without_descriptors(cap, target, rel: bytes, why: str) -> None:
    """The target asks for ``rel`` again; the capture serves it while the
    process has no free descriptor."""
    target.requests.sent(rel, time.monotonic())
    with no_free_descriptors():
        cap.resend(rel, target, why)
    target.apply_new()


def _captured_to(src, dst, backend):
    """(target, capture): ``src`` captured, mirrored to a ResyncingTarget at ``dst``."""
    target = ResyncingTarget(dst)
    cap = TreeCapture(src, target, capture_backend=backend, verify_interval=None)
    target.capture = cap
    try:
        cap.resync(b"", "initial")
        cap.sync()
        _wait_converged(cap, src, [(target.apply_new, dst)])
    except BaseException:
        cap.close()
        raise
    return target, cap


def test_a_resend_that_cannot_list_a_directory_sends_it_once_it_lists(tmp_path, backend, caplog):
    """The target asked for ``d`` again (its copy of a hard-linked file
    diverged); the resend removes ``d`` there, then cannot list it (no free
    descriptor). Before, nothing below ``d`` was sent, and the retry
    compared ``d`` with the cache, which believed the target had it all:
    the target lost the subtree for good. Now the resend says what it
    could not send (status), sends it to that target once ``d`` lists
    (the shared inode whole, so the divergence outside ``d`` goes too),
    never what the source removed meanwhile, and only then its done MARK.
    The other target (the capture's own output) keeps its copy throughout."""
    src, dst, other = tmp_path / "src", tmp_path / "dst", tmp_path / "other"
    (src / "d" / "e" / "sub").mkdir(parents=True)
    (src / "d" / "e" / "f").write_bytes(b"f" * 10000)
    os.link(src / "d" / "e" / "f", src / "outside")
    (src / "d" / "e" / "sub" / "g").write_bytes(b"g")
    (src / "d" / "h").write_bytes(b"removed while the resend waits")
    target, to_other = ResyncingTarget(dst), []
    cap = TreeCapture(src, lambda op: (target(op), to_other.append(op)),
                      capture_backend=backend, verify_interval=None)
    target.capture = cap
    targets = [(target.apply_new, dst), (applier_of(to_other, other), other)]
    thread = None
    try:
        cap.resync(b"", "initial")
        cap.sync()
        _wait_converged(cap, src, targets)
        with open(dst / "outside", "r+b") as f:        # the target's divergence
            f.write(b"diverged")
        _resend_without_descriptors(cap, target, b"d", "op seq 9 WRITE b'd/e/f' failed")
        assert os.listdir(dst / "d") == []              # what the resend could send
        st = cap.status()
        assert st["unlisted"] == {"d": "Too many open files"}
        assert st["resends_unfinished"] == {"d": ["d"]}
        assert "the target asked for it again and lacks what is below it" in caplog.text
        assert _done_marks(target.ops) == []
        targets[1][0]()
        assert rsync_diff(src, other) == []
        # meanwhile on the source: one name goes (the target must not get it
        # back), one comes (both targets get it)
        os.unlink(src / "d" / "h")
        (src / "d" / "new").write_bytes(b"new")
        thread = _run_thread(cap)
        _wait_converged(cap, src, targets)
        _wait_done_mark(target, "d")
        _wait_converged(cap, src, targets)
        assert cap.status()["resends_unfinished"] == {}
        assert "could not send (b'd') can be now: sent" in caplog.text
    finally:
        cap.close()
    assert thread is None or not thread.is_alive()
    assert (dst / "outside").stat().st_ino == (dst / "d" / "e" / "f").stat().st_ino


def test_a_resend_that_cannot_list_a_directory_renamed_since_sends_it_at_its_new_name(
        tmp_path, backend):
    """The directory the resend could not list is renamed before it lists
    again: the target renamed its empty copy too, so what is missing is
    sent under the new name (the resend follows the renames it sent)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "e" / "f").write_bytes(b"f" * 5000)
    target, cap = _captured_to(src, dst, backend)
    try:
        (dst / "d" / "e" / "f").write_bytes(b"diverged")
        _resend_without_descriptors(cap, target, b"d", "op seq 9 WRITE b'd/e/f' failed")
        assert os.listdir(dst / "d") == []
        os.rename(src / "d", src / "renamed")
        _run_thread(cap)
        _wait_converged(cap, src, [(target.apply_new, dst)])
        _wait_done_mark(target, "d")
    finally:
        cap.close()


def test_a_resend_that_cannot_open_the_other_name_of_a_removed_link_sends_it_once_it_can(
        tmp_path, backend):
    """The target asked for a name of a hard-linked file that the source
    removed since: the resend sends the file's other name again, which it
    cannot open (no free descriptor) after removing it on the target.
    Before, the retry of the unreadable file compared it with the cache
    (the target had it, as far as the cache knew): the target lacked it for
    good. Now it is sent to that target once it can be opened."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    (src / "y").write_bytes(b"old " * 5000)
    os.link(src / "y", src / "sub" / "x")
    target, cap = _captured_to(src, dst, backend)
    try:
        # the target's divergence: sub/x made anew (its writes miss y)
        os.unlink(dst / "sub" / "x")
        (dst / "sub" / "x").write_bytes(b"")
        with open(src / "sub" / "x", "r+b") as f:
            f.write(b"new!" * 100)
        cap.sync()
        os.unlink(src / "sub" / "x")
        cap.sync()
        target.apply_new()
        _resend_without_descriptors(cap, target, b"sub/x", "the target lacked what the op needed")
        assert not (dst / "y").exists()
        st = cap.status()
        assert st["unreadable"] == {"y": "Too many open files"}
        assert st["resends_unfinished"] == {"sub/x": ["y"]}
        _run_thread(cap)
        _wait_converged(cap, src, [(target.apply_new, dst)])
        _wait_done_mark(target, "sub/x")
    finally:
        cap.close()
