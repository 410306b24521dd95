"""What a small file costs the capture mount in FUSE requests, and the
calls answered from an open file's own descriptor (issue 16, small-file
performance): fewer round trips and syscalls, the same ops in the same
order."""
import contextlib
import errno
import json
import mmap
import os
import shutil
import stat
import subprocess
import sys
import threading

import pytest

pytest.importorskip("smirror.capture.mount._fuse", reason="the capture mount needs smirror "
                    "built with libfuse 3 (Debian: libfuse3-dev, pkg-config)")

from smirror.capture.mount.fs import MARK_FSYNC
from smirror.capture.mount.mountpoint import mounted_at
from smirror.capture.mount.runner import CaptureMount
from smirror.ops import MARK_ROOT_MTIME, OpKind
from support.daemons import wait_for
from support.fuseuring import uring_disabled, uring_enabled

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


@pytest.fixture(params=["aio", "thread"])
def flush_path(request, monkeypatch):
    """The backing flush by Linux AIO (the runner's default here) or, where
    AIO cannot be set up, in a worker thread."""
    from smirror.capture.mount.aioflush import AioFlush
    if request.param == "thread":
        monkeypatch.setattr(AioFlush, "open", classmethod(lambda cls: None))
    return request.param


def test_calls_are_served_while_an_fsync_waits_for_the_backing_disk(dirs, monkeypatch, flush_path):
    """The backing fsync runs off the mount's loop: while one handle's
    fsync waits for the disk, another file is read and written through the
    mount, and the ops stay in the order the calls arrived (the fsync's MARK
    before the later write). The flush is held by a hook before it starts:
    nothing real here can hold a disk flush on demand."""
    from smirror.capture.mount.fs import CaptureFS
    back, mnt = dirs
    (back / "b").write_bytes(b"other file")
    entered, release = threading.Event(), threading.Event()
    real = CaptureFS.flush_backing

    def held(self, fd, datasync, done):
        entered.set()

        def flush_once_released():
            release.wait(60)
            real(self, fd, datasync, done)
        threading.Thread(target=flush_once_released, daemon=True).start()
    monkeypatch.setattr(CaptureFS, "flush_backing", held)
    ops = []
    done = {}
    with CaptureMount(back, mnt, ops.append, bypass=False, uring=False) as m:
        assert (m.fs.flusher is not None) == (flush_path == "aio")
        # with nothing else queued the flush runs on the loop (next test);
        # whether the read is queued by then is the kernel's timing: say it is
        m.fs.requests_queued = lambda: True
        fd = os.open(mnt / "a", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"data of a")

            def fsync_a():
                os.fsync(fd)
                done["fsync"] = True
            syncer = threading.Thread(target=fsync_a, daemon=True)
            syncer.start()
            assert entered.wait(30), "the backing fsync never started"

            def other_calls():
                done["read"] = (mnt / "b").read_bytes()
                with open(mnt / "c", "wb") as f:
                    f.write(b"written meanwhile")
            other = threading.Thread(target=other_calls, daemon=True)
            other.start()
            other.join(30)
            held_meanwhile = "fsync" not in done
            release.set()
            syncer.join(30)
        finally:
            release.set()
            os.close(fd)
        assert done.get("read") == b"other file", "a read waited for another handle's fsync"
        assert held_meanwhile and done.get("fsync"), done
        assert m.fs.failures == 0, m.fs.error
        if flush_path == "aio":
            assert m.fs.flusher.flushes >= 1
    kinds = [(OpKind(o.kind).name, o.path) for o in ops if o.kind != OpKind.SETATTR
             and o.path != MARK_ROOT_MTIME]
    assert kinds == [("CREATE", b"a"), ("WRITE", b"a"), ("MARK", MARK_FSYNC), ("CREATE", b"c"),
                     ("WRITE", b"c")], kinds
    assert (back / "a").read_bytes() == b"data of a"


