"""SQLite in WAL mode on a daemon's capture mount (issue 16): a writer
commits rows through the mount; the target is frozen at random instants
(``pause-target``, or SIGKILL of the target daemon) and its copy of the
database is taken; every copy must open, pass ``PRAGMA integrity_check``
and hold rows 1..n of the committed history, none missing in between,
each with its own content.

The -shm file (SQLite's shared-memory index, written through mmap) is not
copied: SQLite rebuilds it from the WAL when the copy is opened, as after
a crash. Used by tests/integration/test_mount_sqlite.py and
tools/sqlite_copies.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from support.daemons import wait_for
from support.pair import login, running_pair

DB = "app.sqlite"

WRITER = r"""
import hashlib, os, sqlite3, sys
path, stop = sys.argv[1], sys.argv[2]
def row(i):
    return hashlib.sha256(b"%d" % i).digest() * (1 + i % 20)
db = sqlite3.connect(path, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=NORMAL")
db.execute("PRAGMA wal_autocheckpoint=64")      # checkpoints (database writes) often
db.execute("CREATE TABLE IF NOT EXISTS t (i INTEGER PRIMARY KEY, v BLOB NOT NULL)")
i = db.execute("SELECT coalesce(max(i), 0) FROM t").fetchone()[0]
print(i, flush=True)
while not os.path.exists(stop):
    i += 1
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO t VALUES (?, ?)", (i, row(i)))
    if i % 5 == 0:                                # an update of an older row, same content
        db.execute("UPDATE t SET v = ? WHERE i = ?", (row(i - 4), i - 4))
    db.execute("COMMIT")
    print(i, flush=True)                          # committed
db.close()
"""


def row(i: int) -> bytes:
    return hashlib.sha256(b"%d" % i).digest() * (1 + i % 20)


def check_copy(copy_dir) -> int:
    """Open the copied database; integrity_check must say ok and the rows
    be 1..n with their contents. Returns n (0: not created yet)."""
    db = sqlite3.connect(os.path.join(copy_dir, DB))
    try:
        check = db.execute("PRAGMA integrity_check").fetchall()
        assert check == [("ok",)], f"{copy_dir}: integrity_check says {check}"
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 't'").fetchall():
            return 0
        rows = db.execute("SELECT i, v FROM t ORDER BY i").fetchall()
    except sqlite3.DatabaseError as exc:
        raise AssertionError(f"{copy_dir}: the copy does not open as a database: {exc}") from None
    finally:
        db.close()
    n = len(rows)
    ids = [r[0] for r in rows]
    assert ids == list(range(1, n + 1)), f"{copy_dir}: rows are not 1..{n}: a gap after " \
        f"{next(k for k, i in enumerate(ids, 1) if k != i) - 1}"
    bad = [i for i, v in rows if v != row(i)]
    assert not bad, f"{copy_dir}: rows {bad[:5]} hold other content"
    return n


def copy_target(dst, into) -> None:
    os.makedirs(into)
    for name in (DB, DB + "-wal"):
        src = os.path.join(dst, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(into, name))


def _target_paused(target) -> bool:
    st = json.loads(target.cli("status", "--json").stdout)
    return all(t.get("apply_state") == "paused" for t in st["targets"])


def run(tmp_path, trials: int = 50, kill_every: int = 5, seed: int = 0, say=lambda s: None,
        capture: str = "mount") -> dict:
    """``trials`` freezes at random instants (every ``kill_every``-th a
    SIGKILL of the target daemon, the others pause-target), each copy
    checked; then the writer stops and the target must converge to the
    source's database. Returns the counters. ``capture="watch"``: the
    same with a watcher on the database's directory (the contrast: its
    copies are not expected to pass)."""
    rng = random.Random(seed)
    back, mnt, dst = tmp_path / "back", tmp_path / "mnt", tmp_path / "replica"
    back.mkdir()
    out = {"copies": 0, "kills": 0, "pauses": 0, "rows": [], "committed": 0}
    with running_pair(tmp_path) as (source, target, env):
        login(source, env)
        login(target, env)
        if capture == "mount":
            source.cli("repset", "create", "app", "--root", back, "--mount", mnt)
        else:
            source.cli("repset", "create", "app", "--root", back)
            mnt = back                                 # the writer works in the set itself
        source.cli("connect", "app", "to", target.address, "map", "base", dst)
        wait_for(lambda: os.path.isdir(dst), what="the map base")
        stop = tmp_path / "stop-writer"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt / DB), str(stop)],
                                  stdout=subprocess.PIPE, text=True)
        committed = [0]

        def follow():
            for line in writer.stdout:
                committed[0] = int(line)
        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        try:
            wait_for(lambda: committed[0] > 20, timeout=120, what="the writer's first commits")
            for trial in range(trials):
                time.sleep(rng.uniform(0.05, 0.6))
                kill = kill_every and trial % kill_every == kill_every - 1
                if kill:
                    target.kill()                          # SIGKILL: frozen where it was
                    out["kills"] += 1
                else:
                    target.cli("pause-target", target.address)
                    wait_for(lambda: _target_paused(target), what="the target paused")
                    out["pauses"] += 1
                copy = tmp_path / f"copy{trial}"
                copy_target(dst, copy)
                seen = committed[0]                        # committed once the copy was taken
                if kill:
                    target.start()
                    login(target, env)
                else:
                    target.cli("resume-target", target.address)
                n = check_copy(copy)
                assert n <= seen + 1, f"copy {trial} has {n} rows, only {seen} were committed"
                out["rows"].append(n)
                out["copies"] += 1
                say(f"copy {trial} ({'kill' if kill else 'pause'}): {n} rows of {seen} committed")
                shutil.rmtree(copy)
        finally:
            stop.write_text("")
            writer.wait(120)
            reader.join(10)
        out["committed"] = committed[0]
        assert writer.returncode == 0, "the writer failed"
        # quiet: the replica converges to the source's database
        src_rows = check_copy(back)

        def converged():
            copy = tmp_path / f"final-{time.monotonic_ns()}"
            copy_target(dst, copy)
            try:
                return check_copy(copy) == src_rows
            except (AssertionError, sqlite3.DatabaseError):
                return False
            finally:
                shutil.rmtree(copy, ignore_errors=True)
        wait_for(converged, timeout=120, every=0.5, what="the replica's rows equal the source's")
        out["final_rows"] = src_rows
        source.kill(signal.SIGTERM)
    return out


def main(argv=None) -> int:
    import argparse
    import pathlib
    import tempfile
    p = argparse.ArgumentParser(description="SQLite (WAL) on a capture mount through two daemons: "
                                            "the target frozen and copied at random instants")
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--kill-every", type=int, default=5, help="every Nth freeze is a SIGKILL of "
                   "the target daemon (0: never), the others pause-target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--capture", choices=("mount", "watch"), default="mount",
                   help="watch: the contrast, a watcher instead of the mount")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="smirror-sqlite-") as tmp:
        try:
            r = run(pathlib.Path(tmp), args.trials, args.kill_every, args.seed, say=print,
                    capture=args.capture)
        except AssertionError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
    print(json.dumps({k: v for k, v in r.items() if k != "rows"}
                     | {"rows_min": min(r["rows"]), "rows_max": max(r["rows"])}))
    return 0
