"""``smbench``: the command line (argparse only; the work is in the modules
beside this one). Exit status: 0 done, 1 a run failed (the target did not
equal the source, an error during the run) or ``compare`` found a
regression, 2 bad input."""
from __future__ import annotations

import argparse
import json
import sys

from smirror.errors import BenchUsageError as UsageError
from smirror.errors import SmirrorError
from smirror.units import parse_duration, parse_size

from . import limits
from .workloads import WORKLOADS, Params

TUNE_SIDES = {"source": ("source",), "target": ("target",), "both": ("source", "target")}


def parse_share(text: str, what: str) -> float | None:
    """``5%`` or ``0.05`` -> 0.05; ``off`` -> None."""
    t = text.strip().lower()
    if t == "off":
        return None
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UsageError(f"{what}: expected a share like 5% or 0.05 (or off), got {text!r}") from None
    if not 0 <= value <= 1:
        raise UsageError(f"{what}: must be between 0% and 100%, got {text!r}")
    return value


def parse_lag(text: str) -> float | None:
    if text.strip().lower() == "off":
        return None
    return parse_duration(text, "--slo-lag-p99") * 1000


def _workload_args(p, duration_default: str = "30s") -> None:
    p.add_argument("workload", help="one of: " + ", ".join(WORKLOADS) + " ('smbench list')")
    p.add_argument("--mode", choices=("embedded", "daemons"), default="embedded",
                   help="embedded: both engines in this process (library capture); daemons: "
                        "two 'smirror serve' processes on 127.0.0.1 (watcher capture)")
    p.add_argument("--duration", default=duration_default, help="how long the workload runs (30s, 2m)")
    p.add_argument("--scale", default="1", help="multiplies the workload's sizes and rates")
    p.add_argument("--quick", action="store_true", help="small sizes: seconds, not minutes")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--burst-size", help="burst: bytes of the burst (default 256MiB x scale)")
    p.add_argument("--pause-target", action="store_true",
                   help="burst: the target is paused during the burst, resumed after it")
    p.add_argument("--disk-limit", help="disk queue limit of each queue (default 8GiB); past it "
                                        "the connection auto-disconnects")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="smbench", description="smirror workloads, measurements and "
                                 "memory tuning (docs/smbench.md)")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the workloads, one line each")

    p = sub.add_parser("run", help="run one workload and report every figure")
    _workload_args(p)
    p.add_argument("--source-memory", help="source queue memory limit (default: unbounded)")
    p.add_argument("--target-memory", help="target queue memory limit (default: unbounded)")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON ('-': stdout)")

    p = sub.add_parser("tune", help="the smallest source and target memory limits that keep throughput")
    _workload_args(p, "10s")
    p.add_argument("--slo-lag-p99", default="50ms", help="lag p99 to meet (off: none)")
    p.add_argument("--throughput-within", default="5%",
                   help="share of the unbounded run's throughput to keep (off: not checked)")
    p.add_argument("--no-spill", action="store_true", help="a trial passes only if its queue spilled nothing")
    p.add_argument("--side", choices=tuple(TUNE_SIDES), default="both", help="which limit to search")
    p.add_argument("--resolution", default="5%", help="bisection stops when the bounds are this close")
    p.add_argument("--plot", metavar="FILE.png", help="throughput, lag p99 and RSS against the limit")
    p.add_argument("--json", metavar="FILE", help="write every trial and the recommendation as JSON")

    p = sub.add_parser("advise", help="the note's memory sizing with this machine's numbers")
    p.add_argument("--app-reserve", help="memory the application needs (default: what the largest "
                                         "processes hold now)")
    p.add_argument("--json", metavar="FILE")

    p = sub.add_parser("suite", help="the standard workloads beside their baselines, with ratios")
    p.add_argument("--quick", action="store_true", help="small sizes, 2 repeats: under a minute")
    p.add_argument("--mode", choices=("embedded", "daemons"), default="embedded")
    p.add_argument("--repeats", type=int, help="runs per workload (default 3, --quick 2)")
    p.add_argument("--duration", help="duration of the timed workloads (default 30s, --quick 2s)")
    p.add_argument("--scale", default="1")
    p.add_argument("--no-baselines", action="store_true", help="smirror's runs only")
    p.add_argument("--json", metavar="FILE", help="the whole result ('smbench compare' reads it)")
    p.add_argument("--benchmark-json", metavar="FILE", help="the result in pytest-benchmark's format")

    p = sub.add_parser("compare", help="what moved between two suite results, regressions flagged")
    p.add_argument("old", metavar="OLD.json")
    p.add_argument("new", metavar="NEW.json")
    p.add_argument("--json", metavar="FILE")
    return ap


