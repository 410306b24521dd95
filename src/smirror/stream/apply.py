"""The applier: ops of one connection applied, in sequence order, to the
tree under its map base.

Every path is resolved beneath a directory handle of the map base, opened
once (:mod:`smirror.fs.beneath`): the parent directory of each op's path is
resolved afresh, refusing any symlink on the way, and the op acts on the
final name with ``dir_fd`` and without following it. No absolute path, no
``..``, no symlink (whoever put it there, whenever) leads an op out of the
map base; a refused op raises :class:`~smirror.errors.ConfinementError`
naming the op and path and nothing of it is applied. Only descriptors of
open regular files are kept between ops (writing to one cannot escape).

Setuid and setgid bits are stripped from the modes of CREATE, MKDIR and
SETATTR unless the connection allows them (``allow_setid``): the stream does
not decide what a root daemon makes setuid. In the same spirit the target
decides which extended attributes it stores (``xattr_namespaces``: by default
``user.*`` and the POSIX ACLs ``system.posix_acl_*``; ``security.capability``
only with ``allow_setid``; anything beyond ``user.*`` only as root) and
whether it makes device nodes (``allow_devices``); what it refuses is
counted in ``stats`` and logged once, and the stream goes on. XATTR ops act
on the object itself, never following a symlink: an open file's descriptor,
else the name in its parent's handle through /proc (the xattr calls take
no ``dir_fd``).

The sequence number of the last applied op is stored after every op in a
small memory-mapped state file (an aligned 8-byte store: no syscall, and a
SIGKILL cannot tear it; the page cache keeps it). On restart, ops up to it
are skipped, so none is applied twice, except the one op that was applied
when the process died before recording it.

Durability (power loss, not only SIGKILL): the applier notes every file and
directory an op changed; :meth:`Applier.sync_durable` fsyncs them, then
records the applied seq as *synced* in the state file (with this boot's id)
and fsyncs that. A restart in the same boot trusts the applied seq (the page
cache survived); after a reboot, or when the state file lost its unsynced
writes, only the synced seq counts and the ops after it are applied again
(replayed: every op kind accepts what a later op already did, and a
divergence asks for a resync instead of looping). An empty or all-zero state
file (its creation lost) means "nothing applied": the stream resumes from
what the target's queue or the source still hold. Every op kind is idempotent when
replayed right after itself: a rename whose source is gone but whose
destination exists, a delete of a missing path, a create over the file it
created are all accepted. What the
tree lacks although the stream says it should be there (a write to a file
that is missing on the target because someone removed it) is repaired and
counted in ``stats['repairs']``.

What a DELETE, RMDIR or RENAME removes is freed by the process's
:mod:`~smirror.stream.reclaim` threads (the blocks of a synced file cost
1-2 ms to free here), and a frame of a watcher's stream is coalesced first
(:meth:`Applier.plan`: changes a later op of the frame makes moot, writes
next to each other merged); a stream in exact order (library API, mount) is
applied op by op, so every state a kill can show is a prefix of it.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import stat
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

from smirror.errors import ApplyError, ConfinementError
from smirror.fs.beneath import RENAME_EXCHANGE, Beneath, chmod_at, lstat_at, proc_path, renameat2, rmtree_at
from smirror.fs.files import replace_at
from smirror.ops import (
    K_CREATE,
    K_DELETE,
    K_HARDLINK,
    K_MARK,
    K_MKDIR,
    K_MKNOD,
    K_RENAME,
    K_RMDIR,
    K_SYMLINK,
    K_TASK,
    K_WRITE,
    MARK_ROOT_MTIME,
    AttrMask,
    Op,
    OpKind,
    RenameFlag,
    XattrFlag,
)
from smirror.stream import reclaim

log = logging.getLogger("smirror.stream.apply")

_OPEN_FILES = 64           # write fds kept open between ops of the same file
_STATE_MAGIC_V1 = b"SMAPPLY1"   # magic + applied u64 (before the synced seq)
_STATE_MAGIC_V2 = b"SMAPPLY2"   # magic + applied u64 + synced u64 + boot id (16)
_STATE_MAGIC = b"SMAPPLY3"      # ... + reserved u64: no op past it was applied
_STATE_SIZES = {_STATE_MAGIC_V1: 16, _STATE_MAGIC_V2: 40, _STATE_MAGIC: 48}
_STATE_SIZE = 48
_SEQ = struct.Struct("<Q")
_SYNCED_AT = 16
_BOOT_AT = 24
_RESERVED_AT = 40
# ops applied past a reservation before the next one is made durable (one
# msync of the state file): after a power loss, which took the applied seq
# with it, ops up to the reservation may have been applied (_settle_unsynced)
RESERVE_OPS = 1024
# files held for the next durable pass before it is done early (descriptors)
DIRTY_MAX = 256
# op kinds that change the entries of their parent directory (and path2's)
_ENTRY_KINDS = frozenset({OpKind.CREATE, OpKind.MKDIR, OpKind.DELETE, OpKind.RMDIR,
                          OpKind.RENAME, OpKind.SYMLINK, OpKind.HARDLINK, OpKind.MKNOD})
_DATA_KINDS = frozenset({OpKind.WRITE, OpKind.TRUNCATE, OpKind.CREATE})
_INODE_KINDS = frozenset({OpKind.SETATTR, OpKind.XATTR})
_SETID = stat.S_ISUID | stat.S_ISGID
# ops that replace or remove what their path names: never the map base itself
# (b""); MKDIR and SETATTR of b"" act on the map base directory
_NAMED = {OpKind.WRITE, OpKind.TRUNCATE, OpKind.CREATE, OpKind.DELETE, OpKind.RMDIR,
          OpKind.RENAME, OpKind.SYMLINK, OpKind.HARDLINK, OpKind.MKNOD}
_TWO_PATHS = {OpKind.RENAME, OpKind.HARDLINK}
_MAKES_NAME = frozenset({K_CREATE, K_MKDIR, K_SYMLINK, K_MKNOD})
_NO_PATH = frozenset({K_TASK, K_MARK})
_REMOVES = frozenset({K_DELETE, K_RMDIR})
# O_NONBLOCK: a fifo someone put there fails (ENXIO) instead of blocking the applier
_WRITE_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# the xattr names a target stores unless configured otherwise: user data and
# ACLs (security.* could carry file capabilities, trusted.* is the admin's)
DEFAULT_XATTR_NAMESPACES = (b"user.", b"system.posix_acl_")
ALL_XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
_CAPABILITY = b"security.capability"
_DEVICES = (stat.S_IFCHR, stat.S_IFBLK)
# an O_PATH descriptor: keeps an inode alive, gives no access to its data
_HOLD_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# a full disk: space the reclaimer has not freed yet may be what is missing
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_RUN_MAX = 1024             # writes merged into one pwritev at most (IOV_MAX)
# ops that end what the coalescing knows of paths: anything may have moved
_FORGET_ALL = {OpKind.RENAME, OpKind.RMDIR, OpKind.TASK, OpKind.MARK}


class Moot:
    """An op a later op of the same frame makes moot (:meth:`Applier.plan`):
    applying it counts it and changes nothing, not even the applied seq
    (the later step records a higher one; a restart before that replays
    it, which is harmless)."""
    __slots__ = ("op", "seq", "kind", "path", "path2")

    def __init__(self, op: Op):
        self.op, self.seq, self.kind, self.path, self.path2 = op, op.seq, op.kind, op.path, op.path2


class WriteRun:
    """WRITEs next to each other in a frame, to one file at contiguous
    offsets: applied with one pwritev, recorded at the last one's seq."""
    __slots__ = ("ops", "seq", "path", "offset")
    kind = OpKind.WRITE
    path2 = b""

    def __init__(self, ops: list):
        self.ops, self.seq, self.path, self.offset = ops, ops[-1].seq, ops[0].path, ops[0].offset


