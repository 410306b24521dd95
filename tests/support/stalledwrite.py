"""A write(2) held between its time update and its bytes, for as long as a
test likes: the kernel sets a file's mtime and ctime when a write begins,
then copies the bytes from the writer's buffer. Here that buffer is
memory whose pages a userfaultfd holds back, so the write blocks on its
first byte, inode lock held, times already moved, until ``release()``.

A reader that fstat's the file meanwhile sees the new times and, unless it
waits for the write, the old bytes: what smirror's readers must never send
under those times (:func:`smirror.fs.files.wait_for_writes`).

Needs userfaultfd with kernel-mode faults (root, or
vm.unprivileged_userfaultfd=1); ``unavailable()`` says why not.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import platform
import threading
import time

_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}.get(platform.machine())
_SYS_LSEEK = {"x86_64": 8, "aarch64": 62}.get(platform.machine())
_UFFD_API = 0xAA
_UFFDIO_API = 0xC018AA3F          # _IOWR(0xAA, 0x3F, struct uffdio_api)
_UFFDIO_REGISTER = 0xC020AA00     # _IOWR(0xAA, 0x00, struct uffdio_register)
_UFFDIO_COPY = 0xC028AA03         # _IOWR(0xAA, 0x03, struct uffdio_copy)
_MODE_MISSING = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


def _ioctl(fd: int, req: int, arg) -> None:
    if _libc.ioctl(fd, req, ctypes.byref(arg)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"userfaultfd ioctl {req:#x}: {os.strerror(e)}")


def _userfaultfd() -> int:
    if _SYS_USERFAULTFD is None:
        raise OSError(0, f"no userfaultfd syscall number for {platform.machine()}")
    fd = _libc.syscall(_SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"userfaultfd: {os.strerror(e)}")
    try:
        _ioctl(fd, _UFFDIO_API, _Api(_UFFD_API, 0, 0))
    except BaseException:
        os.close(fd)
        raise
    return fd


def unavailable() -> str:
    """Why a stalled write cannot be made here ('' when it can)."""
    try:
        with StalledWrite(os.devnull, b"x") as w:
            w.release()
    except OSError as exc:
        return f"no userfaultfd for kernel faults here ({exc.strerror or exc})"
    return ""


class StalledWrite:
    """``with StalledWrite(path, data, offset) as w:`` writes ``data`` at
    ``offset`` of ``path`` in a thread; on entry the write has begun (the
    file's mtime moved, when it is a regular file) and copies nothing until
    ``w.release()`` (called on exit if the test did not)."""

    def __init__(self, path, data: bytes, offset: int = 0):
        self.path, self.data, self.offset = path, data, offset
        self.page = mmap.PAGESIZE
        self.length = -(-len(data) // self.page) * self.page
        self.released = False
        self.error: BaseException | None = None

    def __enter__(self) -> StalledWrite:
        self.uffd = _userfaultfd()
        # the writer's buffer: anonymous pages never touched, so every one
        # is missing and its first access waits for the userfaultfd
        self.buf = mmap.mmap(-1, self.length)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        try:
            _ioctl(self.uffd, _UFFDIO_REGISTER, _Register(self.addr, self.length, _MODE_MISSING, 0))
        except BaseException:
            self._close()
            raise
        self.fd = os.open(self.path, os.O_WRONLY)
        before = os.fstat(self.fd).st_mtime_ns
        self.thread = threading.Thread(target=self._write, name="stalled-write", daemon=True)
        self.thread.start()
        if os.path.isfile(self.path):
            deadline = time.monotonic() + 30
            while os.fstat(self.fd).st_mtime_ns == before:
                if not self.thread.is_alive() or time.monotonic() > deadline:
                    self.release()
                    raise RuntimeError(f"the write to {self.path} did not begin: {self.error}")
                time.sleep(0.001)
        return self

    def _write(self) -> None:
        try:
            view = memoryview(self.buf)[:len(self.data)]
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], self.offset + done)
        except BaseException as exc:  # noqa: BLE001 - handed to the test through .error
            self.error = exc

    def release(self) -> None:
        """Give the write its bytes: it completes."""
        if self.released:
            return
        self.released = True
        src = ctypes.create_string_buffer(self.data.ljust(self.length, b"\0"), self.length)
        _ioctl(self.uffd, _UFFDIO_COPY, _Copy(self.addr, ctypes.addressof(src), self.length, 0, 0))
        self.thread.join(30)

    def _close(self) -> None:
        os.close(self.uffd)
        try:
            self.buf.close()
        except BufferError:
            pass            # the from_buffer view: freed with the object

    def __exit__(self, *exc) -> None:
        try:
            self.release()
        finally:
            os.close(self.fd)
            self._close()


def stale_under_source_mtime(src_file, dst_file) -> bool:
    """The target's copy has the source's size and mtime and other bytes
    (asked once the held write is done: meanwhile the source's bytes are
    the old ones too)."""
    s, d = os.stat(src_file), os.stat(dst_file)
    with open(src_file, "rb") as a, open(dst_file, "rb") as b:
        return ((s.st_size, s.st_mtime_ns) == (d.st_size, d.st_mtime_ns)
                and a.read() != b.read())


def waiting_for_the_write(thread: threading.Thread) -> bool:
    """``thread`` (of this process) sits in lseek: behind a stalled write's
    inode lock (wait_for_writes)."""
    tid = thread.native_id
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            first = f.read().split()[0]
    except (OSError, IndexError):
        return False
    return first.isdigit() and int(first) == _SYS_LSEEK


def run_beside(fn, write: StalledWrite, timeout: float = 30, waiter: threading.Thread | None = None) -> str:
    """Run ``fn`` in a thread while ``write`` is stalled: returns "done" if
    it finished without waiting for the write (release() follows), or
    "waited" if it sat waiting for it (released then, and ``fn`` joined).
    ``waiter``: the thread that reads for ``fn`` (else ``fn``'s own)."""
    errors: list[BaseException] = []

    def call():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)
    t = threading.Thread(target=call, name="reader")
    t.start()
    deadline = time.monotonic() + timeout
    outcome = None
    while outcome is None:
        if not t.is_alive():
            outcome = "done"
        elif waiting_for_the_write(waiter or t):
            outcome = "waited"
        elif time.monotonic() > deadline:
            write.release()
            t.join()
            raise AssertionError(f"{fn} neither finished nor waited for the write in {timeout} s")
        else:
            time.sleep(0.001)
    if outcome == "waited":
        write.release()
    t.join(timeout)
    if errors:
        raise errors[0]
    return outcome
