# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Spill-queue kernel: a byte-bounded FIFO of ``(seq, frame)`` items that
spills to append-only segment files, with checksummed records, persisted
acks and crash recovery.

Reference implementation with the same names and on-disk format (documented
there): ``smirror._memqueue_py``.

The record codec, the checksums, the segment appends (one pwritev of header +
payload) and the reads (through one preallocated, reused read buffer) run
with the GIL released; the deques of in-memory items and the condition
variable are ordinary Python objects.
"""
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memset, memcmp
from libc.errno cimport errno, EINTR, EIO, ENOSPC, EDQUOT
from posix.unistd cimport pread, pwrite, fdatasync, ftruncate, close as c_close
from posix.uio cimport iovec, pwritev, preadv
from posix.types cimport off_t
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE

import collections
import fcntl
import os
import threading
import time

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
RECYCLE_MIN = 1024 * 1024
ACK_NAME = "ack"
LOCK_NAME = "lock"
FSYNC_POLICIES = ("none", "segment", "always")
FREE_CHECK_INTERVAL = 64 * 1024 * 1024
PAGE = 4096

cdef enum:
    HDR = 32
    SEG_HDR = 32
    # fsync=segment: writeback of the active segment is started every this
    # many bytes, so its final fsync waits for little
    WRITEBACK_STEP = 8 * 1024 * 1024
    # records with this much payload left to read go straight into their
    # frame (one copy), with LOOKAHEAD bytes of what follows read alongside
    DIRECT_MIN = 16384
    LOOKAHEAD = 4096
    ACK_SLOT = 32
    PAGE_SIZE = 4096

# Payload checksums use the runtime-dispatched XXH3 of sm_xxhash.h (the one
# xxHash set-up of every kernel); short inputs (headers) use the inline XXH3.
cdef extern from "sm_xxhash.h":
    uint64_t SM_XXH3_64_SEED(const void* data, size_t length, uint64_t seed) noexcept nogil

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline void sm_put32(unsigned char* p, uint32_t v) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap32(v);
    #endif
        memcpy(p, &v, 4);
    }
    static inline void sm_put64(unsigned char* p, uint64_t v) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        memcpy(p, &v, 8);
    }
    static inline uint32_t sm_get32(const unsigned char* p) {
        uint32_t v; memcpy(&v, p, 4);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap32(v);
    #endif
        return v;
    }
    static inline uint64_t sm_get64(const unsigned char* p) {
        uint64_t v; memcpy(&v, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        return v;
    }
    """
    void sm_put32(unsigned char* p, uint32_t v) noexcept nogil
    void sm_put64(unsigned char* p, uint64_t v) noexcept nogil
    uint32_t sm_get32(const unsigned char* p) noexcept nogil
    uint64_t sm_get64(const unsigned char* p) noexcept nogil

# Start writeback of a byte range without waiting for it (Linux); elsewhere
# a no-op: the fsync at the end of the segment does all the work then.
cdef extern from *:
    """
    #if defined(__linux__)
    #  include <fcntl.h>
    static inline int sm_start_writeback(int fd, long long off, long long n) {
        return sync_file_range(fd, off, n, SYNC_FILE_RANGE_WRITE);
    }
    #else
    static inline int sm_start_writeback(int fd, long long off, long long n) {
        (void)fd; (void)off; (void)n;
        return 0;
    }
    #endif
    """
    int sm_start_writeback(int fd, long long off, long long n) noexcept nogil

cdef extern from "xxhash.h" nogil:
    ctypedef uint64_t XXH64_hash_t
    ctypedef struct XXH3_state_t:
        pass
    XXH64_hash_t XXH3_64bits(const void* data, size_t length)
    XXH64_hash_t XXH3_64bits_withSeed(const void* data, size_t length, XXH64_hash_t seed)
    XXH3_state_t* XXH3_createState()
    int XXH3_freeState(XXH3_state_t* state)
    int XXH3_64bits_reset_withSeed(XXH3_state_t* state, XXH64_hash_t seed)
    int XXH3_64bits_update(XXH3_state_t* state, const void* data, size_t length)
    XXH64_hash_t XXH3_64bits_digest(const XXH3_state_t* state)


# One whole record found by the segment scanner.
cdef struct RecordSpot:
    off_t off
    uint64_t seq
    uint32_t length


cdef const unsigned char* EMPTY = <const unsigned char*>b""


# ---------------------------------------------------------------- record codec

cdef void encode_header_c(unsigned char* header, uint64_t seq, const unsigned char* payload,
                          size_t length, uint64_t segment) noexcept nogil:
    memcpy(header, b"SMQR", 4)
    sm_put32(header + 4, <uint32_t>length)
    sm_put64(header + 8, seq)
    sm_put64(header + 16, SM_XXH3_64_SEED(payload, length, seq))
    sm_put64(header + 24, XXH3_64bits_withSeed(header, 24, segment))


cdef bint decode_header_c(const unsigned char* header, uint64_t segment, uint64_t* seq,
                          uint32_t* length, uint64_t* body_check) noexcept nogil:
    if memcmp(header, b"SMQR", 4) != 0:
        return False
    if XXH3_64bits_withSeed(header, 24, segment) != sm_get64(header + 24):
        return False
    length[0] = sm_get32(header + 4)
    seq[0] = sm_get64(header + 8)
    body_check[0] = sm_get64(header + 16)
    return True


cdef void encode_segment_header_c(unsigned char* out, uint64_t index, bint recycled) noexcept nogil:
    memcpy(out, b"SMQS", 4)
    out[4] = 1          # version, u16
    out[5] = 0
    out[6] = 1 if recycled else 0   # flags, u16
    out[7] = 0
    sm_put64(out + 8, index)
    sm_put64(out + 16, 0)
    sm_put64(out + 24, XXH3_64bits(out, 24))


cdef bint decode_segment_header_c(const unsigned char* h, uint64_t* index, uint32_t* flags) noexcept nogil:
    if memcmp(h, b"SMQS", 4) != 0 or h[4] != 1 or h[5] != 0:
        return False
    if XXH3_64bits(h, 24) != sm_get64(h + 24):
        return False
    index[0] = sm_get64(h + 8)
    flags[0] = h[6] | (<uint32_t>h[7] << 8)
    return True


cdef void encode_ack_c(unsigned char* slot, uint64_t generation, uint64_t acked) noexcept nogil:
    memcpy(slot, b"SMQA", 4)
    sm_put32(slot + 4, 0)
    sm_put64(slot + 8, generation)
    sm_put64(slot + 16, acked)
    sm_put64(slot + 24, XXH3_64bits(slot, 24))


cdef object _byte_buffer(object frame):
    """A 1-D unsigned-byte memoryview of any contiguous buffer (no copy)."""
    mv = memoryview(frame)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def encode_header(seq, payload, segment=0):
    """The 32-byte header of ``payload`` (any contiguous buffer) as a record
    of segment ``segment``."""
    cdef uint64_t s = _check_seq(seq)
    cdef uint64_t seg = _check_seq(segment, "segment")
    cdef const unsigned char[::1] keep = _byte_buffer(payload)
    cdef Py_ssize_t n = keep.shape[0]
    cdef const unsigned char* p = &keep[0] if n else EMPTY
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes is larger than the {MAX_FRAME} byte maximum")
    cdef unsigned char header[HDR]
    with nogil:
        encode_header_c(header, s, p, n, seg)
    return PyBytes_FromStringAndSize(<char*>header, HDR)


