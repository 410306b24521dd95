"""Paths resolved beneath a directory handle that nothing can lead out of.

A :class:`Beneath` holds one ``O_PATH|O_DIRECTORY`` descriptor of a root (a
map base, a keep slot). Every operation resolves the *parent directory* of
its relative path beneath that descriptor, afresh each time (no cache of
checked directories: a local user may swap a directory for a symlink between
two ops), and then acts on the final name with ``dir_fd=`` and without
following it. The parent is resolved with ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`` where the kernel has it (one
syscall), or else by opening one component at a time with
``O_NOFOLLOW|O_DIRECTORY``. Either way a symlink anywhere on the way is
refused with a :class:`~smirror.errors.ConfinementError` naming it; a
missing directory raises FileNotFoundError (the op failed, nothing escaped).

The helpers at the end work on (directory fd, name) pairs and never follow
a symlink: a recursive remove, a mkdir walk, a chmod of the object itself.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat

from smirror.errors import ConfinementError

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_SYS_OPENAT2 = 437             # the same number on every architecture (generic table)
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC

# False: always walk component by component (tests force the fallback with it)
use_openat2 = True
_openat2_missing = False       # set once the kernel said ENOSYS


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_syscall_fn = None
_HOW = _OpenHow(_DIR_FLAGS, 0, _RESOLVE)        # the same request every time
_HOW_SIZE = ctypes.sizeof(_HOW)


def _openat2(dfd: int, path: bytes) -> int:
    """openat2 of a directory beneath ``dfd``; OSError as the kernel says."""
    global _syscall_fn
    if _syscall_fn is None:
        fn = ctypes.CDLL(None, use_errno=True).syscall
        fn.restype = ctypes.c_long
        fn.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                       ctypes.c_size_t]
        _syscall_fn = fn
    fd = _syscall_fn(_SYS_OPENAT2, dfd, path, ctypes.addressof(_HOW), _HOW_SIZE)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def check_rel(rel) -> bytes:
    """``rel`` as bytes after the lexical checks: relative, no empty, ``.``
    or ``..`` component, no NUL. b"" (the root itself) is accepted."""
    if not isinstance(rel, (bytes, bytearray, memoryview)):
        raise ConfinementError(f"target path must be bytes, got {rel!r}", rel)
    rel = bytes(rel)
    if rel == b"":
        return rel
    if rel.startswith(b"/"):
        raise ConfinementError(f"absolute path {rel!r} refused: target paths are relative "
                               f"to the map base", rel)
    if b"\0" in rel:
        raise ConfinementError(f"path {rel!r} contains a NUL byte", rel)
    for part in rel.split(b"/"):
        if part in (b"", b".", b".."):
            raise ConfinementError(f"path {rel!r} has an empty, '.' or '..' component", rel)
    return rel


class Beneath:
    """A directory handle of ``root`` (opened once) and the resolution of
    relative paths beneath it. ``root`` itself is the administrator's path
    and is opened as given."""

    def __init__(self, root, *, create: bool = False, mode: int = 0o777):
        self.root = os.fsencode(os.path.abspath(os.fsencode(root)))
        if create:
            os.makedirs(self.root, mode=mode, exist_ok=True)
        self.fd = os.open(self.root, _DIR_FLAGS)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:       # noqa: BLE001 - a finalizer must not raise (at exit os may be gone)
            pass

    def __repr__(self):
        return f"Beneath({os.fsdecode(self.root)!r})"

    # -- resolution ---------------------------------------------------------
    def open_dir(self, rel: bytes, op_path: bytes | None = None) -> int:
        """A new O_PATH descriptor of the directory ``rel`` (checked
        relative path; b"" is a duplicate of the root handle). ``op_path``:
        the op's whole path, for the error message."""
        if not rel:
            return os.dup(self.fd)
        global _openat2_missing
        if use_openat2 and not _openat2_missing:
            try:
                return _openat2(self.fd, rel)
            except OSError as exc:
                if exc.errno == errno.ENOSYS:
                    _openat2_missing = True         # an old kernel: walk from now on
                elif exc.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR, errno.EAGAIN):
                    pass      # the walk names the culprit (or succeeds after a race)
                else:
                    raise OSError(exc.errno, exc.strerror, os.fsdecode(rel)) from None
        return self._walk(rel, op_path or rel)

    def _walk(self, rel: bytes, op_path: bytes) -> int:
        fd = os.dup(self.fd)
        done = b""
        try:
            for part in rel.split(b"/"):
                done = done + b"/" + part if done else part
                try:
                    nfd = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        self._refuse(fd, part, done, op_path)
                    raise OSError(exc.errno, exc.strerror, os.fsdecode(done)) from None
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _refuse(self, dfd: int, part: bytes, done: bytes, rel: bytes):
        try:
            st = os.stat(part, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise ConfinementError(f"path {os.fsdecode(rel)!r} passes through symlink "
                                   f"{os.fsdecode(done)!r} in the target: refused (it could "
                                   f"lead outside {os.fsdecode(self.root)!r})", rel)
        raise ConfinementError(f"path {os.fsdecode(rel)!r}: {os.fsdecode(done)!r} is not a "
                               f"directory in the target", rel)

    def at(self, rel) -> _At:
        """``with base.at(rel) as (dfd, name):`` the parent directory of
        ``rel`` resolved beneath the root, and the final name (b"" when
        ``rel`` is the root: then ``dfd`` is the root handle itself)."""
        rel = check_rel(rel)
        parent, _, name = rel.rpartition(b"/")
        return _At(self, parent, name, rel)

    def open(self, rel, flags: int, mode: int = 0o600) -> int:
        """``os.open`` of ``rel`` beneath the root, never following its final
        component (O_NOFOLLOW; ELOOP becomes a ConfinementError)."""
        with self.at(rel) as (dfd, name):
            if not name:
                return os.open(".", flags | os.O_CLOEXEC, dir_fd=dfd) \
                    if not flags & os.O_PATH else os.dup(dfd)
            try:
                return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise ConfinementError(f"{os.fsdecode(bytes(rel))!r} is a symlink on the "
                                           f"target: not followed", rel) from None
                raise


class _At:
    __slots__ = ("base", "parent", "name", "rel", "fd")

    def __init__(self, base: Beneath, parent: bytes, name: bytes, rel: bytes):
        self.base, self.parent, self.name, self.rel = base, parent, name, rel
        self.fd = -1

    def __enter__(self):
        if not self.parent:
            return self.base.fd, self.name
        self.fd = self.base.open_dir(self.parent, self.rel)
        return self.fd, self.name

    def __exit__(self, *exc):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        return False


# -- (dir fd, name) helpers: none of them follows a symlink -------------------

def lstat_at(dfd: int, name: bytes):
    """lstat of ``name`` in ``dfd``, or None when it does not exist."""
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def open_subdir(dfd: int, name: bytes) -> int:
    """A readable descriptor of the directory ``name`` in ``dfd`` (for
    listing); OSError (ENOTDIR/ELOOP) when it is a symlink or not a dir."""
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                   dir_fd=dfd)


