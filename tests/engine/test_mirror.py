"""Mirror without checksums: full / --different / --newer on real trees,
checked against Debian's rsync (``rsync -a -H -X --checksum --dry-run
--itemize-changes --delete`` must list nothing), plus rules, confinement,
orphans, errors and odd cases. Checksum mirrors: test_mirror_checksum.py."""
import errno
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from smirror.errors import ConfigError, ConfinementError, MirrorError
from smirror.fs.files import copy_data_extents
from smirror.fs.tree import DIR, FILE, SYMLINK, Rules, scan
from smirror.mirror.engine import Mirror, MirrorOptions, mirror
from smirror.mirror.local import LocalTarget
from support import gen_tree
from support.daemons import package_path, wait_for

RSYNC = shutil.which("rsync")
needs_rsync = pytest.mark.skipif(RSYNC is None, reason="rsync not installed")


def rsync_diff(src, dst) -> str:
    """What rsync would still change (empty: the trees are the same)."""
    out = subprocess.run(
        [RSYNC, "-a", "-H", "-X", "--checksum", "--dry-run", "--itemize-changes", "--delete",
         f"{src}/", f"{dst}/"], capture_output=True, check=True)
    return out.stdout.decode("utf-8", "backslashreplace")


@pytest.fixture
def kinds(tmp_path):
    src = tmp_path / "src"
    facts = gen_tree.make_kinds_tree(src)
    return src, tmp_path / "dst", facts


# ------------------------------------------------------------ whole trees vs rsync

@needs_rsync
def test_full_mirror_of_every_kind_of_entry(kinds):
    src, dst, facts = kinds
    summary = mirror(src, dst)
    assert summary.errors == []
    assert rsync_diff(src, dst) == ""
    # holes stay holes: 64 MiB logical, a few KiB allocated
    st = os.stat(dst / "sparse.img")
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < 1 << 20
    # hard links are links on the target too
    assert os.stat(dst / "links/h1").st_ino == os.stat(dst / "a/h3").st_ino
    assert os.readlink(dst / "links/dangling") == "/nonexistent/target"
    assert stat.S_ISFIFO(os.lstat(dst / "fifo").st_mode)
    for name in gen_tree.ODD_NAMES:
        assert os.path.exists(os.path.join(os.fsencode(dst), b"odd", name))
    if facts["owners"]:
        st = os.stat(dst / "a/small.txt")
        assert (st.st_uid, st.st_gid) == (4321, 4322)
        assert os.lstat(dst / "links/rel").st_uid == 4325
    if facts["xattrs"]:
        assert os.getxattr(dst / "a/small.txt", "user.color") == b"blue"
        assert os.getxattr(dst / "a/b", "user.dir") == b"\x00\x01binary"
    large = "a/b/c/large.bin"
    assert os.stat(dst / large).st_mtime_ns == os.stat(src / large).st_mtime_ns
    assert not list(Path(dst).rglob(".smirror-tmp-*"))


