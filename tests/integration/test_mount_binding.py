"""smirror's FUSE binding (:mod:`smirror.capture.mount._fuse`) on its own:
a small in-memory file system served by a real libfuse session, called by
real processes through the kernel. What the capture mount relies on: a
handler's failure reaches the caller as an errno and the loop goes on; a
reply that comes later (:class:`Later`) lets other requests through; a
reply never given still answers the caller; listings longer than one reply;
xattr sizes; calls queued from other threads; clean exit and unmount."""
import contextlib
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

_fuse = pytest.importorskip("smirror.capture.mount._fuse", reason="the capture mount needs smirror "
                            "built with libfuse 3 (Debian: libfuse3-dev, pkg-config)")

from smirror.capture.mount.mountpoint import mounted_at  # noqa: E402
from support.daemons import wait_for  # noqa: E402
from support.fuseuring import uring_enabled  # noqa: E402

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or not shutil.which("fusermount3") or os.geteuid() != 0,
    reason="needs /dev/fuse, fusermount3 (Debian's fuse3) and root")

FUSEError = _fuse.FUSEError


class _Stat:
    """What :class:`_fuse.Entry` reads of an entry."""

    def __init__(self, mode, size=0):
        self.st_mode, self.st_size = mode, size
        self.st_nlink, self.st_uid, self.st_gid, self.st_rdev = 1, 0, 0, 0
        self.st_blksize, self.st_blocks = 4096, 0
        self.st_atime_ns = self.st_mtime_ns = self.st_ctime_ns = 1_700_000_000_123_456_789


class MemFS:
    """A flat directory of files held in memory, with hooks the tests set."""

    def __init__(self):
        self.files: dict[bytes, bytearray] = {}
        self.inos: dict[bytes, int] = {}
        self.xattrs: dict[bytes, bytes] = {}
        self.on_fsync = None        # fsync(fh) -> what the handler returns
        self.on_write = None        # on_write(data): sees each write's data
        self.calls: list = []

    def _entry(self, name):
        if name not in self.files:
            raise FUSEError(errno.ENOENT)
        return _fuse.Entry(self.inos[name], 0, _Stat(stat.S_IFREG | 0o644, len(self.files[name])), 0.0)

    def _name(self, ino):
        for name, i in self.inos.items():
            if i == ino:
                return name
        raise FUSEError(errno.ENOENT)

    def lookup(self, parent, name, ctx):
        if name == b"boom":
            raise RuntimeError("a bug in the handler")
        return self._entry(name)

    def forget(self, inodes):
        pass

    def getattr(self, inode, ctx):
        if inode == _fuse.ROOT_INODE:
            return _fuse.Entry(inode, 0, _Stat(stat.S_IFDIR | 0o755), 0.0)
        return self._entry(self._name(inode))

    def setattr(self, inode, attr, fields, fh, ctx):
        name = self._name(inode)
        self.calls.append(("setattr", fields.update_size, attr.st_size, fields.update_mtime))
        if fields.update_size:
            del self.files[name][attr.st_size:]
        return self._entry(name)

    def create(self, parent, name, mode, flags, ctx):
        self.files[name] = bytearray()
        self.inos[name] = len(self.inos) + 2
        return self.inos[name], self._entry(name)

    def open(self, inode, flags, ctx):
        return inode

    def read(self, fh, off, size):
        return bytes(self.files[self._name(fh)][off:off + size])

    def write(self, fh, off, data, kill_suidgid):
        if self.on_write:
            self.on_write(data)
        buf = self.files[self._name(fh)]
        buf[off:off + len(data)] = data
        return len(data)

    def fsync(self, fh, datasync):
        self.calls.append("fsync")
        return self.on_fsync(fh) if self.on_fsync else None

    def release(self, fh):
        pass

    def opendir(self, inode, ctx):
        return 1

    def readdir(self, fh, start_id, token):
        names = sorted(self.files)
        for i in range(start_id, len(names)):
            if not _fuse.readdir_reply(token, names[i], self._entry(names[i]), i + 1):
                return

    def releasedir(self, fh):
        pass

    def getxattr(self, inode, name, ctx):
        if name not in self.xattrs:
            raise FUSEError(errno.ENODATA)
        return self.xattrs[name]

    def listxattr(self, inode, ctx):
        return list(self.xattrs)

    def setxattr(self, inode, name, value, flags, ctx):
        if flags & os.XATTR_CREATE and name in self.xattrs:
            raise FUSEError(errno.EEXIST)
        self.xattrs[name] = value

    def statfs(self, ctx):
        return os.statvfs("/")


