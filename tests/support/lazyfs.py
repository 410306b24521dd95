"""A LazyFS-style layer for power-loss tests (test-only, never shipped).

A FUSE file system over a backing directory that keeps the data written
to a file in its own memory cache until that file is fsynced (or
fdatasynced), and can lose that cache at a simulated **power loss**, the way
Jepsen's LazyFS (github.com/dsrhaslab/lazyfs) does for databases.

The model (what survives a power loss):

* **data**: a ``write`` lands in the layer's page cache (4 KiB pages, filled
  from the backing file on first touch); reads see the cache. ``fsync`` or
  ``fdatasync`` of a file writes its cached pages to the backing file, sets
  its size and mtime, and fsyncs it there; only then is the data durable. A
  write that extends a file extends only the cached size: the backing file
  (what survives) keeps its old size until the fsync.
* **metadata** goes through at once, as ext4's ordered mode roughly does
  once its journal commits: create, mkdir, rmdir, unlink, rename, link,
  symlink, mknod, truncate (also ``O_TRUNC``), chmod/chown/utime, xattrs.
  A truncate also cuts (or zero-extends) the cached pages. So a file written
  and truncated to a larger size, then lost, is the larger size of zeros (the
  classic delayed-allocation result).
* **mtime**: a cached write stamps the file's mtime in the cache; an fsync
  writes it to the backing file after the data (a utime between the write
  and its fsync is kept: the flush does not stamp "now"). Lost with the data.
* **directory entries are not cached**: a new name is durable without an
  fsync of its directory (we do not model the loss of unsynced directory
  entries, unlike a real ext4 that has not committed its journal; LazyFS
  does not either). The layer is therefore kinder than a real disk about
  names, and exactly as strict as LazyFS about data.

Not modelled (LazyFS's fault kinds beside "clear the cache"): torn writes
(``torn-op``/``torn-seq``), crashes timed before/after a given call, cache
eviction under memory pressure (this cache only grows until fsync; LazyFS
can evict and so write back on its own), ``fallocate`` (answered
EOPNOTSUPP), and the kernel's own page cache for shared writable mmaps
(their dirty pages reach the layer only when the kernel writes them back or
msync asks: like a real kernel, they are lost with the layer).

A power loss:

* in a process (``python tests/support/lazyfs.py BACKING MOUNTPOINT``):
  SIGUSR1 ends the process at once (``os._exit``): the cache dies with it,
  the kernel aborts the FUSE connection (writes in flight fail, an fsync in
  progress may have written part of its pages: a power cut during an
  fsync), and the mount point is left dead until :func:`clear` unmounts it.
  SIGTERM is a clean shutdown: the cache is written back (a ``sync``) and
  the layer unmounts. The process prints ``ready`` once mounted.
* in this process: :meth:`LazyMount.power_loss` drops the cache and ends
  the loop in one step on the layer's thread (no call is served after it),
  then unmounts.

Reused from the capture mount (:mod:`smirror.capture.mount`): the
pass-through of every name and attribute call to the backing directory
(:class:`~smirror.capture.mount.fs.CaptureFS`, with its ops sent nowhere; its
confinement beneath a handle of the backing root comes along, unneeded),
and the mount point checks and unmount (:mod:`.mountpoint`). The layer
overrides the data path: read, write, fsync, truncate, release, and the
attributes it reports (size and mtime from the cache).
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from smirror.capture.mount import _fuse
from smirror.capture.mount._fuse import FUSEError
from smirror.capture.mount.fs import CaptureFS
from smirror.capture.mount.mountpoint import mounted_at, prepare, unmount

log = logging.getLogger("smirror.tests.lazyfs")

PAGE = 4096
FSNAME = "lazyfs"


def _guarded(fn):
    """An OSError becomes its errno for the caller; anything else is a bug
    of the layer: logged, EIO, and the loop goes on. A data call made after
    a power loss (in this process) gets EIO: the machine is off."""
    @functools.wraps(fn)
    def wrapper(self, *args):
        if self.off:
            raise FUSEError(errno.EIO)
        try:
            return fn(self, *args)
        except FUSEError:
            raise
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            self.failures += 1
            log.exception("lazyfs: %s failed", fn.__name__)
            raise FUSEError(errno.EIO) from None
    return wrapper


class CachedFile:
    """What the layer holds of one file (by inode) that is not durable:
    the pages written since its last fsync, the size and mtime readers
    see. ``fd``: the backing file, read-write (pages are filled from it and
    written back to it)."""

    __slots__ = ("fd", "size", "pages", "mtime_ns")

    def __init__(self, fd: int):
        st = os.fstat(fd)
        self.fd = fd
        self.size = st.st_size
        self.mtime_ns = st.st_mtime_ns
        self.pages: dict[int, bytearray] = {}

    def _page(self, index: int) -> bytearray:
        page = self.pages.get(index)
        if page is None:
            page = bytearray(os.pread(self.fd, PAGE, index * PAGE))
            page.extend(bytes(PAGE - len(page)))
            # what lies beyond the size readers see is zeros, whatever the backing holds
            start = index * PAGE
            if self.size < start + PAGE:
                page[max(0, self.size - start):] = bytes(PAGE - max(0, self.size - start))
            self.pages[index] = page
        return page

    def write(self, off: int, data) -> None:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            index, inner = divmod(off + pos, PAGE)
            n = min(PAGE - inner, len(view) - pos)
            self._page(index)[inner:inner + n] = view[pos:pos + n]
            pos += n
        self.size = max(self.size, off + len(view))
        self.mtime_ns = time.time_ns()

    def read(self, off: int, size: int) -> bytes:
        end = min(off + size, self.size)
        out = bytearray()
        pos = off
        while pos < end:
            index, inner = divmod(pos, PAGE)
            n = min(PAGE - inner, end - pos)
            page = self.pages.get(index)
            if page is not None:
                out += page[inner:inner + n]
            else:
                chunk = os.pread(self.fd, n, pos)
                out += chunk + bytes(n - len(chunk))    # beyond the backing's end: zeros
            pos += n
        return bytes(out)

    def truncate(self, size: int) -> None:
        """The backing file was truncated to ``size`` (metadata goes through):
        the cached pages beyond it go, the one it cuts is zeroed past it."""
        last = size // PAGE
        for index in [i for i in self.pages if i > last or (i == last and size % PAGE == 0)]:
            del self.pages[index]
        page = self.pages.get(last)
        if page is not None:
            page[size % PAGE:] = bytes(PAGE - size % PAGE)
        self.size = size

    def flush(self) -> None:
        """Write the cached pages, size and mtime to the backing file and
        fsync it: now they are durable."""
        for index in sorted(self.pages):
            start = index * PAGE
            if start < self.size:
                os.pwrite(self.fd, memoryview(self.pages[index])[:min(PAGE, self.size - start)], start)
        if os.fstat(self.fd).st_size != self.size:
            os.ftruncate(self.fd, self.size)
        os.utime(self.fd, ns=(os.fstat(self.fd).st_atime_ns, self.mtime_ns))
        os.fsync(self.fd)
        self.pages.clear()

    @property
    def cached_bytes(self) -> int:
        return len(self.pages) * PAGE


class LazyFS(CaptureFS):
    """The capture mount's pass-through, with a data cache that an fsync
    makes durable and a power loss forgets (see the module doc)."""

    def __init__(self, root):
        super().__init__(root, lambda op: None)     # the capture's ops go nowhere
        self.cache: dict[int, CachedFile] = {}      # inode -> what is not durable
        self.off = False
        self.cache_flushes = 0                      # files whose cache an fsync wrote back

    # -- the cache ---------------------------------------------------------------------
    def _cached(self, inode: int, fh: int) -> CachedFile:
        entry = self.cache.get(inode)
        if entry is None:
            # a descriptor of our own: the caller's may be write-only or read-only
            fd = os.open(f"/proc/self/fd/{fh}", os.O_RDWR | os.O_CLOEXEC)
            entry = self.cache[inode] = CachedFile(fd)
        return entry

    def _drop(self, inode: int) -> None:
        entry = self.cache.pop(inode, None)
        if entry is not None:
            os.close(entry.fd)

    def _sweep(self) -> None:
        """Forget the cache of files no name and no open descriptor reach
        any more: their data can never be read or made durable."""
        open_inodes = set(self.open_files.values())
        for inode, entry in list(self.cache.items()):
            if inode not in open_inodes and os.fstat(entry.fd).st_nlink == 0:
                self._drop(inode)

    def lose(self) -> dict:
        """The power loss: every cached write is forgotten, every later
        call fails. Returns what was lost."""
        lost = {"files": len(self.cache), "bytes": sum(e.cached_bytes for e in self.cache.values())}
        for inode in list(self.cache):
            self._drop(inode)
        self.off = True
        return lost

    def sync_all(self) -> int:
        """Make every cached write durable (a clean shutdown's sync)."""
        n = 0
        for inode in list(self.cache):
            self.cache[inode].flush()
            self._drop(inode)
            n += 1
        return n

    # -- what readers see of sizes and times ------------------------------------------
    def _attrs(self, st) -> _fuse.Entry:
        # every reply with attributes (lookup, getattr, readdirplus, create,
        # setattr, link) goes through here: the cached size and mtime win
        a = super()._attrs(st)
        entry = self.cache.get(a.st_ino)
        if entry is not None:
            a.st_size = entry.size
            a.st_mtime_ns = entry.mtime_ns
        return a

    # -- the data path -------------------------------------------------------------------
    @_guarded
    def read(self, fh, off, size):
        entry = self.cache.get(self.open_files[fh])
        if entry is None:
            return os.pread(fh, size, off)
        return entry.read(off, size)

    @_guarded
    def write(self, fh, off, buf, kill_suidgid=False):
        # the layer serves the target daemon (root: never asked to kill set-id bits)
        self._cached(self.open_files[fh], fh).write(off, buf)
        return len(buf)

    @_guarded
    def fsync(self, fh, datasync):
        inode = self.open_files[fh]
        entry = self.cache.get(inode)
        if entry is not None:
            entry.flush()
            self._drop(inode)
            self.cache_flushes += 1
        else:
            os.fsync(fh)

    def _opened(self, fd, inode, rel, flags, kill_suidgid=False):
        info = super()._opened(fd, inode, rel, flags, kill_suidgid)
        entry = self.cache.get(inode)
        if flags & os.O_TRUNC and entry is not None:
            entry.truncate(0)
            entry.mtime_ns = time.time_ns()
        return info

    def _setattr(self, inode, rel, dfd, name, attr, fields, fh, kill_suidgid=False):
        # on the backing: durable
        out = super()._setattr(inode, rel, dfd, name, attr, fields, fh, kill_suidgid)
        entry = self.cache.get(inode)
        if entry is not None:
            if fields.update_size:
                entry.truncate(attr.st_size)
                entry.mtime_ns = os.fstat(entry.fd).st_mtime_ns    # truncate stamped it
            if fields.update_mtime:
                entry.mtime_ns = attr.st_mtime_ns
            out.st_size, out.st_mtime_ns = entry.size, entry.mtime_ns
        return out

    def fallocate(self, fh, mode, offset, length):
        # not modelled (the module doc): the capture mount's handler would
        # change the backing file under the cached pages
        raise FUSEError(errno.EOPNOTSUPP)

    def release(self, fh):
        super().release(fh)
        self._sweep()

    def unlink(self, parent, name, ctx):
        super().unlink(parent, name, ctx)
        self._sweep()

    def rename(self, parent_old, name_old, parent_new, name_new, flags, ctx):
        super().rename(parent_old, name_old, parent_new, name_new, flags, ctx)
        self._sweep()


class LazyMount:
    """The layer mounted at ``mountpoint`` over ``backing``, served on a
    thread of this process."""

    def __init__(self, backing, mountpoint):
        self.backing = os.path.abspath(os.fsdecode(backing))
        self.mountpoint = os.path.abspath(os.fsdecode(mountpoint))
        self.fs: LazyFS | None = None
        self._session: _fuse.Session | None = None
        self._thread: threading.Thread | None = None
        self.error = ""

    def start(self) -> LazyMount:
        self.mountpoint, _ = prepare(self.mountpoint)
        self.fs = LazyFS(self.backing)
        opts = {f"fsname={FSNAME}", "subtype=smirror", "default_permissions", "allow_other"}
        self._session = _fuse.Session(self.fs, self.mountpoint, opts)
        self._thread = threading.Thread(target=self._run, name="lazyfs", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._session.run()
        except BaseException as exc:    # noqa: BLE001 - said by stop()
            self.error = f"{type(exc).__name__}: {exc}"

    def call(self, fn, *args):
        """``fn(*args)`` on the layer's thread (between two calls it serves)."""
        done = threading.Event()
        out: list = [None, None]

        def run():
            try:
                out[0] = fn(*args)
            except BaseException as exc:    # noqa: BLE001 - raised in the caller
                out[1] = exc
            finally:
                done.set()
        self._session.call_soon(run)
        while not done.wait(0.5):
            if not self._thread.is_alive():
                raise RuntimeError(f"lazyfs at {self.mountpoint}: its loop ended")
        if out[1] is not None:
            raise out[1]
        return out[0]

    def power_loss(self) -> dict:
        """Forget every unsynced write, then unmount (what is left is the
        backing directory as the disk holds it)."""
        fs = self.fs

        def lose():
            # in one step on the layer's thread: no call is served between
            # the loss and the end of the loop
            lost = fs.lose()
            self._session.exit()
            return lost
        dev = mount_device(self.mountpoint)
        lost = self.call(lose)
        # dirty pages the kernel still holds (a shared mapping) would be
        # written back at the unmount, to a loop that no longer serves:
        # abort the connection, as the machine going dark does
        abort_connection(dev)
        self._end(lost=True)
        return lost

    def stop(self) -> None:
        """A clean shutdown: every cached write made durable, unmounted."""
        if self._thread is not None and self._thread.is_alive():
            self.call(self.fs.sync_all)
        self._end()

    def _end(self, lost: bool = False) -> None:
        """End the loop and unmount; ``lost``: after a power loss, whatever
        the aborted connection did to the loop is expected."""
        if self._thread is not None and self._thread.is_alive():
            self._session.exit()
            self._thread.join(10)
        if self._thread is not None:
            self._thread = None
            self._session.close(unmount=True)
        if self.fs is not None:
            self.fs.base.close()
        if self.error and not lost:
            raise RuntimeError(f"lazyfs at {self.mountpoint}: its loop failed: {self.error}")

    def __enter__(self) -> LazyMount:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def mount_device(path) -> str:
    """The "major:minor" of the file system mounted at ``path``."""
    found = ""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if fields[4] == path:
                found = fields[2]
    if not found:
        raise RuntimeError(f"nothing is mounted at {path}")
    return found


def abort_connection(dev: str) -> None:
    """Abort the FUSE connection of device ``dev`` (its fusectl ``abort``
    file; fusectl is mounted if it is not): every request waiting and every
    later one fails, dirty pages are dropped, the unmount needs no server."""
    conns = "/sys/fs/fuse/connections"
    if not os.listdir(conns):
        subprocess.run(["mount", "-t", "fusectl", "none", conns], check=True, capture_output=True)
    with open(f"{conns}/{dev.split(':')[1]}/abort", "w") as f:
        f.write("1")


# -- the layer as a process -------------------------------------------------------------

def clear(mountpoint) -> None:
    """Unmount what is left at ``mountpoint`` (a layer whose process ended
    at a power loss leaves a dead mount)."""
    path = os.path.abspath(os.fsdecode(mountpoint))
    if mounted_at(path) is not None:
        unmount(path, lazy=True)


class LazyProcess:
    """The layer in a process of its own: :meth:`power_loss` (SIGUSR1) ends
    it with its cache; :meth:`start` again serves the backing directory as
    the power loss left it."""

    def __init__(self, backing, mountpoint, env=None, log_path=None):
        self.backing, self.mountpoint = str(backing), str(mountpoint)
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> LazyProcess:
        clear(self.mountpoint)
        err = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.backing,
                                          self.mountpoint], env=self.env, stdout=subprocess.PIPE,
                                         stderr=err)
        finally:
            if self.log_path:
                err.close()
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.proc.wait(10)
            raise RuntimeError(f"lazyfs did not start at {self.mountpoint}: {line!r} "
                               f"(exit {self.proc.returncode}; log {self.log_path})")
        return self

    def power_loss(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)
        self.proc.wait(30)
        clear(self.mountpoint)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        clear(self.mountpoint)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: lazyfs.py BACKING MOUNTPOINT  (SIGUSR1: power loss; SIGTERM: sync, unmount)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="lazyfs: %(message)s")
    backing, mountpoint = args
    path, _ = prepare(mountpoint)
    fs = LazyFS(backing)
    session = _fuse.Session(fs, path, {f"fsname={FSNAME}", "subtype=smirror",
                                       "default_permissions", "allow_other"})

    def power_loss(signum, frame):
        # no cleanup at all: the cache dies with the process, the kernel
        # aborts the connection (a real power cut does not say goodbye)
        os.write(2, b"lazyfs: power loss: %d files with unsynced data lost\n" % len(fs.cache))
        os._exit(0)

    def shutdown(signum, frame):
        # the loop runs this handler between two requests, on this thread
        fs.sync_all()                   # a clean shutdown writes the cache back
        session.exit()
    signal.signal(signal.SIGUSR1, power_loss)
    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        session.run()
    finally:
        session.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
