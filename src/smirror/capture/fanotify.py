"""fanotify watcher: one filesystem mark instead of a watch per directory, so
a tree of any size is watched at the cost of one walk that notes each
directory's file handle (no kernel object per directory, no
fs.inotify.max_user_watches limit). It yields the same tree events as
:class:`smirror.capture.inotify.Watcher`, with paths relative to the root.

What it needs, checked when it starts (:class:`FanotifyUnavailable` says
which is missing):

* CAP_SYS_ADMIN (a filesystem mark sees the whole filesystem);
* Linux >= 5.17: ``FAN_REPORT_DFID_NAME_TARGET`` and ``FAN_RENAME``. Older
  kernels (5.9-5.16) have ``FAN_REPORT_DFID_NAME`` but are not used: their
  MOVED_FROM/MOVED_TO carry no cookie, so the halves of a rename cannot be
  paired, and without the child's file handle the kernel merges events on
  one directory entry name across a rename (write f, rename f->g, create f:
  the new f's CREATE lands before the rename), which would send the wrong
  content under the wrong name. With the child's handle the kernel only
  merges events on the same inode under the same name, so an event merged
  into an earlier one still names what it happened to;
* a filesystem whose file handles decode (open_by_handle_at), and no other
  mount inside the root (the mark covers one filesystem; mounts made inside
  the root after the start are not seen either).

How events become tree events:

* each event names its directory by file handle; ``_dirs`` maps a
  directory's handle to (parent handle, name), built by the start-up walk
  and kept in event order from the CREATE, DELETE and RENAME events (they
  carry the child's handle), so a path is the path at the moment of the
  event, as with inotify's watch descriptors. A directory rename is one
  entry changed, whatever is below it;
* a handle not in the map is resolved once (open_by_handle_at, then
  readlink of /proc/self/fd/N): outside the root it goes into a bounded
  set of handles to skip (the mark sees the whole filesystem); inside the
  root it is a directory this watcher did not see arrive: when a directory
  rename later in the same read brings it in, the event happened outside
  and is skipped (the scan of the arrival reports the result); otherwise
  the highest directory above it that the map lacks is a RESCAN;
* a lookup that fails says where the directory is only when it says the
  directory is gone (ESTALE STALE_TRIES times in a row, ENOENT; ESTALE
  once is also what a decode racing a rename gets): skipped like one
  outside (a handle never names a directory made later). Any other
  failure (EMFILE, ENFILE, ENOMEM, EAGAIN, an errno not known here) says
  nothing: the handle is held (``lookups_held``), the events naming it
  are skipped, and it is looked up again, backing off up to RETRY_MAX,
  until the lookup works: inside the root, a RESCAN of it then brings
  everything below it in line. The walk that maps a subtree holds a
  directory it cannot list the same way, and a deleted file whose other
  names cannot be checked too. The log says so once per run of failures,
  not per event;
* FAN_RENAME reports both names in one event: inside to inside is MOVED,
  out of the tree DELETED, into it CREATED with a scan of what it holds;
* the kernel merges an event into a queued one on the same inode and name:
  a mask with both CREATE and DELETE is settled by looking at the
  directory now (is that name still that inode?);
* FAN_Q_OVERFLOW rebuilds the handle map and is a RESCAN of the whole tree,
  the path an inotify overflow takes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import struct
import tempfile
import time
from dataclasses import dataclass
from enum import Enum

from smirror.capture.inotify import GONE_ERRNOS, MOVED_OUT, Event, Kind, join_rel, list_dir
from smirror.capture.readloop import EventReadLoop
from smirror.errors import EventFormatError, FanotifyUnavailable

log = logging.getLogger("smirror.capture.fanotify")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]

# fanotify_init flags
FAN_CLOEXEC, FAN_NONBLOCK = 0x1, 0x2
FAN_CLASS_NOTIF = 0x0
FAN_UNLIMITED_QUEUE = 0x10
FAN_REPORT_FID, FAN_REPORT_DIR_FID, FAN_REPORT_NAME = 0x200, 0x400, 0x800
FAN_REPORT_TARGET_FID = 0x1000
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME
FAN_REPORT_DFID_NAME_TARGET = FAN_REPORT_DFID_NAME | FAN_REPORT_FID | FAN_REPORT_TARGET_FID
# fanotify_mark flags
FAN_MARK_ADD, FAN_MARK_FILESYSTEM = 0x1, 0x100
# event bits
FAN_MODIFY, FAN_ATTRIB, FAN_CLOSE_WRITE = 0x2, 0x4, 0x8
FAN_MOVED_FROM, FAN_MOVED_TO, FAN_CREATE, FAN_DELETE = 0x40, 0x80, 0x100, 0x200
FAN_DELETE_SELF, FAN_Q_OVERFLOW = 0x400, 0x4000
FAN_RENAME, FAN_EVENT_ON_CHILD, FAN_ONDIR = 0x10000000, 0x08000000, 0x40000000
# info record types
FAN_EVENT_INFO_TYPE_FID, FAN_EVENT_INFO_TYPE_DFID_NAME, FAN_EVENT_INFO_TYPE_DFID = 1, 2, 3
FAN_EVENT_INFO_TYPE_OLD_DFID_NAME, FAN_EVENT_INFO_TYPE_NEW_DFID_NAME = 10, 12
FANOTIFY_METADATA_VERSION = 3
AT_FDCWD = -100

# FAN_EVENT_ON_CHILD is implied by a filesystem mark; FAN_RENAME replaces the
# MOVED_FROM/MOVED_TO halves; FAN_DELETE_SELF is not needed, the DELETE of
# the root names the root's own handle
MARK_MASK = (FAN_CREATE | FAN_DELETE | FAN_RENAME | FAN_MODIFY | FAN_CLOSE_WRITE
             | FAN_ATTRIB | FAN_ONDIR)

_METADATA = struct.Struct("=IBBHQii")     # event_len, vers, reserved, metadata_len, mask, fd, pid
_INFO_HDR = struct.Struct("=BBH")         # info_type, pad, len
_FID = struct.Struct("=iiIi")             # fsid[2], handle_bytes, handle_type
_NAMED = (FAN_EVENT_INFO_TYPE_DFID_NAME, FAN_EVENT_INFO_TYPE_OLD_DFID_NAME,
          FAN_EVENT_INFO_TYPE_NEW_DFID_NAME)
MAX_HANDLE_SZ = 128
# handles of directories outside the root remembered to skip their events
# without a lookup; past this many the set starts over
OUTSIDE_CACHE_LIMIT = 1 << 16
# a handle that fails to decode with ESTALE (or is interrupted) is tried
# this many times in a row before ESTALE counts as gone: a decode that
# races a rename fails once, then finds the directory where it went
STALE_TRIES = 3
# handles held after a lookup failed for a passing reason; past this many
# they are dropped for a rescan of the whole tree once lookups work again
HELD_LIMIT = 4096
# held handles are looked up again after RETRY_FIRST seconds, then twice
# as long each time they still fail, up to RETRY_MAX
RETRY_FIRST, RETRY_MAX = 0.05, 2.0


def _why(exc: OSError) -> str:
    """What a failed call says, without the call's name."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


