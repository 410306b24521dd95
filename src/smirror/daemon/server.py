"""``smirror serve``: one daemon per machine with both roles.

* control links (purpose ``control``): a logged-in user sends REQUESTs
  (``status``, ``repset.*``, ``connect``, ``conid``, ``disconnect``,
  ``session`` after a password login, ``logout``) and gets REPLYs;
  ``monitor`` users may only read; before login a peer is held to small
  messages, a timeout and a cap of logins in progress (docs/logins.md);
* data links (purpose ``data``): a source daemon logged in as a
  ``replication`` user streams one connection's frames into this daemon's
  target side, into a map base inside ``[target] allowed_roots``, as the
  source id bound to that user (:mod:`~smirror.daemon.target_access`).

Source side: every replication set that has connections is watched
(:class:`~smirror.capture.watch.TreeCapture`); its ops fan out to the journal of
each of its connections, whose senders stream to the targets. A new
connection (without ``nomirror``) first sends the whole set through the
stream, so the mirror travels in order with the replication ops.

State under the state directory: ``users.json``, ``registry.json``,
``daemon-id``, ``queues/``, ``targets/``. SIGTERM stops it cleanly.
"""
from __future__ import annotations

import errno
import gc
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from smirror.daemon import handshake
from smirror.daemon.auth import LoginThrottle, Sessions, User, UserStore
from smirror.daemon.config import Config, parse_hostport, setid_allowed
from smirror.daemon.registry import Registry, check_options
from smirror.daemon.scan_pages import ScanPages, check_page_bytes, listing_rows
from smirror.daemon.target_access import MapBases, SourceBindings, check_source_id, overlaps, resolve
from smirror.errors import AuthError, ConfigError, QueueFull, SmirrorError
from smirror.fs.atomic import write_atomic
from smirror.fs.keep import KeepDirs
from smirror.kernels.memqueue import (
    MemoryBudget,
    SpillQueue,
    budget_use,
    queue_alert,
    queue_cap,
    segment_size_for,
)
from smirror.ops import Op
from smirror.private import check_secret, read_secret
from smirror.stream import wire
from smirror.stream.journal import ConnectionJournal
from smirror.stream.orphans import for_connection
from smirror.stream.receiver import TargetConnection
from smirror.stream.sender import Sender
from smirror.stream.syncwait import SyncWaiter, check_sync
from smirror.stream.tasks import QueuedInto, SourceTasks, TargetTasks, TaskLog, TaskPolicy, TaskSpec
from smirror.stream.wire import ORDER_PER_FILE, Link, MsgType, ProtocolError

if TYPE_CHECKING:       # imported when a mount set starts: the FUSE binding is optional
    from smirror.capture.mount.repset import MountCapture
    from smirror.capture.watch import MirrorHandover
    from smirror.daemon.connection_mirror import ConnectionMirror
    from smirror.mirror.remote import RemoteReader

log = logging.getLogger("smirror.daemon.server")

# beside an incoming connection's applied state: its map base, so that a
# restarted target applies what it holds before its source is back
MAP_BASE_FILE = "map_base"


