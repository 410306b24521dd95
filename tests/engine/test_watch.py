"""Watcher capture on real files: inotify or fanotify events -> ops ->
applier -> the target equals the source; only changed blocks travel. The
behaviour tests run on both backends."""
import os
import shutil
import stat
import time
from contextlib import contextmanager

import pytest

from smirror.capture import fanotify
from smirror.capture.watch import TreeCapture, open_watcher
from smirror.fs.tree import Rules
from smirror.ops import OpKind
from support.applying import Pipe
from support.faults import rsync_diff
from support.treestate import diff, snapshot

FANOTIFY_MISSING = fanotify.unavailable_reason()


@contextmanager
def sysctl(path, value):
    """Set a /proc/sys value for the block, and put the old one back."""
    try:
        old = open(path).read()
        open(path, "w").write(f"{value}\n")
    except OSError as exc:
        pytest.skip(f"cannot change {path} here: {exc}")
    try:
        yield int(old)
    finally:
        open(path, "w").write(old)


@pytest.fixture
def rig(tmp_path, backend):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "e" / "f.txt").write_text("hello")
    (src / "big.db").write_bytes(os.urandom(1 << 20))
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe, capture_backend=backend)
    assert cap.backend == backend
    cap.resync(b"", "initial")          # an empty cache: everything is sent
    pipe.applier.flush()
    yield src, dst, cap, pipe
    cap.close()


def same(src, dst, cap, pipe):
    cap.sync()
    pipe.applier.flush()
    assert diff(snapshot(src), snapshot(dst)) == []


def test_initial_resync_copies_everything(rig):
    src, dst, cap, pipe = rig
    same(src, dst, cap, pipe)


def test_only_changed_blocks_travel(rig):
    src, dst, cap, pipe = rig
    cap.sync()
    before = cap.stats["bytes_sent"]
    with open(src / "big.db", "r+b") as f:
        f.seek(300_000)
        f.write(b"X" * 100)
        f.seek(900_000)
        f.write(b"Y" * 10)
    same(src, dst, cap, pipe)
    sent = cap.stats["bytes_sent"] - before
    bs = cap.known[b"big.db"].block_size
    assert sent <= 3 * bs, f"{sent} bytes sent for 110 changed bytes with {bs} B blocks"


def test_renames_stay_renames(rig):
    src, dst, cap, pipe = rig
    n = len(pipe)
    os.rename(src / "d", src / "z")
    os.rename(src / "big.db", src / "z" / "big.db")
    same(src, dst, cap, pipe)
    kinds = [op.kind for op in pipe[n:]]
    assert kinds.count(OpKind.RENAME) == 2 and OpKind.WRITE not in kinds


def test_moves_in_and_out_of_the_set(rig, tmp_path):
    src, dst, cap, pipe = rig
    out = tmp_path / "outside"
    out.mkdir()
    (out / "in").mkdir()
    (out / "in" / "x").write_bytes(b"x" * 5000)
    os.rename(src / "d", out / "d")         # out: deleted on the target
    os.rename(out / "in", src / "in")       # in: created with its content
    same(src, dst, cap, pipe)


def test_attributes_but_not_atime(rig):
    src, dst, cap, pipe = rig
    cap.sync()
    n = len(pipe)
    st = os.stat(src / "d" / "e" / "f.txt")
    os.utime(src / "d" / "e" / "f.txt", ns=(st.st_atime_ns + 10**9, st.st_mtime_ns))
    cap.sync()
    assert len(pipe) == n, "an atime-only change must not be replicated"
    os.chmod(src / "d" / "e" / "f.txt", 0o600)
    os.utime(src / "d", ns=(0, 1_234_567_890_123_456_789))
    same(src, dst, cap, pipe)
    assert [op.kind for op in pipe[n:]] == [OpKind.SETATTR, OpKind.SETATTR]


def test_delete_tree_links_and_sparse(rig):
    src, dst, cap, pipe = rig
    shutil.rmtree(src / "d")
    os.link(src / "big.db", src / "hard.db")
    os.symlink("big.db", src / "sym")
    with open(src / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"data")
    same(src, dst, cap, pipe)
    assert os.stat(dst / "sparse").st_blocks * 512 < 1 << 20
    assert os.stat(dst / "hard.db").st_ino == os.stat(dst / "big.db").st_ino


def test_deep_mkdir_and_fresh_directories(rig):
    """mkdir -p of a deep tree with files at every level, a directory renamed
    as soon as it is filled, and a save-via-temp rename: all arrive."""
    src, dst, cap, pipe = rig
    deep = src.joinpath(*[f"l{i}" for i in range(12)])
    os.makedirs(deep)
    p = src
    for i in range(12):
        p = p / f"l{i}"
        (p / "f").write_bytes(b"level %d" % i)
    (src / "fresh").mkdir()
    (src / "fresh" / "x").write_bytes(b"x" * 70_000)
    os.rename(src / "fresh", src / "renamed")
    (src / "d" / "e" / "f.txt.tmp").write_text("saved")
    os.replace(src / "d" / "e" / "f.txt.tmp", src / "d" / "e" / "f.txt")
    same(src, dst, cap, pipe)


def test_events_the_kernel_merges_keep_their_meaning(rig):
    """fanotify merges an event into a queued one on the same name and
    inode; what happened after a rename in between must still land right:
    write f, rename f -> g, make a new f, write g again; link, unlink and
    link one name again (CREATE|DELETE merged on one inode)."""
    src, dst, cap, pipe = rig
    cap.sync()
    f, g = src / "d" / "e" / "f.txt", src / "d" / "e" / "g.txt"
    with open(f, "a") as fh:
        fh.write(" world")
    os.rename(f, g)
    f.write_text("a new f")
    with open(g, "a") as fh:
        fh.write(", again")
    os.chmod(g, 0o640)
    os.link(src / "big.db", src / "h")
    os.unlink(src / "h")
    os.link(src / "big.db", src / "h")
    os.mkdir(src / "dd")
    os.rename(src / "dd", src / "de")
    os.rename(src / "de", src / "dd")
    os.rmdir(src / "dd")
    same(src, dst, cap, pipe)
    assert (dst / "d" / "e" / "g.txt").read_text() == "hello world, again"
    assert os.stat(dst / "h").st_ino == os.stat(dst / "big.db").st_ino


def test_directory_built_outside_and_moved_in(rig, tmp_path):
    """The staging pattern: a tree built outside the set, then renamed into
    it, arrives whole; its files are read once, not once per event."""
    src, dst, cap, pipe = rig
    cap.sync()
    resyncs = cap.stats["resyncs"]
    stage = tmp_path / "stage"
    (stage / "a" / "b").mkdir(parents=True)
    for i in range(20):
        (stage / "a" / "b" / f"f{i}").write_bytes(os.urandom(10_000))
    # the events of the building are still queued when the rename is read
    os.rename(stage, src / "stage")
    (src / "stage" / "a" / "b" / "f0").write_bytes(b"after the move")
    same(src, dst, cap, pipe)
    assert cap.stats["resyncs"] == resyncs
    os.rename(src / "stage", tmp_path / "back-out")
    same(src, dst, cap, pipe)


