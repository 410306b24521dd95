"""Changes made to the backing directory behind the mount's back (a process
writing BACKING directly): seen by a fanotify watcher that ignores this
process's own changes (the mount's), then repaired by resending what
changed, on the mount's thread, in order with the mount's own ops.

A bypassing change gets the watcher's guarantee, not the mount's: what the
file holds when it is resent, not the order of its writes. Each one is
counted and logged (rate-limited) with its path.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from smirror.capture.inotify import Kind

log = logging.getLogger("smirror.capture.mount")

SETTLE = 0.05             # seconds of quiet before a batch of events is repaired
MAX_BATCH_DELAY = 0.5     # ... but never longer than this after the first
LOG_EVERY = 10.0          # seconds between two bypass warnings
# seconds between two reads of the watcher: most events are the mount's own
# writes, dropped; read at every one, they cost a tenth of a CPU under an
# fsync-per-commit load (the kernel merges a file's writes meanwhile)
PACE = 0.02


class BypassWatch:
    """``repair(events)`` is called (on the mount's thread, through
    ``call``) with the events of other processes under ``backing``."""

    def __init__(self, backing, call, repair):
        from smirror.capture import fanotify
        self.backing = os.path.abspath(os.fsdecode(backing))
        self._call, self._repair = call, repair
        self.unavailable = fanotify.unavailable_reason(os.fsencode(self.backing)) or ""
        self.watcher = None
        if not self.unavailable:
            try:
                self.watcher = fanotify.Watcher(self.backing, ignore_pids={os.getpid()})
                self.watcher.pace = PACE
            except OSError as exc:
                self.unavailable = str(exc)
        if self.unavailable:
            log.warning("capture mount of %s: changes made to it directly (not through the "
                        "mount) are not detected: fanotify cannot run here (%s)",
                        self.backing, self.unavailable)
        self.changes = 0
        self.last_paths: list[str] = []
        self._logged = 0.0
        self._stop = threading.Event()
        self._thread = None
        self.error = ""

    def start(self) -> BypassWatch:
        if self.watcher is not None:
            self._thread = threading.Thread(target=self._run, name="mount-bypass", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        watcher = self.watcher
        assert watcher is not None          # started only with one
        try:
            while not self._stop.is_set():
                batch = watcher.read(0.2)
                if not batch:
                    continue
                first = time.monotonic()
                while time.monotonic() - first < MAX_BATCH_DELAY:
                    more = watcher.read(SETTLE)
                    if not more:
                        break
                    batch.extend(more)
                self._call(self._repair, batch)
                self._note(batch)
        except Exception as exc:          # reported by status/failure
            if not self._stop.is_set():
                self.error = f"the bypass watcher stopped: {type(exc).__name__}: {exc}"
                log.error("capture mount of %s: %s", self.backing, self.error, exc_info=True)

    def _note(self, batch) -> None:
        paths = sorted({os.fsdecode(e.path) or "." for e in batch})
        self.changes += len(batch)
        self.last_paths = paths[:20]
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY:
            self._logged = now
            log.warning("capture mount of %s: %d change(s) made directly to it, not through "
                        "the mount, resent (not in write order): %s%s", self.backing, len(batch),
                        ", ".join(paths[:10]), " ..." if len(paths) > 10 else "")

    def status(self) -> dict:
        return {"detected": self.watcher is not None, "unavailable": self.unavailable,
                "changes": self.changes, "last_paths": self.last_paths, "error": self.error}

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.watcher is not None:
            self.watcher.close()


def events_to_repairs(batch):
    """(kind, path, new_path) to repair, in event order; a RESCAN stands for
    its whole subtree."""
    for ev in batch:
        if ev.kind is Kind.MOVED:
            yield "moved", ev.path, ev.new_path
        elif ev.kind is Kind.RESCAN:
            yield "tree", ev.path, None
        elif ev.kind is Kind.ATTRIB:
            yield "attrs", ev.path, None
        elif ev.kind is Kind.CREATED and ev.is_dir:
            yield "tree", ev.path, None       # it may have arrived with content
        else:
            yield "path", ev.path, None
