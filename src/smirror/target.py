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
from .journal import decode_frame, frame_header
from .memqueue import SpillQueue, segment_size_for
from .source import ACK
from .wire import Link, LinkClosed, MsgType, ProtocolError

log = logging.getLogger("smirror.target")


class TargetConnection:
    """State, queue and applier of one incoming connection."""

    def __init__(self, conid: int, map_base, state_dir, *, memory_limit: int = 64 << 20,
                 disk_limit: int = 1 << 30, min_free_bytes: int = 0, fsync: str = "segment",
                 on_task=None, on_mark=None, apply: bool = True, paused: bool = False):
        self.conid = conid
        self.map_base = os.fsdecode(os.path.abspath(os.fsencode(map_base)))
        self.dir = Path(state_dir) / f"target-{conid}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.queue = SpillQueue(str(self.dir / "queue"), memory_limit, disk_limit,
                                segment_size=segment_size_for(disk_limit),
                                min_free_bytes=min_free_bytes, fsync=fsync, durable=True)
        self.applier = Applier(self.map_base, state_path=self.dir / "applied",
                               on_task=on_task, on_mark=on_mark)
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
                self.applier.apply_all(ops)
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

    def pause(self) -> None:
        """Stop applying after the frame being applied (receiving goes on
        into the queue, which spills to disk, then makes the source wait)."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    @property
    def apply_state(self) -> str:
        if self._paused.is_set():
            return "pause pending" if self._applying else "paused"
        return "applying"

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
            link.send(MsgType.ACK, ACK.pack(h.last_seq))   # a resend of what is held
            return
        if h.first_seq != self.received_seq + 1:
            raise ProtocolError(f"frame with seqs {h.first_seq}..{h.last_seq} from {link.peer} "
                                f"does not follow seq {self.received_seq}: ops would be skipped")
        frame = payload
        decode_frame(frame)             # full verification before it counts as received
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
        if self._unacked_frames >= self.ACK_EVERY or not link.readable():
            self._send_ack(link)

    ACK_EVERY = 16
    _unacked = None
    _unacked_frames = 0

    def _send_ack(self, link: Link) -> None:
        """Acknowledge the frames received and not acknowledged yet."""
        if self._unacked is not None:
            link.send(MsgType.ACK, ACK.pack(self._unacked))
            self._unacked = None
            self._unacked_frames = 0

    def status(self) -> dict:
        q = self.queue
        return {"conid": self.conid, "map_base": self.map_base, "state": self.state,
                "error": self.error, "seq_received": self.received_seq,
                "seq_applied": self.applier.applied_seq, "queue_mem_bytes": q.mem_bytes,
                "queue_disk_bytes": q.disk_bytes, "frames_received": self.frames_received,
                "bytes_received": self.bytes_received, "paused": self._paused.is_set(),
                "apply_state": self.apply_state,
                "repairs": self.applier.stats["repairs"]}
