"""A target that cannot be escaped (issue 12, findings 1-3), on the real
Applier / TargetConnection / KeepDirs and real files: what a malicious
source sends op by op, and what a local user on the target does between
two ops, never reaches outside the map base and its keep slots; setuid and
setgid bits and keep/move modes come from the target's configuration.

Every test that resolves paths runs twice: with openat2 and with the
component-by-component walk that old kernels get."""
import json
import os
import stat

import pytest

from smirror.daemon.config import from_mapping, setid_allowed
from smirror.errors import ConfigError, ConfinementError
from smirror.fs import beneath
from smirror.fs.keep import KeepDirs
from smirror.ops import MARK_IGNORED_DELETE, MARK_ORPHAN_MOVE, Op
from smirror.stream.apply import Applier
from smirror.stream.receiver import TargetConnection


@pytest.fixture(params=["openat2", "walk"])
def resolver(request, monkeypatch):
    monkeypatch.setattr(beneath, "use_openat2", request.param == "openat2")
    return request.param


def _outside(tmp_path):
    """A directory the source must never reach (a task directory, /etc/cron.d)
    with something in it to overwrite, chmod, truncate or delete."""
    out = tmp_path / "outside"
    (out / "sub").mkdir(parents=True)
    (out / "f").write_bytes(b"outside data")
    os.chmod(out / "f", 0o644)
    return out


def _snapshot(top):
    """Every entry under ``top`` (itself too): kind, mode, size, mtime, content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [""] + dirnames + filenames:
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            data = open(p, "rb").read() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, top)] = (st.st_mode, st.st_size, st.st_mtime_ns, data)
    return out


def _all_entries(top):
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            yield os.path.join(dirpath, name)


def _target(tmp_path, **kw):
    tc = TargetConnection(1, tmp_path / "base", tmp_path / "state", apply=False,
                          keep_dirs=KeepDirs(tmp_path / "orphans", tmp_path / "deleted"), **kw)
    tc.source = "src1"
    return tc


def _mark(seq, label, path, **extra):
    return Op.mark(seq, label, json.dumps({"path": path, **extra}).encode())


# -- finding 1: a symlink moved into a keep slot, then written through ----------------

@pytest.mark.parametrize("label", [MARK_IGNORED_DELETE, MARK_ORPHAN_MOVE])
def test_keep_slot_attack_replayed_op_by_op(tmp_path, resolver, label):
    out = _outside(tmp_path)
    before = _snapshot(out)
    tc = _target(tmp_path, deleted_mode="move")      # the worst case: the target moves
    ops = [Op.symlink(1, b"x", os.fsencode(out)),
           _mark(2, label, "x", mode="move"),
           Op.mkdir(3, b"x", 0o755),
           Op.create(4, b"x/evil.sh", 0o4755),
           Op.write(5, b"x/evil.sh", 0, b"#!/bin/sh\nid > /tmp/pwned\n"),
           _mark(6, label, "x/evil.sh", mode="move")]
    try:
        for op in ops:
            try:
                tc.applier.apply(op)
            except ConfinementError:
                pass        # a refusal is fine; what matters is what happened on disk
            tc.applier.flush()
    finally:
        tc.close()
    assert _snapshot(out) == before, "something was written outside the map base"
    slot_top = tmp_path / ("deleted" if label == MARK_IGNORED_DELETE else "orphans")
    for p in _all_entries(slot_top):
        assert not os.path.islink(p), f"symlink {p} in a keep slot"
    for top in (tmp_path, out):
        for p in _all_entries(top):
            st = os.lstat(p)
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), f"setuid/setgid {p}"
    # the symlink stayed in the map base until MKDIR replaced it; the file went
    # into the slot as a plain file
    moved = slot_top / "src1-1" / "x" / "evil.sh"
    assert moved.is_file() and not moved.is_symlink()
    assert stat.S_IMODE(moved.stat().st_mode) == 0o755
    assert tc.marks["deleted_moved" if label == MARK_IGNORED_DELETE else "orphans_moved"] == 1


def test_a_symlink_planted_in_a_slot_is_not_followed(tmp_path, resolver):
    """A local user who can write the keep directory puts a symlink where the
    next move's parent directory goes: the move is refused, nothing leaves."""
    out = _outside(tmp_path)
    before = _snapshot(out)
    tc = _target(tmp_path, deleted_mode="move")
    slot = tmp_path / "deleted" / "src1-1"
    try:
        tc.applier.apply_all([Op.mkdir(1, b"d"), Op.create(2, b"d/f"), Op.write(3, b"d/f", 0, b"x")])
        tc.applier.flush()
        slot.mkdir(parents=True)
        os.symlink(out, slot / "d")
        tc.applier.apply(_mark(4, MARK_IGNORED_DELETE, "d/f"))
    finally:
        tc.close()
    assert _snapshot(out) == before
    assert (tmp_path / "base" / "d" / "f").read_bytes() == b"x"      # left where it was
    assert tc.marks["deleted_moved"] == 0


