"""Integration tests: daemons and other smirror processes on 127.0.0.1."""
import os
import signal

import pytest

from support.daemons import Node


@pytest.fixture
def nodes(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    source = Node(tmp_path, "source", env, links_user="repl")
    target = Node(tmp_path, "target", env)
    source.add_user("admin", "admin")
    source.add_user("watcher", "monitor")
    target.add_user("admin", "admin")
    target.add_user("repl", "replication")
    target.add_user("watcher", "monitor")
    source.start()
    target.start()
    yield source, target, env, tmp_path
    for n in (source, target):
        if n.proc and n.proc.poll() is None:
            n.kill(signal.SIGTERM)
