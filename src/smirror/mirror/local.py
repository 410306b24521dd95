"""The mirror's target on a directory of this machine: :class:`LocalTarget`
(both sides of :class:`smirror.mirror.target.TargetSide`) and its file
writers.

Confinement: every relative path that reaches a LocalTarget is checked before
use - no absolute path, no ``.``/``..`` or empty component, no NUL - and its
parent directory is resolved beneath a handle of the root opened once
(:mod:`smirror.fs.beneath`: openat2 refusing symlinks, or a no-follow walk),
afresh for every operation, so no operation can leave the root. Final
components are acted on by directory descriptor and never followed.

Whole-file writes go to a hidden temporary file (``.smirror-tmp-*``) in the
destination directory and are renamed over the final name only once complete
and checked, so a killed mirror never leaves a half-written file under its
final name; the next scan removes stale temporaries.
"""
from __future__ import annotations

import errno
import os
import stat
import threading
import time

from smirror.errors import ConfinementError, MirrorError
from smirror.fs.beneath import Beneath, check_rel, chmod_at, lstat_at, proc_path, rmtree_at
from smirror.fs.files import (
    copy_data_extents,
    copy_range,
    fd_digest,
    fd_signature,
    pwrite_all,
    read_xattrs,
    replace_at,
    temp_name,
    xattr_filter,
)
from smirror.fs.tree import SPECIAL, SYMLINK, TEMP_PREFIX, Entry, entry_from_stat, scan


