"""The target side of one connection: the receiver verifies each frame and
acknowledges it only once it is applied or durable in the target queue
(DESIGN invariant 5); the applier applies frames in sequence order under
the map base.

    => FRAME: verify (checksums, lengths, seq continuity)
         -> handoff (in memory) -> applier -> ACK         while the applier keeps up
         -> durable queue -> ACK, later applier            otherwise

The handoff is the fast path: while the durable queue holds nothing and the
applier is running, a verified frame goes straight to the applier and is
acknowledged after it is applied, so its bytes are written once (to the map
base) instead of twice (queue, then map base). A frame in the handoff is
unacknowledged, so the source still holds it; a kill loses nothing. The
durable queue takes over, the handoff's frames first and in order, as soon
as the applier pauses, stalls or a task arrives (its on-receive hook runs
once the task is durable); both never hold frames at once.

A target queue that is full makes the receiver wait for the applier instead
of reading more from the link, so the source waits too (backpressure); no
frame is dropped. After a restart the queue hands out every frame not yet
applied, and the applier's applied-sequence file skips the ops it already
applied.

Two watermarks (issue 16, "durable means durable"): *received* is what the
ACK above says (verified and held: in the queue, or applied, maybe only in
the page cache); *durable* is what a power loss cannot take: a durable pass
(:meth:`TargetConnection._durable_pass`, a thread of its own, every
DURABLE_INTERVAL while something is not durable, at once on a SYNC) fsyncs
the queue's segments, then the files and directories the applier changed,
then records the applied seq as synced. The queue acknowledges a frame the
applier took from it only after that pass, so a frame leaves the queue only
once its ops are durable in the map base. A source whose OPEN asked for it
gets both watermarks in every ACK (wire.ACK2) and keeps its frames until the
durable one passes them; an older source gets the received one as before.
"""
from __future__ import annotations

import collections
import errno
import json
import logging
import os
import stat
import threading
import time
from pathlib import Path

from smirror.errors import FrameError, QueueClosed, QueueFull, SmirrorError
from smirror.kernels.frames import decode_frame, frame_header
from smirror.kernels.memqueue import SpillQueue, queue_alert, segment_size_for
from smirror.ops import K_TASK, MARK_IGNORED_DELETE, MARK_ORPHAN_MOVE, MARK_RESYNC_DONE, Op, OpKind
from smirror.private import private_dir
from smirror.stream.apply import DEFAULT_XATTR_NAMESPACES, Applier, Moot
from smirror.stream.inuse import InUseGate
from smirror.stream.resyncs import ResyncRequests
from smirror.stream.wire import ACK, ACK2, ORDER_PER_FILE, SYNC, Link, LinkClosed, MsgType, ProtocolError

log = logging.getLogger("smirror.stream.receiver")

# the MARK that stands at the seq of an op skipped as diverged
MARK_SKIPPED = b"smirror.skipped"
# why a resync of what a replayed op touched is asked (tools/powerloss.py
# counts these apart: the source still held those ops, no loss is hidden)
REPLAY_REASON = "replayed after a restart that lost unsynced writes"
# op kinds whose repair by the applier means the target lacked something
_REPAIR_MEANS_DIVERGED = frozenset({OpKind.WRITE, OpKind.TRUNCATE, OpKind.RENAME, OpKind.SETATTR,
                                    OpKind.XATTR})


def _environment_error(exc: BaseException, errnos) -> bool:
    """True for a failure of the target's environment (its errno, or its
    cause's, is one of ``errnos``): retried, never skipped."""
    for e in (exc, exc.__cause__):
        if isinstance(e, OSError) and e.errno in errnos:
            return True
    return False


def divergence_root(root: bytes, rel: bytes) -> bytes:
    """The smallest subtree of the target directory ``root`` that holds
    what went wrong at ``rel``: its first component the target lacks or
    holds as something other than a directory, else ``rel`` itself."""
    parts = rel.split(b"/")
    for i in range(1, len(parts)):
        prefix = b"/".join(parts[:i])
        try:
            st = os.lstat(root + b"/" + prefix)
        except OSError:
            return prefix
        if not stat.S_ISDIR(st.st_mode):
            return prefix
    return rel


