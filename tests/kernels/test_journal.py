"""Journal frame kernel: compiled vs pure-Python reference, format pinned by
golden hashes, every corruption a FrameError, buffers of every kind."""
from __future__ import annotations

import hashlib
import mmap
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from smirror import ops as ops_mod
from smirror.errors import FrameError
from smirror.kernels import _journal, _journal_py
from smirror.ops import AttrMask, FrameHeader, Op, OpKind
from support.journal_ops import IMPLS, PAIRS, fixed_ops, reseal

HEADER = struct.Struct("<4sBBHIIIIQQQQ")


def test_compiled_module_is_really_compiled():
    assert _journal.__file__.endswith(".so"), _journal.__file__
    assert not hasattr(_journal, "_HEADER")          # not the reference in disguise
    assert type(_journal.decode_frame).__name__ in ("cython_function_or_method",
                                                    "builtin_function_or_method")


def test_facade_uses_compiled_kernel():
    from smirror.kernels import frames as journal
    assert journal.encode_frame is _journal.encode_frame
    assert journal.decode_frame is _journal.decode_frame


# -- round trips --------------------------------------------------------------

@pytest.mark.parametrize("enc,dec", PAIRS)
@pytest.mark.parametrize("compress", [False, True, "auto"])
def test_every_kind_round_trips(enc, dec, compress):
    ops = fixed_ops()
    frame = enc.encode_frame(ops, compress)
    decoded, used = dec.decode_frame(frame)
    assert used == len(frame)
    assert decoded == ops
    assert [type(op) for op in decoded] == [Op] * len(ops)
    assert all(type(op.kind) is OpKind for op in decoded)
    for op in decoded:
        if op.kind in (OpKind.WRITE, OpKind.TASK, OpKind.MARK):
            assert isinstance(op.data, memoryview)
        else:
            assert op.data == b"" and isinstance(op.data, bytes)
        assert type(op.path) is bytes and type(op.path2) is bytes


@pytest.mark.parametrize("compress", [False, True, "auto"])
def test_both_implementations_write_identical_bytes(compress):
    ops = fixed_ops()
    assert _journal.encode_frame(ops, compress) == _journal_py.encode_frame(ops, compress)


@pytest.mark.parametrize("impl", IMPLS)
def test_header_fields(impl):
    ops = fixed_ops()
    frame = impl.encode_frame(ops, False)
    h = impl.frame_header(frame)
    assert h == FrameHeader(1, 0, len(ops), 100, 2**64 - 1, len(frame) - 56,
                            len(frame) - 56, len(frame))
    assert not h.compressed
    hc = impl.frame_header(impl.encode_frame(ops, True))
    assert hc.compressed and hc.raw_len == h.raw_len and hc.stored_len < hc.raw_len
    # header bytes straight from the layout documented in the reference
    magic, ver, flags, r16, count, stored, raw, r32, first, last, _, _ = HEADER.unpack_from(frame)
    assert (magic, ver, flags, r16, r32) == (b"SMJF", 1, 0, 0, 0)
    assert (count, stored, raw, first, last) == (len(ops), h.stored_len, h.raw_len, 100, 2**64 - 1)


def test_shared_constants_match_the_kernel():
    frame = _journal.encode_frame([Op.delete(1, b"x")], False)
    assert frame[:4] == ops_mod.MAGIC and frame[4] == ops_mod.VERSION
    assert len(frame) == ops_mod.HEADER_SIZE + ops_mod.RECORD_HEAD_SIZE + 1


@pytest.mark.parametrize("impl", IMPLS)
def test_compress_auto_keeps_only_a_real_saving(impl):
    small = [Op.write(1, b"f", 0, b"a" * 100)]          # below the auto threshold
    assert not impl.frame_header(impl.encode_frame(small, "auto")).compressed
    assert impl.frame_header(impl.encode_frame(small, True)).compressed
    noise = [Op.write(1, b"f", 0, b"".join(hashlib.sha512(bytes([i])).digest()
                                           for i in range(64)))]
    assert not impl.frame_header(impl.encode_frame(noise, "auto")).compressed
    text = [Op.write(1, b"f", 0, b"the same line again\n" * 100)]
    assert impl.frame_header(impl.encode_frame(text, "auto")).compressed
    assert not impl.frame_header(impl.encode_frame(text, False)).compressed
    with pytest.raises(ValueError, match="compress"):
        impl.encode_frame(text, "yes")