def test_fanotify_move_in_split_across_reads(tmp_path):
    """A staging tree moved in, with the rename read in a later read than
    the events of its building (a small read buffer forces it): the early
    events resolve to paths inside the set, and the rescan they bring is of
    the top of the arrival, so the target still comes out right."""
    if FANOTIFY_MISSING:
        pytest.skip(f"fanotify unavailable: {FANOTIFY_MISSING}")
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe, capture_backend="fanotify")
    try:
        cap.watcher.close()
        cap.watcher = fanotify.Watcher(src, exclude=cap._excluded, buffer_size=4096)
        stage = tmp_path / "stage"
        (stage / "a" / "b").mkdir(parents=True)
        cap.sync()                  # the building of the directories is read
        for i in range(200):        # the files' events name stage/a/b
            (stage / "a" / "b" / f"f{i}").write_bytes(b"%d" % i)
        os.rename(stage, src / "stage")
        same(src, dst, cap, pipe)
        assert cap.last_rescan_reason == "directory unknown to the fanotify watcher"
        first = next(op for op in pipe if bytes(op.path).startswith(b"stage"))
        assert (first.kind, bytes(first.path)) == (OpKind.MKDIR, b"stage")   # parents first
    finally:
        cap.close()


def test_status_names_the_backend(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    cap = TreeCapture(src, lambda op: None)
    try:
        expected = "inotify" if FANOTIFY_MISSING else "fanotify"
        st = cap.status()
        assert st["backend"] == expected and st["watched_dirs"] == 1 and st["overflows"] == 0
        assert st["backend_reason"]
    finally:
        cap.close()
    monkeypatch.setenv("SMIRROR_CAPTURE_BACKEND", "inotify")
    cap = TreeCapture(src, lambda op: None)
    try:
        assert cap.status()["backend"] == "inotify"
    finally:
        cap.close()
    with pytest.raises(ValueError, match="capture backend 'dnotify'"):
        TreeCapture(src, lambda op: None, capture_backend="dnotify")


def test_rules_exclude(tmp_path, backend):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe, rules=Rules.from_patterns([("exclude", "*.tmp")]),
                      capture_backend=backend)
    try:
        (src / "keep").write_text("k")
        (src / "skip.tmp").write_text("s")
        os.rename(src / "skip.tmp", src / "now-kept")
        cap.sync()
        pipe.applier.flush()
        assert sorted(os.listdir(dst)) == ["keep", "now-kept"]
    finally:
        cap.close()


class RenameWhileMapped:
    """Rules that exclude nothing, and on their first question about a path
    below the root (the watcher's start-up walk listing a directory) write
    into ``<top>/sub/f`` and rename ``<top>`` to ``Z``. ``<top>`` is, of
    the top directories ``A`` and ``B``: with ``which="listed"`` the one
    being listed (its entries read, its subdirectories not yet walked),
    with ``"other"`` the other one (met under its old name, not listed)."""

    def __init__(self, src, which):
        self.src, self.which = os.fsencode(src), which
        self.renamed = None

    def excluded(self, rel, is_dir):
        if self.renamed is None and b"/" in rel:
            listed = rel.partition(b"/")[0]
            self.renamed = listed if self.which == "listed" else {b"A": b"B", b"B": b"A"}[listed]
            with open(os.path.join(self.src, self.renamed, b"sub", b"f"), "r+b") as f:
                f.write(b"before the rename")
            os.rename(os.path.join(self.src, self.renamed), os.path.join(self.src, b"Z"))
        return False


@pytest.mark.parametrize("which", ["other", "listed"])
def test_a_directory_renamed_while_the_watcher_maps_the_tree_is_still_watched_below(tmp_path, backend,
                                                                                    which):
    """Issue 11, a source-kill trial that never converged: a directory was
    renamed while a restarted daemon's fanotify watcher mapped the tree;
    the walk listed it by its old path, so nothing below it was mapped, and
    the event of a write there, read with the rename later in the same read,
    put its directory among those outside the root: every later write in it
    was dropped (a write through one name of a hard link, 100 ms after the
    restart's mirror, never reached the target). inotify lost the same
    subtree when the directory was renamed while it was listed (its
    subdirectories' watches, added by their old paths, failed)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    for top in ("A", "B"):
        (src / top / "sub" / "deeper").mkdir(parents=True)
        (src / top / "sub" / "f").write_bytes(b"x" * 5000)
    pipe = Pipe(dst)
    rules = RenameWhileMapped(src, which)
    cap = TreeCapture(src, pipe, rules=rules, capture_backend=backend)
    try:
        assert rules.renamed is not None
        cap.resync(b"", "initial")
        same(src, dst, cap, pipe)
        for i in range(3):
            (src / "Z" / "sub" / "f").write_bytes(b"after the rename %d" % i)
            (src / "Z" / "sub" / "deeper" / "g").write_bytes(b"after the rename %d" % i)
            same(src, dst, cap, pipe)
    finally:
        cap.close()


@pytest.mark.slow
def test_overflow_resync_loses_nothing(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe, capture_backend="inotify")
    try:
        max_events = int(open("/proc/sys/fs/inotify/max_queued_events").read())
        if max_events > 100_000:
            pytest.skip("queue limit too large to overflow quickly")
        for i in range(max_events // 2 + 500):
            (src / f"f{i}").write_bytes(b"%d" % i)
        cap.sync()
        pipe.applier.flush()
        assert cap.stats["resyncs"] >= 1 and cap.watcher.overflows >= 1
        assert diff(snapshot(src), snapshot(dst)) == []
    finally:
        cap.close()


@pytest.mark.slow
def test_fanotify_overflow_resync_loses_nothing(tmp_path):
    """A fanotify queue overflow (the queue limit lowered while the group is
    made; the group keeps the limit it was made with) takes the inotify
    overflow's path: a resync of the whole set, and the target is complete."""
    if FANOTIFY_MISSING:
        pytest.skip(f"fanotify unavailable: {FANOTIFY_MISSING}")
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    pipe = Pipe(dst)
    with sysctl("/proc/sys/fs/fanotify/max_queued_events", 256):
        cap = TreeCapture(src, pipe, capture_backend="fanotify")
    try:
        for i in range(2000):     # distinct names: events on one name merge
            (src / "sub" / f"f{i}").write_bytes(b"%d" % i)
        os.rename(src / "sub", src / "moved")
        cap.sync()
        pipe.applier.flush()
        assert cap.watcher.overflows >= 1 and cap.stats["resyncs"] >= 1
        assert "overflow" in cap.last_rescan_reason
        assert diff(snapshot(src), snapshot(dst)) == []
        # the handle map was rebuilt: events after the overflow have their paths
        (src / "moved" / "late").write_bytes(b"late")
        same(src, dst, cap, pipe)
    finally:
        cap.close()


