"""PostgreSQL on a daemon's capture mount (issue 16): pgbench commits
transactions through the mount; the target daemon is frozen at random
instants (``pause-target``, or SIGKILL) and its copy of the data directory
is taken; on every copy a PostgreSQL must start and recover, pg_amcheck
must find nothing, and the rows must be a prefix of the committed history.

The history: pgbench runs a TPC-B-like script that also takes the next
number of a one-row counter and appends it to ``hist`` in the same
transaction. The counter's row lock is held until commit, so the numbers
are handed out in commit order: the committed history is hist rows 1, 2,
3, ... and a crash-consistent copy holds exactly rows 1..n, n no more than
the source had committed when the copy was taken, each row as the source
has it, the counter at n, and the balances of accounts, tellers and
branches each summing to the deltas of those n rows (no transaction half
there).

Two daemons as processes (not ``Replication(..., mount=)`` in one
process): the target must be frozen and killed on its own while the source
keeps serving the database. PostgreSQL runs as ``postgres``: the daemons
run as root, so the mount is ``allow_other`` and gives new entries to
their caller; the backing directory is owned by postgres. Used by
tests/integration/test_mount_postgres.py and tools/pg_copies.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

from support import postgres
from support.daemons import wait_for
from support.pair import login, running_pair
from support.treestate import diff, snapshot

DB = "postgres"
PGDATA = "pgdata"

SCHEMA = """
CREATE TABLE ctr (n bigint NOT NULL);
INSERT INTO ctr VALUES (0);
CREATE TABLE hist (id bigint PRIMARY KEY, aid int NOT NULL, delta int NOT NULL);
"""

# pgbench's TPC-B-like transaction plus the history row; the counter last,
# so its lock (which orders the ids as the commits) is held only briefly
SCRIPT = r"""
\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
WITH c AS (UPDATE ctr SET n = n + 1 RETURNING n) INSERT INTO hist SELECT n, :aid, :delta FROM c;
END;
"""

CHECK = """
SELECT (SELECT n FROM ctr),
       (SELECT count(*) FROM hist), (SELECT coalesce(max(id), 0) FROM hist),
       (SELECT coalesce(sum(delta), 0) FROM hist),
       (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers),
       (SELECT sum(bbalance) FROM pgbench_branches)
