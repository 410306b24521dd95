"""Pure-Python reference of the journal frame kernel (``smirror.kernels._journal``).

Same names and behaviour as the compiled module; only the tests import it.

Frame format, version 1 (all integers little-endian)
====================================================

A frame is a 56-byte header followed by the payload as stored::

    off size field
      0    4 magic            b"SMJF"
      4    1 version          1
      5    1 flags            bit 0: payload is an lz4 block (no size
                              prefix); every other bit must be 0
      6    2 reserved         0
      8    4 op count         >= 1
     12    4 stored length    payload bytes following the header
     16    4 raw length       payload bytes after decompression
                              (== stored length when not compressed)
     20    4 reserved         0
     24    8 first seq        seq of the first op
     32    8 last seq         seq of the last op
     40    8 payload check    XXH3-64 (seed 0) of the stored payload
     48    8 header check     XXH3-64 (seed 0) of bytes 0..48

The header check covers the payload check, so together they are one
checksum over header and payload, and a reader can validate the header
(lengths included) before it has the payload. Limits: stored and raw length
<= 1 GiB; a compressed payload declares raw <= 256 x stored (lz4 never
expands more than ~255x), so a declared size can never make us allocate
more than the frame justifies; an uncompressed one has raw == stored.

The raw payload is ``op count`` records back to back, nothing after them::

    off size field
      0    1 kind             OpKind (1..14)
      1    1 mask             SETATTR: AttrMask bits (1..15); XATTR:
                              XattrFlag (0 or 1); else 0
      2    2 path length      <= 65535
      4    2 path2 length
      6    4 data length
     10    8 seq              strictly increasing within a frame; the first
                              equals the header's first seq, the last its
                              last seq
     18      kind-specific fixed fields:
               WRITE     u64 offset            (< 2**63)
               TRUNCATE  u64 size              (< 2**63)
               CREATE    u32 mode              (<= 0o7777)
               MKDIR     u32 mode
               SETATTR   u32 mode, u32 uid, u32 gid, i64 mtime_ns
                         (fields the mask does not name are 0)
               MKNOD     u32 mode (type | permission bits), u64 rdev
               others    nothing
           path bytes, path2 bytes, data bytes

Field rules (paths, names, ids, ranges, payload sizes): see :mod:`smirror.ops`. path2 is non-empty
exactly for RENAME, SYMLINK, HARDLINK and XATTR (the attribute's name); data
may be non-empty only for WRITE, TASK, MARK and XATTR (not a removal).

Compression (``compress`` argument of :func:`encode_frame`): ``False`` never,
``True`` always, ``'auto'`` when the raw payload is at least 512 bytes and
lz4 saves at least 10% (compressed <= raw - raw // 10); above 64 KiB, 'auto'
first compresses the payload's first 64 KiB and gives up unless that sample
saves 10% too, so incompressible data costs one small lz4 pass, not a whole
one. lz4 runs in its default mode, acceleration 1, so both implementations
produce the same bytes.

Errors: a malformed frame raises :class:`smirror.errors.FrameError` with the
byte offset in the buffer given (for a compressed payload, offsets past the
header point at the payload start and the message names the byte in the
decompressed payload). Bad ops handed to the encoder raise ``TypeError`` or
``ValueError`` naming the op index and seq.
"""
from __future__ import annotations

import struct

import lz4.block
import xxhash

from smirror.errors import FrameError
from smirror.ops import (
    AUTO_COMPRESS_MIN,
    AUTO_SAMPLE,
    FLAG_LZ4,
    HEADER_SIZE,
    LZ4_MAX_RATIO,
    MAGIC,
    MAX_ID,
    MAX_LABEL,
    MAX_MARK_PAYLOAD,
    MAX_MODE,
    MAX_OFFSET,
    MAX_PATH,
    MAX_PAYLOAD,
    MAX_SEQ,
    MAX_TASK_PAYLOAD,
    MAX_TREE_PATH,
    MAX_XATTR_NAME,
    MAX_XATTR_VALUE,
    MKNOD_TYPES,
    NAME_MAX,
    RECORD_HEAD_SIZE,
    VERSION,
    XATTR_NAMESPACES,
    AttrMask,
    FrameHeader,
    Op,
    OpKind,
    RenameFlag,
    XattrFlag,
)

