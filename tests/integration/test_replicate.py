"""Embedded replication end to end: watcher or API capture, the real stream
over a socket, durable target queue, applier."""
import json
import os
import time

import pytest

from smirror.capture.recorder import Recorder
from smirror.errors import MirrorError
from smirror.replication import Replication
from support.treestate import diff, snapshot
from support.workload import Workload


@pytest.fixture
def dirs(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "existing").write_bytes(os.urandom(50_000))
    return src, tmp_path / "dst", tmp_path / "state"


def test_watch_mode_initial_mirror_then_live_changes(dirs):
    src, dst, state = dirs
    with Replication(src, dst, state_dir=state) as rep:
        assert diff(snapshot(src), snapshot(dst)) == []       # the initial mirror
        # changes made by other programs, seen by the watcher, at a pace of
        # about a thousand operations a second (a rename storm at full speed
        # can still outrun it: see the closing note of this work)
        w = Workload(Recorder(src, lambda op: None), seed=7, max_write=20_000)
        for _ in range(300):
            w.step()
            time.sleep(0.001)
        assert rep.wait(60), rep.status()
        assert diff(snapshot(src), snapshot(dst)) == []
        st = rep.status()
        assert st["seq_applied"] == st["seq_captured"] > 0


def test_api_mode_exact_order(dirs):
    src, dst, state = dirs
    marks = []
    with Replication(src, dst, state_dir=state, capture="api") as rep:
        rep.target.applier.on_mark = lambda op: marks.append(bytes(op.path))
        w = Workload(rep.journal, seed=8)
        for i in range(10):
            w.run(30)
            rep.journal.mark(f"m{i}")
        assert rep.wait(60), rep.status()
        assert diff(snapshot(src), snapshot(dst)) == []
    assert marks == [f"m{i}".encode() for i in range(10)]


def test_restart_resumes(dirs):
    src, dst, state = dirs
    with Replication(src, dst, state_dir=state, capture="api") as rep:
        Workload(rep.journal, seed=9).run(100)
    # changes while nothing replicates; the next start's mirror catches up
    (src / "offline-change").write_text("made while stopped")
    with Replication(src, dst, state_dir=state, capture="api") as rep:
        Workload(rep.journal, seed=10).run(50)
        assert rep.wait(60)
    assert diff(snapshot(src), snapshot(dst)) == []