def test_fanotify_captures_past_the_inotify_watch_limit(tmp_path):
    """With fs.inotify.max_user_watches lowered below the tree's directory
    count, inotify cannot watch it all (it says so and falls back to
    rescans); fanotify watches it whole: every change deep in it arrives as
    an event, no rescan."""
    if FANOTIFY_MISSING:
        pytest.skip(f"fanotify unavailable: {FANOTIFY_MISSING}")
    src, dst = tmp_path / "src", tmp_path / "dst"
    dirs = [src / f"d{i}" / f"e{j}" for i in range(10) for j in range(30)]    # 310 with d*
    for d in dirs:
        d.mkdir(parents=True)
    pipe = Pipe(dst)
    with sysctl("/proc/sys/fs/inotify/max_user_watches", 100):
        with open_watcher(src, backend="inotify")[0] as ino:
            assert ino.watch_failures > 0           # the limit bites for inotify
        cap = TreeCapture(src, pipe, capture_backend="fanotify")
    try:
        assert cap.watcher.watched_dirs == len(dirs) + 10 + 1
        cap.resync(b"", "initial")
        resyncs = cap.stats["resyncs"]
        for d in dirs:
            (d / "f").write_bytes(d.name.encode())
        os.makedirs(dirs[-1] / "x" / "y" / "z")
        (dirs[-1] / "x" / "y" / "z" / "deep").write_bytes(b"deep")
        same(src, dst, cap, pipe)
        assert cap.stats["resyncs"] == resyncs, "changes must arrive as events, not rescans"
    finally:
        cap.close()


def test_load_target_then_diff_against_it(tmp_path, backend):
    """After a mirror, the cache is built from the target itself."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(300_000))
    shutil.copytree(src, dst, dirs_exist_ok=True)
    shutil.copystat(src / "a", dst / "a")
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe, capture_backend=backend)
    try:
        cap.load_target(dst)
        with open(src / "a", "r+b") as f:
            f.write(b"changed")
        same(src, dst, cap, pipe)
        assert cap.stats["bytes_sent"] <= 2 * cap.known[b"a"].block_size
    finally:
        cap.close()


def test_periodic_verification_finds_what_events_missed(tmp_path):
    """Changes the watcher never heard of (made before it watched, here)
    are found by the periodic structural resync."""
    import threading
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe, verify_interval=0.2)
    cap.watcher.close()                     # deaf: no events at all from here on
    from smirror.capture.inotify import Watcher
    (tmp_path / "elsewhere").mkdir()
    cap.watcher = Watcher(tmp_path / "elsewhere")
    (src / "unseen").mkdir()
    (src / "unseen" / "file").write_bytes(b"x" * 10_000)
    t = threading.Thread(target=cap.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (dst / "unseen" / "file").exists():
            time.sleep(0.05)
        cap.stop()
        t.join(5)
        pipe.applier.flush()
        assert diff(snapshot(src), snapshot(dst)) == []
        assert cap.stats["resyncs"] >= 1
    finally:
        cap.close()


def test_log_rotation_read_late_puts_each_files_bytes_under_its_name(rig):
    """The capture handles a log's MODIFIED only after the log was rotated
    (renamed away, the name recreated): reading by path would send the new
    file's bytes under the old name, and the rename would carry them to
    .log.1. The inode check keeps them apart."""
    src, dst, cap, pipe = rig
    log = src / "app.log"
    log.write_bytes(b"first\n")
    same(src, dst, cap, pipe)
    for r in range(3):
        with open(log, "ab") as f:
            f.write(b"appended before rotation %d\n" % r)
        if (src / "app.log.1").exists():
            os.rename(src / "app.log.1", src / "app.log.2")
        os.rename(log, src / "app.log.1")
        log.write_bytes(b"the new log %d, longer than the old one so a wrong read shows\n" % r)
    same(src, dst, cap, pipe)
    for name in ("app.log", "app.log.1", "app.log.2"):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name


def test_an_event_handled_after_its_file_was_renamed_away_reads_no_other_file(rig):
    """The events of a rotation handled in the order the kernel gives them,
    all after the rotation happened (a busy capture): the MODIFIED of the
    old log must not be read from the new file now at its name."""
    from smirror.capture.inotify import Event, Kind
    src, dst, cap, pipe = rig
    log = src / "app.log"
    log.write_bytes(b"old log\n")
    same(src, dst, cap, pipe)
    with open(log, "ab") as f:
        f.write(b"old log, last line\n")
    os.rename(log, src / "app.log.1")
    log.write_bytes(b"the new log, whose bytes must stay under app.log\n")
    cap.watcher.read(timeout=0.2)          # the kernel's events: handled by hand below
    for ev in (Event(Kind.CLOSED, b"app.log", False),
               Event(Kind.MOVED, b"app.log", False, new_path=b"app.log.1"),
               Event(Kind.CREATED, b"app.log", False),
               Event(Kind.CLOSED, b"app.log", False)):
        cap.handle(ev)
    cap._flush_dirty(force=True, settled=True)
    pipe.applier.flush()
    assert (dst / "app.log.1").read_bytes() == b"old log\nold log, last line\n"
    assert (dst / "app.log").read_bytes() == log.read_bytes()


def test_content_reverified_after_renames_and_at_the_periodic_verification(rig):
    """A file whose bytes went out wrong (the cache says what was sent) is
    found by content: after a rename burst, and by the periodic
    verification for recently changed files."""
    src, dst, cap, pipe = rig
    (src / "a").write_bytes(b"A" * 5000)
    same(src, dst, cap, pipe)
    # what a misread leaves: wrong bytes on the target, and their hashes in
    # the cache (what was sent); then the file is renamed: found when quiet
    (dst / "a").write_bytes(b"B" * 5000)
    cap.known[b"a"].strong[:] = 0
    os.rename(src / "a", src / "b")
    same(src, dst, cap, pipe)
    assert (dst / "b").read_bytes() == b"A" * 5000
    assert cap.stats["reverified"] >= 1
    # a changed file, wrong on the target: the verification compares content
    (src / "c").write_bytes(b"C" * 5000)
    same(src, dst, cap, pipe)
    (dst / "c").write_bytes(b"D" * 5000)
    cap.known[b"c"].strong[:] = 0
    cap.verify()
    pipe.applier.flush()
    assert (dst / "c").read_bytes() == b"C" * 5000


def connection_mirror(cap, dst, pipe, adopt=True, mode=True, **kw):
    """What a daemon's connection mirror does (RepsetCapture.mirror): the
    mirror engine through the capture (``run_mirror``), its target read
    from DST (a RemoteReader of a target daemon in the daemon), its ops into
    ``pipe``; with ``adopt`` the capture's cache becomes what it left
    (TreeCapture.take_mirror). Returns the hand-over."""
    from smirror.daemon.connection_mirror import ConnectionMirror, options_for
    from smirror.mirror.local import LocalTarget
    stop = kw.pop("stop", None)
    run = ConnectionMirror(LocalTarget(dst), options_for(mode, **kw), stop=stop)
    return cap.run_mirror(run, pipe, adopt=adopt)


def test_a_connection_mirror_links_hard_links_again_and_settles_the_root_and_orphan_parents(tmp_path):
    """A stream mirror against a target whose copies of a hard-linked file
    are separate files (a kill between the CREATE and the HARDLINK, say):
    the names are linked again; the root's mtime and those of the orphans'
    parents (the orphan policy deletes there) are sent when quiet."""
    import json
    import subprocess
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a").write_bytes(b"shared")
    os.link(src / "d" / "a", src / "b")
    shutil.copytree(src, dst)                       # separate copies of a and b
    (dst / "d" / "orphan").write_text("deleted on the source while it was down")
    for p in ("d/a", "b", "d", ""):
        shutil.copystat(src / p, dst / p)
    os.utime(dst, ns=(0, 10**18))                   # the root's mtime differs too
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
    try:
        cap.load_target(src)
        orphans = connection_mirror(cap, dst, pipe, adopt=False).orphans
        assert orphans == [b"d/orphan"]
        assert [sorted((bytes(op.path), bytes(op.path2))) for op in pipe
                if op.kind == OpKind.HARDLINK] == [[b"b", b"d/a"]]
        os.unlink(dst / "d" / "orphan")             # what --orphans delete does
        cap.sync()
        pipe.applier.flush()
    finally:
        cap.close()
    assert os.stat(dst / "b").st_ino == os.stat(dst / "d" / "a").st_ino
    # the root's mtime travels in a MARK (a target connection applies it)
    from smirror.capture.watch import MARK_ROOT_MTIME
    marks = [json.loads(bytes(op.data)) for op in pipe
             if op.kind == OpKind.MARK and bytes(op.path) == MARK_ROOT_MTIME]
    # (the mirror's own, then the capture's once quiet: the orphan's parent)
    assert marks and all(m == {"mtime_ns": os.stat(src).st_mtime_ns} for m in marks)
    os.utime(dst, ns=(0, marks[0]["mtime_ns"]))
    out = subprocess.run(["rsync", "-aHAX", "--dry-run", "--itemize-changes", "--delete",
                          f"{src}/", f"{dst}/"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "", out


def test_a_path_lost_for_good_does_not_hold_back_directory_mtimes(rig):
    """A path gone when its event came and never seen again (deleted, or
    moved out with its directory) is dropped once the capture is quiet;
    kept, it held back the directory mtimes the capture thread sends when
    quiet, for ever (found by tools/faults.py kill)."""
    src, dst, cap, pipe = rig
    same(src, dst, cap, pipe)
    cap._lost.add(b"d/gone-for-good")
    (src / "d" / "new").write_text("x")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:      # what the capture thread's loop does
        cap.poll(0.05)
        pipe.applier.flush()
        # all three: the two mtimes may also agree by chance (one tick of
        # the file clock) before the lost path is dropped
        if not cap._lost and (dst / "d" / "new").exists() \
                and os.stat(dst / "d").st_mtime_ns == os.stat(src / "d").st_mtime_ns:
            break
    assert not cap._lost
    assert diff(snapshot(src), snapshot(dst)) == []
    assert os.stat(dst / "d").st_mtime_ns == os.stat(src / "d").st_mtime_ns


def test_a_renamed_directory_gets_the_sources_mtime_when_quiet(rig):
    """The target's copy of a directory may have another mtime than the
    cache says (a restart's mirror made the new name before the RENAME came
    and the target renamed the old copy over it): a renamed directory's
    own mtime is sent when quiet."""
    src, dst, cap, pipe = rig
    same(src, dst, cap, pipe)
    os.utime(dst / "d", ns=(0, 10**18))         # the target's copy differs; the cache does not know
    os.rename(src / "d", src / "d2")
    same(src, dst, cap, pipe)
    assert os.stat(dst / "d2").st_mtime_ns == os.stat(src / "d2").st_mtime_ns


def test_a_name_created_and_gone_before_its_event_is_read_still_settles_its_directory(rig):
    """No op follows a file created and deleted before the capture read
    the events, but the directory's mtime moved: it is sent when quiet."""
    src, dst, cap, pipe = rig
    same(src, dst, cap, pipe)
    time.sleep(0.01)
    (src / "d" / "transient").write_text("x")
    (src / "d" / "transient").unlink()
    same(src, dst, cap, pipe)
    assert os.stat(dst / "d").st_mtime_ns == os.stat(src / "d").st_mtime_ns