@pytest.mark.parametrize("transport", ["dev-fuse", "io-uring"])
def test_a_failed_backing_fsync_fails_the_call(dirs, monkeypatch, transport):
    """What the disk's flush says reaches the application: an fsync that
    fails on the backing file fails with its errno (a hook fails it: a disk
    that fails on demand is not at hand). Over io_uring the flush is made
    in the handler, the serve lock let go."""
    import errno

    from smirror.capture.mount.fs import CaptureFS
    back, mnt = dirs

    def failing(self, fd, datasync, done):
        done(errno.EIO)                 # what a disk that is gone answers

    def failing_now(self, fd, datasync):
        raise OSError(errno.EIO, "a disk that is gone")
    monkeypatch.setattr(CaptureFS, "flush_backing", failing)
    monkeypatch.setattr(CaptureFS, "flush_now", failing_now)
    with contextlib.ExitStack() as stack:
        if transport == "io-uring":
            stack.enter_context(uring_enabled())
        m = stack.enter_context(CaptureMount(back, mnt, lambda op: None, bypass=False,
                                             uring=transport == "io-uring"))
        m.fs.requests_queued = lambda: True         # over /dev/fuse: the flush off the loop
        with open(mnt / "a", "wb") as f:
            f.write(b"x")
            f.flush()
            with pytest.raises(OSError) as exc:
                os.fsync(f.fileno())
        assert exc.value.errno == errno.EIO
        assert m.fs.failures == 0, m.fs.error
        assert m.uring == (transport == "io-uring")


def test_a_handle_released_during_its_flush_over_io_uring_is_closed_after_the_flush(dirs,
                                                                                  monkeypatch):
    """Over io_uring the flush runs on the handle's own descriptor, the
    serve lock let go (no dup): a RELEASE served meanwhile (the kernel
    sends none while an fsync holds the file; one is served here from the
    flush itself) leaves the close to the flush, so the flush never runs
    on a closed descriptor, or on another file's that took its number."""
    from smirror.capture.mount.fs import CaptureFS
    back, mnt = dirs
    seen = {}
    real_flush = CaptureFS.flush_now

    def release_meanwhile(self, fd, datasync):
        if not seen:
            CaptureFS.release.__wrapped__(self, fd)
            seen["open after release"] = os.fstat(fd).st_ino == os.stat(back / "a").st_ino
            seen["released"] = fd not in self.open_files
        real_flush(self, fd, datasync)
        seen.setdefault("flushed", fd)
    monkeypatch.setattr(CaptureFS, "flush_now", release_meanwhile)
    with uring_enabled(), CaptureMount(back, mnt, lambda op: None, bypass=False, uring=True) as m:
        fd = os.open(mnt / "a", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"x" * 100)
            assert m.uring
            os.fdatasync(fd)
            fh = seen["flushed"]
            assert seen["open after release"] and seen["released"]
            with pytest.raises(OSError) as exc:          # closed once the flush was done
                os.fstat(fh)
            assert exc.value.errno == errno.EBADF
            assert m.fs.flushing == {}
        finally:
            os.close(fd)        # its RELEASE finds the handle gone: EBADF, which the kernel drops
        assert m.fs.failures == 0, m.fs.error
    assert (back / "a").read_bytes() == b"x" * 100


def test_io_uring_asked_for_and_not_offered_is_said_and_served_over_dev_fuse(dirs, caplog):
    """SMIRROR_MOUNT_URING=1 on a kernel that does not offer FUSE over
    io_uring (its default): the mount works over /dev/fuse, its status
    says so, and the log says why, with what turns it on."""
    back, mnt = dirs
    with uring_disabled(), caplog.at_level("WARNING", logger="smirror.capture.mount"), \
            CaptureMount(back, mnt, lambda op: None, bypass=False, uring=True) as m:
        (mnt / "a").write_bytes(b"served")
        assert (back / "a").read_bytes() == b"served"
        assert not m.uring and m.status()["transport"] == "/dev/fuse"
    said = [r.getMessage() for r in caplog.records if "io_uring asked for" in r.getMessage()]
    assert len(said) == 1 and "requests come over /dev/fuse" in said[0], caplog.text


