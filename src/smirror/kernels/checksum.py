"""Block checksums: signatures, aligned compare, rolling delta, digests.

This is the thin public face of the compiled kernel ``smirror.kernels._checksum``
(its pure-Python reference, with the same names, is used only by the tests).

Vocabulary
----------
* weak checksum: rsync-style rolling 32-bit sum of a block (``s1 | s2 << 16``),
  cheap to roll one byte at a time; it only nominates candidates.
* strong hash: XXH3-128 of a block, stored as two uint64 (low, high).
* signature: per block of ``block_size`` bytes (the last one may be short) the
  weak checksum and the strong hash, as numpy arrays.
* delta: instructions that rebuild the source from the target's blocks plus
  literal source bytes: ``(COPY, target_offset, length)`` and
  ``(LITERAL, source_offset, length)``.

numpy is imported only by the calls that make or compare signatures (it
costs ~0.1 s to load): digests and deltas of a run that needs no signature
never load it.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from smirror.errors import DeltaError
from smirror.kernels import _checksum as _k

if TYPE_CHECKING:   # annotations only; at run time numpy loads on first use
    import numpy as np

COPY = 0
LITERAL = 1

MIN_BLOCK = 4 * 1024
MAX_BLOCK = 64 * 1024 * 1024
TARGET_BLOCKS = 1 << 17   # ~128 Ki blocks: 1 GiB -> 8 KiB blocks, 4 TiB -> 32 MiB


def block_size_for(length: int) -> int:
    """Block size for a file of ``length`` bytes: a power of two giving about
    ``TARGET_BLOCKS`` blocks, at least 4 KiB. No 128 KiB cap: a multi-TB file
    gets large blocks instead of a signature of millions of entries."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    want = max(MIN_BLOCK, -(-length // TARGET_BLOCKS))
    size = 1 << (want - 1).bit_length()
    return min(size, MAX_BLOCK)


def check_block_size(block_size: int) -> int:
    """Validate a user-given block size; returns it or raises ValueError."""
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise ValueError(f"block size must be an integer, got {block_size!r}")
    if not 64 <= block_size <= 1 << 31:
        raise ValueError(f"block size must be between 64 B and 2 GiB, got {block_size}")
    return block_size


class Signature:
    """Block signature of ``length`` bytes cut in blocks of ``block_size``:
    ``strong`` uint64 (count, 2), ``weak`` uint32 (count,) or None if not
    computed. Read-only once made. (A plain class: dataclasses would import
    inspect, ~6 ms more start-up for every checksum run.)"""
    __slots__ = ("block_size", "length", "strong", "weak", "count")
    block_size: int
    length: int
    strong: np.ndarray
    weak: np.ndarray | None
    count: int

    def __init__(self, block_size: int, length: int, strong: np.ndarray,
                 weak: np.ndarray | None = None):
        expect = -(-length // block_size)
        if len(strong) != expect or (weak is not None and len(weak) != expect):
            raise DeltaError(f"signature of {length} B in {block_size} B blocks "
                             f"must have {expect} entries, has {len(strong)}")
        for name, value in (("block_size", block_size), ("length", length),
                            ("strong", strong), ("weak", weak), ("count", len(strong))):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"Signature is read-only: cannot set {name!r}")

    def __delattr__(self, name):
        raise AttributeError(f"Signature is read-only: cannot delete {name!r}")

    def __repr__(self):
        return (f"Signature(block_size={self.block_size}, length={self.length}, "
                f"count={self.count}, weak={'yes' if self.weak is not None else 'no'})")

    def block_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of block ``index``."""
        off = index * self.block_size
        return off, min(self.block_size, self.length - off)


def weak_checksum(data) -> int:
    """Weak 32-bit rolling checksum of a whole buffer."""
    return _k.weak_checksum(data)


def strong_digest(data) -> bytes:
    """XXH3-128 of a whole buffer, 16 bytes (canonical, big-endian)."""
    return _k.strong_digest(data)


StreamDigest = _k.StreamDigest
"""XXH3-128 fed in pieces: ``d = StreamDigest(); d.update(buf); d.digest()``
equals :func:`strong_digest` of the pieces joined (16 bytes)."""


def file_digest(path) -> bytes:
    """XXH3-128 of a whole file, read in large chunks with the GIL released."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _k.fd_digest(fd)
    finally:
        os.close(fd)


