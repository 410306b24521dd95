"""Task commands inline in the stream: the spec and its checks, the task
directory policy, the barrier across connections, and, end to end in the
embedded engine, a task whose on-execute copies the target tree while the
source keeps changing."""
import json
import os
import threading
import time

import pytest

from smirror.errors import ConfigError
from smirror.replication import Replication
from smirror.stream.tasks import TargetTasks, TaskError, TaskPolicy, TaskResult, TaskSpec, run_command
from support.treestate import diff, snapshot
from support.workload import Workload


def script(directory, name, body):
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def taskdir(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    script(d, "copy-tree", 'cp -a "$SMIRROR_MAP_BASE" "$1"\n'
                           'env | grep ^SMIRROR_ | sort > "$1.env"\n')
    script(d, "fail", "echo something broke >&2; exit 3\n")
    script(d, "slow", "sleep \"$1\"; echo done > \"$2\"\n")
    script(d, "record", 'echo "$SMIRROR_TASK_STAGE $SMIRROR_TASK_NAME" >> "$1"\n')
    return d


# -- spec and policy ---------------------------------------------------------------
def test_spec_round_trip_and_words():
    spec = TaskSpec.build("nightly", on_execute="backup.sh --full 'two words'", on_receive="note",
                          timeout="30s", args=["x"], source="abc")
    back = TaskSpec.decode(spec.encode())
    assert back == spec
    assert back.argv("on_execute") == ["backup.sh", "--full", "two words", "x"]
    assert back.timeout == 30.0 and back.on_queue is None
    assert TaskSpec.build("t", on_execute="x", timeout="forever").timeout is None
    assert TaskSpec.build("t", on_execute="x", timeout=0).timeout == 0


@pytest.mark.parametrize("payload, message", [
    (b"not json", "not task JSON"),
    (b"[1]", "unknown task format"),
    (b'{"v": 9}', "unknown task format"),
    (b'{"v": 1, "name": "t"}', "on_execute"),
    (b'{"v": 1, "name": "t", "on_execute": "rm -rf /"}', "list of words"),
    (b'{"v": 1, "name": "t", "on_execute": ["x"], "timeout": -1}', "bad timeout"),
    (b'{"v": 1, "name": "t", "on_execute": ["x"], "bogus": 1}', "bogus"),
])
def test_bad_payload_is_named(payload, message):
    with pytest.raises(TaskError, match=message):
        TaskSpec.decode(payload, "connection 3 task at seq 9")


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "", "on_execute": "x"}, "task name"),
    ({"name": "t", "on_execute": None}, "--on-execute is required"),
    ({"name": "t", "on_execute": "'unclosed"}, "on-execute command"),
    ({"name": "t", "on_execute": "x", "timeout": "soon"}, "task timeout"),
])
def test_bad_task_requests(kwargs, message):
    with pytest.raises((TaskError, ConfigError), match=message):
        TaskSpec.build(kwargs.pop("name"), **kwargs)


@pytest.mark.parametrize("field, value, message", [
    ("args", [1], "args word 0 must be a string, got 1"),
    ("args", "abc", "args must be a list of strings"),
    ("args", [["nested"]], "args word 0 must be a string"),
    ("args", ["x" * 5000], "args word 0 must be 0-4096 characters"),
    ("args", ["a\0b"], "without NUL"),
    ("name", "", "name must be 1-200 characters"),
    ("name", ["t"], "name must be a string"),
    ("name", "n" * 201, "name must be 1-200 characters"),
    ("on_receive", [], "on_receive must be a non-empty list"),
    ("on_execute", ["x"] * 257, "257 words"),
    ("timeout", True, "bad timeout"),
    ("timeout", -1, "bad timeout"),
    ("timeout", 31 * 86400, "bad timeout"),
    ("timeout", float("nan"), "bad timeout"),
    ("id", 7, "id must be a string"),
    ("source", "s" * 300, "source must be"),
    ("group", [1, True], "group must be a list"),
    ("group", "1,2", "group must be a list"),
    ("queued_at", "now", "bad queued_at"),
    ("queued_at", float("inf"), "bad queued_at"),
])
def test_every_field_of_a_task_payload_is_checked(field, value, message):
    """Each bad field is a TaskError naming it (never a TypeError that would
    reach the applier), from the JSON a source sends."""
    spec = TaskSpec.build("t", on_execute="x").encode()
    payload = json.dumps(dict(json.loads(spec), **{field: value})).encode()
    with pytest.raises(TaskError, match=f"connection 3 task at seq 9: .*{message}"):
        TaskSpec.decode(payload, "connection 3 task at seq 9")


@pytest.mark.parametrize("payload", [b"[" * 100_000 + b"]" * 100_000, rb'{"v": 1, "name": "\ud800"}',
                                     b"\xff\xfe", b'{"v": true}', b"null"])
