"""The exact-order capture mount (smirror.capture.mount, ``--mount``): real FUSE
mounts over real directories, the real replication data path."""
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("smirror.capture.mount._fuse", reason="the capture mount needs smirror "
                    "built with libfuse 3 (Debian: libfuse3-dev, pkg-config)")

from smirror.capture.mount.mountpoint import mounted_at
from smirror.capture.mount.runner import CaptureMount
from smirror.capture.recorder import Recorder
from smirror.errors import ConfigError, MountError
from smirror.ops import MARK_ROOT_MTIME, OpKind
from smirror.replication import Replication
from support.daemons import wait_for
from support.rsync import rsync_differences, wait_rsync_same
from support.stalledwrite import StalledWrite, run_beside, stale_under_source_mtime, unavailable
from support.treestate import diff, snapshot
from support.workload import Workload

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or not shutil.which("fusermount3") or os.geteuid() != 0,
    reason="needs /dev/fuse, fusermount3 (Debian's fuse3) and root")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def dirs(tmp_path):
    back, dst, mnt = tmp_path / "back", tmp_path / "dst", tmp_path / "mnt"
    (back / "sub").mkdir(parents=True)
    (back / "sub" / "existing").write_bytes(os.urandom(50_000))
    yield back, dst, mnt, tmp_path / "state"
    if mounted_at(str(mnt)):                  # a failed test must not leave it mounted
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)])


def _env():
    return dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))


# -- the ops ---------------------------------------------------------------------------
def test_every_call_is_applied_to_the_backing_directory_then_emitted_in_order(tmp_path):
    back, mnt = tmp_path / "back", tmp_path / "mnt"
    back.mkdir()
    ops = []
    with CaptureMount(back, mnt, ops.append) as m:
        os.makedirs(mnt / "d" / "e")
        with open(mnt / "d" / "f", "wb") as f:
            f.write(b"hello")
            f.flush()
            os.fsync(f.fileno())
        os.rename(mnt / "d" / "f", mnt / "d" / "e" / "g")
        os.link(mnt / "d" / "e" / "g", mnt / "h")
        os.symlink("d/e/g", mnt / "s")
        os.chmod(mnt / "h", 0o600)
        os.truncate(mnt / "h", 2)
        os.setxattr(mnt / "h", "user.x", b"v")
        os.removexattr(mnt / "h", "user.x")
        with open(mnt / "h", "ab") as f:           # O_APPEND: the offset is recorded
            f.write(b"ZZ")
        os.unlink(mnt / "s")
        os.mkfifo(mnt / "fifo")
        assert (back / "h").read_bytes() == b"heZZ" == (mnt / "h").read_bytes()
        m.flush_times()
    # owed mtimes go out on a 50 ms timer, wherever it falls: not part of the order
    kinds = [(OpKind(o.kind).name, o.path) for o in ops
             if (o.kind != OpKind.SETATTR or o.mode) and o.path != MARK_ROOT_MTIME]
    assert kinds[:13] == [
        ("MKDIR", b"d"), ("MKDIR", b"d/e"), ("CREATE", b"d/f"), ("WRITE", b"d/f"),
        ("MARK", b"smirror.fsync"), ("RENAME", b"d/f"), ("HARDLINK", b"h"), ("SYMLINK", b"s"),
        ("SETATTR", b"d/e/g"), ("TRUNCATE", b"d/e/g"), ("XATTR", b"d/e/g"), ("XATTR", b"d/e/g"),
        ("WRITE", b"d/e/g")], kinds
    append = [o for o in ops if o.kind == OpKind.WRITE][-1]
    assert (append.offset, bytes(append.data)) == (2, b"ZZ")
    assert ("DELETE", b"s") in kinds and ("MKNOD", b"fifo") in kinds
    # the mtimes owed were sent: the file's last one is its backing mtime now
    last = [o for o in ops if o.kind == OpKind.SETATTR and o.path == b"d/e/g"][-1]
    assert last.mtime_ns == os.lstat(back / "h").st_mtime_ns
    assert not mounted_at(str(mnt))


