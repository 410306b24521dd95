"""A write in flight: the kernel moves a file's mtime when a write begins
and copies its bytes after. A reader that sends what it read under the
times it fstat'd first must wait for that write, else the target holds
older bytes under the source's mtime and, after a kill, a restart's quick
check leaves them for good (tools/faults.py kill, `replicate` victim:
'>fc........ log371/data359', size and mtime equal, bytes not).

The write is held between its time update and its bytes for as long as
each test needs (tests/support/stalledwrite.py, a userfaultfd): no timing."""
import os

import pytest

from smirror.capture.watch import TreeCapture
from smirror.fs.files import wait_for_writes
from smirror.mirror.engine import Mirror, MirrorOptions
from support.applying import Pipe
from support.stalledwrite import StalledWrite, run_beside, stale_under_source_mtime, unavailable

pytestmark = pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "-")

SIZE = 1 << 20
OLD, NEW = b"o" * SIZE, b"n" * SIZE


def test_the_kernel_moves_mtime_before_the_bytes_and_wait_for_writes_waits_for_them(tmp_path):
    """Why the wait exists, and that it works: while the write is held a
    read sees the new mtime and the old bytes; wait_for_writes returns
    only once the write put its bytes."""
    f = tmp_path / "f"
    f.write_bytes(OLD)
    before = os.stat(f).st_mtime_ns
    with StalledWrite(f, NEW) as w:
        assert os.stat(f).st_mtime_ns != before
        assert f.read_bytes() == OLD            # the new times, the old bytes
        fd = os.open(f, os.O_RDONLY)
        try:
            assert run_beside(lambda: wait_for_writes(fd), w) == "waited"
            assert os.pread(fd, SIZE, 0) == NEW
            assert os.lseek(fd, 0, os.SEEK_CUR) == 0
        finally:
            os.close(fd)


def test_wait_for_writes_on_an_empty_file_and_on_a_hole_returns(tmp_path):
    for name, size in (("empty", 0), ("hole", 1 << 20)):
        f = tmp_path / name
        with open(f, "wb") as out:
            out.truncate(size)
        fd = os.open(f, os.O_RDONLY)
        try:
            wait_for_writes(fd)         # ENXIO inside: no data
            assert os.lseek(fd, 0, os.SEEK_CUR) == 0
        finally:
            os.close(fd)


def test_the_watcher_never_sends_older_bytes_under_a_write_in_flights_mtime(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(OLD)
    pipe = Pipe(dst)
    cap = TreeCapture(src, pipe, verify_interval=None)
    try:
        cap.resync(b"", "initial")
        with StalledWrite(src / "f", NEW) as w:
            # the event of an earlier write has the watcher read the file
            # now; its process may be killed right after that read's ops
            # (the held write's own event never comes then)
            outcome = run_beside(lambda: cap.resync(b"f", "modified"), w)
        # the write done (nothing read since): what that read sent
        pipe.applier.flush()
        assert not stale_under_source_mtime(src / "f", dst / "f"), outcome
    finally:
        cap.close()
    assert (dst / "f").read_bytes() == NEW


@pytest.mark.parametrize("mode", ["different", "checksum"])
def test_a_mirror_never_copies_older_bytes_under_a_write_in_flights_mtime(tmp_path, mode):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_bytes(OLD)
    (dst / "f").write_bytes(b"t" * SIZE)        # differs: the mirror copies
    os.utime(dst / "f", ns=(10**18, 10**18))
    opts = MirrorOptions(different=True, checksum=mode == "checksum", threads=1)
    with StalledWrite(src / "f", NEW) as w:
        outcome = run_beside(lambda: Mirror(src, dst, opts).run(), w)
    # the write done: the copy made meanwhile
    assert not stale_under_source_mtime(src / "f", dst / "f"), outcome
    assert (dst / "f").read_bytes() == NEW


def test_a_file_written_at_every_reread_goes_out_under_the_times_of_its_last_read(tmp_path):
    """Rereads run out while the file is still being written: the times
    sent are those the last read was made under, never those of the write
    it missed (the source's newer mtime keeps the target's copy in
    question; a kill before that write's event leaves no stale copy under
    the source's mtime)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(OLD)
    pipe = Pipe(dst)
    writes: list = []
    armed = []

    def emit(op):
        pipe(op)
        if op.kind.name == "WRITE" and armed and not writes:
            # a write lands while the watcher reads: it sees the file moved
            writes.append(op)
            with open(src / "f", "r+b") as f:
                f.write(b"w" * 4096)
    cap = TreeCapture(src, emit, verify_interval=None)
    try:
        cap.resync(b"", "initial")
        armed.append(True)
        cap.REREADS = 0
        (src / "f").write_bytes(NEW)
        cap.resync(b"f", "modified")
        pipe.applier.flush()
        assert writes, "no WRITE sent"
        assert not stale_under_source_mtime(src / "f", dst / "f")
        cap.REREADS = TreeCapture.REREADS
        cap.resync(b"f", "its next event")
        pipe.applier.flush()
    finally:
        cap.close()
    assert (dst / "f").read_bytes() == (src / "f").read_bytes()
    assert os.stat(dst / "f").st_mtime_ns == os.stat(src / "f").st_mtime_ns
