"""No thread fails silently: capture, sender and applier failures are
logged with their traceback, shown in status, and recovered from (a capture
restart resyncs the set, the applier holds environment errors and skips
divergences, asking the source for a resync); ``smirror replicate`` exits
non-zero with the reason when it cannot recover."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from smirror.capture.watch import FAULT_ENV, TreeCapture
from smirror.ops import Op
from smirror.replication import Replication
from smirror.stream.receiver import TargetConnection
from support.daemons import Node
from support.treestate import diff, snapshot


def wait_for(cond, timeout=30.0, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or cond}")


def same(src, dst):
    return not diff(snapshot(src), snapshot(dst))


@pytest.fixture
def dirs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    return src, tmp_path / "dst", tmp_path / "state"


# -- capture -----------------------------------------------------------------
def test_a_file_that_became_a_directory_is_a_change_not_a_crash(tmp_path):
    """The real trigger of the adversarial run: a modified file replaced by
    a directory before its change is read (preadv on a directory raised
    IsADirectoryError and killed the capture thread)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"x" * 10_000)
    ops = []
    cap = TreeCapture(root, ops.append, verify_interval=None)
    try:
        cap.load_target(root)
        with open(root / "f", "ab") as fh:
            fh.write(b"more")
        cap.poll(0.5)               # MODIFIED: pending, settle not reached
        os.unlink(root / "f")
        os.mkdir(root / "f")
        (root / "f" / "inside").write_bytes(b"in")
        cap._dirty[b"f"] = 0.0      # what a late MODIFIED/CLOSE leaves
        cap._flush_dirty(force=True)    # raised IsADirectoryError before the fix
        cap.sync()
        kinds = [(op.kind.name, bytes(op.path)) for op in ops]
        assert ("MKDIR", b"f") in kinds and ("CREATE", b"f/inside") in kinds, kinds
        assert cap.stats["failures"] == 0 and cap.state == "running"
    finally:
        cap.close()


def test_file_replaced_by_a_directory_during_a_write_burst_converges(dirs):
    src, dst, state = dirs
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            try:
                fd = os.open(src / "burst", os.O_WRONLY | os.O_APPEND)   # never creates it
            except OSError:
                continue
            try:
                os.write(fd, b"%d\n" % i)
            except OSError:
                pass
            finally:
                os.close(fd)
            i += 1

    with Replication(src, dst, state_dir=state) as rep:
        t = threading.Thread(target=writer)
        t.start()
        try:
            for _ in range(5):
                (src / "burst").write_bytes(b"start\n")
                time.sleep(0.05)
                os.unlink(src / "burst")
                os.mkdir(src / "burst")
                (src / "burst" / "x").write_bytes(b"dir now")
                time.sleep(0.05)
                shutil.rmtree(src / "burst")
            (src / "burst").write_bytes(b"a file again\n")
        finally:
            stop.set()
            t.join()
        wait_for(lambda: rep.wait(5) and same(src, dst), 60, "convergence")
        st = rep.status()
        assert st["capture"]["state"] == "running" and st["capture"]["failures"] == 0, st
        assert rep.failure() == ""


def test_capture_failure_is_logged_shown_and_restarted_with_a_resync(dirs, monkeypatch, caplog):
    """No real trigger is left for the capture's catch-all: a test-only
    fault ($SMIRROR_TEST_CAPTURE_FAULT) fails the handling of one event."""
    src, dst, state = dirs
    monkeypatch.setenv(FAULT_ENV, "boom")
    caplog.set_level(logging.ERROR, logger="smirror")
    with Replication(src, dst, state_dir=state) as rep:
        (src / "boom").write_bytes(b"the event of this file fails")
        (src / "after").write_bytes(b"changed while the capture restarts")
        wait_for(lambda: rep.tree_capture.stats["failures"] >= 1, 20, "the failure")
        assert "injected fault" in rep.tree_capture.error
        st = rep.status()
        assert "injected fault" in st["capture"]["error"]
        # the restart's resync sends what the failed handling missed
        wait_for(lambda: rep.tree_capture.state == "running" and rep.wait(5) and same(src, dst),
                 30, "convergence after the restart")
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "restarting with a resync" in text
    tb = [r for r in caplog.records if r.exc_info and "injected fault" in str(r.exc_info[1])]
    assert tb, "the traceback is logged"


