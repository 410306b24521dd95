"""The backing fsync/fdatasync of the capture mount, off its loop, by
Linux AIO (``IOCB_CMD_FSYNC``/``IOCB_CMD_FDSYNC``, Linux 4.18+).

While the backing disk flushes (~1 ms) the mount serves other calls. A
Python worker thread for the flush cost about 300 us more per fsync than
flushing on the loop (measured: GIL and thread hand-offs on a loaded
2-core machine), which ate the gain; with AIO the kernel flushes in its own
worker and signals an eventfd, and the loop wakes the waiting call: no
Python thread, no GIL hand-off.

:meth:`AioFlush.open` returns None where AIO cannot be set up (another
architecture, a kernel or seccomp policy without it): the mount then
flushes in a worker thread.
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import platform

log = logging.getLogger("smirror.capture.mount")

# (io_setup, io_destroy, io_getevents, io_submit) by machine
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
IOCB_CMD_FSYNC, IOCB_CMD_FDSYNC = 2, 3
IOCB_FLAG_RESFD = 1
DEPTH = 1024                    # flushes in flight at once (the mount serves at most 256 calls)


class _Iocb(ctypes.Structure):
    # linux/aio_abi.h, little-endian layout (both machines above)
    _fields_ = [("aio_data", ctypes.c_uint64), ("aio_key", ctypes.c_uint32),
                ("aio_rw_flags", ctypes.c_uint32), ("aio_lio_opcode", ctypes.c_uint16),
                ("aio_reqprio", ctypes.c_int16), ("aio_fildes", ctypes.c_uint32),
                ("aio_buf", ctypes.c_uint64), ("aio_nbytes", ctypes.c_uint64),
                ("aio_offset", ctypes.c_int64), ("aio_reserved2", ctypes.c_uint64),
                ("aio_flags", ctypes.c_uint32), ("aio_resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Waiting:
    __slots__ = ("done", "res")

    def __init__(self, done):
        self.done = done
        self.res = 0


class AioFlush:
    """One AIO context and its eventfd; :meth:`flush` from the mount's
    handlers, :meth:`reap` running in the mount's nursery."""

    def __init__(self, libc, numbers, ctx: ctypes.c_ulong, efd: int):
        self._syscall = libc.syscall
        self._setup, self._destroy, self._getevents, self._submit = numbers
        self._ctx = ctx
        self.efd = efd
        self._waiting: dict[int, _Waiting] = {}
        self._ids = itertools.count(1)
        self._events = (_Event * 64)()
        self._zero = _Timespec(0, 0)
        self.flushes = 0

    @classmethod
    def open(cls) -> AioFlush | None:
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None:
            return None
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        ctx = ctypes.c_ulong(0)
        if libc.syscall(ctypes.c_long(numbers[0]), ctypes.c_uint(DEPTH), ctypes.byref(ctx)) != 0:
            log.info("capture mount: no Linux AIO (%s): fsync flushes in a worker thread",
                     os.strerror(ctypes.get_errno()))
            return None
        try:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            libc.syscall(ctypes.c_long(numbers[1]), ctx)
            return None
        return cls(libc, numbers, ctx, efd)

    async def flush(self, fd: int, datasync: bool) -> None:
        """fsync (fdatasync) ``fd``; returns once the disk has it, serving
        other calls meanwhile. OSError with the flush's errno."""
        import trio
        ident = next(self._ids)
        iocb = _Iocb(aio_data=ident, aio_lio_opcode=IOCB_CMD_FDSYNC if datasync else IOCB_CMD_FSYNC,
                     aio_fildes=fd, aio_flags=IOCB_FLAG_RESFD, aio_resfd=self.efd)
        ptrs = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(iocb))
        waiting = self._waiting[ident] = _Waiting(trio.Event())
        if self._syscall(ctypes.c_long(self._submit), self._ctx, ctypes.c_long(1), ptrs) != 1:
            err = ctypes.get_errno() or errno.EIO
            del self._waiting[ident]
            if err in (errno.EINVAL, errno.EAGAIN):   # no AIO fsync for this file, or full
                await trio.to_thread.run_sync((os.fdatasync if datasync else os.fsync), fd)
                return
            raise OSError(err, os.strerror(err))
        self.flushes += 1
        await waiting.done.wait()
        if waiting.res < 0:
            raise OSError(-waiting.res, os.strerror(-waiting.res))

    async def reap(self) -> None:
        """Completions -> the waiting calls (the one task that waits on the eventfd)."""
        import trio
        while True:
            await trio.lowlevel.wait_readable(self.efd)
            try:
                os.eventfd_read(self.efd)
            except BlockingIOError:
                continue
            self.collect()

    def collect(self) -> None:
        while True:
            n = self._syscall(ctypes.c_long(self._getevents), self._ctx, ctypes.c_long(0),
                              ctypes.c_long(len(self._events)), self._events, ctypes.byref(self._zero))
            if n <= 0:
                return
            for ev in self._events[:n]:
                waiting = self._waiting.pop(ev.data, None)
                if waiting is not None:
                    waiting.res = ev.res
                    waiting.done.set()
            if n < len(self._events):
                return

    def close(self) -> None:
        """Once the loop ended: io_destroy waits for flushes still in flight."""
        if self.efd >= 0:
            self._syscall(ctypes.c_long(self._destroy), self._ctx)
            os.close(self.efd)
            self.efd = -1
