"""The mirror's target on a target daemon: :class:`RemoteTarget`.

Its reading side is the target daemon's ``target.scan`` and
``target.signature`` verbs, asked through a logged-in control client
(passed in: ``daemon.control.Client`` sits above this layer). Its writing
side is the connection's stream: every change is an op (:mod:`smirror.ops`,
the kinds the target's applier knows) handed to ``emit``, which appends it
to the connection's journal; the target's receiver and applier write it, in
order, behind everything queued before.

What follows from writing through a stream:

* no rolling delta: no op copies bytes from the target's old file, so a file
  whose size changed is compared block by block at its offsets, and the
  blocks that differ travel (``streamed``: the engine reads it);
* changed blocks are written in place whatever the file's size: a WRITE op
  costs its bytes, a file rewritten whole costs them all;
* a file written whole is deleted first (a new inode, as a local temp +
  rename makes one: the target's other names of the old inode keep it);
* a block of zeros at or past the end of what the target holds is not
  sent: it stays a hole (the final TRUNCATE gives the length);
* the listing knows no inodes, so :meth:`lstat` knows nothing and the
  engine links every hard-link group again;
* a writer given up (the source kept changing) deletes a file being
  written whole (its DELETE took the old one already) and leaves one
  patched in place with mtime 0, so the next quick check looks at it again;
* no op names the map base itself: its mtime travels in a MARK.

:class:`StreamTarget` is that writing side over any reader: a
:class:`RemoteReader` (a target daemon's verbs; :class:`RemoteTarget` is the
two together), or a :class:`smirror.mirror.local.LocalTarget` of a directory
this process's own receiver applies to (``smirror replicate``).
"""
from __future__ import annotations

import json
import os
import stat
import threading

from smirror.errors import MirrorError, ProtocolError, SmirrorError
from smirror.fs.tree import DIR, FILE, SYMLINK, TEMP_PREFIX, Entry, Listing, kind_of
from smirror.ops import MARK_ROOT_MTIME, Op

_ZERO = 0                     # ops go out unnumbered: the journal numbers them
_PIECE = 256 << 10            # largest WRITE op; also the unit of hole detection


def _is_zero(view) -> bool:
    return view.count(0) == len(view) if isinstance(view, bytes) else not any(view)


