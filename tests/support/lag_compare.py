#!/usr/bin/env python3
"""Replication lag of smirror (watcher capture) against lsyncd (Debian
package, ``default.rsync``), side by side on one machine, local directory
to local directory, the same seeded workload for each on a fresh tree.

    apt-get install -y lsyncd rsync
    PYTHONPATH=src python tools/lag_compare.py [--ops 2000] [--rate 200] [--seed 1]

Each tool runs as its own process (``python -m smirror replicate SRC DST``,
``lsyncd -nodaemon CONFIG``) and gets an identical fresh source tree, which
it copies to an empty target first (its initial sync, not measured). Then
the workload runs at a fixed rate: files created, written at offsets,
appended to, renamed, deleted, a few directories made and renamed. Every
``--probe-interval`` seconds a small probe file is written as well; a
poller in this process reads the target every millisecond and records, for
each probe, the time from its close(2) on the source until the target holds
it with that content (the lag). After the last op, the time until the target
tree matches the source (names, kinds, content, mode, file mtime) is the
time to match (see ``wait_match``; the source is walked once more after the
last op and the target at least once: 10-30 ms on this tree, so a figure
of that size means "at once"). The poller also notes how much later than asked it
woke from its 1 ms sleeps at worst ("poller stall"): the machine's own
stalls, which every lag above includes.

Bytes moved, counted where each tool's data crosses from its source side to
its target side, after the initial sync:

* smirror: ``bytes_sent`` of its stream (frames source -> target; the acks
  coming back are not counted), from its final JSON status line;
* lsyncd: everything on rsync's pipe between its sender and receiver, both
  directions (``Total bytes sent`` + ``Total bytes received`` of ``--stats``),
  summed over the rsync runs lsyncd made; a wrapper given to lsyncd as
  ``rsync { binary = ... }`` adds ``--stats`` and keeps each run's output.

lsyncd configurations (the Lua file is written at run time; each sets only
its log and status file in ``settings{}`` and the rsync wrapper):

* ``lsyncd-default``: ``sync{default.rsync, source=..., target=...}``, its
  defaults (delay 15 s, rsync ``-rlts --delete``);
* ``lsyncd-tuned``: adds ``delay = 0, maxDelays = 1``, the shortest wait
  lsyncd accepts before it starts rsync;
* ``lsyncd-tuned-ns``: tuned, and rsync compares mtimes to the nanosecond
  (``--modify-window=-1``). rsync's quick check otherwise compares whole
  seconds: a file changed within the second it was copied, at the same size,
  looks unchanged and stays stale on the target (with no later change to it,
  for good), which the two other configurations show as "never (N stale)".
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from support.daemons import package_path
from support.treestate import diff, snapshot

TOOLS = ("smirror", "lsyncd-tuned", "lsyncd-tuned-ns", "lsyncd-default")
# seconds to wait for the target to match after the last op: lsyncd's default
# delay is 15 s, so its last batch starts up to 15 s after the last change
MATCH_TIMEOUT = {"smirror": 20.0, "lsyncd-tuned": 20.0, "lsyncd-tuned-ns": 20.0,
                 "lsyncd-default": 35.0}
LAG_GOAL = 10.0            # lsyncd lag / smirror lag


# -- the workload ----------------------------------------------------------------

class FileWorkload:
    """Plain file-system calls made by a program, seeded, so the same seed on
    an identical tree makes the identical sequence. Keeps a model of the
    files and directories it made; only what rsync's ``-rlt`` and smirror
    both carry (content, names, file mtime; modes stay the umask default)."""

    WEIGHTS = {"create": 15, "write": 35, "append": 25, "rename": 11, "delete": 9,
               "mkdir": 3, "rename_dir": 2}

    def __init__(self, root, seed: int = 1, *, max_files: int = 400, min_files: int = 50,
                 max_write: int = 8192):
        self.root = os.fspath(root)
        self.rng = random.Random(seed)
        self.max_files, self.min_files, self.max_write = max_files, min_files, max_write
        self.files: list[str] = []
        self.dirs: list[str] = []
        self.counter = 0
        self.bytes_written = 0
        self.ops = 0
        self._kinds = list(self.WEIGHTS)
        self._weights = list(self.WEIGHTS.values())

    def _abs(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _new_name(self, top_level: bool = False) -> str:
        self.counter += 1
        parent = "" if top_level or not self.dirs or self.rng.random() < 0.2 \
            else self.rng.choice(self.dirs)
        base = f"{'d' if top_level else 'f'}{self.counter:05d}"
        return f"{parent}/{base}" if parent else base

    def _write_new(self, rel: str, n: int) -> None:
        with open(self._abs(rel), "wb") as f:
            f.write(self.rng.randbytes(n))
        self.bytes_written += n

    def populate(self, dirs: int = 6, files: int = 150, max_size: int = 32768) -> None:
        """The starting tree (before the tool's initial sync)."""
        os.makedirs(self.root, exist_ok=True)
        for _ in range(dirs):
            d = self._new_name(top_level=True)
            os.mkdir(self._abs(d))
            self.dirs.append(d)
        for _ in range(files):
            p = self._new_name()
            self._write_new(p, self.rng.randint(1, max_size))
            self.files.append(p)
        self.bytes_written = 0

    def step(self) -> str:
        r = self.rng
        what = r.choices(self._kinds, self._weights)[0]
        if what == "create" and len(self.files) >= self.max_files:
            what = "delete"
        elif what == "delete" and len(self.files) <= self.min_files:
            what = "create"
        elif what == "rename_dir" and not self.dirs:
            what = "mkdir"
        if what == "create":
            p = self._new_name()
            self._write_new(p, r.randint(1, 2 * self.max_write))
            self.files.append(p)
        elif what in ("write", "append"):
            p = r.choice(self.files)
            n = r.randint(1, self.max_write)
            fd = os.open(self._abs(p), os.O_WRONLY)
            try:
                size = os.fstat(fd).st_size
                off = size if what == "append" else r.randint(0, size)
                os.pwrite(fd, r.randbytes(n), off)
            finally:
                os.close(fd)
            self.bytes_written += n
        elif what == "rename":
            i = r.randrange(len(self.files))
            q = self._new_name()
            os.rename(self._abs(self.files[i]), self._abs(q))
            self.files[i] = q
        elif what == "delete":
            p = self.files.pop(r.randrange(len(self.files)))
            os.unlink(self._abs(p))
        elif what == "mkdir":
            d = self._new_name(top_level=True)
            os.mkdir(self._abs(d))
            self.dirs.append(d)
        elif what == "rename_dir":
            i = r.randrange(len(self.dirs))
            old, new = self.dirs[i], self._new_name(top_level=True)
            os.rename(self._abs(old), self._abs(new))
            self.dirs[i] = new
            self.files = [new + p[len(old):] if p.startswith(old + "/") else p for p in self.files]
        self.ops += 1
        return what


# -- the lag probe ----------------------------------------------------------------

class ProbeLag:
    """Writes probe files into ``src/<subdir>`` and measures, in a poller
    thread, the time until each is on ``dst`` with the same content."""

    def __init__(self, src, dst, subdir: str = "probes", poll: float = 0.001):
        self.src_dir = os.path.join(os.fspath(src), subdir)
        self.dst_dir = os.path.join(os.fspath(dst), subdir)
        self.poll = poll
        self.lags: dict[int, float] = {}            # probe number -> seconds
        self._pending: dict[int, tuple[bytes, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.count = 0
        self.max_oversleep = 0.0

    def make_dir(self) -> None:
        """Before the initial sync, so the directory is on both sides."""
        os.makedirs(self.src_dir, exist_ok=True)

    def start(self) -> ProbeLag:
        self._thread = threading.Thread(target=self._run, daemon=True, name="probe-poller")
        self._thread.start()
        return self

    def probe(self) -> int:
        n = self.count
        self.count += 1
        data = b"probe %d %.9f\n" % (n, time.time())
        with open(os.path.join(self.src_dir, f"p{n:05d}"), "wb") as f:
            f.write(data)
        written = time.perf_counter()       # after close(2): the change is complete
        with self._lock:
            self._pending[n] = (data, written)
        return n

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                pending = list(self._pending.items())
            for n, (data, written) in pending:
                try:
                    with open(os.path.join(self.dst_dir, f"p{n:05d}"), "rb") as f:
                        got = f.read(len(data) + 1)
                except FileNotFoundError:
                    continue
                if got == data:
                    seen = time.perf_counter()
                    with self._lock:
                        del self._pending[n]
                        self.lags[n] = seen - written
            before = time.perf_counter()
            time.sleep(self.poll)
            # how late this process woke: the machine's own stalls, beside the lags
            self.max_oversleep = max(self.max_oversleep, time.perf_counter() - before - self.poll)

    def wait_all(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            time.sleep(0.001)
        return False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def missing(self) -> int:
        with self._lock:
            return len(self._pending)

    def percentiles(self) -> dict:
        lags = sorted(self.lags.values())
        if not lags:
            return {"p50": None, "p99": None, "max": None}
        return {"p50": lags[len(lags) // 2], "p99": lags[min(len(lags) - 1, int(len(lags) * 0.99))],
                "max": lags[-1]}


def stat_snapshot(root) -> dict:
    """Names, kinds, modes, sizes and file mtimes, no content: the cheap
    check before a full treestate snapshot."""
    root = os.fsencode(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            reg = stat.S_ISREG(st.st_mode)
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_size if reg else 0,
                                                st.st_mtime_ns if reg else 0)
    return out


def wait_match(src, dst, timeout: float, since: float | None = None,
               interval: float = 0.002, src_stat: dict | None = None) -> float | None:
    """Seconds from ``since`` (a perf_counter time, default now) until
    ``dst`` matches ``src``, which no longer changes; None on timeout.

    The time is the end of the first poll of names, modes, sizes and file
    mtimes that matched, when a full content comparison right after it
    confirms the match (else polling goes on): both tools set a file's mtime
    after its content, and the cheap poll keeps the resolution at one walk
    of the target where hashing both trees each time would take tens of ms.
    ``src_stat``: the source's :func:`stat_snapshot`, taken already."""
    since = time.perf_counter() if since is None else since
    want_stat, want = src_stat if src_stat is not None else stat_snapshot(src), None
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if stat_snapshot(dst) == want_stat:
            seen = time.perf_counter()
            want = snapshot(src) if want is None else want
            if snapshot(dst) == want:
                return seen - since
        time.sleep(interval)
    return None


# -- the tools, as processes ------------------------------------------------------

def _kill_group(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 15.0) -> None:
    """Signal the process group this module started (its own session)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


class SmirrorProcess:
    """``python -m smirror replicate SRC DST --json`` (watcher capture)."""

    def __init__(self, src, dst, work):
        self.src, self.dst, self.work = os.fspath(src), os.fspath(dst), Path(work)
        self.proc: subprocess.Popen | None = None
        self.status: dict | None = None
        self.statuses = 0
        self._reader: threading.Thread | None = None
        self.bytes_at_start = 0

    def start(self, timeout: float = 60.0) -> None:
        env = dict(os.environ)
        # the smirror this process imports (tools/lag_compare.py puts the checkout's src/ first)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_path(), env.get("PYTHONPATH")]))
        self.stderr = open(self.work / "smirror.stderr", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smirror", "replicate", self.src, self.dst, "--json",
             "--interval", "0.2", "--state-dir", str(self.work / "state")],
            stdout=subprocess.PIPE, stderr=self.stderr, env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True, name="smirror-status")
        self._reader.start()
        deadline = time.monotonic() + timeout
        while self.statuses == 0:           # the first status line: mirrored, watching
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"smirror replicate did not start: {self.stderr_text()}")
            time.sleep(0.01)
        self.bytes_at_start = self.status["bytes_sent"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.status = json.loads(line)
                self.statuses += 1
            except ValueError:
                pass

    def stderr_text(self) -> str:
        self.stderr.flush()
        return (self.work / "smirror.stderr").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc is None:
            return
        _kill_group(self.proc)          # SIGTERM: drains, prints the final status
        if self._reader is not None:
            self._reader.join(5)
        self.stderr.close()

    def bytes_moved(self) -> int:
        return self.status["bytes_sent"] - self.bytes_at_start


# rsync's quick check compares whole seconds of mtime unless the window is
# negative: a file rewritten within the second it was copied, at the same
# size, looks unchanged to it and stays stale on the target
NS_MTIME = ("--modify-window=-1",)

_RSYNC_WRAPPER = """#!/bin/sh
# rsync for lsyncd: the same run with --stats, its output kept per run
LC_ALL=C exec {rsync} --stats "$@" > {logdir}/rsync-$$.stats 2>&1
"""
_STATS = re.compile(rb"^Total bytes (sent|received): ([\d,.]+)", re.M)


def rsync_stats_bytes(text: bytes) -> int:
    """Sent + received bytes of one ``rsync --stats`` output."""
    return sum(int(re.sub(rb"[,.]", b"", m.group(2))) for m in _STATS.finditer(text))


def lsyncd_config(src, dst, work, tuned: bool, rsync_binary, rsync_extra=()) -> str:
    def lua(s) -> str:
        return json.dumps(os.fspath(s))         # a JSON string is a valid Lua string here
    settings = f"settings {{\n    logfile = {lua(Path(work) / 'lsyncd.log')},\n" \
               f"    statusFile = {lua(Path(work) / 'lsyncd.status')},\n}}\n"
    extra = "    delay = 0,\n    maxDelays = 1,\n" if tuned else ""
    extra_args = f", _extra = {{ {', '.join(map(lua, rsync_extra))} }}" if rsync_extra else ""
    return (settings + "sync {\n    default.rsync,\n"
            f"    source = {lua(src)},\n    target = {lua(dst)},\n{extra}"
            f"    rsync = {{ binary = {lua(rsync_binary)}{extra_args} }},\n}}\n")


class LsyncdProcess:
    """``lsyncd -nodaemon CONFIG`` with ``default.rsync`` to a local directory."""

    def __init__(self, src, dst, work, tuned: bool, rsync_extra=(), lsyncd="lsyncd",
                 rsync="rsync"):
        self.src, self.dst, self.work = os.fspath(src), os.fspath(dst), Path(work)
        self.tuned, self.rsync_extra = tuned, tuple(rsync_extra)
        self.lsyncd = shutil.which(lsyncd)
        self.rsync = shutil.which(rsync)
        if self.lsyncd is None or self.rsync is None:
            raise RuntimeError("lsyncd and rsync are needed: apt-get install -y lsyncd rsync")
        self.statsdir = self.work / "rsync-stats"
        self.proc: subprocess.Popen | None = None
        self.bytes_at_start = 0

    def start(self, timeout: float = 60.0) -> None:
        self.statsdir.mkdir(parents=True, exist_ok=True)
        wrapper = self.work / "rsync-stats.sh"
        wrapper.write_text(_RSYNC_WRAPPER.format(rsync=self.rsync, logdir=self.statsdir))
        wrapper.chmod(0o755)
        config = self.work / "lsyncd.lua"
        config.write_text(lsyncd_config(self.src, self.dst, self.work, self.tuned, wrapper,
                                         self.rsync_extra))
        self.out = open(self.work / "lsyncd.out", "wb")
        self.proc = subprocess.Popen([self.lsyncd, "-nodaemon", str(config)], stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log = self.work / "lsyncd.log"
        deadline = time.monotonic() + timeout
        while not (log.exists() and b"finished." in log.read_bytes()):   # "Startup of ... finished."
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lsyncd did not finish its startup sync: {self.log_text()}")
            time.sleep(0.01)
        self.bytes_at_start = self._bytes()

    def log_text(self) -> str:
        self.out.flush()
        return b"".join(p.read_bytes()[-2000:] for p in (self.work / "lsyncd.out",
                                                         self.work / "lsyncd.log")
                        if p.exists()).decode(errors="replace")

    def _bytes(self) -> int:
        return sum(rsync_stats_bytes(p.read_bytes()) for p in self.statsdir.glob("rsync-*.stats"))

    def rsync_runs(self) -> int:
        return len(list(self.statsdir.glob("rsync-*.stats")))

    def _rsync_running(self) -> bool:
        # a run's file is opened when it starts and gets its totals at its end
        return any(b"total size is" not in p.read_bytes()
                   for p in self.statsdir.glob("rsync-*.stats"))

    def stop(self, settle: float = 10.0) -> None:
        if self.proc is None:
            return
        # the target can match before the last rsync exits: let it write its
        # stats, which a signal now would lose
        deadline = time.monotonic() + settle
        while self._rsync_running() and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.02)
        _kill_group(self.proc)        # lsyncd and any rsync it still runs
        self.out.close()

    def bytes_moved(self) -> int:
        return self._bytes() - self.bytes_at_start


# -- one run ----------------------------------------------------------------------

def run_tool(tool: str, base, *, seed: int = 1, ops: int = 2000, rate: float = 200.0,
             probe_interval: float = 0.02, match_timeout: float | None = None) -> dict:
    """Fresh tree under ``base/tool``, the tool started, its initial sync
    done, the workload with probes, the time to match; the process stopped
    whatever happens."""
    work = Path(base) / tool
    src, dst = work / "src", work / "dst"
    work.mkdir(parents=True)
    wl = FileWorkload(src, seed)
    wl.populate()
    probes = ProbeLag(src, dst)
    probes.make_dir()
    dst.mkdir()
    if tool == "smirror":
        proc = SmirrorProcess(src, dst, work)
    elif tool in ("lsyncd-tuned", "lsyncd-tuned-ns", "lsyncd-default"):
        proc = LsyncdProcess(src, dst, work, tuned=tool != "lsyncd-default",
                             rsync_extra=NS_MTIME if tool == "lsyncd-tuned-ns" else ())
    else:
        raise ValueError(f"unknown tool {tool!r}; one of {', '.join(TOOLS)}")
    try:
        proc.start()
        initial = diff(snapshot(src), snapshot(dst))
        if initial:
            raise RuntimeError(f"{tool}: target differs after the initial sync: {initial}")
        probes.start()
        t0 = time.perf_counter()
        next_probe = 0.0
        for i in range(ops):
            due = i / rate
            while next_probe <= due:                 # probes that fall before this op
                _sleep_until(t0 + next_probe)
                probes.probe()
                next_probe += probe_interval
            _sleep_until(t0 + due)
            wl.step()
        last_op = time.perf_counter()
        probes.probe()                               # one right behind the last op
        workload_s = last_op - t0
        timeout = match_timeout or MATCH_TIMEOUT[tool]
        src_stat = stat_snapshot(src)                # final: walked while the probe travels
        # the tree cannot match before its last probe is there; the poller
        # stops first, as it slows the tree walks down (the GIL)
        probes.wait_all(timeout)
        probes.stop()
        to_match = wait_match(src, dst, max(0.0, timeout - (time.perf_counter() - last_op)),
                              since=last_op, src_stat=src_stat)
        result = {"tool": tool, "ops": wl.ops, "workload_s": workload_s,
                  "payload_bytes": wl.bytes_written, "probes": probes.count,
                  "probes_missing": probes.missing, "time_to_match_s": to_match,
                  "files": len(wl.files), "poller_max_oversleep_s": probes.max_oversleep,
                  **{f"lag_{k}_s": v for k, v in probes.percentiles().items()}}
        if to_match is None:
            result["differing_paths"] = diff(snapshot(src), snapshot(dst), limit=10 ** 9)
    finally:
        probes.stop()
        proc.stop()
    result["bytes_moved"] = proc.bytes_moved()
    if isinstance(proc, LsyncdProcess):
        result["rsync_runs"] = proc.rsync_runs()
    return result


def _sleep_until(t: float) -> None:
    d = t - time.perf_counter()
    if d > 0:
        time.sleep(d)


def run_all(base=None, tools=TOOLS, **kw) -> list[dict]:
    own = base is None
    base = Path(tempfile.mkdtemp(prefix="smirror-lag-")) if own else Path(base)
    try:
        return [run_tool(t, base, **kw) for t in tools]
    finally:
        if own:
            shutil.rmtree(base, ignore_errors=True)


# -- the table --------------------------------------------------------------------

def _ms(s) -> str:
    return "-" if s is None else f"{s * 1000:.1f} ms" if s < 10 else f"{s:.2f} s"


def format_table(results: list[dict]) -> str:
    from smirror.units import format_size
    rows = [("tool / config", "lag p50", "lag p99", "lag max", "match after last op",
             "bytes moved", "payload", "p50 / smirror", "p99 / smirror", "poller stall")]
    base = next((r for r in results if r["tool"] == "smirror"), None)

    def ratio(r, k):
        if base is None or r is base or not r[k] or not base[k]:
            return "-"
        x = r[k] / base[k]
        return f"{x:.0f}x" if x >= 10 else f"{x:.1f}x"
    for r in results:
        rows.append((r["tool"], _ms(r["lag_p50_s"]), _ms(r["lag_p99_s"]), _ms(r["lag_max_s"]),
                     _ms(r["time_to_match_s"]) if r["time_to_match_s"] is not None
                     else f"never ({len(r['differing_paths'])} stale)",
                     format_size(r["bytes_moved"]), format_size(r["payload_bytes"]),
                     ratio(r, "lag_p50_s"), ratio(r, "lag_p99_s"),
                     _ms(r["poller_max_oversleep_s"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(results: list[dict]) -> str:
    """The goal: lag p50 and p99 of every lsyncd configuration at least 10x
    smirror's; names the configuration and percentile closest to it."""
    base = next((r for r in results if r["tool"] == "smirror"), None)
    ratios = [(r[k] / base[k], r["tool"], k[4:7]) for r in results if r is not base
              for k in ("lag_p50_s", "lag_p99_s") if base and base[k] and r[k]]
    if not ratios:
        return "goal not evaluated (needs a smirror and an lsyncd run)"
    worst, tool, pct = min(ratios)
    return (f"goal: lsyncd lag >= {LAG_GOAL:.0f}x smirror's at p50 and p99; lowest "
            f"{worst:.1f}x ({tool} {pct}): {'OK' if worst >= LAG_GOAL else 'BELOW GOAL'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=2000, help="workload ops (default 2000)")
    ap.add_argument("--rate", type=float, default=200.0, help="ops per second (default 200)")
    ap.add_argument("--probe-interval", type=float, default=0.02, metavar="SECONDS",
                    help="one probe file this often (default 0.02)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"default {','.join(TOOLS)}")
    ap.add_argument("--workdir", help="keep the trees and logs here (default: a removed tmp dir)")
    ap.add_argument("--json", action="store_true", help="the results as JSON")
    args = ap.parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        ap.error(f"unknown tool(s) {', '.join(bad)}; choose from {', '.join(TOOLS)}")
    if args.workdir and os.path.exists(args.workdir) and os.listdir(args.workdir):
        ap.error(f"--workdir {args.workdir} is not empty")
    results = run_all(args.workdir, tools, seed=args.seed, ops=args.ops, rate=args.rate,
                      probe_interval=args.probe_interval)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(format_table(results))
        print(verdict(results))
    return 0 if all(r["time_to_match_s"] is not None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
