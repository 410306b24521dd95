"""The op model: one change to a replication set, as every layer sees it.

An :class:`Op` is a plain ``NamedTuple`` (cheap to build, cheap for the
compiled frame encoder to read field by field) of twelve fields::

    Op(seq, kind, path, path2, offset, size, mode, uid, gid, mtime_ns, mask, data)

Which fields a kind uses (every unused field must hold its default: ``0`` or
``b""``; the frame encoder refuses anything else so a round trip is exact):

=========  ==========================================================
kind       fields
=========  ==========================================================
WRITE      path, offset, data (the bytes written at ``offset``)
TRUNCATE   path, size
CREATE     path, mode (permission bits, <= 0o7777)
MKDIR      path, mode
DELETE     path
RMDIR      path
RENAME     path (old), path2 (new path), mask (:class:`RenameFlag`: 0
           moves path to path2, EXCHANGE swaps the two atomically)
SETATTR    path, mask (:class:`AttrMask`, never empty: no atime-only op)
           and the fields it names: mode, uid, gid, mtime_ns
SYMLINK    path (the link), path2 (its target, stored verbatim)
HARDLINK   path (the new link), path2 (the existing path)
TASK       path (task name), data (arguments/commands, engine-defined)
MARK       path (label, may be empty), data (payload, may be empty)
XATTR      path, path2 (the attribute's name), data (its value), mask
           (:class:`XattrFlag`: 0 sets the value, REMOVE removes the
           attribute and then data is empty)
MKNOD      path, mode (file type | permission bits: a fifo, socket,
           character or block device), size (the device number, rdev;
           0 for a fifo or socket)
=========  ==========================================================

Paths are ``bytes`` relative to the replication set root (POSIX names are
bytes; non-UTF-8 names must survive). Every field is checked by the frame
encoder and, before a single op is built, by the decoder (so a receiver
refuses a bad frame whole, naming the op's seq, its kind and the field):

* a tree path (``path`` of the file kinds, ``path2`` of RENAME and HARDLINK)
  is non-empty, has no NUL byte, does not start with ``/``, has no empty,
  ``.`` or ``..`` component, is at most ``MAX_TREE_PATH`` bytes (PATH_MAX
  with its NUL) and each name at most ``NAME_MAX`` bytes;
* a symlink target is any bytes but NUL, non-empty, at most MAX_TREE_PATH;
* a task name is non-empty, a mark label may be empty; both have no NUL
  and are at most ``MAX_LABEL`` bytes; their payloads (``data``) are at
  most ``MAX_TASK_PAYLOAD`` / ``MAX_MARK_PAYLOAD`` bytes;
* an xattr name is ``user.``, ``trusted.``, ``security.`` or ``system.``
  followed by at least one byte, no NUL, at most ``MAX_XATTR_NAME`` bytes;
  a value at most ``MAX_XATTR_VALUE`` bytes (the kernel's own limits);
  which namespaces a target accepts is the applier's decision;
* modes are permission bits only (<= 0o7777), except MKNOD's, which also
  carry one of the four special file types; uid and gid 0..2**32-2
  (2**32-1 is chown's "leave unchanged"); offsets and sizes 0..2**63-1 and a
  write's ``offset + len(data)`` too; a setattr mask has only known bits;
  ``mtime_ns`` is any signed 64-bit value (the whole range the kernel's
  timespec holds: years 1677..2262).

Confinement against symlink escapes is the applier's job.

Build ops with the helpers (``Op.write(seq, path, offset, data)`` ...); they
fill the defaults. Decoded ops carry ``data`` as a zero-copy ``memoryview``
into the frame (for WRITE, TASK and MARK) and ``b""`` for the other kinds;
``Op`` equality compares contents, so a decoded op equals the op encoded.

This module also holds the few frame-format names that the compiled journal
kernel and its pure-Python reference share (:class:`FrameHeader` and the
constants); the format itself is documented in :mod:`smirror.kernels._journal_py`.
"""
from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import NamedTuple