def test_a_directory_found_again_after_it_was_lost_gets_its_subtrees_mtimes(rig):
    """A directory gone when its event came (renamed on) and found again:
    what the target did with its subtree meanwhile is not known (a
    restart's mirror may have met it half renamed), so the mtimes of the
    directories in it are sent when quiet, not only what differs from the
    cache (found by tools/faults.py kill: '.d..t' inside renamed trees)."""
    src, dst, cap, pipe = rig
    same(src, dst, cap, pipe)
    os.utime(dst / "d" / "e", ns=(0, 10**18))       # the target's differs; the cache does not know
    cap._lost.add(b"d")                              # as when its event came while it was gone
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (cap._lost or cap._dirs_touched):
        cap.poll(0.05)
    pipe.applier.flush()
    assert os.stat(dst / "d" / "e").st_mtime_ns == os.stat(src / "d" / "e").st_mtime_ns


@pytest.mark.parametrize("adopt", [True, False])
def test_a_mirror_adopted_as_the_cache_lets_pending_events_see_what_the_target_holds(tmp_path, adopt):
    """A restart's mirror runs on a live tree: a file created after the
    cache was read but before the mirror's walk is on the target, and
    deleted before its events are read. Adopted as the cache (the capture
    feeds that target only), the mirror's result makes the DELETE go out;
    the source's older view (adopt=False, other targets) sends nothing."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_text("a")
    shutil.copytree(src, dst, dirs_exist_ok=True)
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
    try:
        cap.load_target(src)
        (src / "late").write_text("made after the cache was read")
        connection_mirror(cap, dst, pipe, adopt=adopt)
        pipe.applier.flush()
        assert (dst / "late").exists()
        (src / "late").unlink()
        cap.sync()
        pipe.applier.flush()
    finally:
        cap.close()
    assert (dst / "late").exists() is not adopt


def test_a_write_during_the_read_never_sends_its_mtime_with_the_older_bytes(rig):
    """A write lands between the read of a file and the SETATTR that
    follows it, and the capture is killed before that write's own event is
    handled (a SIGKILL of the source): the target must not be left with
    the older bytes under the source's size and mtime, which no size/mtime
    check (a restart's mirror) would look at again."""
    src, dst, cap, pipe = rig
    f = src / "f.db"
    f.write_bytes(b"A" * 100_000)
    same(src, dst, cap, pipe)
    f.write_bytes(b"B" * 100_000)
    late = {"done": False}
    emit = cap.emit

    def write_while_read(op):
        emit(op)
        if op.kind == OpKind.WRITE and op.path == b"f.db" and not late["done"]:
            late["done"] = True
            # same size, other bytes, a later clock tick
            with open(f, "r+b") as out:
                out.write(b"C" * 100_000)
            st = os.stat(f)
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    cap.emit = write_while_read
    for ev in cap.watcher.read(timeout=0.5):   # the events of the B write only
        cap.handle(ev)
    cap._flush_dirty(force=True)
    cap.emit = emit                            # killed: the C write's event is never handled
    pipe.applier.flush()
    assert late["done"]
    s, d = os.stat(f), os.stat(dst / "f.db")
    assert (dst / "f.db").read_bytes() == f.read_bytes() \
        or (s.st_size, s.st_mtime_ns) != (d.st_size, d.st_mtime_ns), \
        "the target holds other bytes under the source's size and mtime"


def test_names_of_one_inode_loaded_from_the_target_share_one_cache_entry(tmp_path, backend):
    """`replicate` restarted: the cache is loaded from the target tree. A
    file with two names there is one entry, so a chmod seen through one name
    is known under the other: changing the mode back through the other name
    must still be sent (it was dropped as no change: '.f...p')."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_bytes(b"x" * 100)
    os.chmod(src / "a", 0o644)
    os.link(src / "a", src / "b")
    shutil.copytree(src, dst, symlinks=True)        # the target as the last run left it
    os.unlink(dst / "b")
    os.link(dst / "a", dst / "b")
    shutil.copystat(src / "a", dst / "a")
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe, capture_backend=backend)
    try:
        cap.load_target(dst)
        assert cap.unlinked == []
        os.chmod(src / "a", 0o600)
        cap.sync()
        os.chmod(src / "b", 0o644)
        same(src, dst, cap, pipe)
    finally:
        cap.close()


def test_a_restart_mirror_never_takes_bytes_written_after_its_quick_check_for_the_targets(tmp_path):
    """A restart's mirror on a live tree: the target's listing and the
    source agree on size and mtime, so the source's hashes are taken for
    the target's; a write between that check and the read made the target's
    older bytes pass for the new ones, then its SETATTR gave them the new
    mtime (faults.py kill, source victim: '>fc........', for good)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"A" * 100_000)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
    real, late = cap._read_blocks, []

    def write_before_the_read(rel, k, fd, size, emit):
        # the hand-over hashes the source's file for the target's (the
        # quick check called them equal): a write comes just before
        if rel == b"f" and not emit and not late:
            late.append(rel)
            with open(src / "f", "r+b") as out:
                out.write(b"B" * 100_000)
            st = os.stat(src / "f")
            os.utime(src / "f", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        return real(rel, k, fd, size, emit)
    try:
        cap.load_target(src)
        cap._read_blocks = write_before_the_read
        connection_mirror(cap, dst, pipe, adopt=True)
        cap._read_blocks = real
        cap._flush_dirty(force=True, settled=True)  # what the capture does next (no event needed)
        pipe.applier.flush()            # killed now: the write's own event is never handled
    finally:
        cap.close()
    assert late
    s, d = os.stat(src / "f"), os.stat(dst / "f")
    assert (dst / "f").read_bytes() == (src / "f").read_bytes() or \
        (s.st_size, s.st_mtime_ns) != (d.st_size, d.st_mtime_ns), \
        "the target holds other bytes under the source's size and mtime"


def test_a_resync_asked_for_a_path_renamed_since_is_resent_under_its_new_name(rig):
    """The target asks for a resync of the path its failing op named; the
    source renamed that directory meanwhile, and the target renamed what it
    held there (divergence and all) when the RENAME came: the resync must
    reach the new name (an orphan survived there: faults.py kill, target
    victim, '*deleting x-349/odd name13')."""
    src, dst, cap, pipe = rig
    (src / "a").mkdir()
    (src / "a" / "f").write_text("f")
    same(src, dst, cap, pipe)
    os.rename(src / "a", src / "b")
    same(src, dst, cap, pipe)
    (dst / "b" / "stale").write_text("what the failing ops left")
    cap.resend(b"a", reason="op seq 9 DELETE b'a/stale' failed on the target")
    pipe.applier.flush()
    same(src, dst, cap, pipe)


def test_renames_folded_by_the_kernel_are_found_when_quiet(rig):
    """fanotify folds an event identical to one still queued into it: a
    directory renamed round a chain (a -> b -> c -> a -> b ...) and read
    late reports fewer renames, so the capture's last one names a path
    that is gone. Quiet, with every event in, that path is found missing
    and its parent compared again (the dirchain storm under load)."""
    from smirror.capture.inotify import Event, Kind
    src, dst, cap, pipe = rig
    (src / "a").mkdir()
    (src / "a" / "f").write_text("f")
    same(src, dst, cap, pipe)
    os.rename(src / "a", src / "b")
    os.rename(src / "b", src / "c")
    cap.watcher.read(timeout=0.2)          # the kernel's events, dropped: folded below
    cap.handle(Event(Kind.MOVED, b"a", True, new_path=b"b"))
    same(src, dst, cap, pipe)


@pytest.mark.parametrize("how", ["attrib event", "structural resync"])
def test_a_new_mtime_never_goes_out_without_the_bytes_it_dates(rig, how):
    """A file is rewritten (same size) and, before that write's event is
    handled, its attributes are looked at: a chmod's ATTRIB event, or a
    structural resync (a directory renamed, the periodic verification).
    Its new mtime must not go out alone: killed then, the target keeps the
    older bytes under the source's size and mtime for good (faults.py kill,
    source victim: '>fc........')."""
    from smirror.capture.inotify import Event, Kind
    src, dst, cap, pipe = rig
    f = src / "f.db"
    f.write_bytes(b"A" * 100_000)
    same(src, dst, cap, pipe)
    f.write_bytes(b"B" * 100_000)
    os.chmod(f, 0o600)
    cap.watcher.read(timeout=0.2)          # the write's events: never handled (killed)
    if how == "attrib event":
        cap.handle(Event(Kind.ATTRIB, b"f.db", False))
    else:
        cap.resync(b"", "periodic verification", content=False)
    pipe.applier.flush()
    s, d = os.stat(f), os.stat(dst / "f.db")
    assert (dst / "f.db").read_bytes() == f.read_bytes() or \
        (s.st_size, s.st_mtime_ns) != (d.st_size, d.st_mtime_ns), \
        "the target holds other bytes under the source's size and mtime"


def test_a_file_renamed_over_one_name_of_a_hard_link_never_writes_into_the_others(rig):
    """An editor saves over one name of a hard-linked pair (write a
    temporary, rename it over 'a'); the capture did not see the temporary
    (its rename is 'renamed before it was seen'). On the target 'a' is
    still linked to 'b': the new bytes must not be written into that
    shared inode ('b' changed with it: faults.py kill, source victim after
    a restart: '>fc' on one name, 'hf' on the other)."""
    from smirror.capture.inotify import Event, Kind
    src, dst, cap, pipe = rig
    (src / "a").write_bytes(b"linked " * 1000)
    os.link(src / "a", src / "b")
    same(src, dst, cap, pipe)
    assert os.stat(dst / "a").st_ino == os.stat(dst / "b").st_ino
    (src / "tmp").write_bytes(b"saved  " * 1000)
    os.rename(src / "tmp", src / "a")
    cap.watcher.read(timeout=0.2)          # the temporary's events: never seen
    cap.handle(Event(Kind.MOVED, b"tmp", False, new_path=b"a"))
    same(src, dst, cap, pipe)
    assert (dst / "b").read_bytes() == b"linked " * 1000
    assert os.stat(dst / "a").st_ino != os.stat(dst / "b").st_ino


def _skipped_then_resent(rig, kinds, change, failed):
    """``sub/x`` hard-linked with ``y`` (outside ``sub``) and replicated;
    then ``change()`` runs with the ops of ``kinds`` dropped (the target
    skipped them), and the target asks for a resync of ``sub``."""
    src, dst, cap, pipe = rig
    (src / "sub").mkdir()
    (src / "sub" / "x").write_bytes(b"old " * 5000)
    os.link(src / "sub" / "x", src / "y")
    same(src, dst, cap, pipe)
    emit = cap.emit
    cap.emit = lambda op: None if op.kind in kinds else emit(op)
    change(src / "sub" / "x")
    cap.sync()
    cap.emit = emit
    cap.resend(b"sub", reason=f"op seq 9 {failed} b'sub/x' failed on the target")
    same(src, dst, cap, pipe)


def test_a_resync_sends_a_name_linked_outside_its_subtree_whole(rig):
    """Writes to one name of a hard-linked file were skipped by the target
    (its directory was missing there), which asked for a resync of that
    directory. The resync links the name again to the other one, outside
    the subtree, on the target: the file's bytes must then be sent whole,
    not diffed against the cache, which counts the skipped writes as
    applied (faults.py kill, target victim: '>fc........' on the linked
    file, for good)."""
    src, dst, _, _ = rig

    def write(x):
        with open(x, "r+b") as f:
            f.write(b"new!")
    _skipped_then_resent(rig, (OpKind.WRITE, OpKind.TRUNCATE), write, "WRITE")
    assert (dst / "y").read_bytes() == (src / "y").read_bytes()


def test_a_resync_sends_the_attributes_of_a_name_linked_outside_its_subtree(rig):
    """The same with attributes: a chmod, a new mtime and an xattr of one
    name of a hard-linked file were skipped by the target (its directory was
    missing there). Linked again to the name outside the subtree, the inode
    must get the source's attributes, not keep those the cache counts as
    applied (faults.py kill under load, target victim: '.f...p.....' and
    'hf...p.....' on one hard-link group, for good)."""
    src, dst, _, _ = rig

    def attrs(x):
        os.chmod(x, 0o600)
        os.setxattr(x, b"user.tag", b"new")
        os.utime(x, ns=(10**18, 10**18))
    _skipped_then_resent(rig, (OpKind.SETATTR, OpKind.XATTR), attrs, "SETATTR")
    for name in ("y", "sub/x"):
        s, d = os.stat(src / name), os.stat(dst / name)
        assert (stat.S_IMODE(d.st_mode), d.st_mtime_ns) == (stat.S_IMODE(s.st_mode), s.st_mtime_ns), name
        assert os.getxattr(dst / name, b"user.tag") == b"new", name


def test_zero_blocks_inside_the_targets_file_are_sent_when_its_hashes_are_unknown(tmp_path):
    """A mirror against a target listed without block hashes (the cache
    knows its size, not its bytes): a block of zeros on the source within
    the target file's size must be sent, not skipped as a hole (the target
    kept its old bytes there under the source's size and mtime:
    '>fc........', for good)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_bytes(b"Y" * 8192 + b"\0" * 8192)
    (dst / "f").write_bytes(b"X" * 16384)
    os.utime(dst / "f", ns=(0, 10**18))        # the mtimes differ: compared by blocks
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
    try:
        cap.load_target(src)
        connection_mirror(cap, dst, pipe, adopt=True)
        pipe.applier.flush()
    finally:
        cap.close()
    assert (dst / "f").read_bytes() == (src / "f").read_bytes()


# -- the mirror engine writing through a stream (smirror replicate's initial
# mirror: mirror.remote.StreamTarget), its result adopted as the cache
# (TreeCapture.load_target, as replicate does): the same guarantees as the connection mirror above


def stream_mirror(cap, src, dst, pipe, adopt=True, **options):
    """What smirror replicate's initial mirror does (Replication._initial_mirror):
    the mirror engine reads DST and writes
    ops into ``pipe`` (applied at once); with ``adopt`` the capture's cache
    becomes what it left. Returns the engine's summary."""
    from smirror.mirror.engine import Mirror, MirrorOptions
    from smirror.mirror.local import LocalTarget
    from smirror.mirror.remote import StreamTarget
    reader = LocalTarget(dst)
    target = StreamTarget(reader, pipe)
    try:
        with cap.paused():
            engine = Mirror(src, target, MirrorOptions(**{"different": True, "checksum": True,
                                                           **options}))
            summary = engine.run()
            if adopt:       # as smirror replicate does after its initial mirror
                cap.load_target(dst)
                for rel in cap.unlinked:
                    cap.resync(rel, "a hard link the target holds apart")
    finally:
        reader.close()
    assert summary.errors == []
    return summary


def test_the_engine_through_a_stream_links_hard_links_again_and_settles_the_root_and_orphans(tmp_path):
    """A stream mirror against a target whose copies of a hard-linked file
    are separate files (a kill between the CREATE and the HARDLINK, say):
    the names are linked again; the root's mtime travels in a MARK, those
    of the orphans' parents (the orphan policy deletes there) are sent when
    quiet."""
    import json
    import subprocess
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a").write_bytes(b"shared")
    os.link(src / "d" / "a", src / "b")
    shutil.copytree(src, dst)                       # separate copies of a and b
    (dst / "d" / "orphan").write_text("deleted on the source while it was down")
    for p in ("d/a", "b", "d", ""):
        shutil.copystat(src / p, dst / p)
    os.utime(dst, ns=(0, 10**18))                   # the root's mtime differs too
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
    try:
        cap.load_target(src)
        summary = stream_mirror(cap, src, dst, pipe, adopt=False, orphans="delete")
        assert summary.orphans == [b"d/orphan"]
        assert not (dst / "d" / "orphan").exists()
        assert [sorted((bytes(op.path), bytes(op.path2))) for op in pipe
                if op.kind == OpKind.HARDLINK] == [[b"b", b"d/a"]]
        cap.sync()
        pipe.applier.flush()
    finally:
        cap.close()
    assert os.stat(dst / "b").st_ino == os.stat(dst / "d" / "a").st_ino
    # the root's mtime travels in a MARK (a target connection applies it)
    from smirror.capture.watch import MARK_ROOT_MTIME
    marks = [json.loads(bytes(op.data)) for op in pipe
             if op.kind == OpKind.MARK and bytes(op.path) == MARK_ROOT_MTIME]
    assert marks == [{"mtime_ns": os.stat(src).st_mtime_ns}]
    os.utime(dst, ns=(0, marks[0]["mtime_ns"]))
    # mtimes to the nanosecond (rsync's default compares whole seconds:
    # a difference of a few ms showed only when a second began between)
    out = subprocess.run(["rsync", "-aHAX", "--modify-window=-1", "--dry-run", "--itemize-changes",
                          "--delete", f"{src}/", f"{dst}/"], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "", out


@pytest.mark.parametrize("adopt", [True, False])
def test_an_engine_mirror_adopted_as_the_cache_lets_pending_events_see_the_target(tmp_path, adopt):
    """A restart's mirror runs on a live tree: a file created after the
    cache was read but before the mirror's walk is on the target, and
    deleted before its events are read. Adopted as the cache (the capture
    feeds that target only), the mirror's result makes the DELETE go out;
    the source's older view (adopt=False, other targets) sends nothing."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_text("a")
    shutil.copytree(src, dst, dirs_exist_ok=True)
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
    try:
        cap.load_target(src)
        (src / "late").write_text("made after the cache was read")
        stream_mirror(cap, src, dst, pipe, adopt=adopt)
        pipe.applier.flush()
        assert (dst / "late").exists()
        (src / "late").unlink()
        cap.sync()
        pipe.applier.flush()
    finally:
        cap.close()
    assert (dst / "late").exists() is not adopt


def test_an_adopted_engine_mirror_never_takes_bytes_written_after_its_quick_check(tmp_path):
    """A restart's mirror on a live tree: the target and the source agree
    on size and mtime, so the mirror leaves the file alone and the capture
    adopting its result takes the source's hashes for the target's; a
    write between that check and the read made the target's older bytes
    pass for the new ones: the write's own event then sent only its new
    mtime (faults.py kill, source victim: '>fc........', for good)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"A" * 100_000)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
    real, late = cap._diff_file, []

    def write_before_the_read(rel, emit, **kw):
        if rel == b"f" and not emit and not late:
            late.append(rel)
            with open(src / "f", "r+b") as out:
                out.write(b"B" * 100_000)
            st = os.stat(src / "f")
            os.utime(src / "f", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        return real(rel, emit, **kw)
    try:
        cap.load_target(src)
        cap._diff_file = write_before_the_read
        stream_mirror(cap, src, dst, pipe, adopt=True)
        cap._diff_file = real
        pipe.applier.flush()
        assert late
        s, d = os.stat(src / "f"), os.stat(dst / "f")
        assert (dst / "f").read_bytes() == (src / "f").read_bytes() or \
            (s.st_size, s.st_mtime_ns) != (d.st_size, d.st_mtime_ns), \
            "the target holds other bytes under the source's size and mtime"
        same(src, dst, cap, pipe)       # the write's own event: its bytes go with its mtime
    finally:
        cap.close()


def test_the_engine_through_a_stream_sends_zero_blocks_inside_the_targets_file(tmp_path):
    """A mirror against a target listed without block hashes (the cache
    knows its size, not its bytes): a block of zeros on the source within
    the target file's size must be sent, not skipped as a hole (the target
    kept its old bytes there under the source's size and mtime:
    '>fc........', for good)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_bytes(b"X" * 8192 + b"\0" * 8192)     # only the zeros differ
    (dst / "f").write_bytes(b"X" * 16384)
    os.utime(dst / "f", ns=(0, 10**18))        # the mtimes differ: compared by blocks
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
    try:
        cap.load_target(src)
        stream_mirror(cap, src, dst, pipe, adopt=True)
        pipe.applier.flush()
    finally:
        cap.close()
    assert (dst / "f").read_bytes() == (src / "f").read_bytes()


@pytest.mark.parametrize("order", ["linked after the rename", "linked before the rename",
                                   "linked before the rename, then written"])
def test_a_hard_link_to_a_file_renamed_on_before_the_cache_was_loaded_is_linked_on_the_target(
        tmp_path, backend, order):
    """`replicate` restarted on a live tree (faults.py kill, replicate-live:
    'hf', two names of one inode held apart on the target): the restart's
    mirror copied d/f; before the cache is loaded from the target, d is
    renamed to e (the cache finds no d/f on the source: its inode is not
    known) and a hard link g is made to the file, which the mirror did not
    see. The target must end with e/f and g as one inode, whichever event
    comes first (a write's event read before the rename's resync, too)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(os.urandom(50_000))
    shutil.copytree(src, dst)                   # what the restart's mirror left
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe, capture_backend=backend)   # watching before the mirror
    try:
        if order.startswith("linked before"):
            os.link(src / "d" / "f", src / "g")
        os.rename(src / "d", src / "e")
        if order == "linked after the rename":
            os.link(src / "e" / "f", src / "g")
        cap.load_target(dst)
        if order.endswith("written"):
            with open(src / "e" / "f", "r+b") as f:
                f.write(b"new bytes")
        cap.sync()
        pipe.applier.flush()
    finally:
        cap.close()
    assert os.stat(dst / "e" / "f").st_ino == os.stat(dst / "g").st_ino
    assert rsync_diff(src, dst) == []


def test_a_write_through_a_hard_link_unlinked_before_the_cache_was_loaded_reaches_its_other_name(
        tmp_path, backend):
    """`replicate` restarted on a live tree (faults.py kill, replicate-live:
    '>fc.t'): the restart's mirror copied a and b, one inode; then the
    file is written through a and a is unlinked, before the cache is loaded
    from the target. The write's event is lost with a (fanotify folds it
    into the DELETE; inotify's comes when a is gone), so the target's b
    gets the new bytes only if the cache knows a and b are one inode there."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_bytes(b"A" * 50_000)
    os.link(src / "a", src / "b")
    dst.mkdir()
    shutil.copy2(src / "a", dst / "a")          # what the restart's mirror left
    os.link(dst / "a", dst / "b")
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe, capture_backend=backend)   # watching before the mirror
    try:
        with open(src / "a", "r+b") as f:
            f.write(b"B" * 1000)
        os.unlink(src / "a")
        cap.load_target(dst)
        cap.sync()
        pipe.applier.flush()
    finally:
        cap.close()
    assert (dst / "b").read_bytes() == (src / "b").read_bytes()
    assert rsync_diff(src, dst) == []


def test_a_write_through_a_hard_link_gone_before_the_mirror_reached_it_reaches_the_names_it_read(tmp_path):
    """A source daemon's restart mirror on a live tree (faults.py kill,
    source victim: '>fc.t' and 'hf' on every other name): the walk read
    a, one name of a hard-linked file, then the file was written through
    its other name b and b unlinked, before the walk reached b. The
    write's event is lost with b (fanotify folds it into the DELETE), so
    the target's a gets the new bytes only if the mirror looks again."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_bytes(b"A" * 50_000)
    os.link(src / "a", src / "b")
    shutil.copytree(src, dst)                   # the target, separate copies
    os.utime(dst / "a", ns=(0, 10**18))         # compared: the engine reads a
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
    late = []

    def write_through_b_after_a_was_read(op):
        pipe(op)
        if op.kind == OpKind.HARDLINK and not late:     # a was read and sent, b linked to it
            late.append(op)
            with open(src / "b", "r+b") as f:
                f.write(b"B" * 1000)
            os.unlink(src / "b")
    try:
        cap.load_target(src)
        connection_mirror(cap, dst, write_through_b_after_a_was_read, adopt=True)
        cap.sync()
        pipe.applier.flush()
    finally:
        cap.close()
    assert late
    assert (dst / "a").read_bytes() == (src / "a").read_bytes()


