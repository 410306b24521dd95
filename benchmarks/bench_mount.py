"""The capture mount against its baselines, in the same run: each workload
runs in a separate process (as an application would) on

* ``direct``: the backing directory itself (the baseline);
* ``c-passthrough``: libfuse's own ``passthrough_ll`` example in C, single
  threaded (built here from Debian's libfuse3-dev examples when gcc is
  there): what FUSE costs before any Python, the ceiling of a Cython
  binding against the low-level API;
* ``mount``: smirror's capture mount with its ops thrown away (FUSE, the
  smirror's compiled loop of libfuse's low-level API and our handlers);
* ``replicate``: ``Replication(BACKING, DST, mount=MNT)``: the whole path,
  capture -> journal -> queue -> stream -> target applied; its application
  time, and the time until the target applied everything;
* ``daemons``: the deployment: a source daemon whose replication set is
  captured through the mount, a target daemon, each its own process on
  this machine (the target's work shares its CPUs); the application's
  time, the time until the last op was acknowledged, each daemon's CPU.
* ``mount-base``, ``daemons-base`` (with $SMIRROR_BENCH_BASE, another
  tree's src/ with its extensions built in place): ``mount`` and
  ``daemons`` run from that tree, before and after a change in one run.

Workloads (issue 16's goals, as ratios of direct throughput):

* ``seq``: 256 MiB in 1 MiB writes to a new file (goal >= 0.5);
* ``rand``: 8 KiB writes at random 8 KiB offsets of a 64 MiB file, fsync
  every 16 (goal >= 0.5);
* ``meta``: create (100 bytes each) then delete FILES small files (goal >=
  0.3; FILES = 100,000 by default, $SMIRROR_BENCH_FILES);
* ``commit``: COMMITS times an 8 KiB write then fdatasync, one after the
  other, into a 16 MiB file written before (a database's commit to its
  WAL: the path pgbench's transactions wait on, one at a time), no goal;
* ``rtt``: FILES getxattr calls on an open file, each answered "no such
  attribute" (the kernel caches no xattrs: every call is one FUSE round
  trip): the cost of a round trip through each server, no goal;
* ``pgbench``: PostgreSQL (Debian's ``postgresql``) with its data directory
  in the variant's directory, pgbench's TPC-B-like transactions from
  PG_CLIENTS clients, PG_TXNS each ($SMIRROR_BENCH_PG_TXNS), scale
  PG_SCALE, synchronous commit (an fdatasync of the WAL per commit) (goal:
  TPS >= 0.7 of the same on the backing disk).

    python benchmarks/bench_mount.py [seq rand meta commit rtt pgbench]     # a table
    python -m pytest benchmarks/bench_mount.py -q -s      # the same, as a test

Needs root, /dev/fuse, fusermount3 and smirror built with libfuse3-dev (and PostgreSQL for
``pgbench``). The machine may be shared: the variants run round-robin,
ROUNDS times ($SMIRROR_BENCH_ROUNDS, default 2), and each ratio is the
median of the per-round ratios; $SMIRROR_BENCH_VARIANTS (e.g.
``mount,c-passthrough``) runs only those beside direct.

The C passthrough can be another build ($SMIRROR_BENCH_C: a passthrough_ll
of a newer libfuse, with LD_LIBRARY_PATH to its library) with more options
($SMIRROR_BENCH_C_OPTS): ``-o cache=never`` serves every file without the
page cache, as the mount serves write-only handles; ``-o io_uring`` (libfuse
3.18 or later, the fuse module's ``enable_uring`` parameter set) moves the
requests over io_uring. docs/mount.md has what these measured.
"""
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))      # support.postgres

FILES = int(os.environ.get("SMIRROR_BENCH_FILES", "100000"))
ROUNDS = int(os.environ.get("SMIRROR_BENCH_ROUNDS", "2"))
# the CPU time our handlers take (two reads of the thread's clock a request,
# which the figures then include): SMIRROR_BENCH_PROFILE=1
PROFILE = os.environ.get("SMIRROR_BENCH_PROFILE") == "1"
SEQ_MIB, RAND_FILE_MIB, RAND_WRITES = 256, 64, 4096
WAL_MIB, COMMITS = 16, 4000
PG_CLIENTS, PG_SCALE = 4, 2
PG_TXNS = int(os.environ.get("SMIRROR_BENCH_PG_TXNS", "500"))
# more options for the C passthrough, e.g. "-o cache=never" (no page cache,
# as the mount's write-only handles) or, with a libfuse of 3.18 or later,
# "-o io_uring" (FUSE over io_uring)
C_OPTS = os.environ.get("SMIRROR_BENCH_C_OPTS", "").split()
GOALS = {"seq": 0.5, "rand": 0.5, "meta": 0.3, "pgbench": 0.7}