__all__ = ["encode_frame", "decode_frame", "frame_header", "Encoder"]

_HEADER = struct.Struct("<4sBBHIIIIQQQQ")
_HEADER_CHECKED = 48                       # bytes covered by the header check
_HEAD = struct.Struct("<BBHHIQ")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_SETATTR = struct.Struct("<IIIq")
_MKNOD = struct.Struct("<IQ")
assert _HEADER.size == HEADER_SIZE and _HEAD.size == RECORD_HEAD_SIZE

_KINDS = {k.value: k for k in OpKind}
_FIXED_SIZE = {OpKind.WRITE: 8, OpKind.TRUNCATE: 8, OpKind.CREATE: 4,
               OpKind.MKDIR: 4, OpKind.SETATTR: 20, OpKind.MKNOD: 12}
_TREE_PATH2 = (OpKind.RENAME, OpKind.HARDLINK)
_HAS_PATH2 = (OpKind.RENAME, OpKind.SYMLINK, OpKind.HARDLINK, OpKind.XATTR)
_HAS_DATA = (OpKind.WRITE, OpKind.TASK, OpKind.MARK, OpKind.XATTR)
_TYPE_BITS = 0o170000
_NOT_A_DEVICE = (0o010000, 0o140000)      # fifo, socket: no device number
_MASK_ALL = int(AttrMask.MODE | AttrMask.UID | AttrMask.GID | AttrMask.MTIME)
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_U32_MAX = (1 << 32) - 1


def _xxh3(*parts) -> int:
    h = xxhash.xxh3_64()
    for p in parts:
        h.update(p)
    return h.intdigest()


# -- path rules (shared by encoder and decoder: returns a reason or None) --

_PAYLOAD_LIMIT = {OpKind.TASK: MAX_TASK_PAYLOAD, OpKind.MARK: MAX_MARK_PAYLOAD,
                  OpKind.XATTR: MAX_XATTR_VALUE}


def _xattr_name_problem(p: bytes) -> str | None:
    if not p:
        return "is empty"
    if b"\0" in p:
        return "contains a NUL byte"
    if len(p) > MAX_XATTR_NAME:
        return f"is longer than {MAX_XATTR_NAME} bytes (XATTR_NAME_MAX)"
    if not any(p.startswith(ns) and len(p) > len(ns) for ns in XATTR_NAMESPACES):
        return "is not a name in the user., trusted., security. or system. namespace"
    return None


def _mknod_problem(mode: int, rdev: int) -> str | None:
    """Why ``mode``/``rdev`` cannot be a MKNOD's (a u32 mode, u64 rdev)."""
    if mode & _TYPE_BITS not in MKNOD_TYPES or mode & ~_TYPE_BITS > MAX_MODE:
        return (f"mknod mode 0o{mode:o} is not a fifo, socket or device type "
                f"with permission bits <= 0o7777")
    if rdev and mode & _TYPE_BITS in _NOT_A_DEVICE:
        return f"mknod of a fifo or socket has device number {rdev}, not 0"
    return None


def _path_problem(kind: OpKind, p: bytes, second: bool) -> str | None:
    """Why ``p`` is not acceptable as path (second=False) or path2 of ``kind``."""
    if second:
        if kind not in _HAS_PATH2:
            return "must be empty for this kind" if p else None
        if kind is OpKind.XATTR:
            return _xattr_name_problem(p)
        tree = kind in _TREE_PATH2
    else:
        tree = kind not in (OpKind.TASK, OpKind.MARK)
    if b"\0" in p:
        return "contains a NUL byte"
    if not p:
        return None if kind is OpKind.MARK and not second else "is empty"
    label = not second and not tree            # a task name, a mark label
    if len(p) > (MAX_LABEL if label else MAX_TREE_PATH):
        return (f"is longer than {MAX_LABEL} bytes" if label
                else f"is longer than {MAX_TREE_PATH} bytes (PATH_MAX)")
    if tree:
        if p[:1] == b"/":
            return "is absolute"
        names = p.split(b"/")
        if b".." in names:
            return "has a '..' component"
        if b"." in names:
            return "has a '.' component"
        if b"" in names:
            return "has an empty component ('//' or a trailing '/')"
        if any(len(n) > NAME_MAX for n in names):
            return f"has a name longer than {NAME_MAX} bytes (NAME_MAX)"
    return None


