#!/usr/bin/env python3
"""Unpaced workload storms against live replication, and the time each
takes to converge once it ends.

Each storm runs as fast as the machine lets it on SRC while ``smirror
replicate`` (``--cli``: the command, a real process) or
``smirror.Replication`` (default: in this process) replicates SRC to DST.
When the storm ends, convergence is polled: ``rsync -aHAX --checksum
--dry-run --itemize-changes --delete SRC/ DST/`` printing nothing. The
time from the storm's end to that moment is reported, per storm and run::

    python tools/storms.py                       # every storm once
    python tools/storms.py --repeat 10 checkout logrotate
    python tools/storms.py --scale 0.2 --bound 5 # smaller storms, 5 s bound

Storms (``--scale`` shrinks the counts):

* ``checkout``: a checkout-like rewrite of 2,000 files across 100
  directories (unlink and write anew, a tenth deleted, a tenth new);
* ``tar``: extracting a tarball of 3,000 small files across 60 directories;
* ``rmrf``: ``rm -rf dir`` then copying it back (200 files), 20 times;
* ``dirchain``: directories renamed in a chain (a -> b -> c ...) while files
  are written inside them;
* ``atomic``: 5,000 editor-style atomic saves (write tmp, fsync, rename over)
  over 100 files;
* ``logrotate``: log rotation (append, ``.log.1`` -> ``.log.2``, ``.log`` ->
  ``.log.1``, recreate), 200 rotations;
* ``filedir``: a file replaced by a directory of the same name and back,
  200 times.

Exit status 0 when every run converged within ``--bound`` seconds (the
table says how long each took), 1 otherwise (the rsync itemization of the
first failure is printed).
"""
from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time


# -- the storms: (prepare(src, rng, scale), storm(src, rng, scale)) ---------------
def _n(count, scale):
    return max(1, int(count * scale))


def _write(path, data, *, fsync=False):
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _blob(rng, lo=100, hi=8192):
    return rng.randbytes(rng.randint(lo, hi))


def checkout_prepare(src, rng, scale):
    for d in range(_n(100, scale)):
        os.makedirs(os.path.join(src, "repo", f"d{d:03}"))
        for f in range(20):
            _write(os.path.join(src, "repo", f"d{d:03}", f"f{f:02}.c"), _blob(rng))


def checkout_storm(src, rng, scale):
    repo = os.path.join(src, "repo")
    for d in sorted(os.listdir(repo)):
        dp = os.path.join(repo, d)
        for name in sorted(os.listdir(dp)):
            p = os.path.join(dp, name)
            os.unlink(p)
            if rng.random() < 0.1:
                continue                    # deleted by the checkout
            _write(p, _blob(rng))
        for _ in range(2):                  # new files of the other branch
            _write(os.path.join(dp, f"new{rng.randrange(1 << 30)}.c"), _blob(rng))


