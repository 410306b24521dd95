"""Capture through the watcher: inotify or fanotify events of a replication
set become ops. The watcher says which files changed; the checksum kernel
finds which blocks, against a per-file signature cache that holds the strong
hash of every block as it was last sent, so only changed blocks travel.

* a rename inside the set is a RENAME (no delete and re-copy);
* a rename out of the set is a DELETE, into it a CREATE with the content;
* attribute changes are SETATTRs, except an atime-only change (compared
  against the cached mode, owner and mtime, and dropped); extended
  attributes (ACLs too) are compared with what was last sent and travel as
  XATTR ops; fifos, sockets and device nodes are MKNODs;
* a queue overflow (either watcher), a failed watch or the start of the
  watcher is a resync of the subtree that may have changed unseen: the tree is
  compared with the cache (checksums for the content), never a silent loss.

The cache is what the target has, as far as this source knows: each block's
hash is taken from the very bytes put into the WRITE op, so a file changing
while it is read cannot make cache and target disagree.

Two watchers give the same events (``capture_backend``, or
``$SMIRROR_CAPTURE_BACKEND`` when the caller names none: ``auto`` takes
fanotify where it can run, else inotify; ``status()`` and the log say which
one runs and why):

* fanotify (:mod:`smirror.capture.fanotify`; root or CAP_SYS_ADMIN, Linux >= 5.17,
  a filesystem with decodable file handles, no other mount inside the
  set): one filesystem mark, no kernel
  object per directory, so no directory limit but the process's memory,
  about 170 bytes of it per directory (the handle map). Start-up is one
  walk noting each directory's handle: 10,051 directories in 0.19-0.20 s
  (0.8-1.1x a bare os.walk of the tree), 100,501 in 1.8-2.5 s (0.9-1.4x).
  The mark sees the whole filesystem: an event elsewhere costs its parse
  and a set lookup, plus one handle lookup per directory first seen;
* inotify (:mod:`smirror.capture.inotify`; anyone): one watch per directory, at
  most ``fs.inotify.max_user_watches`` for all of the user's processes
  together (192,530 on the test machine), each up to about 1 KiB of kernel
  memory; a directory past the limit is resynced once and then seen only
  by the periodic verification. Start-up: 10,051 directories in
  0.17-0.35 s (1.0-1.9x the walk), 100,501 in 1.7-2.9 s (1.0-1.6x).

So both start in about the time of the walk; what fanotify adds is no
directory limit and no kernel memory per directory. (Ranges: the best of 3
rounds in each of 3 runs of ``benchmarks/bench_watch.py``, ratios against
the walk of the same run, on a 2-core machine shared with other jobs.)
"""
from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time

import numpy as np

from smirror.capture import fanotify, inotify
from smirror.capture.inotify import GONE_ERRNOS, MOVED_OUT, Event, Kind
from smirror.fs.files import read_xattrs, wait_for_writes, xattr_filter
from smirror.fs.tree import Rules
from smirror.kernels import checksum
from smirror.ops import MARK_RESYNC_DONE, MARK_ROOT_MTIME, MKNOD_TYPES, Op, OpKind

# ops that change their parent directory's mtime on the target
_CHANGES_PARENT = frozenset({OpKind.CREATE, OpKind.MKDIR, OpKind.DELETE, OpKind.RMDIR, OpKind.RENAME,
                             OpKind.SYMLINK, OpKind.HARDLINK, OpKind.MKNOD})

log = logging.getLogger("smirror.capture.watch")

_READ_CHUNK = 8 << 20
# an open of a path lstat found regular that fails with one of these: it is
# no longer a regular file (a symlink, a socket, a device now), or gone
# (GONE_ERRNOS); any other failure (EMFILE, ENOMEM, ...) is passing
_NOT_THERE_TO_READ = GONE_ERRNOS | {errno.ELOOP, errno.ENXIO, errno.ENODEV}
_ZERO = 0

# the extended attributes captured: what this process can read and a
# target could store (ACLs among them)
WANTED_XATTR = xattr_filter()
_CAPABILITY = "security.capability"

BACKENDS = ("auto", "fanotify", "inotify")
# the backend a TreeCapture uses when its caller names none (the daemon's
# captures, for one)
BACKEND_ENV = "SMIRROR_CAPTURE_BACKEND"
# tests only: an event about a file of this name makes the capture thread
# fail (there is no real trigger left for its catch-all to be tested with)
FAULT_ENV = "SMIRROR_TEST_CAPTURE_FAULT"