def test_an_fsync_sends_its_mark_and_leaves_the_owed_mtime_to_close(tmp_path, monkeypatch):
    # reading the mtime at each fsync would make the next write's time a
    # fine-grained one (Linux 6.13+), dirtying the inode at every commit of
    # a database: the mtime stays owed until the timer or the close
    from smirror.capture.mount import runner
    monkeypatch.setattr(runner, "TIMES_INTERVAL", 3600.0)      # the timer out of the way
    back, mnt = tmp_path / "back", tmp_path / "mnt"
    back.mkdir()
    ops = []
    with CaptureMount(back, mnt, ops.append, bypass=False) as m:
        fd = os.open(mnt / "wal", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, b"x" * 8192, 0)
            os.fdatasync(fd)
            os.pwrite(fd, b"y" * 8192, 8192)
            os.fsync(fd)
            of_wal = [(OpKind(o.kind).name, json.loads(o.data)["path"] if o.kind == OpKind.MARK
                       else o.path) for o in ops if o.path == b"wal" or o.kind == OpKind.MARK]
            assert of_wal[1:] == [("WRITE", b"wal"), ("MARK", "wal"), ("WRITE", b"wal"),
                                  ("MARK", "wal")]
        finally:
            os.close(fd)
        # the kernel sends RELEASE after close(2) has returned
        wait_for(lambda: m.fs.requests.get("release", 0) >= 1, what="the file released")
        stamps = [o for o in ops if o.kind == OpKind.SETATTR and o.path == b"wal"]
    # the close sends it, the backing file's own
    assert [o.mtime_ns for o in stamps] == [os.stat(back / "wal").st_mtime_ns]


def test_a_failed_call_emits_nothing_and_the_caller_gets_the_errno(tmp_path):
    back, mnt = tmp_path / "back", tmp_path / "mnt"
    back.mkdir()
    (back / "full").mkdir()
    (back / "full" / "x").write_bytes(b"")
    ops = []
    with CaptureMount(back, mnt, ops.append):
        with pytest.raises(OSError) as e:
            os.rmdir(mnt / "full")
        assert e.value.errno == 39                      # ENOTEMPTY
        with pytest.raises(FileNotFoundError):
            os.rename(mnt / "nothing", mnt / "else")
        with pytest.raises(FileExistsError):
            os.mkdir(mnt / "full")
    assert [o for o in ops if o.kind != OpKind.SETATTR and o.kind != OpKind.MARK] == []


def test_every_op_kind_is_replicated_rsync_finds_nothing(dirs):
    back, dst, mnt, state = dirs
    with Replication(back, dst, state_dir=state, mount=mnt) as rep:
        # the workload's calls go through the mount (its recorder performs
        # them on the mount point and records nothing)
        w = Workload(Recorder(mnt, lambda op: None), seed=3, max_write=40_000)
        kinds = set()
        for _ in range(600):
            kinds.add(w.step())
        f = mnt / "sub" / "attrs"
        f.write_bytes(b"x" * 5000)
        os.chown(f, 1234, 5678)
        os.chmod(f, 0o4750)
        os.utime(f, ns=(1, 1_500_000_000_000_000_000))
        os.setxattr(f, "user.note", b"kept")
        with open(f, "r+b") as fh:                     # an 8 KiB rewrite in place, then fsync
            fh.seek(100)
            fh.write(b"y" * 8192)
            os.fsync(fh.fileno())
        os.link(f, mnt / "attrs-link")
        os.mkdir(mnt / "gone")
        os.rmdir(mnt / "gone")
        assert rep.wait(60), rep.status()
        wait_rsync_same(back, dst, why=lambda: json.dumps(rep.status()))
        st = rep.status()
        assert st["mount"]["failures"] == 0 and st["error"] == ""
    assert len(kinds) >= 8, kinds
    assert rsync_differences(back, dst) == ""
    assert not mounted_at(str(mnt))


# -- the ordered pair ------------------------------------------------------------------
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


def ordered_pair(back, dst, mnt, state, n: int) -> dict:
    """A writer updates ``a`` then ``b`` n times through the mount; a reader
    polls the target, reading b then a: any state the source went through
    has a >= b."""
    for name in ("a", "b"):
        (back / name).write_bytes(b"%012d" % 0)
    result = {"reads": 0, "violations": 0, "first": None}
    with Replication(back, dst, state_dir=state, mount=mnt) as rep:
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
            subprocess.run([sys.executable, "-c", WRITER, str(mnt), str(n)], check=True,
                           timeout=3600)
            assert rep.wait(300), rep.status()
        finally:
            done.set()
            reader.join()
    assert (dst / "a").read_bytes() == (dst / "b").read_bytes() == b"%012d" % n
    return result


