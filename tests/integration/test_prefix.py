"""Prefix consistency (invariant 2) with real processes: a workload through
the library capture API streams to a target daemon; the target is SIGKILLed
at random moments, the link is cut, the source process is SIGKILLed; each
time the target tree must equal the source state after some prefix of the
recorded ops, and after restarts everything converges."""
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from smirror.capture.recorder import Recorder
from smirror.daemon import handshake
from smirror.stream import wire
from smirror.stream.journal import ConnectionJournal
from smirror.stream.sender import Sender
from support.daemons import PASSWORD, Node
from support.prefixcheck import PrefixChecker, read_applied
from support.treestate import diff, snapshot
from support.workload import Workload


@pytest.fixture
def target(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    node = Node(tmp_path, "target", env)
    node.add_user("repl", "replication")
    node.start()
    yield node
    if node.proc.poll() is None:
        node.kill(signal.SIGTERM)


def applied_file(node, source="checker", conid=1):
    return node.dir / "state" / "targets" / source / f"target-{conid}" / "applied"


def wait_applied(node, seq, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if read_applied(applied_file(node)) >= seq:
                return True
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    return False


def test_target_sigkill_and_cuts_keep_prefix_consistency(tmp_path, target, queue_impl):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    checker = PrefixChecker()
    queue = queue_impl(str(tmp_path / "squeue"), 4 << 20, 1 << 30)
    journal = ConnectionJournal(queue, max_ops=32)

    def emit(op):
        seq = journal.append(op)
        checker.record(op._replace(seq=seq))

    def dial():
        link = wire.connect("127.0.0.1", target.port)
        handshake.login(link, "repl", PASSWORD, purpose="data")
        return link

    sender = Sender(1, str(dst), journal, dial, source_name="checker", retry_interval=0.05).start()
    rng = random.Random(5)
    w = Workload(Recorder(src, emit), seed=21, max_write=40_000)
    checked = []
    try:
        for _ in range(4):
            before = journal.last_seq
            w.run(rng.randint(60, 160))
            journal.flush()
            # kill once the target is into this batch: somewhere mid-stream
            assert wait_applied(target, before + 1), target.log()[-3000:]
            time.sleep(rng.uniform(0.0, 0.01))
            target.kill()                             # SIGKILL: whatever it was doing
            applied = read_applied(applied_file(target)) if applied_file(target).exists() else 0
            checked.append(checker.check(dst, applied) if applied else 0)
            target.start()
        for _ in range(3):                            # and cut links
            w.run(60)
            journal.flush()
            time.sleep(0.01)
            sender.cut()
        journal.flush()
        assert wait_applied(target, journal.last_seq), target.log()[-3000:]
        assert diff(snapshot(src), snapshot(dst)) == []
        assert len(checker.ops) == journal.last_seq
        assert any(0 < n < len(checker.ops) for n in checked), checked   # kills hit mid-stream
    finally:
        sender.stop()
        queue.close()


SOURCE_SCRIPT = textwrap.dedent("""
    import os, pickle, sys, time
    sys.path.insert(0, sys.argv[5])
    from smirror.daemon import handshake
    from smirror.stream import wire
    from smirror.capture.recorder import Recorder
    import importlib
    from smirror.stream.journal import ConnectionJournal
    from smirror.stream.sender import Sender
    from support.workload import Workload
    src, dst, port, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    SpillQueue = importlib.import_module(sys.argv[6]).SpillQueue   # either twin
    queue = SpillQueue(os.path.join(os.path.dirname(log), "squeue"), 1 << 20, 1 << 30)
    journal = ConnectionJournal(queue, max_ops=16)
    out = open(log, "ab")
    def emit(op):
        seq = journal.append(op)
        # recorded before it can reach the target: the checker sees every op
        pickle.dump(tuple(op._replace(seq=seq)[:11]) + (bytes(op.data),), out)
        out.flush()
    def dial():
        link = wire.connect("127.0.0.1", port)
        handshake.login(link, "repl", os.environ["PW"], purpose="data")
        return link
    Sender(1, dst, journal, dial, source_name="checker", retry_interval=0.05).start()
    w = Workload(Recorder(src, emit), seed=31, max_write=40_000)
    print("running", flush=True)
    while True:
        w.step()
        time.sleep(0.001)
""")


def test_source_sigkill_leaves_a_prefix(tmp_path, target, queue_impl):
    from smirror.ops import Op
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    log = tmp_path / "ops.pickle"
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # support/
    proc = subprocess.Popen([sys.executable, "-c", SOURCE_SCRIPT, str(src), str(dst), str(target.port),
                             str(log), tests, queue_impl.__module__], env={**os.environ, "PW": PASSWORD},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "running", proc.stderr.read()
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    time.sleep(0.5)                                   # the target applies what it holds
    target.kill()
    checker = PrefixChecker()
    with open(log, "rb") as f:
        while True:
            try:
                checker.record(Op(*pickle.load(f)))
            except (EOFError, pickle.UnpicklingError):
                break                                 # the kill may cut the last record
    applied = read_applied(applied_file(target))
    assert 0 < applied <= len(checker.ops)
    n = checker.check(dst, applied)
    assert n >= applied