def test_keep_slots_are_private_and_directories_move_without_their_symlinks(tmp_path, resolver):
    out = _outside(tmp_path)
    tc = _target(tmp_path)
    try:
        tc.applier.apply_all([Op.mkdir(1, b"o"), Op.create(2, b"o/a"), Op.write(3, b"o/a", 0, b"a"),
                              Op.symlink(4, b"o/l", os.fsencode(out)),
                              _mark(5, MARK_ORPHAN_MOVE, "o")])
    finally:
        tc.close()
    slot = tmp_path / "orphans" / "src1-1"
    assert stat.S_IMODE(os.stat(tmp_path / "orphans").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(slot).st_mode) == 0o700
    assert (slot / "o" / "a").read_bytes() == b"a" and not os.path.lexists(slot / "o" / "l")
    assert os.path.islink(tmp_path / "base" / "o" / "l")     # stays, with its directory
    assert not (tmp_path / "base" / "o" / "a").exists()


def test_purge_never_follows_a_symlink_in_a_slot(tmp_path):
    out = _outside(tmp_path)
    before = _snapshot(out)
    slot = tmp_path / "deleted" / "src1-1"
    (slot / "d").mkdir(parents=True)
    (slot / "d" / "old").write_text("old")
    os.symlink(out, slot / "link")              # planted by someone else
    os.symlink(out, slot / "d" / "link2")
    keep = KeepDirs(tmp_path / "orphans", tmp_path / "deleted")
    # a limit in the future: everything counts as old (no wait for the clock)
    assert keep.purge(os.fsencode(slot), -1, force=True) == 3      # the file and both links
    assert _snapshot(out) == before
    assert os.listdir(slot) == []


# -- finding 2: a directory swapped for a symlink between two ops ----------------------

SWAPPED = [
    ("CREATE", lambda s: Op.create(s, b"d/new", 0o644)),
    ("WRITE", lambda s: Op.write(s, b"d/f", 0, b"PWNED")),
    ("TRUNCATE", lambda s: Op.truncate(s, b"d/f", 0)),
    ("SETATTR chmod", lambda s: Op.setattr(s, b"d/f", mode=0o777)),
    ("SETATTR mtime", lambda s: Op.setattr(s, b"d/f", mtime_ns=1)),
    ("HARDLINK existing side", lambda s: Op.hardlink(s, b"stolen", b"d/f")),
    ("HARDLINK new side", lambda s: Op.hardlink(s, b"d/planted", b"top")),
    ("RENAME from", lambda s: Op.rename(s, b"d/f", b"stolen")),
    ("RENAME to", lambda s: Op.rename(s, b"top", b"d/f")),
    ("MKDIR", lambda s: Op.mkdir(s, b"d/newdir", 0o755)),
    ("SYMLINK", lambda s: Op.symlink(s, b"d/l", b"/etc/shadow")),
    ("DELETE", lambda s: Op.delete(s, b"d/f")),
    ("RMDIR", lambda s: Op.rmdir(s, b"d/sub")),
    ("deeper CREATE", lambda s: Op.create(s, b"d/sub/n", 0o644)),
]


