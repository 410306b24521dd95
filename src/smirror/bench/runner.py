"""One smbench run: a workload against a source/target pair, measured, then
checked (the target must equal the source), as a result dict whose fields
``report`` prints and ``--json`` writes."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from smirror.errors import BenchError, QueueFull

from . import limits
from .metrics import SIDES, Sampler, percentile
from .pairs import open_pair
from .verify import compare_trees
from .workloads import WORKLOADS, NullCtl, Params, Writer

DRAIN_TIMEOUT = 300.0
DISK_LIMIT = 8 << 30            # per queue, unless --disk-limit says otherwise
PROBE_INTERVAL = {"embedded": 0.01, "daemons": 0.02}


class _Ctl:
    """What a workload may ask of the run: pause and resume the target."""

    def __init__(self, pair, sampler: Sampler):
        self.pair, self.sampler = pair, sampler
        self.paused = False

    def pause_target(self) -> None:
        self.pair.pause_target()
        self.paused = True

    def resume_target(self) -> None:
        self.pair.resume_target()
        self.paused = False
        self.sampler.mark_resumed()

    def finish(self) -> None:
        if self.paused:
            self.resume_target()


class _Prober:
    """A lag probe every ``interval`` seconds (a mark op, or a probe file)."""

    def __init__(self, pair, interval: float):
        self.pair, self.interval = pair, interval
        self.count = 0
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="smbench-prober")

    def start(self) -> _Prober:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.pair.probe(self.count)
            except Exception as exc:        # noqa: BLE001 - reported in the result
                self.error = f"lag probe: {type(exc).__name__}: {exc}"
                return
            self.count += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def run(workload: str, *, mode: str = "embedded", source_memory: int = limits.UNBOUNDED,
        target_memory: int = limits.UNBOUNDED, params: Params | None = None, base_dir=None,
        progress=None, disk_limit: int = DISK_LIMIT) -> dict:
    """Run ``workload`` once; the result dict (see docs/smbench.md).

    An embedded run happens in a fresh process (``smirror.bench.child``):
    its RSS is then the engine's alone, not what earlier runs of this
    process left in the allocator. Daemons are processes of their own."""
    if workload not in WORKLOADS:
        raise BenchError(f"unknown workload {workload!r}: choose one of {', '.join(WORKLOADS)}")
    if mode != "embedded":
        return measure(workload, mode=mode, source_memory=source_memory, target_memory=target_memory,
                       params=params, base_dir=base_dir, progress=progress, disk_limit=disk_limit)
    p = params or Params()
    request = {"workload": workload, "source_memory": source_memory, "target_memory": target_memory,
               "disk_limit": disk_limit, "params": dataclasses.asdict(p),
               "base_dir": os.fspath(base_dir) if base_dir else None, "live": progress is not None}
    # stderr is inherited: the child draws the live line on this terminal
    proc = subprocess.run([sys.executable, "-m", "smirror.bench.child"], input=json.dumps(request),
                          stdout=subprocess.PIPE, text=True,
                          timeout=p.duration + 2 * DRAIN_TIMEOUT + 300)
    try:
        reply = json.loads(proc.stdout)
    except ValueError:
        raise BenchError(f"the {workload} run's process ended with status {proc.returncode} "
                         "and no result") from None
    if "error" in reply:
        raise BenchError(reply["error"])
    return reply["result"]


def measure(workload: str, *, mode: str = "embedded", source_memory: int = limits.UNBOUNDED,
            target_memory: int = limits.UNBOUNDED, params: Params | None = None, base_dir=None,
            progress=None, keep: bool = False, disk_limit: int = DISK_LIMIT) -> dict:
    """One run in this process."""
    if workload not in WORKLOADS:
        raise BenchError(f"unknown workload {workload!r}: choose one of {', '.join(WORKLOADS)}")
    p = params or Params()
    work = Path(tempfile.mkdtemp(prefix=f"smbench-{workload}-", dir=base_dir))
    pair = None
    try:
        pair = open_pair(mode, work, source_memory, target_memory, disk_limit)
        wl = WORKLOADS[workload](p)
        wl.setup(pair.writer)
        if not pair.wait_drained(DRAIN_TIMEOUT):
            raise BenchError(f"{workload}: the target did not apply the setup files within "
                             f"{DRAIN_TIMEOUT:.0f} s: {pair.status()}")
        sampler = Sampler(pair)
        sampler.start()
        if progress is not None:
            progress.start(workload, p.duration, wl, sampler)
        prober = _Prober(pair, PROBE_INTERVAL[mode]).start()
        ctl = _Ctl(pair, sampler)
        auto_disconnects = 0
        run_error = ""
        t0 = time.monotonic()
        try:
            try:
                wl.run(pair.writer, ctl, t0)
            except QueueFull as exc:
                # the embedded engine's auto-disconnect: capture cannot queue more
                auto_disconnects, run_error = 1, f"queue full: {exc}"
            finally:
                ctl.finish()                # a run that stopped early leaves no target paused
            t_written = time.monotonic()
            prober.stop()
            drained = pair.wait_drained(DRAIN_TIMEOUT)
            t_drained = time.monotonic()
        finally:
            prober.stop()
            sampler.stop()
            if progress is not None:
                progress.finish()
        differences = compare_trees(pair.src, pair.dst)
        result = _result(workload, mode, p, source_memory, target_memory, wl, pair, sampler, prober,
                         t0, t_written, t_drained, drained, differences,
                         auto_disconnects + sampler.last["auto_disconnects"], run_error)
        result["params"]["disk_limit"] = disk_limit
        return result
    finally:
        if progress is not None:
            progress.finish()
        if pair is not None:
            pair.close()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _result(workload, mode, p, smem, tmem, wl, pair, sampler, prober, t0, t_written, t_drained,
            drained, differences, auto_disconnects, run_error) -> dict:
    start = t0 + wl.phases.get("burst", 0.0)        # a burst's idle start is not throughput time
    elapsed = max(1e-9, t_drained - start)
    lags = sorted(x * 1000 for x in pair.lags)
    bytes_sent = sampler.last["bytes_sent"] - sampler.first["bytes_sent"]
    sides = {}
    for i, side in enumerate(SIDES):
        spilled = sampler.last[f"{side}_spilled"]
        first_spilled = sampler.first[f"{side}_spilled"]
        sides[side] = {
            "memory_limit": smem if side == "source" else tmem,
            "queue_mem_peak": sampler.peaks[f"{side}_queue_mem"],
            "queue_disk_peak": sampler.peaks[f"{side}_queue_disk"],
            "spilled_frames": None if spilled is None else spilled - first_spilled,
            "rss_idle": sampler.rss_idle[i],
            "rss_peak": sampler.rss_peak[i],
            "rss_growth": sampler.rss_peak[i] - sampler.rss_idle[i],
            "cpu_s": round(sampler.cpu[i], 3),
        }
    allowed = limits.rss_allowed(smem, tmem, pair.shared_process)
    for side, limit in zip(SIDES, allowed, strict=True):
        sides[side]["rss_growth_allowed"] = limit
        sides[side]["rss_within_limit"] = None if limit is None else sides[side]["rss_growth"] <= limit
    cpu_total = sampler.cpu[0] if pair.shared_process else sum(sampler.cpu)
    gb = wl.bytes_written / 1e9
    errors = [e for e in [run_error, prober.error, *sampler.errors] if e]
    if not drained:
        errors.append(f"the target did not apply everything within {DRAIN_TIMEOUT:.0f} s")
    resumed = sampler.resumed_at
    return {
        "workload": workload, "mode": mode,
        "params": {"duration_s": p.duration, "scale": p.scale, "quick": p.quick, "seed": p.seed,
                   "burst_size": getattr(wl, "size", None) if workload == "burst" else None,
                   "pause_target": p.pause_target},
        "bytes_written": wl.bytes_written, "ops": wl.ops,
        "write_s": round(t_written - start, 4), "drain_s": round(t_drained - t_written, 4),
        "elapsed_s": round(elapsed, 4),
        "throughput_mb_s": round(wl.bytes_written / elapsed / 1e6, 3),
        "ops_per_s": round(wl.ops / elapsed, 1),
        "lag_ms": {"p50": percentile(lags, 0.5), "p99": percentile(lags, 0.99),
                   "max": lags[-1] if lags else None, "probes": len(lags),
                   "probes_missing": pair.probes_missing()},
        "source": sides["source"], "target": sides["target"],
        "shared_process": pair.shared_process,
        "cpu_s": round(cpu_total, 3),
        "cpu_s_per_gb": round(cpu_total / gb, 3) if gb else None,
        "bytes_sent": bytes_sent,
        "auto_disconnects": auto_disconnects,
        "paused_s": (round(resumed - t0 - wl.phases.get("paused", wl.phases.get("burst", 0.0)), 4)
                     if resumed is not None else None),
        "drain_after_resume_s": (round(sampler.drained_at - resumed, 4)
                                 if resumed is not None and sampler.drained_at is not None else None),
        "target_equals_source": not differences,
        "differences": differences,
        "errors": errors,
    }


def run_direct(workload: str, params: Params, base_dir=None, after=None) -> dict:
    """The baseline: the same workload written straight to the same disk,
    no replication. Its throughput is what the disk and this machine give.
    ``after(root)`` runs on the tree it made (the rsync baseline), before
    it is removed."""
    work = Path(tempfile.mkdtemp(prefix=f"smbench-direct-{workload}-", dir=base_dir))
    try:
        root = work / "src"
        root.mkdir()
        wl = WORKLOADS[workload](params)
        w = Writer(root)
        wl.setup(w)
        t0 = time.monotonic()
        wl.run(w, NullCtl(), t0)
        start = t0 + wl.phases.get("burst", 0.0)
        elapsed = max(1e-9, time.monotonic() - start)
        return {"baseline": "direct", "workload": workload, "bytes_written": wl.bytes_written,
                "ops": wl.ops, "elapsed_s": round(elapsed, 4),
                "throughput_mb_s": round(wl.bytes_written / elapsed / 1e6, 3),
                "tree_bytes": _tree_bytes(root), "after": after(root) if after else None}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tree_bytes(root) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(root) for f in fs)
