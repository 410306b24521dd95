"""The target side of a mirror: the small interface the planner talks to, and
its implementation on a local directory.

The planner (:mod:`smirror.mirror.engine`) never touches target paths itself; it asks
a :class:`TargetSide` for a listing and block signatures and tells it what to
write. A remote target daemon implements the same methods behind the wire
protocol; :class:`LocalTarget` does it on a directory of this machine.

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
import itertools
import os
import stat
import threading
import time

from smirror.fs.beneath import Beneath, check_rel, chmod_at, lstat_at, proc_path, rmtree_at
from smirror.errors import ConfinementError, DeltaError, MirrorError
from smirror.fs.tree import (DIR, FILE, SPECIAL, SYMLINK, TEMP_PREFIX, Entry, entry_from_stat,
                   scan)

_COPY_CHUNK = 64 << 20        # progress granularity of kernel-side copies
_IO_CHUNK = 8 << 20           # buffer of pread/pwrite copies (where copy_file_range cannot)
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL,
                    errno.EBADF, errno.ETXTBSY}

_tls = threading.local()


def read_full(fd: int, view: memoryview, offset: int) -> int:
    """pread into ``view`` until full or end of file; returns bytes read."""
    got = 0
    want = len(view)
    while got < want:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


_SIG_CHUNK = 1 << 20          # read+hash step: stays in cache between the copy and the hash


def aligned_buffer(size: int):
    """A page-aligned per-thread buffer reused across files (an anonymous
    mapping: preads into it run several times faster than into a large
    bytearray here, and freed memory would cost page faults when touched
    again)."""
    buf = getattr(_tls, "abuf", None)
    if buf is None or len(buf) < size:
        import mmap
        buf = _tls.abuf = mmap.mmap(-1, size)
    return buf


_MMAP_MIN = 32 << 20          # files this large are hashed from a mapping when leased
_MMAP_WINDOW = 256 << 20      # mapped and hashed a window at a time, lease checked between


def take_read_lease(fd: int) -> bool:
    """A read lease guarantees nobody has the file open for writing, and
    makes a new writer's open() or truncate() wait (up to the kernel's
    lease-break-time, of which we use at most a third) until the lease is
    released - so a mapping of the file cannot be cut short under us (which
    would be a SIGBUS). Its break notice goes out as SIGURG, whose default
    action is to do nothing."""
    import fcntl
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, _signal_urg())
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        return True
    except OSError:      # open for writing somewhere, not ours, no lease support
        return False


def _lease_break_seconds() -> float:
    try:
        with open("/proc/sys/fs/lease-break-time", "rb") as f:
            return float(f.read().strip() or 45)
    except (OSError, ValueError):
        return 45.0


def _signal_urg() -> int:
    import signal
    return int(signal.SIGURG)


def _lease_intact(fd: int) -> bool:
    import fcntl
    try:
        return fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
    except OSError:
        return False


def drop_lease(fd: int):
    import fcntl
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass


def _mapped_signature(fd: int, length: int, block_size: int, weak: bool):
    """Signature from a mapping of the file (no copy through a buffer: about
    twice as fast as preads for large files), under a read lease; None when
    no lease can be had. A lease break (a writer waiting) stops the mapping
    at the next window and the rest is read with preads."""
    import mmap
    import numpy as np
    from smirror.kernels import checksum
    page = mmap.ALLOCATIONGRANULARITY
    if block_size % page and page % block_size:
        return None           # windows could not start on page boundaries
    # a multiple of both the block size and the page size
    window = max(block_size, (_MMAP_WINDOW // block_size) * block_size)
    if not take_read_lease(fd):
        return None
    try:
        if os.fstat(fd).st_size < length:
            raise MirrorError(f"file shrank while being read (expected {length} bytes)")
        count = -(-length // block_size)
        strong = np.empty((count, 2), dtype=np.uint64)
        weak_arr = np.empty(count, dtype=np.uint32) if weak else None
        def consume(off, m):
            part = checksum.signature(m, block_size, weak)
            i = off // block_size
            strong[i:i + part.count] = part.strong
            if weak:
                weak_arr[i:i + part.count] = part.weak

        off = _map_windows(fd, length, window, consume)
        if off < length:     # lease broken or odd alignment: finish with preads
            rest = _pread_signature(fd, length - off, block_size, weak, start=off)
            i = off // block_size
            strong[i:] = rest.strong
            if weak:
                weak_arr[i:] = rest.weak
        return checksum.Signature(block_size, length, strong, weak_arr)
    finally:
        drop_lease(fd)


def fd_signature(fd: int, length: int, block_size: int, weak: bool):
    """Block signature of the first ``length`` bytes of an open file: the
    engine's one signature reader. Large files are hashed from a leased
    mapping; the rest (or when no lease can be had) by the checksum kernel's
    pread reader (a reader thread reads ahead, GIL released), so source and
    target hash on two cores. Raises MirrorError if the file is shorter than
    ``length``."""
    if length >= _MMAP_MIN:
        sig = _mapped_signature(fd, length, block_size, weak)
        if sig is not None:
            return sig
    return _pread_signature(fd, length, block_size, weak)


def _pread_signature(fd: int, length: int, block_size: int, weak: bool, start: int = 0):
    """The kernel's pread signature of [start, start + length), its
    truncated-file error as the mirror's."""
    from smirror.kernels import checksum
    try:
        return checksum.fd_signature(fd, length, block_size, weak, start)
    except DeltaError as exc:
        raise MirrorError(f"file shrank while being read: {exc}") from None