class LocalTarget:
    """A target directory on this machine.

    ``owner``: set uid/gid (default: when running as root); ``xattrs``:
    replicate extended attributes; ``fsync``: flush each file before its
    rename (durable against power loss; a killed process needs no fsync,
    the page cache keeps what was written).

    The root is opened once as a directory handle; every method resolves
    its path beneath it (:mod:`smirror.fs.beneath`) and acts on the final name
    by descriptor, so no path it hands to the kernel can be led out of the
    root by a symlink, whenever it appeared.
    """

    streamed = False          # written directly (digests and rolling deltas work)

    def __init__(self, root, *, owner: bool | None = None, xattrs: bool = True,
                 fsync: bool = False):
        self.root = os.fsencode(os.path.abspath(os.fsencode(root)))
        self._base: Beneath | None = None      # opened at first use (a dry run may have no root yet)
        self.owner = (os.geteuid() == 0) if owner is None else owner
        self.use_xattrs = xattrs
        self.fsync = fsync
        self.wanted_xattr = xattr_filter()
        self._lock = threading.Lock()
        self.bytes_written = 0         # file data written (pwrite + kernel copies)
        self._now_ns = time.time_ns()
        self._orphan_slots: dict = {}

    @property
    def base(self) -> Beneath:
        """The root's directory handle, opened once."""
        if self._base is None:
            self._base = Beneath(self.root)
        return self._base

    def close(self) -> None:
        if self._base is not None:
            self._base.close()
        for slot in self._orphan_slots.values():
            slot.close()
        self._orphan_slots.clear()

    def count_written(self, n: int):
        """Add ``n`` bytes to what this target wrote (its writers call it)."""
        with self._lock:
            self.bytes_written += n

    # ---------------------------------------------------------- reading

    def scan(self, rules=None, skip=()):
        # through the root's handle (/proc's link to it): the directory opened
        # at the start, whatever the path names now
        listing = scan(proc_path(self.base.fd), rules, skip=skip, collect_temps=True)
        listing.root = self.root
        return listing

    def lstat(self, rel: bytes):
        with self.base.at(rel) as (d, name):
            st = lstat_at(d, name or b".")
            if st is None:
                return None
            link = os.readlink(name, dir_fd=d) if stat.S_ISLNK(st.st_mode) else None
        return entry_from_stat(st, link)

    def _open_read(self, rel: bytes) -> int:
        return self.base.open(rel, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)

    def signature(self, rel: bytes, block_size: int, weak: bool):
        fd = self._open_read(rel)
        try:
            return fd_signature(fd, os.fstat(fd).st_size, block_size, weak)
        finally:
            os.close(fd)

    def digest(self, rel: bytes, length: int):
        """XXH3-128 of the file's content, or None if its length is not
        ``length`` (then it differs anyway)."""
        fd = self._open_read(rel)
        try:
            if os.fstat(fd).st_size != length:
                return None
            return fd_digest(fd, length)
        except MirrorError:
            return None
        finally:
            os.close(fd)

    def xattrs(self, rel: bytes) -> dict:
        if not self.use_xattrs:
            return {}
        with self.base.at(rel) as (d, name):
            return read_xattrs(proc_path(d, name), self.wanted_xattr)

    # ---------------------------------------------------------- writing

    def create_temp(self, rel: bytes) -> TempWriter:
        with self.base.at(rel) as (d, name):
            tname = temp_name()
            fd = os.open(tname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=d)
            return TempWriter(self, rel, os.dup(d), name, tname, fd)

    def open_inplace(self, rel: bytes) -> InplaceWriter:
        fd = self.base.open(rel, os.O_RDWR)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise MirrorError(f"{rel!r} on the target is not a regular file")
        return InplaceWriter(self, rel, fd)

    def mkdir(self, rel: bytes, entry: Entry):
        # owner-only until set_meta gives the final mode (after its contents)
        with self.base.at(rel) as (d, name):
            os.mkdir(name, 0o700, dir_fd=d)

    def rmdir(self, rel: bytes):
        """Remove the empty directory ``rel``."""
        with self.base.at(rel) as (d, name):
            os.rmdir(name, dir_fd=d)

    def _replace_with(self, rel: bytes, make):
        """Atomic replacement of ``rel`` (a file or symlink): ``make(dir_fd,
        temp_name)`` creates it, :func:`replace_at` renames it into place."""
        with self.base.at(rel) as (d, name):
            replace_at(d, name, lambda tname: make(d, tname))

    def symlink(self, rel: bytes, link: bytes):
        self._replace_with(rel, lambda d, tname: os.symlink(link, tname, dir_fd=d))

    def link(self, rel: bytes, existing: bytes):
        with self.base.at(existing) as (ed, ename):
            self._replace_with(rel, lambda d, tname: os.link(
                ename, tname, src_dir_fd=ed, dst_dir_fd=d, follow_symlinks=False))

    def mknod(self, rel: bytes, entry: Entry):
        self._replace_with(rel, lambda d, tname: os.mknod(tname, entry.mode, entry.rdev, dir_fd=d))

    def set_meta(self, rel: bytes, entry: Entry, xattrs=None):
        with self.base.at(rel) as (d, name):
            if entry.kind in (SYMLINK, SPECIAL):
                # a fifo or device is never opened (a fifo would block), a
                # symlink never followed: acted on by name in its directory
                if self.owner:
                    os.chown(name, entry.uid, entry.gid, dir_fd=d, follow_symlinks=False)
                if entry.kind == SPECIAL:
                    chmod_at(d, name, entry.perm)
                if xattrs is not None and self.use_xattrs and entry.kind == SPECIAL:
                    self._sync_xattrs(proc_path(d, name), xattrs)
                os.utime(name, ns=(self._now_ns, entry.mtime_ns), dir_fd=d, follow_symlinks=False)
                return
            fd = os.open(name or b".", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=d)
        try:
            self.apply_meta_fd(fd, entry, xattrs)
        finally:
            os.close(fd)

    def apply_meta_fd(self, fd: int, entry: Entry, xattrs=None):
        """Owner, mode, xattrs, then mtime (last: the others change ctime only)."""
        if self.owner:
            os.chown(fd, entry.uid, entry.gid)   # before chmod: chown clears setuid
        os.chmod(fd, entry.perm)
        if xattrs is not None and self.use_xattrs:
            self._sync_xattrs(fd, xattrs)
        os.utime(fd, ns=(self._now_ns, entry.mtime_ns))

    def _sync_xattrs(self, target, wanted: dict):
        """``target``: an fd, or a /proc path through a directory handle
        (never followed at its end)."""
        have = read_xattrs(target, self.wanted_xattr)
        follow = isinstance(target, int)
        kw = {} if follow else {"follow_symlinks": False}
        for name in have.keys() - wanted.keys():
            os.removexattr(target, name, **kw)
        for name, value in wanted.items():
            if have.get(name) != value:
                try:
                    os.setxattr(target, name, value, **kw)
                except OSError as exc:
                    if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                        self.use_xattrs = False   # filesystem has none: stop trying
                        return
                    raise

    def remove(self, rel: bytes):
        """Remove ``rel``, a directory with all it holds (never following a
        symlink)."""
        with self.base.at(rel) as (d, name):
            if not name:
                raise ConfinementError("the target root itself is never removed", rel)
            rmtree_at(d, name)

    def move_orphan(self, rel: bytes, dest_dir):
        """Move ``rel`` to ``dest_dir``/``rel`` (parents created 0700, an
        older orphan of the same name replaced). Symlinks move too: this is
        the mirror user's own directory, and nothing there is followed."""
        # here: fs.keep loads logging, which a quick check has no use for
        from smirror.fs.keep import move_aside, open_slot
        key = os.fsencode(os.path.abspath(os.fsencode(dest_dir)))
        slot = self._orphan_slots.get(key)
        if slot is None:
            slot = self._orphan_slots[key] = open_slot(key)
        move_aside(self.base, check_rel(rel), slot, "orphan", replace=True, symlinks=True)

    def remove_temps(self, rels):
        for rel in rels:
            if rel.rpartition(b"/")[2].startswith(TEMP_PREFIX):
                with self.base.at(rel) as (d, name):
                    rmtree_at(d, name)


