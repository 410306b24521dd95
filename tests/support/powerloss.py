"""Power-loss trials against a real target daemon (issue 16, "Durable means
durable"): ``python tools/powerloss.py --trials 50``.

In each trial a target daemon keeps its whole state directory (applied
sequence, target queue, registry) and its map base on a LazyFS-style layer
(:mod:`support.lazyfs`, a process of its own). A source streams a workload
to it; at a random moment the target daemon is SIGKILLed and the layer loses
its power (every write not fsynced is forgotten); then the layer and the
daemon start again on what the "disk" kept, and the trial judges:

(a) **converged**: ``rsync -aHAX --checksum --dry-run --itemize-changes
    --delete`` from the source to the replica prints nothing within the
    deadline;
(b) **nothing the source discarded is missing**: it converged without a
    remirror (the source's "resetting the stream, a mirror must follow": the
    target held less than the source had been told was safe) and without a
    targeted resync (the target's "asking the source for a resync": the
    applier found what it lacked). A repair that hides a loss is a failure,
    named in the table ("remirror", "resync"). A resync of ops *replayed*
    above the target's durable watermark (the source still held them)
    hides nothing; it is counted apart ("replay resyncs"), and so is a
    resync that a watcher's stream needs anyway: its shadow target, fed
    the same stream and never cut, asked for the same subtree ("stream
    resyncs": a watcher sees changes late). With
    the library source the loss is also counted exactly: the source's
    acknowledged seq at the cut minus what the target held after it;
(c) with ``sync = "fsync"`` (the ``mount`` source): what the application
    was told durable is on the target right after the restart, with the
    source stopped (SIGSTOP): the target applies what it holds alone.

Sources: ``library`` (the library API in this process: exact order; its
sender knows exactly which seq the target acknowledged before the cut),
``watcher`` (a source daemon with watcher capture), and, not in the default
run, ``mount`` (a source daemon's capture mount, ``sync = "fsync"``, an
application appending fsynced records: check (c)). ``--no-power-loss`` cuts
nothing but the daemon (SIGKILL only): the control that shows the losses
come from the power loss.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import logging
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from support.daemons import PASSWORD, Node, package_path, smirror, wait_for
from support.faults import Background, env_for, fs_workload, percentile, table, wait_converged
from support.lazyfs import LazyProcess, clear
from support.workload import Workload

DEADLINE = 30.0                     # seconds a trial may take to converge after the restart
SOURCES = ("library", "watcher")
# mount: check (c), sync = "fsync" (not in the default run: the judge's
# figures stay comparable with the earlier runs)
ALL_SOURCES = SOURCES + ("mount",)
# the library API records no mtime of directories and symlinks
LIBRARY_RSYNC_EXTRA = ("--omit-dir-times", "--omit-link-times")

RESET_LINE = "a mirror must follow"             # the source: the target lacks what it discarded
RESYNC_LINE = "asking the source for a resync"  # the target: the applier found a gap
# a resync of ops replayed above the durable watermark: the source still
# held them, so it hides no loss of acknowledged ops (said by the target)
from smirror.stream.receiver import REPLAY_REASON  # noqa: E402


def count_resyncs(log_text: str) -> tuple[int, int]:
    """(resyncs that repair a gap, resyncs of replayed ops) in a target log."""
    lines = [line for line in log_text.splitlines() if RESYNC_LINE in line]
    replays = sum(REPLAY_REASON in line for line in lines)
    return len(lines) - replays, replays


RESYNC_ROOT = re.compile(RESYNC_LINE + r" of (b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\")")


def resync_roots(log_text: str, replays: bool = True) -> list[bytes]:
    """The subtrees a target log asked resyncs of (``replays``: those of
    replayed ops too)."""
    roots = []
    for line in log_text.splitlines():
        m = RESYNC_ROOT.search(line)
        if m and (replays or REPLAY_REASON not in line):
            roots.append(ast.literal_eval(m.group(1)))
    return roots


def overlaps(root: bytes, others) -> bool:
    """``root`` is one of ``others``, or lies under one, or holds one."""
    return any(root == o or root.startswith(o + b"/") or o.startswith(root + b"/") or not o
               or not root for o in others)


def classify_resyncs(target_log: str, shadow_log: str | None) -> dict:
    """The resyncs a powered target asked after its restart: of replayed
    ops, the stream's (the shadow target asked for the same subtree), and
    the rest (a loss a repair hides)."""
    resyncs, replays = count_resyncs(target_log)
    stream = 0
    if shadow_log is not None:
        theirs = resync_roots(shadow_log)
        stream = sum(overlaps(root, theirs) for root in resync_roots(target_log, replays=False))
    return {"resyncs": resyncs - stream, "stream_resyncs": stream, "replay_resyncs": replays}
# the boot id's place in the target's applied-state file (stream.apply)
BOOT_END = 40
HELD = re.compile(r"target holds up to seq (\d+) but the source queue starts at")


class PoweredTarget:
    """A target daemon whose state directory and map base lie on the
    layer: ``disk`` (the backing directory: what survives) served at
    ``powered``."""

    def __init__(self, tmp: Path, env: dict):
        self.tmp = tmp
        self.disk, self.powered = tmp / "disk", tmp / "powered"
        self.disk.mkdir()
        layer_env = dict(env, PYTHONPATH=os.pathsep.join([package_path(), str(Path(__file__).parent.parent)]))
        self.layer = LazyProcess(self.disk, self.powered, env=layer_env, log_path=tmp / "lazyfs.log")
        self.layer.start()
        self.node = Node(tmp, "target", env, state_dir=self.powered / "state")
        self.node.add_user("admin", "admin")
        self.node.add_user("repl", "replication")
        self.node.start()
        self.map_base = self.powered / "replica"

    def cut(self, power: bool = True) -> None:
        """SIGKILL the daemon, then (``power``) the layer's power: the
        machine comes back in another boot."""
        self.node.kill()
        if power:
            self.layer.power_loss()
            self.new_boot()

    def new_boot(self) -> None:
        """The applied-state files on the disk were written in the boot
        before (what a real power loss makes of the kernel's boot id; the
        harness's machine keeps running): the target cannot take their
        applied seq on trust (stream.apply)."""
        for state in (self.disk / "state").glob("targets/*/target-*/applied"):
            raw = bytearray(state.read_bytes())
            if raw[:8] in (b"SMAPPLY2", b"SMAPPLY3") and len(raw) >= BOOT_END:
                raw[BOOT_END - 16:BOOT_END] = os.urandom(16)
                state.write_bytes(bytes(raw))

    def restart(self) -> None:
        if self.layer.proc.poll() is not None:
            self.layer.start()
        self.node.start()

    def log_since(self, offset: int) -> str:
        return self.node.log()[offset:]

    def close(self) -> None:
        if self.node.proc is not None and self.node.proc.poll() is None:
            self.node.kill(signal.SIGTERM)
        self.layer.stop()


class SenderLog(logging.Handler):
    """The in-process sender's warnings (its resets), kept."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


class LibraryTrial:
    """The library API in this process streams a workload to the powered
    target."""
    name = "library API"
    rsync_extra = LIBRARY_RSYNC_EXTRA

    def __init__(self, tmp: Path, rng: random.Random):
        from smirror.capture.recorder import Recorder
        from smirror.daemon import handshake
        from smirror.kernels.memqueue import SpillQueue
        from smirror.stream import wire
        from smirror.stream.journal import ConnectionJournal
        from smirror.stream.sender import Sender
        self.rng = rng
        self.src = tmp / "src"
        self.src.mkdir()
        self.target = PoweredTarget(tmp, env_for(tmp))
        self.dst = self.target.map_base
        self.queue = SpillQueue(str(tmp / "source-queue"), 4 << 20, 1 << 30)
        self.journal = ConnectionJournal(self.queue, max_ops=32)

        def dial():
            link = wire.connect("127.0.0.1", self.target.node.port)
            handshake.login(link, "repl", PASSWORD, purpose="data")
            return link
        self.log = SenderLog()
        logging.getLogger("smirror.stream.sender").addHandler(self.log)
        self.sender = Sender(1, str(self.dst), self.journal, dial, source_name="powerloss",
                             retry_interval=0.05).start()
        self.work = Background(Workload(Recorder(self.src, self.journal.append),
                                        seed=rng.randrange(1 << 30), max_write=20_000))

    def run(self, power: bool) -> dict:
        """The workload, the cut, the restart; what the source knew."""
        self.work.start()
        time.sleep(self.rng.uniform(0.3, 1.5))
        target_log = len(self.target.node.log())
        connects = self.sender.connects
        self.target.cut(power)
        acked = self.sender.acked_seq           # what the source had discarded: acknowledged
        time.sleep(self.rng.uniform(0.0, 0.3))
        self.target.restart()
        wait_for(lambda: self.sender.connects > connects, 60, "the source to reconnect")
        self.work.stop()
        self.journal.flush()
        held = [int(m.group(1)) for line in self.log.lines if (m := HELD.search(line))]
        return {"acked": acked, "resets": len(held),
                # acknowledged, discarded by the source, and not on the target
                "ops_lost": max(0, acked - min(held)) if held else 0,
                "target_log": target_log}

    def repairs(self, info: dict) -> dict:
        resyncs, replays = count_resyncs(self.target.log_since(info["target_log"]))
        return {"resyncs": resyncs, "replay_resyncs": replays}

    def logs(self) -> str:
        return "\n".join(self.log.lines[-20:]) + "\n---- target\n" + self.target.node.log()[-4000:]

    def close(self) -> None:
        logging.getLogger("smirror.stream.sender").removeHandler(self.log)
        self.sender.stop()
        self.queue.close()
        self.target.close()


class WatcherTrial:
    """A source daemon (watcher capture) streams a workload made on its
    tree to the powered target, and the same stream to a *shadow* target
    that nothing cuts: a watcher sees changes late, so its stream has gaps
    that a target repairs with a resync in any run; a resync of the powered
    target that the shadow asked too (the same subtree) is the stream's, not
    a loss (counted apart, "stream resyncs")."""
    name = "source daemon (watcher)"
    rsync_extra = ()
    shadow: Node | None = None

    def __init__(self, tmp: Path, rng: random.Random):
        self.rng = rng
        env = env_for(tmp)
        self.src = tmp / "src"
        self.src.mkdir()
        self.target = PoweredTarget(tmp, env)
        self.dst = self.target.map_base
        self.shadow = Node(tmp, "shadow", env)
        self.shadow.add_user("repl", "replication")
        self.shadow.start()
        self.source = Node(tmp, "source", env, links_user="repl")
        self.source.add_user("admin", "admin")
        self.source.start()
        smirror("login", self.source.address, "--user", "admin", "--password-env", "PW",
                env={**env, "PW": PASSWORD})
        self.source.cli("repset", "create", "data", "--root", self.src)
        for node, base in ((self.target.node, self.dst), (self.shadow, tmp / "shadow-replica")):
            self.source.cli("connect", "data", "to", node.address, "map", "base", base,
                            "--orphans", "delete")
        self.work = Background(fs_workload(self.src, rng.randrange(1 << 30)))

    def run(self, power: bool) -> dict:
        self.work.start()
        time.sleep(self.rng.uniform(0.3, 1.5))
        source_log, target_log = len(self.source.log()), len(self.target.node.log())
        self.target.cut(power)
        time.sleep(self.rng.uniform(0.0, 0.3))
        self.target.restart()
        time.sleep(self.rng.uniform(0.0, 0.3))
        self.work.stop()
        self.source_log = source_log
        return {"acked": None, "ops_lost": None, "source_log": source_log, "target_log": target_log}

    def repairs(self, info: dict) -> dict:
        """Counted once the trial converged (or not): the repairs come late."""
        shadow = None if self.shadow is None else self.shadow.log()
        return {"resets": self.source.log()[info["source_log"]:].count(RESET_LINE),
                **classify_resyncs(self.target.log_since(info["target_log"]), shadow)}

    def logs(self) -> str:
        shadow = "" if self.shadow is None else \
            "\n---- shadow target\n" + self.shadow.log()[-2000:]
        return self.source.log()[-4000:] + "\n---- target\n" + self.target.node.log()[-4000:] + shadow

    def close(self) -> None:
        if self.source.proc is not None and self.source.proc.poll() is None:
            self.source.kill(signal.SIGTERM)
        if self.shadow is not None and self.shadow.proc is not None and self.shadow.proc.poll() is None:
            self.shadow.kill(signal.SIGTERM)
        self.target.close()


class CommitLog:
    """The application of the mount trials: appends numbered records to a
    few files through the source's mount, each followed by an fsync; a
    record counts as committed once its fsync returned (with ``sync =
    "fsync"``: once the target made it durable)."""

    FILES = 4

    def __init__(self, mountpoint: Path, rng: random.Random):
        self.mnt = mountpoint
        self.rng = random.Random(rng.randrange(1 << 30))
        self.committed = [0] * self.FILES
        self.error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None

    @staticmethod
    def record(i: int, n: int) -> bytes:
        return f"log-{i} record {n} ".encode() + bytes([65 + n % 26]) * (n * 37 % 700) + b"\n"

    def expected(self, i: int, upto: int) -> bytes:
        return b"".join(self.record(i, n) for n in range(1, upto + 1))

    def start(self) -> CommitLog:
        self._thread = threading.Thread(target=self._run, daemon=True, name="commit-log")
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            fds = [os.open(self.mnt / f"log-{i}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                   for i in range(self.FILES)]
            try:
                while not self._stop:
                    i = self.rng.randrange(self.FILES)
                    n = self.committed[i] + 1
                    os.write(fds[i], self.record(i, n))
                    os.fsync(fds[i])
                    self.committed[i] = n
            finally:
                for fd in fds:
                    os.close(fd)
        except BaseException as exc:      # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join(120)
        if self.error is not None:
            raise RuntimeError(f"the application failed: {self.error!r}") from self.error

    def missing(self, replica: Path, committed: list) -> list[str]:
        """The committed records the replica lacks (by file)."""
        out = []
        for i, upto in enumerate(committed):
            if not upto:
                continue
            try:
                have = (replica / f"log-{i}").read_bytes()
            except FileNotFoundError:
                have = b""
            want = self.expected(i, upto)
            if not have.startswith(want):
                records = have.count(b"\n") if want.startswith(have) else "a different content"
                out.append(f"log-{i}: {upto} records committed, the target holds {records}")
        return out


class MountTrial(WatcherTrial):
    """A source daemon with a capture mount (``capture = "mount"``) and
    ``sync = "fsync"``: the application's fsync returns
    once the target made its op durable. Besides (a) and (b), (c): right
    after the restart, with the source stopped (SIGSTOP), once the target
    applied what it held, every record whose fsync returned is there."""
    name = "source daemon (mount, sync fsync)"

    def __init__(self, tmp: Path, rng: random.Random):
        self.rng = rng
        env = self.env = env_for(tmp)
        self.src, self.mnt = tmp / "backing", tmp / "app"
        self.src.mkdir()
        self.target = PoweredTarget(tmp, env)
        self.dst = self.target.map_base
        self.source = Node(tmp, "source", env, links_user="repl")
        self.source.add_user("admin", "admin")
        self.source.start()
        for node in (self.source, self.target.node):
            smirror("login", node.address, "--user", "admin", "--password-env", "PW",
                    env={**env, "PW": PASSWORD})
        self.source.cli("repset", "create", "data", "--root", self.src, "--mount", self.mnt)
        self.source.cli("connect", "data", "to", self.target.node.address, "map", "base", self.dst,
                        "--sync", "fsync")
        self.app = CommitLog(self.mnt, rng)

    def run(self, power: bool) -> dict:
        self.app.start()
        time.sleep(self.rng.uniform(0.3, 1.5))
        source_log, target_log = len(self.source.log()), len(self.target.node.log())
        self.target.cut(power)
        committed = list(self.app.committed)     # told durable before the cut
        self.target.layer.start()                 # (with the source running: see docs/durability.md)
        self.source.proc.send_signal(signal.SIGSTOP)
        try:
            self.target.restart()
            # (a daemon's sessions do not outlive it)
            smirror("login", self.target.node.address, "--user", "admin", "--password-env", "PW",
                    env={**self.env, "PW": PASSWORD})
            held = wait_for(self._drained, 60, "the target to apply what it held")
            missing = self.app.missing(self.dst, committed)
        finally:
            self.source.proc.send_signal(signal.SIGCONT)
        self.app.stop()
        return {"acked": sum(committed), "ops_lost": None, "source_log": source_log,
                "target_log": target_log, "committed_missing": missing, "target_held": held}

    def _drained(self):
        """The target applied what it holds (its queue, in order), or has
        applied nothing more for QUIET seconds: what lies past a gap in
        its queue comes from the source, stopped now, and was never said
        durable (the durable watermark counts the queue only from the
        applied seq on)."""
        from support.faults import target_connection
        c = target_connection(self.target.node)
        if not c:
            return None
        applied, now = c.get("seq_applied", 0), time.monotonic()
        if applied == c.get("seq_received"):
            return applied or True
        if applied != self._last_applied:
            self._last_applied, self._still_since = applied, now
        elif now - self._still_since >= self.QUIET:
            return applied or True
        return None

    QUIET = 3.0
    _last_applied, _still_since = -1, 0.0

    def close(self) -> None:
        if self.source.proc is not None:
            self.source.proc.send_signal(signal.SIGCONT)
        super().close()


def one_trial(kind: str, tmp: Path, rng: random.Random, power: bool, deadline: float) -> dict:
    """A fresh source, a fresh powered target, one cut. The outcome: ok,
    or what failed ("diverged", "remirror", "resync": a loss of acknowledged
    ops, hidden by a repair in the last two)."""
    trial = TRIALS[kind](tmp, rng)
    try:
        info = trial.run(power)
        if kind == "library" and info["resets"]:
            deadline = 0        # it lost what the source discarded: no mirror comes to hide it
        took, left = wait_converged(trial.src, trial.dst, deadline, trial.rsync_extra)
        info.update(trial.repairs(info))
        failed = ("committed-missing" if info.get("committed_missing") else
                  "diverged" if took is None else "remirror" if info["resets"]
                  else "resync" if info["resyncs"] else "")
        return {"kind": kind, "took": took, "left": left[:10], "failed": failed,
                "acked": info["acked"], "ops_lost": info["ops_lost"], "resets": info["resets"],
                "resyncs": info["resyncs"], "replay_resyncs": info["replay_resyncs"],
                "stream_resyncs": info.get("stream_resyncs", 0),
                "committed_missing": info.get("committed_missing"),
                "logs": trial.logs() if failed else ""}
    finally:
        with contextlib.suppress(Exception):
            trial.close()


TRIALS = {"library": LibraryTrial, "watcher": WatcherTrial, "mount": MountTrial}


def run_trials(trials: int, seed: int = 1, sources=SOURCES, power: bool = True,
               deadline: float = DEADLINE, keep: bool = False, workdir=None, out=sys.stdout) -> dict:
    """``trials`` power cuts spread over ``sources`` in turn. Returns per
    source: trials, outcomes, converge times. ``keep``: the directories of
    failed trials (trees, disk, logs) stay, their place printed."""
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="smirror-powerloss-", dir=workdir))
    results: dict = {}
    kept = False
    try:
        for i in range(trials):
            kind = sources[i % len(sources)]
            tmp = root / f"trial-{i}-{kind}"
            tmp.mkdir()
            r = results.setdefault(kind, {"trials": 0, "converged": 0, "failed": {}, "times": [],
                                          "failures": [], "ops_lost": 0, "replay_resyncs": 0,
                                          "stream_resyncs": 0,
                                          "committed": 0, "committed_missing": 0})
            r["trials"] += 1
            res = one_trial(kind, tmp, rng, power, deadline)
            if res["took"] is not None:
                r["converged"] += 1
            r["ops_lost"] += res["ops_lost"] or 0
            if kind == "mount":         # (c): records told durable, and those missing
                r["committed"] += res["acked"] or 0
                r["committed_missing"] += len(res["committed_missing"] or ())
            r["replay_resyncs"] += res["replay_resyncs"]
            r["stream_resyncs"] += res["stream_resyncs"]
            if res["failed"]:
                r["failed"][res["failed"]] = r["failed"].get(res["failed"], 0) + 1
                r["failures"].append({"trial": i, **res})
                print(f"trial {i} ({kind}): LOST ({res['failed']}; resets {res['resets']}, "
                      f"resyncs {res['resyncs']}, stream resyncs {res['stream_resyncs']}): "
                      f"{res['left'][:3]}", file=out, flush=True)
                if keep:
                    (tmp / "logs.txt").write_text(res["logs"])
                    kept = True
                    continue
            else:
                r["times"].append(res["took"])
                print(f"trial {i} ({kind}): converged in {res['took']:.2f} s, nothing lost",
                      file=out, flush=True)
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        for d in root.glob("trial-*/powered"):
            with contextlib.suppress(Exception):
                clear(d)
        if kept:
            print(f"failed trials kept in {root}", file=out, flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return results


def summary(results: dict) -> str:
    rows = []
    for kind, r in results.items():
        t = r["times"]
        lost = sum(r["failed"].values())
        how = ", ".join(f"{k} {v}" for k, v in sorted(r["failed"].items())) or "-"
        gone = r["ops_lost"] if kind == "library" else \
            f"(c) {r['committed_missing']} files short of {r['committed']} records" \
            if kind == "mount" else "-"
        stream = r["stream_resyncs"] if kind == "watcher" else "-"
        rows.append([kind, r["trials"], r["converged"], lost, how, gone, r["replay_resyncs"],
                     stream, f"{percentile(t, 50):.2f}", f"{percentile(t, 99):.2f}"])
    return table(rows, ["source", "trials", "converged", "failed (a or b)", "how",
                        "acknowledged ops lost", "replay resyncs", "stream resyncs",
                        "converge p50 s", "converge p99 s"])


def main(argv=None) -> int:
    logging.getLogger("smirror").setLevel(logging.WARNING)
    logging.getLogger("smirror").propagate = False       # the sender's retries stay quiet
    p = argparse.ArgumentParser(prog="powerloss.py", description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sources", default=",".join(SOURCES),
                   help="comma-separated, from: " + ", ".join(ALL_SOURCES) + " (default %(default)s)")
    p.add_argument("--deadline", type=float, default=DEADLINE,
                   help="seconds a trial may take to converge (default %(default)s)")
    p.add_argument("--no-power-loss", action="store_true",
                   help="SIGKILL the target daemon only (the control)")
    p.add_argument("--keep", action="store_true", help="keep the directories of failed trials")
    args = p.parse_args(argv)
    sources = tuple(s for s in args.sources.split(",") if s)
    bad = [s for s in sources if s not in ALL_SOURCES]
    if bad or not sources:
        p.error(f"--sources: unknown {', '.join(bad) or '(none)'} (known: {', '.join(ALL_SOURCES)})")
    if args.trials < 1:
        p.error("--trials must be at least 1")
    t0 = time.monotonic()
    res = run_trials(args.trials, args.seed, sources, not args.no_power_loss, args.deadline,
                     args.keep)
    print(f"\n`python tools/powerloss.py --trials {args.trials} --seed {args.seed} --sources "
          f"{','.join(sources)}{' --no-power-loss' if args.no_power_loss else ''}` "
          f"({time.monotonic() - t0:.0f} s)\n")
    print(summary(res))
    return 0 if not any(r["failed"] for r in res.values()) else 1
