"""How smbench shows results: a live one-line display while a run goes (on
a terminal only), a table at the end, JSON for machines."""
from __future__ import annotations

import json
import sys
import threading
import time

from smirror.units import format_size


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def _size(v) -> str:
    return "-" if v is None else format_size(int(v))


def _s(v) -> str:
    return "-" if v is None else f"{v:.2f} s"


class LiveLine:
    """``bulk  3.1/30s  412 MiB written  130 MB/s  queues src 2.0 MiB tgt 1.0 MiB  lag p99 4.1 ms``
    redrawn a few times a second on ``stream`` when it is a terminal."""

    INTERVAL = 0.25

    def __init__(self, stream=None, enabled: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_len = 0

    def start(self, name, duration, workload, sampler) -> None:
        self.name, self.duration, self.wl, self.sampler = name, duration, workload, sampler
        self.t0 = time.monotonic()
        if self.enabled:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, daemon=True, name="smbench-progress")
            self._thread.start()

    def line(self) -> str:
        t = time.monotonic() - self.t0
        st = self.sampler.last
        lags = sorted(self.sampler.pair.lags[-500:])
        p99 = lags[int(len(lags) * 0.99)] * 1000 if lags else None
        rate = self.wl.bytes_written / t / 1e6 if t > 0 else 0.0
        return (f"{self.name}  {t:.1f}/{self.duration:.0f}s  {format_size(self.wl.bytes_written)} written  "
                f"{rate:.0f} MB/s  queues src {format_size(st['source_queue_mem'])}+"
                f"{format_size(st['source_queue_disk'])} disk  tgt {format_size(st['target_queue_mem'])}+"
                f"{format_size(st['target_queue_disk'])} disk  lag p99 {_ms(p99)}")

    def _draw(self, final: bool = False) -> None:
        text = self.line()
        self.stream.write("\r" + text + " " * max(0, self._last_len - len(text)) + ("\n" if final else ""))
        self._last_len = len(text)
        self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            self._draw()

    def finish(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._draw(final=True)


def run_table(r: dict) -> str:
    """The end-of-run table of one result."""
    lag = r["lag_ms"]
    s, t = r["source"], r["target"]
    rows = [
        ("workload", f"{r['workload']} ({r['mode']})"),
        ("written", f"{_size(r['bytes_written'])} in {r['ops']} ops"),
        ("throughput", f"{r['throughput_mb_s']:.1f} MB/s, {r['ops_per_s']:.0f} ops/s "
                       f"(write {r['write_s']:.2f} s + drain {r['drain_s']:.2f} s)"),
        ("lag", f"p50 {_ms(lag['p50'])}, p99 {_ms(lag['p99'])}, max {_ms(lag['max'])} "
                f"({lag['probes']} probes)"),
        ("", "source / target"),
        ("memory limit", f"{_size(s['memory_limit'])} / {_size(t['memory_limit'])}"),
        ("queue peak in memory", f"{_size(s['queue_mem_peak'])} / {_size(t['queue_mem_peak'])}"),
        ("queue peak on disk", f"{_size(s['queue_disk_peak'])} / {_size(t['queue_disk_peak'])}"),
        ("frames spilled", f"{_n(s['spilled_frames'])} / {_n(t['spilled_frames'])}"),
        ("RSS peak (growth)", f"{_size(s['rss_peak'])} (+{_size(s['rss_growth'])}) / "
                              f"{_size(t['rss_peak'])} (+{_size(t['rss_growth'])})"
                              + ("  one process" if r["shared_process"] else "")),
        ("RSS growth allowed", f"{_allowed(s)} / {_allowed(t)}"),
        ("CPU", f"{r['cpu_s']:.2f} s, " + ("-" if r["cpu_s_per_gb"] is None
                                          else f"{r['cpu_s_per_gb']:.1f} s per GB")),
        ("bytes sent", _size(r["bytes_sent"])),
        ("auto-disconnects", str(r["auto_disconnects"])),
        ("drain after resume", _s(r["drain_after_resume_s"])),
        ("target equals source", "yes" if r["target_equals_source"]
         else "NO: " + "; ".join(r["differences"][:3])),
    ]
    if r["errors"]:
        rows.append(("errors", "; ".join(r["errors"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _allowed(side: dict) -> str:
    if side["rss_growth_allowed"] is None:
        return "- (unbounded)"
    verdict = "ok" if side["rss_within_limit"] else "VIOLATION"
    return f"{_size(side['rss_growth_allowed'])} {verdict}"


def _n(v) -> str:
    return "-" if v is None else str(v)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path, data) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if path == "-":
        sys.stdout.write(text)
    else:
        with open(path, "w") as f:
            f.write(text)
