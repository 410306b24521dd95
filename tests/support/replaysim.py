"""A watcher's stream replayed after a power loss, in one process and fast
(``python tests/support/replaysim.py --trials 200``): what the daemon
trials of :mod:`support.powerloss` do in 15-30 s, a trial here does in
about one, so a divergence that one trial in fifty shows can be found and
kept (its whole op stream written out) in minutes.

A trial: a workload on ``src``; a :class:`TreeCapture` (the daemon's
watcher capture) numbers its ops into a journal; a target loop applies
them in frames (:meth:`Applier.plan` with coalescing, as a watcher's
connection does) on the power-loss layer (:class:`support.lazyfs.LazyMount`,
its state file off the layer, as in test_replay_exact), with a durable pass
every 0.1 s; an op that fails is skipped and its subtree resent by the
capture (the receiver's divergence handling: MARK_SKIPPED, the smallest
subtree the target lacks). At a random moment the layer loses its power;
the applier starts again on what the disk kept, after a reboot, and goes on
from its synced seq through the journal (the ops the source still held);
then the workload stops and the trial waits for the replica to equal the
source.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

if __name__ == "__main__":          # run as a script: the tests' support package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smirror.capture.watch import TreeCapture
from smirror.ops import Op, OpKind
from smirror.stream.apply import Applier
from smirror.stream.receiver import MARK_SKIPPED, divergence_root
from support.faults import Background, fs_workload, rsync_diff
from support.lazyfs import LazyMount, clear

BOOT_AT = 24            # the boot id's place in the applied-state file (stream.apply)
FRAME_OPS = 32          # ops a frame holds at most (the source's journal)
DURABLE_INTERVAL = 0.1  # seconds between durable passes (the receiver's)
REPAIR_KINDS = {OpKind.WRITE, OpKind.TRUNCATE, OpKind.RENAME, OpKind.SETATTR, OpKind.XATTR}


class Journal:
    """The source's stream: ops numbered from 1 as the capture emits them."""

    def __init__(self):
        self.ops: list[Op] = []
        self.lock = threading.Lock()

    def __call__(self, op: Op) -> None:
        with self.lock:
            self.ops.append(op._replace(seq=len(self.ops) + 1))

    def frame(self, after: int) -> list[Op]:
        with self.lock:
            return self.ops[after:after + FRAME_OPS]

    def __len__(self) -> int:
        with self.lock:
            return len(self.ops)


class Target:
    """A target loop: frames from the journal applied past the applier's
    seq, divergences skipped and resynced, durable passes."""

    def __init__(self, applier: Applier, journal: Journal, capture: TreeCapture, log: list):
        self.app, self.journal, self.capture, self.log = applier, journal, capture, log
        self.stop_at_random: float | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> Target:
        self.thread = threading.Thread(target=self._run, daemon=True, name="target")
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not None:
            self.thread.join(60)

    def _run(self) -> None:
        try:
            last_pass = time.monotonic()
            while not self._stop.is_set():
                ops = self.journal.frame(self.app.applied_seq)
                if not ops:
                    time.sleep(0.005)
                else:
                    self.apply_frame(ops)
                if time.monotonic() - last_pass >= DURABLE_INTERVAL:
                    self.app.sync_durable()
                    last_pass = time.monotonic()
        except BaseException as exc:    # noqa: BLE001 - said by the trial
            self.error = exc

    def apply_frame(self, ops) -> None:
        app = self.app
        for op in app.plan(ops, True):
            if self._stop.is_set():
                return          # the power goes between two ops
            if op.seq <= app.applied_seq:
                app.apply(op)
                continue
            repairs = app.stats["repairs"]
            replayed = op.seq <= app.replay_until
            try:
                app.apply(op)
            except Exception as exc:        # noqa: BLE001 - a divergence: skipped, resynced
                self.log.append(f"{'replayed ' if replayed else ''}op {op.seq} failed: {exc}")
                app.apply(Op.mark(op.seq, MARK_SKIPPED, b""))
                self.resync(op, f"failed: {exc}")
                continue
            if app.stats["repairs"] != repairs and (replayed or op.kind in REPAIR_KINDS):
                self.log.append(f"{'replayed ' if replayed else ''}op {op.seq} "
                                f"{OpKind(op.kind).name} {bytes(op.path)!r} repaired")
                self.resync(op, "repaired")

    def resync(self, op, why: str) -> None:
        if op.kind in (OpKind.TASK, OpKind.MARK):
            return
        paths = [bytes(op.path)] + ([bytes(op.path2)] if op.kind == OpKind.RENAME else [])
        for rel in paths:
            root = divergence_root(self.app.root, rel)
            self.log.append(f"  resync of {root!r} asked ({why})")
            self.capture.request_resync(root, reason=why)