class TargetConnection:
    """State, queue and applier of one incoming connection."""

    def __init__(self, conid: int, map_base, state_dir, *, memory_limit: int = 64 << 20,
                 disk_limit: int = 1 << 30, min_free_bytes: int = 0, fsync: str = "segment",
                 on_task=None, on_mark=None, apply: bool = True, paused: bool = False,
                 tasks=None, stop_on_task_failure: bool = False, in_use_max_delay: float = 0.0,
                 keep_dirs=None, alert_threshold: float = 50.0, queue_dir=None,
                 deleted_mode: str = "keep", deleted_keep_days: float = 0.0,
                 orphan_moves: bool = True, allow_setid: bool = False,
                 xattr_namespaces=DEFAULT_XATTR_NAMESPACES, allow_devices: bool = False,
                 budget=None):
        """``tasks``: the daemon's :class:`~smirror.stream.tasks.TargetTasks` (None:
        every task is refused); ``in_use_max_delay``: seconds the ops of a
        file open elsewhere may wait (0: no check); ``keep_dirs``: a
        :class:`~smirror.fs.keep.KeepDirs` for orphans and deleted files moved
        aside (None: such marks are only counted); ``queue_dir``: the
        durable queue's directory (default: ``queue`` beside the applied
        state). What happens to ignored deletes and orphans is this
        target's choice, never the stream's: ``deleted_mode`` "keep" (the
        file stays) or "move" (to ``keep_dirs``, purged after
        ``deleted_keep_days``; 0 = kept), ``orphan_moves`` (False: a mark
        asking to move an orphan leaves it where it is);
        ``allow_setid``: keep setuid/setgid bits of the stream's modes;
        ``xattr_namespaces``, ``allow_devices``: which xattrs and device
        nodes the applier makes (see :class:`~smirror.stream.apply.Applier`);
        ``budget``: the process's :class:`~smirror.kernels.memqueue.MemoryBudget`,
        shared by the queue and the handoff (None: only their own limits)."""
        if deleted_mode not in ("keep", "move"):
            raise ValueError(f"deleted_mode must be 'keep' or 'move', got {deleted_mode!r}")
        self.conid = conid
        self.map_base = os.fsdecode(os.path.abspath(os.fsencode(map_base)))
        self.dir = Path(state_dir) / f"target-{conid}"
        private_dir(self.dir)           # 0700: the applied-sequence state
        self.queue_dir = Path(queue_dir) if queue_dir is not None else self.dir / "queue"
        self.budget = budget
        self.queue = SpillQueue(str(self.queue_dir), memory_limit, disk_limit,
                                segment_size=segment_size_for(disk_limit),
                                min_free_bytes=min_free_bytes, fsync=fsync, durable=True,
                                budget=budget)
        self.tasks = tasks
        self.stop_on_task_failure = stop_on_task_failure
        self.keep_dirs = keep_dirs
        self.alert_threshold = alert_threshold
        self.disk_limit = disk_limit
        self.min_free_bytes = min_free_bytes
        self.source = ""
        self.deleted_mode = deleted_mode
        self.deleted_keep_days = float(deleted_keep_days)
        self.orphan_moves = orphan_moves
        self._user_on_task, self._user_on_mark = on_task, on_mark
        self.applier = Applier(self.map_base, state_path=self.dir / "applied",
                               on_task=self._on_task, on_mark=self._on_mark,
                               allow_setid=allow_setid, name=f"connection {conid}",
                               xattr_namespaces=xattr_namespaces, allow_devices=allow_devices)
        self.marks = {"ignored_deletes": 0, "deleted_moved": 0, "orphans_moved": 0}
        # divergences: ops skipped, resyncs asked of the source and done
        # (replays_undone: replayed ops a later op of the replay undid, done)
        self.resyncs = {"ops_skipped": 0, "asked": 0, "done": 0, "replays_undone": 0}
        # what was asked, and the back-off of a subtree asked again and again
        self._resync = ResyncRequests(again=self.RESYNC_AGAIN, free=self.RESYNC_FREE,
                                      backoff=self.RESYNC_BACKOFF,
                                      backoff_max=self.RESYNC_BACKOFF_MAX,
                                      give_up=self.RESYNC_GIVE_UP)
        self._resync_lock = threading.Lock()    # the applier and the receiver's tick
        self.resync_error = ""      # a subtree that keeps diverging (ResyncRequests)
        self.last_divergence = ""
        self._link: Link | None = None
        self._newest: Link | None = None       # the last link that asked to be served
        self._serve_lock = threading.Lock()     # one link served at a time
        self._send_lock = threading.Lock()
        self._notices: list[dict] = []        # not yet delivered to the source
        last = self.queue.last_seq
        self.received_seq = max(last if last is not None else 0, self.applier.applied_seq)
        # the last seq of an op received: a RESET moves received_seq past
        # it with no op to apply up to there (what a wait for the received
        # ops to be applied must wait for)
        self.ops_received_seq = self.received_seq
        # the durable watermark (module doc): _pass_lock is held by the
        # applier while it applies (so a pass sees files and applied seq
        # agree) and by a pass
        self._pass_lock = threading.Lock()
        self._durable_cond = threading.Condition()
        self._sync_wanted = 0           # the highest seq a SYNC asked to be durable
        self._queue_applied = 0         # last queue frame applied: acked by the next pass
        self._durable_acks = False      # the current link reads ACK2
        self._received_acked = 0        # the received seq last sent in an ACK
        self.durable_seq = 0
        self.durable_passes = 0
        self.durable_error = ""
        self._durable_pass()            # what survived the last run is durable from now on
        self.state = "idle"
        self.error = ""
        self.frames_received = 0
        self.bytes_received = 0
        self._progress = threading.Condition()
        # the handoff: verified frames (seq, frame) for the applier that are
        # in no queue and not acknowledged; _handoff guards it and _puts
        # (bumped on every durable put, so the applier's wait cannot miss one)
        self._handoff = threading.Condition()
        self._through: collections.deque = collections.deque()
        self._through_bytes = 0
        self._puts = 0
        self._through_applied = 0       # last handoff seq applied and not acknowledged
        self._through_unacked = 0       # frames applied from the handoff since that ACK
        self._through_progress = 0.0    # when the handoff last gained a head or lost one
        # applied is as safe as queued only when the queue does not fsync
        # every frame; with fsync "always" every frame goes through the queue
        self._fsync_mode = fsync
        self._handoff_enabled = apply and fsync != "always"
        self._stop = threading.Event()
        self._paused = threading.Event()
        if paused:                  # before the applier starts: nothing slips through
            self._paused.set()
        self.pause_reason = "paused by request" if paused else ""
        self.gate = InUseGate(in_use_max_delay, stop=self._stop) if in_use_max_delay > 0 else None
        self._applier_thread: threading.Thread | None = None
        self._durable_thread = threading.Thread(target=self._durable_loop, daemon=True,
                                                name=f"durable-{conid}")
        self._durable_thread.start()
        if apply:
            self.start_applier()

    # -- applier -------------------------------------------------------------
    @property
    def applied_seq(self) -> int:
        return self.applier.applied_seq

    def start_applier(self) -> None:
        self._handoff_enabled = self._fsync_mode != "always"
        t = self._applier_thread = threading.Thread(target=self._apply_loop, daemon=True,
                                                    name=f"applier-{self.conid}")
        t.start()

    HANDOFF_LIMIT = 16 << 20        # bytes of verified frames waiting for the applier in memory
    HANDOFF_STALL = 0.2             # seconds the applier may apply nothing from the handoff
                                    # before the durable queue takes over

    # seconds without a frame after which the applier counts as idle and
    # closes its cached descriptors (Applier.flush)
    IDLE_CLOSE = 0.05

    def _next_frame(self):
        """(seq, frame, from_handoff, ops) of the next frame to apply (ops:
        its decoded ops when the receiver handed them over, else None), or None
        when none came within IDLE_CLOSE. The durable queue's frames always
        come first: a frame enters the handoff only while the queue is
        empty, and frames move from the handoff's head to the queue's tail.
        A frame that arrives during the wait is returned, not None: the
        applier's files stay open between frames that come close together
        (closing and opening them again at each frame cost more than
        applying it)."""
        waited = False
        while True:
            with self._handoff:
                if self._through and not self.queue.unread:
                    seq, frame, ops = self._through[0]
                    return seq, frame, True, ops
                puts = self._puts
            item = self.queue.get(timeout=0)
            if item is not None:
                return item[0], item[1], False, None
            if waited:
                return None         # woken with nothing to apply (a pause, a stop)
            with self._handoff:
                if not self._through and puts == self._puts:
                    # a hand-over or a durable put notifies
                    if not self._handoff.wait(self.IDLE_CLOSE):
                        return None
            waited = True

    def _apply_loop(self) -> None:
        """Apply frames until closed. Nothing that escapes an op kills this
        thread: an error of the environment (disk full, read-only, denied,
        EIO) holds the frame and retries it, nothing after it applied; a
        divergence the capture caused (a missing parent, a type conflict)
        skips the op, counts it and asks the source for a resync of the
        smallest subtree involved (:meth:`_diverged`)."""
        while not self._stop.is_set():
            if self._paused.is_set():
                self._stop.wait(0.05)
                continue
            try:
                item = self._next_frame()
            except QueueClosed:
                return
            except Exception as exc:        # noqa: BLE001 - a reading failure is held, said, retried
                self._hold(f"reading the next frame: {type(exc).__name__}: {exc}", exc)
                continue
            if item is None:
                self.applier.flush()        # idle: no descriptors held open
                self._resync_tick()
                continue
            seq, frame, handed, ops = item
            if self._paused.is_set():
                self._release(handed)       # paused while waiting: this frame waits too
                continue
            self._applying = True
            try:
                with self._pass_lock:
                    # checked whole by the receiver, which hands its ops over
                    # with it; the queue keeps it immutable (and checks its
                    # own record checksum reading it back)
                    ops = ops if ops is not None else decode_frame(frame, check_payload=False)[0]
                    whole = self._apply_ops(ops)
                    if whole and not handed:
                        self._queue_applied = seq   # acked once durable (_durable_pass)
                if not whole:
                    self._applying = False
                    self._release(handed)   # stopping while a file was in use: the rest waits
                    continue
            except Exception as exc:        # noqa: BLE001 - held: nothing after it is applied
                # the frame stays where it is: nothing after it is applied
                # out of order; an operator sees why in the status
                self._applying = False
                self._hold(str(exc) if isinstance(exc, (SmirrorError, OSError))
                           else f"{type(exc).__name__}: {exc}", exc)
                if handed:
                    self._secure_handoff()
                try:
                    self._release(handed)
                except QueueClosed:
                    return
                continue
            self._applying = False
            if self.error:      # (the receiver may have set state to "receiving" meanwhile)
                log.warning("connection %s: applying again (was: %s)", self.conid, self.error)
                self.state = "receiving" if self._link is not None else "idle"
                self._notify({"event": "apply-ok", "was": self.error})   # the source clears it too
                self.error = ""
                self._held_since = 0.0
            try:
                if handed:
                    self._handed_applied(seq)
            except QueueClosed:
                return
            with self._progress:
                self._progress.notify_all()
            self._resync_tick()

    # errors of the target's environment: the op is right, the target cannot
    # take it now; it is retried until it can (an operator frees space, ...)
    ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                    errno.EPERM, errno.EIO, errno.ENOMEM, errno.EMFILE,
                                    errno.ENFILE, errno.EBUSY, errno.ETXTBSY, errno.EAGAIN})
    HOLD_RETRY = 1.0                # seconds between retries of a held frame
    RESYNC_AGAIN = 30.0             # seconds after which a resync not done yet is asked again
    # one subtree asked for again and again (smirror.stream.resyncs): the
    # first asks at once, then waits from RESYNC_BACKOFF doubling up to
    # RESYNC_BACKOFF_MAX; after RESYNC_GIVE_UP asks in a row it is the
    # connection's error (about 30 s of a subtree failing after every resync)
    RESYNC_FREE = 3
    RESYNC_BACKOFF = 0.25
    RESYNC_BACKOFF_MAX = 30.0
    RESYNC_GIVE_UP = 10

    _held_since = 0.0
    _held_logged = ""

    def _hold(self, reason: str, exc: BaseException) -> None:
        """An op cannot be applied now: say so (status, and the log with
        the traceback once per reason), wait, and let the loop retry."""
        self.state = "apply-error"
        if self.error != reason:        # the source's status shows it (once per error)
            self._notify({"event": "apply-error", "error": reason})
        self.error = reason
        if not self._held_since:
            self._held_since = time.monotonic()
        if reason != self._held_logged:
            self._held_logged = reason
            log.error("connection %s: %s (held, retried every %.0f s)", self.conid, reason,
                      self.HOLD_RETRY, exc_info=not isinstance(exc, (SmirrorError, OSError)))
        self._stop.wait(self.HOLD_RETRY)

    def _apply_ops(self, ops) -> bool:
        """Apply the ops of one frame, each one past the applied seq. An op
        that fails by divergence is skipped (:meth:`_diverged`); any other
        failure is raised with the frame held. False: stopped while a file
        was in use."""
        gate, applier = self.gate, self.applier
        stats = applier.stats
        if gate is not None:
            gate.begin_frame()
        # a watcher's stream: moot ops and adjacent writes coalesced (Applier.plan)
        for op in applier.plan(ops, self.coalesce):
            if op.seq <= applier.applied_seq:
                applier.apply(op)            # counted as skipped (replayed after a restart)
                continue
            if gate is not None and op.__class__ is not Moot and \
                    not self._unlocked(gate.wait, op, applier.open_path, self._close_files,
                                       self._secure_handoff):
                return False
            repairs = stats["repairs"]
            try:
                if op.kind == K_TASK:
                    # a task may run for long: durable passes go on meanwhile
                    # (it changes no file; its seq is recorded as one store)
                    self._unlocked(applier.apply, op)
                else:
                    applier.apply(op)
            except Exception as exc:
                if _environment_error(exc, self.ENVIRONMENT_ERRNOS):
                    raise
                replayed = op.seq <= applier.replay_until
                if replayed and not self.coalesce and self._undone_later(op, exc):
                    continue
                self._diverged(op, exc, replayed=replayed)
                continue
            if op.seq <= applier.replay_until:
                # applied again over a tree that holds a later state: exact
                # (the applier's barriers), unless the applier had to make
                # up for something (a file missing): then the source sends
                # what it touched again
                if stats["repairs"] != repairs:
                    self._ask_resync(op, REPLAY_REASON)
            elif stats["repairs"] != repairs and op.kind in _REPAIR_MEANS_DIVERGED:
                # the applier made up for something the target lacked (a
                # write to a missing file, a rename of a vanished one): what
                # it lacked comes with a resync
                self._ask_resync(op, "the target lacked what the op needed")
        return True

    def _close_files(self) -> None:
        """The in-use gate's release: none of the applier's descriptors may
        look like a holder of the file (from the gate, the pass lock let go)."""
        with self._pass_lock:
            self.applier.close_files()

    def _unlocked(self, fn, *args):
        """``fn(*args)`` without the pass lock the applier holds (a wait:
        a file in use, a task running)."""
        self._pass_lock.release()
        try:
            return fn(*args)
        finally:
            self._pass_lock.acquire()

    # -- the durable watermark ----------------------------------------------
    DURABLE_INTERVAL = 0.1          # seconds between durable passes while something is not durable

    def _durable_pass(self) -> int:
        """Make what is received durable: the queue's records (all put so
        far), then the files and directories the applier changed and its
        applied seq. The durable watermark becomes the higher of the two:
        frames after the applied seq are all in the queue up to its last
        put (a frame enters the handoff only behind every queued one, and
        the queue acks a frame only after the pass that synced its ops)."""
        with self._pass_lock:
            try:
                queued = self.queue.sync() or 0
            except QueueClosed:
                return self.durable_seq
            synced = self.applier.sync_durable()
            # the queue's frames whose ops are all synced in the map base
            # (taken by the applier, or left by a run before this one)
            first = self.queue.first_seq
            if first is not None and first <= synced:
                try:
                    self.queue.ack(min(synced, self.queue.last_seq or synced))
                except QueueClosed:
                    pass
            self._queue_applied = 0
        self.durable_passes += 1
        with self._durable_cond:
            if max(synced, queued) > self.durable_seq:
                self.durable_seq = max(synced, queued)
            self._durable_cond.notify_all()
        return self.durable_seq

    def _durable_due(self) -> bool:
        return (self.received_seq > self.durable_seq or self._sync_wanted > self.durable_seq
                or bool(self._queue_applied))

    def _durable_loop(self) -> None:
        """Durable passes: every DURABLE_INTERVAL while something is not
        durable, at once when a SYNC asks; each one that moves the
        watermark is acknowledged to a source that reads ACK2. An error
        (EIO on fsync) is said in the status and retried; never a dead
        thread."""
        while not self._stop.is_set():
            with self._durable_cond:
                if self._sync_wanted <= self.durable_seq:
                    self._durable_cond.wait(self.DURABLE_INTERVAL)
            if self._stop.is_set() or not self._durable_due():
                continue
            before = self.durable_seq
            try:
                self._durable_pass()
            except Exception as exc:        # said, retried: never a dead thread
                if str(exc) != self.durable_error:
                    log.error("connection %s: making received ops durable failed: %s (retried)",
                              self.conid, exc, exc_info=not isinstance(exc, OSError))
                self.durable_error = str(exc)
                self._stop.wait(self.HOLD_RETRY)
                continue
            self.durable_error = ""
            if self.durable_seq > before:
                self._send_durable_ack()
            elif self._sync_wanted > self.durable_seq:
                # the op waited for is in the handoff, not applied yet
                with self._progress:
                    self._progress.wait(0.005)

    def _want_durable(self, seq: int) -> None:
        """A SYNC: a synchronous waiter needs ops up to ``seq`` durable."""
        with self._durable_cond:
            if seq > self._sync_wanted:
                self._sync_wanted = min(seq, self.received_seq)
            self._durable_cond.notify_all()

    def _send_durable_ack(self) -> None:
        with self._send_lock:
            if self._link is not None and self._durable_acks:
                try:
                    self._link.send(MsgType.ACK, ACK2.pack(self._received_acked, self.durable_seq))
                except OSError:
                    pass        # the link is gone: the next READY tells the source

    def _ack_payload(self, seq: int) -> bytes:
        """An ACK of ``seq`` received, as the current link reads it (under
        _send_lock)."""
        if self._durable_acks:
            self._received_acked = max(self._received_acked, seq)
            return ACK2.pack(seq, self.durable_seq)
        return ACK.pack(seq)

    def wait_durable(self, seq: int, timeout: float = 30.0) -> bool:
        """Until ops up to ``seq`` are durable (a pass is asked at once)."""
        self._want_durable(seq)
        deadline = time.monotonic() + timeout
        with self._durable_cond:
            while self.durable_seq < seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._durable_cond.wait(min(left, 0.1))
        return True

    def _undone_later(self, op, exc: BaseException) -> bool:
        """A replayed op of a stream in exact order failed on a directory
        above its path that the target lacks: a later op of the replayed
        stretch removed it (the applier's barriers keep a rename of it out
        of the stretch), and that removal undid this op too. It is done
        (its seq recorded), with no resync: the tree after the stretch is
        the source's, and a library source serves none. False when that
        is not the failure."""
        if not isinstance(exc.__cause__, (FileNotFoundError, NotADirectoryError)):
            return False
        paths = [bytes(op.path)] + ([bytes(op.path2)] if op.kind in (OpKind.RENAME, OpKind.HARDLINK)
                                    else [])
        if all(self._divergence_root(rel) == rel for rel in paths if rel):
            return False
        self.resyncs["replays_undone"] += 1
        log.info("connection %s: replayed op seq %d %s %r: a directory above it is gone, removed "
                 "by a later op of the replay: done", self.conid, op.seq, OpKind(op.kind).name,
                 bytes(op.path))
        self.applier.apply(Op.mark(op.seq, MARK_SKIPPED, b""))
        return True

    def _diverged(self, op, exc: BaseException, replayed: bool = False) -> None:
        """The op does not fit the target's tree (the capture saw changes
        late or out of order; ``replayed``: applied again after a restart,
        over a tree that holds a later state): skip it (never retried
        forever), count it, and ask the source to send the subtree
        involved again."""
        self.resyncs["ops_skipped"] += 1
        what = f"op seq {op.seq} {OpKind(op.kind).name} {bytes(op.path)!r}"
        self.last_divergence = f"{what}: {exc}"
        expected = isinstance(exc, (OSError, SmirrorError)) or isinstance(exc.__cause__, OSError)
        log.log(logging.INFO if replayed and expected else
                logging.WARNING if expected else logging.ERROR,
                "connection %s: %s%s; skipped, the source resyncs it", self.conid,
                "replayed " if replayed else "",
                exc if str(exc).startswith("op seq") else f"{what}: {exc}",
                exc_info=not expected)
        # the seq counts as applied (a MARK of nothing at that seq): a
        # restart does not try it again, and the order of what follows holds
        self.applier.apply(Op.mark(op.seq, MARK_SKIPPED, b""))
        self._ask_resync(op, f"{REPLAY_REASON}; it failed: {exc}" if replayed else str(exc))

    def _ask_resync(self, op, why: str) -> None:
        if op.kind in (OpKind.TASK, OpKind.MARK):
            return
        paths = [bytes(op.path)] + ([bytes(op.path2)] if op.kind == OpKind.RENAME else [])
        now = time.monotonic()
        for rel in paths:
            if not rel or rel.startswith(b"/") or b".." in rel.split(b"/"):
                continue            # a refused path: nothing of the set to resync
            root = self._divergence_root(rel)
            with self._resync_lock:
                if self._resync.ask(root, op.seq, why, now):
                    self._send_resync(root, op.seq, why, now)

    def _send_resync(self, root: bytes, seq: int, why: str, now: float) -> None:
        """Ask the source for ``root`` (under _resync_lock)."""
        error = self._resync.sent(root, now)
        self.resyncs["asked"] += 1
        log.info("connection %s: asking the source for a resync of %r (%s)", self.conid, root, why)
        self._notify({"resync": os.fsdecode(root), "seq": seq, "reason": why})
        if error:
            self._resync_failing(f"{error} (the last: {why})")

    def _resync_failing(self, error: str) -> None:
        """A subtree keeps diverging after every resync: the connection's
        error, on both sides (it is still asked for, at the back-off's pace)."""
        self.resync_error = error
        log.error("connection %s: %s: something on the target keeps it from converging "
                  "(asked again every %.0f s at most)", self.conid, error,
                  self._resync.backoff_max)
        self._notify({"event": "apply-error", "error": error})

    def _resync_tick(self) -> None:
        """Asks whose back-off is over go out; a given-up subtree that
        converged clears its error."""
        now = time.monotonic()
        if not self._resync.check_due(now):
            return
        with self._resync_lock:
            asks, cleared = self._resync.due(now)
            for root, seq, why in asks:
                self._send_resync(root, seq, why, now)
            if cleared and self.resync_error and not self._resync.errors:
                log.warning("connection %s: the subtrees that kept diverging converged (was: %s)",
                            self.conid, self.resync_error)
                self._notify({"event": "apply-ok", "was": self.resync_error})
                self.resync_error = ""

    def _divergence_root(self, rel: bytes) -> bytes:
        return divergence_root(self.applier.root, rel)

    def _resync_done(self, op) -> None:
        try:
            rel = os.fsencode(json.loads(bytes(op.data))["path"])
        except (ValueError, KeyError, TypeError) as exc:
            log.error("connection %s: op seq %d resync-done MARK has a bad payload (%s)",
                      self.conid, op.seq, exc)
            return
        self.resyncs["done"] += 1
        with self._resync_lock:
            self._resync.done(rel, time.monotonic())

    def _release(self, handed: bool) -> None:
        """Give back the frame the applier took without applying it all
        (from the handoff it stays at the head; nothing to undo)."""
        if not handed:
            self.queue.rewind()

    ACK_APPLIED_EVERY = 8           # frames applied from the handoff per ACK in a burst

    def _handed_applied(self, seq: int) -> None:
        """A frame from the handoff is applied: it leaves the handoff and is
        acknowledged (applied counts as durable, invariant 5); a burst
        shares one ACK, sent at once when the handoff runs empty."""
        with self._handoff:
            if not self._through or self._through[0][0] != seq:
                return          # moved to the durable queue meanwhile: acknowledged from there
            _, frame, _ = self._through.popleft()
            self._through_dropped(len(frame))
            self._through_applied = seq
            self._through_unacked += 1
            self._through_progress = time.monotonic()
            more = len(self._through)
            self._handoff.notify_all()      # room for the receiver
        if more == 0 or self._through_unacked >= self.ACK_APPLIED_EVERY:
            self._ack_handed()

    def _ack_handed(self) -> None:
        seq = self._through_applied
        if seq:
            self._through_applied = self._through_unacked = 0
            self._ack_current(seq)

    def _ack_current(self, seq: int) -> None:
        """ACK seq on the current link, from a thread other than the
        receiver (the applier, a pause request)."""
        with self._send_lock:
            if self._link is not None:
                try:
                    self._link.send(MsgType.ACK, self._ack_payload(seq))
                except OSError:
                    pass        # the link is gone: the next READY tells the source

    def _hand_over(self, seq: int, frame, ops) -> bool:
        """Put a verified frame, and its decoded ops (views into it, which
        the applier uses instead of decoding it again), in the handoff for
        the applier. False when
        the durable queue must take it: no applier, paused, the queue holds
        frames (they go first), or the applier applied nothing from the
        handoff for HANDOFF_STALL seconds (a slow disk, or stuck: its
        backlog must not sit unacknowledged)."""
        if not self._handoff_enabled:
            return False
        with self._handoff:
            while True:
                if self._stop.is_set() or self._paused.is_set() or self.queue.unread:
                    return False
                now = time.monotonic()
                if not self._through:
                    self._through_progress = now
                elif now - self._through_progress > self.HANDOFF_STALL:
                    return False            # the applier is stuck on the head frame
                if not self._through or self._through_bytes + len(frame) <= self.HANDOFF_LIMIT:
                    if self.budget is not None and not self.budget.try_reserve(len(frame)):
                        return False        # the budget is used up: the queue spills it to disk
                    self._through.append((seq, frame, ops))
                    self._through_bytes += len(frame)
                    self._handoff.notify_all()
                    return True
                self._handoff.wait(self.HANDOFF_STALL)     # for room, or a stall

    def _through_dropped(self, n: int) -> None:
        """``n`` bytes of frames left the handoff (under _handoff)."""
        self._through_bytes -= n
        if self.budget is not None:
            self.budget.release(n)

    @property
    def handoff_bytes(self) -> int:
        """Bytes of verified frames in the handoff, waiting for the applier."""
        return self._through_bytes

    def _handoff_to_queue(self) -> int:
        """Move every frame in the handoff, the one being applied too, into
        the durable queue, in order (the applier skips by seq what it
        already applied). QueueFull leaves the rest in the handoff, in
        order behind the queue's frames. Returns the last seq moved (0:
        none)."""
        with self._handoff:
            moved = 0
            try:
                while self._through:
                    seq, frame, _ = self._through[0]
                    self.queue.put(seq, frame)
                    self._through.popleft()
                    self._through_dropped(len(frame))
                    self._puts += 1
                    moved = seq
            finally:
                self._handoff.notify_all()
            return moved

    def _secure_handoff(self) -> None:
        """The applier will not apply for a while (paused, a file in use, an
        apply error): the handoff's frames would wait unacknowledged, so
        they go into the durable queue and are acknowledged now (what does
        not fit moves with the next frame received)."""
        try:
            moved = self._handoff_to_queue()
        except (QueueFull, QueueClosed):
            return
        if moved:
            self._ack_current(moved)

    def _settle_handoff(self) -> None:
        """Before READY (which acknowledges everything up to received_seq):
        make the handoff's frames durable, waiting a little for room; what
        still does not fit is forgotten and received_seq lowered to before
        it, so the source sends it again."""
        deadline = time.monotonic() + 2.0
        while True:
            try:
                self._handoff_to_queue()
                return
            except QueueFull:
                if time.monotonic() >= deadline or self._paused.is_set():
                    break
                with self._progress:
                    self._progress.wait(0.05)
        with self._handoff:
            if self._through:
                first = frame_header(self._through[0][1]).first_seq
                log.info("connection %s: %d frames from seq %d were not applied and find no "
                         "room in the queue: the source sends them again", self.conid,
                         len(self._through), first)
                self._through.clear()
                self._through_dropped(self._through_bytes)
                self.received_seq = self.ops_received_seq = first - 1
            self._handoff.notify_all()

    # -- tasks and marks ---------------------------------------------------
    def _on_task(self, op) -> None:
        """The applier reached a TASK: every earlier op is applied."""
        if self._user_on_task is not None:
            self._user_on_task(op)
            return
        from smirror.stream.tasks import TaskResult
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
        if label == MARK_SKIPPED:
            return
        if label == MARK_RESYNC_DONE:
            self._resync_done(op)
            return
        if label not in (MARK_IGNORED_DELETE, MARK_ORPHAN_MOVE):
            if self._user_on_mark is not None:
                self._user_on_mark(op)
            return
        try:
            info = json.loads(bytes(op.data))
            if not isinstance(info, dict) or not isinstance(info.get("path"), str):
                raise ValueError("expected an object with a string 'path'")
            rel = os.fsencode(info["path"])
            # the payload names the path only: keep or move, and for how
            # long, is this target's configuration (a source's "mode" or
            # "keep_days" is ignored)
            if label == MARK_IGNORED_DELETE:
                self.marks["ignored_deletes"] += 1
                if self.deleted_mode == "move" and self.keep_dirs is not None and \
                        self.keep_dirs.move_deleted(self, rel, info.get("dir") is True,
                                                    self.deleted_keep_days):
                    self.marks["deleted_moved"] += 1
            elif self.orphan_moves and self.keep_dirs is not None and \
                    self.keep_dirs.move_orphan(self, rel):
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
        from smirror.stream.tasks import TaskError, TaskSpec
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
        self._secure_handoff()

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
        with self._durable_cond:
            self._durable_cond.notify_all()
        with self._send_lock:
            link = self._link
        if link is not None:
            link.close()            # its receiver ends instead of waiting for the source
        self.queue.close()
        with self._handoff:         # unacknowledged: the source sends them again
            self._through.clear()
            self._through_dropped(self._through_bytes)
            self._handoff.notify_all()      # an applier waiting for a frame ends now
        if self._applier_thread is not None:
            self._applier_thread.join(5)
        self._durable_thread.join(5)
        if self._applier_thread is None or not self._applier_thread.is_alive():
            self.applier.close()     # (a stuck applier keeps its handle until it returns)

    # -- receiver ------------------------------------------------------------
    TAKEOVER_WAIT = 30.0            # seconds a new link waits for the one it replaces to end

    # whether frames are coalesced (Applier.plan): only when the source said
    # its capture keeps per-file order alone (its OPEN's "order")
    coalesce = False

    def serve(self, link: Link, order: str | None = None, durable: bool = False) -> None:
        """Handle one data link after its OPEN: READY, then frames until the
        link closes. Errors are sent to the source and raised. ``order``:
        the OPEN's "order" (``ORDER_PER_FILE``: a watcher's stream, whose
        frames may be coalesced; anything else: the exact order of the
        library API or the mount, applied op by op).

        One link at a time: a newer link of this connection (the source
        reconnected) ends the one before, which may still wait for room in
        the queue with a frame in hand; that frame is dropped, never put
        behind the newer link's frames (the source sends again whatever
        was not acknowledged).

        ``durable``: the OPEN asked for both watermarks ("durable": true):
        READY says so and carries "durable_seq", ACKs are ACK2 and SYNC is
        served; otherwise the link is an older source's, ACKed as before."""
        with self._send_lock:
            self._newest = link
            old = self._link
        if old is not None:
            log.info("connection %s: a newer link of this connection took over from %s: "
                     "ending that one", self.conid, old.peer)
            old.close()
        if not self._serve_lock.acquire(timeout=self.TAKEOVER_WAIT):
            raise ProtocolError(f"connection {self.conid}: the previous link did not end within "
                                f"{self.TAKEOVER_WAIT:.0f}s; try again")
        try:
            if self._newest is not link:
                raise LinkClosed(f"connection {self.conid}: a newer link took over from {link.peer}")
            self.coalesce = order == ORDER_PER_FILE
            self._serve(link, durable)
        finally:
            self._serve_lock.release()

    def _superseded(self, link: Link) -> bool:
        return self._newest is not link

    def _serve(self, link: Link, durable: bool = False) -> None:
        # READY acknowledges everything up to received_seq: the handoff's
        # frames (not applied yet) must be durable first
        self._settle_handoff()
        if durable:
            # the source resends from the durable watermark: as high as it gets now
            self._durable_pass()
            link.send_json(MsgType.READY, {"last_seq": self.received_seq, "durable": True,
                                           "durable_seq": self.durable_seq})
        else:
            link.send_json(MsgType.READY, {"last_seq": self.received_seq})
        self.state = "receiving"
        self._unacked, self._unacked_frames = None, 0
        with self._send_lock:
            self._link = link
            self._durable_acks = durable
            self._received_acked = self.received_seq
            self._deliver_locked()      # what the source missed while away
        try:
            while not self._stop.is_set() and not self._superseded(link):
                try:
                    # a frame arrives in its own bytes object: the queue keeps it as is
                    mtype, payload = link.recv(own=(MsgType.FRAME,))
                except LinkClosed:
                    return
                if mtype == MsgType.FRAME:
                    self._receive(link, payload)
                    continue
                self._send_ack(link)
                if mtype == MsgType.SYNC and durable:
                    if len(payload) != SYNC.size:
                        raise ProtocolError(f"{link.peer} sent a SYNC of {len(payload)} bytes")
                    self._want_durable(SYNC.unpack(payload)[0])
                elif mtype == MsgType.RESET:
                    self._reset(link, payload)
                elif mtype == MsgType.BYE:
                    return
                else:
                    raise ProtocolError(f"{link.peer} sent {mtype.name} on a data link")
        except (FrameError, ProtocolError, OSError) as exc:
            if self._superseded(link) or self._stop.is_set():
                # closed under it by a newer link (or the daemon stopping):
                # nothing to tell this one
                log.info("connection %s: link from %s ended: %s", self.conid, link.peer,
                         "a newer link of this connection took over" if self._superseded(link)
                         else "the connection is closing")
                return
            if isinstance(exc, OSError):
                raise
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
                    self._durable_acks = False
            if self.state == "receiving":
                self.state = "idle"

    def _reset(self, link: Link, payload) -> None:
        try:
            seq = json.loads(bytes(payload)).get("seq")
        except (ValueError, AttributeError):
            raise ProtocolError(f"{link.peer} sent a RESET that is not a JSON object with a seq") from None
        if not isinstance(seq, int) or seq < self.received_seq:
            raise ProtocolError(f"{link.peer} sent RESET to seq {seq!r}, below the "
                                f"{self.received_seq} this target holds")
        log.warning("connection %s: stream reset to seq %d (was %d): a mirror follows",
                    self.conid, seq, self.received_seq)
        self.received_seq = seq

    def _receive(self, link: Link, payload) -> None:  # noqa: C901 - one branch per frame outcome
        try:
            h = frame_header(payload)
        except FrameError as exc:
            raise FrameError(f"frame after seq {self.received_seq} from {link.peer}: {exc}") from None
        if h.frame_len != len(payload):
            raise FrameError(f"frame after seq {self.received_seq} from {link.peer} is "
                             f"{len(payload)} bytes, its header says {h.frame_len}")
        if h.last_seq <= self.received_seq:
            if not self._through:          # held frames in the handoff are acknowledged once applied
                self._ack(link, h.last_seq)    # a resend of what is held
            return
        if h.first_seq > self.received_seq + 1:
            raise ProtocolError(f"frame with seqs {h.first_seq}..{h.last_seq} from {link.peer} "
                                f"does not follow seq {self.received_seq}: ops would be skipped")
        # a frame may also start before received_seq + 1: a handoff frame
        # the target was killed in the middle of applying comes again whole;
        # the applier skips its ops up to the applied seq
        frame = payload                 # its own bytes: the queue keeps it as is
        try:
            # full verification, every field of every op, before it counts
            # as received: a bad op refuses the whole frame, nothing of it
            # is queued or applied
            ops, _ = decode_frame(frame)
        except FrameError as exc:
            raise FrameError(f"frame with seqs {h.first_seq}..{h.last_seq} from {link.peer} "
                             f"refused: {exc}") from None
        task = h.count == 1 and ops[0].kind == K_TASK   # tasks travel alone in a frame
        while True:
            if not task and self._hand_over(h.last_seq, frame, ops):
                # not acknowledged until applied (_handed_applied); what the
                # queue made durable before is acknowledged now
                self._count_received(h, frame)
                self._send_ack(link)
                return
            if self._superseded(link):
                # the source came back on a newer link while this frame
                # waited for room: it is not put (the newer link's frames
                # may be queued already); unacknowledged, so nothing is lost
                raise LinkClosed(f"frame with seqs {h.first_seq}..{h.last_seq} from {link.peer} "
                                 f"dropped: a newer link of this connection took over")
            try:
                if self._through:
                    self._handoff_to_queue()    # the handoff's frames go first
                self.queue.put(h.last_seq, frame)
                break
            except ValueError as exc:
                # the queue's order is the stream's: a frame that does not
                # follow what it holds is refused, never a dead receiver
                raise ProtocolError(f"frame with seqs {h.first_seq}..{h.last_seq} from {link.peer} "
                                    f"refused: {exc}") from None
            except QueueFull:
                # backpressure: stop reading the link until the applier
                # frees room (or empties the queue: then the handoff takes
                # the frame); the source's sends block meanwhile
                self._send_ack(link)
                self.state = "queue-full"
                with self._progress:
                    self._progress.wait(0.1)
                if self._stop.is_set():
                    raise ProtocolError("target is shutting down") from None
        with self._handoff:
            self._puts += 1
            self._handoff.notify_all()
        self._count_received(h, frame)
        # durable now; while the next frame is already waiting on the link the
        # ACK can wait for it and cover both (one ACK, one wake-up of the
        # source per burst), up to ACK_EVERY frames
        self._unacked = h.last_seq
        self._unacked_frames += 1
        if task or self._unacked_frames >= self.ACK_EVERY or not link.readable():
            self._send_ack(link)
        if task:
            self._task_arrived(ops[0])

    def _count_received(self, h, frame) -> None:
        if self.state != "apply-error":        # that one stays until the applier recovers
            self.state = "receiving"
        self.received_seq = self.ops_received_seq = h.last_seq
        self.frames_received += 1
        self.bytes_received += len(frame)

    ACK_EVERY = 16
    _unacked: int | None = None
    _unacked_frames = 0

    def _ack(self, link: Link, seq: int) -> None:
        with self._send_lock:
            link.send(MsgType.ACK, self._ack_payload(seq))

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
                "seq_durable": self.durable_seq, "durable_passes": self.durable_passes,
                "durable_error": self.durable_error,
                "seq_applied": self.applier.applied_seq,
                # ops applied / skipped as already applied, since the daemon started:
                # with seq_applied they show a stream applied with no gap and no repeat
                "ops_applied": self.applier.stats["ops"], "ops_skipped": self.applier.stats["skipped"],
                "ops_coalesced": self.applier.stats["coalesced"],
                "queue_mem_bytes": q.mem_bytes,
                "queue_disk_bytes": q.disk_bytes, "handoff_bytes": self._through_bytes,
                "frames_received": self.frames_received,
                "bytes_received": self.bytes_received, "paused": self._paused.is_set(),
                "apply_state": self.apply_state,
                "repairs": self.applier.stats["repairs"],
                # durable passes made before an op that moves a name written since
                # the last one (Applier._barrier: an exact replay after a power loss)
                "barriers": self.applier.stats["barriers"],
                "setid_stripped": self.applier.stats["setid_stripped"],
                "xattrs_refused": self.applier.stats["xattrs_refused"],
                "devices_refused": self.applier.stats["devices_refused"],
                "resyncs": dict(self.resyncs, pending=len(self._resync.pending),
                                waiting=self._resync.waiting(), deferred=self._resync.deferred),
                "resync_error": self.resync_error,
                "last_divergence": self.last_divergence}
