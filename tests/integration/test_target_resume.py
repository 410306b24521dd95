"""A restarted target daemon applies what its durable queue holds without
waiting for its source: a source that is down (here: stopped, SIGSTOP)
must not keep ops the target acknowledged off its map base (issue 16,
check (c) of tools/powerloss.py: the target's restart waited for its
stopped source)."""
import json
import signal

from smirror.capture.recorder import Recorder
from support.daemons import wait_for
from support.pair import login, replicate_data
from support.treestate import diff, snapshot
from support.workload import Workload


def test_a_restarted_target_applies_its_queue_while_its_source_is_stopped(nodes):
    source, target, env, tmp = nodes
    src, dst = replicate_data(source, target, env, tmp)
    login(target, env)
    target.cli("pause-target", target.address)
    w = Workload(Recorder(src, lambda op: None), seed=16, max_write=20_000)
    for _ in range(120):
        w.step()

    def targets():
        return json.loads(target.cli("status", "--json").stdout)["targets"]

    def received_all():
        srcs = json.loads(source.cli("status", "--json").stdout)["sources"]
        tgts = targets()
        return srcs and tgts and srcs[0]["seq_captured"] == tgts[0]["seq_received"] \
            and tgts[0]["seq_received"] > tgts[0]["seq_applied"] and tgts[0]
    held = wait_for(received_all, 60, "the paused target to hold the workload's ops")
    source.proc.send_signal(signal.SIGSTOP)
    try:
        target.kill(signal.SIGKILL)
        target.start()
        login(target, env)
        target.cli("resume-target", target.address)
        # no source: the target found its connection in its own state
        wait_for(lambda: (t := targets()) and t[0]["seq_applied"] >= held["seq_received"], 60,
                 "the restarted target to apply its queue with its source stopped")
        assert diff(snapshot(src), snapshot(dst)) == []
    finally:
        source.proc.send_signal(signal.SIGCONT)