class Place(Enum):
    """Where a handle lookup found a directory."""
    INSIDE = "inside"
    OUTSIDE = "outside"
    GONE = "gone"


@dataclass(frozen=True)
class InfoRecord:
    type: int
    fsid: tuple[int, int]
    handle: bytes            # struct file_handle as the kernel lays it out
    name: bytes | None       # for the DFID_NAME types


@dataclass(frozen=True)
class RawEvent:
    mask: int
    pid: int
    records: tuple[InfoRecord, ...]

    def record(self, info_type: int) -> InfoRecord | None:
        for r in self.records:
            if r.type == info_type:
                return r
        return None


def parse_events(data, skip_pids=frozenset()) -> list[RawEvent]:
    """Parse a buffer read from a fanotify fd (a FID-reporting group).
    Every length is checked against the buffer: a bad one raises
    :class:`EventFormatError` naming it and its offset. The events of
    ``skip_pids`` that concern no directory (and no overflow) are left
    out unparsed: they cannot change the directory map."""
    data = memoryview(data).cast("B")
    out = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < _METADATA.size:
            raise EventFormatError(f"{end - pos} bytes left, less than the {_METADATA.size}-byte "
                                   "metadata", pos)
        event_len, vers, _, meta_len, mask, _fd, pid = _METADATA.unpack_from(data, pos)
        if vers != FANOTIFY_METADATA_VERSION:
            raise EventFormatError(f"metadata version {vers}, expected {FANOTIFY_METADATA_VERSION}",
                                   pos)
        if meta_len < _METADATA.size or meta_len > event_len:
            raise EventFormatError(f"metadata_len {meta_len} outside {_METADATA.size}..{event_len}",
                                   pos)
        if event_len > end - pos:
            raise EventFormatError(f"event_len {event_len} runs past the {end - pos} bytes left",
                                   pos)
        if pid not in skip_pids or mask & (FAN_ONDIR | FAN_Q_OVERFLOW):
            out.append(RawEvent(mask, pid, _parse_records(data, pos + meta_len, pos + event_len)))
        pos += event_len
    return out