@pytest.mark.parametrize("impl", IMPLS)
def test_encoder_class_reuses_and_matches(impl):
    enc = impl.Encoder(compress=False)
    for n in (1, 5000, 3):                  # grows, then is reused
        ops = [Op.write(i, b"a/b", i * 64, b"x" * 64) for i in range(n)]
        assert enc.encode(ops) == impl.encode_frame(ops, False)
    assert enc.encode(ops, True) == impl.encode_frame(ops, True)
    with pytest.raises(ValueError):
        impl.Encoder(compress="maybe")


# -- golden bytes: a refactor must not change the format --------------------

# sha256 of fixed_ops() framed; future optimisations must not change these
# (updated once when fixed_ops' gid became 2**32-2: 2**32-1 is now refused)
GOLDEN = {
    False: "855a354bee242c9a0d449de65441cfc7a1ae5f1e193764df4086f345364997af",
    True: "b62cd74fb305dc7a10437901b1688e524c683c844763c83d894837f67bf60478",
}
# header | write(seq 7, b"a", offset 2, b"xy") | setattr(seq 9, b"a", uid=5)
GOLDEN_SMALL = (
    "534d4a4601000000" "0200000044000000" "4400000000000000" "0700000000000000"
    "0900000000000000" "d7d06f65b3dd4dcd" "437574d3c7064dde"
    "0100" "0100" "0000" "02000000" "0700000000000000" "0200000000000000" "61" "7879"
    "0802" "0100" "0000" "00000000" "0900000000000000"
    "00000000" "05000000" "00000000" "0000000000000000" "61")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("compress", [False, True])
def test_golden_frames(impl, compress):
    frame = impl.encode_frame(fixed_ops(), compress)
    assert hashlib.sha256(frame).hexdigest() == GOLDEN[compress]


@pytest.mark.parametrize("impl", IMPLS)
def test_golden_small_frame_bytes(impl):
    frame = impl.encode_frame([Op.write(7, b"a", 2, b"xy"), Op.setattr(9, b"a", uid=5)], False)
    assert frame.hex() == GOLDEN_SMALL


# -- corruption ----------------------------------------------------------------

def _small_frames():
    ops = [Op.mkdir(1, b"d"), Op.write(2, b"d/f", 3, b"abc" * 200), Op.setattr(3, b"d/f", mode=0o640),
           Op.rename(4, b"d/f", b"d/g"), Op.mark(5, b"end")]
    return {"plain": _journal_py.encode_frame(ops, False),
            "lz4": _journal_py.encode_frame(ops, True)}


SMALL = _small_frames()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["plain", "lz4"])
def test_every_single_byte_flip_is_caught(impl, which):
    frame = SMALL[which]
    for pos in range(len(frame)):
        for xor in (0x01, 0x80, 0xFF):
            bad = bytearray(frame)
            bad[pos] ^= xor
            with pytest.raises(FrameError) as info:
                impl.decode_frame(bytes(bad))
            assert info.value.offset is not None and 0 <= info.value.offset <= len(frame), (pos, xor)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["plain", "lz4"])
def test_every_truncation_is_caught(impl, which):
    frame = SMALL[which]
    for cut in range(len(frame)):
        with pytest.raises(FrameError, match="truncated"):
            impl.decode_frame(frame[:cut])
        if cut < 56:
            with pytest.raises(FrameError, match="truncated frame header"):
                impl.frame_header(frame[:cut])
        else:
            assert impl.frame_header(frame[:cut]).frame_len == len(frame)


@pytest.mark.parametrize("impl", IMPLS)
def test_error_names_problem_and_offset(impl):
    frame = SMALL["plain"]
    bad = bytearray(b"junk" + frame)
    bad[4:8] = b"SMJX"
    with pytest.raises(FrameError, match=r"bad frame magic b'SMJX'.*at byte offset 4"):
        impl.decode_frame(bytes(bad), 4)
    bad = bytearray(frame)
    bad[100] ^= 1
    with pytest.raises(FrameError, match=r"payload checksum mismatch \(at byte offset 56\)"):
        impl.decode_frame(bytes(bad))
    bad = bytearray(frame)
    bad[4] = 2
    with pytest.raises(FrameError, match="unsupported frame version 2"):
        impl.decode_frame(bytes(bad))
    with pytest.raises(FrameError, match="header declares"):
        impl.decode_frame(frame[:-1])


