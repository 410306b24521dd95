"""Fuzzing the stream input (Hypothesis).

* Random ops, with valid and invalid field values (paths with ``..``, ``.``,
  empty components, absolute, NUL, too long; modes, ids, offsets, masks,
  kinds out of range; task and mark payloads), are framed with the
  project's own encoder when it accepts them and by hand when it does not,
  and sent over a real TCP link to a target whose map base sits in a
  directory with a sentinel sibling and an "outside" directory that
  symlinks and absolute paths aim at. Whatever arrives: no thread dies,
  nothing outside the map base changes, and every frame the decoder
  refuses is answered with an ERROR that names the op.
* Raw bytes, and valid frames damaged behind resealed checksums, go into
  ``decode_frame`` of both implementations: ops or a FrameError, nothing
  else.

``SMIRROR_FUZZ_EXAMPLES`` sets the number of examples (the suite runs few).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from smirror.errors import FrameError
from smirror.kernels import _journal, _journal_py
from smirror.kernels.frames import encode_frame
from smirror.ops import Op, OpKind
from smirror.stream import wire
from smirror.stream.receiver import TargetConnection
from smirror.stream.tasks import TargetTasks, TaskPolicy, TaskSpec
from support.endpoints import Endpoint, raw_frame, record
from support.journal_ops import op_lists, reseal

EXAMPLES = int(os.environ.get("SMIRROR_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=list(HealthCheck))


# -- op strategies: valid and invalid field values --------------------------------

def mostly(good, bad):
    """Usually a valid value, sometimes a bad one: most frames then hold
    ops that get applied, and the rest test the refusals."""
    return st.integers(0, 7).flatmap(lambda n: bad if n == 7 else good)


def paths(outside: bytes):
    good = st.lists(st.sampled_from([b"a", b"b", b"c", b"d", b".hidden", b"a" * 255]),
                    min_size=1, max_size=3).map(b"/".join)
    bad = st.one_of(
        st.lists(st.sampled_from([b"a", b".", b"..", b"", b"n" * 256, b"x\0y"]),
                 min_size=1, max_size=4).map(b"/".join),
        st.sampled_from([b"/", b"a/", b"../sentinel", b"../../etc", outside,
                         outside + b"/x", b"p" * 4096, b"a/" * 2000 + b"a"]),
        st.binary(max_size=12))
    return mostly(good, bad)


def ops_strategy(outside: bytes):
    path = paths(outside)
    link_target = st.one_of(path, st.sampled_from([b"..", b"../sentinel", outside, b"/etc",
                                                   b"t" * 4096, b"a\0"]))
    mode = mostly(st.sampled_from([0o644, 0o755, 0o4755, 0o7777]),
                  st.sampled_from([0o10000, 0o100644, 2**32 - 1]))
    ident = mostly(st.sampled_from([0, os.getuid(), 1000, 2**32 - 2]), st.just(2**32 - 1))
    offset = mostly(st.sampled_from([0, 3, 4096, 2**40, 2**63 - 3]),
                    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1]))
    data = st.binary(max_size=64)
    spec = json.loads(TaskSpec.build("t", on_execute="x").encode())
    task_payload = st.one_of(
        st.binary(max_size=40),
        st.sampled_from([{"args": [1]}, {"name": None}, {"timeout": "x"}, {"on_execute": "sh"},
                         {"group": [True]}, {"source": "\0"}, {"args": ["\ud800"]}, {},
                         {"timeout": 0}]).map(
            lambda d: json.dumps(dict(spec, **d)).encode()))
    mark_payload = st.one_of(st.binary(max_size=40), st.builds(
        lambda p, m: json.dumps({"path": os.fsdecode(p), "mode": m, "dir": False}).encode(),
        path, st.sampled_from(["move", "keep", "delete"])))
    kinds = mostly(st.sampled_from(list(range(1, 13))), st.sampled_from([0, 13, 255]))

    @st.composite
    def one(draw):
        kind = draw(kinds)
        f = dict(path=draw(path), path2=b"", data=b"", fixed=(), mask=0)
        if kind == OpKind.WRITE:
            f.update(data=draw(data), fixed=(draw(offset),))
        elif kind == OpKind.TRUNCATE:
            f.update(fixed=(draw(offset),))
        elif kind in (OpKind.CREATE, OpKind.MKDIR):
            f.update(fixed=(draw(mode),))
        elif kind == OpKind.SETATTR:
            mask = draw(mostly(st.sampled_from([1, 2, 4, 8, 15]), st.sampled_from([0, 16, 255])))
            f.update(mask=mask, fixed=(draw(mode) if mask & 1 else 0, draw(ident) if mask & 2 else 0,
                                       draw(ident) if mask & 4 else 0,
                                       draw(st.integers(-2**63, 2**63 - 1)) if mask & 8 else 0))
        elif kind in (OpKind.RENAME, OpKind.HARDLINK):
            f.update(path2=draw(path))
        elif kind == OpKind.SYMLINK:
            f.update(path2=draw(link_target))
        elif kind == OpKind.TASK:
            f.update(path=draw(mostly(st.just(b"t"), st.sampled_from([b"", b"x" * 2000]))),
                     data=draw(task_payload))
        elif kind == OpKind.MARK:
            f.update(path=draw(st.sampled_from([b"ignored-delete", b"orphan-move", b"", b"m"])),
                     data=draw(mark_payload))
        return kind, f
    return one()


def as_op(seq, kind, f) -> Op:
    """The same op as an Op tuple, for the project's encoder."""
    fixed = f["fixed"]
    offset = fixed[0] if kind == OpKind.WRITE else 0
    size = fixed[0] if kind == OpKind.TRUNCATE else 0
    mode = fixed[0] if kind in (OpKind.CREATE, OpKind.MKDIR, OpKind.SETATTR) else 0
    uid, gid, mtime = fixed[1:4] if kind == OpKind.SETATTR else (0, 0, 0)
    return Op(seq, kind, f["path"], f["path2"], offset, size, mode, uid, gid, mtime, f["mask"], f["data"])


