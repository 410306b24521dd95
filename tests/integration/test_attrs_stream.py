"""Everything a file is travels through the stream: extended attributes
(ACLs among them), special files, owners, modes, mtimes, hard links, holes
and symlinks, at mirror time and live, checked with rsync -aHAX."""
import os
import shutil
import stat
import subprocess

import pytest

from smirror.errors import ApplyError, ConfinementError, FrameError
from smirror.kernels import _journal, _journal_py
from smirror.ops import Op, OpKind
from smirror.stream.apply import ALL_XATTR_NAMESPACES, Applier
from support.rsync import rsync_differences, wait_rsync_same

IMPLS = [pytest.param(_journal, id="compiled"), pytest.param(_journal_py, id="reference")]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# -- the op kinds in both kernels ----------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_xattr_and_mknod_round_trip(impl):
    ops = [Op.setxattr(1, b"a", b"user.tag", b"v\0with nul"),
           Op.setxattr(2, b"a", "security.selinux", b""),
           Op.removexattr(3, b"a/b", "trusted.x"),
           Op.mknod(4, b"fifo", stat.S_IFIFO | 0o640),
           Op.mknod(5, b"dev", stat.S_IFBLK | 0o600, 2**64 - 1),
           Op.mknod(6, b"sock", stat.S_IFSOCK | 0o777)]
    frame = impl.encode_frame(ops)
    assert frame == _journal_py.encode_frame(ops)
    decoded, _ = impl.decode_frame(frame)
    assert decoded == ops
    assert [OpKind(o.kind) for o in decoded[:2]] == [OpKind.XATTR] * 2


