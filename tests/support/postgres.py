"""A throw-away PostgreSQL (Debian's ``postgresql`` package) for the
tests, tools and benchmarks: initdb, start and stop it on a data directory
anywhere (on a capture mount, on a copy of a replica), run psql, pgbench
and pg_amcheck against it. The server runs as the ``postgres`` user (it
refuses root), so every directory on the way to its data directory must
be traversable by that user; :func:`open_dir` makes one that is.

Each instance listens on a Unix socket only, in a directory of its own
(no TCP port, so several tests and helpers never collide).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile

USER = "postgres"


def bindir() -> str | None:
    """The newest installed server's bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


def unavailable() -> str:
    """Why PostgreSQL cannot run here ("" when it can): for pytest.skip."""
    if bindir() is None:
        return "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"PostgreSQL needs its user {USER!r} (Debian's postgresql package makes it)"
    if os.geteuid() != 0:
        return "the PostgreSQL tests run the server as 'postgres': they need root"
    return ""


def owner() -> tuple[int, int]:
    pw = pwd.getpwnam(USER)
    return pw.pw_uid, pw.pw_gid


def open_dir(prefix: str) -> str:
    """A new temporary directory under /tmp that the postgres user can
    traverse (pytest's tmp_path lives under a root-only directory)."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o755)
    return d


def chown_tree(path) -> None:
    """``path`` and everything under it owned by postgres."""
    uid, gid = owner()
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def run(args, *, check=True, timeout=300, **kw) -> subprocess.CompletedProcess:
    """A PostgreSQL program (from :func:`bindir`) as the postgres user."""
    exe = os.path.join(bindir() or "", args[0])
    uid, gid = owner()
    proc = subprocess.run([exe, *map(str, args[1:])], user=uid, group=gid, extra_groups=[],
                          capture_output=True, text=True, timeout=timeout, cwd="/",
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C",
                               "HOME": "/tmp"}, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} {' '.join(map(str, args[1:]))}: exit {proc.returncode}\n"
                             f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


# small, so that a copy is quick to take and the server writes its data
# files often: 1 MiB WAL segments, a checkpoint every 4 MiB of WAL
CONF = """
listen_addresses = ''
unix_socket_directories = '{sock}'
port = {port}
max_connections = 20
shared_buffers = 16MB
max_wal_size = 4MB
min_wal_size = 2MB
checkpoint_timeout = 30s
logging_collector = off
log_min_messages = warning
"""


class Postgres:
    """One server on ``datadir``; its socket in ``sockdir`` (both must be
    reachable by the postgres user)."""

    def __init__(self, datadir, sockdir, port: int = 5432):
        self.datadir = str(datadir)
        self.sockdir = str(sockdir)
        self.port = port
        self.log = os.path.join(self.sockdir, f"postgres-{port}.log")

    def initdb(self) -> Postgres:
        """A new cluster (1 MiB WAL segments; no fsync of initdb's own files)."""
        run(["initdb", "-D", self.datadir, "-U", USER, "--auth=trust", "--no-sync",
             "--wal-segsize=1", "--no-instructions"])
        self.configure()
        return self

    def configure(self) -> None:
        """This instance's socket and port in postgresql.auto.conf (a copy
        of a data directory gets its own)."""
        with open(os.path.join(self.datadir, "postgresql.auto.conf"), "w") as f:
            f.write(CONF.format(sock=self.sockdir, port=self.port))

    def start(self, timeout: int = 120) -> Postgres:
        """Start and wait until it accepts connections (after recovery)."""
        run(["pg_ctl", "-D", self.datadir, "-l", self.log, "-w", "-t", timeout, "start"],
            timeout=timeout + 30)
        return self

    def stop(self, mode: str = "fast") -> None:
        if os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
            run(["pg_ctl", "-D", self.datadir, "-m", mode, "-w", "-t", 120, "stop"], check=False,
                timeout=150)

    def server_log(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def conn(self) -> list[str]:
        return ["-h", self.sockdir, "-p", str(self.port), "-U", USER]

    def sql(self, query: str, db: str = "postgres") -> str:
        """psql -At: rows as lines, columns joined by '|'."""
        return run(["psql", *self.conn(), "-d", db, "-v", "ON_ERROR_STOP=1", "-At", "-c", query]
                   ).stdout

    def pgbench(self, *args, db: str = "postgres", **kw) -> subprocess.CompletedProcess:
        return run(["pgbench", *self.conn(), *args, db], **kw)

    def amcheck(self, db: str = "postgres") -> None:
        """pg_amcheck of every table and index (heap, B-tree, TOAST) of
        ``db``; AssertionError with its findings otherwise."""
        run(["pg_amcheck", *self.conn(), "--install-missing", "--heapallindexed", "-d", db])


def copy_datadir(src, into) -> None:
    """A data directory as a backup tool copies it: everything but
    postmaster.pid (it names the running source server, which a copy's
    server would take for another postmaster on its directory)."""
    shutil.copytree(src, into, symlinks=True,
                    ignore=lambda d, names: [n for n in names if n in ("postmaster.pid",)]
                    if os.path.samefile(d, src) else [])
    chown_tree(into)
    os.chmod(into, 0o700)