@pytest.mark.parametrize("name,make", SWAPPED, ids=[n for n, _ in SWAPPED])
def test_directory_swapped_for_a_symlink_between_ops(tmp_path, resolver, name, make):
    out = _outside(tmp_path)
    base = tmp_path / "base"
    app = Applier(base, owner=False)
    try:
        app.apply_all([Op.mkdir(1, b"d"), Op.mkdir(2, b"d/sub"), Op.create(3, b"d/f"),
                       Op.write(4, b"d/f", 0, b"inside"), Op.create(5, b"top"),
                       Op.write(6, b"top", 0, b"top")])
        app.flush()                 # idle: no descriptor is held between frames
        before = _snapshot(out)
        # a local user who owns d swaps it for a symlink to the outside
        os.rename(base / "d", base / "d.real")
        os.symlink(out, base / "d")
        with pytest.raises(ConfinementError, match="symlink 'd'"):
            app.apply(make(7))
        app.flush()
    finally:
        app.close()
    assert _snapshot(out) == before, f"{name} changed something outside the map base"
    assert app.applied_seq == 6
    assert not os.path.lexists(base / "stolen")


def test_refusal_names_the_op_and_the_symlink(tmp_path, resolver):
    out = _outside(tmp_path)
    base = tmp_path / "base"
    base.mkdir()
    (base / "a").mkdir()
    os.symlink(out, base / "a" / "b")
    app = Applier(base)
    try:
        with pytest.raises(ConfinementError) as info:
            app.apply(Op.create(9, b"a/b/c/evil", 0o644))
    finally:
        app.close()
    msg = str(info.value)
    assert "op seq 9 CREATE refused" in msg and "passes through symlink 'a/b'" in msg
    assert os.listdir(out / "sub") == []


def test_a_cached_descriptor_keeps_writing_to_the_real_file(tmp_path, resolver):
    """An fd of an open regular file is kept between ops of one frame: a swap
    of its directory afterwards changes nothing about where it writes."""
    out = _outside(tmp_path)
    base = tmp_path / "base"
    app = Applier(base)
    try:
        app.apply_all([Op.mkdir(1, b"d"), Op.create(2, b"d/f")])
        os.rename(base / "d", base / "d.real")
        os.symlink(out, base / "d")
        app.apply(Op.write(3, b"d/f", 0, b"data"))
    finally:
        app.close()
    assert (base / "d.real" / "f").read_bytes() == b"data"
    assert (out / "f").read_bytes() == b"outside data"


def test_enosys_falls_back_to_the_walk_once(tmp_path, monkeypatch):
    out = _outside(tmp_path)
    calls = []

    def no_openat2(dfd, path):
        calls.append(path)
        raise OSError(38, "Function not implemented")     # ENOSYS: an old kernel
    monkeypatch.setattr(beneath, "_openat2", no_openat2)
    monkeypatch.setattr(beneath, "_openat2_missing", False)
    base = tmp_path / "base"
    app = Applier(base)
    try:
        app.apply_all([Op.mkdir(1, b"d"), Op.create(2, b"d/a"), Op.create(3, b"d/b")])
        os.symlink(out, base / "l")
        with pytest.raises(ConfinementError, match="symlink 'l'"):
            app.apply(Op.create(4, b"l/x"))
    finally:
        app.close()
    assert calls == [b"d"] and beneath._openat2_missing        # asked once, then walked
    assert (base / "d" / "b").is_file() and not (out / "x").exists()


# -- finding 3: setuid and setgid bits ---------------------------------------------------

def _setid_ops():
    return [Op.create(1, b"f", 0o4755), Op.mkdir(2, b"d", 0o2775), Op.create(3, b"g", 0o644),
            Op.setattr(4, b"g", mode=0o6755)]


def test_setid_bits_stripped_by_default(tmp_path, caplog):
    app = Applier(tmp_path / "base")
    try:
        app.apply_all(_setid_ops())
    finally:
        app.close()
    base = tmp_path / "base"
    assert stat.S_IMODE(os.stat(base / "f").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(base / "d").st_mode) == 0o775
    assert stat.S_IMODE(os.stat(base / "g").st_mode) == 0o755
    assert app.stats["setid_stripped"] == 3
    assert len([r for r in caplog.records if "setuid/setgid bits stripped" in r.message]) == 1