def test_a_write_through_a_hard_link_made_and_unlinked_unseen_reaches_the_other_name(rig, backend):
    """A hard link made, written through and unlinked before the capture
    read its events: the write's event goes with the name (fanotify folds
    CREATE, MODIFY and DELETE into one DELETE), and the file's other name
    has none. fanotify's DELETE tells the inode that other names keep
    alive, and those are compared. inotify's events carry no inode: the
    other name waits for the periodic verification (size and mtime moved)."""
    if backend == "inotify":
        pytest.skip("inotify events carry no inode: left to the periodic verification")
    src, dst, cap, pipe = rig
    same(src, dst, cap, pipe)           # quiet: nothing left to look at again
    f = src / "d" / "e" / "f.txt"
    os.link(f, src / "tmp-link")
    with open(src / "tmp-link", "r+b") as out:
        out.write(b"written through the other name")
    os.unlink(src / "tmp-link")
    same(src, dst, cap, pipe)


@pytest.mark.parametrize("on_target", [False, True])
def test_a_symlink_gone_between_the_walks_lstat_and_its_readlink_does_not_stop_the_mirror(
        tmp_path, monkeypatch, on_target):
    """A source daemon's restart mirror on a live tree (faults.py kill,
    source victim: 'connection 1: not started: [Errno 2] No such file or
    directory', the orphans never deleted): a symlink removed after the
    walk's lstat and before its readlink must not end the mirror, whether
    the target has it (compared) or not (created)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    os.symlink("somewhere", src / "link")
    (src / "after").write_text("the walk goes on")
    if on_target:
        os.symlink("elsewhere", dst / "link")
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
    real = os.readlink

    def gone_before_the_readlink(path, *a, **kw):
        if os.fsencode(path) == os.fsencode(src / "link") and os.path.lexists(path):
            os.unlink(path)
        return real(path, *a, **kw)
    try:
        cap.load_target(src)
        monkeypatch.setattr(os, "readlink", gone_before_the_readlink)
        connection_mirror(cap, dst, pipe, adopt=True)
        monkeypatch.setattr(os, "readlink", real)
        cap.sync()
        pipe.applier.flush()
    finally:
        cap.close()
    assert (dst / "after").read_text() == "the walk goes on"
    assert not os.path.lexists(dst / "link")


@pytest.mark.parametrize("order", ["linked after the rename", "linked before the rename"])
def test_a_hard_link_to_names_renamed_on_before_the_cache_was_loaded_is_linked_to_all_of_them(
        tmp_path, backend, order):
    """As above, with two names d/a and d/b of the file, one inode on the
    target too (one cache entry whose source inode is not known): the new
    link g must end as one inode with both (faults.py kill,
    replicate-live: 'hf x-2308 => log2431' and 'hf x-1518/data2348 =>
    log2431')."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a").write_bytes(os.urandom(50_000))
    os.link(src / "d" / "a", src / "d" / "b")
    shutil.copytree(src, dst)                   # what the restart's mirror left
    os.unlink(dst / "d" / "b")
    os.link(dst / "d" / "a", dst / "d" / "b")
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe, capture_backend=backend)
    try:
        if order == "linked before the rename":
            os.link(src / "d" / "a", src / "g")
        os.rename(src / "d", src / "e")
        if order == "linked after the rename":
            os.link(src / "e" / "a", src / "g")
        cap.load_target(dst)
        cap.sync()
        pipe.applier.flush()
    finally:
        cap.close()
    assert len({os.stat(dst / p).st_ino for p in ("e/a", "e/b", "g")}) == 1
    assert rsync_diff(src, dst) == []


