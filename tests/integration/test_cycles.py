"""Auto-disconnect and reconnect cycles between two daemons started as real
processes: an old data link that still holds a frame when the connection
came back is ended cleanly on the target (no second writer into its queue),
the source's status has one row per connection, its memory does not grow
cycle after cycle, a target that recovered clears its error on both sides,
and a disconnect is told to the target."""
import json
import os
import signal
import time

import pytest

from support.daemons import wait_for
from support.pair import login, replicate_data, running_pair, wait_same
from support.treestate import diff, snapshot

SMALL = ('[queues]\nsource_memory_limit = "64KiB"\ntarget_memory_limit = "64KiB"\n'
         'disk_queue_limit = "512KiB"\n')


def status(node):
    return json.loads(node.cli("status", "--json").stdout)


def fill_until_auto_disconnect(source, src, tag, size=60_000):
    """Write files into the set until the source logs one more
    auto-disconnect (the target is paused: both queues fill)."""
    before = source.log().count("auto-disconnect:")
    i = 0
    while source.log().count("auto-disconnect:") == before:
        assert i < 2000, "no auto-disconnect after 2000 files:\n" + source.log()[-3000:]
        (src / f"{tag}-{i % 60}").write_bytes(os.urandom(size))
        i += 1
        time.sleep(0.002)
    return i


def stop_and_read(node):
    """SIGTERM the daemon; its stderr (where uncaught tracebacks go)."""
    node.kill(signal.SIGTERM)
    return node.proc.stderr.read()


@pytest.mark.slow
def test_an_old_link_that_delivers_after_the_reset_is_refused_cleanly(tmp_path):
    """The target is paused while the source auto-disconnects: the old
    link's receiver waits for room with a frame in hand; the reconnect's
    link sends RESET and its own frames. After resume the old link must
    not put its frame behind the new ones (a ValueError traceback before):
    it ends when the new link takes over."""
    with running_pair(tmp_path, extra=SMALL) as (source, target, env):
        src, dst = replicate_data(source, target, env, tmp_path)
        login(target, env)
        target.cli("pause-target", target.address)
        fill_until_auto_disconnect(source, src, "a")
        # the reconnect's link is served (its RESET seen) while paused
        wait_for(lambda: "stream reset to seq" in target.log(), 60, "the new link's RESET")
        target.cli("resume-target", target.address)
        assert wait_same(src, dst, 60), (diff(snapshot(src), snapshot(dst))[:5], target.log()[-3000:])
        err = stop_and_read(target)
        assert "Traceback" not in err and "is not above the last seq" not in err, err[-3000:]
        assert "Traceback" not in target.log(), target.log()[-3000:]
        # (the race needs the old link still blocked in its put when the new
        # one arrives, "a newer link of this connection took over" in the
        # log; with the durable pass freeing the queue on its own clock, the
        # old link sometimes ends first and the new one simply follows: no
        # assertion on which happened, the two above hold for both)


@pytest.mark.slow
def test_ten_cycles_keep_one_status_row_and_the_source_memory_bounded(tmp_path):
    """Ten auto-disconnect / reconnect cycles: the source's status has one
    row for the connection at every look (the reconnect's row and the
    'auto-disconnected' one were both listed), and its RSS does not grow
    cycle after cycle (each cycle kept the old queue and watcher alive
    before, ~30 MiB a cycle)."""
    import psutil
    # the source queue holds up to 8 MiB in memory: what a cycle that kept
    # the old one alive would add each time
    queues = ('[queues]\nsource_memory_limit = "8MiB"\ntarget_memory_limit = "64KiB"\n'
              'disk_queue_limit = "1MiB"\n')
    with running_pair(tmp_path, extra=queues) as (source, target, env):
        src, dst = replicate_data(source, target, env, tmp_path)
        login(target, env)
        proc = psutil.Process(source.proc.pid)
        rss, rows_seen = [], []

        def one_row_converged(cycle):
            rows = status(source)["sources"]
            rows_seen.append([(r["conid"], r["state"]) for r in rows])
            assert len(rows) == 1, rows_seen[-1]
            r = rows[0]
            return r.get("reconnects", 0) >= cycle and r["state"] == "connected" \
                and r["seq_acked"] == r["seq_captured"]

        for cycle in range(1, 11):
            target.cli("pause-target", target.address)
            fill_until_auto_disconnect(source, src, "c")     # the same files: the set stays one size
            one_row_converged(cycle)
            target.cli("resume-target", target.address)
            wait_for(lambda cycle=cycle: one_row_converged(cycle), 90,
                     f"cycle {cycle} reconnected and drained")
            assert wait_same(src, dst, 60), diff(snapshot(src), snapshot(dst))[:5]
            rss.append(proc.memory_info().rss)
        # RSS after a cycle swings with what glibc's arenas keep of the
        # frames (up to 1 MiB each) that the queue, sender and capture
        # threads freed: measured 94-148 MiB over 16 cycles with no trend
        # (threads and fds constant, ~21 MiB of it Python objects), its
        # high-water higher on a loaded machine (rss[-1] - rss[0] reached
        # 60-69 MiB). A leak grows cycle after cycle: the lowest RSS of the
        # last three cycles against the highest of the first three (a
        # warm-up), per cycle between them. Each cycle kept the old queue
        # and watcher alive before: ~30 MiB a cycle
        mib = [r >> 20 for r in rss]
        per_cycle = (min(mib[-3:]) - max(mib[:3])) / (len(mib) - 5)
        assert per_cycle < 12, f"source RSS after each cycle (MiB): {mib}"
        err = stop_and_read(source)
        assert "Traceback" not in err, err[-3000:]


