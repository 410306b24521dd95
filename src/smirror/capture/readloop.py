"""The read loop both watchers (inotify, fanotify) share: wait on the
notification descriptor, read whole buffers until the kernel has no more,
hand each buffer to the watcher's parser, return the events it produced."""
from __future__ import annotations

import os
import select
import time


class EventReadLoop:
    """Base of a watcher. The watcher provides ``fd`` (non-blocking),
    ``_buf`` (a bytearray), ``_out`` (the events produced, a list) and
    ``_parse(view)``; it may override ``_next_wait`` (wake up earlier than
    asked) and ``_after_wait`` (work after every wake-up)."""
    fd: int
    _buf: bytearray
    _out: list
    # seconds to wait after a read before the next one (0: none). A watcher
    # whose events are mostly dropped (the capture mount's bypass watch:
    # its own writes) would otherwise wake for every write; meanwhile the
    # kernel merges the same change to the same file into one event.
    pace = 0.0
    reads = 0          # reads that returned events

    def fileno(self) -> int:
        return self.fd

    def read(self, timeout: float | None = None) -> list:
        """Events ready now, waiting up to ``timeout`` seconds (None: forever)
        for the first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._out:
            now = time.monotonic()
            wait = None if deadline is None else max(0.0, deadline - now)
            sooner = self._next_wait(now)
            if sooner is not None:
                wait = sooner if wait is None else min(wait, sooner)
            ready, _, _ = select.select([self.fd], [], [], wait)
            if ready:
                self._drain()
                if self.pace:
                    left = self.pace if deadline is None else deadline - time.monotonic()
                    time.sleep(max(0.0, min(self.pace, left)))
            self._after_wait()
            if deadline is not None and time.monotonic() >= deadline:
                break
        out, self._out = self._out, []
        return out

    def _drain(self) -> None:
        while True:
            try:
                n = os.readv(self.fd, [self._buf])
            except BlockingIOError:
                return
            self.reads += 1
            self._parse(memoryview(self._buf)[:n])
            if n < len(self._buf) // 2:
                return          # a short read: the kernel had no more queued

    def _next_wait(self, now: float) -> float | None:
        return None

    def _after_wait(self) -> None:
        pass

    def _parse(self, data: memoryview) -> None:
        raise NotImplementedError