def _scale(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise UsageError(f"--scale: expected a number above 0, got {text!r}")
    return v


def _params(a) -> Params:
    if a.workload not in WORKLOADS:
        raise UsageError(f"unknown workload {a.workload!r}: choose one of {', '.join(WORKLOADS)} "
                         "('smbench list')")
    duration = parse_duration(a.duration, "--duration")
    if duration <= 0:
        raise UsageError(f"--duration must be above 0, got {a.duration!r}")
    burst = parse_size(a.burst_size, "--burst-size") if a.burst_size else None
    if burst == 0:
        raise UsageError("--burst-size must be above 0")
    if (burst or a.pause_target) and a.workload != "burst":
        raise UsageError("--burst-size and --pause-target apply to the burst workload only")
    return Params(duration=duration, scale=_scale(a.scale), quick=a.quick, seed=a.seed,
                  burst_size=burst, pause_target=a.pause_target)


def _disk(a) -> dict:
    if not a.disk_limit:
        return {}
    disk = parse_size(a.disk_limit, "--disk-limit")
    if disk < 1 << 20:
        raise UsageError(f"--disk-limit must be at least 1MiB, got {a.disk_limit!r}")
    return {"disk_limit": disk}


def _write_json(path, data) -> None:
    from .report import write_json
    try:
        write_json(path, data)
    except OSError as exc:
        raise UsageError(f"--json {path}: {exc.strerror}") from None


def cmd_list(a) -> int:
    width = max(map(len, WORKLOADS))
    for name, cls in WORKLOADS.items():
        print(f"{name:<{width}}  {cls.summary}")
    return 0


def cmd_run(a) -> int:
    from .report import LiveLine, run_table
    from .runner import run
    params = _params(a)
    smem = parse_size(a.source_memory, "--source-memory") if a.source_memory else limits.UNBOUNDED
    tmem = parse_size(a.target_memory, "--target-memory") if a.target_memory else limits.UNBOUNDED
    r = run(a.workload, mode=a.mode, source_memory=smem, target_memory=tmem, params=params,
            progress=LiveLine(), **_disk(a))
    print(run_table(r))
    if a.json:
        _write_json(a.json, r)
    return 0 if r["target_equals_source"] and not r["errors"] else 1


def cmd_tune(a) -> int:
    from .tune import Criteria, check_plot_support, plot, tune
    params = _params(a)
    criteria = Criteria(parse_lag(a.slo_lag_p99), parse_share(a.throughput_within, "--throughput-within"),
                        a.no_spill)
    resolution = parse_share(a.resolution, "--resolution")
    if not resolution:
        raise UsageError("--resolution must be above 0%")
    if a.plot:
        check_plot_support()          # before minutes of trials, not after
    result = tune(a.workload, mode=a.mode, params=params, criteria=criteria,
                  sides=TUNE_SIDES[a.side], resolution=resolution, disk_limit=_disk(a).get("disk_limit"),
                  say=lambda line: print(line, flush=True))
    print("\nrecommended:")
    for line in result["config_lines"]:
        print(f"  {line}")
    if a.plot:
        plot(result, a.plot)
        print(f"plot: {a.plot}")
    if a.json:
        _write_json(a.json, result)
    return 0


def cmd_advise(a) -> int:
    from .advise import advise, text
    reserve = parse_size(a.app_reserve, "--app-reserve") if a.app_reserve else None
    result = advise(reserve)
    print(text(result))
    if a.json:
        _write_json(a.json, result)
    return 0


def cmd_suite(a) -> int:
    from .report import LiveLine, table
    from .suite import SUITE_HEADERS, run_suite, suite_rows, to_pytest_benchmark
    if a.repeats is not None and a.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {a.repeats}")
    duration = parse_duration(a.duration, "--duration") if a.duration else None
    if duration is not None and duration <= 0:
        raise UsageError(f"--duration must be above 0, got {a.duration!r}")
    result = run_suite(quick=a.quick, mode=a.mode, repeats=a.repeats, duration=duration,
                       scale=_scale(a.scale), baselines=not a.no_baselines,
                       say=lambda line: print(line, flush=True), progress=LiveLine())
    print()
    print(table(SUITE_HEADERS, suite_rows(result)))
    if a.json:
        _write_json(a.json, result)
    if a.benchmark_json:
        _write_json(a.benchmark_json, to_pytest_benchmark(result))
    ok = all(r["target_equals_source"] and not r["errors"]
             for w in result["workloads"].values() for r in w["runs"])
    return 0 if ok else 1


def _load(path: str) -> dict:
    from .suite import check_suite_json
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"{path}: not JSON: {exc}") from None
    check_suite_json(data, path)
    return data


def cmd_compare(a) -> int:
    from .report import table
    from .suite import COMPARE_HEADERS, compare, compare_rows
    result = compare(_load(a.old), _load(a.new))
    print(table(COMPARE_HEADERS, compare_rows(result)))
    n = len(result["regressions"])
    print(f"\n{n} regression(s) beyond the run-to-run noise" if n else
          "\nno regression beyond the run-to-run noise")
    if a.json:
        _write_json(a.json, result)
    return 1 if n else 0


COMMANDS = {"list": cmd_list, "run": cmd_run, "tune": cmd_tune, "advise": cmd_advise,
            "suite": cmd_suite, "compare": cmd_compare}


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return COMMANDS[a.command](a)
    except UsageError as exc:
        print(f"smbench: error: {exc}", file=sys.stderr)
        return 2
    except SmirrorError as exc:
        # ConfigError from a size or duration is bad input; other errors are a failed run
        from smirror.errors import ConfigError
        print(f"smbench: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except OSError as exc:
        print(f"smbench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("smbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
