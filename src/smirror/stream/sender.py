"""The sender of one connection: streams the connection's source queue to
the target over a data link and drops what the target acknowledged (durable
there).

    ConnectionJournal -> SpillQueue -> Sender => FRAME ... <= ACK

A reconnect resumes after the last op the target holds (READY): the queue
still has every unacknowledged frame, so nothing is resent twice to the
applier and nothing is skipped. When the target needs ops the source no
longer has (the target lost its state), the sender says RESET and asks for
a remirror (``needs_mirror``).

Two watermarks: the sender asks for both in its OPEN ("durable"); a target
that knows them answers READY with "durable_seq" and ACKs with (received,
durable) (wire.ACK2). The queue keeps every frame until the *durable* one
passes it, and a reconnect resends from there: a target that lost power
loses nothing the source dropped. ``request_durable(seq)`` has the target
make ops up to ``seq`` durable at once (a SYNC message): the synchronous
modes wait for it with :meth:`Sender.wait_acked`. An older target's ACK
counts as durable (what it meant there); a connection whose ``sync`` mode is
not "async" refuses such a target with a clear error.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from collections.abc import Callable

from smirror.errors import QueueClosed, QueueFull, SmirrorError
from smirror.stream.journal import ConnectionJournal
from smirror.stream.wire import ACK, ACK2, SYNC, Link, LinkClosed, MsgType, ProtocolError

SYNC_MODES = ("async", "fsync", "every-write")
# seconds an idle sender waits before it looks again unwoken (a wake ends
# the wait at once): a safety net, the idle daemon's only wake-up
IDLE_WAIT = 0.5

log = logging.getLogger("smirror.stream.sender")


class Sender:
    """Streams one connection's queue over data links made by ``dial()``,
    reconnecting every ``retry_interval`` seconds while it runs."""

    def __init__(self, conid: int, map_base: str, journal: ConnectionJournal, dial, *,
                 source_name: str = "", retry_interval: float = 1.0, idle_flush: float = 0.001,
                 order: str | None = None, sync: str = "async"):
        """``order``: wire.ORDER_PER_FILE when the capture feeding ``journal``
        keeps per-file order only (a watcher): the target may coalesce.
        ``sync``: the connection's synchronous mode (SYNC_MODES): what the
        capture mount waits for; here it only refuses a target that
        cannot report a durable watermark."""
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}, got {sync!r}")
        self.sync = sync
        self.received_seq = 0          # the target's received watermark (status)
        self.durable_link = False      # the current link reports the durable watermark
        self._sync_wanted = 0          # the highest seq a waiter needs durable
        self._sync_sent = 0            # the highest SYNC sent on the current link
        self.conid = conid
        self.order = order
        self.map_base = map_base
        self.journal = journal
        self.queue = journal.queue
        self.dial = dial
        self.source_name = source_name
        self.retry_interval = retry_interval
        self.idle_flush = idle_flush
        self.state = "idle"
        self.last_error = ""
        self.needs_mirror = False
        self.sent_seq = 0
        self.acked_seq = 0
        self.bytes_sent = 0
        self.frames_sent = 0
        self.connects = 0
        self.lag_ms: list[float] = []          # capture -> acknowledged, per frame (recent)
        self._stop = threading.Event()
        self._link: Link | None = None
        self._thread: threading.Thread | None = None
        self._acked = threading.Condition()
        self.on_reset = None        # called (in the sender's thread) when a mirror is needed
        # seq -> callable run just before the frame ending at that seq is
        # sent (a task's on-transmit command; the task is alone in its frame)
        self.before_send: dict[int, Callable[[], object]] = {}
        self.notices: collections.deque = collections.deque(maxlen=50)   # from the target
        self.on_notice = None       # called (in the ack reader's thread) with each task notice
        # (path, reason) -> None: the target asks for a targeted resync
        self.on_resync: Callable[[bytes, str], None] | None = None

    # -- control -----------------------------------------------------------
    def start(self) -> Sender:
        self._thread = threading.Thread(target=self._run, name=f"sender-{self.conid}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.queue.wake()
        link = self._link
        if link is not None:
            link.close()
        if self._thread is not None:
            self._thread.join(timeout)
        self.state = "stopped"

    def cut(self) -> None:
        """Drop the current link (tests, and an admin's 'reconnect')."""
        link = self._link
        if link is not None:
            link.close()

    def wait_acked(self, seq: int, timeout: float = 30.0) -> bool:
        """Until the target acknowledged ``seq`` (True) or timeout (False)."""
        deadline = time.monotonic() + timeout
        with self._acked:
            while self.acked_seq < seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._acked.wait(min(left, 0.1))
        return True

    # -- the loop ----------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self.state = "connecting"
            try:
                link = self.dial()
            except (ProtocolError, OSError, SmirrorError) as exc:
                self._failed(exc)
                continue
            self._link = link
            try:
                self._session(link)
            except QueueClosed:
                return
            except (ProtocolError, OSError, SmirrorError) as exc:
                if not self._stop.is_set():
                    self._failed(exc)
            except Exception as exc:
                log.exception("connection %s: sender failed", self.conid)
                self._failed(RuntimeError(f"sender failed: {type(exc).__name__}: {exc}"))
            finally:
                link.close()
                self._link = None

    def _failed(self, exc) -> None:
        self.state = "disconnected"
        self.report_error(str(exc), logging.WARNING, f"; retrying in {self.retry_interval:.1f}s")
        self._stop.wait(self.retry_interval)

    def report_error(self, message: str, level: int = logging.ERROR, more: str = "") -> None:
        """Keep ``message`` as the connection's last error (status shows it,
        with its time, until another one replaces it) and log it."""
        self.last_error, self.last_error_at = message, time.time()
        log.log(level, "connection %s: %s%s", self.conid, message, more)

    last_error_at: float | None = None

    def _session(self, link: Link) -> None:
        q = self.queue
        next_seq = self._first_unacked_seq()
        link.send_json(MsgType.OPEN, open_message(self.conid, self.map_base, self.source_name,
                                                  next_seq, order=self.order, durable=True))
        try:
            _, ready = link.recv_json(MsgType.READY)
        except ProtocolError as exc:        # the target refused the OPEN: its reason
            raise ProtocolError(f"target {exc}") from None
        durable = self._agree(link, ready, next_seq)
        self.connects += 1
        self.state = "connected"
        log.info("connection %s: streaming to %s from seq %d", self.conid, link.peer, durable + 1)
        reader = threading.Thread(target=self._read_acks, args=(link,), daemon=True,
                                  name=f"acks-{self.conid}")
        reader.start()
        last_send = 0.0
        try:
            while not self._stop.is_set() and reader.is_alive():
                # idle (no open frame, no SYNC owed): one wait until a frame,
                # or a wake (the journal's first op of a frame, a SYNC
                # wanted, stop, the ACK reader's end); else a frame closes
                # after idle_flush without another one to send
                idle = not self.journal.pending and self._sync_wanted <= self._sync_sent
                item = q.get(timeout=IDLE_WAIT if idle else self.idle_flush)
                if item is None:
                    if idle and time.monotonic() - last_send < self.idle_flush:
                        # woken while frames still flow: this one gathers ops
                        # for idle_flush (fewer, fuller frames under load);
                        # after a quiet spell it goes at once (no added lag)
                        continue
                    try:
                        self.journal.flush()
                    except QueueFull as exc:
                        log.error("connection %s: %s", self.conid, exc)
                    if self._sync_wanted > self._sync_sent:
                        self._send_sync(link)
                    continue
                seq, frame = item
                if self.before_send:
                    hook = self.before_send.pop(seq, None)
                    if hook is not None:
                        hook()
                link.send(MsgType.FRAME, frame)
                last_send = time.monotonic()
                self.sent_seq = seq
                self.bytes_sent += len(frame)
                self.frames_sent += 1
                if self._sync_wanted > self._sync_sent:
                    self._send_sync(link)
        finally:
            link.close()
            reader.join(2)
        if not self._stop.is_set() and self._reader_error:
            raise self._reader_error

    _reader_error = None

    def _ready_durable(self, link: Link, ready: dict, target_last: int) -> int:
        """The durable watermark a READY reports (an older target's
        last_seq counts as durable, as it meant there)."""
        self.durable_link = ready.get("durable") is True
        if not self.durable_link:
            if self.sync != "async":
                raise ProtocolError(f"target {link.peer} does not report a durable watermark (an "
                                    f"older smirror): sync = {self.sync!r} needs a target of this "
                                    f"version; upgrade it or connect with sync async")
            return target_last
        durable = ready.get("durable_seq")
        if not isinstance(durable, int) or isinstance(durable, bool) or not 0 <= durable <= target_last:
            raise ProtocolError(f"{link.peer} sent READY with durable_seq {durable!r}: not an "
                                f"integer from 0 to its last_seq {target_last}")
        return durable

    def request_durable(self, seq: int) -> None:
        """Ask the target to make ops up to ``seq`` durable at once (the
        sender's thread sends the SYNC once it sent the frame with
        ``seq``; within idle_flush when it is idle)."""
        if seq > self._sync_wanted:
            self._sync_wanted = seq
            self.queue.wake()

    def _send_sync(self, link: Link) -> None:
        want = self._sync_wanted
        if not self.durable_link or self.sent_seq < want:
            return              # (after the frame that holds it)
        if want > self.acked_seq:
            link.send(MsgType.SYNC, SYNC.pack(want))
        self._sync_sent = want

    def _agree(self, link: Link, ready: dict, next_seq: int) -> int:
        """Where the stream resumes after the target's READY: a RESET when
        the target lacks what this source dropped, a renumbering when it is
        ahead, the source queue acked to the durable watermark (and rewound:
        what follows is sent again). Returns that watermark."""
        q = self.queue
        target_last = ready.get("last_seq")
        if not isinstance(target_last, int) or target_last < 0:
            raise ProtocolError(f"{link.peer} sent READY without a valid last_seq")
        durable = self._ready_durable(link, ready, target_last)
        if target_last + 1 < next_seq:
            # the target lacks ops the source no longer holds
            log.warning("connection %s: target holds up to seq %d but the source queue starts "
                        "at %d: resetting the stream, a mirror must follow", self.conid,
                        target_last, next_seq)
            link.send_json(MsgType.RESET, {"seq": next_seq - 1})
            self.needs_mirror = True
            target_last = next_seq - 1
            if self.on_reset is not None:
                self.on_reset()
        if target_last > self.journal.last_seq:
            # the target holds ops this source does not remember numbering:
            # this source lost its state (a restart without its queue)
            log.warning("connection %s: target is at seq %d, beyond this source's %d: "
                        "numbering on from there, a mirror must follow", self.conid,
                        target_last, self.journal.last_seq)
            if q.count:
                q.ack(q.last_seq)
            self.journal.skip_to(target_last + 1)
            self.needs_mirror = True
        if q.count and durable >= q.first_seq:
            q.ack(min(durable, q.last_seq))
        q.rewind()
        self.received_seq = target_last
        self._sync_sent = 0
        self._set_acked(durable)
        return durable

    def _first_unacked_seq(self) -> int:
        return self.journal.first_unacked_seq()

    def _read_acks(self, link: Link) -> None:
        self._reader_error = None
        try:
            while True:
                mtype, payload = link.recv()
                if mtype == MsgType.ACK:
                    size = ACK2.size if self.durable_link else ACK.size
                    if len(payload) != size:
                        raise ProtocolError(f"{link.peer} sent an ACK of {len(payload)} bytes, "
                                            f"expected {size}")
                    if self.durable_link:
                        received, seq = ACK2.unpack(payload)
                    else:
                        received = seq = ACK.unpack(payload)[0]
                    if received > self.received_seq and received <= self.journal.last_seq:
                        self.received_seq = received
                        self._note_lag(received)
                    if seq > self.journal.last_seq:
                        raise ProtocolError(f"{link.peer} acknowledged seq {seq}, "
                                            f"beyond the last one sent ({self.sent_seq})")
                    if seq > self.acked_seq:
                        self.queue.ack(seq)
                        self._set_acked(seq)
                elif mtype == MsgType.NOTICE:
                    notice = json.loads(bytes(payload))
                    if not isinstance(notice, dict):
                        raise ProtocolError(f"{link.peer} sent a NOTICE that is not an object")
                    self._dispatch_notice(notice)
                elif mtype == MsgType.ERROR:
                    raise ProtocolError(f"target {link.peer}: {json.loads(bytes(payload)).get('error')}")
                else:
                    raise ProtocolError(f"{link.peer} sent {mtype.name} on a data link")
        except (ProtocolError, OSError, ValueError, QueueClosed) as exc:
            if not isinstance(exc, (LinkClosed, QueueClosed)) or not self._stop.is_set():
                self._reader_error = exc if isinstance(exc, (ProtocolError, OSError)) \
                    else ProtocolError(str(exc))
        except Exception as exc:
            log.exception("connection %s: reading the target's replies failed", self.conid)
            self._reader_error = ProtocolError(f"reading the target's replies failed: "
                                               f"{type(exc).__name__}: {exc}")
        finally:
            self.queue.wake()               # the sender's idle wait: this link is over

    def _dispatch_notice(self, notice: dict) -> None:
        """A NOTICE from the target: a request for a targeted resync
        (``{"resync": path}``, to ``on_resync(path_bytes, reason)``) or a
        task report (kept in ``notices``, to ``on_notice``). A callback that
        fails is logged; the ACK reader goes on."""
        resync = notice.get("resync")
        try:
            if notice.get("event") == "apply-error":
                # the target cannot apply an op: the source's status says why
                self.report_error(f"target {self._link.peer if self._link else 'target'}: "
                                  f"{notice.get('error')}")
                self.target_error = self.last_error
                return
            if notice.get("event") == "apply-ok":
                # the target recovered (space freed, ...): its error is no
                # longer the connection's state
                if self.target_error and self.last_error == self.target_error:
                    self.last_error, self.last_error_at = "", None
                if self.target_error:
                    log.warning("connection %s: the target applies again (was: %s)", self.conid,
                                self.target_error)
                self.target_error = ""
                return
            if resync is not None:
                if not isinstance(resync, str):
                    raise ProtocolError(f"NOTICE resync {resync!r} is not a path")
                self.resyncs_asked += 1
                log.info("connection %s: the target asks for a resync of %r: %s", self.conid,
                         resync, notice.get("reason") or "")
                if self.on_resync is not None:
                    self.on_resync(os.fsencode(resync), str(notice.get("reason") or ""))
                return
            self.notices.append(notice)
            level = logging.INFO if notice.get("state") == "ok" else logging.ERROR
            log.log(level, "connection %s: target reports task %r %s: %s %s", self.conid,
                    notice.get("task"), notice.get("stage"), notice.get("state"),
                    notice.get("error") or "")
            if self.on_notice is not None:
                self.on_notice(notice)
        except ProtocolError:
            raise
        except Exception:
            log.exception("connection %s: handling the target's notice %r failed", self.conid, notice)

    resyncs_asked = 0
    target_error = ""           # the target's apply error while it lasts

    def _note_lag(self, received: int) -> None:
        """The lag figure: capture -> received by the target (the durable
        watermark follows within the target's durable interval)."""
        now = time.monotonic()
        times = self.journal.put_times
        while times and times[0][0] <= received:
            self.lag_ms.append((now - times.popleft()[1]) * 1000)
        if len(self.lag_ms) > 10000:
            del self.lag_ms[:5000]

    def _set_acked(self, seq: int) -> None:
        self._note_lag(seq)         # (durable implies received)
        with self._acked:
            if seq > self.acked_seq:
                self.acked_seq = seq
            self._acked.notify_all()

    def lag(self) -> tuple[float | None, float | None]:
        """p50 and p99 of the recent capture -> acknowledged times (ms)."""
        recent = sorted(self.lag_ms[-1000:])
        if not recent:
            return None, None
        return recent[len(recent) // 2], recent[int(len(recent) * 0.99)]

    def status(self) -> dict:
        q = self.queue
        p50, p99 = self.lag()
        return {"conid": self.conid, "state": self.state, "last_error": self.last_error,
                "last_error_at": self.last_error_at,
                "lag_ms_p50": p50, "lag_ms_p99": p99,
                "seq_captured": self.journal.last_seq, "seq_sent": self.sent_seq,
                # acked: durable on the target (the queue keeps frames until then)
                "seq_received": self.received_seq, "seq_durable": self.acked_seq,
                "sync": self.sync, "durable_reported": self.durable_link,
                "seq_acked": self.acked_seq, "queue_mem_bytes": q.mem_bytes,
                "queue_disk_bytes": q.disk_bytes, "bytes_sent": self.bytes_sent,
                "frames_sent": self.frames_sent, "connects": self.connects,
                "needs_mirror": self.needs_mirror, "task_reports": list(self.notices)[-10:],
                "resyncs_asked": self.resyncs_asked, "target_error": self.target_error}


def open_message(conid: int, map_base: str, source: str, next_seq: int = 0,
                 check: bool = False, disconnect: bool = False, order: str | None = None,
                 durable: bool = False) -> dict:
    """The OPEN a source sends first on a data link; with ``check`` it is a
    probe: the target validates the map base (creating nothing else) and
    answers READY or ERROR, and the link ends; with ``disconnect`` the
    source ended the connection: the target drops its side of it."""
    msg = {"conid": conid, "map_base": map_base, "source": source, "next_seq": next_seq}
    if order is not None:       # wire.ORDER_PER_FILE: a watcher's stream
        msg["order"] = order
    if durable:                 # ACK2 and SYNC, please (receiver.TargetConnection.serve)
        msg["durable"] = True
    if check:
        msg["check"] = True
    if disconnect:
        msg["disconnect"] = True
    return msg


def probe_target(link: Link, conid: int, map_base: str, source: str) -> dict:
    """Ask the target behind ``link`` whether it accepts ``map_base`` from
    ``source``: its READY (with the resolved map base), or ProtocolError
    with the target's reason."""
    link.send_json(MsgType.OPEN, open_message(conid, map_base, source, check=True))
    _, ready = link.recv_json(MsgType.READY)
    if not ready.get("check"):
        raise ProtocolError(f"target {link.peer} does not check map bases before a connection "
                            f"(an older smirror): upgrade it")
    return ready