def tar_storm(src, rng, scale):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(_n(3000, scale)):
            data = _blob(rng, 10, 2000)
            info = tarfile.TarInfo(f"pkg/d{i % 60:02}/file{i}.txt")
            info.size = len(data)
            info.mtime = 1_600_000_000 + i
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        kw = {"filter": "fully_trusted"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(os.path.join(src, "x"), **kw)


def rmrf_prepare(src, rng, scale):
    tmpl = os.path.join(os.path.dirname(src), "template")
    for i in range(_n(200, scale)):
        d = os.path.join(tmpl, f"s{i % 10}")
        os.makedirs(d, exist_ok=True)
        _write(os.path.join(d, f"f{i}"), _blob(rng))
    shutil.copytree(tmpl, os.path.join(src, "dir"))


def rmrf_storm(src, rng, scale):
    tmpl = os.path.join(os.path.dirname(src), "template")
    for _ in range(_n(20, scale)):
        shutil.rmtree(os.path.join(src, "dir"))
        shutil.copytree(tmpl, os.path.join(src, "dir"))


def dirchain_storm(src, rng, scale):
    names = [f"chain{i}" for i in range(5)]
    cur = os.path.join(src, names[0])
    os.makedirs(os.path.join(cur, "sub"))
    for step in range(_n(300, scale)):
        for j in range(3):
            _write(os.path.join(cur, f"w{step}-{j}"), _blob(rng, 10, 500))
            _write(os.path.join(cur, "sub", f"s{step % 7}"), _blob(rng, 10, 500))
        nxt = os.path.join(src, names[(step + 1) % len(names)])
        os.rename(cur, nxt)
        cur = nxt


def atomic_prepare(src, rng, scale):
    os.makedirs(os.path.join(src, "docs"))
    for i in range(100):
        _write(os.path.join(src, "docs", f"doc{i}.txt"), _blob(rng))


def atomic_storm(src, rng, scale):
    docs = os.path.join(src, "docs")
    for i in range(_n(5000, scale)):
        name = f"doc{rng.randrange(100)}.txt"
        tmp = os.path.join(docs, f".{name}.swp{i}")
        _write(tmp, _blob(rng), fsync=True)
        os.rename(tmp, os.path.join(docs, name))


def logrotate_prepare(src, rng, scale):
    os.makedirs(os.path.join(src, "log"))
    _write(os.path.join(src, "log", "app.log"), b"start\n")


def logrotate_storm(src, rng, scale):
    log = os.path.join(src, "log", "app.log")
    for r in range(_n(200, scale)):
        with open(log, "ab") as f:
            for i in range(rng.randint(1, 20)):
                f.write(b"rotation %d line %d %s\n" % (r, i, rng.randbytes(20).hex().encode()))
        if os.path.exists(log + ".1"):
            os.rename(log + ".1", log + ".2")
        os.rename(log, log + ".1")
        _write(log, b"new log after rotation %d\n" % r)


def filedir_storm(src, rng, scale):
    p = os.path.join(src, "shape")
    for i in range(_n(200, scale)):
        if os.path.isdir(p):
            shutil.rmtree(p)
            _write(p, b"a file %d\n" % i)
        else:
            if os.path.exists(p):
                os.unlink(p)
            os.mkdir(p)
            _write(os.path.join(p, "inside"), b"inside %d\n" % i)


STORMS = {
    "checkout": (checkout_prepare, checkout_storm),
    "tar": (None, tar_storm),
    "rmrf": (rmrf_prepare, rmrf_storm),
    "dirchain": (None, dirchain_storm),
    "atomic": (atomic_prepare, atomic_storm),
    "logrotate": (logrotate_prepare, logrotate_storm),
    "filedir": (None, filedir_storm),
}


# -- convergence ----------------------------------------------------------------
def itemize(src, dst) -> str:
    """rsync's list of what differs ("" when DST equals SRC)."""
    r = subprocess.run(["rsync", "-aHAX", "--checksum", "--dry-run", "--itemize-changes", "--delete",
                        f"{src}/", f"{dst}/"], capture_output=True, text=True)
    if r.returncode not in (0, 24):
        return f"rsync failed ({r.returncode}): {r.stderr.strip()}"
    return r.stdout


def wait_converged(src, dst, bound: float, poll: float = 0.1):
    """(seconds until rsync printed nothing, None if not within ``bound``;
    the last itemization)."""
    t0 = time.monotonic()
    out = ""
    while True:
        out = itemize(src, dst)
        el = time.monotonic() - t0
        if not out:
            return el, ""
        if el > bound:
            return None, out
        time.sleep(poll)


# -- replication under test ------------------------------------------------------
# the smirror under test: the one this process imports (tools/storms.py puts
# the checkout's src/ first), or the package directory --src names
PACKAGE_SRC = None


def package_dir():
    """The directory holding the smirror under test, for the processes a storm starts."""
    if PACKAGE_SRC:
        return PACKAGE_SRC
    from support.daemons import package_path
    return package_path()


class InProcess:
    def __init__(self, src, dst, state):
        if PACKAGE_SRC:
            sys.path.insert(0, PACKAGE_SRC)
        from smirror.replication import Replication
        self.rep = Replication(src, dst, state_dir=state).start()

    def counts(self):
        st = self.rep.status()
        return st["seq_captured"], st["seq_applied"]

    def status(self):
        return dict(self.rep.status(), ops_coalesced=self.rep.target.status()["ops_coalesced"])

    def stop(self):
        self.rep.stop(drain=False)


class Cli:
    def __init__(self, src, dst, state):
        import json
        self._json = json
        env = dict(os.environ)
        env["PYTHONPATH"] = package_dir() + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, "-m", "smirror", "replicate", src, dst,
                                      "--state-dir", state, "--json", "--interval", "0.1"],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.last = self._json.loads(self.proc.stdout.readline())

    def _drain(self):
        import select
        while select.select([self.proc.stdout], [], [], 0)[0]:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.last = self._json.loads(line)

    def counts(self):
        self._drain()
        return self.last["seq_captured"], self.last["seq_applied"]

    def status(self):
        self._drain()
        return self.last

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


