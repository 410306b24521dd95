"""Pure-Python reference of :mod:`smirror.kernels._memqueue` (same names, same
behaviour, same on-disk format). Only the tests import it; the runtime always
uses the compiled kernel.

On-disk format (little-endian), pinned by golden tests:

* segment file ``<index:016x>.seg``: a 32-byte segment header, then records
  back to back::

      0  magic      b"SMQS"
      4  version    u16, 1
      6  flags      u16, bit 0: recycled (the file held an older segment)
      8  index      u64, the index in the file name
     16  reserved   u64, 0
     24  check      u64, XXH3-64 of bytes 0..23

* record: 32-byte header + payload::

      0  magic      b"SMQR"
      4  length     u32, payload bytes
      8  seq        u64
     16  body_check u64, XXH3-64 of the payload seeded with seq
     24  head_check u64, XXH3-64 of header bytes 0..23 seeded with the
                    segment index (records left over from an older life of
                    a recycled file never check out)

* spare segment ``<index:016x>.spare``: a fully acked segment kept for reuse;
  overwriting its cached pages is far cheaper than growing a new file.
  Renamed to the next segment name when needed; never read.

* ack file ``ack``: two 32-byte slots written alternately (a torn slot write
  leaves the other one intact)::

      0  magic      b"SMQA"
      4  reserved   u32, 0
      8  generation u64, +1 per write, the highest valid slot wins
     16  acked_seq  u64
     24  check      u64, XXH3-64 of slot bytes 0..23

Recovery: every segment is scanned and checked. Damage in any segment but
the last raises QueueCorrupt naming the file and offset. In the last one, a
damaged record is a torn tail (cut away) when it is cut short, or when what
follows it is zeros (a fresh file), or - in a recycled file, whose tail holds
the older life's bytes - when no valid record of this segment follows it.
"""
from __future__ import annotations

import collections
import errno
import fcntl
import os
import struct
import threading
import time

import xxhash

from smirror.errors import QueueClosed, QueueCorrupt, QueueError, QueueFull
from smirror.private import PRIVATE_FILE, private_dir

RECORD_MAGIC = b"SMQR"
SEGMENT_MAGIC = b"SMQS"
ACK_MAGIC = b"SMQA"
HEADER_SIZE = 32
SEGMENT_HEADER_SIZE = 32
SEGMENT_VERSION = 1
FLAG_RECYCLED = 1
ACK_SLOT_SIZE = 32
MAX_FRAME = 0xFFFFFFFF
MAX_SEQ = 0xFFFFFFFFFFFFFFFF
SEGMENT_SUFFIX = ".seg"
SPARE_SUFFIX = ".spare"
# a fully acked active segment smaller than this keeps being appended to
RECYCLE_MIN = 1024 * 1024
ACK_NAME = "ack"
LOCK_NAME = "lock"
FSYNC_POLICIES = ("none", "segment", "always")
# re-read the free space of the volume at least this often (bytes written)
FREE_CHECK_INTERVAL = 64 * 1024 * 1024
PAGE = 4096

_HEAD = struct.Struct("<4sIQQ")      # the 24 bytes covered by head_check
_CHECK = struct.Struct("<Q")
_ACK = struct.Struct("<4sIQQ")
_SEGHEAD = struct.Struct("<4sHHQQ")


def _xxh3(data, seed=0) -> int:
    return xxhash.xxh3_64_intdigest(data, seed)


def encode_header(seq: int, payload, segment: int = 0) -> bytes:
    """The 32-byte header of ``payload`` (any contiguous buffer) as a record
    of segment ``segment``."""
    n = memoryview(payload).nbytes
    head = _HEAD.pack(RECORD_MAGIC, n, seq, _xxh3(payload, seq))
    return head + _CHECK.pack(_xxh3(head, segment))


def encode_record(seq: int, payload, segment: int = 0) -> bytes:
    """Header + payload, exactly as appended to segment ``segment``."""
    return encode_header(seq, payload, segment) + bytes(payload)


def decode_header(header, segment: int = 0) -> tuple[int, int, int] | None:
    """(seq, length, body_check) of a 32-byte record header of segment
    ``segment``, or None when its magic or head check is wrong."""
    header = bytes(header)
    if len(header) != HEADER_SIZE:
        raise ValueError(f"a record header is {HEADER_SIZE} bytes, got {len(header)}")
    magic, length, seq, body_check = _HEAD.unpack_from(header)
    (head_check,) = _CHECK.unpack_from(header, 24)
    if magic != RECORD_MAGIC or _xxh3(header[:24], segment) != head_check:
        return None
    return seq, length, body_check


