"""Capture through the library API: a program records its own changes, in
the exact order it makes them.

``Recorder.write(path, offset, data)`` and friends either perform the change
on the source tree and record it under one lock (``perform=True``: the
recorded order is the order the source saw), or only record a change the
program made itself (``perform=False``). Paths are relative to the
replication set root, as ``str`` or ``bytes``; they are checked here, so a
bad path fails in the caller, not later on a target.

The ops go to ``emit(op)`` with sequence number 0: each connection's journal
numbers them.
"""
from __future__ import annotations

import os
import stat
import threading

from smirror.ops import MAX_XATTR_NAME, MKNOD_TYPES, XATTR_NAMESPACES, Op

_ZERO = 0


def _rel(path) -> bytes:
    p = os.fsencode(path) if not isinstance(path, bytes) else path
    if not p or p.startswith(b"/") or b"\0" in p or b".." in p.split(b"/"):
        raise ValueError(f"path {path!r} must be relative to the replication set root, "
                         f"without '..' or NUL")
    return p.rstrip(b"/")


def xattr_name(name) -> bytes:
    n = os.fsencode(name)
    if (b"\0" in n or len(n) > MAX_XATTR_NAME
            or not any(n.startswith(ns) and len(n) > len(ns) for ns in XATTR_NAMESPACES)):
        raise ValueError(f"xattr name {name!r} must be user., trusted., security. or "
                         f"system. followed by a name, at most {MAX_XATTR_NAME} bytes")
    return n


class Recorder:
    def __init__(self, root, emit, *, perform: bool = True, mtimes: bool = True):
        self.root = os.fsencode(os.path.abspath(root))
        self.emit = emit
        self.perform = perform
        # after a performed data change, also record the file's new mtime so
        # the target's copy is identical to the last nanosecond
        self.mtimes = mtimes and perform
        self.lock = threading.Lock()

    def _emit_mtime(self, rel: bytes, fd: int | None = None) -> None:
        st = os.fstat(fd) if fd is not None else os.lstat(self._abs(rel))
        self.emit(Op.setattr(_ZERO, rel, mtime_ns=st.st_mtime_ns))

    def _abs(self, rel: bytes) -> bytes:
        return self.root + b"/" + rel

    def write(self, path, offset: int, data) -> None:
        rel = _rel(path)
        with self.lock:
            if self.perform:
                fd = os.open(self._abs(rel), os.O_WRONLY | os.O_NOFOLLOW)
                try:
                    os.pwrite(fd, data, offset)
                    self.emit(Op.write(_ZERO, rel, offset, bytes(data)))
                    if self.mtimes:
                        self._emit_mtime(rel, fd)
                finally:
                    os.close(fd)
            else:
                self.emit(Op.write(_ZERO, rel, offset, bytes(data)))

    def truncate(self, path, size: int) -> None:
        rel = _rel(path)
        with self.lock:
            if self.perform:
                os.truncate(self._abs(rel), size)
            self.emit(Op.truncate(_ZERO, rel, size))
            if self.mtimes:
                self._emit_mtime(rel)

    def create(self, path, mode: int = 0o644) -> None:
        rel = _rel(path)
        with self.lock:
            if self.perform:
                fd = os.open(self._abs(rel), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
                os.fchmod(fd, mode)
                os.close(fd)
            self.emit(Op.create(_ZERO, rel, mode))
            if self.mtimes:
                self._emit_mtime(rel)

    def mkdir(self, path, mode: int = 0o755) -> None:
        rel = _rel(path)
        with self.lock:
            if self.perform:
                os.mkdir(self._abs(rel), mode)
                os.chmod(self._abs(rel), mode)
            self.emit(Op.mkdir(_ZERO, rel, mode))

    def delete(self, path) -> None:
        rel = _rel(path)
        with self.lock:
            if self.perform:
                os.unlink(self._abs(rel))
            self.emit(Op.delete(_ZERO, rel))

    def rmdir(self, path) -> None:
        rel = _rel(path)
        with self.lock:
            if self.perform:
                os.rmdir(self._abs(rel))
            self.emit(Op.rmdir(_ZERO, rel))

    def rename(self, path, new_path) -> None:
        rel, new = _rel(path), _rel(new_path)
        with self.lock:
            if self.perform:
                os.rename(self._abs(rel), self._abs(new))
            self.emit(Op.rename(_ZERO, rel, new))

    def setattr(self, path, *, mode=None, uid=None, gid=None, mtime_ns=None) -> None:
        rel = _rel(path)
        op = Op.setattr(_ZERO, rel, mode, uid, gid, mtime_ns)   # raises if it sets nothing
        with self.lock:
            if self.perform:
                p = self._abs(rel)
                if uid is not None or gid is not None:
                    os.chown(p, -1 if uid is None else uid, -1 if gid is None else gid,
                             follow_symlinks=False)
                if mode is not None:
                    os.chmod(p, mode)
                if mtime_ns is not None:
                    st = os.lstat(p)
                    os.utime(p, ns=(st.st_atime_ns, mtime_ns), follow_symlinks=False)
            self.emit(op)

    def symlink(self, path, link_target) -> None:
        rel = _rel(path)
        link = os.fsencode(link_target)
        with self.lock:
            if self.perform:
                os.symlink(link, self._abs(rel))
            self.emit(Op.symlink(_ZERO, rel, link))

    def hardlink(self, path, existing_path) -> None:
        rel, existing = _rel(path), _rel(existing_path)
        with self.lock:
            if self.perform:
                os.link(self._abs(existing), self._abs(rel), follow_symlinks=False)
            self.emit(Op.hardlink(_ZERO, rel, existing))

    def setxattr(self, path, name, value) -> None:
        """Extended attribute ``name`` (str or bytes, e.g. ``user.tag``) of
        ``path`` set to ``value`` (the path itself: a symlink is not followed)."""
        rel, xname = _rel(path), xattr_name(name)
        value = bytes(value)
        with self.lock:
            if self.perform:
                os.setxattr(self._abs(rel), xname, value, follow_symlinks=False)
            self.emit(Op.setxattr(_ZERO, rel, xname, value))

    def removexattr(self, path, name) -> None:
        rel, xname = _rel(path), xattr_name(name)
        with self.lock:
            if self.perform:
                os.removexattr(self._abs(rel), xname, follow_symlinks=False)
            self.emit(Op.removexattr(_ZERO, rel, xname))

    def mknod(self, path, mode: int, rdev: int = 0) -> None:
        """A fifo, socket or device node: ``mode`` holds its type
        (``stat.S_IFIFO`` ...) and permission bits."""
        rel = _rel(path)
        if stat.S_IFMT(mode) not in MKNOD_TYPES:
            raise ValueError(f"mknod of {path!r}: mode 0o{mode:o} is not a fifo, socket or "
                             f"device type")
        with self.lock:
            if self.perform:
                os.mknod(self._abs(rel), mode, rdev)
                os.chmod(self._abs(rel), stat.S_IMODE(mode))
            self.emit(Op.mknod(_ZERO, rel, mode, rdev))

    def task(self, name, payload=b"") -> None:
        with self.lock:
            self.emit(Op.task(_ZERO, name, payload))

    def mark(self, label=b"", payload=b"") -> None:
        with self.lock:
            self.emit(Op.mark(_ZERO, label, payload))
