"""The target side of a mirror: what the planner and executor
(:mod:`smirror.mirror.engine`) need from the tree they bring in line, as two
protocols. The engine never touches a target path itself.

Two implementations: :class:`smirror.mirror.local.LocalTarget`, a directory
of this machine, written directly; :class:`smirror.mirror.remote.RemoteTarget`,
a map base of a target daemon, read through its ``target.scan`` /
``target.signature`` verbs and written as ops into the connection's stream
(the target's applier writes them). A new kind of target implements both
protocols; the engine does not change.

Paths are relative ``bytes`` (b"" is the root); entries are
:class:`smirror.fs.tree.Entry`.
"""
from __future__ import annotations

from typing import Protocol

from smirror.fs.tree import Entry, Listing


class TargetReader(Protocol):
    """What a mirror reads of its target."""

    # its writes travel as ops in a stream (see smirror.mirror.remote): no
    # digests, no rolling delta, changed blocks written in place at any size
    streamed: bool

    def scan(self, rules=None, skip=()) -> Listing:
        """Every entry under the root (``skip``: relative paths not
        listed); temporaries of a killed mirror in ``Listing.temps``."""

    def lstat(self, rel: bytes) -> Entry | None:
        """One entry, None when missing."""

    def signature(self, rel: bytes, block_size: int, weak: bool):
        """The block signature (:class:`smirror.kernels.checksum.Signature`)
        of a file; ``weak`` also the rolling hashes a delta needs."""

    def digest(self, rel: bytes, length: int) -> bytes | None:
        """XXH3-128 of a file's content, None when its length is not ``length``."""

    def xattrs(self, rel: bytes) -> dict | None:
        """The extended attributes of ``rel`` the mirror compares (None: not
        known, e.g. a remote listing that carries none: all are sent)."""


class FileWriter(Protocol):
    """One file being written (:meth:`TargetWriter.create_temp` or
    :meth:`TargetWriter.open_inplace`): nothing counts until ``commit``;
    ``abort`` leaves the target as a later mirror can recognise."""

    def write(self, data, offset: int) -> int: ...

    def truncate(self, size: int) -> None: ...

    def commit(self, entry: Entry, xattrs: dict | None = None) -> None: ...

    def abort(self) -> None: ...


class WholeFileWriter(FileWriter, Protocol):
    """A file written whole (a new inode under its final name on commit)."""

    def copy_from(self, src_fd: int, size: int, progress=None, dense: bool = False) -> int:
        """Copy a whole source file, holes staying holes; returns data bytes."""

    def copy_old(self, offset: int, length: int, out_offset: int) -> int:
        """Copy bytes of the file now under the final name (a delta's COPY)."""


class TargetWriter(Protocol):
    """What a mirror does to its target."""

    owner: bool                 # uid/gid are set (and compared)
    bytes_written: int          # file data written so far

    def create_temp(self, rel: bytes) -> WholeFileWriter: ...

    def open_inplace(self, rel: bytes) -> FileWriter: ...

    def mkdir(self, rel: bytes, entry: Entry) -> None: ...

    def symlink(self, rel: bytes, link: bytes) -> None: ...

    def link(self, rel: bytes, existing: bytes) -> None: ...

    def mknod(self, rel: bytes, entry: Entry) -> None: ...

    def set_meta(self, rel: bytes, entry: Entry, xattrs: dict | None = None) -> None: ...

    def remove(self, rel: bytes) -> None:
        """Remove ``rel``, a directory with all it holds."""

    def rmdir(self, rel: bytes) -> None:
        """Remove the empty directory ``rel``."""

    def move_orphan(self, rel: bytes, dest_dir) -> None: ...

    def remove_temps(self, rels) -> None: ...

    def close(self) -> None: ...


class TargetSide(TargetReader, TargetWriter, Protocol):
    """A target a mirror both reads and writes."""


__all__ = ["TargetReader", "TargetWriter", "TargetSide", "FileWriter", "WholeFileWriter"]