def encode_record(seq, payload, segment=0):
    """Header + payload, exactly as appended to segment ``segment``."""
    return encode_header(seq, payload, segment) + bytes(payload)


def encode_segment_header(index, recycled=False):
    """The 32-byte header a segment file starts with."""
    cdef unsigned char out[SEG_HDR]
    encode_segment_header_c(out, _check_seq(index, "index"), bool(recycled))
    return PyBytes_FromStringAndSize(<char*>out, SEG_HDR)


def decode_segment_header(header):
    """(index, flags) of a segment header, or None when it is not one."""
    cdef const unsigned char[::1] keep = _byte_buffer(header)
    cdef uint64_t index
    cdef uint32_t flags
    if keep.shape[0] != SEG_HDR or not decode_segment_header_c(&keep[0], &index, &flags):
        return None
    return index, flags


def decode_header(header, segment=0):
    """(seq, length, body_check) of a 32-byte record header of segment
    ``segment``, or None when its magic or head check is wrong."""
    cdef uint64_t seg = _check_seq(segment, "segment")
    cdef const unsigned char[::1] keep = _byte_buffer(header)
    cdef Py_ssize_t n = keep.shape[0]
    cdef const unsigned char* p = &keep[0] if n else EMPTY
    cdef uint64_t seq, body
    cdef uint32_t length
    if n != HDR:
        raise ValueError(f"a record header is {HDR} bytes, got {n}")
    if not decode_header_c(p, seg, &seq, &length, &body):
        return None
    return seq, length, body


cdef uint64_t _check_seq(object seq, str what="seq") except? 0:
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise TypeError(f"{what} must be an int, got {type(seq).__name__}")
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"{what} must be between 0 and 2**64-1, got {seq}")
    return <uint64_t>seq


# ---------------------------------------------------------------- raw file I/O

cdef int pwrite_record(int fd, const unsigned char* header, const unsigned char* payload,
                       size_t length, off_t off) noexcept nogil:
    """Write header + payload at ``off``; 0 or an errno."""
    cdef iovec iov[2]
    cdef ssize_t r
    cdef size_t done = 0, total = HDR + length
    while done < total:
        if done < HDR:
            iov[0].iov_base = <void*>(header + done)
            iov[0].iov_len = HDR - done
            iov[1].iov_base = <void*>payload
            iov[1].iov_len = length
            r = pwritev(fd, iov, 2 if length else 1, off + <off_t>done)
        else:
            r = pwrite(fd, payload + (done - HDR), total - done, off + <off_t>done)
        if r < 0:
            if errno == EINTR:
                continue
            return errno
        if r == 0:
            return EIO
        done += <size_t>r
    return 0


cdef ssize_t pread_full(int fd, unsigned char* buf, size_t n, off_t off) noexcept nogil:
    """Read up to n bytes (less only at end of file); bytes read or -errno."""
    cdef size_t done = 0
    cdef ssize_t r
    while done < n:
        r = pread(fd, buf + done, n - done, off + <off_t>done)
        if r < 0:
            if errno == EINTR:
                continue
            return -errno
        if r == 0:
            break
        done += <size_t>r
    return <ssize_t>done


cdef int zero_from_c(int fd, off_t off, off_t fsize, unsigned char* buf, size_t bufsize) noexcept nogil:
    """1 if every byte of [off, fsize) is zero, 0 if not, -errno."""
    cdef ssize_t r, i
    while off < fsize:
        r = pread_full(fd, buf, <size_t>min(<off_t>bufsize, fsize - off), off)
        if r < 0:
            return <int>r
        if r == 0:
            return 0
        for i in range(r):
            if buf[i]:
                return 0
        off += r
    return 1


cdef enum:
    SCAN_OK = 0
    SCAN_SHORT_HEADER = 1
    SCAN_BAD_HEADER = 2
    SCAN_PAST_END = 3
    SCAN_BAD_BODY = 4
    SCAN_IO = 5
    SCAN_NOMEM = 6


cdef struct ScanResult:
    RecordSpot* spots
    size_t n
    size_t cap
    off_t fail_off
    uint64_t fail_seq
    uint32_t fail_len
    int err


cdef int scan_c(int fd, off_t fsize, uint64_t segment, unsigned char* buf, size_t bufsize,
                XXH3_state_t* state, ScanResult* res) noexcept nogil:
    """Walk the records of a segment through ``buf``; every whole record is
    added to res.spots; returns SCAN_OK or what stopped the walk at
    res.fail_off."""
    cdef off_t off = SEG_HDR, end, pos, wbeg = 0
    cdef size_t wlen = 0, chunk
    cdef ssize_t r
    cdef uint64_t seq, body, check
    cdef uint32_t length
    cdef RecordSpot* grown
    while off < fsize:
        res.fail_off = off
        if fsize - off < HDR:
            return SCAN_SHORT_HEADER
        if not (off >= wbeg and off + HDR <= wbeg + <off_t>wlen):
            r = pread_full(fd, buf, <size_t>min(<off_t>bufsize, fsize - off), off)
            if r < HDR:
                res.err = <int>-r if r < 0 else EIO
                return SCAN_IO
            wbeg = off
            wlen = <size_t>r
        if not decode_header_c(buf + (off - wbeg), segment, &seq, &length, &body):
            return SCAN_BAD_HEADER
        res.fail_seq = seq
        res.fail_len = length
        end = off + HDR + length
        if end > fsize:
            return SCAN_PAST_END
        if end > wbeg + <off_t>wlen and HDR + <size_t>length <= bufsize:
            r = pread_full(fd, buf, <size_t>min(<off_t>bufsize, fsize - off), off)
            if r < <ssize_t>(HDR + length):
                res.err = <int>-r if r < 0 else EIO
                return SCAN_IO
            wbeg = off
            wlen = <size_t>r
        if end <= wbeg + <off_t>wlen:
            check = SM_XXH3_64_SEED(buf + (off + HDR - wbeg), length, seq)
        else:
            # larger than the buffer: stream it through
            XXH3_64bits_reset_withSeed(state, seq)
            pos = off + HDR
            while pos < end:
                chunk = <size_t>min(<off_t>bufsize, end - pos)
                r = pread_full(fd, buf, chunk, pos)
                if r < <ssize_t>chunk:
                    res.err = <int>-r if r < 0 else EIO
                    return SCAN_IO
                XXH3_64bits_update(state, buf, chunk)
                wbeg = pos
                wlen = chunk
                pos += <off_t>chunk
            check = XXH3_64bits_digest(state)
        if check != body:
            return SCAN_BAD_BODY
        if res.n == res.cap:
            grown = <RecordSpot*>realloc(res.spots, (res.cap * 2 + 64) * sizeof(RecordSpot))
            if grown == NULL:
                return SCAN_NOMEM
            res.spots = grown
            res.cap = res.cap * 2 + 64
        res.spots[res.n].off = off
        res.spots[res.n].seq = seq
        res.spots[res.n].length = length
        res.n += 1
        off = end
    return SCAN_OK


