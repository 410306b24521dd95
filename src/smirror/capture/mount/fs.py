"""The capture file system: a FUSE file system over a backing directory
that serves every mutating call by applying it to the backing directory and
then emitting the op, in the order it served the calls.

Every handler runs to completion on the mount's one thread (the compiled
loop of :mod:`smirror.capture.mount._fuse` calls it and replies from what
it returns), so the calls are served one at a time and the op stream is the
order in which the backing directory changed: exact order, within and
across files. A call that fails on the backing directory emits nothing.
Only what changes nothing finishes off the loop once the op is out (the
handler's reply then comes later, :class:`~._fuse.Later`): the backing
fsync when other calls are queued (a disk flush, during which they are
served) and a synchronous connection's wait.

The mount never uses the kernel's writeback cache: with it the kernel would
send dirty pages later, in its own order, not in the application's.

Timestamps travel lazily: a data or directory change marks its file (and
parent directory) "times dirty"; their mtimes go out as SETATTR ops (the
root's as the root-mtime MARK) when the file is closed or fsynced, at every
:meth:`CaptureFS.flush_times` (the runner calls it every ``TIMES_INTERVAL``
seconds and on sync), never as one extra op per write. The content is
exact-order; mtimes trail it by at most that interval.

Inodes: the FUSE inode of an entry is its backing inode number (the root
is ``ROOT_INODE``); each known inode keeps its paths (hard links) relative
to the backing root, rewritten on renames.

Confinement: the mount (often root) reaches the backing directory by path,
and a local user who can write there could swap a directory for a symlink
between two calls. So every backing access resolves its parent directory
beneath one directory handle of the backing root (:class:`smirror.fs.beneath.Beneath`:
``openat2`` with RESOLVE_BENEATH|NO_SYMLINKS, or a component walk) and acts
on the final name with ``dir_fd`` without following it. A symlink on the way
is refused: EACCES to the caller, logged and counted (``refused``).
"""
from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os
import queue
import stat
import threading
import time
from typing import Any

from smirror.capture.mount import _fuse
from smirror.capture.mount._fuse import ROOT_INODE, FUSEError
from smirror.capture.recorder import xattr_name
from smirror.errors import ConfinementError
from smirror.fs.beneath import Beneath, chmod_at, open_subdir, proc_path, renameat2
from smirror.ops import MARK_ROOT_MTIME, Op, RenameFlag

log = logging.getLogger("smirror.capture.mount")

# MARK emitted when an application fsyncs a file through the mount: where
# the synchronous modes (a later part of issue 16) will wait for the target
MARK_FSYNC = b"smirror.fsync"

# kernel caching of names and attributes (seconds): longer saves round
# trips; a change made to the backing directory behind the mount's back is
# seen through the mount after at most this long
CACHE_TIMEOUT = 1.0

_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_APPEND

# seconds between two log lines about refused (confinement) calls
REFUSED_LOG_EVERY = 10.0

_fallocate_fn = None

# fallocate(2) modes (linux/falloc.h); the kernel's FUSE passes these three
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_FALLOC_KNOWN = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
_ZEROS = bytes(1 << 20)             # a punched or zeroed range goes out as WRITEs of these


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode (Python has only posix_fallocate)."""
    global _fallocate_fn
    if _fallocate_fn is None:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _fallocate_fn = fn
    if _fallocate_fn(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _Flush:
    """The backing flush a handler leaves for off the loop once its op is
    captured (its place in the order is fixed): fsync or fdatasync of
    ``fd``, a descriptor of its own, closed after."""
    __slots__ = ("fd", "datasync")

    def __init__(self, fd: int, datasync: bool):
        self.fd = fd
        self.datasync = datasync


def _served(fn):
    """OSError -> the errno to the caller; anything else is a bug: logged
    with its traceback, counted, EIO to the caller, and the loop goes on.
    The handler runs on the mount's loop to completion; what it returns as
    :class:`_Flush` (the backing fsync) and the wait of a synchronous
    connection (``sync_waiter``: until the op is durable on the target, or
    EIO) then finish off the loop, and the reply with them: the loop serves
    other calls meanwhile, their ops after this one's."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self, *args):
        self.requests[name] = self.requests.get(name, 0) + 1
        # the thread's CPU clock is two system calls: read only when profiling
        t0 = time.thread_time_ns() if self.profile else 0
        try:
            result = fn(self, *args)
        except FUSEError:
            raise
        except ConfinementError as exc:
            self.refuse(name, exc)
            raise FUSEError(errno.EACCES) from None
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception as exc:            # must not end the FUSE loop
            self.failures += 1
            self.error = f"{fn.__name__}: {type(exc).__name__}: {exc}"
            log.exception("mount of %s: %s failed", os.fsdecode(self.root), fn.__name__)
            raise FUSEError(errno.EIO) from None
        finally:
            if t0:
                spent = time.thread_time_ns() - t0
                self.busy_ns += spent
                self.busy_by[name] = self.busy_by.get(name, 0) + spent
        flush = None
        if type(result) is _Flush:
            flush, result = result, None
        waiter = self.sync_waiter
        # the sync point now, on the loop: exactly the ops up to this call's
        point = waiter.point(name) if waiter is not None and waiter.waits_on(name) else None
        if flush is not None or point:
            return self._later(result, flush, waiter, point)
        return result
    return wrapper