__all__ = [
    "Op", "OpKind", "AttrMask", "FrameHeader",
    "MAGIC", "VERSION", "HEADER_SIZE", "RECORD_HEAD_SIZE", "FLAG_LZ4",
    "MAX_PAYLOAD", "MAX_PATH", "MAX_SEQ", "MAX_OFFSET", "MAX_MODE",
    "MAX_TREE_PATH", "NAME_MAX", "MAX_LABEL", "MAX_ID", "MAX_TASK_PAYLOAD",
    "MAX_MARK_PAYLOAD", "MAX_XATTR_NAME", "MAX_XATTR_VALUE", "XattrFlag",
    "XATTR_NAMESPACES", "MKNOD_TYPES", "RenameFlag",
    "LZ4_MAX_RATIO", "AUTO_COMPRESS_MIN", "AUTO_SAMPLE",
]


class OpKind(IntEnum):
    """What an op does; the value is the kind byte in a frame record."""
    WRITE = 1
    TRUNCATE = 2
    CREATE = 3
    MKDIR = 4
    DELETE = 5
    RMDIR = 6
    RENAME = 7
    SETATTR = 8
    SYMLINK = 9
    HARDLINK = 10
    TASK = 11
    MARK = 12
    XATTR = 13
    MKNOD = 14


# The members under module names, for hot paths: looking up an Enum class
# attribute (OpKind.WRITE) costs about 100 ns on CPython 3.11, and the
# capture and apply paths make several for every op. The same objects.
K_WRITE = OpKind.WRITE
K_TRUNCATE = OpKind.TRUNCATE
K_CREATE = OpKind.CREATE
K_MKDIR = OpKind.MKDIR
K_DELETE = OpKind.DELETE
K_RMDIR = OpKind.RMDIR
K_RENAME = OpKind.RENAME
K_SETATTR = OpKind.SETATTR
K_SYMLINK = OpKind.SYMLINK
K_HARDLINK = OpKind.HARDLINK
K_TASK = OpKind.TASK
K_MARK = OpKind.MARK
K_XATTR = OpKind.XATTR
K_MKNOD = OpKind.MKNOD


class AttrMask(IntFlag):
    """Which attributes a SETATTR op sets (atime alone is never replicated)."""
    MODE = 1
    UID = 2
    GID = 4
    MTIME = 8


class XattrFlag(IntFlag):
    """The mask of an XATTR op: 0 sets the value, REMOVE removes the name."""
    REMOVE = 1


class RenameFlag(IntFlag):
    """The mask of a RENAME op: 0 moves ``path`` to ``path2``; EXCHANGE
    swaps them atomically (renameat2 RENAME_EXCHANGE: both exist, no
    moment where either name is missing)."""
    EXCHANGE = 1


# the name prefixes an XATTR op may carry (the kernel knows no others)
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
# file types a MKNOD op may make: fifo, character device, block device, socket
MKNOD_TYPES = (0o010000, 0o020000, 0o060000, 0o140000)


# MARK labels the engine itself puts in a stream (payload: UTF-8 JSON naming
# the path): a delete a connection that ignores deletes does not apply, and
# an orphan the mirror's policy moves into the target's orphans directory
MARK_IGNORED_DELETE = b"ignored-delete"
MARK_ORPHAN_MOVE = b"orphan-move"

# the MARK that carries the root directory's mtime (no op can name the root)
MARK_ROOT_MTIME = b"smirror.root-mtime"

# the MARK a targeted resync ends with: the target stops counting the
# subtree as diverged once it applied what came before it
MARK_RESYNC_DONE = b"smirror.resync-done"

ATTR_ALL = AttrMask.MODE | AttrMask.UID | AttrMask.GID | AttrMask.MTIME

