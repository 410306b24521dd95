"""``smbench suite``: the standard workloads, each run ``repeats`` times
(the spread of those runs is the noise ``compare`` judges by) beside its
baselines measured in the same run, with the ratios; ``smbench compare``:
what moved between two suite results and which moves are regressions
beyond that noise. Suite results can also be written in pytest-benchmark's
JSON format, so ``pytest benchmarks/`` and smbench share one history."""
from __future__ import annotations

import datetime
import os
import platform
import statistics

import psutil

from .baselines import lsyncd_run, rsync_copy
from .runner import run, run_direct
from .workloads import Params

SUITE = ("bulk", "smallfiles", "oltp", "backup-window", "burst")
RSYNC_FOR = ("bulk", "smallfiles")     # one-shot copies of a tree: what rsync is for
LSYNCD_FOR = ("smallfiles",)            # live replication of many files: lsyncd's job

# metric -> (how to read it from a result, True when higher is better)
METRICS = {
    "throughput_mb_s": (lambda r: r["throughput_mb_s"], True),
    "ops_per_s": (lambda r: r["ops_per_s"], True),
    "lag_p99_ms": (lambda r: r["lag_ms"]["p99"], False),
    "drain_s": (lambda r: r["drain_s"], False),
    "cpu_s_per_gb": (lambda r: r["cpu_s_per_gb"], False),
    "source_rss_growth": (lambda r: r["source"]["rss_growth"], False),
    "target_rss_growth": (lambda r: r["target"]["rss_growth"], False),
}
NOISE_FLOOR = 0.03      # moves smaller than this share are never flagged


def suite_params(quick: bool, duration: float | None, scale: float) -> Params:
    return Params(duration=duration if duration is not None else (2.0 if quick else 30.0),
                  scale=scale, quick=quick)


def summarize(values: list[float | None]) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "min": None, "max": None, "spread": None, "n": 0}
    mean = statistics.fmean(v)
    # run-to-run noise: how far apart the repeats are, max / min - 1
    spread = (max(v) / min(v) - 1 if min(v) > 0 else None) if len(v) > 1 else None
    return {"mean": mean, "min": min(v), "max": max(v), "n": len(v), "spread": spread}


def run_suite(*, quick: bool = False, mode: str = "embedded", repeats: int | None = None,
              duration: float | None = None, scale: float = 1.0, workloads=SUITE,
              baselines: bool = True, say=print, base_dir=None, progress=None) -> dict:
    repeats = repeats or (2 if quick else 3)
    p = suite_params(quick, duration, scale)
    out = {"suite": {"quick": quick, "mode": mode, "repeats": repeats, "duration_s": p.duration,
                     "scale": scale, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                     "host": host_info()},
           "workloads": {}}
    for name in workloads:
        runs, directs = [], []
        for i in range(repeats):
            if baselines:
                # baseline and smirror alternate, so drift on a shared machine hits both
                directs.append(run_direct(name, p, base_dir=base_dir,
                                          after=rsync_copy if name in RSYNC_FOR and i == 0 else None))
            r = run(name, mode=mode, params=p, base_dir=base_dir, progress=progress)
            runs.append(r)
            say(f"{name} run {i + 1}/{repeats}: {r['throughput_mb_s']:.1f} MB/s, lag p99 "
                f"{_num(r['lag_ms']['p99'])} ms, target equals source: "
                f"{'yes' if r['target_equals_source'] else 'NO'}"
                + (f", errors: {'; '.join(r['errors'])}" if r["errors"] else ""))
        summary = {m: summarize([get(r) for r in runs]) for m, (get, _) in METRICS.items()}
        base: dict[str, dict | None] = {"direct": None, "rsync": None, "lsyncd": None}
        if baselines:
            rsync = directs[0].pop("after")
            for d in directs[1:]:
                d.pop("after")
            base["direct"] = dict(directs[0], runs=directs,
                                  throughput_mb_s=statistics.fmean(d["throughput_mb_s"] for d in directs))
            if name in RSYNC_FOR:
                base["rsync"] = rsync or {"baseline": "rsync", "skipped": "rsync is not installed"}
            if name in LSYNCD_FOR:
                base["lsyncd"] = (lsyncd_run(name, p, base_dir=base_dir,
                                             match_timeout=15.0 if quick else 60.0)
                                  or {"baseline": "lsyncd", "skipped": "lsyncd or rsync is not installed"})
        mine = summary["throughput_mb_s"]["mean"]
        ratios = {k: (round(mine / b["throughput_mb_s"], 3)
                      if b and b.get("throughput_mb_s") and mine else None) for k, b in base.items()}
        out["workloads"][name] = {"runs": runs, "summary": summary, "baselines": base,
                                  "ratios": ratios}
        say(f"{name}: smirror {_num(mine)} MB/s; "
            + ", ".join(_baseline_text(k, b, ratios[k]) for k, b in base.items() if b))
    return out


def _baseline_text(kind: str, b: dict, ratio) -> str:
    if b.get("throughput_mb_s"):
        return f"{kind} {b['throughput_mb_s']:.1f} MB/s (smirror/{kind} {ratio:.2f})"
    return f"{kind}: {b.get('skipped') or b.get('error', 'no figure')}"


def _num(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def host_info() -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "ram": psutil.virtual_memory().total,
            "load_1min": os.getloadavg()[0]}