class SourceConnection:
    """The source side of one registry connection inside the daemon."""

    def __init__(self, daemon: Daemon, conn):
        self.conn = conn
        self.daemon = daemon
        cfg = self.cfg = daemon.config
        qdir = self.qdir = cfg.queue_dir / f"source-{conn.conid}"
        self.queue = SpillQueue(str(qdir), queue_cap(cfg.queues.source_memory_limit, daemon.memory.limit),
                                cfg.queues.disk_queue_limit,
                                segment_size=segment_size_for(cfg.queues.disk_queue_limit),
                                min_free_bytes=cfg.queues.min_free_space, fsync=cfg.queues.fsync,
                                budget=daemon.memory)
        if self.queue.count and self.queue.last_seq is not None:
            # frames spilled before a restart: the whole set is sent again
            # (see Daemon.start), so they are stale
            self.queue.ack(self.queue.last_seq)
        # a frame must fit the queue's disk limit many times over
        max_bytes = max(4096, min(1 << 20, cfg.queues.disk_queue_limit // 8))
        self.journal = ConnectionJournal(self.queue, seq_file=qdir / "reserved-seq",
                                         max_bytes=max_bytes)
        host, port = parse_hostport(conn.target, "target")
        self.sender = Sender(conn.conid, conn.map_base, self.journal,
                             lambda: daemon.dial_target(host, port),
                             source_name=daemon.daemon_id,
                             retry_interval=cfg.reconnect.retry_interval,
                             # a watcher keeps per-file order only: the target may
                             # coalesce; a mount set's capture is exact order
                             order=None if getattr(daemon.registry.repsets.get(conn.repset), "capture",
                                                  "watch") == "mount" else ORDER_PER_FILE,
                             sync=conn.sync)
        # set by mirror-stop: this connection's running mirror ends before
        # its next entry (RepsetCapture.stop_mirror)
        self.mirror_stop = threading.Event()
        self._mirror_stats: dict | None = None
        self._mirror_changed = threading.Condition()   # mirror_stats set, or the connection closed
        self._closed = False

    mirror_pending_reset = False

    @property
    def mirror_stats(self) -> dict | None:
        """What the connection's last mirror did (None before its first)."""
        return self._mirror_stats

    @mirror_stats.setter
    def mirror_stats(self, stats: dict | None) -> None:
        with self._mirror_changed:
            self._mirror_stats = stats
            self._mirror_changed.notify_all()

    def wait_mirror_stats(self, before: dict | None, timeout: float) -> None:
        """Until the mirror running now has returned its stats (they are no
        longer ``before``), the connection closed, or ``timeout``."""
        with self._mirror_changed:
            self._mirror_changed.wait_for(lambda: self._mirror_stats is not before or self._closed,
                                          timeout)

    def _capture_status(self) -> dict | None:
        """The repset's watcher: backend (fanotify or inotify, and why),
        directories watched, events, resyncs."""
        cap = self.daemon.captures.get(self.conn.repset)
        return None if cap is None else cap.capture.status()

    def mirror_progress(self) -> dict | None:
        """The connection's last (or running) stream mirror: ``scanning``
        while its ops are being queued (live counters; ``stopping`` once
        mirror-stop asked), ``sending`` until the target acknowledged its
        last op, then ``done``; ``stopped`` for one that mirror-stop ended
        (the target is not complete: a mirror-start completes it)."""
        cap = self.daemon.captures.get(self.conn.repset)
        running = cap.running if cap is not None and cap.mirroring == self.conn.conid else None
        if running is not None:
            return dict(running.counters(), state="stopping" if self.mirror_stop.is_set() else "scanning")
        m = self.mirror_stats
        if not m:
            return m
        acked, first, last = self.sender.acked_seq, m["first_seq"], m["last_seq"]
        done = 100.0 if acked >= last else \
            round(max(0, acked - first + 1) * 100.0 / max(1, last - first + 1), 1)
        if m.get("stopped"):
            return dict(m, state="stopped", progress=done)
        return dict(m, state="done" if acked >= last else "sending", progress=done)

    def status(self) -> dict:
        st = self.sender.status()
        q = self.queue
        st.update(repset=self.conn.repset, target=self.conn.target, map_base=self.conn.map_base,
                  mirror=self.mirror_progress(), options=self.conn.options(),
                  capture=self._capture_status(),
                  alert=queue_alert(q, self.cfg.queues.disk_queue_limit, self.cfg.queues.alert_threshold,
                                    self.qdir, self.cfg.queues.min_free_space))
        repset = self.daemon.registry.repsets.get(self.conn.repset)
        cap = st["capture"]
        if repset is not None and not os.path.isdir(repset.root):
            # nothing left to replicate: say so instead of "connected"
            st.update(state="root missing", last_error=f"the root {repset.root} of replication set "
                      f"{repset.name!r} is missing: restore it, or disconnect {self.conn.conid}")
        elif cap and cap.get("state") in ("restarting", "failed"):
            # the watcher of this connection's set failed: not "connected" as if nothing happened
            st["state"] = f"capture-{cap['state']}"
            st["last_error"] = cap["error"]
        return st

    def close(self) -> None:
        with self._mirror_changed:
            self._closed = True
            self._mirror_changed.notify_all()
        self.sender.stop()
        self.queue.close()
        # the sender's callbacks close over this object and the capture: a
        # cycle the collector frees only when it gets round to it, holding
        # the queue's frames (up to its memory limit) meanwhile; cut here,
        # so a disconnect gives the memory back at once
        self.sender.on_reset = self.sender.on_resync = self.sender.on_notice = None
        self.sender.before_send.clear()


class SetCapture(Protocol):
    """What the daemon asks of a replication set's capture: the watcher's
    :class:`~smirror.capture.watch.TreeCapture` or the mount's
    :class:`~smirror.capture.mount.repset.MountCapture`."""

    emit: Callable[[Op], None]

    @property
    def moving_out(self) -> bool: ...

    def paused(self) -> threading.RLock: ...

    def run_mirror(self, run, emit, adopt: bool) -> MirrorHandover: ...

    def request_resync(self, rel: bytes, emit, reason: str = "") -> None: ...

    def load_target(self, target_root) -> None: ...

    def status(self) -> dict: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


class RepsetCapture:
    """One watcher per replication set; its ops go to every connection
    (a connection that ignores deletes gets a MARK instead of a DELETE or
    RMDIR, unless the path moved out of the set)."""

    def __init__(self, repset, on_full=None):
        from smirror.capture.watch import TreeCapture
        self.repset = repset
        self.on_full = on_full        # (conid, QueueFull) -> None: auto-disconnect
        self.targets: dict[int, ConnectionJournal] = {}
        self.conns: dict[int, object] = {}           # conid -> registry Connection (its options)
        self.mirroring: int | None = None             # conid whose mirror is being queued
        self.running: ConnectionMirror | None = None  # ... and that mirror
        self._lock = threading.Lock()
        watcher = TreeCapture(repset.root, self._emit, rules=repset.compiled_rules() or None)
        self.capture: SetCapture = watcher
        self.thread = threading.Thread(target=watcher.run, daemon=True,
                                       name=f"capture-{repset.name}")

    def _emit(self, op) -> None:
        with self._lock:
            journals = list(self.targets.items())
        moving_out = self.capture.moving_out
        for conid, j in journals:
            self._append(conid, j, self.conns.get(conid), op, moving_out)

    def _append(self, conid: int, journal: ConnectionJournal, conn, op, moving_out: bool) -> None:
        """``op`` as connection ``conid`` gets it, into its journal."""
        out = op if conn is None else for_connection(op, conn.ignore_deletes,
                                                     conn.deleted_keep_days, moving_out)
        try:
            journal.append(out)
        except QueueFull as exc:
            # this connection's queue is past its disk limit: it stops
            # taking ops (auto-disconnect); the others go on
            with self._lock:
                self.targets.pop(conid, None)
            if self.on_full is not None:
                self.on_full(conid, exc)

    def add(self, conn, journal: ConnectionJournal, mirror: ConnectionMirror | None) -> dict | None:
        """Start feeding ``journal``, after ``mirror`` (None: no mirror)."""
        with self.capture.paused():       # no op of the watcher slips in between
            stats = None
            if mirror is not None:
                stats = self.mirror(conn, journal, mirror)
            with self._lock:
                self.targets[conn.conid] = journal
                self.conns[conn.conid] = conn
        return stats

    def mirror(self, conn, journal: ConnectionJournal, run: ConnectionMirror) -> dict:
        """The mirror ``run`` into ``journal``, then the connection's orphan
        policy, in the same stream. The mirror's ops go ahead of everything
        that follows; a full queue makes the mirror wait for the sender.
        Its ``stop`` event (see :meth:`stop_mirror`) ends it before its next
        file, without the orphan pass."""
        from smirror.stream.orphans import orphan_ops
        append = _waiting_append(journal)
        with self.capture.paused():
            first = journal.last_seq + 1
            with self._lock:
                self.mirroring, self.running = conn.conid, run   # status reads its counters meanwhile
                run.stop.clear()               # a stop asked of an earlier mirror is not this one's
            try:
                # fed to this connection only: the cache becomes what the
                # mirror leaves there (events still pending are diffed
                # against that; a restart mirror on a live tree diverged)
                alone = set(self.targets) <= {conn.conid}
                run.orphans_stay = conn.orphans == "report"     # else the ops below remove them
                handover = self.capture.run_mirror(run, append, adopt=alone)
                found = handover.orphans
                ops, ostats = orphan_ops(found, handover.target, conn.orphans,
                                         conn.orphans_older_than_days)
                for op in ops:
                    append(op)
            finally:
                with self._lock:
                    self.mirroring, self.running = None, None
            journal.flush_waiting()
        stats = dict(handover.stats)
        stats.update(ostats, first_seq=first, last_seq=journal.last_seq, finished_at=time.time())
        if found:
            log.log(logging.WARNING if conn.orphans == "report" else logging.INFO,
                    "connection %s: %d orphan(s), %d bytes, under %s: %s", conn.conid, len(found),
                    ostats["orphan_bytes"], conn.map_base,
                    {"report": "reported", "delete": f"{ostats['orphans_deleted']} deleted",
                     "move": f"{ostats['orphans_moved']} moved aside"}[conn.orphans])
        return stats

    def stop_mirror(self, conid: int, stop: threading.Event) -> bool:
        """Set ``stop`` when connection ``conid``'s mirror is the one being
        queued (it ends before its next entry); False when none is."""
        with self._lock:
            if self.mirroring != conid:
                return False
            stop.set()
            return True

    def request_resync(self, conid: int, rel: bytes, reason: str = "") -> None:
        """Connection ``conid``'s target found a divergence under ``rel``:
        the capture thread sends that subtree again, to that connection
        only, behind what is queued for it (see TreeCapture.resend)."""
        def emit(op):
            with self._lock:
                j, conn = self.targets.get(conid), self.conns.get(conid)
            if j is None:
                return          # disconnected meanwhile: its reconnect mirrors
            self._append(conid, j, conn, op, False)
        self.capture.request_resync(rel, emit, reason)

    def remove(self, conid: int) -> None:
        with self._lock:
            self.targets.pop(conid, None)
            self.conns.pop(conid, None)

    def close(self) -> None:
        self.capture.stop()
        self.thread.join(5)
        self.capture.close()
        # the capture calls back into this object (a cycle): cut it, so the
        # watcher's buffers and cache go with the last reference
        self.capture.emit = _closed_emit
        self.on_full = None
        with self._lock:
            self.targets.clear()
            self.conns.clear()


class MountRepsetCapture(RepsetCapture):
    """The capture of a repset with ``capture = "mount"``: a capture mount
    of its root at its mount point (:mod:`smirror.capture.mount.repset`).
    It runs as long as the repset exists in this daemon, connections or
    not (the application's data directory is the mount), from daemon start
    or repset creation to daemon stop or repset deletion. Its mirrors run on
    the mount's thread: one clean moment of the application's history."""

    persistent = True
    capture: MountCapture

    def __init__(self, repset, on_full=None):
        from smirror.capture.mount.repset import MountCapture
        self.repset = repset
        self.on_full = on_full
        self.targets: dict[int, ConnectionJournal] = {}
        self.conns: dict[int, object] = {}
        self.mirroring: int | None = None
        self.running: ConnectionMirror | None = None
        self._lock = threading.Lock()
        # the connections with a synchronous mode (connect --sync) register here
        self.sync_waiter = SyncWaiter()
        self.capture = MountCapture(repset.root, repset.mount, self._emit,
                                    sync_waiter=self.sync_waiter)

    def start(self) -> MountRepsetCapture:
        self.capture.start()
        if self.capture.mount.cleared:
            log.warning("replication set %s: %s", self.repset.name, self.capture.mount.cleared)
        log.info("replication set %s: capture mount of %s at %s", self.repset.name,
                 self.repset.root, self.repset.mount)
        return self

    def add(self, conn, journal: ConnectionJournal, mirror: ConnectionMirror | None) -> dict | None:
        return self.capture.on_thread(RepsetCapture.add, self, conn, journal, mirror)

    def mirror(self, conn, journal: ConnectionJournal, run: ConnectionMirror) -> dict:
        return self.capture.on_thread(RepsetCapture.mirror, self, conn, journal, run)

    def close(self) -> None:
        self.capture.close()
        self.capture.emit = _closed_emit
        self.on_full = None
        with self._lock:
            self.targets.clear()
            self.conns.clear()


def _give_back_memory() -> None:
    """A full collection, then (glibc) the freed pages of every malloc
    arena back to the system: frames of up to 1 MiB freed by many threads
    otherwise stay in the arenas as the process's RSS."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass                    # not glibc: the collection alone


def _closed_emit(op) -> None:
    """What a closed RepsetCapture's watcher emits to: nothing."""


class PendingLogins:
    """Logins in progress (accepted, not yet logged in), capped in all and
    per peer address, so unauthenticated peers cannot hold many threads."""

    def __init__(self, max_total: int, max_per_peer: int):
        self.max_total, self.max_per_peer = max_total, max_per_peer
        self._by_peer: dict[str, int] = {}
        self._total = 0
        self._logged = float("-inf")
        self._lock = threading.Lock()

    def enter(self, peer: str) -> str:
        """Take a slot for ``peer``; the reason when none is free, else ''."""
        with self._lock:
            if self._total >= self.max_total:
                return f"too many logins in progress ({self.max_total}): try again later"
            if self._by_peer.get(peer, 0) >= self.max_per_peer:
                return f"too many logins in progress from {peer} ({self.max_per_peer}): try again later"
            self._by_peer[peer] = self._by_peer.get(peer, 0) + 1
            self._total += 1
            return ""

    def should_log(self, every: float = 1.0) -> bool:
        """At most one log line a second about refusals (a flood must not
        become a flood of log lines)."""
        now = time.monotonic()
        if now - self._logged < every:
            return False
        self._logged = now
        return True

    def leave(self, peer: str) -> None:
        with self._lock:
            self._total -= 1
            left = self._by_peer.pop(peer) - 1
            if left:
                self._by_peer[peer] = left


def _refuse_quickly(conn: socket.socket, message: str, tls: bool) -> None:
    """Close an accepted connection without waiting on the peer: a plain
    link gets a short ERROR first (a TLS one could not read it before a
    handshake, which would cost the time this avoids)."""
    try:
        conn.setblocking(False)
        if not tls:
            payload = json.dumps({"error": message}).encode()
            conn.send(wire.HEADER.pack(wire.MAGIC, MsgType.ERROR, 0, len(payload)) + payload)
            conn.shutdown(socket.SHUT_WR)
        conn.recv(wire.PRELOGIN_MAX_MESSAGE)    # what already came: unread, close would reset
    except OSError:
        pass
    finally:
        conn.close()


def is_this_host(host: str, listen: str | None = None) -> bool:
    """True when ``host`` names this machine: a loopback or unspecified
    address, the address this daemon listens on, or any address a socket
    can bind here (a local interface)."""
    import ipaddress
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        addr = str(sockaddr[0])
        try:
            ip = ipaddress.ip_address(addr.split("%")[0])
        except ValueError:
            continue
        if ip.is_loopback or ip.is_unspecified or addr == listen:
            return True
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((addr, 0))
            return True
        except OSError:
            pass
    return False


def _waiting_append(journal: ConnectionJournal, timeout: float = 600.0):
    def append(op):
        deadline = time.monotonic() + timeout
        while True:
            try:
                return journal.append(op)
            except QueueFull:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    return append


def lock_state_dir(state_dir: Path) -> int:
    """One daemon per state directory: an flock on ``STATE_DIR/daemon.lock``
    held while the process lives (the kernel drops it when it dies), with
    the holder's pid in the file. Another daemon already there: ConfigError
    naming it."""
    import fcntl
    path = state_dir / "daemon.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"state directory {state_dir} is in use by another smirror daemon "
                          f"(pid {holder}, lock {path}): stop it, or give this one another "
                          f"state_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.state_dir = Path(config.daemon.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self._lock_fd = lock_state_dir(self.state_dir)
        id_file = self.state_dir / "daemon-id"
        if not id_file.exists():
            id_file.write_text(secrets.token_hex(8) + "\n")
        self.daemon_id = id_file.read_text().strip()
        self.users = UserStore(self.state_dir / "users.json")
        self.registry = Registry(self.state_dir)
        self.sessions = Sessions()
        self.throttle = LoginThrottle(config.login.first_delay, config.login.max_delay)
        self.pending_logins = PendingLogins(config.login.max_pending, config.login.max_pending_per_peer)
        self.sources: dict[int, SourceConnection] = {}
        self.captures: dict[str, RepsetCapture] = {}
        self.mount_errors: dict[str, str] = {}    # mount set -> why its mount did not start
        self.targets: dict[tuple[str, int], TargetConnection] = {}
        self._targets_lock = threading.Lock()
        self._sources_lock = threading.RLock()
        # [memory] limit: the RAM every queue and handoff of this daemon shares
        self.memory = MemoryBudget(config.memory.limit)
        self.counters: dict[int, dict] = {}       # auto-disconnects, reconnects, remirrors
        self.disconnected: dict[int, str] = {}    # conid -> why, while it is down
        self.down_errors: dict[int, str] = {}     # conid -> the error that keeps it down
        self.scan_pages = ScanPages()             # map base listings read by pages (target.scan)
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self.tls_server = self.tls_client = None
        tls = config.tls
        if tls.enabled:
            check_secret(tls.key, f"{config.source}: tls.key")
            self.tls_server = wire.server_tls_context(tls.cert, tls.key, tls.ca)
            self.tls_client = wire.client_tls_context(tls.ca, tls.cert, tls.key)
        # tasks: this daemon's policy (both roles), the target's runner and
        # the results of commands run here
        self.task_policy = TaskPolicy.from_config(config)
        self.task_log = TaskLog()
        self.source_tasks = SourceTasks(self.task_policy, self.task_log)
        self.target_tasks = TargetTasks(self.task_policy, group_wait=config.tasks.group_wait,
                                        log_=self.task_log)
        self.keep_dirs = KeepDirs(config.target.orphans_dir or self.state_dir / "orphans",
                                  config.target.deleted_dir or self.state_dir / "deleted")
        # where sources may write here, and which source each link user is
        self.map_bases = MapBases(
            config.target.allowed_roots,
            forbidden=[(self.state_dir, "the daemon's state directory"),
                       (config.queue_dir, "the daemon's queue directory"),
                       (config.target.orphans_dir or self.state_dir / "orphans", "the orphans directory"),
                       (config.target.deleted_dir or self.state_dir / "deleted",
                        "the deleted-files directory"),
                       (config.tasks.directory, "the task directory"),
                       (config.daemon.log_file, "the daemon's log file")],
            # a mount set's mount point too: the applier writing through this
            # daemon's own mount would capture its own writes (and wait on itself)
            repset_roots=lambda: [(r.name, p) for r in list(self.registry.repsets.values())
                                  for p in (r.root, r.mount) if p])
        self.bindings = SourceBindings(self.state_dir)
        if not config.target.allowed_roots:
            log.info("no [target] allowed_roots: this daemon accepts no data links (it is no target)")
        self._link_password = ""          # read with links.user
        if config.links.user:
            if not config.links.password_file:
                raise ConfigError(f"{config.source}: links.user needs links.password_file")
            secret = read_secret(config.links.password_file, f"{config.source}: links.password_file")
            try:
                self._link_password = secret.decode().strip()
            except UnicodeDecodeError:
                raise ConfigError(f"{config.source}: links.password_file "
                                  f"{config.links.password_file} is not UTF-8 text") from None

    # -- life cycle ----------------------------------------------------------
    def start(self) -> tuple[str, int]:
        host, port = parse_hostport(self.config.daemon.listen, "daemon.listen")
        if not wire.is_loopback(host) and not self.config.tls.enabled and not self.config.daemon.insecure:
            raise ConfigError(
                f"{self.config.source}: daemon.listen is {host}:{port}, beyond loopback, and "
                "tls.enabled is false: logins, tokens and frames would cross the network "
                "unprotected. Set [tls] enabled = true (with cert and key), or [daemon] "
                "insecure = true to accept that")
        self._sock = socket.create_server((host, port), reuse_port=False)
        self.address = self._sock.getsockname()[:2]
        self._resume_targets()
        threading.Thread(target=self._accept_loop, daemon=True, name="accept").start()
        for repset in list(self.registry.repsets.values()):
            if repset.capture == "mount":
                try:
                    self._start_mount(repset)
                except (SmirrorError, OSError) as exc:
                    # status and its connections say so too (not started)
                    self.mount_errors[repset.name] = str(exc)
                    log.error("replication set %s: capture mount at %s not started: %s",
                              repset.name, repset.mount, exc)
        for conn in list(self.registry.connections.values()):
            # what changed while this daemon was down is unknown: a checksum
            # difference mirror against the target goes first
            try:
                with self._sources_lock:
                    self._start_source(conn, mirror=True, scan_must_work=False)
            except (SmirrorError, OSError) as exc:
                # one broken connection (its set's root is gone) stops no
                # other; status shows it and disconnect removes it
                log.error("connection %s: not started: %s", conn.conid, exc)
                self.disconnected[conn.conid] = "not started"
                self.down_errors[conn.conid] = str(exc)
                # tried again until it starts (its root restored, say): a
                # restart of the daemon is not needed for that
                threading.Thread(target=self._retry_start, args=(conn.conid, True, "start", False),
                                 daemon=True, name=f"start-{conn.conid}").start()
        log.info("listening on %s:%d (state %s)", *self.address, self.state_dir)
        return self.address

    def serve_forever(self) -> None:
        import faulthandler
        faulthandler.register(signal.SIGUSR1)      # kill -USR1: every thread's stack to stderr
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        self.start()
        print(f"smirror daemon listening on {self.address[0]}:{self.address[1]}", flush=True)
        # a timed wait: a signal the kernel gave to another thread wakes no
        # untimed lock wait, and its handler runs only when this one wakes
        # (a SIGTERM right after a SIGCONT was lost that way)
        while not self._stop.wait(0.5):
            pass
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        # capture mounts first: no change through them after their queues
        # close. Not under the sources lock: a reconnect's mirror may hold it
        # while it waits for room in a queue (closed just below)
        for name, cap in list(self.captures.items()):
            if isinstance(cap, MountRepsetCapture):
                cap.close()
                self.captures.pop(name, None)
        # a reconnect's mirror may wait for room in its queue while holding
        # the sources lock: closed queues end that wait (SIGTERM hung there)
        for src in list(self.sources.values()):
            src.queue.close()
        with self._sources_lock:
            for cap in list(self.captures.values()):
                cap.close()
            for src in list(self.sources.values()):
                src.close()
        with self._targets_lock:
            for tgt in list(self.targets.values()):
                tgt.close()
        log.info("stopped")

    # -- source side -----------------------------------------------------------
    def dial_target(self, host: str, port: int, io_timeout: float | None = None) -> Link:
        if not self.config.links.user:
            raise ConfigError("links.user is not set: this daemon cannot log in to targets")
        link = wire.connect(host, port, tls=self.tls_client, io_timeout=io_timeout)
        try:
            handshake.login(link, self.config.links.user, self._link_password, purpose="data")
        except BaseException:
            link.close()
            raise
        return link

    def _start_source(self, conn, mirror, *, reader=None, newer: bool = False,
                      scan_must_work: bool = True) -> SourceConnection:
        """Start a connection's source side; ``mirror`` is False, "full",
        "different" or True (checksum) (see :mod:`~smirror.daemon.connection_mirror`),
        through ``reader`` when the caller read the target already. A
        target that cannot be read is never a reason to send the whole set: with
        ``scan_must_work`` the error is raised (connect, mirror-start);
        otherwise (start-up, reconnects) it is the connection's last error
        and the mirror follows the first link's RESET."""
        repset = self.registry.repset(conn.repset)
        if not os.path.isdir(repset.root):
            raise ConfigError(f"connection {conn.conid}: the root {repset.root} of replication set "
                              f"{repset.name!r} is missing: restore it, or disconnect {conn.conid}")
        check_sync(conn.sync, repset.capture, f"connection {conn.conid}: sync")
        scan_error = None
        if mirror and reader is None:
            try:
                reader = self.remote_reader(conn, mirror)
            except (SmirrorError, OSError) as exc:
                if scan_must_work:
                    raise SmirrorError(f"cannot read map base {conn.map_base} on {conn.target}: "
                                       f"{exc}") from None
                # the stream restarts past what the target holds: its RESET
                # brings the checksum mirror, which reads the target again
                scan_error = f"cannot read the target ({exc}): mirror when it can be read"
        run = None
        if reader is not None:
            from smirror.daemon.connection_mirror import ConnectionMirror, options_for
            run = ConnectionMirror(reader, options_for(mirror, newer=newer, mount=repset.capture == "mount",
                                                       rules=repset.compiled_rules() or None))
        src = SourceConnection(self, conn)
        if run is not None:
            run.stop = src.mirror_stop
        self.sources[conn.conid] = src
        if scan_error:
            src.sender.report_error(scan_error, logging.WARNING)
        cap = self._capture_for(conn, repset, reader)
        # (the ignores: Sender's hooks are typed None until stream/sender.py is typed)
        src.sender.on_resync = lambda rel, why, conid=conn.conid: cap.request_resync(conid, rel, why)
        # a new journal numbers past what the target holds, so the first
        # link sends RESET: the mirror queued here already covers that one
        src.mirror_pending_reset = run is not None
        src.sender.on_reset = lambda: self._on_reset(src)  # type: ignore[assignment]
        if isinstance(cap, MountRepsetCapture):
            cap.sync_waiter.add(conn.conid, src.journal, src.sender, conn.sync)
        src.sender.start()          # first: a mirror larger than the queue waits on it
        try:
            src.mirror_stats = cap.add(conn, src.journal, run)
        except BaseException:
            if reader is not None:
                reader.close()          # (closed already when the mirror ran)
            self._stop_source(conn.conid)
            raise
        return src

    def _capture_for(self, conn, repset, reader) -> RepsetCapture:
        """The running capture of ``repset``, started for connection
        ``conn`` when none runs (a mount set's must run already); on a
        failure ``reader`` is closed and the connection's source stopped."""
        cap = self.captures.get(repset.name)
        if cap is not None:
            return cap
        if repset.capture == "mount":
            if reader is not None:
                reader.close()
            self._stop_source(conn.conid)
            raise ConfigError(f"connection {conn.conid}: the capture mount of replication set "
                              f"{repset.name!r} at {repset.mount} is not running: "
                              f"{self.mount_errors.get(repset.name, 'see the log')}")
        made = None
        try:
            cap = made = RepsetCapture(repset, self._auto_disconnect)
            cap.capture.load_target(repset.root)    # the cache: what the set holds now
        except BaseException:
            if made is not None:
                made.capture.close()
            if reader is not None:
                reader.close()
            self._stop_source(conn.conid)
            raise
        self.captures[repset.name] = cap
        cap.thread.start()
        return cap

    def _start_mount(self, repset) -> RepsetCapture:
        """Mount the capture of a ``capture = "mount"`` repset (a stale
        mount of a crashed daemon there is cleared first)."""
        with self._sources_lock:
            cap = self.captures.get(repset.name)
            if cap is None:
                cap = MountRepsetCapture(repset, self._auto_disconnect).start()
                self.captures[repset.name] = cap
                self.mount_errors.pop(repset.name, None)
            return cap

    def _stop_mount(self, name: str) -> None:
        self.mount_errors.pop(name, None)
        with self._sources_lock:
            cap = self.captures.get(name)
            if isinstance(cap, MountRepsetCapture):
                cap.close()
                del self.captures[name]

    def _auto_disconnect(self, conid: int, exc) -> None:
        """A source queue reached its disk limit: disconnect cleanly (what
        the target received is applied; nothing half), drop the queue, and
        reconnect with the configured remirror when there is room again."""
        counters = self.counters.setdefault(conid, dict.fromkeys(
            ("auto_disconnects", "reconnects", "remirrors"), 0))
        counters["auto_disconnects"] += 1
        log.error("connection %s: auto-disconnect: %s", conid, exc)
        threading.Thread(target=self._reconnect_later, args=(conid,), daemon=True,
                         name=f"reconnect-{conid}").start()

    def _reconnect_later(self, conid: int) -> None:
        with self._sources_lock:
            self.disconnected[conid] = "auto-disconnected"     # first: status always has a row
            self._stop_source(conid)
        cfg = self.config.reconnect
        if not cfg.auto_reconnect:
            return
        mode = {"none": False, "full": "full", "different": "different", "checksum": True}[cfg.remirror]
        if self._retry_start(conid, mode, "reconnect"):
            counters = self.counters[conid]
            counters["reconnects"] += 1
            counters["remirrors"] += bool(mode)

    def _retry_start(self, conid: int, mode, what: str, scan_must_work: bool = True) -> bool:
        """Start connection ``conid``'s source side (``mode`` and
        ``scan_must_work`` as :meth:`_start_source`'s) every ``retry_interval`` until
        it starts (True), is disconnected or the daemon stops (False); each
        failure is the connection's error in status, logged when it changes."""
        last = ""
        while not self._stop.wait(self.config.reconnect.retry_interval):
            conn = self.registry.connections.get(conid)
            if conn is None or conid not in self.disconnected:
                return False
            error: BaseException | None = None
            with self._sources_lock:        # one block: a mirror-start cannot come in between
                if conid not in self.disconnected or conid in self.sources:
                    return False            # started meanwhile (mirror-start, ...)
                try:
                    self._start_source(conn, mirror=mode, scan_must_work=scan_must_work)
                    self.disconnected.pop(conid, None)
                except (SmirrorError, OSError) as exc:
                    self._stop_source(conid)
                    self.down_errors[conid] = f"{what} failed: {exc}"
                    error = exc
            if error is not None:
                if str(error) != last:
                    log.warning("connection %s: %s failed: %s", conid, what, error)
                    last = str(error)
                continue
            self.down_errors.pop(conid, None)
            log.warning("connection %s: %s%s", conid, "reconnected" if what == "reconnect" else "started",
                        " with a mirror" if mode else "")
            return True
        return False

    def _on_reset(self, src: SourceConnection) -> None:
        first_link = src.sender.connects == 0
        if src.mirror_pending_reset and first_link:
            src.mirror_pending_reset = False      # the queued mirror covers it
            return
        src.mirror_pending_reset = False
        threading.Thread(target=self._remirror, args=(src,), daemon=True,
                         name=f"remirror-{src.conn.conid}").start()

    def _remirror(self, src: SourceConnection) -> None:
        """The target lost ops this source no longer holds: a checksum
        difference mirror, queued behind the RESET in the same stream, brings
        it in line (the sender asked for it)."""
        conn = src.conn
        if self._stop.is_set() or self.sources.get(conn.conid) is not src:
            return
        log.warning("connection %s: target needs a mirror: running a checksum difference mirror",
                    conn.conid)
        while True:
            try:
                reader = self.remote_reader(conn, True)
                break
            except (SmirrorError, OSError) as exc:
                # never the whole set instead (and no orphan pass on a
                # listing that failed): the mirror waits until it can read
                src.sender.report_error(f"cannot read the target for its mirror ({exc}): "
                                        f"retrying", logging.WARNING)
                if self._stop.wait(self.config.reconnect.retry_interval) \
                        or self.sources.get(conn.conid) is not src:
                    return
        cap = self.captures.get(conn.repset)
        if cap is None:
            reader.close()
            return
        from smirror.daemon.connection_mirror import ConnectionMirror, options_for
        repset = self.registry.repset(conn.repset)
        run = ConnectionMirror(reader, options_for(True, mount=repset.capture == "mount",
                                                   rules=repset.compiled_rules() or None),
                               stop=src.mirror_stop)
        src.mirror_stats = cap.mirror(conn, src.journal, run)
        self.counters.setdefault(conn.conid, dict.fromkeys(
            ("auto_disconnects", "reconnects", "remirrors"), 0))["remirrors"] += 1

    def remote_reader(self, conn, mode) -> RemoteReader:
        """The reader of connection ``conn``'s map base on its target (a
        logged-in control link, the listing read now; the mirror closes it)."""
        from smirror.daemon.connection_mirror import remote_reader
        from smirror.daemon.control import Client
        client = Client(conn.target, tls=self.tls_client, timeout=300)
        try:
            client.login(self.config.links.user, self._link_password)
            # the target checks the source id against its link user
            ident = {"source": self.daemon_id, "conid": conn.conid}
            return remote_reader(client, conn.map_base, ident, mode)
        except BaseException:
            client.close()
            raise

    def _stop_source(self, conid: int) -> None:
        src = self.sources.pop(conid, None)
        if src is None:
            return
        cap = self.captures.get(src.conn.repset)
        if isinstance(cap, MountRepsetCapture):
            cap.sync_waiter.remove(conid)
        if cap is not None:
            cap.remove(conid)
            if not cap.targets and not getattr(cap, "persistent", False):
                cap.close()
                del self.captures[src.conn.repset]
        src.close()
        # what is left of the old connection (its queue's frames, the
        # watcher's buffers and cache) sits in reference cycles of threads
        # and callbacks: freed now, not whenever a full collection comes
        # (each auto-disconnect cycle kept ~30 MiB more before)
        threading.Thread(target=_give_back_memory, daemon=True, name="collect").start()

    # -- links -----------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                assert self._sock is not None       # start() made it
                conn, addr = self._sock.accept()
            except OSError as exc:
                if self._stop.is_set() or exc.errno in (errno.EBADF, errno.EINVAL):
                    return                      # the listening socket is closed
                # out of file descriptors, a peer that reset first, ...: the
                # daemon keeps accepting once it has room again
                log.warning("accepting a link failed: %s", exc)
                self._stop.wait(0.1)
                continue
            # over the cap of logins in progress: no thread, a short ERROR
            refused = self.pending_logins.enter(addr[0])
            if refused:
                if self.pending_logins.should_log():
                    log.warning("%s:%d: %s", addr[0], addr[1], refused)
                _refuse_quickly(conn, refused, tls=self.tls_server is not None)
                continue
            threading.Thread(target=self._handle, args=(conn, addr), daemon=True,
                             name=f"link-{addr[0]}:{addr[1]}").start()

    def _handle(self, conn: socket.socket, addr) -> None:
        """One accepted connection: TLS, login (small messages, a timeout,
        the throttle), then the control or data link it asked for."""
        accepted = time.monotonic()
        login = self.config.login
        pending = [addr[0]]                 # the login slot, given back once
        def end_pending():
            if pending:
                self.pending_logins.leave(pending.pop())
        try:
            try:
                wire.tune_socket(conn)
                if self.tls_server is not None:
                    conn.settimeout(login.timeout)
                    conn = self.tls_server.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                log.warning("%s:%d: TLS handshake failed: %s", addr[0], addr[1], exc)
                conn.close()
                return
            left = max(0.1, login.timeout - (time.monotonic() - accepted))   # TLS took some
            with Link(conn, f"{addr[0]}:{addr[1]}") as link:
                try:
                    user, purpose = handshake.accept_login(link, self.users, self.throttle,
                                                      sessions=self.sessions, timeout=left,
                                                      cert_users=self.config.tls.cert_users)
                    end_pending()
                    link.sock.settimeout(None)          # logged in: a link may idle
                    current = self.users.current(user.name)
                    link.record = current[1] if current else None
                    log.info("%s logged in as %s (%s link, %s)", link.peer, user.name, purpose, link.auth)
                    if purpose == "data":
                        self._data_link(link, user)
                    else:
                        self._control_link(link, user)
                except AuthError as exc:
                    log.warning("%s: %s", link.peer, exc)
                except (ProtocolError, OSError) as exc:
                    log.info("%s: link ended: %s", link.peer, exc)
                except SmirrorError as exc:
                    log.warning("%s: %s", link.peer, exc)
                    link.send_error(str(exc))
                except Exception as exc:        # a bug ends one link, said in the log
                    log.exception("%s: link failed", link.peer)
                    link.send_error(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            end_pending()

    def _data_link(self, link: Link, user: User) -> None:
        """One incoming data link: only a replication user, as the source id
        bound to it, into a map base this target allows. A refusal is
        logged and sent to the source as ERROR. An OPEN with ``check`` is
        the source's probe before a connect: READY (or ERROR), then the
        link ends; nothing but the map base is created."""
        if user.role != "replication":
            link.send_error(f"user {user.name!r} has role {user.role!r} and may not open data links: "
                            f"add a link user with 'smirror user add NAME --role replication' on "
                            f"this target and name it in the source's [links] user")
            raise AuthError(f"data link refused for {user.role} user {user.name!r}")
        _, opened = link.recv_json(MsgType.OPEN)
        conid, map_base, source = opened.get("conid"), opened.get("map_base"), opened.get("source")
        check = opened.get("check") is True
        if not isinstance(conid, int) or isinstance(conid, bool) or conid < (0 if check else 1) \
                or not isinstance(map_base, str) or not isinstance(source, str):
            link.send_error("OPEN needs an integer conid, an absolute map_base and a source id")
            raise ProtocolError(f"{link.peer} sent a bad OPEN: {opened!r}")
        try:
            check_source_id(source)
            if self.bindings.claim(user.name, source):
                log.warning("replication user %r is now bound to source %s", user.name, source)
            base = self.map_bases.check(map_base)
            key = (source, conid)
            if opened.get("disconnect") is True:
                self._source_disconnected(link, source, conid, base)
                return
            with self._targets_lock:
                tgt = self.targets.get(key)
                if tgt is not None and tgt.map_base != base:
                    # never closes the running connection: a source that
                    # reuses a conid for another map base is refused
                    raise ConfigError(f"connection {conid} of source {source} writes to "
                                      f"{tgt.map_base}; an OPEN for map base {base} is refused")
                self.bindings.claim_map_base(source, base)     # no other source's map base
                self.map_bases.check(map_base, create=True)
                if tgt is None and not check:
                    tgt = self.targets[key] = self._new_target(source, conid, base)
        except SmirrorError as exc:
            log.warning("%s: data link of user %r refused: %s", link.peer, user.name, exc)
            link.send_error(str(exc))
            return
        if check:
            log.info("%s: map base %s accepted for source %s (checked before a connect)",
                     link.peer, base, source)
            link.send_json(MsgType.READY, {"last_seq": 0, "map_base": base, "check": True})
            return
        assert tgt is not None          # made above unless check
        tgt.serve(link, order=opened.get("order"), durable=opened.get("durable") is True)

    def _source_disconnected(self, link: Link, source: str, conid: int, base: str) -> None:
        """The source ended connection ``conid`` (``disconnect``): its
        applier and link stop here, its queue and applied state are removed
        (a connection id is never used again by that source); the map base
        keeps what was applied. READY with ``disconnected`` answers."""
        import shutil
        with self._targets_lock:
            tgt = self.targets.get((source, conid))
            if tgt is not None and tgt.map_base != base:
                raise ConfigError(f"connection {conid} of source {source} writes to {tgt.map_base}, "
                                  f"not {base}: not disconnected")
            self.targets.pop((source, conid), None)
        dropped = 0
        if tgt is not None:
            dropped = tgt.queue.count
            tgt.close()
        for d in (self.state_dir / "targets" / source / f"target-{conid}",
                  self._target_queue_dir(source, conid)):
            shutil.rmtree(d, ignore_errors=True)
        log.warning("connection %s of source %s (map base %s): disconnected by the source%s; "
                    "its queue and state removed", conid, source, base,
                    f", {dropped} frame(s) not applied dropped" if dropped else "")
        link.send_json(MsgType.READY, {"last_seq": 0, "disconnected": True, "known": tgt is not None})

    def _new_target(self, source: str, conid: int, base: str) -> TargetConnection:
        """The target side of connection ``conid`` of ``source`` into the
        map base ``base`` (checked), its map base recorded beside its state
        (_resume_targets). Under _targets_lock."""
        cfg = self.config
        state = self.state_dir / "targets" / source
        tgt = TargetConnection(conid, base, state,
                               queue_dir=self._target_queue_dir(source, conid),
                               memory_limit=queue_cap(cfg.queues.target_memory_limit,
                                                      self.memory.limit),
                               budget=self.memory,
                               disk_limit=cfg.queues.disk_queue_limit,
                               min_free_bytes=cfg.queues.min_free_space,
                               fsync=cfg.queues.fsync, paused=self.paused,
                               tasks=self.target_tasks,
                               stop_on_task_failure=cfg.tasks.stop_replication_on_failure,
                               in_use_max_delay=cfg.target.in_use_max_delay,
                               keep_dirs=self.keep_dirs,
                               alert_threshold=cfg.queues.alert_threshold,
                               deleted_mode=cfg.target.ignored_deletes,
                               deleted_keep_days=cfg.target.deleted_keep_days,
                               orphan_moves=cfg.target.orphans == "move",
                               allow_setid=setid_allowed(base, cfg.target.setid_map_bases),
                               xattr_namespaces=cfg.target.xattr_namespaces,
                               allow_devices=cfg.target.devices)
        tgt.source = source
        record = tgt.dir / MAP_BASE_FILE
        if not record.exists():         # durable: a power loss leaves the old or the new
            write_atomic(record, os.fsencode(base) + b"\n")
        return tgt

    def _resume_targets(self) -> None:
        """At start: every incoming connection this daemon holds state for
        (its map base recorded) applies what its durable queue holds at
        once, without waiting for its source to come back (a source that
        is down, or stopped, must not keep a target's acknowledged ops
        off its map base)."""
        for record in sorted(self.state_dir.glob(f"targets/*/target-*/{MAP_BASE_FILE}")):
            source, name = record.parent.parent.name, record.parent.name
            try:
                conid = int(name.removeprefix("target-"))
                check_source_id(source)
                base = self.map_bases.check(record.read_text(encoding="utf-8",
                                                             errors="surrogateescape").strip())
                with self._targets_lock:
                    if (source, conid) not in self.targets:
                        self.targets[(source, conid)] = self._new_target(source, conid, base)
            except (SmirrorError, OSError, ValueError) as exc:
                # its source's next OPEN tries again (and says why, if it must)
                log.error("connection %s from %s: not resumed at start: %s", name, source, exc)

    def _target_queue_dir(self, source: str, conid: int) -> Path:
        """Where the durable queue of an incoming connection lives:
        under ``queues.disk_queue_dir`` (default STATE_DIR/queues). A queue
        left at an older place (the setting changed) is used where it is
        until it drains: acknowledged ops are never dropped."""
        wanted = self.config.queue_dir / f"target-{source}-{conid}"
        legacy = self.state_dir / "targets" / source / f"target-{conid}" / "queue"
        if legacy != wanted and legacy.is_dir() and any(legacy.iterdir()):
            log.warning("connection %s from %s: its target queue stays in %s (disk_queue_dir "
                        "is %s) until it is empty", conid, source, legacy, self.config.queue_dir)
            return legacy
        return wanted

    def _control_link(self, link: Link, user: User) -> None:
        while not self._stop.is_set():
            try:
                _, req = link.recv_json(MsgType.REQUEST, MsgType.BYE)
            except wire.LinkClosed:
                return
            if "verb" not in req:
                return                          # BYE
            rid, verb, args = req.get("id"), req.get("verb"), req.get("args") or {}
            user = self._current_user(link, user)       # ends the link when the user is gone
            try:
                if not isinstance(verb, str) or not isinstance(args, dict):
                    raise ConfigError(f"a request is a verb (a string) with args (a table), got verb "
                                      f"{verb!r} and args {args!r}")
                if verb in ("session", "logout"):
                    result = self._session_verb(link, user, verb)
                else:
                    result = self.request(user, verb, args)
                link.send_json(MsgType.REPLY, {"id": rid, "ok": True, "result": result})
            except (SmirrorError, ValueError) as exc:
                link.send_json(MsgType.REPLY, {"id": rid, "ok": False, "error": str(exc)})

    def _current_user(self, link: Link, user: User) -> User:
        """``user`` as the user store has it now; the link of a user removed
        or replaced since it logged in (``user add --replace``, a new role or
        password) ends: it must log in again."""
        now = self.users.current(user.name)
        if now is None or now[1] != link.record:
            link.send_error(f"user {user.name!r} was removed or changed: log in again")
            raise AuthError(f"{link.peer}: user {user.name!r} was removed or changed: link closed")
        return now[0]

    def _session_verb(self, link: Link, user: User, verb: str) -> dict:
        """``session``: a token for later logins, only after a password login
        (a token cannot mint tokens); ``logout``: revoke the link's token."""
        if user.role == "replication":
            raise AuthError(f"user {user.name!r} has role 'replication': it may open data links "
                            f"and read its own map bases, not {verb!r}")
        if verb == "logout":
            return {"revoked": bool(link.token_id and self.sessions.revoke(link.token_id))}
        if link.auth != "password":
            raise AuthError("a session can only be started after a password login, "
                            "not on a link that logged in with a session token")
        assert link.record is not None      # set by the login
        return {"token": self.sessions.new(user.name, link.record)}

    # -- tasks (source side) ------------------------------------------------------
    def queue_task(self, args: dict) -> dict:
        """Insert a task into every connection of this source to the target,
        at one point of the source's history: on-queue runs first; then, with
        every capture of those connections held, the watchers handle what
        the kernel reported so far and the task goes into each journal."""
        target = parse_hostport(args.get("target", ""), "task target")
        target = f"{target[0]}:{target[1]}"
        spec = TaskSpec.build(args.get("name"), on_execute=args.get("on_execute"),
                              on_receive=args.get("on_receive"), on_queue=args.get("on_queue"),
                              on_transmit=args.get("on_transmit"), timeout=args.get("timeout"),
                              args=args.get("args") or (), source=self.daemon_id)
        with self._sources_lock:
            srcs = sorted((s for s in self.sources.values() if s.conn.target == target),
                          key=lambda s: s.conn.conid)
        if not srcs:
            known = sorted({c.target for c in self.registry.connections.values()})
            raise ConfigError(f"task {spec.name!r}: this source has no running connection to {target}"
                              + (f" (its targets: {', '.join(known)})" if known else ""))
        return self.source_tasks.queue(spec, target, [
            QueuedInto(s.conn.conid, getattr(self.captures.get(s.conn.repset), "capture", None),
                       s.journal, s.sender) for s in srcs])

    # -- control verbs: verb -> (role it needs, handler) -------------------------
    # "monitor" verbs only read; "replication" verbs are the reads of its own
    # map bases that a connection's mirror makes (an admin may ask them too)
    VERBS: dict[str, tuple[str, str]] = {}

    @staticmethod                       # called here, in the class body (3.10+)
    def _verb(name: str, role: str, VERBS=VERBS):
        def declare(handler):
            VERBS[name] = (role, handler.__name__)
            return handler
        return declare

    def request(self, user: User, verb: str, args: dict):
        role, handler = self.VERBS.get(verb, ("admin", None))
        if role == "replication":
            if user.role != "admin":
                user.require("replication")
        elif user.role == "replication":
            reads = sorted(v for v, (r, _) in self.VERBS.items() if r == "replication")
            raise AuthError(f"user {user.name!r} has role 'replication': it may open data links and "
                            f"read its own map bases ({', '.join(reads)}), not {verb!r}")
        else:
            user.require(role)
        if handler is None:
            raise ConfigError(f"unknown request {verb!r}")
        return getattr(self, handler)(user, args)

    @_verb("status", "monitor")
    def _status_verb(self, user: User, args: dict):
        return self.status()

    @_verb("repset.create", "admin")
    def _repset_create(self, user: User, args: dict):
        rules = [tuple(r) for r in args.get("rules", [])]
        r = self.registry.create_repset(args.get("name"), args.get("root", ""), rules,
                                        capture=args.get("capture"), mount=args.get("mount"))
        if r.capture == "mount":
            try:
                self._start_mount(r)
            except BaseException:
                self.registry.delete_repset(r.name)      # not created: it cannot capture
                raise
        return {"name": r.name, "root": r.root, "capture": r.capture, "mount": r.mount}

    @_verb("repset.list", "monitor")
    def _repset_list(self, user: User, args: dict):
        return [{"name": r.name, "root": r.root, "capture": r.capture, "mount": r.mount,
                 "rules": [[x.kind, x.pattern, x.recursive] for x in r.rules]}
                for r in self.registry.repsets.values()]

    @_verb("repset.delete", "admin")
    def _repset_delete(self, user: User, args: dict):
        self._stop_mount(self.registry.delete_repset(args.get("name")).name)
        return {}

    @_verb("connect", "admin")
    def _connect(self, user: User, args: dict):
        # checked before anything is registered or queued: the request,
        # the map base against this host's set, then the target itself
        reg = self.registry
        options = check_options(args.get("options") or {})
        repset, target, map_base = reg.check_connect(args.get("repset"), args.get("target", ""),
                                                     args.get("map_base", ""))
        check_sync(options.get("sync", "async"), repset.capture, "connect: sync")
        self._check_not_own_root(repset, target, map_base)
        self.probe_target(target, map_base)
        conn = reg.connect(repset.name, target, map_base, mirror=not args.get("nomirror", False),
                           options=args.get("options") or {})
        try:
            with self._sources_lock:
                self._start_source(conn, mirror=conn.mirror_on_connect)
        except BaseException:
            reg.disconnect(conn.conid)
            raise
        return {"conid": conn.conid}

    @_verb("conid", "monitor")
    def _conid(self, user: User, args: dict):
        conid = self.registry.find(args.get("repset"), args.get("target", ""), args.get("map_base", ""))
        if conid is None:
            raise ConfigError(f"no connection of {args.get('repset')!r} to {args.get('target')} "
                              f"at map base {args.get('map_base')}")
        return {"conid": conid}

    @_verb("pause-target", "admin")
    def _pause_target(self, user: User, args: dict):
        return self._set_paused_reply(True)

    @_verb("resume-target", "admin")
    def _resume_target(self, user: User, args: dict):
        return self._set_paused_reply(False)

    def _set_paused_reply(self, paused: bool) -> dict:
        self.set_paused(paused)
        return {"paused": self.paused,
                "targets": {f"{k[0]}-{k[1]}": t.apply_state for k, t in self.targets.items()}}

    @_verb("target.scan", "replication")
    def _target_scan_verb(self, user: User, args: dict):
        return self._target_scan(user, args)

    @_verb("target.signature", "replication")
    def _target_signature_verb(self, user: User, args: dict):
        return self._target_signature(user, args)

    @_verb("mirror-start", "admin")
    def _mirror_start(self, user: User, args: dict):
        conn = self.registry.connection(args.get("conid"))
        newer = bool(args.get("newer"))
        if newer and args.get("full"):
            raise ConfigError(f"mirror-start {conn.conid}: full sends every file; newer cannot go "
                              f"with it (newer compares with the target: use it alone, or with "
                              f"different or checksum)")
        mode = "full" if args.get("full") else \
            "different" if args.get("different") and not args.get("checksum") else True
        # the target is read first: a failed read leaves the connection running
        reader = self.remote_reader(conn, mode)
        with self._sources_lock:
            # status keeps a row while the connection restarts (the running one wins)
            was = self.disconnected.get(conn.conid)
            self.disconnected[conn.conid] = "restarting for a mirror"
            try:
                self._stop_source(conn.conid)
                src = self._start_source(conn, mirror=mode, reader=reader, newer=newer)
            except BaseException:
                reader.close()
                if was is None:
                    self.disconnected.pop(conn.conid, None)
                else:
                    self.disconnected[conn.conid] = was
                raise
            self.disconnected.pop(conn.conid, None)
        return {"conid": conn.conid, "mirror": src.mirror_stats}

    MIRROR_STOP_WAIT = 30.0     # seconds mirror-stop waits for the mirror to end

    @_verb("mirror-stop", "admin")
    def _mirror_stop(self, user: User, args: dict):
        """Stop the connection's running mirror before its next entry; the
        connection stays and replicates on. Waits (MIRROR_STOP_WAIT at most:
        the entry in progress may wait for room in the queue) and answers
        with what the mirror did; its state is ``stopped`` from then on."""
        conn = self.registry.connection(args.get("conid"))
        src, cap = self.sources.get(conn.conid), self.captures.get(conn.repset)
        if src is None:
            why = self.disconnected.get(conn.conid, "not running")
            raise ConfigError(f"connection {conn.conid} has no running mirror to stop (the "
                              f"connection is {why})")
        before = src.mirror_stats       # read first: the stopped mirror replaces them
        if cap is None or not cap.stop_mirror(conn.conid, src.mirror_stop):
            last = src.mirror_progress()
            said = {None: "it has run none since it started",
                    "sending": f"its last one has queued all its ops ({last and last.get('progress')}% "
                               f"acknowledged): nothing is left to stop",
                    "done": "its last one is done", "stopped": "its last one was stopped already"}
            raise ConfigError(f"connection {conn.conid} has no running mirror to stop: "
                              + said.get(last.get("state") if last else None, "none is running"))
        # the mirror's caller sets its stats once it returned (a daemon
        # that stops closes the connection, which ends the wait too)
        src.wait_mirror_stats(before, self.MIRROR_STOP_WAIT)
        return {"conid": conn.conid, "mirror": src.mirror_progress()}

    @_verb("connection.set", "admin")
    def _connection_set(self, user: User, args: dict):
        options = check_options(args.get("options") or {})
        if "sync" in options:
            conn = self.registry.connection(args.get("conid"))
            check_sync(options["sync"], self.registry.repset(conn.repset).capture,
                       f"connection {conn.conid}: sync")
        conn = self.registry.set_options(args.get("conid"), options)
        src, cap = self.sources.get(conn.conid), self.captures.get(conn.repset)
        if src is not None and "sync" in options:
            # the running connection waits (or stops waiting) from the next call on
            src.sender.sync = conn.sync
            if isinstance(cap, MountRepsetCapture):
                cap.sync_waiter.add(conn.conid, src.journal, src.sender, conn.sync)
        return {"conid": conn.conid, "options": conn.options()}

    @_verb("queue-task", "admin")
    def _queue_task_verb(self, user: User, args: dict):
        return self.queue_task(args)

    @_verb("disconnect", "admin")
    def _disconnect(self, user: User, args: dict):
        conn = self.registry.disconnect(args.get("conid"))
        with self._sources_lock:
            self._stop_source(conn.conid)
            self.disconnected.pop(conn.conid, None)
            self.down_errors.pop(conn.conid, None)
        return {"conid": conn.conid, "target": self._tell_disconnect(conn)}

    del _verb

    def _tell_disconnect(self, conn) -> str:
        """Tell the target that ``conn`` ended, so its side stops (applier,
        retries, queue) instead of waiting for a source that never comes
        back: what happened, for the reply."""
        from smirror.stream.sender import open_message
        host, port = parse_hostport(conn.target, "target")
        try:
            with self.dial_target(host, port, io_timeout=15) as link:
                link.send_json(MsgType.OPEN, open_message(conn.conid, conn.map_base, self.daemon_id,
                                                          disconnect=True))
                _, ready = link.recv_json(MsgType.READY)
        except (SmirrorError, OSError) as exc:
            log.warning("connection %s: the target %s was not told of the disconnect: %s",
                        conn.conid, conn.target, exc)
            return f"not reached ({exc}): it keeps this connection's state until told"
        if not ready.get("disconnected"):
            return "an older smirror: it keeps this connection's state"
        return "its side of the connection is ended"

    def probe_target(self, target: str, map_base: str) -> dict:
        """Log in to ``target`` as the link user and have it validate
        ``map_base`` for this source (an OPEN with ``check``): its READY,
        or SmirrorError with the target's reason."""
        from smirror.stream.sender import probe_target as probe
        host, port = parse_hostport(target, "target")
        try:
            link = self.dial_target(host, port, io_timeout=60)
        except AuthError as exc:
            raise AuthError(f"target {target} refused the login of link user "
                            f"{self.config.links.user!r}: {exc}") from None
        except (ProtocolError, OSError) as exc:
            raise SmirrorError(f"cannot connect to target {target}: {exc}") from None
        try:
            with link:
                return probe(link, 0, map_base, self.daemon_id)
        except (ProtocolError, OSError) as exc:
            raise SmirrorError(f"target {target} refused map base {map_base}: {exc}") from None

    def _check_not_own_root(self, repset, target: str, map_base: str) -> None:
        """A target on this very host must not write into the set it
        replicates (nor the set into its replica): refused here already,
        since the target daemon may not know this daemon's sets."""
        host, _ = parse_hostport(target, "target")
        if not is_this_host(host, self.address[0] if getattr(self, "address", None) else None):
            return
        base, root = resolve(map_base), resolve(repset.root)
        if overlaps(base, root):
            how = "contains" if base != root and root.startswith(base.rstrip("/") + "/") else "is in"
            raise ConfigError(f"map base {map_base} on {target} (this host) {how} the root "
                              f"{repset.root} of replication set {repset.name!r}: the replica "
                              f"would replicate itself")

    @property
    def paused(self) -> bool:
        """Pausing the target side survives a restart: a file in the state dir."""
        return (self.state_dir / "paused").exists()

    def set_paused(self, paused: bool) -> None:
        flag = self.state_dir / "paused"
        if paused:
            flag.write_text("applying paused by request\n")
        elif flag.exists():
            flag.unlink()
        with self._targets_lock:
            for t in self.targets.values():
                t.pause() if paused else t.resume()
        log.warning("target side %s", "paused" if paused else "resumed")

    def _map_base(self, user: User, args) -> bytes:
        """The resolved map base of a target.scan / target.signature request,
        checked like a data link's: inside the allowed roots, and for a
        replication user as the source id bound to it, in no other source's
        map base. Nothing is created."""
        try:
            base = self.map_bases.check(args.get("map_base"))
            if user.role == "replication":
                source = args.get("source")
                check_source_id(source)
                if self.bindings.claim(user.name, source):
                    log.warning("replication user %r is now bound to source %s", user.name, source)
                self.bindings.claim_map_base(source, base, record=False)
            return os.fsencode(base)
        except SmirrorError as exc:
            log.warning("user %r: read of map base %r refused: %s", user.name, args.get("map_base"), exc)
            raise

    SCAN_BACKLOG_WAIT = 30.0

    def _wait_backlog_applied(self, source, conid) -> None:
        """A mirror's listing must show the map base as the ops this target
        received will leave it: a source restarted after a kill lists it
        while the frames its last run sent are still being applied (a
        listing taken before a DELETE or RENAME among them made its mirror
        skip what the backlog then removed). Waits, bounded, unless the
        connection is paused."""
        tgt = self.targets.get((source, conid))
        if tgt is None or tgt.status()["paused"]:
            return
        goal = tgt.ops_received_seq      # (a RESET's seq has no op to apply: never reached)
        if not tgt.wait_applied(goal, self.SCAN_BACKLOG_WAIT):
            log.warning("connection %s of source %s: listing the map base with ops up to seq %d "
                        "not applied yet (applied %d): %s", conid, source, goal,
                        tgt.applier.applied_seq, tgt.error or "still applying")

    def _target_scan(self, user: User, args) -> dict:
        """The entries under a map base (this daemon as a target): in pages
        when the source asks for them (``page_bytes``, then ``cursor``;
        :mod:`smirror.daemon.scan_pages`), else all in one reply."""
        from smirror.fs.tree import scan
        if args.get("cursor") is not None:
            self._map_base(user, args)          # still this user's map base
            return self.scan_pages.next(user.name, args["cursor"])
        page_bytes = args.get("page_bytes")
        if page_bytes is not None:
            check_page_bytes(page_bytes)
        base = self._map_base(user, args)
        if not os.path.isdir(base):
            return {}
        self._wait_backlog_applied(args.get("source"), args.get("conid"))
        listing = scan(base)
        if listing.errors:
            # a partial listing would hide files from the mirror's orphan
            # pass and make it resend what it missed: the read failed
            rel, exc = listing.errors[0]
            raise SmirrorError(f"listing map base {os.fsdecode(base)} failed at {len(listing.errors)} "
                               f"place(s), first {os.fsdecode(rel) or '.'}: {exc.strerror or exc}")
        rows = listing_rows(base, listing, bool(args.get("xattrs")))
        if page_bytes is None:          # a source of an older version
            return dict(rows)
        return self.scan_pages.first(user.name, rows, page_bytes)

    def _target_signature(self, user: User, args) -> str:
        """Block hashes (hex of little-endian uint64 pairs) of one file under
        a map base, path confined to it."""
        from smirror.fs.files import open_beneath
        from smirror.kernels.checksum import check_block_size, fd_signature
        bs = check_block_size(args.get("block_size"))
        fd = open_beneath(self._map_base(user, args), os.fsencode(args.get("path", "")), os.O_RDONLY)
        try:
            sig = fd_signature(fd, block_size=bs, weak=False)
        finally:
            os.close(fd)
        return sig.strong.astype("<u8").tobytes().hex()

    def _source_rows(self) -> list[dict]:
        """One row per connection: a running one, else why it is down. A
        reconnect registers the new source before its mirror is queued and
        only then forgets the disconnect: the running row wins."""
        sources, down = dict(self.sources), dict(self.disconnected)
        rows = [dict(s.status(), **self.counters.get(c, {})) for c, s in sorted(sources.items())]
        rows += [{"conid": c, "state": why, "last_error": self.down_errors.get(c, ""),
                  **self.counters.get(c, {})} for c, why in sorted(down.items()) if c not in sources]
        return rows

    def _mount_rows(self) -> dict:
        """Each mount set's capture: running (with its counters) or why not."""
        rows = {name: cap.capture.status() for name, cap in list(self.captures.items())
                if isinstance(cap, MountRepsetCapture)}
        for name, why in list(self.mount_errors.items()):
            repset = self.registry.repsets.get(name)
            if name not in rows and repset is not None:
                rows[name] = {"kind": "mount", "mount_point": repset.mount, "state": "failed",
                              "error": why}
        return rows

    def memory_status(self) -> dict:
        """The budget and what holds it (status ``memory``)."""
        sources, targets = list(self.sources.values()), list(self.targets.values())
        return budget_use(self.memory, [s.queue for s in sources] + [t.queue for t in targets],
                          sum(t.handoff_bytes for t in targets))

    def status(self) -> dict:
        return {"daemon": self.daemon_id, "paused": self.paused, "memory": self.memory_status(),
                "tasks": self.task_log.recent()[-20:], "tasks_waiting": self.target_tasks.waiting(),
                "listen": f"{self.address[0]}:{self.address[1]}",
                "sources": self._source_rows(),
                "mounts": self._mount_rows(),
                "targets": [dict(t.status(), source=k[0]) for k, t in self.targets.items()]}
