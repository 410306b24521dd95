"""Property tests: compiled and reference journal kernels agree on every
op list, every mutation and every random input (Hypothesis)."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smirror.errors import FrameError
from smirror.kernels import _journal, _journal_py
from smirror.kernels.frames import FrameReader, iter_frames
from support.journal_ops import op_lists, plain, reseal

FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
compress_modes = st.sampled_from([False, True, "auto"])


@FAST
@given(ops=op_lists(), compress=compress_modes)
def test_cross_round_trip_and_identical_bytes(ops, compress):
    c_frame = _journal.encode_frame(ops, compress)
    p_frame = _journal_py.encode_frame(ops, compress)
    assert c_frame == p_frame
    for dec in (_journal, _journal_py):
        decoded, used = dec.decode_frame(c_frame)
        assert used == len(c_frame)
        assert decoded == ops
        # decoded ops re-encode to the very same frame (memoryview data in)
        assert _journal.encode_frame(decoded, compress) == c_frame
        assert _journal_py.encode_frame(decoded, compress) == c_frame


def _outcome(impl, frame):
    try:
        ops, used = impl.decode_frame(frame)
    except FrameError:
        return "FrameError"
    return plain(ops), used


@FAST
@given(ops=op_lists(max_size=4), compress=st.booleans(), data=st.data())
def test_mutations_behind_valid_checksums_agree(ops, compress, data):
    """Damage the payload or header, re-seal both checksums, and the two
    decoders must agree: the same FrameError-or-ops outcome, never a crash."""
    frame = bytearray(_journal_py.encode_frame(ops, compress))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        frame = frame[:data.draw(st.integers(0, len(frame)))]
    if len(frame) >= 56 and data.draw(st.booleans()):
        frame = bytearray(reseal(bytes(frame)))
    frame = bytes(frame)
    assert _outcome(_journal, frame) == _outcome(_journal_py, frame)


@FAST
@given(junk=st.binary(max_size=300), seal=st.booleans())
def test_random_bytes_never_crash(junk, seal):
    frame = b"SMJF\x01" + junk if seal else junk
    if seal and len(frame) >= 56:
        frame = reseal(frame)
    for impl in (_journal, _journal_py):
        try:
            impl.decode_frame(frame)
        except FrameError:
            pass
        try:
            impl.frame_header(frame)
        except FrameError:
            pass


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(op_lists(max_size=5), min_size=1, max_size=4),
       compress=compress_modes, cuts=st.lists(st.integers(1, 200), max_size=20))
def test_stream_reassembly_in_any_pieces(batches, compress, cuts):
    stream = b"".join(_journal.encode_frame(b, compress) for b in batches)
    assert [plain(o) for o in iter_frames(stream)] == batches
    reader, got, pos = FrameReader(), [], 0
    for n in cuts + [len(stream)]:
        reader.feed(stream[pos:pos + n])
        pos += n
        got.extend(plain(o) for o in reader)
    reader.close()
    assert got == batches and reader.frames_read == len(batches)