def test_odd_task_json_is_a_task_error(payload):
    with pytest.raises(TaskError):
        TaskSpec.decode(payload)


def test_build_checks_what_a_request_gives():
    with pytest.raises(TaskError, match="args word 1 must be a string"):
        TaskSpec.build("t", on_execute="x", args=["ok", 2])
    with pytest.raises(TaskError, match="arguments must be a list"):
        TaskSpec.build("t", on_execute="x", args=5)
    with pytest.raises(TaskError, match="bad timeout"):
        TaskSpec.build("t", on_execute="x", timeout="400d")
    assert TaskSpec.decode(TaskSpec.build("t", on_execute="x", timeout="30d").encode()).timeout == 30 * 86400


def test_tasks_see_an_allow_listed_environment(tmp_path, taskdir, monkeypatch):
    """Nothing of the daemon's environment but PATH (fixed), the locale, TZ
    and HOME reaches a task command; its own SMIRROR_* variables do."""
    monkeypatch.setenv("SMIRROR_DAEMON_SECRET", "hunter2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter3")
    monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so.missing")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("LC_ALL", "C")
    monkeypatch.setenv("TZ", "UTC")
    script(taskdir, "dump-env", 'env > "$1"\n')
    out = tmp_path / "env.txt"
    tasks = TargetTasks(TaskPolicy(True, str(taskdir)))
    spec = TaskSpec.build("e", on_execute="dump-env", args=[str(out)], source="src1")
    r = tasks.execute(spec, 1, 7, str(tmp_path))
    assert r.state == "ok", r
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert "hunter2" not in out.read_text() and "hunter3" not in out.read_text()
    assert "LD_PRELOAD" not in env and "SMIRROR_DAEMON_SECRET" not in env
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert env["LC_ALL"] == "C" and env["TZ"] == "UTC"
    import pwd
    assert env["HOME"] == pwd.getpwuid(os.getuid()).pw_dir
    assert env["SMIRROR_TASK_NAME"] == "e" and env["SMIRROR_SEQ"] == "7" and env["SMIRROR_SOURCE"] == "src1"
    allowed = {"PATH", "HOME", "LC_ALL", "TZ", "PWD", "SHLVL", "_", "LANG", "LANGUAGE"}
    assert {k for k in env if not k.startswith(("SMIRROR_", "LC_"))} <= allowed


def test_policy_refuses_what_is_outside_or_disabled(tmp_path, taskdir):
    outside = script(tmp_path, "outside", "true\n")
    os.symlink(outside, taskdir / "escape")
    (taskdir / "plain").write_text("not executable")
    policy = TaskPolicy(True, str(taskdir))

    def resolve(cmd):
        return policy.resolve(TaskSpec.build("t", on_execute=cmd), "on_execute")

    assert resolve("copy-tree /x") == [os.path.realpath(taskdir / "copy-tree"), "/x"]
    assert resolve(str(taskdir / "fail"))[0] == os.path.realpath(taskdir / "fail")
    for cmd, why in [("../outside", "outside the task directory"),
                     (str(outside), "outside the task directory"),
                     ("escape", "outside the task directory"),
                     ("plain", "not an executable file"),
                     ("missing", "not an executable file"),
                     (".", "outside the task directory")]:
        with pytest.raises(TaskError, match=why):
            resolve(cmd)
    with pytest.raises(TaskError, match="task processing is disabled"):
        TaskPolicy(False, str(taskdir)).resolve(TaskSpec.build("t", on_execute="fail"), "on_execute")
    with pytest.raises(TaskError, match="not a directory"):
        TaskPolicy(True, str(tmp_path / "nope")).resolve(TaskSpec.build("t", on_execute="x"), "on_execute")


def test_run_command_results(tmp_path, taskdir):
    policy = TaskPolicy(True, str(taskdir))
    spec = TaskSpec.build("t", on_execute="fail")
    r = run_command(policy.resolve(spec, "on_execute"), env=dict(os.environ), cwd=str(tmp_path),
                    timeout=10, result=TaskResult("t", spec.id, "on_execute"))
    assert (r.state, r.exit) == ("failed", 3) and "something broke" in r.output
    # a timeout passes: the command goes on, its end is recorded later
    done = threading.Event()
    spec = TaskSpec.build("s", on_execute="slow", args=["0.5", str(tmp_path / "flag")])
    r = run_command(policy.resolve(spec, "on_execute"), env=dict(os.environ), cwd=str(tmp_path),
                    timeout=0.05, result=TaskResult("s", spec.id, "on_execute"),
                    on_done=lambda _: done.set())
    assert r.state == "timeout" and not (tmp_path / "flag").exists()
    assert done.wait(10) and r.state == "ok" and r.exit == 0 and (tmp_path / "flag").exists()


