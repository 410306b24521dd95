"""The backing fsync/fdatasync of the capture mount, off its loop, by
Linux AIO (``IOCB_CMD_FSYNC``/``IOCB_CMD_FDSYNC``, Linux 4.18+).

While the backing disk flushes (~1 ms) the mount serves other calls. A
Python worker thread for the flush cost about 300 us more per fsync than
flushing on the loop (measured: GIL and thread hand-offs on a loaded
2-core machine), which ate the gain; with AIO the kernel flushes in its own
worker and signals an eventfd, which the mount's loop polls with
/dev/fuse, and the loop replies to the waiting call: no Python thread, no
GIL hand-off.

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
from typing import Any

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


class AioFlush:
    """One AIO context and its eventfd; :meth:`flush` from the mount's
    handlers, :meth:`reap` by the mount's loop when the eventfd is readable."""

    def __init__(self, libc, numbers, ctx: ctypes.c_ulong, efd: int):
        self._syscall = libc.syscall
        self._setup, self._destroy, self._getevents, self._submit = numbers
        self._ctx = ctx
        self.efd = efd
        self._waiting: dict[int, Any] = {}     # id -> done(errno)
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

    def flush(self, fd: int, datasync: bool, done) -> bool:
        """fsync (fdatasync) ``fd``, then ``done(errno)`` (0: the disk has
        it) on the loop, which serves other calls meanwhile. False when the
        kernel takes no AIO flush of this file (EINVAL) or the ring is full
        (EAGAIN): the caller flushes another way, ``done`` is not called."""
        ident = next(self._ids)
        iocb = _Iocb(aio_data=ident, aio_lio_opcode=IOCB_CMD_FDSYNC if datasync else IOCB_CMD_FSYNC,
                     aio_fildes=fd, aio_flags=IOCB_FLAG_RESFD, aio_resfd=self.efd)
        ptrs = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(iocb))
        self._waiting[ident] = done
        if self._syscall(ctypes.c_long(self._submit), self._ctx, ctypes.c_long(1), ptrs) != 1:
            err = ctypes.get_errno() or errno.EIO
            del self._waiting[ident]
            if err in (errno.EINVAL, errno.EAGAIN):
                return False
            done(err)
            return True
        self.flushes += 1
        return True

    def reap(self) -> None:
        """Completions -> their calls' ``done`` (the loop calls it when the
        eventfd is readable)."""
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            return
        self.collect()

    def collect(self) -> None:
        while True:
            n = self._syscall(ctypes.c_long(self._getevents), self._ctx, ctypes.c_long(0),
                              ctypes.c_long(len(self._events)), self._events, ctypes.byref(self._zero))
            if n <= 0:
                return
            for ev in self._events[:n]:
                done = self._waiting.pop(ev.data, None)
                if done is None:
                    continue
                try:
                    done(-ev.res if ev.res < 0 else 0)
                except Exception:           # one call's bug must not end the loop
                    log.exception("capture mount: answering a flushed fsync failed")
            if n < len(self._events):
                return

    def close(self) -> None:
        """Once the loop ended: io_destroy waits for flushes still in flight."""
        if self.efd >= 0:
            self._syscall(ctypes.c_long(self._destroy), self._ctx)
            os.close(self.efd)
            self.efd = -1
