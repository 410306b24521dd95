"""A connection's mirror (the engine through TreeCapture.run_mirror) stopped between files
(mirror-stop), and its ``newer`` form that leaves the target's newer files
alone: what reaches the target, and what the capture's cache believes
afterwards (the next change, and the periodic verification, must still
converge)."""
import os
import threading

from smirror.capture.watch import TreeCapture
from smirror.mirror.compare import source_is_newer
from smirror.ops import OpKind
from support.treestate import diff, snapshot
from test_watch import Pipe, connection_mirror


def without(entries, name):
    return [e for e in entries if name not in str(e)]


def test_a_stopped_mirror_ends_between_files_names_no_orphan_and_assumes_nothing_it_did_not_send(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    for i in range(30):
        (src / f"f{i:02}").write_bytes(os.urandom(10_000))
    (src / "sub" / "g").write_text("in a directory")
    dst.mkdir()
    (dst / "zz-orphan").write_text("only on the target")
    pipe = Pipe(dst)
    stop = threading.Event()

    def stopping(op):           # mirror-stop comes while the 5th file is sent
        pipe(op)
        if sum(o.kind == OpKind.CREATE for o in pipe) == 5:
            stop.set()

    found = []
    cap = TreeCapture(src, pipe)
    try:
        cap.load_target(src)
        h = connection_mirror(cap, dst, stopping, adopt=True, stop=stop)
        stats, found = h.stats, h.orphans
        pipe.applier.flush()
        # the directory made before the files, and the files reached
        assert stats["stopped"] and stats["entries_checked"] == 6
        # the entries not reached cannot be told from orphans: none is named
        assert found == []
        sent = sorted(p.name for p in dst.iterdir() if p.name not in ("sub", "zz-orphan"))
        assert len(sent) == 5 and (dst / "sub").is_dir() and (dst / "zz-orphan").exists()
        for name in sent:                       # each file reached is whole
            assert (dst / name).read_bytes() == (src / name).read_bytes()
        # the cache (adopted: this target only) holds what was sent, nothing more
        assert sorted(cap.known) == sorted([b"", b"sub"] + [os.fsencode(n) for n in sent])
        unreached = sorted(set(f"f{i:02}" for i in range(30)) - set(sent))
        # a change to a file the mirror never reached, also in a directory
        # it never reached: sent whole, not as a diff, and not dropped
        with open(src / unreached[0], "r+b") as f:
            f.write(b"changed")
        with open(src / "sub" / "g", "a") as f:
            f.write(", changed")
        cap.sync()
        pipe.applier.flush()
        assert (dst / unreached[0]).read_bytes() == (src / unreached[0]).read_bytes()
        assert (dst / "sub" / "g").read_text() == "in a directory, changed"
        assert not (dst / unreached[1]).exists()    # the rest waits for a mirror (or the verification)
        # the periodic verification does not take the rest as being there
        cap.verify()
        pipe.applier.flush()
        assert without(diff(snapshot(src), snapshot(dst)), "zz-orphan") == []
        assert (dst / "zz-orphan").exists()     # orphan policy 'report': left alone
    finally:
        cap.close()


def test_a_stop_set_before_the_mirror_checks_it_ends_it_at_once_and_a_mirror_without_one_runs_whole(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for i in range(3):
        (src / f"f{i}").write_text(str(i))
    stop = threading.Event()
    stop.set()
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
    try:
        cap.load_target(src)
        stats = connection_mirror(cap, dst, pipe, adopt=False, stop=stop).stats
        assert stats["stopped"] and stats["entries_checked"] == 0 and list(dst.iterdir()) == []
        stats = connection_mirror(cap, dst, pipe, adopt=False, stop=threading.Event()).stats
        pipe.applier.flush()
        assert "stopped" not in stats and stats["entries_checked"] == 3
        assert diff(snapshot(src), snapshot(dst)) == []
    finally:
        cap.close()


def test_the_newer_rule_is_storage_mirrorings():
    assert source_is_newer(2, 10, 1, 10)            # a later mtime: sent
    assert not source_is_newer(1, 10, 2, 99)        # the target's is later: left alone
    assert source_is_newer(5, 10, 5, 11)            # the same mtime, another size: sent
    assert not source_is_newer(5, 10, 5, 10)        # unchanged


def make_newer_pair(tmp_path):
    """The target holds 'big' and 'small' newer than the source (one larger,
    one smaller), 'old' older; 'fresh' only the source has."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    t = 1_700_000_000
    for name, source, target, s_time, t_time in (
            ("big", b"source v1", b"the target's newer, longer copy", t, t + 60),
            ("small", b"source copy, longer", b"target newer", t, t + 60),
            ("old", b"source, newer", b"target, older", t + 60, t)):
        (src / name).write_bytes(source)
        (dst / name).write_bytes(target)
        os.utime(src / name, (s_time, s_time))
        os.utime(dst / name, (t_time, t_time))
    (src / "fresh").write_text("new on the source")
    return src, dst


def test_a_newer_mirror_leaves_the_targets_newer_files_until_the_source_changes_them(tmp_path):
    src, dst = make_newer_pair(tmp_path)
    keep = {b"big", b"small"}
    before = {n: ((dst / n).read_bytes(), os.stat(dst / n).st_mtime_ns) for n in ("big", "small")}
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
    try:
        cap.load_target(src)
        stats = connection_mirror(cap, dst, pipe, adopt=True, newer=True).stats
        pipe.applier.flush()
        assert stats["kept_newer"] == 2
        assert (dst / "old").read_bytes() == b"source, newer" and (dst / "fresh").exists()
        assert {n: ((dst / n).read_bytes(), os.stat(dst / n).st_mtime_ns) for n in before} == before
        assert not any(bytes(op.path) in keep for op in pipe)     # not a byte, not an attribute
        # the periodic verification leaves them too: the source has not changed them
        cap.verify()
        pipe.applier.flush()
        assert {n: ((dst / n).read_bytes(), os.stat(dst / n).st_mtime_ns) for n in before} == before
        # a change on the source sends the file whole, and cuts the longer
        # target copy to the source's size (no tail of the target's bytes)
        for name in ("big", "small"):
            with open(src / name, "r+b") as f:
                f.write(b"S")
        cap.sync()
        pipe.applier.flush()
        assert diff(snapshot(src), snapshot(dst)) == []
    finally:
        cap.close()


def test_a_newer_mirror_on_a_shared_cache_sends_the_kept_files_whole_at_their_next_change(tmp_path):
    """adopt=False (the capture feeds other targets too): its cache holds the
    source's bytes, which this target does not have for the kept files: their
    next change goes out whole (to every target), never as a diff."""
    src, dst = make_newer_pair(tmp_path)
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe)
    try:
        cap.load_target(src)
        connection_mirror(cap, dst, pipe, adopt=False, newer=True)
        pipe.applier.flush()
        assert (dst / "big").read_bytes() == b"the target's newer, longer copy"
        for name in ("big", "small"):
            with open(src / name, "r+b") as f:
                f.write(b"S")
        cap.sync()
        pipe.applier.flush()
        assert diff(snapshot(src), snapshot(dst)) == []
    finally:
        cap.close()
