"""Network faults between two smirror daemons (issue 11, "Faults").

A source daemon in one network namespace and a target daemon in another,
joined by tools/netem.py (a userspace netem: this kernel has no sch_netem).
A workload writes on the source's replication set (watcher capture) while
the link drops, delays, reorders, duplicates packets, or goes down for 1-10 s.
After each trial the faults stay on and the target must converge within
DEADLINE seconds:

- ``rsync -aHAX --checksum --dry-run --itemize-changes --delete SRC/ DST/``
  prints nothing;
- the source acknowledged every op it captured and the target applied up to
  the source's last seq (``status``: seq_captured == seq_acked == seq_applied);
- the target applied that trial's ops with no gap and no repeat: its
  ops_applied grew by exactly as much as its seq_applied (ops that reached
  its applier again are skipped by seq and counted, ``repeats skipped``);
- the target's log has no traceback and no refused out-of-order frame.

    python tools/netfaults.py --trials 10              every fault kind, 10 trials each
    python tools/netfaults.py --kinds flap --trials 3 --seconds 20

Prints a table (trials, converged, time to converge per fault kind) and
exits 0 when every trial passed.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from support.faults import Background, env_for, fs_workload, percentile, rsync_diff, table
from support.netem import NetemPair, unavailable
from support.netns import NetnsDaemon

DEADLINE = 90.0

# fault kind -> netem settings (tools/netem.py); "flap" takes the link down
# for 1-10 s now and then, "all" does everything at once
KINDS = {
    "loss": {"loss": 0.05},
    "delay": {"delay_ms": 50, "jitter_ms": 20},
    "reorder": {"delay_ms": 50, "reorder": 0.25},      # reordering needs a delay to overtake
    "duplicate": {"duplicate": 0.05},
    "flap": {},
    "cut": {},
    "all": {"loss": 0.05, "delay_ms": 50, "jitter_ms": 20, "reorder": 0.25, "duplicate": 0.05},
}
FLAPPING = ("flap", "cut", "all")
CUTTING = ("cut", "all")          # the data link's TCP connections are aborted as the link goes down
DESCRIBE = {
    "loss": "loss 5%", "delay": "delay 50 ms +- 20 ms", "reorder": "reorder 25% (delay 50 ms)",
    "duplicate": "duplicate 5%", "flap": "link down 1-10 s",
    "cut": "link down 1-10 s, connections reset", "all": "all of them at once",
}
# what the target's log must never say
BAD_LOG = ("Traceback", "does not follow seq", "is not above the last seq")


class Bench:
    """The two daemons and the link between them, for any number of trials."""

    def __init__(self, tmp: Path, seed: int):
        self.tmp = tmp
        self.rng = random.Random(seed)
        self.pair = NetemPair(f"{os.getpid() % 10000}", seed=seed).__enter__()
        try:
            env = env_for(tmp)
            self.src, self.dst = tmp / "src", tmp / "dst"
            self.src.mkdir()
            self.source = NetnsDaemon(tmp, "source", env, self.pair.ns_a, self.pair.addr_a, links_user="repl")
            self.target = NetnsDaemon(tmp, "target", env, self.pair.ns_b, self.pair.addr_b)
            for n in (self.source, self.target):
                n.add_user("admin", "admin")
            self.target.add_user("repl", "replication")
            self.source.start()
            self.target.start()
            self.source.login()
            self.target.login()
            self.source.cli("repset", "create", "data", "--root", self.src)
            self.source.cli("connect", "data", "to", self.target.data_address, "map", "base", self.dst,
                            "--orphans", "delete")
            self.workload = fs_workload(self.src, self.rng.randrange(1 << 30))
            left = self.settle(60)
            if left:
                raise RuntimeError(f"the first mirror did not converge: {left}")
        except BaseException:
            self.close()
            raise

    def seqs(self) -> dict:
        s, t = self.source.status()["sources"], self.target.status()["targets"]
        s, t = (s[0] if s else {}), (t[0] if t else {})
        return {"captured": s.get("seq_captured", -1), "acked": s.get("seq_acked", -1),
                "connects": s.get("connects", 0), "source_error": s.get("last_error", ""),
                "applied": t.get("seq_applied", -1), "ops_applied": t.get("ops_applied", -1),
                "ops_skipped": t.get("ops_skipped", -1), "target_error": t.get("error", "")}

    def settle(self, deadline: float) -> list:
        """Wait until the target converged (module docstring); what is
        still different ([] when converged)."""
        t0 = time.monotonic()
        while True:
            left = rsync_diff(self.src, self.dst) if self.dst.is_dir() else ["map base missing"]
            if not left:
                st = self.seqs()
                if st["captured"] == st["acked"] == st["applied"] >= 0:
                    # the watcher may still capture the last changes: equal twice in a row
                    if not rsync_diff(self.src, self.dst) and self.seqs() == st:
                        return []
                left = [f"seqs not equal yet: {st}"]
            if time.monotonic() - t0 > deadline:
                return left[:10]
            time.sleep(0.2)

    def trial(self, kind: str, seconds: float, pace: float, deadline: float, flap_s=(1, 10)) -> dict:
        before = self.seqs()
        self.pair.set(**{**dict.fromkeys(("loss", "delay_ms", "jitter_ms", "reorder", "duplicate"), 0),
                         **KINDS[kind]})
        self.pair.reset_counts()
        work = Background(self.workload, pace=pace).start()
        t0, flaps, down_s, cut = time.monotonic(), 0, 0.0, 0
        try:
            if kind in FLAPPING:
                while True:
                    time.sleep(self.rng.uniform(0.5, 2.0))
                    down = self.rng.uniform(*flap_s)
                    self.pair.down()
                    if kind in CUTTING:
                        cut += self.pair.cut()
                    time.sleep(down)
                    self.pair.up()
                    flaps, down_s = flaps + 1, down_s + down
                    if time.monotonic() - t0 >= seconds:
                        break
            else:
                time.sleep(seconds)
        finally:
            self.pair.up()
            work.stop()
        t_stop = time.monotonic()
        left = self.settle(deadline)
        took = None if left else time.monotonic() - t_stop
        after = self.seqs()
        link = self.pair.stats()
        self.pair.clear()
        ops = after["applied"] - before["applied"]
        problems = list(left)
        if not left:
            if after["ops_applied"] - before["ops_applied"] != ops:
                problems.append(f"seq_applied went {before['applied']} -> {after['applied']} but "
                                f"{after['ops_applied'] - before['ops_applied']} ops were applied: "
                                "a gap or a repeat")
        if kind in CUTTING and not left and after["connects"] - before["connects"] < 1:
            problems.append(f"{cut} sockets were cut but the source never reconnected")
        log = self.target.log()
        bad = [line for line in log.splitlines() if any(b in line for b in BAD_LOG)]
        if bad:
            problems.append(f"target log: {bad[:3]}")
        res = {"kind": kind, "ops": ops, "seconds": round(t_stop - t0, 1), "flaps": flaps,
               "down_s": round(down_s, 1), "converged_s": None if problems else round(took, 2),
               "reconnects": after["connects"] - before["connects"], "problems": problems,
               "sockets_cut": cut,
               # ops that reached the applier again and were skipped by seq: a frame
               # moved from the handoff to the durable queue while being applied, or
               # sent again after a reconnect (never applied twice: see ops_applied)
               "repeats_skipped": after["ops_skipped"] - before["ops_skipped"],
               "link": {k: link[k] for k in ("in", "lost", "duplicated", "reordered", "down_dropped")}}
        return res

    def logs(self) -> str:
        return self.source.log()[-3000:] + "\n---- target\n" + self.target.log()[-3000:]

    def close(self) -> None:
        for n in (getattr(self, "source", None), getattr(self, "target", None)):
            if n is not None and n._client is not None:
                n._client.link.close()
            if n is not None and n.proc and n.proc.poll() is None:
                n.kill(signal.SIGTERM)
        self.pair.close()


def run(kinds=tuple(KINDS), trials: int = 1, seconds: float = 5, pace: float = 0.01, seed: int = 5,
        deadline: float = DEADLINE, workdir=None, out=sys.stdout, stop_on_failure=False) -> dict:
    """TRIALS trials of each fault kind in KINDS (in turn), SECONDS of
    workload each (one step every PACE s). Returns per kind: trials,
    failures (with what was still wrong and the daemons' logs), converge
    times, ops, reconnects, and the forwarder's counters."""
    tmp = Path(tempfile.mkdtemp(prefix="smirror-netfaults-", dir=workdir))
    results = {k: {"kind": k, "trials": 0, "failures": [], "times": [], "ops": 0, "reconnects": 0,
                   "flaps": 0, "repeats_skipped": 0, "link": {}} for k in kinds}
    bench = None
    try:
        bench = Bench(tmp, seed)
        for i in range(trials):
            for kind in kinds:
                r = bench.trial(kind, seconds, pace, deadline)
                agg = results[kind]
                agg["trials"] += 1
                agg["ops"] += r["ops"]
                agg["reconnects"] += r["reconnects"]
                agg["flaps"] += r["flaps"]
                agg["repeats_skipped"] += r["repeats_skipped"]
                for k, v in r["link"].items():
                    agg["link"][k] = agg["link"].get(k, 0) + v
                if r["converged_s"] is None:
                    agg["failures"].append({**r, "logs": bench.logs()})
                    print(f"trial {i} {kind}: FAILED: {r['problems'][:5]}", file=out, flush=True)
                    if stop_on_failure:
                        return results
                else:
                    agg["times"].append(r["converged_s"])
                    print(f"trial {i} {kind}: {r['ops']} ops, {r['flaps']} flaps, "
                          f"{r['sockets_cut']} sockets cut, {r['reconnects']} reconnects, "
                          f"{r['repeats_skipped']} repeats skipped, converged in {r['converged_s']:.2f} s; "
                          f"link {r['link']}",
                          file=out, flush=True)
    finally:
        if bench is not None:
            bench.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def results_table(results) -> str:
    rows = []
    for r in results.values():
        t = r["times"]
        rows.append([DESCRIBE[r["kind"]], r["trials"], len(t), r["ops"], r["reconnects"],
                     r["repeats_skipped"], f"{percentile(t, 50):.1f}", f"{max(t):.1f}" if t else "-",
                     r["link"].get("lost", 0) + r["link"].get("down_dropped", 0),
                     r["link"].get("duplicated", 0), r["link"].get("reordered", 0)])
    return table(rows, ["fault", "trials", "converged", "ops applied", "reconnects", "repeats skipped",
                        "converge p50 s", "max s", "packets dropped", "duplicated", "overtaking"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="netfaults.py", description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10, help="trials per fault kind (default %(default)s)")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, from: " + ", ".join(KINDS))
    p.add_argument("--seconds", type=float, default=8,
                   help="workload seconds per trial (default %(default)s)")
    p.add_argument("--pace", type=float, default=0.01, help="seconds between workload steps")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--deadline", type=float, default=DEADLINE,
                   help="seconds a trial may take to converge once the workload stops (default %(default)s)")
    args = p.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        p.error(f"--kinds: unknown {', '.join(bad) or '(none given)'} (known: {', '.join(KINDS)})")
    why = unavailable()
    if why:
        print(f"netfaults.py: {why}", file=sys.stderr)
        return 2
    # stopped with SIGTERM (or SIGINT, ignored in a background job): the
    # daemons, the forwarder and the namespaces are taken down all the same
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    res = run(kinds, args.trials, args.seconds, args.pace, args.seed, args.deadline)
    print(f"\n`python tools/netfaults.py --trials {args.trials} --seconds {args.seconds:g} "
          f"--kinds {','.join(kinds)}` ({time.monotonic() - t0:.0f} s, deadline {args.deadline:g} s)\n")
    print(results_table(res))
    failed = [f for r in res.values() for f in r["failures"]]
    for f in failed[:3]:
        print(f"\n{f['kind']}: {f['problems'][:5]}\n{f['logs']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
