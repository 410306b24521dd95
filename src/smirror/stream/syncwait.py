"""Synchronous modes (issue 16): what an application's call through the
capture mount waits for before it returns.

Per connection, ``sync`` is one of:

``async``        nothing waits (the default): the target follows behind
``fsync``        an fsync, fdatasync or fsyncdir returns once the target made
                 every op up to it durable (its durable watermark passed it)
``every-write``  every mutating call returns only after that

A :class:`SyncWaiter` holds the sync connections of one capture. The mount
takes a *point* right after it captured a call's op (on its own thread, so
the point is exactly that op in every journal) and waits for it off that
thread. A connection that cannot make the point durable within ``timeout``
seconds (down, its queue full, a target that stopped) fails the call with
EIO: the application learns that what it asked to be durable may not be on
the target (zero loss for what it was told is durable), instead of the
connection silently degrading to async.
"""
from __future__ import annotations

import logging
import threading
import time

from smirror.errors import ConfigError, QueueFull
from smirror.stream.sender import SYNC_MODES

log = logging.getLogger("smirror.stream.syncwait")

SYNC_TIMEOUT = 30.0         # seconds a synchronous call waits for a sync connection
# the mount's calls that wait in "fsync" mode; "every-write" adds every
# call that changes something
FSYNC_CALLS = frozenset({"fsync", "fsyncdir"})
MUTATING_CALLS = frozenset({"write", "create", "mkdir", "rmdir", "unlink", "symlink", "link",
                            "mknod", "rename", "setattr", "setxattr", "removexattr", "fallocate"})


def check_sync(sync, capture: str, where: str = "sync") -> str:
    """``sync`` checked for a capture kind: a clear error for an unknown
    mode, and for a mode other than async without the capture mount (a
    watcher or the library API has no application call to hold)."""
    if sync not in SYNC_MODES:
        raise ConfigError(f"{where}: one of {', '.join(SYNC_MODES)}, got {sync!r}")
    if sync != "async" and capture != "mount":
        raise ConfigError(f"{where} = {sync!r} needs capture through the mount: {capture} "
                          f"capture has no application fsync to hold (use sync async)")
    return sync


class SyncWaiter:
    """The sync connections of one capture and the waits on them."""

    def __init__(self, timeout: float = SYNC_TIMEOUT):
        if not timeout > 0:
            raise ConfigError(f"sync timeout: a number of seconds above 0, got {timeout!r}")
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        self._conns: dict = {}          # conid -> (journal, sender, mode)
        self.waits = 0                  # calls that waited
        self.failures = 0               # calls failed with EIO (timeout)
        self.last_failure = ""

    def add(self, conid, journal, sender, mode: str) -> None:
        """Make ``conid`` a sync connection (``mode`` "async" removes it)."""
        with self._lock:
            if mode == "async":
                self._conns.pop(conid, None)
            else:
                self._conns = dict(self._conns, **{str(conid): (journal, sender, mode)})

    def remove(self, conid) -> None:
        with self._lock:
            self._conns = {k: v for k, v in self._conns.items() if k != str(conid)}

    def waits_on(self, call: str) -> bool:
        """Whether the mount's ``call`` waits at all (cheap: a dict look)."""
        for _, _, mode in self._conns.values():
            if call in FSYNC_CALLS or mode == "every-write" and call in MUTATING_CALLS:
                return True
        return False

    def point(self, call: str) -> list:
        """On the mount's thread, right after ``call``'s op was captured:
        [(sender, seq)] of the connections it waits for. Their journals
        close the open frame now and their senders ask the target for a
        durable pass once it is sent."""
        out = []
        for journal, sender, mode in self._conns.values():
            if call not in FSYNC_CALLS and not (mode == "every-write" and call in MUTATING_CALLS):
                continue
            seq = journal.last_seq
            if seq <= sender.acked_seq:
                continue                # durable already
            sender.request_durable(seq)
            try:
                journal.flush()
            except QueueFull:
                pass                    # the queue is full: the wait times out (EIO)
            out.append((sender, seq))
        return out

    def wait(self, point: list) -> bool:
        """Until every connection of ``point`` has its durable watermark at
        its seq (True), or ``timeout`` passed (False, counted and logged)."""
        if not point:
            return True
        self.waits += 1
        deadline = time.monotonic() + self.timeout
        for sender, seq in point:
            if not sender.wait_acked(seq, max(0.0, deadline - time.monotonic())):
                self.failures += 1
                self.last_failure = (f"connection {sender.conid}: seq {seq} not durable on the "
                                     f"target within {self.timeout:g}s (state {sender.state}"
                                     + (f": {sender.last_error}" if sender.last_error else "")
                                     + "): the call failed with EIO")
                log.error("synchronous call: %s", self.last_failure)
                return False
        return True

    def status(self) -> dict:
        return {"connections": {k: v[2] for k, v in self._conns.items()}, "timeout": self.timeout,
                "waits": self.waits, "failures": self.failures, "last_failure": self.last_failure}