def _parse_records(data: memoryview, pos: int, end: int) -> tuple[InfoRecord, ...]:
    records = []
    while pos < end:
        if end - pos < _INFO_HDR.size:
            raise EventFormatError(f"{end - pos} bytes left in the event, less than an info header",
                                   pos)
        info_type, _, length = _INFO_HDR.unpack_from(data, pos)
        if length < _INFO_HDR.size or length > end - pos:
            raise EventFormatError(f"info record length {length} outside "
                                   f"{_INFO_HDR.size}..{end - pos}", pos)
        if info_type in (FAN_EVENT_INFO_TYPE_FID, FAN_EVENT_INFO_TYPE_DFID) + _NAMED:
            body = pos + _INFO_HDR.size
            if length < _INFO_HDR.size + _FID.size:
                raise EventFormatError(f"fid record of {length} bytes, too short for fsid and "
                                       "file handle header", pos)
            fsid0, fsid1, hbytes, htype = _FID.unpack_from(data, body)
            hstart = body + _FID.size
            if hbytes > MAX_HANDLE_SZ or hstart + hbytes > pos + length:
                raise EventFormatError(f"file handle of {hbytes} bytes does not fit its "
                                       f"{length}-byte record", pos)
            handle = bytes(data[body + 8: hstart + hbytes])
            name = None
            if info_type in _NAMED:
                tail = bytes(data[hstart + hbytes: pos + length])
                nul = tail.find(b"\0")
                if nul < 0:
                    raise EventFormatError("name without its terminating NUL", pos)
                name = tail[:nul]
            records.append(InfoRecord(info_type, (fsid0, fsid1), handle, name))
        # other record types (pidfd, error, range, mnt) carry nothing used here
        pos += length
    return tuple(records)


def fanotify_init(flags: int, event_f_flags: int = os.O_RDONLY | os.O_CLOEXEC) -> int:
    fd = _libc.fanotify_init(flags, event_f_flags)
    if fd < 0:
        e = ctypes.get_errno()
        if e == errno.EPERM:
            why = "fanotify_init needs CAP_SYS_ADMIN"
        elif e == errno.EINVAL:
            why = (f"fanotify_init refused flags {flags:#x}: the kernel ({os.uname().release}) "
                   "lacks FAN_REPORT_TARGET_FID (Linux >= 5.17 needed)")
        elif e == errno.ENOSYS:
            why = "this kernel has no fanotify (CONFIG_FANOTIFY)"
        else:
            why = f"fanotify_init failed: {os.strerror(e)}"
        raise FanotifyUnavailable(e, why)
    return fd


def fanotify_mark(fd: int, flags: int, mask: int, path: bytes, dirfd: int = AT_FDCWD) -> None:
    if _libc.fanotify_mark(fd, flags, mask, dirfd, path) < 0:
        e = ctypes.get_errno()
        where = os.fsdecode(path)
        if e in (errno.EOPNOTSUPP, errno.ENODEV):
            why = f"the filesystem of {where} cannot report file handles to fanotify"
        elif e == errno.EXDEV:
            why = (f"{where} is on a subvolume or mount whose handles do not identify its "
                   "filesystem (a filesystem mark cannot be placed)")
        elif e == errno.EINVAL:
            why = f"fanotify_mark refused mask {mask:#x} on {where} (FAN_RENAME needs Linux >= 5.17)"
        elif e == errno.EPERM:
            why = "a filesystem mark needs CAP_SYS_ADMIN"
        else:
            why = f"fanotify_mark on {where} failed: {os.strerror(e)}"
        raise FanotifyUnavailable(e, why)


def name_to_handle(path: bytes, dirfd: int = AT_FDCWD) -> bytes:
    """The file handle of ``path`` (not following a final symlink), laid out
    like the handles fanotify reports."""
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    struct.pack_into("=I", buf, 0, MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(dirfd, path, buf, ctypes.byref(mount_id), 0) < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"name_to_handle_at: {os.strerror(e)}", os.fsdecode(path))
    n = struct.unpack_from("=I", buf, 0)[0]
    return buf.raw[: 8 + n]


def open_by_handle(mount_fd: int, handle: bytes, flags: int = os.O_PATH) -> int:
    fd = _libc.open_by_handle_at(mount_fd, handle, flags | os.O_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"open_by_handle_at: {os.strerror(e)}")
    return fd


def _open_group(root: bytes, unlimited_queue: bool = False) -> tuple[int, int, bytes]:
    """A fanotify group with a filesystem mark on the filesystem of ``root``:
    (fanotify fd, an fd of the root to decode handles against, the root's
    handle)."""
    flags = FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_DFID_NAME_TARGET
    if unlimited_queue:
        flags |= FAN_UNLIMITED_QUEUE
    fd = fanotify_init(flags)
    mount_fd = -1
    try:
        mount_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            root_handle = name_to_handle(root)
            os.close(open_by_handle(mount_fd, root_handle))
        except OSError as exc:
            raise FanotifyUnavailable(exc.errno, f"{os.fsdecode(root)}: file handles do not "
                                      f"work here ({exc.strerror})") from None
        fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, MARK_MASK, root)
    except BaseException:
        os.close(fd)
        if mount_fd >= 0:
            os.close(mount_fd)
        raise
    return fd, mount_fd, root_handle