BAD_ENCODE = [
    (Op.setxattr(1, b"a", b"", b"v"), "is empty"),
    (Op.setxattr(1, b"a", b"user.", b"v"), "namespace"),
    (Op.setxattr(1, b"a", b"os2.x", b"v"), "namespace"),
    (Op.setxattr(1, b"a", b"user.a\0b", b"v"), "NUL"),
    (Op.setxattr(1, b"a", b"user." + b"n" * 251, b"v"), "XATTR_NAME_MAX"),
    (Op.setxattr(1, b"a", b"user.x", b"v" * 65537), "limit is 65536"),
    (Op.setxattr(1, b"../a", b"user.x", b"v"), "'..'"),
    (Op.removexattr(1, b"a", b"user.x")._replace(data=b"v"), "removal"),
    (Op.setxattr(1, b"a", b"user.x", b"v")._replace(mask=2), "mask 2 out of range"),
    (Op.setxattr(1, b"a", b"user.x", b"v")._replace(uid=1), "uid is not used"),
    (Op.mknod(1, b"f", stat.S_IFREG | 0o644), "not a fifo"),
    (Op.mknod(1, b"f", stat.S_IFDIR | 0o755), "not a fifo"),
    (Op.mknod(1, b"f", 1 << 16 | stat.S_IFIFO | 0o644), "not a fifo"),
    (Op.mknod(1, b"f", stat.S_IFIFO | 0o644, 5), "device number 5"),
    (Op.mknod(1, b"f", stat.S_IFCHR | 0o644, -1), "out of range"),
    (Op.mknod(1, b"f", stat.S_IFCHR | 0o644)._replace(path2=b"x"), "must be empty"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op,message", BAD_ENCODE)
def test_the_encoder_refuses_bad_fields(impl, op, message):
    with pytest.raises((ValueError, TypeError), match=message):
        impl.encode_frame([op])


def _corrupt(frame: bytes, at: int, data: bytes) -> bytes:
    from support.journal_ops import reseal
    b = bytearray(frame)
    b[at:at + len(data)] = data
    return reseal(bytes(b))


@pytest.mark.parametrize("impl", IMPLS)
def test_the_decoder_refuses_bad_fields(impl):
    rec = 56                                       # the first record
    xattr = _journal_py.encode_frame([Op.setxattr(7, b"ab", b"user.x", b"val")], False)
    removal = _journal_py.encode_frame([Op.removexattr(7, b"ab", b"user.x")], False)
    fifo = _journal_py.encode_frame([Op.mknod(7, b"ab", stat.S_IFIFO | 0o600)], False)
    name_at = rec + 18 + 2
    cases = [
        (_corrupt(xattr, rec + 1, b"\x02"), "bad xattr flags 0x02"),
        (_corrupt(xattr, rec + 1, b"\x01"), "xattr removal carries a value"),
        (_corrupt(xattr, name_at, b"usex"), "namespace"),
        (_corrupt(xattr, name_at + 3, b"\0"), "NUL"),
        (_corrupt(removal, rec + 1, b"\x00"), None),          # a set to b"" is fine
        (_corrupt(fifo, rec + 18, (0o100600).to_bytes(4, "little")), "not a fifo"),
        (_corrupt(fifo, rec + 18 + 4, (3).to_bytes(8, "little")), "device number 3"),
        (_corrupt(fifo, rec + 18, (1 << 20 | 0o010600).to_bytes(4, "little")), "not a fifo"),
    ]
    for frame, message in cases:
        if message is None:
            ops, _ = impl.decode_frame(frame)
            assert ops[0].mask == 0 and bytes(ops[0].data) == b""
            continue
        with pytest.raises(FrameError, match=message):
            impl.decode_frame(frame)
        # both kernels tell the same story
        with pytest.raises(FrameError, match=message):
            _journal_py.decode_frame(frame)


# -- the applier ------------------------------------------------------------------

def _xattrs(path):
    return {n: os.getxattr(path, n, follow_symlinks=False)
            for n in os.listxattr(path, follow_symlinks=False)}


def test_applier_sets_and_removes_xattrs_beneath_the_map_base(tmp_path):
    base = tmp_path / "base"
    app = Applier(base)
    app.apply_all([Op.mkdir(1, b"d"), Op.create(2, b"d/f"),
                   Op.setxattr(3, b"d/f", b"user.a", b"1"),       # through the open fd
                   Op.setxattr(4, b"d", b"user.dir", b"on a directory")])
    app.flush()
    app.apply_all([Op.setxattr(5, b"d/f", b"user.b", b"\0\xff"),  # by name now
                   Op.removexattr(6, b"d/f", b"user.a"),
                   Op.removexattr(7, b"d/f", b"user.never-set"),   # replay: fine
                   Op.setxattr(8, b"d/missing", b"user.x", b"y")])  # gone: counted
    assert _xattrs(base / "d" / "f") == {"user.b": b"\0\xff"}
    assert _xattrs(base / "d") == {"user.dir": b"on a directory"}
    assert app.stats["repairs"] == 1
    app.close()


def test_an_xattr_op_never_follows_a_symlink(tmp_path):
    base, outside = tmp_path / "base", tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("x")
    app = Applier(base)
    os.symlink(outside, base / "escape")
    os.symlink(outside / "f", base / "link")
    with pytest.raises(ConfinementError, match="symlink"):
        app.apply(Op.setxattr(1, b"escape/f", b"user.x", b"evil"))
    # user.* cannot sit on a symlink itself: the kernel refuses, nothing followed
    with pytest.raises(ApplyError, match="Operation not permitted"):
        app.apply(Op.setxattr(2, b"link", b"user.x", b"evil"))
    assert _xattrs(outside / "f") == {} and _xattrs(outside) == {}
    app.close()


@root_only
def test_namespaces_the_target_did_not_allow_are_refused_and_counted(tmp_path, caplog):
    base = tmp_path / "base"
    app = Applier(base)          # a daemon target's defaults
    acl = _acl_value()
    app.apply_all([Op.create(1, b"f"),
                   Op.setxattr(2, b"f", b"trusted.admin", b"t"),
                   Op.setxattr(3, b"f", b"security.capability", _CAP_NET_RAW),
                   Op.setxattr(4, b"f", b"security.other", b"s"),
                   Op.setxattr(5, b"f", b"user.ok", b"u"),
                   Op.setxattr(6, b"f", b"system.posix_acl_access", acl)])
    got = _xattrs(base / "f")
    assert got == {"user.ok": b"u", "system.posix_acl_access": acl}
    assert app.stats["xattrs_refused"] == 3
    assert "xattr_namespaces" in caplog.text
    app.close()
    # configured wider: trusted and security, but a capability still needs setid
    app = Applier(base, xattr_namespaces=["trusted.", "security."])
    app.apply_all([Op.setxattr(7, b"f", b"trusted.admin", b"t"),
                   Op.setxattr(8, b"f", b"security.capability", _CAP_NET_RAW)])
    assert _xattrs(base / "f")["trusted.admin"] == b"t"
    assert "security.capability" not in _xattrs(base / "f")
    app.close()
    app = Applier(base, xattr_namespaces=ALL_XATTR_NAMESPACES, allow_setid=True)
    app.apply(Op.setxattr(9, b"f", b"security.capability", _CAP_NET_RAW))
    assert _xattrs(base / "f")["security.capability"] == _CAP_NET_RAW
    app.close()


# a VFS_CAP_REVISION_2 capability set: cap_net_raw permitted+effective
_CAP_NET_RAW = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)


def _acl_value():
    """A system.posix_acl_access value: user::rw- user:1234:r-- group::r-- mask::r-- other::---"""
    import struct
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 4, 1234), (0x04, 4, 0xFFFFFFFF),
               (0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


@root_only
def test_applier_makes_special_files_and_refuses_devices_unless_allowed(tmp_path):
    base = tmp_path / "base"
    app = Applier(base)
    app.apply_all([Op.mknod(1, b"fifo", stat.S_IFIFO | 0o640),
                   Op.mknod(2, b"sock", stat.S_IFSOCK | 0o600),
                   Op.mknod(3, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3)),
                   Op.mknod(4, b"suid-fifo", stat.S_IFIFO | 0o4755)])
    assert stat.S_ISFIFO(os.lstat(base / "fifo").st_mode)
    assert stat.S_IMODE(os.lstat(base / "fifo").st_mode) == 0o640
    assert stat.S_ISSOCK(os.lstat(base / "sock").st_mode)
    assert not os.path.lexists(base / "null") and app.stats["devices_refused"] == 1
    assert stat.S_IMODE(os.lstat(base / "suid-fifo").st_mode) == 0o755    # setuid stripped
    app.close()
    app = Applier(base, allow_devices=True)
    (base / "blk").write_text("a file stands here")
    app.apply_all([Op.mknod(5, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3)),
                   Op.mknod(6, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3)),   # replayed
                   Op.mknod(7, b"blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))])
    st = os.lstat(base / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(os.lstat(base / "blk").st_mode)
    # a symlink in the way is replaced, never followed
    os.symlink(tmp_path, base / "link-dir")
    with pytest.raises(ConfinementError):
        app.apply(Op.mknod(8, b"link-dir/fifo", stat.S_IFIFO | 0o600))
    assert not os.path.lexists(tmp_path / "fifo")
    app.close()


# -- the library API ---------------------------------------------------------------

def test_recorder_records_xattrs_and_special_files(tmp_path):
    from smirror.capture.recorder import Recorder
    src = tmp_path / "src"
    src.mkdir()
    ops = []
    rec = Recorder(src, ops.append)
    rec.create("f")
    rec.setxattr("f", "user.k", b"v")
    rec.removexattr("f", b"user.k")
    rec.mknod("p", stat.S_IFIFO | 0o600)
    with pytest.raises(ValueError, match="xattr name"):
        rec.setxattr("f", "nospace", b"v")
    with pytest.raises(ValueError, match="not a fifo"):
        rec.mknod("q", stat.S_IFREG | 0o600)
    kinds = [OpKind(o.kind) for o in ops]
    assert kinds.count(OpKind.XATTR) == 2 and OpKind.MKNOD in kinds
    assert _xattrs(src / "f") == {}
    assert stat.S_ISFIFO(os.lstat(src / "p").st_mode)


# -- end to end: rsync -aHAX finds nothing to do ------------------------------------

needs_tools = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("rsync") or not shutil.which("setfacl"),
    reason="needs root, rsync and setfacl (package acl)")


def make_rich_tree(root):
    """Everything a file is: xattrs in two namespaces, an ACL, a fifo, a
    device node, hard links, a sparse file, a symlink, odd modes and owners,
    directory mtimes."""
    (root / "dir" / "deep").mkdir(parents=True)
    f = root / "dir" / "tagged"
    f.write_bytes(b"tagged content\n")
    os.setxattr(f, "user.colour", b"blue")
    os.setxattr(f, "trusted.admin", b"\x00binary\xff")
    os.setxattr(root / "dir", "user.on-a-dir", b"yes")
    acl = root / "acl-file"
    acl.write_text("acl")
    subprocess.run(["setfacl", "-m", "u:1234:r,g:4321:rw", acl], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:1234:rx", root / "dir" / "deep"], check=True)
    os.mkfifo(root / "fifo", 0o620)
    os.mknod(root / "dir" / "null", stat.S_IFCHR | 0o640, os.makedev(1, 3))
    (root / "hard-a").write_bytes(os.urandom(10_000))
    os.link(root / "hard-a", root / "dir" / "hard-b")
    with open(root / "sparse", "wb") as fh:
        fh.seek(5 << 20)
        fh.write(b"end")
    os.symlink("dir/tagged", root / "link")
    odd = root / "odd"
    odd.write_text("odd")
    os.chmod(odd, 0o1751)
    os.chown(odd, 4242, 4343)
    os.setxattr(odd, "security.capability", _CAP_NET_RAW)     # set after chown clears it
    os.setxattr(odd, "security.label", b"s0")
    os.chown(root / "link", 1111, 2222, follow_symlinks=False)
    os.chmod(root / "dir" / "deep", 0o2770)
    os.utime(root / "dir" / "deep", ns=(0, 1_000_000_000_123_456_789))
    os.utime(root / "dir", ns=(0, 1_100_000_000_000_000_001))


def change_everything(root):
    """Live changes of each kind of attribute and special file."""
    f = root / "dir" / "tagged"
    os.setxattr(f, "user.colour", b"green")           # changed
    os.removexattr(f, "trusted.admin")                 # removed
    os.setxattr(root / "odd", "user.new", b"added later")
    os.setxattr(root / "odd", "trusted.new", b"t")
    subprocess.run(["setfacl", "-m", "u:77:rwx", root / "acl-file"], check=True)
    subprocess.run(["setfacl", "-b", root / "dir" / "deep"], check=True)
    os.mkfifo(root / "dir" / "new-fifo", 0o600)
    os.mknod(root / "new-dev", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    os.unlink(root / "fifo")
    os.link(root / "dir" / "tagged", root / "dir" / "deep" / "tagged-too")
    os.chmod(root / "odd", 0o640)
    os.chown(root / "odd", 4242, 4344)                  # clears the capability...
    os.setxattr(root / "odd", "security.capability", _CAP_NET_RAW)   # ...set again
    os.chown(root / "dir" / "hard-b", 5, 6)
    with open(root / "sparse", "r+b") as fh:
        fh.seek(9 << 20)
        fh.write(b"grown with a hole")
    os.utime(root / "dir" / "deep", ns=(0, 1_200_000_000_000_000_000))


@needs_tools
@pytest.mark.parametrize("backend", ["fanotify", "inotify"])
def test_replicate_carries_everything_a_file_is(tmp_path, monkeypatch, backend):
    from smirror.replication import Replication
    monkeypatch.setenv("SMIRROR_CAPTURE_BACKEND", backend)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    make_rich_tree(src)
    assert rsync_differences(src, tmp_path / "empty-dir").count("\n") > 5   # the check sees things
    with Replication(src, dst, state_dir=tmp_path / "state") as rep:
        assert rep.tree_capture.backend == backend
        wait_rsync_same(src, dst, why=lambda: str(rep.status()))
        change_everything(src)
        assert rep.wait(60), rep.status()
        wait_rsync_same(src, dst, why=lambda: str(rep.status()))
    assert os.getxattr(dst / "dir" / "tagged", "user.colour") == b"green"
    assert stat.S_ISBLK(os.lstat(dst / "new-dev").st_mode)


@needs_tools
def test_replicate_api_capture_carries_xattrs_and_special_files(tmp_path):
    from smirror.replication import Replication
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    with Replication(src, dst, state_dir=tmp_path / "state", capture="api") as rep:
        j = rep.journal
        j.create("f")
        j.write("f", 0, b"data")
        j.setxattr("f", "user.a", b"1")
        j.setxattr("f", "trusted.b", b"2")
        j.removexattr("f", "user.a")
        j.mknod("fifo", stat.S_IFIFO | 0o640)
        j.mknod("dev", stat.S_IFCHR | 0o600, os.makedev(1, 5))
        assert rep.wait(60), rep.status()
    assert _xattrs(dst / "f") == {"trusted.b": b"2"}
    assert stat.S_ISFIFO(os.lstat(dst / "fifo").st_mode)
    assert os.lstat(dst / "dev").st_rdev == os.makedev(1, 5)


@pytest.mark.slow
@needs_tools
def test_two_daemons_carry_everything_a_file_is(tmp_path):
    from support.pair import login, running_pair
    src, dst = tmp_path / "data", tmp_path / "replica"
    src.mkdir()
    make_rich_tree(src)
    # the tree's setgid directory keeps its bit where the target allows it
    target_extra = ('[target]\nxattr_namespaces = ["user.", "trusted.", "security.", "system.posix_acl_"]\n'
                    f'devices = true\nsetid_map_bases = ["{dst}"]\n')
    with running_pair(tmp_path, target_extra=target_extra) as (source, target, env):
        login(source, env)
        source.cli("repset", "create", "data", "--root", src)
        source.cli("connect", "data", "to", target.address, "map", "base", dst)
        why = lambda: source.log()[-3000:] + target.log()[-3000:]   # noqa: E731
        wait_rsync_same(src, dst, why=why)      # the stream mirror
        change_everything(src)
        wait_rsync_same(src, dst, why=why)      # live
    assert os.getxattr(dst / "odd", "trusted.new") == b"t"


@pytest.mark.slow
@needs_tools
def test_a_daemon_target_refuses_what_it_was_not_configured_for(tmp_path):
    from support.pair import login, running_pair
    src, dst = tmp_path / "data", tmp_path / "replica"
    src.mkdir()
    (src / "f").write_text("x")
    os.setxattr(src / "f", "user.ok", b"1")
    os.setxattr(src / "f", "trusted.admin", b"2")
    os.setxattr(src / "f", "security.capability", _CAP_NET_RAW)
    os.mknod(src / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mkfifo(src / "fifo")
    with running_pair(tmp_path) as (source, target, env):
        login(source, env)
        source.cli("repset", "create", "data", "--root", src)
        source.cli("connect", "data", "to", target.address, "map", "base", dst)
        import time
        deadline = time.monotonic() + 60
        while not os.path.lexists(dst / "fifo") or "user.ok" not in _xattrs(dst / "f"):
            assert time.monotonic() < deadline, source.log()[-3000:] + target.log()[-3000:]
            time.sleep(0.2)
        log = target.log()
        assert "xattr_namespaces" in log and "devices = true" in log
    assert _xattrs(dst / "f") == {"user.ok": b"1"}
    assert not os.path.lexists(dst / "dev")


@needs_tools
def test_one_shot_mirror_carries_everything_a_file_is(tmp_path):
    from support.daemons import smirror
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    make_rich_tree(src)
    env = dict(os.environ)
    smirror("mirror", src, dst, env=env)
    assert rsync_differences(src, dst) == ""
    change_everything(src)
    smirror("mirror", src, dst, "--different", "--checksum", "--orphans", "delete", env=env)
    assert rsync_differences(src, dst) == ""


def test_an_xattr_for_a_file_the_target_lost_brings_the_file_back(tmp_path):
    """The target lacks the file an XATTR names (removed behind its back):
    the applier asks the source for it, so the target converges without
    waiting for the periodic verification."""
    from smirror.replication import Replication
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"content")
    with Replication(src, dst, state_dir=tmp_path / "state") as rep:
        assert rep.wait(60), rep.status()
        os.unlink(dst / "f")
        os.setxattr(src / "f", "user.late", b"1")
        import time
        deadline = time.monotonic() + 30
        while not (os.path.exists(dst / "f") and _xattrs(dst / "f") == {"user.late": b"1"}):
            assert time.monotonic() < deadline, rep.status()
            time.sleep(0.1)
    assert (dst / "f").read_bytes() == b"content"


def test_a_target_that_is_not_root_stores_user_xattrs_only(tmp_path):
    app = Applier(tmp_path / "base", xattr_namespaces=ALL_XATTR_NAMESPACES, allow_setid=True)
    app._root = False              # what a daemon running as a plain user decides
    assert app.xattr_allowed(b"user.x")
    for name in (b"trusted.x", b"security.selinux", b"system.posix_acl_access"):
        assert not app.xattr_allowed(name)
    app.close()


def make_linked_specials(root, suffix=""):
    """A fifo and a device node, each with a second name (a hard link)."""
    (root / "d").mkdir(exist_ok=True)
    os.mkfifo(root / f"fifo{suffix}", 0o640)
    os.link(root / f"fifo{suffix}", root / "d" / f"fifo-too{suffix}")
    os.mknod(root / f"null{suffix}", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.link(root / f"null{suffix}", root / "d" / f"null-too{suffix}")


@needs_tools
@pytest.mark.parametrize("mode", ["mirror", "replicate", "daemons"])
def test_hard_links_between_special_files_are_kept(tmp_path, mode):
    """rsync -H keeps the names of one fifo or device node linked: so does
    every mode, at mirror time and live (each name was made as a node of
    its own, two inodes where the source has one)."""
    src, dst = tmp_path / "data", tmp_path / "replica"
    src.mkdir()
    make_linked_specials(src)
    if mode == "mirror":
        from support.daemons import smirror
        smirror("mirror", src, dst, env=dict(os.environ))
        assert rsync_differences(src, dst) == ""
        make_linked_specials(src, "-2")
        smirror("mirror", src, dst, "--different", "--checksum", env=dict(os.environ))
        assert rsync_differences(src, dst) == ""
    elif mode == "replicate":
        from smirror.replication import Replication
        with Replication(src, dst, state_dir=tmp_path / "state") as rep:
            wait_rsync_same(src, dst, timeout=30, why=lambda: str(rep.status()))
            make_linked_specials(src, "-2")
            assert rep.wait(60), rep.status()
            wait_rsync_same(src, dst, timeout=30, why=lambda: str(rep.status()))
    else:
        from support.pair import login, running_pair
        with running_pair(tmp_path, target_extra="[target]\ndevices = true\n") as (source, target, env):
            login(source, env)
            source.cli("repset", "create", "data", "--root", src)
            source.cli("connect", "data", "to", target.address, "map", "base", dst)
            why = lambda: source.log()[-3000:] + target.log()[-3000:]   # noqa: E731
            wait_rsync_same(src, dst, timeout=30, why=why)      # the stream mirror
            make_linked_specials(src, "-2")
            wait_rsync_same(src, dst, timeout=30, why=why)      # live
    assert os.lstat(dst / "fifo-2").st_ino == os.lstat(dst / "d" / "fifo-too-2").st_ino


@needs_tools
def test_a_daemons_remirror_removes_the_xattrs_the_source_lacks(tmp_path):
    """The target holds extended attributes the source does not have (set
    there behind the daemons' back, or removed on the source while its
    daemon was down): the checksum mirror through the stream removes them,
    as rsync -X does; it used to send the source's and leave the rest."""
    from support.pair import login, running_pair
    src, dst = tmp_path / "data", tmp_path / "replica"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "f").write_text("x")
    os.setxattr(src / "dir" / "f", "user.keep", b"1")
    with running_pair(tmp_path) as (source, target, env):
        login(source, env)
        source.cli("repset", "create", "data", "--root", src)
        source.cli("connect", "data", "to", target.address, "map", "base", dst)
        why = lambda: source.log()[-3000:] + target.log()[-3000:]   # noqa: E731
        wait_rsync_same(src, dst, timeout=30, why=why)
        os.setxattr(dst / "dir" / "f", "user.stale", b"only on the target")
        os.setxattr(dst / "dir", "user.stale-dir", b"only on the target")
        assert rsync_differences(src, dst) != ""
        source.cli("mirror-start", "1")
        wait_rsync_same(src, dst, timeout=30, why=why)
    assert _xattrs(dst / "dir" / "f") == {"user.keep": b"1"}
