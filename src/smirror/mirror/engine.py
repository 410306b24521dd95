"""One-shot mirror: bring a target tree in line with a source tree.

Modes (as in the Double-Take "mirror" and rsync):

* full (default): every file is written again;
* ``different``: only files whose size or mtime differ (rsync's quick check);
* ``checksum``: files present on both sides are compared - by whole-file
  digest first (files under 32 MiB, and larger ones whose size and mtime
  are equal), then block by block - and only
  differing blocks are written, in place; a file whose size changed (or
  whose content shifted) is rebuilt from a rolling delta; files under 1 MiB
  that differ are rewritten whole. With ``different`` too, only the files
  the quick check flags are compared;
* ``newer``: only files where the source is newer.

The :class:`Mirror` plans from two listings (source: scanned here; target:
asked from a :class:`~smirror.mirror.target.TargetSide`) and executes through
that same interface, so a remote target daemon can stand in for the local
directory. Checksum work imports :mod:`smirror.kernels.checksum` lazily, and numpy
loads only once block signatures are made: a quick check, or a checksum
run over unchanged files, stays light.
"""
from __future__ import annotations

import errno
import os
import stat
import threading
import time
from typing import cast

from smirror.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    ConfigError,
    MirrorError,
    SourceChanged,
)
from smirror.fs.files import (
    aligned_buffer,
    drop_lease,
    fd_digest,
    fd_signature,
    read_full,
    read_xattrs,
    take_read_lease,
    wait_for_writes,
    xattr_filter,
)
from smirror.fs.tree import DIR, FILE, SPECIAL, SYMLINK, Entry, Listing, Rules, entry_from_stat, scan
from smirror.mirror.compare import source_is_newer
from smirror.mirror.local import LocalTarget
from smirror.mirror.target import TargetSide, WholeFileWriter

# the values of smirror.cli.main's EXIT_* (not imported: the library stays free of argparse)

INPLACE_MIN = 1 << 20        # smaller files are rewritten whole when they differ
PARALLEL_SIDES_MIN = 32 << 20   # larger files hash source and target on two threads
SHIFT_FRACTION = 0.5         # more blocks changed than this: look for shifted content
DELTA_COPY_MAX = 1 << 30     # an unleasable source up to this size is copied for a delta
# a source whose ctime is older than its target's by this much has had no
# change (xattrs included) since the target's metadata was written; the margin
# covers coarse ctime clocks and a change racing the previous mirror's write
CTIME_MARGIN_NS = 2_000_000_000
_FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)     # the clock file times come from
_TICK_NS = int(time.clock_getres(_COARSE) * 1e9) or 1


def _racy(st) -> bool:
    """A file changed within the current tick of the clock that file
    times come from: a write in that same tick, while the file is copied,
    would leave mtime and ctime as they are, and the change unseen (a copy
    takes a few ms; a tick is 4 ms here). Waits until the tick is over (at
    most two) and says so; the caller takes a fresh fstat, and any later
    write shows in the times. Copies are checked by size, mtime and ctime."""
    newest = max(st.st_mtime_ns, st.st_ctime_ns)
    now = time.clock_gettime_ns(_COARSE)
    if not now - _TICK_NS <= newest <= now + 2 * _TICK_NS:
        return False
    deadline = time.monotonic() + 3 * _TICK_NS / 1e9
    while time.clock_gettime_ns(_COARSE) <= newest and time.monotonic() < deadline:
        time.sleep(_TICK_NS / 4e9)
    return True


class _Future:
    __slots__ = ("done", "value", "error")

    def __init__(self):
        self.done = threading.Event()
        self.value = None
        self.error = None

    def wait(self):
        self.done.wait()

    def result(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


class _Helpers:
    """A few daemon threads running submitted calls. (concurrent.futures
    would import logging: ~8 ms more start-up on every run, and a quick
    check of an unchanged tree is a matter of tens of milliseconds.)"""

    def __init__(self, count: int, name: str):
        import queue  # here: most runs start no helper (queue imports heapq)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._loop, name=name, daemon=True)
                         for _ in range(count)]
        for t in self._threads:
            t.start()

    def _loop(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            try:
                fut.value = fn(*args)
            except BaseException as exc:   # noqa: BLE001 - handed to whoever waits on it
                fut.error = exc
            fut.done.set()

    def submit(self, fn, *args) -> _Future:
        fut = _Future()
        self._queue.put((fut, fn, args))
        return fut

    def shutdown(self):
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()


class MirrorOptions:
    """What a mirror does; see the module docstring for the modes.

    ``orphans``: "report" (default), "delete" or "move" (to ``orphan_dir``);
    ``orphans_older_than``: days, limits orphan handling to older entries;
    ``rules``: a :class:`smirror.fs.tree.Rules` (include/exclude);
    ``threads``: workers hashing and copying (default: CPUs);
    ``retries``: attempts for a file that changes while it is copied.
    """

    def __init__(self, *, different=False, checksum=False, newer=False, block_size=None,
                 orphans="report", orphan_dir=None, orphans_older_than=None, rules=None,
                 dry_run=False, threads=None, xattrs=True, fsync=False, retries=3):
        if orphans not in ("report", "delete", "move"):
            raise ConfigError(f"orphans must be report, delete or move, got {orphans!r}")
        if orphans == "move" and not orphan_dir:
            raise ConfigError("orphans=move needs a directory to move them to")
        if block_size is not None:
            from smirror.kernels.checksum import check_block_size
            try:
                check_block_size(block_size)
            except ValueError as exc:
                raise ConfigError(f"--block-size: {exc}") from None
        if orphans_older_than is not None and not orphans_older_than >= 0:
            raise ConfigError(f"--orphans-older-than must be >= 0 days, got {orphans_older_than}")
        threads = os.cpu_count() or 1 if threads is None else threads
        if not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"--threads must be a positive integer, got {threads!r}")
        self.different = different
        self.checksum = checksum
        self.newer = newer
        self.block_size = block_size
        self.orphans = orphans
        self.orphan_dir = orphan_dir
        self.orphans_older_than = orphans_older_than
        self.rules = rules if rules is not None else Rules()
        self.dry_run = dry_run
        self.threads = threads
        self.xattrs = xattrs
        self.fsync = fsync
        self.retries = max(1, retries)

    @property
    def mode(self) -> str:
        parts = [name for name, on in (("different", self.different),
                                       ("newer", self.newer),
                                       ("checksum", self.checksum)) if on]
        return "+".join(parts) if parts else "full"


