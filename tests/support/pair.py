"""A source and a target daemon as real processes, and the usual first
steps on them (login, a small tree replicated), for the integration tests."""
import contextlib
import os
import signal
import time

from support.daemons import PASSWORD, Node, smirror
from support.treestate import diff, snapshot


@contextlib.contextmanager
def running_pair(tmp_path, source_extra="", target_extra="", target_options=None, **node_options):
    """A source daemon (admin user 'admin', logs in to targets as 'repl')
    and a target daemon (admin user 'admin', replication user 'repl',
    map bases allowed under tmp_path), both started; ``extra`` config
    text goes to both, ``source_extra`` / ``target_extra`` to one;
    ``target_options`` are more Node arguments of the target alone."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    extra = node_options.pop("extra", "")
    source = Node(tmp_path, "source", env, links_user="repl", extra=extra + source_extra, **node_options)
    target = Node(tmp_path, "target", env, extra=extra + target_extra,
                  **{**node_options, **(target_options or {})})
    source.add_user("admin", "admin")
    target.add_user("admin", "admin")
    target.add_user("repl", "replication")
    source.start()
    target.start()
    try:
        yield source, target, env
    finally:
        for n in (source, target):
            if n.proc and n.proc.poll() is None:
                n.kill(signal.SIGTERM)


def login(node, env, user="admin", password=PASSWORD):
    return smirror("login", node.address, "--user", user, "--password-env", "PW",
                   env={**env, "PW": password})


def wait_same(src, dst, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.isdir(dst) and not diff(snapshot(src), snapshot(dst)):
            return True
        time.sleep(0.2)
    return False


def make_source_tree(root):
    (root / "db").mkdir(parents=True)
    (root / "db" / "main.db").write_bytes(os.urandom(300_000))
    (root / "notes.txt").write_text("hello")
    os.symlink("notes.txt", root / "link")


def replicate_data(source, target, env, base):
    """The usual start: a small tree in BASE/data, connected to BASE/replica
    on the target, mirrored. Returns (src, dst)."""
    src, dst = base / "data", base / "replica"
    make_source_tree(src)
    login(source, env)
    source.cli("repset", "create", "data", "--root", src)
    source.cli("connect", "data", "to", target.address, "map", "base", dst)
    assert wait_same(src, dst), source.log()[-3000:] + target.log()[-2000:]
    return src, dst
