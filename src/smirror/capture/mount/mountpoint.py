"""The mount point: what is mounted there now, and clearing a mount that a
crashed smirror left (its FUSE server is gone, so every access fails with
"Transport endpoint is not connected")."""
from __future__ import annotations

import errno
import logging
import os
import subprocess

from smirror.errors import MountError

log = logging.getLogger("smirror.capture.mount")

FSTYPE = "fuse.smirror"          # the type our mounts show in /proc/self/mountinfo
_DEAD = (errno.ENOTCONN, errno.ECONNABORTED)


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounted_at(path: str) -> str | None:
    """The file system type mounted exactly at ``path`` (the topmost one),
    or None."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and _unescape(fields[4]) == path:
                found = right.split()[0]
    return found


def unmount(path: str, lazy: bool = False) -> None:
    """``fusermount3 -u`` (works for root and for the mount's owner)."""
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [path]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise MountError(f"cannot unmount {path}: fusermount3 is missing "
                         f"(install Debian's fuse3 package)") from None
    if r.returncode != 0:
        raise MountError(f"cannot unmount {path}: {r.stderr.strip() or r.returncode}")


def prepare(mountpoint) -> tuple[str, str]:
    """Checks ``mountpoint`` (made if missing) before mounting: an empty
    directory with nothing mounted on it. A dead smirror mount there is
    cleared. Returns (absolute path, what was done: "" or a message)."""
    path = os.path.abspath(os.fsdecode(mountpoint))
    cleared = ""
    fstype = mounted_at(path)
    if fstype is not None:
        if fstype != FSTYPE:
            raise MountError(f"mount point {path} already has a {fstype} file system mounted on it")
        try:
            # statfs always asks the server (a stat may be answered from
            # the kernel's attribute cache for a while after it died)
            os.statvfs(path)
        except OSError as exc:
            if exc.errno not in _DEAD:
                raise MountError(f"mount point {path}: {exc.strerror}") from None
            unmount(path, lazy=True)
            cleared = (f"cleared a stale smirror mount at {path} (its server is gone: "
                       f"a crashed earlier run); writes made through it after the crash failed")
            log.warning("%s", cleared)
        else:
            raise MountError(f"mount point {path} is already served by a running smirror mount")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise MountError(f"mount point {path} is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with os.scandir(path) as it:
            if next(it, None) is not None:
                raise MountError(f"mount point {path} is not empty: its files would be hidden "
                                 f"by the mount; use an empty directory")
    except MountError:
        raise
    except OSError as exc:
        raise MountError(f"mount point {path}: {exc.strerror}") from None
    return path, cleared
