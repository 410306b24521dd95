"""The watcher's capture sending a path again: what the target holds after
the op that re-makes it must be what the source has, attributes included
(power-loss trials, tools/powerloss.py: each test here is a divergence a
trial left for good)."""
import os

from smirror.capture.watch import TreeCapture
from support.applying import Pipe
from support.faults import rsync_diff


def test_a_symlink_sent_again_gets_its_mtime_again(tmp_path):
    """A symlink created in a directory renamed right after: the capture
    sent its SYMLINK and mtime, but read its target too late to cache it
    (the directory was gone). A later resync finds the cached target
    differs and sends the SYMLINK again, which makes a new symlink on the
    target, with the time of applying: its mtime must be sent again too
    ('.L..t...... f195/odd name3 -> ../elsewhere', for good)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    os.symlink("../elsewhere", src / "d" / "l")
    os.utime(src / "d" / "l", ns=(10**18, 10**18), follow_symlinks=False)
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe, verify_interval=None)
    try:
        cap.resync(b"", "initial")
        cap.sync()
        assert rsync_diff(src, dst) == []
        cap.known[b"d/l"].link = None       # what the race leaves in the cache
        cap.resync(b"d", "directory renamed")
        # quiet: the mtime of d, whose entry the new symlink changed on the
        # target, is sent (without it the check passed only while source and
        # target times fell in the same second: failed 2 runs in 40)
        cap.sync()
    finally:
        cap.close()
    assert rsync_diff(src, dst) == []


def test_a_resend_of_a_path_the_source_lacks_sends_its_parents_mtime_again(tmp_path):
    """The target asks for a path the source no longer has (its failing
    op's path, renamed or deleted since): the resend deletes it on the
    target, which changes the target's directory above it; that
    directory's mtime (the root's too: a MARK) must be the source's again
    ('.d..t...... ./', for good)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"kept")
    for d in (src / "d", src):
        os.utime(d, ns=(10**18, 10**18))
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe, verify_interval=None)
    try:
        cap.resync(b"", "initial")
        cap.sync()
        assert rsync_diff(src, dst) == []
        # what the target held there, and the source does not (a replay's)
        for stray in (dst / "gone", dst / "d" / "gone"):
            stray.write_bytes(b"stray")
        for path in (b"gone", b"d/gone"):
            cap.resend(path, reason="op seq 9 RENAME failed on the target")
        cap.sync()
    finally:
        cap.close()
    assert rsync_diff(src, dst) == []


def test_a_resend_of_a_name_linked_outside_its_subtree_sets_the_size(tmp_path):
    """The target's copy of a hard-linked file holds more than the source's
    (a replay wrote past its end; the op that failed asked for a resync of
    one name's directory). The resend links that name again to the other
    name, outside the subtree, and sends the bytes whole: the size must be
    the source's too, whatever the cache believed the target held
    ('hf.s....... f330' and '>fcs....... data497' on an 11-name group, for
    good)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "x").write_bytes(b"old " * 5000)
    os.link(src / "sub" / "x", src / "y")
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe, verify_interval=None)
    try:
        cap.resync(b"", "initial")
        cap.sync()
        assert rsync_diff(src, dst) == []
        with open(dst / "y", "ab") as f:       # the target's divergence
            f.write(b"more" * 3000)
        cap.resend(b"sub", reason="op seq 9 WRITE b'sub/x' failed on the target")
        cap.sync()
    finally:
        cap.close()
    assert (dst / "y").read_bytes() == (src / "y").read_bytes()
    assert rsync_diff(src, dst) == []


def test_a_resend_follows_the_renames_the_target_applied_after_its_failing_op(tmp_path):
    """The target failed a file's RENAME (it did not move), then applied
    the rename of the file's directory, which took the file along. The
    source has the file at the RENAME's destination, and nothing under the
    directory's new name: the resend the target asked for (the failing
    op's path) must remove what the target holds under the directory's new
    name too ('*deleting   log264/odd name116', for good)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "f180").mkdir(parents=True)
    (src / "elsewhere").mkdir()
    (src / "f180" / "odd name116").write_bytes(b"moved " * 100)
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe, verify_interval=None)
    try:
        cap.resync(b"", "initial")
        cap.sync()
        assert rsync_diff(src, dst) == []
        emit = cap.emit
        failed = b"f180/odd name116"
        cap.emit = lambda op: None if op.path == failed else emit(op)    # the target's failure
        os.rename(src / "f180" / "odd name116", src / "elsewhere" / "z")
        cap.sync()
        cap.emit = emit
        os.rename(src / "f180", src / "log264")
        cap.sync()
        assert (dst / "log264" / "odd name116").exists()
        cap.resend(failed, reason="op seq 9 RENAME b'f180/odd name116' failed on the target")
        cap.sync()
    finally:
        cap.close()
    assert rsync_diff(src, dst) == []


def test_a_resend_of_a_linked_name_the_source_removed_since_resends_its_other_names(tmp_path):
    """The target lacked one name of a hard-linked file when a write to it
    came (the applier made a new file there: its inode is not the other
    names' any more) and asked for a resync of that name. The writes and
    the chmod sent under that name reached only the new file; the cache
    counts them as the inode's. The source removed that name before the
    resync was served: the other names must be sent again, or the target
    keeps their old bytes and mode for good ('>fc..p..... data194')."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    (src / "y").write_bytes(b"old " * 5000)
    os.link(src / "y", src / "sub" / "x")
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe, verify_interval=None)
    try:
        cap.resync(b"", "initial")
        cap.sync()
        assert rsync_diff(src, dst) == []
        # the target's divergence: sub/x made anew by a repair
        os.unlink(dst / "sub" / "x")
        (dst / "sub" / "x").write_bytes(b"")
        with open(src / "sub" / "x", "r+b") as f:
            f.write(b"new!" * 100)
        os.chmod(src / "sub" / "x", 0o600)
        cap.sync()
        os.unlink(src / "sub" / "x")
        cap.sync()
        cap.resend(b"sub/x", reason="the target lacked what the op needed")
        cap.sync()
    finally:
        cap.close()
    assert rsync_diff(src, dst) == []