_DIGEST_ONESHOT = 4 << 20


def _map_windows(fd: int, length: int, window: int, consume) -> int:
    """Hand ``consume(offset, mapping)`` read-only mappings of ``window``
    bytes of a file this process holds a read lease on, in order, while the
    lease holds; returns the offset reached (``length``, or where a lease
    break stopped it: the caller reads the rest with preads)."""
    import mmap
    # the kernel breaks a lease by force after lease-break-time: stop
    # mapping well before (a writer waiting that long is told by then)
    deadline = time.monotonic() + _lease_break_seconds() / 3
    off = 0
    while off < length:
        if not _lease_intact(fd) or time.monotonic() > deadline:
            break
        n = min(window, length - off)
        m = mmap.mmap(fd, n, prot=mmap.PROT_READ, offset=off)
        try:
            consume(off, m)
        finally:
            m.close()
        off += n
    return off


def _mapped_digest(fd: int, length: int):
    """XXH3-128 of a large file hashed from leased mapping windows (no copy
    through a buffer: ~1.6x the speed of preads here); None when no lease
    can be had. A lease break (a writer waiting) stops the mapping at the
    next window and the rest is read with preads into the same digest."""
    from smirror.kernels import checksum
    if not take_read_lease(fd):
        return None
    try:
        if os.fstat(fd).st_size != length:
            raise MirrorError(f"file changed length while being read (expected {length} bytes)")
        state = checksum.StreamDigest()
        off = _map_windows(fd, length, _MMAP_WINDOW, lambda _, m: state.update(m))
        if off < length:
            view = memoryview(aligned_buffer(_SIG_CHUNK))
            while off < length:
                want = min(len(view), length - off)
                got = read_full(fd, view[:want], off)
                if got != want:
                    raise MirrorError(f"file changed length while being read (expected "
                                      f"{length} bytes, found {off + got})")
                state.update(view[:want])
                off += want
        return state.digest()
    finally:
        drop_lease(fd)