def mounts_below(root: bytes) -> list[bytes]:
    """Mount points strictly inside ``root`` (from /proc/self/mountinfo)."""
    prefix = root.rstrip(b"/") + b"/"
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split(b" ")
        if len(fields) > 4:
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
            if point.startswith(prefix):
                out.append(point)
    return out


def _check_no_mounts_below(root: bytes) -> None:
    # the mark is on one filesystem, and handles name a directory within one
    # filesystem only: a mount inside the set would go unseen
    inner = mounts_below(root)
    if inner:
        raise FanotifyUnavailable(errno.EXDEV, f"{os.fsdecode(inner[0])} is mounted inside "
                                  f"{os.fsdecode(root)}: one filesystem mark does not see it")


def unavailable_reason(root=None) -> str | None:
    """Why fanotify cannot watch ``root`` here, None when it can; without
    ``root``, a fresh directory in the temporary directory is tried."""
    if root is None:
        probe = tempfile.mkdtemp(prefix="smirror-fanotify-probe-")
        try:
            return unavailable_reason(probe)
        finally:
            os.rmdir(probe)
    root = os.fsencode(os.path.realpath(root))
    try:
        _check_no_mounts_below(root)
        fd, mount_fd, _ = _open_group(root)
    except FanotifyUnavailable as exc:
        return exc.strerror
    os.close(fd)
    os.close(mount_fd)
    return None