def new_boot(state: Path) -> None:
    raw = bytearray(state.read_bytes())
    raw[BOOT_AT:BOOT_AT + 16] = os.urandom(16)
    state.write_bytes(bytes(raw))


def trial(tmp: Path, seed: int, deadline: float = 20.0) -> dict:
    """One trial; returns what is left different (empty: converged), the
    log of divergences and the journal."""
    rng = random.Random(seed)
    src, disk, mnt, state = tmp / "src", tmp / "disk", tmp / "mnt", tmp / "applied"
    src.mkdir()
    disk.mkdir()
    journal = Journal()
    log: list[str] = []
    capture = TreeCapture(src, journal, verify_interval=None)
    cap_thread = threading.Thread(target=capture.run, daemon=True, name="capture")
    cap_thread.start()
    work = Background(fs_workload(src, rng.randrange(1 << 30)))
    layer = LazyMount(disk, mnt).start()
    app = Applier(mnt / "replica", state_path=state)
    target = Target(app, journal, capture, log).start()
    left: list = ["not run"]
    try:
        work.start()
        time.sleep(rng.uniform(0.3, 1.5))
        target.stop()
        synced, applied = app.synced_seq, app.applied_seq
        lost = layer.power_loss()
        with contextlib.suppress(OSError):
            app.close()
        clear(mnt)
        new_boot(state)
        log.append(f"power lost: synced {synced}, applied {applied}, journal {len(journal)}, "
                   f"lost {lost}")
        app = Applier(disk / "replica", state_path=state)
        log.append(f"restart: replay {app.applied_seq + 1}..{app.replay_until}")
        target = Target(app, journal, capture, log).start()
        time.sleep(rng.uniform(0.0, 0.3))
        work.stop()
        t0 = time.monotonic()
        while True:
            capture.sync()
            time.sleep(0.05)
            left = rsync_diff(src, disk / "replica", ())
            if not left or time.monotonic() - t0 > deadline or target.error:
                break
        if target.error:
            left = [f"target loop failed: {target.error!r}"] + left
    finally:
        target.stop()
        capture.stop()
        cap_thread.join(10)
        capture.close()
        with contextlib.suppress(Exception):
            app.close()
        with contextlib.suppress(Exception):
            layer.stop()
        with contextlib.suppress(Exception):
            clear(mnt)
    return {"left": left, "log": log, "ops": list(journal.ops)}


def dump_ops(ops, path: Path) -> None:
    """The journal, one op a line (JSON): what a deterministic test replays."""
    with open(path, "w") as f:
        for op in ops:
            f.write(json.dumps({"seq": op.seq, "kind": OpKind(op.kind).name,
                                "path": os.fsdecode(bytes(op.path)),
                                "path2": os.fsdecode(bytes(op.path2)),
                                "offset": op.offset, "size": op.size, "mode": op.mode,
                                "mask": op.mask, "data": len(op.data)}) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--deadline", type=float, default=20.0)
    p.add_argument("--keep", default="", help="directory where failed trials are kept")
    args = p.parse_args(argv)
    failed = 0
    for i in range(args.trials):
        tmp = Path(tempfile.mkdtemp(prefix="smirror-replaysim-"))
        t0 = time.monotonic()
        res = trial(tmp, args.seed * 100_000 + i, args.deadline)
        took = time.monotonic() - t0
        if res["left"]:
            failed += 1
            print(f"trial {i}: DIVERGED ({took:.1f} s): {res['left'][:5]}", flush=True)
            if args.keep:
                keep = Path(args.keep) / f"trial-{args.seed}-{i}"
                keep.mkdir(parents=True, exist_ok=True)
                (keep / "log.txt").write_text("\n".join(res["log"]) + "\n")
                dump_ops(res["ops"], keep / "ops.jsonl")
                shutil.copytree(tmp / "src", keep / "src", symlinks=True)
                shutil.copytree(tmp / "disk", keep / "disk", symlinks=True)
        else:
            print(f"trial {i}: converged ({took:.1f} s, {len(res['ops'])} ops, "
                  f"{sum('failed' in x or 'repaired' in x for x in res['log'])} divergences)",
                  flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.trials - failed} of {args.trials} converged")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
