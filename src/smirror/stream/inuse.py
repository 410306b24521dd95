"""Files in use on the target: the applier holds back the ops of a file that
another process has open (a backup reading it), and every later op with
them, until it is closed or a maximum delay passed.

The check is a Linux write lease (``fcntl(F_SETLEASE, F_WRLCK)``): the kernel
grants it only when no other open file description of the inode exists, for
reading or writing, in any process; it is exact, costs two syscalls, and
needs no scan of ``/proc``. It is released at once (a lease held while
someone opens the file would make the kernel signal this process; the
signal is set to SIGURG, ignored by default, in case the race happens).
Leases need the file's owner or CAP_LEASE (root has it); where the kernel
refuses a lease for another reason the file counts as free, and the applier
logs that once. Only regular files are checked: directories, symlinks and
missing paths never wait. When a file is found busy, ``/proc/*/fd`` is read
once to name who holds it (status shows it).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import stat
import threading
import time

from smirror.ops import OpKind

log = logging.getLogger("smirror.stream.inuse")

F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
F_SETSIG = getattr(fcntl, "F_SETSIG", 10)
_SIG = int(signal.SIGURG)

# ops whose path (and, for RENAME, path2) is changed or replaced in place
_CHECKED = {OpKind.WRITE, OpKind.TRUNCATE, OpKind.CREATE, OpKind.DELETE, OpKind.RENAME,
            OpKind.SETATTR, OpKind.SYMLINK, OpKind.HARDLINK}
_warned_unsupported = False
_LEASE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY


def _opener(target):
    """``target`` as a function that opens the file read-only: a callable
    as it is (the applier's confined open), a path opened not following
    its final component."""
    if callable(target):
        return target
    return lambda: os.open(target, _LEASE_FLAGS | os.O_NOFOLLOW | os.O_CLOEXEC)


def in_use(target) -> bool:
    """True when some open file description other than ours refers to the
    regular file ``target`` (a path, or a function opening it read-only
    beneath the map base: :meth:`smirror.stream.apply.Applier.open_path`)."""
    global _warned_unsupported
    opener = _opener(target)
    try:
        fd = opener()
    except (OSError, ValueError):
        return False           # missing, a symlink, unreadable, refused: nothing to wait for
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.fcntl(fd, F_SETSIG, _SIG)
        try:
            fcntl.fcntl(fd, F_SETLEASE, fcntl.F_WRLCK)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EBUSY):
                return True
            if not _warned_unsupported:
                _warned_unsupported = True
                log.warning("cannot take a lease (%s): files in use are not detected here",
                            exc.strerror)
            return False
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def _fd_inode(pid: str, fd: str) -> int | None:
    """The inode number of process ``pid``'s descriptor ``fd``, from its
    fdinfo (no access to the file itself: a stat through /proc/PID/fd
    follows the link into the file's file system, and one whose server
    hangs, a stopped FUSE daemon, say, hung the applier with it); -1 when
    the descriptor is gone, None when the kernel does not tell (before
    Linux 5.14)."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            info = f.read()
    except OSError:
        return -1
    for line in info.split(b"\n"):
        if line.startswith(b"ino:"):
            return int(line.split()[1])
    return None


def holders(target) -> list[str]:
    """``pid (comm)`` of the processes with the file ``target`` (as for
    :func:`in_use`) open (best effort)."""
    try:
        fd = _opener(target)()
    except (OSError, ValueError):
        return []
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    me = os.getpid()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            for name in os.listdir(fd_dir):
                if _fd_inode(pid, name) not in (None, st.st_ino):
                    continue
                try:
                    s = os.stat(f"{fd_dir}/{name}")
                except OSError:
                    continue
                if (s.st_ino, s.st_dev) == (st.st_ino, st.st_dev):
                    try:
                        with open(f"/proc/{pid}/comm") as f:
                            comm = f.read().strip()
                    except OSError:
                        comm = "?"
                    found.append(f"{pid} ({comm})")
                    break
        except OSError:
            continue
    return found


class InUseGate:
    """Holds the applier back before an op on a file in use.

    ``wait(op, open_of, release)`` returns True when the op's files are
    free, or when ``max_delay`` seconds passed since the wait began (then
    the op is applied anyway, and the log says so); False when ``stop`` was
    set meanwhile (the op is not to be applied now). ``open_of(rel, flags)``
    opens a path of the op beneath the map base (the applier's
    ``open_path``: no path is followed out of it). ``release()`` closes
    the applier's own descriptors first (they would count as "in use", e.g.
    through a hard link). ``waiting`` describes the current wait for status.
    Each file is checked once per ``begin_frame()``."""

    def __init__(self, max_delay: float, *, poll: float = 0.05, stop: threading.Event | None = None):
        self.max_delay = max_delay
        self.poll = poll
        self.stop = stop or threading.Event()
        self.waiting: dict | None = None
        self.stats = {"delays": 0, "delayed_seconds": 0.0, "gave_up": 0}
        self._checked: set[bytes] = set()

    def begin_frame(self) -> None:
        self._checked.clear()

    def wait(self, op, open_of, release=None, on_hold=None) -> bool:
        if self.max_delay <= 0 or op.kind not in _CHECKED:
            return True
        rels = (bytes(op.path), bytes(op.path2)) if op.kind == OpKind.RENAME else (bytes(op.path),)
        for rel in rels:
            if rel in self._checked:
                continue
            self._checked.add(rel)
            def opener(rel=rel):
                return open_of(rel, _LEASE_FLAGS)
            if release is not None:
                release()
            if in_use(opener):      # a path confinement refuses counts as free: refused when applied
                if on_hold is not None:
                    on_hold()           # before a wait that may last max_delay
                if not self._hold(op, rel, opener):
                    return False
        return True

    def _hold(self, op, rel: bytes, opener) -> bool:
        t0 = time.monotonic()
        who = holders(opener)
        self.waiting = {"path": os.fsdecode(rel), "seq": op.seq, "op": OpKind(op.kind).name,
                        "since": time.time(), "held_by": who,
                        "why": f"open by {', '.join(who) if who else 'another process'}"}
        self.stats["delays"] += 1
        log.warning("op seq %d %s %r waits: the file is in use on the target (%s); later ops wait too",
                    op.seq, OpKind(op.kind).name, rel, self.waiting["why"])
        try:
            while in_use(opener):
                if time.monotonic() - t0 >= self.max_delay:
                    self.stats["gave_up"] += 1
                    log.error("op seq %d %s %r: file still in use after %.0fs (the maximum delay): "
                              "applying it anyway", op.seq, OpKind(op.kind).name, rel, self.max_delay)
                    return True
                if self.stop.wait(self.poll):
                    return False
            log.info("op seq %d %r: the file is free after %.1fs", op.seq, rel, time.monotonic() - t0)
            return True
        finally:
            self.stats["delayed_seconds"] += time.monotonic() - t0
            self.waiting = None