# -- encoder ---------------------------------------------------------------

def _bad(i, op, message, exc=ValueError):
    seq = op[0] if isinstance(op, tuple) and op else "?"
    return exc(f"op {i} (seq {seq}): {message}")


def _check_int(i, op, name, value, lo, hi):
    if not isinstance(value, int):
        raise _bad(i, op, f"{name} must be an int, not {type(value).__name__}", TypeError)
    if not lo <= value <= hi:
        raise _bad(i, op, f"{name} {value} out of range {lo}..{hi}")
    return value


def _encode_op(i, op, prev_seq, out):
    if not isinstance(op, tuple) or len(op) != 12:
        raise _bad(i, op, "is not an Op (a 12-field tuple)", TypeError)
    seq, kind, path, path2, offset, size, mode, uid, gid, mtime_ns, mask, data = op
    _check_int(i, op, "seq", seq, 0, MAX_SEQ)
    if prev_seq is not None and seq <= prev_seq:
        raise _bad(i, op, f"seq must be greater than the previous op's seq {prev_seq}")
    if not isinstance(kind, int) or kind not in _KINDS:
        raise _bad(i, op, f"unknown op kind {kind!r}")
    kind = _KINDS[kind]
    for name, p, second in (("path", path, False), ("path2", path2, True)):
        if not isinstance(p, bytes):
            raise _bad(i, op, f"{name} must be bytes, not {type(p).__name__}", TypeError)
        if len(p) > MAX_PATH:
            raise _bad(i, op, f"{name} is {len(p)} bytes long, the limit is {MAX_PATH}")
        problem = _path_problem(kind, p, second)
        if problem:
            raise _bad(i, op, f"{kind.name.lower()} {name} {p!r} {problem}")
    try:
        data_view = memoryview(data)
    except TypeError:
        raise _bad(i, op, f"data must be bytes-like, not {type(data).__name__}",
                   TypeError) from None
    if not data_view.c_contiguous:
        raise _bad(i, op, "data must be a contiguous buffer", TypeError)
    data_len = data_view.nbytes
    if data_len and kind not in _HAS_DATA:
        raise _bad(i, op, f"data must be empty for {kind.name.lower()} ops")
    if data_len > MAX_PAYLOAD:
        raise _bad(i, op, f"data is {data_len} bytes, the frame limit is {MAX_PAYLOAD}")
    if data_len > _PAYLOAD_LIMIT.get(kind, MAX_PAYLOAD):
        raise _bad(i, op, f"{kind.name.lower()} payload is {data_len} bytes, the limit is "
                          f"{_PAYLOAD_LIMIT[kind]}")

    # unused fields must keep their default so that a round trip is exact
    used = {OpKind.WRITE: ("offset",), OpKind.TRUNCATE: ("size",),
            OpKind.CREATE: ("mode",), OpKind.MKDIR: ("mode",),
            OpKind.SETATTR: ("mode", "uid", "gid", "mtime_ns", "mask"),
            OpKind.XATTR: ("mask",), OpKind.RENAME: ("mask",),
            OpKind.MKNOD: ("mode", "size")}.get(kind, ())
    values = {"offset": offset, "size": size, "mode": mode, "uid": uid, "gid": gid,
              "mtime_ns": mtime_ns, "mask": mask}
    for name in ("offset", "size", "mode", "uid", "gid", "mtime_ns", "mask"):
        v = values[name]
        if name not in used:
            if not isinstance(v, int) or v != 0:
                raise _bad(i, op, f"{name} is not used by {kind.name.lower()} ops "
                                  f"and must be 0, got {v!r}")
    fixed = b""
    if kind is OpKind.WRITE:
        fixed = _U64.pack(_check_int(i, op, "offset", offset, 0, MAX_OFFSET))
        if offset + data_len > MAX_OFFSET:
            raise _bad(i, op, f"write offset {offset} + {data_len} bytes ends past 2**63-1")
    elif kind is OpKind.TRUNCATE:
        fixed = _U64.pack(_check_int(i, op, "size", size, 0, MAX_OFFSET))
    elif kind in (OpKind.CREATE, OpKind.MKDIR):
        fixed = _U32.pack(_check_int(i, op, "mode", mode, 0, MAX_MODE))
    elif kind is OpKind.SETATTR:
        _check_int(i, op, "mask", mask, 1, _MASK_ALL)
        _check_int(i, op, "mode", mode, 0, MAX_MODE)
        _check_int(i, op, "uid", uid, 0, MAX_ID)
        _check_int(i, op, "gid", gid, 0, MAX_ID)
        _check_int(i, op, "mtime_ns", mtime_ns, _INT64_MIN, _INT64_MAX)
        for bit, name, v in ((AttrMask.MODE, "mode", mode), (AttrMask.UID, "uid", uid),
                             (AttrMask.GID, "gid", gid), (AttrMask.MTIME, "mtime_ns", mtime_ns)):
            if not mask & bit and v:
                raise _bad(i, op, f"{name} is {v} but the setattr mask does not set it")
        fixed = _SETATTR.pack(mode, uid, gid, mtime_ns)
    elif kind is OpKind.XATTR:
        _check_int(i, op, "mask", mask, 0, int(XattrFlag.REMOVE))
        if mask and data_len:
            raise _bad(i, op, "an xattr removal carries no value")
    elif kind is OpKind.RENAME:
        _check_int(i, op, "mask", mask, 0, int(RenameFlag.EXCHANGE))
    elif kind is OpKind.MKNOD:
        _check_int(i, op, "mode", mode, 0, _U32_MAX)
        _check_int(i, op, "size", size, 0, MAX_SEQ)
        problem = _mknod_problem(mode, size)
        if problem:
            raise _bad(i, op, problem)
        fixed = _MKNOD.pack(mode, size)
    out += _HEAD.pack(kind, mask if kind in (OpKind.SETATTR, OpKind.XATTR, OpKind.RENAME) else 0,
                      len(path), len(path2), data_len, seq)
    out += fixed
    out += path
    out += path2
    out += data_view.cast("B") if data_len else b""
    return seq


