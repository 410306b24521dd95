"""Backup controls between two daemons started as real processes: tasks
queued with the CLI fire on the target at the source moment they mark
(a tree copy, a SQLite WAL backup), refusals come back to the source,
ignore-deletes and the orphan policy per connection, and a paused target
under heavy writes with both queues spilling to disk."""
import json
import os
import sqlite3
import stat
import time

import pytest

from smirror.capture.recorder import Recorder
from support.daemons import wait_for
from support.pair import login, replicate_data, running_pair, wait_same
from support.tasks import task_script, tasks_config
from support.treestate import diff, snapshot
from support.workload import Workload

pair = running_pair


def status(node):
    return json.loads(node.cli("status", "--json").stdout)




@pytest.mark.slow
def test_task_copy_equals_the_source_when_queued_while_writes_go_on(tmp_path):
    tdir = tmp_path / "target-tasks"
    task_script(tdir, "copy-tree", 'cp -a "$SMIRROR_MAP_BASE" "$1"\n'
                                   'echo "$SMIRROR_CONID $SMIRROR_TASK_NAME $SMIRROR_SEQ" > "$1.info"\n')
    copy = tmp_path / "copy"
    with pair(tmp_path, target_extra=tasks_config(tdir)) as (source, target, env):
        src, dst = replicate_data(source, target, env, tmp_path)
        w = Workload(Recorder(src, lambda op: None), seed=21, max_write=30_000)
        for _ in range(150):                     # writes before ...
            w.step()
            time.sleep(0.001)
        out = json.loads(source.cli("queue-task", "checkpoint", "--to", target.address,
                                    "--on-execute", "copy-tree", str(copy), "--json").stdout)
        state = snapshot(src)                    # nothing was written since it was queued
        for _ in range(150):                     # ... and after the task
            w.step()
            time.sleep(0.001)
        assert wait_same(src, dst, 60), source.log()[-3000:]
        wait_for(lambda: (tmp_path / "copy.info").exists(), what="the task's copy")
        assert diff(state, snapshot(copy)) == []
        assert snapshot(copy) != snapshot(src)
        seq = out["connections"]["1"]
        assert (tmp_path / "copy.info").read_text().split() == ["1", "checkpoint", str(seq)]
        # the result shows on both sides: the target's task table, the
        # source's report from the target
        login(target, env)
        assert any(r["task"] == "checkpoint" and r["state"] == "ok" for r in status(target)["tasks"])
        assert "checkpoint" in target.cli("status").stdout
        reports = wait_for(lambda: status(source)["sources"][0]["task_reports"], what="a report")
        assert reports[-1]["task"] == "checkpoint" and reports[-1]["state"] == "ok"


@pytest.mark.slow
def test_tasks_refused_by_the_target_are_reported_to_the_source(tmp_path):
    tdir = tmp_path / "target-tasks"
    task_script(tdir, "ok", "true\n")
    task_script(tmp_path, "elsewhere", "touch \"$0.ran\"\n")
    with pair(tmp_path, target_extra=tasks_config(tdir, enabled=False)) as (source, target, env):
        src, dst = replicate_data(source, target, env, tmp_path)
        out = source.cli("queue-task", "t1", "--to", target.address, "--on-execute", "ok", check=False)
        assert out.returncode == 3 and "target refused" in out.stdout, out   # the CLI waits for it
        (src / "after").write_text("replication goes on")
        assert wait_same(src, dst, 30)
        reports = wait_for(lambda: status(source)["sources"][0]["task_reports"], what="a report")
        assert reports[0]["state"] == "refused" and "task processing is disabled" in reports[0]["error"]
        # a bad request is refused at once, with what is wrong
        bad = source.cli("queue-task", "t2", "--to", target.address, check=False)
        assert bad.returncode != 0 and "--on-execute" in bad.stderr
        bad = source.cli("queue-task", "t3", "--to", "127.0.0.1:1", "--on-execute", "ok", check=False)
        assert bad.returncode != 0 and "no running connection to 127.0.0.1:1" in bad.stderr
        bad = source.cli("queue-task", "t4", "--to", target.address, "--on-execute", "ok",
                         "--on-queue", "prepare", check=False)
        assert bad.returncode != 0 and "disabled" in bad.stderr     # source hooks: same rules