@pytest.mark.parametrize("impl", IMPLS)
def test_check_payload_false_skips_only_the_payload_checksum(impl):
    """The target's applier decodes a frame its receiver checked already:
    a payload flip goes unseen then, but the header check and every
    structural check still run."""
    frame = SMALL["plain"]
    bad = bytearray(frame)
    bad[frame.index(b"abcabc")] ^= 1   # in the write's data
    ops, n = impl.decode_frame(bytes(bad), check_payload=False)
    assert n == len(frame) and bytes(ops[1].data) == b"`" + (b"abc" * 200)[1:]
    with pytest.raises(FrameError, match="payload checksum mismatch"):
        impl.decode_frame(bytes(bad))
    bad = bytearray(frame)
    bad[8] ^= 1                        # header: its own checksum catches it
    with pytest.raises(FrameError, match="header checksum mismatch"):
        impl.decode_frame(bytes(bad), check_payload=False)
    for _name, damaged, pattern in _resealed_variants():
        if pattern is not None:
            with pytest.raises(FrameError, match=pattern):
                impl.decode_frame(damaged, check_payload=False)


def _resealed_variants():
    """Frames damaged behind a valid checksum: only the structural checks
    can catch them. (name, frame bytes, message regex)"""
    base = _journal_py.encode_frame([Op.write(10, b"a/b", 0, b"data"), Op.delete(11, b"c")],
                                    False)
    rec1 = 56                          # first record
    rec2 = 56 + 18 + 8 + 3 + 4         # second record

    def patch(at, raw):
        b = bytearray(base)
        b[at:at + len(raw)] = raw
        return reseal(bytes(b))

    return [
        ("unknown kind", patch(rec1, b"\x0f"), "unknown op kind 15"),
        ("kind zero", patch(rec2, b"\x00"), "unknown op kind 0"),
        ("mask on write", patch(rec1 + 1, b"\x01"), "mask"),
        ("first seq", patch(rec1 + 10, struct.pack("<Q", 9)), "first seq"),
        ("seq order", patch(rec2 + 10, struct.pack("<Q", 10)), "does not follow"),
        ("path too long", patch(rec1 + 2, struct.pack("<H", 500)), "needs"),
        ("data too long", patch(rec1 + 6, struct.pack("<I", 2**32 - 1)), "needs"),
        ("data on delete", patch(rec2 + 6, struct.pack("<I", 1)), "needs|data"),
        ("offset >= 2**63", patch(rec1 + 18, struct.pack("<Q", 2**63)), "2\\*\\*63"),
        ("NUL in path", patch(rec1 + 26, b"\0"), "NUL"),
        ("absolute path", patch(rec1 + 26, b"/"), "absolute"),
        ("dot component", patch(rec2 + 18, b"."), r"seq 11, delete\): path has a '\.' component"),
        ("count too high", reseal(bytes(bytearray(base[:8]) + struct.pack("<I", 3) + base[12:])),
         "truncated|cannot hold"),
        ("count too low", reseal(bytes(bytearray(base[:8]) + struct.pack("<I", 1) + base[12:])),
         "stray|last seq"),
        ("last seq", reseal(base[:32] + struct.pack("<Q", 12) + base[40:]), "last seq"),
        ("first seq > last", reseal(base[:24] + struct.pack("<Q", 12) + base[32:]),
         "seq range"),
        ("flags", reseal(base[:5] + b"\x02" + base[6:]), "flags"),
        ("reserved", reseal(base[:20] + b"\x01" + base[21:]), "reserved"),
        ("stored != raw", reseal(base[:16] + struct.pack("<I", 200) + base[20:]), "differs"),
    ]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,frame,pattern", _resealed_variants(),
                         ids=[v[0] for v in _resealed_variants()])
def test_damage_behind_a_valid_checksum(impl, name, frame, pattern):
    if pattern is None:
        ops, _ = impl.decode_frame(frame)       # a valid variant must still decode
        assert ops[1].path == b"."
        return
    with pytest.raises(FrameError, match=pattern):
        impl.decode_frame(frame)