def test_setid_bits_kept_when_the_target_allows_them(tmp_path):
    tc = _target(tmp_path, allow_setid=True)
    try:
        tc.applier.apply_all(_setid_ops())
    finally:
        tc.close()
    base = tmp_path / "base"
    assert stat.S_IMODE(os.stat(base / "f").st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(base / "d").st_mode) == 0o2775
    assert stat.S_IMODE(os.stat(base / "g").st_mode) == 0o6755
    assert tc.status()["setid_stripped"] == 0


def test_setid_map_bases_setting(tmp_path):
    cfg = from_mapping({"target": {"setid_map_bases": [str(tmp_path / "usr")]}})
    bases = cfg.target.setid_map_bases
    assert setid_allowed(tmp_path / "usr", bases) and setid_allowed(tmp_path / "usr" / "x", bases)
    assert not setid_allowed(tmp_path / "usr2", bases) and not setid_allowed(tmp_path, bases)
    assert from_mapping({}).target.setid_map_bases == []
    with pytest.raises(ConfigError, match="setid_map_bases: expected absolute paths"):
        from_mapping({"target": {"setid_map_bases": ["relative/dir"]}})
    with pytest.raises(ConfigError, match="ignored_deletes"):
        from_mapping({"target": {"ignored_deletes": "shred"}})


# -- keep and move come from the target ---------------------------------------------------

def test_a_stream_asking_to_move_does_not_move_on_a_keep_target(tmp_path):
    tc = _target(tmp_path)                               # default: ignored_deletes keep
    try:
        tc.applier.apply_all([Op.create(1, b"f"), Op.write(2, b"f", 0, b"kept"),
                              _mark(3, MARK_IGNORED_DELETE, "f", mode="move", keep_days=0.0)])
    finally:
        tc.close()
    assert (tmp_path / "base" / "f").read_bytes() == b"kept"
    assert not (tmp_path / "deleted").exists()
    assert tc.marks == {"ignored_deletes": 1, "deleted_moved": 0, "orphans_moved": 0}


def test_a_move_target_moves_whatever_the_stream_says(tmp_path):
    tc = _target(tmp_path, deleted_mode="move")
    try:
        tc.applier.apply_all([Op.create(1, b"f"), _mark(2, MARK_IGNORED_DELETE, "f", mode="keep")])
    finally:
        tc.close()
    assert not (tmp_path / "base" / "f").exists()
    assert (tmp_path / "deleted" / "src1-1" / "f").is_file()


def test_orphan_moves_can_be_refused_by_the_target(tmp_path):
    tc = _target(tmp_path, orphan_moves=False)
    try:
        tc.applier.apply_all([Op.create(1, b"o"), _mark(2, MARK_ORPHAN_MOVE, "o")])
    finally:
        tc.close()
    assert (tmp_path / "base" / "o").is_file() and not (tmp_path / "orphans").exists()
    assert tc.marks["orphans_moved"] == 0


def test_a_slot_removed_by_the_administrator_is_made_again(tmp_path):
    import shutil
    tc = _target(tmp_path, deleted_mode="move")
    try:
        tc.applier.apply_all([Op.create(1, b"a"), _mark(2, MARK_IGNORED_DELETE, "a")])
        shutil.rmtree(tmp_path / "deleted")
        tc.applier.apply_all([Op.create(3, b"b"), _mark(4, MARK_IGNORED_DELETE, "b")])
    finally:
        tc.close()
    assert os.listdir(tmp_path / "deleted" / "src1-1") == ["b"]
    assert tc.marks["deleted_moved"] == 2


@pytest.mark.parametrize("op", [Op.create(1, b""), Op.delete(1, b""), Op.rmdir(1, b""),
                                Op.symlink(1, b"", b"/"), Op.rename(1, b"f", b""),
                                Op.rename(1, b"", b"x"), Op.write(1, b"", 0, b"x")],
                         ids=["CREATE", "DELETE", "RMDIR", "SYMLINK", "RENAME to", "RENAME from",
                              "WRITE"])