# Frame format constants (see smirror.kernels._journal_py for the layout).
MAGIC = b"SMJF"
VERSION = 1
HEADER_SIZE = 56
RECORD_HEAD_SIZE = 18
FLAG_LZ4 = 1
MAX_PAYLOAD = 1 << 30            # stored and raw payload bound: 1 GiB
MAX_PATH = 0xFFFF                # path lengths are u16 in a record
MAX_SEQ = (1 << 64) - 1
MAX_OFFSET = (1 << 63) - 1       # offsets and sizes must fit off_t
MAX_MODE = 0o7777
MAX_TREE_PATH = 4095             # PATH_MAX (4096) with its NUL: tree paths, symlink targets
NAME_MAX = 255                   # one component of a tree path
MAX_LABEL = 1024                 # task name, mark label
MAX_ID = (1 << 32) - 2           # uid, gid (2**32-1 is chown's -1: "unchanged")
MAX_TASK_PAYLOAD = 64 << 10      # a TASK's JSON spec
MAX_MARK_PAYLOAD = 64 << 10      # a MARK's payload
MAX_XATTR_NAME = 255             # XATTR_NAME_MAX
MAX_XATTR_VALUE = 64 << 10       # XATTR_SIZE_MAX
LZ4_MAX_RATIO = 256              # lz4 block never expands more than ~255x
AUTO_COMPRESS_MIN = 512          # compress='auto' tries lz4 from this raw size
AUTO_SAMPLE = 1 << 16            # ... and above this, on a sample of this size first
MAX_DATA = MAX_PAYLOAD

_new = tuple.__new__


