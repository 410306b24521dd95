"""Connection queues: byte-bounded FIFOs of frames that spill to disk.

This is the thin public face of the compiled kernel ``smirror.kernels._memqueue``
(reference: ``smirror.kernels._memqueue_py``, same names, used only by the tests).

Every connection has one queue on the source (capture -> sender) and one on
the target (receiver -> applier). Items are ``(seq, frame)``: a strictly
increasing sequence number and an opaque encoded frame.

Behaviour (DESIGN.md invariants 4 and 5)
----------------------------------------
* RAM: frames stay in memory while their bytes fit ``memory_limit``. Past
  it, new frames are appended to segment files in the spill directory, and
  keep going there until every spilled frame has been handed out, so the
  order of ``get`` is always exactly the order of ``put``. RAM never holds
  more than ``memory_limit`` plus the one frame being handed out; spilled
  frames are read back one at a time through a bounded read buffer.
* Disk: past ``disk_limit`` bytes of segments, or when the volume has less
  than ``min_free_bytes`` free, ``put`` raises :class:`~smirror.errors.QueueFull`
  (nothing half-written); the engine turns that into an auto-disconnect.
* Items stay until acknowledged: ``get`` hands out the next item, ``ack(seq)``
  drops every item up to ``seq``, ``rewind()`` makes ``get`` start again at the
  first unacked item (resend after a reconnect).
* Durable queues (the target side) write every frame through to the segment
  log before ``put`` returns and persist acks; memory keeps a cached copy
  within ``memory_limit`` (a ``bytes`` frame is kept as it is, no copy).
  The compiled queue writes a record outside the lock ``get`` and ``ack``
  take, so a consumer is not held up by a producer's disk write. Reopening
  the directory after a crash recovers every whole record in order, cuts a torn last record away and raises
  :class:`~smirror.errors.QueueCorrupt` (naming file and offset) for damage
  anywhere else.

One budget per process
----------------------
A :class:`MemoryBudget` is the RAM of a whole daemon (config ``[memory]
limit``) or :class:`~smirror.replication.Replication` (``memory_limit``),
shared by every queue it owns and the target's handoff buffers. A frame stays
in memory only when its queue's own ``memory_limit`` (an optional cap) and
the budget both have room; past either, it spills to disk exactly as past a
queue's own limit. Acks give the bytes back; closing a queue drops its
frames in memory at once (a closed queue hands nothing out; what is on disk
stays for a reopen) and gives their bytes back. The disk limits, not the
budget, decide auto-disconnect. See docs/memory.md.

Settings
--------
``memory_limit``   RAM for frames of this queue (bytes; config
                   ``source_memory_limit`` / ``target_memory_limit``, caps
                   under the budget; by default the budget alone limits)
``disk_limit``     bytes of segment files (config ``disk_queue_limit``)
``segment_size``   size at which a new segment file is started; fully acked
                   segments are deleted
``min_free_bytes`` free space kept on the spill volume (config
                   ``min_free_space``), checked with statvfs every 64 MiB
                   written and whenever the estimate gets close
``fsync``          ``none``: never; ``segment``: when a segment is finished
                   and on close (writeback of the active one is started every
                   8 MiB, so that fsync waits for little); ``always``: every
                   record and every ack
``durable``        write-through + persisted acks (target queues)
``read_buffer``    size of the one reused buffer spilled frames are read with
``spare_segments`` fully acked segment files kept for reuse: overwriting a
                   file whose pages are cached and allocated costs a fraction
                   of growing a new one. Spares (and the older bytes at the
                   end of a recycled segment until it is closed) are outside
                   ``disk_limit``: at most ``spare_segments x segment_size``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from smirror.errors import ConfigError
from smirror.kernels._memqueue import MemoryBudget, SpillQueue
from smirror.units import parse_size

__all__ = ["SpillQueue", "MemoryBudget", "QueueSettings", "open_queue", "queue_dir",
           "segment_size_for", "queue_alert", "memory_budget", "queue_cap", "budget_use"]

MiB = 1 << 20
FSYNC_POLICIES = ("none", "segment", "always")


@dataclass(frozen=True)
class QueueSettings:
    """Checked queue settings; sizes accept ints or strings like ``256MiB``."""
    memory_limit: int = 256 * MiB
    disk_limit: int = 10 * 1024 * MiB
    segment_size: int = 64 * MiB
    min_free_bytes: int = 0
    fsync: str = "segment"
    durable: bool = False
    read_buffer: int = 1 * MiB
    spare_segments: int = 2

    def __post_init__(self):
        for name in ("memory_limit", "disk_limit", "segment_size", "min_free_bytes", "read_buffer"):
            object.__setattr__(self, name, parse_size(getattr(self, name), f"queue {name}"))
        if self.segment_size < 4096:
            raise ConfigError(f"queue segment_size: at least 4096 bytes, got {self.segment_size}")
        if self.read_buffer < 64 * 1024:
            raise ConfigError(f"queue read_buffer: at least 64KiB, got {self.read_buffer}")
        if self.fsync not in FSYNC_POLICIES:
            raise ConfigError(f"queue fsync: one of {', '.join(FSYNC_POLICIES)}, got {self.fsync!r}")
        if (isinstance(self.spare_segments, bool) or not isinstance(self.spare_segments, int)
                or not 0 <= self.spare_segments <= 64):
            raise ConfigError(f"queue spare_segments: a number from 0 to 64, got {self.spare_segments!r}")
        if not isinstance(self.durable, bool):
            raise ConfigError(f"queue durable: expected true or false, got {self.durable!r}")

    @classmethod
    def from_config(cls, config, role: str) -> QueueSettings:
        """Settings of a ``source`` or ``target`` queue from a
        :class:`smirror.daemon.config.Config`; target queues are durable."""
        if role not in ("source", "target"):
            raise ConfigError(f"queue role must be 'source' or 'target', got {role!r}")
        q = config.queues
        cap = getattr(q, f"{role}_memory_limit")
        return cls(
            memory_limit=queue_cap(cap, config.memory.limit),
            disk_limit=q.disk_queue_limit,
            min_free_bytes=q.min_free_space,
            fsync=q.fsync,
            durable=role == "target",
        )


def queue_dir(base, role: str, conid) -> str:
    """Spill directory of one connection's queue: ``BASE/<role>-<conid>``."""
    name = f"{role}-{conid}"
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"queue directory name {name!r}: connection ids are letters, digits, - and _")
    return os.path.join(os.fspath(base), name)