# the application: one workload in its own process; prints its seconds
APP = rf"""
import os, random, sys, time
d, kind, files = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "seq":
    buf = os.urandom(1 << 20)
    t = time.perf_counter()
    fd = os.open(os.path.join(d, "seq"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range({SEQ_MIB}):
        os.write(fd, buf)
    os.close(fd)
elif kind == "rand":
    fd = os.open(os.path.join(d, "rand"), os.O_RDWR)
    rng = random.Random(1)
    buf = os.urandom(8192)
    blocks = ({RAND_FILE_MIB} << 20) // 8192
    t = time.perf_counter()
    for i in range(1, {RAND_WRITES} + 1):
        os.pwrite(fd, buf, rng.randrange(blocks) * 8192)
        if i % 16 == 0:
            os.fsync(fd)
    os.close(fd)
elif kind == "commit":
    fd = os.open(os.path.join(d, "wal"), os.O_RDWR)
    buf = os.urandom(8192)
    blocks = ({WAL_MIB} << 20) // 8192
    t = time.perf_counter()
    for i in range({COMMITS}):
        os.pwrite(fd, buf, (i % blocks) * 8192)
        os.fdatasync(fd)
    os.close(fd)
elif kind == "rtt":
    fd = os.open(os.path.join(d, "rtt"), os.O_RDONLY)
    t = time.perf_counter()
    for _ in range(files):
        try:
            os.getxattr(fd, "user.none")
        except OSError:
            pass
    os.close(fd)
else:
    sub = os.path.join(d, "small")
    os.mkdir(sub)
    data = b"x" * 100
    t = time.perf_counter()
    for i in range(files):
        fd = os.open(os.path.join(sub, "f%d" % i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    for i in range(files):
        os.unlink(os.path.join(sub, "f%d" % i))
print(time.perf_counter() - t)
"""


def units(kind: str, seconds: float) -> str:
    if kind == "seq":
        return f"{SEQ_MIB / seconds:8.0f} MiB/s"
    if kind == "rand":
        return f"{RAND_WRITES / seconds:8.0f} writes/s"
    if kind == "pgbench":
        return f"{PG_CLIENTS * PG_TXNS / seconds:8.0f} TPS    "
    if kind == "rtt":
        return f"{FILES / seconds:8.0f} trips/s"
    if kind == "commit":
        return f"{COMMITS / seconds:8.0f} commits/s"
    return f"{FILES / seconds:8.0f} files/s"


def prepare(back: str, kind: str) -> None:
    for name in os.listdir(back):
        p = os.path.join(back, name)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
    if kind == "rtt":
        open(os.path.join(back, "rtt"), "wb").close()
    if kind == "commit":        # a WAL segment written before (no block to allocate)
        with open(os.path.join(back, "wal"), "wb") as f:
            f.write(os.urandom(WAL_MIB << 20))
            os.fsync(f.fileno())
    if kind == "rand":
        with open(os.path.join(back, "rand"), "wb") as f:
            f.write(os.urandom(RAND_FILE_MIB << 20))
            os.fsync(f.fileno())
    if kind == "pgbench":       # the same cluster for every variant
        from support import postgres
        pgdata = os.path.join(back, "pgdata")
        shutil.copytree(pg_template(os.path.dirname(back)), pgdata, symlinks=True)
        postgres.chown_tree(pgdata)
        os.chmod(pgdata, 0o700)


