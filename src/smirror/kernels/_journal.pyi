"""Type stub of the compiled journal frame kernel (format: smirror.kernels._journal_py)."""
from collections.abc import Sequence
from typing import Literal

from smirror.ops import FrameHeader, Op

_Buffer = bytes | bytearray | memoryview   # or any contiguous buffer (mmap, ...)
_Compress = bool | Literal["auto"]

__all__ = ["encode_frame", "decode_frame", "frame_header", "Encoder"]


def encode_frame(ops: Sequence[Op], compress: _Compress = "auto") -> bytes:
    """One frame from a non-empty sequence of ops with strictly increasing
    seqs. Bad ops raise TypeError/ValueError naming the op index and seq."""


def decode_frame(
    buf: _Buffer, offset: int = 0, *, check_payload: bool = True
) -> tuple[list[Op], int]:
    """(ops, frame_len) of the frame at ``offset``; FrameError if malformed."""


def frame_header(buf: _Buffer, offset: int = 0) -> FrameHeader:
    """The validated header of the frame at ``offset`` (56 bytes needed)."""


class Encoder:
    """encode_frame with per-op scratch kept between calls (one thread at a time)."""
    compress: _Compress

    # Cython's __cinit__ takes the argument: the type's __new__, not __init__
    def __new__(cls, compress: _Compress = "auto") -> Encoder: ...

    def encode(self, ops: Sequence[Op], compress: _Compress | None = None) -> bytes: ...