_NAMES = [b"a", b"b", b"c", b"d"]
SETUP = [Op.mkdir(0, n) for n in _NAMES + [b".hidden"]] + [
    Op.create(0, a + b"/" + b) for a in _NAMES for b in _NAMES]
SETUP = [op._replace(seq=i + 1) for i, op in enumerate(SETUP)]


def make_frame(first_seq, drawn) -> bytes:
    """Framed by the project's encoder when it takes the ops, else by hand."""
    try:
        return encode_frame([as_op(first_seq + i, k, f) for i, (k, f) in enumerate(drawn)])
    except (ValueError, TypeError):
        return raw_frame([(first_seq + i, record(k, first_seq + i, **f)) for i, (k, f) in enumerate(drawn)])


def snapshot(top):
    """Everything under ``top`` but the map bases (``base-*``): relative
    path -> (mode, size, start of the content or the link)."""
    out = {}
    for d, dirs, files in os.walk(top):
        if d == str(top):
            dirs[:] = [n for n in dirs if not n.startswith("base-")]
        for name in dirs + files:
            p = os.path.join(d, name)
            st_ = os.lstat(p)
            if os.path.islink(p):
                what = os.readlink(p)
            elif os.path.isfile(p):
                with open(p, "rb") as fh:
                    what = fh.read(1 << 16)
            else:
                what = None
            out[os.path.relpath(p, top)] = (st_.st_mode, st_.st_size, what)
    return out


def refusals(endpoint):
    return [e for e in endpoint.errors if isinstance(e, (FrameError, wire.ProtocolError))]


def until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def thread_deaths():
    """Exceptions that ended a thread during the test."""
    died = []
    old = threading.excepthook
    threading.excepthook = lambda args: died.append(args)
    yield died
    threading.excepthook = old


