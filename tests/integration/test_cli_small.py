"""Small CLI behaviours with daemons started as real processes: a second
daemon on the same state directory refuses to start, pause-target and
resume-target need the target, and queue-task says (and exits with) the
target's refusal."""
import json
import subprocess
import sys

import pytest

from support.daemons import Node, free_port
from support.pair import login, replicate_data, running_pair, wait_same


def test_a_second_daemon_on_the_same_state_directory_refuses_to_start(tmp_path):
    import os
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    node = Node(tmp_path, "one", env).start()
    try:
        other = subprocess.run([sys.executable, "-m", "smirror", "serve", "--config", node.config,
                                "--listen", f"127.0.0.1:{free_port()}"], env=env, capture_output=True,
                               text=True, timeout=60)
        assert other.returncode == 2, other          # a configuration error
        assert f"state directory {node.dir / 'state'} is in use by another smirror daemon " \
               f"(pid {node.proc.pid}" in other.stderr, other.stderr
        assert "Traceback" not in other.stderr
        assert node.proc.poll() is None            # the first one runs on
    finally:
        node.kill()
    # the lock goes with the process: a new daemon starts there
    node.start()
    node.kill()


@pytest.mark.slow
def test_pause_and_resume_target_need_the_target(tmp_path):
    with running_pair(tmp_path) as (source, target, env):
        login(target, env)
        for verb in ("pause-target", "resume-target"):
            out = target.cli(verb, check=False)
            assert out.returncode != 0 and f"{verb} needs the target daemon: smirror {verb} " \
                   "HOST[:PORT]" in out.stderr, out
        assert json.loads(target.cli("status", "--json").stdout)["paused"] is False
        assert "paused" in target.cli("pause-target", target.address).stdout
        assert json.loads(target.cli("status", "--json").stdout)["paused"] is True
        target.cli("resume-target", target.address)
        assert json.loads(target.cli("status", "--json").stdout)["paused"] is False


@pytest.mark.slow
def test_queue_task_says_the_target_refused_it(tmp_path):
    tdir = tmp_path / "tasks"
    tdir.mkdir()
    (tdir / "ok").write_text("#!/bin/sh\ntrue\n")
    (tdir / "ok").chmod(0o755)
    disabled = f'[tasks]\nenabled = false\ndirectory = "{tdir}"\n'
    with running_pair(tmp_path, target_extra=disabled,
                      source_extra=f'[tasks]\nenabled = true\ndirectory = "{tdir}"\n') \
            as (source, target, env):
        src, dst = replicate_data(source, target, env, tmp_path)
        out = source.cli("queue-task", "t1", "--to", target.address, "--on-execute", "ok", check=False)
        assert out.returncode == 3, out
        assert "queued on connection(s) 1 at seq" in out.stdout and "target refused:" in out.stdout, out
        assert "the target refused task t1" in out.stderr and "disabled" in out.stderr, out.stderr
        out = source.cli("queue-task", "t2", "--to", target.address, "--on-execute", "ok", "--json",
                         check=False)
        assert out.returncode == 3 and json.loads(out.stdout)["target"]["state"] == "refused", out
        (src / "after").write_text("replication goes on")
        assert wait_same(src, dst, 30)


@pytest.mark.slow
def test_queue_task_says_the_target_received_it(tmp_path):
    tdir = tmp_path / "tasks"
    tdir.mkdir()
    (tdir / "ok").write_text("#!/bin/sh\ntrue\n")
    (tdir / "ok").chmod(0o755)
    enabled = f'[tasks]\nenabled = true\ndirectory = "{tdir}"\n'
    with running_pair(tmp_path, extra=enabled) as (source, target, env):
        replicate_data(source, target, env, tmp_path)
        out = source.cli("queue-task", "t1", "--to", target.address, "--on-execute", "ok")
        assert "; received by the target" in out.stdout, out