@pytest.mark.slow
def test_task_outside_the_task_directory_is_refused(tmp_path):
    tdir = tmp_path / "target-tasks"
    task_script(tdir, "ok", "true\n")
    marker = task_script(tmp_path, "elsewhere", 'touch "$0.ran"\n')
    with pair(tmp_path, target_extra=tasks_config(tdir)) as (source, target, env):
        src, dst = replicate_data(source, target, env, tmp_path)
        for name, command in (("escape", "../elsewhere"), ("absolute", str(marker))):
            out = source.cli("queue-task", name, "--to", target.address, "--on-execute", command,
                             check=False)
            assert out.returncode == 3 and "outside the task directory" in out.stderr, out
        (src / "after").write_text("replication goes on")
        assert wait_same(src, dst, 30)
        reports = wait_for(lambda: len(status(source)["sources"][0]["task_reports"]) >= 2 and
                           status(source)["sources"][0]["task_reports"], what="two reports")
        assert [r["state"] for r in reports[:2]] == ["refused", "refused"]
        assert all("outside the task directory" in r["error"] for r in reports[:2])
        time.sleep(0.5)
        assert not (tmp_path / "elsewhere.ran").exists()


@pytest.mark.slow
def test_sqlite_wal_backup_by_a_task_holds_exactly_the_committed_rows(tmp_path):
    tdir = tmp_path / "target-tasks"
    backup = tmp_path / "backup"
    task_script(tdir, "backup-db", 'mkdir -p "$1"\ncp "$SMIRROR_MAP_BASE/app.db" '
                                   '"$SMIRROR_MAP_BASE/app.db-wal" "$1/"\n')
    with pair(tmp_path, target_extra=tasks_config(tdir)) as (source, target, env):
        src, dst = tmp_path / "data", tmp_path / "replica"
        src.mkdir()
        db = sqlite3.connect(src / "app.db")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB)")
        db.commit()
        login(source, env)
        source.cli("repset", "create", "data", "--root", src)
        source.cli("connect", "data", "to", target.address, "map", "base", dst)

        def commit_rows(start, count):
            for i in range(start, start + count):
                db.execute("INSERT INTO t VALUES (?, ?)", (i, os.urandom(3000)))
                if i % 10 == 0:
                    db.commit()
            db.commit()

        commit_rows(0, 400)               # the writer stops here (its connection stays open)
        source.cli("queue-task", "db-backup", "--to", target.address,
                   "--on-execute", "backup-db", str(backup))
        commit_rows(400, 300)             # and goes on after the task was queued
        db.close()
        wait_for(lambda: (backup / "app.db-wal").exists(), timeout=60, what="the backup")
        time.sleep(0.5)
        copy = sqlite3.connect(backup / "app.db")
        try:
            assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert copy.execute("SELECT count(*), max(id) FROM t").fetchone() == (400, 399)
        finally:
            copy.close()


@pytest.mark.slow
def test_ignore_deletes_and_orphan_policy_per_connection(tmp_path):
    with pair(tmp_path) as (source, target, env):
        src, dst = tmp_path / "data", tmp_path / "replica"
        (src / "keep").mkdir(parents=True)
        (src / "keep" / "a").write_text("a")
        (src / "b").write_text("b")
        (dst / "old-dir").mkdir(parents=True)            # orphans already on the target
        (dst / "old-dir" / "x").write_text("orphan")
        (dst / "stray").write_text("orphan")
        login(source, env)
        source.cli("repset", "create", "data", "--root", src)
        source.cli("connect", "data", "to", target.address, "map", "base", dst,
                   "--ignore-deletes", "keep", "--orphans", "delete")
        assert wait_same(src, dst, 30), source.log()[-3000:]     # orphans deleted by the mirror
        st = status(source)["sources"][0]
        assert st["options"]["ignore_deletes"] == "keep" and st["mirror"]["orphans_deleted"] == 3
        m = wait_for(lambda: status(source)["sources"][0]["mirror"]["state"] == "done"
                     and status(source)["sources"][0]["mirror"], what="the mirror acknowledged")
        assert m["progress"] == 100.0 and m["last_seq"] >= m["first_seq"] >= 1
        os.unlink(src / "b")
        (src / "keep" / "a").write_text("edited")
        wait_for(lambda: (dst / "keep" / "a").read_text() == "edited", what="the edit")
        time.sleep(0.3)
        assert (dst / "b").read_text() == "b"             # the delete was not applied
        source.cli("connection-options", "1", "--ignore-deletes", "off")
        os.unlink(src / "keep" / "a")
        wait_for(lambda: not (dst / "keep" / "a").exists(), what="the delete")
        bad = source.cli("connection-options", "1", "--orphans-older-than", "-1", check=False)
        assert bad.returncode != 0 and "days >= 0" in bad.stderr
        # move aside: a remirror finds b (kept above) as an orphan
        source.cli("connection-options", "1", "--orphans", "move")
        source.cli("mirror-start", "1")
        moved = wait_for(lambda: list((tmp_path / "target" / "state" / "orphans").glob("*-1/b")),
                         what="the orphan moved aside")
        assert moved[0].read_text() == "b" and not (dst / "b").exists()


