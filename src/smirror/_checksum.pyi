"""Stub of the compiled block-checksum kernel (reference: smirror._checksum_py)."""
from typing import Optional, Union

import mmap
import numpy as np
import numpy.typing as npt

Buffer = Union[bytes, bytearray, memoryview, mmap.mmap]

READ_CHUNK_SIZE: int
WEAK_SIMD: str  # "avx2", "sse2" or "generic": weak-checksum code path picked at import

def _use_weak_variant(name: str) -> str: ...

def weak_checksum(data: Buffer) -> int: ...
def weak_roll(weak: int, out_byte: int, in_byte: int, length: int) -> int: ...
def strong_digest(data: Buffer) -> bytes: ...
def block_signature(
    data: Buffer, block_size: int, with_weak: bool
) -> tuple[Optional[npt.NDArray[np.uint32]], npt.NDArray[np.uint64]]: ...
def fd_signature(
    fd: int, length: int, block_size: int, with_weak: bool
) -> tuple[Optional[npt.NDArray[np.uint32]], npt.NDArray[np.uint64]]: ...
def fd_digest(fd: int) -> bytes: ...
def _use_reader_thread(mode: bool | str) -> str: ...
def delta_ops(
    src: Buffer,
    block_size: int,
    target_length: int,
    weak: npt.NDArray[np.uint32],
    strong: npt.NDArray[np.uint64],
) -> list[tuple[int, int, int]]: ...