cdef int no_record_after_c(int fd, off_t off, off_t fsize, uint64_t segment,
                          unsigned char* buf, size_t bufsize) noexcept nogil:
    """1 when no valid record header of ``segment`` starts anywhere in
    (off, fsize): what follows a damaged record is left over from the file's
    older life. 0 when one does, -errno."""
    cdef size_t step = bufsize - HDR + 1
    cdef off_t pos = off + 1
    cdef ssize_t r, at
    cdef uint64_t seq, body
    cdef uint32_t length
    while pos < fsize:
        r = pread_full(fd, buf, <size_t>min(<off_t>bufsize, fsize - pos), pos)
        if r < 0:
            return <int>r
        if r == 0:
            break
        at = 0
        while at + HDR <= r and at < <ssize_t>step:
            if buf[at] == 0x53 and decode_header_c(buf + at, segment, &seq, &length, &body):
                return 0
            at += 1
        pos += <off_t>step
    return 1


cdef int _raise_os(int err, object path) except -1:
    raise OSError(err, os.strerror(err), path)


# ---------------------------------------------------------------- runs

cdef class _MemRun:
    """Consecutive items held in RAM (in durable mode: cached copies of
    records that are also in the segment log)."""
    cdef object handed      # deque of (seq, frame) handed out, not acked
    cdef object pending     # deque of (seq, frame) not handed out yet


    def __cinit__(self):
        self.handed = collections.deque()
        self.pending = collections.deque()


cdef class _DiskRun:
    """Consecutive records held only in the segment log."""
    cdef long long start_seg, read_seg
    cdef off_t start_off, read_off
    cdef uint64_t first_seq, last_seq, last_read_seq
    cdef bint has_last_read
    cdef long long count, unread


    def __cinit__(self, long long seg, off_t off, uint64_t seq):
        self.start_seg = self.read_seg = seg
        self.start_off = self.read_off = off
        self.first_seq = self.last_seq = seq
        self.count = self.unread = 1
        self.has_last_read = False


cdef class _Segment:
    cdef long long index
    cdef object path
    cdef off_t size
    cdef uint64_t first_seq, last_seq
    cdef bint has_seq
    cdef bint recycled          # the file may hold older bytes past `size`

    def __cinit__(self, long long index, object path):
        self.index = index
        self.path = path
        self.size = 0
        self.has_seq = False
        self.recycled = False


# ---------------------------------------------------------------- the budget

cdef long long _check_bytes(object n) except -1:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"a byte count must be an int, got {type(n).__name__}")
    if not 0 <= n < (1 << 62):
        raise ValueError(f"a byte count must be between 0 and 2**62-1, got {n}")
    return n


cdef class MemoryBudget:
    """Bytes of RAM shared by every queue (and large buffer) of one process.

    A queue keeps a frame in memory only when its own ``memory_limit`` and
    the budget both have room; past either it spills the frame to disk. The
    queue gives the bytes back when the frame is acknowledged (or the queue
    closed). ``peak`` is the most ever reserved at once; ``refused`` counts
    reservations turned down (each one a frame that went to disk instead).

    The counters change only in C code that holds the GIL and calls no
    Python in between: every change is atomic without a lock of its own.
    """
    cdef readonly long long limit
    cdef long long _used, _peak, _refused

    def __init__(self, limit):
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"memory budget limit must be an int, got {type(limit).__name__}")
        if not 0 <= limit < (1 << 62):
            raise ValueError(f"memory budget limit must be between 0 and 2**62-1, got {limit}")
        self.limit = limit

    cdef inline bint _reserve(self, long long n) noexcept:
        if self._used + n > self.limit:
            self._refused += 1
            return False
        self._used += n
        if self._used > self._peak:
            self._peak = self._used
        return True

    cdef int _release(self, long long n) except -1:
        if n > self._used:
            raise ValueError(f"memory budget: releasing {n} bytes, only {self._used} are reserved")
        self._used -= n
        return 0

    def try_reserve(self, n):
        """Take ``n`` bytes of the budget: True, or False (nothing taken)
        when they do not fit."""
        return self._reserve(_check_bytes(n))

    def release(self, n):
        """Give back ``n`` bytes taken with :meth:`try_reserve`."""
        self._release(_check_bytes(n))

    @property
    def used(self):
        return self._used

    @property
    def peak(self):
        return self._peak

    @property
    def available(self):
        return self.limit - self._used

    @property
    def refused(self):
        return self._refused

    def reset_peak(self):
        """Start measuring the peak again from what is reserved now."""
        self._peak = self._used

    def stats(self):
        return {"limit": self.limit, "used": self._used, "peak": self._peak,
                "refused": self._refused}

    def __repr__(self):
        return f"<MemoryBudget used={self._used} of {self.limit} peak={self._peak}>"


# ---------------------------------------------------------------- the queue

