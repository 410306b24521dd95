"""Inodes through the capture mount's CaptureFS (which the power-loss
layer shares) that die while something still holds them.

Inode numbers the backing file system reuses: a directory removed while
something still holds it, and a new one the backing gives the same number,
are two inodes to the kernel. With one generation for both, the kernel took
the new entry for the dead directory, and every create in it failed with
ENOENT (a target on the power-loss layer, whose reclaimer holds removed
directories, resynced such a subtree every 50 ms, forever). And an open
directory removed since is fsynced without error, as on a disk."""
import os
import shutil
import subprocess

import pytest

pytest.importorskip("smirror.capture.mount._fuse", reason="the capture mount needs smirror "
                    "built with libfuse 3 (Debian: libfuse3-dev, pkg-config)")
pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or not shutil.which("fusermount3") or os.geteuid() != 0,
    reason="needs /dev/fuse, fusermount3 (Debian's fuse3) and root")

from smirror.capture.mount.mountpoint import mounted_at  # noqa: E402
from smirror.capture.mount.runner import CaptureMount  # noqa: E402
from support.lazyfs import LazyMount  # noqa: E402

ATTEMPTS = 100      # removals until the backing reuses an inode number (ext4: at once)


def reuse_while_held(back, mnt, remove) -> int:
    """Make a directory, hold it (O_PATH, as the target's reclaimer does),
    ``remove(mnt, name)`` it, make another: until the backing gives the new
    one the held one's number. Each time, a directory made inside the new
    one must work. Returns how many times the number was reused."""
    reused = 0
    for i in range(ATTEMPTS):
        os.mkdir(mnt / f"old{i}")
        ino = os.stat(back / f"old{i}").st_ino
        held = os.open(mnt / f"old{i}", os.O_PATH)
        try:
            remove(mnt, f"old{i}")
            os.mkdir(mnt / f"new{i}")
            os.mkdir(mnt / f"new{i}" / "inside")        # ENOENT in a dead directory
            (mnt / f"new{i}" / "inside" / "f").write_bytes(b"x")
            assert (mnt / f"new{i}" / "inside" / "f").read_bytes() == b"x"
            assert (back / f"new{i}" / "inside" / "f").exists()
            reused += os.stat(back / f"new{i}").st_ino == ino
        finally:
            os.close(held)
        if reused >= 3:
            break
    return reused


def _rmdir(mnt, name):
    os.rmdir(mnt / name)


def _renamed_over(mnt, name):
    os.mkdir(mnt / (name + ".other"))
    os.rename(mnt / (name + ".other"), mnt / name)      # replaces the empty held one


MOUNTS = {"capture-mount": lambda back, mnt: CaptureMount(back, mnt, lambda op: None),
          "power-loss-layer": LazyMount}


@pytest.mark.parametrize("mount", MOUNTS)
@pytest.mark.parametrize("remove", [_rmdir, _renamed_over], ids=["rmdir", "rename-over"])
def test_a_reused_inode_number_is_a_new_inode_to_the_kernel(tmp_path, mount, remove):
    back, mnt = tmp_path / "back", tmp_path / "mnt"
    back.mkdir()
    try:
        with MOUNTS[mount](back, mnt):
            reused = reuse_while_held(back, mnt, remove)
    finally:
        if mounted_at(str(mnt)):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
    if not reused:
        pytest.skip(f"the backing file system reused no inode number in {ATTEMPTS} removals")


@pytest.mark.parametrize("mount", MOUNTS)
def test_fsync_of_an_open_directory_removed_since_succeeds(tmp_path, mount):
    # as on a disk; the target's durable pass fsyncs directories it noted,
    # and one removed meanwhile failed the pass with ENOENT
    back, mnt = tmp_path / "back", tmp_path / "mnt"
    back.mkdir()
    try:
        with MOUNTS[mount](back, mnt):
            os.mkdir(mnt / "d")
            fd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.rmdir(mnt / "d")
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        if mounted_at(str(mnt)):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