def test_barrier_runs_once_when_every_connection_arrived(tmp_path, taskdir):
    log_file = tmp_path / "runs"
    tasks = TargetTasks(TaskPolicy(True, str(taskdir)), group_wait=30)
    spec = TaskSpec.build("snap", on_execute="record", args=[str(log_file)], source="src1")
    spec.group = [1, 2]
    results = {}

    def applier(conid, delay):
        time.sleep(delay)
        results[conid] = (tasks.execute(spec, conid, 10 * conid, str(tmp_path)), time.monotonic())

    threads = [threading.Thread(target=applier, args=(1, 0)),
               threading.Thread(target=applier, args=(2, 0.4))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(0.2)
    assert tasks.waiting() and tasks.waiting()[0]["waiting_for"] == [2]
    assert not log_file.exists()          # connection 2 has not reached it yet
    for t in threads:
        t.join(10)
    assert log_file.read_text() == "on-execute snap\n"     # once, for both
    ran = [r for r, _ in results.values() if r is not None]
    assert len(ran) == 1 and ran[0].state == "ok" and ran[0].conids == [1, 2]
    assert all(t - t0 >= 0.4 for _, t in results.values())  # both waited for the group
    # a late replay of the same task (a restart) does not run it again
    assert tasks.execute(spec, 1, 10, str(tmp_path)) is None
    assert log_file.read_text() == "on-execute snap\n"


def test_barrier_gives_up_waiting_after_group_wait(tmp_path, taskdir):
    log_file = tmp_path / "runs"
    tasks = TargetTasks(TaskPolicy(True, str(taskdir)), group_wait=0.3)
    spec = TaskSpec.build("snap", on_execute="record", args=[str(log_file)])
    spec.group = [1, 2]
    r = tasks.execute(spec, 1, 5, str(tmp_path))
    assert r.state == "ok" and r.conids == [1] and log_file.read_text() == "on-execute snap\n"


# -- end to end, embedded ----------------------------------------------------------
def _writer(rep, src, steps, at, task, seed):
    """One writer: ``steps`` workload steps; at step ``at`` the source state
    is recorded and the task queued (between two writes, as an application
    checkpoint would)."""
    w = Workload(rep.journal, seed=seed, max_write=40_000)
    state = None
    for i in range(steps):
        if i == at:
            state = snapshot(src)
            task()
        w.step()
    return state


def test_on_execute_sees_the_source_state_when_queued(tmp_path, taskdir):
    src, dst, copy = tmp_path / "src", tmp_path / "dst", tmp_path / "copy"
    src.mkdir()
    with Replication(src, dst, capture="api", mirror="none", state_dir=tmp_path / "state",
                     task_dir=taskdir) as rep:
        reply = {}
        state = _writer(rep, src, 600, 300, lambda: reply.update(
            rep.queue_task("checkpoint", on_execute="copy-tree", args=[str(copy)])), seed=5)
        assert rep.wait(60), rep.status()
        assert diff(snapshot(src), snapshot(dst)) == []
        results = {r["stage"]: r for r in rep.tasks()}
    assert results["on_execute"]["state"] == "ok", results
    assert diff(state, snapshot(copy)) == []           # exactly the state when queued
    assert snapshot(copy) != snapshot(src)             # writes went on after it
    env = dict(line.split("=", 1) for line in (tmp_path / "copy.env").read_text().splitlines())
    seq = reply["connections"]["1"]
    assert env["SMIRROR_TASK_NAME"] == "checkpoint" and env["SMIRROR_SEQ"] == str(seq)
    assert env["SMIRROR_CONID"] == "1" and env["SMIRROR_MAP_BASE"] == str(dst)
    assert env["SMIRROR_TASK_STAGE"] == "on-execute" and env["SMIRROR_TASK_ID"] == reply["id"]


def test_later_ops_wait_for_the_task_and_hooks_run_in_order(tmp_path, taskdir):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    stages = tmp_path / "stages"
    with Replication(src, dst, capture="api", mirror="none", state_dir=tmp_path / "state",
                     task_dir=taskdir) as rep:
        rep.journal.create("before")
        rep.queue_task("hold", on_execute=f"slow 1.0 {tmp_path / 'done'}",
                       on_queue=f"record {stages}", on_transmit=f"record {stages}",
                       on_receive=f"record {stages}")
        rep.journal.create("after")
        time.sleep(0.5)
        # the task is running: what was recorded after it is not applied yet
        assert (dst / "before").exists() and not (dst / "after").exists()
        assert rep.target.apply_state == "task"
        assert rep.wait(30)
        assert (dst / "after").exists() and (tmp_path / "done").exists()
    lines = stages.read_text().splitlines()
    assert lines[:2] == ["on-queue hold", "on-transmit hold"] and "on-receive hold" in lines


def test_timeout_zero_does_not_hold_the_stream(tmp_path, taskdir):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    with Replication(src, dst, capture="api", mirror="none", state_dir=tmp_path / "state",
                     task_dir=taskdir) as rep:
        rep.queue_task("bg", on_execute=f"slow 2 {tmp_path / 'done'}", timeout=0)
        rep.journal.create("after")
        assert rep.wait(1.5)
        assert (dst / "after").exists() and not (tmp_path / "done").exists()


def test_refused_and_failing_tasks_do_not_stop_replication(tmp_path, taskdir):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    # no task directory on this engine: every task is refused
    with Replication(src, dst, capture="api", mirror="none", state_dir=tmp_path / "s1") as rep:
        with pytest.raises(TaskError, match="disabled"):
            rep.queue_task("t", on_execute="x", on_queue="x")   # a source hook: refused at once
        rep.queue_task("t", on_execute="copy-tree")
        rep.journal.create("after-refused")
        assert rep.wait(10)
        assert (dst / "after-refused").exists()
        assert [r["state"] for r in rep.tasks() if r["stage"] != "on_queue"][-1] == "refused"
        notices = list(rep.sender.notices)
        assert notices and notices[-1]["state"] == "refused" and "disabled" in notices[-1]["error"]
    with Replication(src, tmp_path / "dst2", capture="api", mirror="none", state_dir=tmp_path / "s2",
                     task_dir=taskdir) as rep:
        rep.queue_task("t", on_execute="fail")
        rep.queue_task("t2", on_execute="../../bin/true")
        rep.journal.create("after-failed")
        assert rep.wait(10)
        assert (tmp_path / "dst2" / "after-failed").exists()
        states = [(r["task"], r["stage"], r["state"]) for r in rep.tasks()]
        assert ("t", "on_execute", "failed") in states
        assert ("t2", "on_receive", "refused") in states and ("t2", "on_execute", "refused") in states
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(rep.sender.notices) < 3:
            time.sleep(0.05)
        got = [(n["task"], n["state"]) for n in rep.sender.notices]
        assert ("t", "failed") in got and ("t2", "refused") in got


def test_watch_capture_task_flushes_pending_changes_first(tmp_path, taskdir):
    src, dst, copy = tmp_path / "src", tmp_path / "dst", tmp_path / "copy"
    src.mkdir()
    with Replication(src, dst, capture="watch", state_dir=tmp_path / "state", task_dir=taskdir) as rep:
        # the watcher is held back while the changes are made: when the task
        # is queued, all of them are still waiting in the kernel's queue
        with rep.tree_capture._lock:
            for i in range(100):
                (src / f"f{i}").write_bytes(os.urandom(20_000))
            (src / "d").mkdir()
            os.rename(src / "f0", src / "d" / "f0")
            (src / "f1").write_bytes(b"rewritten")
            os.unlink(src / "f2")
            rep.queue_task("snap", on_execute="copy-tree", args=[str(copy)])
            state = snapshot(src)          # nothing was written since the task was queued
        for i in range(100, 110):
            (src / f"f{i}").write_bytes(b"later")
        (src / "f3").write_bytes(b"changed later")
        assert rep.wait(30)
        assert diff(snapshot(src), snapshot(dst)) == []
    assert diff(state, snapshot(copy)) == []


def test_paused_target_holds_the_task_until_resume(tmp_path, taskdir):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    runs = tmp_path / "runs"
    with Replication(src, dst, capture="api", mirror="none", state_dir=tmp_path / "state",
                     task_dir=taskdir) as rep:
        rep.pause_target()
        rep.queue_task("snap", on_execute=f"record {runs}")
        rep.journal.create("after")
        assert not rep.wait(1.0)
        assert not runs.exists() and not (dst / "after").exists()
        rep.resume_target()
        assert rep.wait(10)
        assert runs.read_text() == "on-execute snap\n" and (dst / "after").exists()


def test_a_failing_task_pauses_applying_when_configured_to(tmp_path, taskdir):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    with Replication(src, dst, capture="api", mirror="none", state_dir=tmp_path / "state",
                     task_dir=taskdir) as rep:
        rep.target.stop_on_task_failure = True
        rep.queue_task("bad", on_execute="fail")
        rep.journal.create("after")
        assert not rep.wait(1.5)
        st = rep.target.status()
        assert st["apply_state"] == "paused" and "task 'bad' failed" in st["pause_reason"]
        assert not (dst / "after").exists()
        rep.resume_target()
        assert rep.wait(10) and (dst / "after").exists()