def test_ordered_pair_through_the_mount_zero_violations(dirs):
    back, dst, mnt, state = dirs
    r = ordered_pair(back, dst, mnt, state, 3000)
    assert r["reads"] > 100, r
    assert r["violations"] == 0, r


@pytest.mark.slow
def test_ordered_pair_20000_updates(dirs):
    """The 100,000-update run is the two-daemon one (test_mount_daemon.py);
    here, in one process, 20,000 keep the suite's time in bounds."""
    back, dst, mnt, state = dirs
    r = ordered_pair(back, dst, mnt, state, 20_000)
    assert r["reads"] > 200, r
    assert r["violations"] == 0, r


# -- the mount point -------------------------------------------------------------------
SERVE = r"""
import sys, time
from smirror.capture.mount.runner import CaptureMount
CaptureMount(sys.argv[1], sys.argv[2], lambda op: None).start()
print("mounted", flush=True)
time.sleep(3600)
"""


def _crashed_mount(back, mnt):
    """A mount whose server was SIGKILLed: what a crashed run leaves."""
    p = subprocess.Popen([sys.executable, "-c", SERVE, str(back), str(mnt)],
                         stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert p.stdout.readline().strip() == "mounted"
    finally:
        p.kill()
        p.wait()
    with pytest.raises(OSError) as e:
        os.statvfs(mnt)
    # "not connected" (over io_uring the kernel says "connection aborted")
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert mounted_at(str(mnt)) == "fuse.smirror"


def test_a_stale_mount_from_a_crashed_run_is_cleared_with_a_message(tmp_path, caplog):
    back, mnt = tmp_path / "back", tmp_path / "mnt"
    back.mkdir()
    _crashed_mount(back, mnt)
    with CaptureMount(back, mnt, lambda op: None) as m:
        assert "stale smirror mount" in m.cleared and str(mnt) in m.cleared
        (mnt / "works").write_bytes(b"yes")
    assert (back / "works").read_bytes() == b"yes"
    assert "stale smirror mount" in caplog.text
    assert not mounted_at(str(mnt))


def test_mount_point_errors_name_the_mount_point_and_the_reason(tmp_path):
    back, mnt = tmp_path / "back", tmp_path / "mnt"
    back.mkdir()
    mnt.mkdir()
    (mnt / "leftover").write_bytes(b"")
    with pytest.raises(MountError, match=f"{mnt} is not empty"):
        CaptureMount(back, mnt, lambda op: None).start()
    with pytest.raises(MountError, match="must not be inside the backing"):
        CaptureMount(back, back / "m", lambda op: None).start()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(MountError, match="is not a directory"):
        CaptureMount(back, tmp_path / "file", lambda op: None).start()
    os.unlink(mnt / "leftover")
    with CaptureMount(back, mnt, lambda op: None):
        # a live smirror mount is not taken over
        p = subprocess.run([sys.executable, "-c", SERVE, str(back), str(mnt)],
                           capture_output=True, text=True, env=_env(), timeout=60)
        assert "already served by a running smirror mount" in p.stderr
    with pytest.raises(ConfigError, match="mount"):
        Replication(back, tmp_path / "dst", capture="api", mount=mnt)


def test_two_mounts_in_one_process_each_capture_their_own_calls(tmp_path):
    """Each mount is a libfuse session of its own (the binding keeps no
    global state): two served by one process, each op to its own stream."""
    mounts = []
    try:
        for name in ("a", "b"):
            (tmp_path / f"back-{name}").mkdir()
            ops: list = []
            m = CaptureMount(tmp_path / f"back-{name}", tmp_path / f"mnt-{name}", ops.append,
                             bypass=False).start()
            mounts.append((name, m, ops))
        write = "import sys; open(sys.argv[1], 'wb').write(sys.argv[2].encode())"
        for name, _, _ in mounts:       # another process: the application
            subprocess.run([sys.executable, "-c", write, str(tmp_path / f"mnt-{name}" / "f"),
                            f"data of {name}"], check=True)
        for name, m, ops in mounts:
            assert (tmp_path / f"back-{name}" / "f").read_bytes() == f"data of {name}".encode()
            writes = [bytes(o.data) for o in ops if o.kind == OpKind.WRITE]
            assert writes == [f"data of {name}".encode()], (name, writes)
            assert m.fs.failures == 0, m.fs.error
    finally:
        for _, m, _ in mounts:
            m.stop()


# -- the command -----------------------------------------------------------------------
def _replicate(back, dst, mnt, state, *extra):
    return subprocess.Popen([sys.executable, "-m", "smirror", "replicate", str(back), str(dst),
                             "--mount", str(mnt), "--state-dir", str(state), "--interval", "0.2",
                             "--json", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def test_replicate_command_mounts_and_unmounts_on_sigint(dirs):
    back, dst, mnt, state = dirs
    proc = _replicate(back, dst, mnt, state)
    try:
        assert '"state"' in proc.stdout.readline(), proc.stderr.read()
        assert mounted_at(str(mnt)) == "fuse.smirror"
        (mnt / "live.txt").write_text("written through the mount")
        os.rename(mnt / "sub" / "existing", mnt / "moved")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not mounted_at(str(mnt))
    assert rsync_differences(back, dst) == ""


# -- SIGKILL: the target is a prefix of the source's history ---------------------------
HISTORY = r"""
import os, random, sys
mnt, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
names = []
done = 0
def out():
    print(done, flush=True)
try:
    while True:
        r = rng.random()
        # one mutating call a step: the history is the list of steps
        if not names or r < 0.1:
            name = f"f{rng.randrange(10**6)}"
            if name in names:
                continue
            fd = os.open(os.path.join(mnt, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            names.append(name)
            done += 1
            os.close(fd)
        elif r < 0.85:
            name = rng.choice(names)
            data = rng.randbytes(rng.randrange(1, 3000))
            off = rng.randrange(0, 20000)
            fd = os.open(os.path.join(mnt, name), os.O_WRONLY)
            try:
                os.pwrite(fd, data, off)
                done += 1
            finally:
                os.close(fd)
        elif r < 0.93:
            old = rng.choice(names)
            new = f"f{rng.randrange(10**6)}"
            os.rename(os.path.join(mnt, old), os.path.join(mnt, new))
            names.remove(old)
            if new not in names:
                names.append(new)
            done += 1
        else:
            name = rng.choice(names)
            os.unlink(os.path.join(mnt, name))
            names.remove(name)
            done += 1
        if done % 50 == 0:
            out()
except OSError:
    pass
out()
"""


def _history(seed: int):
    """The source states the writer goes through, step by step (its own
    random choices, replayed): yields ({name: content}, the name a write
    changed or None, its content before) after 0, 1, ... steps."""
    import random
    rng = random.Random(seed)
    files: dict[str, bytearray] = {}
    names: list[str] = []
    yield files, None, None
    while True:
        r = rng.random()
        written = before = None
        if not names or r < 0.1:
            name = f"f{rng.randrange(10**6)}"
            if name in names:
                continue
            names.append(name)
            files[name] = bytearray()
        elif r < 0.85:
            name = rng.choice(names)
            data = rng.randbytes(rng.randrange(1, 3000))
            off = rng.randrange(0, 20000)
            f = files[name]
            written, before = name, bytes(f)
            if len(f) < off:
                f.extend(bytes(off - len(f)))
            f[off:off + len(data)] = data
        elif r < 0.93:
            old = rng.choice(names)
            new = f"f{rng.randrange(10**6)}"
            files[new] = files.pop(old)
            names.remove(old)
            if new not in names:
                names.append(new)
        else:
            name = rng.choice(names)
            del files[name]
            names.remove(name)
        yield files, written, before


def _torn(target: dict, files: dict, name, before) -> bool:
    """``target`` is ``files`` but for a write to ``name`` the kill cut
    short: write(2) stops between pages on SIGKILL, so each page of it is
    old or new (the restarted replication's mirror repairs it)."""
    if name is None or target.keys() != files.keys():
        return False
    if any(target[k] != files[k] for k in files if k != name):
        return False
    t, new = target[name], files[name]
    return all(t[i:i + 4096] in (new[i:i + len(t[i:i + 4096])], before[i:i + len(t[i:i + 4096])])
               for i in range(0, len(t), 4096))


def _target_files(dst) -> dict:
    return {e.name: bytearray(open(e.path, "rb").read()) for e in os.scandir(dst)
            if e.is_file() and not e.name.startswith(".smirror-tmp-")}


def kill_trial(tmp_path, seed: int) -> int:
    """Writes a history through ``smirror replicate --mount``, SIGKILLs the
    replicate at a random moment, checks the target is the source after
    some prefix of the history, then restarts: the stale mount is cleared
    and the target converges. Returns the prefix length that matched."""
    back, dst, mnt, state = (tmp_path / f"back{seed}", tmp_path / f"dst{seed}",
                             tmp_path / f"mnt{seed}", tmp_path / f"state{seed}")
    back.mkdir()
    try:
        return _kill_trial(back, dst, mnt, state, seed)
    finally:
        if mounted_at(str(mnt)):              # a failed trial must not leave it mounted
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])


def _kill_trial(back, dst, mnt, state, seed):
    import random
    proc = _replicate(back, dst, mnt, state)
    try:
        assert '"state"' in proc.stdout.readline(), proc.stderr.read()
        writer = subprocess.Popen([sys.executable, "-c", HISTORY, str(mnt), str(seed)],
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(random.Random(seed).uniform(0.3, 2.0))
        proc.kill()
        proc.wait()
        done = int(writer.communicate(timeout=60)[0].split()[-1])
    finally:
        proc.kill()
    target = _target_files(dst)
    matched = None
    # the step in flight at the kill may have been served: up to done + 1
    for n, (state_n, written, before) in enumerate(_history(seed)):
        if state_n == target or _torn(target, state_n, written, before):
            matched = n
        if n > done:
            break
    assert matched is not None, (f"seed {seed}: the target after the kill is no prefix of the "
                                 f"{done} steps written; it holds {sorted(target)}")
    # the restart clears the dead mount and brings the target in line
    proc = _replicate(back, dst, mnt, state)
    try:
        assert '"state"' in proc.stdout.readline(), proc.stderr.read()
        (mnt / "after-restart").write_bytes(b"ok")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stale smirror mount" in err
    assert diff(snapshot(back), snapshot(dst)) == [], (seed, out[-2000:], err[-3000:])
    return matched


def test_sigkill_of_replicate_leaves_the_target_a_prefix_of_the_history(tmp_path):
    prefixes = [kill_trial(tmp_path, seed) for seed in (1, 2, 3)]
    assert max(prefixes) > 0, prefixes


@pytest.mark.slow
def test_sigkill_prefix_12_trials(tmp_path):
    # more trials: tools/faults.py kill (its replicate victims) and the README's figures
    prefixes = [kill_trial(tmp_path, seed) for seed in range(100, 112)]
    assert max(prefixes) > 0, prefixes


# -- writes that bypass the mount ------------------------------------------------------
BYPASS = r"""
import os, sys
back = sys.argv[1]
with open(os.path.join(back, "through"), "r+b") as f:
    f.seek(5000)
    f.write(b"B" * 100)
with open(os.path.join(back, "direct"), "wb") as f:
    f.write(b"written behind the mount")
os.rename(os.path.join(back, "dir"), os.path.join(back, "dir2"))
os.makedirs(os.path.join(back, "newdir", "deep"))
os.link(os.path.join(back, "through"), os.path.join(back, "newdir", "linked"))
with open(os.path.join(back, "newdir", "deep", "f"), "wb") as f:
    f.write(b"deep")
os.chmod(os.path.join(back, "direct"), 0o600)
os.unlink(os.path.join(back, "sub", "existing"))
"""


def test_writes_that_bypass_the_mount_are_detected_reported_and_repaired(dirs, caplog):
    back, dst, mnt, state = dirs
    with Replication(back, dst, state_dir=state, mount=mnt) as rep:
        bypass = rep.mount.bypass
        if not bypass.status()["detected"]:
            pytest.skip(f"fanotify cannot run here: {bypass.unavailable}")
        (mnt / "through").write_bytes(b"m" * 10_000)
        os.mkdir(mnt / "dir")
        (mnt / "dir" / "inner").write_bytes(b"inner")
        assert rep.wait(60)
        wait_rsync_same(back, dst)
        time.sleep(0.5)                      # a late event of the mount's own would show now
        assert bypass.changes == 0, bypass.status()     # the mount's writes are its own
        # another program writes BACKING directly (this process's own
        # changes are the mount's: the watcher ignores them)
        subprocess.run([sys.executable, "-c", BYPASS, str(back)], check=True)
        wait_rsync_same(back, dst, why=lambda: json.dumps(rep.status()))
        wait_for(lambda: "direct" in rep.status()["mount"]["bypass"]["last_paths"]
                 or bypass.changes >= 6, what="bypass changes counted")
        assert bypass.changes > 0
        # the mount follows the renamed directory: its next write lands there
        (mnt / "dir2" / "inner").write_bytes(b"through the mount again")
        assert rep.wait(60)
        wait_rsync_same(back, dst)
        assert (dst / "dir2" / "inner").read_bytes() == b"through the mount again"
    assert "not through the mount" in caplog.text


def test_replicate_command_refuses_a_bad_mount_point_by_name_without_a_traceback(dirs):
    back, dst, mnt, state = dirs
    mnt.mkdir()
    (mnt / "leftover").write_bytes(b"")
    proc = _replicate(back, dst, mnt, state)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert f"mount point {mnt} is not empty" in err and "Traceback" not in err
    assert not mounted_at(str(mnt))


# -- confinement: the mount never leaves BACKING ----------------------------------------
@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "walk"])
def test_a_symlink_swapped_into_backing_cannot_lead_the_mount_outside(tmp_path, monkeypatch,
                                                                       caplog, openat2):
    """A local user who can write BACKING swaps a directory the application
    holds open (through the mount) for a symlink to a directory outside:
    the mount (root) must not create, write, truncate, chmod or read
    there; the application gets EACCES and the refusal is logged."""
    import smirror.fs.beneath as beneath
    monkeypatch.setattr(beneath, "use_openat2", openat2)
    back, mnt, outside = tmp_path / "back", tmp_path / "mnt", tmp_path / "outside"
    (back / "d").mkdir(parents=True)
    (back / "d" / "f").write_bytes(b"inside")
    outside.mkdir()
    (outside / "f").write_bytes(b"secret")
    ops = []
    with CaptureMount(back, mnt, ops.append, bypass=False) as m:
        # the application holds the directory: its later calls name it by inode
        dfd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.stat("f", dir_fd=dfd)
            os.rename(back / "d", back / "d-real")
            os.symlink(outside, back / "d")
            refused = []
            for what, call in [
                    ("open f for writing", lambda: os.open("f", os.O_WRONLY, dir_fd=dfd)),
                    ("create g", lambda: os.open("g", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd)),
                    ("mkdir h", lambda: os.mkdir("h", dir_fd=dfd)),
                    ("symlink s", lambda: os.symlink("/etc/passwd", "s", dir_fd=dfd)),
                    ("truncate f", lambda: os.truncate(f"/proc/self/fd/{dfd}/f", 0)),
                    ("chmod f", lambda: os.chmod("f", 0o777, dir_fd=dfd)),
                    ("unlink f", lambda: os.unlink("f", dir_fd=dfd)),
                    ("setxattr f", lambda: os.setxattr(f"/proc/self/fd/{dfd}/f", "user.x", b"1")),
                    ("read f", lambda: open(os.open("f", os.O_RDONLY, dir_fd=dfd), "rb").read())]:
                with pytest.raises(OSError) as e:
                    call()
                refused.append((what, e.value.errno))
        finally:
            os.close(dfd)
        assert {errno for _, errno in refused} == {13}, refused      # EACCES every time
        st = m.status()
        assert st["refused"] >= len(refused), st
        assert "symlink" in st["last_refused"] and "'d'" in st["last_refused"], st
    # nothing happened outside, nothing was emitted for it
    assert sorted(os.listdir(outside)) == ["f"]
    assert (outside / "f").read_bytes() == b"secret"
    assert stat.S_IMODE(os.stat(outside / "f").st_mode) != 0o777
    assert os.listxattr(outside / "f") == []
    assert [o for o in ops if o.kind not in (OpKind.SETATTR, OpKind.MARK)] == [], ops
    assert "refused" in caplog.text and "passes through symlink" in caplog.text