def pg_template(work: str) -> str:
    """A cluster with pgbench's tables (made once per run, on the backing
    disk; each variant starts from a copy of it)."""
    from support import postgres
    tmpl = os.path.join(work, "pg-template")
    if not os.path.exists(tmpl):
        os.mkdir(tmpl, 0o700)
        os.chown(tmpl, *postgres.owner())
        pg = postgres.Postgres(tmpl, pg_sockdir(work)).initdb()
        with open(os.path.join(tmpl, "postgresql.auto.conf"), "a") as f:
            # PostgreSQL's defaults again where support.postgres makes them
            # small: the data fits in its buffers, checkpoints come by time
            f.write("shared_buffers = 128MB\nmax_wal_size = 1GB\nmin_wal_size = 80MB\n")
        pg.start()
        try:
            pg.pgbench("-i", "-q", "-s", str(PG_SCALE))
        finally:
            pg.stop()
    return tmpl


def pg_sockdir(work: str) -> str:
    from support import postgres
    sock = os.path.join(work, "sock")
    if not os.path.exists(sock):
        os.mkdir(sock)
        os.chown(sock, *postgres.owner())
    return sock


def pgbench_app(d: str) -> float:
    """The server on D/pgdata, pgbench against it; seconds for its
    transactions at the TPS pgbench measured (connections excluded)."""
    from support import postgres
    work = os.path.dirname(os.path.abspath(d))      # d: WORK/back or WORK/mnt
    pg = postgres.Postgres(os.path.join(d, "pgdata"), pg_sockdir(work)).start()
    try:
        out = pg.pgbench("-n", "-c", str(PG_CLIENTS), "-j", "2", "-t", str(PG_TXNS), timeout=1800).stdout
    finally:
        pg.stop()
    tps = float(re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out).group(1))
    return PG_CLIENTS * PG_TXNS / tps


def app(d: str, kind: str) -> float:
    if kind == "pgbench":
        return pgbench_app(d)
    global app_cpu
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", APP, d, kind, str(FILES)], check=True,
                         capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    app_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return float(out.stdout.split()[-1])


# CPU seconds of the last app() (user + system: the kernel's FUSE work
# for it is system time); with a server's CPU they show the cost per
# request apart from the waiting a loaded machine adds
app_cpu = 0.0


def stat_cpu(stat_path: str) -> float:
    """CPU seconds (user + system) so far of the process or thread whose
    /proc stat file is ``stat_path``."""
    with open(stat_path) as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(tid: int) -> float:
    """CPU seconds (user + system) of a thread of this process so far."""
    return stat_cpu(f"/proc/self/task/{tid}/stat")


def c_passthrough() -> str | None:
    """libfuse's passthrough_ll example, built once; None if it cannot be
    ($SMIRROR_BENCH_C: another build of it, e.g. a newer libfuse's)."""
    if os.environ.get("SMIRROR_BENCH_C"):
        return os.environ["SMIRROR_BENCH_C"]
    src = "/usr/share/doc/libfuse3-dev/examples"
    exe = os.path.join(tempfile.gettempdir(), "smirror-bench-passthrough_ll")
    if os.path.exists(exe):
        return exe
    if not shutil.which("gcc") or not os.path.exists(os.path.join(src, "passthrough_ll.c")):
        return None
    flags = subprocess.run(["pkg-config", "fuse3", "--cflags", "--libs"], capture_output=True,
                           text=True).stdout.split()
    r = subprocess.run(["gcc", "-O2", "-I", src, os.path.join(src, "passthrough_ll.c"), *flags,
                        "-o", exe], capture_output=True, text=True)
    return exe if r.returncode == 0 else None


def run_direct(work, kind):
    back = os.path.join(work, "back")
    prepare(back, kind)
    return {"app": app(back, kind), "app_cpu": app_cpu}