@pytest.mark.slow
def test_the_target_configuration_decides_keep_or_move_and_setid(tmp_path):
    """The source says keep, the target is configured to move: the target
    moves (and a source saying move to a keep target keeps: the MARK's mode
    is not obeyed, see test_confinement). Setuid bits from the source are
    stripped: this target lists no setid_map_bases."""
    target_extra = '[target]\nignored_deletes = "move"\ndeleted_keep_days = 30\n'
    with pair(tmp_path, target_extra=target_extra) as (source, target, env):
        src, dst = tmp_path / "data", tmp_path / "replica"
        src.mkdir()
        (src / "b").write_text("b")
        (src / "tool").write_text("#!/bin/sh\n")
        os.chmod(src / "tool", 0o4755)
        login(source, env)
        source.cli("repset", "create", "data", "--root", src)
        source.cli("connect", "data", "to", target.address, "map", "base", dst,
                   "--ignore-deletes", "keep")
        wait_for(lambda: (dst / "b").exists() and (dst / "tool").exists(), what="the mirror")
        os.unlink(src / "b")
        moved = wait_for(lambda: list((tmp_path / "target" / "state" / "deleted").glob("*-1/b")),
                         what="the deleted file moved aside by the target")
        assert moved[0].read_text() == "b" and not (dst / "b").exists()
        assert stat.S_IMODE(os.stat(dst / "tool").st_mode) == 0o755
        assert "setuid/setgid bits stripped" in target.log()


@pytest.mark.slow
def test_pause_with_heavy_writes_spills_on_both_sides_then_resumes_in_order(tmp_path):
    both = '[queues]\nsource_memory_limit = "256KiB"\ntarget_memory_limit = "256KiB"\n'
    with pair(tmp_path, source_extra=both + 'disk_queue_limit = "256MiB"\n',
              target_extra=both + 'disk_queue_limit = "4MiB"\n'
              + f'disk_queue_dir = "{tmp_path / "spill"}"\n') as (source, target, env):
        src, dst = replicate_data(source, target, env, tmp_path)
        login(target, env)
        target.cli("pause-target", target.address)
        before = snapshot(dst)
        w = Workload(Recorder(src, lambda op: None), seed=31, max_write=200_000)
        for _ in range(400):
            # paced like the other watcher tests: a rename storm at full
            # speed can outrun the watcher (see test_replicate)
            w.step()
            time.sleep(0.001)
        for i in range(40):                       # ~10 MiB more: past the target's 4 MiB
            (src / f"big{i}").write_bytes(os.urandom(256_000))
        wait_for(lambda: status(source)["sources"][0]["queue_disk_bytes"] > 0, what="source spill")
        t = status(target)["targets"][0]
        assert t["queue_disk_bytes"] > 0 and t["apply_state"] == "paused", t
        assert [p.name for p in (tmp_path / "spill").iterdir()] == [f"target-{t['source']}-1"]
        assert snapshot(dst) == before
        target.cli("resume-target", target.address)
        assert wait_same(src, dst, 90), (diff(snapshot(src), snapshot(dst))[:10],
                                         target.log()[-3000:])
        s = status(source)["sources"][0]
        t = status(target)["targets"][0]
        assert s["seq_acked"] == t["seq_applied"] and t["repairs"] == 0
        assert "auto_disconnects" not in s or s["auto_disconnects"] == 0
