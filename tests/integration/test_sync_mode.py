"""Synchronous modes through the capture mount (issue 16): an fsync (or, in
every-write, each write) returns only once the target made it durable;
SIGKILL of the source at random instants loses nothing the application
saw committed; a target that is down fails the call with EIO after the
sync timeout; watcher capture refuses a synchronous mode."""
import errno
import os
import shutil
import threading
import time

import pytest

pytest.importorskip("smirror.capture.mount._fuse", reason="the capture mount needs smirror "
                    "built with libfuse 3 (Debian: libfuse3-dev, pkg-config)")

from smirror.capture.mount.fs import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from smirror.capture.mount.mountpoint import mounted_at
from smirror.errors import ConfigError
from smirror.replication import Replication
from support.synckill import missing_after_kill

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or not shutil.which("fusermount3") or os.geteuid() != 0,
    reason="needs /dev/fuse, fusermount3 (Debian's fuse3) and root")


@pytest.fixture
def dirs(tmp_path):
    back, dst, mnt = tmp_path / "back", tmp_path / "dst", tmp_path / "mnt"
    back.mkdir()
    yield back, dst, mnt, tmp_path / "state"
    if mounted_at(str(mnt)):
        import subprocess
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)])


@pytest.mark.parametrize("mode", ["fsync", "every-write"])
def test_a_synchronous_call_returns_once_the_target_made_it_durable(dirs, mode):
    back, dst, mnt, state = dirs
    with Replication(back, dst, mount=mnt, sync=mode, state_dir=state, mirror="none") as rep:
        fd = os.open(mnt / "f", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for i in range(30):
                before = rep.journal_sink.last_seq
                os.pwrite(fd, bytes([i]) * 8192, i * 8192)
                if mode == "every-write":
                    # the write's op is durable on the target when pwrite returns
                    assert rep.target.durable_seq > before
                os.fsync(fd)
                assert rep.target.durable_seq > before
            if mode == "every-write":
                # fallocate is a changing call like the others (a punched
                # range goes out as WRITEs of zeros)
                before = rep.journal_sink.last_seq
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 8192)
                assert rep.target.durable_seq > before
        finally:
            os.close(fd)
        st = rep.status()
        assert st["sync"] == mode and st["sync_waits"]["waits"] >= 30
        assert st["sync_waits"]["failures"] == 0
        assert st["seq_durable"] <= st["seq_received"]


def test_an_async_fsync_does_not_wait_for_the_target(dirs):
    """The contrast that makes the test above mean something: without a
    synchronous mode, fsync returns before the target's durable pass."""
    back, dst, mnt, state = dirs
    with Replication(back, dst, mount=mnt, state_dir=state, mirror="none") as rep:
        rep.target.DURABLE_INTERVAL = 5.0
        fd = os.open(mnt / "f", os.O_WRONLY | os.O_CREAT, 0o644)
        late = 0
        try:
            for i in range(10):
                before = rep.journal_sink.last_seq
                os.pwrite(fd, b"x" * 8192, i * 8192)
                os.fsync(fd)
                late += rep.target.durable_seq <= before
        finally:
            os.close(fd)
        assert late > 0


def test_a_target_that_cannot_make_it_durable_fails_the_fsync_with_eio(dirs):
    back, dst, mnt, state = dirs
    with Replication(back, dst, mount=mnt, sync="fsync", sync_timeout=1.0, state_dir=state,
                     mirror="none") as rep:
        (mnt / "ok").write_bytes(b"fine")
        rep.sender.stop()               # the connection is down from now on
        fd = os.open(mnt / "f", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"not durable on the target")
            failed = []

            def fsync():
                try:
                    os.fsync(fd)
                except OSError as exc:
                    failed.append((exc.errno, time.monotonic() - t0))
            t0 = time.monotonic()
            waiting = threading.Thread(target=fsync)
            waiting.start()
            time.sleep(0.3)
            # other calls are served while it waits (the mount's loop is not held)
            assert (mnt / "ok").read_bytes() == b"fine" and waiting.is_alive()
            (mnt / "other").write_bytes(b"written meanwhile")
            waiting.join(20)
            assert failed and failed[0][0] == errno.EIO and 0.9 <= failed[0][1] < 10, failed
        finally:
            os.close(fd)
        st = rep.status()["sync_waits"]
        assert st["failures"] == 1 and "not durable on the target within 1s" in st["last_failure"]