@pytest.mark.parametrize("impl", IMPLS)
def test_dotdot_component_and_setattr_rules_in_frames(impl):
    base = _journal_py.encode_frame([Op.delete(1, b"ab/cd"), Op.setattr(2, b"x", uid=1)], False)
    for raw, pat in ((b"../cd", "'..' component"), (b"ab/..", "'..' component")):
        b = bytearray(base)
        b[56 + 18:56 + 23] = raw
        with pytest.raises(FrameError, match=pat):
            impl.decode_frame(reseal(bytes(b)))
    setattr_rec = 56 + 18 + 5
    for at, raw, pat in ((setattr_rec + 1, b"\x00", "mask"), (setattr_rec + 1, b"\x10", "mask"),
                         (setattr_rec + 18, struct.pack("<I", 0o644), "not named"),
                         (setattr_rec + 18 + 8, b"\x01", "not named")):
        b = bytearray(base)
        b[at:at + len(raw)] = raw
        with pytest.raises(FrameError, match=pat):
            impl.decode_frame(reseal(bytes(b)))
    mk = bytearray(_journal_py.encode_frame([Op.mkdir(1, b"d", 0o755)], False))
    mk[56 + 18:56 + 22] = struct.pack("<I", 0o10000)
    with pytest.raises(FrameError, match="mode"):
        impl.decode_frame(reseal(bytes(mk)))


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_declared_lengths_are_frame_errors_not_memory_errors(impl):
    def header(flags, count, stored, raw, first=1, last=1):
        h = bytearray(HEADER.pack(b"SMJF", 1, flags, 0, count, stored, raw, 0, first, last, 0, 0))
        return reseal(bytes(h))[:56]          # header check valid, payload absent
    cases = [
        (header(0, 1, 2**32 - 1, 2**32 - 1), "exceeds the limit"),
        (header(1, 1, 16, 2**30), "cannot expand"),
        (header(1, 1, 0, 100), "cannot expand"),
        (header(0, 2**32 - 1, 2**30, 2**30, 1, 2**64 - 1), "cannot hold"),
        (header(0, 5, 20, 20, 1, 3), "cannot hold"),
        (header(0, 1, 2**30, 2**30), "truncated frame"),
    ]
    for frame, pattern in cases:
        with pytest.raises(FrameError, match=pattern):
            impl.decode_frame(frame)
    # a compressed payload whose true size differs from the declared one
    raw_frame = bytearray(_journal_py.encode_frame([Op.write(1, b"f", 0, b"z" * 5000)], True))
    stored = struct.unpack_from("<I", raw_frame, 12)[0]
    for declared in (5026, 5027, 5028, stored * 200):
        b = bytearray(raw_frame)
        struct.pack_into("<I", b, 16, declared)
        b = reseal(bytes(b))
        if declared == 5027:
            impl.decode_frame(b)                 # the real size still decodes
            continue
        with pytest.raises(FrameError, match="decompress|expand"):
            impl.decode_frame(b)


@pytest.mark.parametrize("impl", IMPLS)
def test_random_garbage_and_empty_input(impl):
    for junk in (b"", b"SMJF", b"\0" * 56, b"SMJF" + b"\x01" * 100, bytes(range(256)) * 3):
        with pytest.raises(FrameError):
            impl.decode_frame(junk)
    with pytest.raises(TypeError):
        impl.decode_frame("a string")
    with pytest.raises(ValueError):
        impl.decode_frame(SMALL["plain"], len(SMALL["plain"]) + 1)
    with pytest.raises(ValueError):
        impl.decode_frame(SMALL["plain"], -1)


# -- buffers and streams -----------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "mmap", "cast"])
def test_buffer_types_and_zero_copy(impl, kind, tmp_path):
    frame = impl.encode_frame(fixed_ops(), False)
    if kind == "bytes":
        buf = frame
    elif kind == "bytearray":
        buf = bytearray(frame)
    elif kind == "memoryview":
        buf = memoryview(b"pad" + frame)[3:]
    elif kind == "cast":
        buf = memoryview(frame + b"\0" * (-len(frame) % 4)).cast("I")
    else:
        path = tmp_path / "frame"
        path.write_bytes(frame)
        with open(path, "r+b") as f:
            buf = mmap.mmap(f.fileno(), 0)
    ops, used = impl.decode_frame(buf)
    assert used == len(frame) and ops == fixed_ops()
    h = impl.frame_header(buf)
    assert h.frame_len == len(frame)
    write = ops[2]
    if kind in ("bytearray", "mmap"):
        # zero copy: the data view sees a change made to the buffer afterwards
        at = frame.index(b"hello world")
        buf[at] = ord("J")
        assert bytes(write.data[:5]) == b"Jello"
    del ops, write
    if kind == "mmap":
        buf.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_compressed_data_views_share_one_buffer(impl):
    ops, _ = impl.decode_frame(impl.encode_frame(fixed_ops(), True))
    owners = {id(op.data.obj) for op in ops if isinstance(op.data, memoryview)}
    assert len(owners) == 1


