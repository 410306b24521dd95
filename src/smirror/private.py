"""Files only the daemon's user may read: its queues (they hold the contents
of replicated files), locks, acknowledgements, logs, and the secrets it is
given (link passwords, TLS keys).

* :func:`private_dir` makes a directory (and its missing parents) 0700 and
  narrows an existing one that group or others could enter.
* :func:`narrow_file` narrows an existing file to 0600.
* :func:`read_secret` reads a secret file, refusing one that group or
  others can read, with the fix in the message (:func:`check_secret` only
  checks, for a file another library opens).

New files are created with mode ``PRIVATE_FILE`` by their writers
(``os.open(..., PRIVATE_FILE)``).
"""
from __future__ import annotations

import os
import stat

from smirror.errors import ConfigError

__all__ = ["PRIVATE_DIR", "PRIVATE_FILE", "private_dir", "narrow_file", "read_secret",
           "check_secret"]

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def _narrow(path, st_mode: int, mode: int) -> None:
    """chmod ``path`` to ``mode`` when group or others have any bit; a
    directory or file the daemon does not own (an administrator's) is left
    as it is."""
    if stat.S_IMODE(st_mode) & 0o077:
        try:
            os.chmod(path, stat.S_IMODE(st_mode) & mode)
        except PermissionError:
            pass


def private_dir(path) -> None:
    """``path`` exists as a directory of mode 0700 (missing parents get the
    default mode: the leaf alone keeps what is inside private)."""
    os.makedirs(path, PRIVATE_DIR, exist_ok=True)
    _narrow(path, os.stat(path).st_mode, PRIVATE_DIR)


def narrow_file(path) -> None:
    """An existing file ``path`` loses every group and other bit (0600)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        _narrow(path, st.st_mode, PRIVATE_FILE)


def check_secret(path, what: str) -> None:
    """A ConfigError when group or others can read the secret file ``path``
    (for a file another module opens itself, like a TLS key)."""
    read_secret(path, what, keep=False)


def read_secret(path, what: str, keep: bool = True) -> bytes:
    """The contents of the secret file ``path`` (``what`` names the setting,
    e.g. ``links.password_file``). A file group or others can read is a
    ConfigError naming it, its mode and the fix."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise ConfigError(f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or "
                              f"others can read this secret; run: chmod 600 {path}")
        chunks = []
        while keep and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