class Daemons:
    """A source daemon whose replication set is SRC and a target daemon with
    the map base DST, as processes on 127.0.0.1 (``tests/support/daemons.py``);
    ready once the first mirror made DST equal SRC."""

    def __init__(self, src, dst, state):
        import json
        from pathlib import Path

        from support.daemons import PASSWORD, Node, smirror
        self._json = json
        tmp = Path(state)
        tmp.mkdir()
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp / "config"),
               "PYTHONPATH": package_dir() + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.source = Node(tmp, "source", env, links_user="repl")
        self.target = Node(tmp, "target", env, allowed_roots=[os.path.dirname(dst)])
        for n in (self.source, self.target):
            n.add_user("admin", "admin")
        self.target.add_user("repl", "replication")
        self.source.start()
        self.target.start()
        try:
            for n in (self.source, self.target):
                smirror("login", n.address, "--user", "admin", "--password-env", "PW",
                        env={**env, "PW": PASSWORD})
            self.source.cli("repset", "create", "data", "--root", src)
            self.source.cli("connect", "data", "to", self.target.address, "map", "base", dst)
            converged, out = wait_converged(src, dst, 120.0)
            if converged is None:
                raise RuntimeError(f"the first mirror did not converge in 120 s: {out[:2000]}")
        except BaseException:
            self.stop()
            raise

    def _status(self, node, key):
        conns = self._json.loads(node.cli("status", "--json").stdout).get(key) or []
        return conns[0] if conns else {}

    def counts(self):
        return (self._status(self.source, "sources").get("seq_captured", 0),
                self._status(self.target, "targets").get("seq_applied", 0))

    def status(self):
        src, tgt = self._status(self.source, "sources"), self._status(self.target, "targets")
        return {"resyncs": tgt.get("resyncs"), "ops_coalesced": tgt.get("ops_coalesced"),
                "error": src.get("last_error") or tgt.get("error") or ""}

    def stop(self):
        import signal
        for n in (self.source, self.target):
            if n.proc and n.proc.poll() is None:
                n.kill(signal.SIGTERM)


MODES = {"inprocess": lambda src, dst, state: InProcess(src, dst, state),
         "cli": lambda src, dst, state: Cli(src, dst, state),
         "daemons": lambda src, dst, state: Daemons(src, dst, state)}


def run_storm(name: str, *, scale: float = 1.0, bound: float = 5.0, cli: bool = False,
              seed: int = 0, workdir=None, rates: bool = False, mode: str | None = None) -> dict:
    """One run of storm ``name``; returns {storm, ops, storm_s, converge_s
    (None: not within ``bound``), itemize (the last rsync output), ...}.
    ``mode``: "inprocess" (``smirror.Replication``, the default), "cli"
    (``smirror replicate``, also ``cli=True``) or "daemons" (two daemons)."""
    mode = mode or ("cli" if cli else "inprocess")
    prepare, storm = STORMS[name]
    base = tempfile.mkdtemp(prefix=f"storm-{name}-", dir=workdir)
    src, dst, state = (os.path.join(base, n) for n in ("src", "dst", "state"))
    os.makedirs(src)
    rng = random.Random(seed)
    if prepare is not None:
        prepare(src, rng, scale)
    rep = MODES[mode](src, dst, state)
    try:
        captured0, applied0 = rep.counts()
        sampler = Sampler(rep) if rates else None
        t0 = time.monotonic()
        storm(src, rng, scale)
        t1 = time.monotonic()
        result = {"storm": name, "storm_s": t1 - t0}
        if sampler is not None:
            result.update(sampler.rates(t0, captured0))
        result["converge_s"], result["itemize"] = wait_converged(src, dst, bound)
        captured, applied = rep.counts()
        result["ops"] = captured - captured0
        st = rep.status()
        result["resyncs"] = st.get("resyncs")
        result["coalesced"] = st.get("ops_coalesced")
        result["error"] = st.get("error") or st.get("target_error") or ""
    finally:
        rep.stop()
    if result["converge_s"] is not None:
        shutil.rmtree(base, ignore_errors=True)
    else:
        result["dir"] = base
    return result