def fd_digest(fd: int, length: int) -> bytes:
    """XXH3-128 of an open file of ``length`` bytes (the same value as
    :func:`smirror.kernels.checksum.file_digest`). Raises MirrorError if it is
    shorter; small files are read up to ``length`` only, so a caller that
    must notice growth compares an fstat afterwards. Files of 32 MiB or
    more are hashed from a mapping under a read lease when one can be had."""
    from smirror.kernels import checksum
    if length >= _MMAP_MIN:
        digest = _mapped_digest(fd, length)
        if digest is not None:
            return digest
    if length <= _DIGEST_ONESHOT:
        view = memoryview(aligned_buffer(max(_SIG_CHUNK, length)))[:length]
        got = read_full(fd, view, 0)
        if got != length:
            raise MirrorError(f"file changed length while being read (expected {length} "
                              f"bytes, found {got})")
        return checksum.strong_digest(view)
    digest = checksum.fd_digest(fd)
    if os.fstat(fd).st_size != length:
        raise MirrorError(f"file changed length while being read (expected {length} bytes)")
    return digest


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int, out_offset: int,
               progress=None) -> int:
    """Copy ``length`` bytes kernel-side (copy_file_range), falling back to
    pread/pwrite where the kernel or filesystem cannot. Returns bytes copied
    (less than asked only if the source ended early)."""
    done = 0
    use_kernel = getattr(_tls, "copy_file_range_ok", True)
    while done < length:
        n = min(_COPY_CHUNK, length - done)
        if use_kernel:
            try:
                got = os.copy_file_range(src_fd, dst_fd, n, offset + done, out_offset + done)
            except OSError as exc:
                if exc.errno not in _FALLBACK_ERRNOS:
                    raise
                use_kernel = _tls.copy_file_range_ok = False
                continue
        else:
            buf = memoryview(aligned_buffer(_IO_CHUNK))[:min(n, _IO_CHUNK)]
            got = read_full(src_fd, buf, offset + done)
            if got:
                _pwrite_all(dst_fd, buf[:got], out_offset + done)
        if got == 0:
            break
        done += got
        if progress is not None:
            progress(got)
    return done