@pytest.fixture(params=["dev-fuse", "io-uring"])
def served(request, tmp_path):
    """(fs, session, mount point): the session served on a thread, its
    requests over /dev/fuse or over io_uring (FUSE over io_uring: a queue
    a CPU, each served by a thread of its own)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fs = MemFS()
    uring = request.param == "io-uring"
    with contextlib.ExitStack() as stack:
        if uring:
            stack.enter_context(uring_enabled())
        yield from _served(fs, mnt, uring)


def _served(fs, mnt, uring):
    session = _fuse.Session(fs, str(mnt), {"fsname=smirror-test", "subtype=smirror", "allow_other"},
                            uring=uring)
    ended = {}

    def serve():
        try:
            session.run()
        except BaseException as exc:        # noqa: BLE001 - checked below
            ended["error"] = exc
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        os.stat(mnt)                # INIT is answered by now: the ring is set up, if any
        wait_for(lambda: session.uring == uring, what=f"requests over {'io_uring' if uring else '/dev/fuse'}")
        yield fs, session, mnt
    finally:
        session.exit()
        thread.join(10)
        assert not thread.is_alive(), "run() did not end at exit()"
        session.close(unmount=True)
        assert "error" not in ended, ended
        assert not mounted_at(str(mnt))


def _in_process(code, *args, timeout=30):
    """``code`` in another process (as an application: a call of the
    serving process itself would wait on its own loop)."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def test_a_handlers_bug_is_eio_to_the_caller_and_the_loop_goes_on(served):
    fs, _, mnt = served
    p = _in_process("import os, sys\ntry: os.stat(sys.argv[1])\nexcept OSError as e: print(e.errno)",
                    mnt / "boom")
    assert p.stdout.strip() == str(errno.EIO), p
    p = _in_process("import sys; open(sys.argv[1], 'wb').write(b'after the bug')", mnt / "f")
    assert p.returncode == 0, p.stderr
    assert bytes(fs.files[b"f"]) == b"after the bug"


# writes of 128 KiB of "a", then "b", ... "j" (each a request; more than a
# queue of the ring has entries, so entries are filled again), then 100 bytes
LARGE = b"abcdefghij"
WRITES = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
for i, c in enumerate(b"abcdefghij"):
    os.pwrite(fd, bytes([c]) * (128 << 10), i << 17)
os.pwrite(fd, b"s" * 100, 10 << 17)
"""


def test_write_data_is_lent_without_a_copy_and_what_a_handler_keeps_stays_as_written(served):
    """A large write reaches the handler as a view of the request's buffer
    (no copy); a view kept past the handler takes that buffer with it, so
    the next requests (over /dev/fuse read into a new buffer, over io_uring
    into new pages at the address the kernel fills) do not change what it
    holds. Small writes come as bytes."""
    fs, session, mnt = served
    ring_maps = _ring_mappings()
    seen = []
    fs.on_write = seen.append           # keeps every view
    p = _in_process(WRITES, mnt / "kept")
    assert p.returncode == 0, p.stderr
    n = len(LARGE)
    # over io_uring each kept view holds its entry's old alias (one mapping
    # each; the spare made ready before each lend went under the entry)
    u = 1 if session.uring else 0
    assert _ring_mappings() == ring_maps + n * u
    assert [type(d) for d in seen] == [memoryview] * n + [bytes]
    expected = [bytes([c]) * (128 << 10) for c in LARGE] + [b"s" * 100]
    assert [bytes(d) for d in seen] == expected
    assert session.buffers_lent == n
    assert bytes(fs.files[b"kept"]) == b"".join(expected)
    # what was kept still holds what was written, the entries having been
    # filled again since; a view let go gives its buffer back
    p = _in_process(WRITES.replace("abcdefghij", "ABCDEFGHIJ"), mnt / "again")
    assert p.returncode == 0, p.stderr
    assert [bytes(d) for d in seen[:n + 1]] == expected
    del seen[:]
    assert _ring_mappings() == ring_maps        # what was kept is unmapped with it
    fs.on_write = lambda data: None     # keeps nothing: the buffer stays the loop's
    p = _in_process(WRITES, mnt / "not-kept")
    assert p.returncode == 0, p.stderr
    assert session.buffers_lent == 2 * n
    assert bytes(fs.files[b"not-kept"]) == bytes(fs.files[b"kept"])
    # nothing grows by request: a spare waits for a keep that never comes
    assert _ring_mappings() == ring_maps + u


def _ring_mappings() -> int:
    """Mappings of the ring's memfds in this process (entries, aliases)."""
    with open("/proc/self/maps") as f:
        return sum("memfd:smirror-ring" in line for line in f)


