"""Trio as pyfuse3's request loop sees it, with two round trips of trio's
scheduler per request taken out.

pyfuse3 serves each request after ``async with read_lock:`` and ``await
trio.lowlevel.wait_readable(fd)``. In trio both pass through the scheduler
even when nothing has to wait: an uncontended :class:`trio.Lock` still
yields once (a checkpoint), and ``wait_readable`` registers the fd with
epoll, yields, and unregisters it, even when a request is already queued.
A profile of the mount's thread put trio's scheduler at about a quarter of
its CPU time per request. Here:

* the read lock is taken without a checkpoint when it is free (it parks, as
  trio's does, when another task holds it);
* ``wait_readable`` first polls the fd without blocking, and returns at
  once when a request is queued; at most ``FAST_IN_A_ROW`` times in a row,
  then it yields to trio (its timers, the AIO reaper, calls from other
  threads must run under a steady stream of requests).

Everything else is trio itself. Installed by
:func:`install` for the mount's loop (``pyfuse3.trio``), and put back by
the function it returns; the other one it returns says whether a request
is queued (the mount flushes an fsync on its loop when none is).
"""
from __future__ import annotations

import select
import types

import trio

FAST_IN_A_ROW = 16


class _ReadLock:
    """``async with``: trio's Lock, without the checkpoint when it is free."""

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc) -> None:
        self._lock.release()


class _Readable:
    """``wait_readable`` that answers from a non-blocking poll when it can."""

    def __init__(self) -> None:
        self._polls: dict[int, select.poll] = {}
        self._in_a_row = 0

    async def __call__(self, fd: int) -> None:
        poll = self._polls.get(fd)
        if poll is None:
            poll = self._polls[fd] = select.poll()
            poll.register(fd, select.POLLIN)
        if self._in_a_row < FAST_IN_A_ROW and poll.poll(0):
            self._in_a_row += 1
            return
        self._in_a_row = 0
        await trio.lowlevel.wait_readable(fd)

    def queued(self) -> bool:
        """Whether a request is queued now (none read yet: False)."""
        return any(poll.poll(0) for poll in self._polls.values())


class _Lowlevel(types.SimpleNamespace):
    def __getattr__(self, name):
        return getattr(trio.lowlevel, name)


class _Trio(types.SimpleNamespace):
    def __getattr__(self, name):
        return getattr(trio, name)


def shim() -> _Trio:
    """A trio for pyfuse3: trio itself but for ``Lock`` and ``lowlevel.wait_readable``."""
    return _Trio(Lock=_ReadLock, lowlevel=_Lowlevel(wait_readable=_Readable()))


def install(pyfuse3):
    """Make pyfuse3's loop use :func:`shim`; returns (what puts trio back,
    whether a request is queued now)."""
    saved = pyfuse3.trio
    pyfuse3.trio = trio_ = shim()

    def restore() -> None:
        pyfuse3.trio = saved
    return restore, trio_.lowlevel.wait_readable.queued