def suite_rows(result: dict) -> list[list]:
    rows = []
    for name, w in result["workloads"].items():
        s = w["summary"]
        rows.append([name, _num(s["throughput_mb_s"]["mean"]), _pct(s["throughput_mb_s"]["spread"]),
                     _num(s["lag_p99_ms"]["mean"]), _num(s["cpu_s_per_gb"]["mean"]),
                     *(_ratio(w["ratios"][k]) for k in ("direct", "rsync", "lsyncd")),
                     "yes" if all(r["target_equals_source"] for r in w["runs"]) else "NO"])
    return rows


SUITE_HEADERS = ["workload", "MB/s", "noise", "lag p99 ms", "CPU s/GB", "vs direct", "vs rsync",
                 "vs lsyncd", "target = source"]


def _pct(v) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


# -- compare ----------------------------------------------------------------------

def compare(old: dict, new: dict) -> dict:
    """Per workload and metric: old and new means, the change (new / old - 1),
    the noise (the larger run-to-run spread, max / min - 1, of the two
    results) and a verdict: ``regression`` / ``improved`` when the means are
    further apart than the repeats of either result (and NOISE_FLOOR) in the
    bad / good direction, else ``same``. With one run per side the noise is
    unknown and nothing is flagged."""
    rows = []
    for name in new["workloads"]:
        if name not in old["workloads"]:
            continue
        so, sn = old["workloads"][name]["summary"], new["workloads"][name]["summary"]
        for metric, (_, higher_better) in METRICS.items():
            a, b = so.get(metric), sn.get(metric)
            if not a or not b or not a["mean"] or not b["mean"] or a["mean"] < 0 or b["mean"] < 0:
                continue
            ratio = b["mean"] / a["mean"]
            spreads = [s for s in (a["spread"], b["spread"]) if s is not None]
            noise = max(spreads) if spreads else None
            verdict = "noise unknown"
            if noise is not None:
                # compared as ratios: a halving and a doubling are the same distance
                beyond = max(1 + noise, 1 + NOISE_FLOOR)
                if ratio > beyond or ratio < 1 / beyond:
                    verdict = "improved" if (ratio > 1) == higher_better else "regression"
                else:
                    verdict = "same"
            rows.append({"workload": name, "metric": metric, "old": a["mean"], "new": b["mean"],
                         "change": ratio - 1, "noise": noise, "verdict": verdict})
    return {"rows": rows, "regressions": [r for r in rows if r["verdict"] == "regression"]}


def compare_rows(cmp: dict) -> list[list]:
    return [[r["workload"], r["metric"], _num(r["old"]), _num(r["new"]),
             "-" if r["change"] is None else f"{r['change'] * 100:+.1f}%", _pct(r["noise"]),
             r["verdict"].upper() if r["verdict"] == "regression" else r["verdict"]]
            for r in cmp["rows"]]


COMPARE_HEADERS = ["workload", "metric", "old", "new", "change", "noise", "verdict"]


def check_suite_json(data, what: str) -> None:
    """A clear error when ``data`` is not an smbench suite result."""
    from smirror.errors import BenchUsageError
    if not isinstance(data, dict) or not isinstance(data.get("workloads"), dict) or "suite" not in data:
        raise BenchUsageError(f"{what}: not an smbench suite result (no 'suite' and 'workloads'): "
                         "write one with 'smbench suite --json FILE'")
    for name, w in data["workloads"].items():
        if not isinstance(w, dict) or not isinstance(w.get("summary"), dict):
            raise BenchUsageError(f"{what}: workload {name!r} has no summary")


# -- pytest-benchmark's format ----------------------------------------------------

def to_pytest_benchmark(result: dict) -> dict:
    """The suite as a pytest-benchmark JSON file: one benchmark per workload,
    its stats over the repeats' elapsed seconds, every figure in extra_info."""
    benches = []
    for name, w in result["workloads"].items():
        data = [r["elapsed_s"] for r in w["runs"]]
        q = statistics.quantiles(data, n=4) if len(data) > 1 else [data[0]] * 3
        mean = statistics.fmean(data)
        benches.append({
            "group": "smbench", "name": f"smbench_{name}", "fullname": f"smbench::{name}",
            "params": None, "param": None,
            "extra_info": {"summary": w["summary"], "ratios": w["ratios"],
                           "bytes_written": w["runs"][0]["bytes_written"]},
            "options": {"disable_gc": False, "timer": "monotonic", "min_rounds": len(data),
                        "max_time": 0, "min_time": 0, "warmup": False},
            "stats": {"min": min(data), "max": max(data), "mean": mean,
                      "stddev": statistics.stdev(data) if len(data) > 1 else 0.0,
                      "rounds": len(data), "median": statistics.median(data),
                      "q1": q[0], "q3": q[2], "iqr": q[2] - q[0], "iqr_outliers": 0,
                      "stddev_outliers": 0, "outliers": "0;0", "ld15iqr": min(data),
                      "hd15iqr": max(data), "ops": 1 / mean if mean else 0, "total": sum(data),
                      "data": data, "iterations": 1},
        })
    return {"machine_info": {"node": platform.node(), "processor": platform.processor(),
                             "machine": platform.machine(),
                             "python_implementation": platform.python_implementation(),
                             "python_version": platform.python_version(),
                             "release": platform.release(), "system": platform.system(),
                             "cpu": {"count": os.cpu_count()}},
            "commit_info": {}, "benchmarks": benches,
            "datetime": result["suite"]["started"], "version": _pytest_benchmark_version()}


def _pytest_benchmark_version() -> str:
    try:
        from importlib.metadata import version
        return version("pytest-benchmark")
    except Exception:        # noqa: BLE001 - not installed: the format's own version then
        return "4.0.0"
