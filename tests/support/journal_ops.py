"""Shared pieces of the journal tests: both implementations, op strategies,
a fixed op list, and a helper that re-seals a mutated frame's checksums."""
import struct

import pytest
import xxhash
from hypothesis import strategies as st

from smirror.kernels import _journal, _journal_py
from smirror.ops import MKNOD_TYPES, XATTR_NAMESPACES, AttrMask, Op, OpKind

IMPLS = [pytest.param(_journal, id="compiled"), pytest.param(_journal_py, id="reference")]
PAIRS = [pytest.param(a, b, id=f"{a.__name__.rsplit('.', 1)[1]}->{b.__name__.rsplit('.', 1)[1]}")
         for a in (_journal, _journal_py) for b in (_journal, _journal_py)]


def fixed_ops():
    """One op of every kind, with awkward names; pinned by the golden test."""
    return [
        Op.mkdir(100, b"dir", 0o755),
        Op.create(101, b"dir/caf\xe9 \xff\xfe.bin", 0o600),
        Op.write(102, b"dir/caf\xe9 \xff\xfe.bin", 0, b"hello world\n" * 40),
        Op.write(105, b"dir/caf\xe9 \xff\xfe.bin", 4096, bytes(range(256))),
        Op.truncate(106, b"dir/caf\xe9 \xff\xfe.bin", 1 << 40),
        Op.setattr(107, b"dir/line\nbreak", mode=0o4755, mtime_ns=-1_500_000_000),
        Op.setattr(108, b"dir", uid=1000, gid=2**32 - 2),      # the largest id
        Op.rename(110, b"dir/a b", b"dir/c\td"),
        Op.symlink(111, b"dir/link", b"../../outside/target"),
        Op.hardlink(112, b"dir/hard", b"dir/a b"),
        Op.delete(113, b"dir/old"),
        Op.rmdir(114, b"gone"),
        Op.task(115, "snapshot", b'{"argv": ["zfs", "snapshot", "pool@x"]}'),
        Op.mark(116, b"mirror-start"),
        Op.mark(2**64 - 1, b"", b"\x00\x01payload"),
    ]


def reseal(frame: bytes) -> bytes:
    """Recompute both checksums of a (mutated) frame so that the decoder's
    deeper checks, not the checksum, have to catch the damage."""
    b = bytearray(frame)
    payload_check = xxhash.xxh3_64_intdigest(bytes(b[56:]))
    struct.pack_into("<Q", b, 40, payload_check)
    struct.pack_into("<Q", b, 48, xxhash.xxh3_64_intdigest(bytes(b[:48])))
    return bytes(b)


# -- hypothesis strategies ---------------------------------------------------

_component = st.binary(min_size=1, max_size=6).map(
    lambda c: c.replace(b"/", b"_").replace(b"\0", b"_")).filter(lambda c: c not in (b".", b".."))
tree_paths = st.lists(_component, min_size=1, max_size=3).map(b"/".join)
free_names = st.binary(min_size=1, max_size=12).map(lambda c: c.replace(b"\0", b"_"))
datas = st.one_of(st.binary(max_size=64), st.binary(max_size=3).map(lambda b: b * 300))
offsets = st.integers(0, 2**63 - 1)
write_offsets = st.integers(0, 2**63 - 1 - 1024)      # offset + len(data) fits 2**63-1
modes = st.integers(0, 0o7777)
xattr_names = st.builds(lambda ns, n: ns + n, st.sampled_from(XATTR_NAMESPACES),
                        st.binary(min_size=1, max_size=8).map(lambda c: c.replace(b"\0", b"_")))


def _setattr(seq, path, mode, uid, gid, mtime, mask):
    return Op.setattr(seq, path,
                      mode if mask & AttrMask.MODE else None,
                      uid if mask & AttrMask.UID else None,
                      gid if mask & AttrMask.GID else None,
                      mtime if mask & AttrMask.MTIME else None)


# each entry builds an op from a seq
op_makers = st.one_of(
    st.builds(lambda p, o, d: lambda s: Op.write(s, p, o, d), tree_paths, write_offsets, datas),
    st.builds(lambda p, n: lambda s: Op.truncate(s, p, n), tree_paths, offsets),
    st.builds(lambda p, m: lambda s: Op.create(s, p, m), tree_paths, modes),
    st.builds(lambda p, m: lambda s: Op.mkdir(s, p, m), tree_paths, modes),
    st.builds(lambda p: lambda s: Op.delete(s, p), tree_paths),
    st.builds(lambda p: lambda s: Op.rmdir(s, p), tree_paths),
    st.builds(lambda p, q: lambda s: Op.rename(s, p, q), tree_paths, tree_paths),
    st.builds(lambda p, m, u, g, t, k: lambda s: _setattr(s, p, m, u, g, t, k),
              tree_paths, modes, st.integers(0, 2**32 - 2), st.integers(0, 2**32 - 2),
              st.integers(-2**63, 2**63 - 1), st.integers(1, 15)),
    st.builds(lambda p, q: lambda s: Op.symlink(s, p, q), tree_paths, free_names),
    st.builds(lambda p, q: lambda s: Op.hardlink(s, p, q), tree_paths, tree_paths),
    st.builds(lambda n, d: lambda s: Op.task(s, n, d), free_names, datas),
    st.builds(lambda n, d: lambda s: Op.mark(s, n, d),
              st.one_of(st.just(b""), free_names), datas),
    st.builds(lambda p, n, d: lambda s: Op.setxattr(s, p, n, d), tree_paths, xattr_names, datas),
    st.builds(lambda p, n: lambda s: Op.removexattr(s, p, n), tree_paths, xattr_names),
    st.builds(lambda p, t, m, r: lambda s: Op.mknod(s, p, t | m, r if t in (0o020000, 0o060000) else 0),
              tree_paths, st.sampled_from(MKNOD_TYPES), modes, st.integers(0, 2**64 - 1)),
)


@st.composite
def op_lists(draw, max_size=12):
    makers = draw(st.lists(op_makers, min_size=1, max_size=max_size))
    seq = draw(st.integers(0, 2**64 - 1 - 2**40))
    ops = []
    for make in makers:
        ops.append(make(seq))
        seq += draw(st.sampled_from([1, 1, 1, 2, 1000, 2**32]))
    return ops


def plain(ops):
    """Ops with every data field as bytes (to compare or re-encode)."""
    return [op._replace(data=bytes(op.data)) for op in ops]


ALL_KINDS = list(OpKind)
