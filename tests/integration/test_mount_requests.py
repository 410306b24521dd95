"""What a small file costs the capture mount in FUSE requests, and the
calls answered from an open file's own descriptor (issue 16, small-file
performance): fewer round trips and syscalls, the same ops in the same
order."""
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("pyfuse3", reason="the capture mount needs pyfuse3: "
                    "pip install -e '.[test,mount]' (with libfuse3-dev)")

from support.daemons import wait_for

from smirror.capture.mount.mountpoint import mounted_at
from smirror.capture.mount.runner import CaptureMount
from smirror.ops import OpKind

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or not shutil.which("fusermount3") or os.geteuid() != 0,
    reason="needs /dev/fuse, fusermount3 (Debian's fuse3) and root")

FILES = 50

# a small file written through the mount in another process (as an
# application would: a call of this process would wait on its own mount)
WRITER = r"""
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    fd = os.open(os.path.join(d, f"f{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"x" * 100)
    os.close(fd)
"""


@pytest.fixture
def dirs(tmp_path):
    back, mnt = tmp_path / "back", tmp_path / "mnt"
    back.mkdir()
    yield back, mnt
    if mounted_at(str(mnt)):                  # a failed test must not leave it mounted
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)])


def test_close_costs_no_flush_round_trip_and_the_ops_stay_as_they_were(dirs):
    back, mnt = dirs
    ops = []
    with CaptureMount(back, mnt, ops.append, bypass=False) as m:
        subprocess.run([sys.executable, "-c", WRITER, str(mnt), str(FILES)], check=True)
        # the kernel sends RELEASE after close(2) has returned
        wait_for(lambda: m.fs.requests.get("release", 0) >= FILES, what="every file released")
        requests = dict(m.fs.requests)
    # the first close gets ENOSYS for its FLUSH; the kernel sends no other
    assert requests.get("flush", 0) <= 1, requests
    assert requests["release"] == FILES, requests
    # per file: CREATE, WRITE, and last its mtime as the file has it (sent
    # at release; the 50 ms timer may send one more in between)
    for i in range(FILES):
        path = b"f%d" % i
        mine = [o for o in ops if o.path == path]
        content = [OpKind(o.kind).name for o in mine if o.kind != OpKind.SETATTR]
        assert content == ["CREATE", "WRITE"], (path, content)
        assert mine[-1].kind == OpKind.SETATTR, (path, [OpKind(o.kind).name for o in mine])
        assert mine[-1].mtime_ns == os.stat(back / path.decode()).st_mtime_ns


def test_attributes_and_xattrs_of_an_open_file_come_from_its_descriptor(dirs):
    """getattr and getxattr of an open file are answered from the mount's
    descriptor of it, not by resolving its path again: they still answer
    once the backing path is gone (removed behind the mount's back)."""
    back, mnt = dirs
    (back / "f").write_bytes(b"content")
    os.setxattr(back / "f", "user.tag", b"v1")
    with CaptureMount(back, mnt, lambda op: None, bypass=False) as m:
        fd = os.open(mnt / "f", os.O_RDONLY)
        try:
            assert os.getxattr(fd, "user.tag") == b"v1"
            os.unlink(back / "f")                  # the path is gone; the open file is not
            assert os.getxattr(fd, "user.tag") == b"v1"
            with pytest.raises(OSError):
                os.getxattr(fd, "user.none")       # no such attribute: still an error
            assert os.fstat(fd).st_size == 7
        finally:
            os.close(fd)
        # the kernel sends RELEASE after close(2) has returned
        wait_for(lambda: not m.fs.fhs_of, what="the released file's descriptor gone from the table")
        assert m.fs.failures == 0, m.fs.error
