"""``smbench tune``: the smallest source and target memory limits that keep a
workload's throughput within a share of an unbounded run, with no
auto-disconnect, the lag SLO met and (optionally) nothing spilled to disk.

One side is searched at a time, the other left unbounded: a reference run
with both unbounded gives the throughput to keep and the side's peak queue
bytes; the search starts at the power of two at or above that peak
(verified), halves until a trial
fails (coarse geometric steps), then bisects between the last pass and the
first fail until they are within ``resolution`` of each other. The
recommendation is the smallest limit that passed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from smirror.errors import BenchError, BenchUsageError

from . import limits
from .runner import run
from .workloads import Params

MIN_LIMIT = 256 << 10
STEP = 64 << 10          # limits are tried in whole 64 KiB


@dataclass
class Criteria:
    lag_p99_ms: float | None = 50.0          # None: no lag SLO
    throughput_within: float | None = 0.05   # share of the reference; None: not checked
    no_spill: bool = False                   # the side's queue must not spill a frame


@dataclass
class Trial:
    side: str
    limit: int
    result: dict
    ok: bool
    reasons: list[str] = field(default_factory=list)

    def line(self, n: int, reference: dict) -> str:
        r = self.result
        share = r["throughput_mb_s"] / reference["throughput_mb_s"] if reference["throughput_mb_s"] else 0
        p99 = r["lag_ms"]["p99"]
        spilled = r[self.side]["spilled_frames"]
        return (f"trial {n:2d}: {self.side} {limits.size_text(self.limit):>9}: "
                f"{r['throughput_mb_s']:8.1f} MB/s ({share * 100:5.1f}%), lag p99 "
                f"{'-' if p99 is None else f'{p99:.1f} ms'}, spilled {'-' if spilled is None else spilled}, "
                f"RSS +{limits.human(r[self.side]['rss_growth'])}, auto-disconnects "
                f"{r['auto_disconnects']}: {'pass' if self.ok else 'FAIL (' + '; '.join(self.reasons) + ')'}")


def judge(r: dict, reference: dict, side: str, c: Criteria) -> list[str]:
    """Why this trial fails the criteria (empty: it passes)."""
    why = []
    if r["auto_disconnects"]:
        why.append(f"{r['auto_disconnects']} auto-disconnect(s)")
    if not r["target_equals_source"]:
        why.append("target differs from source")
    if r["errors"]:
        why.append(r["errors"][0])
    if c.throughput_within is not None:
        floor = reference["throughput_mb_s"] * (1 - c.throughput_within)
        if r["throughput_mb_s"] < floor:
            why.append(f"throughput below {floor:.1f} MB/s")
    if c.lag_p99_ms is not None and (r["lag_ms"]["p99"] or 0) > c.lag_p99_ms:
        why.append(f"lag p99 above {c.lag_p99_ms:g} ms")
    if c.no_spill and r[side]["spilled_frames"]:
        why.append(f"{r[side]['spilled_frames']} frame(s) spilled")
    return why


def _up(n: int) -> int:
    return max(MIN_LIMIT, -(-n // STEP) * STEP)


def tune(workload: str, *, mode: str = "embedded", params: Params | None = None,
         criteria: Criteria | None = None, sides=("source", "target"), resolution: float = 0.05,
         say=print, base_dir=None, disk_limit: int | None = None) -> dict:
    c = criteria or Criteria()
    if c.no_spill and mode != "embedded":
        raise BenchUsageError("--no-spill needs --mode embedded: the daemons' status does not count "
                         "spilled frames")
    p = params or Params()
    trials: list[Trial] = []
    disk = {} if disk_limit is None else {"disk_limit": disk_limit}

    def trial(side: str, limit: int) -> Trial:
        mem = {"source_memory": limits.UNBOUNDED, "target_memory": limits.UNBOUNDED}
        mem[f"{side}_memory"] = limit
        r = run(workload, mode=mode, params=p, base_dir=base_dir, **mem, **disk)
        t = Trial(side, limit, r, False)
        t.reasons = judge(r, reference, side, c)
        t.ok = not t.reasons
        trials.append(t)
        say(t.line(len(trials), reference))
        return t

    reference = run(workload, mode=mode, params=p, base_dir=base_dir, **disk)
    say(f"reference (unbounded): {reference['throughput_mb_s']:.1f} MB/s, lag p99 "
        f"{reference['lag_ms']['p99'] or 0:.1f} ms, queue peaks in memory: source "
        f"{limits.human(reference['source']['queue_mem_peak'])}, target "
        f"{limits.human(reference['target']['queue_mem_peak'])}")
    if reference["errors"] or not reference["target_equals_source"]:
        raise BenchError(f"the unbounded reference run of {workload} failed: "
                         f"{'; '.join(reference['errors']) or reference['differences']}")
    if c.lag_p99_ms is not None and (reference["lag_ms"]["p99"] or 0) > c.lag_p99_ms:
        say(f"the unbounded run misses the lag SLO itself (p99 {reference['lag_ms']['p99']:.1f} ms > "
            f"{c.lag_p99_ms:g} ms): no memory limit can meet it, the lag criterion is dropped")
        c = Criteria(None, c.throughput_within, c.no_spill)

    recommended: dict[str, int] = {}
    for side in sides:
        # from the power of two at or above the peak an unbounded run queued
        # (a limit there behaves as unbounded), verified
        hi = max(MIN_LIMIT, 1 << (reference[side]["queue_mem_peak"] - 1).bit_length())
        while not trial(side, hi).ok:
            if hi >= limits.UNBOUNDED // 2:
                raise BenchError(f"no {side} memory limit meets the criteria")
            hi *= 2
        lo = 0
        while hi > MIN_LIMIT:                       # coarse: halve until a trial fails
            t = trial(side, _up(hi // 2))
            if not t.ok:
                lo = t.limit
                break
            hi = t.limit
        while lo and hi - lo > max(STEP, resolution * hi):     # fine: bisection
            t = trial(side, _up((lo + hi) // 2))
            if t.limit >= hi:
                break
            if t.ok:
                hi = t.limit
            else:
                lo = t.limit
        recommended[side] = hi
        say(f"{side}: smallest passing limit {limits.size_text(hi)}"
            + (f" (fails at {limits.size_text(lo)})" if lo else " (the smallest tried)"))
    lines = limits.config_lines(recommended.get("source"), recommended.get("target"))
    return {"workload": workload, "mode": mode,
            "criteria": {"lag_p99_ms": c.lag_p99_ms, "throughput_within": c.throughput_within,
                         "no_spill": c.no_spill},
            "reference": reference,
            "trials": [{"side": t.side, "limit": t.limit, "ok": t.ok, "reasons": t.reasons,
                        "throughput_mb_s": t.result["throughput_mb_s"],
                        "lag_ms_p99": t.result["lag_ms"]["p99"],
                        "rss_growth": t.result[t.side]["rss_growth"],
                        "spilled_frames": t.result[t.side]["spilled_frames"],
                        "auto_disconnects": t.result["auto_disconnects"]} for t in trials],
            "recommended": recommended, "config_lines": lines}


def check_plot_support() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchUsageError("--plot needs matplotlib: pip install 'smirror[bench]'") from None


def plot(result: dict, path) -> None:
    """Throughput, lag p99 and RSS growth against the memory limit, one
    column per side searched, the recommendation marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sides = list(result["recommended"])
    fig, axes = plt.subplots(3, len(sides), figsize=(5 * len(sides), 8), squeeze=False, sharex="col")
    for col, side in enumerate(sides):
        ts = sorted((t for t in result["trials"] if t["side"] == side), key=lambda t: t["limit"])
        x = [t["limit"] / (1 << 20) for t in ts]
        series = [("throughput (MB/s)", [t["throughput_mb_s"] for t in ts]),
                  ("lag p99 (ms)", [t["lag_ms_p99"] or 0 for t in ts]),
                  ("RSS growth (MiB)", [t["rss_growth"] / (1 << 20) for t in ts])]
        for row, (label, y) in enumerate(series):
            ax = axes[row][col]
            ax.plot(x, y, "o-")
            for xi, yi, t in zip(x, y, ts, strict=True):
                if not t["ok"]:
                    ax.plot([xi], [yi], "rx", markersize=10)
            ax.axvline(result["recommended"][side] / (1 << 20), color="green", linestyle="--",
                       label=f"recommended {limits.size_text(result['recommended'][side])}")
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(f"{result['workload']}: {side} memory limit")
                ax.legend()
        axes[-1][col].set_xlabel(f"{side} memory limit (MiB); x = trial failed")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