def run_c(work, kind):
    exe = c_passthrough()
    if exe is None:
        return None
    back, mnt = os.path.join(work, "back"), os.path.join(work, "mnt")
    prepare(back, kind)
    def more_fds():          # it keeps an fd per inode it was told about
        import resource
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # allow_other: PostgreSQL runs as its own user
    # xattr: served as the mount serves them (without it the kernel stops
    # asking, and skips the security.capability lookup before each write)
    p = subprocess.Popen([exe, "-f", "-s", "-o", f"source={back}", "-o", "xattr",
                          *(["-o", "allow_other"] if kind == "pgbench" else []),
                          *C_OPTS, mnt], preexec_fn=more_fds)
    result = None
    try:
        deadline = time.monotonic() + 10
        from smirror.capture.mount.mountpoint import mounted_at
        while mounted_at(mnt) is None:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
        result = {"app": app(mnt, kind), "app_cpu": app_cpu}
    except subprocess.CalledProcessError as exc:
        print(f"  c-passthrough failed: {exc.stderr.strip()[-300:]}")
    finally:
        # busy while the application's last files close (PostgreSQL's
        # shutdown): retry, then lazily, never wait for a server still mounted
        deadline = time.monotonic() + 30
        while subprocess.run(["fusermount3", "-u", mnt], capture_output=True).returncode:
            if time.monotonic() > deadline:
                subprocess.run(["fusermount3", "-u", "-z", mnt])
                break
            time.sleep(0.2)
        _, status, usage = os.wait4(p.pid, 0)       # its CPU: the server's cost
        p.returncode = os.waitstatus_to_exitcode(status)
    if result is not None:
        result["server_cpu"] = usage.ru_utime + usage.ru_stime
    return result


def run_mount(work, kind):
    from smirror.capture.mount.runner import CaptureMount
    back, mnt = os.path.join(work, "back"), os.path.join(work, "mnt")
    prepare(back, kind)
    with CaptureMount(back, mnt, lambda op: None, bypass=False) as m:
        assert m.thread is not None and m.thread.native_id is not None
        m.fs.profile = PROFILE
        cpu0 = thread_cpu(m.thread.native_id)
        t = app(mnt, kind)
        # over io_uring, requests are served by a thread on each CPU
        rings = [th for th in threading.enumerate() if th.name.startswith("capture-mount-ring")]
        ring_cpu = sum(thread_cpu(th.native_id) for th in rings if th.native_id is not None)
        return {"app": t, "app_cpu": app_cpu,
                "server_cpu": thread_cpu(m.thread.native_id) - cpu0 + ring_cpu,
                "requests": sum(m.fs.requests.values()), "busy": m.fs.busy_ns / 1e9,
                "busy_by": {k: v / m.fs.requests[k] / 1e3 for k, v in m.fs.busy_by.items()},
                "flushes": dict(m.fs.flushes),
                "by_kind": dict(sorted(m.fs.requests.items(), key=lambda kv: -kv[1]))}


# the capture mount of another source tree (SMIRROR_BENCH_BASE: its src/,
# e.g. main's), served by a process of its own: before and after a change,
# in the same run
BASE_SERVER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from smirror.capture.mount.runner import CaptureMount
with CaptureMount(sys.argv[2], sys.argv[3], lambda op: None, bypass=False) as m:
    m.fs.profile = sys.argv[4] == "1"
    print("ready", flush=True)
    sys.stdin.read()
    print(sum(m.fs.requests.values()), m.fs.busy_ns, flush=True)
