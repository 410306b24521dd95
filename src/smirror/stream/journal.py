"""The connection journal: numbers the ops captured for one connection, in
order, and batches them into frames in the connection's source queue (where
the sender finds them).

    capture -> ConnectionJournal (seq, batch, encode) -> SpillQueue -> Sender

A restarted source never gives out a seq twice: ranges are reserved in a
seq file first. Not the frame codec (that is ``kernels.frames``).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time

from smirror.errors import QueueFull
from smirror.fs.atomic import write_atomic
from smirror.kernels.frames import Encoder, frame_header
from smirror.ops import Op, OpKind

log = logging.getLogger("smirror.stream.journal")

REFUSED_OP = b"refused-op"     # MARK label standing in for an op no frame may carry

_new = tuple.__new__


class ConnectionJournal:
    """Numbers ops for one connection and batches them into frames.

    A frame is closed when it reaches ``max_ops`` ops or ``max_bytes`` of op
    data, or when ``flush()`` is called (the sender calls it once it had
    nothing else to send for its ``idle_flush``: a millisecond). The first
    op of an open frame wakes the sender (``queue.wake()``), which waits
    long while nothing is pending."""

    RESERVE = 1 << 20

    def __init__(self, queue, next_seq: int = 1, *, max_ops: int = 4096,
                 max_bytes: int = 1 << 20, compress="auto", seq_file=None):
        self.queue = queue
        # a restarted source must never number ops again with seqs it gave
        # out before: it reserves ranges in ``seq_file`` and starts after
        # the last reservation (the gap is bridged by RESET and a mirror)
        self.seq_file = seq_file
        self._reserved: int | None = None
        if seq_file is not None:
            try:
                with open(seq_file) as f:
                    next_seq = max(next_seq, int(f.read().strip() or 0) + 1)
            except FileNotFoundError:
                pass
            except ValueError:
                raise ValueError(f"{seq_file}: not a sequence number reservation") from None
            self._reserve(next_seq - 1 + self.RESERVE)
        self.next_seq = next_seq
        self.max_ops = max_ops
        self.max_bytes = max_bytes
        self._encoder = Encoder(compress)
        self._pending: list = []
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self.frames = 0
        self.refused_ops = 0       # ops no frame may carry, each replaced by a MARK
        self.last_seq = next_seq - 1
        # (last seq of a frame, time it was queued), oldest first: for the lag figure
        self.put_times: collections.deque = collections.deque(maxlen=100_000)

    def append(self, op: Op) -> int:
        """Number ``op``, add it to the open frame; returns its seq. Raises
        QueueFull (from the queue) when the frame cannot be stored: the
        engine turns that into an auto-disconnect."""
        with self._lock:
            seq = self.next_seq
            if self._reserved is not None and seq > self._reserved:
                self._reserve(seq + self.RESERVE)
            self.next_seq = seq + 1
            self._pending.append(_new(Op, (seq,) + tuple(op)[1:]))
            self._pending_bytes += len(op.data) + 64
            self.last_seq = seq
            if len(self._pending) >= self.max_ops or self._pending_bytes >= self.max_bytes:
                try:
                    self._flush_locked()
                except QueueFull:
                    # not taken: the op is not in the journal (a retry
                    # appends it again under the same seq)
                    self._pending.pop()
                    self._pending_bytes -= len(op.data) + 64
                    self.next_seq, self.last_seq = seq, seq - 1
                    raise
            else:
                if type(op.data) is memoryview:
                    # a view of a buffer its lender reuses (the capture mount's
                    # request data): encoded at once above, else copied to wait
                    # in the open frame (data is the op's last field)
                    self._pending[-1] = _new(Op, (seq,) + tuple(op)[1:-1] + (bytes(op.data),))
                if len(self._pending) == 1:
                    self.queue.wake()       # a frame is open: the sender's idle wait ends
            return seq

    @property
    def pending(self) -> bool:
        """Whether a frame is open (ops appended, not yet queued)."""
        return bool(self._pending)

    def append_alone(self, op: Op, timeout: float = 600.0) -> int:
        """Append ``op`` in a frame of its own (a task: the target sees it
        the moment the frame arrives, and on-transmit runs right before
        it). A full queue is waited for, up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                try:
                    self._flush_locked()
                    seq = self.next_seq
                    if self._reserved is not None and seq > self._reserved:
                        self._reserve(seq + self.RESERVE)
                    self._pending = [_new(Op, (seq,) + tuple(op)[1:])]
                    self._pending_bytes = len(op.data) + 64
                    try:
                        self._flush_locked()
                    except QueueFull:
                        self._pending, self._pending_bytes = [], 0
                        raise
                    self.next_seq, self.last_seq = seq + 1, seq
                    return seq
                except QueueFull:
                    if time.monotonic() > deadline:
                        raise
            time.sleep(0.05)

    def _reserve(self, upto: int) -> None:
        write_atomic(self.seq_file, f"{upto}\n", mode=0o666)
        self._reserved = upto

    def extend(self, ops) -> None:
        for op in ops:
            self.append(op)

    def flush_waiting(self, timeout: float = 600.0) -> None:
        """flush(), waiting up to ``timeout`` for room in a full queue."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.flush()
                return
            except QueueFull:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def flush(self) -> bool:
        """Close the open frame (if any); True when one was queued."""
        with self._lock:
            return self._flush_locked()

    def _flush_locked(self) -> bool:
        if not self._pending:
            return False
        ops = self._pending
        try:
            frame = self._encoder.encode(ops)
        except ValueError:
            # an op the target would refuse (a path beyond PATH_MAX, an
            # owner no file can have): it must not wedge the stream, so a
            # MARK with its seq stands in for it, said in the log
            ops = self._pending = [self._sendable(op) for op in ops]
            frame = self._encoder.encode(ops)
        last = ops[-1].seq
        # on QueueFull the ops stay pending: nothing is half-queued
        self.queue.put(last, frame)
        self._pending = []
        self._pending_bytes = 0
        self.frames += 1
        self.put_times.append((last, time.monotonic()))
        return True

    def _sendable(self, op: Op) -> Op:
        try:
            self._encoder.encode([op])
            return op
        except ValueError as exc:
            self.refused_ops += 1
            path = bytes(op.path)
            shown = repr(path[:200]) + (f"... ({len(path)} bytes)" if len(path) > 200 else "")
            log.error("op seq %d %s %s cannot be replicated (%s): not sent, a MARK stands in",
                      op.seq, OpKind(op.kind).name, shown, str(exc)[:300])
            return Op.mark(op.seq, REFUSED_OP, json.dumps(
                {"kind": OpKind(op.kind).name, "path": os.fsdecode(path[:4095])}).encode())

    def skip_to(self, next_seq: int) -> None:
        """Number from ``next_seq`` on (the target is ahead of what this
        source remembers: its state was lost). Pending ops are renumbered."""
        with self._lock:
            if next_seq <= self.next_seq:
                return
            self._pending = [_new(Op, (next_seq + i,) + tuple(op)[1:])
                             for i, op in enumerate(self._pending)]
            self.next_seq = next_seq + len(self._pending)
            self.last_seq = self.next_seq - 1
            if self._reserved is not None and self.next_seq > self._reserved:
                self._reserve(self.next_seq + self.RESERVE)

    def first_unacked_seq(self) -> int:
        """Seq of the first op the target has not acknowledged: the first
        op of the oldest frame in the queue (items are keyed by their last
        op), or the first op not yet queued. Under the journal's lock: no
        frame moves from pending to the queue between the two looks."""
        q = self.queue
        with self._lock:
            q.rewind()
            item = q.get(timeout=0)
            q.rewind()
            if item is not None:
                return frame_header(item[1]).first_seq
            return self._pending[0].seq if self._pending else self.next_seq

    @property
    def pending_ops(self) -> int:
        return len(self._pending)