class RemoteReader:
    """The reading side of a map base on a target daemon. ``client``: a
    logged-in control client (``call(verb, **args)``); ``ident``: the
    ``source`` and ``conid`` the target checks against the link user;
    ``xattrs``: list extended attributes too; ``wanted_xattr``: which
    names (those the source side reads). The listing is read once (the
    first :meth:`scan`, which a caller may run early: a target that cannot
    be read is known before anything is queued). The client is closed
    with the reader."""

    streamed = True           # its writer is a stream (see the module docstring)

    def __init__(self, client, map_base: str, ident: dict, *, xattrs: bool = True,
                 wanted_xattr=None, rows: dict | None = None):
        self.client = client
        self.map_base = map_base
        self.ident = dict(ident)
        self._call_lock = threading.Lock()     # one request at a time on the client's link
        self.use_xattrs = xattrs
        self.wanted_xattr = wanted_xattr or (lambda name: True)
        self.listing: Listing | None = None
        self._rows: dict | None = rows       # given: nothing is asked (a full mirror: {})
        self.pages: int | None = None        # how many pages the listing came in (None: one reply)
        self._xattrs: dict[bytes, dict | None] = {}

    def _call(self, verb: str, **args):
        with self._call_lock:
            return self.client.call(verb, map_base=self.map_base, **args, **self.ident)

    def close(self) -> None:
        """Close the client given (its link to the target)."""
        if self.client is not None:
            self.client.close()

    # the listing comes in pages of about this many bytes: one reply past the
    # link's message cap (a map base of about a million files) failed every mirror
    SCAN_PAGE_BYTES = 4 * 1024 * 1024

    def read(self) -> None:
        """Read the listing now (``target.scan``, page by page); errors as
        the client raises them."""
        if self._rows is not None:
            return
        reply = self._call("target.scan", xattrs=self.use_xattrs, page_bytes=self.SCAN_PAGE_BYTES)
        if not (isinstance(reply, dict) and reply.get("paged") is True):
            self._rows = reply      # a target of an older version: the whole listing at once
            return
        rows: dict = {}
        while True:
            page = reply.get("rows")
            if not isinstance(page, dict):
                raise ProtocolError(f"target.scan of {self.map_base}: page {reply.get('page')} "
                                    f"holds no rows table")
            rows.update(page)
            cursor = reply.get("cursor")
            if cursor is None:
                break
            reply = self._call("target.scan", cursor=cursor)
            if not isinstance(reply, dict) or reply.get("paged") is not True:
                raise ProtocolError(f"target.scan of {self.map_base}: the page after cursor "
                                    f"{cursor!r} is not a page")
        self.pages = reply.get("page")
        self._rows = rows

    def scan(self, rules=None, skip=()) -> Listing:
        """The map base's entries (``target.scan``, with xattrs), without
        what ``rules`` exclude (and what is under an excluded directory)
        and without ``skip``. A directory the target could not read makes
        the verb fail: a partial listing would hide orphans."""
        self.read()
        rows = self._rows or {}
        listing = Listing(os.fsencode(self.map_base))
        # the root's own attributes are not listed: sent, whatever they are
        listing.entries[b""] = Entry(DIR, stat.S_IFDIR | 0o755, 0, 0, 0, 0, None, None, 1)
        pruned: set[bytes] = set(skip)
        for name in sorted(rows):
            mode, uid, gid, size, mtime_ns, link, *more = rows[name]
            rel = os.fsencode(name)
            kind = kind_of(mode)
            parent = rel.rpartition(b"/")[0]
            if rel in pruned or parent in pruned or (rules is not None
                                                     and rules.excluded(rel, kind == DIR)):
                if kind == DIR:
                    pruned.add(rel)
                continue
            listing.entries[rel] = Entry(kind, mode, uid, gid, size, mtime_ns, None, None, 1,
                                         link=os.fsencode(link) if link is not None else None)
            # None: not listed (gone meanwhile, or a target that lists none): all are sent
            self._xattrs[rel] = ({n: bytes.fromhex(v) for n, v in more[0].items()
                                  if self.wanted_xattr(n)}
                                 if more and isinstance(more[0], dict) else None)
        self.listing = listing
        self._rows = {}         # read once: the listing holds what is needed of it
        return listing

    def _entry(self, rel: bytes) -> Entry | None:
        return None if self.listing is None else self.listing.entries.get(rel)

    def lstat(self, rel: bytes) -> None:
        """Not known: the listing has no inodes (hard links are made again)."""
        return None

    def signature(self, rel: bytes, block_size: int, weak: bool):
        """The target file's block hashes (``target.signature``); no
        rolling hashes: the stream has no op a delta could use."""
        from smirror.kernels import checksum
        if weak:
            raise MirrorError("a remote target gives no rolling hashes (no delta through a stream)")
        d = self._entry(rel)
        try:
            strong = self.block_hashes(rel, block_size)
        except (SmirrorError, OSError) as exc:
            # the file's error in the summary, not the whole mirror's
            raise MirrorError(f"reading its block hashes on the target failed: {exc}") from None
        length = d.size if d is not None else len(strong) * block_size
        if len(strong) != -(-length // block_size):
            raise MirrorError("target file changed size while being compared")
        return checksum.Signature(block_size, length, strong, None)

    def block_hashes(self, rel: bytes, block_size: int):
        """The strong hashes of the file's blocks as the target has it now
        (``target.signature``: a (count, 2) uint64 array); the client's
        errors as it raises them."""
        import numpy as np
        hexes = self._call("target.signature", path=os.fsdecode(rel), block_size=block_size)
        return np.frombuffer(bytes.fromhex(hexes), dtype="<u8").reshape(-1, 2).copy()

    def digest(self, rel: bytes, length: int) -> None:
        """Not offered by the target: the engine compares block hashes."""
        return None

    def xattrs(self, rel: bytes) -> dict | None:
        """As listed; None when the listing did not say."""
        if not self.use_xattrs:
            return {}
        return self._xattrs.get(rel, {})


class StreamTarget:
    """A target written through a stream: reads go to ``reader`` (a
    :class:`RemoteReader`, or a :class:`smirror.mirror.local.LocalTarget`
    of a directory this process's own receiver applies to), every change
    is an op handed to ``emit`` (appends it to the connection's journal;
    called from the engine's workers: serialised here)."""

    streamed = True           # see the module docstring

    def __init__(self, reader, emit, *, owner: bool | None = None, xattrs: bool = True):
        self.reader = reader
        self._emit = emit
        self._emit_lock = threading.Lock()
        self.owner = (os.geteuid() == 0) if owner is None else owner
        self.use_xattrs = xattrs
        self.bytes_written = 0          # data bytes in WRITE ops
        self.ops = 0                    # ops handed to emit
        self.listing: Listing | None = None
        self._xattrs: dict[bytes, dict | None] = {}     # what this mirror left on the target
        self._removed: set[bytes] = set()

    def emit(self, op: Op) -> None:
        with self._emit_lock:
            self._emit(op)
            self.ops += 1

    def close(self) -> None:
        pass                  # the reader is the caller's

    # ---------------------------------------------------------- reading

    def scan(self, rules=None, skip=()) -> Listing:
        self.listing = self.reader.scan(rules, skip)
        return self.listing

    def _entry(self, rel: bytes) -> Entry | None:
        return None if self.listing is None else self.listing.entries.get(rel)

    def lstat(self, rel: bytes) -> Entry | None:
        return self.reader.lstat(rel)

    def signature(self, rel: bytes, block_size: int, weak: bool):
        return self.reader.signature(rel, block_size, weak)

    def digest(self, rel: bytes, length: int) -> None:
        """Not used: a streamed target's files are compared block by block."""
        return None

    def xattrs(self, rel: bytes) -> dict | None:
        """The target's xattrs of ``rel`` as this mirror left them (what it
        sent, else what the reader lists); None when not known."""
        if not self.use_xattrs:
            return {}
        if rel in self._xattrs:
            return self._xattrs[rel]
        try:
            return self.reader.xattrs(rel)
        except (OSError, SmirrorError):
            return None

    # ---------------------------------------------------------- writing

    def count_written(self, n: int) -> None:
        with self._emit_lock:
            self.bytes_written += n

    def create_temp(self, rel: bytes) -> StreamWriter:
        """A file written whole: a new inode under ``rel`` (DELETE, CREATE)."""
        self.emit(Op.delete(_ZERO, rel))
        self.emit(Op.create(_ZERO, rel, 0o600))
        self._xattrs[rel] = {}
        return StreamWriter(self, rel, 0, whole=True)

    def open_inplace(self, rel: bytes) -> StreamWriter:
        d = self._entry(rel)
        if d is None or d.kind != FILE:
            raise MirrorError(f"{rel!r} on the target is not a regular file")
        return StreamWriter(self, rel, d.size)

    def mkdir(self, rel: bytes, entry: Entry) -> None:
        # owner-only until set_meta gives the final mode (after its contents)
        self.emit(Op.mkdir(_ZERO, rel, 0o700))
        self._xattrs[rel] = {}

    def rmdir(self, rel: bytes) -> None:
        """Remove ``rel`` when the listing has nothing left under it (the
        applier would remove a non-empty one whole)."""
        prefix = rel + b"/"
        entries = self.listing.entries if self.listing is not None else {}
        if any(p.startswith(prefix) and p not in self._removed for p in entries):
            raise OSError(39, os.strerror(39), os.fsdecode(rel))     # ENOTEMPTY
        self.emit(Op.rmdir(_ZERO, rel))
        self._removed.add(rel)

    def symlink(self, rel: bytes, link: bytes) -> None:
        self.emit(Op.symlink(_ZERO, rel, link))
        self._xattrs[rel] = {}

    def link(self, rel: bytes, existing: bytes) -> None:
        self.emit(Op.hardlink(_ZERO, rel, existing))
        self._xattrs[rel] = self.xattrs(existing)

    def mknod(self, rel: bytes, entry: Entry) -> None:
        self.emit(Op.mknod(_ZERO, rel, entry.mode, entry.rdev))
        self._xattrs[rel] = {}

    def set_meta(self, rel: bytes, entry: Entry, xattrs: dict | None = None) -> None:
        """Owner, mode, xattrs, then mtime, as a SETATTR (and XATTR ops for
        the names that differ from what the target has)."""
        if not rel:
            # no op names the map base itself: a MARK carries the root's
            # mtime (its mode, owner and xattrs are the target's own)
            self.emit(Op.mark(_ZERO, MARK_ROOT_MTIME,
                              json.dumps({"mtime_ns": entry.mtime_ns}).encode()))
            return
        kw = {"mtime_ns": entry.mtime_ns}
        if entry.kind != SYMLINK:
            kw["mode"] = entry.perm
        if self.owner:
            kw["uid"], kw["gid"] = entry.uid, entry.gid
        # the applier chowns, chmods, then sets the time; the xattrs after
        # it (a chown clears security.capability; xattrs leave the mtime)
        self.emit(Op.setattr(_ZERO, rel, **kw))
        if xattrs is not None and self.use_xattrs and entry.kind != SYMLINK:
            self._send_xattrs(rel, xattrs)

    def _send_xattrs(self, rel: bytes, wanted: dict) -> None:
        have = self.xattrs(rel)
        for name in sorted(have.keys() - wanted.keys()) if have else ():
            self.emit(Op.removexattr(_ZERO, rel, name))
        for name, value in sorted(wanted.items()):
            if have is None or have.get(name) != value:
                self.emit(Op.setxattr(_ZERO, rel, name, value))
        self._xattrs[rel] = dict(wanted)

    def remove(self, rel: bytes) -> None:
        """``rel`` and, a directory, everything the listing has under it
        (children first: RMDIR and DELETE ops, as the capture sends them)."""
        if not rel:
            raise MirrorError("the target root itself is never removed")
        prefix = rel + b"/"
        entries = self.listing.entries if self.listing is not None else {}
        under = sorted((p for p in entries if p.startswith(prefix) and p not in self._removed),
                       key=lambda p: -p.count(b"/"))
        for p in under:
            self.emit(Op.rmdir(_ZERO, p) if entries[p].kind == DIR else Op.delete(_ZERO, p))
            self._removed.add(p)
        d = entries.get(rel)
        self.emit(Op.rmdir(_ZERO, rel) if d is not None and d.kind == DIR
                  else Op.delete(_ZERO, rel))
        self._removed.add(rel)
        self._xattrs.pop(rel, None)

    def move_orphan(self, rel: bytes, dest_dir) -> None:
        raise MirrorError("a remote target moves orphans aside by its connection's orphan "
                          "policy, not by a directory the source names")

    def remove_temps(self, rels) -> None:
        for rel in rels:
            if rel.rpartition(b"/")[2].startswith(TEMP_PREFIX):
                self.emit(Op.delete(_ZERO, rel))


class RemoteTarget(StreamTarget):
    """A map base on a target daemon: read through its verbs
    (:class:`RemoteReader` over ``client``), written as ops to ``emit``."""

    def __init__(self, client, map_base: str, ident: dict, emit, *, owner: bool | None = None,
                 xattrs: bool = True, wanted_xattr=None, reader: RemoteReader | None = None):
        super().__init__(reader or RemoteReader(client, map_base, ident, xattrs=xattrs,
                                                wanted_xattr=wanted_xattr),
                         emit, owner=owner, xattrs=xattrs)


class StreamWriter:
    """One target file written through the stream: WRITE ops, a TRUNCATE
    to its length, then its attributes. ``end``: what the target file
    holds (0 for a new one): zeros at or past it stay holes."""

    def __init__(self, target: StreamTarget, rel: bytes, end: int, whole: bool = False):
        self.target = target
        self.rel = rel
        self.end = end
        self.whole = whole

    def write(self, data, offset: int) -> int:
        view = memoryview(data).cast("B")
        sent = 0
        for start in range(0, len(view), _PIECE):
            piece = view[start:start + _PIECE]
            if offset + start >= self.end and _is_zero(piece):
                continue                          # a hole stays a hole
            self.target.emit(Op.write(_ZERO, self.rel, offset + start, bytes(piece)))
            sent += len(piece)
        self.target.count_written(sent)
        return len(view)

    def copy_from(self, src_fd: int, size: int, progress=None, dense: bool = False) -> int:
        """The whole source file as WRITE ops (its zero blocks are holes)."""
        from smirror.fs.files import aligned_buffer, read_full
        buf = memoryview(aligned_buffer(_PIECE * 8))
        off = 0
        before = self.target.bytes_written
        while off < size:
            want = min(len(buf), size - off)
            got = read_full(src_fd, buf[:want], off)
            if got:
                self.write(buf[:got], off)
                if progress is not None:
                    progress(got)
            if got < want:
                break                             # the source shrank: the caller notices
            off += got
        self.truncate(size)
        return self.target.bytes_written - before

    def copy_old(self, offset: int, length: int, out_offset: int) -> int:
        raise MirrorError("a stream has no op that copies from the target's old file")

    def truncate(self, size: int) -> None:
        self.target.emit(Op.truncate(_ZERO, self.rel, size))

    def commit(self, entry: Entry, xattrs: dict | None = None) -> None:
        self.target.set_meta(self.rel, entry, xattrs)

    def abort(self) -> None:
        """Given up: a file being written whole goes (its old inode went
        with the DELETE that began it; the target has none there now), one
        patched in place gets mtime 0, so the next quick check does not take
        a partly written file for an up-to-date one."""
        if self.whole:
            self.target.emit(Op.delete(_ZERO, self.rel))
        else:
            self.target.emit(Op.setattr(_ZERO, self.rel, mtime_ns=0))


__all__ = ["RemoteReader", "StreamTarget", "RemoteTarget", "StreamWriter"]