def test_names_the_listing_met_as_one_inode_but_the_mirror_wrote_apart_are_linked_again(tmp_path):
    """A link made while the source was being listed (faults.py kill,
    source victim: 'hf data5590/log6776 => x-5088'): one name was listed
    before it (one link), the other after (two), so the mirror wrote them
    as two files. The hand-over sees one source inode under two cache
    entries and links the names again on the target."""
    from smirror.capture.watch import MirrorHandover
    from smirror.fs.tree import entry_from_stat, scan
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "x").write_bytes(b"one inode")
    os.link(src / "x", src / "y")
    shutil.copytree(src, dst)                   # what the mirror wrote: two files
    assert os.stat(dst / "x").st_ino != os.stat(dst / "y").st_ino
    left = {rel: e for rel, e in scan(os.fsencode(src)).entries.items()}
    left[b"x"] = entry_from_stat(os.stat(src / "x"))
    left[b"y"] = entry_from_stat(os.stat(src / "y"))
    target = scan(os.fsencode(dst)).entries
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
    try:
        cap.take_mirror(pipe, MirrorHandover(
            left=left, links={}, hashes={}, kept=set(), unsure=set(), stale=set(), target=target,
            source=dict(left), xattrs=lambda rel: None))
        assert cap.known[b"x"] is cap.known[b"y"]
        cap.sync()
        pipe.applier.flush()
    finally:
        cap.close()
    assert os.stat(dst / "x").st_ino == os.stat(dst / "y").st_ino
    assert (dst / "y").read_bytes() == b"one inode"


