"""The target side of one connection: the receiver verifies each frame,
makes it durable in the target queue and only then acknowledges it; the
applier takes frames from the queue in sequence order and applies their ops
under the map base.

    => FRAME: verify (checksums, lengths, seq continuity) -> durable queue -> ACK
    applier thread: queue -> decode -> Applier (confined) -> queue.ack

A target queue that is full makes the receiver wait for the applier instead
of reading more from the link, so the source waits too (backpressure); no
frame is dropped. After a restart the queue hands out every frame not yet
applied, and the applier's applied-sequence file skips the ops it already
applied.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from .apply import Applier
from .errors import ConfinementError, FrameError, QueueClosed, QueueFull, SmirrorError
from .inuse import InUseGate
from .journal import decode_frame, frame_header
from .ops import MARK_IGNORED_DELETE, MARK_ORPHAN_MOVE, OpKind
from .memqueue import SpillQueue, queue_alert, segment_size_for
from .source import ACK
from .wire import Link, LinkClosed, MsgType, ProtocolError

log = logging.getLogger("smirror.target")



class TargetConnection:
    """State, queue and applier of one incoming connection."""

    def __init__(self, conid: int, map_base, state_dir, *, memory_limit: int = 64 << 20,
                 disk_limit: int = 1 << 30, min_free_bytes: int = 0, fsync: str = "segment",
                 on_task=None, on_mark=None, apply: bool = True, paused: bool = False,
                 tasks=None, stop_on_task_failure: bool = False, in_use_max_delay: float = 0.0,
                 keep_dirs=None, alert_threshold: float = 50.0, queue_dir=None):
        """``tasks``: the daemon's :class:`~smirror.tasks.TargetTasks` (None:
        every task is refused); ``in_use_max_delay``: seconds the ops of a
        file open elsewhere may wait (0: no check); ``keep_dirs``: a
        :class:`~smirror.keep.KeepDirs` for orphans and deleted files moved
        aside (None: such marks are only counted); ``queue_dir``: the
        durable queue's directory (default: ``queue`` beside the applied
        state)."""
        self.conid = conid
        self.map_base = os.fsdecode(os.path.abspath(os.fsencode(map_base)))
        self.dir = Path(state_dir) / f"target-{conid}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.queue_dir = Path(queue_dir) if queue_dir is not None else self.dir / "queue"
        self.queue = SpillQueue(str(self.queue_dir), memory_limit, disk_limit,
                                segment_size=segment_size_for(disk_limit),
                                min_free_bytes=min_free_bytes, fsync=fsync, durable=True)
        self.tasks = tasks
        self.stop_on_task_failure = stop_on_task_failure
        self.keep_dirs = keep_dirs
        self.alert_threshold = alert_threshold
        self.disk_limit = disk_limit
        self.min_free_bytes = min_free_bytes
        self.source = ""
        self._user_on_task, self._user_on_mark = on_task, on_mark
        self.applier = Applier(self.map_base, state_path=self.dir / "applied",
                               on_task=self._on_task, on_mark=self._on_mark)
        self.marks = {"ignored_deletes": 0, "deleted_moved": 0, "orphans_moved": 0}
        self._link: Link | None = None
        self._send_lock = threading.Lock()
        self._notices: list[dict] = []        # not yet delivered to the source
        last = self.queue.last_seq
        self.received_seq = max(last if last is not None else 0, self.applier.applied_seq)
        self.state = "idle"
        self.error = ""
        self.frames_received = 0
        self.bytes_received = 0
        self._progress = threading.Condition()
        self._stop = threading.Event()
        self._paused = threading.Event()
        if paused:                  # before the applier starts: nothing slips through
            self._paused.set()
        self.pause_reason = "paused by request" if paused else ""
        self.gate = InUseGate(in_use_max_delay, stop=self._stop) if in_use_max_delay > 0 else None
        self._applier_thread = None
        if apply:
            self.start_applier()

    # -- applier -------------------------------------------------------------
    @property
    def applied_seq(self) -> int:
        return self.applier.applied_seq

    def start_applier(self) -> None:
        self._applier_thread = threading.Thread(target=self._apply_loop, daemon=True,
                                                name=f"applier-{self.conid}")
        self._applier_thread.start()

    def _apply_loop(self) -> None:
        q = self.queue
        while not self._stop.is_set():
            if self._paused.is_set():
                self._stop.wait(0.05)
                continue
            try:
                item = q.get(timeout=0.1)
            except QueueClosed:
                return
            if item is None:
                continue
            if self._paused.is_set():
                q.rewind()          # paused while waiting: this frame waits too
                continue
            seq, frame = item
            self._applying = True
            try:
                # checked whole by the receiver; the queue keeps it immutable
                # (and checks its own record checksum reading it back)
                ops, _ = decode_frame(frame, check_payload=False)
                if self.gate is None:
                    self.applier.apply_all(ops)
                elif not self._apply_gated(ops):
                    self._applying = False
                    q.rewind()      # stopping while a file was in use: the rest waits
                    continue
            except (FrameError, ConfinementError, SmirrorError, OSError) as exc:
                # the frame stays in the queue: nothing after it is applied
                # out of order; an operator sees why in the status
                self._applying = False
                self.state = "apply-error"
                self.error = str(exc)
                log.error("connection %s: %s", self.conid, exc)
                self._stop.wait(1.0)
                try:
                    q.rewind()
                except QueueClosed:
                    return
                continue
            self.applier.flush()
            self._applying = False
            try:
                q.ack(seq)
            except QueueClosed:
                return
            with self._progress:
                self._progress.notify_all()

    def _apply_gated(self, ops) -> bool:
        """Apply ``ops``, each one only once the files it changes are not
        open elsewhere (or the maximum delay passed). False: stopped."""
        gate, applier = self.gate, self.applier
        gate.begin_frame()
        for op in ops:
            if op.seq > applier.applied_seq and not gate.wait(op, applier._path, applier.flush):
                return False
            applier.apply(op)
        return True

    # -- tasks and marks ---------------------------------------------------
    def _on_task(self, op) -> None:
        """The applier reached a TASK: every earlier op is applied."""
        if self._user_on_task is not None:
            self._user_on_task(op)
            return
        from .tasks import TaskResult
        spec = self._task_spec(op, "on_execute")
        if spec is None:
            return
        if self.tasks is None:
            r = TaskResult(spec.name, spec.id, "on_execute", "refused", conids=[self.conid], seq=op.seq,
                           error=f"task {spec.name!r} refused: this target runs no tasks")
            log.error("%s", r.error)
        else:
            self.task_running = spec.name
            try:
                r = self.tasks.execute(spec, self.conid, op.seq, self.map_base, stop=self._stop)
            finally:
                self.task_running = ""
            if r is None:
                return          # another connection of the group ran it
        self._notify(dict(r.as_dict(), seq=op.seq))
        if r.state in ("failed", "error", "refused") and self.stop_on_task_failure:
            self.pause(f"task {spec.name!r} {r.state}: {r.error} (tasks.stop_replication_on_failure)")
            log.error("connection %s: applying paused after task %r %s", self.conid, spec.name, r.state)

    def _on_mark(self, op) -> None:
        label = bytes(op.path)
        if label not in (MARK_IGNORED_DELETE, MARK_ORPHAN_MOVE):
            if self._user_on_mark is not None:
                self._user_on_mark(op)
            return
        try:
            info = json.loads(bytes(op.data))
            rel = os.fsencode(info["path"])
            if label == MARK_IGNORED_DELETE:
                self.marks["ignored_deletes"] += 1
                if info.get("mode") == "move" and self.keep_dirs is not None and \
                        self.keep_dirs.move_deleted(self, rel, bool(info.get("dir")),
                                                    float(info.get("keep_days") or 0)):
                    self.marks["deleted_moved"] += 1
            elif self.keep_dirs is not None and self.keep_dirs.move_orphan(self, rel):
                self.marks["orphans_moved"] += 1
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # a bad mark changes nothing on the target: said, and skipped
            log.error("connection %s: op seq %d MARK %r has a bad payload (%s): skipped",
                      self.conid, op.seq, label, exc)

    def _task_arrived(self, op) -> None:
        """A TASK was received (durable): check it now, run on-receive, and
        tell the source at once when this target refuses it."""
        spec = self._task_spec(op, "on_receive")
        if spec is None:
            return
        if self.tasks is None:
            self._notify({"task": spec.name, "id": spec.id, "stage": "on_receive", "state": "refused",
                          "seq": op.seq, "error": f"task {spec.name!r} refused: this target runs no tasks"})
            return
        r = self.tasks.arrived(spec, self.conid, op.seq, self.map_base)
        if r is not None and r.state == "refused":
            log.error("connection %s: %s", self.conid, r.error)
            self._notify(dict(r.as_dict(), seq=op.seq))

    def _task_spec(self, op, stage: str):
        """The TaskSpec a TASK op carries, or None after telling the source
        (and the log) that its payload is refused."""
        from .tasks import TaskError, TaskSpec
        try:
            return TaskSpec.decode(op.data, f"connection {self.conid} task at seq {op.seq}")
        except TaskError as exc:
            log.error("%s", exc)
            self._notify({"task": bytes(op.path).decode(errors="replace"), "stage": stage,
                          "state": "refused", "error": str(exc), "seq": op.seq})
            return None

    def _notify(self, notice: dict) -> None:
        """Send a NOTICE to the source (now, or when it is next connected)."""
        notice = dict(notice, conid=self.conid)
        with self._send_lock:
            self._notices.append(notice)
            del self._notices[:-100]
            self._deliver_locked()

    def _deliver_locked(self) -> None:
        link = self._link
        while link is not None and self._notices:
            try:
                link.send_json(MsgType.NOTICE, self._notices[0])
            except OSError:
                return
            self._notices.pop(0)

    def wait_applied(self, seq: int, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._progress:
            while self.applier.applied_seq < seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._progress.wait(min(left, 0.1))
        return True

    _applying = False

    def pause(self, reason: str = "paused by request") -> None:
        """Stop applying after the frame being applied (receiving goes on
        into the queue, which spills to disk, then makes the source wait)."""
        self.pause_reason = reason
        self._paused.set()

    def resume(self) -> None:
        self.pause_reason = ""
        self._paused.clear()

    @property
    def apply_state(self) -> str:
        if self._paused.is_set():
            return "pause pending" if self._applying else "paused"
        if self.gate is not None and self.gate.waiting:
            return "in-use wait"
        if self.task_running:
            return "task"
        return "applying"

    task_running = ""

    def close(self) -> None:
        self._stop.set()
        self.queue.close()
        if self._applier_thread is not None:
            self._applier_thread.join(5)
        self.applier.close()

    # -- receiver ------------------------------------------------------------
    def serve(self, link: Link) -> None:
        """Handle one data link after its OPEN: READY, then frames until the
        link closes. Errors are sent to the source and raised."""
        link.send_json(MsgType.READY, {"last_seq": self.received_seq})
        self.state = "receiving"
        self._unacked, self._unacked_frames = None, 0
        with self._send_lock:
            self._link = link
            self._deliver_locked()      # what the source missed while away
        try:
            while not self._stop.is_set():
                try:
                    # a frame arrives in its own bytes object: the queue keeps it as is
                    mtype, payload = link.recv(own=(MsgType.FRAME,))
                except LinkClosed:
                    return
                if mtype == MsgType.FRAME:
                    self._receive(link, payload)
                    continue
                self._send_ack(link)
                if mtype == MsgType.RESET:
                    self._reset(link, payload)
                elif mtype == MsgType.BYE:
                    return
                else:
                    raise ProtocolError(f"{link.peer} sent {mtype.name} on a data link")
        except (FrameError, ProtocolError) as exc:
            try:
                self._send_ack(link)        # what is durable stays acknowledged
            except OSError:
                pass
            link.send_error(f"connection {self.conid}: {exc}")
            raise
        finally:
            with self._send_lock:
                if self._link is link:
                    self._link = None
            if self.state == "receiving":
                self.state = "idle"

    def _reset(self, link: Link, payload) -> None:
        seq = json.loads(bytes(payload)).get("seq")
        if not isinstance(seq, int) or seq < self.received_seq:
            raise ProtocolError(f"{link.peer} sent RESET to seq {seq!r}, below the "
                                f"{self.received_seq} this target holds")
        log.warning("connection %s: stream reset to seq %d (was %d): a mirror follows",
                    self.conid, seq, self.received_seq)
        self.received_seq = seq

    def _receive(self, link: Link, payload) -> None:
        try:
            h = frame_header(payload)
        except FrameError as exc:
            raise FrameError(f"frame after seq {self.received_seq} from {link.peer}: {exc}") from None
        if h.frame_len != len(payload):
            raise FrameError(f"frame after seq {self.received_seq} from {link.peer} is "
                             f"{len(payload)} bytes, its header says {h.frame_len}")
        if h.last_seq <= self.received_seq:
            self._ack(link, h.last_seq)    # a resend of what is held
            return
        if h.first_seq != self.received_seq + 1:
            raise ProtocolError(f"frame with seqs {h.first_seq}..{h.last_seq} from {link.peer} "
                                f"does not follow seq {self.received_seq}: ops would be skipped")
        frame = payload                 # its own bytes: the queue keeps it as is
        ops, _ = decode_frame(frame)    # full verification before it counts as received
        while True:
            try:
                self.queue.put(h.last_seq, frame)
                break
            except QueueFull:
                # backpressure: stop reading the link until the applier
                # frees room; the source's sends block meanwhile
                self._send_ack(link)
                self.state = "queue-full"
                with self._progress:
                    self._progress.wait(0.1)
                if self._stop.is_set():
                    raise ProtocolError("target is shutting down") from None
        self.state = "receiving"
        self.received_seq = h.last_seq
        self.frames_received += 1
        self.bytes_received += len(frame)
        # durable now; while the next frame is already waiting on the link the
        # ACK can wait for it and cover both (one ACK, one wake-up of the
        # source per burst), up to ACK_EVERY frames
        self._unacked = h.last_seq
        self._unacked_frames += 1
        task = h.count == 1 and ops[0].kind == OpKind.TASK   # tasks travel alone in a frame
        if task or self._unacked_frames >= self.ACK_EVERY or not link.readable():
            self._send_ack(link)
        if task:
            self._task_arrived(ops[0])

    ACK_EVERY = 16
    _unacked = None
    _unacked_frames = 0

    def _ack(self, link: Link, seq: int) -> None:
        with self._send_lock:
            link.send(MsgType.ACK, ACK.pack(seq))

    def _send_ack(self, link: Link) -> None:
        """Acknowledge the frames received and not acknowledged yet."""
        if self._unacked is not None:
            self._ack(link, self._unacked)
            self._unacked = None
            self._unacked_frames = 0

    def status(self) -> dict:
        q = self.queue
        alert = queue_alert(q, self.disk_limit, self.alert_threshold, self.queue_dir, self.min_free_bytes)
        return {"conid": self.conid, "map_base": self.map_base, "state": self.state,
                "pause_reason": self.pause_reason if self._paused.is_set() else "",
                "waiting": self.gate.waiting if self.gate is not None else None,
                "in_use": self.gate.stats if self.gate is not None else None,
                "marks": dict(self.marks), "alert": alert,
                "error": self.error, "seq_received": self.received_seq,
                "seq_applied": self.applier.applied_seq, "queue_mem_bytes": q.mem_bytes,
                "queue_disk_bytes": q.disk_bytes, "frames_received": self.frames_received,
                "bytes_received": self.bytes_received, "paused": self._paused.is_set(),
                "apply_state": self.apply_state,
                "repairs": self.applier.stats["repairs"]}