def open_watcher(root, exclude=None, backend: str | None = None):
    """The watcher of ``root`` and why it is that one: fanotify where the
    process may place a filesystem mark and the kernel and filesystem
    support it, else inotify (``backend="auto"``); ``"fanotify"`` or
    ``"inotify"`` forces one (a forced fanotify that cannot run raises
    :class:`smirror.capture.fanotify.FanotifyUnavailable`). None reads
    ``$SMIRROR_CAPTURE_BACKEND`` (default auto)."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"capture backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "inotify":
        return inotify.Watcher(root, exclude=exclude), "inotify requested"
    try:
        return fanotify.Watcher(root, exclude=exclude), "fanotify filesystem mark"
    except fanotify.FanotifyUnavailable as exc:
        if backend == "fanotify":
            raise
        return inotify.Watcher(root, exclude=exclude), f"inotify: fanotify unavailable ({exc.strerror})"


class Known:
    """What the target holds of one path (as far as this source sent it)."""
    __slots__ = ("kind", "mode", "uid", "gid", "mtime_ns", "size", "block_size", "strong", "link",
                 "ino", "names", "xattrs", "size_on_target")

    def __init__(self, kind, mode, uid, gid, mtime_ns, size=0, block_size=0, strong=None,
                 link=None, ino=0):
        self.kind, self.mode, self.uid, self.gid = kind, mode, uid, gid
        self.mtime_ns, self.size, self.block_size, self.strong = mtime_ns, size, block_size, strong
        self.link, self.ino = link, ino
        self.names = 1        # paths sharing this entry (hard links)
        # extended attributes the target has ({name: value}); None: not
        # known (a remote target's listing), so every one is sent
        self.xattrs = None
        # a file the newer mirror left alone: ``size`` is the source's (the
        # quick check finds nothing until it changes), this the target's,
        # which sending the file truncates (None: ``size`` is the target's)
        self.size_on_target = None


# a size no file has: what the target holds is not known (a TRUNCATE to the
# source's size follows the bytes, and no block of zeros is taken for a hole)
_SIZE_UNKNOWN = 1 << 62


def _detached(k: Known) -> Known:
    """A copy of a cache entry that vouches for neither the target's bytes,
    nor its size, nor its attributes (mode, owner, mtime, xattrs: -1 and
    None differ from anything a file has, so all of them are sent)."""
    c = Known(k.kind, -1, -1, -1, -1, k.size, k.block_size, None, k.link, k.ino)
    c.names, c.xattrs = k.names, None
    c.size_on_target = _SIZE_UNKNOWN if k.kind == stat.S_IFREG else k.size_on_target
    return c


def _linkable(kind: int) -> bool:
    """Kinds whose names can share one inode (hard links): regular files,
    and the special files MKNOD makes."""
    return kind == stat.S_IFREG or kind in MKNOD_TYPES


def _is_zero(view) -> bool:
    return not any(view) if len(view) < 64 else np.frombuffer(view, np.uint8).max() == 0


class MirrorHandover:
    """What a mirror engine left on a target, for the capture that goes on
    from it (:meth:`TreeCapture.take_mirror`); entries are
    :class:`smirror.fs.tree.Entry`. ``left``: source path -> the entry as
    written or found equal (a file: the fstat its bytes were read under);
    ``links``: name -> the first name of its hard-link group (the target
    holds them as one inode); ``hashes``: path -> (block size, strong
    hashes) of the bytes the target holds; ``kept``: files a newer mirror
    left as the target has them; ``unsure``: source paths the mirror
    failed on; ``stale``: entries in ``left`` whose attributes were not set
    (a stop came first); ``target``, ``source``: the two listings' entries;
    ``xattrs(rel)``: the target's extended attributes as the mirror left
    them (None: not known); ``orphans``: target paths the source lacks,
    ``orphans_stay``: the orphan policy leaves them there (reports them)."""

    def __init__(self, *, left, links, hashes, kept, unsure, stale, target, source, xattrs,
                 orphans=(), orphans_stay=True, stats=None):
        self.left, self.links, self.hashes, self.kept = left, links, hashes, kept
        self.unsure, self.stale, self.target, self.source = unsure, stale, target, source
        self.xattrs, self.orphans, self.orphans_stay = xattrs, list(orphans), orphans_stay
        self.stats: dict = stats if stats is not None else {}


class _UnfinishedResend:
    """A resend of ``rel`` to ``out`` that could not send ``parts`` (path
    -> why: a directory it could not list, a file it could not open) after
    removing them on its target."""
    __slots__ = ("rel", "out", "reason", "parts")

    def __init__(self, rel: bytes, out, reason: str, parts: dict[bytes, str]):
        self.rel, self.out, self.reason, self.parts = rel, out, reason, parts


class TreeCapture:
    """Watches ``root`` and emits ops for what changes. ``run()`` loops until
    ``stop()``; ``sync()`` processes everything seen so far (a task queued on
    the source calls it first, so the task marks the source state at that
    moment)."""

    def __init__(self, root, emit, *, rules: Rules | None = None, owner: bool | None = None,
                 settle: float = 0.002, verify_interval: float | None = 300.0,
                 capture_backend: str | None = None):
        self.root = os.fsencode(os.path.abspath(root))
        self.emit = emit
        self.rules = rules if rules else None
        self.owner = (os.geteuid() == 0) if owner is None else owner
        self.settle = settle
        # a structural resync (names, kinds, attributes; content of files
        # the cache does not know) when idle this often: what a rename storm
        # made the watcher miss is found without reading every file
        self.verify_interval = verify_interval
        self.known: dict[bytes, Known] = {}
        self._dirty: dict[bytes, float] = {}       # files modified, not yet diffed
        # paths an event named that were gone (renamed away with a parent
        # directory, usually) when it was handled: looked at again once the
        # batch of events is done, under their parent's new name
        self._lost: set[bytes] = set()
        # files renamed since the last quiet moment: their content is
        # compared again then (a rename burst may have made an event's
        # bytes land under the wrong name); files changed since the last
        # periodic verification: compared by content then
        self._touched: set[bytes] = set()
        self._recent: set[bytes] = set()
        self._dirs_touched: set[bytes] = set()     # their mtime is sent when quiet
        self.unreadable: dict[bytes, str] = {}     # files not sent: cannot be read (why)
        # directories a walk could not list for a passing reason (why):
        # resynced again with the unreadable files
        self.unlisted: dict[bytes, str] = {}
        # resends that could not send all of a subtree they had removed on
        # their target (_UnfinishedResend): the rest goes to that target
        # once it can be listed or read (_retry_resends); while a resend
        # walks, what it could not send (path -> why)
        self._unfinished: list[_UnfinishedResend] = []
        self._resend_unsent: dict[bytes, str] | None = None
        # files created since the last quiet moment: read when their event
        # came, maybe before their writer was done (fanotify merges a new
        # file's writes into its CREATE): looked at again when quiet
        self._created: set[bytes] = set()
        # recent renames, old name -> new: a resync the target asks for
        # names the path as its failing op had it, maybe renamed since
        self._moved: dict[bytes, bytes] = {}
        # recent names removed from a hard-linked file, name -> the entry its
        # other names keep: a resync the target asks for such a name covers
        # them (what it skipped there, the cache counts as theirs)
        self._unlinked: dict[bytes, Known] = {}
        self._lock = threading.RLock()
        self._requests: list = []
        self._fault = os.fsencode(os.environ.get(FAULT_ENV, ""))
        self._requests_lock = threading.Lock()
        self._stop = threading.Event()
        self._close_lock = threading.Lock()        # close() and the end of run()
        self._buf = bytearray(_READ_CHUNK)
        self.stats = {"events": 0, "ops": 0, "resyncs": 0, "bytes_sent": 0, "bytes_skipped": 0,
                      "reverified": 0, "failures": 0}
        t0 = time.monotonic()
        self.watcher, self.backend_reason = open_watcher(self.root, self._excluded, capture_backend)
        self.backend = self.watcher.backend
        self.start_seconds = time.monotonic() - t0
        log.info("capture of %s: %s watcher on %d directories, started in %.3f s (%s)",
                 os.fsdecode(self.root), self.backend, self.watcher.watched_dirs,
                 self.start_seconds, self.backend_reason)
        self.last_rescan_reason = ""

    def paused(self) -> threading.RLock:
        """Held (``with capture.paused():``), the capture emits no op: a
        mirror or a task written meanwhile marks one clean moment of the
        stream. Re-entrant."""
        return self._lock

    def status(self) -> dict:
        """What this capture reports: its watcher backend and counters."""
        w = self.watcher
        return dict(self.stats, backend=self.backend, backend_reason=self.backend_reason,
                    watched_dirs=w.watched_dirs, overflows=w.overflows,
                    watch_failures=w.watch_failures, lookups_held=w.lookups_held,
                    start_seconds=round(self.start_seconds, 6),
                    last_rescan_reason=self.last_rescan_reason, state=self.state, error=self.error,
                    unreadable={os.fsdecode(p): w for p, w in sorted(self.unreadable.items())[:20]},
                    unreadable_count=len(self.unreadable),
                    unlisted={os.fsdecode(p): w for p, w in sorted(self.unlisted.items())[:20]},
                    resends_unfinished={os.fsdecode(r.rel): sorted(map(os.fsdecode, r.parts))
                                        for r in self._unfinished[:20]})

    def _excluded(self, rel: bytes, is_dir: bool) -> bool:
        return self.rules is not None and self.rules.excluded(rel, is_dir)

    _read_root = None
    unlinked: list = []     # load_target: names to link again (resync them)
    moving_out = False      # True while the ops of a move out of the set are emitted

    def _abs(self, rel: bytes) -> bytes:
        root = self._read_root or self.root
        return root + b"/" + rel if rel else root

    def _out(self, op: Op) -> None:
        self.stats["ops"] += 1
        self.emit(op)
        if op.kind in _CHANGES_PARENT:
            # the target's directory got a new mtime applying it: the
            # source's is sent once things are quiet (_settle_dirs)
            self._dirs_touched.add(bytes(op.path).rpartition(b"/")[0])
            if op.kind == OpKind.RENAME:
                self._dirs_touched.add(bytes(op.path2).rpartition(b"/")[0])
                # a directory renamed over one the target held (a restart's
                # mirror had made the new name already) keeps the time of
                # the one it moved: its own is sent too (files are skipped)
                self._dirs_touched.add(bytes(op.path2))

    def _settle_dirs(self) -> None:
        """Send the mtime of the directories whose entries changed: applying
        those changes gave the target's copies the time of applying."""
        touched, self._dirs_touched = self._dirs_touched, set()
        for rel in sorted(touched):
            if not rel:
                # no op names the root: a MARK carries its mtime to the target
                try:
                    mtime = os.lstat(self.root).st_mtime_ns
                except OSError:
                    continue
                self._out(Op.mark(_ZERO, MARK_ROOT_MTIME, json.dumps({"mtime_ns": mtime}).encode()))
                continue
            k = self.known.get(rel)
            if k is None:
                continue        # gone
            try:
                st = os.lstat(self._abs(rel))
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            if k is not None and k.kind == stat.S_IFDIR:
                k.mtime_ns = -1
                self._attrs(rel, st, True)

    # -- the model of the target -------------------------------------------
    def load_target(self, target_root) -> None:
        """Fill the cache from the target tree as a finished mirror left it
        (signatures of the target's files, attributes of its entries), so
        that every change the watcher reports from now on is diffed against
        what the target really holds."""
        with self._lock:
            self.known.clear()
            self._read_root = os.fsencode(os.path.abspath(target_root))
            try:
                self._walk(b"", emit=False)
            finally:
                self._read_root = None
            # the inodes the cache holds are the source's (the target's
            # were read above): an event's file is checked against them
            target_ino = {rel: k.ino for rel, k in self.known.items()}
            source_ino: dict = {}       # rel -> (source inode or 0, its link count)
            for rel, k in self.known.items():
                try:
                    st = os.lstat(self._abs(rel))
                    ok = stat.S_IFMT(st.st_mode) == k.kind
                    source_ino[rel] = ((st.st_dev, st.st_ino) if ok else 0, st.st_nlink)
                except OSError:
                    source_ino[rel] = (0, 0)     # gone since the mirror: its event follows
            first_name: dict = {}
            self.unlinked = []
            for rel, k in self.known.items():
                ino, nlink = source_ino[rel]
                if ino and _linkable(k.kind) and nlink > 1:
                    first = first_name.setdefault(ino, rel)
                    if first != rel and target_ino[first] != target_ino[rel]:
                        # names of one source inode that the target holds
                        # apart (linked after the mirror read them): the
                        # caller resyncs them, which links them
                        self.unlinked.append(rel)
            for rel in self.unlinked:
                del self.known[rel]
            # names the target holds as one inode share one cache entry, as
            # _create makes it, whatever the source holds now: a chmod seen
            # through one name is known under the others (two entries
            # dropped the chmod back through the other name), and a write
            # whose event is lost with the name it came through (written,
            # then unlinked before the cache was loaded: fanotify folds the
            # write into the DELETE) still reaches the others (_delete).
            # Its inode is that of a name the source still has; a name the
            # source holds as another inode by now is split off by its
            # events (_sync_path: names > 1, another inode)
            entry_of: dict = {}
            for rel, k in list(self.known.items()):
                ino = source_ino[rel][0]
                shared = entry_of.setdefault(target_ino[rel], k) if _linkable(k.kind) else k
                if shared is k:
                    k.ino = ino
                else:
                    self.known[rel] = shared
                    shared.names += 1
                    shared.ino = shared.ino or ino

    def run_mirror(self, run, emit, adopt: bool):
        """Run a mirror of this set: ``run(root, emit)`` (the mirror engine
        reading ``root``, its ops to ``emit``) returns a
        :class:`MirrorHandover`; with ``adopt`` (the only target this
        capture feeds) the cache becomes what it left there
        (:meth:`take_mirror`), so the events still pending are diffed
        against what the target really holds. Returns the hand-over."""
        with self._lock:
            handover = run(self.root, emit)
            if adopt:
                self.take_mirror(emit, handover)
            else:
                # the cache is the other targets': it vouches for no bytes
                # of the files this one keeps newer (their next change goes
                # out whole, to every target)
                for rel in handover.kept:
                    k, d = self.known.get(rel), handover.target.get(rel)
                    if k is not None and k.kind == stat.S_IFREG:
                        self._keep_as_is(rel, k, Known(stat.S_IFREG, 0, 0, 0, 0, d.size if d else 0))
            # the orphan policy's deletes and moves change their parents'
            # mtimes on the target: those directories' times (and the
            # root's) are sent when quiet (_settle_dirs)
            self._dirs_touched.add(b"")
            self._dirs_touched.update(p.rpartition(b"/")[0] for p in handover.orphans)
            return handover

    def take_mirror(self, emit, h: MirrorHandover) -> None:
        """Make the cache what the mirror ``h`` left on the target; ops
        (to ``emit``) for the paths it does not vouch for. A file's block
        hashes are those of the bytes the mirror compared or sent, else
        read from the source now, and only when the source file is still
        as the mirror read it (size, mtime, ctime, inode, before and after
        this read): one written since is sent whole, never diffed against
        bytes the target does not hold."""
        with self._lock:
            saved, self.emit = self.emit, emit
            try:
                before, self.known = self.known, {}
                known = self.known
                resend: list[bytes] = []
                for rel, e in h.left.items():
                    if rel not in h.links:
                        known[rel] = self._handed_entry(rel, e, h, resend)
                apart = self._handed_links(known, h)
                self._handed_others(known, before, h)
                for rel in sorted(h.unsure, key=lambda p: p.count(b"/")) + apart:
                    self._unsure(rel, h)
                for rel in resend:
                    if known.get(rel) is not None and known[rel].strong is None:
                        self._dirty[rel] = 0.0      # diffed (sent whole) when the capture goes on
            finally:
                self.emit = saved

    def _handed_links(self, known: dict, h: MirrorHandover) -> list[bytes]:
        """Hard-link names into the cache as one entry with their leader's;
        returns the names to send anew (held apart from their inode)."""
        apart = []      # names the source holds as another inode than their leader's now
        for rel, leader in h.links.items():
            shared = known.get(leader)
            if rel in h.left and shared is not None:
                if self._source_ino(rel) != shared.ino:
                    # the leader was replaced after the listing: the
                    # target linked this name to bytes it does not hold
                    apart.append(rel)
                    continue
                known[rel] = shared     # one inode on the target, one entry
                shared.names += 1
        # names the listing met as one inode but the mirror wrote as
        # several (a link made while the source was being listed:
        # one name listed before it, one after): linked again
        first_of: dict = {}
        for rel, k in known.items():
            if k.ino and _linkable(k.kind) and first_of.setdefault(k.ino, k) is not k:
                apart.append(rel)
        return apart

    def _handed_others(self, known: dict, before: dict, h: MirrorHandover) -> None:
        """Files kept newer, paths gone while listed (``before``: the cache
        as it was), entries whose attributes a stop left unset."""
        for rel in h.kept:
            d = h.target.get(rel)
            on_target = Known(stat.S_IFREG, 0, 0, 0, 0, d.size if d is not None else 0)
            known[rel] = self._keep_as_is(rel, Known(stat.S_IFREG, 0, 0, 0, 0), on_target)
        for rel in h.orphans if h.orphans_stay else ():
            d = h.target.get(rel)
            if rel in before and d is not None and stat.S_IFMT(d.mode) == before[rel].kind:
                # gone from the source while the mirror listed it (its
                # deletion not handled yet): the target's, so the
                # event that comes deletes it there
                known[rel] = Known(stat.S_IFMT(d.mode), -1, -1, -1, -1, d.size, link=d.link)
        for rel in h.stale:         # a stop came before their attributes were set
            k = known.get(rel)
            if k is not None:
                k.mode = k.mtime_ns = -1
                (self._dirs_touched if k.kind == stat.S_IFDIR else self._lost).add(rel)

    def _handed_entry(self, rel: bytes, e, h: MirrorHandover, resend: list) -> Known:
        kind = stat.S_IFMT(e.mode)
        k = Known(kind, stat.S_IMODE(e.mode), e.uid, e.gid, e.mtime_ns,
                  e.size if kind == stat.S_IFREG else 0, link=e.link,
                  ino=(e.dev, e.ino) if e.ino is not None else 0)
        k.xattrs = h.xattrs(rel)
        if kind != stat.S_IFREG:
            return k
        hashed = h.hashes.get(rel)
        if hashed is not None:
            k.block_size, k.strong = hashed
            return k
        if not self._hash_as_read(rel, k, e):
            k.strong, k.size, k.mtime_ns = None, e.size, -1
            resend.append(rel)
        return k

    def _source_ino(self, rel: bytes):
        try:
            st = os.lstat(self._abs(rel))
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _hash_as_read(self, rel: bytes, k: Known, e) -> bool:
        """Hash the source file ``rel`` into ``k`` if it is still as the
        mirror read it (``e``: size, mtime, ctime, inode) before and after."""
        def same(st) -> bool:
            return (stat.S_ISREG(st.st_mode) and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns
                    and st.st_ctime_ns == e.ctime_ns and st.st_ino == e.ino and st.st_dev == e.dev)
        try:
            fd = os.open(self._abs(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            if not same(os.fstat(fd)):
                return False
            wait_for_writes(fd)
            k.block_size = 0
            if not self._read_blocks(rel, k, fd, e.size, emit=False):
                return False
            return k.size == e.size and same(os.fstat(fd))
        finally:
            os.close(fd)

    def _unsure(self, rel: bytes, h: MirrorHandover) -> None:
        """A path the mirror failed on: what the target holds there is not
        known. A directory stays (the mirror made it), with attributes to
        send; anything else goes and is sent anew from the source."""
        s, d = h.source.get(rel), h.target.get(rel)
        if s is not None and stat.S_ISDIR(s.mode):
            self.known[rel] = Known(stat.S_IFDIR, -1, -1, -1, -1)
        else:
            # (a directory only when the source had none there to list)
            is_dir = s is None and d is not None and stat.S_ISDIR(d.mode)
            self._out(Op.rmdir(_ZERO, rel) if is_dir else Op.delete(_ZERO, rel))
            self.known.pop(rel, None)
        if os.path.lexists(self._abs(rel)):
            self._sync_path(rel, True, None)
        else:
            self._lost.add(rel)         # gone meanwhile: its event, or the quiet moment, settles it

    def resync(self, rel: bytes = b"", reason: str = "", content: bool = True) -> None:
        """Compare the subtree ``rel`` with the cache and emit ops for every
        difference (a checksum difference mirror against the cache).
        ``content=False`` compares names, kinds and attributes only, and reads
        only files the cache does not know or whose size or mtime moved."""
        with self._lock:
            self.stats["resyncs"] += 1
            self.last_rescan_reason = reason
            log.info("resync of %r: %s", rel, reason or "requested")
            if rel and not os.path.lexists(self._abs(rel)):
                self._lost.add(rel)     # moved on with its directory: found later
                return
            seen: set[bytes] = set()
            self._walk(rel, emit=True, seen=seen, content=content)
            prefix = rel + b"/" if rel else b""
            gone = [p for p in self.known if (p == rel or p.startswith(prefix)) and p not in seen and p]
            for p in sorted(gone, key=lambda p: -p.count(b"/")):   # children first
                if p in self.known:
                    self._delete(p)

    def _walk(self, rel: bytes, emit: bool, seen=None, content: bool = True) -> None:
        stack = [rel]
        if rel:
            self._sync_path(rel, emit, seen, content)
        while stack:
            d = stack.pop()
            try:
                with os.scandir(self._abs(d)) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                if exc.errno not in GONE_ERRNOS:
                    self._note_unlisted(d, exc, seen)
                continue
            for e in entries:
                child = d + b"/" + e.name if d else e.name
                try:
                    is_dir = e.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if self._excluded(child, is_dir):
                    continue
                self._sync_path(child, emit, seen, content)
                if is_dir:
                    stack.append(child)

    def _note_unlisted(self, rel: bytes, exc: OSError, seen) -> None:
        """A directory a walk could not list for a passing reason (EMFILE,
        ENOMEM, ...) is not empty: what the cache has below it counts as
        seen (a resync would delete it all on the target), and it is
        resynced again every UNREADABLE_RETRY seconds until it lists."""
        if seen is not None:
            prefix = rel + b"/" if rel else b""
            seen.update(p for p in self.known if p.startswith(prefix))
        if self._read_root is not None:
            return                  # reading the target's tree (load_target): not the source's
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        if self._resend_unsent is not None:
            self._resend_unsent[rel] = why
            log.error("capture: cannot list %s: %s; the target asked for it again and lacks "
                      "what is below it: sent once it can be listed (tried every %.0f s)",
                      os.fsdecode(self._abs(rel)), why, self.UNREADABLE_RETRY)
        elif rel not in self.unlisted:
            log.error("capture: cannot list %s: %s; what the target has below it is kept, "
                      "resynced again every %.0f s", os.fsdecode(self._abs(rel)), why,
                      self.UNREADABLE_RETRY)
        self.unlisted[rel] = why

    def _retry_unlisted(self) -> None:
        """Resync the directories a walk could not list (they may be listed now)."""
        for rel in sorted(self.unlisted, key=lambda p: p.count(b"/")):
            why = self.unlisted.pop(rel, None)
            if why is None:
                continue
            self.resync(rel, f"it could not be listed ({why})")
            if rel not in self.unlisted:
                log.warning("capture: %s can be listed now: resynced", os.fsdecode(self._abs(rel)))

    def _sync_path(self, rel: bytes, emit: bool, seen, content: bool = True) -> None:
        if seen is not None:
            seen.add(rel)
        try:
            st = os.lstat(self._abs(rel))
        except OSError:
            return
        k = self.known.get(rel)
        if k is not None and k.kind != stat.S_IFMT(st.st_mode):
            if emit:
                self._delete(rel)
            k = None
        elif k is not None and emit and k.names > 1 and k.ino and k.ino != (st.st_dev, st.st_ino):
            # one name of a hard-linked file is another file now (renamed
            # over, its rename unseen): on the target it is still linked to
            # the others, and writing the new bytes into it would change
            # theirs. Its old name goes, the new file comes anew
            self._delete(rel)
            k = None
        if k is not None and emit and not k.ino:
            k = self._learn_inode(rel, k, st)
        if k is None:
            if emit:
                self._create(rel, st)
            else:
                self._remember(rel, st, with_signature=True)
        elif stat.S_ISREG(st.st_mode) and (content or (st.st_size, st.st_mtime_ns) != (k.size, k.mtime_ns)):
            # without ``content`` a file whose size or mtime moved is read
            # all the same: its new mtime sent alone (its write's event not
            # handled yet) would give the target's older bytes the source's
            # size and mtime, and after a kill no size/mtime check looks again.
            # The attributes sent go with the bytes read (see _diff_file)
            read = self._diff_file(rel, emit=emit)
            if read is None and emit and rel in self.unreadable:
                return          # not read: its attributes wait with its bytes
            st = read or st
        elif stat.S_ISLNK(st.st_mode):
            try:
                link = os.readlink(self._abs(rel))
            except OSError:
                return          # gone since the lstat: its event follows
            if link != k.link and emit:
                self._out(Op.symlink(_ZERO, rel, link))
                k.link = link
                # a new symlink on the target, with the time and owner of
                # applying: the source's are sent again
                k.mtime_ns = k.uid = k.gid = -1
        if k is not None or not emit:
            self._attrs(rel, st, emit)

    def _keep_as_is(self, rel: bytes, k: Known, target: Known | None, st=None) -> Known:
        """``k`` made the cache entry of a file the newer mirror left alone:
        the source's attributes and size (the periodic verification finds
        nothing to send until the source's file changes), no block hashes
        (that change sends it whole, never blocks diffed against other
        bytes), and the target's size (sending it truncates what the target
        holds past the source's end)."""
        if st is None:
            try:
                st = os.lstat(self._abs(rel))
            except OSError:
                return k
        k.mode, k.uid, k.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        k.mtime_ns, k.strong, k.block_size = st.st_mtime_ns, None, 0
        k.size = st.st_size
        on_target = target.size if target is not None else st.st_size
        k.size_on_target = on_target if on_target != st.st_size else None
        k.ino = (st.st_dev, st.st_ino)
        try:
            k.xattrs = read_xattrs(self._abs(rel), WANTED_XATTR)
        except OSError:
            k.xattrs = None
        return k

    def _remember(self, rel: bytes, st, with_signature: bool = False) -> Known:
        k = Known(stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                  st.st_mtime_ns, ino=(st.st_dev, st.st_ino))
        if stat.S_ISLNK(st.st_mode):
            try:
                k.link = os.readlink(self._abs(rel))
            except OSError:
                pass            # gone since the lstat: its event follows
        self.known[rel] = k
        if with_signature and stat.S_ISREG(st.st_mode):
            self._diff_file(rel, emit=False)
        return k

    # -- ops ----------------------------------------------------------------
    def _create(self, rel: bytes, st) -> None:
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            self._out(Op.mkdir(_ZERO, rel, mode))
            self._remember(rel, st)
            self._attrs(rel, st, True, force_owner=True)
        elif stat.S_ISLNK(st.st_mode):
            try:
                link = os.readlink(self._abs(rel))
            except OSError:
                return          # gone since the lstat (a live tree): its event follows
            self._out(Op.symlink(_ZERO, rel, link))
            # the link sent (read again, it may be gone: a directory
            # renamed meanwhile)
            self._remember(rel, st).link = link
            self._attrs(rel, st, True, force_owner=True)
        elif stat.S_ISREG(st.st_mode):
            try:
                fd = os.open(self._abs(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except PermissionError as exc:
                # never an empty file on the target in its place: reported
                # by name, retried (_retry_unreadable)
                self._note_unreadable(rel, exc.strerror or str(exc))
                return
            except OSError as exc:
                if exc.errno not in _NOT_THERE_TO_READ:
                    self._note_unreadable(rel, os.strerror(exc.errno or 0))   # EMFILE...: the same
                    return
                fd = None           # gone meanwhile: its DELETE follows
            if st.st_nlink > 1:
                other = self._same_inode(rel, st)
                if other is not None:
                    if fd is not None:
                        os.close(fd)
                    self._out(Op.hardlink(_ZERO, rel, other))
                    # one inode, one cache entry: a change seen through either
                    # name is sent once
                    self.known[rel] = self.known[other]
                    self.known[rel].names += 1
                    # its content may have moved on since the other name was read
                    read = self._diff_file(rel, emit=True)
                    if read is not None:
                        self._attrs(rel, read, True)
                    return
            self._out(Op.create(_ZERO, rel, mode))
            k = self._remember(rel, st)
            k.size = 0
            if fd is not None:
                st = self._diff_file(rel, emit=True, fd=fd) or st
            self._note_recent(rel)
            self._created.add(rel)
            self._attrs(rel, st, True, force_owner=True)
        else:
            if st.st_nlink > 1 and _linkable(stat.S_IFMT(st.st_mode)):
                other = self._same_inode(rel, st)
                if other is not None:
                    # fifos and device nodes have hard links too (rsync -H keeps them)
                    self._out(Op.hardlink(_ZERO, rel, other))
                    self.known[rel] = self.known[other]
                    self.known[rel].names += 1
                    self._attrs(rel, st, True)
                    return
            self._mknod(rel, st)

    def _mknod(self, rel: bytes, st) -> None:
        """A fifo, socket or device node: made anew with its type and mode."""
        kind = stat.S_IFMT(st.st_mode)
        if kind not in MKNOD_TYPES:
            return
        rdev = st.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        self._out(Op.mknod(_ZERO, rel, kind | stat.S_IMODE(st.st_mode), rdev))
        k = self._remember(rel, st)
        k.xattrs = {}
        self._attrs(rel, st, True, force_owner=True)

    def _sync_xattrs(self, rel: bytes, k: Known, emit: bool) -> None:
        """Send the extended attributes of ``rel`` that differ from what
        the target was last sent (removals too, when that is known)."""
        try:
            now = read_xattrs(self._abs(rel), WANTED_XATTR)
        except OSError:
            return                  # gone meanwhile: its event follows
        old, k.xattrs = k.xattrs, now
        if not emit or old == now:
            return
        for name in sorted(old.keys() - now.keys()) if old else ():
            self._out(Op.removexattr(_ZERO, rel, name))
        for name, value in sorted(now.items()):
            if old is None or old.get(name) != value:
                self._out(Op.setxattr(_ZERO, rel, name, value))

    def _unreadable_reason(self, rel: bytes) -> str:
        """Why the file ``rel`` cannot be read ("" when it can, or is gone,
        or no longer a regular file)."""
        try:
            os.close(os.open(self._abs(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK))
        except PermissionError as exc:
            return exc.strerror or str(exc)
        except OSError as exc:
            if exc.errno not in _NOT_THERE_TO_READ:
                return os.strerror(exc.errno or 0)      # EMFILE...: not yet
        return ""

    UNREADABLE_RETRY = 2.0          # seconds between tries of the files that could not be read

    def _note_unreadable(self, rel: bytes, why: str) -> None:
        if self._read_root is not None:
            return                  # reading the target's tree (load_target): not the source's
        if self._resend_unsent is not None:
            self._resend_unsent[rel] = why
            log.error("capture: cannot read %s: %s; the target asked for it again and lacks it: "
                      "sent once it can be read (tried every %.0f s)", os.fsdecode(self._abs(rel)),
                      why, self.UNREADABLE_RETRY)
        elif rel not in self.unreadable:
            log.error("capture: cannot read %s: %s; not sent (the target keeps what it has), "
                      "retried every %.0f s", os.fsdecode(self._abs(rel)), why, self.UNREADABLE_RETRY)
        self.unreadable[rel] = why

    def _retry_unreadable(self) -> None:
        """Send the files that could not be read once they can be."""
        for rel in sorted(self.unreadable):
            if not os.path.lexists(self._abs(rel)):
                del self.unreadable[rel]
                continue
            if self._unreadable_reason(rel):
                continue
            del self.unreadable[rel]
            log.warning("capture: %s can be read now: sent", os.fsdecode(self._abs(rel)))
            self._sync_path(rel, True, None)

    def _learn_inode(self, rel: bytes, k: Known, st) -> Known:
        """The cache entry ``k`` of ``rel`` did not know its source inode
        (``load_target`` found the name gone from the source: renamed on
        with its directory while the restart's mirror ran); ``st`` is what
        the name holds now. Another entry with that inode was sent on its
        own (a hard link made meanwhile, whose event came while this name's
        inode was not known), so the target holds the two apart: this name
        is linked to the other one, and shares its entry. Returns the entry
        of ``rel`` now."""
        if not _linkable(k.kind) or stat.S_IFMT(st.st_mode) != k.kind:
            return k
        k.ino = (st.st_dev, st.st_ino)
        if st.st_nlink <= 1:
            return k
        other = next((p for p, kk in self.known.items()
                      if kk is not k and kk.ino == k.ino and kk.kind == k.kind), None)
        if other is None:
            return k
        log.info("capture: %r is a hard link of %r, held apart on the target: linked", rel, other)
        if k.names <= 1:
            self._out(Op.hardlink(_ZERO, rel, other))
            self.known[rel] = self.known[other]
            self.known[rel].names += 1
            return self.known[rel]
        # this entry has several names already (the target holds them as
        # one inode): the other entry's names are linked to this one
        theirs = self.known[other]
        for p in [p for p, kk in self.known.items() if kk is theirs]:
            self._out(Op.hardlink(_ZERO, p, rel))
            self.known[p] = k
            k.names += 1
        return k

    def _same_inode(self, rel: bytes, st):
        ino = (st.st_dev, st.st_ino)
        kind = stat.S_IFMT(st.st_mode)
        for p, k in self.known.items():
            if k.ino == ino and p != rel and k.kind == kind:
                return p
        return None

    def _attrs(self, rel: bytes, st, emit: bool, force_owner: bool = False) -> None:
        k = self.known.get(rel)
        if k is None:
            return
        mode = stat.S_IMODE(st.st_mode)
        is_link = stat.S_ISLNK(st.st_mode)
        kw = {}
        if mode != k.mode and not is_link:
            kw["mode"] = mode
        if self.owner and (force_owner or st.st_uid != k.uid):
            kw["uid"] = st.st_uid
        if self.owner and (force_owner or st.st_gid != k.gid):
            kw["gid"] = st.st_gid
        if st.st_mtime_ns != k.mtime_ns or force_owner:
            kw["mtime_ns"] = st.st_mtime_ns
        k.mode, k.uid, k.gid, k.mtime_ns = mode, st.st_uid, st.st_gid, st.st_mtime_ns
        if kw and emit:      # nothing differs: an atime-only change is dropped here
            self._out(Op.setattr(_ZERO, rel, **kw))
        # after the owner: a chown clears security.capability on the target,
        # so one the source still has is sent again after it
        if emit and k.xattrs and ("uid" in kw or "gid" in kw) and _CAPABILITY in k.xattrs:
            k.xattrs = {n: v for n, v in k.xattrs.items() if n != _CAPABILITY}
        self._sync_xattrs(rel, k, emit)

    # a file that changed while it was read is read again this many times
    # (only the blocks that moved travel again); past that its own event
    # brings the rest
    REREADS = 2

    def _open_to_read(self, rel: bytes, emit: bool) -> int | None:
        """A descriptor to read the file ``rel``; None when it is gone or no
        longer a regular file, or cannot be opened now: unreadable (a
        permission), or a passing failure (EMFILE, ENOMEM, ...) noted with
        the unreadable files (the target keeps what it has; retried)."""
        try:
            return os.open(self._abs(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except PermissionError as exc:
            why = exc.strerror or str(exc)
        except OSError as exc:
            if exc.errno in _NOT_THERE_TO_READ:
                return None
            why = os.strerror(exc.errno or 0)
        if emit:
            self._note_unreadable(rel, why)
        return None

    def _diff_file(self, rel: bytes, emit: bool, same_file: bool = False, fd: int | None = None):
        """Send the blocks of ``rel`` whose hash differs from the cache.
        Returns the file's attributes as they were before the bytes sent
        were read (an fstat of the same descriptor): the SETATTR the caller
        sends must come from them, never from a later lstat, whose mtime
        may be that of a write the read did not see (after a kill the
        target would hold older bytes under the source's size and mtime,
        and no size/mtime check would look again).
        None when the file is not there to read: renamed or deleted since
        (the event saying so is still to come), no longer a regular file
        (a directory now, say: the caller looks again by path), unreadable,
        or, with ``same_file``, another inode than the one the cache holds
        (the event was about a file that was renamed away and the name
        recreated: its bytes are not this name's). Without ``same_file``
        the path is what counts: another inode there is a new file, sent
        whole."""
        k = self.known[rel]
        if fd is None:      # else: opened by the caller, closed here
            fd = self._open_to_read(rel, emit)
            if fd is None:
                return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None         # a directory (or fifo...) by now: a kind change
            ino = (st.st_dev, st.st_ino)
            if k.ino and k.ino != ino and k.names > 1:
                # another file under one name of a hard-linked one: its
                # bytes must not go into the target's shared inode (the
                # caller looks at the path again: _sync_path unlinks it)
                return None
            if k.ino and k.ino != ino and k.names <= 1:
                if same_file:
                    return None
                # another file under this name: the target's copy of the
                # old one shares nothing with it
                k.strong = None
            if not k.ino and emit:
                k = self._learn_inode(rel, k, st)
            elif k.names <= 1 or not k.ino:
                k.ino = ino
            read_under = st
            for _ in range(self.REREADS + 1):
                # a write whose times fstat gave may still be copying its
                # bytes: the read waits for it (else older bytes go out
                # under its mtime, see wait_for_writes)
                wait_for_writes(fd)
                if not self._read_blocks(rel, k, fd, st.st_size, emit):
                    return None
                read_under = st
                if not emit:
                    break
                after = os.fstat(fd)
                if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
                    break
                st = after          # written meanwhile: what moved is read again
        finally:
            os.close(fd)
        # written again at every reread: the times of the last read, not of
        # the write it missed (the target's older mtime keeps it in question)
        return read_under

    def _read_blocks(self, rel: bytes, k: Known, fd: int, size: int, emit: bool) -> bool:
        """One pass of _diff_file over ``size`` bytes of ``fd``: WRITEs for
        the blocks that differ from the cache, then the cache updated to
        what was sent. False when nothing could be read."""
        ops_before = self.stats["ops"]
        # what the target holds ends there: a block of zeros past it stays a
        # hole, one before it is sent like any other (the target may hold
        # other bytes there, also when the cache has no hashes of them)
        target_size = k.size if k.size_on_target is None else k.size_on_target
        if not k.block_size:
            k.block_size = checksum.block_size_for(size)
        bs = k.block_size
        count = -(-size // bs)
        old = k.strong if k.strong is not None else np.zeros((0, 2), np.uint64)
        new = np.zeros((count, 2), np.uint64)
        n_old = len(old)
        chunk = (_READ_CHUNK // bs) * bs or bs
        if len(self._buf) < chunk:
            self._buf = bytearray(chunk)
        view = memoryview(self._buf)
        off = 0
        end_sent = 0            # the end of the last WRITE: the target's size is at least that
        while off < size:
            want = min(chunk, size - off)
            try:
                got = os.preadv(fd, [view[:want]], off)
            except OSError as exc:
                # EIO and the like: what was read is sent, the rest is
                # looked at again (the caller keeps the path)
                log.warning("capture: reading %r at %d: %s", rel, off, exc)
                if off == 0:
                    return False
                break
            if got <= 0:
                break
            sig = checksum.signature(view[:got], bs, weak=False)
            first = off // bs
            new[first:first + sig.count] = sig.strong
            if emit:
                m = min(sig.count, max(0, n_old - first))
                differ = np.ones(sig.count, bool)
                if m:
                    differ[:m] = np.any(old[first:first + m] != sig.strong[:m], axis=1)
                for i in np.flatnonzero(differ):
                    b0 = int(i) * bs
                    b1 = min(b0 + bs, got)
                    piece = view[b0:b1]
                    if off + b0 >= target_size and first + int(i) >= n_old and _is_zero(piece):
                        self.stats["bytes_skipped"] += b1 - b0   # a hole stays a hole
                        continue
                    self._out(Op.write(_ZERO, rel, off + b0, bytes(piece)))
                    self.stats["bytes_sent"] += b1 - b0
                    end_sent = off + b1
            off += got
        size = min(size, off)
        if emit and (self.stats["ops"] != ops_before or size != k.size):
            # data went out: the target's mtime is the time it applied
            # it, so the source's mtime must follow, whatever the cache said
            k.mtime_ns = -1
        if emit and size != target_size and (size < target_size or end_sent < size):
            # shrinking needs it; growing by a hole at the end needs it too
            # (growing by the WRITEs just sent does not)
            self._out(Op.truncate(_ZERO, rel, size))
        k.size = size
        if emit:
            k.size_on_target = None
        k.strong = new[: -(-size // bs)] if bs else new
        return True

    def _delete(self, rel: bytes) -> None:
        k = self.known.get(rel)
        if k is None:
            prefix = rel + b"/"
            self._lost = {p for p in self._lost if p != rel and not p.startswith(prefix)}
            self._dirty.pop(rel, None)
            return
        if k.kind == stat.S_IFDIR:
            prefix = rel + b"/"
            for p in sorted((p for p in self.known if p.startswith(prefix)),
                            key=lambda p: -p.count(b"/")):
                kk = self.known.pop(p)
                self._out(Op.rmdir(_ZERO, p) if kk.kind == stat.S_IFDIR else Op.delete(_ZERO, p))
            self._out(Op.rmdir(_ZERO, rel))
        else:
            self._out(Op.delete(_ZERO, rel))
            if k.names > 1:
                # a change of the inode seen only under this name (now gone)
                # must still reach its other names
                k.names -= 1
                self.known.pop(rel, None)
                self._unlinked.pop(rel, None)
                self._unlinked[rel] = k
                if len(self._unlinked) > self.MOVED_LIMIT:
                    del self._unlinked[next(iter(self._unlinked))]     # the oldest
                for p, kk in list(self.known.items()):
                    if kk is k:
                        self._dirty[p] = 0.0
                        break
        self.known.pop(rel, None)
        self._dirty.pop(rel, None)
        prefix = rel + b"/"
        self._lost = {p for p in self._lost if p != rel and not p.startswith(prefix)}

    def _rename(self, old: bytes, new: bytes) -> None:
        if old not in self.known:
            # it vanished from its first name before it was seen there: it is
            # new, with whatever it holds by now
            self.resync(new, "renamed before it was seen")
            return
        if new in self.known:
            self._delete(new)
        self._out(Op.rename(_ZERO, old, new))
        self._moved.pop(old, None)
        self._moved[old] = new
        if len(self._moved) > self.MOVED_LIMIT:
            del self._moved[next(iter(self._moved))]     # the oldest
        prefix = old + b"/"
        for p in [p for p in self._lost if p == old or p.startswith(prefix)]:
            self._lost.discard(p)
            self._lost.add(new + p[len(old):])
        prefix = old + b"/"
        for p in [p for p in self.known if p == old or p.startswith(prefix)]:
            self.known[new + p[len(old):]] = self.known.pop(p)
        for p in [p for p in self._dirty if p == old or p.startswith(prefix)]:
            self._dirty[new + p[len(old):]] = self._dirty.pop(p)
        for names in (self._created, self._touched, self._recent):
            moved = [p for p in names if p == old or p.startswith(prefix)]
            names.difference_update(moved)
            names.update(new + p[len(old):] for p in moved)
        if self.known[new].kind == stat.S_IFREG:
            self._touched.add(new)
        if self.known[new].kind == stat.S_IFDIR:
            # entries made in it under its old name may not have been seen
            # (their events name a path that was gone when handled): look
            # once the events read so far are handled
            self._lost.add(new)

    # -- events ---------------------------------------------------------------
    def handle(self, ev: Event) -> None:  # noqa: C901 - one branch per event kind
        self.stats["events"] += 1
        rel = ev.path
        if self._fault and rel.rpartition(b"/")[2] == self._fault:
            raise RuntimeError(f"injected fault on {rel!r} (${FAULT_ENV}, tests only)")
        if ev.kind in (Kind.CREATED, Kind.DELETED, Kind.MOVED):
            # the parent's mtime moved even when no op follows (a name
            # created and gone before its event was read): sent when quiet
            self._dirs_touched.add(rel.rpartition(b"/")[0])
            if ev.kind == Kind.MOVED and ev.new_path:
                self._dirs_touched.add(ev.new_path.rpartition(b"/")[0])
        if ev.kind == Kind.RESCAN:
            self._flush_dirty(force=True)
            self.resync(rel, ev.reason)
        elif ev.kind == Kind.MOVED:
            self._flush_dirty(force=True)
            assert ev.new_path is not None      # a MOVED event names both paths
            self._rename(rel, ev.new_path)
        elif ev.kind == Kind.CREATED:
            self._flush_dirty(force=True)
            try:
                st = os.lstat(self._abs(rel))
            except OSError:
                self._lost.add(rel)
                return
            if rel in self.known:
                self._sync_path(rel, True, None)
            else:
                self._create(rel, st)
        elif ev.kind == Kind.DELETED:
            self._flush_dirty(force=True)
            # emit callbacks read it: a move out of the set deletes even on
            # connections that ignore deletes
            self.moving_out = ev.reason == MOVED_OUT
            try:
                self._delete(rel)
            finally:
                self.moving_out = False
            if ev.ino is not None:
                # other names keep the file: a write through this one (its
                # event folded into the DELETE, or read when it was gone)
                # is theirs to send, also when the cache did not know this
                # name was one of them (a link made and unlinked unseen)
                for p, k in self.known.items():
                    if k.ino == ev.ino and k.kind == stat.S_IFREG:
                        self._dirty[p] = 0.0
        elif ev.kind == Kind.MODIFIED:
            self._dirty.setdefault(rel, time.monotonic())
        elif ev.kind == Kind.CLOSED:
            self._dirty[rel] = 0.0       # diff it now
        elif ev.kind == Kind.ATTRIB:
            self._flush_dirty(force=True)
            if rel in self.known and os.path.lexists(self._abs(rel)):
                # attributes only, unless the size or mtime moved: then the
                # bytes are compared and the mtime goes with them
                self._sync_path(rel, True, None, content=False)

    def _flush_dirty(self, force: bool = False, settled: bool = False) -> None:
        """Diff the files modified at least ``settle`` seconds ago (all with
        ``force``). A path that holds another inode than the cached one
        waits for the rename event that explains it, unless ``settled``
        (no event left to read): then the path's file is sent as it is."""
        now = time.monotonic()
        for rel, t in list(self._dirty.items()):
            if force or now - t >= self.settle:
                if rel in self.known and self.known[rel].kind == stat.S_IFREG:
                    read = self._diff_file(rel, emit=True, same_file=not settled)
                    if read is not None:
                        del self._dirty[rel]
                        self._note_recent(rel)
                        self._attrs(rel, read, True)
                        continue
                    del self._dirty[rel]
                    try:
                        st = os.lstat(self._abs(rel))
                    except OSError:
                        self._lost.add(rel)   # renamed away meanwhile: found later
                        continue
                    if not settled and stat.S_ISREG(st.st_mode):
                        self._dirty[rel] = t  # another inode: its rename event comes first
                    else:
                        self._lost.add(rel)   # a directory now, or unreadable: looked at again
                else:
                    del self._dirty[rel]
                    if rel not in self.known and not self._excluded(rel, False) \
                            and os.path.lexists(self._abs(rel)):
                        # a file the cache lacks (a stopped mirror did not
                        # reach it): looked at with the lost paths, when quiet
                        self._lost.add(rel)

    def _find_lost(self, drop_missing: bool = False) -> None:
        """Look again at the paths that were gone when their event came.
        One still missing is kept (its parent's rename may not be read yet)
        unless ``drop_missing``: after a quiet period every event is in."""
        lost, self._lost = sorted(self._lost, key=lambda p: p.count(b"/")), set()
        for rel in lost:
            if not os.path.lexists(self._abs(rel)):
                if not drop_missing:
                    self._lost.add(rel)
                elif rel in self.known:
                    # every event is in, yet the cache has it: events were
                    # lost (fanotify folds a rename identical to one still
                    # queued into it: a -> b -> c -> a -> b ... read late
                    # ends at a stale name). Its nearest existing directory
                    # is compared with the cache, which finds it anew
                    where = rel.rpartition(b"/")[0]
                    while where and not os.path.lexists(self._abs(where)):
                        where = where.rpartition(b"/")[0]
                    self.resync(where, f"{os.fsdecode(rel)} is gone, no event said so",
                                content=False)
                continue
            if rel in self.known:
                if self.known[rel].kind == stat.S_IFDIR:
                    self.resync(rel, "directory renamed", content=False)
                    # what the target did with it meanwhile is not known
                    # (a restart's mirror may have met it half renamed):
                    # its directories' times are sent when quiet
                    prefix = rel + b"/"
                    self._dirs_touched.update(
                        p for p, k in self.known.items()
                        if k.kind == stat.S_IFDIR and (p == rel or p.startswith(prefix)))
                else:
                    self._sync_path(rel, True, None)     # known: its change was missed
                continue
            parent = rel.rpartition(b"/")[0]
            if parent and parent not in self.known:
                # the parent itself is new: its own creation brings it; once
                # every event is in and it is still unknown (a directory a
                # stopped mirror did not reach), it is looked at itself
                if drop_missing and not self._excluded(parent, True):
                    self._lost.add(parent)
                continue
            self.resync(rel, "created, then moved with its directory before it was seen")

    RECENT_LIMIT = 100_000

    def _note_recent(self, rel: bytes) -> None:
        if len(self._recent) < self.RECENT_LIMIT:
            self._recent.add(rel)

    def _verify_touched(self) -> None:
        """Quiet after renames: compare the renamed files' content with what
        was sent under their names, and send what differs."""
        touched, self._touched = self._touched, set()
        self._verify_content(touched)

    def _check_created(self) -> None:
        """Quiet now: a file created since the last quiet moment whose size
        or mtime moved on since it was read is compared again (its writes
        may have come with no event of their own)."""
        created, self._created = self._created, set()
        for rel in sorted(created):
            k = self.known.get(rel)
            if k is None or k.kind != stat.S_IFREG:
                continue
            try:
                st = os.lstat(self._abs(rel))
            except OSError:
                self._created.add(rel)      # moved on with its directory: next time
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_size != k.size or st.st_mtime_ns != k.mtime_ns):
                self._dirty[rel] = 0.0
        self._flush_dirty(force=True, settled=True)

    def _verify_content(self, paths) -> None:
        for rel in sorted(paths):
            k = self.known.get(rel)
            if k is None or k.kind != stat.S_IFREG:
                continue
            ops = self.stats["ops"]
            read = self._diff_file(rel, emit=True)
            if read is not None:
                self._attrs(rel, read, True)
            if self.stats["ops"] != ops:
                self.stats["reverified"] += 1
                log.info("capture: %r differed from what was sent under its name: resent", rel)

    def poll(self, timeout: float) -> int:
        """Read and handle the events ready within ``timeout``; returns how many."""
        with self._lock:          # one reader at a time: events are handled in order
            events = self.watcher.read(timeout=timeout)
            for ev in events:
                self.handle(ev)
            self._flush_dirty(force=not events, settled=not events and not self.watcher.pending_moves)
            if self._lost and not events:
                # quiet, no rename half pending: every event is in, so a
                # path still missing is gone for good (kept, it would hold
                # back _settle_dirs below forever)
                self._find_lost(drop_missing=not self.watcher.pending_moves)
            if not events and not self.watcher.pending_moves:
                if self._touched:
                    self._verify_touched()
                if self._created:
                    self._check_created()
                if self._dirs_touched and not self._lost and not self._dirty:
                    self._settle_dirs()
        return len(events)

    def sync(self, quiet: float = 0.01, max_time: float | None = None) -> None:
        """Handle everything the kernel has reported so far (a rename half
        still waiting for its pair counts as not handled yet). With
        ``max_time``, stop after that long even if events keep coming (a
        task queued while writers go on marks the state when it was queued,
        not a later quiet moment)."""
        deadline = None if max_time is None else time.monotonic() + max_time
        try:
            self._sync(quiet, deadline)
        except Exception as exc:                # noqa: BLE001 - the capture thread restarts
            self._failed(exc)

    def _sync(self, quiet: float, deadline: float | None) -> None:
        if self.state != "running":
            return          # restarting (the capture thread resyncs) or failed
        while True:
            while self.poll(quiet) or self.watcher.pending_moves or self._dirty:
                if deadline is not None and time.monotonic() > deadline:
                    with self._lock:
                        self._flush_dirty(force=True)
                    return
            with self._lock:
                if not self._lost:
                    self._settle_dirs()
                    return
                self._find_lost(drop_missing=True)

    MAX_FAILURES = 5            # in a row, FAILURE_WINDOW apart at most: then the capture gives up
    FAILURE_WINDOW = 60.0

    state = "running"           # running, restarting (after a failure), failed, stopped
    error = ""                  # the last failure, kept after a recovery (status shows it)

    def run(self) -> None:
        """Handle events until ``stop()``. An unexpected failure is logged
        with its traceback and the capture restarts: a structural resync
        of the set, and the content of what was pending, so what it missed
        meanwhile is sent. After MAX_FAILURES in a row it stops for good
        (``state`` 'failed', ``error`` says why): the engine reports it.
        :meth:`close` waits for it to return."""
        with self._close_lock:
            if self._closed:
                self.state = "stopped"
                return
            self._run_thread = threading.current_thread()
        try:
            self._run()
        finally:
            with self._close_lock:
                if self._closed:
                    # close() gave up waiting for this thread, or was called
                    # from it: the watcher is closed now that it is done with it
                    self._close_watcher()

    def _run(self) -> None:
        last_verify = last_retry = time.monotonic()
        while not self._stop.is_set() and self.state != "failed":
            try:
                if self.state == "restarting":
                    self._restart()
                    self.state = "running"
                self._serve_requests()
                if self.poll(0.05):
                    continue
                if (self.unreadable or self.unlisted or self._unfinished) \
                        and time.monotonic() - last_retry >= self.UNREADABLE_RETRY:
                    with self._lock:
                        self._retry_unreadable()
                        self._retry_unlisted()
                        self._retry_resends()
                    last_retry = time.monotonic()
                if self.verify_interval is not None \
                        and time.monotonic() - last_verify >= self.verify_interval:
                    self.verify()
                    last_verify = time.monotonic()
            except Exception as exc:            # noqa: BLE001 - never a silent dead thread
                if self._failed(exc):
                    return
                self._stop.wait(min(5.0, 0.1 * 2 ** self._failures))
        if self.state != "failed":
            self.state = "stopped"

    _failures = 0
    _last_failure = 0.0

    def _failed(self, exc: BaseException) -> bool:
        """Log an unexpected failure with its traceback and mark the
        capture for a restart; True when it failed too often to go on."""
        now = time.monotonic()
        self._failures = self._failures + 1 if now - self._last_failure < self.FAILURE_WINDOW else 1
        self._last_failure = now
        self.stats["failures"] += 1
        self.error = f"capture of {os.fsdecode(self.root)} failed: {type(exc).__name__}: {exc}"
        if self._failures >= self.MAX_FAILURES:
            self.state = "failed"
            log.critical("%s (%d times in a row): capture stopped", self.error, self._failures,
                         exc_info=exc)
            return True
        self.state = "restarting"
        log.error("%s: restarting with a resync of the set", self.error, exc_info=exc)
        return False

    def verify(self) -> None:
        """The periodic verification: names, kinds and attributes of the
        whole set, and the content of the files changed since the last one."""
        with self._lock:
            self.resync(b"", "periodic verification", content=False)
            recent, self._recent = self._recent, set()
            self._verify_content(recent)

    def _restart(self) -> None:
        with self._lock:
            pending = set(self._dirty) | set(self._lost) | self._touched
            self._dirty.clear()
            self._lost.clear()
            self._touched.clear()
            self.resync(b"", "capture restarted after a failure", content=False)
            for rel in sorted(pending):
                try:
                    if os.path.lexists(self._abs(rel)):
                        self._sync_path(rel, True, None)
                except Exception as exc:      # noqa: BLE001 - one path must not stop the restart
                    log.error("capture: %r skipped in the restart: %s", rel, exc)

    # -- targeted resync, asked by a target whose applier found a divergence --
    def request_resync(self, rel: bytes, emit=None, reason: str = "") -> None:
        """Queue a resync of the subtree ``rel`` for the capture thread (any
        thread may call it). Its ops go to ``emit`` (default: this capture's
        own output) through the same stream, behind what was captured before,
        and end with a MARK ``smirror.resync-done``."""
        rel = bytes(rel)
        if not rel or rel.startswith(b"/") or b"\0" in rel or b".." in rel.split(b"/") \
                or b"" in rel.split(b"/"):
            log.error("capture of %s: a resync of %r was asked: not a path inside the set, ignored",
                      os.fsdecode(self.root), rel)
            return
        with self._requests_lock:
            self._requests.append((rel, emit, reason))

    def _serve_requests(self) -> None:
        while self._requests:
            with self._requests_lock:
                rel, emit, reason = self._requests.pop(0)
            self.resend(rel, emit, reason)

    MOVED_LIMIT = 10_000        # renames remembered for resyncs (old -> new)

    MOVED_NAMES = 32            # names a resend follows a path to, at most

    def _later_names(self, rel: bytes) -> list[bytes]:
        """The names what the target held at ``rel`` may have now: where
        the renames this capture sent since moved ``rel`` itself, or a
        directory above it, one after the other. Each one is a name the
        target may hold it at: which of those renames it applied is not
        known here (the one that failed and brought the resync did not)."""
        names: list[bytes] = []
        todo, seen = [rel], {rel}
        while todo and len(names) < self.MOVED_NAMES:
            cur = todo.pop(0)
            parts = cur.split(b"/")
            for i in range(len(parts), 0, -1):
                head = b"/".join(parts[:i])
                new = self._moved.get(head)
                if new is None or new == head:
                    continue
                name = new + cur[len(head):]
                if name not in seen:
                    seen.add(name)
                    names.append(name)
                    todo.append(name)
        return names[:self.MOVED_NAMES]

    def _other_names(self, paths) -> list[bytes]:
        """The names that keep the file one of ``paths`` was a name of
        before it was removed (a hard link): what the target skipped under
        the removed name, the cache counts as theirs."""
        others: list[bytes] = []
        for path in paths:
            k = self._unlinked.pop(path, None)
            if k is not None:
                others += sorted(p for p, kk in self.known.items()
                                 if kk is k and p not in paths and p not in others)
        return others

    def resend(self, rel: bytes, emit=None, reason: str = "") -> None:
        """Bring a target's subtree ``rel`` in line whatever it holds now:
        first a resync of ``rel`` against the cache for every output (what
        changed meanwhile), then, to ``emit`` only, ``rel`` removed and
        sent again whole from the source, then the done MARK. A ``rel``
        renamed since (the target asked with its failing op's path) is
        resent under every name the renames sent since give it, its own
        and its directories' (:meth:`_later_names`): the target renamed
        what it held there, divergence and all; a name the source does not
        have is deleted there. What the resend cannot send (a directory it
        cannot list, a file it cannot open: EMFILE...) the target lacks
        from then on: it is reported (``unlisted``, ``unreadable``) and
        sent to ``emit`` once it can be (:meth:`_retry_resends`), and the
        done MARK follows that."""
        with self._lock:
            self._flush_dirty(force=True)
            out = emit if emit is not None else self.emit
            self._resend_parts(rel, [rel], out, reason or "asked by the target")
            self.stats["resyncs_served"] = self.stats.get("resyncs_served", 0) + 1

    def _names_to_resend(self, rel: bytes) -> list[bytes]:
        """``rel`` and, when the source no longer has it, the names the
        target may hold it under: later names (renames), and a removed
        hard-link name's other names (:meth:`_later_names`, :meth:`_other_names`)."""
        paths = [rel]
        if rel and not os.path.lexists(self._abs(rel)):
            later = self._later_names(rel)
            if later:
                log.info("capture: %r, to be resynced, was renamed (or a directory above "
                         "it): resent at %s too", rel, ", ".join(map(repr, later)))
                paths += later
            others = self._other_names(paths)
            if others:
                log.info("capture: %r, to be resynced, was a name of a hard-linked file, "
                         "removed since: its other names are resent (%s)", rel,
                         ", ".join(map(repr, others)))
                paths += others
        return paths

    def _resend_parts(self, rel: bytes, parts, out, reason: str) -> None:
        """Send ``parts`` (``rel`` itself, or what an earlier resend of it
        could not send) again to ``out``; the done MARK of ``rel`` once all
        of it went out, else what is left waits (:meth:`_retry_resends`)."""
        unsent: dict[bytes, str] = {}
        done: set[bytes] = set()
        for part in parts:
            for path in self._names_to_resend(part):
                if path not in done:
                    done.add(path)
                    unsent.update(self._send_again(path, out, reason))
        if unsent:
            self._unfinished.append(_UnfinishedResend(rel, out, reason, unsent))
            if len(self._unfinished) > self.MOVED_LIMIT:
                lost = self._unfinished.pop(0)       # the oldest
                log.error("capture: too many resends wait for paths to be listed or read: the "
                          "one of %r is dropped (its target lacks %s until its next resync)",
                          lost.rel, ", ".join(map(repr, sorted(lost.parts))))
            return
        out(Op.mark(_ZERO, MARK_RESYNC_DONE, json.dumps({"path": os.fsdecode(rel)}).encode()))

    def _send_again(self, path: bytes, out, reason: str) -> dict[bytes, str]:
        """``path`` resynced against the cache (every output), then removed
        on ``out``'s target and sent to it whole from the source. Returns
        what could not be sent (path -> why): the target lacks it now."""
        self.resync(path, reason)
        self._lost.discard(path)
        out(Op.delete(_ZERO, path))
        # what the target held there goes: its directory's mtime
        # moves there, the source's is sent again when quiet
        self._dirs_touched.add(path.rpartition(b"/")[0])
        if not path or not os.path.lexists(self._abs(path)):
            return {}
        prefix = path + b"/"
        # copies, with no block hashes and no attributes: a name
        # in the subtree linked to a file outside it is sent
        # whole, bytes and attributes, never diffed against the
        # cache (ops that the target skipped, which brought this
        # resync, changed that inode in the cache only); the
        # cache's own entries stay as they are
        target_known = {p: _detached(k) for p, k in self.known.items()
                        if p != path and not p.startswith(prefix)}
        saved = self.emit, self.known, self.stats
        self.emit, self.known = out, target_known
        self.stats = dict.fromkeys(saved[2], 0)
        unsent: dict[bytes, str] = {}
        self._resend_unsent = unsent
        try:
            self._walk(path, emit=True, seen=set())
        finally:
            self.emit, self.known, self.stats = saved
            self._resend_unsent = None
        return unsent

    def _retry_resends(self) -> None:
        """Send what resends could not (:meth:`resend`) to their targets,
        each part once it is no longer unlisted or unreadable (those
        retries take it off once it can be listed or read; gone, it is
        deleted there or followed to its new name)."""
        for r in list(self._unfinished):
            if any(p in self.unlisted or p in self.unreadable for p in r.parts):
                continue
            self._unfinished.remove(r)
            log.warning("capture: what the resend of %r could not send (%s) can be now: sent",
                        r.rel, ", ".join(map(repr, sorted(r.parts))))
            self._resend_parts(r.rel, sorted(r.parts), r.out, r.reason)

    def stop(self) -> None:
        self._stop.set()

    CLOSE_TIMEOUT = 10.0        # seconds close() waits for the thread in run()

    _run_thread: threading.Thread | None = None
    _closed = False
    _watcher_closed = False

    def close(self, timeout: float | None = None) -> None:
        """Stop, wait for the thread in :meth:`run` to return (up to
        ``timeout``, default CLOSE_TIMEOUT seconds), then close the watcher:
        once close() returned, this capture emits nothing more. A thread
        that does not return in time is logged and left to close the
        watcher itself when it does (closed under it, its descriptor could
        be another file's by then). A second call does nothing."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self.stop()
            thread = self._run_thread
        if thread is threading.current_thread():
            return          # called from run()'s own thread (an emit): it closes the watcher
        if thread is not None:
            timeout = self.CLOSE_TIMEOUT if timeout is None else timeout
            thread.join(timeout)
            if thread.is_alive():
                log.error("capture of %s: its thread (%s) did not return within %.1f s of "
                          "close(): its watcher is closed when it does", os.fsdecode(self.root),
                          thread.name, timeout)
                return
        with self._close_lock:
            self._close_watcher()

    def _close_watcher(self) -> None:
        """Close the watcher once (the caller holds _close_lock)."""
        if not self._watcher_closed:
            self._watcher_closed = True
            self.watcher.close()
