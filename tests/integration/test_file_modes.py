"""Private files: queue directories 0700 with segments, locks and ack files
0600 (compiled and reference memqueue, wherever the queue lives), the
target's state 0700, the daemon's log 0600, and secret files refused when
group or others can read them."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from smirror.cli.daemon import _log_handler
from smirror.errors import ConfigError
from smirror.kernels import _memqueue, _memqueue_py
from smirror.private import check_secret, private_dir, read_secret
from smirror.stream.receiver import TargetConnection
from support.daemons import Node, package_path

QUEUES = [pytest.param(_memqueue, id="compiled"), pytest.param(_memqueue_py, id="reference")]


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_private_tree(top):
    """``top`` and every directory below it 0700, every file 0600."""
    assert mode(top) == 0o700, top
    for d, dirs, files in os.walk(top):
        for name in dirs:
            assert mode(os.path.join(d, name)) == 0o700, os.path.join(d, name)
        for name in files:
            assert mode(os.path.join(d, name)) == 0o600, os.path.join(d, name)


@pytest.fixture
def open_umask():
    """A umask that would let group and others in: the modes must not
    depend on the daemon's umask."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("impl", QUEUES)
def test_queue_segments_lock_and_ack_are_private(tmp_path, impl, open_umask):
    qdir = tmp_path / "elsewhere" / "q"            # like a disk_queue_dir outside the state dir
    q = impl.SpillQueue(str(qdir), 1024, 1 << 30, segment_size=1 << 16, durable=True)
    try:
        for seq in range(1, 40):
            q.put(seq, os.urandom(4000))           # past the memory limit: disk segments
        item = q.get(timeout=0)
        q.ack(item[0])
        names = os.listdir(qdir)
        assert any(n.endswith(".seg") for n in names) and "lock" in names and "ack" in names, names
        assert_private_tree(qdir)
    finally:
        q.close()


@pytest.mark.parametrize("impl", QUEUES)
def test_an_existing_open_queue_directory_is_narrowed(tmp_path, impl, open_umask):
    qdir = tmp_path / "q"
    qdir.mkdir(mode=0o755)
    os.chmod(qdir, 0o755)
    q = impl.SpillQueue(str(qdir), 1 << 20, 1 << 30)
    q.close()
    assert mode(qdir) == 0o700


def test_target_state_and_queue_directories_are_private(tmp_path, open_umask):
    t = TargetConnection(1, tmp_path / "base", tmp_path / "state", queue_dir=tmp_path / "queues" / "t1")
    try:
        assert mode(t.dir) == 0o700 and mode(tmp_path / "queues" / "t1") == 0o700
    finally:
        t.close()


def test_private_dir_narrows_only_group_and_other_bits(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    os.chmod(d, 0o775)
    private_dir(d)
    assert mode(d) == 0o700
    private_dir(tmp_path / "new" / "leaf")
    assert mode(tmp_path / "new" / "leaf") == 0o700


def test_the_log_file_is_created_private_and_narrowed(tmp_path, open_umask):
    new = tmp_path / "new.log"
    _log_handler(str(new)).close()
    assert mode(new) == 0o600
    old = tmp_path / "old.log"
    old.write_text("earlier lines\n")
    os.chmod(old, 0o644)
    _log_handler(str(old)).close()
    assert mode(old) == 0o600 and old.read_text() == "earlier lines\n"
    with pytest.raises(ConfigError, match=f"daemon.log_file {tmp_path}/missing/x.log"):
        _log_handler(str(tmp_path / "missing" / "x.log"))


@pytest.mark.parametrize("bits", [0o640, 0o604, 0o644, 0o660])
def test_a_secret_readable_by_others_is_refused(tmp_path, bits):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    os.chmod(secret, bits)
    message = (f"links.password_file {secret} has mode {bits:04o}: group or others can read "
               f"this secret; run: chmod 600 {secret}")
    with pytest.raises(ConfigError) as info:
        read_secret(secret, "links.password_file")
    assert str(info.value) == message
    with pytest.raises(ConfigError, match="chmod 600"):
        check_secret(secret, "tls.key")
    os.chmod(secret, 0o600)
    assert read_secret(secret, "links.password_file") == b"s3cret\n"
    os.chmod(secret, 0o400)
    check_secret(secret, "tls.key")


def test_a_missing_secret_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"tls.key .*/nope: No such file"):
        check_secret(tmp_path / "nope", "tls.key")


# -- a real daemon -----------------------------------------------------------------

def daemon_env():
    src = package_path()
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}


def test_a_daemon_refuses_a_link_password_others_can_read(tmp_path):
    node = Node(tmp_path, "a", daemon_env(), links_user="link")
    pw = node.dir / "link-password"
    os.chmod(pw, 0o644)
    proc = subprocess.run([sys.executable, "-m", "smirror", "serve", "--config", str(node.config)],
                          env=node.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"links.password_file {pw} has mode 0644" in proc.stderr
    assert f"chmod 600 {pw}" in proc.stderr and "Traceback" not in proc.stderr


def test_a_daemon_keeps_its_log_private(tmp_path):
    node = Node(tmp_path, "a", daemon_env())
    log = node.dir / "log"
    log.write_text("from before\n")
    os.chmod(log, 0o644)
    node.start()
    try:
        assert mode(log) == 0o600
        assert mode(node.dir / "state") == 0o700
    finally:
        node.kill()