# -- fallocate and renameat2's flags ------------------------------------------------------
def _libc():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                               ctypes.c_uint]
    return libc, ctypes


def _fallocate(fd, mode, offset, length):
    libc, ctypes = _libc()
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _renameat2(old, new, flags):
    libc, ctypes = _libc()
    if libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:   # AT_FDCWD
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10
NOREPLACE, EXCHANGE = 1, 2


def test_fallocate_through_the_mount_is_applied_recorded_in_order_and_replicated(dirs):
    back, dst, mnt, state = dirs
    ops = []
    with Replication(back, dst, state_dir=state, mount=mnt) as rep:
        sink = rep.mount.fs.emit
        rep.mount.fs.emit = lambda op: (ops.append(op), sink(op))
        fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.write(fd, os.urandom(3 * 1024 * 1024))
            _fallocate(fd, 0, 0, 5 * 1024 * 1024)                  # grows it
            _fallocate(fd, KEEP_SIZE, 0, 8 * 1024 * 1024)          # nothing a reader sees
            _fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 4096, 1_500_000)
            _fallocate(fd, ZERO_RANGE, 5 * 1024 * 1024 - 100, 1000)   # zeroes and grows
            os.pwrite(fd, b"after", 10)                             # then a write over the hole
        finally:
            os.close(fd)
        assert rep.wait(60), rep.status()
        wait_rsync_same(back, dst, why=lambda: json.dumps(rep.status()))
    data = (back / "f").read_bytes()
    assert len(data) == 5 * 1024 * 1024 + 900
    assert data[4096 + 10:4096 + 1_500_000] == bytes(1_500_000 - 10)
    assert rsync_differences(back, dst) == ""
    # in the order served: the growth, the hole as zeros, the zeroed end, the write
    seen = [(OpKind(o.kind).name, o.offset, o.size, len(o.data)) for o in ops
            if o.kind in (OpKind.WRITE, OpKind.TRUNCATE)]
    grow = seen.index(("TRUNCATE", 0, 5 * 1024 * 1024, 0))
    hole = [s for s in seen[grow + 1:] if s[0] == "WRITE" and 4096 <= s[1] < 4096 + 1_500_000]
    assert sum(s[3] for s in hole) == 1_500_000, seen
    assert seen[-3:] == [("WRITE", 5 * 1024 * 1024 - 100, 0, 100),
                         ("TRUNCATE", 0, 5 * 1024 * 1024 + 900, 0), ("WRITE", 10, 0, 5)], seen