class Op(NamedTuple):
    """One change to a replication set. Use the helpers to build one."""
    seq: int
    kind: OpKind
    path: bytes
    path2: bytes = b""
    offset: int = 0
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    mask: int = 0
    data: bytes = b""

    # The helpers build the tuple directly (no keyword handling): the capture
    # paths create millions of these.
    @classmethod
    def write(cls, seq: int, path: bytes, offset: int, data) -> Op:
        """``data`` (any bytes-like) written at ``offset`` of ``path``."""
        return _new(cls, (seq, K_WRITE, path, b"", offset, 0, 0, 0, 0, 0, 0, data))

    @classmethod
    def truncate(cls, seq: int, path: bytes, size: int) -> Op:
        return _new(cls, (seq, K_TRUNCATE, path, b"", 0, size, 0, 0, 0, 0, 0, b""))

    @classmethod
    def create(cls, seq: int, path: bytes, mode: int = 0o644) -> Op:
        """A new empty regular file with permission bits ``mode``."""
        return _new(cls, (seq, K_CREATE, path, b"", 0, 0, mode, 0, 0, 0, 0, b""))

    @classmethod
    def mkdir(cls, seq: int, path: bytes, mode: int = 0o755) -> Op:
        return _new(cls, (seq, K_MKDIR, path, b"", 0, 0, mode, 0, 0, 0, 0, b""))

    @classmethod
    def delete(cls, seq: int, path: bytes) -> Op:
        return _new(cls, (seq, K_DELETE, path, b"", 0, 0, 0, 0, 0, 0, 0, b""))

    @classmethod
    def rmdir(cls, seq: int, path: bytes) -> Op:
        return _new(cls, (seq, K_RMDIR, path, b"", 0, 0, 0, 0, 0, 0, 0, b""))

    @classmethod
    def rename(cls, seq: int, path: bytes, new_path: bytes, flags: int = 0) -> Op:
        """``flags``: :class:`RenameFlag` (EXCHANGE: swap the two names)."""
        return _new(cls, (seq, K_RENAME, path, new_path, 0, 0, 0, 0, 0, 0, flags, b""))

    @classmethod
    def setattr(cls, seq: int, path: bytes, mode: int | None = None,
                uid: int | None = None, gid: int | None = None,
                mtime_ns: int | None = None) -> Op:
        """Set the attributes given (not None); at least one is required."""
        mask = ((mode is not None) * AttrMask.MODE | (uid is not None) * AttrMask.UID
                | (gid is not None) * AttrMask.GID | (mtime_ns is not None) * AttrMask.MTIME)
        if not mask:
            raise ValueError(f"setattr of {path!r} sets nothing: give mode, uid, gid "
                             f"or mtime_ns (atime alone is not replicated)")
        return _new(cls, (seq, K_SETATTR, path, b"", 0, 0, mode or 0, uid or 0,
                          gid or 0, mtime_ns or 0, int(mask), b""))

    @classmethod
    def symlink(cls, seq: int, path: bytes, link_target: bytes) -> Op:
        """A symlink at ``path`` pointing to ``link_target`` (kept verbatim)."""
        return _new(cls, (seq, K_SYMLINK, path, link_target, 0, 0, 0, 0, 0, 0, 0, b""))

    @classmethod
    def hardlink(cls, seq: int, path: bytes, existing_path: bytes) -> Op:
        """A new name ``path`` for the file already at ``existing_path``."""
        return _new(cls, (seq, K_HARDLINK, path, existing_path, 0, 0, 0, 0, 0, 0, 0, b""))

    @classmethod
    def task(cls, seq: int, name, payload=b"") -> Op:
        """A task command run on the target when the applier reaches it.
        ``name`` is bytes or str (stored as UTF-8); ``payload`` is bytes-like."""
        if isinstance(name, str):
            name = name.encode()
        return _new(cls, (seq, K_TASK, name, b"", 0, 0, 0, 0, 0, 0, 0, payload))

    @classmethod
    def mark(cls, seq: int, label=b"", payload=b"") -> Op:
        """A checkpoint/bookmark in the stream (also mirror start/end)."""
        if isinstance(label, str):
            label = label.encode()
        return _new(cls, (seq, K_MARK, label, b"", 0, 0, 0, 0, 0, 0, 0, payload))

    @classmethod
    def setxattr(cls, seq: int, path: bytes, name, value) -> Op:
        """Extended attribute ``name`` (bytes or str) of ``path`` set to
        ``value`` (bytes-like)."""
        if isinstance(name, str):
            name = name.encode()
        return _new(cls, (seq, K_XATTR, path, name, 0, 0, 0, 0, 0, 0, 0, value))

    @classmethod
    def removexattr(cls, seq: int, path: bytes, name) -> Op:
        """Extended attribute ``name`` of ``path`` removed."""
        if isinstance(name, str):
            name = name.encode()
        return _new(cls, (seq, K_XATTR, path, name, 0, 0, 0, 0, 0, 0,
                          int(XattrFlag.REMOVE), b""))

    @classmethod
    def mknod(cls, seq: int, path: bytes, mode: int, rdev: int = 0) -> Op:
        """A special file at ``path``: ``mode`` holds its type (fifo, socket,
        character or block device) and permission bits, ``rdev`` a device's
        number."""
        return _new(cls, (seq, K_MKNOD, path, b"", 0, rdev, mode, 0, 0, 0, 0, b""))

    def __repr__(self) -> str:
        try:
            kind = OpKind(self.kind)
        except ValueError:          # not a valid op: show the raw fields
            return f"Op{tuple.__repr__(self)}"
        parts = [f"seq={self.seq}", kind.name, repr(bytes(self.path))]
        if self.path2:
            parts.append(f"{'name' if kind is OpKind.XATTR else '->'} {bytes(self.path2)!r}")
        if kind is OpKind.WRITE:
            parts.append(f"offset={self.offset} len={len(self.data)}")
        elif kind is OpKind.TRUNCATE:
            parts.append(f"size={self.size}")
        elif kind in (OpKind.CREATE, OpKind.MKDIR):
            parts.append(f"mode={self.mode:o}")
        elif kind is OpKind.SETATTR:
            mask = AttrMask(self.mask)
            if mask & AttrMask.MODE:
                parts.append(f"mode={self.mode:o}")
            if mask & AttrMask.UID:
                parts.append(f"uid={self.uid}")
            if mask & AttrMask.GID:
                parts.append(f"gid={self.gid}")
            if mask & AttrMask.MTIME:
                parts.append(f"mtime_ns={self.mtime_ns}")
        elif kind is OpKind.XATTR:
            parts.append("remove" if self.mask & XattrFlag.REMOVE
                         else f"value={len(self.data)} B")
        elif kind is OpKind.MKNOD:
            parts.append(f"mode={self.mode:o} rdev={self.size}")
        elif kind is OpKind.RENAME and self.mask & RenameFlag.EXCHANGE:
            parts.append("exchange")
        elif len(self.data):
            parts.append(f"payload={len(self.data)} B")
        return f"Op({' '.join(parts)})"


class FrameHeader(NamedTuple):
    """The validated fixed header of a frame. ``frame_len`` = header + stored
    payload: where the next frame of a stream starts."""
    version: int
    flags: int
    count: int          # type: ignore[assignment]  # ops in the frame; shadows tuple.count, unused here
    first_seq: int
    last_seq: int
    stored_len: int
    raw_len: int
    frame_len: int

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_LZ4)
