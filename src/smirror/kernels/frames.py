"""Journal frames: ordered, checksummed, optionally lz4-compressed batches of ops.

This is the thin public face of the compiled kernel ``smirror.kernels._journal``
(its pure-Python reference has the same names and is used only by the tests).
The byte format is documented at the top of the reference module; the op
model is :mod:`smirror.ops`.

* :func:`encode_frame` ``(ops, compress='auto') -> bytes``: one frame from a
  non-empty list of ops with strictly increasing seqs (``Encoder`` does the
  same and keeps its scratch between calls).
* :func:`decode_frame` ``(buf, offset=0) -> (ops, frame_len)``: validates
  everything (magic, version, flags, every length, both checksums, kinds,
  seq order, path syntax) and returns the ops; write/task/mark ``data`` are
  zero-copy memoryviews into ``buf``.
* :func:`frame_header` ``(buf, offset=0) -> FrameHeader``: validates the
  56-byte header alone; ``frame_len`` tells a stream reader how much to read.
* :class:`FrameReader`: reassembles frames from a byte stream that arrives in
  arbitrary pieces; :func:`iter_frames` walks a buffer of concatenated frames;
  :func:`read_frames` reads them from a binary file.

Every malformed input raises :class:`smirror.errors.FrameError` saying what is
wrong and at which byte offset.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from smirror.errors import FrameError
from smirror.kernels._journal import Encoder, decode_frame, encode_frame, frame_header
from smirror.ops import HEADER_SIZE, MAX_PAYLOAD, AttrMask, FrameHeader, Op, OpKind

__all__ = [
    "Op", "OpKind", "AttrMask", "FrameHeader", "HEADER_SIZE", "MAX_FRAME",
    "Encoder", "encode_frame", "decode_frame", "frame_header",
    "iter_frames", "read_frames", "FrameReader",
]

MAX_FRAME = HEADER_SIZE + MAX_PAYLOAD


def _relocated(exc: FrameError, base: int, context: str) -> FrameError:
    """``exc`` with its offset moved by ``base`` and ``context`` prepended."""
    msg = str(exc)
    if exc.offset is not None:
        suffix = f" (at byte offset {exc.offset})"
        if msg.endswith(suffix):
            msg = msg[:-len(suffix)]
    return FrameError(f"{context}: {msg}", None if exc.offset is None else base + exc.offset)


def iter_frames(buf, offset: int = 0) -> Iterator[list]:
    """Yield the op list of each frame in ``buf`` (frames back to back from
    ``offset`` to the end). A partial frame at the end is a FrameError."""
    end = memoryview(buf).nbytes
    while offset < end:
        ops, frame_len = decode_frame(buf, offset)
        yield ops
        offset += frame_len


class ReadInto(Protocol):
    """A binary file: raw or buffered, a pipe, a socket's makefile("rb")."""
    def readinto(self, buffer: memoryview, /) -> int | None: ...


def _read_into(f: ReadInto, view: memoryview) -> int:
    """Fill ``view`` from ``f``; returns how many bytes came before EOF
    (short reads of pipes and raw files are retried)."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def read_frames(f: ReadInto) -> Iterator[list]:
    """Yield the op list of each frame read from the binary file ``f`` until
    its end. A frame cut short by the end of the file is a FrameError."""
    pos = 0
    head = bytearray(HEADER_SIZE)
    while True:
        got = _read_into(f, memoryview(head))
        if got == 0:
            return
        if got < HEADER_SIZE:
            raise FrameError(f"file ends inside a frame header ({got} of "
                             f"{HEADER_SIZE} bytes)", pos)
        frame_len = frame_header(head).frame_len
        frame = bytearray(frame_len)
        frame[:HEADER_SIZE] = head
        with memoryview(frame) as view:
            got = HEADER_SIZE + _read_into(f, view[HEADER_SIZE:])
        if got < frame_len:
            raise FrameError(f"file ends inside a frame: has {got} of its "
                             f"{frame_len} bytes", pos + got)
        try:
            ops, _ = decode_frame(frame)
        except FrameError as exc:
            raise _relocated(exc, pos, f"frame at file offset {pos}") from None
        yield ops
        pos += frame_len


class FrameReader:
    """Reassembles frames from a byte stream that arrives in arbitrary
    pieces (a socket, a pipe)::

        reader = FrameReader()
        reader.feed(chunk)
        for ops in reader:        # every frame complete so far
            ...
        reader.needed()           # bytes still missing for the next frame

    A header is validated as soon as its 56 bytes are in, so a corrupt
    length is reported at once instead of waiting for bytes that never come.
    Each frame is copied out of the reassembly buffer before it is decoded,
    so the ops' memoryviews keep only their own frame alive. ``max_frame``
    bounds what one frame may declare (FrameError past it).
    """

    def __init__(self, max_frame: int = MAX_FRAME):
        if max_frame < HEADER_SIZE:
            raise ValueError(f"max_frame must be at least {HEADER_SIZE}, got {max_frame}")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0              # start of the next frame in _buf
        self._stream_pos = 0       # stream offset of _buf[0]
        self.frames_read = 0       # frames handed out so far

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos

    def feed(self, data) -> None:
        """Append received bytes (any bytes-like)."""
        if self._pos and self._pos * 2 >= len(self._buf):
            # drop consumed bytes once they are at least half the buffer
            del self._buf[:self._pos]
            self._stream_pos += self._pos
            self._pos = 0
        self._buf += data

    def _header(self) -> FrameHeader | None:
        if self.buffered < HEADER_SIZE:
            return None
        try:
            h = frame_header(self._buf, self._pos)
        except FrameError as exc:
            raise _relocated(exc, self._stream_pos,
                             f"frame {self.frames_read} of the stream") from None
        if h.frame_len > self.max_frame:
            raise FrameError(f"frame {self.frames_read} declares {h.frame_len} bytes, "
                             f"more than the reader's limit {self.max_frame}",
                             self._stream_pos + self._pos + 12)
        return h

    def needed(self) -> int:
        """How many more bytes complete the next frame (at least 1 while its
        header is incomplete; 0 when a whole frame is buffered)."""
        h = self._header()
        if h is None:
            return HEADER_SIZE - self.buffered
        return max(0, h.frame_len - self.buffered)

    def next_frame(self) -> bytes | None:
        """The next complete frame's bytes (header already validated), or None
        when more bytes are needed."""
        h = self._header()
        if h is None or self.buffered < h.frame_len:
            return None
        start = self._pos
        with memoryview(self._buf) as whole, whole[start:start + h.frame_len] as part:
            frame = bytes(part)             # one copy; the buffer stays resizable
        self._pos += h.frame_len
        self.frames_read += 1
        return frame

    def read(self) -> list | None:
        """The next complete frame's ops, or None when more bytes are needed."""
        start = self._stream_pos + self._pos
        index = self.frames_read
        frame = self.next_frame()
        if frame is None:
            return None
        try:
            ops, _ = decode_frame(frame)
        except FrameError as exc:
            raise _relocated(exc, start, f"frame {index} of the stream") from None
        return ops

    def __iter__(self) -> Iterator[list]:
        while (ops := self.read()) is not None:
            yield ops

    def close(self) -> None:
        """End of stream: a partial frame left over is a FrameError."""
        if self.buffered:
            raise FrameError(f"stream ends inside frame {self.frames_read}: "
                             f"{self.buffered} bytes of an incomplete frame",
                             self._stream_pos + self._pos)