def encode_segment_header(index: int, recycled: bool = False) -> bytes:
    """The 32-byte header a segment file starts with."""
    head = _SEGHEAD.pack(SEGMENT_MAGIC, SEGMENT_VERSION, FLAG_RECYCLED if recycled else 0, index, 0)
    return head + _CHECK.pack(_xxh3(head))


def decode_segment_header(header) -> tuple[int, int] | None:
    """(index, flags) of a segment header, or None when it is not one."""
    header = bytes(header)
    if len(header) != SEGMENT_HEADER_SIZE:
        return None
    magic, version, flags, index, _ = _SEGHEAD.unpack_from(header)
    (check,) = _CHECK.unpack_from(header, 24)
    if magic != SEGMENT_MAGIC or version != SEGMENT_VERSION or _xxh3(header[:24]) != check:
        return None
    return index, flags


def _encode_ack(generation: int, acked: int) -> bytes:
    slot = _ACK.pack(ACK_MAGIC, 0, generation, acked)
    return slot + _CHECK.pack(_xxh3(slot))


def _decode_ack(slot: bytes):
    if len(slot) != ACK_SLOT_SIZE:
        return None
    magic, _, generation, acked = _ACK.unpack_from(slot)
    (check,) = _CHECK.unpack_from(slot, 24)
    if magic != ACK_MAGIC or _xxh3(slot[:24]) != check:
        return None
    return generation, acked


def _check_seq(seq, what="seq") -> int:
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise TypeError(f"{what} must be an int, got {type(seq).__name__}")
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"{what} must be between 0 and 2**64-1, got {seq}")
    return seq