def show(rel: bytes) -> str:
    """A path for people: undecodable bytes as \\x.. escapes."""
    return rel.decode("utf-8", "backslashreplace") if rel else "."


class Summary:
    """The outcome of a mirror: counts, bytes and what went wrong."""

    def __init__(self, mode: str, dry_run: bool):
        self.mode = mode
        self.dry_run = dry_run
        self.files_scanned = 0       # regular files in the source
        self.dirs_scanned = 0
        self.links_scanned = 0       # symlinks
        self.bytes_scanned = 0       # size of the regular files
        self.created = 0             # entries that did not exist on the target
        self.changed = 0             # existing files whose data was updated
        self.unchanged = 0           # files left as they were (metadata may be fixed)
        self.meta_updated = 0        # entries whose mode/owner/mtime/xattrs were set
        self.hardlinks = 0           # hard links made
        self.removed = 0             # target entries removed because the type changed
        self.orphans: list[bytes] = []            # relative paths
        self.orphans_deleted = 0
        self.orphans_moved = 0
        self.bytes_literal = 0       # data taken from the source and written
        self.bytes_matched = 0       # data found already equal on the target
        self.bytes_written = 0       # data the target wrote (incl. delta copies)
        self.errors: list[tuple[bytes, str]] = []     # (relative path, message)
        self.actions: list[tuple[str, bytes]] = []    # dry run: (action, relative path)
        self.seconds = 0.0
        self.stopped = False         # ended early by the caller's stop event

    @property
    def exit_code(self) -> int:
        return EXIT_PARTIAL if self.errors else EXIT_OK

    def to_dict(self) -> dict:
        return {
            "mode": self.mode, "dry_run": self.dry_run,
            "files_scanned": self.files_scanned, "dirs_scanned": self.dirs_scanned,
            "symlinks_scanned": self.links_scanned, "bytes_scanned": self.bytes_scanned,
            "created": self.created, "changed": self.changed, "unchanged": self.unchanged,
            "meta_updated": self.meta_updated, "hardlinks": self.hardlinks,
            "removed": self.removed,
            "orphans": len(self.orphans), "orphan_paths": [show(r) for r in self.orphans],
            "orphans_deleted": self.orphans_deleted, "orphans_moved": self.orphans_moved,
            "bytes_literal": self.bytes_literal, "bytes_matched": self.bytes_matched,
            "bytes_written": self.bytes_written,
            "errors": [{"path": show(r), "error": m} for r, m in self.errors],
            "actions": [{"action": a, "path": show(r)} for a, r in self.actions],
            "seconds": round(self.seconds, 6), "stopped": self.stopped,
            "exit_code": self.exit_code,
        }


def check_roots(src, dst) -> tuple[bytes, bytes]:
    """Validate SRC and DST; returns their absolute real paths (bytes)."""
    src_b, dst_b = os.fsencode(src), os.fsencode(dst)
    try:
        os.stat(src_b)
    except FileNotFoundError:
        raise MirrorError(f"source {show(src_b)!r} does not exist") from None
    except OSError as exc:
        raise MirrorError(f"source {show(src_b)!r}: {exc.strerror}") from None
    if not os.path.isdir(src_b):
        raise MirrorError(f"source {show(src_b)!r} is not a directory")
    real_src = os.path.realpath(src_b)
    real_dst = os.path.realpath(dst_b)
    if os.path.lexists(dst_b) and not os.path.isdir(dst_b):
        err = MirrorError(f"target {show(dst_b)!r} exists and is not a directory")
        err.exit_code = EXIT_USAGE
        raise err
    if real_src == real_dst:
        err = MirrorError(f"source and target are the same directory {show(real_src)!r}")
        err.exit_code = EXIT_USAGE
        raise err
    if real_dst.startswith(real_src + b"/"):
        err = MirrorError(f"target {show(dst_b)!r} is inside source {show(src_b)!r}")
        err.exit_code = EXIT_USAGE
        raise err
    if real_src.startswith(real_dst + b"/"):
        err = MirrorError(f"source {show(src_b)!r} is inside target {show(dst_b)!r}")
        err.exit_code = EXIT_USAGE
        raise err
    return real_src, real_dst


def _same_meta(s, d, owner: bool) -> bool:
    return (s.mode == d.mode and s.mtime_ns == d.mtime_ns
            and (not owner or (s.uid == d.uid and s.gid == d.gid)))


def _runs(indexes):
    """Consecutive runs of ascending block indexes: [(first, end), ...]."""
    out = []
    it = iter(indexes.tolist())
    for first in it:
        end = first + 1
        for i in it:
            if i != end:
                out.append((first, end))
                first, end = i, i + 1
                continue
            end += 1
        out.append((first, end))
        break
    return out


def _parent_of(rel: bytes) -> bytes:
    return rel.rpartition(b"/")[0]


def _merge_ops(ops):
    """Join adjacent delta ops of the same kind and contiguous offsets."""
    merged: list[tuple[int, int, int]] = []
    for kind, off, n in ops:
        if merged:
            pk, po, pn = merged[-1]
            if pk == kind and po + pn == off:
                merged[-1] = (kind, po, pn + n)
                continue
        merged.append((kind, off, n))
    return merged


