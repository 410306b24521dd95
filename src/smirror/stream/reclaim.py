"""Freeing what the applier removed from the tree, off the applier's path.

Removing the last name of a file whose blocks are on disk frees those
blocks inside unlink(2); rmdir(2) and a rename over a file do the same. On
this machine's ext4 (mounted with ``discard``) that is 1-2 ms a file,
against ~10 us for the name alone: a checkout or an ``rm -rf`` storm
applied op by op spent most of its time there (``benchmarks/bench_apply.py``).

So the applier first opens the doomed inode (``O_PATH``: no access to its
data, no atime), then removes the name, which is quick while a descriptor
keeps the inode alive, and hands the descriptor to the process's
:class:`Reclaimer`, whose threads close it: the last close frees the inode
and its blocks (with the GIL released). The tree is the same at once; only
the free space comes back a little later (:meth:`Reclaimer.drain` waits for
it: the applier does before it reports a full disk). Bounded: past
``limit`` descriptors waiting, the caller closes its own (the old cost),
so a process never holds more than ``limit`` of them, whatever the number
of connections.
"""
from __future__ import annotations

import collections
import os
import resource
import threading

WORKERS = 2


def _default_limit() -> int:
    """Descriptors waiting at most: a small share of the process's limit."""
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        soft = 1024
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(8, min(256, soft // 8))


class Reclaimer:
    """Closes descriptors of removed inodes in worker threads."""

    def __init__(self, limit: int | None = None, workers: int = WORKERS):
        self.limit = _default_limit() if limit is None else limit
        self.workers = workers
        self._fds: collections.deque = collections.deque()
        self._busy = 0                  # descriptors being closed by a worker
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self.stats = {"held": 0, "closed_inline": 0}

    @property
    def pending(self) -> int:
        """Descriptors handed over and not closed yet."""
        return len(self._fds) + self._busy

    def hold(self, fd: int) -> None:
        """Take ``fd`` (an inode whose name is gone): closed by a worker,
        or here at once when ``limit`` are waiting already."""
        with self._cond:
            if len(self._fds) + self._busy < self.limit:
                if len(self._threads) < self.workers:
                    self._start_worker()
                self._fds.append(fd)
                self.stats["held"] += 1
                self._cond.notify_all()     # (one notify could wake a drain() instead)
                return
            self.stats["closed_inline"] += 1
        os.close(fd)

    def drain(self, timeout: float | None = None) -> bool:
        """Close every descriptor waiting, here, and wait for those a
        worker is closing: their space is free on return. False if
        ``timeout`` passed first."""
        with self._cond:
            while self._fds:
                fd = self._fds.popleft()
                try:
                    os.close(fd)
                except OSError:
                    pass
            return self._cond.wait_for(lambda: not self._busy, timeout)

    def _start_worker(self) -> None:
        t = threading.Thread(target=self._work, daemon=True,
                             name=f"reclaim-{len(self._threads) + 1}")
        self._threads.append(t)
        t.start()

    def _work(self) -> None:
        cond, fds = self._cond, self._fds
        while True:
            with cond:
                while not fds:
                    cond.wait()
                fd = fds.popleft()
                self._busy += 1
            try:
                os.close(fd)            # the last reference: the inode is freed here
            except OSError:
                pass                    # (never a live descriptor of anyone else's)
            finally:
                with cond:
                    self._busy -= 1
                    if not fds and not self._busy:
                        cond.notify_all()


_shared: Reclaimer | None = None
_shared_lock = threading.Lock()


def shared() -> Reclaimer:
    """The process's reclaimer (its limit counts for every applier)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Reclaimer()
        return _shared
