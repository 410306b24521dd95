"""Runs the capture file system: mounts it, serves it on a thread of its
own (a trio loop, pyfuse3's), stamps owed mtimes on a timer, unmounts."""
from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from smirror.capture.mount.mountpoint import FSTYPE, prepare
from smirror.errors import MountError

if TYPE_CHECKING:       # imported by start(): pyfuse3 is optional
    from .bypass import BypassWatch
    from .fs import CaptureFS

log = logging.getLogger("smirror.capture.mount")

# how often owed mtimes are sent (seconds): the most an mtime on the target
# trails its file's content
TIMES_INTERVAL = 0.05

# pyfuse3 keeps one session per process
_one_mount = threading.Lock()


def _binding():
    try:
        import pyfuse3
        import trio
    except ImportError as exc:
        raise MountError(f"the capture mount needs pyfuse3 (pip install 'smirror[mount]', with "
                         f"Debian's fuse3 and libfuse3-dev): {exc}") from None
    return pyfuse3, trio


class CaptureMount:
    """The application's view of ``backing`` at ``mountpoint``; every change
    made through it goes to ``emit`` in the order served."""

    def __init__(self, backing, mountpoint, emit, *, bypass: bool = True, sync_waiter=None):
        """``bypass``: also watch ``backing`` for changes other processes make
        to it directly, and resend them (:mod:`smirror.capture.mount.bypass`);
        ``sync_waiter``: the synchronous connections' waits
        (:class:`smirror.stream.syncwait.SyncWaiter`), None: no call waits."""
        self.sync_waiter = sync_waiter
        self.backing = os.path.abspath(os.fsdecode(backing))
        self.mountpoint = os.path.abspath(os.fsdecode(mountpoint))
        self.emit = emit
        self.watch_bypass = bypass
        self.bypass: BypassWatch | None = None
        self.fs: CaptureFS | None = None
        self.cleared = ""          # the message, when a stale mount was cleared
        self.fallocate_unsupported = ""     # why fallocate(2) is not served, if it is not
        self.error = ""
        self._thread: threading.Thread | None = None
        self._token: Any = None          # trio's TrioToken, once the loop runs
        self._ready = threading.Event()
        self._mounted = False
        self._owns_lock = False

    def start(self) -> CaptureMount:
        pyfuse3, trio = _binding()
        from .fs import CaptureFS
        if os.path.realpath(self.mountpoint) == os.path.realpath(self.backing) or \
                os.path.realpath(self.mountpoint).startswith(os.path.realpath(self.backing) + os.sep):
            raise MountError(f"mount point {self.mountpoint} must not be inside the backing "
                             f"directory {self.backing}")
        if not _one_mount.acquire(blocking=False):
            raise MountError(f"cannot mount {self.mountpoint}: this process already serves a "
                             f"capture mount (one per process)")
        self._owns_lock = True
        try:
            self.mountpoint, self.cleared = prepare(self.mountpoint)
            fs = self.fs = CaptureFS(self.backing, self.emit)
            fs.sync_waiter = self.sync_waiter
            from .aioflush import AioFlush
            fs.flusher = AioFlush.open()        # None: fsync flushes in a worker thread
            opts = {"fsname=smirror", f"subtype={FSTYPE.split('.', 1)[1]}", "default_permissions"}
            if os.geteuid() == 0:
                opts.add("allow_other")      # the application may run as another user
            try:
                pyfuse3.init(fs, self.mountpoint, opts)
            except RuntimeError as exc:
                raise MountError(f"cannot mount {self.mountpoint}: {exc} (is /dev/fuse "
                                 f"there and usable?)") from None
            self._mounted = True
            from .fallocate import install
            self.fallocate_unsupported = install(fs.fallocate_call)
            if self.fallocate_unsupported:
                log.warning("capture mount at %s: fallocate(2) through it is not supported "
                            "(EOPNOTSUPP; posix_fallocate falls back to writes): %s",
                            self.mountpoint, self.fallocate_unsupported)
            self._thread = threading.Thread(target=self._run, name="capture-mount", daemon=True)
            self._thread.start()
            self._ready.wait()
            if self.watch_bypass:
                from .bypass import BypassWatch
                self.bypass = BypassWatch(self.backing, self.call, fs.repair).start()
        except BaseException:
            self.stop()
            raise
        log.info("capture mount of %s at %s", self.backing, self.mountpoint)
        return self

    def _run(self) -> None:
        pyfuse3, trio = _binding()

        async def ticker():
            while True:
                await trio.sleep(TIMES_INTERVAL)
                self._flush()

        async def main():
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                assert self.fs is not None
                if self.fs.flusher is not None:
                    nursery.start_soon(self.fs.flusher.reap)
                # handlers never await before their op is captured: one at
                # a time, in the order read; only the backing fsync and a
                # synchronous call's wait run off the loop (the op captured
                # already), and other calls are served meanwhile
                await pyfuse3.main(min_tasks=1, max_tasks=self.SERVE_TASKS)
                nursery.cancel_scope.cancel()
        from .trioshim import install
        restore = None
        try:
            restore, queued = install(pyfuse3)  # fewer passes through trio's scheduler a request
            assert self.fs is not None
            self.fs.requests_queued = queued
            trio.run(main)
        except BaseException as exc:       # reported by failure()
            self.error = f"the capture mount's loop stopped: {type(exc).__name__}: {exc}"
            log.error("%s", self.error, exc_info=True)
        finally:
            if restore is not None:
                restore()
            self._ready.set()

    SERVE_TASKS = 256       # requests served at once while fsyncs and synchronous calls wait

    def _flush(self) -> None:
        try:
            assert self.fs is not None      # made before the loop starts
            self.fs.flush_times()
        except Exception as exc:           # the loop goes on; reported
            self.error = f"sending mtimes: {type(exc).__name__}: {exc}"
            log.error("capture mount: %s", self.error, exc_info=True)

    def call(self, fn, *args):
        """``fn(*args)`` on the mount's thread (in order with the calls it
        serves), from any other thread; None once the loop ended."""
        if self._thread is None or not self._thread.is_alive() or self._token is None:
            return None
        import trio
        try:
            return trio.from_thread.run_sync(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            return None

    @property
    def thread(self) -> threading.Thread | None:
        """The thread that serves the mount."""
        return self._thread

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._token is not None

    def call_soon(self, fn, *args) -> bool:
        """Schedule ``fn(*args)`` on the mount's thread without waiting for
        it; False once the loop ended. An exception is logged and reported
        by failure()."""
        if not self.running():
            return False

        def guarded():
            try:
                fn(*args)
            except Exception as exc:       # the loop goes on; reported
                self.error = f"{getattr(fn, '__name__', fn)}: {type(exc).__name__}: {exc}"
                log.error("capture mount: %s", self.error, exc_info=True)
        try:
            self._token.run_sync_soon(guarded)
        except Exception:                   # noqa: BLE001 - trio.RunFinishedError: ended
            return False
        return True

    def flush_times(self) -> None:
        """Send the mtimes owed now (from any thread), so a sync covers them."""
        self.call(self._flush)

    def failure(self) -> str:
        if self.error:
            return self.error
        if self.bypass is not None and self.bypass.error:
            return self.bypass.error
        if self._thread is not None and not self._thread.is_alive() and self._mounted:
            return f"the capture mount at {self.mountpoint} stopped unexpectedly"
        return ""

    def stop(self) -> None:
        """Unmount (lazily: an application still holding files there gets
        errors, its later writes cannot bypass the capture) and end the loop."""
        pyfuse3, trio = _binding()
        if self.bypass is not None:
            self.bypass.stop()
        if self._thread is not None and self._thread.is_alive() and self._token is not None:
            self.flush_times()
            try:
                trio.from_thread.run_sync(pyfuse3.terminate, trio_token=self._token)
            except trio.RunFinishedError:
                pass
            self._thread.join(10)
        if self._mounted:
            self._mounted = False
            try:
                pyfuse3.close(unmount=True)
            except Exception as exc:        # noqa: BLE001 - reported, and the next start clears it
                log.error("unmounting %s: %s", self.mountpoint, exc)
        if self._owns_lock:
            self._owns_lock = False
            _one_mount.release()
        self._thread = None
        if self.fs is not None:
            self.fs.base.close()
            if self.fs.flusher is not None:
                self.fs.flusher.close()

    def status(self) -> dict:
        """The mount point, ops and bytes captured, failed and refused
        calls, the bypass watcher."""
        out: dict[str, Any] = {"mount_point": self.mountpoint, "error": self.failure()}
        if self.fs is not None:
            out.update(self.fs.stats, failures=self.fs.failures)
        if self.bypass is not None:
            out["bypass"] = self.bypass.status()
        return out

    def __enter__(self) -> CaptureMount:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