# a writer bound to one CPU: over io_uring its requests go to that CPU's queue
PINNED_WRITER = r"""
import os, sys
os.sched_setaffinity(0, {int(sys.argv[2])})
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
for i in range(int(sys.argv[3])):
    os.pwrite(fd, b"x" * 100, i * 100)
os.close(fd)
"""


def test_requests_from_every_cpu_are_served_one_at_a_time(served):
    """Writers on two CPUs at once: every request is served (over io_uring
    each CPU's queue has a thread of its own), and never two handlers at
    once, even while one waits with the GIL let go (the order the handlers
    ran is the order of the ops)."""
    fs, _, mnt = served
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    active, most = [0], [0]

    def on_write(data):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.001)           # lets go of the GIL, as a backing write does
        active[0] -= 1
    fs.on_write = on_write
    writers = [subprocess.Popen([sys.executable, "-c", PINNED_WRITER, str(mnt / f"w{cpu}"), str(cpu),
                                 "200"]) for cpu in cpus]
    for w in writers:
        assert w.wait(60) == 0
    assert most[0] == 1, "two handlers ran at once"
    for cpu in cpus:
        assert bytes(fs.files[b"w%d" % cpu]) == b"x" * 100 * 200


def test_a_handler_that_lets_go_of_the_serve_lock_lets_another_cpus_request_through(served):
    """Over io_uring: an fsync whose wait runs with the serve lock let go
    (serve_unlocked, as the capture mount's backing flush) does not hold
    up a write from another CPU, which is served meanwhile."""
    fs, session, mnt = served
    if not session.uring:
        pytest.skip("over /dev/fuse one loop serves every request")
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    written = threading.Event()
    fs.on_write = lambda data: written.set()
    fs.on_fsync = lambda fh: session.serve_unlocked(written.wait, 30) or None
    fs.files[b"other"], fs.inos[b"other"] = bytearray(), 100
    syncer = subprocess.Popen([sys.executable, "-c", "import os, sys, time\n"
                               "os.sched_setaffinity(0, {int(sys.argv[2])})\n"
                               "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)\n"
                               "t = time.monotonic(); os.fsync(fd); print(time.monotonic() - t)",
                               str(mnt / "a"), str(cpus[0])], stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: fs.calls.count("fsync") == 1 or syncer.poll() is not None,
                 what="the fsync in its handler")
        p = subprocess.run([sys.executable, "-c", PINNED_WRITER, str(mnt / "other"), str(cpus[1]), "1"],
                           timeout=30)
        assert p.returncode == 0
        out, _ = syncer.communicate(timeout=30)
    finally:
        syncer.kill()
    assert syncer.returncode == 0
    assert float(out) < 25, "the fsync waited out its timeout: the write was held up"


