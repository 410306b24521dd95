"""What a run measures while it runs: a sampler thread that polls the pair's
status (queue bytes in memory and on disk, sequence numbers) and each
side's process (RSS, CPU time, with psutil), keeps the peaks, and notes
when the target caught up after a resume."""
from __future__ import annotations

import threading
import time

import psutil

SIDES = ("source", "target")


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


class Sampler:
    INTERVAL = 0.02

    def __init__(self, pair):
        self.pair = pair
        self.procs = [psutil.Process(pid) for pid in pair.pids]
        self.rss_idle = self._rss()
        self.rss_peak = list(self.rss_idle)
        self.cpu_start = [cpu_seconds(p) for p in self.procs]
        self.cpu = [0.0, 0.0]
        first = pair.status()
        self.first = first
        self.last = first
        self.peaks = {k: first[k] for k in ("source_queue_mem", "source_queue_disk",
                                            "target_queue_mem", "target_queue_disk")}
        self.errors: list[str] = []
        self.resumed_at: float | None = None    # monotonic time of the resume
        self.resume_seq = 0                      # seq captured at the resume
        self.drained_at: float | None = None     # when the target applied resume_seq
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="smbench-sampler")

    def _rss(self) -> list:
        """Each side's RSS, read once per process: an embedded run's two
        sides are one process and must show one figure (None: it is gone)."""
        seen: dict[int, int | None] = {}
        for p in self.procs:
            if p.pid not in seen:
                try:
                    seen[p.pid] = p.memory_info().rss
                except psutil.Error:
                    seen[p.pid] = None
        return [seen[p.pid] for p in self.procs]

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def sample(self) -> dict:
        st = self.pair.status()
        self.last = st
        for k in self.peaks:
            self.peaks[k] = max(self.peaks[k], st[k])
        for i, rss in enumerate(self._rss()):
            if rss is not None:
                self.rss_peak[i] = max(self.rss_peak[i], rss)
        if st["error"] and st["error"] not in self.errors:
            self.errors.append(st["error"])
        if self.resumed_at is not None and self.drained_at is None and st["seq_applied"] >= self.resume_seq:
            self.drained_at = time.monotonic()
        return st

    def mark_resumed(self) -> None:
        self.resume_seq = self.pair.status()["seq_captured"]
        self.resumed_at = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            try:
                self.sample()
            except Exception as exc:           # noqa: BLE001 - a dead sampler would lose every figure
                msg = f"sampling status: {type(exc).__name__}: {exc}"
                if msg not in self.errors:
                    self.errors.append(msg)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample()
        for i, p in enumerate(self.procs):
            try:
                self.cpu[i] = cpu_seconds(p) - self.cpu_start[i]
            except psutil.Error:
                pass