class MemoryBudget:
    """Bytes of RAM shared by every queue (and large buffer) of one process.

    A queue keeps a frame in memory only when its own ``memory_limit`` and
    the budget both have room; past either it spills the frame to disk. The
    queue gives the bytes back when the frame is acknowledged (or the queue
    closed). ``peak`` is the most ever reserved at once; ``refused`` counts
    reservations turned down (each one a frame that went to disk instead).
    """

    def __init__(self, limit):
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"memory budget limit must be an int, got {type(limit).__name__}")
        if not 0 <= limit < 1 << 62:
            raise ValueError(f"memory budget limit must be between 0 and 2**62-1, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._used = 0
        self._peak = 0
        self._refused = 0

    def try_reserve(self, n) -> bool:
        """Take ``n`` bytes of the budget: True, or False (nothing taken)
        when they do not fit."""
        n = _check_bytes(n)
        with self._lock:
            if self._used + n > self.limit:
                self._refused += 1
                return False
            self._used += n
            if self._used > self._peak:
                self._peak = self._used
            return True

    def release(self, n) -> None:
        """Give back ``n`` bytes taken with :meth:`try_reserve`."""
        n = _check_bytes(n)
        with self._lock:
            if n > self._used:
                raise ValueError(f"memory budget: releasing {n} bytes, only {self._used} are reserved")
            self._used -= n

    @property
    def used(self) -> int:
        return self._used

    @property
    def peak(self) -> int:
        return self._peak

    @property
    def available(self) -> int:
        return self.limit - self._used

    @property
    def refused(self) -> int:
        return self._refused

    def reset_peak(self) -> None:
        """Start measuring the peak again from what is reserved now."""
        with self._lock:
            self._peak = self._used

    def stats(self) -> dict:
        with self._lock:
            return {"limit": self.limit, "used": self._used, "peak": self._peak,
                    "refused": self._refused}

    def __repr__(self):
        return f"<MemoryBudget used={self._used} of {self.limit} peak={self._peak}>"


def _check_bytes(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"a byte count must be an int, got {type(n).__name__}")
    if not 0 <= n < 1 << 62:
        raise ValueError(f"a byte count must be between 0 and 2**62-1, got {n}")
    return n


class _MemRun:
    """Consecutive items held in RAM (in durable mode: cached copies of
    records that are also in the segment log)."""
    __slots__ = ("handed", "pending")

    def __init__(self):
        self.handed: collections.deque = collections.deque()    # handed out, not acked
        self.pending: collections.deque = collections.deque()   # not handed out yet

    @property
    def count(self):
        return len(self.handed) + len(self.pending)

    @property
    def unread(self):
        return len(self.pending)

    def first_seq(self):
        return (self.handed or self.pending)[0][0]

    def last_seq(self):
        return (self.pending or self.handed)[-1][0]


class _DiskRun:
    """Consecutive records held only in the segment log. Positions are
    (segment index, offset) of a record header."""
    __slots__ = ("start", "read", "first_seq", "last_seq", "count", "unread",
                 "last_read_seq")

    def __init__(self, pos, seq):
        self.start = pos           # first unacked record
        self.read = pos            # next record to hand out
        self.first_seq = seq
        self.last_seq = seq
        self.count = 1
        self.unread = 1
        self.last_read_seq = None  # seq of the record just before `read`


class _Segment:
    __slots__ = ("index", "path", "size", "first_seq", "last_seq", "recycled")

    def __init__(self, index, path):
        self.index = index
        self.path = path
        self.size = 0              # bytes written, the segment header included
        self.first_seq = None
        self.last_seq = None
        self.recycled = False      # the file may hold older bytes past `size`


class SpillQueue:
    """Byte-bounded FIFO of ``(seq, frame)`` items that spills to append-only
    segment files in ``spill_dir`` past ``memory_limit`` bytes of RAM and
    raises :class:`QueueFull` past ``disk_limit`` bytes of disk or when the
    volume has less than ``min_free_bytes`` free. Items stay until acked.

    One producer thread (put, ack) and one consumer thread (get) may use it
    at the same time. With a ``budget`` (a :class:`MemoryBudget` shared with
    other queues) a frame stays in memory only when the budget has room too.
    """

    def __init__(self, spill_dir, memory_limit, disk_limit, *,
                 segment_size=64 * 1024 * 1024, min_free_bytes=0,
                 fsync="none", durable=False, read_buffer=1024 * 1024,
                 spare_segments=2, budget=None):
        for name, value, low in (("memory_limit", memory_limit, 0),
                                 ("disk_limit", disk_limit, 0),
                                 ("segment_size", segment_size, 1),
                                 ("min_free_bytes", min_free_bytes, 0),
                                 ("read_buffer", read_buffer, HEADER_SIZE),
                                 ("spare_segments", spare_segments, 0)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        if budget is not None and not isinstance(budget, MemoryBudget):
            raise TypeError(f"budget must be a MemoryBudget of this module or None, "
                            f"got {type(budget).__name__}")
        self.budget = budget
        self.spill_dir = os.fspath(spill_dir)
        self.memory_limit = memory_limit
        self.disk_limit = disk_limit
        self.segment_size = segment_size
        self.min_free_bytes = min_free_bytes
        self.fsync = fsync
        self.durable = bool(durable)
        self.spare_segments = spare_segments

        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._woken = False         # wake() called: the next get() without an item returns
        self._runs: collections.deque = collections.deque()
        self._count = 0
        self._unread = 0
        self._mem_bytes = 0
        self._disk_bytes = 0
        self._segs: collections.OrderedDict[int, _Segment] = collections.OrderedDict()
        self._spares = []                        # [(old index, path)], last = hottest
        self._active: _Segment | None = None     # segment being appended to
        self._wfd = -1
        self._rfd = -1
        self._rfd_index = -1
        self._next_index = 0
        self._last_seq = None
        self._acked_seq = None
        self._ack_generation = 0
        self._ack_fd = -1
        self._free_estimate = None
        self._written_since_statvfs = 0
        self._stat: collections.Counter[str] = collections.Counter()

        private_dir(self.spill_dir)      # 0700: segments hold replicated files' contents
        self._lock_fd = os.open(os.path.join(self.spill_dir, LOCK_NAME),
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise QueueError(f"spill directory {self.spill_dir} is in use by another queue") from None
        try:
            self._recover()
        except BaseException:
            self._close_files()
            raise

    # ------------------------------------------------------------ recovery

    def _recover(self):
        self._load_ack()
        names: list = []
        spares: list = []
        for name in os.listdir(self.spill_dir):
            stem, dot, suffix = name.partition(".")
            if "." + suffix not in (SEGMENT_SUFFIX, SPARE_SUFFIX) or len(stem) != 16:
                continue
            try:
                index = int(stem, 16)
            except ValueError:
                continue
            (names if "." + suffix == SEGMENT_SUFFIX else spares).append((index, name))
            # indexes are never used twice: a recycled file's old records
            # must not check out under its new index
            self._next_index = max(self._next_index, index + 1)
        for index, name in sorted(spares):
            path = os.path.join(self.spill_dir, name)
            if len(self._spares) < self.spare_segments:
                self._spares.append((index, path))
            else:
                os.unlink(path)
        names.sort()
        acked = self._acked_seq
        prev_seq = None
        run = None
        last_pos = len(names) - 1
        for i, (index, name) in enumerate(names):
            seg = _Segment(index, os.path.join(self.spill_dir, name))
            records = self._scan_segment(seg, is_last=(i == last_pos))
            for off, seq, _length in records:
                if prev_seq is not None and seq <= prev_seq:
                    raise QueueCorrupt(f"{seg.path}: record at offset {off} has seq {seq}, "
                                       f"not above the previous record's {prev_seq}")
                prev_seq = seq
                if seg.first_seq is None:
                    seg.first_seq = seq
                seg.last_seq = seq
                if acked is not None and seq <= acked:
                    continue
                if run is None:
                    run = _DiskRun((index, off), seq)
                else:
                    run.last_seq = seq
                    run.count += 1
                    run.unread += 1
            self._segs[index] = seg
            self._disk_bytes += seg.size
        # fully acked segments (and empty ones) go; they form a prefix
        for index in list(self._segs):
            seg = self._segs[index]
            if seg.last_seq is None or (acked is not None and seg.last_seq <= acked):
                self._retire_segment(seg)
        if run is not None:
            self._runs.append(run)
            self._count = self._unread = run.count
        if prev_seq is not None and (self._last_seq is None or prev_seq > self._last_seq):
            self._last_seq = prev_seq
        if self._segs:
            last = next(reversed(self._segs.values()))
            if last.size < self.segment_size:
                self._active = last
                self._wfd = os.open(last.path, os.O_WRONLY | os.O_CLOEXEC)
        if self._count:
            self._stat["recovered"] = self._count

    def _scan_segment(self, seg, is_last):
        """[(offset, seq, length)] of the records of one segment; a torn tail
        of the last segment is truncated away, anything else damaged raises."""
        records: list = []
        fd = os.open(seg.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fsize = os.fstat(fd).st_size
            head = os.pread(fd, SEGMENT_HEADER_SIZE, 0)
            decoded = decode_segment_header(head)
            if decoded is None or decoded[0] != seg.index:
                # a crash while the segment was started: short, zeros, or a
                # recycled file still under its older header
                started = (len(head) < SEGMENT_HEADER_SIZE or head.count(0) == len(head)
                           or decoded is not None)
                if not (is_last and started):
                    raise QueueCorrupt(f"{seg.path}: bad segment header at offset 0")
                self._stat["torn_bytes"] += fsize
                seg.size = 0
                return records
            seg.recycled = bool(decoded[1] & FLAG_RECYCLED)
            off = SEGMENT_HEADER_SIZE
            while off < fsize:
                damage = self._check_record(fd, off, fsize, seg)
                if damage is None:
                    seq, length = self._scan_ok
                    records.append((off, seq, length))
                    off += HEADER_SIZE + length
                    continue
                torn, what = damage
                if is_last and torn:
                    os.ftruncate(fd, off)
                    os.fsync(fd)
                    self._stat["torn_bytes"] += fsize - off
                    fsize = off
                    break
                raise QueueCorrupt(f"{seg.path}: {what} at offset {off}")
            seg.size = fsize
        finally:
            os.close(fd)
        return records

    def _check_record(self, fd, off, fsize, seg):
        """None if the record at ``off`` is whole (its (seq, length) left in
        self._scan_ok), else (looks_torn, what is wrong)."""
        if fsize - off < HEADER_SIZE:
            return True, f"truncated record header ({fsize - off} of {HEADER_SIZE} bytes)"
        header = os.pread(fd, HEADER_SIZE, off)
        decoded = decode_header(header, seg.index)
        if decoded is None:
            torn = (self._no_record_after(fd, off, fsize, seg.index) if seg.recycled
                    else self._zero_from(fd, off, fsize))
            return torn, "bad record header (magic or check)"
        seq, length, body_check = decoded
        end = off + HEADER_SIZE + length
        if end > fsize:
            return True, f"record of {length} bytes runs past the end of the segment ({fsize})"
        check = xxhash.xxh3_64(seed=seq)
        pos = off + HEADER_SIZE
        while pos < end:
            chunk = os.pread(fd, min(1 << 20, end - pos), pos)
            check.update(chunk)
            pos += len(chunk)
        if check.intdigest() != body_check:
            if seg.recycled:
                torn = self._no_record_after(fd, off, fsize, seg.index)
            else:
                # a crash after the file grew but before its last page
                # reached the disk leaves zeros there: that is torn
                tail_from = max(off + HEADER_SIZE, (end - 1) // PAGE * PAGE)
                torn = end == fsize and self._zero_from(fd, tail_from, fsize)
            return torn, f"payload checksum mismatch in record seq {seq}"
        self._scan_ok = (seq, length)
        return None

    @staticmethod
    def _zero_from(fd, off, fsize):
        while off < fsize:
            chunk = os.pread(fd, min(1 << 20, fsize - off), off)
            if not chunk or chunk.count(0) != len(chunk):
                return False
            off += len(chunk)
        return True

    @staticmethod
    def _no_record_after(fd, off, fsize, index):
        """True when no valid record header of segment ``index`` starts
        anywhere in (off, fsize): what follows a damaged record is left over
        from the file's older life, not data of this segment."""
        step = 1 << 20
        pos = off + 1
        while pos < fsize:
            chunk = os.pread(fd, min(step + HEADER_SIZE - 1, fsize - pos), pos)
            at = chunk.find(RECORD_MAGIC)
            while 0 <= at <= step - 1:
                if at + HEADER_SIZE <= len(chunk):
                    if decode_header(chunk[at:at + HEADER_SIZE], index) is not None:
                        return False
                at = chunk.find(RECORD_MAGIC, at + 1)
            pos += step
        return True

    def _load_ack(self):
        path = os.path.join(self.spill_dir, ACK_NAME)
        try:
            with open(path, "rb") as f:
                data = f.read(2 * ACK_SLOT_SIZE)
        except FileNotFoundError:
            return
        best = None
        for i in (0, 1):
            slot = _decode_ack(data[i * ACK_SLOT_SIZE:(i + 1) * ACK_SLOT_SIZE])
            if slot is not None and (best is None or slot[0] > best[0]):
                best = slot
        if best is None:
            if data.count(0) != len(data):
                raise QueueCorrupt(f"{path}: no valid ack slot at offset 0 or {ACK_SLOT_SIZE}")
            return
        self._ack_generation, self._acked_seq = best
        self._last_seq = self._acked_seq

    # ------------------------------------------------------------ segment log

    def _seg_path(self, index):
        return os.path.join(self.spill_dir, f"{index:016x}{SEGMENT_SUFFIX}")

    def _retire_segment(self, seg):
        """A fully acked segment leaves the log: kept as a spare for reuse
        (its pages are cached and allocated) or deleted."""
        if seg is self._active:
            os.close(self._wfd)
            self._wfd = -1
            self._active = None
        if self._rfd_index == seg.index:
            os.close(self._rfd)
            self._rfd = -1
            self._rfd_index = -1
        del self._segs[seg.index]
        self._disk_bytes -= seg.size
        if len(self._spares) < self.spare_segments:
            spare = os.path.join(self.spill_dir, f"{seg.index:016x}{SPARE_SUFFIX}")
            os.rename(seg.path, spare)
            self._spares.append((seg.index, spare))
        else:
            os.unlink(seg.path)

    def _fsync_dir(self):
        dfd = os.open(self.spill_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _finish_active(self):
        """Close the segment being appended to; a recycled file loses the
        older bytes past its end, so only whole segments precede the last."""
        seg = self._active
        assert seg is not None, "no active segment to finish"
        if seg.recycled:
            os.ftruncate(self._wfd, seg.size)
        if self.fsync != "none":
            os.fsync(self._wfd)
        os.close(self._wfd)
        self._wfd = -1
        self._active = None

    def _start_segment(self):
        """Make the next segment the active one: a spare renamed (cheap to
        overwrite) or a new file. Raises QueueFull when there is no room."""
        index = self._next_index
        path = self._seg_path(index)
        recycled = False
        while self._spares and not recycled:
            _, spare = self._spares.pop()
            try:
                os.rename(spare, path)
                recycled = True
            except FileNotFoundError:
                pass
        try:
            flags = os.O_WRONLY | os.O_CLOEXEC
            fd = os.open(path, flags if recycled else flags | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
            try:
                os.pwrite(fd, encode_segment_header(index, recycled), 0)
            except OSError:
                os.close(fd)
                os.unlink(path)
                raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise QueueFull(f"no space left in {self.spill_dir} for a new "
                                f"segment: {exc.strerror}") from None
            raise
        if self.fsync != "none":
            self._fsync_dir()
        seg = _Segment(index, path)
        seg.size = SEGMENT_HEADER_SIZE
        seg.recycled = recycled
        self._next_index = index + 1
        self._segs[index] = seg
        self._active = seg
        self._wfd = fd
        self._disk_bytes += SEGMENT_HEADER_SIZE
        return seg

    def _check_space(self, need):
        if self._disk_bytes + need > self.disk_limit:
            raise QueueFull(f"queue disk limit reached in {self.spill_dir}: "
                            f"{self._disk_bytes} B on disk + {need} B to write "
                            f"> disk_limit {self.disk_limit} B")
        if not self.min_free_bytes:
            return
        if (self._free_estimate is None
                or self._written_since_statvfs >= FREE_CHECK_INTERVAL
                or self._free_estimate - need < self.min_free_bytes):
            st = os.statvfs(self.spill_dir)
            self._free_estimate = st.f_bavail * st.f_frsize
            self._written_since_statvfs = 0
            self._stat["statvfs"] += 1
        if self._free_estimate - need < self.min_free_bytes:
            raise QueueFull(f"free space minimum reached in {self.spill_dir}: "
                            f"{self._free_estimate} B free - {need} B record "
                            f"< min_free_bytes {self.min_free_bytes} B")

    def _append(self, seq, frame):
        """Append one record; returns its (segment index, offset). Raises
        QueueFull (limits, no space) with nothing written."""
        need = HEADER_SIZE + len(frame)
        seg = self._active
        rotate = seg is not None and seg.size > SEGMENT_HEADER_SIZE and seg.size + need > self.segment_size
        new_segment = seg is None or rotate
        self._check_space(need + (SEGMENT_HEADER_SIZE if new_segment else 0))
        if rotate:
            self._finish_active()
        if new_segment:
            seg = self._start_segment()
        assert seg is not None
        off = seg.size
        header = encode_header(seq, frame, seg.index)
        try:
            record = memoryview(header + frame)
            done = 0
            while done < need:    # a short write means "no room for the rest"
                written = os.pwrite(self._wfd, record[done:], off + done)
                if written == 0:
                    raise OSError(errno.EIO, f"no progress writing {need} bytes")
                done += written
            if self.fsync == "always":
                os.fdatasync(self._wfd)
        except OSError as exc:
            os.ftruncate(self._wfd, off)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise QueueFull(f"no space left in {self.spill_dir} writing a "
                                f"{need} B record: {exc.strerror}") from None
            raise
        seg.size += need
        if seg.first_seq is None:
            seg.first_seq = seq
        seg.last_seq = seq
        self._disk_bytes += need
        if self._free_estimate is not None:
            self._free_estimate -= need
            self._written_since_statvfs += need
        return seg.index, off

    def _read_fd(self, index):
        if self._rfd_index != index:
            if self._rfd >= 0:
                os.close(self._rfd)
                self._rfd = -1
            self._rfd = os.open(self._segs[index].path, os.O_RDONLY | os.O_CLOEXEC)
            self._rfd_index = index
        return self._rfd

    def _normalize(self, pos):
        index, off = pos
        while off >= self._segs[index].size and index + 1 in self._segs:
            index, off = index + 1, SEGMENT_HEADER_SIZE
        return index, off

    def _read_header(self, pos):
        index, off = pos
        header = os.pread(self._read_fd(index), HEADER_SIZE, off)
        decoded = decode_header(header, index) if len(header) == HEADER_SIZE else None
        if decoded is None:
            raise QueueCorrupt(f"{self._segs[index].path}: bad record header at offset {off}")
        return decoded

    def _read_record(self, pos):
        """(seq, frame, next position) of the record at ``pos``."""
        index, off = pos = self._normalize(pos)
        seq, length, body_check = self._read_header(pos)
        frame = os.pread(self._rfd, length, off + HEADER_SIZE)
        if len(frame) != length or _xxh3(frame, seq) != body_check:
            raise QueueCorrupt(f"{self._segs[index].path}: payload checksum mismatch "
                               f"in record seq {seq} at offset {off}")
        self._stat["disk_reads"] += 1
        return seq, frame, (index, off + HEADER_SIZE + length)

    def _skip_record(self, pos):
        """(seq, next position) of the record at ``pos``, header only."""
        index, off = pos = self._normalize(pos)
        seq, length, _ = self._read_header(pos)
        return seq, (index, off + HEADER_SIZE + length)

    def _write_ack(self):
        generation = self._ack_generation + 1
        if self._ack_fd < 0:
            self._ack_fd = os.open(os.path.join(self.spill_dir, ACK_NAME),
                                   os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
        assert self._acked_seq is not None, "an ack is written after one was made"
        os.pwrite(self._ack_fd, _encode_ack(generation, self._acked_seq),
                  (generation & 1) * ACK_SLOT_SIZE)
        if self.fsync == "always":
            os.fdatasync(self._ack_fd)
        self._ack_generation = generation

    # ------------------------------------------------------------ public API

    def put(self, seq, frame):
        """Append ``frame`` (bytes, bytearray, memoryview, ...) with sequence
        number ``seq``, strictly above every earlier one. In memory while it
        fits ``memory_limit`` and no unread item waits on disk; else appended
        to the segment log. Durable queues write every item through."""
        _check_seq(seq)
        if type(frame) is not bytes:      # a private, immutable copy
            frame = bytes(memoryview(frame).cast("B"))
        n = len(frame)
        if n > MAX_FRAME:
            raise ValueError(f"frame of {n} bytes is larger than the {MAX_FRAME} byte maximum")
        with self._cond:
            if self._closed:
                raise QueueClosed(f"put on a closed queue ({self.spill_dir})")
            if self._last_seq is not None and seq <= self._last_seq:
                raise ValueError(f"put seq {seq} is not above the last seq {self._last_seq}")
            last = self._runs[-1] if self._runs else None
            to_memory = (self._mem_bytes + n <= self.memory_limit
                         and (last is None or isinstance(last, _MemRun) or last.unread == 0)
                         and (self.budget is None or self.budget.try_reserve(n)))
            pos = None
            if self.durable or not to_memory:
                try:
                    pos = self._append(seq, frame)
                except BaseException:
                    if to_memory and self.budget is not None:
                        self.budget.release(n)
                    raise
            if to_memory:
                if not isinstance(last, _MemRun):
                    last = _MemRun()
                    self._runs.append(last)
                last.pending.append((seq, frame))
                self._mem_bytes += n
            else:
                self._stat["spilled"] += 1
                if isinstance(last, _DiskRun) and last.unread:
                    last.last_seq = seq
                    last.count += 1
                    last.unread += 1
                else:
                    self._runs.append(_DiskRun(pos, seq))
            self._count += 1
            self._unread += 1
            self._last_seq = seq
            self._stat["puts"] += 1
            self._cond.notify()

    def get(self, timeout=None):
        """The next item not handed out yet, as ``(seq, frame bytes)``;
        waits up to ``timeout`` seconds (None: forever) and returns None when
        nothing came. Raises QueueClosed when the queue is closed."""
        with self._cond:
            if not self._unread:
                deadline = None if timeout is None else time.monotonic() + timeout
                while not self._unread:
                    if self._closed:
                        raise QueueClosed(f"get on a closed queue ({self.spill_dir})")
                    if self._woken:
                        self._woken = False
                        return None
                    if deadline is None:
                        self._cond.wait()
                    else:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return None
                        self._cond.wait(left)
            if self._closed:
                raise QueueClosed(f"get on a closed queue ({self.spill_dir})")
            self._woken = False         # the caller looks around again after this item
            for run in self._runs:
                if run.unread:
                    break
            if isinstance(run, _MemRun):
                item = run.pending.popleft()
                run.handed.append(item)
            else:
                seq, frame, run.read = self._read_record(run.read)
                run.last_read_seq = seq
                run.unread -= 1
                item = (seq, frame)
            self._unread -= 1
            self._stat["gets"] += 1
            return item

    def wake(self):
        """The get() waiting now, or else the next one, returns at once (None
        when no item is there): its caller has something besides the queue
        to look at (a consumer that waits long when idle is told so)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def ack(self, seq):
        """Drop every item with sequence <= ``seq`` (handed out or not): frees
        their memory, deletes fully acked segment files, persists the ack."""
        _check_seq(seq)
        with self._cond:
            if self._closed:
                raise QueueClosed(f"ack on a closed queue ({self.spill_dir})")
            if self._acked_seq is not None and seq <= self._acked_seq:
                return
            if self._last_seq is None or seq > self._last_seq:
                raise ValueError(f"ack seq {seq} is beyond the last put seq {self._last_seq}")
            runs = self._runs
            freed = 0
            while runs:
                run = runs[0]
                if isinstance(run, _MemRun):
                    for dq, unread in ((run.handed, False), (run.pending, True)):
                        while dq and dq[0][0] <= seq:
                            freed += len(dq.popleft()[1])
                            self._count -= 1
                            self._unread -= unread
                    if freed:
                        self._mem_bytes -= freed
                        if self.budget is not None:
                            self.budget.release(freed)
                        freed = 0
                    if run.count:
                        break
                    runs.popleft()
                    continue
                if seq >= run.last_seq:
                    self._count -= run.count
                    self._unread -= run.unread
                    runs.popleft()
                    continue
                self._ack_inside(run, seq)
                break
            self._acked_seq = seq
            if self.durable or self._segs:
                self._write_ack()
            for seg in list(self._segs.values()):
                if seg.last_seq is None or seg.last_seq > seq:
                    break
                if seg is self._active and (seg.size < min(RECYCLE_MIN, self.segment_size)
                                            or len(self._spares) >= self.spare_segments):
                    break       # keep appending: cheaper than renaming or a new file
                self._retire_segment(seg)
            self._stat["acks"] += 1

    def _ack_inside(self, run, seq):
        """Ack a prefix of a disk run ending before its last record."""
        if seq < run.first_seq:
            return
        handed = run.count - run.unread
        if run.last_read_seq is None or seq >= run.last_read_seq:
            # everything handed out goes (or nothing was: then read is the
            # start): walk on from the read position
            run.count -= handed
            self._count -= handed
            pos = run.read
            while True:
                rseq, nxt = self._skip_record(pos)
                if rseq > seq:
                    break
                pos = nxt
                run.count -= 1
                run.unread -= 1
                self._count -= 1
                self._unread -= 1
            # normalized now: the segment it ends may be deleted below
            run.start = run.read = self._normalize(pos)
            run.first_seq = rseq
            run.last_read_seq = None
        else:
            # the ack ends among the records handed out: walk from the start
            pos = run.start
            while True:
                rseq, nxt = self._skip_record(pos)
                if rseq > seq:
                    break
                pos = nxt
                run.count -= 1
                self._count -= 1
            run.start = self._normalize(pos)
            run.first_seq = rseq

    def sync(self):
        """Make every record put so far and the persisted acks durable now,
        whatever the fsync policy (the target's durable watermark): the
        active segment, the ack file, the directory (and, with fsync
        "none", every segment). Returns the last seq it covers (None
        before any put)."""
        with self._cond:
            if self._closed:
                raise QueueClosed(f"sync of a closed queue ({self.spill_dir})")
            if self._wfd >= 0:
                os.fsync(self._wfd)
            if self.fsync == "none":
                for seg in self._segs.values():
                    fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            if self._ack_fd >= 0:
                os.fsync(self._ack_fd)
            self._fsync_dir()
            return self._last_seq

    def rewind(self):
        """Make the next get start again at the first unacked item."""
        with self._cond:
            if self._closed:
                raise QueueClosed(f"rewind on a closed queue ({self.spill_dir})")
            for run in self._runs:
                if isinstance(run, _MemRun):
                    run.pending.extendleft(reversed(run.handed))
                    run.handed.clear()
                else:
                    run.read = run.start
                    run.unread = run.count
                    run.last_read_seq = None
            self._unread = self._count
            self._stat["rewinds"] += 1
            if self._unread:
                self._cond.notify()

    def close(self):
        """Wake every waiter with QueueClosed, sync per the fsync policy and
        close the files. Segments stay for a later reopen."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            self._release_budget()
            try:
                if self._active is not None:
                    self._finish_active()
                if self.fsync != "none" and self._ack_fd >= 0:
                    os.fsync(self._ack_fd)
            finally:
                self._close_files()

    def _release_budget(self):
        """A closed queue hands nothing out again: its frames in memory are
        dropped now (not whenever the object goes) and their bytes go back
        to the budget; what is on disk stays for a reopen."""
        kept: collections.deque = collections.deque()
        for run in self._runs:
            if isinstance(run, _MemRun):
                self._count -= run.count
                self._unread -= run.unread
            else:
                kept.append(run)
        self._runs = kept
        if self.budget is not None and self._mem_bytes:
            self.budget.release(self._mem_bytes)
        self._mem_bytes = 0

    def _close_files(self):
        for name in ("_wfd", "_rfd", "_ack_fd", "_lock_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        self._active = None
        self._rfd_index = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self):
        return self._count

    # ------------------------------------------------------------ introspection

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def count(self) -> int:
        """Items not acked yet (handed out or not)."""
        return self._count

    @property
    def unread(self) -> int:
        """Items not handed out yet."""
        return self._unread

    @property
    def mem_bytes(self) -> int:
        """Frame bytes held in RAM."""
        return self._mem_bytes

    @property
    def disk_bytes(self) -> int:
        """Bytes of the segment files (records not deleted yet)."""
        return self._disk_bytes

    @property
    def first_seq(self):
        """Seq of the oldest unacked item, None when empty."""
        with self._cond:
            return self._first_seq()

    def _first_seq(self):
        if not self._runs:
            return None
        run = self._runs[0]
        return run.first_seq() if isinstance(run, _MemRun) else run.first_seq

    @property
    def last_seq(self):
        """Seq of the last item put (or recovered), None before any."""
        return self._last_seq

    @property
    def acked_seq(self):
        """Highest acked seq, None before any ack."""
        return self._acked_seq

    def stats(self) -> dict:
        """A snapshot for status tables."""
        with self._cond:
            return {
                "count": self._count,
                "unread": self._unread,
                "mem_bytes": self._mem_bytes,
                "disk_bytes": self._disk_bytes,
                "memory_limit": self.memory_limit,
                "disk_limit": self.disk_limit,
                "segments": len(self._segs),
                "spares": len(self._spares),
                "first_seq": self._first_seq(),
                "last_seq": self._last_seq,
                "acked_seq": self._acked_seq,
                "durable": self.durable,
                "fsync": self.fsync,
                "closed": self._closed,
                "puts": self._stat["puts"],
                "gets": self._stat["gets"],
                "acks": self._stat["acks"],
                "rewinds": self._stat["rewinds"],
                "spilled": self._stat["spilled"],
                "disk_reads": self._stat["disk_reads"],
                "recovered": self._stat["recovered"],
                "torn_bytes": self._stat["torn_bytes"],
            }

    def __repr__(self):
        return (f"<SpillQueue {self.spill_dir} count={self._count} mem={self._mem_bytes} "
                f"disk={self._disk_bytes}{' closed' if self._closed else ''}>")