def test_a_name_linked_to_a_leader_replaced_after_the_listing_is_sent_anew(tmp_path):
    """The listing met x and y as one inode; x was replaced before the
    mirror read it (a new file renamed over it), so the target's y, linked
    to x, holds the new file's bytes while the source's y is the old inode,
    and no event of y's says so. The hand-over sees y's inode differ from
    its leader's and sends y anew, apart."""
    from smirror.capture.watch import MirrorHandover
    from smirror.fs.tree import entry_from_stat, scan
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "x").write_bytes(b"the new x")       # the leader as the mirror read it
    (src / "y").write_bytes(b"the old inode, y's still")
    (dst / "x").write_bytes(b"the new x")       # the mirror's ops: x written, y linked to it
    os.link(dst / "x", dst / "y")
    for p in ("x", "y"):
        shutil.copystat(src / p, dst / p)
    scanned = scan(os.fsencode(src)).entries
    left = dict(scanned)
    left[b"x"] = entry_from_stat(os.stat(src / "x"))
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
    try:
        cap.take_mirror(pipe, MirrorHandover(
            left=left, links={b"y": b"x"}, hashes={}, kept=set(), unsure=set(), stale=set(),
            target=scan(os.fsencode(dst)).entries, source=scanned, xattrs=lambda rel: None))
        assert cap.known[b"x"] is not cap.known[b"y"]
        cap.sync()
        pipe.applier.flush()
    finally:
        cap.close()
    assert os.stat(dst / "x").st_ino != os.stat(dst / "y").st_ino
    assert (dst / "y").read_bytes() == b"the old inode, y's still"
    assert (dst / "x").read_bytes() == b"the new x"
