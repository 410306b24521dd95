"""One way to replace a small file so that a crash leaves either the old
or the new content, never a torn or empty one: write a temporary file
beside it, fsync it, rename it over the old name, fsync the directory (so
the rename itself survives a power cut)."""
from __future__ import annotations

import os


def write_atomic(path, data: bytes | str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8). A new file
    gets ``mode`` (less the umask); the temporary is ``.NAME.tmp`` in the
    same directory, so the rename never crosses filesystems."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{os.fsdecode(name)}.tmp")
    view = memoryview(data.encode() if isinstance(data, str) else data)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
