"""The applier: ops of one connection applied, in sequence order, to the
tree under its map base.

Every path goes through the target's confinement check (no absolute path,
no ``..``, no walking through a symlink out of the map base); a refused op
raises :class:`~smirror.errors.ConfinementError` naming the op and path and
nothing of it is applied.

The sequence number of the last applied op is stored after every op in a
small memory-mapped state file (an aligned 8-byte store: no syscall, and a
SIGKILL cannot tear it; the page cache keeps it). On restart, ops up to it
are skipped, so none is applied twice, except the one op that was applied
when the process died before recording it. Every op kind is idempotent when
replayed right after itself: a rename whose source is gone but whose
destination exists, a delete of a missing path, a create over the file it
created are all accepted. What the
tree lacks although the stream says it should be there (a write to a file
that is missing on the target because someone removed it) is repaired and
counted in ``stats['repairs']``.
"""
from __future__ import annotations

import errno
import mmap
import os
import struct
import stat
from collections import OrderedDict

from .errors import ConfinementError, SmirrorError
from .ops import AttrMask, Op, OpKind
from .target_local import LocalTarget

_OPEN_FILES = 64           # write fds kept open between ops of the same file
_STATE_MAGIC = b"SMAPPLY1"
_SEQ = struct.Struct("<Q")


class ApplyError(SmirrorError):
    """An op could not be applied; names the op."""


