"""A live progress bar for long runs: bytes and files done, rate, ETA.

Drawn on a terminal only (stderr is a tty and not ``--quiet``), redrawn by a
small thread a few times a second so workers only add to counters. The rate
is measured over the last few seconds, and the ETA is the bytes left at that
rate - "unknown" until there is a rate to go by.
"""
from __future__ import annotations

import sys
import threading
import time

from smirror.units import format_size


def human_seconds(s: float) -> str:
    s = int(s + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


class Progress:
    """Thread-safe counters with an optional live line on ``stream``."""

    WINDOW = 5.0          # seconds of history the rate is taken over
    INTERVAL = 0.25       # redraw period

    def __init__(self, stream=None, enabled: bool | None = None, width: int = 30):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.width = width
        self.total_bytes = 0
        self.total_files = 0
        self.done_bytes = 0
        self.done_files = 0
        self._lock = threading.Lock()
        self._samples: list[tuple[float, int]] = []    # (time, done_bytes)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()
        self._last_len = 0

    def start(self, total_bytes: int, total_files: int):
        self.total_bytes = total_bytes
        self.total_files = total_files
        self._t0 = time.monotonic()
        self._samples = [(self._t0, 0)]
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="smirror-progress",
                                            daemon=True)
            self._thread.start()

    def advance(self, nbytes: int):
        with self._lock:
            self.done_bytes += nbytes

    def file_done(self):
        with self._lock:
            self.done_files += 1

    def rate(self, now: float | None = None) -> float:
        """Bytes per second over the last WINDOW seconds (0 if unknown)."""
        now = time.monotonic() if now is None else now
        samples = self._samples
        samples.append((now, self.done_bytes))
        while len(samples) > 2 and now - samples[1][0] > self.WINDOW:
            samples.pop(0)
        t_old, b_old = samples[0]
        if now - t_old < 0.2:
            return 0.0
        return (self.done_bytes - b_old) / (now - t_old)

    def eta(self, rate: float) -> float | None:
        left = max(0, self.total_bytes - self.done_bytes)
        if left == 0:
            return 0.0
        if rate <= 0:
            return None
        return left / rate

    def line(self, now: float | None = None) -> str:
        rate = self.rate(now)
        eta = self.eta(rate)
        total = self.total_bytes or 1
        frac = min(1.0, self.done_bytes / total) if self.total_bytes else (
            self.done_files / self.total_files if self.total_files else 1.0)
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        eta_text = "ETA ?" if eta is None else f"ETA {human_seconds(eta)}"
        return (f"[{bar}] {frac * 100:5.1f}% {format_size(self.done_bytes)}/"
                f"{format_size(self.total_bytes)} {self.done_files}/{self.total_files} files "
                f"{format_size(rate)}/s {eta_text}")

    def _draw(self, final=False):
        text = self.line()
        pad = " " * max(0, self._last_len - len(text))
        self._last_len = len(text)
        self.stream.write("\r" + text + pad + ("\n" if final else ""))
        self.stream.flush()

    def _loop(self):
        while not self._stop.wait(self.INTERVAL):
            self._draw()

    def finish(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._draw(final=True)
