"""fs.atomic.write_atomic: the one way smirror replaces its small state
files (users, registry, source bindings, sessions, seq reservations)."""
import os
import stat

import pytest

from smirror.fs.atomic import write_atomic


def test_replaces_the_content_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "registry.json"
    path.write_text("old")
    write_atomic(path, '{"new": true}')
    assert path.read_text() == '{"new": true}'
    assert sorted(os.listdir(tmp_path)) == ["registry.json"]
    write_atomic(str(path), b"\x00bytes" * 100_000)      # str path, bytes, larger than one write
    assert path.read_bytes() == b"\x00bytes" * 100_000


def test_a_new_file_is_private_unless_asked(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "users.json", "{}")
        write_atomic(tmp_path / "seq", "5\n", mode=0o666)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "users.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "seq").st_mode) == 0o644


def test_a_failed_write_keeps_the_old_content(tmp_path):
    path = tmp_path / "sessions.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_atomic(path, 12345)              # not bytes or str: nothing replaced
    assert path.read_text() == "old"


def test_a_missing_directory_is_an_error_that_names_it(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        write_atomic(tmp_path / "missing" / "registry.json", "{}")
    assert "missing" in str(exc.value)
