"""Recursive inotify watcher: turns the kernel's per-directory events into
tree events with paths relative to the watched root.

* new directories are watched as they appear, and what was created in them
  before the watch existed is reported by a scan (no lost files);
* a rename inside the tree stays one MOVED event (IN_MOVED_FROM/TO paired by
  cookie), a rename out of the tree is a DELETED, into it a CREATED;
* a queue overflow, a failed watch (the per-user watch limit) or a watch
  lost on an unmounted directory is a RESCAN event naming the subtree that
  may have changed unseen: the capture layer runs a checksum difference
  mirror of it, so nothing is lost silently;
* a directory that cannot be watched or listed for a passing reason
  (EMFILE, ENOMEM, ...: not gone, not the watch limit) is held
  (``lookups_held``) and tried again every RETRY_WAIT seconds; once it
  is watched and listed, a RESCAN of it covers what was missed. The log
  says so once per run of failures.

inotify is reached through ctypes: it is three libc calls, not worth a
dependency.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import struct
import time
from dataclasses import dataclass
from enum import Enum

from smirror.capture.readloop import EventReadLoop
from smirror.errors import WatchError  # re-exported: callers catch inotify.WatchError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]

IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x1, 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_UNMOUNT, IN_Q_OVERFLOW, IN_IGNORED = 0x2000, 0x4000, 0x8000
IN_ONLYDIR, IN_DONT_FOLLOW, IN_EXCL_UNLINK, IN_ISDIR = 0x01000000, 0x02000000, 0x04000000, 0x40000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC

WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO
              | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
              | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK)
_EVENT = struct.Struct("iIII")
# how long an IN_MOVED_FROM waits for its IN_MOVED_TO before it counts as a
# move out of the tree; the kernel queues the pair back to back, so this
# only matters when a read splits them
MOVE_PAIR_WAIT = 0.02
# seconds between tries of the directories a passing failure left unwatched
# or unlisted
RETRY_WAIT = 0.5

log = logging.getLogger("smirror.capture.inotify")


# Event.reason of a DELETED that is a move out of the tree (or to an excluded
# name): connections that ignore deletes still apply it
MOVED_OUT = "moved out of the set"


class Kind(Enum):
    CREATED = "created"      # path appeared (file, dir, symlink, ...); is_dir says which
    MODIFIED = "modified"    # file content written
    CLOSED = "closed"        # a writer closed the file: a good moment to diff it
    ATTRIB = "attrib"        # mode, owner, times, xattrs or link count changed
    DELETED = "deleted"      # path removed (or moved out of the tree)
    MOVED = "moved"          # path -> new_path, both inside the tree
    RESCAN = "rescan"        # events may have been lost under path ("" = whole tree)


@dataclass(frozen=True)
class Event:
    kind: Kind
    path: bytes              # relative to the root, b"" is the root itself
    is_dir: bool = False
    new_path: bytes | None = None
    reason: str = ""         # for RESCAN: why; for DELETED: MOVED_OUT or ""
    # for DELETED (fanotify): (st_dev, st_ino) of a file that other names
    # keep alive; a write through the name gone is theirs to send
    ino: tuple | None = None


# a lookup or listing that failed with one of these says its directory is
# gone (or replaced); any other errno (EMFILE, ENFILE, ENOMEM, EINTR, ...)
# says nothing about it: it is a passing failure, to be tried again
GONE_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ESTALE})


def list_dir(path: bytes | int, rel: bytes, exclude) -> list[tuple[bytes, bool]]:
    """(relative path, is a directory) of the entries of the directory
    ``rel`` at ``path`` (or open as the descriptor ``path``) that
    ``exclude`` keeps; [] when it is gone (meanwhile: its event follows).
    A failure that does not say it is gone (GONE_ERRNOS: EMFILE, ENOMEM,
    ...) raises its OSError: it is not empty, the caller tries again
    later. Symlinks are not followed."""
    try:
        with os.scandir(path) as it:
            entries: list[os.DirEntry] = list(it)
    except OSError as exc:
        if exc.errno not in GONE_ERRNOS:
            raise
        return []
    out = []
    for entry in entries:
        # (listed through a descriptor, names come as str)
        child = join_rel(rel, os.fsencode(entry.name))
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        if exclude is None or not exclude(child, is_dir):
            out.append((child, is_dir))
    return out


def join_rel(parent: bytes, name: bytes) -> bytes:
    """``name`` in the directory ``parent`` (both relative to the root; b"" is the root)."""
    return name if not parent else parent + b"/" + name


class Watcher(EventReadLoop):
    """Watches ``root`` recursively. ``read(timeout)`` returns the events that
    are ready (an empty list after ``timeout`` seconds without any)."""

    backend = "inotify"

    def __init__(self, root, *, exclude=None, buffer_size: int = 1 << 20):
        self.root = os.fsencode(os.path.abspath(root))
        self.exclude = exclude           # callable(relpath: bytes, is_dir) -> bool
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            e = ctypes.get_errno()
            raise WatchError(e, f"inotify_init1 failed: {os.strerror(e)} "
                                "(too many inotify instances? see fs.inotify.max_user_instances)")
        self._buf = bytearray(buffer_size)
        self._wd_path: dict[int, bytes] = {}
        self._path_wd: dict[bytes, int] = {}
        self._pending_from: dict[int, tuple[bytes, bool, float]] = {}  # cookie -> (path, is_dir, t)
        self._out: list[Event] = []
        self.watch_failures = 0
        self.overflows = 0
        # directories a passing failure left unwatched or unlisted -> why;
        # tried again at _retry_at
        self._held: dict[bytes, str] = {}
        self._retry_at = 0.0
        self._watch_tree(b"")

    # -- watches -----------------------------------------------------------
    @property
    def pending_moves(self) -> int:
        """Rename halves (IN_MOVED_FROM) still waiting for their pair."""
        return len(self._pending_from)

    @property
    def watched_dirs(self) -> int:
        return len(self._wd_path)

    @property
    def lookups_held(self) -> int:
        """Directories held after a passing failure to watch or list them."""
        return len(self._held)

    def _abs(self, rel: bytes) -> bytes:
        return self.root if not rel else self.root + b"/" + rel

    def _add_watch(self, rel: bytes) -> bool:
        wd = _libc.inotify_add_watch(self.fd, self._abs(rel), WATCH_MASK)
        if wd < 0:
            e = ctypes.get_errno()
            if e in (errno.ENOENT, errno.ENOTDIR):
                return False                      # gone (or replaced) meanwhile: its DELETE follows
            if e not in (errno.ENOSPC, errno.EACCES):     # (the limit, a directory not ours)
                self._hold(rel, f"cannot watch it: {os.strerror(e)}")
                return False
            self.watch_failures += 1
            why = ("inotify watch limit reached (raise fs.inotify.max_user_watches)"
                   if e == errno.ENOSPC else f"inotify_add_watch failed: {os.strerror(e)}")
            self._out.append(Event(Kind.RESCAN, rel, True, reason=why))
            return False
        old = self._wd_path.get(wd)
        if old is not None and old != rel:        # same inode seen again under a new name
            self._path_wd.pop(old, None)
        self._wd_path[wd] = rel
        self._path_wd[rel] = wd
        return True

    def _watch_tree(self, rel: bytes, report: bool = False) -> None:
        """Watch ``rel`` and every directory below it; with ``report``, emit
        CREATED for everything found (it appeared before the watch did)."""
        stack = [rel]
        while stack:
            d = stack.pop()
            if not self._add_watch(d):
                continue
            try:
                entries = list_dir(self._abs(d), d, self.exclude)
            except OSError as exc:
                self._hold(d, f"cannot list it: {os.strerror(exc.errno or 0)}")
                continue
            for child, is_dir in entries:
                if report:
                    self._out.append(Event(Kind.CREATED, child, is_dir))
                if is_dir:
                    stack.append(child)

    def _forget_tree(self, rel: bytes) -> None:
        prefix = rel + b"/"
        for path in [p for p in self._path_wd if p == rel or p.startswith(prefix)]:
            self._wd_path.pop(self._path_wd.pop(path), None)
        for path in [p for p in self._held if p == rel or p.startswith(prefix)]:
            del self._held[path]

    def _rename_tree(self, old: bytes, new: bytes) -> None:
        prefix = old + b"/"
        for path in [p for p in self._path_wd if p == old or p.startswith(prefix)]:
            wd = self._path_wd.pop(path)
            moved = new + path[len(old):]
            self._path_wd[moved] = wd
            self._wd_path[wd] = moved
        for path in [p for p in self._held if p == old or p.startswith(prefix)]:
            self._held[new + path[len(old):]] = self._held.pop(path)

    # -- directories held after a passing failure -------------------------------
    def _hold(self, rel: bytes, why: str) -> None:
        """``rel`` could not be watched or listed for a passing reason: its
        events (or what it held when it came) are not seen; tried again
        from _after_wait until it works, then rescanned."""
        self.watch_failures += 1
        if not self._held:
            log.warning("%s: %s %s; it is tried again every %.1f s and rescanned once it works",
                        os.fsdecode(self.root), os.fsdecode(rel) or "the root", why, RETRY_WAIT)
            self._retry_at = time.monotonic() + RETRY_WAIT
        self._held[rel] = why

    def _retry_held(self) -> None:
        """Watch and list the held directories again (the highest first: the
        walk of one covers those below it); each that works is a RESCAN."""
        held, self._held = self._held, {}
        done: list[bytes] = []
        for rel in sorted(held, key=lambda p: p.count(b"/")):
            if any(rel == d or rel.startswith(d + b"/") or not d for d in done):
                continue
            if not os.path.isdir(self._abs(rel)):
                continue                # gone or replaced: its event said so
            self._watch_tree(rel)
            if rel not in self._held:
                done.append(rel)
                self._out.append(Event(Kind.RESCAN, rel, True,
                                       reason=f"events held: {held[rel]}"))
        if self._held:
            self._retry_at = time.monotonic() + RETRY_WAIT
        else:
            log.info("%s: the held directories are watched again", os.fsdecode(self.root))

    # -- events: read() and its loop are EventReadLoop's ------------------------
    def _next_wait(self, now: float) -> float | None:
        """A rename half waiting for its pair is not returned until it is
        paired or has waited MOVE_PAIR_WAIT: wake up for that, and for the
        next try of the held directories."""
        waits = [self._retry_at - now] if self._held else []
        if self._pending_from:
            oldest = min(t for _, _, t in self._pending_from.values())
            waits.append(oldest + MOVE_PAIR_WAIT - now)
        return max(0.0, min(waits)) if waits else None

    def _after_wait(self) -> None:
        self._expire_moves()
        if self._held and time.monotonic() >= self._retry_at:
            self._retry_held()

    def _parse(self, data: memoryview) -> None:
        pos = 0
        while pos + _EVENT.size <= len(data):
            wd, mask, cookie, length = _EVENT.unpack_from(data, pos)
            name = bytes(data[pos + _EVENT.size: pos + _EVENT.size + length]).rstrip(b"\0")
            pos += _EVENT.size + length
            self._handle(wd, mask, cookie, name)

    def _handle(self, wd: int, mask: int, cookie: int, name: bytes) -> None:
        if mask & IN_Q_OVERFLOW:
            self.overflows += 1
            self._pending_from.clear()
            self._out.append(Event(Kind.RESCAN, b"", True, reason="inotify event queue overflowed"))
            return
        if self._pending_from and not mask & IN_MOVED_TO:
            # the kernel queues a rename's two halves back to back: anything
            # else in between means the FROM had no TO (moved out of the tree)
            self._expire_moves(force=True)
        parent = self._wd_path.get(wd)
        if parent is None:
            return                              # a watch we dropped already
        if mask & (IN_IGNORED | IN_UNMOUNT) or (mask & (IN_DELETE_SELF | IN_MOVE_SELF) and not name):
            self._watch_event(wd, mask, parent, name)
            return
        is_dir = bool(mask & IN_ISDIR)
        path = join_rel(parent, name)
        if self.exclude is not None and name and self.exclude(path, is_dir):
            # a rename from an excluded name into the set still counts below
            if not mask & (IN_MOVED_FROM | IN_MOVED_TO):
                return
        if mask & IN_MOVED_FROM:
            self._pending_from[cookie] = (path, is_dir, time.monotonic())
            return
        if mask & IN_MOVED_TO:
            self._moved_to(path, is_dir, cookie)
            return
        if mask & IN_CREATE:
            self._created(path, is_dir)
        elif mask & IN_DELETE:
            self._deleted(path, is_dir)
        elif mask & IN_CLOSE_WRITE:
            self._out.append(Event(Kind.CLOSED, path, is_dir))
        elif mask & IN_MODIFY:
            self._out.append(Event(Kind.MODIFIED, path, is_dir))
        elif mask & IN_ATTRIB:
            self._out.append(Event(Kind.ATTRIB, path, is_dir))

    def _watch_event(self, wd: int, mask: int, parent: bytes, name: bytes) -> None:
        """An event about a watch itself, not about an entry of its directory."""
        if mask & IN_IGNORED:
            if self._path_wd.get(parent) == wd:
                self._path_wd.pop(parent, None)
            self._wd_path.pop(wd, None)
            return
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF) and not name:
            if parent == b"" and mask & IN_DELETE_SELF:
                self._out.append(Event(Kind.RESCAN, b"", True, reason="the watched root was deleted"))
            return                              # the parent's event names the change
        if mask & IN_UNMOUNT:
            self._out.append(Event(Kind.RESCAN, parent, True, reason="filesystem unmounted"))

    def _moved_to(self, path: bytes, is_dir: bool, cookie: int) -> None:
        """The second half of a rename (or a move into the tree)."""
        src = self._pending_from.pop(cookie, None)
        excluded_new = self.exclude is not None and self.exclude(path, is_dir)
        if src is None:                     # moved in from outside the tree
            if not excluded_new:
                self._created(path, is_dir)
            return
        old, _, _ = src
        excluded_old = self.exclude is not None and self.exclude(old, is_dir)
        if excluded_old and excluded_new:
            return
        if excluded_old:
            self._created(path, is_dir)
        elif excluded_new:
            self._deleted(old, is_dir, MOVED_OUT)
        else:
            if is_dir:
                self._rename_tree(old, path)    # (also what is held below it)
                # and watch what below it is not watched yet: renamed before
                # its watch was set (created and moved at once), or while a
                # walk listed it or a directory above it (the walk's watches
                # of its subdirectories, by their old paths, failed: events
                # there were never seen)
                self._watch_tree(path)
            self._out.append(Event(Kind.MOVED, old, is_dir, new_path=path))

    def _created(self, path: bytes, is_dir: bool) -> None:
        self._out.append(Event(Kind.CREATED, path, is_dir))
        if is_dir:
            self._watch_tree(path, report=True)

    def _deleted(self, path: bytes, is_dir: bool, reason: str = "") -> None:
        if is_dir:
            self._forget_tree(path)
        self._out.append(Event(Kind.DELETED, path, is_dir, reason=reason))

    def _expire_moves(self, force: bool = False) -> None:
        """An IN_MOVED_FROM without its pair is a move out of the tree."""
        now = time.monotonic()
        for cookie, (path, is_dir, t) in list(self._pending_from.items()):
            if force or now - t >= MOVE_PAIR_WAIT:
                del self._pending_from[cookie]
                if not (self.exclude is not None and self.exclude(path, is_dir)):
                    self._deleted(path, is_dir, MOVED_OUT)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
