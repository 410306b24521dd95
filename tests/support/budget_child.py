"""A Replication in a process of its own for test_memory_budget (not a test
module): ``python budget_child.py SRC DST STATE LIMIT MIB``. It starts
replicating with a ``LIMIT`` memory budget and API capture, pauses the
target, says ``idle`` and waits for a line on stdin; then writes ``MIB``
MiB of random data (4 MiB file rewritten over and over, 256 KiB writes),
waits until the target holds all of it (queued, not applied), says
``queued`` with the status as JSON, waits for a line, resumes the target,
waits until everything is applied and says ``applied`` with the status."""
import json
import os
import sys
import time

from smirror.replication import Replication


def main():
    src, dst, state, limit, mib = sys.argv[1:6]
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "data"), "wb") as f:
        f.truncate(4 << 20)
    rep = Replication(src, dst, capture="api", mirror="full", state_dir=state, memory_limit=limit)
    rep.start()
    assert rep.wait(60)
    rep.pause_target()
    print("idle", flush=True)
    sys.stdin.readline()
    chunk = 256 << 10
    for i in range(int(mib) * 4):
        rep.journal.write("data", (i * chunk) % (4 << 20), os.urandom(chunk))
    seq = rep.sync()
    assert rep.sender.wait_acked(seq, 600), rep.status()
    print("queued", json.dumps(rep.status()), flush=True)
    sys.stdin.readline()
    rep.resume_target()
    assert rep.wait(600), rep.status()
    # applied frames leave the target queue (and its memory) at the durable
    # pass after their apply, up to DURABLE_INTERVAL later
    deadline = time.monotonic() + 60
    while rep.status()["memory"]["used"] and time.monotonic() < deadline:
        time.sleep(0.05)
    print("applied", json.dumps(rep.status()), flush=True)
    rep.stop()


if __name__ == "__main__":
    main()