def test_rename_exchange_and_noreplace_through_the_mount_are_replicated(dirs):
    back, dst, mnt, state = dirs
    ops = []
    with Replication(back, dst, state_dir=state, mount=mnt) as rep:
        sink = rep.mount.fs.emit
        rep.mount.fs.emit = lambda op: (ops.append(op), sink(op))
        (mnt / "a").write_bytes(b"AAAA")
        os.makedirs(mnt / "d" / "inner")
        (mnt / "d" / "inner" / "x").write_bytes(b"in d")
        _renameat2(mnt / "a", mnt / "d", EXCHANGE)            # a file and a directory swap
        assert (mnt / "a" / "inner" / "x").read_bytes() == b"in d"
        assert (mnt / "d").read_bytes() == b"AAAA"
        # the mount follows the swap: writes land under the new names
        (mnt / "a" / "inner" / "x").write_bytes(b"written after the swap")
        with pytest.raises(FileExistsError):
            _renameat2(mnt / "d", mnt / "a", NOREPLACE)
        _renameat2(mnt / "d", mnt / "e", NOREPLACE)
        assert rep.wait(60), rep.status()
        wait_rsync_same(back, dst, why=lambda: json.dumps(rep.status()))
    assert (dst / "a" / "inner" / "x").read_bytes() == b"written after the swap"
    assert (dst / "e").read_bytes() == b"AAAA" and not (dst / "d").exists()
    renames = [(bytes(o.path), bytes(o.path2), o.mask) for o in ops if o.kind == OpKind.RENAME]
    assert renames == [(b"a", b"d", 1), (b"d", b"e", 0)], renames
    assert rsync_differences(back, dst) == ""