def test_fsync_and_fdatasync_by_aio_reach_the_backing_file(dirs):
    """The real flush by AIO: fsync, fdatasync and a directory's fsync
    through the mount succeed, each counted as an AIO flush."""
    back, mnt = dirs
    with CaptureMount(back, mnt, lambda op: None, bypass=False, uring=False) as m:
        if m.fs.flusher is None:
            pytest.skip("no Linux AIO here: the thread path is tested above")
        m.fs.requests_queued = lambda: True         # the flush off the loop
        with open(mnt / "a", "wb") as f:
            f.write(b"x" * 10000)
            f.flush()
            os.fsync(f.fileno())
            os.fdatasync(f.fileno())
        dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        assert m.fs.flusher.flushes == 3
        assert (back / "a").read_bytes() == b"x" * 10000


def test_an_fsync_with_nothing_else_queued_flushes_on_the_loop(dirs):
    """With no other request waiting, handing the flush off the loop only
    adds wake-ups (measured: about a fast disk's flush): it runs on the loop.
    One writer's fsyncs (a stray request of the kernel's, a FORGET, may be
    queued once)."""
    back, mnt = dirs
    with CaptureMount(back, mnt, lambda op: None, bypass=False, uring=False) as m:
        with open(mnt / "a", "wb") as f:
            for _ in range(5):
                f.write(b"x" * 1000)
                f.flush()
                os.fdatasync(f.fileno())
        assert m.fs.flushes["loop"] >= 4, m.fs.flushes
        assert (back / "a").read_bytes() == b"x" * 5000
        assert m.fs.failures == 0, m.fs.error


# writes through one open file (another process, as an application)
WRITES = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
for i in range(int(sys.argv[2])):
    os.pwrite(fd, b"x" * 4096, i * 4096)
os.close(fd)
"""


def test_writes_after_a_files_first_cost_no_security_capability_probe(dirs):
    """The kernel asks getxattr("security.capability") before every write
    unless the server took FUSE_HANDLE_KILLPRIV_V2, which the binding adds
    to libfuse's INIT reply: then only before a file's first write (and
    after its attributes are refreshed). One round trip a write, not two."""
    back, mnt = dirs
    with CaptureMount(back, mnt, lambda op: None, bypass=False) as m:
        subprocess.run([sys.executable, "-c", WRITES, str(mnt / "f"), "200"], check=True)
        requests = dict(m.fs.requests)
    assert requests["write"] == 200, requests
    assert requests.get("getxattr", 0) <= 2, requests
    assert (back / "f").stat().st_size == 200 * 4096


# as root: open what it needs, then become nobody (no CAP_FSETID) and write,
# truncate, open with O_TRUNC; root writes its own file first
KILLER = r"""
import os, sys
d = sys.argv[1]
dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
os.pwrite(os.open("root", os.O_WRONLY, dir_fd=dfd), b"r", 0)
fds = {n: os.open(n, os.O_WRONLY, dir_fd=dfd) for n in ("suid", "sgid-noexec", "trunc", "plain")}
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
os.pwrite(fds["suid"], b"y", 0)
os.pwrite(fds["sgid-noexec"], b"y", 0)
os.pwrite(fds["plain"], b"y", 0)
os.ftruncate(fds["trunc"], 2)
os.write(os.open("otrunc", os.O_WRONLY | os.O_TRUNC, dir_fd=dfd), b"z")
"""
KILL_FILES = {"root": 0o6777, "suid": 0o6777, "sgid-noexec": 0o2666, "trunc": 0o4777,
              "otrunc": 0o6777, "plain": 0o666}


def _kill_files(d):
    for name, mode in KILL_FILES.items():
        (d / name).write_bytes(b"0123456789")
        os.chmod(d / name, mode)


def test_a_writer_without_cap_fsetid_loses_set_id_bits_as_on_a_disk(dirs, tmp_path):
    """With HANDLE_KILLPRIV_V2 the file system kills set-id bits where the
    kernel says (the writer lacks CAP_FSETID): on write, truncate and
    open(O_TRUNC) by nobody, as the same calls do on the disk itself (the
    oracle, run beside), and the new mode goes out before the change. Root
    keeps them. Set-group-ID without group-execute stays: FUSE's contract
    (the disk drops it too when the writer is outside the file's group,
    which the server cannot know)."""
    back, mnt = dirs
    direct = tmp_path / "direct"
    direct.mkdir()
    _kill_files(direct)
    subprocess.run([sys.executable, "-c", KILLER, str(direct)], check=True)
    _kill_files(back)
    ops = []
    with CaptureMount(back, mnt, ops.append, bypass=False) as m:
        p = subprocess.run([sys.executable, "-c", KILLER, str(mnt)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert m.fs.failures == 0, m.fs.error
    got = {n: stat.S_IMODE((back / n).stat().st_mode) for n in KILL_FILES}
    want = {n: stat.S_IMODE((direct / n).stat().st_mode) for n in KILL_FILES}
    want["sgid-noexec"] = 0o2666
    assert got == want, (got, want)
    assert got["suid"] == 0o777 and got["root"] == 0o6777 and got["trunc"] == 0o777, got
    for name in ("suid", "trunc", "otrunc"):
        kinds = [(OpKind(o.kind).name, o.mode if o.kind == OpKind.SETATTR else None)
                 for o in ops if o.path == name.encode() and (o.kind != OpKind.SETATTR or o.mode)]
        first_change = next(i for i, k in enumerate(kinds) if k[0] in ("WRITE", "TRUNCATE"))
        assert ("SETATTR", got[name]) in kinds[:first_change], (name, kinds)


# as root: open two files, become nobody (no CAP_FSETID: the kernel asks to
# kill set-id bits at each of its writes), write each 20 times
NOBODY_WRITES = r"""
import os, sys
d = sys.argv[1]
fds = [os.open(os.path.join(d, n), os.O_WRONLY) for n in ("suid", "plain")]
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
for i in range(20):
    for fd in fds:
        os.pwrite(fd, b"y", i)