def test_the_map_base_itself_is_never_replaced_or_removed(tmp_path, op):
    base = tmp_path / "base"
    app = Applier(base)
    try:
        (base / "f").write_text("kept")
        with pytest.raises(ConfinementError, match="map base itself"):
            app.apply(op)
        app.apply(Op.setattr(2, b"", mode=0o750, mtime_ns=10**18))   # its attributes: fine
        app.apply(Op.mkdir(3, b"", 0o755))
    finally:
        app.close()
    assert (base / "f").read_text() == "kept"
    assert stat.S_IMODE(base.stat().st_mode) == 0o755


# -- the mirror's LocalTarget and the daemon's one-off reads ------------------------------

def _entry(tmp, kind=None):
    from smirror.fs.tree import entry_from_stat, kind_of
    e = entry_from_stat(os.stat(tmp / "outside" / "f"))
    if kind is not None:
        e.mode = kind | 0o644
        e.kind = kind_of(e.mode)
    return e


LOCAL_CALLS = {
    "lstat": lambda t, tmp: t.lstat(b"d/f"),
    "signature": lambda t, tmp: t.signature(b"d/f", 4096, False),
    "digest": lambda t, tmp: t.digest(b"d/f", 12),
    "xattrs": lambda t, tmp: t.xattrs(b"d/f"),
    "create_temp": lambda t, tmp: t.create_temp(b"d/new"),
    "open_inplace": lambda t, tmp: t.open_inplace(b"d/f"),
    "mkdir": lambda t, tmp: t.mkdir(b"d/newdir", _entry(tmp)),
    "rmdir": lambda t, tmp: t.rmdir(b"d/sub"),
    "symlink": lambda t, tmp: t.symlink(b"d/f", b"/etc/shadow"),
    "link existing": lambda t, tmp: t.link(b"stolen", b"d/f"),
    "link new": lambda t, tmp: t.link(b"d/planted", b"top"),
    "mknod": lambda t, tmp: t.mknod(b"d/fifo", _entry(tmp, stat.S_IFIFO)),
    "set_meta": lambda t, tmp: t.set_meta(b"d/f", _entry(tmp)),
    "set_meta special": lambda t, tmp: t.set_meta(b"d/f", _entry(tmp, stat.S_IFIFO)),
    "remove": lambda t, tmp: t.remove(b"d/f"),
    "remove dir": lambda t, tmp: t.remove(b"d/sub"),
    "move_orphan": lambda t, tmp: t.move_orphan(b"d/f", tmp / "attic"),
    "remove_temps": lambda t, tmp: t.remove_temps([b"d/.smirror-tmp-x"]),
}


@pytest.mark.parametrize("call", list(LOCAL_CALLS))
def test_local_target_refuses_a_swapped_directory(tmp_path, resolver, call):
    from smirror.mirror.local import LocalTarget
    out = _outside(tmp_path)
    (out / ".smirror-tmp-x").write_text("not a temp of ours")
    before = _snapshot(out)
    root = tmp_path / "root"
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "f").write_text("inside")
    (root / "top").write_text("top")
    t = LocalTarget(root)
    try:
        assert t.lstat(b"d/f") is not None            # the handle is open, d was real
        os.rename(root / "d", root / "d.real")
        os.symlink(out, root / "d")
        with pytest.raises(ConfinementError, match="symlink 'd'"):
            LOCAL_CALLS[call](t, tmp_path)
    finally:
        t.close()
    assert _snapshot(out) == before
    assert not os.path.lexists(root / "stolen") and not (tmp_path / "attic" / "d").exists()


def test_daemon_signature_read_is_confined(tmp_path, resolver):
    """What the daemon's target.signature opens (after its access checks,
    tested with real daemons in test_target_roles): a file beneath the map
    base, never through a symlink."""
    from smirror.fs.files import open_beneath
    out = _outside(tmp_path)
    base = tmp_path / "base"
    (base / "d").mkdir(parents=True)
    (base / "d" / "f").write_bytes(b"x" * 5000)
    os.symlink(out, base / "l")
    fd = open_beneath(os.fsencode(base), b"d/f", os.O_RDONLY)
    try:
        assert os.read(fd, 10) == b"x" * 10
    finally:
        os.close(fd)
    with pytest.raises(ConfinementError, match="symlink 'l'"):
        open_beneath(os.fsencode(base), b"l/f", os.O_RDONLY)