def _compress_mode(compress):
    if compress is True or compress is False or compress == "auto":
        return compress
    raise ValueError(f"compress must be True, False or 'auto', got {compress!r}")


def encode_frame(ops, compress="auto") -> bytes:
    """Encode a non-empty sequence of ops (strictly increasing seqs) into one
    frame; returns the frame bytes."""
    compress = _compress_mode(compress)
    ops = list(ops)
    if not ops:
        raise ValueError("a frame needs at least one op")
    if len(ops) > _U32_MAX:
        raise ValueError(f"{len(ops)} ops do not fit one frame")
    raw = bytearray()
    prev = None
    for i, op in enumerate(ops):
        prev = _encode_op(i, op, prev, raw)
        if len(raw) > MAX_PAYLOAD:
            raise ValueError(f"frame payload exceeds {MAX_PAYLOAD} bytes at op {i}; "
                             f"split the batch")
    stored, flags = raw, 0
    if compress is True:
        stored, flags = lz4.block.compress(raw, store_size=False), FLAG_LZ4
    elif compress == "auto" and len(raw) >= AUTO_COMPRESS_MIN:
        worth = True
        if len(raw) > AUTO_SAMPLE:      # don't spend a whole lz4 pass on noise
            sample = lz4.block.compress(raw[:AUTO_SAMPLE], store_size=False)
            worth = len(sample) <= AUTO_SAMPLE - AUTO_SAMPLE // 10
        if worth:
            packed = lz4.block.compress(raw, store_size=False)
            if len(packed) <= len(raw) - len(raw) // 10:
                stored, flags = packed, FLAG_LZ4
    payload_check = _xxh3(stored)
    head = _HEADER.pack(MAGIC, VERSION, flags, 0, len(ops), len(stored), len(raw), 0,
                        ops[0][0], ops[-1][0], payload_check, 0)
    header_check = _xxh3(head[:_HEADER_CHECKED])
    return head[:_HEADER_CHECKED] + _U64.pack(header_check) + bytes(stored)


