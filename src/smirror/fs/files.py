"""Raw file I/O, shared by the mirror and the stream: full preads, the one
block signature and digest reader (leased mappings for large files), kernel
copies that keep holes, xattr reads, read leases, the wait for writes in
flight before a read (:func:`wait_for_writes`), and atomic replacement of
a name through a hidden temporary (:func:`replace_at`).

Nothing here knows what a mirror is: the mirror's target sides (a local
directory, a remote target daemon) are in :mod:`smirror.mirror`. Paths
are confined by the caller (:mod:`smirror.fs.beneath`); :func:`open_beneath`
is the one-off confined open of a daemon's reads.
"""
from __future__ import annotations

import errno
import itertools
import os
import threading
import time

from smirror.errors import DeltaError, MirrorError
from smirror.fs.beneath import Beneath, rmtree_at
from smirror.fs.tree import TEMP_PREFIX

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


def wait_for_writes(fd: int) -> None:
    """Returns once every write(2) to ``fd``'s file that had begun before
    the call has put its last byte in the page cache; leaves the file
    offset at 0 (callers read with pread).

    A write updates the file's mtime and ctime first, then copies its
    bytes: a read in between returns the older bytes while fstat already
    gives the new times, and a copy sent under those times passes every
    later size/mtime check (after a kill, a restart's quick check would
    leave the target's stale copy for good). lseek(SEEK_DATA) takes the
    inode lock that a buffered write holds from its time update to its
    last byte (ext4, btrfs, tmpfs; xfs's reads take that lock themselves),
    so the caller's order is: fstat, this, read, fstat again."""
    try:
        if os.lseek(fd, 0, os.SEEK_DATA):
            os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        pass        # ENXIO: no data (the lock was taken all the same); EINVAL: no SEEK_DATA


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
            if weak_arr is not None and part.weak is not None:
                weak_arr[i:i + part.count] = part.weak

        off = _map_windows(fd, length, window, consume)
        if off < length:     # lease broken or odd alignment: finish with preads
            rest = _pread_signature(fd, length - off, block_size, weak, start=off)
            i = off // block_size
            strong[i:] = rest.strong
            if weak_arr is not None and rest.weak is not None:
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
                pwrite_all(dst_fd, buf[:got], out_offset + done)
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


def pwrite_all(fd: int, data, offset: int) -> int:
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


def temp_name() -> bytes:
    """A hidden temporary name (``.smirror-tmp-*``: scans collect them,
    the next mirror removes them) no other temporary has: a random tag
    drawn once per process (again in a forked child) and a counter (one
    getrandom per process, not one per file)."""
    global _temp_tag
    if _temp_tag is None:
        _temp_tag = os.urandom(8).hex()
    return TEMP_PREFIX + f"{_temp_tag}{next(_temp_counter):x}".encode()


def replace_at(d: int, name: bytes, make) -> None:
    """Create something at a hidden temporary name in the directory ``d``
    with ``make(temp_name)``, then rename it over ``name``: a reader sees the
    old entry or the new one, never none, and a kill leaves only a
    temporary the next scan removes."""
    tname = temp_name()
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


__all__ = ["open_beneath", "replace_at", "temp_name", "fd_signature", "fd_digest", "read_full",
           "pwrite_all", "copy_data_extents", "copy_range", "read_xattrs", "xattr_filter",
           "aligned_buffer", "take_read_lease", "drop_lease"]
