"""Pure-Python reference of the block-checksum kernel ``smirror.kernels._checksum``.

Same names and results as the compiled module; only the tests import it. It
defines the formats precisely:

Weak checksum of bytes b_0 .. b_{n-1} (rsync's rolling sum, no character
offset)::

    s1 = (b_0 + ... + b_{n-1})            mod 2**16
    s2 = sum((n - i) * b_i for i in 0..n-1) mod 2**16
       = (s1 after b_0) + (s1 after b_1) + ... + (s1 after b_{n-1})
    weak = s1 | (s2 << 16)

Rolling one byte forward in a window of n bytes (``weak_roll``)::

    s1' = s1 - out + in
    s2' = s2 - n * out + s1'

Strong hash: XXH3-128 (seed 0) of the block; in signatures as two uint64,
column 0 = low 64 bits, column 1 = high 64 bits; digests are the 16-byte
canonical (big-endian) form. The independent ``xxhash`` binding computes it
here, so the vendored C in the kernel is checked against another build.
"""
from __future__ import annotations

import os

import numpy as np
import xxhash

from smirror.errors import DeltaError

READ_CHUNK_SIZE = 8 * 1024 * 1024
_MASK64 = (1 << 64) - 1


def _bytes(data, what: str) -> memoryview:
    try:
        mv = memoryview(data)
    except TypeError:
        raise TypeError(f"{what}: expected a bytes-like object (bytes, bytearray, "
                        f"memoryview, mmap), got {type(data).__name__}") from None
    if not mv.c_contiguous:
        raise ValueError(f"{what}: the buffer is not C-contiguous (shape {mv.shape}, "
                         f"strides {mv.strides}); pass a contiguous copy")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def _block_size(block_size) -> int:
    if isinstance(block_size, bool) or not hasattr(block_size, "__index__"):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    block_size = block_size.__index__()
    if not 1 <= block_size <= 1 << 40:
        raise ValueError(f"block_size must be between 1 and 2**40, got {block_size}")
    return block_size


def _weak_sums(block) -> tuple[int, int]:
    s1 = s2 = 0
    for byte in block:
        s1 += byte
        s2 += s1
    return s1 & 0xFFFF, s2 & 0xFFFF


def weak_checksum(data) -> int:
    """Weak 32-bit checksum of a whole buffer: s1 | s2 << 16."""
    s1, s2 = _weak_sums(_bytes(data, "weak_checksum"))
    return s1 | (s2 << 16)


def weak_roll(weak: int, out_byte: int, in_byte: int, length: int) -> int:
    """Roll the weak checksum of a ``length``-byte window one byte forward."""
    if not (0 <= out_byte <= 255 and 0 <= in_byte <= 255):
        raise ValueError(f"bytes must be 0..255, got {out_byte}, {in_byte}")
    s1 = ((weak & 0xFFFF) - out_byte + in_byte) & 0xFFFF
    s2 = ((weak >> 16) - length * out_byte + s1) & 0xFFFF
    return s1 | (s2 << 16)


def _strong_pair(block) -> tuple[int, int]:
    value = xxhash.xxh3_128_intdigest(block)
    return value & _MASK64, value >> 64


def strong_digest(data) -> bytes:
    """XXH3-128 of a whole buffer, 16 bytes canonical (big-endian)."""
    return xxhash.xxh3_128(_bytes(data, "strong_digest")).digest()


class StreamDigest:
    """XXH3-128 of a stream fed in pieces; equals strong_digest of their
    concatenation."""

    def __init__(self):
        self._state = xxhash.xxh3_128()

    def update(self, data):
        self._state.update(_bytes(data, "StreamDigest.update"))

    def digest(self) -> bytes:
        return self._state.digest()