# -- other parts of smirror beside a hung mount ------------------------------------------
HOLD = r"""
import sys, time
f = open(sys.argv[1], "rb")
print("holding", flush=True)
time.sleep(3600)
"""


def test_holders_of_a_file_do_not_hang_on_a_stopped_fuse_server(tmp_path):
    """The in-use gate names the processes that hold a target file by
    looking through every /proc/PID/fd: a process that holds a file on a
    FUSE mount whose server is stopped must not hang that look."""
    from smirror.stream.inuse import holders
    back, mnt = tmp_path / "back", tmp_path / "mnt"
    back.mkdir()
    mnt.mkdir()
    (back / "on-fuse").write_bytes(b"x")
    server = subprocess.Popen([sys.executable, "-c", SERVE, str(back), str(mnt)],
                              stdout=subprocess.PIPE, text=True, env=_env())
    holder = None
    try:
        assert server.stdout.readline() == "mounted\n"
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(mnt / "on-fuse")],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline() == "holding\n"
        target = tmp_path / "target-file"
        target.write_bytes(b"y")
        mine = subprocess.Popen(["sleep", "60"], stdin=open(target, "rb"))
        server.send_signal(signal.SIGSTOP)
        try:
            time.sleep(1.5)              # past the kernel's attribute cache (CACHE_TIMEOUT = 1 s)
            found: list = []
            t = threading.Thread(target=lambda: found.append(holders(target)), daemon=True)
            t.start()
            t.join(30)
            assert found, "holders() hung on the stopped FUSE server's file"
            assert any("sleep" in h for h in found[0]), found
        finally:
            server.send_signal(signal.SIGCONT)
            mine.kill()
            mine.wait()
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        server.kill()
        server.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def _applied_at_once(tmp_path):
    """(back, mnt, dst, applier, emit): ``emit`` applies each op to dst as
    it comes (on the mount's thread), numbered in order."""
    import itertools

    from smirror.stream.apply import Applier
    back, mnt, dst = tmp_path / "back", tmp_path / "mnt", tmp_path / "dst"
    back.mkdir()
    dst.mkdir()
    applier = Applier(dst)
    seqs = itertools.count(1)

    def emit(op):
        applier.apply(op._replace(seq=next(seqs)))
    return back, mnt, dst, applier, emit


