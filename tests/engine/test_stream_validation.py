"""Stream input is validated: every field of every op is checked by the
journal kernel (both implementations) before anything uses it, and a
receiver on a real TCP link refuses a frame with one bad op whole, with an
ERROR that names the op's seq, its kind and the field; nothing of it is
queued or applied. A TASK whose payload is bad is refused with a NOTICE,
and the applier goes on (also after a restart)."""
from __future__ import annotations

import json
import os
import time

import pytest

from smirror.errors import FrameError
from smirror.kernels.frames import encode_frame
from smirror.ops import Op, OpKind
from smirror.stream import wire
from smirror.stream.receiver import TargetConnection
from smirror.stream.tasks import TaskSpec
from support.endpoints import Endpoint, raw_frame, record
from support.journal_ops import IMPLS

# -- frames built by hand: the encoder would refuse these ops --------------------

def bad(kind, **fields) -> bytes:
    return record(kind, 7, **fields)


LONG_NAME = b"n" * 256
LONG_PATH = b"/".join([b"d" * 255] * 16) + b"x"          # 4096 bytes

# (what, the op as the encoder sees it, its record, message the decoder gives)
BAD_FIELDS = [
    ("absolute path", Op.delete(7, b"/etc/passwd"), bad(OpKind.DELETE, path=b"/etc/passwd"),
     r"seq 7, delete\): path is absolute"),
    ("dotdot path", Op.create(7, b"a/../../x"), bad(OpKind.CREATE, path=b"a/../../x", fixed=(0o644,)),
     r"seq 7, create\): path has a '\.\.' component"),
    ("dot component", Op.mkdir(7, b"a/./b"), bad(OpKind.MKDIR, path=b"a/./b", fixed=(0o755,)),
     r"seq 7, mkdir\): path has a '\.' component"),
    ("path is a dot", Op.rmdir(7, b"."), bad(OpKind.RMDIR, path=b"."),
     r"seq 7, rmdir\): path has a '\.' component"),
    ("empty component", Op.delete(7, b"a//b"), bad(OpKind.DELETE, path=b"a//b"),
     r"seq 7, delete\): path has an empty component"),
    ("trailing slash", Op.delete(7, b"a/"), bad(OpKind.DELETE, path=b"a/"),
     r"seq 7, delete\): path has an empty component"),
    ("NUL in path", Op.delete(7, b"a\0b"), bad(OpKind.DELETE, path=b"a\0b"),
     r"seq 7, delete\): path contains a NUL"),
    ("empty path", Op.delete(7, b""), bad(OpKind.DELETE, path=b""),
     r"seq 7, delete\): path is empty"),
    ("name > NAME_MAX", Op.delete(7, b"d/" + LONG_NAME), bad(OpKind.DELETE, path=b"d/" + LONG_NAME),
     r"seq 7, delete\): path has a name longer than 255"),
    ("path > PATH_MAX", Op.delete(7, LONG_PATH), bad(OpKind.DELETE, path=LONG_PATH),
     r"seq 7, delete\): path is longer than 4095"),
    ("rename to ..", Op.rename(7, b"a", b".."), bad(OpKind.RENAME, path=b"a", path2=b".."),
     r"seq 7, rename\): path2 has a '\.\.' component"),
    ("rename to absolute", Op.rename(7, b"a", b"/tmp/x"),
     bad(OpKind.RENAME, path=b"a", path2=b"/tmp/x"), r"seq 7, rename\): path2 is absolute"),
    ("hardlink to outside", Op.hardlink(7, b"a", b"../etc/shadow"),
     bad(OpKind.HARDLINK, path=b"a", path2=b"../etc/shadow"),
     r"seq 7, hardlink\): path2 has a '\.\.' component"),
    ("hardlink dot", Op.hardlink(7, b"a", b"./b"), bad(OpKind.HARDLINK, path=b"a", path2=b"./b"),
     r"seq 7, hardlink\): path2 has a '\.' component"),
    ("symlink target NUL", Op.symlink(7, b"l", b"x\0y"), bad(OpKind.SYMLINK, path=b"l", path2=b"x\0y"),
     r"seq 7, symlink\): path2 contains a NUL"),
    ("symlink target > PATH_MAX", Op.symlink(7, b"l", b"t" * 4096),
     bad(OpKind.SYMLINK, path=b"l", path2=b"t" * 4096), r"seq 7, symlink\): path2 is longer"),
    ("mode beyond 07777", Op.create(7, b"f", 0o10000), bad(OpKind.CREATE, path=b"f", fixed=(0o10000,)),
     r"seq 7, create\): mode 0o10000"),
    ("setattr mode type bits", Op.setattr(7, b"f", mode=0o100644),
     bad(OpKind.SETATTR, path=b"f", fixed=(0o100644, 0, 0, 0), mask=1), r"seq 7, setattr\): mode"),
    ("uid -1", Op.setattr(7, b"f", uid=2**32 - 1),
     bad(OpKind.SETATTR, path=b"f", fixed=(0, 2**32 - 1, 0, 0), mask=2),
     r"seq 7, setattr\): uid 4294967295 out of range"),
    ("gid -1", Op.setattr(7, b"f", gid=2**32 - 1),
     bad(OpKind.SETATTR, path=b"f", fixed=(0, 0, 2**32 - 1, 0), mask=4),
     r"seq 7, setattr\): gid 4294967295 out of range"),
    ("unknown mask bit", Op(7, OpKind.SETATTR, b"f", mask=16),
     bad(OpKind.SETATTR, path=b"f", fixed=(0, 0, 0, 0), mask=16),
     r"seq 7, setattr\): bad setattr mask"),
    ("offset >= 2**63", Op.write(7, b"f", 2**63, b"x"),
     bad(OpKind.WRITE, path=b"f", data=b"x", fixed=(2**63,)), r"seq 7, write\): offset/size"),
    ("offset + len overflows", Op.write(7, b"f", 2**63 - 2, b"xyz"),
     bad(OpKind.WRITE, path=b"f", data=b"xyz", fixed=(2**63 - 2,)),
     r"seq 7, write\): write offset .* ends past"),
    ("truncate size >= 2**63", Op.truncate(7, b"f", 2**63),
     bad(OpKind.TRUNCATE, path=b"f", fixed=(2**63,)), r"seq 7, truncate\): offset/size"),
    ("task payload > 64 KiB", Op.task(7, b"t", b"x" * (64 * 1024 + 1)),
     bad(OpKind.TASK, path=b"t", data=b"x" * (64 * 1024 + 1)), r"seq 7, task\): payload is 65537"),
    ("mark payload > 64 KiB", Op.mark(7, b"m", b"x" * (64 * 1024 + 1)),
     bad(OpKind.MARK, path=b"m", data=b"x" * (64 * 1024 + 1)), r"seq 7, mark\): payload is 65537"),
    ("task name too long", Op.task(7, b"t" * 1025), bad(OpKind.TASK, path=b"t" * 1025),
     r"seq 7, task\): path is longer than 1024"),
    ("task name empty", Op.task(7, b""), bad(OpKind.TASK, path=b""), r"seq 7, task\): path is empty"),
    ("mark label NUL", Op.mark(7, b"m\0"), bad(OpKind.MARK, path=b"m\0"),
     r"seq 7, mark\): path contains a NUL"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("what,op,rec,message", BAD_FIELDS, ids=[b[0] for b in BAD_FIELDS])
def test_every_bad_field_is_refused_by_encoder_and_decoder(impl, what, op, rec, message):
    with pytest.raises((ValueError, TypeError), match=r"op 0 \(seq 7\)"):
        impl.encode_frame([op], False)
    frame = raw_frame([(5, record(OpKind.MKDIR, 5, path=b"ok", fixed=(0o755,))), (7, rec)])
    with pytest.raises(FrameError, match=r"op 1 \(" + message):
        impl.decode_frame(frame)


@pytest.mark.parametrize("impl", IMPLS)
def test_the_limits_themselves_are_fine(impl):
    longest = b"/".join([b"d" * 255] * 16)                  # 4095 bytes, names of 255
    ops = [Op.create(1, longest, 0o7777), Op.symlink(2, b"l", b"../" * 1365),
           Op.setattr(3, b"f", uid=2**32 - 2, gid=0, mtime_ns=-2**63),
           Op.setattr(4, b"f", mtime_ns=2**63 - 1),
           Op.write(5, b"f", 2**63 - 4, b"abc"), Op.truncate(6, b"f", 2**63 - 1),
           Op.task(7, b"t" * 1024, b"x" * 65536), Op.mark(8, b"", b"y" * 65536),
           Op.create(9, b".hidden/...", 0o644)]
    decoded, _ = impl.decode_frame(impl.encode_frame(ops, False))
    assert [op._replace(data=bytes(op.data)) for op in decoded] == ops


# -- a receiver on a real TCP link ---------------------------------------------------

def until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def replies(link, until_type):
    """Messages from the target up to and including the first ``until_type``."""
    got = []
    while True:
        mtype, payload = link.recv()
        got.append((mtype, bytes(payload)))
        if mtype == until_type:
            return got


@pytest.fixture
def receiver(tmp_path):
    """(root dir holding map base + sentinel, map base, make_target, endpoint maker)."""
    base = tmp_path / "root" / "base"
    base.mkdir(parents=True)
    (tmp_path / "root" / "sentinel").write_text("untouched")
    made = []

    def make():
        target = TargetConnection(1, base, tmp_path / "state", memory_limit=1 << 20)
        endpoint = Endpoint(target)
        made.append((target, endpoint))
        return target, endpoint
    yield tmp_path / "root", base, make
    for target, endpoint in made:
        endpoint.close()
        target.close()


def test_a_frame_with_one_bad_op_is_refused_whole(receiver):
    root, base, make = receiver
    target, endpoint = make()
    link, last = endpoint.open()
    assert last == 0
    good = encode_frame([Op.mkdir(1, b"d"), Op.create(2, b"d/f"), Op.write(3, b"d/f", 0, b"ok")])
    link.send(wire.MsgType.FRAME, good)
    until(lambda: target.applied_seq == 3)
    # seqs 4..6: two fine ops around a rename out of the map base
    frame = raw_frame([(4, record(OpKind.CREATE, 4, path=b"d/g", fixed=(0o644,))),
                       (5, record(OpKind.RENAME, 5, path=b"d/f", path2=b"../../sentinel")),
                       (6, record(OpKind.WRITE, 6, path=b"d/g", data=b"zz", fixed=(0,)))])
    link.send(wire.MsgType.FRAME, frame)
    got = replies(link, wire.MsgType.ERROR)
    error = json.loads(got[-1][1])["error"]
    assert "seqs 4..6" in error and "seq 5, rename" in error and "path2 has a '..' component" in error
    link.close()
    until(lambda: endpoint.errors)
    assert isinstance(endpoint.errors[0], FrameError)
    # nothing of the frame is queued or applied
    assert target.received_seq == 3 and target.queue.count == 0 and target.applied_seq == 3
    assert sorted(os.listdir(base / "d")) == ["f"] and (base / "d/f").read_bytes() == b"ok"
    assert (root / "sentinel").read_text() == "untouched" and sorted(os.listdir(root)) == ["base", "sentinel"]
    # the receiver and the applier go on: the same seqs, valid this time, are taken
    link, last = endpoint.open()
    assert last == 3
    link.send(wire.MsgType.FRAME, encode_frame([Op.create(4, b"d/g"), Op.rename(5, b"d/f", b"d/h"),
                                                 Op.write(6, b"d/g", 0, b"zz")]))
    until(lambda: target.applied_seq == 6)
    assert sorted(os.listdir(base / "d")) == ["g", "h"]
    link.close()


@pytest.mark.parametrize("payload, field", [
    ({"args": [1]}, "args word 0 must be a string"),
    ({"name": 5}, "name must be a string"),
    ({"on_execute": "rm -rf /"}, "on_execute must be a non-empty list"),
    ({"on_execute": ["x", None]}, "on_execute word 1 must be a string"),
    ({"timeout": "soon"}, "bad timeout"),
    ({"timeout": 1e300}, "bad timeout"),
    ({"group": ["a"]}, "group must be a list"),
    ({"source": "a\0b"}, "source must be"),
    ({"args": ["\ud800"]}, "args word 0 cannot be encoded"),
    ({"args": ["a"] * 300}, "300 words"),
])
def test_a_bad_task_is_refused_with_a_notice_and_the_applier_goes_on(receiver, payload, field):
    root, base, make = receiver
    target, endpoint = make()
    link, _ = endpoint.open()
    spec = json.loads(TaskSpec.build("t", on_execute="x").encode())
    spec.update(payload)
    task = Op.task(2, b"t", json.dumps(spec).encode())
    link.send(wire.MsgType.FRAME, encode_frame([Op.create(1, b"before")]))
    link.send(wire.MsgType.FRAME, encode_frame([task]))
    link.send(wire.MsgType.FRAME, encode_frame([Op.create(3, b"after")]))
    until(lambda: target.applied_seq == 3)
    assert target._applier_thread.is_alive() and target.state != "apply-error"
    assert sorted(os.listdir(base)) == ["after", "before"]
    notices = []
    while len(notices) < 2:             # refused on receipt, and again on execute
        mtype, body = link.recv()
        if mtype == wire.MsgType.NOTICE:
            notices.append(json.loads(bytes(body)))
    assert all(n["state"] == "refused" and n["seq"] == 2 and field in n["error"] for n in notices)
    assert {n["stage"] for n in notices} == {"on_receive", "on_execute"}
    link.close()
    # a restart does not meet the task again: it is applied (refused) for good
    target.close()
    again, endpoint2 = make()
    assert again.applied_seq == 3 and again.queue.count == 0
    link, last = endpoint2.open()
    assert last == 3
    link.send(wire.MsgType.FRAME, encode_frame([Op.create(4, b"later")]))
    until(lambda: again.applied_seq == 4)
    assert again._notices == []
    link.close()