def block_signature(data, block_size, with_weak):
    """(weak uint32 (n,) or None, strong uint64 (n, 2)), n = ceil(len / block_size)."""
    mv = _bytes(data, "block_signature")
    bs = _block_size(block_size)
    count = -(-len(mv) // bs)
    strong = np.empty((count, 2), dtype=np.uint64)
    weak = np.empty(count, dtype=np.uint32) if with_weak else None
    for i in range(count):
        block = mv[i * bs:(i + 1) * bs]
        strong[i] = _strong_pair(block)
        if weak is not None:
            weak[i] = weak_checksum(block)
    return weak, strong


def _pread(fd: int, size: int, offset: int) -> bytes:
    try:
        return os.pread(fd, size, offset)
    except OSError as exc:
        raise OSError(exc.errno, f"reading fd {fd} at byte {offset}: "
                                 f"{exc.strerror}") from None


def _read_exactly(fd: int, length: int, start: int = 0) -> bytes:
    parts = []
    offset = start
    length += start
    while offset < length:
        piece = _pread(fd, min(READ_CHUNK_SIZE, length - offset), offset)
        if not piece:
            raise DeltaError(f"file (fd {fd}) ended at byte {offset} while its signature "
                             f"needs {length} B: it was truncated meanwhile")
        parts.append(piece)
        offset += len(piece)
    return b"".join(parts)


def fd_signature(fd, length, block_size, with_weak, start=0):
    """Signature of the ``length`` bytes of an open file from offset ``start`` on."""
    if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
        raise ValueError(f"fd must be an open file descriptor (int >= 0), got {fd!r}")
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0, got {length!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    bs = _block_size(block_size)
    return block_signature(_read_exactly(fd, length, start), bs, with_weak)


def fd_digest(fd) -> bytes:
    """XXH3-128 of a whole open file, from offset 0 to its end."""
    if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
        raise ValueError(f"fd must be an open file descriptor (int >= 0), got {fd!r}")
    state = xxhash.xxh3_128()
    offset = 0
    while True:
        piece = _pread(fd, READ_CHUNK_SIZE, offset)
        if not piece:
            return state.digest()
        state.update(piece)
        offset += len(piece)


def delta_ops(src, block_size, target_length, weak, strong):
    """Rolling delta of ``src`` against a target signature; merged ops
    (0, target_offset, length) and (1, source_offset, length).

    The search: full target blocks go into a table weak -> block indexes
    (ascending, a block equal to an earlier one in weak and strong left out).
    At each source position the window's weak sum is looked up; the strong
    hash is computed only on a weak hit. After a match of block i, block i+1
    is tried first at the next position (an unchanged run costs one weak and
    one strong per block). On a miss the window rolls one byte. The target's
    short last block is tried only at the source's very end."""
    mv = _bytes(src, "delta_ops source")
    bs = _block_size(block_size)
    if not isinstance(target_length, int) or target_length < 0:
        raise ValueError(f"target_length must be an int >= 0, got {target_length!r}")
    weak = np.asarray(weak)
    strong = np.asarray(strong)
    count = -(-target_length // bs)
    if weak.dtype != np.uint32 or strong.dtype != np.uint64:
        raise DeltaError(f"signature arrays must be uint32 weak and uint64 strong, got "
                         f"{weak.dtype} and {strong.dtype}")
    if weak.shape != (count,) or strong.shape != (count, 2):
        raise DeltaError(f"a target of {target_length} B in {bs} B blocks has {count} blocks, "
                         f"but the signature has weak {weak.shape} and strong {strong.shape}")
    weak_list = [int(x) for x in weak]
    strong_list = [(int(a), int(b)) for a, b in strong]
    full, tail_len = divmod(target_length, bs)
    src_len = len(mv)

    table: dict[int, list[int]] = {}
    for j in range(full):
        bucket = table.setdefault(weak_list[j], [])
        if all(strong_list[i] != strong_list[j] for i in bucket):
            bucket.append(j)

    ops: list[list[int]] = []

    def emit(kind, offset, length):
        if length <= 0:
            return
        if ops and ops[-1][0] == kind and ops[-1][1] + ops[-1][2] == offset:
            ops[-1][2] += length
        else:
            ops.append([kind, offset, length])

    pos = lit_start = 0
    prev = -1
    w = None
    if full:
        while pos + bs <= src_len:
            if w is None:
                w = weak_checksum(mv[pos:pos + bs])
            matched = -1
            nxt = prev + 1
            if prev >= 0 and nxt < full and weak_list[nxt] == w and \
                    _strong_pair(mv[pos:pos + bs]) == strong_list[nxt]:
                matched = nxt
            else:
                candidates = table.get(w)
                if candidates:
                    pair = _strong_pair(mv[pos:pos + bs])
                    for idx in candidates:
                        if strong_list[idx] == pair:
                            matched = idx
                            break
            if matched >= 0:
                emit(1, lit_start, pos - lit_start)
                emit(0, matched * bs, bs)
                pos += bs
                lit_start = pos
                prev = matched
                w = None
                continue
            prev = -1
            if pos + bs >= src_len:
                break
            w = weak_roll(w, mv[pos], mv[pos + bs], bs)
            pos += 1

    if tail_len and src_len >= tail_len and src_len - tail_len >= lit_start:
        pos = src_len - tail_len
        tail = mv[pos:]
        if weak_checksum(tail) == weak_list[full] and _strong_pair(tail) == strong_list[full]:
            emit(1, lit_start, pos - lit_start)
            emit(0, full * bs, tail_len)
            lit_start = src_len
    emit(1, lit_start, src_len - lit_start)
    return [tuple(op) for op in ops]