@pytest.mark.parametrize("enc,dec", PAIRS)
def test_stream_of_concatenated_frames(enc, dec):
    batches = [fixed_ops()[:5], fixed_ops()[5:9], fixed_ops()[9:]]
    stream = b"".join(enc.encode_frame(b, c) for b, c in zip(batches, (False, True, "auto"), strict=True))
    offset, got = 0, []
    while offset < len(stream):
        ops, used = dec.decode_frame(stream, offset)
        got.append(ops)
        offset += used
    assert offset == len(stream) and got == batches
    with pytest.raises(FrameError, match="truncated"):
        dec.decode_frame(stream[:-3], offset - len(enc.encode_frame(batches[2], "auto")))


@pytest.mark.parametrize("impl", IMPLS)
def test_names_that_are_not_utf8_survive(impl):
    names = [b"\xff\xfe\xfd", b"new\nline", b" leading and trailing ", b"tab\there",
             b"dir/\x80\x81/\xc3\x28", b"...", b".hidden/.x", b"a" * 255,
             b"/".join([b"b" * 255] * 16)]          # the longest name and path (4095 bytes)
    ops = [Op.create(i + 1, n, 0o644) for i, n in enumerate(names)]
    ops.append(Op.rename(100, names[0], names[1]))
    decoded, _ = impl.decode_frame(impl.encode_frame(ops))
    assert [op.path for op in decoded] == [op.path for op in ops]
    assert decoded[-1].path2 == names[1]


# -- the encoder refuses bad ops with a clear error --------------------------