"""


def history_digest(rows) -> str:
    return hashlib.sha256("".join(f"{r}\n" for r in rows).encode()).hexdigest()


def check_copy(pg: postgres.Postgres) -> tuple[int, str]:
    """The started copy: pg_amcheck clean, the history rows 1..n, counter
    and balances consistent with them. Returns (n, digest of the rows)."""
    pg.amcheck(DB)
    ctr, count, top, deltas, accounts, tellers, branches = map(int, pg.sql(CHECK, DB).split("|"))
    where = pg.datadir
    assert count == top, f"{where}: history has {count} rows but its last id is {top}: a gap"
    assert ctr == top, f"{where}: the counter is at {ctr}, the history ends at {top}"
    assert accounts == tellers == branches == deltas, \
        f"{where}: balances (accounts {accounts}, tellers {tellers}, branches {branches}) do not " \
        f"sum to the history's deltas ({deltas}): a transaction is there only in part"
    rows = pg.sql("SELECT id, aid, delta FROM hist ORDER BY id", DB).split()
    return top, history_digest(rows)


def prepare(back, sockdir) -> postgres.Postgres:
    """A cluster in BACKING/pgdata made directly (before the mount exists:
    the set's first mirror carries it), pgbench's tables and ours in it."""
    os.chown(back, *postgres.owner())
    pg = postgres.Postgres(os.path.join(back, PGDATA), sockdir, port=5432).initdb().start()
    try:
        pg.pgbench("-i", "-q", "-s", "1", db=DB)
        pg.sql(SCHEMA, DB)
    finally:
        pg.stop()
    return pg


def _target_paused(target) -> bool:
    st = json.loads(target.cli("status", "--json").stdout)
    return all(t.get("apply_state") == "paused" for t in st["targets"])


def _freeze(target, env, kill: bool) -> None:
    if kill:
        target.kill()                          # SIGKILL: frozen where it was
    else:
        target.cli("pause-target", target.address)
        wait_for(lambda: _target_paused(target), what="the target paused")


def _thaw(target, env, kill: bool) -> None:
    if kill:
        target.start()
        login(target, env)
    else:
        target.cli("resume-target", target.address)


def run(work, trials: int = 50, kill_every: int = 5, seed: int = 0, say=lambda s: None,
        capture: str = "mount", clients: int = 4) -> dict:
    """``trials`` freezes at random instants (every ``kill_every``-th a
    SIGKILL of the target daemon, the others pause-target), each copy
    started and checked; then pgbench and the server stop and the replica
    must equal the backing directory. ``work`` must be traversable by the
    postgres user (:func:`support.postgres.open_dir`). Returns counters;
    ``failures`` lists the copies that failed (``capture="watch"``, a
    watcher on the set instead of the mount, is the contrast: its copies
    are not expected to pass)."""
    import pathlib
    work = pathlib.Path(work)
    rng = random.Random(seed)
    back, mnt, dst, sock = work / "back", work / "mnt", work / "replica", work / "sock"
    back.mkdir()
    sock.mkdir()
    os.chown(sock, *postgres.owner())
    prepare(back, sock)
    out: dict = {"copies": 0, "kills": 0, "pauses": 0, "rows": [], "failures": [], "committed": 0}
    digests: list[tuple[int, str, int]] = []
    with running_pair(work) as (source, target, env):
        login(source, env)
        login(target, env)
        if capture == "mount":
            source.cli("repset", "create", "app", "--root", back, "--mount", mnt)
            served = mnt
        else:
            source.cli("repset", "create", "app", "--root", back)
            served = back                      # the server works in the set itself
        source.cli("connect", "app", "to", target.address, "map", "base", dst)
        wait_for(lambda: os.path.isdir(dst / PGDATA / "global"), timeout=120,
                 what="the replica's first mirror")
        pg = postgres.Postgres(served / PGDATA, sock, port=5432)
        pg.start()
        script = sock / "txn.sql"
        script.write_text(SCRIPT)
        bench = subprocess.Popen(
            [os.path.join(postgres.bindir() or "", "pgbench"), *pg.conn(), "-n", "-c", str(clients),
             "-j", "2", "-T", "3600", "-f", str(script), DB],
            user=postgres.owner()[0], group=postgres.owner()[1], extra_groups=[], cwd="/",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        copies = postgres.Postgres(work / "copy", sock, port=5433)
        try:
            wait_for(lambda: int(pg.sql("SELECT n FROM ctr", DB)) > 20, timeout=120,
                     what="pgbench's first commits")
            for trial in range(trials):
                time.sleep(rng.uniform(0.05, 1.0))
                kill = bool(kill_every) and trial % kill_every == kill_every - 1
                _freeze(target, env, kill)
                out["kills" if kill else "pauses"] += 1
                shutil.rmtree(copies.datadir, ignore_errors=True)
                postgres.copy_datadir(dst / PGDATA, copies.datadir)
                seen = int(pg.sql("SELECT n FROM ctr", DB))    # committed by now, at most
                _thaw(target, env, kill)
                try:
                    copies.configure()
                    copies.start()
                    n, digest = check_copy(copies)
                    assert n <= seen, f"copy {trial} has {n} history rows, only {seen} were committed"
                except AssertionError as exc:
                    out["failures"].append(f"copy {trial} ({'kill' if kill else 'pause'}): {exc}\n"
                                           f"{copies.server_log()[-1500:]}")
                    say(f"copy {trial} ({'kill' if kill else 'pause'}): FAILED: {str(exc)[:300]}")
                    continue
                finally:
                    copies.stop(mode="immediate")
                out["rows"].append(n)
                digests.append((trial, digest, n))
                out["copies"] += 1
                say(f"copy {trial} ({'kill' if kill else 'pause'}): {n} history rows of {seen} committed")
        finally:
            bench.send_signal(signal.SIGINT)
            try:
                bench.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                bench.kill()
                bench.communicate()
            final_rows = pg.sql("SELECT id, aid, delta FROM hist ORDER BY id", DB).split()
            pg.stop()
            shutil.rmtree(copies.datadir, ignore_errors=True)
        out["committed"] = len(final_rows)
        # each copy's rows are the source's first n rows, as the source has them
        for trial, digest, n in digests:
            if digest != history_digest(final_rows[:n]):
                out["failures"].append(f"copy {trial}: its {n} history rows differ from the "
                                       f"source's first {n}")
        # quiet: the replica converges to the backing directory, owners too
        def differences():
            return diff(snapshot(back / PGDATA, owner=True), snapshot(dst / PGDATA, owner=True))
        try:
            wait_for(lambda: not differences(), timeout=180, every=0.5,
                     what="the replica equal to the backing directory")
            out["converged"] = True
        except AssertionError:
            out["converged"] = False
            out["failures"].append("the replica never equalled the backing directory: "
                                   + "; ".join(differences()))
        if capture == "mount":      # how the mount took its requests (SMIRROR_MOUNT_URING)
            st = json.loads(source.cli("status", "--json").stdout)
            out["transport"] = st["mounts"]["app"].get("transport")
        source.kill(signal.SIGTERM)
    return out


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="PostgreSQL under pgbench on a capture mount through two "
                                            "daemons: the target frozen and copied at random instants")
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--kill-every", type=int, default=5, help="every Nth freeze is a SIGKILL of "
                   "the target daemon (0: never), the others pause-target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clients", type=int, default=4, help="pgbench clients")
    p.add_argument("--capture", choices=("mount", "watch"), default="mount",
                   help="watch: the contrast, a watcher instead of the mount")
    args = p.parse_args(argv)
    why = postgres.unavailable()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    work = postgres.open_dir("smirror-pg-")
    try:
        try:
            r = run(work, args.trials, args.kill_every, args.seed, say=print, capture=args.capture,
                    clients=args.clients)
        except AssertionError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
    finally:
        subprocess.run(["fusermount3", "-u", "-z", os.path.join(work, "mnt")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    for f in r["failures"]:
        print(f"FAILED: {f}", file=sys.stderr)
    print(json.dumps({k: v for k, v in r.items() if k not in ("rows", "failures")}
                     | {"failed": len(r["failures"]), "rows_min": min(r["rows"], default=0),
                        "rows_max": max(r["rows"], default=0)}))
    return 1 if r["failures"] else 0