cdef class SpillQueue:
    """Byte-bounded FIFO of ``(seq, frame)`` items that spills to append-only
    segment files in ``spill_dir`` past ``memory_limit`` bytes of RAM and
    raises :class:`QueueFull` past ``disk_limit`` bytes of disk or when the
    volume has less than ``min_free_bytes`` free. Items stay until acked.

    One producer thread (put, ack) and one consumer thread (get) may use it
    at the same time. With a ``budget`` (a :class:`MemoryBudget` shared with
    other queues) a frame stays in memory only when the budget has room too.
    """
    cdef readonly object spill_dir
    cdef readonly MemoryBudget budget
    cdef readonly long long memory_limit, disk_limit, segment_size, min_free_bytes
    cdef readonly object fsync
    cdef readonly bint durable
    cdef readonly long long spare_segments
    cdef int fsync_mode                 # 0 none, 1 segment, 2 always
    cdef list _spares                   # [(old index, path)], last = hottest

    cdef object _cond, _lock, _runs
    cdef object _put_lock               # one put at a time; held across its write
    cdef bint _appending                # a record is being written outside _lock
    cdef int _sync_fd                   # finished segment still to fsync (put, outside _lock)
    cdef bint _sync_dir                 # a new segment's name still to fsync
    cdef off_t _writeback_from          # active segment: writeback started below this
    cdef dict _segs                     # index -> _Segment, oldest first
    cdef _Segment _active
    cdef bint _closed
    cdef bint _woken                    # wake() called: the next get() without an item returns
    cdef int _waiters
    cdef long long _count, _unread, _mem_bytes, _disk_bytes
    cdef int _wfd, _rfd, _ack_fd, _lock_fd
    cdef long long _rfd_index, _next_index
    cdef bint _has_last, _has_acked
    cdef uint64_t _last_seq, _acked_seq, _ack_generation
    cdef long long _free_estimate, _written_since_statvfs

    # the one bounded read buffer: bytes [_rbuf_off, _rbuf_off + _rbuf_len)
    # of segment _rbuf_seg
    cdef unsigned char* _rbuf
    cdef size_t _rbuf_size, _rbuf_len
    cdef bint _small_fill               # the last record came in directly
    cdef long long _rbuf_seg
    cdef off_t _rbuf_off

    cdef long long _n_puts, _n_gets, _n_acks, _n_rewinds, _n_spilled
    cdef long long _n_disk_reads, _n_recovered, _n_torn_bytes, _n_statvfs


    def __cinit__(self, *args, **kwargs):
        self._wfd = self._rfd = self._ack_fd = self._lock_fd = -1
        self._sync_fd = -1
        self._rbuf = NULL

    def __init__(self, spill_dir, memory_limit, disk_limit, *,
                 segment_size=64 * 1024 * 1024, min_free_bytes=0,
                 fsync="none", durable=False, read_buffer=1024 * 1024,
                 spare_segments=2, budget=None):
        for name, value, low in (("memory_limit", memory_limit, 0),
                                 ("disk_limit", disk_limit, 0),
                                 ("segment_size", segment_size, 1),
                                 ("min_free_bytes", min_free_bytes, 0),
                                 ("read_buffer", read_buffer, HDR),
                                 ("spare_segments", spare_segments, 0)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
            if value >= 1 << 62:
                raise ValueError(f"{name} must be < 2**62, got {value}")
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        if self._lock_fd >= 0:
            raise QueueError("SpillQueue.__init__ called twice")
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
        self.fsync_mode = FSYNC_POLICIES.index(fsync)
        self.durable = bool(durable)
        self.spare_segments = spare_segments
        self._spares = []

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._put_lock = threading.Lock()
        self._appending = False
        self._closed = False
        self._woken = False
        self._runs = collections.deque()
        self._segs = {}
        self._active = None
        self._rfd_index = -1
        self._next_index = 0
        self._has_last = self._has_acked = False
        self._ack_generation = 0
        self._free_estimate = -1
        self._rbuf_size = read_buffer
        # allocated and touched once, then reused for every read
        self._rbuf = <unsigned char*>malloc(self._rbuf_size)
        if self._rbuf == NULL:
            raise MemoryError(f"cannot allocate a {read_buffer} byte read buffer")
        memset(self._rbuf, 0, self._rbuf_size)
        self._rbuf_seg = -1
        self._small_fill = True

        private_dir(self.spill_dir)      # 0700: segments hold replicated files' contents
        self._lock_fd = os.open(os.path.join(self.spill_dir, LOCK_NAME),
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise QueueError(f"spill directory {self.spill_dir} is in use by another queue") from None
        try:
            self._recover()
        except BaseException:
            self._closed = True
            self._close_files()
            raise

    def __dealloc__(self):
        # a queue dropped without close(): release the descriptors
        for fd in (self._wfd, self._sync_fd, self._rfd, self._ack_fd, self._lock_fd):
            if fd >= 0:
                c_close(fd)
        if self._rbuf != NULL:
            free(self._rbuf)

    # ------------------------------------------------------------ recovery

    cdef _recover(self):
        cdef _Segment seg
        cdef _DiskRun run = None
        cdef uint64_t prev_seq = 0
        cdef bint has_prev = False
        cdef list spots
        self._load_ack()
        names = []
        spares = []
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
        last_pos = len(names) - 1
        for i, (index, name) in enumerate(names):
            seg = _Segment(index, os.path.join(self.spill_dir, name))
            spots = self._scan_segment(seg, i == last_pos)
            for off, seq, length in spots:
                if has_prev and seq <= prev_seq:
                    raise QueueCorrupt(f"{seg.path}: record at offset {off} has seq {seq}, "
                                       f"not above the previous record's {prev_seq}")
                prev_seq = seq
                has_prev = True
                if not seg.has_seq:
                    seg.first_seq = seq
                    seg.has_seq = True
                seg.last_seq = seq
                if self._has_acked and seq <= self._acked_seq:
                    continue
                if run is None:
                    run = _DiskRun(index, off, seq)
                else:
                    run.last_seq = seq
                    run.count += 1
                    run.unread += 1
            self._segs[index] = seg
            self._disk_bytes += seg.size
        # fully acked segments (and empty ones) go; they form a prefix
        for seg in list(self._segs.values()):
            if not seg.has_seq or (self._has_acked and seg.last_seq <= self._acked_seq):
                self._retire_segment(seg)
        if run is not None:
            self._runs.append(run)
            self._count = self._unread = run.count
            self._n_recovered = run.count
        if has_prev and (not self._has_last or prev_seq > self._last_seq):
            self._last_seq = prev_seq
            self._has_last = True
        if self._segs:
            seg = self._segs[next(reversed(self._segs))]
            if seg.size < self.segment_size:
                self._active = seg
                self._wfd = os.open(seg.path, os.O_WRONLY | os.O_CLOEXEC)

    cdef list _scan_segment(self, _Segment seg, bint is_last):
        """[(offset, seq, length)] of the records of one segment; a torn tail
        of the last segment is truncated away, anything else damaged raises."""
        cdef ScanResult res
        cdef int code, fd, zero = 0
        cdef off_t fsize, tail_from, end
        cdef XXH3_state_t* state = XXH3_createState()
        cdef bint torn, started, valid
        cdef size_t i
        cdef uint64_t head_index
        cdef uint32_t flags
        cdef ssize_t r
        cdef uint64_t index = seg.index
        if state == NULL:
            raise MemoryError()
        memset(&res, 0, sizeof(res))
        fd = os.open(seg.path, os.O_RDWR | os.O_CLOEXEC)
        self._rbuf_seg = -1    # the scan uses the read buffer
        try:
            fsize = os.fstat(fd).st_size
            with nogil:
                r = pread_full(fd, self._rbuf, SEG_HDR, 0)
            if r < 0:
                _raise_os(<int>-r, seg.path)
            valid = r == SEG_HDR and decode_segment_header_c(self._rbuf, &head_index, &flags)
            if not valid or head_index != index:
                # a crash while the segment was started: short, zeros, or a
                # recycled file still under its older header
                started = r < SEG_HDR or valid
                if not started:
                    started = True
                    for i in range(<size_t>SEG_HDR):
                        if self._rbuf[i]:
                            started = False
                            break
                if not (is_last and started):
                    raise QueueCorrupt(f"{seg.path}: bad segment header at offset 0")
                self._n_torn_bytes += fsize
                seg.size = 0
                return []
            seg.recycled = (flags & 1) != 0
            with nogil:
                code = scan_c(fd, fsize, index, self._rbuf, self._rbuf_size, state, &res)
            if code == SCAN_NOMEM:
                raise MemoryError(f"scanning {seg.path}")
            if code == SCAN_IO:
                _raise_os(res.err, seg.path)
            spots = [(res.spots[i].off, res.spots[i].seq, res.spots[i].length)
                     for i in range(res.n)]
            if code != SCAN_OK:
                if code == SCAN_SHORT_HEADER:
                    torn = True
                    what = f"truncated record header ({fsize - res.fail_off} of {HDR} bytes)"
                elif code == SCAN_PAST_END:
                    torn = True
                    what = (f"record of {res.fail_len} bytes runs past the end of the "
                            f"segment ({fsize})")
                elif seg.recycled:
                    # the tail holds the older life's bytes: torn when no
                    # record of this segment follows the damage
                    with nogil:
                        zero = no_record_after_c(fd, res.fail_off, fsize, index,
                                                 self._rbuf, self._rbuf_size)
                    if zero < 0:
                        _raise_os(-zero, seg.path)
                    torn = zero == 1
                    if code == SCAN_BAD_HEADER:
                        what = "bad record header (magic or check)"
                    else:
                        what = f"payload checksum mismatch in record seq {res.fail_seq}"
                elif code == SCAN_BAD_HEADER:
                    with nogil:
                        zero = zero_from_c(fd, res.fail_off, fsize, self._rbuf, self._rbuf_size)
                    if zero < 0:
                        _raise_os(-zero, seg.path)
                    torn = zero == 1
                    what = "bad record header (magic or check)"
                else:
                    # a crash after the file grew but before its last page
                    # reached the disk leaves zeros: torn; other damage is not
                    end = res.fail_off + HDR + res.fail_len
                    tail_from = max(res.fail_off + HDR, (end - 1) // PAGE_SIZE * PAGE_SIZE)
                    torn = False
                    if end == fsize:
                        with nogil:
                            zero = zero_from_c(fd, tail_from, fsize, self._rbuf, self._rbuf_size)
                        if zero < 0:
                            _raise_os(-zero, seg.path)
                        torn = zero == 1
                    what = f"payload checksum mismatch in record seq {res.fail_seq}"
                if not (is_last and torn):
                    raise QueueCorrupt(f"{seg.path}: {what} at offset {res.fail_off}")
                os.ftruncate(fd, res.fail_off)
                os.fsync(fd)
                self._n_torn_bytes += fsize - res.fail_off
                fsize = res.fail_off
            seg.size = fsize
            return spots
        finally:
            os.close(fd)
            free(res.spots)
            XXH3_freeState(state)
            self._rbuf_seg = -1

    cdef _load_ack(self):
        cdef const unsigned char* p
        cdef uint64_t gen, acked
        cdef bint found = False
        path = os.path.join(self.spill_dir, ACK_NAME)
        try:
            with open(path, "rb") as f:
                data = f.read(2 * ACK_SLOT_SIZE)
        except FileNotFoundError:
            return
        for i in range(2):
            slot = data[i * ACK_SLOT_SIZE:(i + 1) * ACK_SLOT_SIZE]
            if len(slot) != ACK_SLOT_SIZE:
                continue
            p = <const unsigned char*>PyBytes_AS_STRING(slot)
            if memcmp(p, b"SMQA", 4) != 0 or XXH3_64bits(p, 24) != sm_get64(p + 24):
                continue
            gen = sm_get64(p + 8)
            acked = sm_get64(p + 16)
            if not found or gen > self._ack_generation:
                self._ack_generation = gen
                self._acked_seq = acked
                found = True
        if not found:
            if data.count(0) != len(data):
                raise QueueCorrupt(f"{path}: no valid ack slot at offset 0 or {ACK_SLOT_SIZE}")
            return
        self._has_acked = True
        self._last_seq = self._acked_seq
        self._has_last = True

    # ------------------------------------------------------------ segment log

    cdef _retire_segment(self, _Segment seg):
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
        if self._rbuf_seg == seg.index:
            self._rbuf_seg = -1
        del self._segs[seg.index]
        self._disk_bytes -= seg.size
        if len(self._spares) < self.spare_segments:
            spare = os.path.join(self.spill_dir, f"{seg.index:016x}{SPARE_SUFFIX}")
            os.rename(seg.path, spare)
            self._spares.append((seg.index, spare))
        else:
            os.unlink(seg.path)

    cdef _fsync_dir(self):
        dfd = os.open(self.spill_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    cdef _finish_active(self, bint defer_sync=False):
        """Close the segment being appended to; a recycled file loses the
        older bytes past its end, so only whole segments precede the last.
        ``defer_sync``: leave the fsync (and close) to the put that rotated,
        after it let go of the lock, before it writes its record."""
        cdef _Segment seg = self._active
        if seg.recycled:
            os.ftruncate(self._wfd, seg.size)
        if self.fsync_mode and defer_sync:
            self._sync_fd = self._wfd
        else:
            if self.fsync_mode:
                os.fsync(self._wfd)
            os.close(self._wfd)
        self._wfd = -1
        self._active = None

    cdef _Segment _start_segment(self):
        """Make the next segment the active one: a spare renamed (cheap to
        overwrite) or a new file. Raises QueueFull when there is no room."""
        cdef long long index = self._next_index
        cdef bint recycled = False
        cdef _Segment seg
        path = os.path.join(self.spill_dir, f"{index:016x}{SEGMENT_SUFFIX}")
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
            if exc.errno in (ENOSPC, EDQUOT):
                raise QueueFull(f"no space left in {self.spill_dir} for a new "
                                f"segment: {exc.strerror}") from None
            raise
        if self.fsync_mode:
            self._sync_dir = True           # by the put, outside the lock
        seg = _Segment(index, path)
        seg.size = SEG_HDR
        self._writeback_from = 0
        seg.recycled = recycled
        self._next_index = index + 1
        self._segs[index] = seg
        self._active = seg
        self._wfd = fd
        self._disk_bytes += SEG_HDR
        return seg

    cdef _check_space(self, long long need):
        if self._disk_bytes + need > self.disk_limit:
            raise QueueFull(f"queue disk limit reached in {self.spill_dir}: "
                            f"{self._disk_bytes} B on disk + {need} B to write "
                            f"> disk_limit {self.disk_limit} B")
        if not self.min_free_bytes:
            return
        if (self._free_estimate < 0
                or self._written_since_statvfs >= FREE_CHECK_INTERVAL
                or self._free_estimate - need < self.min_free_bytes):
            st = os.statvfs(self.spill_dir)
            self._free_estimate = st.f_bavail * st.f_frsize
            self._written_since_statvfs = 0
            self._n_statvfs += 1
        if self._free_estimate - need < self.min_free_bytes:
            raise QueueFull(f"free space minimum reached in {self.spill_dir}: "
                            f"{self._free_estimate} B free - {need} B record "
                            f"< min_free_bytes {self.min_free_bytes} B")

    cdef _Segment _append_spot(self, long long need):
        """The segment the next record of ``need`` bytes goes to, at its
        current size (rotating, starting one). Raises QueueFull (limits, no
        space) with nothing written. Called with _lock and _put_lock held."""
        cdef _Segment seg = self._active
        cdef bint rotate, new_segment
        rotate = seg is not None and seg.size > SEG_HDR and seg.size + need > self.segment_size
        new_segment = seg is None or rotate
        self._check_space(need + (SEG_HDR if new_segment else 0))
        if rotate:
            self._finish_active(True)
        if new_segment:
            seg = self._start_segment()
        return seg

    cdef _sync_pending(self):
        """The fsyncs a rotation left to this put (outside _lock: gets and
        acks go on meanwhile), before its record is written."""
        cdef int fd = self._sync_fd
        if fd >= 0:
            self._sync_fd = -1
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if self._sync_dir:
            self._sync_dir = False
            self._fsync_dir()

    cdef _appended(self, _Segment seg, uint64_t seq, long long need):
        """Account for a record written at the end of ``seg``."""
        seg.size += need
        if not seg.has_seq:
            seg.first_seq = seq
            seg.has_seq = True
        seg.last_seq = seq
        self._disk_bytes += need
        if self._free_estimate >= 0:
            self._free_estimate -= need
            self._written_since_statvfs += need

    cdef int _read_fd(self, long long index) except -1:
        if self._rfd_index != index:
            if self._rfd >= 0:
                os.close(self._rfd)
                self._rfd = -1
            self._rfd = os.open((<_Segment>self._segs[index]).path, os.O_RDONLY | os.O_CLOEXEC)
            self._rfd_index = index
        return self._rfd

    cdef _normalize(self, long long* index, off_t* off):
        while off[0] >= (<_Segment>self._segs[index[0]]).size and (index[0] + 1) in self._segs:
            index[0] += 1
            off[0] = SEG_HDR

    cdef _header_at(self, long long index, off_t off, uint64_t* seq,
                    uint32_t* length, uint64_t* body_check, bint fill_buffer):
        """Decode the header at (index, off). With fill_buffer the read
        buffer is refilled from there when it does not hold the header."""
        cdef unsigned char small[HDR]
        cdef const unsigned char* h
        cdef ssize_t r
        cdef int fd = self._read_fd(index)
        # never buffer past the written end: a recycled file holds older
        # bytes there that later appends will overwrite
        cdef size_t want = <size_t>min(<off_t>self._rbuf_size,
                                       (<_Segment>self._segs[index]).size - off)
        if (self._rbuf_seg == index and off >= self._rbuf_off
                and off + HDR <= self._rbuf_off + <off_t>self._rbuf_len):
            h = self._rbuf + (off - self._rbuf_off)
        elif fill_buffer:
            if self._small_fill:
                want = min(want, <size_t>(HDR + LOOKAHEAD))
            with nogil:
                r = pread_full(fd, self._rbuf, want, off)
            if r < 0:
                _raise_os(<int>-r, (<_Segment>self._segs[index]).path)
            self._rbuf_seg = index
            self._rbuf_off = off
            self._rbuf_len = <size_t>r
            if r < HDR:
                self._rbuf_seg = -1
                raise QueueCorrupt(f"{(<_Segment>self._segs[index]).path}: truncated record "
                                   f"header at offset {off}")
            h = self._rbuf
        else:
            with nogil:
                r = pread_full(fd, small, HDR, off)
            if r < 0:
                _raise_os(<int>-r, (<_Segment>self._segs[index]).path)
            if r < HDR:
                raise QueueCorrupt(f"{(<_Segment>self._segs[index]).path}: truncated record "
                                   f"header at offset {off}")
            h = small
        if not decode_header_c(h, <uint64_t>index, seq, length, body_check):
            raise QueueCorrupt(f"{(<_Segment>self._segs[index]).path}: bad record header "
                               f"at offset {off}")

    cdef tuple _read_record(self, _DiskRun run):
        """Hand out the record at the run's read position and advance it."""
        cdef long long index = run.read_seg
        cdef off_t off = run.read_off, body_off
        cdef uint64_t seq, body_check, check
        cdef uint32_t length
        cdef ssize_t r = 0
        cdef int fd
        cdef char* dst
        cdef bint buffered
        cdef size_t want, have, rest, ahead, done
        cdef ssize_t r2
        cdef off_t seg_size
        cdef iovec iov[2]
        self._normalize(&index, &off)
        self._header_at(index, off, &seq, &length, &body_check, True)
        body_off = off + HDR
        frame = PyBytes_FromStringAndSize(NULL, length)
        dst = PyBytes_AS_STRING(frame)
        fd = self._rfd
        seg_size = (<_Segment>self._segs[index]).size
        want = <size_t>min(<off_t>self._rbuf_size, seg_size - off)
        # the buffer holds the header, so it reaches body_off
        have = <size_t>max(<off_t>0, min(<off_t>length, self._rbuf_off + <off_t>self._rbuf_len - body_off))
        buffered = True
        if have < length and (length - have >= DIRECT_MIN or HDR + <size_t>length > self._rbuf_size):
            # large: straight into the frame, and a look at what follows
            buffered = False
            rest = length - have
            ahead = <size_t>min(<off_t>min(<size_t>LOOKAHEAD, self._rbuf_size),
                                seg_size - (body_off + length))
            with nogil:
                memcpy(dst, self._rbuf + (body_off - self._rbuf_off), have)
                iov[0].iov_base = dst + have
                iov[0].iov_len = rest
                iov[1].iov_base = self._rbuf
                iov[1].iov_len = ahead
                r = preadv(fd, iov, 2 if ahead else 1, body_off + <off_t>have)
                while 0 <= r < <ssize_t>rest or (r < 0 and errno == EINTR):
                    # short read: finish the frame, forget the look-ahead
                    done = <size_t>r if r > 0 else 0
                    r2 = pread_full(fd, <unsigned char*>dst + have + done, rest - done,
                                    body_off + <off_t>(have + done))
                    r = -1 if r2 < 0 else <ssize_t>(done + <size_t>r2)
                    if r2 < 0 or <size_t>r2 < rest - done:
                        break
            if r < 0:
                self._rbuf_seg = -1
                _raise_os(errno, (<_Segment>self._segs[index]).path)
            if r < <ssize_t>rest:
                self._rbuf_seg = -1
                raise QueueCorrupt(f"{(<_Segment>self._segs[index]).path}: record seq {seq} "
                                   f"at offset {off} is cut short")
            self._rbuf_seg = index
            self._rbuf_off = body_off + length
            self._rbuf_len = <size_t>r - rest
        elif have < length:
            with nogil:
                r = pread_full(fd, self._rbuf, want, off)
            if r < 0:
                self._rbuf_seg = -1
                _raise_os(<int>-r, (<_Segment>self._segs[index]).path)
            self._rbuf_seg = index
            self._rbuf_off = off
            self._rbuf_len = <size_t>r
            if r < <ssize_t>(HDR + length):
                raise QueueCorrupt(f"{(<_Segment>self._segs[index]).path}: record seq {seq} "
                                   f"at offset {off} is cut short")
        # big records: fetch little around them; small ones: fill the buffer
        self._small_fill = length >= DIRECT_MIN
        with nogil:
            if buffered:
                memcpy(dst, self._rbuf + (body_off - self._rbuf_off), length)
            check = SM_XXH3_64_SEED(dst, length, seq)
        if check != body_check:
            raise QueueCorrupt(f"{(<_Segment>self._segs[index]).path}: payload checksum "
                               f"mismatch in record seq {seq} at offset {off}")
        run.read_seg = index
        run.read_off = body_off + length
        run.last_read_seq = seq
        run.has_last_read = True
        self._n_disk_reads += 1
        return (seq, frame)

    cdef _write_ack(self):
        cdef unsigned char slot[ACK_SLOT]
        cdef uint64_t generation = self._ack_generation + 1
        cdef ssize_t r
        cdef int fd
        if self._ack_fd < 0:
            self._ack_fd = os.open(os.path.join(self.spill_dir, ACK_NAME),
                                   os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
        fd = self._ack_fd
        encode_ack_c(slot, generation, self._acked_seq)
        with nogil:
            r = pwrite(fd, slot, ACK_SLOT, <off_t>((generation & 1) * ACK_SLOT))
            if r == ACK_SLOT and self.fsync_mode == 2 and fdatasync(fd) != 0:
                r = -1
        if r != ACK_SLOT:
            _raise_os(errno if r < 0 else EIO, os.path.join(self.spill_dir, ACK_NAME))
        self._ack_generation = generation

    # ------------------------------------------------------------ public API

    def put(self, seq, frame):
        """Append ``frame`` (bytes, bytearray, memoryview, ...) with sequence
        number ``seq``, strictly above every earlier one. In memory while it
        fits ``memory_limit`` and no unread item waits on disk; else appended
        to the segment log. Durable queues write every item through.

        The record is written (and fsynced, per the policy) outside the lock
        that get and ack take: a consumer goes on while a put writes."""
        cdef uint64_t s = _check_seq(seq)
        cdef const unsigned char[::1] keep
        cdef const unsigned char* data
        cdef Py_ssize_t n
        cdef object obj = None
        cdef object last
        cdef _MemRun mrun
        cdef _DiskRun drun
        cdef _Segment seg = None
        cdef off_t off = 0
        cdef bint to_memory, write
        cdef int err = 0, fd = -1
        cdef unsigned char header[HDR]
        if type(frame) is bytes:
            obj = frame
            data = <const unsigned char*>PyBytes_AS_STRING(frame)
            n = PyBytes_GET_SIZE(frame)
        else:
            keep = _byte_buffer(frame)
            n = keep.shape[0]
            data = &keep[0] if n else EMPTY
        if n > MAX_FRAME:
            raise ValueError(f"frame of {n} bytes is larger than the {MAX_FRAME} byte maximum")
        self._put_lock.acquire()
        try:
            self._lock.acquire()
            try:
                if self._closed:
                    raise QueueClosed(f"put on a closed queue ({self.spill_dir})")
                if self._has_last and s <= self._last_seq:
                    raise ValueError(f"put seq {s} is not above the last seq {self._last_seq}")
                last = self._runs[len(self._runs) - 1] if self._runs else None
                to_memory = (self._mem_bytes + n <= self.memory_limit
                             and (last is None or type(last) is _MemRun
                                  or (<_DiskRun>last).unread == 0)
                             and (self.budget is None or self.budget._reserve(n)))
                write = self.durable or not to_memory
                if write:
                    try:
                        seg = self._append_spot(HDR + <long long>n)
                    except BaseException:
                        if to_memory and self.budget is not None:
                            self.budget._release(n)
                        raise
                    off = seg.size
                    fd = self._wfd
                    # the active segment is not retired under this write
                    self._appending = True
            finally:
                self._lock.release()
            if write:
                try:
                    self._sync_pending()
                except BaseException:
                    self._lock.acquire()
                    self._appending = False
                    if to_memory and self.budget is not None:
                        self.budget._release(n)
                    self._lock.release()
                    raise
                with nogil:
                    encode_header_c(header, s, data, n, <uint64_t>seg.index)
                    err = pwrite_record(fd, header, data, n, off)
                    if err == 0 and self.fsync_mode == 2 and fdatasync(fd) != 0:
                        err = errno
                    if err:
                        ftruncate(fd, off)
                    elif (self.fsync_mode == 1
                          and off + HDR + n - self._writeback_from >= WRITEBACK_STEP):
                        # a hint: an error shows up again in the fsync
                        sm_start_writeback(fd, self._writeback_from,
                                           off + HDR + n - self._writeback_from)
                        self._writeback_from = off + HDR + n
            self._lock.acquire()
            try:
                self._appending = False
                if err and to_memory and self.budget is not None:
                    self.budget._release(n)
                if err:
                    if err == ENOSPC or err == EDQUOT:
                        raise QueueFull(f"no space left in {self.spill_dir} writing a "
                                        f"{HDR + n} B record: {os.strerror(err)}")
                    _raise_os(err, seg.path)
                if write:
                    self._appended(seg, s, HDR + <long long>n)
                # the runs may have moved (gets, acks) while the record was written
                last = self._runs[len(self._runs) - 1] if self._runs else None
                if to_memory:
                    if obj is None:
                        obj = PyBytes_FromStringAndSize(<const char*>data, n)
                    if type(last) is _MemRun:
                        mrun = <_MemRun>last
                    else:
                        mrun = _MemRun()
                        self._runs.append(mrun)
                    mrun.pending.append((seq, obj))
                    self._mem_bytes += n
                else:
                    self._n_spilled += 1
                    if type(last) is _DiskRun and (<_DiskRun>last).unread:
                        drun = <_DiskRun>last
                        drun.last_seq = s
                        drun.count += 1
                        drun.unread += 1
                    else:
                        self._runs.append(_DiskRun(seg.index, off, s))
                self._count += 1
                self._unread += 1
                self._last_seq = s
                self._has_last = True
                self._n_puts += 1
                if self._waiters:
                    self._cond.notify()
            finally:
                self._lock.release()
        finally:
            self._put_lock.release()

    def get(self, timeout=None):
        """The next item not handed out yet, as ``(seq, frame bytes)``;
        waits up to ``timeout`` seconds (None: forever) and returns None when
        nothing came. Raises QueueClosed when the queue is closed."""
        cdef object run
        cdef _MemRun mrun
        cdef _DiskRun drun
        cdef double deadline = 0, left
        self._lock.acquire()
        try:
            if not self._unread:
                if timeout is not None:
                    deadline = time.monotonic() + timeout
                while not self._unread:
                    if self._closed:
                        raise QueueClosed(f"get on a closed queue ({self.spill_dir})")
                    if self._woken:
                        self._woken = False
                        return None
                    self._waiters += 1
                    try:
                        if timeout is None:
                            self._cond.wait()
                        else:
                            left = deadline - time.monotonic()
                            if left <= 0:
                                return None
                            self._cond.wait(left)
                    finally:
                        self._waiters -= 1
            if self._closed:
                raise QueueClosed(f"get on a closed queue ({self.spill_dir})")
            self._woken = False         # the caller looks around again after this item
            for run in self._runs:
                if type(run) is _MemRun:
                    if (<_MemRun>run).pending:
                        break
                elif (<_DiskRun>run).unread:
                    break
            if type(run) is _MemRun:
                mrun = <_MemRun>run
                item = mrun.pending.popleft()
                mrun.handed.append(item)
            else:
                drun = <_DiskRun>run
                item = self._read_record(drun)
                drun.unread -= 1
            self._unread -= 1
            self._n_gets += 1
            return item
        finally:
            self._lock.release()

    def wake(self):
        """The get() waiting now, or else the next one, returns at once (None
        when no item is there): its caller has something besides the queue
        to look at (a consumer that waits long when idle is told so)."""
        self._lock.acquire()
        try:
            self._woken = True
            if self._waiters:
                self._cond.notify_all()
        finally:
            self._lock.release()

    def ack(self, seq):
        """Drop every item with sequence <= ``seq`` (handed out or not): frees
        their memory, deletes fully acked segment files, persists the ack."""
        cdef uint64_t s = _check_seq(seq)
        cdef object run
        cdef _MemRun mrun
        cdef _DiskRun drun
        cdef _Segment seg
        cdef long long freed = 0
        self._lock.acquire()
        try:
            if self._closed:
                raise QueueClosed(f"ack on a closed queue ({self.spill_dir})")
            if self._has_acked and s <= self._acked_seq:
                return
            if not self._has_last or s > self._last_seq:
                raise ValueError(f"ack seq {s} is beyond the last put seq "
                                 f"{self._last_seq if self._has_last else None}")
            runs = self._runs
            while runs:
                run = runs[0]
                if type(run) is _MemRun:
                    mrun = <_MemRun>run
                    dq = mrun.handed
                    while dq and dq[0][0] <= seq:
                        freed += len(dq.popleft()[1])
                        self._count -= 1
                    dq = mrun.pending
                    while dq and dq[0][0] <= seq:
                        freed += len(dq.popleft()[1])
                        self._count -= 1
                        self._unread -= 1
                    if freed:
                        self._mem_bytes -= freed
                        if self.budget is not None:
                            self.budget._release(freed)
                        freed = 0
                    if mrun.handed or mrun.pending:
                        break
                    runs.popleft()
                    continue
                drun = <_DiskRun>run
                if s >= drun.last_seq:
                    self._count -= drun.count
                    self._unread -= drun.unread
                    runs.popleft()
                    continue
                self._ack_inside(drun, s)
                break
            self._acked_seq = s
            self._has_acked = True
            if self.durable or self._segs:
                self._write_ack()
            for seg in list(self._segs.values()):
                if not seg.has_seq or seg.last_seq > s:
                    break
                if seg is self._active and (self._appending
                                            or seg.size < min(RECYCLE_MIN, self.segment_size)
                                            or len(self._spares) >= self.spare_segments):
                    break       # keep appending: cheaper than renaming or a new file
                self._retire_segment(seg)
            self._n_acks += 1
        finally:
            self._lock.release()

    cdef _ack_inside(self, _DiskRun run, uint64_t seq):
        """Ack a prefix of a disk run ending before its last record."""
        cdef long long index
        cdef off_t off
        cdef uint64_t rseq, body
        cdef uint32_t length
        cdef long long handed
        if seq < run.first_seq:
            return
        handed = run.count - run.unread
        if not run.has_last_read or seq >= run.last_read_seq:
            # everything handed out goes (or nothing was: then read is the
            # start): walk on from the read position
            run.count -= handed
            self._count -= handed
            index, off = run.read_seg, run.read_off
            while True:
                self._normalize(&index, &off)
                self._header_at(index, off, &rseq, &length, &body, False)
                if rseq > seq:
                    break
                off += HDR + length
                run.count -= 1
                run.unread -= 1
                self._count -= 1
                self._unread -= 1
            run.start_seg = run.read_seg = index
            run.start_off = run.read_off = off
            run.has_last_read = False
        else:
            # the ack ends among the records handed out: walk from the start
            index, off = run.start_seg, run.start_off
            while True:
                self._normalize(&index, &off)
                self._header_at(index, off, &rseq, &length, &body, False)
                if rseq > seq:
                    break
                off += HDR + length
                run.count -= 1
                self._count -= 1
            run.start_seg = index
            run.start_off = off
        run.first_seq = rseq

    def sync(self):
        """Make every record put so far and the persisted acks durable now,
        whatever the fsync policy (the target's durable watermark): the
        active segment, a finished one whose fsync a put still owes, the
        ack file, the directory (and, with fsync "none", every segment).
        Returns the last seq it covers (None before any put). Waits for a
        put whose record is being written; gets and acks go on."""
        cdef int fd
        cdef _Segment seg
        self._put_lock.acquire()
        try:
            self._lock.acquire()
            try:
                if self._closed:
                    raise QueueClosed(f"sync of a closed queue ({self.spill_dir})")
                last = self._last_seq if self._has_last else None
                fd = self._wfd
                paths = []
                if not self.fsync_mode:
                    for seg in self._segs.values():
                        paths.append(seg.path)
            finally:
                self._lock.release()
            # under _put_lock: the active segment is neither finished nor
            # closed meanwhile, and the ack file stays open until close
            self._sync_pending()
            if fd >= 0:
                os.fsync(fd)
            for path in paths:
                try:
                    sfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue            # retired meanwhile
                try:
                    os.fsync(sfd)
                finally:
                    os.close(sfd)
            if self._ack_fd >= 0:
                os.fsync(self._ack_fd)
            if not self.fsync_mode:
                self._fsync_dir()
            return last
        finally:
            self._put_lock.release()

    def rewind(self):
        """Make the next get start again at the first unacked item."""
        cdef _MemRun mrun
        cdef _DiskRun drun
        self._lock.acquire()
        try:
            if self._closed:
                raise QueueClosed(f"rewind on a closed queue ({self.spill_dir})")
            for run in self._runs:
                if type(run) is _MemRun:
                    mrun = <_MemRun>run
                    mrun.pending.extendleft(reversed(mrun.handed))
                    mrun.handed.clear()
                else:
                    drun = <_DiskRun>run
                    drun.read_seg = drun.start_seg
                    drun.read_off = drun.start_off
                    drun.unread = drun.count
                    drun.has_last_read = False
            self._unread = self._count
            self._n_rewinds += 1
            if self._unread and self._waiters:
                self._cond.notify()
        finally:
            self._lock.release()

    def close(self):
        """Wake every waiter with QueueClosed, sync per the fsync policy and
        close the files. Segments stay for a later reopen."""
        self._put_lock.acquire()        # after the write of a put under way
        try:
            self._close_locked()
        finally:
            self._put_lock.release()

    cdef _close_locked(self):
        self._lock.acquire()
        try:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            self._drop_memory()
            try:
                self._sync_pending()
                if self._active is not None:
                    self._finish_active()
                if self.fsync_mode and self._ack_fd >= 0:
                    os.fsync(self._ack_fd)
            finally:
                self._close_files()
        finally:
            self._lock.release()

    cdef _drop_memory(self):
        """A closed queue hands nothing out again: its frames in memory are
        dropped now (not whenever the object goes) and their bytes go back
        to the budget; what is on disk stays for a reopen."""
        cdef _MemRun mrun
        kept = collections.deque()
        for run in self._runs:
            if type(run) is _MemRun:
                mrun = <_MemRun>run
                self._count -= len(mrun.handed) + len(mrun.pending)
                self._unread -= len(mrun.pending)
            else:
                kept.append(run)
        self._runs = kept
        if self.budget is not None and self._mem_bytes:
            self.budget._release(self._mem_bytes)
        self._mem_bytes = 0

    cdef _close_files(self):
        if self._sync_fd >= 0:
            os.close(self._sync_fd)
            self._sync_fd = -1
        if self._wfd >= 0:
            os.close(self._wfd)
            self._wfd = -1
        if self._rfd >= 0:
            os.close(self._rfd)
            self._rfd = -1
        if self._ack_fd >= 0:
            os.close(self._ack_fd)
            self._ack_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        self._active = None
        self._rfd_index = -1
        self._rbuf_seg = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self):
        return self._count

    # ------------------------------------------------------------ introspection

    @property
    def closed(self):
        return self._closed

    @property
    def count(self):
        """Items not acked yet (handed out or not)."""
        return self._count

    @property
    def unread(self):
        """Items not handed out yet."""
        return self._unread

    @property
    def mem_bytes(self):
        """Frame bytes held in RAM."""
        return self._mem_bytes

    @property
    def disk_bytes(self):
        """Bytes of the segment files (records not deleted yet)."""
        return self._disk_bytes

    @property
    def first_seq(self):
        """Seq of the oldest unacked item, None when empty."""
        self._lock.acquire()
        try:
            return self._first_seq()
        finally:
            self._lock.release()

    cdef object _first_seq(self):
        if not self._runs:
            return None
        run = self._runs[0]
        if type(run) is _MemRun:
            mrun = <_MemRun>run
            return (mrun.handed or mrun.pending)[0][0]
        return (<_DiskRun>run).first_seq

    @property
    def last_seq(self):
        """Seq of the last item put (or recovered), None before any."""
        return self._last_seq if self._has_last else None

    @property
    def acked_seq(self):
        """Highest acked seq, None before any ack."""
        return self._acked_seq if self._has_acked else None

    def stats(self):
        """A snapshot for status tables."""
        self._lock.acquire()
        try:
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
                "last_seq": self._last_seq if self._has_last else None,
                "acked_seq": self._acked_seq if self._has_acked else None,
                "durable": self.durable,
                "fsync": self.fsync,
                "closed": self._closed,
                "puts": self._n_puts,
                "gets": self._n_gets,
                "acks": self._n_acks,
                "rewinds": self._n_rewinds,
                "spilled": self._n_spilled,
                "disk_reads": self._n_disk_reads,
                "recovered": self._n_recovered,
                "torn_bytes": self._n_torn_bytes,
            }
        finally:
            self._lock.release()

    def __repr__(self):
        return (f"<SpillQueue {self.spill_dir} count={self._count} mem={self._mem_bytes} "
                f"disk={self._disk_bytes}{' closed' if self._closed else ''}>")
