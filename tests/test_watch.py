"""Watcher capture on real files: inotify events -> ops -> applier -> the
target equals the source; only changed blocks travel."""
import os
import shutil
import time

import pytest

from smirror.apply import Applier
from smirror.ops import OpKind
from smirror.tree import Rules
from smirror.watch import TreeCapture
from treestate import diff, snapshot


class Pipe(list):
    def __init__(self, dst):
        super().__init__()
        self.applier = Applier(dst)

    def __call__(self, op):
        op = op._replace(seq=len(self) + 1)
        self.append(op)
        self.applier.apply(op)


@pytest.fixture
def rig(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "e" / "f.txt").write_text("hello")
    (src / "big.db").write_bytes(os.urandom(1 << 20))
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
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


def test_rules_exclude(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe, rules=Rules.from_patterns([("exclude", "*.tmp")]))
    try:
        (src / "keep").write_text("k")
        (src / "skip.tmp").write_text("s")
        os.rename(src / "skip.tmp", src / "now-kept")
        cap.sync()
        pipe.applier.flush()
        assert sorted(os.listdir(dst)) == ["keep", "now-kept"]
    finally:
        cap.close()


def test_overflow_resync_loses_nothing(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
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


def test_load_target_then_diff_against_it(tmp_path):
    """After a mirror, the cache is built from the target itself."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(300_000))
    shutil.copytree(src, dst, dirs_exist_ok=True)
    shutil.copystat(src / "a", dst / "a")
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
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
    from smirror.inotify import Watcher
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
