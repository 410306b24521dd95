"""A daemon's replication set with ``capture = "mount"``: the daemon mounts
the set's root at its mount point (on start and when the set is created),
unmounts on stop and when the set is deleted, clears the stale mount a
SIGKILLed daemon left; the ordered pair through two daemons holds."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

pytest.importorskip("smirror.capture.mount._fuse", reason="the capture mount needs smirror "
                    "built with libfuse 3 (Debian: libfuse3-dev, pkg-config)")

from smirror.capture.mount.mountpoint import mounted_at
from support.daemons import PASSWORD, smirror, wait_for
from support.fuseuring import uring_enabled
from support.pair import login, running_pair
from support.rsync import rsync_differences, wait_rsync_same

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or not shutil.which("fusermount3") or os.geteuid() != 0,
    reason="needs /dev/fuse, fusermount3 (Debian's fuse3) and root")


@pytest.fixture
def mount_dirs(tmp_path):
    back, mnt, dst = tmp_path / "back", tmp_path / "mnt", tmp_path / "replica"
    back.mkdir()
    (back / "existing").write_bytes(os.urandom(40_000))
    yield back, mnt, dst
    if mounted_at(str(mnt)):              # a failed test must not leave it mounted
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)])


def status(node) -> dict:
    return json.loads(node.cli("status", "--json").stdout)


def mount_repset(source, target, env, back, mnt, dst):
    login(source, env)
    out = source.cli("repset", "create", "db", "--root", back, "--mount", mnt).stdout
    assert f"captured through the mount at {mnt}" in out, out
    assert mounted_at(str(mnt)) == "fuse.smirror"
    source.cli("connect", "db", "to", target.address, "map", "base", dst)
    wait_rsync_same(back, dst, why=lambda: source.log()[-3000:])


WRITER = r"""
import os, sys
mnt, n = sys.argv[1], int(sys.argv[2])
a = os.open(os.path.join(mnt, "a"), os.O_WRONLY)
b = os.open(os.path.join(mnt, "b"), os.O_WRONLY)
for i in range(1, n + 1):
    v = b"%012d" % i
    os.pwrite(a, v, 0)          # a first, then b: on the source a >= b always
    os.pwrite(b, v, 0)
