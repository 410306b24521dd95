"""Synchronous mode against SIGKILL of the source (issue 16): an application
commits transactions through ``smirror replicate --mount --sync MODE`` and
records "committed N" outside the mount once the call that makes N durable
returned; the replicate process is SIGKILLed at a random instant; then the
target side is reopened from its state (its durable queue applied) and every
transaction the application saw committed must be on the target.

``fsync``: a transaction is a file written, fsynced, its directory fsynced.
``every-write``: a transaction is one record written to a log (no fsync).

Used by tests/integration/test_sync_mode.py and tools/sync_kill.py (more trials).
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

APP = r"""
import os, sys
mnt, log, mode = sys.argv[1], sys.argv[2], sys.argv[3]
out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
def payload(n):
    return (b"%08d" % n) * (1 + n % 700)
try:
    if mode == "fsync":
        os.makedirs(os.path.join(mnt, "tx"), exist_ok=True)
        d = os.open(os.path.join(mnt, "tx"), os.O_RDONLY | os.O_DIRECTORY)
    else:
        rec = os.open(os.path.join(mnt, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    n = 0
    while True:
        n += 1
        if mode == "fsync":
            fd = os.open(os.path.join(mnt, "tx", "t%d" % n), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, payload(n))
            os.fsync(fd)
            os.close(fd)
            os.fsync(d)
        else:
            os.write(rec, b"%063d\n" % n)
        os.write(out, b"committed %d\n" % n)
except OSError:
    pass
"""


def payload(n: int) -> bytes:
    return (b"%08d" % n) * (1 + n % 700)


def _env():
    return dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))


def committed(log) -> list[int]:
    try:
        with open(log) as f:
            return [int(line.split()[1]) for line in f if line.startswith("committed ")]
    except FileNotFoundError:
        return []


def missing_after_kill(base, mode: str, seed: int) -> tuple[list[int], int]:
    """One trial in the fresh directory ``base``: (transactions the
    application saw committed that the target lacks, how many it committed)."""
    from smirror.capture.mount.mountpoint import mounted_at
    back, dst, mnt, state = base / "back", base / "dst", base / "mnt", base / "state"
    log = base / "committed"
    back.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "smirror", "replicate", str(back), str(dst),
                             "--mount", str(mnt), "--state-dir", str(state), "--sync", mode,
                             "--sync-timeout", "5", "--interval", "0.2", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    app = None
    try:
        line = proc.stdout.readline()
        if '"state"' not in line:
            raise AssertionError(f"replicate did not start: {line} {proc.stderr.read()[-3000:]}")
        app = subprocess.Popen([sys.executable, "-c", APP, str(mnt), str(log), mode])
        deadline = time.monotonic() + 30
        while not committed(log) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(random.Random(seed).uniform(0.05, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        app.wait(60)
    finally:
        proc.kill()
        if app is not None:
            app.kill()
        if mounted_at(str(mnt)):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
    done = committed(log)
    _apply_backlog(dst, state)
    if mode == "fsync":
        lacking = [n for n in done if not _holds(dst / "tx" / f"t{n}", payload(n))]
    else:
        try:
            records = (dst / "log").read_bytes().splitlines()
        except FileNotFoundError:
            records = []
        held = {int(r) for r in records if r.strip().isdigit()}
        lacking = [n for n in done if n not in held]
    return lacking, len(done)


def _holds(path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False


def _apply_backlog(dst, state) -> None:
    """What the killed target side held durably, applied: its queue's
    frames (the applier's state skips what it applied before the kill)."""
    from smirror.stream.receiver import TargetConnection
    tc = TargetConnection(1, dst, state)
    try:
        if not tc.wait_applied(tc.received_seq, 60):
            raise AssertionError(f"the target's backlog was not applied: {tc.status()}")
    finally:
        tc.close()


def main(argv=None) -> int:
    import tempfile
    from pathlib import Path
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("fsync", "every-write", "async"), default="fsync")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    bad = 0
    with tempfile.TemporaryDirectory(prefix="smirror-synckill-") as tmp:
        for i in range(args.trials):
            lacking, done = missing_after_kill(Path(tmp) / str(i), args.mode, args.seed + i)
            bad += bool(lacking)
            print(f"trial {i}: {done} committed, {len(lacking)} missing on the target"
                  + (f" (first {lacking[:5]})" if lacking else ""), flush=True)
    print(f"{args.trials - bad} of {args.trials} trials: every committed transaction on the target")
    return 1 if bad else 0