BAD_OPS = [
    ([], ValueError, "at least one op"),
    ([Op.delete(2, b"a"), Op.delete(2, b"b")], ValueError, "seq must be greater"),
    ([Op.delete(3, b"a"), Op.delete(1, b"b")], ValueError, "seq must be greater"),
    ([Op.delete(-1, b"a")], ValueError, "seq"),
    ([Op.delete(2**64, b"a")], ValueError, "seq"),
    ([Op.delete(1.0, b"a")], TypeError, "seq must be an int"),
    ([Op(1, 0, b"a")], ValueError, "unknown op kind"),
    ([Op(1, 15, b"a")], ValueError, "unknown op kind"),
    ([Op(1, "write", b"a")], ValueError, "unknown op kind"),
    ([Op.delete(1, "a")], TypeError, "path must be bytes"),
    ([Op.delete(1, b"")], ValueError, "empty"),
    ([Op.delete(1, b"/etc/passwd")], ValueError, "absolute"),
    ([Op.delete(1, b"a/../../b")], ValueError, r"'\.\.' component"),
    ([Op.delete(1, b"..")], ValueError, r"'\.\.' component"),
    ([Op.delete(1, b"a\0b")], ValueError, "NUL"),
    ([Op.delete(1, b"a" * 65536)], ValueError, "limit"),
    ([Op.rename(1, b"a", b"")], ValueError, "path2.*empty"),
    ([Op.rename(1, b"a", b"../b")], ValueError, "path2"),
    ([Op.hardlink(1, b"a", b"/abs")], ValueError, "path2.*absolute"),
    ([Op.symlink(1, b"a", b"")], ValueError, "path2.*empty"),
    ([Op.symlink(1, b"a", b"x\0")], ValueError, "NUL"),
    ([Op.delete(1, b"a")._replace(path2=b"b")], ValueError, "must be empty"),
    ([Op.task(1, b"")], ValueError, "empty"),
    ([Op.mark(1, b"a\0")], ValueError, "NUL"),
    ([Op.delete(1, b"a")._replace(data=b"x")], ValueError, "data must be empty"),
    ([Op.write(1, b"a", 0, "text")], TypeError, "data"),
    ([Op.write(1, b"a", 0, memoryview(b"abcd")[::2])], TypeError, "contiguous"),
    ([Op.write(1, b"a", -1, b"x")], ValueError, "offset"),
    ([Op.write(1, b"a", 2**63, b"x")], ValueError, "offset"),
    ([Op.truncate(1, b"a", -5)], ValueError, "size"),
    ([Op.create(1, b"a", 0o10000)], ValueError, "mode"),
    ([Op.create(1, b"a")._replace(offset=5)], ValueError, "offset is not used"),
    ([Op.mkdir(1, b"a")._replace(uid=5)], ValueError, "uid is not used"),
    ([Op.write(1, b"a", 0, b"")._replace(mask=1)], ValueError, "mask"),
    ([Op.setattr(1, b"a", mode=0o644)._replace(mask=0)], ValueError, "mask"),
    ([Op.setattr(1, b"a", mode=0o644)._replace(mask=16)], ValueError, "mask"),
    ([Op.setattr(1, b"a", mode=0o644)._replace(uid=3)], ValueError, "mask"),
    ([Op.setattr(1, b"a", mtime_ns=2**63)], ValueError, "mtime_ns"),
    ([Op.setattr(1, b"a", uid=2**32)], ValueError, "uid"),
    ([(1, OpKind.DELETE, b"a")], TypeError, "not an Op"),
    (["not an op"], TypeError, "not an Op"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ops,exc,pattern", BAD_OPS, ids=[str(i) for i in range(len(BAD_OPS))])
def test_encoder_refuses_bad_ops(impl, ops, exc, pattern):
    with pytest.raises(exc, match=pattern):
        impl.encode_frame(ops)


def test_op_helpers():
    assert Op.setattr(1, b"a", mtime_ns=5).mask == AttrMask.MTIME
    assert Op.setattr(1, b"a", mode=0, uid=0).mask == AttrMask.MODE | AttrMask.UID
    with pytest.raises(ValueError, match="sets nothing"):
        Op.setattr(1, b"a")
    assert Op.task(1, "name").path == b"name"
    assert Op.mark(1).path == b"" and Op.mark(1, "x").path == b"x"
    op = Op.write(3, b"f", 10, b"abc")
    assert (op.seq, op.kind, op.path, op.offset, op.data) == (3, OpKind.WRITE, b"f", 10, b"abc")
    assert "WRITE" in repr(op) and "len=3" in repr(op)
    assert Op(1, OpKind.DELETE, b"x") == Op.delete(1, b"x")


# -- threads: the nogil paths under concurrency ------------------------------

def test_concurrent_round_trips_in_threads():
    big = [Op.write(i + 1, b"f/%d" % (i % 7), i * 65536, bytes([i % 251]) * 65536)
           for i in range(64)]
    expect = {c: _journal_py.encode_frame(big, c) for c in (False, True)}

    def work(k):
        c = bool(k % 2)
        frame = _journal.encode_frame(big, c)
        ops, _ = _journal.decode_frame(frame)
        return frame == expect[c] and ops == big

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(16)))


def test_encoder_shared_by_threads_refuses_instead_of_corrupting():
    enc = _journal.Encoder(False)
    inputs = [[Op.write(i + 1, b"f%d" % k, 0, bytes([k]) * (1 << 18)) for i in range(16)]
              for k in range(2)]
    results = [[], []]

    def work(k):
        for _ in range(15):
            try:
                results[k].append(enc.encode(inputs[k]))
            except RuntimeError as exc:
                assert "two threads" in str(exc)
                results[k].append(None)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        assert len(results[k]) == 15
        for frame in results[k]:
            if frame is not None:      # a frame that was produced is exactly right
                assert frame == _journal_py.encode_frame(inputs[k], False)
    assert any(f is not None for r in results for f in r)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("compress", [False, True])