"""


def ordered_pair(mnt, dst, n: int, wait_applied) -> dict:
    """A writer updates ``a`` then ``b`` n times through the mount; a reader
    polls the target (b, then a): every state the source had has a >= b."""
    for name in ("a", "b"):
        (mnt / name).write_bytes(b"%012d" % 0)
    wait_for(lambda: (dst / "b").exists() and (dst / "a").exists(), what="a and b on the target")
    result = {"reads": 0, "violations": 0, "first": None}
    done = threading.Event()

    def read_target():
        while not done.is_set():
            try:
                vb = int((dst / "b").read_bytes() or 0)
                va = int((dst / "a").read_bytes() or 0)
            except (OSError, ValueError):
                continue
            result["reads"] += 1
            if va < vb:
                result["violations"] += 1
                result["first"] = result["first"] or (va, vb)
    reader = threading.Thread(target=read_target)
    reader.start()
    try:
        subprocess.run([sys.executable, "-c", WRITER, str(mnt), str(n)], check=True, timeout=3600)
        wait_applied()
    finally:
        done.set()
        reader.join()
    return result


def _ordered_pair_through_two_daemons(tmp_path, mount_dirs, n, transport="/dev/fuse"):
    back, mnt, dst = mount_dirs
    with running_pair(tmp_path) as (source, target, env):
        mount_repset(source, target, env, back, mnt, dst)
        want = b"%012d" % n
        r = ordered_pair(mnt, dst, n, lambda: wait_for(
            lambda: (dst / "a").read_bytes() == (dst / "b").read_bytes() == want,
            timeout=600, what="the last update on the target"))
        st = status(source)
        mount = st["mounts"]["db"]
        assert mount["kind"] == "mount" and mount["mount_point"] == str(mnt), mount
        assert mount["transport"] == transport, mount
        assert mount["failures"] == 0 and mount["ops"] >= 2 * n, mount
        row = st["sources"][0]
        assert row["capture"]["kind"] == "mount", row
        table = source.cli("status").stdout
        assert f"repset db: capture mount at {mnt}, running, " in table, table
        source.kill(signal.SIGTERM)
        assert not mounted_at(str(mnt)), "the daemon's stop unmounts"
    return r


def test_ordered_pair_through_two_daemons_with_mount_capture(tmp_path, mount_dirs):
    r = _ordered_pair_through_two_daemons(tmp_path, mount_dirs, 5000)
    assert r["reads"] > 100, r
    assert r["violations"] == 0, r


def test_ordered_pair_through_two_daemons_with_mount_capture_over_io_uring(
        tmp_path, mount_dirs, monkeypatch):
    """The same, the source daemon's mount over FUSE io_uring (its
    requests served by a thread on each CPU, one handler at a time)."""
    with uring_enabled():
        monkeypatch.setenv("SMIRROR_MOUNT_URING", "1")
        r = _ordered_pair_through_two_daemons(tmp_path, mount_dirs, 5000, transport="io_uring")
    assert r["reads"] > 100, r
    assert r["violations"] == 0, r


@pytest.mark.slow
def test_ordered_pair_through_two_daemons_100000_updates(tmp_path, mount_dirs):
    r = _ordered_pair_through_two_daemons(tmp_path, mount_dirs, 100_000)
    assert r["reads"] > 1000, r
    assert r["violations"] == 0, r


def test_sigkill_of_the_source_daemon_leaves_a_stale_mount_the_restart_clears(tmp_path, mount_dirs):
    back, mnt, dst = mount_dirs
    with running_pair(tmp_path) as (source, target, env):
        mount_repset(source, target, env, back, mnt, dst)
        for i in range(50):
            (mnt / f"f{i}").write_bytes(os.urandom(3000))
        (mnt / "existing").write_bytes(b"rewritten")
        source.kill()                                  # SIGKILL: the mount stays, dead
        with pytest.raises(OSError) as e:
            os.statvfs(mnt)
        # ENOTCONN; a mount served over io_uring answers ECONNABORTED
        assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        with pytest.raises(OSError):
            (mnt / "after-kill").write_bytes(b"x")     # fails: never past the capture
        # what the last writes changed may be missing on the target; the
        # restart clears the dead mount, mounts again and converges
        source.start()
        wait_for(lambda: "stale smirror mount" in source.log(), what="the stale mount cleared")
        assert mounted_at(str(mnt)) == "fuse.smirror"
        (mnt / "after-restart").write_bytes(b"through the new mount")
        os.unlink(mnt / "f0")
        wait_rsync_same(back, dst, why=lambda: source.log()[-3000:])
        assert (dst / "after-restart").read_bytes() == b"through the new mount"
        assert not (dst / "after-kill").exists()
        login(source, env)                             # sessions end with the daemon
        st = status(source)
        assert st["mounts"]["db"]["state"] == "running", st["mounts"]
    assert rsync_differences(back, dst) == ""
    assert not mounted_at(str(mnt))


def test_repset_delete_unmounts_and_bad_mount_repsets_are_refused_by_name(tmp_path, mount_dirs):
    back, mnt, dst = mount_dirs
    with running_pair(tmp_path) as (source, target, env):
        login(source, env)
        bad = [(["--mount", back / "inner"], "must be apart"),
               (["--mount", mnt, "--exclude", "*.tmp"], "rules are not supported"),
               (["--capture", "watch", "--mount", mnt], "a mount point needs capture"),
               (["--capture", "mount"], "needs an absolute mount point")]
        for args, message in bad:
            p = source.cli("repset", "create", "x", "--root", back, *args, check=False)
            assert p.returncode != 0 and message in p.stderr, (args, p.stderr)
            assert "Traceback" not in p.stderr
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "file").write_bytes(b"")
        p = source.cli("repset", "create", "x", "--root", back, "--mount", tmp_path / "busy",
                       check=False)
        assert p.returncode != 0 and "is not empty" in p.stderr, p.stderr
        assert "x" not in [r["name"] for r in json.loads(source.cli("repset", "list", "--json").stdout)]
        source.cli("repset", "create", "db", "--root", back, "--mount", mnt)
        assert mounted_at(str(mnt)) == "fuse.smirror"
        # a second mount set in the same daemon: a session of its own; one
        # whose mount point or root overlaps another set's is refused by name
        other = tmp_path / "other"
        other.mkdir()
        for root, mount, message in [(other, mnt / "inner", "overlaps the mount point"),
                                     (other, back / "m2", "overlaps the root"),
                                     (mnt, tmp_path / "mnt2", "overlaps the mount point")]:
            p = source.cli("repset", "create", "db2", "--root", root, "--mount", mount, check=False)
            assert p.returncode != 0 and message in p.stderr and "'db'" in p.stderr, \
                (root, mount, p.stderr)
        source.cli("repset", "create", "db2", "--root", other, "--mount", tmp_path / "mnt2")
        assert mounted_at(str(tmp_path / "mnt2")) == "fuse.smirror"
        (tmp_path / "mnt2" / "f").write_bytes(b"through the second mount")
        assert (other / "f").read_bytes() == b"through the second mount"
        assert status(source)["mounts"]["db2"]["state"] == "running"
        source.cli("repset", "delete", "db2")
        assert not mounted_at(str(tmp_path / "mnt2"))
        assert mounted_at(str(mnt)) == "fuse.smirror", "deleting one set leaves the other's mount"
        # a map base in the mount point of a set of the target daemon is refused
        source.add_user("repl", "replication")
        p = source.cli("connect", "db", "to", source.address, "map", "base", mnt / "loop",
                       check=False)
        assert p.returncode != 0 and "overlaps replication set 'db'" in p.stderr, p.stderr
        (mnt / "through").write_bytes(b"written before any connection")
        listed = json.loads(source.cli("repset", "list", "--json").stdout)
        assert listed[0]["capture"] == "mount" and listed[0]["mount"] == str(mnt), listed
        # the set is captured without connections; a first connection mirrors it
        source.cli("connect", "db", "to", target.address, "map", "base", dst)
        wait_rsync_same(back, dst, why=lambda: source.log()[-3000:])
        conid = status(source)["sources"][0]["conid"]
        source.cli("disconnect", str(conid))
        assert mounted_at(str(mnt)) == "fuse.smirror", "the mount outlives its connections"
        # a mount that cannot be made at start: status says why, by name
        source.kill(signal.SIGTERM)
        (mnt / "blocker").write_bytes(b"")                # the mount point is not empty now
        source.start()
        login(source, env)
        row = status(source)["mounts"]["db"]
        assert row["state"] == "failed" and "is not empty" in row["error"], row
        table = source.cli("status").stdout
        assert f"repset db: capture mount at {mnt}, failed: mount point" in table, table
        os.unlink(mnt / "blocker")
        source.cli("repset", "delete", "db")
        assert not mounted_at(str(mnt))
        # a restart does not mount a deleted set
        source.kill(signal.SIGTERM)
        source.start()
        assert not mounted_at(str(mnt))


def test_a_dtcl_script_creates_a_mount_set(tmp_path, mount_dirs):
    """The script form of a mount set: repset create NAME root PATH mount DIR."""
    back, mnt, dst = mount_dirs
    with running_pair(tmp_path) as (source, target, env):
        script = tmp_path / "setup.dtcl"
        script.write_text(f'$S = "{source.address}";\nlogin $S admin;\nsource $S;\n'
                          f"repset create db root {back} mount {mnt};\n"
                          f"connect db to {target.address} map base {dst};\n")
        os.chmod(script, 0o600)
        r = smirror("dtcl", "-f", script, env={**env, "SMIRROR_PASSWORD": PASSWORD}, check=False)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
        assert f"captured through the mount at {mnt}" in r.stdout, r.stdout
        assert mounted_at(str(mnt)) == "fuse.smirror"
        (mnt / "via-script").write_bytes(b"x")
        wait_rsync_same(back, dst, why=lambda: source.log()[-3000:])


def test_a_target_divergence_is_resynced_through_the_mount(tmp_path, mount_dirs):
    """Someone removes part of the replica on the target: the next op there
    fails, the target asks for a resync, and the mount set resends that
    subtree (on the mount's thread, in order with its ops)."""
    back, mnt, dst = mount_dirs
    with running_pair(tmp_path) as (source, target, env):
        mount_repset(source, target, env, back, mnt, dst)
        (mnt / "d").mkdir()
        (mnt / "d" / "f").write_bytes(os.urandom(20_000))
        wait_rsync_same(back, dst, why=lambda: source.log()[-3000:])
        shutil.rmtree(dst / "d")                      # behind the target's back
        with open(mnt / "d" / "f", "r+b") as f:       # an op the target cannot apply
            f.seek(5000)
            f.write(b"changed through the mount")
        wait_rsync_same(back, dst, why=lambda: source.log()[-3000:] + target.log()[-3000:])
        assert "resync" in target.log() or "resync" in source.log()
        assert status(source)["mounts"]["db"]["failures"] == 0
