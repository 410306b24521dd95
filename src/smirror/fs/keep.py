"""Where a target puts what it takes out of a map base without deleting it:
orphans moved aside by a mirror's orphan policy (``orphans = move``) and
files the source deleted on a connection whose deletes are ignored, when
the target is configured to move them (``[target] ignored_deletes =
"move"``; purged after ``deleted_keep_days``).

Both directories are the target daemon's choice (``[target] orphans_dir``,
``deleted_dir``), never the source's, and so is whether anything is moved at
all: an op touches nothing outside its map base except these two places its
own administrator named. Layout::

    DIR/<source id>-<conid>/<path relative to the map base>

Each slot ``DIR/<source id>-<conid>`` is created 0700 (its parents too) and
opened once as a directory handle (:class:`~smirror.fs.beneath.Beneath`). A
move resolves the parent of the path beneath the map base's handle and the
parent of its place in the slot beneath the slot's handle (created by a
mkdir walk that refuses symlinks), and renames between the two descriptors:
no path of either side is ever followed. A symlink is never moved into a
slot: it stays where it is in the map base (logged; nothing follows it
there). A directory is moved entry by entry for the same reason. Purging
walks the slot from its descriptor, never following a symlink.

A name already taken there gets a ``.YYYYmmddTHHMMSS`` suffix (and a counter).
Deleted files are purged by the time they were moved (their ctime).
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import time

from smirror.errors import ConfinementError
from smirror.fs.beneath import Beneath, lstat_at, makedirs_at, open_subdir, rmtree_at
from smirror.fs.files import copy_range

log = logging.getLogger("smirror.fs.keep")

_PURGE_EVERY = 3600.0


def _makedirs_private(path: bytes) -> None:
    """``path`` and its missing parents, each created 0700."""
    missing = []
    p = path
    while p and not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass


def open_slot(path) -> Beneath:
    """The directory handle of a keep slot (or a mirror's orphan
    directory), created 0700 with its parents when missing."""
    path = os.fsencode(os.path.abspath(os.fsencode(path)))
    _makedirs_private(path)
    return Beneath(path)


def move_aside(base: Beneath, rel: bytes, slot: Beneath, what: str, *,
               replace: bool = False, who: str = "", symlinks: bool = False) -> bytes | None:
    """Move ``rel`` from beneath ``base`` to the same relative place beneath
    ``slot``; returns the name it got there (``rel``, or with a suffix when
    that was taken; ``replace``: the older one is removed instead), or None
    when there was nothing to move or it is a symlink (which stays, unless
    ``symlinks``: a local mirror's own orphan directory, where moving one is
    harmless since nothing is followed there either).
    ConfinementError when ``rel`` is refused in either tree."""
    parent, _, name = rel.rpartition(b"/")
    with base.at(rel) as (sd, sname):
        st = lstat_at(sd, sname)
        if st is None:
            return None                                 # replayed after a restart
        if stat.S_ISLNK(st.st_mode) and not symlinks:
            log.warning("%s%s %r is a symlink: left in the map base, never moved into %r",
                        who, what, os.fsdecode(rel), os.fsdecode(slot.root))
            return None
        dd = makedirs_at(slot.fd, parent)
        try:
            dname = name
            if lstat_at(dd, dname) is not None:
                if replace:
                    rmtree_at(dd, dname)
                else:
                    stem = name + time.strftime(".%Y%m%dT%H%M%S").encode()
                    dname, n = stem, 1
                    while lstat_at(dd, dname) is not None:
                        dname, n = stem + b"~%d" % n, n + 1
            _move_entry(sd, sname, dd, dname, st, rel, who, symlinks)
        finally:
            os.close(dd)
    return parent + b"/" + dname if parent else dname


def _move_entry(sd: int, sname: bytes, dd: int, dname: bytes, st, rel: bytes, who: str,
                symlinks: bool = False) -> None:
    """Move one entry between two directory descriptors. A directory is
    recreated in the slot and its entries moved one by one (a symlink in
    it stays behind, so the directory stays too), unless symlinks may move
    (then it is renamed whole where it can be)."""
    if stat.S_ISDIR(st.st_mode) and symlinks:
        try:
            os.rename(sname, dname, src_dir_fd=sd, dst_dir_fd=dd)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(dname, 0o700, dir_fd=dd)
        src = open_subdir(sd, sname)
        try:
            dst = open_subdir(dd, dname)
            try:
                for entry in os.listdir(src):
                    e = os.fsencode(entry)
                    est = lstat_at(src, e)
                    if est is None:
                        continue
                    if stat.S_ISLNK(est.st_mode) and not symlinks:
                        log.warning("%ssymlink %r stays in the map base: never moved into a "
                                    "keep directory", who, os.fsdecode(rel + b"/" + e))
                        continue
                    _move_entry(src, e, dst, e, est, rel + b"/" + e, who, symlinks)
                os.chmod(dst, stat.S_IMODE(st.st_mode) & 0o777)
                if os.geteuid() == 0:
                    os.chown(dst, st.st_uid, st.st_gid)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        try:
            os.rmdir(sname, dir_fd=sd)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise
        return
    try:
        os.rename(sname, dname, src_dir_fd=sd, dst_dir_fd=dd)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_out(sd, sname, dd, dname, st, rel, who)     # the slot is on another filesystem


def _copy_out(sd: int, sname: bytes, dd: int, dname: bytes, st, rel: bytes, who: str) -> None:
    """A regular file copied into the slot, then removed from the map base
    (other kinds stay where they are, logged)."""
    if not stat.S_ISREG(st.st_mode):
        log.warning("%s%r is not a regular file and the keep directory is on another "
                    "filesystem: left in the map base", who, os.fsdecode(rel))
        return
    src = os.open(sname, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=sd)
    try:
        dst = os.open(dname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=dd)
        try:
            size = os.fstat(src).st_size
            copy_range(src, dst, 0, size, 0)
            if os.geteuid() == 0:
                os.fchown(dst, st.st_uid, st.st_gid)
            os.fchmod(dst, stat.S_IMODE(st.st_mode) & 0o777)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dst)
    finally:
        os.close(src)
    os.unlink(sname, dir_fd=sd)


class KeepDirs:
    def __init__(self, orphans_dir, deleted_dir):
        self.orphans_dir = os.fsencode(os.path.abspath(orphans_dir))
        self.deleted_dir = os.fsencode(os.path.abspath(deleted_dir))
        self._last_purge: dict[bytes, float] = {}
        self._slots: dict[bytes, Beneath] = {}

    @staticmethod
    def _slot_path(base: bytes, tc) -> bytes:
        return base + b"/" + os.fsencode(f"{tc.source or 'local'}-{tc.conid}")

    def _slot(self, path: bytes) -> Beneath:
        """The slot's handle, opened (and created) once; again only when the
        administrator removed or replaced the directory (a handle of a
        removed directory would take no file)."""
        slot = self._slots.get(path)
        if slot is not None:
            held = os.fstat(slot.fd)
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_ino, now.st_dev) != (held.st_ino, held.st_dev):
                slot.close()
                slot = None
        if slot is None:
            slot = self._slots[path] = open_slot(path)
        return slot

    def move_orphan(self, tc, rel: bytes) -> bool:
        return self._move(tc, rel, self._slot_path(self.orphans_dir, tc), "orphan")

    def move_deleted(self, tc, rel: bytes, is_dir: bool, keep_days: float) -> bool:
        slot = self._slot_path(self.deleted_dir, tc)
        if is_dir:
            # its files were moved one by one before: the directory goes if empty
            try:
                with tc.applier.base.at(rel) as (d, name):
                    if name:
                        os.rmdir(name, dir_fd=d)
            except (OSError, ValueError):
                pass
            moved = False
        else:
            moved = self._move(tc, rel, slot, "deleted file")
        if keep_days:
            self.purge(slot, keep_days)
        return moved

    def _move(self, tc, rel: bytes, slot_path: bytes, what: str) -> bool:
        who = f"connection {tc.conid}: "
        try:
            tc.applier.release(rel)
            dest = move_aside(tc.applier.base, rel, self._slot(slot_path), what, who=who)
        except (ConfinementError, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                return False                            # its directory is gone: nothing to move
            log.error("%s%s %r not moved: %s", who, what, rel, exc)
            return False
        if dest is None:
            return False
        log.info("%s%s %r moved to %r", who, what, rel, os.fsdecode(slot_path + b"/" + dest))
        return True

    def purge(self, slot, keep_days: float, force: bool = False) -> int:
        """Remove what was moved into ``slot`` (its path) more than
        ``keep_days`` ago, walking it from its handle without following
        any symlink."""
        slot = os.fsencode(slot)
        now = time.time()
        if not force and now - self._last_purge.get(slot, 0.0) < _PURGE_EVERY:
            return 0
        self._last_purge[slot] = now
        if not os.path.isdir(slot):
            return 0
        limit = now - keep_days * 86400
        fd = open_subdir(self._slot(slot).fd, b".")
        try:
            removed = _purge_dir(fd, limit)
        finally:
            os.close(fd)
        if removed:
            log.info("purged %d deleted file(s) older than %g days from %r", removed, keep_days,
                     os.fsdecode(slot))
        return removed

    def close(self) -> None:
        for slot in self._slots.values():
            slot.close()
        self._slots.clear()


def _purge_dir(fd: int, limit: float) -> int:
    """Remove entries older than ``limit`` (ctime) under the directory
    ``fd``, and the directories emptied by it; returns files removed."""
    removed = 0
    for entry in os.listdir(fd):
        name = os.fsencode(entry)
        st = lstat_at(fd, name)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = open_subdir(fd, name)
            except OSError:
                continue                    # swapped meanwhile: never followed
            try:
                removed += _purge_dir(sub, limit)
            finally:
                os.close(sub)
            try:
                os.rmdir(name, dir_fd=fd)   # empty now
            except OSError:
                pass
        elif st.st_ctime < limit:
            try:
                os.unlink(name, dir_fd=fd)
                removed += 1
            except OSError:
                pass
    return removed