def test_a_later_reply_lets_other_requests_through(served):
    """An fsync answered from another thread once released: meanwhile a
    read of another file is served."""
    fs, _, mnt = served
    fs.files[b"other"], fs.inos[b"other"] = bytearray(b"other file"), 100
    release = threading.Event()
    started = threading.Event()

    def later(fh):
        def start(reply):
            started.set()
            threading.Thread(target=lambda: (release.wait(30), reply.ok()), daemon=True).start()
        return _fuse.Later(start)
    fs.on_fsync = later
    syncer = subprocess.Popen([sys.executable, "-c", "import os, sys\n"
                               "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)\n"
                               "os.write(fd, b'x'); os.fsync(fd); print('synced')", str(mnt / "a")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert started.wait(30), "the fsync never reached the handler"
        p = _in_process("import sys; print(open(sys.argv[1]).read())", mnt / "other")
        assert p.stdout.strip() == "other file", p
        assert syncer.poll() is None, "the fsync returned before its reply"
        release.set()
        assert syncer.communicate(timeout=30)[0].strip() == "synced"
    finally:
        release.set()
        syncer.kill()


def test_a_reply_never_given_answers_eio_and_a_later_error_its_errno(served):
    fs, _, mnt = served
    fs.on_fsync = lambda fh: _fuse.Later(lambda reply: None)     # dropped at once
    code = ("import os, sys\nfd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)\n"
            "try: os.fsync(fd)\nexcept OSError as e: print(e.errno)")
    assert _in_process(code, mnt / "a").stdout.strip() == str(errno.EIO)
    fs.on_fsync = lambda fh: _fuse.Later(lambda reply: reply.fail(errno.ENOSPC))
    assert _in_process(code, mnt / "b").stdout.strip() == str(errno.ENOSPC)


def test_a_listing_longer_than_one_reply_comes_whole(served):
    fs, _, mnt = served
    for i in range(3000):                   # ~40 bytes an entry with attributes: several replies
        name = b"a-rather-long-file-name-%06d" % i
        fs.files[name], fs.inos[name] = bytearray(), 1000 + i
    p = _in_process("import os, sys; print(len(os.listdir(sys.argv[1])))", mnt)
    assert p.stdout.strip() == "3000", p


def test_xattr_sizes_and_flags(served):
    fs, _, mnt = served
    fs.files[b"f"], fs.inos[b"f"] = bytearray(), 5
    code = r"""
import errno, os, sys
f = sys.argv[1]
os.setxattr(f, "user.a", b"v" * 300)
try:
    os.setxattr(f, "user.a", b"again", os.XATTR_CREATE)
except OSError as e:
    print("create", e.errno)
print("get", len(os.getxattr(f, "user.a")), sorted(os.listxattr(f)))
try:
    os.getxattr(f, "user.missing")
except OSError as e:
    print("missing", e.errno)
"""
    p = _in_process(code, mnt / "f")
    assert p.stdout.split("\n")[:3] == [f"create {errno.EEXIST}", "get 300 ['user.a']",
                                        f"missing {errno.ENODATA}"], p


def test_setattr_truncate_and_touch(served):
    fs, _, mnt = served
    code = ("import os, sys\nf = sys.argv[1]\nopen(f, 'wb').write(b'0123456789')\n"
            "os.truncate(f, 4)\nos.utime(f)\nprint(os.stat(f).st_size, open(f, 'rb').read())")
    p = _in_process(code, mnt / "f")
    assert p.stdout.strip() == "4 b'0123'", p
    assert ("setattr", True, 4, False) in fs.calls
    assert any(c[0] == "setattr" and c[3] for c in fs.calls), fs.calls     # utime(): mtime now


def test_calls_from_other_threads_run_on_the_loop_between_requests(served):
    _, session, _ = served
    ran = []
    for i in range(50):
        session.call_soon(lambda i=i: ran.append((i, threading.current_thread().name)))
    wait_for(lambda: len(ran) == 50, what="every queued call run")
    assert [i for i, _ in ran] == list(range(50))
    assert {name for _, name in ran} != {threading.current_thread().name}


def test_bad_options_are_refused_by_name(tmp_path):
    (tmp_path / "mnt").mkdir()
    with pytest.raises(RuntimeError, match="no-such-option"):
        _fuse.Session(MemFS(), str(tmp_path / "mnt"), {"no-such-option"})
    assert not mounted_at(str(tmp_path / "mnt"))


def test_an_unmount_from_outside_ends_the_loop(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    session = _fuse.Session(MemFS(), str(mnt), {"fsname=smirror-test", "subtype=smirror"})
    thread = threading.Thread(target=session.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: mounted_at(str(mnt)) == "fuse.smirror", what="mounted")
        os.stat(mnt)        # the INIT handshake done: the loop serves (root getattr)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        thread.join(30)
        assert not thread.is_alive(), "run() went on after the unmount"
    finally:
        session.exit()
        thread.join(10)
        session.close(unmount=True)


def test_a_signal_another_thread_takes_still_reaches_its_handler_on_the_main_thread(tmp_path):
    """Served on the main thread (the power-loss layer's process is), a
    signal that another thread takes, or that lands between two polls,
    must still wake the loop so its Python handler runs (Python's wakeup
    fd among the polled ones): a clean SIGTERM must not wait for the next
    request."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    session = _fuse.Session(MemFS(), str(mnt), {"fsname=smirror-test", "subtype=smirror"})
    handled = []
    old = signal.signal(signal.SIGUSR2, lambda *a: (handled.append(True), session.exit()))
    stuck = threading.Event()

    def poke():
        os.stat(mnt)                    # the loop serves (INIT done, root getattr answered)
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)     # to this thread
        if not stuck.wait(0) and not wait_for_quietly(lambda: handled, 20):
            stuck.set()
            session.exit()              # the watchdog: the handler never ran
    poker = threading.Thread(target=poke, daemon=True)
    poker.start()
    try:
        session.run()
    finally:
        signal.signal(signal.SIGUSR2, old)
        poker.join(30)
        session.close(unmount=True)
    assert handled and not stuck.is_set()


def wait_for_quietly(cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False
