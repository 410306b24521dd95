"""The capture mount as the capture of a daemon's replication set
(``capture = "mount"``): what the daemon asks of a repset's capture
(``paused``, ``sync``, ``status``, ``mirror_to``, ``request_resync``,
``close``), over one :class:`~smirror.capture.mount.runner.CaptureMount`.

Mirrors and resyncs run on the mount's own thread, so no call of the
application is being served meanwhile: the mirror reads the backing
directory at one moment of the application's history, and the mount's ops
that follow it are the changes made after that moment.
"""
from __future__ import annotations

import json
import os
import threading

from smirror.capture.mount.runner import CaptureMount
from smirror.errors import MountError
from smirror.ops import MARK_RESYNC_DONE, Op, OpKind

# ops that change their parent directory's entries (and so its mtime)
_CHANGES_PARENT = frozenset((OpKind.CREATE, OpKind.MKDIR, OpKind.DELETE, OpKind.RMDIR,
                             OpKind.RENAME, OpKind.SYMLINK, OpKind.HARDLINK, OpKind.MKNOD))


class MountCapture:
    """``emit(op)`` gets every op of the mount, in the order served."""

    moving_out = False          # no move out of the set: the mount is the whole set

    def __init__(self, root, mountpoint, emit, sync_waiter=None):
        """``sync_waiter``: the synchronous connections' waits (a
        :class:`smirror.stream.syncwait.SyncWaiter`; None: none ever)."""
        self.root = os.fsencode(os.path.abspath(os.fsdecode(root)))
        self.mountpoint = os.path.abspath(os.fsdecode(mountpoint))
        self.emit = emit
        self._lock = threading.RLock()      # paused(): the mount's ops wait
        self.stats: dict = {}               # the running mirror's counters
        self.mount = CaptureMount(self.root, self.mountpoint, self._emit, sync_waiter=sync_waiter)

    def start(self) -> MountCapture:
        """Mount (a stale mount a crashed daemon left there is cleared,
        ``self.mount.cleared`` says so)."""
        self.mount.start()
        return self

    def _emit(self, op) -> None:
        with self._lock:
            self.emit(op)

    def paused(self) -> threading.RLock:
        """Held, the mount's next op waits (its call does not return to
        the application): a task queued meanwhile marks one clean moment."""
        return self._lock

    def sync(self, max_time=None) -> None:
        """Nothing to catch up: an op is in the journal before its call
        returns (owed mtimes follow within runner.TIMES_INTERVAL)."""

    def on_thread(self, fn, *args):
        """``fn(*args)`` on the mount's thread (directly when called there)."""
        if threading.current_thread() is self.mount.thread:
            return fn(*args)
        if not self.mount.running():
            raise MountError(f"the capture mount at {self.mountpoint} is not running"
                             + (f": {self.mount.failure()}" if self.mount.failure() else ""))
        return self.mount.call(fn, *args)

    def mirror_to(self, emit, target_known: dict, orphans_out=None, adopt: bool = False,
                  stop=None, keep=frozenset()) -> dict:
        """A difference mirror of the backing directory against what a
        target holds (the watcher's engine, :meth:`TreeCapture.mirror_to`,
        with its ``stop`` event and ``newer`` keep set), on the mount's thread."""
        return self.on_thread(self._mirror_to, emit, target_known, orphans_out, stop, keep)

    def _mirror_to(self, emit, target_known, orphans_out, stop, keep) -> dict:
        from smirror.capture.watch import TreeCapture
        fs = self.mount.fs
        assert fs is not None               # on the mount's thread: it runs
        fs.flush_times()                    # the mtimes owed go before the mirror
        touched: set[bytes] = set()

        def out(op):
            # the target's directory gets the time of applying: resent after
            if op.kind in _CHANGES_PARENT:
                touched.add(bytes(op.path).rpartition(b"/")[0])
                if op.kind == OpKind.RENAME:
                    touched.add(bytes(op.path2).rpartition(b"/")[0])
            emit(op)
        # used as a mirror engine only: its watcher is never read
        engine = TreeCapture(self.root, out, capture_backend="inotify", verify_interval=None)
        try:
            self.stats = engine.stats
            stats = engine.mirror_to(out, target_known, orphans_out=orphans_out, stop=stop, keep=keep)
        finally:
            engine.close()
        fs.stamp_dirs(touched, emit)
        return stats

    def request_resync(self, rel: bytes, emit, reason: str = "") -> None:
        """A target found ``rel`` diverged: on the mount's thread, behind
        what it captured so far, ``rel`` is removed there and sent again
        whole, to ``emit`` only, then the done MARK. Returns at once (the
        caller may be the sender the mount's thread waits for)."""
        self.mount.call_soon(self._resend, bytes(rel), emit)

    def _resend(self, rel: bytes, emit) -> None:
        assert self.mount.fs is not None    # on the mount's thread: it runs
        self.mount.fs.resend_to(rel, emit)
        emit(Op.mark(0, MARK_RESYNC_DONE, json.dumps({"path": os.fsdecode(rel)}).encode()))

    def load_target(self, target_root) -> None:
        """Nothing to load: the mount keeps no model of the target."""

    def status(self) -> dict:
        failure = self.mount.failure()
        return dict(self.mount.status(), kind="mount", cleared=self.mount.cleared,
                    state="failed" if failure else "running", error=failure)

    def stop(self) -> None:
        self.mount.stop()

    def close(self) -> None:
        self.mount.stop()