def rmtree_at(dfd: int, name: bytes) -> None:
    """Remove ``name`` in ``dfd`` and everything under it, from descriptors
    only; a symlink is removed, never followed. Missing is fine."""
    try:
        os.unlink(name, dir_fd=dfd)
        return
    except FileNotFoundError:
        return
    except IsADirectoryError:
        pass
    except PermissionError:       # EPERM: some kernels say so for a directory
        st = lstat_at(dfd, name)
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise
    try:
        sub = open_subdir(dfd, name)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):   # replaced meanwhile: try again
            os.unlink(name, dir_fd=dfd)
            return
        raise
    try:
        for entry in os.listdir(sub):
            rmtree_at(sub, os.fsencode(entry))
    finally:
        os.close(sub)
    try:
        os.rmdir(name, dir_fd=dfd)
    except FileNotFoundError:
        pass


def makedirs_at(dfd: int, rel: bytes, mode: int = 0o700) -> int:
    """Create the directories of the checked relative path ``rel`` beneath
    ``dfd`` one component at a time, refusing a symlink on the way; returns
    an O_PATH descriptor of the last one (a dup of ``dfd`` for b"")."""
    fd = os.dup(dfd)
    try:
        for part in (rel.split(b"/") if rel else ()):
            try:
                os.mkdir(part, mode, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                nfd = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise ConfinementError(f"{rel!r}: {part!r} is a symlink or not a "
                                           f"directory: not followed", rel) from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def chmod_at(dfd: int, name: bytes, mode: int) -> bool:
    """chmod of ``name`` itself (a symlink is left alone: False). Works on
    special files without opening them, through the O_PATH descriptor's
    /proc entry."""
    try:
        # the kernel's (glibc's) own no-follow chmod: refuses a symlink
        os.chmod(name, mode, dir_fd=dfd, follow_symlinks=False)
        return True
    except (NotImplementedError, ValueError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        if stat.S_ISLNK(os.fstat(pfd).st_mode):
            return False
        os.chmod(f"/proc/self/fd/{pfd}", mode)
        return True
    finally:
        os.close(pfd)


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_renameat2_fn = None


def renameat2(olddfd: int, old: bytes, newdfd: int, new: bytes, flags: int) -> None:
    """renameat2(2) (glibc >= 2.28; Python has no binding): RENAME_NOREPLACE
    and RENAME_EXCHANGE are atomic in the kernel. Neither name is followed."""
    global _renameat2_fn
    if _renameat2_fn is None:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        _renameat2_fn = fn
    if _renameat2_fn(olddfd, old, newdfd, new, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(old), None, os.fsdecode(new))


def proc_path(dfd: int, name: bytes = b"") -> bytes:
    """A path naming ``name`` in the directory ``dfd`` refers to, for the
    calls that take no dir_fd (xattrs): /proc's link to the descriptor goes
    to that very directory, whatever was renamed or swapped since."""
    p = b"/proc/self/fd/%d" % dfd
    return p + b"/" + name if name else p


__all__ = ["Beneath", "check_rel", "lstat_at", "open_subdir", "rmtree_at",
           "makedirs_at", "chmod_at", "proc_path", "renameat2", "RENAME_NOREPLACE",
           "RENAME_EXCHANGE", "use_openat2"]