def open_queue(spill_dir, settings: QueueSettings | None = None,
               budget: MemoryBudget | None = None) -> SpillQueue:
    """Open (or create, or recover) the queue in ``spill_dir``, sharing
    ``budget`` (None: only its own memory limit bounds it)."""
    s = settings or QueueSettings()
    return SpillQueue(spill_dir, s.memory_limit, s.disk_limit, segment_size=s.segment_size,
                      min_free_bytes=s.min_free_bytes, fsync=s.fsync, durable=s.durable,
                      read_buffer=s.read_buffer, spare_segments=s.spare_segments, budget=budget)


def memory_budget(limit, what: str = "memory limit") -> MemoryBudget:
    """The budget of one process from a size (``"256MiB"``, bytes);
    ``what`` names the setting in the error message."""
    return MemoryBudget(parse_size(limit, what))


def queue_cap(cap: int | None, budget_limit: int) -> int:
    """A queue's own memory limit under a budget of ``budget_limit`` bytes:
    its cap when one is set (None: no cap of its own, the budget alone
    limits it)."""
    return budget_limit if cap is None else min(cap, budget_limit)


def budget_use(budget: MemoryBudget, queues=(), handoff_bytes: int = 0) -> dict:
    """What status shows of a budget (the ``memory`` field of ``status
    --json``, also what smbench reads): limit, used, peak, refused
    reservations, and the bytes of the queues and handoffs in it."""
    return dict(budget.stats(), queue_bytes=sum(q.mem_bytes for q in queues),
                handoff_bytes=handoff_bytes)


def segment_size_for(disk_limit: int) -> int:
    """Segment size for a disk limit: a segment is freed only when all of it
    is acknowledged and another one is being written, so several must fit
    under the limit (64 MiB at most, 64 KiB at least)."""
    return max(64 * 1024, min(64 * MiB, disk_limit // 8))


def queue_alert(q, disk_limit: int, threshold: float, spill_dir, min_free: int) -> str:
    """The warning status shows for a queue past its alert threshold
    (percent of ``disk_limit`` on disk) or on a volume with less than
    ``min_free`` bytes free; '' when neither."""
    alerts = []
    if disk_limit and q.disk_bytes * 100 >= threshold * disk_limit:
        alerts.append(f"queue on disk at {q.disk_bytes * 100 / disk_limit:.0f}% of its limit "
                      f"(alert threshold {threshold:.0f}%)")
    if min_free:
        try:
            st = os.statvfs(spill_dir)
        except OSError:
            st = None
        if st is not None and st.f_bavail * st.f_frsize < min_free:
            alerts.append(f"free space on the queue volume {st.f_bavail * st.f_frsize >> 20} MiB, "
                          f"below the {min_free >> 20} MiB minimum: the queue counts as full")
    return "; ".join(alerts)
