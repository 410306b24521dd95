"""The journal facade: FrameReader, iter_frames and read_frames on real
streams and files."""
from __future__ import annotations

import io
import os
import socket
import threading

import pytest

from smirror.errors import FrameError
from smirror.kernels.frames import (
    HEADER_SIZE,
    FrameReader,
    Op,
    decode_frame,
    encode_frame,
    iter_frames,
    read_frames,
)
from support.journal_ops import fixed_ops, plain


def _frames():
    ops = fixed_ops()
    batches = [ops[:4], ops[4:10], ops[10:]]
    return batches, [encode_frame(b, c) for b, c in zip(batches, (False, True, "auto"), strict=True)]


def test_reader_byte_by_byte_and_needed():
    batches, frames = _frames()
    reader, got = FrameReader(), []
    assert reader.needed() == HEADER_SIZE
    for frame in frames:
        for i in range(len(frame)):
            assert reader.needed() >= 1
            reader.feed(frame[i:i + 1])
            got.extend(plain(o) for o in reader)
        assert reader.needed() == HEADER_SIZE and reader.buffered == 0
    assert got == batches
    reader.close()


def test_reader_reports_corrupt_header_before_the_payload_arrives():
    _, frames = _frames()
    stream = bytearray(frames[0] + frames[1])
    stream[len(frames[0]) + 13] ^= 0x40           # stored length of frame 1
    reader = FrameReader()
    reader.feed(stream[:len(frames[0]) + HEADER_SIZE])
    assert reader.read() is not None
    with pytest.raises(FrameError, match=r"frame 1 of the stream: frame header checksum") as info:
        reader.read()
    assert info.value.offset == len(frames[0]) + 48


def test_reader_limit_and_partial_tail():
    _, frames = _frames()
    reader = FrameReader(max_frame=100)
    reader.feed(frames[0])
    with pytest.raises(FrameError, match="reader's limit 100"):
        reader.read()
    reader = FrameReader()
    reader.feed(frames[0] + frames[1][:10])
    assert reader.read() is not None and reader.read() is None
    with pytest.raises(FrameError, match="stream ends inside frame 1"):
        reader.close()
    with pytest.raises(ValueError):
        FrameReader(max_frame=10)


def test_reader_payload_damage_names_stream_offset():
    _, frames = _frames()
    bad = bytearray(frames[1])
    bad[HEADER_SIZE + 3] ^= 1
    reader = FrameReader()
    reader.feed(frames[0] + bad)
    reader.read()
    with pytest.raises(FrameError, match="payload checksum") as info:
        reader.read()
    assert info.value.offset == len(frames[0]) + HEADER_SIZE


def test_reader_over_a_real_socket():
    batches = [[Op.write(k * 1000 + i + 1, b"f", i * 4096, os.urandom(4096)) for i in range(50)]
               for k in range(6)]
    a, b = socket.socketpair()

    def send():
        with a:
            for k, batch in enumerate(batches):
                a.sendall(encode_frame(batch, k % 2 == 0))

    t = threading.Thread(target=send)
    t.start()
    reader, got = FrameReader(), []
    with b:
        while chunk := b.recv(max(1, min(reader.needed(), 65536))):
            reader.feed(chunk)
            got.extend(plain(o) for o in reader)
    t.join()
    reader.close()
    assert got == batches


def test_iter_frames_and_read_frames(tmp_path):
    batches, frames = _frames()
    blob = b"".join(frames)
    assert [plain(o) for o in iter_frames(blob)] == batches
    assert [plain(o) for o in iter_frames(b"xx" + blob, 2)] == batches
    with pytest.raises(FrameError, match="truncated"):
        list(iter_frames(blob[:-1]))
    path = tmp_path / "segment"
    path.write_bytes(blob)
    with open(path, "rb") as f:
        assert [plain(o) for o in read_frames(f)] == batches
    for cut, pattern in ((len(blob) - 1, "file ends inside a frame"),
                         (len(frames[0]) + 20, "inside a frame header")):
        with pytest.raises(FrameError, match=pattern):
            list(read_frames(io.BytesIO(blob[:cut])))
    bad = bytearray(blob)
    bad[len(frames[0]) + HEADER_SIZE + 2] ^= 1
    with pytest.raises(FrameError, match=f"frame at file offset {len(frames[0])}") as info:
        list(read_frames(io.BytesIO(bytes(bad))))
    assert info.value.offset == len(frames[0]) + HEADER_SIZE


def test_decode_frame_from_reader_frames_keeps_views_private():
    _, frames = _frames()
    reader = FrameReader()
    reader.feed(frames[0])
    frame = reader.next_frame()
    ops, _ = decode_frame(frame)
    reader.feed(frames[1])          # the reassembly buffer may move: ops stay valid
    assert plain(ops) == fixed_ops()[:4]


def test_read_frames_from_a_pipe_with_short_reads():
    batches, frames = _frames()
    r, w = os.pipe()

    def writer():
        with open(w, "wb", buffering=0) as out:
            blob = b"".join(frames)
            for i in range(0, len(blob), 7):     # dribble: many short reads
                out.write(blob[i:i + 7])

    t = threading.Thread(target=writer)
    t.start()
    with open(r, "rb", buffering=0) as f:
        got = [plain(o) for o in read_frames(f)]
    t.join()
    assert got == batches