def _resend_on_the_loop(m, rel: bytes, emit) -> None:
    """A target's resync of ``rel``: resend_to on the mount's thread, waited for."""
    done = threading.Event()
    assert m.call_soon(lambda: (m.fs.resend_to(rel, emit), done.set()))
    assert done.wait(30)


@pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "-")
def test_a_resend_never_sends_older_bytes_under_a_write_in_flights_mtime(tmp_path):
    """A target's resync (or a bypass repair) reads a file of the backing
    directory while a write to it, made there directly, has moved its
    mtime and not yet copied its bytes (tests/support/stalledwrite.py):
    the mtime sent is the one the bytes were read under, after that write
    (the resend waits for it), never a later lstat's over older bytes."""
    back, mnt, dst, applier, emit = _applied_at_once(tmp_path)
    size = 1 << 20
    with CaptureMount(back, mnt, emit, bypass=False) as m:
        (mnt / "f").write_bytes(b"o" * size)
        m.flush_times()
        with StalledWrite(back / "f", b"n" * size) as w:
            outcome = run_beside(lambda: _resend_on_the_loop(m, b"f", emit), w, waiter=m._thread)
        # the write done (nothing read since): what the resend sent
        applier.flush()
        assert not stale_under_source_mtime(back / "f", dst / "f"), outcome
    assert (dst / "f").read_bytes() == b"n" * size