def test_keep_slot_attack_through_a_real_link(tmp_path):
    """The same attack sent the way a compromised source would: ops in a
    journal, framed, over TCP on 127.0.0.1, received, verified and applied by
    the applier thread; nothing leaves the map base, nothing is setuid."""
    from smirror.kernels.memqueue import SpillQueue
    from smirror.stream.journal import ConnectionJournal
    from smirror.stream.sender import Sender
    from support.endpoints import TargetEndpoint, settle
    out = _outside(tmp_path)
    before = _snapshot(out)
    target = TargetConnection(1, tmp_path / "base", tmp_path / "state", deleted_mode="move",
                              keep_dirs=KeepDirs(tmp_path / "orphans", tmp_path / "deleted"))
    endpoint = TargetEndpoint(target)
    queue = SpillQueue(str(tmp_path / "squeue"), 1 << 20, 1 << 30)
    journal = ConnectionJournal(queue, max_ops=2)        # several frames
    sender = Sender(1, str(tmp_path / "base"), journal, endpoint.dial, retry_interval=0.05).start()
    try:
        for op in [Op.symlink(0, b"x", os.fsencode(out)),
                   _mark(0, MARK_IGNORED_DELETE, "x", mode="move"),
                   Op.mkdir(0, b"x", 0o755),
                   Op.create(0, b"x/evil.sh", 0o4755),
                   Op.write(0, b"x/evil.sh", 0, b"#!/bin/sh\nid\n"),
                   _mark(0, MARK_IGNORED_DELETE, "x/evil.sh", mode="move"),
                   Op.setattr(0, b"x", mode=0o2755)]:
            journal.append(op)
        settle(journal, sender, target)
        st = target.status()
    finally:
        sender.stop()
        endpoint.close()
        target.close()
        queue.close()
    assert _snapshot(out) == before and not endpoint.errors
    for top in (tmp_path / "base", tmp_path / "deleted"):
        for p in _all_entries(top):
            assert not os.path.islink(p) or top.name == "base", p
            assert not os.lstat(p).st_mode & (stat.S_ISUID | stat.S_ISGID), p
    assert (tmp_path / "deleted" / "local-1" / "x" / "evil.sh").is_file()
    assert st["error"] == "" and st["setid_stripped"] == 2
    assert st["marks"]["deleted_moved"] == 1


@pytest.fixture
def other_fs_dir(tmp_path):
    """A directory on another filesystem than tmp_path (rename gives EXDEV)."""
    import shutil
    import tempfile
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="smirror-test-")
    if os.stat(d).st_dev == os.stat(tmp_path).st_dev:
        shutil.rmtree(d)
        pytest.skip("/dev/shm is on the same filesystem as the test directory")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_keep_slot_on_another_filesystem_copies_without_following(tmp_path, other_fs_dir):
    out = _outside(tmp_path)
    before = _snapshot(out)
    tc = TargetConnection(1, tmp_path / "base", tmp_path / "state", apply=False,
                          deleted_mode="move", orphan_moves=True,
                          keep_dirs=KeepDirs(os.path.join(other_fs_dir, "orphans"),
                                             os.path.join(other_fs_dir, "deleted")))
    try:
        tc.applier.apply_all([Op.mkdir(1, b"d"), Op.create(2, b"d/f", 0o640),
                              Op.write(3, b"d/f", 0, b"content"),
                              Op.setattr(4, b"d/f", mtime_ns=10**18),
                              Op.symlink(5, b"d/l", os.fsencode(out)),
                              _mark(6, MARK_IGNORED_DELETE, "d/f"),
                              _mark(7, MARK_ORPHAN_MOVE, "d")])
    finally:
        tc.close()
    moved = os.path.join(other_fs_dir, "deleted", "local-1", "d", "f")
    st = os.lstat(moved)
    assert open(moved, "rb").read() == b"content" and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == 10**18
    assert not (tmp_path / "base" / "d" / "f").exists()
    # the orphan directory: recreated there, its symlink left in the map base
    assert os.path.isdir(os.path.join(other_fs_dir, "orphans", "local-1", "d"))
    assert os.path.islink(tmp_path / "base" / "d" / "l")
    for p in _all_entries(other_fs_dir):
        assert not os.path.islink(p), p
    assert _snapshot(out) == before
