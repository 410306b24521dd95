"""Helpers shared by the memqueue test files (not a test module)."""
import os

import pytest

import smirror.kernels._memqueue as native
import smirror.kernels._memqueue_py as reference

IMPLS = [pytest.param(native, id="cython"), pytest.param(reference, id="python")]


def frame_for(seq: int, size: int) -> bytes:
    """A frame whose every byte depends on its seq, so misordering or mixing
    two frames is visible."""
    if size == 0:
        return b""
    pattern = seq.to_bytes(8, "little") + bytes([(seq * 7 + i) & 0xFF for i in range(8)])
    return (pattern * (size // len(pattern) + 1))[:size]


def segment_files(path):
    return sorted(n for n in os.listdir(path) if n.endswith(".seg"))


def segment_bytes(path):
    return sum(os.path.getsize(os.path.join(path, n)) for n in segment_files(path))


def drain(q, timeout=0):
    """Every item get() hands out now."""
    out = []
    while True:
        item = q.get(timeout=timeout)
        if item is None:
            return out
        out.append(item)