@needs_rsync
@pytest.mark.parametrize("mode", [{}, {"different": True}])
def test_second_mirror_carries_every_change(kinds, mode):
    src, dst, _ = kinds
    mirror(src, dst)
    gen_tree.mutate_kinds_tree(src)
    if mode:
        # a same-size, same-mtime edit is invisible to the quick check
        p = os.path.join(os.fsencode(src), b"odd", b"with space")
        st = os.stat(p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    summary = mirror(src, dst, orphans="delete", **mode)
    assert summary.errors == []
    assert rsync_diff(src, dst) == ""
    assert os.path.isdir(dst / "a/b/medium.bin/inner")
    assert os.path.isfile(dst / "e1/e2")
    assert os.stat(dst / "odd/h4").st_ino == os.stat(dst / "links/h1").st_ino
    assert os.stat(dst / "sparse.img").st_blocks * 512 < 1 << 20
    assert sorted(summary.orphans) == [b"empty.txt", b"links/h2"]
    assert summary.orphans_deleted == 2


def test_quick_check_skips_unchanged_and_never_copies_atime(kinds):
    src, dst, _ = kinds
    mirror(src, dst)
    before = {p: os.lstat(p).st_ino for p in Path(dst).rglob("*")}
    # reading changes only atimes
    for p in Path(src).rglob("*"):
        if p.is_file() and not p.is_symlink() and not stat.S_ISFIFO(os.lstat(p).st_mode):
            p.read_bytes()
    os.utime(src / "a/b/c/large.bin", ns=(123, os.stat(src / "a/b/c/large.bin").st_mtime_ns))
    summary = mirror(src, dst, different=True)
    assert summary.changed == 0 and summary.created == 0 and summary.meta_updated == 0
    assert summary.bytes_literal == 0
    assert before == {p: os.lstat(p).st_ino for p in Path(dst).rglob("*")}


def test_full_mode_rewrites_every_file(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(b"x" * (i * 1000))
    mirror(src, dst)
    inodes = {p.name: p.stat().st_ino for p in dst.iterdir()}
    summary = mirror(src, dst)
    assert summary.changed == 5
    assert all(p.stat().st_ino != inodes[p.name] for p in dst.iterdir())


def test_newer_only_where_source_is_newer(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    dst.mkdir()
    (src / "old").write_bytes(b"source old")
    (src / "new").write_bytes(b"source new")
    (dst / "old").write_bytes(b"target newer")
    (dst / "new").write_bytes(b"target old")
    os.utime(src / "old", ns=(0, 1_000))
    os.utime(dst / "old", ns=(0, 2_000))
    os.utime(src / "new", ns=(0, 3_000))
    os.utime(dst / "new", ns=(0, 2_000))
    summary = mirror(src, dst, newer=True)
    assert (dst / "old").read_bytes() == b"target newer"
    assert (dst / "new").read_bytes() == b"source new"
    assert summary.changed == 1 and summary.unchanged == 1


# ------------------------------------------------------------ files: holes, changes

def test_copy_keeps_holes_and_data(tmp_path):
    p = tmp_path / "sparse"
    with open(p, "wb") as f:
        f.truncate(32 << 20)
        f.seek(1 << 20)
        f.write(b"A" * 5000)
        f.seek((30 << 20) + 1)
        f.write(b"B" * 10)
    out = tmp_path / "out"
    src_fd = os.open(p, os.O_RDONLY)
    dst_fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    try:
        copied = copy_data_extents(src_fd, dst_fd, 32 << 20)
        os.ftruncate(dst_fd, 32 << 20)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert copied < 1 << 20
    assert out.read_bytes() == p.read_bytes()
    assert os.stat(out).st_blocks * 512 < 1 << 20


def test_dense_file_is_copied_without_hole_search_or_truncate(tmp_path, monkeypatch):
    """A source whose blocks cover its size has no holes: one kernel copy,
    no hole search (SEEK_HOLE), no ftruncate of the new file. A sparse one
    (also with a hole at its end) still keeps its holes and its length.
    (One SEEK_DATA at 0 per file is the wait for a write in flight.)"""
    import smirror.fs.files as tl
    calls = []
    real_lseek, real_ftruncate = os.lseek, os.ftruncate

    def lseek(fd, pos, how):
        if how == os.SEEK_HOLE:
            calls.append("lseek")
        return real_lseek(fd, pos, how)
    monkeypatch.setattr(tl.os, "lseek", lseek)
    monkeypatch.setattr(tl.os, "ftruncate",
                        lambda *a: calls.append("ftruncate") or real_ftruncate(*a))
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    (src / "dense").write_bytes(os.urandom(300_000))
    assert mirror(src, dst, threads=1).errors == []
    assert (dst / "dense").read_bytes() == (src / "dense").read_bytes()
    assert calls == []
    (src / "dense").unlink()
    with open(src / "sparse", "wb") as f:
        f.seek(4 << 20)
        f.write(b"data")
        f.truncate(16 << 20)
    assert mirror(src, dst, threads=1, orphans="delete").errors == []
    assert (dst / "sparse").read_bytes() == (src / "sparse").read_bytes()
    assert os.stat(dst / "sparse").st_blocks * 512 < 1 << 20
    assert "lseek" in calls and "ftruncate" in calls


def test_temporary_names_are_unique_also_across_fork():
    import smirror.fs.files as tl
    names = {tl.temp_name() for _ in range(1000)}
    assert len(names) == 1000
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, tl.temp_name())
        os._exit(0)
    os.close(w)
    child = os.read(r, 100)
    os.close(r)
    os.waitpid(pid, 0)
    mine = tl.temp_name()
    assert child not in names and child != mine
    # a forked child draws its own tag: the parent's counter values cannot collide
    assert child[:len(tl.TEMP_PREFIX) + 16] != mine[:len(tl.TEMP_PREFIX) + 16]


def test_file_changing_during_copy_is_never_half_copied(tmp_path):
    """A writer rewrites a file (each version one repeated byte) while it is
    mirrored: the target ends with one whole version or an error is
    reported - never a mix."""
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    size = 24 << 20
    path = src / "busy"
    path.write_bytes(b"\0" * size)
    stop = threading.Event()
    versions = [0]

    def writer():
        v = 1
        fd = os.open(path, os.O_WRONLY)
        block = bytearray(1 << 20)
        while not stop.is_set():
            block[:] = bytes([v % 251 + 1]) * len(block)
            for off in range(0, size, len(block)):
                os.pwrite(fd, block, off)
            versions[0] = v
            v += 1
        os.close(fd)

    def check(summary):
        assert summary.errors == [] or "changed during the copy" in summary.errors[0][1]
        if (dst / "busy").exists():
            data = (dst / "busy").read_bytes()
            assert len(data) == size and data.count(data[:1]) == size
        assert not list(dst.glob(".smirror-tmp-*"))

    t = threading.Thread(target=writer)
    t.start()
    try:
        # mirrors until one overlapped a write (a condition, not a count:
        # under load the writer may sleep through a few copies), each checked
        wait_for(lambda: versions[0] >= 1, 60, "the writer's first version")
        results = []

        def overlapped():
            results.append(mirror(src, dst, retries=1))
            check(results[-1])
            return results[-1].errors
        wait_for(overlapped, 120, "a copy that the writer overlapped", every=0)
    finally:
        stop.set()
        t.join()


@pytest.fixture
def request_cleanup():
    paths = []
    yield paths
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def test_unreadable_file_reported_rest_done(tmp_path, request_cleanup):
    """Run as an unprivileged user so permissions apply."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="smirror-unreadable-", dir="/tmp"))
    request_cleanup.append(base)
    src, dst = base / "s", base / "d"
    src.mkdir(parents=True)
    (src / "ok").write_bytes(b"fine")
    (src / "secret").write_bytes(b"no")
    (src / "closed").mkdir()
    (src / "closed" / "inside").write_bytes(b"x")
    for p in (base, src, src / "ok", src / "secret", src / "closed"):
        os.chown(p, 65534, 65534)
    os.chmod(src / "secret", 0)
    os.chmod(src / "closed", 0)
    os.chmod(base, 0o755)
    repo_src = package_path()
    # the interpreter may live where nobody cannot read: import first, then drop root
    script = ("import os, sys, json\n"
              "import smirror.cli.main, smirror.mirror.engine, smirror.cli.mirror\n"
              "import smirror.cli.progress, smirror.units, argparse, gettext, locale\n"
              "smirror.cli.main.build_parser()\n"
              "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
              "sys.exit(smirror.cli.main.main(sys.argv[1:]))\n")
    proc = subprocess.run(
        [sys.executable, "-c", script, "mirror", str(src), str(dst), "--json"],
        capture_output=True, env={**os.environ, "PYTHONPATH": repo_src}, cwd="/")
    assert proc.returncode == 1, proc.stderr
    assert b"secret" in proc.stderr and b"closed" in proc.stderr
    assert (dst / "ok").read_bytes() == b"fine"
    assert not (dst / "secret").exists()


# ------------------------------------------------------------ orphans

def _orphan_tree(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    (src / "keep").mkdir(parents=True)
    (src / "keep" / "a").write_bytes(b"a")
    mirror(src, dst)
    (dst / "keep" / "stray").write_bytes(b"stray")
    (dst / "gone" / "deep").mkdir(parents=True)
    (dst / "gone" / "deep" / "f").write_bytes(b"f")
    (dst / "old").write_bytes(b"old")
    os.utime(dst / "old", ns=(0, time.time_ns() - 10 * 86400 * 10**9))
    return src, dst


def test_orphans_reported_by_default(tmp_path):
    src, dst = _orphan_tree(tmp_path)
    summary = mirror(src, dst, different=True)
    assert sorted(summary.orphans) == [b"gone", b"keep/stray", b"old"]
    assert (dst / "keep" / "stray").exists() and (dst / "gone" / "deep" / "f").exists()


def test_orphans_deleted(tmp_path):
    src, dst = _orphan_tree(tmp_path)
    summary = mirror(src, dst, different=True, orphans="delete")
    assert summary.orphans_deleted == 3
    assert sorted(os.listdir(dst)) == ["keep"] and os.listdir(dst / "keep") == ["a"]


def test_orphans_moved(tmp_path):
    src, dst = _orphan_tree(tmp_path)
    attic = tmp_path / "attic"
    mirror(src, dst, different=True, orphans="move", orphan_dir=attic)
    assert (attic / "keep" / "stray").read_bytes() == b"stray"
    assert (attic / "gone" / "deep" / "f").read_bytes() == b"f"
    assert sorted(os.listdir(dst)) == ["keep"]


def test_orphan_dir_inside_target_is_not_an_orphan(tmp_path):
    src, dst = _orphan_tree(tmp_path)
    mirror(src, dst, different=True, orphans="move", orphan_dir=dst / ".attic")
    summary = mirror(src, dst, different=True, orphans="move", orphan_dir=dst / ".attic")
    assert summary.orphans == []
    assert (dst / ".attic" / "old").exists()


def test_orphans_older_than_limits_by_age(tmp_path):
    src, dst = _orphan_tree(tmp_path)
    summary = mirror(src, dst, different=True, orphans="delete", orphans_older_than=5)
    assert summary.orphans == [b"old"]
    assert not (dst / "old").exists()
    assert (dst / "keep" / "stray").exists() and (dst / "gone" / "deep" / "f").exists()


def test_orphans_not_deleted_under_unreadable_source_dir(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"f")
    mirror(src, dst)
    # a source directory that cannot be listed: its target copy stays
    listing = scan(os.fsencode(src))
    listing.errors.append((b"sub", PermissionError(errno.EACCES, "denied")))
    listing.entries = {k: v for k, v in listing.entries.items() if not k.startswith(b"sub/")}
    m = Mirror(src, dst, MirrorOptions(different=True, orphans="delete"))
    m._plan(listing, m.target.scan())
    assert m.orphans == []
    m.target.close()


def test_a_source_dir_gone_since_it_was_listed_leaves_an_orphan(tmp_path):
    """A live tree: a directory removed between its listing and the read of
    its entries is not the source's any more; its target copy is an orphan
    (the orphan policy acts on it), unlike an unreadable one."""
    src, dst = tmp_path / "s", tmp_path / "d"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"f")
    mirror(src, dst)
    listing = scan(os.fsencode(src))
    listing.errors.append((b"sub", FileNotFoundError(errno.ENOENT, "gone")))
    listing.entries = {k: v for k, v in listing.entries.items() if not k.startswith(b"sub")}
    m = Mirror(src, dst, MirrorOptions(different=True, orphans="delete"))
    m._plan(listing, m.target.scan())
    assert [rel for rel, _ in m.orphans] == [b"sub"]
    m.target.close()


# ------------------------------------------------------------ dry run

def test_dry_run_changes_nothing(kinds):
    src, dst, _ = kinds
    mirror(src, dst)
    gen_tree.mutate_kinds_tree(src)

    def snapshot():
        out = {}
        for p in Path(dst).rglob("*"):
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
        return out
    before = snapshot()
    summary = mirror(src, dst, different=True, orphans="delete", dry_run=True)
    assert snapshot() == before
    actions = {a for a, _ in summary.actions}
    assert {"remove", "mkdir", "write", "create", "delete-orphan"} <= actions


# ------------------------------------------------------------ rules

@pytest.mark.parametrize("pattern,path,is_dir,excluded", [
    ("*.tmp", b"a/b/x.tmp", False, True),
    ("*.tmp", b"x.tmp", False, True),
    ("*.tmp", b"a/x.tmpl", False, False),
    ("/top", b"top", True, True),
    ("/top", b"a/top", True, False),
    ("a/*/c", b"a/b/c", False, True),
    ("a/*/c", b"x/a/b/c", False, True),
    ("a/*/c", b"a/b/b/c", False, False),
    ("a/**/c", b"a/b/b/c", False, True),
    ("cache/", b"x/cache", True, True),
    ("cache/", b"x/cache", False, False),
    ("file?.[ch]", b"file1.c", False, True),
    ("file?.[!ch]", b"file1.c", False, False),
])
def test_rule_matching(pattern, path, is_dir, excluded):
    assert Rules.from_patterns([("exclude", pattern)]).excluded(path, is_dir) is excluded


def test_first_matching_rule_wins(tmp_path):
    rules = Rules.from_patterns([("include", "keep.log"), ("exclude", "*.log")])
    assert not rules.excluded(b"d/keep.log", False)
    assert rules.excluded(b"d/other.log", False)


@pytest.mark.parametrize("bad", ["", "/", "a[b", "x\0y"])
def test_bad_pattern_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="--exclude"):
        Rules.from_patterns([("exclude", bad)])


def test_excluded_paths_neither_copied_nor_orphans(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    (src / "cache").mkdir(parents=True)
    (src / "cache" / "big").write_bytes(b"c")
    (src / "x.tmp").write_bytes(b"t")
    (src / "keep").write_bytes(b"k")
    dst.mkdir()
    (dst / "y.tmp").write_bytes(b"target-only, excluded")
    rules = Rules.from_patterns([("exclude", "cache/"), ("exclude", "*.tmp")])
    summary = mirror(src, dst, rules=rules, orphans="delete")
    assert sorted(os.listdir(dst)) == ["keep", "y.tmp"]
    assert summary.orphans == []


def test_scan_leaves_the_garbage_collector_as_it_was(tmp_path):
    import gc
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x")
    assert gc.isenabled()
    assert b"a/f" in scan(tmp_path).entries and gc.isenabled()
    gc.disable()
    try:
        scan(tmp_path)
        assert not gc.isenabled()
        with pytest.raises(FileNotFoundError):
            scan(tmp_path / "missing")
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(FileNotFoundError):
        scan(tmp_path / "missing")
    assert gc.isenabled()


def test_scan_lists_parents_first_and_symlinks_unfollowed(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f").write_bytes(b"x")
    os.symlink("/", tmp_path / "root-link")
    listing = scan(tmp_path)
    rels = list(listing.entries)
    assert rels.index(b"d") < rels.index(b"d/e") < rels.index(b"d/e/f")
    assert listing.entries[b"root-link"].kind == SYMLINK
    assert listing.entries[b"root-link"].link == b"/"
    assert listing.entries[b"d"].kind == DIR and listing.entries[b"d/e/f"].kind == FILE


# ------------------------------------------------------------ confinement

@pytest.mark.parametrize("rel", [b"/etc/passwd", b"../x", b"a/../../x", b"a/./b", b"a//b",
                                 b"a/\0b", b"..", b"a/"])
def test_target_refuses_paths_leaving_its_root(tmp_path, rel):
    t = LocalTarget(tmp_path)
    with pytest.raises(ConfinementError):
        t.lstat(rel)


def test_target_refuses_symlink_on_the_way(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "escape")
    t = LocalTarget(root)
    with pytest.raises(ConfinementError, match="symlink"):
        t.create_temp(b"escape/file")
    assert os.listdir(outside) == []


def test_mirror_replaces_target_symlink_dir_instead_of_following(tmp_path):
    """The target has a symlink where the source has a directory: the
    mirror replaces the link and writes nothing through it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    src, dst = tmp_path / "s", tmp_path / "d"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"data")
    dst.mkdir()
    os.symlink(outside, dst / "sub")
    summary = mirror(src, dst, different=True)
    assert summary.errors == []
    assert os.listdir(outside) == []
    assert not os.path.islink(dst / "sub") and (dst / "sub" / "f").read_bytes() == b"data"


# ------------------------------------------------------------ bad input

def test_missing_source(tmp_path):
    with pytest.raises(MirrorError, match="does not exist"):
        mirror(tmp_path / "nope", tmp_path / "d")


@pytest.mark.parametrize("inner", ["dst_in_src", "src_in_dst", "same"])
def test_overlapping_trees_refused(tmp_path, inner):
    outer = tmp_path / "outer"
    (outer / "in").mkdir(parents=True)
    pairs = {"dst_in_src": (outer, outer / "in"), "src_in_dst": (outer / "in", outer),
             "same": (outer, outer)}
    src, dst = pairs[inner]
    with pytest.raises(MirrorError) as info:
        mirror(src, dst)
    assert info.value.exit_code == 2


def test_target_that_is_a_file_refused(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(MirrorError, match="not a directory"):
        mirror(tmp_path / "s", tmp_path / "f")


@pytest.mark.parametrize("kw", [{"block_size": 10}, {"block_size": 1 << 40},
                                {"threads": 0}, {"orphans": "eat"},
                                {"orphans": "move"}, {"orphans_older_than": -1}])
def test_bad_options(kw):
    with pytest.raises(ConfigError):
        MirrorOptions(**kw)


def test_disk_full_stops_cleanly(tmp_path):
    """DST on a 4 MiB tmpfs: the mirror stops with exit code 3 and leaves no
    file half-written under its final name (and no temp file)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    dst.mkdir()
    (src / "a-small").write_bytes(b"s" * 1000)
    (src / "big").write_bytes(os.urandom(6 << 20))
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(dst)],
                       check=True, capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(MirrorError, match="No space left") as info:
            mirror(src, dst, threads=1)
        assert info.value.exit_code == 3
        assert not (dst / "big").exists()
        assert not list(dst.glob(".smirror-tmp-*"))
    finally:
        subprocess.run(["umount", str(dst)], check=True)


def test_quick_check_sees_xattr_change_made_after_the_mirror(tmp_path, monkeypatch):
    """The quick check skips reading xattrs of files whose source ctime is
    older than the target's; a later xattr change moves the source ctime."""
    import smirror.mirror.engine as mirror_mod
    monkeypatch.setattr(mirror_mod, "CTIME_MARGIN_NS", 0)
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    if not gen_tree.xattrs_supported(tmp_path):
        pytest.skip("no user xattrs on this filesystem")
    os.setxattr(src / "f", "user.a", b"1")
    mirror(src, dst)
    time.sleep(0.02)                      # past a coarse ctime tick
    assert mirror(src, dst, different=True).meta_updated == 0
    os.setxattr(src / "f", "user.a", b"2")
    summary = mirror(src, dst, different=True)
    assert summary.meta_updated == 1
    assert os.getxattr(dst / "f", "user.a") == b"2"


def test_a_file_changed_in_the_current_clock_tick_is_waited_out(tmp_path):
    """A write in the same tick of the file-time clock as the last one
    leaves mtime as it was; the mirror waits the tick out before it reads
    a file changed that recently, so a write during the copy always shows."""
    import time as time_

    from smirror.mirror.engine import _COARSE, _racy
    old = tmp_path / "old"
    old.write_bytes(b"x")
    time_.sleep(0.05)                        # a dozen ticks ago
    assert not _racy(os.stat(old))
    fresh = tmp_path / "fresh"
    fresh.write_bytes(b"x")
    st = os.stat(fresh)
    if _racy(st):
        assert time_.clock_gettime_ns(_COARSE) > max(st.st_mtime_ns, st.st_ctime_ns)
