"""Embedded replication: source and target engines of one connection in one
process, for ``smirror replicate SRC DST``, for tests and for programs that
embed smirror.

The data path is the daemons' own: capture -> connection journal -> source
queue -> sender => a real stream socket => receiver -> durable target queue
-> applier. Capture is the watcher (``capture="watch"``) or the program
itself through :attr:`Replication.journal` (``capture="api"``), which records
every change in the exact order the program makes it, or a FUSE mount
(``mount=MOUNTPOINT``, :mod:`smirror.capture.mount`) that programs use as their data
directory and that records every change made through it, in order::

    with smirror.Replication("/data", "/backup/data", capture="api") as rep:
        rep.journal.create("db/log")
        rep.journal.write("db/log", 0, b"first record")
        rep.wait()                      # until the target applied it all
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from smirror.capture.recorder import Recorder
from smirror.errors import ConfigError, MirrorError, QueueFull, SmirrorError
from smirror.fs.tree import Rules
from smirror.kernels.memqueue import SpillQueue, budget_use, memory_budget, queue_cap
from smirror.stream.apply import ALL_XATTR_NAMESPACES
from smirror.stream.journal import ConnectionJournal
from smirror.stream.receiver import TargetConnection
from smirror.stream.sender import Sender
from smirror.stream.syncwait import SYNC_TIMEOUT, SyncWaiter, check_sync
from smirror.stream.wire import ORDER_PER_FILE, Link, MsgType
from smirror.units import parse_size

if TYPE_CHECKING:       # imported where used: a library-API run loads neither
    from smirror.capture.mount.runner import CaptureMount
    from smirror.capture.watch import TreeCapture
    from smirror.mirror.engine import Summary

log = logging.getLogger("smirror.replication")

MIRROR_MODES = ("checksum", "different", "full", "none")


def default_state_dir(src, dst) -> Path:
    """``$XDG_STATE_HOME/smirror/replicate/<id>``: one per (SRC, DST) pair."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    key = hashlib.sha256(os.fsencode(os.path.abspath(src)) + b"\0"
                         + os.fsencode(os.path.abspath(dst))).hexdigest()[:16]
    return base / "smirror" / "replicate" / key