class TempWriter:
    """A new file being written under a hidden temporary name in its
    directory (held by descriptor); ``commit`` gives it its metadata and
    renames it over the final name, ``abort`` removes it."""

    def __init__(self, target: LocalTarget, rel: bytes, dfd: int, name: bytes, tname: bytes,
                 fd: int):
        self.target = target
        self.rel = rel
        self.dfd = dfd            # the parent directory, owned by this writer
        self.name = name
        self.tname = tname
        self.fd = fd
        self._old_fd: int | None = None

    def copy_from(self, src_fd: int, size: int, progress=None, dense: bool = False) -> int:
        """Copy a whole source file (its data extents; holes stay holes).
        ``dense``: the source has no holes (see :func:`copy_data_extents`)."""
        n = copy_data_extents(src_fd, self.fd, size, progress, dense)
        if not (dense and n == size):
            # a trailing hole (or a source that shrank): set the length; a
            # dense copy to the end has it already (the temp file is new)
            os.ftruncate(self.fd, size)
        self.target.count_written(n)
        return n

    def write(self, data, offset: int) -> int:
        n = pwrite_all(self.fd, data, offset)
        self.target.count_written(n)
        return n

    def copy_old(self, offset: int, length: int, out_offset: int) -> int:
        """Copy bytes of the file currently under the final name (a rolling
        delta's COPY op) into the new file."""
        old_fd = self._old_fd
        if old_fd is None:
            old_fd = self._old_fd = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                                            | os.O_NONBLOCK, dir_fd=self.dfd)
        n = copy_range(old_fd, self.fd, offset, length, out_offset)
        if n != length:
            raise MirrorError(f"{self.rel!r} on the target shrank during the update")
        self.target.count_written(n)
        return n

    def truncate(self, size: int):
        os.ftruncate(self.fd, size)

    def commit(self, entry: Entry, xattrs=None):
        try:
            self.target.apply_meta_fd(self.fd, entry, xattrs)
            if self.target.fsync:
                os.fsync(self.fd)
            try:
                os.rename(self.tname, self.name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
            except IsADirectoryError:
                # the final name became a directory since planning
                rmtree_at(self.dfd, self.name)
                os.rename(self.tname, self.name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
        except BaseException:
            self.abort()
            raise
        self._close()

    def abort(self):
        if self.dfd >= 0:
            try:
                rmtree_at(self.dfd, self.tname)
            except OSError:
                pass
        self._close()

    def _close(self):
        for fd in (self.fd, self._old_fd, self.dfd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fd = self.dfd = -1
        self._old_fd = None


class InplaceWriter:
    """An existing target file updated in place (aligned block writes)."""

    def __init__(self, target: LocalTarget, rel: bytes, fd: int):
        self.target = target
        self.rel = rel
        self.fd = fd

    def write(self, data, offset: int) -> int:
        n = pwrite_all(self.fd, data, offset)
        self.target.count_written(n)
        return n

    def truncate(self, size: int):
        os.ftruncate(self.fd, size)

    def commit(self, entry: Entry, xattrs=None):
        try:
            self.target.apply_meta_fd(self.fd, entry, xattrs)
            if self.target.fsync:
                os.fsync(self.fd)
        finally:
            self._close()

    def abort(self):
        """Give up: mark the file stale (mtime 0) so the next quick check
        does not take a partly updated file for an up-to-date one."""
        try:
            if self.fd >= 0:
                os.utime(self.fd, ns=(0, 0))
        finally:
            self._close()

    def _close(self):
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


__all__ = ["LocalTarget", "TempWriter", "InplaceWriter"]
