"""TreeCapture.close(): once it returned, the capture emits nothing more
(it waits for the thread in run()); a thread that does not return is
logged, not waited for forever; a second close() does nothing."""
import threading
import time

from smirror.capture.watch import TreeCapture


class _HeldEmit:
    """A capture's ``emit`` that holds the capture thread in its first call
    until ``release`` is set, and records what is emitted after ``closed``."""

    def __init__(self):
        self.inside, self.release, self.closed = threading.Event(), threading.Event(), threading.Event()
        self.after_close: list = []

    def __call__(self, op):
        if self.closed.is_set():
            self.after_close.append(op)
        if threading.current_thread().name == "capture" and not self.inside.is_set():
            self.inside.set()
            self.release.wait(60)


def _capture_held_in_emit(tmp_path, backend):
    src = tmp_path / "src"
    src.mkdir()
    emit = _HeldEmit()
    cap = TreeCapture(src, emit, capture_backend=backend, verify_interval=None)
    thread = threading.Thread(target=cap.run, daemon=True, name="capture")
    thread.start()
    for i in range(3):
        (src / f"f{i}").write_bytes(b"x" * 100)      # ops the thread is emitting
    assert emit.inside.wait(30), "the capture thread emitted nothing"
    return cap, emit, thread


def test_close_waits_for_the_capture_thread(tmp_path, backend):
    """close() while the thread is in the middle of emitting: before, it
    returned at once and the thread went on emitting (and reading a closed
    watcher); now it returns once the thread did."""
    cap, emit, thread = _capture_held_in_emit(tmp_path, backend)
    alive_after_close = []

    def close():
        cap.close()
        alive_after_close.append(thread.is_alive())
        emit.closed.set()

    closer = threading.Thread(target=close)
    closer.start()
    # (a bounded wait for what must not happen: close() returning while
    # the thread is held in its emit)
    assert not emit.closed.wait(0.5), "close() returned while its thread was still emitting"
    emit.release.set()
    closer.join(30)
    assert emit.closed.is_set() and alive_after_close == [False]
    assert emit.after_close == []
    assert cap.state == "stopped"
    assert cap.watcher.fd == -1
    cap.close()                 # a second close: nothing


def test_close_does_not_hang_on_a_thread_that_does_not_return(tmp_path, backend, caplog):
    """The thread stays in its emit past close()'s timeout: close() logs it
    and returns; the watcher is closed by the thread once it returns (not
    under it: its descriptor could be another file's by then)."""
    cap, emit, thread = _capture_held_in_emit(tmp_path, backend)
    try:
        t0 = time.monotonic()
        cap.close(timeout=0.2)
        assert time.monotonic() - t0 < 10
        assert thread.is_alive()
        assert "did not return within 0.2 s of close()" in caplog.text
        assert cap.watcher.fd >= 0
        cap.close()             # a second close: nothing, at once
    finally:
        emit.release.set()
    thread.join(30)
    assert not thread.is_alive()
    assert cap.watcher.fd == -1


def test_close_without_a_thread_and_twice(tmp_path, backend):
    """No thread ran: close() closes the watcher; again: nothing; a run()
    after close() returns at once."""
    src = tmp_path / "src"
    src.mkdir()
    ops = []
    cap = TreeCapture(src, ops.append, capture_backend=backend, verify_interval=None)
    cap.close()
    assert cap.watcher.fd == -1
    cap.close()
    cap.run()
    assert cap.state == "stopped" and ops == []


def test_close_from_the_capture_thread_itself(tmp_path, backend):
    """close() called by the capture's own emit (on the capture thread):
    it returns without waiting for itself, the thread ends, and then the
    watcher is closed (not under the thread's feet)."""
    src = tmp_path / "src"
    src.mkdir()
    ops, fd_after_close = [], []

    def emit(op):
        ops.append(op)
        if threading.current_thread().name == "capture" and not fd_after_close:
            cap.close()
            fd_after_close.append(cap.watcher.fd)

    cap = TreeCapture(src, emit, capture_backend=backend, verify_interval=None)
    thread = threading.Thread(target=cap.run, daemon=True, name="capture")
    thread.start()
    (src / "f").write_bytes(b"f")
    thread.join(30)
    assert not thread.is_alive() and ops
    assert fd_after_close[0] >= 0       # still the thread's to read until it returns
    assert cap.state == "stopped" and cap.watcher.fd == -1