def copy_data_extents(src_fd: int, dst_fd: int, size: int, progress=None,
                      dense: bool = False) -> int:
    """Copy the data extents of the first ``size`` bytes of ``src_fd`` to the
    same offsets of ``dst_fd`` (SEEK_DATA/SEEK_HOLE), so holes stay holes.
    ``dense``: the caller knows the source has no holes (its allocated
    blocks cover its size): one range, no lseek calls. The caller truncates
    ``dst_fd`` to ``size``. Returns bytes copied."""
    if dense:
        return copy_range(src_fd, dst_fd, 0, size, 0, progress)
    copied = 0
    off = 0
    while off < size:
        try:
            data = os.lseek(src_fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:      # only a hole (or EOF) remains
                break
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data, end = off, size             # no hole support: copy it all
        else:
            if data >= size:
                break
            end = min(os.lseek(src_fd, data, os.SEEK_HOLE), size)
        got = copy_range(src_fd, dst_fd, data, end - data, data, progress)
        copied += got
        if got < end - data:
            break                             # source shrank; caller notices
        off = end
    return copied


def _pwrite_all(fd: int, data, offset: int) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


def xattr_filter():
    """Which xattr names to replicate: as root everything but system.*
    other than the POSIX ACLs (system.posix_acl_access/_default), only
    user.* otherwise (the kernel refuses the rest anyway)."""
    if os.geteuid() == 0:
        return lambda name: not name.startswith("system.") or name.startswith("system.posix_acl_")
    return lambda name: name.startswith("user.")


def read_xattrs(target, wanted) -> dict:
    """xattrs of an fd or path (not followed) as {name: value}; {} where the
    filesystem has none or does not support them."""
    follow = isinstance(target, int)
    try:
        names = os.listxattr(target) if follow else os.listxattr(target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return {}
        raise
    if not names:
        return {}
    out = {}
    for name in names:
        if not wanted(name):
            continue
        try:
            out[name] = (os.getxattr(target, name) if follow
                         else os.getxattr(target, name, follow_symlinks=False))
        except OSError as exc:
            if exc.errno != errno.ENODATA:    # removed meanwhile
                raise
    return out


class TargetSide:
    """What a mirror needs from the side it writes to. Paths are relative
    ``bytes`` (b"" is the root); entries are :class:`smirror.fs.tree.Entry`.

    Reading: ``scan``, ``lstat``, ``signature``, ``digest``, ``xattrs``.
    Writing: ``create_temp`` (whole file, renamed into place on commit),
    ``open_inplace`` (aligned block writes into an existing file),
    ``mkdir``, ``symlink``, ``link``, ``mknod``, ``set_meta``, ``remove``, ``rmdir``,
    ``move_orphan``, ``remove_temps``.
    """

    def scan(self, rules=None, skip=()):
        raise NotImplementedError

    def lstat(self, rel: bytes):
        raise NotImplementedError

    def signature(self, rel: bytes, block_size: int, weak: bool):
        raise NotImplementedError

    def digest(self, rel: bytes, length: int):
        raise NotImplementedError

    def xattrs(self, rel: bytes) -> dict:
        raise NotImplementedError

    def create_temp(self, rel: bytes):
        raise NotImplementedError

    def open_inplace(self, rel: bytes):
        raise NotImplementedError

    def mkdir(self, rel: bytes, entry: Entry):
        raise NotImplementedError

    def symlink(self, rel: bytes, link: bytes):
        raise NotImplementedError

    def link(self, rel: bytes, existing: bytes):
        raise NotImplementedError

    def mknod(self, rel: bytes, entry: Entry):
        raise NotImplementedError

    def set_meta(self, rel: bytes, entry: Entry, xattrs=None):
        raise NotImplementedError

    def remove(self, rel: bytes):
        raise NotImplementedError

    def rmdir(self, rel: bytes):
        raise NotImplementedError

    def move_orphan(self, rel: bytes, dest_dir):
        raise NotImplementedError

    def remove_temps(self, rels):
        raise NotImplementedError

class LocalTarget(TargetSide):
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

    def __init__(self, root, *, owner: bool | None = None, xattrs: bool = True,
                 fsync: bool = False):
        self.root = os.fsencode(os.path.abspath(os.fsencode(root)))
        self._base = None              # opened at first use (a dry run may have no root yet)
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

    def create_temp(self, rel: bytes) -> "TempWriter":
        with self.base.at(rel) as (d, name):
            tname = TEMP_PREFIX + _temp_suffix()
            fd = os.open(tname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=d)
            return TempWriter(self, rel, os.dup(d), name, tname, fd)

    def open_inplace(self, rel: bytes) -> "InplaceWriter":
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


def open_beneath(root, rel: bytes, flags: int) -> int:
    """One confined open of ``rel`` under the directory ``root`` (its final
    name not followed); for one-off reads such as a daemon's signature."""
    base = Beneath(root)
    try:
        return base.open(rel, flags)
    finally:
        base.close()


_temp_tag = None
_temp_counter = itertools.count()


def _temp_suffix() -> bytes:
    """A name no other temporary has: a random tag drawn once per process
    (again in a forked child) and a counter (one getrandom per process, not
    one per file)."""
    global _temp_tag
    if _temp_tag is None:
        _temp_tag = os.urandom(8).hex()
    return f"{_temp_tag}{next(_temp_counter):x}".encode()


def replace_at(d: int, name: bytes, make) -> None:
    """Create something at a hidden temporary name in the directory ``d``
    with ``make(temp_name)``, then rename it over ``name``: a reader sees the
    old entry or the new one, never none, and a kill leaves only a
    temporary the next scan removes."""
    tname = TEMP_PREFIX + _temp_suffix()
    make(tname)
    try:
        os.rename(tname, name, src_dir_fd=d, dst_dir_fd=d)
    except BaseException:
        rmtree_at(d, tname)
        raise
    # rename(2) does nothing when both names are links to one inode
    # (a hard link made again): the temporary name is left over
    rmtree_at(d, tname)


def _new_temp_tag():
    global _temp_tag
    _temp_tag = None


os.register_at_fork(after_in_child=_new_temp_tag)


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
        self._old_fd = None

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
        n = _pwrite_all(self.fd, data, offset)
        self.target.count_written(n)
        return n

    def copy_old(self, offset: int, length: int, out_offset: int) -> int:
        """Copy bytes of the file currently under the final name (a rolling
        delta's COPY op) into the new file."""
        if self._old_fd is None:
            self._old_fd = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                                   | os.O_NONBLOCK, dir_fd=self.dfd)
        n = copy_range(self._old_fd, self.fd, offset, length, out_offset)
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
        n = _pwrite_all(self.fd, data, offset)
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


__all__ = ["TargetSide", "LocalTarget", "open_beneath", "TempWriter", "InplaceWriter", "fd_signature",
           "copy_data_extents", "copy_range", "read_xattrs", "xattr_filter", "aligned_buffer",
           "fd_digest",
           "FILE", "DIR", "SYMLINK", "SPECIAL"]