def boot_id() -> bytes:
    """This boot's id (16 bytes): a state written in another boot may have
    lost whatever was not synced."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return bytes.fromhex(f.read().strip().decode().replace("-", ""))[:16].ljust(16, b"\0")
    except (OSError, ValueError):
        return b"\0" * 16


def _open_state(path) -> tuple[mmap.mmap, int]:
    """The applied-sequence file (magic, applied u64, synced u64, boot id),
    mapped read-write, and its descriptor (kept open: its fdatasync is
    the map's msync, with the GIL let go, which mmap.flush keeps held). A
    file that is empty or zeros (its first write lost to a power loss)
    starts again at 0; the one-seq file of an older smirror is carried
    over (its seq counts as synced: it knew no better)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        data = os.pread(fd, 4096, 0)
        magic = data[:8]
        if not data.strip(b"\0"):
            fresh = _STATE_MAGIC + bytes(_STATE_SIZE - 8)
        elif magic in _STATE_SIZES and len(data) != _STATE_SIZES[magic]:
            raise ApplyError(f"{os.fsdecode(path)}: applied-sequence file has {len(data)} bytes, "
                             f"expected {_STATE_SIZES[magic]}")
        elif magic == _STATE_MAGIC_V1:
            seq = data[8:16]
            fresh = _STATE_MAGIC + seq + seq + bytes(16) + seq
        elif magic == _STATE_MAGIC_V2:
            fresh = _STATE_MAGIC + data[8:40] + data[8:16]     # reserved: the applied seq
        elif magic == _STATE_MAGIC:
            fresh = None
        else:
            raise ApplyError(f"{os.fsdecode(path)}: not an applied-sequence file (bad magic "
                             f"{data[:8]!r})")
        if fresh is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, fresh, 0)
            os.fsync(fd)
            _fsync_parent(path)
        state = mmap.mmap(fd, _STATE_SIZE)
    except BaseException:
        os.close(fd)
        raise
    return state, fd


FUSE_SUPER_MAGIC = 0x65735546
_libc = None


def _libc_fn():
    global _libc
    if _libc is None:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def on_fuse(fd: int) -> bool:
    """Whether the directory ``fd`` (any kind of descriptor) is on FUSE,
    where syncfs(2) does not reach the daemon that holds the data."""
    import ctypes
    buf = ctypes.create_string_buffer(256)          # struct statfs; f_type first
    dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    try:
        if _libc_fn().fstatfs(dfd, buf) != 0:
            return True             # unknown: the careful way (file by file)
        return struct.unpack_from("<q", buf.raw)[0] == FUSE_SUPER_MAGIC
    finally:
        os.close(dfd)


def _syncfs(fd: int) -> bool:
    """syncfs(2) of the file system of ``fd`` unless it is FUSE; False when
    not done."""
    if on_fuse(fd):
        return False
    return syncfs(fd)


def syncfs(fd: int) -> bool:
    """syncfs(2) of the file system of the directory ``fd``; False on an
    error (a writeback error since the last call, Linux >= 5.8)."""
    dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    try:
        return _libc_fn().syncfs(dfd) == 0
    finally:
        os.close(dfd)


def _fsync_held(fd: int) -> None:
    """fsync of a file or directory the applier holds open. One removed
    since it was noted needs nothing: a file system that answers ENOENT
    for it (a FUSE server that finds it by name) is taken at its word."""
    try:
        os.fsync(fd)
    except FileNotFoundError:
        pass