"""


def test_a_writer_without_cap_fsetid_costs_no_stat_where_no_set_id_bit_is_left(dirs, monkeypatch):
    """The kernel asks to kill set-id bits at every write of a caller
    without CAP_FSETID (PostgreSQL's user, for one). The binding looks at
    the mode itself (statx of the mode alone, which leaves the file's
    ctime unread) and asks the handler only where a bit is to go: once
    for the set-user-ID file, never for the plain one. An fstat at every
    write had made each next write dirty the inode (Linux 6.13's
    fine-grained times): pgbench through the mount 0.66 -> 0.75 of direct."""
    from smirror.capture.mount.fs import CaptureFS
    back, mnt = dirs
    for name, mode in (("suid", 0o4777), ("plain", 0o666)):
        (back / name).write_bytes(b"0" * 100)
        os.chmod(back / name, mode)
    asked = []
    real = CaptureFS._kill_suidgid

    def counted(self, fd, rel):
        asked.append(rel)
        return real(self, fd, rel)
    monkeypatch.setattr(CaptureFS, "_kill_suidgid", counted)
    ops = []
    with CaptureMount(back, mnt, ops.append, bypass=False) as m:
        p = subprocess.run([sys.executable, "-c", NOBODY_WRITES, str(mnt)], capture_output=True,
                           text=True)
        assert p.returncode == 0, p.stderr
        assert m.fs.requests["write"] == 40 and m.fs.failures == 0, (m.fs.requests, m.fs.error)
    assert asked == [b"suid"], asked
    assert stat.S_IMODE((back / "suid").stat().st_mode) == 0o777
    assert stat.S_IMODE((back / "plain").stat().st_mode) == 0o666
    modes = [o.mode for o in ops if o.kind == OpKind.SETATTR and o.path == b"suid" and o.mode]
    assert modes == [0o777], modes


# in another process (a page fault of this one on its own mount would hold
# the GIL the mount needs): how many pages of ``f`` the kernel caches after
# a write-only and after a read-write handle wrote them (mincore(2) of a
# private mapping, which reads nothing in), and what a reader that cached
# the pages and a shared mapping of them see after a write-only write
CACHED = r"""
import ctypes, json, mmap, os, sys
path, size = sys.argv[1], int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
def resident(m):
    vec = ctypes.create_string_buffer(len(m) // mmap.PAGESIZE)
    start = ctypes.c_char.from_buffer(m)
    if libc.mincore(ctypes.addressof(start), len(m), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    del start
    return sum(b & 1 for b in vec.raw)
out = {}
r = os.open(path, os.O_RDONLY)
seen = mmap.mmap(r, size, access=mmap.ACCESS_COPY)
out["before"] = resident(seen)
w = os.open(path, os.O_WRONLY)
os.pwrite(w, b"B" * size, 0)
out["write-only"] = resident(seen)
rw = os.open(path, os.O_RDWR)
os.pwrite(rw, b"C" * size, 0)
os.close(rw)
out["read-write"] = resident(seen)
shared = mmap.mmap(r, size, prot=mmap.PROT_READ)
out["cached"] = (shared[:] + os.pread(r, size, 0)).decode("latin-1")
os.pwrite(w, b"D" * size, 0)
os.close(w)
out["after"] = (shared[:] + os.pread(r, size, 0)).decode("latin-1")
print(json.dumps(out))
"""


def test_a_write_only_handle_skips_the_page_cache_and_cached_readers_see_its_writes(dirs):
    """A file opened write-only is served without the kernel's page cache:
    its data would otherwise be cached twice, in the mount's pages and in
    the backing file's (a read-write handle's written pages are cached).
    A reader that had cached the pages, and a mapping of them, see the
    bytes a write-only handle writes."""
    back, mnt = dirs
    size = 256 << 10
    (back / "f").write_bytes(b"A" * size)
    ops = []
    with CaptureMount(back, mnt, ops.append, bypass=False):
        got = json.loads(subprocess.run([sys.executable, "-c", CACHED, str(mnt / "f"), str(size)],
                                        check=True, capture_output=True, text=True).stdout)
    assert got["before"] == 0
    assert got["write-only"] == 0, "the write-only handle's data went into the page cache"
    assert got["read-write"] == size // mmap.PAGESIZE      # the control
    assert got["cached"] == "C" * 2 * size
    assert got["after"] == "D" * 2 * size, "a cached page or the mapping kept older bytes"
    assert [bytes(o.data[:1]) for o in ops if o.kind == OpKind.WRITE] == [b"B", b"C", b"D"]
    assert (back / "f").read_bytes() == b"D" * size


# a writer bound to one CPU, overwriting 4 blocks of f in turn with its byte
BLOCK = 256 << 10
RACER = r"""
import os, sys
os.sched_setaffinity(0, {int(sys.argv[2])})
fd = os.open(sys.argv[1], os.O_WRONLY)
block = sys.argv[3].encode() * (256 << 10)
for i in range(200):
    os.pwrite(fd, block, (i % 4) * (256 << 10))
os.close(fd)
"""


@pytest.mark.parametrize("transport", ["dev-fuse", "io-uring"])
def test_writers_on_two_cpus_get_ops_in_the_order_the_backing_file_saw(dirs, transport):
    """Two writers on two CPUs overwrite the same blocks at once (over
    io_uring each CPU's queue is served by a thread of its own): every
    write arrives once, and the ops replayed in the order emitted give
    the bytes the backing file holds. (That two handlers never run at
    once is tested on the binding: the kernel itself serializes writes to
    one file.)"""
    back, mnt = dirs
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    (back / "f").write_bytes(b"\0" * 4 * BLOCK)
    ops = []
    with contextlib.ExitStack() as stack:
        if transport == "io-uring":
            stack.enter_context(uring_enabled())
        m = stack.enter_context(CaptureMount(back, mnt, ops.append, bypass=False,
                                             uring=transport == "io-uring"))
        racers = [subprocess.Popen([sys.executable, "-c", RACER, str(mnt / "f"), str(cpu), tag])
                  for cpu, tag in zip(cpus, "ab", strict=True)]
        for r in racers:
            assert r.wait(60) == 0
        assert m.uring == (transport == "io-uring")
        assert m.status()["transport"] == ("io_uring" if m.uring else "/dev/fuse")
    replay = bytearray(4 * BLOCK)
    writes = [o for o in ops if o.kind == OpKind.WRITE]
    assert sum(len(o.data) for o in writes) == 400 * BLOCK
    for o in writes:
        replay[o.offset:o.offset + len(o.data)] = o.data
    assert bytes(replay) == (back / "f").read_bytes()