class Watcher(EventReadLoop):
    """Watches ``root`` with a fanotify filesystem mark. The interface is
    :class:`smirror.capture.inotify.Watcher`'s: ``read(timeout)`` returns the tree
    events that are ready."""

    backend = "fanotify"
    pending_moves = 0            # FAN_RENAME carries both names: nothing waits for a pair

    def __init__(self, root, *, exclude=None, buffer_size: int = 1 << 20,
                 unlimited_queue: bool = False, ignore_pids=()):
        """``ignore_pids``: processes whose changes are not reported (the
        capture mount's own writes to its backing directory); the directory
        map still follows them."""
        self.ignore_pids = frozenset(ignore_pids)
        # readlink of a handle gives the real path: compare against the real root
        self.root = os.fsencode(os.path.realpath(root))
        self.exclude = exclude
        self.fd = self._mount_fd = -1
        _check_no_mounts_below(self.root)
        self.fd, self._mount_fd, self._root_handle = _open_group(self.root, unlimited_queue)
        self._buf = bytearray(buffer_size)
        self._dirs: dict[bytes, tuple[bytes | None, bytes]] = {}
        self._outside: set[bytes] = set()
        # handles whose lookup failed for a passing reason -> is a directory
        # (else a deleted file whose other names are not known): looked up
        # again at _retry_at, their events skipped until then
        self._held: dict[bytes, bool] = {}
        self._retry_at = 0.0
        self._retry_wait = RETRY_FIRST
        self._retrying = False
        self._out: list[Event] = []
        self._batch: list[RawEvent] | tuple = ()    # the events of the read being handled
        self._batch_pos = 0
        self.overflows = 0
        self.format_errors = 0       # reads whose records did not parse
        self.handle_lookups = 0      # handles resolved through open_by_handle_at
        # lookups (or listings) that failed for a passing reason; the name
        # says what it counts for inotify: directories not followed for a
        # while, rescanned once they are
        self.watch_failures = 0
        self.lookup_error = ""       # the last such failure (the log says it too)
        try:
            self._map_tree(b"")
        except BaseException:
            self.close()
            raise

    # -- the directory map ----------------------------------------------------
    @property
    def watched_dirs(self) -> int:
        return len(self._dirs)

    @property
    def lookups_held(self) -> int:
        """Handles held after a lookup failed for a passing reason."""
        return len(self._held)

    def _abs(self, rel: bytes) -> bytes:
        return self.root if not rel else self.root + b"/" + rel

    def _map_tree(self, rel: bytes, report: bool = False) -> None:
        """Note the handle of ``rel`` and of every directory below it; with
        ``report``, emit CREATED for everything found (moved in)."""
        if not rel:
            self._dirs.clear()
            handle = self._root_handle
            self._dirs[handle] = (None, b"")
        else:
            try:
                handle = name_to_handle(self._abs(rel))
                parent = name_to_handle(self._abs(rel.rpartition(b"/")[0]))
            except OSError as exc:
                if exc.errno not in GONE_ERRNOS:
                    # no handle to hold: the whole tree is looked at again
                    self._hold(self._root_handle, True, exc, rel)
                return                        # gone meanwhile: its event follows
            self._dirs[handle] = (parent, rel.rpartition(b"/")[2])
        # each directory is listed through its handle, never its path: one
        # renamed while the walk runs (it was listed under its old name) is
        # still listed, and its children's handles are taken relative to it.
        # By path, its subtree went unmapped, and events there were skipped
        stack = [(rel, handle)]
        while stack:
            d, dh = stack.pop()
            try:
                self._map_dir(d, dh, report, stack)
            except OSError as exc:
                if exc.errno not in GONE_ERRNOS:
                    # not listed (so not reported): held, and rescanned
                    # once it can be
                    self._hold(dh, True, exc, d)
                # else gone meanwhile: its event follows

    def _map_dir(self, d: bytes, dh: bytes, report: bool, stack: list) -> None:
        """List the directory ``d`` (handle ``dh``) for _map_tree: its
        subdirectories go on ``stack``. A passing failure raises."""
        dfd = self._open_handle(dh, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for child, is_dir in list_dir(dfd, d, self.exclude):
                if report:
                    self._out.append(Event(Kind.CREATED, child, is_dir))
                if is_dir:
                    name = child.rpartition(b"/")[2]
                    try:
                        ch = name_to_handle(name, dfd)
                    except OSError as exc:
                        if exc.errno not in GONE_ERRNOS:
                            self._hold(dh, True, exc, d)     # the listing again, later
                        continue
                    self._dirs[ch] = (dh, name)
                    stack.append((child, ch))
        finally:
            os.close(dfd)

    def _mapped_path(self, handle: bytes, chain: list[bytes] | None = None) -> bytes | None:
        """The path the map gives ``handle``, None when the map does not
        lead from it to the root (``chain`` collects the handles passed)."""
        parts: list[bytes] = []
        h = handle
        for _ in range(4096):
            node = self._dirs.get(h)
            if node is None:
                return None
            parent, name = node
            if parent is None:
                return b"/".join(reversed(parts))
            parts.append(name)
            if chain is not None:
                chain.append(h)
            h = parent
        return None

    def _path_of(self, handle: bytes) -> bytes | None:
        """The path (relative to the root) of the directory ``handle`` names,
        None when it is outside the root or excluded."""
        chain: list[bytes] = []
        path = self._mapped_path(handle, chain)
        if path is not None:
            return path
        # an ancestor left the tree (or its entry was dropped): what hung
        # below it is stale
        for h in chain:
            self._dirs.pop(h, None)
        if handle in self._outside or handle in self._held:
            return None     # (a held one: the rescan when it is placed covers its events)
        return self._resolve(handle)

    def _arrives_later(self, rel: bytes) -> bool:
        """Does a directory rename later in the batch read bring ``rel`` (or
        a directory above it) into the tree? Then the event naming it
        happened outside, and the scan of the arrival reports its result."""
        for ev in self._batch[self._batch_pos + 1:]:
            if ev.mask & FAN_RENAME and ev.mask & FAN_ONDIR:
                new_rec = ev.record(FAN_EVENT_INFO_TYPE_NEW_DFID_NAME)
                if new_rec is None or new_rec.name is None:
                    continue
                parent = self._mapped_path(new_rec.handle)
                if parent is None:
                    continue
                target = join_rel(parent, new_rec.name)
                if rel == target or rel.startswith(target + b"/"):
                    return True
        return False

    def _resolve(self, handle: bytes) -> bytes | None:
        """A directory the map does not hold: where is it now?"""
        try:
            place, rel = self._where(handle)
        except OSError as exc:
            self._hold(handle, True, exc)       # where it is is not known: asked again later
            return None
        if place is Place.INSIDE and not self._excluded_path(rel):
            if self._arrives_later(rel):
                # skipped, but not remembered as outside: it is inside, and
                # a rename within the tree maps no directory below the one
                # it moves (remembered, every later event here was dropped)
                return None
            # inside but never seen arriving: an event of its arrival is
            # still queued, or was lost; a rescan is right either way
            self._rescan_unmapped(rel, "directory unknown to the fanotify watcher")
            return rel
        # outside, or gone: a handle names one inode and generation, never
        # a directory made later, so the events left of a deleted one are
        # skipped without a lookup each (an rm -rf read late names it often)
        self._remember_outside(handle)
        return None

    def _where(self, handle: bytes) -> tuple[Place, bytes]:
        """Where the directory ``handle`` names is now: (INSIDE, its path
        relative to the root), (OUTSIDE, b"") or (GONE, b""). A lookup
        that failed for a passing reason raises its OSError: it says
        nothing of where the directory is."""
        self.handle_lookups += 1
        try:
            fd = self._open_handle(handle)
        except OSError as exc:
            if exc.errno in GONE_ERRNOS:
                return Place.GONE, b""
            raise
        try:
            if os.fstat(fd).st_nlink == 0:
                return Place.GONE, b""        # removed, still held open by someone
            where = os.readlink(f"/proc/self/fd/{fd}".encode())
        finally:
            os.close(fd)
        if where == self.root or where.startswith(self.root + b"/"):
            return Place.INSIDE, where[len(self.root) + 1:]
        return Place.OUTSIDE, b""

    def _open_handle(self, handle: bytes, flags: int = os.O_PATH, tries: int = STALE_TRIES) -> int:
        """open_by_handle_at, tried again on EINTR, and on ESTALE up to
        ``tries`` times: the decode of a directory's handle that races a
        rename can get ESTALE once (a file's needs no path: one try)."""
        for attempt in range(1, tries + 1):
            try:
                return open_by_handle(self._mount_fd, handle, flags)
            except OSError as exc:
                if exc.errno not in (errno.ESTALE, errno.EINTR) or attempt == tries:
                    raise
        raise AssertionError("unreachable")     # (the last attempt returns or raises)

    def _remember_outside(self, handle: bytes) -> None:
        if len(self._outside) >= OUTSIDE_CACHE_LIMIT:
            self._outside.clear()
        self._outside.add(handle)

    def _rescan_unmapped(self, rel: bytes, reason: str) -> bytes:
        """A RESCAN of the highest directory above ``rel`` that the map
        lacks (the capture knows the one above it; ``rel`` itself when the
        map holds all above it), and the map takes in all of that subtree;
        returns the directory rescanned."""
        top = self._first_unmapped(rel)
        self._out.append(Event(Kind.RESCAN, top, True, reason=reason))
        self._map_tree(top)
        return top

    def _map_again(self) -> None:
        """The map built anew, before a RESCAN of the whole tree: what was
        skipped (outside) or held is looked up afresh."""
        self._outside.clear()
        self._held.clear()
        self._map_tree(b"")

    def _first_unmapped(self, rel: bytes) -> bytes:
        """The highest directory on the way from the root to ``rel`` whose
        handle the map does not hold (``rel`` itself when all above are)."""
        parts = rel.split(b"/")
        for i in range(1, len(parts)):
            prefix = b"/".join(parts[:i])
            try:
                if name_to_handle(self._abs(prefix)) not in self._dirs:
                    return prefix
            except OSError as exc:
                if exc.errno not in GONE_ERRNOS:
                    return prefix       # not known: the larger rescan is the safe one
                break
        return rel

    # -- lookups that failed for a passing reason --------------------------------
    def _hold(self, handle: bytes, is_dir: bool, exc: OSError, where: bytes | None = None) -> None:
        """A lookup of ``handle`` failed for a passing reason (``exc``): it
        is looked up again from _after_wait until it works; meanwhile the
        events naming it are skipped. The log says so once per run of
        failures."""
        self.watch_failures += 1
        what = f" (listing {os.fsdecode(where) or 'the root'})" if where is not None else ""
        self.lookup_error = f"{_why(exc)}{what}"
        if not self._held and not self._retrying:
            log.warning("%s: a file handle lookup failed: %s; the events of the directories "
                        "it cannot place are held, and each is rescanned once it can be",
                        os.fsdecode(self.root), self.lookup_error)
            self._retry_wait = RETRY_FIRST
            self._retry_at = time.monotonic() + RETRY_FIRST
        if self._root_handle in self._held:
            return                  # the whole tree is rescanned: that covers this one
        if handle not in self._held and len(self._held) >= HELD_LIMIT:
            self._held.clear()
            handle, is_dir = self._root_handle, True
        self._held[handle] = is_dir

    def _next_wait(self, now: float) -> float | None:
        return max(0.0, self._retry_at - now) if self._held else None

    def _after_wait(self) -> None:
        if self._held and time.monotonic() >= self._retry_at:
            self._retry_held()

    def _retry_held(self) -> None:
        """Look up the held handles again. Each one that is placed now is
        settled: a directory inside the root is rescanned (its events were
        skipped; one rescan for a directory and those below it), one
        outside or gone remembered to skip. The others stay held."""
        held, self._held = self._held, {}
        if self._root_handle in held:
            held = {self._root_handle: True}    # its rescan covers every other
        inside: list[bytes] = []
        self._retrying = True
        try:
            for handle, is_dir in held.items():
                try:
                    if not is_dir:
                        self._check_held_file(handle)
                        continue
                    place, rel = self._where(handle)
                except OSError as exc:
                    self.lookup_error = _why(exc)
                    self._held.setdefault(handle, is_dir)
                    continue
                if handle == self._root_handle:
                    if place is not Place.GONE:     # (gone: its DELETE said so)
                        inside.append(b"")
                elif place is Place.INSIDE and not self._excluded_path(rel):
                    inside.append(rel)
                else:
                    self._remember_outside(handle)      # outside, or gone
            self._rescan_held(inside)
        finally:
            self._retrying = False
        if self._held:
            self._retry_wait = min(RETRY_MAX, self._retry_wait * 2)
            self._retry_at = time.monotonic() + self._retry_wait
        else:
            log.info("%s: file handle lookups work again: %d held handles settled",
                     os.fsdecode(self.root), len(held))

    def _rescan_held(self, inside: list[bytes]) -> None:
        """RESCANs of the held directories placed inside the root, the
        highest first: one below another already rescanned is covered."""
        reason = f"events held while a file handle lookup failed ({self.lookup_error})"
        if b"" in inside:
            self._map_tree(b"")
            self._out.append(Event(Kind.RESCAN, b"", True, reason=reason))
            return
        done: list[bytes] = []
        for rel in sorted(set(inside), key=lambda p: p.count(b"/")):
            if not any(rel == d or rel.startswith(d + b"/") for d in done):
                done.append(self._rescan_unmapped(rel, reason))

    def _check_held_file(self, handle: bytes) -> None:
        """A deleted file whose other names could not be checked: when
        other names hold it still, they may hold a write made through the
        deleted one, and which names they are is not known here: the whole
        tree is rescanned. A lookup that fails again raises."""
        try:
            fd = self._open_handle(handle, tries=1)
        except OSError as exc:
            if exc.errno in GONE_ERRNOS:
                return                      # gone with its last name
            raise
        try:
            survives = os.fstat(fd).st_nlink > 0
        finally:
            os.close(fd)
        if survives:
            self._out.append(Event(Kind.RESCAN, b"", True,
                                   reason="a file deleted while file handle lookups failed "
                                          f"({self.lookup_error}) has other names"))

    def _excluded_path(self, rel: bytes) -> bool:
        if self.exclude is None:
            return False
        parts = rel.split(b"/")
        return any(self.exclude(b"/".join(parts[:i + 1]), True) for i in range(len(parts)))

    def _surviving_inode(self, handle: bytes):
        """(st_dev, st_ino) of the file ``handle`` when other names still
        hold it (a hard link unlinked), else None: a write through the
        unlinked name is folded into its DELETE and must reach them."""
        try:
            fd = self._open_handle(handle, tries=1)
        except OSError as exc:
            if exc.errno not in GONE_ERRNOS:
                self._hold(handle, False, exc)      # checked again later
            return None             # gone with its last name (ESTALE)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            self._hold(handle, False, exc)
            return None
        finally:
            os.close(fd)
        return (st.st_dev, st.st_ino) if st.st_nlink > 0 else None

    def _still_there(self, dir_handle: bytes, name: bytes, child: bytes | None,
                     path: bytes) -> bool:
        """Does the directory hold ``name`` as the inode ``child`` now? When
        its handle cannot be opened for a passing reason, ``path`` (its
        path relative to the root) is asked instead."""
        try:
            dfd = self._open_handle(dir_handle)
        except OSError as exc:
            if exc.errno in GONE_ERRNOS:
                return False                # the directory is gone, the name with it
            return self._name_holds(self._abs(path), AT_FDCWD, child)
        try:
            return self._name_holds(name, dfd, child)
        finally:
            os.close(dfd)

    @staticmethod
    def _name_holds(name: bytes, dirfd: int, child: bytes | None) -> bool:
        """Does ``name`` (relative to ``dirfd``) hold the inode ``child``?
        When that cannot be told, yes: the capture looks at the disk itself
        for a CREATED, and finds a name that is gone missing."""
        try:
            return child is None or name_to_handle(name, dirfd) == child
        except OSError as exc:
            return exc.errno not in GONE_ERRNOS

    # -- events: read() and its loop are EventReadLoop's ------------------------
    def _parse(self, data: memoryview) -> None:
        """One read's events; a malformed one costs a rescan, not the watcher."""
        try:
            # (the ignored processes' file events: nothing to map, nothing to report)
            self._batch = parse_events(data, self.ignore_pids)
            for pos, ev in enumerate(self._batch):
                self._batch_pos = pos           # read by _arrives_later
                reported = len(self._out)
                self._handle(ev)
                # (the /proc look only for an event that reported something:
                # the mark covers the whole file system)
                if ev.pid in self.ignore_pids or (len(self._out) > reported and self._inherited_close(ev)):
                    self._out[reported:] = [e for e in self._out[reported:]     # a rescan is never dropped
                                            if e.kind is Kind.RESCAN]
        except EventFormatError as exc:
            # what this read held is unknown: resync all of it, keep watching
            self.format_errors += 1
            log.error("%s: %s", os.fsdecode(self.root), exc)
            self._map_again()
            self._out.append(Event(Kind.RESCAN, b"", True, reason=f"unreadable events: {exc}"))
        finally:
            self._batch = ()

    def _inherited_close(self, ev: RawEvent) -> bool:
        """A lone CLOSE_WRITE from a child of an ignored process: the child
        inherited that process's writable descriptor across fork, and its
        exec (or exit) closed the last reference after the parent closed its
        own. Not a change of the child's: a child that writes is seen by its
        MODIFY. (A subprocess started by the capture mount's process made
        its own writes look like a bypass, about 1 test run in 20.)"""
        if ev.mask != FAN_CLOSE_WRITE or not self.ignore_pids:
            return False
        try:
            with open(f"/proc/{ev.pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return False                    # gone: who it was is unknown, so it counts
        fields = stat[stat.rindex(b")") + 2:].split()      # after "pid (comm) "
        return len(fields) > 1 and int(fields[1]) in self.ignore_pids

    def _handle(self, ev: RawEvent) -> None:
        mask = ev.mask
        if mask & FAN_Q_OVERFLOW:
            self.overflows += 1
            self._map_again()             # directory events were lost: map again
            self._out.append(Event(Kind.RESCAN, b"", True,
                                   reason="fanotify event queue overflowed"))
            return
        is_dir = bool(mask & FAN_ONDIR)
        child = ev.record(FAN_EVENT_INFO_TYPE_FID)
        child_h = child.handle if child is not None else None
        if mask & FAN_RENAME:
            self._renamed(ev, is_dir, child_h)
            return
        rec = ev.record(FAN_EVENT_INFO_TYPE_DFID_NAME) or ev.record(FAN_EVENT_INFO_TYPE_DFID)
        if rec is None:
            return     # only the inode (a link count change of a file unlinked): no name to report
        if mask & FAN_DELETE and child_h == self._root_handle:
            self._out.append(Event(Kind.RESCAN, b"", True, reason="the watched root was deleted"))
            return
        parent = self._path_of(rec.handle)
        if parent is None:
            return
        name = rec.name or b"."
        path = parent if name == b"." else join_rel(parent, name)
        if name != b"." and self.exclude is not None and self.exclude(path, is_dir):
            return
        if mask & (FAN_CREATE | FAN_DELETE):
            if mask & FAN_CREATE and mask & FAN_DELETE:
                # merged: the order of the two is not told; the directory is
                present = self._still_there(rec.handle, name, child_h, path)
            else:
                present = bool(mask & FAN_CREATE)
            if present:
                if is_dir and child_h is not None:
                    self._dirs[child_h] = (rec.handle, name)
                # the content read for the CREATE includes any write merged into it
                self._out.append(Event(Kind.CREATED, path, is_dir))
            else:
                if is_dir and child_h is not None:
                    self._dirs.pop(child_h, None)
                ino = None if is_dir or child_h is None else self._surviving_inode(child_h)
                self._out.append(Event(Kind.DELETED, path, is_dir, ino=ino))
            return
        if mask & FAN_MODIFY:
            self._out.append(Event(Kind.MODIFIED, path, is_dir))
        if mask & FAN_CLOSE_WRITE:
            self._out.append(Event(Kind.CLOSED, path, is_dir))
        if mask & FAN_ATTRIB:
            self._out.append(Event(Kind.ATTRIB, path, is_dir))

    def _renamed(self, ev: RawEvent, is_dir: bool, child_h: bytes | None) -> None:
        old_rec = ev.record(FAN_EVENT_INFO_TYPE_OLD_DFID_NAME)
        new_rec = ev.record(FAN_EVENT_INFO_TYPE_NEW_DFID_NAME)
        # parse_events names every record of a DFID_NAME type
        if old_rec is None or new_rec is None or old_rec.name is None or new_rec.name is None:
            raise EventFormatError("FAN_RENAME without its old and new directory records", 0)
        if child_h == self._root_handle:
            return                          # the root itself renamed: paths below it hold
        old_parent = self._path_of(old_rec.handle)
        new_parent = self._path_of(new_rec.handle)
        old = None if old_parent is None else join_rel(old_parent, old_rec.name)
        new = None if new_parent is None else join_rel(new_parent, new_rec.name)
        if old is not None and self.exclude is not None and self.exclude(old, is_dir):
            old = None
        if new is not None and self.exclude is not None and self.exclude(new, is_dir):
            new = None
        if new is None:                     # out of the tree (or to an excluded name)
            if old is None:
                return
            if is_dir and child_h is not None:
                self._dirs.pop(child_h, None)
            self._out.append(Event(Kind.DELETED, old, is_dir, reason=MOVED_OUT))
            return
        if old is None:                     # into the tree: it comes with what it holds
            self._out.append(Event(Kind.CREATED, new, is_dir))
            if is_dir:
                # directories below it may sit in the skip set
                self._outside.clear()
                if child_h is not None:
                    self._dirs[child_h] = (new_rec.handle, new_rec.name)
                self._map_tree(new, report=True)
            return
        if is_dir and child_h is not None:
            if child_h in self._dirs:
                self._dirs[child_h] = (new_rec.handle, new_rec.name)
            else:
                self._map_tree(new)
        self._out.append(Event(Kind.MOVED, old, is_dir, new_path=new))

    def close(self) -> None:
        for attr in ("fd", "_mount_fd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
