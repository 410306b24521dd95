"""The recursive watcher on real files with real inotify; the tree tests
run on the fanotify watcher too (same events, same interface)."""
import os

import pytest

from smirror.capture import fanotify, inotify
from smirror.capture.inotify import Kind, Watcher
from support.events import collect

FANOTIFY_MISSING = fanotify.unavailable_reason()


@pytest.fixture(params=["inotify", "fanotify"])
def watcher_cls(request):
    if request.param == "fanotify":
        if FANOTIFY_MISSING:
            pytest.skip(f"fanotify unavailable: {FANOTIFY_MISSING}")
        return fanotify.Watcher
    return inotify.Watcher


def kinds(events):
    return [(e.kind, e.path, e.new_path) if e.kind == Kind.MOVED else (e.kind, e.path) for e in events]


@pytest.fixture
def tree(tmp_path, watcher_cls):
    root = tmp_path / "src"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f.txt").write_text("x")
    with watcher_cls(root) as w:
        yield root, w


def test_watches_existing_tree(tree):
    root, w = tree
    assert w.watched_dirs == 3
    (root / "a" / "b" / "f.txt").write_text("more")
    ev = kinds(collect(w))
    assert (Kind.MODIFIED, b"a/b/f.txt") in ev and (Kind.CLOSED, b"a/b/f.txt") in ev


def test_new_directories_are_watched_and_early_files_reported(tree):
    root, w = tree
    # create a deep tree faster than the watcher can add watches
    os.makedirs(root / "n1" / "n2" / "n3")
    (root / "n1" / "n2" / "n3" / "early.txt").write_text("e")
    ev = kinds(collect(w))
    assert (Kind.CREATED, b"n1") in ev
    assert (Kind.CREATED, b"n1/n2/n3/early.txt") in ev
    (root / "n1" / "n2" / "n3" / "late.txt").write_text("l")
    ev = kinds(collect(w))
    assert (Kind.CREATED, b"n1/n2/n3/late.txt") in ev
    assert w.watched_dirs == 6


def test_rename_inside_tree_is_one_move_and_subtree_paths_follow(tree):
    root, w = tree
    os.rename(root / "a", root / "z")
    ev = collect(w)
    assert kinds(ev) == [(Kind.MOVED, b"a", b"z")] and ev[0].is_dir
    (root / "z" / "b" / "g.txt").write_text("g")
    assert (Kind.CREATED, b"z/b/g.txt") in kinds(collect(w))


def test_rename_out_and_in_become_delete_and_create(tree, tmp_path):
    root, w = tree
    outside = tmp_path / "outside"
    outside.mkdir()
    os.rename(root / "a" / "b" / "f.txt", outside / "f.txt")
    assert kinds(collect(w)) == [(Kind.DELETED, b"a/b/f.txt")]
    (outside / "sub").mkdir()
    (outside / "sub" / "inner").write_text("i")
    os.rename(outside / "sub", root / "sub")
    ev = kinds(collect(w))
    assert ev[:2] == [(Kind.CREATED, b"sub"), (Kind.CREATED, b"sub/inner")]


def test_move_out_then_recreate_keeps_order(tree, tmp_path):
    root, w = tree
    os.rename(root / "a" / "b" / "f.txt", tmp_path / "gone")
    (root / "a" / "b" / "f.txt").write_text("new")
    ev = kinds(collect(w))
    assert ev.index((Kind.DELETED, b"a/b/f.txt")) < ev.index((Kind.CREATED, b"a/b/f.txt"))


def test_delete_and_attrib(tree):
    root, w = tree
    os.chmod(root / "a" / "b" / "f.txt", 0o600)
    assert kinds(collect(w)) == [(Kind.ATTRIB, b"a/b/f.txt")]
    os.chmod(root / "a" / "b" / "f.txt", 0o644)
    os.unlink(root / "a" / "b" / "f.txt")
    os.rmdir(root / "a" / "b")
    ev = kinds(collect(w))
    if w.backend == "inotify":
        assert ev[0] == (Kind.ATTRIB, b"a/b/f.txt")
    # (fanotify merges the ATTRIB into the DELETE of the same name and inode)
    assert ev.index((Kind.DELETED, b"a/b/f.txt")) < ev.index((Kind.DELETED, b"a/b"))
    assert w.watched_dirs == 2


def test_odd_names(tree):
    root, w = tree
    name = b"new\nline \xff-x"
    with open(os.path.join(os.fsencode(root), name), "wb") as f:
        f.write(b"1")
    assert (Kind.CREATED, name) in kinds(collect(w))


def test_exclude_rule_and_rename_across_it(tmp_path, watcher_cls):
    root = tmp_path / "src"
    root.mkdir()
    with watcher_cls(root, exclude=lambda p, d: p.endswith(b".tmp")) as w:
        (root / "x.tmp").write_text("t")
        assert collect(w) == []
        os.rename(root / "x.tmp", root / "x.db")     # save-via-temp pattern
        assert kinds(collect(w)) == [(Kind.CREATED, b"x.db")]
        os.rename(root / "x.db", root / "y.tmp")
        assert kinds(collect(w)) == [(Kind.DELETED, b"x.db")]


def test_overflow_becomes_rescan(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    max_events = int(open("/proc/sys/fs/inotify/max_queued_events").read())
    if max_events > 100_000:
        pytest.skip("queue limit too large to overflow quickly")
    with Watcher(root) as w:
        # distinct names: the kernel merges identical consecutive events
        for i in range(max_events // 2 + 100):
            os.close(os.open(root / f"f{i}", os.O_CREAT | os.O_WRONLY))
        ev = collect(w)
    assert any(e.kind == Kind.RESCAN and e.path == b"" and "overflow" in e.reason for e in ev)
    assert w.overflows == 1


def test_watch_limit_failure_becomes_rescan(tmp_path):
    """With max_user_watches lowered (we are root here), a directory that
    cannot be watched is reported for a rescan instead of silently missed."""
    path = "/proc/sys/fs/inotify/max_user_watches"
    try:
        old = open(path).read()
        open(path, "w").write("50\n")
    except OSError:
        pytest.skip("cannot change the inotify watch limit here")
    try:
        root = tmp_path / "src"
        root.mkdir()
        for i in range(80):
            (root / f"d{i}").mkdir()
        with Watcher(root) as w:
            ev = w.read(timeout=0)
        assert w.watch_failures > 0
        assert any(e.kind == Kind.RESCAN and "watch limit" in e.reason for e in ev)
    finally:
        open(path, "w").write(old)