def test_bad_roots(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(MirrorError):
        Replication(tmp_path / "missing", tmp_path / "dst", state_dir=tmp_path / "s")
    with pytest.raises(MirrorError):
        Replication(tmp_path / "src", tmp_path / "src" / "inner", state_dir=tmp_path / "s")


def test_replicate_command_runs_and_stops_on_sigterm(dirs):
    import signal
    import subprocess
    import sys
    src, dst, state = dirs
    proc = subprocess.Popen([sys.executable, "-m", "smirror", "replicate", str(src), str(dst),
                             "--state-dir", str(state), "--interval", "0.2", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()          # the first status line: running
        assert '"state"' in line, proc.stderr.read()
        (src / "live.txt").write_text("written while replicating")
        (src / "sub" / "existing").rename(src / "moved")
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert diff(snapshot(src), snapshot(dst)) == []


def test_demo_command(tmp_path):
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "smirror", "demo", "--dir", str(tmp_path),
                          "--size-mb", "4", "--json"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["full"]["created"] > 200
    second = result["different_checksum"]
    assert second["changed"] == 21 and second["created"] == 0
    assert diff(snapshot(tmp_path / "source"), snapshot(tmp_path / "target")) == []


@pytest.mark.slow
def test_restart_with_a_target_backlog_does_not_replay_it_over_the_fresh_mirror(dirs):
    src, dst, state = dirs
    with Replication(src, dst, state_dir=state, capture="api") as rep:
        rep.journal.create("f")
        rep.journal.write("f", 0, b"first")
        assert rep.wait(30)
        rep.pause_target()
        rep.journal.write("f", 0, b"stale")     # received, durable, not applied
        rep.journal.create("gone")
        rep.sync()
        assert rep.sender.wait_acked(rep.journal_sink.last_seq, 30)
        rep.stop(drain=False)
    assert rep.target.queue.count == 0 or True
    (src / "f").write_bytes(b"fresh")           # changed while nothing replicates
    os.unlink(src / "gone")
    with Replication(src, dst, state_dir=state, capture="api") as rep:
        assert rep.dropped_backlog >= 1
        rep.journal.create("after")
        assert rep.wait(30), rep.status()
        assert (dst / "f").read_bytes() == b"fresh"
        assert not (dst / "gone").exists()
    assert diff(snapshot(src), snapshot(dst)) == []


def test_a_second_stop_does_nothing(dirs):
    """The with block's exit after an explicit stop: nothing waits again
    (it waited out the drain's 30 s timeout on a target left paused)."""
    src, dst, state = dirs
    with Replication(src, dst, state_dir=state, capture="api") as rep:
        rep.pause_target()
        rep.journal.create("f")
        rep.stop(drain=False)
        waits = []
        rep.wait = lambda *a, **k: waits.append(a) or False
    assert waits == []
    rep.stop()
    assert waits == []


def _without_dac_override():
    """The command prefix that runs a process as root without the
    capabilities that read any file (a mode 000 file is then unreadable):
    None when setpriv or root is missing."""
    import shutil as sh
    if os.geteuid() != 0 or not sh.which("setpriv"):
        return None
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
            "--inh-caps", "-dac_override,-dac_read_search"]


def test_unreadable_file_is_reported_by_name_retried_and_never_sent_empty(dirs):
    import json
    import subprocess
    import sys
    prefix = _without_dac_override()
    if prefix is None:
        pytest.skip("needs root and setpriv to make a file unreadable")
    src, dst, state = dirs
    (src / "ok").write_bytes(b"fine")
    secret = src / "secret"
    secret.write_bytes(b"private bytes")
    secret.chmod(0)
    proc = subprocess.Popen(prefix + [sys.executable, "-m", "smirror", "replicate", str(src), str(dst),
                                      "--state-dir", str(state), "--json", "--interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def status():
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            return json.loads(line)
        st = status()
        deadline = time.monotonic() + 30
        while "secret" not in st["capture"]["unreadable"] and time.monotonic() < deadline:
            st = status()
        assert "secret" in st["capture"]["unreadable"], st
        assert "secret" in st["error"] and "Permission denied" in st["error"]
        assert (dst / "ok").read_bytes() == b"fine"
        assert not (dst / "secret").exists()        # never an empty file in its place
        # a new unreadable file made while replicating: the same
        fd = os.open(src / "new-secret", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0)   # mode 000 from the start
        os.write(fd, b"more private bytes")
        os.close(fd)
        deadline = time.monotonic() + 30
        while "new-secret" not in st["capture"]["unreadable"] and time.monotonic() < deadline:
            st = status()
        assert "new-secret" in st["capture"]["unreadable"], st
        assert not (dst / "new-secret").exists()
        # readable again: retried and sent
        secret.chmod(0o600)
        os.chmod(src / "new-secret", 0o600)
        deadline = time.monotonic() + 30
        while (st["capture"]["unreadable"] or not (dst / "new-secret").exists()) \
                and time.monotonic() < deadline:
            st = status()
        assert st["capture"]["unreadable"] == {} and st["error"] == "", st
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert "cannot read" in err and "secret" in err
    assert proc.returncode == 0, err
    assert (dst / "secret").read_bytes() == b"private bytes"
    assert (dst / "new-secret").read_bytes() == b"more private bytes"


def test_replicate_starts_on_a_live_tree_with_a_busy_log(dirs):
    """A log appended every 2 ms while the initial mirror copies it: the
    start does not fail; the log is followed by the capture."""
    import threading
    src, dst, state = dirs
    log = src / "busy.log"
    log.write_bytes(os.urandom(32 << 20))           # long enough to change under the copy
    stop = threading.Event()

    def appender():
        i = 0
        while not stop.is_set():
            with open(log, "ab") as f:
                f.write(b"line %d\n" % i)
            i += 1
            time.sleep(0.002)
    t = threading.Thread(target=appender)
    t.start()
    try:
        rep = Replication(src, dst, state_dir=state).start()
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if rep.wait(5) and diff(snapshot(src), snapshot(dst)) == []:
                break
        assert diff(snapshot(src), snapshot(dst)) == []
        assert rep.status()["error"] == ""
    finally:
        rep.stop()


def test_replicate_second_ctrl_c_stops_at_once_without_a_traceback(dirs):
    """The drain after the first Ctrl-C cannot end (the target file is
    immutable: the applier holds); the second one stops at once, cleanly."""
    import shutil as sh
    import signal
    import subprocess
    import sys
    if os.geteuid() != 0 or not sh.which("chattr"):
        pytest.skip("needs root and chattr")
    src, dst, state = dirs
    proc = subprocess.Popen([sys.executable, "-m", "smirror", "replicate", str(src), str(dst),
                             "--state-dir", str(state), "--interval", "0.2", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    locked = dst / "sub" / "existing"
    try:
        assert '"state"' in proc.stdout.readline(), proc.stderr.read()
        subprocess.run(["chattr", "+i", str(locked)], check=True)
        (src / "sub" / "existing").write_bytes(b"cannot be applied")
        while True:                     # until the applier holds on it
            st = json.loads(proc.stdout.readline())
            if st["target_error"]:
                break
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None      # draining (it cannot end)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 15
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        proc.kill()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert proc.returncode == 3, err
    assert "the target could not apply" in err and "Operation not permitted" in err


def test_a_restart_deletes_what_was_deleted_while_it_was_down_a_first_run_keeps_dst_files(dirs):
    """Deletes are replicated: a restart's mirror deletes the orphans (what
    SRC lost while replicate was down); a first run only reports them, since
    DST may hold files of its own."""
    src, dst, state = dirs
    dst.mkdir()
    (dst / "mine").write_text("the user's own file, there before the first run")
    (src / "gone-later").write_text("deleted while replicate is down")
    with Replication(src, dst, state_dir=state) as rep:
        assert (dst / "gone-later").exists()
        assert rep.mirror_summary.orphans == [b"mine"]
        (src / "live").write_text("an op, so the target has received something")
        assert rep.wait(60), rep.status()
    (src / "gone-later").unlink()
    with Replication(src, dst, state_dir=state) as rep:
        assert rep.mirror_summary.orphans_deleted == 2
    assert not (dst / "gone-later").exists() and not (dst / "mine").exists()
    assert diff(snapshot(src), snapshot(dst)) == []


def test_names_of_one_inode_the_target_holds_apart_are_linked_at_start(dirs):
    """A hard link made while the initial mirror ran (or while replicate was
    down, with --mirror none): the target holds the names as separate
    files; the start links them."""
    import shutil
    src, dst, state = dirs
    os.link(src / "sub" / "existing", src / "linked")
    shutil.copytree(src, dst, copy_function=shutil.copy2)      # separate copies
    assert os.stat(dst / "linked").st_ino != os.stat(dst / "sub" / "existing").st_ino
    with Replication(src, dst, state_dir=state, mirror="none") as rep:
        assert rep.wait(60), rep.status()
    assert os.stat(dst / "linked").st_ino == os.stat(dst / "sub" / "existing").st_ino