class _Waits:
    """Worker threads (at most ``limit``, made as needed, kept) for what
    finishes off the loop: a flush without AIO, a synchronous call's wait.
    Daemon threads: a wait (up to the sync timeout) must not hold up the
    process's exit."""

    def __init__(self, limit: int):
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._limit = limit

    def submit(self, fn) -> None:
        self._todo.put(fn)
        with self._lock:
            if self._idle or self._threads >= self._limit:
                return
            self._threads += 1
        threading.Thread(target=self._work, name="capture-mount-wait", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            fn = self._todo.get()
            with self._lock:
                self._idle -= 1
            if fn is None:
                return
            try:
                fn()
            except Exception:               # the function answers its call; a bug is logged
                log.exception("capture mount: work off the loop failed")

    def shutdown(self) -> None:
        """The threads end once what is queued is done."""
        with self._lock:
            n, self._threads = self._threads, 0
        for _ in range(n):
            self._todo.put(None)


class _Node:
    """What the mount knows of one inode number the kernel holds.
    ``generation`` goes up when the inode dies (its last name removed, seen
    by the mount): the backing may give its number to a new file or
    directory while the kernel still holds the dead one (an open or O_PATH
    descriptor), and with the same number and generation the kernel would
    take the new entry for the dead inode (a dead directory: every create
    in it fails with ENOENT). The node, and so its generation, lives while
    the kernel holds any inode of that number."""
    __slots__ = ("paths", "lookups", "generation")

    def __init__(self, path: bytes):
        self.paths = [path]
        self.lookups = 0
        self.generation = 0


class _ResendLinks:
    """The hard links of one resend (a target's resync, a bypass repair) of
    the subtree ``root``: the first name sent of each inode, and the
    hard-linked names outside the subtree (found once, when needed)."""
    __slots__ = ("root", "sent", "outside")

    def __init__(self, root: bytes):
        self.root = root
        self.sent: dict[tuple, bytes] = {}
        self.outside: dict | None = None

    def inside(self, rel: bytes) -> bool:
        return not self.root or rel == self.root or rel.startswith(self.root + b"/")


class CaptureFS:
    """``root``: the backing directory; ``emit(op)``: where ops go (the
    connection journals), called on the mount thread."""

    def __init__(self, root, emit):
        self.root = os.fsencode(os.path.abspath(root))
        self.emit = emit
        self.base = Beneath(self.root)      # every backing access resolves beneath it
        st = os.fstat(self.base.fd)
        self.root_ino = st.st_ino
        self.root_dev = st.st_dev
        self.nodes: dict[int, _Node] = {ROOT_INODE: _Node(b"")}
        self.nodes[ROOT_INODE].lookups = 1
        self.open_files: dict[int, int] = {}         # fh (backing fd) -> inode
        # inode -> its open fhs: fd-based getattr/getxattr/stamp, one
        # syscall where a path costs three (resolve beneath, act, close)
        self.fhs_of: dict[int, list[int]] = {}
        self.dirs: dict[int, list] = {}              # directory fh -> entries
        self._next_dir_fh = 1
        self.times_dirty: dict[int, None] = {}       # inodes whose mtime is owed
        self._touched_dirs: set[bytes] = set()       # of a repair: their mtimes go last
        self._links = _ResendLinks(b"")                 # of a repair: hard links it sent
        self.owner = os.geteuid(), os.getegid()
        self.failures = 0
        self.error = ""
        self._refused_logged = float("-inf")
        # refused: calls refused for confinement (a symlink on the way)
        self.stats: dict[str, Any] = {"ops": 0, "bytes_written": 0, "refused": 0, "last_refused": ""}
        self.requests: dict[str, int] = {}          # FUSE requests served, by kind
        # CPU time of the mount's thread spent in the handlers, counted
        # while ``profile`` is set (benchmarks/bench_mount.py; CPU, not wall
        # time: on a busy machine a handler may wait for a core)
        self.profile = False
        self.busy_ns = 0
        self.busy_by: dict[str, int] = {}           # the same, by kind of request
        # the synchronous connections' waits (stream.syncwait.SyncWaiter), if any
        self.sync_waiter: Any = None
        self._waits: _Waits | None = None
        # the backing fsync by Linux AIO (aioflush.AioFlush, set by the
        # runner, which reaps it on the loop), None: in a worker thread
        self.flusher: Any = None
        # whether another request is queued now (the runner's; None: not
        # known): an fsync with nothing else to serve flushes on the loop
        self.requests_queued: Any = None
        # the session (the runner's), for its transport: over io_uring a
        # flush lets the other CPUs' requests through (serve_unlocked)
        self.session: Any = None
        self.flushes = {"loop": 0, "off_loop": 0, "unlocked": 0}
        # backing fds being flushed with the serve lock let go (how many
        # flushes each): one released meanwhile (no longer in open_files)
        # is closed by the flush, its number kept taken until then
        self.flushing: dict[int, int] = {}
        # an fsync's MARK payload by path (the same JSON each time)
        self._fsync_payloads: dict[bytes, bytes] = {}

    # -- inodes and paths ------------------------------------------------------
    def _ino(self, st_ino: int) -> int:
        return ROOT_INODE if st_ino == self.root_ino else st_ino

    def _path(self, inode: int) -> bytes:
        node = self.nodes.get(inode)
        if node is None or not node.paths:
            raise FUSEError(errno.ENOENT)
        return node.paths[0]

    # -- the backing directory, beneath its handle --------------------------------
    def _at(self, rel: bytes):
        """``with self._at(rel) as (dfd, name)``: the parent of ``rel``
        resolved beneath the backing root, and the final name (b"" and the
        root handle for the root)."""
        return self.base.at(rel)

    def _lstat(self, rel: bytes):
        if not rel:
            return os.fstat(self.base.fd)
        with self.base.at(rel) as (dfd, name):
            return os.stat(name, dir_fd=dfd, follow_symlinks=False)

    def _lexists(self, rel: bytes) -> bool:
        try:
            self._lstat(rel)
        except (FileNotFoundError, NotADirectoryError, ConfinementError):
            return False
        return True

    def _opendir(self, rel: bytes) -> int:
        """A readable descriptor of the directory ``rel`` (for listing, fsync)."""
        if not rel:
            return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.base.fd)
        with self.base.at(rel) as (dfd, name):
            return open_subdir(dfd, name)

    @staticmethod
    def _obj(dfd: int, name: bytes) -> tuple:
        """(path, follow) naming the entry ``name`` of ``dfd`` itself for the
        calls without dir_fd (xattrs) or on the root (name b"")."""
        return (proc_path(dfd, name), False) if name else (proc_path(dfd), True)

    def refuse(self, call: str, exc: ConfinementError) -> None:
        """A call that would have left the backing directory: counted and
        logged (at most every REFUSED_LOG_EVERY seconds)."""
        self.stats["refused"] += 1
        self.stats["last_refused"] = f"{call}: {exc}"
        now = time.monotonic()
        if now - self._refused_logged >= REFUSED_LOG_EVERY:
            self._refused_logged = now
            log.warning("capture mount of %s: refused %s (%d refused so far)",
                        os.fsdecode(self.root), self.stats["last_refused"], self.stats["refused"])

    def _child(self, parent: int, name: bytes) -> bytes:
        if name in (b".", b"..") or b"/" in name:
            raise FUSEError(errno.EINVAL)
        p = self._path(parent)
        return p + b"/" + name if p else name

    @staticmethod
    def _parent(rel: bytes) -> bytes:
        return rel.rpartition(b"/")[0]

    def _remember(self, st, rel: bytes) -> int:
        ino = self._ino(st.st_ino)
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = _Node(rel)
        elif rel not in node.paths:
            node.paths.append(rel)
        node.lookups += 1
        return ino

    def _forget_path(self, rel: bytes, ino: int | None) -> None:
        node = self.nodes.get(ino) if ino is not None else None
        if node is not None and rel in node.paths:
            node.paths.remove(rel)

    def _died(self, ino: int | None) -> None:
        """The inode ``ino`` has no name left: a new one with its number is
        another inode to the kernel (see :class:`_Node`)."""
        node = self.nodes.get(ino) if ino is not None else None
        if node is not None:
            node.generation += 1

    def _moved(self, old: bytes, new: bytes) -> None:
        """Every known path at or under ``old`` is now under ``new``."""
        prefix = old + b"/"
        for node in self.nodes.values():
            for i, p in enumerate(node.paths):
                if p == old:
                    node.paths[i] = new
                elif p.startswith(prefix):
                    node.paths[i] = new + p[len(old):]

    def _exchanged(self, a: bytes, b: bytes) -> None:
        """Every known path at or under ``a`` is now under ``b``, and the
        other way round (RENAME_EXCHANGE)."""
        pa, pb = a + b"/", b + b"/"
        for node in self.nodes.values():
            for i, p in enumerate(node.paths):
                if p == a or p.startswith(pa):
                    node.paths[i] = b + p[len(a):]
                elif p == b or p.startswith(pb):
                    node.paths[i] = a + p[len(b):]

    def _attrs(self, st) -> _fuse.Entry:
        ino = self._ino(st.st_ino)
        node = self.nodes.get(ino)
        return _fuse.Entry(ino, node.generation if node is not None else 0, st, CACHE_TIMEOUT)

    # -- off the loop: the backing fsync, synchronous modes -------------------------
    WAIT_THREADS = 256      # flushes (without AIO) and synchronous waits in threads at once

    def _pool(self) -> _Waits:
        if self._waits is None:
            self._waits = _Waits(self.WAIT_THREADS)
        return self._waits

    def _later(self, result, flush: _Flush | None, waiter, point) -> _fuse.Later:
        """The reply of a call whose op is out: once the backing flush is
        done (its errno if it failed), then once ``point`` is durable on
        every sync connection (EIO when one cannot make it so in time:
        syncwait's timeout); the loop serves other calls meanwhile."""
        def start(reply) -> None:
            def flushed(err: int) -> None:
                if err:
                    reply.fail(err)
                elif point:
                    self._pool().submit(waited)
                else:
                    reply.ok(result)

            def waited() -> None:
                try:
                    durable = waiter.wait(point)
                except Exception:           # a bug: the caller must still get an answer
                    log.exception("mount of %s: a synchronous wait failed", os.fsdecode(self.root))
                    durable = False
                if durable:
                    reply.ok(result)
                else:
                    reply.fail(errno.EIO)

            if flush is None:
                flushed(0)
                return

            def closed(err: int) -> None:
                os.close(flush.fd)
                flushed(err)
            self.flush_backing(flush.fd, flush.datasync, closed)
        return _fuse.Later(start)

    def flush_now(self, fd: int, datasync: bool) -> None:
        """fsync (fdatasync) of a backing descriptor, here and now."""
        (os.fdatasync if datasync else os.fsync)(fd)

    def flush_backing(self, fd: int, datasync: bool, done) -> None:
        """fsync (fdatasync) of a backing descriptor, the loop serving other
        calls meanwhile, then ``done(errno)`` (0: flushed): by Linux AIO when
        the runner set up ``flusher`` (:mod:`.aioflush`; ``done`` runs on the
        loop), else (or where AIO takes no flush of this file) in a worker
        thread (``done`` runs there)."""
        if self.flusher is not None and self.flusher.flush(fd, datasync, done):
            return

        def flush() -> None:
            try:
                self.flush_now(fd, datasync)
            except OSError as exc:
                done(exc.errno or errno.EIO)
                return
            done(0)
        self._pool().submit(flush)

    def close(self) -> None:
        """Once the loop ended: the backing root's handle, the wait threads."""
        self.base.close()
        if self._waits is not None:
            self._waits.shutdown()

    # -- emitting ----------------------------------------------------------------
    def _out(self, op: Op) -> None:
        self.stats["ops"] += 1
        self.emit(op)

    def _dirty(self, *inodes: int) -> None:
        for ino in inodes:
            self.times_dirty[ino] = None

    def _dirty_parent(self, rel: bytes) -> None:
        parent = self._parent(rel)
        if not parent:
            self.times_dirty[ROOT_INODE] = None
            return
        try:
            self.times_dirty[self._ino(self._lstat(parent).st_ino)] = None
        except (OSError, ConfinementError):
            pass

    def _owner(self, rel: bytes, st) -> None:
        """New entries belong to whoever created them: send the owner when
        it is not the replicating process's own."""
        if (st.st_uid, st.st_gid) != self.owner:
            self._out(Op.setattr(0, rel, uid=st.st_uid, gid=st.st_gid))

    def _give(self, dfd: int, name: bytes, ctx) -> None:
        """Running as root, make the caller the owner of what it created as
        ``name`` in ``dfd`` (the group of a set-group-id parent stays as the
        kernel chose it)."""
        if self.owner[0] != 0 or (ctx.uid, ctx.gid) == (0, 0):
            return
        parent = os.fstat(dfd)
        gid = -1 if parent.st_mode & stat.S_ISGID else ctx.gid
        os.chown(name, ctx.uid, gid, dir_fd=dfd, follow_symlinks=False)

    def flush_times(self, inodes=None) -> int:
        """Emit the mtimes owed (of ``inodes`` only, if given); returns how many."""
        todo = list(self.times_dirty) if inodes is None else [i for i in inodes if i in self.times_dirty]
        n = 0
        for ino in todo:
            del self.times_dirty[ino]
            node = self.nodes.get(ino)
            if node is None or not node.paths:
                continue                    # gone: nothing to stamp
            self._stamp(node.paths[0])
            n += 1
        return n

    # -- names ---------------------------------------------------------------------
    @_served
    def lookup(self, parent, name, ctx=None):
        rel = self._child(parent, name)
        st = self._lstat(rel)
        self._remember(st, rel)
        return self._attrs(st)

    @_served
    def forget(self, inode_list):
        for ino, n in inode_list:
            node = self.nodes.get(ino)
            if node is None or ino == ROOT_INODE:
                continue
            node.lookups -= n
            if node.lookups <= 0 and ino not in self.fhs_of:
                self.flush_times([ino])          # its owed mtime is not lost with it
                del self.nodes[ino]

    @_served
    def getattr(self, inode, ctx=None):
        fhs = self.fhs_of.get(inode)
        if fhs:
            return self._attrs(os.fstat(fhs[0]))
        return self._attrs(self._lstat(self._path(inode)))

    @_served
    def readlink(self, inode, ctx):
        with self._at(self._path(inode)) as (dfd, name):
            return os.readlink(name, dir_fd=dfd)

    @_served
    def statfs(self, ctx):
        return os.statvfs(self.base.fd)

    # -- directories -----------------------------------------------------------------
    @_served
    def opendir(self, inode, ctx):
        self._path(inode)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self.dirs[fh] = [inode, None]
        return fh

    @_served
    def readdir(self, fh, start_id, token):
        inode, entries = self.dirs[fh]
        base = self._path(inode)
        dfd = self._opendir(base)
        try:
            if entries is None or start_id == 0:
                entries = self.dirs[fh][1] = sorted(map(os.fsencode, os.listdir(dfd)))
            for i in range(start_id, len(entries)):
                rel = base + b"/" + entries[i] if base else entries[i]
                try:
                    st = os.stat(entries[i], dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not _fuse.readdir_reply(token, entries[i], self._attrs(st), i + 1):
                    return
                self._remember(st, rel)
        finally:
            os.close(dfd)

    @_served
    def releasedir(self, fh):
        self.dirs.pop(fh, None)

    @_served
    def fsyncdir(self, fh, datasync):
        node = self.nodes.get(self.dirs[fh][0])
        if node is None or not node.paths:
            return          # removed since it was opened: nothing left to sync (as on a disk)
        fd = self._opendir(node.paths[0])     # beneath, on the loop
        return self._flush_or_leave(fd, False, owned=True)

    @_served
    def mkdir(self, parent, name, mode, ctx):
        rel = self._child(parent, name)
        with self._at(rel) as (dfd, base):
            os.mkdir(base, mode, dir_fd=dfd)
            chmod_at(dfd, base, stat.S_IMODE(mode))  # our umask must not apply: the kernel's did
            self._give(dfd, base, ctx)
            st = os.stat(base, dir_fd=dfd, follow_symlinks=False)
        self._out(Op.mkdir(0, rel, stat.S_IMODE(st.st_mode)))
        self._owner(rel, st)
        ino = self._remember(st, rel)
        self._dirty(ino)
        self._dirty(parent)
        return self._attrs(st)

    @_served
    def rmdir(self, parent, name, ctx):
        rel = self._child(parent, name)
        with self._at(rel) as (dfd, base):
            ino = self._ino(os.stat(base, dir_fd=dfd, follow_symlinks=False).st_ino)
            os.rmdir(base, dir_fd=dfd)
        self._out(Op.rmdir(0, rel))
        self._forget_path(rel, ino)
        self._died(ino)
        self.times_dirty.pop(ino, None)
        self._dirty(parent)

    # -- entries ---------------------------------------------------------------------
    @_served
    def unlink(self, parent, name, ctx):
        rel = self._child(parent, name)
        with self._at(rel) as (dfd, base):
            st = os.stat(base, dir_fd=dfd, follow_symlinks=False)
            ino = self._ino(st.st_ino)
            self.flush_times([ino])                 # a hard link left behind keeps it
            os.unlink(base, dir_fd=dfd)
        self._out(Op.delete(0, rel))
        self._forget_path(rel, ino)
        if st.st_nlink <= 1:
            self._died(ino)
        self._dirty(parent)

    @_served
    def symlink(self, parent, name, target, ctx):
        rel = self._child(parent, name)
        with self._at(rel) as (dfd, base):
            os.symlink(target, base, dir_fd=dfd)
            self._give(dfd, base, ctx)
            st = os.stat(base, dir_fd=dfd, follow_symlinks=False)
        self._out(Op.symlink(0, rel, bytes(target)))
        self._owner(rel, st)
        ino = self._remember(st, rel)
        self._dirty(ino)
        self._dirty(parent)
        return self._attrs(st)

    @_served
    def mknod(self, parent, name, mode, rdev, ctx):
        rel = self._child(parent, name)
        with self._at(rel) as (dfd, base):
            os.mknod(base, mode, rdev, dir_fd=dfd)
            chmod_at(dfd, base, stat.S_IMODE(mode))
            self._give(dfd, base, ctx)
            st = os.stat(base, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISREG(mode):
            self._out(Op.create(0, rel, stat.S_IMODE(st.st_mode)))
        else:
            self._out(Op.mknod(0, rel, st.st_mode, rdev))
        self._owner(rel, st)
        ino = self._remember(st, rel)
        self._dirty(ino)
        self._dirty(parent)
        return self._attrs(st)

    @_served
    def rename(self, parent_old, name_old, parent_new, name_new, flags, ctx):
        old, new = self._child(parent_old, name_old), self._child(parent_new, name_new)
        with self._at(old) as (odfd, oname), self._at(new) as (ndfd, nname):
            ino = self._ino(os.stat(oname, dir_fd=odfd, follow_symlinks=False).st_ino)
            try:
                rst = os.stat(nname, dir_fd=ndfd, follow_symlinks=False)
                replaced = self._ino(rst.st_ino)
            except FileNotFoundError:
                rst, replaced = None, None
            if replaced == ino and not flags:
                return              # two names of one file: rename(2) does nothing
            if flags:
                # NOREPLACE and EXCHANGE: atomic in the kernel, never checked then done
                renameat2(odfd, oname, ndfd, nname, flags)
            else:
                os.rename(oname, nname, src_dir_fd=odfd, dst_dir_fd=ndfd)
        if flags & _fuse.RENAME_EXCHANGE:
            if replaced != ino:     # two names of one file swapped: nothing changed
                self._out(Op.rename(0, old, new, RenameFlag.EXCHANGE))
                self._exchanged(old, new)
            self._dirty(ino)
            if replaced is not None:    # it is: EXCHANGE needs both names
                self._dirty(replaced)
            self._dirty(parent_old, parent_new)
            return
        self._out(Op.rename(0, old, new))
        if replaced is not None:
            self._forget_path(new, replaced)
            if rst is not None and (stat.S_ISDIR(rst.st_mode) or rst.st_nlink <= 1):
                self._died(replaced)
        self._moved(old, new)
        self._dirty(ino)            # the ctime changed; the mtime is resent after the move
        self._dirty(parent_old, parent_new)

    @_served
    def link(self, inode, new_parent, new_name, ctx):
        existing = self._path(inode)
        rel = self._child(new_parent, new_name)
        with self._at(existing) as (sdfd, sname), self._at(rel) as (ddfd, dname):
            os.link(sname, dname, src_dir_fd=sdfd, dst_dir_fd=ddfd, follow_symlinks=False)
            st = os.stat(dname, dir_fd=ddfd, follow_symlinks=False)
        self._out(Op.hardlink(0, rel, existing))
        self._remember(st, rel)
        self._dirty(new_parent)
        return self._attrs(st)

    # -- attributes -----------------------------------------------------------------
    def _kill_suidgid(self, fd: int, rel: bytes | None) -> None:
        """Clear the set-user-ID bit, and set-group-ID where the file is
        group-executable (the VFS's rule), of the backing file open as
        ``fd``: what the kernel asks (``kill_suidgid``) when a writer
        without CAP_FSETID writes, truncates or opens with O_TRUNC. This
        process, root, keeps them on its own writes. The new mode goes out
        first, as the kernel would have set it before the change. The
        mode by statx alone (``mode_of``): an fstat would mark the file's
        ctime as read, and its next write would dirty the inode."""
        mode = _fuse.mode_of(fd)
        kept = mode & ~stat.S_ISUID
        if mode & stat.S_IXGRP:
            kept &= ~stat.S_ISGID
        if kept != mode:
            os.fchmod(fd, stat.S_IMODE(kept))
            if rel is not None:
                self._out(Op.setattr(0, rel, mode=stat.S_IMODE(kept)))

    @_served
    def setattr(self, inode, attr, fields, fh, ctx):
        rel = self._path(inode)
        with self._at(rel) as (dfd, name):
            return self._setattr(inode, rel, dfd, name, attr, fields, fh, ctx.kill_suidgid)

    def _setattr(self, inode, rel, dfd, name, attr, fields, fh, kill_suidgid=False):
        # the entry itself: (name, dir_fd) not followed, or the root's handle
        path, follow = (name, False) if name else (proc_path(dfd), True)
        at = {"dir_fd": dfd} if name else {}

        def lstat():
            return os.stat(path, follow_symlinks=follow, **at)
        if fields.update_size:
            if fh is not None and fh in self.open_files:
                if kill_suidgid:
                    self._kill_suidgid(fh, rel)
                os.ftruncate(fh, attr.st_size)
            else:
                fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=dfd)
                try:
                    if kill_suidgid:
                        self._kill_suidgid(fd, rel)
                    os.ftruncate(fd, attr.st_size)
                finally:
                    os.close(fd)
            self._out(Op.truncate(0, rel, attr.st_size))
            self._dirty(inode)
        mode = uid = gid = None
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else None
            gid = attr.st_gid if fields.update_gid else None
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid,
                     follow_symlinks=follow, **at)
        if fields.update_mode:
            if name:
                chmod_at(dfd, name, stat.S_IMODE(attr.st_mode))
            else:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_mode or uid is not None:
            # chown may clear set-id bits: send the mode the file has now
            mode = stat.S_IMODE(lstat().st_mode)
        if fields.update_atime or fields.update_mtime:
            st = lstat()
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(path, ns=(atime, mtime), follow_symlinks=follow, **at)
        if fields.update_mtime:
            self._dirty(inode)      # sent with the other owed mtimes (never atime alone)
        if mode is not None or uid is not None or gid is not None:
            self._out(Op.setattr(0, rel, mode=mode, uid=uid, gid=gid))
        return self._attrs(lstat())

    @_served
    def setxattr(self, inode, name, value, flags, ctx):
        rel = self._path(inode)
        try:
            xname = xattr_name(name)
        except ValueError:
            raise FUSEError(errno.EOPNOTSUPP) from None
        with self._at(rel) as (dfd, base):
            path, follow = self._obj(dfd, base)
            os.setxattr(path, xname, value, flags, follow_symlinks=follow)
        self._out(Op.setxattr(0, rel, xname, bytes(value)))

    @_served
    def removexattr(self, inode, name, ctx):
        rel = self._path(inode)
        with self._at(rel) as (dfd, base):
            path, follow = self._obj(dfd, base)
            os.removexattr(path, name, follow_symlinks=follow)
        self._out(Op.removexattr(0, rel, bytes(name)))

    @_served
    def getxattr(self, inode, name, ctx):
        # the kernel asks for security.capability before every write, on an
        # open file: its fd answers without resolving the path
        fhs = self.fhs_of.get(inode)
        try:
            if fhs:
                return os.getxattr(fhs[0], name)
            with self._at(self._path(inode)) as (dfd, base):
                path, follow = self._obj(dfd, base)
                return os.getxattr(path, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise FUSEError(errno.ENODATA) from None
            raise

    @_served
    def listxattr(self, inode, ctx):
        with self._at(self._path(inode)) as (dfd, base):
            path, follow = self._obj(dfd, base)
            return [os.fsencode(n) for n in os.listxattr(path, follow_symlinks=follow)]

    # -- files ------------------------------------------------------------------------
    def _opened(self, fd: int, inode: int, rel: bytes, flags: int, kill_suidgid: bool = False) -> int:
        if flags & os.O_TRUNC and kill_suidgid:
            self._kill_suidgid(fd, rel)
        if flags & os.O_TRUNC and os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
            self._out(Op.truncate(0, rel, 0))
            self._dirty(inode)
        self.open_files[fd] = inode
        self.fhs_of.setdefault(inode, []).append(fd)
        return fd

    @_served
    def open(self, inode, flags, ctx):
        rel = self._path(inode)
        # no O_APPEND on the backing fd: the kernel sends the offset of each
        # write, and pwrite there is what the op records
        fd = self.base.open(rel, flags & ~_OPEN_STRIP)     # beneath, O_NOFOLLOW
        try:
            return self._opened(fd, inode, rel, flags, ctx.kill_suidgid)
        except BaseException:
            os.close(fd)
            raise

    @_served
    def create(self, parent, name, mode, flags, ctx):
        rel = self._child(parent, name)
        with self._at(rel) as (dfd, fname):
            return self._create(parent, rel, dfd, fname, mode, flags, ctx)

    def _create(self, parent, rel, dfd, fname, mode, flags, ctx):
        base = (flags & ~_OPEN_STRIP) | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(fname, base | os.O_CREAT | os.O_EXCL, mode, dir_fd=dfd)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            fd = os.open(fname, base, dir_fd=dfd)   # made meanwhile behind the mount's back
            created = False
        else:
            created = True
        try:
            if created:
                os.fchmod(fd, stat.S_IMODE(mode))
                self._give(dfd, fname, ctx)
            st = os.fstat(fd)
            if created:
                self._out(Op.create(0, rel, stat.S_IMODE(st.st_mode)))
                self._owner(rel, st)
                self._dirty(parent)
            ino = self._remember(st, rel)
            self._dirty(ino)
            fh = self._opened(fd, ino, rel, flags, ctx.kill_suidgid and not created)
            # a file made here is as fstat saw it; one opened may have been truncated
            return fh, self._attrs(st if created else os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise

    @_served
    def read(self, fh, off, size):
        return os.pread(fh, size, off)

    @_served
    def write(self, fh, off, buf, kill_suidgid=False):
        ino = self.open_files[fh]
        node = self.nodes.get(ino)
        if kill_suidgid:
            self._kill_suidgid(fh, node.paths[0] if node is not None and node.paths else None)
        n = os.pwrite(fh, buf, off)
        if node is not None and node.paths:     # an unlinked file has no replica to write
            self._out(Op.write(0, node.paths[0], off, buf if n == len(buf) else buf[:n]))
            self.stats["bytes_written"] += n
            self.times_dirty[ino] = None
        return n

    @_served
    def fallocate(self, fh, mode, offset, length):
        """fallocate(2) on an open file. What it changes that a reader sees
        goes out as ops: a punched or zeroed range as WRITEs of zeros, a new
        size as TRUNCATE (allocation itself is invisible: nothing is sent)."""
        if mode & ~_FALLOC_KNOWN:
            raise FUSEError(errno.EOPNOTSUPP)
        ino = self.open_files.get(fh)
        if ino is None:
            raise FUSEError(errno.EBADF)
        before = os.fstat(fh).st_size
        fallocate(fh, mode, offset, length)
        after = os.fstat(fh).st_size
        node = self.nodes.get(ino)
        if node is None or not node.paths:
            return                          # unlinked: no replica to change
        rel = node.paths[0]
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            pos, end = offset, min(offset + length, before)
            while pos < end:
                n = min(len(_ZEROS), end - pos)
                self._out(Op.write(0, rel, pos, memoryview(_ZEROS)[:n]))
                pos += n
        if after != before:
            self._out(Op.truncate(0, rel, after))
        self._dirty(ino)

    # no flush handler: the kernel gets ENOSYS once and sends no FLUSH again
    # (nothing is done at close(2): release does it, and the kernel holds
    # POSIX locks itself), which saves every close a round trip it waits for

    @_served
    def fsync(self, fh, datasync):
        # its place in the order is now: the MARK goes out on the loop; then
        # the backing disk's flush. The owed mtime stays owed (the timer,
        # close): reading it here makes the next write's time a fine-grained
        # one (multigrain timestamps, Linux 6.13), which dirties the inode;
        # with an fsync after each write (a WAL) every write did, and each
        # fdatasync cost 30-60 us more (docs/mount.md)
        ino = self.open_files[fh]
        node = self.nodes.get(ino)
        if node is not None and node.paths:
            rel = node.paths[0]
            payload = self._fsync_payloads.get(rel)
            if payload is None:             # json.dumps costs a few us a call
                if len(self._fsync_payloads) >= 4096:
                    self._fsync_payloads.clear()
                payload = self._fsync_payloads[rel] = json.dumps({"path": os.fsdecode(rel)}).encode()
            self._out(Op.mark(0, MARK_FSYNC, payload))
        return self._flush_or_leave(fh, datasync, owned=False)

    def _flush_or_leave(self, fd: int, datasync: bool, *, owned: bool):
        """The backing flush of ``fd`` here on the loop when no other request
        is queued (a hand-off to AIO or a thread costs wake-ups worth about
        a fast disk's flush: measured), else a :class:`_Flush` for off the
        loop, on a descriptor of its own (``owned``: ``fd`` is one; else a
        dup, so a release meanwhile closes only the handle's). Over io_uring
        the flush is made here on ``fd`` itself, the other CPUs' requests
        served meanwhile (a release of ``fd`` then leaves its close to the
        flush): no hand-off at all."""
        if self.session is not None and self.session.uring:
            # no dup (two system calls): the kernel sends no RELEASE while
            # an fsync holds the file; should one come, release() leaves
            # the close to us (flushing)
            flushing = self.flushing
            flushing[fd] = flushing.get(fd, 0) + 1
            try:
                self.session.serve_unlocked(self.flush_now, fd, datasync)
            finally:
                left = flushing.pop(fd) - 1
                if left:
                    flushing[fd] = left
                elif owned or fd not in self.open_files:
                    os.close(fd)
            self.flushes["unlocked"] += 1
            return None
        if self.requests_queued is not None and not self.requests_queued():
            try:
                self.flush_now(fd, datasync)
            finally:
                if owned:
                    os.close(fd)
            self.flushes["loop"] += 1
            return None
        self.flushes["off_loop"] += 1
        return _Flush(fd if owned else os.dup(fd), datasync)

    @_served
    def release(self, fh):
        ino = self.open_files.pop(fh, None)
        try:
            if ino is not None:
                fhs = self.fhs_of[ino]
                fhs.remove(fh)
                if not fhs:
                    del self.fhs_of[ino]
                if ino in self.times_dirty:     # its owed mtime, from the fd
                    del self.times_dirty[ino]
                    node = self.nodes.get(ino)
                    if node is not None and node.paths:
                        self._stamp(node.paths[0], os.fstat(fh).st_mtime_ns)
        finally:
            if fh not in self.flushing:     # else a flush of it runs, the serve lock
                os.close(fh)                # let go, and closes it after

    # -- changes made to the backing directory behind the mount's back ----------------
    def repair(self, batch) -> None:
        """Resend what other processes changed in the backing directory
        (events of :mod:`smirror.capture.mount.bypass`), on the mount's thread: in
        order with the mount's own ops."""
        from .bypass import events_to_repairs
        sent: set[bytes] = set()
        # directories whose entries changed: their mtimes go last (they may
        # be unknown to the mount's inode table, so not through times_dirty)
        self._touched_dirs = set()
        for kind, rel, new in events_to_repairs(batch):
            try:
                self._repair_one(kind, rel, new, sent)
            except ConfinementError as exc:
                # a symlink swapped in on the way: the symlink itself is an
                # event of its own (sent as a symlink); nothing is read through it
                self.refuse("repair", exc)
        for rel in sorted(self._touched_dirs, key=len, reverse=True):
            self._stamp(rel)

    def _repair_one(self, kind, rel, new, sent) -> None:
        if kind == "moved":
            sent.clear()
            if self._lexists(new) and not self._lexists(rel):
                self._out(Op.rename(0, rel, new))
                self._moved(rel, new)
                self._touched_dirs.add(self._parent(rel))
                self._touched_dirs.add(self._parent(new))
            else:
                self._resend_repair(rel, tree=True)
                self._resend_repair(new, tree=True)
        elif kind == "attrs":
            self._resend_repair(rel, content=False)
        elif rel not in sent:
            sent.add(rel)
            self._resend_repair(rel, tree=kind == "tree")

    def _resend_repair(self, rel: bytes, **how) -> None:
        self._links = _ResendLinks(rel)
        self._resend(rel, **how)

    def resend_to(self, rel: bytes, emit) -> None:
        """``rel`` (a file or a subtree) removed and sent again whole, to
        ``emit`` only (a target's resync), on the mount's thread."""
        saved = self.emit
        self.emit = emit
        self._touched_dirs = set()
        self._links = _ResendLinks(rel)
        try:
            self._out(Op.delete(0, rel))
            try:
                self._resend(rel, tree=True)
            except ConfinementError as exc:
                self.refuse("resync", exc)
            for parent in sorted(self._touched_dirs, key=len, reverse=True):
                self._stamp(parent)
        finally:
            self.emit = saved

    def stamp_dirs(self, rels, emit) -> None:
        """The mtimes of the directories ``rels`` (b"": the root), deepest
        first, to ``emit`` only: after a mirror whose ops changed their
        entries on the target (which gave them the time of applying)."""
        saved = self.emit
        self.emit = emit
        try:
            for rel in sorted(set(rels), key=len, reverse=True):
                self._stamp(rel)
        finally:
            self.emit = saved

    def _stamp(self, rel: bytes, mtime: int | None = None) -> None:
        """The current mtime of ``rel`` (b"": the root) as an op (``mtime``:
        already known, from an open fd of it)."""
        if mtime is None:
            try:
                mtime = self._lstat(rel).st_mtime_ns
            except (OSError, ConfinementError):
                return              # gone meanwhile: its removal is an op of its own
        if rel:
            self._out(Op.setattr(0, rel, mtime_ns=mtime))
        else:
            self._out(Op.mark(0, MARK_ROOT_MTIME, json.dumps({"mtime_ns": mtime}).encode()))

    def _resend(self, rel: bytes, *, tree: bool = False, content: bool = True) -> None:
        from smirror.fs.files import read_xattrs, xattr_filter
        read_under = None       # a file's: the times its bytes were read under
        try:
            st = self._lstat(rel)
        except FileNotFoundError:
            if rel:
                self._out(Op.delete(0, rel))      # the applier removes a file or a tree
                self._forget_tree(rel)
                self._touched_dirs.add(self._parent(rel))
            return
        if rel:
            mode = stat.S_IMODE(st.st_mode)
            if content:
                if stat.S_ISDIR(st.st_mode):
                    self._out(Op.mkdir(0, rel, mode))
                elif stat.S_ISREG(st.st_mode):
                    read_under = self._resend_file(rel, mode, st)
                elif stat.S_ISLNK(st.st_mode):
                    with self._at(rel) as (dfd, name):
                        self._out(Op.symlink(0, rel, os.readlink(name, dir_fd=dfd)))
                else:
                    self._out(Op.mknod(0, rel, st.st_mode, st.st_rdev))
                self._touched_dirs.add(self._parent(rel))
            self._out(Op.setattr(0, rel, mode=None if stat.S_ISLNK(st.st_mode) else mode,
                                 uid=st.st_uid, gid=st.st_gid))
            with self._at(rel) as (dfd, name):
                xattrs = read_xattrs(proc_path(dfd, name), xattr_filter())
            for name, value in xattrs.items():
                self._out(Op.setxattr(0, rel, os.fsencode(name), value))
        if tree and stat.S_ISDIR(st.st_mode):
            dfd = self._opendir(rel)
            try:
                names = sorted(map(os.fsencode, os.listdir(dfd)))
            finally:
                os.close(dfd)
            for name in names:
                self._resend(rel + b"/" + name if rel else name, tree=True)
        # last: what was resent inside changed the target's mtime; a file's
        # is the one its bytes were read under, never a later lstat's (that
        # of a write the read may have missed)
        self._stamp(rel, read_under.st_mtime_ns if read_under is not None else None)

    def _resend_file(self, rel: bytes, mode: int, st):
        """CREATE and WRITEs of ``rel``'s bytes; returns the fstat they
        were read under (None: sent under another name of its inode)."""
        from smirror.fs.files import wait_for_writes
        if st.st_nlink > 1:
            other, sent = self._linked_name(rel, st)
            if other is not None:
                # one inode on the target too; its bytes there may hold
                # writes the target skipped: sent again (CREATE truncates
                # the linked inode in place) unless sent in this resend
                self._out(Op.hardlink(0, rel, other))
                if sent:
                    return None
        fd = self.base.open(rel, os.O_RDONLY)
        try:
            read_under = os.fstat(fd)
            # a write whose times that holds may still be copying its bytes
            wait_for_writes(fd)
            self._out(Op.create(0, rel, mode))
            off = 0
            while True:
                data = os.pread(fd, 1 << 20, off)
                if not data:
                    break
                self._out(Op.write(0, rel, off, data))
                off += len(data)
        finally:
            os.close(fd)
        return read_under

    def _linked_name(self, rel: bytes, st) -> tuple[bytes | None, bool]:
        """Another name of the hard-linked file ``rel`` that the target
        holds: one sent earlier in this resend (True: its bytes too), or
        one outside the subtree resent (False), from the inode table, else
        from one walk of the backing tree. (None, False): the first name."""
        links = self._links
        key = (st.st_dev, st.st_ino)
        if key in links.sent:
            return links.sent[key], True
        links.sent[key] = rel
        node = self.nodes.get(self._ino(st.st_ino))
        for p in node.paths if node is not None else ():
            if not links.inside(p) and self._same_inode(p, key):
                return p, False
        if links.outside is None:
            links.outside = self._linked_names_outside(links)
        found = links.outside.get(key)
        return (found, False) if found is not None and self._same_inode(found, key) else (None, False)

    def _same_inode(self, rel: bytes, key: tuple) -> bool:
        try:
            st = self._lstat(rel)
        except (OSError, ConfinementError):
            return False
        return (st.st_dev, st.st_ino) == key

    def _linked_names_outside(self, links: _ResendLinks) -> dict:
        """(dev, ino) -> a name, for every hard-linked regular file of the
        backing tree outside the subtree resent."""
        found: dict = {}
        stack = [b""]
        while stack:
            d = stack.pop()
            try:
                fd = self._opendir(d)
            except (OSError, ConfinementError):
                continue            # gone meanwhile
            try:
                with os.scandir(fd) as it:
                    for e in it:
                        rel = d + b"/" + os.fsencode(e.name) if d else os.fsencode(e.name)
                        if links.inside(rel):
                            continue
                        try:
                            est = e.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        if stat.S_ISDIR(est.st_mode):
                            stack.append(rel)
                        elif stat.S_ISREG(est.st_mode) and est.st_nlink > 1:
                            found.setdefault((est.st_dev, est.st_ino), rel)
            finally:
                os.close(fd)
        return found

    def _forget_tree(self, rel: bytes) -> None:
        prefix = rel + b"/"
        for node in self.nodes.values():
            had = bool(node.paths)
            node.paths[:] = [p for p in node.paths if p != rel and not p.startswith(prefix)]
            if had and not node.paths:
                node.generation += 1        # removed behind the mount's back (see _Node)