def _open_state(path) -> mmap.mmap:
    """The applied-sequence file: magic + u64, mapped read-write."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            os.write(fd, _STATE_MAGIC + _SEQ.pack(0))
            os.fsync(fd)
        elif size != 16:
            raise ApplyError(f"{path}: applied-sequence file has {size} bytes, expected 16")
        state = mmap.mmap(fd, 16)
    finally:
        os.close(fd)
    if state[:8] != _STATE_MAGIC:
        state.close()
        raise ApplyError(f"{path}: not an applied-sequence file (bad magic)")
    return state


class Applier:
    """Applies ops to ``map_base``. ``on_task(op)`` / ``on_mark(op)`` are
    called when the applier reaches a TASK or MARK op (every earlier op
    applied, no later one yet)."""

    def __init__(self, map_base, *, state_path=None, owner: bool | None = None,
                 on_task=None, on_mark=None, create_base: bool = True):
        base = os.fsencode(os.path.abspath(os.fsencode(map_base)))
        if create_base:
            os.makedirs(base, exist_ok=True)
        elif not os.path.isdir(base):
            raise ApplyError(f"map base {base!r} is not a directory")
        self.target = LocalTarget(base, owner=owner, xattrs=False)
        self.owner = self.target.owner
        self.on_task = on_task
        self.on_mark = on_mark
        self._fds: OrderedDict[bytes, int] = OrderedDict()
        self.stats = {"ops": 0, "bytes": 0, "repairs": 0, "skipped": 0}
        self._state = None
        self.applied_seq = 0
        if state_path is not None:
            self._state = _open_state(state_path)
            self.applied_seq = _SEQ.unpack_from(self._state, 8)[0]
        self._dispatch = {
            OpKind.WRITE: self._write, OpKind.TRUNCATE: self._truncate,
            OpKind.CREATE: self._create, OpKind.MKDIR: self._mkdir,
            OpKind.DELETE: self._delete, OpKind.RMDIR: self._rmdir,
            OpKind.RENAME: self._rename, OpKind.SETATTR: self._setattr,
            OpKind.SYMLINK: self._symlink, OpKind.HARDLINK: self._hardlink,
            OpKind.TASK: self._task, OpKind.MARK: self._mark,
        }

    @property
    def root(self) -> bytes:
        return self.target.root

    def apply(self, op: Op) -> None:
        if op.seq <= self.applied_seq:
            self.stats["skipped"] += 1        # applied before a restart
            return
        try:
            self._dispatch[op.kind](op)
        except ConfinementError as exc:
            raise ConfinementError(f"op seq {op.seq} {OpKind(op.kind).name} refused: {exc}",
                                   getattr(exc, "path", op.path)) from None
        except OSError as exc:
            raise ApplyError(f"op seq {op.seq} {OpKind(op.kind).name} {bytes(op.path)!r} "
                             f"failed on the target: {exc.strerror or exc}") from exc
        self.applied_seq = op.seq
        if self._state is not None:
            _SEQ.pack_into(self._state, 8, op.seq)
        self.stats["ops"] += 1

    def apply_all(self, ops) -> None:
        for op in ops:
            self.apply(op)

    def flush(self) -> None:
        """Close cached file descriptors (data stays in the page cache)."""
        while self._fds:
            os.close(self._fds.popitem()[1])

    def sync(self) -> None:
        """Flush written data, then the applied sequence, to stable storage."""
        for fd in self._fds.values():
            os.fsync(fd)
        self.flush()
        if self._state is not None:
            self._state.flush()

    def close(self) -> None:
        self.flush()
        if self._state is not None:
            self._state.close()
            self._state = None

    def release(self, rel: bytes) -> None:
        """Close what this applier holds open at or under ``rel`` (before
        the path is moved away from the map base)."""
        self._drop(bytes(rel), subtree=True)

    # -- helpers -----------------------------------------------------------
    def _path(self, rel) -> bytes:
        return self.target.path(bytes(rel))

    def _fd(self, rel: bytes, create_missing: bool = True) -> int:
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        path = self._path(rel)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if not create_missing:
                raise
            self.stats["repairs"] += 1
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfinementError(f"{rel!r} is a symlink on the target: not written through", rel) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ApplyError(f"{rel!r} on the target is not a regular file")
        self._fds[rel] = fd
        if len(self._fds) > _OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _drop(self, rel: bytes, subtree: bool = False) -> None:
        """Forget cached fds and verified directories at (and under) ``rel``."""
        if subtree:
            prefix = rel + b"/"
            for key in [k for k in self._fds if k == rel or k.startswith(prefix)]:
                os.close(self._fds.pop(key))
        else:
            fd = self._fds.pop(rel, None)
            if fd is not None:
                os.close(fd)
        self.target._forget(rel)

    def _clear_way(self, rel: bytes, keep_dir: bool) -> None:
        """Remove what stands at ``rel`` unless it is (not) a directory as
        wanted; the stream says the source had nothing of that kind there."""
        try:
            st = os.lstat(self._path(rel))
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode) != keep_dir:
            self.stats["repairs"] += 1
            self._drop(rel, subtree=True)
            self.target.remove(rel)

    # -- op kinds ----------------------------------------------------------
    def _write(self, op: Op) -> None:
        fd = self._fd(bytes(op.path))
        data = op.data
        n = len(data)
        done = os.pwrite(fd, data, op.offset)
        while done < n:       # short writes happen on signals and full disks
            done += os.pwrite(fd, memoryview(data)[done:], op.offset + done)
        self.stats["bytes"] += n

    def _truncate(self, op: Op) -> None:
        os.ftruncate(self._fd(bytes(op.path)), op.size)

    def _create(self, op: Op) -> None:
        rel = bytes(op.path)
        self._clear_way(rel, keep_dir=False)
        self._drop(rel)
        path = self._path(rel)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, op.mode)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            os.unlink(path)       # a symlink stood there: replace it, never follow it
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, op.mode)
        os.fchmod(fd, op.mode)    # not the umask's idea of it
        self._fds[rel] = fd

    def _mkdir(self, op: Op) -> None:
        rel = bytes(op.path)
        self._clear_way(rel, keep_dir=True)
        path = self._path(rel)
        try:
            os.mkdir(path, op.mode)
        except FileExistsError:
            pass                  # replayed
        os.chmod(path, op.mode)

    def _delete(self, op: Op) -> None:
        rel = bytes(op.path)
        self._drop(rel, subtree=True)
        path = self._path(rel)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            self.stats["repairs"] += 1
            self.target.remove(rel)

    def _rmdir(self, op: Op) -> None:
        rel = bytes(op.path)
        self._drop(rel, subtree=True)
        try:
            os.rmdir(self._path(rel))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            # the source's directory was empty: whatever is left here is
            # not part of the source
            self.stats["repairs"] += 1
            self.target.remove(rel)

    def _rename(self, op: Op) -> None:
        old, new = bytes(op.path), bytes(op.path2)
        src, dst = self._path(old), self._path(new)
        self._drop(old, subtree=True)
        self._drop(new, subtree=True)
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            if os.path.lexists(dst) and not os.path.lexists(src):
                return            # replayed: already renamed
            if not os.path.lexists(src):
                # the target lacks what the source renamed (watcher capture
                # sees changes late): nothing to move; the source's resync
                # brings the content
                self.stats["repairs"] += 1
                return
            raise
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
            # the destination was removed on the source before this rename
            self.stats["repairs"] += 1
            self.target.remove(new)
            os.rename(src, dst)

    def _setattr(self, op: Op) -> None:
        rel = bytes(op.path)
        path = self._path(rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self.stats["repairs"] += 1    # nothing there to set attributes on
            return
        is_link = stat.S_ISLNK(st.st_mode)
        mask = op.mask
        if mask & (AttrMask.UID | AttrMask.GID) and self.owner:
            os.chown(path, op.uid if mask & AttrMask.UID else -1,
                     op.gid if mask & AttrMask.GID else -1, follow_symlinks=False)
        if mask & AttrMask.MODE and not is_link:     # symlinks have no mode of their own
            os.chmod(path, op.mode)
        if mask & AttrMask.MTIME:
            os.utime(path, ns=(st.st_atime_ns, op.mtime_ns), follow_symlinks=False)

    def _symlink(self, op: Op) -> None:
        rel = bytes(op.path)
        self._clear_way(rel, keep_dir=False)
        self._drop(rel)
        try:
            # nothing there: created at its name at once (no temporary
            # name a kill could leave behind)
            os.symlink(bytes(op.path2), self._path(rel))
        except FileExistsError:
            self.target.symlink(rel, bytes(op.path2))

    def _hardlink(self, op: Op) -> None:
        rel, existing = bytes(op.path), bytes(op.path2)
        self._clear_way(rel, keep_dir=False)
        self._drop(rel)
        try:
            os.link(self._path(existing), self._path(rel), follow_symlinks=False)
        except FileExistsError:
            self.target.link(rel, existing)

    def _task(self, op: Op) -> None:
        if self.on_task is not None:
            self.flush()          # the task sees every earlier write
            self.on_task(op)

    def _mark(self, op: Op) -> None:
        if self.on_mark is not None:
            self.on_mark(op)