def test_a_synchronous_mode_needs_the_mount(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(ConfigError, match="needs capture through the mount"):
        Replication(tmp_path / "src", tmp_path / "dst", sync="fsync")
    with pytest.raises(ConfigError, match="one of async, fsync, every-write"):
        Replication(tmp_path / "src", tmp_path / "dst", capture="api", sync="always")


@pytest.mark.parametrize("seed", range(10))
def test_sigkill_of_replicate_loses_no_committed_transaction_fsync(tmp_path, seed):
    lacking, done = missing_after_kill(tmp_path, "fsync", seed)
    assert done > 0 and lacking == [], f"{len(lacking)} of {done} committed missing: {lacking[:10]}"


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_of_replicate_loses_no_committed_write_every_write(tmp_path, seed):
    lacking, done = missing_after_kill(tmp_path, "every-write", 100 + seed)
    assert done > 0 and lacking == [], f"{len(lacking)} of {done} committed missing: {lacking[:10]}"


def test_sigkill_without_a_synchronous_mode_can_lose_committed_transactions(tmp_path):
    """The contrast: async loses what the application was told is durable
    (at least once in a few trials: the source queue dies with it)."""
    losses = 0
    for seed in range(4):
        lacking, _ = missing_after_kill(tmp_path / str(seed), "async", 200 + seed)
        losses += bool(lacking)
        if losses:
            break
    assert losses


# -- between two daemons -------------------------------------------------------------
def test_connect_sync_fsync_between_daemons_survives_sigkill_of_the_source(tmp_path):
    """connect --sync fsync on a mount repset: what an application fsynced
    is on the target even when the source daemon is SIGKILLed right after;
    a watcher repset refuses a synchronous mode by name."""
    import json

    from support.daemons import wait_for
    from support.pair import login, running_pair
    back, mnt, dst = tmp_path / "back", tmp_path / "mnt", tmp_path / "replica"
    back.mkdir()
    (tmp_path / "plain").mkdir()
    try:
        with running_pair(tmp_path) as (source, target, env):
            login(source, env)
            source.cli("repset", "create", "db", "--root", back, "--mount", mnt)
            source.cli("connect", "db", "to", target.address, "map", "base", dst, "--sync", "fsync")
            row = json.loads(source.cli("status", "--json").stdout)["sources"][0]
            assert row["sync"] == "fsync" and row["options"]["sync"] == "fsync"
            wait_for(lambda: json.loads(source.cli("status", "--json").stdout)["sources"][0]
                     ["durable_reported"], 30, "the link up, reporting durable")
            for n in range(1, 11):
                fd = os.open(mnt / f"t{n}", os.O_WRONLY | os.O_CREAT, 0o644)
                os.write(fd, b"%08d" % n * 500)
                os.fsync(fd)
                os.close(fd)
            source.kill()                       # SIGKILL right after the last fsync returned
            wait_for(lambda: all((dst / f"t{n}").exists() and
                                 (dst / f"t{n}").read_bytes() == b"%08d" % n * 500
                                 for n in range(1, 11)), 30, "every fsynced file on the target")
            source.start()
            login(source, env)
            source.cli("repset", "create", "plain", "--root", tmp_path / "plain")
            p = source.cli("connect", "plain", "to", target.address, "map", "base",
                           tmp_path / "plain-replica", "--sync", "fsync", check=False)
            assert p.returncode != 0 and "needs capture through the mount" in p.stderr, p.stderr
    finally:
        if mounted_at(str(mnt)):
            import subprocess
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
