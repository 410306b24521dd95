"""The watcher capture when a call fails for a passing reason (here the
real one: the process has no free descriptor): what it could not read is
never taken for gone or empty, and is looked at again once it can be.
(The fanotify watcher's own lookups: tests/engine/test_fanotify.py.)"""
import os
import threading
import time

import pytest

from smirror.capture import fanotify
from smirror.capture.watch import TreeCapture
from smirror.ops import OpKind
from smirror.stream.apply import Applier
from support.descriptors import no_free_descriptors
from support.treestate import diff, snapshot

FANOTIFY_MISSING = fanotify.unavailable_reason()


@pytest.fixture(params=["inotify", "fanotify"])
def backend(request):
    if request.param == "fanotify" and FANOTIFY_MISSING:
        pytest.skip(f"fanotify unavailable: {FANOTIFY_MISSING}")
    return request.param


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
    applier, applied = Applier(dst), 0

    def apply_new():
        nonlocal applied
        for op in ops[applied:]:
            applied += 1
            applier.apply(op._replace(seq=applied))
        applier.flush()

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
        while cap.unlisted:
            assert time.monotonic() < deadline, f"still unlisted: {cap.unlisted}"
            time.sleep(0.05)
        assert "could not be listed (Too many open files)" in cap.last_rescan_reason
        assert "can be listed now" in caplog.text
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
        cap.close()
        if thread is not None:
            thread.join(10)