def test_replicate_exits_non_zero_when_the_capture_cannot_recover(dirs):
    src, dst, state = dirs
    env = {**os.environ, FAULT_ENV: "boom"}
    proc = subprocess.Popen([sys.executable, "-m", "smirror", "replicate", str(src), str(dst),
                             "--state-dir", str(state), "--interval", "0.2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.isdir(dst) or proc.poll() is not None, 30, "start")
        deadline = time.monotonic() + 60
        i = 0
        while proc.poll() is None and time.monotonic() < deadline:
            (src / "boom").write_bytes(b"%d" % i)     # every event of it fails
            i += 1
            time.sleep(0.2)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, (out, err)
    assert "capture stopped" in err and "injected fault" in err       # the log, with the traceback
    assert "Traceback" in err
    assert "smirror replicate: error: capture of" in err


# -- sender ------------------------------------------------------------------
def test_sender_failure_is_logged_and_the_connection_resumes(dirs, caplog):
    """No real trigger: a test-only wrapper makes one frame send raise."""
    src, dst, state = dirs
    caplog.set_level(logging.ERROR, logger="smirror")
    with Replication(src, dst, state_dir=state, capture="api") as rep:
        wait_for(lambda: rep.sender.connects == 1, 10, "the first link")
        real_dial = rep.sender.dial
        failed = []

        def dial():
            link = real_dial()
            real_send = link.send

            def send(mtype, payload=b"", flags=0):
                if not failed and mtype.name == "FRAME":
                    failed.append(1)
                    raise RuntimeError("injected send failure (test only)")
                return real_send(mtype, payload, flags)
            link.send = send
            return link
        rep.sender.dial = dial
        rep.sender.cut()
        rep.journal.create("a")
        rep.journal.write("a", 0, b"data")
        assert rep.wait(30), rep.status()
        assert (dst / "a").read_bytes() == b"data"
        assert failed and rep.sender.connects >= 3     # the failed link was replaced
        assert "injected send failure" in rep.sender.last_error or rep.sender.state == "connected"
    assert any(r.exc_info and "injected send failure" in str(r.exc_info[1]) for r in caplog.records)


# -- applier -----------------------------------------------------------------
def _target(tmp_path):
    return TargetConnection(1, tmp_path / "base", tmp_path / "tstate")


def _put(tgt, ops):
    from smirror.kernels.frames import encode_frame
    frame = encode_frame(ops)
    tgt.queue.put(ops[-1].seq, frame)
    with tgt._handoff:
        tgt._puts += 1
        tgt._handoff.notify_all()


def test_a_diverged_op_is_skipped_and_a_resync_of_the_smallest_subtree_is_asked(tmp_path):
    tgt = _target(tmp_path)
    try:
        (tmp_path / "base" / "present").mkdir()
        _put(tgt, [Op.create(1, b"present/missing/deeper/file", 0o644),   # parent missing
                   Op.write(2, b"present/missing/deeper/file", 0, b"x"),
                   Op.mkdir(3, b"ok", 0o755),
                   Op.create(4, b"ok/f", 0o644)])
        assert tgt.wait_applied(4, 10), tgt.status()
        st = tgt.status()
        # the WRITE fails the same way: skipped, not asked again while the
        # first resync is pending
        assert st["resyncs"]["ops_skipped"] == 2 and st["resyncs"]["asked"] == 1, st
        assert (tmp_path / "base" / "ok" / "f").exists()
        assert st["error"] == "" and st["state"] != "apply-error"
        asked = [n for n in tgt._notices if "resync" in n]
        assert [n["resync"] for n in asked] == ["present/missing"], asked
        # the resync's end clears it
        from smirror.capture.watch import MARK_RESYNC_DONE
        _put(tgt, [Op.mark(5, MARK_RESYNC_DONE, json.dumps({"path": "present/missing"}).encode())])
        assert tgt.wait_applied(5, 10)
        assert tgt.status()["resyncs"]["done"] == 1 and tgt.status()["resyncs"]["pending"] == 0
    finally:
        tgt.close()


def test_an_op_that_raises_unexpectedly_does_not_kill_the_applier(tmp_path, caplog):
    """A TASK whose hook raises (issue 12: a bad TASK killed the applier)."""
    caplog.set_level(logging.ERROR, logger="smirror")

    def bad_task(op):
        raise TypeError("task hook broken (test)")
    tgt = TargetConnection(1, tmp_path / "base", tmp_path / "tstate", on_task=bad_task)
    try:
        _put(tgt, [Op.task(1, b"t", b"{}"), Op.mkdir(2, b"after", 0o755)])
        assert tgt.wait_applied(2, 10), tgt.status()
        assert (tmp_path / "base" / "after").is_dir()
        assert tgt._applier_thread.is_alive()
        assert tgt.status()["resyncs"]["ops_skipped"] == 1
    finally:
        tgt.close()
    assert any(r.exc_info and "task hook broken" in str(r.exc_info[1]) for r in caplog.records)


def test_an_environment_error_holds_the_op_until_fixed(tmp_path):
    """A real EPERM: the file on the target is immutable (chattr +i)."""
    if os.geteuid() != 0 or not shutil.which("chattr"):
        pytest.skip("needs root and chattr")
    tgt = _target(tmp_path)
    f = tmp_path / "base" / "locked"
    f.write_bytes(b"old")
    if subprocess.run(["chattr", "+i", str(f)], capture_output=True).returncode:
        pytest.skip("this filesystem has no immutable flag")
    try:
        _put(tgt, [Op.write(1, b"locked", 0, b"new"), Op.mkdir(2, b"after", 0o755)])
        wait_for(lambda: tgt.status()["state"] == "apply-error", 10, "apply-error")
        st = tgt.status()
        assert "Operation not permitted" in st["error"] and st["seq_applied"] == 0, st
        time.sleep(1.5)                      # retried, still held, nothing after it
        assert not (tmp_path / "base" / "after").exists()
        assert tgt.status()["resyncs"]["ops_skipped"] == 0
        subprocess.run(["chattr", "-i", str(f)], check=True)
        assert tgt.wait_applied(2, 10), tgt.status()
        assert f.read_bytes() == b"new" and (tmp_path / "base" / "after").is_dir()
        st = tgt.status()
        assert st["error"] == "" and st["state"] != "apply-error", st
    finally:
        subprocess.run(["chattr", "-i", str(f)], capture_output=True)
        tgt.close()


def test_a_target_changed_behind_its_back_is_repaired_by_a_targeted_resync(dirs):
    """A real divergence: a directory removed on the target; the next
    changes in it fail there (missing parent), are skipped, and the source
    sends the directory again."""
    src, dst, state = dirs
    (src / "d").mkdir()
    (src / "d" / "old").write_bytes(b"old file")
    (src / "other").write_bytes(b"o")
    with Replication(src, dst, state_dir=state) as rep:
        shutil.rmtree(dst / "d")
        (src / "d" / "new").write_bytes(b"new file")
        (src / "d" / "old").write_bytes(b"old file, changed")
        wait_for(lambda: rep.wait(5) and same(src, dst), 30, "convergence")
        st = rep.status()
        assert st["resyncs"]["asked"] >= 1 and st["resyncs"]["done"] >= 1, st
        assert st["target_error"] == ""
        assert rep.tree_capture.stats.get("resyncs_served", 0) >= 1


# -- the daemon: the traceback reaches log_file, status shows it -------------
@pytest.fixture
def nodes(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), FAULT_ENV: "boom"}
    source = Node(tmp_path, "source", env, links_user="repl")
    target = Node(tmp_path, "target", env)
    source.add_user("admin", "admin")
    target.add_user("repl", "replication")
    source.start()
    target.start()
    yield source, target, env, tmp_path
    for n in (source, target):
        if n.proc and n.proc.poll() is None:
            n.kill(signal.SIGTERM)


def test_daemon_capture_failure_reaches_the_log_file_and_status(nodes):
    from support.daemons import PASSWORD, smirror
    source, target, env, tmp = nodes
    src, dst = tmp / "data", tmp / "replica"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    smirror("login", source.address, "--user", "admin", "--password-env", "PW",
            env={**env, "PW": PASSWORD})
    source.cli("repset", "create", "data", "--root", src)
    source.cli("connect", "data", "to", target.address, "map", "base", dst)
    wait_for(lambda: same(src, dst), 30, "the first mirror")
    (src / "boom").write_bytes(b"fails")
    (src / "b").write_bytes(b"b")

    def capture_state():
        st = json.loads(source.cli("status", "--json").stdout)["sources"][0]
        return st
    wait_for(lambda: "injected fault" in source.log(), 30, "the log")
    log_text = source.log()
    assert "Traceback" in log_text and "restarting with a resync" in log_text
    st = capture_state()
    assert st["capture"]["failures"] >= 1 and "injected fault" in st["capture"]["error"], st
    wait_for(lambda: same(src, dst), 30, "convergence after the restart")


def test_daemon_divergence_is_resynced_for_that_connection(nodes):
    """Two daemons: a directory removed on the target behind its back; the
    next changes in it fail there and the source daemon's capture sends the
    directory again (RepsetCapture.request_resync) through the stream."""
    from support.daemons import PASSWORD, smirror
    source, target, env, tmp = nodes
    src, dst = tmp / "data", tmp / "replica"
    (src / "d").mkdir(parents=True)
    (src / "d" / "old").write_bytes(b"old")
    smirror("login", source.address, "--user", "admin", "--password-env", "PW",
            env={**env, "PW": PASSWORD})
    source.cli("repset", "create", "data", "--root", src)
    source.cli("connect", "data", "to", target.address, "map", "base", dst)
    wait_for(lambda: same(src, dst), 30, "the first mirror")
    shutil.rmtree(dst / "d")
    (src / "d" / "new").write_bytes(b"new")
    (src / "d" / "old").write_bytes(b"old, changed")
    wait_for(lambda: same(src, dst), 30, "convergence")
    st = json.loads(source.cli("status", "--json").stdout)["sources"][0]
    assert st["resyncs_asked"] >= 1 and st["capture"]["resyncs_served"] >= 1, st
    assert "asks for a resync" in source.log()


def test_a_resync_request_for_a_path_outside_the_set_is_refused(tmp_path, caplog):
    root = tmp_path / "root"
    root.mkdir()
    ops = []
    cap = TreeCapture(root, ops.append, verify_interval=None)
    try:
        for bad in (b"", b"/etc", b"../x", b"a/../../x", b"a//b"):
            cap.request_resync(bad)
        assert cap._requests == []
        assert "not a path inside the set" in caplog.text
        (root / "d").mkdir()
        cap.request_resync(b"d")
        cap._serve_requests()
        kinds = [op.kind.name for op in ops]
        assert kinds[-1] == "MARK" and "MKDIR" in kinds
    finally:
        cap.close()


def test_ack_reader_failure_is_logged_and_the_link_is_redone(dirs, caplog):
    """No real trigger: a test-only wrapper makes handling one ACK raise."""
    src, dst, state = dirs
    caplog.set_level(logging.ERROR, logger="smirror")
    with Replication(src, dst, state_dir=state, capture="api") as rep:
        wait_for(lambda: rep.sender.connects == 1, 10, "the first link")
        real = rep.sender._set_acked
        failed = []

        def set_acked(seq):
            if not failed:
                failed.append(seq)
                raise RuntimeError("injected ack failure (test only)")
            return real(seq)
        rep.sender._set_acked = set_acked
        rep.journal.create("a")
        rep.journal.write("a", 0, b"data")
        assert rep.wait(30), rep.status()
        assert failed and rep.sender.connects >= 2
    assert any(r.exc_info and "injected ack failure" in str(r.exc_info[1]) for r in caplog.records)