def signature(data, block_size: int | None = None, weak: bool = True) -> Signature:
    """Signature of any contiguous buffer (bytes, bytearray, memoryview, mmap)."""
    length = memoryview(data).nbytes
    bs = block_size_for(length) if block_size is None else check_block_size(block_size)
    w, s = _k.block_signature(data, bs, weak)
    return Signature(bs, length, s, w)


def file_signature(path, block_size: int | None = None, weak: bool = True) -> Signature:
    """Signature of a file, read with large preads into one reused buffer."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return fd_signature(fd, None, block_size, weak)
    except DeltaError as exc:
        raise DeltaError(f"{os.fsdecode(path)}: {exc}") from None
    finally:
        os.close(fd)


def fd_signature(fd: int, length: int | None = None, block_size: int | None = None,
                 weak: bool = True, start: int = 0) -> Signature:
    """Signature of the ``length`` bytes (default: the rest of its size now)
    of an open file from offset ``start`` on; the file position is not used
    or moved. A reader thread preads
    ahead into one reused buffer while the blocks are hashed, GIL released.
    Raises DeltaError if the file ends before ``length`` (truncated
    meanwhile), OSError if it cannot be read."""
    if length is None:
        length = max(0, os.fstat(fd).st_size - start)
    bs = block_size_for(length) if block_size is None else check_block_size(block_size)
    w, s = _k.fd_signature(fd, length, bs, weak, start)
    return Signature(bs, length, s, w)


def fd_digest(fd: int) -> bytes:
    """XXH3-128 of a whole open file (offset 0 to its end), 16 bytes."""
    return _k.fd_digest(fd)


def changed_blocks(old: Signature, new: Signature) -> np.ndarray:
    """Indexes (int64, ascending) of blocks whose strong hash differs between
    two signatures of the same block size, compared position by position.
    Blocks present in only one of them count as changed."""
    if old.block_size != new.block_size:
        raise DeltaError(f"block sizes differ: {old.block_size} vs {new.block_size}")
    import numpy as np
    n = min(old.count, new.count)
    diff = np.flatnonzero(np.any(old.strong[:n] != new.strong[:n], axis=1))
    # a short last block hashes its own length in, so no special case is needed
    extra = np.arange(n, max(old.count, new.count), dtype=np.int64)
    return np.concatenate([diff.astype(np.int64), extra])


class Delta:
    """Instructions rebuilding ``source`` from a target that has ``sig``:
    ``ops`` [(COPY, target_offset, length) | (LITERAL, source_offset, length)],
    ``source`` the bytes literals are taken from, ``length`` of the rebuilt file."""
    __slots__ = ("ops", "source", "length")

    def __init__(self, ops: list, source: memoryview, length: int):
        self.ops = ops
        self.source = source
        self.length = length

    def __repr__(self):
        return f"Delta({len(self.ops)} ops, length={self.length})"

    @property
    def literal_bytes(self) -> int:
        return sum(n for kind, _, n in self.ops if kind == LITERAL)

    @property
    def matched_bytes(self) -> int:
        return sum(n for kind, _, n in self.ops if kind == COPY)

    def chunks(self, target):
        """Yield the pieces of the rebuilt file in order (memoryviews)."""
        t = memoryview(target).cast("B")
        for kind, off, n in self.ops:
            if kind == COPY:
                if off + n > len(t):
                    raise DeltaError(f"delta copies target bytes {off}..{off + n} "
                                     f"but the target has {len(t)}")
                yield t[off:off + n]
            else:
                yield self.source[off:off + n]


def delta(source, sig: Signature) -> Delta:
    """Rolling delta of ``source`` against a target signature (needs weak
    checksums). Finds target blocks at any source offset, so insertions and
    deletions cost only the bytes around them. The strong hash is computed
    only on a weak hit, as rsync does."""
    if sig.weak is None:
        raise DeltaError("delta needs a signature with weak checksums")
    src = memoryview(source)
    if not src.c_contiguous:
        raise ValueError("delta: the source buffer is not C-contiguous; pass a contiguous copy")
    if src.ndim != 1 or src.format != "B":
        src = src.cast("B")
    ops = _k.delta_ops(src, sig.block_size, sig.length, sig.weak, sig.strong)
    return Delta(ops, src, len(src))


def patch(target, d: Delta) -> bytes:
    """Rebuild the source from the target bytes and a delta."""
    return b"".join(d.chunks(target))