class Encoder:
    """Same interface as the compiled ``Encoder`` (which reuses its buffers
    between calls); here it simply calls :func:`encode_frame`."""

    def __init__(self, compress="auto"):
        self.compress = _compress_mode(compress)

    def encode(self, ops, compress=None) -> bytes:
        return encode_frame(ops, self.compress if compress is None else compress)


# -- decoder ---------------------------------------------------------------

def _view(buf) -> memoryview:
    try:
        mv = memoryview(buf)
    except TypeError:
        raise TypeError(f"expected a bytes-like buffer, not {type(buf).__name__}") from None
    if not mv.c_contiguous:
        raise TypeError("buffer must be contiguous")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _header(mv: memoryview, offset: int) -> FrameHeader:
    have = len(mv) - offset
    if have < HEADER_SIZE:
        raise FrameError(f"truncated frame header: need {HEADER_SIZE} bytes, "
                         f"have {max(have, 0)}", offset)
    (magic, version, flags, res16, count, stored_len, raw_len, res32, first_seq,
     last_seq, payload_check, header_check) = _HEADER.unpack_from(mv, offset)
    if magic != MAGIC:
        raise FrameError(f"bad frame magic {bytes(magic)!r}, expected {MAGIC!r}", offset)
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version} (this build reads "
                         f"version {VERSION})", offset + 4)
    if _xxh3(mv[offset:offset + _HEADER_CHECKED]) != header_check:
        raise FrameError("frame header checksum mismatch", offset + _HEADER_CHECKED)
    if flags & ~FLAG_LZ4:
        raise FrameError(f"unknown frame flags 0x{flags:02x}", offset + 5)
    if res16 or res32:
        raise FrameError("reserved frame header bytes are not zero",
                         offset + (6 if res16 else 20))
    if count == 0:
        raise FrameError("frame holds no ops", offset + 8)
    if stored_len > MAX_PAYLOAD or raw_len > MAX_PAYLOAD:
        raise FrameError(f"frame payload length {max(stored_len, raw_len)} exceeds "
                         f"the limit {MAX_PAYLOAD}", offset + 12)
    if flags & FLAG_LZ4:
        if stored_len == 0 or raw_len > stored_len * LZ4_MAX_RATIO:
            raise FrameError(f"compressed payload of {stored_len} bytes cannot expand "
                             f"to the declared {raw_len} bytes", offset + 16)
    elif stored_len != raw_len:
        raise FrameError(f"uncompressed payload: stored length {stored_len} differs "
                         f"from raw length {raw_len}", offset + 16)
    if raw_len < count * RECORD_HEAD_SIZE:
        raise FrameError(f"raw payload of {raw_len} bytes cannot hold {count} ops",
                         offset + 8)
    if last_seq < first_seq or last_seq - first_seq < count - 1:
        raise FrameError(f"seq range {first_seq}..{last_seq} cannot hold {count} "
                         f"strictly increasing ops", offset + 24)
    return FrameHeader(version, flags, count, first_seq, last_seq, stored_len, raw_len,
                       HEADER_SIZE + stored_len)


def frame_header(buf, offset: int = 0) -> FrameHeader:
    """Validate the header of the frame at ``offset`` (needs HEADER_SIZE bytes,
    not the payload) and return it; ``frame_len`` is the whole frame's size."""
    mv = _view(buf)
    if offset < 0 or offset > len(mv):
        raise ValueError(f"offset {offset} outside the buffer of {len(mv)} bytes")
    return _header(mv, offset)