@pytest.mark.slow
def test_a_target_that_recovered_clears_its_error_on_both_sides(tmp_path):
    """A real EPERM on the target (an immutable file): the source's status
    shows the target's error while it lasts; once fixed and applied, the
    error is gone on both sides (it stayed set on the source before)."""
    import shutil
    import subprocess

    import pytest
    if os.geteuid() != 0 or not shutil.which("chattr"):
        pytest.skip("needs root and chattr")
    with running_pair(tmp_path) as (source, target, env):
        src, dst = replicate_data(source, target, env, tmp_path)
        login(target, env)
        locked = dst / "notes.txt"
        if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode:
            pytest.skip("this filesystem has no immutable flag")
        try:
            (src / "notes.txt").write_text("changed while the target cannot take it")
            row = wait_for(lambda: (lambda r: r if r["target_error"] else None)(
                status(source)["sources"][0]), 30, "the target's error on the source")
            assert "Operation not permitted" in row["target_error"] and row["last_error"], row
            assert "Operation not permitted" in status(target)["targets"][0]["error"]
            # frames that arrive while the op is held keep the error (and the
            # target must still clear it once it applies again)
            (src / "more").write_text("received while held")
            wait_for(lambda: (lambda t: t["seq_received"] > t["seq_applied"] + 1)(
                status(target)["targets"][0]), 30, "a frame received while held")
            assert status(target)["targets"][0]["state"] == "apply-error"
        finally:
            subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        assert wait_same(src, dst, 30)
        rows = []
        try:
            row = wait_for(lambda: (lambda r: rows.append(r) or (r if not r["target_error"] else None))(
                status(source)["sources"][0]), 30, "the error cleared on the source")
        except AssertionError:
            raise AssertionError((rows[-1:], status(target)["targets"], source.log()[-3000:],
                                  target.log()[-3000:])) from None
        assert row["last_error"] == "" and row["state"] == "connected", row
        assert status(target)["targets"][0]["error"] == ""
        assert "last error" not in source.cli("status").stdout


@pytest.mark.slow
def test_a_disconnect_is_told_to_the_target(tmp_path):
    """The target held a paused connection with frames waiting: after the
    source's disconnect its side is gone (no row, no applier, queue and
    state removed); the map base keeps what was applied."""
    with running_pair(tmp_path) as (source, target, env):
        src, dst = replicate_data(source, target, env, tmp_path)
        login(target, env)
        target.cli("pause-target", target.address)
        (src / "late").write_bytes(os.urandom(50_000))
        wait_for(lambda: status(target)["targets"][0]["seq_received"]
                 > status(target)["targets"][0]["seq_applied"], 30, "a frame held on the target")
        source_id = source.daemon_id()
        state = target.dir / "state" / "targets" / source_id / "target-1"
        assert state.is_dir()
        out = source.cli("disconnect", "1").stdout
        assert "its side of the connection is ended" in out, out
        assert status(target)["targets"] == []
        assert not state.exists()
        assert "frame(s) not applied dropped; its queue and state removed" in target.log(), \
            target.log()[-2000:]
        assert (dst / "notes.txt").read_text() == "hello" and not (dst / "late").exists()
        # a target that cannot be reached: the reply says so, the disconnect holds
        source.cli("repset", "create", "more", "--root", src / "db")
        source.cli("connect", "more", "to", target.address, "map", "base", tmp_path / "more")
        target.kill(signal.SIGTERM)
        out = source.cli("disconnect", "2").stdout
        assert "target: not reached" in out, out
        assert status(source)["sources"] == []


@pytest.mark.slow
def test_sigterm_while_a_reconnect_mirror_waits_for_room_stops_the_source(tmp_path):
    """The reconnect's mirror waits for room in a full queue (the target
    is paused) holding the daemon's sources lock: SIGTERM must still stop
    the source daemon promptly (it hung there)."""
    with running_pair(tmp_path, extra=SMALL) as (source, target, env):
        src, dst = replicate_data(source, target, env, tmp_path)
        login(target, env)
        target.cli("pause-target", target.address)
        fill_until_auto_disconnect(source, src, "a")
        wait_for(lambda: "stream reset to seq" in target.log(), 60, "the reconnect's link")
        started = time.monotonic()
        err = stop_and_read(source)             # proc.wait(30): a hang fails here
        assert source.proc.returncode == 0 and time.monotonic() - started < 20, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
