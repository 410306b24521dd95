"""Durable means durable (issue 16): the target's two watermarks between
real daemons. The source keeps every frame until the target's *durable*
watermark passes it, and resends from there after a target SIGKILL and
restart; both watermarks show in ``smirror status``."""
import json
import time

from smirror.capture.recorder import Recorder
from support.daemons import wait_for
from support.pair import login, replicate_data, wait_same
from support.treestate import diff, snapshot
from support.workload import Workload


def _rows(node):
    st = json.loads(node.cli("status", "--json").stdout)
    return st.get("sources") or [], st.get("targets") or []


def test_both_watermarks_show_and_the_source_drops_frames_only_once_durable(nodes):
    source, target, env, tmp = nodes
    src, dst = replicate_data(source, target, env, tmp)
    login(target, env, "watcher")

    def durable_everywhere():
        (s,), _ = _rows(source)
        _, (t,) = _rows(target)
        return (s["seq_durable"] == s["seq_captured"] == t["seq_durable"] == t["seq_received"]
                and s["queue_mem_bytes"] == 0 and (s, t))
    s, t = wait_for(durable_everywhere, 30, "every op durable on the target and dropped by the source")
    assert s["durable_reported"] and s["seq_received"] >= s["seq_durable"] > 0
    assert t["durable_passes"] > 0 and not t["durable_error"]
    table = source.cli("status").stdout
    assert any("DURABLE" in line for line in table.splitlines())


def test_a_target_killed_and_restarted_gets_what_was_not_durable_again(nodes):
    """Frames the target received but had not made durable when it was
    SIGKILLed are still in the source queue; after the restart the source
    resends from the durable watermark and the replica converges."""
    source, target, env, tmp = nodes
    src, dst = replicate_data(source, target, env, tmp)
    login(target, env, "watcher")
    w = Workload(Recorder(src, lambda op: None), seed=21, max_write=30_000)
    for i in range(300):
        w.step()
        time.sleep(0.002)
        if i == 150:
            # the target holds more than it made durable: the source keeps the rest
            (s,), _ = _rows(source)
            target.kill()
        if i == 250:
            target.start()
    assert s["seq_durable"] <= s["seq_received"]
    assert wait_same(src, dst, 60), source.log()[-3000:] + target.log()[-3000:]
    (s,), _ = _rows(source)
    assert s["connects"] >= 2 and s["seq_durable"] <= s["seq_captured"]
    assert diff(snapshot(src), snapshot(dst)) == []