def _path_error(kind, name, problem, where, at):
    return FrameError(f"{kind.name.lower()} op {name} {problem}{where(at)}", at)


def decode_frame(buf, offset: int = 0, *, check_payload: bool = True):
    """Decode the frame at ``offset`` of ``buf``; returns ``(ops, frame_len)``
    (the next frame of a stream starts at ``offset + frame_len``).
    ``check_payload=False`` skips only the payload checksum."""
    mv = _view(buf)
    if offset < 0 or offset > len(mv):
        raise ValueError(f"offset {offset} outside the buffer of {len(mv)} bytes")
    h = _header(mv, offset)
    start = offset + HEADER_SIZE
    have = len(mv) - start
    if have < h.stored_len:
        raise FrameError(f"truncated frame: header declares {h.stored_len} payload "
                         f"bytes, buffer holds {have}", start + have)
    stored = mv[start:start + h.stored_len]
    payload_check = _U64.unpack_from(mv, offset + 40)[0]
    if check_payload and _xxh3(stored) != payload_check:
        raise FrameError("frame payload checksum mismatch", start)
    if h.flags & FLAG_LZ4:
        try:
            raw = lz4.block.decompress(stored, uncompressed_size=h.raw_len)
        except Exception as exc:  # noqa: BLE001 - lz4.block.LZ4BlockError is not exported
            raise FrameError(f"lz4 payload does not decompress to the declared "
                             f"{h.raw_len} bytes: {exc}", start) from None
        if len(raw) != h.raw_len:
            raise FrameError(f"lz4 payload decompressed to {len(raw)} bytes, header "
                             f"declares {h.raw_len}", start)
        raw = memoryview(raw)
        base = 0

        def where(p):
            return f" (decompressed payload byte {p})"

        def at(p):
            return start
    else:
        raw, base = mv, start

        def where(p):
            return ""

        def at(p):
            return p

    end = base + h.raw_len
    ops = []
    pos = base
    prev = None
    for i in range(h.count):
        if end - pos < RECORD_HEAD_SIZE:
            raise FrameError(f"op {i} record truncated{where(pos - base)}", at(pos))
        kind_b, mask, path_len, path2_len, data_len, seq = _HEAD.unpack_from(raw, pos)
        kind = _KINDS.get(kind_b)
        if kind is None:
            raise FrameError(f"op {i} (seq {seq}): unknown op kind {kind_b}{where(pos - base)}",
                             at(pos))
        who = f"op {i} (seq {seq}, {kind.name.lower()})"
        if kind is OpKind.SETATTR:
            if not 1 <= mask <= _MASK_ALL:
                raise FrameError(f"{who}: bad setattr mask 0x{mask:02x}{where(pos + 1 - base)}",
                                 at(pos + 1))
        elif kind is OpKind.XATTR:
            if mask > XattrFlag.REMOVE:
                raise FrameError(f"{who}: bad xattr flags 0x{mask:02x}{where(pos + 1 - base)}",
                                 at(pos + 1))
        elif kind is OpKind.RENAME:
            if mask > RenameFlag.EXCHANGE:
                raise FrameError(f"{who}: bad rename flags 0x{mask:02x}{where(pos + 1 - base)}",
                                 at(pos + 1))
        elif mask:
            raise FrameError(f"{who}: mask set on a {kind.name.lower()} op"
                             f"{where(pos + 1 - base)}", at(pos + 1))
        if prev is None:
            if seq != h.first_seq:
                raise FrameError(f"op 0 seq {seq} differs from the header's first seq "
                                 f"{h.first_seq}{where(pos + 10 - base)}", at(pos + 10))
        elif seq <= prev:
            raise FrameError(f"op {i} seq {seq} does not follow seq {prev}"
                             f"{where(pos + 10 - base)}", at(pos + 10))
        prev = seq
        fixed = _FIXED_SIZE.get(kind, 0)
        body = pos + RECORD_HEAD_SIZE
        need = fixed + path_len + path2_len + data_len
        if need > end - body:
            raise FrameError(f"op {i} record needs {need} bytes after its head, the "
                             f"payload has {end - body} left{where(pos + 2 - base)}",
                             at(pos + 2))
        offset_v = size = mode = uid = gid = mtime_ns = 0
        if kind is OpKind.WRITE or kind is OpKind.TRUNCATE:
            v = _U64.unpack_from(raw, body)[0]
            if v > MAX_OFFSET:
                raise FrameError(f"{who}: offset/size {v} exceeds 2**63-1"
                                 f"{where(body - base)}", at(body))
            if kind is OpKind.WRITE and v + data_len > MAX_OFFSET:
                raise FrameError(f"{who}: write offset {v} + {data_len} bytes ends past "
                                 f"2**63-1{where(body - base)}", at(body))
            if kind is OpKind.WRITE:
                offset_v = v
            else:
                size = v
        elif kind is OpKind.CREATE or kind is OpKind.MKDIR:
            mode = _U32.unpack_from(raw, body)[0]
        elif kind is OpKind.SETATTR:
            mode, uid, gid, mtime_ns = _SETATTR.unpack_from(raw, body)
            for bit, v, o in ((AttrMask.MODE, mode, 0), (AttrMask.UID, uid, 4),
                              (AttrMask.GID, gid, 8), (AttrMask.MTIME, mtime_ns, 12)):
                if not mask & bit and v:
                    raise FrameError(f"{who}: setattr field not named by the mask is "
                                     f"not 0{where(body + o - base)}", at(body + o))
            for name, v, o in (("uid", uid, 4), ("gid", gid, 8)):
                if v > MAX_ID:
                    raise FrameError(f"{who}: {name} {v} out of range 0..{MAX_ID}"
                                     f"{where(body + o - base)}", at(body + o))
        elif kind is OpKind.MKNOD:
            mode, size = _MKNOD.unpack_from(raw, body)
            problem = _mknod_problem(mode, size)
            if problem:
                raise FrameError(f"{who}: {problem}{where(body - base)}", at(body))
        if mode > MAX_MODE and kind is not OpKind.MKNOD:
            raise FrameError(f"{who}: mode 0o{mode:o} has bits beyond 0o7777"
                             f"{where(body - base)}", at(body))
        p = body + fixed
        path = bytes(raw[p:p + path_len])
        problem = _path_problem(kind, path, False)
        if problem:
            raise FrameError(f"{who}: path {problem}{where(p - base)}", at(p))
        p += path_len
        path2 = bytes(raw[p:p + path2_len])
        problem = _path_problem(kind, path2, True)
        if problem:
            raise FrameError(f"{who}: path2 {problem}{where(p - base)}", at(p))
        p += path2_len
        if kind in _HAS_DATA:
            if mask and data_len:          # an xattr removal
                raise FrameError(f"{who}: an xattr removal carries a value"
                                 f"{where(pos + 6 - base)}", at(pos + 6))
            if data_len > _PAYLOAD_LIMIT.get(kind, MAX_PAYLOAD):
                raise FrameError(f"{who}: payload is {data_len} bytes, the limit is "
                                 f"{_PAYLOAD_LIMIT[kind]}{where(pos + 6 - base)}", at(pos + 6))
            data = raw[p:p + data_len]
        elif data_len:
            raise FrameError(f"{who}: data on a {kind.name.lower()} op"
                             f"{where(pos + 6 - base)}", at(pos + 6))
        else:
            data = b""
        pos = p + data_len
        ops.append(Op(seq, kind, path, path2, offset_v, size, mode, uid, gid, mtime_ns,
                      mask, data))
    if pos != end:
        raise FrameError(f"{end - pos} stray bytes after the last op{where(pos - base)}",
                         at(pos))
    if prev != h.last_seq:
        raise FrameError(f"last op seq {prev} differs from the header's last seq "
                         f"{h.last_seq}", offset + 32)
    return ops, h.frame_len