def test_data_views_are_ordinary_memoryviews(impl, compress, tmp_path):
    payloads = [b"", b"a", bytes(range(200)), b"\xff" * 4097]
    ops = [Op.write(i + 1, b"f", i, p) for i, p in enumerate(payloads)]
    path = tmp_path / "frame"
    path.write_bytes(impl.encode_frame(ops, compress))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        decoded, _ = impl.decode_frame(m)
        for op, want in zip(decoded, payloads, strict=True):
            v = op.data
            assert (len(v), v.nbytes, v.shape, v.format, v.ndim) == (len(want), len(want),
                                                                   (len(want),), "B", 1)
            assert v.c_contiguous and v.tobytes() == want and bytes(v[1:3]) == want[1:3]
            assert v.readonly == compress          # views into the mmap are writable
            assert list(v[-2:]) == list(want[-2:])
            v.release()
        del decoded, op, v
        # every export released: the mmap can close
    with pytest.raises(ValueError):
        m[0]


def test_decoding_a_buffer_another_thread_scribbles_on_never_crashes():
    ops = [Op.write(i + 1, b"f%d" % i, 0, bytes([i]) * 20000) for i in range(200)]
    frame = _journal.encode_frame(ops, False)
    buf = bytearray(frame)
    stop = threading.Event()

    def scribble():
        k = 0
        while not stop.is_set():
            at = 56 + (k * 7919) % (len(frame) - 56)
            buf[at] ^= 0xFF                 # damage, then repair
            buf[at] ^= 0xFF
            k += 1

    t = threading.Thread(target=scribble)
    t.start()
    try:
        outcomes = set()
        for _ in range(200):
            try:
                decoded, _ = _journal.decode_frame(buf)
                outcomes.add("ok")
                del decoded
            except FrameError:
                outcomes.add("FrameError")
    finally:
        stop.set()
        t.join()
    assert outcomes <= {"ok", "FrameError"}
    assert _journal.decode_frame(bytes(buf))[0] == ops


@pytest.mark.parametrize("impl", IMPLS)
def test_a_path_object_is_checked_for_each_kind_that_uses_it(impl):
    label = b"../not/a/tree/path"
    impl.encode_frame([Op.mark(1, label), Op.task(2, label)])      # fine as a label/name
    with pytest.raises(ValueError, match="'..' component"):
        impl.encode_frame([Op.mark(1, label), Op.delete(2, label)])
    paths = [b"f%d" % i for i in range(40)]
    ops = [Op.delete(i + 1, paths[i % 40]) for i in range(400)] + [Op.rmdir(401, b"a/../b")]
    with pytest.raises(ValueError, match="op 400"):
        impl.encode_frame(ops)


@pytest.mark.parametrize("impl", IMPLS)
def test_encoder_releases_data_buffers_on_every_path(impl):
    bufs = [bytearray(b"%d" % i * 10) for i in range(3000)]     # > the kept slots
    ops = [Op.write(i + 1, b"f", 0, b) for i, b in enumerate(bufs)]
    frame = impl.encode_frame(ops)
    for b in bufs:
        b.extend(b"!")                        # BufferError if still exported
    bad = ops[:10] + [Op.delete(11, b"/abs")]
    with pytest.raises(ValueError):
        impl.encode_frame(bad)
    for b in bufs[:10]:
        b.extend(b"!")
    assert [bytes(op.data) for op in impl.decode_frame(frame)[0]] == \
        [bytes(b[:-1 if i >= 10 else -2]) for i, b in enumerate(bufs)]


def _noise(n):
    return b"".join(hashlib.sha512(i.to_bytes(4, "little")).digest() for i in range(n // 64))


@pytest.mark.parametrize("case,auto_compresses", [
    ("noise then zeros", False),     # the 64 KiB sample decides: not worth it
    ("zeros then noise", False),     # the sample says yes, the whole says no
    ("zeros", True),
    ("text", True),
])
def test_auto_compression_above_the_sample_size(case, auto_compresses):
    data = {"noise then zeros": _noise(1 << 16) + bytes(1 << 20),
            "zeros then noise": bytes(1 << 16) + _noise(1 << 20),
            "zeros": bytes(200_000),
            "text": b"a line of log text that repeats\n" * 10_000}[case]
    ops = [Op.write(1, b"big", 0, data[:300_000]), Op.write(2, b"big", 300_000, data[300_000:])]
    for compress in ("auto", True, False):
        c_frame = _journal.encode_frame(ops, compress)
        assert c_frame == _journal_py.encode_frame(ops, compress)
        compressed = _journal.frame_header(c_frame).compressed
        assert compressed == {"auto": auto_compresses, True: True, False: False}[compress]
        assert _journal.decode_frame(c_frame)[0] == ops