def test_a_targets_resync_through_the_mount_keeps_hard_links(tmp_path):
    """A target asks the mount set for a resync of a subtree (its applier
    found a divergence there): the subtree is removed on the target and
    sent again. Names of one hard-linked file, both inside the subtree and
    one outside it, must stay one inode on the target, with the source's
    bytes (the target's copy of the inode may hold skipped writes)."""
    back, mnt, dst, applier, emit = _applied_at_once(tmp_path)
    with CaptureMount(back, mnt, emit) as m:
        os.makedirs(mnt / "sub")
        (mnt / "sub" / "x").write_bytes(b"linked " * 1000)
        os.link(mnt / "sub" / "x", mnt / "out")
        os.link(mnt / "sub" / "x", mnt / "sub" / "y")
        (mnt / "sub" / "plain").write_bytes(b"plain")
        os.chmod(mnt / "sub" / "x", 0o640)
        m.flush_times()
        applier.flush()
        assert os.stat(dst / "out").st_ino == os.stat(dst / "sub" / "y").st_ino
        with open(dst / "out", "r+b") as f:         # a write the target skipped
            f.write(b"STALE")
        _resend_on_the_loop(m, b"sub", emit)
        m.flush_times()
    applier.flush()
    ino = os.stat(dst / "out").st_ino
    assert os.stat(dst / "sub" / "x").st_ino == ino == os.stat(dst / "sub" / "y").st_ino
    assert rsync_differences(back, dst) == ""