class Sampler:
    """(time, captured, applied) every ``every`` seconds in a thread: the
    rates of capture and apply over a storm."""

    def __init__(self, rep, every: float = 0.02):
        import threading
        self.rep, self.every, self.samples = rep, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            c, a = self.rep.counts()
            self.samples.append((time.monotonic(), c, a))
            self._stop.wait(self.every)

    def rates(self, t0, captured0, quiet: float = 0.5, timeout: float = 120.0) -> dict:
        """Wait until capture stayed put ``quiet`` s and apply reached it;
        capture ops/s = ops / (time capture reached its last count - t0),
        apply ops/s = ops / (time apply reached it - t0)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t, c, a = self.samples[-1] if self.samples else (0, -1, -2)
            first_c = next((s[0] for s in self.samples if s[1] == c), t)
            if a >= c and t - first_c >= quiet:
                break
            time.sleep(0.05)
        self._stop.set()
        self._thread.join()
        t, c, a = self.samples[-1]
        t_cap = next(s[0] for s in self.samples if s[1] == c)
        t_app = next((s[0] for s in self.samples if s[2] >= c), t)
        ops = c - captured0
        return {"capture_ops_s": round(ops / max(1e-6, t_cap - t0)),
                "apply_ops_s": round(ops / max(1e-6, t_app - t0)),
                "apply_behind_s": round(max(0.0, t_app - t_cap), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("storms", nargs="*", metavar="STORM", help=f"default: all of {', '.join(STORMS)}")
    ap.add_argument("--repeat", type=int, default=1, metavar="N")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the storms' counts (default 1)")
    ap.add_argument("--bound", type=float, default=5.0, metavar="SECONDS",
                    help="convergence must come within this long after the storm (default 5)")
    ap.add_argument("--cli", action="store_true", help="run `smirror replicate` as a process")
    ap.add_argument("--daemons", action="store_true",
                    help="replicate through a source and a target daemon (processes, TCP)")
    ap.add_argument("--rates", action="store_true", help="also measure capture and apply ops/s")
    ap.add_argument("--workdir", metavar="DIR", help="where the trees go (default: the temp dir)")
    ap.add_argument("--src", metavar="DIR", help="the smirror package directory to test "
                    "(default: this checkout's src; another worktree's to compare)")
    args = ap.parse_args(argv)
    global PACKAGE_SRC
    if args.src:
        PACKAGE_SRC = os.path.abspath(args.src)
    names = args.storms or list(STORMS)
    for n in names:
        if n not in STORMS:
            ap.error(f"unknown storm {n!r}: expected one of {', '.join(STORMS)}")
    if not shutil.which("rsync"):
        print("storms: error: rsync is needed to check convergence", file=sys.stderr)
        return 2
    rows, failed = [], None
    for name in names:
        for i in range(args.repeat):
            r = run_storm(name, scale=args.scale, bound=args.bound, seed=i, workdir=args.workdir,
                          rates=args.rates, mode="daemons" if args.daemons else
                          "cli" if args.cli else "inprocess")
            rows.append(r)
            conv = "NOT CONVERGED" if r["converge_s"] is None else f"{r['converge_s']:.2f} s"
            extra = (f"  capture {r['capture_ops_s']} ops/s, apply {r['apply_ops_s']} ops/s "
                     f"(done {r['apply_behind_s']} s after capture)"
                     if "capture_ops_s" in r else "")
            print(f"{name:<10} run {i + 1:>2}: {r['ops']:>7} ops, storm {r['storm_s']:6.2f} s, "
                  f"converged {conv}{extra}  coalesced {r['coalesced']}  resyncs {r['resyncs']}",
                  flush=True)
            if r["converge_s"] is None and failed is None:
                failed = r
    print()
    print(f"{'storm':<10} {'runs':>4} {'converged':>9} {'p50 s':>7} {'max s':>7} {'mean s':>7} "
          f"{'ops/run':>8}")
    for name in names:
        rs = [r for r in rows if r["storm"] == name]
        ok = sorted(r["converge_s"] for r in rs if r["converge_s"] is not None)
        p50 = f"{ok[(len(ok) - 1) // 2]:.2f}" if ok else "-"
        mx = f"{max(ok):.2f}" if ok else "-"
        mean = f"{sum(ok) / len(ok):.2f}" if ok else "-"
        ops = sum(r["ops"] for r in rs) // max(1, len(rs))
        print(f"{name:<10} {len(rs):>4} {len(ok):>9} {p50:>7} {mx:>7} {mean:>7} {ops:>8}")
    if failed is not None:
        print(f"\n{failed['storm']} did not converge within {args.bound} s (trees kept in "
              f"{failed['dir']}; error: {failed['error'] or '-'}); rsync says:\n"
              + "\n".join(failed["itemize"].splitlines()[:40]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
