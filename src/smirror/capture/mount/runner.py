"""Runs the capture file system: mounts it, serves it on a thread of its
own (the compiled loop of :mod:`smirror.capture.mount._fuse`), stamps owed
mtimes on a timer, unmounts."""
from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from smirror.capture.mount.mountpoint import FSTYPE, prepare
from smirror.errors import MountError

if TYPE_CHECKING:       # imported by start(): the binding is built only with libfuse3's headers
    from ._fuse import Session
    from .bypass import BypassWatch
    from .fs import CaptureFS

log = logging.getLogger("smirror.capture.mount")

# how often owed mtimes are sent (seconds): the most an mtime on the target
# trails its file's content
TIMES_INTERVAL = 0.05



def binding():
    """The compiled FUSE binding (:mod:`._fuse`), or MountError saying why
    not: smirror was built without libfuse3's headers."""
    try:
        from . import _fuse
    except ImportError as exc:
        raise MountError(f"the capture mount needs smirror built with libfuse 3 (Debian: "
                         f"apt-get install fuse3 libfuse3-dev pkg-config, then reinstall "
                         f"smirror): {exc}") from None
    return _fuse


class CaptureMount:
    """The application's view of ``backing`` at ``mountpoint``; every change
    made through it goes to ``emit`` in the order served."""

    def __init__(self, backing, mountpoint, emit, *, bypass: bool = True, sync_waiter=None,
                 uring: bool | None = None):
        """``bypass``: also watch ``backing`` for changes other processes make
        to it directly, and resend them (:mod:`smirror.capture.mount.bypass`);
        ``sync_waiter``: the synchronous connections' waits
        (:class:`smirror.stream.syncwait.SyncWaiter`), None: no call waits;
        ``uring``: take FUSE over io_uring where the kernel offers it (the
        fuse module's ``enable_uring`` parameter; None: when
        $SMIRROR_MOUNT_URING is 1). Faster round trips, but each CPU's
        requests wait for that CPU (docs/mount.md, "FUSE over io_uring")."""
        self.sync_waiter = sync_waiter
        self.want_uring = os.environ.get("SMIRROR_MOUNT_URING") == "1" if uring is None else uring
        self.backing = os.path.abspath(os.fsdecode(backing))
        self.mountpoint = os.path.abspath(os.fsdecode(mountpoint))
        self.emit = emit
        self.watch_bypass = bypass
        self.bypass: BypassWatch | None = None
        self.fs: CaptureFS | None = None
        self.cleared = ""          # the message, when a stale mount was cleared
        self.error = ""
        self._thread: threading.Thread | None = None
        self._session: Session | None = None
        self._serving = False           # the loop runs (calls from other threads reach it)

    def start(self) -> CaptureMount:
        _fuse = binding()
        from .fs import CaptureFS
        if os.path.realpath(self.mountpoint) == os.path.realpath(self.backing) or \
                os.path.realpath(self.mountpoint).startswith(os.path.realpath(self.backing) + os.sep):
            raise MountError(f"mount point {self.mountpoint} must not be inside the backing "
                             f"directory {self.backing}")
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
                # write-only handles bypass the kernel's page cache (the
                # data would be cached twice, above and in the backing file)
                session = self._session = _fuse.Session(fs, self.mountpoint, opts,
                                                        direct_writes=True, uring=self.want_uring)
            except RuntimeError as exc:
                raise MountError(f"cannot mount {self.mountpoint}: {exc} (is /dev/fuse "
                                 f"there and usable?)") from None
            if fs.flusher is not None:
                session.add_reader(fs.flusher.efd, fs.flusher.reap)
            fs.requests_queued = session.queued
            fs.session = session
            self._serving = True
            self._thread = threading.Thread(target=self._run, name="capture-mount", daemon=True)
            self._thread.start()
            if self.watch_bypass:
                from .bypass import BypassWatch
                self.bypass = BypassWatch(self.backing, self.call, fs.repair).start()
        except BaseException:
            self.stop()
            raise
        log.info("capture mount of %s at %s", self.backing, self.mountpoint)
        return self

    @property
    def uring(self) -> bool:
        """Whether requests come over io_uring (FUSE over io_uring, a queue
        and a thread a CPU), not /dev/fuse: known once the kernel sent its
        first request."""
        return self._session is not None and self._session.uring

    def _run(self) -> None:
        # one request at a time, in the order read, each handler to its end;
        # only the backing fsync and a synchronous call's wait finish off the
        # loop (the op captured already), other calls served meanwhile
        assert self._session is not None
        try:
            self._session.run(TIMES_INTERVAL, self._flush)
        except BaseException as exc:       # reported by failure()
            self.error = f"the capture mount's loop stopped: {type(exc).__name__}: {exc}"
            log.error("%s", self.error, exc_info=True)
        finally:
            self._serving = False

    def _flush(self) -> None:
        try:
            assert self.fs is not None      # made before the loop starts
            self.fs.flush_times()
        except Exception as exc:           # the loop goes on; reported
            self.error = f"sending mtimes: {type(exc).__name__}: {exc}"
            log.error("capture mount: %s", self.error, exc_info=True)

    def call(self, fn, *args):
        """``fn(*args)`` on the mount's thread (in order with the calls it
        serves), from any other thread; its exception is raised here; None
        once the loop ended."""
        if not self.running():
            return None
        if threading.current_thread() is self._thread:
            return fn(*args)
        done = threading.Event()
        out: list = [None, None]

        def run() -> None:
            try:
                out[0] = fn(*args)
            except BaseException as exc:    # noqa: BLE001 - raised in the calling thread
                out[1] = exc
            finally:
                done.set()
        assert self._session is not None
        self._session.call_soon(run)
        while not done.wait(0.5):
            if not self.running():          # the loop ended before it ran
                return None
        if out[1] is not None:
            raise out[1]
        return out[0]

    @property
    def thread(self) -> threading.Thread | None:
        """The thread that serves the mount."""
        return self._thread

    def running(self) -> bool:
        return self._serving and self._thread is not None and self._thread.is_alive()

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
        assert self._session is not None
        self._session.call_soon(guarded)
        return True

    def flush_times(self) -> None:
        """Send the mtimes owed now (from any thread), so a sync covers them."""
        self.call(self._flush)

    def failure(self) -> str:
        if self.error:
            return self.error
        if self.bypass is not None and self.bypass.error:
            return self.bypass.error
        if self._thread is not None and not self._thread.is_alive() and self._session is not None:
            return f"the capture mount at {self.mountpoint} stopped unexpectedly"
        return ""

    def stop(self) -> None:
        """Unmount (lazily: an application still holding files there gets
        errors, its later writes cannot bypass the capture) and end the loop."""
        if self.bypass is not None:
            self.bypass.stop()
        session = self._session
        if self.running():
            self.flush_times()
            assert session is not None
            session.exit()
            assert self._thread is not None
            self._thread.join(10)
        if session is not None and (self._thread is None or not self._thread.is_alive()):
            self._session = None
            try:
                session.close(unmount=True)
            except Exception as exc:        # noqa: BLE001 - reported, and the next start clears it
                log.error("unmounting %s: %s", self.mountpoint, exc)
        self._thread = None
        if self.fs is not None:
            self.fs.close()
            if self.fs.flusher is not None:
                self.fs.flusher.close()

    def status(self) -> dict:
        """The mount point, how requests come (``transport``: io_uring or
        /dev/fuse), ops and bytes captured, failed and refused calls, the
        bypass watcher."""
        out: dict[str, Any] = {"mount_point": self.mountpoint, "error": self.failure(),
                               "transport": "io_uring" if self.uring else "/dev/fuse"}
        if self.fs is not None:
            out.update(self.fs.stats, failures=self.fs.failures)
        if self.bypass is not None:
            out["bypass"] = self.bypass.status()
        return out

    def __enter__(self) -> CaptureMount:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