class Replication:
    """Replicates ``src`` to ``dst`` continuously until :meth:`stop`."""

    def __init__(self, src, dst, *, capture: str = "watch", mirror: str = "checksum",
                 rules: Rules | None = None, state_dir=None,
                 memory_limit="256MiB", source_memory_limit=None, target_memory_limit=None,
                 disk_queue_limit="4GiB", progress=None, task_dir=None,
                 ignore_deletes: str = "off", deleted_keep_days: float = 0.0,
                 in_use_max_delay: float = 0.0, mount=None, sync: str = "async",
                 sync_timeout: float = SYNC_TIMEOUT):
        """``task_dir``: run task commands (:meth:`queue_task`) found in this
        directory (None: tasks are refused); ``ignore_deletes``: off, keep
        (deletes are not applied) or move (deleted files go to
        STATE_DIR/deleted, purged after ``deleted_keep_days``);
        ``in_use_max_delay``: seconds the ops of a target file open in
        another process wait (0: no check); ``mount``: a mount point where
        ``src`` is served through the capture mount (``capture="mount"``,
        the default when a mount point is given); ``memory_limit``: the RAM
        budget of both queues and the handoff together (past it they spill
        to disk), ``source_memory_limit`` / ``target_memory_limit``:
        optional caps of one queue under it (None: the budget alone);
        ``sync``: "async" (default), "fsync" (an fsync through the mount
        returns once the target made it durable) or "every-write" (every
        changing call does), with the mount only; a call the target cannot
        make durable within ``sync_timeout`` seconds fails with EIO
        (:mod:`smirror.stream.syncwait`)."""
        if mount is not None and capture == "watch":
            capture = "mount"
        if capture not in ("watch", "api", "mount"):
            raise ConfigError(f"capture must be 'watch', 'api' or 'mount', got {capture!r}")
        if (capture == "mount") != (mount is not None):
            raise ConfigError("capture='mount' needs a mount point (mount=...), and a mount "
                              "point needs capture='mount'")
        self.sync_mode = check_sync(sync, capture)
        self.sync_waiter = SyncWaiter(sync_timeout)
        self.mount_point = None if mount is None else os.path.abspath(os.fsdecode(mount))
        self.mount: CaptureMount | None = None
        if mirror not in MIRROR_MODES:
            raise ConfigError(f"mirror must be one of {', '.join(MIRROR_MODES)}, got {mirror!r}")
        from smirror.mirror.engine import check_roots
        src_b, dst_b = check_roots(src, dst)      # missing SRC, nesting: clear errors
        self.src, self.dst = os.fsdecode(src_b), os.fsdecode(dst_b)
        self.capture_mode = capture
        self.mirror_mode = mirror
        self.rules = rules
        self.progress = progress
        self.state_dir = Path(state_dir) if state_dir else default_state_dir(self.src, self.dst)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # one budget for everything this replication holds in memory
        self.memory = memory_budget(memory_limit, "memory limit")
        smem = queue_cap(None if source_memory_limit is None
                         else parse_size(source_memory_limit, "source memory limit"), self.memory.limit)
        tmem = queue_cap(None if target_memory_limit is None
                         else parse_size(target_memory_limit, "target memory limit"), self.memory.limit)
        disk = parse_size(disk_queue_limit, "disk queue limit")
        os.makedirs(self.dst, exist_ok=True)
        from smirror.daemon.registry import check_options
        from smirror.fs.keep import KeepDirs
        from smirror.stream.tasks import SourceTasks, TargetTasks, TaskLog, TaskPolicy
        opts = check_options({"ignore_deletes": ignore_deletes, "deleted_keep_days": deleted_keep_days})
        self.ignore_deletes, self.deleted_keep_days = opts["ignore_deletes"], opts["deleted_keep_days"]
        self.task_log = TaskLog()
        policy = TaskPolicy(task_dir is not None, os.fspath(task_dir) if task_dir else "")
        self.source_tasks = SourceTasks(policy, self.task_log)
        self.target = TargetConnection(1, self.dst, self.state_dir, memory_limit=tmem, disk_limit=disk,
                                       budget=self.memory,
                                       tasks=TargetTasks(policy, log_=self.task_log),
                                       in_use_max_delay=in_use_max_delay, apply=False,
                                       keep_dirs=KeepDirs(self.state_dir / "orphans",
                                                          self.state_dir / "deleted"),
                                       # its own administrator: the options given here
                                       deleted_mode="move" if self.ignore_deletes == "move" else "keep",
                                       deleted_keep_days=self.deleted_keep_days,
                                       orphan_moves=True, allow_setid=True,
                                       xattr_namespaces=ALL_XATTR_NAMESPACES, allow_devices=True)
        # the source queue is not durable: after a restart the initial mirror
        # (or the watcher's resync) brings the target in line again
        qdir = self.state_dir / "source-1"
        self.queue = SpillQueue(str(qdir), smem, disk, budget=self.memory)
        self.journal_sink = ConnectionJournal(self.queue, next_seq=self.target.received_seq + 1)
        # a watcher keeps per-file order only: the target may coalesce its frames
        self.sender = Sender(1, self.dst, self.journal_sink, self._dial, retry_interval=0.2,
                             order=ORDER_PER_FILE if capture == "watch" else None, sync=self.sync_mode)
        self.sync_waiter.add(1, self.journal_sink, self.sender, self.sync_mode)
        self.tree_capture: TreeCapture | None = None
        self.journal: Recorder | None = None
        self.mirror_summary: Summary | None = None
        self._threads: list[threading.Thread] = []
        self._started = False

    # -- transport: a socket pair per link, the target end served in a thread
    def _dial(self) -> Link:
        a, b = socket.socketpair()
        t = threading.Thread(target=self._serve, args=(Link(b, "target"),), daemon=True,
                             name="target-link")
        t.start()
        return Link(a, "target")

    def _serve(self, link: Link) -> None:
        with link:
            try:
                _, opened = link.recv_json(MsgType.OPEN)
                self.target.serve(link, order=opened.get("order"),
                                  durable=opened.get("durable") is True)
            except Exception as exc:
                expected = isinstance(exc, (SmirrorError, OSError))
                log.error("target link: %s", exc if expected else f"{type(exc).__name__}: {exc}",
                          exc_info=not expected)

    # -- life cycle --------------------------------------------------------------
    def start(self) -> Replication:
        if self._started:
            return self
        self._started = True
        if self.capture_mode == "watch":
            from smirror.capture.watch import TreeCapture
            # watching starts before the mirror: nothing changed meanwhile is missed
            self.tree_capture = TreeCapture(self.src, self._capture_sink(), rules=self.rules)
        if self.mirror_mode != "none":
            self._drop_stale_backlog()
        # only now: a backlog left by the last run is applied before any new op
        # (no mirror) or was dropped (the mirror supersedes it)
        self.target.start_applier()
        cap = self.tree_capture
        if cap is not None:
            # the target found a divergence: the capture sends that subtree again
            self.sender.on_resync = lambda rel, why: cap.request_resync(rel, reason=why)
        # the initial mirror travels through the stream: the sender first
        self.sender.start()
        try:
            if self.mirror_mode != "none":
                self._initial_mirror()
        except BaseException:
            self.stop(drain=False)      # the sender and the applier run already
            raise
        if self.tree_capture is not None:
            # the cache is read from the target as the mirror left it (its
            # blocks hashed, its names grouped by the target's inodes): on a
            # live tree, what the mirror's own record says of it (adopt_mirror)
            # missed hard links made and files written through names unlinked
            # meanwhile (faults.py kill, replicate-live: 7 of 12 diverged)
            self.tree_capture.load_target(self.dst)
            for rel in self.tree_capture.unlinked:
                self.tree_capture.resync(rel, "a hard link the target holds apart")
            for rel, why in self.mirror_errors:
                # the watcher was on before the mirror: what the mirror could
                # not copy (a file that kept changing, one it could not read)
                # is sent from the cache's idea of the target, or reported
                self.tree_capture.resync(rel, f"the initial mirror could not copy it: {why}")
            t = threading.Thread(target=self.tree_capture.run, daemon=True, name="capture")
            t.start()
            self._threads.append(t)
        elif self.capture_mode == "mount":
            from smirror.capture.mount.runner import CaptureMount
            # after the mirror: nothing can be written through it before
            self.mount = CaptureMount(self.src, self.mount_point, self._capture_sink(),
                                      sync_waiter=self.sync_waiter if self.sync_mode != "async" else None)
            try:
                self.mount.start()
            except BaseException:
                self.mount = None
                self.stop(drain=False)
                raise
        else:
            self.journal = Recorder(self.src, self._capture_sink())
        return self

    def _capture_sink(self):
        """Where captured ops go: the journal, with deletes turned into
        ignored-delete marks when this replication ignores deletes (a move
        out of the set still deletes)."""
        if self.ignore_deletes == "off":
            return self.journal_sink.append
        from smirror.stream.orphans import for_connection
        append, mode, days = self.journal_sink.append, self.ignore_deletes, self.deleted_keep_days

        def sink(op):
            moving_out = self.tree_capture is not None and self.tree_capture.moving_out
            return append(for_connection(op, mode, days, moving_out))
        return sink

    # -- backup controls ---------------------------------------------------------
    def queue_task(self, name: str, *, on_execute, on_receive=None, on_queue=None,
                   on_transmit=None, timeout=None, args=()) -> dict:
        """Queue a task command inline: ``on_execute`` runs (in the target
        directory, from ``task_dir``) once every change recorded before this
        call is applied, and no later change is applied until it ends or
        ``timeout`` seconds passed (None: forever; 0: do not wait). With
        watcher capture, the changes the watcher saw so far go first.
        Commands are strings (shell-like words, no shell) or lists of words."""
        from smirror.stream.tasks import QueuedInto, TaskSpec
        spec = TaskSpec.build(name, on_execute=on_execute, on_receive=on_receive, on_queue=on_queue,
                              on_transmit=on_transmit, timeout=timeout, args=args, source="local")
        return self.source_tasks.queue(spec, "local", [
            QueuedInto(1, self.tree_capture, self.journal_sink, self.sender)])

    def tasks(self) -> list[dict]:
        """Recent task results (both sides), oldest first."""
        return self.task_log.recent()

    def pause_target(self) -> None:
        """Stop applying after the frame being applied; receiving goes on."""
        self.target.pause()

    def resume_target(self) -> None:
        self.target.resume()

    def _drop_stale_backlog(self) -> None:
        """Ops the target queue still holds from the last run describe the
        source as it was then: the initial mirror brings the target to the
        source as it is now, and applying them after it would put old
        content back. They are dropped (counted in the log)."""
        q = self.target.queue
        if q.count:
            log.warning("replicate: %d frame(s) up to seq %d left in the target queue by the last "
                        "run are superseded by the initial mirror: dropped", q.count, q.last_seq)
            self.dropped_backlog = q.count
            q.ack(q.last_seq or 0)      # count > 0: last_seq is set

    dropped_backlog = 0
    mirror_errors: list = []

    MIRROR_APPLY_CHECK = 5.0     # seconds between looks at a target that applies the mirror

    def _initial_mirror(self) -> None:
        """The mirror engine brings DST in line through this replication's
        own stream (DST read here, its ops applied by the target side like
        any other), and waits until the target applied them; the capture
        then reads its cache from DST (TreeCapture.load_target)."""
        from smirror.mirror.engine import Mirror, MirrorOptions
        from smirror.mirror.local import LocalTarget
        from smirror.mirror.remote import StreamTarget
        # a restart (the target received ops of an earlier run) with deletes
        # replicated: what DST holds that SRC lacks was deleted while this
        # replication was down, so its mirror deletes the orphans. A first
        # run only reports them: DST may hold files of its own.
        restart = self.target.received_seq > 0
        orphans = "delete" if restart and self.ignore_deletes == "off" else "report"
        # a restart after a crash of mount capture: the last writes served
        # may have reached BACKING but not the target, within the same tick
        # of the file clock as the write before (same size and mtime), so
        # every file is compared by checksum, not only those whose size or
        # mtime differ
        quick = self.mirror_mode == "different" or (
            self.mirror_mode == "checksum" and not (restart and self.capture_mode == "mount"))
        opts = MirrorOptions(different=quick,
                             checksum=self.mirror_mode == "checksum", rules=self.rules,
                             orphans=orphans)
        reader = LocalTarget(self.dst)
        target = StreamTarget(reader, self._mirror_sink)
        try:
            engine = Mirror(self.src, target, opts, progress=self.progress)
            summary = self.mirror_summary = engine.run()
        finally:
            reader.close()
        self._wait_mirror_applied()
        if summary.errors and self.tree_capture is not None:
            # a live tree: busy or unreadable files are the capture's to follow
            for rel, why in summary.errors:
                log.warning("initial mirror: %s: %s; the capture follows it", os.fsdecode(rel), why)
            self.mirror_errors = list(summary.errors)
        elif summary.errors:
            raise MirrorError(f"initial mirror of {self.src} to {self.dst} failed for "
                              f"{len(summary.errors)} path(s), first: "
                              f"{summary.errors[0]}")

    MIRROR_QUEUE_WAIT = 600.0    # seconds the mirror waits for room in a full source queue

    def _mirror_sink(self, op) -> None:
        """The mirror's ops into the journal; a full source queue makes the
        mirror wait for the sender."""
        deadline = time.monotonic() + self.MIRROR_QUEUE_WAIT
        while True:
            try:
                self.journal_sink.append(op)
                return
            except QueueFull:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _wait_mirror_applied(self) -> None:
        """Until the target applied the mirror (DST is SRC as it was when
        the mirror read it), as long as it makes progress."""
        self.journal_sink.flush_waiting(self.MIRROR_QUEUE_WAIT)
        seq = self.journal_sink.last_seq
        applied = self.target.applier.applied_seq
        while not self.target.wait_applied(seq, self.MIRROR_APPLY_CHECK):
            now = self.target.applier.applied_seq
            if now == applied and self.target.error:
                raise MirrorError(f"initial mirror of {self.src} to {self.dst}: the target "
                                  f"stopped applying it: {self.target.error}")
            applied = now

    def sync(self) -> int:
        """Capture everything changed so far and queue it; returns the last seq."""
        if self.tree_capture is not None:
            self.tree_capture.sync()
        if self.mount is not None:
            self.mount.flush_times()
        self.journal_sink.flush()
        return self.journal_sink.last_seq

    def wait(self, timeout: float = 60.0) -> bool:
        """Until the target applied everything captured so far."""
        seq = self.sync()
        deadline = time.monotonic() + timeout
        return (self.sender.wait_acked(seq, timeout)
                and self.target.wait_applied(seq, max(0.0, deadline - time.monotonic())))

    _stopped = False

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop (``drain``: after the target applied what was captured, up
        to ``timeout`` seconds). Once: a second call, such as the ``with``
        block's exit after an explicit stop, does nothing (it waited out the
        drain's timeout on a target the first stop had left paused)."""
        if self._stopped:
            return
        self._stopped = True
        if self.mount is not None:
            self.mount.stop()           # first: no change after the drain
        if drain and self._started and self.sender.state != "stopped":
            self.wait(timeout)      # (a stopped sender delivers nothing more: no wait)
        if self.tree_capture is not None:
            self.tree_capture.stop()
        for t in self._threads:
            t.join(5)
        if self.tree_capture is not None:
            self.tree_capture.close()
        self.sender.stop()
        self.target.close()
        self.queue.close()

    def __enter__(self) -> Replication:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(drain=exc[0] is None)

    def failure(self) -> str:
        """Why this replication cannot go on (a component that stopped for
        good), or "" while it runs or recovers."""
        if self.mount is not None and self.mount.failure():
            return self.mount.failure()
        cap = self.tree_capture
        if cap is not None:
            if cap.state == "failed":
                return cap.error
            if self._threads and not self._threads[0].is_alive() and cap.state != "stopped":
                return f"capture of {self.src} stopped unexpectedly"
        return ""

    def memory_use(self) -> dict:
        """The budget and what holds it: limit, used, peak, refused
        reservations, queue and handoff bytes (status ``memory``)."""
        return budget_use(self.memory, [self.queue, self.target.queue], self.target.handoff_bytes)

    def status(self) -> dict:
        s, t = self.sender.status(), self.target.status()
        out = {"source": self.src, "target": self.dst, "state": s["state"],
               "seq_captured": s["seq_captured"], "seq_sent": s["seq_sent"],
               "seq_acked": s["seq_acked"], "seq_applied": t["seq_applied"],
               # the target's two watermarks: held (maybe in the page cache) and durable
               "seq_received": t["seq_received"], "seq_durable": t["seq_durable"],
               "sync": self.sync_mode, "sync_waits": self.sync_waiter.status(),
               "source_queue_mem": s["queue_mem_bytes"], "source_queue_disk": s["queue_disk_bytes"],
               "target_queue_mem": t["queue_mem_bytes"] + t["handoff_bytes"],
               "target_queue_disk": t["queue_disk_bytes"],
               "bytes_sent": s["bytes_sent"], "lag_ms_p50": s["lag_ms_p50"],
               "lag_ms_p99": s["lag_ms_p99"],
               "memory": self.memory_use(),
               "target_error": t["error"], "resyncs": t["resyncs"],
               "last_divergence": t["last_divergence"]}
        errors = []
        if self.mount is not None:
            fs = self.mount.fs
            out["mount"] = {"mount_point": self.mount.mountpoint, "error": self.mount.error,
                            **(dict(fs.stats, failures=fs.failures) if fs is not None else {})}
            if self.mount.bypass is not None:
                out["mount"]["bypass"] = self.mount.bypass.status()
            if self.mount.error:
                errors.append(f"mount: {self.mount.error}")
        if self.tree_capture is not None:
            cap = self.tree_capture
            unreadable = dict(sorted(cap.unreadable.items())[:20])
            out["capture"] = dict(cap.stats, state=cap.state, error=cap.error,
                                  unreadable={os.fsdecode(p): w for p, w in unreadable.items()})
            if cap.state in ("restarting", "failed"):
                out["state"] = f"capture-{cap.state}"
                errors.append(cap.error)
            if unreadable:
                errors.append(f"{len(cap.unreadable)} file(s) cannot be read, not sent: "
                              + ", ".join(f"{os.fsdecode(p)} ({w})" for p, w in unreadable.items()))
        if t["error"]:
            errors.append(f"target: {t['error']}")
            if out["state"] == "connected":
                out["state"] = "apply-error"
        if s["last_error"]:
            errors.append(f"link: {s['last_error']}")
        out["error"] = "; ".join(errors)
        return out