def _fsync_parent(path) -> None:
    dfd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Applier:
    """Applies ops to ``map_base``. ``on_task(op)`` / ``on_mark(op)`` are
    called when the applier reaches a TASK or MARK op (every earlier op
    applied, no later one yet). ``allow_setid``: keep setuid/setgid bits
    the stream sends (the embedded engine's own data); otherwise they are
    stripped, counted in ``stats['setid_stripped']`` and logged once.
    ``xattr_namespaces``: name prefixes of the extended attributes stored
    (bytes or str; ``security.capability`` needs ``allow_setid`` too, and
    a process that is not root stores ``user.*`` only); ``allow_devices``:
    make the character and block devices the stream sends. Refused ones
    are counted in ``stats['xattrs_refused']`` / ``['devices_refused']``."""

    def __init__(self, map_base, *, state_path=None, owner: bool | None = None,
                 on_task=None, on_mark=None, create_base: bool = True,
                 allow_setid: bool = False, name: str = "",
                 xattr_namespaces=DEFAULT_XATTR_NAMESPACES, allow_devices: bool = False):
        base = os.fsencode(os.path.abspath(os.fsencode(map_base)))
        if create_base:
            os.makedirs(base, exist_ok=True)
        elif not os.path.isdir(base):
            raise ApplyError(f"map base {base!r} is not a directory")
        self.base = Beneath(base)
        self.owner = (os.geteuid() == 0) if owner is None else owner
        self.allow_setid = allow_setid
        self.xattr_namespaces = tuple(os.fsencode(n) for n in xattr_namespaces)
        self.allow_devices = allow_devices
        self._root = os.geteuid() == 0
        self.name = name or os.fsdecode(base)
        self.on_task = on_task
        self.on_mark = on_mark
        self._fds: OrderedDict[bytes, int] = OrderedDict()
        # removed inodes are freed by the process's reclaimer threads
        self.reclaimer = reclaim.shared()
        # coalesced: ops applied as part of another (moot, or in a run);
        # files_opened: files opened for writing (the descriptor cache's misses)
        self.stats = {"ops": 0, "bytes": 0, "repairs": 0, "skipped": 0, "setid_stripped": 0,
                      "xattrs_refused": 0, "devices_refused": 0, "coalesced": 0, "barriers": 0,
                      "files_opened": 0}
        self._state = None
        self._state_fd = -1
        self.applied_seq = 0
        self.synced_seq = 0         # applied and made durable (sync_durable)
        self.replay_until = 0       # applied before a restart that lost their sync: replayed
        self._reserved = 0          # no op past it applied (RESERVE_OPS)
        # the map base on a local file system: one syncfs per durable pass
        # covers every file changed (thousands of small files cost one
        # call); on FUSE each changed file and directory is fsynced instead
        self.use_syncfs = not on_fuse(self.base.fd)
        self._changed = False
        # what the next durable pass syncs: descriptors of the files changed
        # (dup'd: a rename or close does not lose them), the cached write
        # fds already noted, the directories whose entries changed
        self._dirty_files: list[int] = []
        self._noted: set[int] = set()
        self._dirty_dirs: dict[bytes, None] = {}
        # what ops since the last durable pass touched: their paths, the
        # directories above those, the names a RENAME moved away, the names
        # a DELETE or RMDIR removed (_barrier)
        self._touched: set[bytes] = set()
        self._touched_above: set[bytes] = set()
        self._moved_away: set[bytes] = set()
        self._removed_names: set[bytes] = set()
        self._boot = boot_id()
        if state_path is not None:
            self._state, self._state_fd = _open_state(state_path)
            self.applied_seq = _SEQ.unpack_from(self._state, 8)[0]
            self.synced_seq = _SEQ.unpack_from(self._state, _SYNCED_AT)[0]
            self._reserved = _SEQ.unpack_from(self._state, _RESERVED_AT)[0]
            boot = bytes(self._state[_BOOT_AT:_BOOT_AT + 16])
            if self.synced_seq > self.applied_seq:
                self.applied_seq = self.synced_seq      # (the applied store was lost)
            same_boot = boot == self._boot or not boot.strip(b"\0")
            # in this boot the applied seq is right (the page cache kept it);
            # after a reboot it may be lost: ops up to the reservation may
            # have been applied
            maybe = self.applied_seq if same_boot else max(self.applied_seq, self._reserved)
            if maybe > self.synced_seq:
                try:
                    self._settle_unsynced(same_boot, maybe)
                except BaseException:
                    # the mapping goes with this object; its descriptor
                    # would not (a start retried after each failure)
                    os.close(self._state_fd)
                    raise
        self._dispatch = {
            OpKind.WRITE: self._write, OpKind.TRUNCATE: self._truncate,
            OpKind.CREATE: self._create, OpKind.MKDIR: self._mkdir,
            OpKind.DELETE: self._delete, OpKind.RMDIR: self._rmdir,
            OpKind.RENAME: self._rename, OpKind.SETATTR: self._setattr,
            OpKind.SYMLINK: self._symlink, OpKind.HARDLINK: self._hardlink,
            OpKind.TASK: self._task, OpKind.MARK: self._mark,
            OpKind.XATTR: self._xattr, OpKind.MKNOD: self._mknod,
        }

    @property
    def root(self) -> bytes:
        return self.base.root

    def apply(self, op: Op | Moot | WriteRun) -> None:
        """Apply one op, or one step of :meth:`plan` (a :class:`Moot` op,
        a :class:`WriteRun`), and record its seq."""
        cls, count = op.__class__, 1
        if cls is Moot:             # (plan makes only ops past the applied seq moot)
            self.stats["coalesced"] += 1
            self.stats["ops"] += 1
            return
        if op.seq <= self.applied_seq:
            self.stats["skipped"] += 1        # applied before a restart
            return
        if cls is WriteRun:
            count = len(cast(WriteRun, op).ops)
            self.stats["coalesced"] += count - 1
        do: Callable[[Any], None] = self._write_run if cls is WriteRun else self._dispatch[op.kind]
        if self._state is not None:
            if op.seq > self._reserved:
                self._reserve(op.seq)
            if (self._touched or self._moved_away) and self._barrier(op):
                self.sync_durable()
                self.stats["barriers"] += 1
        try:
            if op.kind in _NAMED and (not op.path or op.kind in _TWO_PATHS and not op.path2):
                raise ConfinementError("the map base itself cannot be its target", b"")
            try:
                do(op)
            except OSError as exc:
                if exc.errno not in _NO_SPACE or not self.reclaimer.pending:
                    raise
                # space of removed files is still being freed: wait for it
                # and try once more (an op replayed right after itself is
                # harmless)
                self.reclaimer.drain(timeout=30)
                do(op)
        except ConfinementError as exc:
            raise ConfinementError(f"op seq {op.seq} {OpKind(op.kind).name} refused: {exc}",
                                   getattr(exc, "path", op.path)) from None
        except OSError as exc:
            raise ApplyError(f"op seq {op.seq} {OpKind(op.kind).name} {bytes(op.path)!r} "
                             f"failed on the target: {exc.strerror or exc}") from exc
        self._note(op)
        if self._state is not None:
            self._touch(op)
        self._applied(op.seq, count)

    # -- durability ----------------------------------------------------------
    # Replay after a restart that lost unsynced writes (_settle_unsynced)
    # applies the ops after the synced seq again, in order, over a tree whose
    # names may hold a later state (a file system makes names durable apart
    # from data). Every op kind is idempotent in order over such a tree,
    # except where an op moves or aliases an inode that an earlier op of the
    # same unsynced stretch reached by another name: replayed, that earlier
    # op finds the name gone (a WRITE makes a new empty file there, which
    # the RENAME then moves over the real one) or finds another inode
    # there. The same where a rename moves an inode into a directory whose
    # name an earlier op of the stretch removed (and made again): replayed,
    # the removal finds that inode there and takes it along. So such an op
    # first makes everything before it durable (a barrier): then no
    # unsynced stretch holds both, and the replay is exact, without asking
    # the source for anything.
    def _reserve(self, seq: int) -> None:
        """Record, durably, that no op past ``seq + RESERVE_OPS`` is applied
        before the next reservation."""
        assert self._state is not None
        self._reserved = seq + RESERVE_OPS
        _SEQ.pack_into(self._state, _RESERVED_AT, self._reserved)
        self._flush_state()

    def _flush_state(self) -> None:
        """The state file's mapped writes made durable. Linux's msync
        (MS_SYNC) of a shared file mapping is an fdatasync of the file;
        mmap.flush() holds the GIL for it (CPython's msync call), which stalls
        every other thread of the process (the capture mount's, in the
        library) for the length of a disk flush."""
        os.fdatasync(self._state_fd)

    def _barrier(self, op) -> bool:
        """Whether ``op`` needs every op before it durable first (above)."""
        kind = op.kind
        if kind == K_RENAME:
            old, new = bytes(op.path), bytes(op.path2)
            return self._reached(old) or self._reached(new) or new in self._moved_away \
                or self._under_removed(new)
        if kind == K_HARDLINK:
            new = bytes(op.path)
            return self._reached(new) or new in self._moved_away
        if kind in _MAKES_NAME:
            return bytes(op.path) in self._moved_away
        if kind == K_DELETE:
            # a file with other names: the replayed writes by this name must
            # reach the inode the others keep
            rel = bytes(op.path)
            if rel not in self._touched:
                return False
            try:
                return os.lstat(self.base.root + b"/" + rel).st_nlink > 1
            except OSError:
                return False
        return False

    def _under_removed(self, rel: bytes) -> bool:
        """A directory above ``rel`` is a name an op since the last durable
        pass removed (and made again): replayed, that removal finds what a
        rename moved in there since, and takes it along."""
        above = rel.rpartition(b"/")[0]
        while above:
            if above in self._removed_names:
                return True
            above = above.rpartition(b"/")[0]
        return False

    def _reached(self, rel: bytes) -> bool:
        """An op since the last durable pass touched ``rel`` or something under it."""
        return rel in self._touched or rel in self._touched_above

    def _touch(self, op) -> None:
        if op.kind in _NO_PATH:
            return
        paths = (bytes(op.path), bytes(op.path2)) if op.kind in _TWO_PATHS else (bytes(op.path),)
        for rel in paths:
            if rel in self._touched:
                continue
            self._touched.add(rel)
            above = rel.rpartition(b"/")[0]
            while above and above not in self._touched_above:
                self._touched_above.add(above)
                above = above.rpartition(b"/")[0]
        if op.kind == K_RENAME:
            self._moved_away.add(bytes(op.path))
        elif op.kind in _REMOVES:
            self._removed_names.add(bytes(op.path))

    def _settle_unsynced(self, same_boot: bool, maybe: int) -> None:
        """At start, ops were (``maybe``: may have been, up to that seq)
        applied after the last synced seq and this process does not know
        which files they changed. In the same boot on a local file system
        their data is in the page cache: syncfs makes it durable. After a
        reboot (it may be lost), or on a FUSE file system (syncfs does not
        reach its daemon), they are applied again."""
        if same_boot and _syncfs(self.base.fd):
            self.sync_durable()
            return
        log.warning("%s: ops after seq %d (up to %d at most) may have been applied but not "
                    "synced (%s): they are applied again from seq %d", self.name, self.synced_seq,
                    maybe, "the machine restarted" if not same_boot else
                    "no syncfs on this file system", self.synced_seq + 1)
        # ops up to here are applied again over a tree that may hold a later
        # state: exact (the barriers), and what needs repair is resynced
        self.replay_until = maybe
        self.applied_seq = self.synced_seq
        assert self._state is not None
        _SEQ.pack_into(self._state, 8, self.applied_seq)

    def _note(self, op) -> None:
        """Remember what ``op`` changed for the next durable pass."""
        if self.use_syncfs:
            self._changed = True
            return
        kind = op.kind
        if kind in _DATA_KINDS:
            fd = self._fds.get(bytes(op.path))
            if fd is not None:
                self._note_fd(fd)
        elif kind in _INODE_KINDS:
            self._note_inode(bytes(op.path))
        if kind in _ENTRY_KINDS:
            self._note_dir(bytes(op.path).rpartition(b"/")[0])
            if kind in _TWO_PATHS:
                self._note_dir(bytes(op.path2).rpartition(b"/")[0])
        if len(self._dirty_files) + len(self._dirty_dirs) > DIRTY_MAX:
            self._sync_noted()          # early: descriptors are not hoarded

    def _note_fd(self, fd: int) -> None:
        if fd not in self._noted:
            self._noted.add(fd)
            self._dirty_files.append(os.dup(fd))

    def _note_inode(self, rel: bytes) -> None:
        """A SETATTR or XATTR changed the inode at ``rel``: its open write
        fd, else one opened for the pass (a symlink's, a fifo's attributes
        ride on the directory's sync)."""
        fd = self._fds.get(rel)
        if fd is not None:
            self._note_fd(fd)
            return
        try:
            fd = self.base.open(rel, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except (OSError, ConfinementError):
            return
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            self._dirty_files.append(fd)
            return
        os.close(fd)
        if stat.S_ISDIR(mode):
            # by name, opened at the pass: a directory held open and removed
            # meanwhile can give its inode number to a new one, and a FUSE
            # kernel then fails every call on the one held (EIO)
            self._note_dir(rel)

    def _note_dir(self, rel: bytes) -> None:
        self._dirty_dirs[rel] = None

    def _sync_noted(self) -> None:
        """fsync every file and directory noted since the last pass (or
        syncfs their file system once)."""
        if self._changed:
            self._changed = False
            if not syncfs(self.base.fd):
                self._changed = True
                raise OSError(f"syncfs of the map base {os.fsdecode(self.root)} failed (a "
                              f"writeback error): ops applied since the last pass are not durable")
        files, self._dirty_files = self._dirty_files, []
        self._noted.clear()
        while files:
            try:
                _fsync_held(files[-1])
            except BaseException:
                self._dirty_files[:0] = files       # not synced: the next pass tries again
                raise
            os.close(files.pop())
        dirs = self._dirty_dirs
        for rel in list(dirs):
            try:
                fd = self.base.open(rel, os.O_RDONLY | os.O_DIRECTORY)
            except (OSError, ConfinementError):
                del dirs[rel]
                continue        # removed or moved since: its parent's entry says so
            try:
                _fsync_held(fd)
            finally:
                os.close(fd)
            del dirs[rel]

    def sync_durable(self) -> int:
        """Make every op applied so far durable: the files and directories
        they changed are fsynced, then the applied seq is recorded as
        synced (with this boot's id) and the state file fsynced. Returns
        that seq. Call it between ops (the applier's own thread, or with
        the applier held)."""
        self._sync_noted()
        seq = self.applied_seq
        if self._state is not None and (seq != self.synced_seq or
                                        bytes(self._state[_BOOT_AT:_BOOT_AT + 16]) != self._boot):
            _SEQ.pack_into(self._state, _SYNCED_AT, seq)
            self._state[_BOOT_AT:_BOOT_AT + 16] = self._boot
            self._flush_state()
        self.synced_seq = seq
        self._touched.clear()
        self._touched_above.clear()
        self._moved_away.clear()
        self._removed_names.clear()
        return seq

    def _applied(self, seq: int, count: int) -> None:
        self.applied_seq = seq
        if self._state is not None:
            _SEQ.pack_into(self._state, 8, seq)
        self.stats["ops"] += count

    def apply_all(self, ops) -> None:
        for op in ops:
            self.apply(op)

    def plan(self, ops, coalesce: bool):
        """The steps that apply the ops of one frame (each op past the
        applied seq once, in order): ``ops`` itself unless ``coalesce``.

        With ``coalesce`` (only for a stream whose capture promises per-file
        order, a watcher's: the states between two frames' ends are not
        promised to be any moment of the source, so a kill inside a frame
        may show one that never was; never for the library API or the
        mount, whose every prefix is a source state):

        * the WRITEs, TRUNCATEs, SETATTRs and XATTRs of a file that a
          CREATE of this frame made and a DELETE of it removes become
          :class:`Moot` (the file's last name before the frame, if it had
          one: a file with other names keeps them all);
        * a SETATTR that a later one of the frame on the same path covers
          (every attribute it sets, set again) becomes Moot;
        * WRITEs next to each other to one file at contiguous offsets
          become one :class:`WriteRun`.

        A RENAME, RMDIR, HARDLINK, TASK or MARK ends what is known of every
        path (a task point is a barrier: nothing moves across it); names a
        HARDLINK of the frame shares are never taken for a file's only one. The frame's end state is
        the same as applying op by op; a restart inside it replays from
        the seq recorded, which the ops that made others moot follow."""
        if not coalesce or len(ops) < 2:
            return ops
        applied = self.applied_seq
        moot = self._moot(ops, applied)
        steps: list = []
        append = steps.append
        i, n = 0, len(ops)
        WRITE = K_WRITE
        while i < n:
            op = ops[i]
            if i in moot:
                append(Moot(op))
                i += 1
                continue
            if op.kind != WRITE or op.seq <= applied or i + 1 == n:
                append(op)
                i += 1
                continue
            # the writes that follow, over moot ops between them
            run, end, path, last, j = [op], op.offset + len(op.data), op.path, i, i + 1
            while j < n and len(run) < _RUN_MAX:
                if j not in moot:
                    nx = ops[j]
                    if nx.kind != WRITE or nx.offset != end or nx.path != path:
                        break
                    run.append(nx)
                    end += len(nx.data)
                    last = j
                j += 1
            if last == i:
                append(op)
            else:
                append(WriteRun(run))
                steps.extend(Moot(ops[k]) for k in range(i + 1, last) if k in moot)
            i = last + 1
        return steps

    def _moot(self, ops, applied: int) -> set:  # noqa: C901 - one rule per op kind
        """Indexes of the ops of a frame that later ops make moot (plan)."""
        moot: set[int] = set()
        life: dict = {}         # path -> its ops since a CREATE in this frame
        attrs: dict = {}        # path -> index of its last SETATTR, not covered yet
        shared: set = set()     # names a HARDLINK of this frame gave an inode
        K = OpKind
        changes = (K.WRITE, K.TRUNCATE, K.XATTR)
        SETATTR, CREATE, DELETE = K.SETATTR, K.CREATE, K.DELETE
        for i, op in enumerate(ops):
            if op.seq <= applied:
                continue
            k, p = op.kind, op.path
            if k in changes:
                mine = life.get(p)
                if mine is not None:
                    mine.append(i)
            elif k == SETATTR:
                j = attrs.get(p)
                if j is not None and not ops[j].mask & ~op.mask:
                    moot.add(j)
                attrs[p] = i
                mine = life.get(p)
                if mine is not None:
                    mine.append(i)
            elif k == CREATE:
                life[p] = []
                attrs.pop(p, None)
            elif k == DELETE:
                mine = life.pop(p, None)
                if mine and p not in shared and self._single_name(p):
                    moot.update(mine)
                if mine is None:
                    attrs.clear()       # (a directory's subtree, maybe)
                else:
                    attrs.pop(p, None)
            elif k == K.HARDLINK:
                # both names (and, moved, any name) may share an inode now
                shared.update((p, op.path2))
                life.clear()
                attrs.clear()
            elif k in _FORGET_ALL:
                if k == K.RENAME and shared:
                    shared.add(op.path2)
                    if any(q.startswith(p + b"/") for q in shared):
                        return moot     # a directory of shared names moved: no more
                life.clear()
                attrs.clear()
            else:                       # MKDIR, SYMLINK, MKNOD: something new at p
                life.pop(p, None)
                attrs.pop(p, None)
        return moot

    def _single_name(self, rel) -> bool:
        """Whether a CREATE of ``rel`` in the frame being planned made a
        file no other name shares: there was none before the frame, or
        one with a single name (its CREATE truncates that inode in place)."""
        try:
            st = os.lstat(self.base.root + b"/" + bytes(rel))
        except OSError:
            return True
        return not stat.S_ISREG(st.st_mode) or st.st_nlink == 1

    def flush(self) -> None:
        """Close cached file descriptors (data stays in the page cache; the
        next durable pass syncs it through the descriptors it noted)."""
        while self._fds:
            self._close_cached(self._fds.popitem()[1])

    def close_files(self) -> None:
        """Close every descriptor of a file this applier holds: the cached
        ones, and the ones noted for the next durable pass (synced first),
        so that a lease check finds no holder of ours."""
        self.flush()
        self._sync_noted()

    def _close_cached(self, fd: int) -> None:
        self._noted.discard(fd)         # its number may come back for another file
        os.close(fd)

    def sync(self) -> None:
        """Flush written data, then the applied sequence, to stable storage."""
        self.sync_durable()
        self.flush()

    def close(self) -> None:
        self.flush()
        for fd in self._dirty_files:
            os.close(fd)
        self._dirty_files, self._dirty_dirs = [], {}
        # (the reclaimer is the process's: it goes on closing what it holds)
        if self._state is not None:
            if self.synced_seq == self.applied_seq and self._reserved > self.applied_seq:
                # all durable: a reboot after this clean stop has nothing to replay
                self._reserved = self.applied_seq
                _SEQ.pack_into(self._state, _RESERVED_AT, self._reserved)
                self._flush_state()
            self._state.close()
            self._state = None
            os.close(self._state_fd)
        self.base.close()

    def release(self, rel: bytes) -> None:
        """Close what this applier holds open at or under ``rel`` (before
        the path is moved away from the map base)."""
        self._drop(bytes(rel), subtree=True)

    def open_path(self, rel, flags: int = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY) -> int:
        """A descriptor of ``rel`` opened beneath the map base, the final
        name not followed (for the in-use gate's lease)."""
        return self.base.open(bytes(rel), flags)

    # -- helpers -----------------------------------------------------------
    def _mode(self, mode: int, rel: bytes) -> int:
        """``mode`` without setuid/setgid unless this connection allows them."""
        if mode & _SETID and not self.allow_setid:
            self.stats["setid_stripped"] += 1
            if self.stats["setid_stripped"] == 1:
                log.warning("%s: setuid/setgid bits stripped from %r (mode %o) and from any later "
                            "op: allow them with [target] setid_map_bases", self.name,
                            os.fsdecode(rel), mode)
            return mode & ~_SETID
        return mode

    def _refuse(self, counter: str, message: str, *args) -> None:
        """Count what this target's configuration does not let through;
        the first one of each kind is logged."""
        self.stats[counter] += 1
        if self.stats[counter] == 1:
            log.warning("%s: " + message + " (and any later one)", self.name, *args)

    def xattr_allowed(self, name: bytes) -> bool:
        """Whether this target stores the extended attribute ``name``."""
        if not self._root and not name.startswith(b"user."):
            return False              # the kernel keeps the rest for root
        if name == _CAPABILITY and not self.allow_setid:
            return False              # file capabilities: like a setuid bit
        return name.startswith(self.xattr_namespaces)

    def _fd(self, rel: bytes, create_missing: bool = True) -> int:
        fd = self._fds.get(rel)
        if fd is not None:
            if os.fstat(fd).st_nlink:
                self._fds.move_to_end(rel)
                return fd
            # removed behind the target's back while cached: written
            # through, the op would land in a file without a name; by
            # name it finds the file missing (a divergence, resynced)
            self._close_cached(self._fds.pop(rel))
        with self.base.at(rel) as (d, name):
            try:
                fd = os.open(name, _WRITE_FLAGS, dir_fd=d)
            except FileNotFoundError:
                if not create_missing:
                    raise
                self.stats["repairs"] += 1
                fd = os.open(name, _WRITE_FLAGS | os.O_CREAT, 0o600, dir_fd=d)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise ConfinementError(f"{rel!r} is a symlink on the target: not written "
                                           f"through", rel) from None
                raise
        self.stats["files_opened"] += 1
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ApplyError(f"{rel!r} on the target is not a regular file")
        self._fds[rel] = fd
        if len(self._fds) > _OPEN_FILES:
            self._close_cached(self._fds.popitem(last=False)[1])
        return fd

    def _drop(self, rel: bytes, subtree: bool = False) -> None:
        """Forget cached fds at (and under) ``rel``."""
        if subtree:
            prefix = rel + b"/"
            for key in [k for k in self._fds if k == rel or k.startswith(prefix)]:
                self._close_cached(self._fds.pop(key))
        else:
            fd = self._fds.pop(rel, None)
            if fd is not None:
                self._close_cached(fd)

    def _doomed(self, d: int, name: bytes) -> int | None:
        """An O_PATH descriptor of what stands at ``name`` when removing
        that name would free blocks (the last name of a file with blocks
        on disk, or a directory): removed with it held, it is freed by the
        reclaimer instead of inside the unlink. None otherwise."""
        try:
            fd = os.open(name, _HOLD_FLAGS, dir_fd=d)
        except OSError:
            return None             # missing (the op says how that ends), or a fifo's quirks
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) and st.st_nlink == 1 \
                and st.st_blocks:
            return fd
        os.close(fd)
        return None

    def _removed(self, held: int | None, done: bool) -> None:
        """The name ``held`` was taken from is gone (``done``): the
        reclaimer closes it; or it is not, and it is closed here."""
        if held is not None:
            if done:
                self.reclaimer.hold(held)
            else:
                os.close(held)

    def _clear_way(self, d: int, name: bytes, rel: bytes, keep_dir: bool) -> None:
        """Remove what stands at ``name`` unless it is (not) a directory as
        wanted; the stream says the source had nothing of that kind there."""
        st = lstat_at(d, name)
        if st is not None and stat.S_ISDIR(st.st_mode) != keep_dir:
            self.stats["repairs"] += 1
            self._drop(rel, subtree=True)
            rmtree_at(d, name)

    # -- op kinds ----------------------------------------------------------
    def _write(self, op: Op) -> None:
        fd = self._fd(bytes(op.path))
        data = op.data
        n = len(data)
        done = os.pwrite(fd, data, op.offset)
        while done < n:       # short writes happen on signals and full disks
            done += os.pwrite(fd, memoryview(data)[done:], op.offset + done)
        self.stats["bytes"] += n

    def _write_run(self, run: WriteRun) -> None:
        fd = self._fd(bytes(run.path))
        bufs = [op.data for op in run.ops]
        n = sum(map(len, bufs))
        done = os.pwritev(fd, bufs, run.offset)
        if done < n:          # short: the rest one write at a time
            rest = memoryview(b"".join(bufs))
            while done < n:
                done += os.pwrite(fd, rest[done:], run.offset + done)
        self.stats["bytes"] += n

    def _truncate(self, op: Op) -> None:
        os.ftruncate(self._fd(bytes(op.path)), op.size)

    def _create(self, op: Op) -> None:
        rel = bytes(op.path)
        mode = self._mode(op.mode, rel)
        self._drop(rel)
        with self.base.at(rel) as (d, name):
            try:
                fd = os.open(name, _WRITE_FLAGS | os.O_CREAT | os.O_TRUNC, mode, dir_fd=d)
            except OSError as exc:
                if exc.errno == errno.EISDIR:
                    # the stream says the source had no directory there
                    self.stats["repairs"] += 1
                    self._drop(rel, subtree=True)
                    rmtree_at(d, name)
                elif exc.errno == errno.ELOOP:
                    os.unlink(name, dir_fd=d)   # a symlink stood there: replace it, never follow it
                else:
                    raise
                fd = os.open(name, _WRITE_FLAGS | os.O_CREAT | os.O_EXCL, mode, dir_fd=d)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ApplyError(f"{rel!r} on the target is not a regular file")
            os.fchmod(fd, mode)     # not the umask's idea of it
        except BaseException:
            os.close(fd)
            raise
        self._fds[rel] = fd
        if len(self._fds) > _OPEN_FILES:
            self._close_cached(self._fds.popitem(last=False)[1])

    def _mkdir(self, op: Op) -> None:
        rel = bytes(op.path)
        mode = self._mode(op.mode, rel)
        with self.base.at(rel) as (d, name):
            name = name or b"."             # b"": the map base itself
            try:
                os.mkdir(name, mode, dir_fd=d)
            except FileExistsError:
                # replayed, or something else stands there
                self._clear_way(d, name, rel, keep_dir=True)
                try:
                    os.mkdir(name, mode, dir_fd=d)
                except FileExistsError:
                    pass
            chmod_at(d, name, mode)

    def _delete(self, op: Op) -> None:
        rel = bytes(op.path)
        self._drop(rel, subtree=True)
        try:
            self._delete_at(rel)
        except (FileNotFoundError, NotADirectoryError):
            # a directory above it is missing (or no directory): nothing
            # stands there, the delete is done (a watcher's stream, or a
            # replay, can name a path whose directory went first)
            pass

    def _delete_at(self, rel: bytes) -> None:
        with self.base.at(rel) as (d, name):
            held, done = self._doomed(d, name), False
            try:
                os.unlink(name, dir_fd=d)
                done = True
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                self.stats["repairs"] += 1
                rmtree_at(d, name)
            finally:
                self._removed(held, done)

    def _rmdir(self, op: Op) -> None:
        rel = bytes(op.path)
        self._drop(rel, subtree=True)
        try:
            self._rmdir_at(rel)
        except (FileNotFoundError, NotADirectoryError):
            pass            # a directory above it is missing: done (see _delete)

    def _rmdir_at(self, rel: bytes) -> None:
        with self.base.at(rel) as (d, name):
            held, done = self._doomed(d, name), False
            try:
                os.rmdir(name, dir_fd=d)
                done = True
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
                # the source's directory was empty: whatever is left here is
                # not part of the source
                self.stats["repairs"] += 1
                rmtree_at(d, name)
            finally:
                self._removed(held, done)

    def _rename(self, op: Op) -> None:
        old, new = bytes(op.path), bytes(op.path2)
        self._drop(old, subtree=True)
        self._drop(new, subtree=True)
        if op.mask & RenameFlag.EXCHANGE:
            self._exchange(old, new)
            return
        with self.base.at(old) as (sd, sname), self.base.at(new) as (dd, dname):
            held = self._doomed(dd, dname)      # what the rename replaces
            try:
                self._rename_at(sd, sname, dd, dname)
            except BaseException:
                self._removed(held, False)
                raise
            self._removed(held, True)

    def _rename_at(self, sd: int, sname: bytes, dd: int, dname: bytes) -> None:
        try:
            os.rename(sname, dname, src_dir_fd=sd, dst_dir_fd=dd)
        except FileNotFoundError:
            if lstat_at(sd, sname) is None:
                # replayed (already renamed), or the target lacks what the
                # source renamed (watcher capture sees changes late):
                # nothing to move; the source's resync brings the content
                if lstat_at(dd, dname) is None:
                    self.stats["repairs"] += 1
                return
            raise
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
            # the destination was removed on the source before this rename
            self.stats["repairs"] += 1
            rmtree_at(dd, dname)
            os.rename(sname, dname, src_dir_fd=sd, dst_dir_fd=dd)

    def _exchange(self, old: bytes, new: bytes) -> None:
        """RENAME with EXCHANGE (the capture mount's renameat2): the two
        names swap atomically. Where the target lacks one of them (a gap
        the source's resync fills), what is there moves to the other name."""
        with self.base.at(old) as (sd, sname), self.base.at(new) as (dd, dname):
            try:
                renameat2(sd, sname, dd, dname, RENAME_EXCHANGE)
                return
            except FileNotFoundError:
                pass
            self.stats["repairs"] += 1
            if lstat_at(sd, sname) is not None:
                os.rename(sname, dname, src_dir_fd=sd, dst_dir_fd=dd)
            elif lstat_at(dd, dname) is not None:
                os.rename(dname, sname, src_dir_fd=dd, dst_dir_fd=sd)

    def _setattr(self, op: Op) -> None:
        rel = bytes(op.path)
        fd = self._fds.get(rel)
        if fd is not None:
            self._setattr_fd(op, fd)       # the open file itself: nothing to resolve
            return
        with self.base.at(rel) as (d, name):
            name = name or b"."             # b"": the map base itself
            st = lstat_at(d, name)
            if st is None:
                self.stats["repairs"] += 1    # nothing there to set attributes on
                return
            is_link = stat.S_ISLNK(st.st_mode)
            mask = op.mask
            if mask & (AttrMask.UID | AttrMask.GID) and self.owner:
                # before the mode: chown clears setuid/setgid
                os.chown(name, op.uid if mask & AttrMask.UID else -1,
                         op.gid if mask & AttrMask.GID else -1, dir_fd=d, follow_symlinks=False)
            if mask & AttrMask.MODE and not is_link:     # symlinks have no mode of their own
                chmod_at(d, name, self._mode(op.mode, rel))
            if mask & AttrMask.MTIME:
                os.utime(name, ns=(st.st_atime_ns, op.mtime_ns), dir_fd=d, follow_symlinks=False)

    def _setattr_fd(self, op: Op, fd: int) -> None:
        mask = op.mask
        if mask & (AttrMask.UID | AttrMask.GID) and self.owner:
            os.fchown(fd, op.uid if mask & AttrMask.UID else -1, op.gid if mask & AttrMask.GID else -1)
        if mask & AttrMask.MODE:
            os.fchmod(fd, self._mode(op.mode, bytes(op.path)))
        if mask & AttrMask.MTIME:
            os.utime(fd, ns=(os.fstat(fd).st_atime_ns, op.mtime_ns))

    def _symlink(self, op: Op) -> None:
        rel, link = bytes(op.path), bytes(op.path2)
        with self.base.at(rel) as (d, name):
            self._clear_way(d, name, rel, keep_dir=False)
            self._drop(rel)
            try:
                # nothing there: created at its name at once (no temporary
                # name a kill could leave behind)
                os.symlink(link, name, dir_fd=d)
            except FileExistsError:
                replace_at(d, name, lambda tmp: os.symlink(link, tmp, dir_fd=d))

    def _hardlink(self, op: Op) -> None:
        rel, existing = bytes(op.path), bytes(op.path2)
        with self.base.at(rel) as (d, name), self.base.at(existing) as (ed, ename):
            self._clear_way(d, name, rel, keep_dir=False)
            self._drop(rel)
            try:
                os.link(ename, name, src_dir_fd=ed, dst_dir_fd=d, follow_symlinks=False)
            except FileExistsError:
                replace_at(d, name, lambda tmp: os.link(ename, tmp, src_dir_fd=ed, dst_dir_fd=d,
                                                           follow_symlinks=False))

    def _xattr(self, op: Op) -> None:
        rel, xname = bytes(op.path), bytes(op.path2)
        if not self.xattr_allowed(xname):
            self._refuse("xattrs_refused", "extended attribute %r of %r not stored: allow its "
                         "namespace with [target] xattr_namespaces", os.fsdecode(xname),
                         os.fsdecode(rel))
            return
        name = os.fsdecode(xname)
        remove = op.mask & XattrFlag.REMOVE
        fd = self._fds.get(rel)
        if fd is not None:              # the open file itself: nothing to resolve
            self._set_xattr(fd, name, remove, op.data, {})
            return
        with self.base.at(rel) as (d, last):
            if lstat_at(d, last) is None:
                self.stats["repairs"] += 1    # nothing there to set it on
                return
            # the name in its parent's handle, not followed at its end
            self._set_xattr(proc_path(d, last), name, remove, op.data,
                            {"follow_symlinks": False})

    @staticmethod
    def _set_xattr(target, name: str, remove, value, kw) -> None:
        if remove:
            try:
                os.removexattr(target, name, **kw)
            except OSError as exc:
                if exc.errno != errno.ENODATA:     # replayed, or never had it
                    raise
        else:
            os.setxattr(target, name, value, **kw)

    def _mknod(self, op: Op) -> None:
        rel = bytes(op.path)
        kind = stat.S_IFMT(op.mode)
        if kind in _DEVICES and not self.allow_devices:
            self._refuse("devices_refused", "device node %r not made: allow device nodes with "
                         "[target] devices = true", os.fsdecode(rel))
            return
        mode = kind | self._mode(stat.S_IMODE(op.mode), rel)
        with self.base.at(rel) as (d, name):
            self._clear_way(d, name, rel, keep_dir=False)
            self._drop(rel)

            def make(at):
                os.mknod(at, mode, op.size, dir_fd=d)
                chmod_at(d, at, stat.S_IMODE(mode))      # not the umask's idea of it
            try:
                make(name)
            except FileExistsError:
                replace_at(d, name, make)

    def _task(self, op: Op) -> None:
        if self.on_task is not None:
            self.flush()          # the task sees every earlier write
            self.on_task(op)

    def _mark(self, op: Op) -> None:
        if bytes(op.path) == MARK_ROOT_MTIME:
            self._root_mtime(op)
        elif self.on_mark is not None:
            self.on_mark(op)

    def _root_mtime(self, op: Op) -> None:
        """The source's root directory mtime, for the map base itself (no op
        names the root: its mtime travels as this MARK)."""
        try:
            mtime = json.loads(bytes(op.data))["mtime_ns"]
            if not isinstance(mtime, int) or isinstance(mtime, bool):
                raise TypeError(f"mtime_ns {mtime!r} is not an integer")
            os.utime(self.root, ns=(os.lstat(self.root).st_atime_ns, mtime), follow_symlinks=False)
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            log.error("%s: op seq %d root-mtime MARK has a bad payload (%s): skipped",
                      self.name, op.seq, exc)