class Mirror:
    """Mirror ``source`` (a local directory) to ``target`` (a path or a
    :class:`TargetSide`). ``progress``: an object with ``start(total_bytes,
    total_files)``, ``advance(nbytes)``, ``file_done()`` and ``finish()``
    (see :mod:`smirror.cli.progress`), or None. ``stop``: a
    :class:`threading.Event` another thread sets to end the mirror early,
    between files."""

    def __init__(self, source, target: str | bytes | os.PathLike | TargetSide,
                 options: MirrorOptions | None = None, progress=None,
                 stop: threading.Event | None = None):
        self.opts = options or MirrorOptions()
        # set by another thread: no further file is started (the one being
        # written is finished); the summary says ``stopped``
        self.stop = stop if stop is not None else threading.Event()
        if not isinstance(target, (str, bytes, os.PathLike)):
            self.src_root = os.fsencode(os.path.abspath(os.fsencode(source)))
            if not os.path.isdir(self.src_root):
                raise MirrorError(f"source {show(self.src_root)!r} is not a directory")
            self.target = target
        else:
            self.src_root, dst_root = check_roots(source, target)
            if not os.path.lexists(dst_root) and not self.opts.dry_run:
                os.makedirs(dst_root)
            self.target = LocalTarget(dst_root, xattrs=self.opts.xattrs, fsync=self.opts.fsync)
            self._own_target = True     # its directory handle is closed when run() ends
        self.owner = getattr(self.target, "owner", os.geteuid() == 0)
        # writes travel as ops (a remote target): no digests, no rolling delta
        self._streamed = getattr(self.target, "streamed", False)
        self.progress = progress
        self.summary = Summary(self.opts.mode, self.opts.dry_run)
        # the hand-over to a capture that goes on from this mirror (its cache
        # of what the target holds): per source path, the source's entry as
        # written or found equal (a file: the fstat its bytes were read
        # under, unchanged to the end of the read; a hard link: the name's
        # scan entry, the inode its leader's), ``hashes`` the block hashes of
        # the bytes a streamed checksum compare left on the target, ``kept``
        # files a newer mirror left as the target has them, ``unsure`` the
        # source paths this run does not vouch for (failed; see handover())
        self.left: dict[bytes, Entry] = {}
        self.hashes: dict[bytes, tuple[int, object]] = {}
        self.kept: set[bytes] = set()
        self.unsure: set[bytes] = set()
        self.stale: set[bytes] = set()      # in left, attributes not set (a stop came first)
        self._done: set[bytes] = set()      # files committed by this run
        self.source_listing: Listing | None = None
        self.target_listing: Listing | None = None
        self._lock = threading.Lock()
        self._wanted_xattr = xattr_filter()
        self._fatal: OSError | None = None
        self._hash_pool: _Helpers | None = None
        self._orphan_skip: tuple[bytes, ...] = ()
        if self.opts.orphans == "move":
            odir = os.path.realpath(os.fsencode(self.opts.orphan_dir))
            if odir == self.src_root or odir.startswith(self.src_root + b"/"):
                err = MirrorError(f"orphan directory {show(odir)!r} is inside the source")
                err.exit_code = EXIT_USAGE
                raise err
            troot = getattr(self.target, "root", None)
            if troot is not None and odir.startswith(troot + b"/"):
                self._orphan_skip = (odir[len(troot) + 1:],)
            if troot is not None and odir == troot:
                err = MirrorError("orphan directory is the target itself")
                err.exit_code = EXIT_USAGE
                raise err
            self._orphan_dir = odir

    # ------------------------------------------------------------ helpers

    def _src(self, rel: bytes) -> bytes:
        return self.src_root + b"/" + rel if rel else self.src_root

    def _error(self, rel: bytes, exc):
        if isinstance(exc, OSError) and exc.errno in _FATAL_ERRNOS:
            self._fatal = exc
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        # an fd-based call (fchmod, fchown) names an int, not a path
        if isinstance(exc, OSError) and isinstance(exc.filename, (str, bytes)):
            msg = f"{msg} ({show(os.fsencode(exc.filename))})"
        with self._lock:
            self.summary.errors.append((rel, msg))

    def _add(self, **counts):
        with self._lock:
            s = self.summary
            for k, v in counts.items():
                setattr(s, k, getattr(s, k) + v)

    def _act(self, action: str, rel: bytes):
        if self.opts.dry_run:
            with self._lock:
                self.summary.actions.append((action, rel))

    def _src_xattrs(self, target) -> dict | None:
        if not self.opts.xattrs:
            return None
        return read_xattrs(target, self._wanted_xattr)

    # ------------------------------------------------------------ run

    _own_target = False

    def run(self) -> Summary:
        try:
            return self._run()
        finally:
            if self._own_target:
                self.target.close()

    def _run(self) -> Summary:
        t0 = time.monotonic()
        opts = self.opts
        summary = self.summary
        troot = getattr(self.target, "root", None)
        if opts.dry_run and troot is not None and not os.path.lexists(troot):
            src = scan(self.src_root, opts.rules)
            dst = Listing(troot)            # dry run into a target not created yet
        else:
            # one after the other: scanning is GIL-bound, a second thread only adds contention
            src = scan(self.src_root, opts.rules)
            dst = self.target.scan(opts.rules, self._orphan_skip)
        self.source_listing, self.target_listing = src, dst
        for rel, exc in src.errors:
            self._error(rel, exc)
        for rel, exc in dst.errors:
            self._error(rel, exc)
        if dst.temps and not opts.dry_run:
            self.target.remove_temps(dst.temps)
        self._plan(src, dst)
        if self._fatal is None:
            self._execute()
        summary.stopped = self.stop.is_set()
        self._note_unsure(src, dst)
        summary.bytes_written = getattr(self.target, "bytes_written", 0)
        summary.seconds = time.monotonic() - t0
        if self._fatal is not None:
            exc = self._fatal
            err = MirrorError(f"target write failed, mirror stopped: {os.strerror(exc.errno or 0)}"
                              + (f" ({show(os.fsencode(exc.filename))})" if exc.filename else ""))
            err.exit_code = EXIT_FAILED
            err.summary = summary
            raise err
        return summary

    def _note_unsure(self, src, dst):
        """The source paths whose state on the target this run does not
        vouch for: those that failed (a hard link's names with its leader),
        and those the target holds that went from the source while it was
        listed; files it did not reach because a stop came first stay out
        of ``left`` (not on the target as far as this mirror knows)."""
        failed = {rel for rel, _ in self.summary.errors}
        self.unsure = {rel for rel in failed if rel in src.entries}
        self.unsure.update(rel for rel, exc in src.errors if rel in dst.entries and rel
                           and getattr(exc, "errno", None) in (errno.ENOENT, errno.ENOTDIR))
        for rel in self.unsure:
            self.left.pop(rel, None)
        for rel, leader, _ in getattr(self, "hardlinks", ()):
            if leader in failed or rel in failed:
                self.unsure.add(rel)
                self.left.pop(rel, None)
            elif self.summary.stopped:
                self.left.pop(rel, None)        # a stop came before the links were made
        if self.summary.stopped:
            # the metadata and directory passes did not run
            self.stale = {rel for rel in self.left if rel not in self._done}

    # ------------------------------------------------------------ planning

    def _plan(self, src, dst):  # noqa: C901 - one pass sorting every entry kind; split with the planner's next change
        opts = self.opts
        s_entries = src.entries
        d_entries = dst.entries
        summary = self.summary
        owner = self.owner
        self.removals = []       # target paths whose type differs from the source
        self.mkdirs = []         # (rel, entry)
        self.links_sym = []      # (rel, entry): symlinks to create/replace
        self.specials = []       # (rel, entry)
        self.files = []          # (rel, src entry, dst entry or None, action)
        self.hardlinks = []      # (rel, leader rel, dst entry or None)
        self.meta = []           # (rel, src entry, dst entry): same data, check metadata
        self.dirs = []           # (rel, src entry, dst entry or None)
        quick = opts.different or opts.newer
        fresh = set()            # dirs created now: nothing under them exists yet
        leaders: dict[tuple[int, int], bytes] = {}   # (dev, ino) -> first path of a hard-link group
        rewritten = set()        # files getting a new inode (temp + rename)
        left = self.left
        for rel, s in s_entries.items():
            parent = rel.rpartition(b"/")[0]
            d = None if (parent in fresh) else d_entries.get(rel)
            kind = s.kind
            if kind != FILE:
                left[rel] = s
            if d is not None and (d.kind == DIR) != (kind == DIR):
                self.removals.append(rel)
                d = None
            if kind == DIR:
                summary.dirs_scanned += 1
                if d is None:
                    fresh.add(rel)
                    if rel:
                        self.mkdirs.append((rel, s))
                self.dirs.append((rel, s, d))
                continue
            if kind == SYMLINK:
                summary.links_scanned += 1
                if d is None or d.kind != SYMLINK or d.link != s.link:
                    self.links_sym.append((rel, s, d))
                else:
                    self.meta.append((rel, s, d))
                continue
            if kind == SPECIAL:
                if s.nlink > 1:
                    # fifos and device nodes have hard links too (rsync -H)
                    key = (s.dev, s.ino)
                    leader = leaders.get(key)
                    if leader is not None:
                        self.hardlinks.append((rel, leader, d))
                        continue
                    leaders[key] = rel
                if (d is None or d.mode != s.mode or d.rdev != s.rdev):
                    self.specials.append((rel, s, d))
                else:
                    self.meta.append((rel, s, d))
                continue
            summary.files_scanned += 1
            summary.bytes_scanned += s.size
            if s.nlink > 1:
                key = (s.dev, s.ino)
                leader = leaders.get(key)
                if leader is not None:
                    self.hardlinks.append((rel, leader, d))
                    left[rel] = s
                    continue
                leaders[key] = rel
            if d is None or d.kind != FILE:
                self.files.append((rel, s, d, "new"))
                rewritten.add(rel)
                continue
            if opts.newer:
                changed = source_is_newer(s.mtime_ns, s.size, d.mtime_ns, d.size)
                if not changed:
                    summary.unchanged += 1
                    if (s.size, s.mtime_ns) == (d.size, d.mtime_ns):
                        left[rel] = s       # the quick check's equal
                    else:
                        self.kept.add(rel)
                    continue        # the target is as new or newer: leave it alone
            elif opts.different:
                changed = s.size != d.size or s.mtime_ns != d.mtime_ns
            else:
                changed = True
            if changed and opts.checksum:
                self.files.append((rel, s, d, "check"))
            elif changed:
                self.files.append((rel, s, d, "whole"))
                rewritten.add(rel)
            else:
                summary.unchanged += 1
                left[rel] = s
                if quick and s.ctime_ns < d.ctime_ns - CTIME_MARGIN_NS \
                        and _same_meta(s, d, owner):
                    continue        # as in _execute's metadata pass: nothing changed since
                if opts.xattrs or not _same_meta(s, d, owner):
                    self.meta.append((rel, s, d))
        # hard links already right on the target need nothing
        self._rewritten = rewritten
        self._plan_orphans(src, dst)

    def _plan_orphans(self, src, dst):
        opts = self.opts
        s_entries = src.entries
        # unreadable source dirs; one gone since it was listed (a live tree)
        # is not the source's any more: what the target has there is orphaned
        skip_under = {rel for rel, exc in src.errors
                      if getattr(exc, "errno", None) not in (errno.ENOENT, errno.ENOTDIR)}
        skip_under.update(self.removals)                   # replaced by a non-dir
        covered = set()
        cutoff = None
        if opts.orphans_older_than is not None:
            cutoff = time.time_ns() - int(opts.orphans_older_than * 86400e9)
        orphans = []
        for rel, d in dst.entries.items():
            if not rel or rel in s_entries:
                continue
            parent = rel.rpartition(b"/")[0]
            if parent in covered or parent in skip_under:
                if d.kind == DIR:
                    covered.add(rel)
                if cutoff is not None and d.kind != DIR and d.mtime_ns < cutoff \
                        and parent not in skip_under:
                    orphans.append((rel, d))
                continue
            if d.kind == DIR:
                covered.add(rel)
            if cutoff is None or (d.kind != DIR and d.mtime_ns < cutoff):
                orphans.append((rel, d))
        self.orphans = orphans
        self.orphan_dirs = [rel for rel in covered] if cutoff is not None else []
        self.summary.orphans = [rel for rel, _ in orphans]

    # ------------------------------------------------------------ execution

    def _execute(self):
        """The plan, in dependency order: orphans (frees space and names),
        type changes, new directories, symlinks and special files, file
        data, hard links, metadata, then directories' times deepest first.
        A fatal target error (disk full, read-only) ends it."""
        touched: set[bytes] = set()     # dirs whose entries changed: their mtime must be reset
        if self.opts.orphans != "report":
            self._execute_orphans(touched)
            if self._fatal:
                return
        self._execute_removals(touched)
        if self._execute_mkdirs(touched):
            return
        self._execute_symlinks(touched)
        self._execute_specials(touched)
        if self._fatal:
            return
        self._run_files(touched)
        if self._fatal or self.stop.is_set():
            return
        if self._execute_hardlinks(touched):
            return
        self._execute_meta()
        self._execute_dirs(touched)

    def _execute_orphans(self, touched: set) -> None:
        opts, target, summary = self.opts, self.target, self.summary
        for rel, _d in self.orphans:
            self._act("delete-orphan" if opts.orphans == "delete" else "move-orphan", rel)
            if opts.dry_run:
                continue
            try:
                if opts.orphans == "delete":
                    target.remove(rel)
                    summary.orphans_deleted += 1
                else:
                    target.move_orphan(rel, self._orphan_dir)
                    summary.orphans_moved += 1
                touched.add(_parent_of(rel))
            except (OSError, MirrorError) as exc:
                self._error(rel, exc)
            if self._fatal:
                return
        # with an age limit, orphan directories go only once empty
        if opts.orphans == "delete" and not opts.dry_run:
            for rel in sorted(self.orphan_dirs, key=len, reverse=True):
                try:
                    target.rmdir(rel)
                    touched.add(_parent_of(rel))
                except OSError:
                    pass

    def _execute_removals(self, touched: set) -> None:
        for rel in self.removals:
            self._act("remove", rel)
            if self.opts.dry_run:
                continue
            try:
                self.target.remove(rel)
                self.summary.removed += 1
                touched.add(_parent_of(rel))
            except OSError as exc:
                self._error(rel, exc)

    def _execute_mkdirs(self, touched: set) -> bool:
        """True when a fatal error ended it."""
        for rel, s in self.mkdirs:
            self._act("mkdir", rel)
            self.summary.created += 1
            touched.add(_parent_of(rel))
            if self.opts.dry_run:
                continue
            try:
                self.target.mkdir(rel, s)
            except OSError as exc:
                self._error(rel, exc)
            if self._fatal:
                return True
        return False

    def _execute_symlinks(self, touched: set) -> None:
        for rel, s, d in self.links_sym:
            self._act("symlink", rel)
            touched.add(_parent_of(rel))
            if d is None:
                self.summary.created += 1
            else:
                self.summary.changed += 1
            if self.opts.dry_run:
                continue
            try:
                self.target.symlink(rel, s.link)
                self.target.set_meta(rel, s)
            except OSError as exc:
                self._error(rel, exc)

    def _execute_specials(self, touched: set) -> None:
        for rel, s, _d in self.specials:
            self._act("mknod", rel)
            touched.add(_parent_of(rel))
            self.summary.created += 1
            if self.opts.dry_run:
                continue
            try:
                self.target.mknod(rel, s)
                self.target.set_meta(rel, s, self._src_xattrs(self._src(rel)))
            except OSError as exc:
                self._error(rel, exc)

    def _execute_hardlinks(self, touched: set) -> bool:
        """True when a fatal error ended it."""
        target, summary = self.target, self.summary
        failed = {rel for rel, _ in summary.errors}
        for rel, leader, d in self.hardlinks:
            if leader in failed:
                # nothing to link to (through a stream the target would
                # refuse the link): this name fails with it
                self._error(rel, MirrorError(f"its hard link {show(leader)!r} could not be copied"))
                continue
            try:
                if d is not None and d.kind in (FILE, SPECIAL) and leader not in self._rewritten:
                    lead_now = target.lstat(leader)
                    here_now = target.lstat(rel)
                    if lead_now is not None and here_now is not None and \
                            (lead_now.ino, lead_now.dev) == (here_now.ino, here_now.dev):
                        continue
                self._act("hardlink", rel)
                touched.add(_parent_of(rel))
                summary.hardlinks += 1
                if d is None:
                    summary.created += 1
                if not self.opts.dry_run:
                    target.link(rel, leader)
            except OSError as exc:
                self._error(rel, exc)
            if self._fatal:
                return True
        return False

    def _execute_meta(self) -> None:
        opts, target, owner = self.opts, self.target, self.owner
        quick = opts.different or opts.newer
        for rel, s, d in self.meta:
            try:
                if s.kind in (FILE, SPECIAL):
                    if quick and s.ctime_ns < d.ctime_ns - CTIME_MARGIN_NS \
                            and _same_meta(s, d, owner):
                        # the source's xattrs last changed before the target's
                        # metadata was last written (ctime): they were copied then
                        continue
                    sx = self._src_xattrs(self._src(rel))
                    # a quick check trusts an xattr-less source file's target to
                    # have none either (halves the xattr syscalls)
                    same = _same_meta(s, d, owner) and (
                        sx is None or (quick and not sx) or sx == target.xattrs(rel))
                else:
                    sx = None
                    same = _same_meta(s, d, owner) if s.kind != SYMLINK else (
                        s.mtime_ns == d.mtime_ns
                        and (not owner or (s.uid, s.gid) == (d.uid, d.gid)))
                if same:
                    continue
                self._act("meta", rel)
                self.summary.meta_updated += 1
                if not opts.dry_run:
                    target.set_meta(rel, s, sx)
            except OSError as exc:
                self._error(rel, exc)

    def _execute_dirs(self, touched: set) -> None:
        # directories last, deepest first: writing inside a directory changes its mtime
        opts, target, owner = self.opts, self.target, self.owner
        quick = opts.different or opts.newer
        for rel, s, d in reversed(self.dirs):
            try:
                if quick and d is not None and rel not in touched and \
                        s.ctime_ns < d.ctime_ns - CTIME_MARGIN_NS and _same_meta(s, d, owner):
                    continue
                sx = self._src_xattrs(self._src(rel))
                if d is not None and rel not in touched and _same_meta(s, d, owner) \
                        and (sx is None or sx == target.xattrs(rel)):
                    continue
                if d is not None:
                    self.summary.meta_updated += 1
                    self._act("meta", rel)
                if not opts.dry_run:
                    target.set_meta(rel, s, sx)
            except OSError as exc:
                self._error(rel, exc)
            if self._fatal:
                return

    # ------------------------------------------------------------ file data

    def _run_files(self, touched):
        files = self.files
        if not files:
            return
        progress = self.progress
        total = sum(s.size for _, s, _, _ in files)
        if progress is not None:
            progress.start(total, len(files))
        # a temp + rename (or a delta rebuild) changes the parent's mtime
        for rel, _s, _d, _action in files:
            touched.add(rel.rpartition(b"/")[0])
        # largest first keeps both workers busy to the end
        order = sorted(files, key=lambda f: f[1].size, reverse=True)
        threads = min(self.opts.threads, len(order))
        try:
            if threads == 1:
                for item in order:
                    self._file_task(item)
                    if self._fatal or self.stop.is_set():
                        break
            else:
                self._run_workers(order, threads)
        finally:
            if self._hash_pool is not None:
                self._hash_pool.shutdown()
                self._hash_pool = None
            if progress is not None:
                progress.finish()

    def _helpers(self) -> _Helpers:
        """The threads hashing the target side of large files, started on
        first use (most runs have no large file to compare)."""
        with self._lock:
            if self._hash_pool is None:
                self._hash_pool = _Helpers(self.opts.threads, "smirror-hash")
            return self._hash_pool

    def _run_workers(self, order, threads):
        it = iter(order)
        lock = threading.Lock()
        crashed: list[BaseException] = []

        def work():
            try:
                while self._fatal is None and not crashed and not self.stop.is_set():
                    with lock:
                        item = next(it, None)
                    if item is None:
                        return
                    self._file_task(item)
            except BaseException as exc:   # noqa: BLE001 - a bug: stop everyone, re-raise below
                crashed.append(exc)

        workers = [threading.Thread(target=work, name="smirror-worker", daemon=True)
                   for _ in range(threads)]
        for w in workers:
            w.start()
        try:
            for w in workers:
                w.join()
        except BaseException:
            crashed.append(KeyboardInterrupt())   # workers stop at their next file
            raise
        if crashed:
            raise crashed[0]

    def _file_task(self, item):
        rel, s, d, action = item
        if self._fatal or self.stop.is_set():
            return
        try:
            for attempt in range(self.opts.retries):
                try:
                    if action == "check":
                        self._check_file(rel, s, d)
                    else:
                        self._whole_file(rel, s, d, action)
                    break
                except SourceChanged:
                    if attempt + 1 == self.opts.retries:
                        raise
        except SourceChanged:
            self._error(rel, MirrorError(
                f"source changed during the copy {self.opts.retries} times; "
                f"target left as it was"))
        except (OSError, MirrorError) as exc:
            self._error(rel, exc)
        finally:
            if self.progress is not None:
                self.progress.file_done()

    def _open_source(self, rel):
        # O_NONBLOCK: a file swapped for a fifo since the scan must not hang us
        fd = os.open(self._src(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise MirrorError("source is no longer a regular file")
        if _racy(st):
            st = os.fstat(fd)
        # a write whose times st holds may still be copying its bytes: the
        # copy waits for it (else older bytes go out under its mtime)
        wait_for_writes(fd)
        return fd, st

    def _committed(self, rel: bytes, st1) -> Entry:
        """``rel`` is on the target as read under ``st1`` (bytes and attributes)."""
        entry = self.left[rel] = entry_from_stat(st1)
        with self._lock:
            self._done.add(rel)
        return entry

    @staticmethod
    def _check_same(fd, st1):
        st2 = os.fstat(fd)
        if (st2.st_size != st1.st_size or st2.st_mtime_ns != st1.st_mtime_ns
                or st2.st_ctime_ns != st1.st_ctime_ns):
            raise SourceChanged()

    def _whole_file(self, rel, s, d, action):
        progress = self.progress
        if self.opts.dry_run:
            self._act("create" if action == "new" else "write", rel)
            self._count_write(action, s.size, 0)
            if progress is not None:
                progress.advance(s.size)
            return
        fd, st1 = self._open_source(rel)
        try:
            copied = self._write_whole(rel, fd, st1)
        finally:
            os.close(fd)
        self._count_write(action, copied, 0)

    def _write_whole(self, rel, fd, st1, advance=True):
        """Copy an open source file to the target via temp + rename; returns
        the data bytes copied (holes are not copied)."""
        progress = self.progress if advance else None
        w = self.target.create_temp(rel)
        try:
            # blocks covering the size: no holes to look for
            copied = w.copy_from(fd, st1.st_size, progress.advance if progress else None,
                                 dense=st1.st_blocks * 512 >= st1.st_size)
            xattrs = self._src_xattrs(fd)
            self._check_same(fd, st1)
            w.commit(entry_from_stat(st1), xattrs)
        except BaseException:
            w.abort()
            raise
        self._committed(rel, st1)
        return copied

    def _count_write(self, action, literal, matched):
        with self._lock:
            s = self.summary
            if action == "new":
                s.created += 1
            elif literal or action == "whole":
                s.changed += 1
            else:
                s.unchanged += 1
            s.bytes_literal += literal
            s.bytes_matched += matched

    # ------------------------------------------------------------ checksum

    def _check_file(self, rel, s, d):  # noqa: C901 - the checksum path's cases in order, each commented
        from smirror.kernels import checksum
        fd, st1 = self._open_source(rel)
        if self._streamed:
            try:
                return self._check_streamed(rel, fd, st1, s, d)
            finally:
                os.close(fd)
        try:
            size = st1.st_size
            dsize = d.size
            bs = self.opts.block_size
            progress = self.progress
            if size == dsize and (size < PARALLEL_SIDES_MIN or s.mtime_ns == d.mtime_ns):
                # a whole-file digest per side first (far cheaper than block
                # signatures: no arrays, no numpy), blocks only if they differ:
                # for every file up to mid-size, and for a large one the quick
                # check calls unchanged (then it almost always is). Large: the
                # target side on a helper thread at the same time; smaller ones
                # in this thread (a hand-off costs more than hashing a few MiB)
                fut = (self._helpers().submit(self.target.digest, rel, size)
                       if size >= PARALLEL_SIDES_MIN else None)
                try:
                    digest_s = fd_digest(fd, size)
                except MirrorError:
                    if fut is not None:
                        fut.wait()
                    raise SourceChanged() from None
                digest_d = fut.result() if fut is not None else self.target.digest(rel, size)
                if digest_s == digest_d:
                    if progress is not None:
                        progress.advance(size)
                    self._check_same(fd, st1)
                    self._count_write("check", 0, size)
                    self._fix_meta(rel, fd, st1, d)
                    return
                if size < INPLACE_MIN:
                    if progress is not None:
                        progress.advance(size)
                    self._act("write", rel)
                    if self.opts.dry_run:
                        self._count_write("whole", size, 0)
                        return
                    copied = self._write_whole(rel, fd, st1, advance=False)
                    self._count_write("whole", copied, 0)
                    return
            if size == dsize:
                bs = bs or checksum.block_size_for(size)
                # large: source here, target on a helper thread, both at once
                fut = (self._helpers().submit(self.target.signature, rel, bs, False)
                       if size >= PARALLEL_SIDES_MIN else None)
                try:
                    sig_s = fd_signature(fd, size, bs, False)
                except MirrorError:
                    raise SourceChanged() from None
                sig_d = fut.result() if fut is not None else self.target.signature(rel, bs, False)
                if sig_d.length != size:
                    raise MirrorError("target file changed size while being compared")
                changed = checksum.changed_blocks(sig_d, sig_s)
                if progress is not None:
                    progress.advance(size)
                if len(changed) == 0:
                    self._check_same(fd, st1)
                    self._count_write("check", 0, size)
                    self._fix_meta(rel, fd, st1, d)
                    return
                changed_bytes = len(changed) * bs
                if int(changed[-1]) == sig_s.count - 1:      # the short last block
                    changed_bytes -= bs - sig_s.block_range(sig_s.count - 1)[1]
                self._act("patch", rel)
                if self.opts.dry_run:
                    self._count_write("check", changed_bytes, size - changed_bytes)
                    return
                if size < INPLACE_MIN or not self._inplace_ok(s, d):
                    copied = self._write_whole(rel, fd, st1, advance=False)
                    self._count_write("whole", copied, 0)
                    return
                if changed_bytes > SHIFT_FRACTION * size:
                    if self._try_delta(rel, fd, st1, d, bs, changed_bytes):
                        return
                self._patch_blocks(rel, fd, st1, sig_s, changed, bs)
                self._count_write("check", changed_bytes, size - changed_bytes)
                return
            # size changed: rolling delta against the target's blocks
            self._act("delta", rel)
            # small files are rewritten whole; so is a sparse source (a whole
            # copy keeps its holes, a delta rebuild would fill them)
            if min(size, dsize) < INPLACE_MIN or st1.st_blocks * 512 + (1 << 20) < size:
                if progress is not None:
                    progress.advance(size)
                if self.opts.dry_run:
                    self._count_write("whole", size, 0)
                    return
                copied = self._write_whole(rel, fd, st1, advance=False)
                self._count_write("whole", copied, 0)
                return
            bs = bs or checksum.block_size_for(dsize)
            if not self._try_delta(rel, fd, st1, d, bs, None):
                if progress is not None:
                    progress.advance(size)
                copied = self._write_whole(rel, fd, st1, advance=False)
                self._count_write("whole", copied, 0)
        finally:
            os.close(fd)

    def _check_streamed(self, rel, fd, st1, s, d):
        """Checksum compare against a target written through a stream (no
        digest, no rolling delta: see :mod:`smirror.mirror.remote`): block
        hashes at the same offsets, whatever the two sizes, and the blocks
        that differ written in place, then the length."""
        from smirror.kernels import checksum
        size = st1.st_size
        bs = self.opts.block_size or checksum.block_size_for(max(size, d.size))
        sig_d = self.target.signature(rel, bs, False)
        try:
            sig_s = fd_signature(fd, size, bs, False)
        except MirrorError:
            raise SourceChanged() from None
        changed = checksum.changed_blocks(sig_d, sig_s)
        changed = changed[changed < sig_s.count]        # the target's blocks past the end go
        if self.progress is not None:
            self.progress.advance(size)
        if len(changed) == 0 and size == d.size:
            self._check_same(fd, st1)
            self._count_write("check", 0, size)
            self._fix_meta(rel, fd, st1, d)
            self.hashes[rel] = (bs, sig_s.strong)
            return
        changed_bytes = len(changed) * bs
        if len(changed) and int(changed[-1]) == sig_s.count - 1:      # the short last block
            changed_bytes -= bs - sig_s.block_range(sig_s.count - 1)[1]
        self._act("patch", rel)
        if self.opts.dry_run:
            self._count_write("check", changed_bytes, size - changed_bytes)
            return
        if not self._inplace_ok(s, d):
            copied = self._write_whole(rel, fd, st1, advance=False)
            self._count_write("whole", copied, 0)
            return
        self._patch_blocks(rel, fd, st1, sig_s, changed, bs)
        # the blocks that differed went out as read (each hash checked
        # again), the others were the target's already: the file's hashes
        self.hashes[rel] = (bs, sig_s.strong)
        self._count_write("check", changed_bytes, size - changed_bytes)

    @staticmethod
    def _inplace_ok(s, d) -> bool:
        # a target file with names beyond the source's own hard-link group
        # would change under those names too: rewrite it instead
        return d.nlink == 1 or (s.nlink > 1 and d.nlink <= s.nlink)

    def _fix_meta(self, rel, fd, st1, d):
        s = self._committed(rel, st1)      # its bytes are the target's (compared)
        sx = self._src_xattrs(fd)
        if _same_meta(s, d, self.owner) and (sx is None or sx == self.target.xattrs(rel)):
            return
        self._act("meta", rel)
        self._add(meta_updated=1)
        if not self.opts.dry_run:
            self.target.set_meta(rel, s, sx)

    def _patch_blocks(self, rel, fd, st1, sig_s, changed, bs):
        """Write the changed aligned blocks into the target file in place,
        each block's strong hash checked again as it is read."""
        import numpy as np

        from smirror.kernels import checksum
        size = st1.st_size
        chunk_blocks = max(1, (8 << 20) // bs)
        buf = memoryview(aligned_buffer(chunk_blocks * bs))
        w = self.target.open_inplace(rel)
        try:
            for first, end in _runs(changed):
                i = first
                while i < end:
                    j = min(end, i + chunk_blocks)
                    off = i * bs
                    n = min(j * bs, size) - off
                    view = buf[:n]
                    if read_full(fd, view, off) != n:
                        raise SourceChanged()
                    again = checksum.signature(view, bs, False)
                    if not np.array_equal(again.strong, sig_s.strong[i:j]):
                        raise SourceChanged()
                    w.write(view, off)
                    i = j
            w.truncate(size)
            self._check_same(fd, st1)
            w.commit(entry_from_stat(st1), self._src_xattrs(fd))
        except BaseException:
            w.abort()
            raise
        self._committed(rel, st1)

    def _try_delta(self, rel, fd, st1, d, bs, changed_bytes) -> bool:
        """Rebuild from a rolling delta; in place when every matched block
        stays at its offset, else via a temp file. Returns False (nothing
        done) when ``changed_bytes`` is given (a same-size file) and the
        delta would not send less, or when the source cannot be held still
        (see :meth:`_delta_source`)."""
        from smirror.kernels import checksum
        size = st1.st_size
        sig_d = self.target.signature(rel, bs, True)
        held = self._delta_source(fd, size)
        if held is None:
            return False
        source, release = held
        dl = None
        try:
            dl = checksum.delta(source, sig_d)
            literal = dl.literal_bytes
            if changed_bytes is not None and literal >= changed_bytes:
                return False
            if self.progress is not None and changed_bytes is None:
                self.progress.advance(size)
            if self.opts.dry_run:
                self._count_write("check", literal, size - literal)
                return True
            ops = _merge_ops(dl.ops)
            out = 0
            aligned = True
            for kind, off, n in ops:
                if kind == checksum.COPY and off != out:
                    aligned = False
                    break
                out += n
            src_view = dl.source
            # aligned: COPY ranges stay where they are, so writing the
            # literals in place never overwrites bytes a later COPY needs
            if aligned and self._inplace_ok(entry_from_stat(st1), d):
                w = self.target.open_inplace(rel)
            else:
                w = self.target.create_temp(rel)
                aligned = False
            out = 0
            try:
                for kind, off, n in ops:
                    if kind == checksum.LITERAL:
                        w.write(src_view[off:off + n], out)
                    elif not aligned:
                        cast(WholeFileWriter, w).copy_old(off, n, out)   # not aligned: a temp
                    out += n
                w.truncate(size)
                self._check_same(fd, st1)
                w.commit(entry_from_stat(st1), self._src_xattrs(fd))
            except BaseException:
                w.abort()
                raise
            self._committed(rel, st1)
            self._count_write("check", literal, size - literal)
            return True
        finally:
            if dl is not None:
                dl.source.release()
            release()

    @staticmethod
    def _delta_source(fd, size):
        """The source bytes for a rolling delta, held still while it runs:
        a mapping under a read lease (no writer can open or truncate the file
        meanwhile, so the mapping cannot fault), else - the file is open for
        writing somewhere - a private copy if it is at most
        DELTA_COPY_MAX; None for a larger file being written to (the caller
        copies it whole). Returns (buffer, release)."""
        import mmap
        if take_read_lease(fd):
            try:
                mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            except BaseException:
                drop_lease(fd)
                raise

            def release():
                mm.close()
                drop_lease(fd)
            return mm, release
        if size > DELTA_COPY_MAX:
            return None
        copy = mmap.mmap(-1, size)
        if read_full(fd, memoryview(copy), 0) != size:
            copy.close()
            raise SourceChanged()
        return copy, copy.close


def mirror(source, target, **options) -> Summary:
    """Run one mirror; ``options`` are those of :class:`MirrorOptions`."""
    return Mirror(source, target, MirrorOptions(**options)).run()


__all__ = ["Mirror", "MirrorOptions", "Summary", "mirror", "check_roots", "show",
           "SourceChanged", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "EXIT_FAILED"]
