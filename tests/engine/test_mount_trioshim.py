"""The trio pyfuse3's loop sees under the capture mount
(:mod:`smirror.capture.mount.trioshim`): a free read lock and a queued
request cost no pass through trio's scheduler, yet other tasks still run
under a steady stream of requests."""
import os

import pytest

trio = pytest.importorskip("trio")
pytest.importorskip("pyfuse3", reason="the capture mount needs pyfuse3")

from smirror.capture.mount import trioshim  # noqa: E402


def _yields(fn) -> int:
    """How many times the task running ``fn`` (async) yielded to trio's
    scheduler (its steps, less the first)."""
    steps = {"n": 0}

    class Steps(trio.abc.Instrument):
        def before_task_step(self, task):
            if task.name == "probe":
                steps["n"] += 1

    async def probe():
        await fn()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe, name="probe")
    trio.run(main, instruments=[Steps()])
    return steps["n"] - 1


def test_a_free_read_lock_is_taken_without_a_pass_through_the_scheduler():
    shim = trioshim.shim()

    async def take():
        async with shim.Lock():
            pass
    assert _yields(take) == 0

    async def take_trio_lock():                 # what the shim saves: trio's lock yields
        async with trio.Lock():
            pass
    assert _yields(take_trio_lock) >= 1


def test_a_queued_request_is_read_at_once_and_trio_still_gets_its_turn():
    r, w = os.pipe()
    try:
        os.write(w, b"x")                        # readable: a request queued
        shim = trioshim.shim()

        async def once():
            await shim.lowlevel.wait_readable(r)
        assert _yields(once) == 0

        async def many():
            for _ in range(trioshim.FAST_IN_A_ROW + 1):
                await shim.lowlevel.wait_readable(r)
        # within FAST_IN_A_ROW + 1 waits it yields once: timers, the AIO
        # reaper and calls from other threads are not starved
        assert _yields(many) == 1
    finally:
        os.close(r)
        os.close(w)


def test_a_fd_with_nothing_to_read_waits_in_trio():
    r, w = os.pipe()
    try:
        shim = trioshim.shim()

        async def main():
            async with trio.open_nursery() as nursery:
                async def writer():
                    await trio.sleep(0)
                    os.write(w, b"x")
                nursery.start_soon(writer)
                with trio.fail_after(10):
                    await shim.lowlevel.wait_readable(r)
        trio.run(main)
    finally:
        os.close(r)
        os.close(w)


def test_install_puts_trio_back():
    import pyfuse3
    before = pyfuse3.trio
    restore, _ = trioshim.install(pyfuse3)
    try:
        assert pyfuse3.trio is not before
        assert pyfuse3.trio.ClosedResourceError is trio.ClosedResourceError   # the rest is trio
    finally:
        restore()
    assert pyfuse3.trio is before


def test_queued_says_whether_a_request_waits_on_the_fd():
    r, w = os.pipe()
    try:
        shim = trioshim.shim()
        readable = shim.lowlevel.wait_readable
        assert readable.queued() is False           # no fd seen yet
        os.write(w, b"x")

        async def once():
            await readable(r)
        trio.run(once)
        assert readable.queued() is True
        os.read(r, 1)
        assert readable.queued() is False
    finally:
        os.close(r)
        os.close(w)
