"""A subtree that keeps diverging after every resync (something on the
target fights the replica: here a process that keeps putting a file where
the source has a directory): the target's asks for it back off, and it
becomes the connection's error on both sides instead of a silent loop;
once the cause is gone it converges and the error clears."""
import os
import shutil
import threading
import time

from smirror.replication import Replication
from smirror.stream.receiver import TargetConnection
from support.daemons import wait_for
from support.treestate import diff, snapshot


class Saboteur:
    """Keeps a regular file at ``path`` (a directory the replica has there
    is removed), as fast as it can."""

    def __init__(self, path):
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                if os.path.isdir(self.path) and not os.path.islink(self.path):
                    shutil.rmtree(self.path, ignore_errors=True)
                    with open(self.path, "wb") as f:
                        f.write(b"not the replica's")
            except OSError:
                pass            # the applier got there first: next round
            self._stop.wait(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def test_a_subtree_that_keeps_diverging_backs_off_and_is_the_connections_error(tmp_path, monkeypatch):
    # the policy made quick for a test: 2 asks at once, then 0.1 s doubling
    # to 0.4 s; the 6th ask in a row is the error
    monkeypatch.setattr(TargetConnection, "RESYNC_FREE", 2)
    monkeypatch.setattr(TargetConnection, "RESYNC_BACKOFF", 0.1)
    monkeypatch.setattr(TargetConnection, "RESYNC_BACKOFF_MAX", 0.4)
    monkeypatch.setattr(TargetConnection, "RESYNC_GIVE_UP", 6)
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"0")
    with Replication(src, dst, state_dir=tmp_path / "state") as rep:
        wait_for(lambda: rep.wait(5) and not diff(snapshot(src), snapshot(dst)), 30, "the first mirror")
        stop = threading.Event()

        def writer():               # the source keeps changing d: each change fails on the target
            n = 0
            while not stop.is_set():
                n += 1
                (src / "d" / "f").write_bytes(b"%d" % n)
                stop.wait(0.02)
        w = threading.Thread(target=writer, daemon=True)
        w.start()
        try:
            with Saboteur(dst / "d"):
                t = wait_for(lambda: (s := rep.target.status())["resync_error"] and s, 60,
                             "the subtree that keeps diverging to be the connection's error")
                assert "'d' still diverges after 6 resyncs in a row" in t["resync_error"], t
                assert t["resyncs"]["deferred"] >= 1, t["resyncs"]        # asks were held back
                # the source's status says it too (its last error)
                assert "'d' still diverges" in rep.status()["error"], rep.status()
                # backed off: at the bound, at most one ask every 0.4 s (and the
                # resync's own time) while it keeps failing
                asked = t["resyncs"]["asked"]
                time.sleep(2.0)
                assert rep.target.status()["resyncs"]["asked"] - asked <= 2.0 / 0.4 + 1
        finally:
            stop.set()
            w.join(10)
        # the cause gone: the next resync converges, the error clears
        (src / "d" / "f").write_bytes(b"last")
        wait_for(lambda: not diff(snapshot(src), snapshot(dst)), 30, "convergence")
        wait_for(lambda: not rep.target.status()["resync_error"], 30, "the error to clear")
        wait_for(lambda: "still diverges" not in rep.status()["error"], 30,
                 "the source's error to clear")