def test_fuzzed_ops_through_a_real_link(tmp_path_factory, thread_deaths):
    top = tmp_path_factory.mktemp("fuzz")
    outside = top / "outside"
    outside.mkdir()
    (outside / "x").write_text("outside file")
    (top / "sentinel").write_text("untouched")
    taskdir = top / "tasks"                 # tasks run here: their payloads are fuzzed too
    taskdir.mkdir()
    (taskdir / "x").write_text("#!/bin/sh\ntrue\n")
    (taskdir / "x").chmod(0o755)
    tasks = TargetTasks(TaskPolicy(True, str(taskdir)), group_wait=5)
    before = snapshot(top)
    examples = {"frames": 0, "refused": 0, "applied": 0, "apply-error": 0}

    bad_task = (11, {"path": b"t", "path2": b"", "data": b"\x90", "fixed": (), "mask": 0})

    @FUZZ
    # found by a long run: the link closed while the target was acknowledging
    # (frames not read yet are lost, as on any cut; the source sends them again)
    @example(frames=[[bad_task], [bad_task],
                     [(1, {"path": b"c/a/a", "path2": b"", "data": b"", "fixed": (0,), "mask": 0})],
                     [(3, {"path": b"a", "path2": b"", "data": b"", "fixed": (0o644,), "mask": 0})]])
    @given(st.lists(st.lists(ops_strategy(os.fsencode(outside)), min_size=1, max_size=5),
                    min_size=1, max_size=4))
    def run(frames):
        base = tempfile.mkdtemp(dir=top, prefix="base-")
        state = tempfile.mkdtemp(prefix="fuzz-state-")
        target = TargetConnection(1, base, state, memory_limit=1 << 20, tasks=tasks)
        endpoint = Endpoint(target)
        try:
            link, seq = endpoint.open()
            # a tree for the ops to find: fewer of them fail on a missing file
            link.send(wire.MsgType.FRAME, encode_frame(SETUP))
            seq = valid_last = len(SETUP)
            refused = 0
            for drawn in frames:
                frame = make_frame(seq + 1, drawn)
                try:
                    _journal_py.decode_frame(frame)
                    valid = True
                except FrameError:
                    valid = False
                examples["frames"] += 1
                link.send(wire.MsgType.FRAME, frame)
                if valid:
                    seq = valid_last = seq + len(drawn)
                    continue
                # a refused frame: an ERROR naming the op, then the link ends
                refused += 1
                examples["refused"] += 1
                while True:
                    mtype, body = link.recv()
                    if mtype == wire.MsgType.ERROR:
                        break
                error = json.loads(bytes(body))["error"]
                assert "refused" in error and "(seq " in error, error
                link.close()
                assert until(lambda refused=refused: len(refusals(endpoint)) == refused)
                link, last = endpoint.open()
                assert last == seq
            # (a link closed before the target read every frame loses the
            # rest: the source would send them again)
            assert until(lambda: target.received_seq >= valid_last), target.status()
            link.close()
            # every valid frame applied, or the connection says why not
            assert until(lambda: target.applied_seq >= valid_last or target.state == "apply-error"), \
                target.status()
            examples["apply-error" if target.state == "apply-error" else "applied"] += 1
            assert target._applier_thread.is_alive()
            # what ended a receiver: a refused frame, or this side hanging up
            # while the target still had something to say
            assert all(isinstance(e, (FrameError, wire.ProtocolError, ConnectionError))
                       for e in endpoint.errors), endpoint.errors
            assert len(refusals(endpoint)) == refused
        finally:
            endpoint.close()
            target.close()
            shutil.rmtree(state, ignore_errors=True)
        # nothing outside this map base changed
        assert snapshot(top) == before, "something outside the map base changed"
        shutil.rmtree(base, ignore_errors=True)

    run()
    assert not thread_deaths, [(d.thread.name, d.exc_value) for d in thread_deaths]
    assert examples["refused"] and examples["frames"] > examples["refused"], examples
    print(f"\nfuzz: {examples}")


# -- raw bytes into the decoder ------------------------------------------------------

def outcome(impl, buf):
    try:
        ops, n = impl.decode_frame(buf)
        return [tuple(op[:11]) + (bytes(op[11]),) for op in ops], n
    except FrameError:
        return "FrameError"


@settings(max_examples=max(EXAMPLES * 10, 200), deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_into_decode_frame(buf):
    a = outcome(_journal, buf)
    assert a == outcome(_journal_py, buf)


@settings(max_examples=max(EXAMPLES * 10, 200), deadline=None)
@given(op_lists(), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1,
                            max_size=6), st.booleans())
@pytest.mark.slow
def test_damaged_frames_behind_valid_checksums(ops, damage, compress):
    frame = bytearray(_journal.encode_frame(ops, compress))
    for at, value in damage:
        frame[56 + at % max(1, len(frame) - 56) if len(frame) > 56 else at % len(frame)] = value
    frame = reseal(bytes(frame))
    assert outcome(_journal, frame) == outcome(_journal_py, frame)