"""


def base_src() -> str | None:
    """$SMIRROR_BENCH_BASE as an absolute path (None: not set); a
    directory without a smirror package stops the run (else the
    installed tree would be measured under the other one's name)."""
    base = os.environ.get("SMIRROR_BENCH_BASE")
    if not base:
        return None
    if not os.path.isfile(os.path.join(base, "smirror", "__init__.py")):
        raise SystemExit(f"$SMIRROR_BENCH_BASE: {base} holds no smirror package (give a tree's src/)")
    return os.path.abspath(base)


def run_mount_base(work, kind):
    base = base_src()
    if base is None:
        return None
    back, mnt = os.path.join(work, "back"), os.path.join(work, "mnt")
    prepare(back, kind)
    p = subprocess.Popen([sys.executable, "-c", BASE_SERVER, base, back, mnt,
                          "1" if PROFILE else "0"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdin is not None
    try:
        if p.stdout.readline().strip() != "ready":
            return None
        t = app(mnt, kind)
        cpu = app_cpu
    finally:
        p.stdin.close()
        out = p.stdout.read().split()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    requests = int(out[0]) if out else 0
    return {"app": t, "app_cpu": cpu, "server_cpu": usage.ru_utime + usage.ru_stime,
            "requests": requests, "busy": int(out[1]) / 1e9 if out else 0.0, "by_kind": {}}


def run_replicate(work, kind):
    from smirror.replication import Replication
    back, mnt, dst = (os.path.join(work, n) for n in ("back", "mnt", "dst"))
    prepare(back, kind)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.rmtree(os.path.join(work, "state"), ignore_errors=True)
    with Replication(back, dst, state_dir=os.path.join(work, "state"), mount=mnt,
                     mirror="full") as rep:
        cpu0 = threads_cpu()
        frames0 = rep.sender.frames_sent
        t0 = time.perf_counter()
        t = app(mnt, kind)
        cpu1 = threads_cpu()
        assert rep.wait(600), rep.status()
        assert rep.mount is not None and rep.mount.fs is not None
        return {"app": t, "applied": time.perf_counter() - t0,
                "ops": rep.mount.fs.stats["ops"], "frames": rep.sender.frames_sent - frames0,
                "threads_cpu": {k: v - cpu0.get(k, 0.0) for k, v in cpu1.items()}}


def run_daemons(work, kind):
    """The deployment: a source daemon whose replication set is captured
    through the mount (``--mount``), a target daemon, each its own
    process on this machine; the application's time, then until the
    source's last op was acknowledged. The CPU of each daemon while the
    application ran is kept."""
    from pathlib import Path

    from support.daemons import wait_for
    from support.pair import login, running_pair
    back, mnt, dst = (os.path.join(work, n) for n in ("back", "mnt", "dst"))
    prepare(back, kind)
    home = Path(work) / "daemons"
    for d in (dst, home):
        shutil.rmtree(d, ignore_errors=True)
        os.mkdir(d)

    def row() -> dict:
        return json.loads(source.cli("status", "--json").stdout)["sources"][0]

    def caught_up() -> bool:
        r = row()
        return (r["seq_acked"] >= r["seq_captured"]
                and (r.get("mirror") or {}).get("state") in (None, "done", "finished"))
    with running_pair(home, log_level="info", target_options={"allowed_roots": [dst]}) \
            as (source, target, env):
        login(source, env)
        source.cli("repset", "create", "bench", "--root", back, "--mount", mnt)
        source.cli("connect", "bench", "to", target.address, "map", "base", dst)
        wait_for(caught_up, timeout=600, every=0.2, what="the initial mirror on the target")
        cpu0 = [proc_cpu(n.proc.pid) for n in (source, target)]
        before = row()
        spies = [spy for n in (source, target)
                 for spy in (py_spy(n.proc.pid, f"{kind}-{n.dir.name}"),
                             perf_record(n.proc.pid, f"{kind}-{n.dir.name}"))]
        t0 = time.perf_counter()
        t = app(mnt, kind)
        cpu1 = [proc_cpu(n.proc.pid) for n in (source, target)]
        for spy in spies:
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
        wait_for(caught_up, timeout=600, every=0.05, what="the target caught up")
        after = row()
        return {"app": t, "applied": time.perf_counter() - t0,
                "ops": after["seq_captured"] - before["seq_captured"],
                "frames": after["frames_sent"] - before["frames_sent"],
                "daemons_cpu": {"source": cpu1[0] - cpu0[0], "target": cpu1[1] - cpu0[1]}}


def run_daemons_base(work, kind):
    """``daemons`` with both daemons (and the CLI that sets them up) run
    from another source tree (SMIRROR_BENCH_BASE, its src/ on PYTHONPATH,
    its extensions built in place): the deployment before and after a
    change, in the same run."""
    base = base_src()
    if base is None:
        return None
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = base + (os.pathsep + saved if saved else "")
    try:
        return run_daemons(work, kind)
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


def tool_path(tool: str) -> str | None:
    """Where TOOL is: beside this interpreter (a venv's py-spy), else on PATH."""
    return shutil.which(tool, path=os.path.dirname(sys.executable) + os.pathsep
                        + os.environ.get("PATH", ""))


def profiler_dir(var: str, tool: str) -> str | None:
    """The directory $VAR names for TOOL's profiles (None: not asked for);
    a directory that is not there, or a tool that is not installed, is an
    error, not a run without the profile asked for."""
    out = os.environ.get(var)
    if not out:
        return None
    if not os.path.isdir(out):
        raise SystemExit(f"${var}: {out} is not a directory")
    if not tool_path(tool):
        raise SystemExit(f"${var} is set but {tool} is not installed (pip install py-spy; "
                         f"Debian: apt-get install linux-perf)")
    return out


def py_spy(pid: int, name: str):
    """With $SMIRROR_BENCH_PY_SPY (a directory): py-spy samples PID's
    threads while they hold the GIL, into DIR/NAME.raw (flame graph
    lines); None without it."""
    out = profiler_dir("SMIRROR_BENCH_PY_SPY", "py-spy")
    if out is None:
        return None
    return subprocess.Popen([tool_path("py-spy"), "record", "--pid", str(pid), "--threads", "--gil",
                             "-r", "500", "-f", "raw", "-o", os.path.join(out, f"{name}.raw")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def perf_record(pid: int, name: str):
    """With $SMIRROR_BENCH_PERF (a directory): ``perf record -g`` of PID
    (its kernel time too) into DIR/NAME.perf; None without it."""
    out = profiler_dir("SMIRROR_BENCH_PERF", "perf")
    if out is None:
        return None
    return subprocess.Popen([tool_path("perf"), "record", "-g", "-F", "2000", "-p", str(pid),
                             "-o", os.path.join(out, f"{name}.perf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process so far."""
    return stat_cpu(f"/proc/{pid}/stat")


def threads_cpu() -> dict:
    """CPU seconds so far of this process's threads, summed by name
    (digits dropped: the ring threads, one per CPU, make one line)."""
    out: dict = {}
    for th in threading.enumerate():
        if th.native_id is None:
            continue
        try:
            cpu = thread_cpu(th.native_id)
        except OSError:         # ended meanwhile
            continue
        name = th.name.rstrip("0123456789").rstrip("-")
        out[name] = out.get(name, 0.0) + cpu
    return out


VARIANTS = (("direct", run_direct), ("c-passthrough", run_c), ("mount", run_mount),
            ("mount-base", run_mount_base), ("replicate", run_replicate), ("daemons", run_daemons),
            ("daemons-base", run_daemons_base))


def default_kinds() -> tuple:
    from support import postgres
    return ("seq", "rand", "meta") + (() if postgres.unavailable() else ("pgbench",))


def median(xs: list) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


# ext4 without a journal skips, when it allocates an inode, every inode
# deleted in the last 60 seconds (360 while its inode table block is
# dirty: recently_deleted(), which reads the table for each): a run of
# ``meta`` after another's 100,000 deletions created its files several
# times slower, whichever variant it was (0.05-0.51 of direct in one run;
# a third of the server's CPU in that scan). Where the backing disk is
# such an ext4, each ``meta`` run ends with sync() and the next starts
# once that window has passed.
RECENTLY_DELETED_S = 61


def ext4_without_journal(path: str) -> bool:
    st = os.stat(path)
    try:
        dev = os.path.basename(os.path.realpath(
            f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"))
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return False
    ext4 = any(m[2] == "ext4" and os.path.basename(m[0]) == dev for m in mounts if len(m) > 2)
    has_journal = any(name.startswith(dev + "-") for name in
                      (os.listdir("/proc/fs/jbd2") if os.path.isdir("/proc/fs/jbd2") else ()))
    return ext4 and not has_journal


def bench(kinds=None) -> dict:
    """Every workload of ``kinds`` through every variant, ROUNDS rounds
    round-robin; per variant the median of its per-round ratios to that
    round's direct run (a burst of load on a shared machine then moves a
    round's baseline and its variants together)."""
    kinds = kinds or default_kinds()
    only = os.environ.get("SMIRROR_BENCH_VARIANTS", "").split(",")
    variants = [(n, f) for n, f in VARIANTS if n == "direct" or only == [""] or n in only]
    results: dict = {}
    work = tempfile.mkdtemp(prefix="smirror-bench-mount-", dir=os.environ.get("SMIRROR_BENCH_DIR"))
    os.chmod(work, 0o755)           # pgbench: the server runs as postgres
    try:
        os.mkdir(os.path.join(work, "back"))
        os.mkdir(os.path.join(work, "mnt"))
        settle = ext4_without_journal(work)
        deleted_at = None
        for kind in kinds:
            runs: dict = {name: [] for name, _ in variants}
            if kind == "meta" and settle:
                print(f"  (ext4 without a journal here: each meta run starts {RECENTLY_DELETED_S} s "
                      f"after the last one's deletions, synced)", flush=True)
            for _ in range(ROUNDS):
                direct = None
                for name, fn in variants:
                    if kind == "meta" and settle and deleted_at is not None:
                        time.sleep(max(0.0, deleted_at + RECENTLY_DELETED_S - time.monotonic()))
                    r = fn(work, kind)
                    if kind == "meta" and settle:
                        os.sync()           # the inode tables written: the 60 s window
                        deleted_at = time.monotonic()
                    if name == "direct":
                        direct = r["app"]
                    if r is not None:
                        r["ratio"] = direct / r["app"]
                        runs[name].append(r)
            goal = f"goal: mount >= {GOALS[kind]} of direct; " if kind in GOALS else ""
            print(f"\n{kind}  ({goal}median of {ROUNDS} rounds)")
            for name, _ in variants:
                rs = runs[name]
                if not rs:
                    print(f"  {name:<14} (not available here)")
                    continue
                r = sorted(rs, key=lambda x: x["app"])[len(rs) // 2]
                ratios = [x["ratio"] for x in rs]
                line = (f"  {name:<14} {units(kind, median([x['app'] for x in rs]))}  "
                        f"{median(ratios):5.2f} of direct ({min(ratios):.2f}-{max(ratios):.2f})")
                if kind in ("meta", "rtt") and "app_cpu" in r:
                    cpu = [x["app_cpu"] + x.get("server_cpu", 0) for x in rs]
                    line += (f"; CPU a file: {median([x['app_cpu'] for x in rs]) / FILES * 1e6:.0f} us "
                             f"app (with the kernel's part)" + (
                                 f" + {median([x['server_cpu'] for x in rs]) / FILES * 1e6:.0f} us "
                                 f"server = {median(cpu) / FILES * 1e6:.0f} us" if "server_cpu" in r else ""))
                if kind not in ("meta", "rtt") and "server_cpu" in r:
                    line += f"; server CPU {median([x['server_cpu'] for x in rs]):.2f} s"
                if r.get("flushes"):
                    line += f"; backing flushes {r['flushes']}"
                if "applied" in r:
                    line += (f"; target applied all in {r['applied']:.2f} s ({r['ops']} ops"
                             + (f" in {r['frames']} frames)" if "frames" in r else ")"))
                if r.get("daemons_cpu"):
                    line += "; CPU s of the daemons while the app ran: " + ", ".join(
                        f"{k} {v:.2f}" for k, v in r["daemons_cpu"].items())
                if PROFILE and r.get("threads_cpu"):
                    top = sorted(r["threads_cpu"].items(), key=lambda kv: -kv[1])
                    line += "; CPU s by thread while the app ran: " + ", ".join(
                        f"{k} {v:.2f}" for k, v in top if v >= 0.01)
                if "requests" in r:
                    per = f", {r['requests'] / FILES:.1f} a file" if kind == "meta" else ""
                    if kind == "rtt" and r["busy"]:
                        outside = (r["server_cpu"] - r["busy"]) / r["requests"] * 1e6
                        per = f", {outside:.1f} us CPU each outside our handlers"
                    busy = (f", {r['busy'] / r['requests'] * 1e6:.1f} us CPU of it in our handlers"
                            if r["busy"] else "")
                    line += (f"; {r['requests']} FUSE requests{per}, "
                             f"{r['app'] / r['requests'] * 1e6:.1f} us each{busy}: {r['by_kind']}")
                    if r.get("busy_by"):
                        top = sorted(r["busy_by"].items(), key=lambda kv: -kv[1] * r["by_kind"].get(kv[0], 0))
                        line += "; CPU us a request by kind: " + ", ".join(
                            f"{k} {v:.1f}" for k, v in top[:6])
                print(line, flush=True)
                results[(kind, name)] = {**r, "ratio": median(ratios), "ratios": ratios}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def test_bench_mount():
    import pytest
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        pytest.skip("needs root, /dev/fuse and fusermount3")
    pytest.importorskip("smirror.capture.mount._fuse")
    bench()


if __name__ == "__main__":
    bench(tuple(sys.argv[1:]) or None)
