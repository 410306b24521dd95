# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Journal frame kernel: encode, validate and decode frames of ops.

The frame format (version 1) is documented at the top of
``smirror._journal_py``, the pure-Python reference with the same names.
Encoding reads each op tuple once with the GIL held, then writes the records
and computes the XXH3-64 checks with the GIL released; decoding validates the
whole payload with the GIL released before it builds a single Python object,
so a corrupt frame costs no allocation beyond its header check.
"""
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsUnsignedLongLong, PyLong_AsLongLong
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_GET_SIZE, PyTuple_GET_ITEM, PyTuple_SET_ITEM
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memchr, memcmp, memset

import lz4.block

from smirror.errors import FrameError
from smirror.ops import (
    AUTO_COMPRESS_MIN as _AUTO_COMPRESS_MIN, AUTO_SAMPLE as _AUTO_SAMPLE, FrameHeader, Op,
    OpKind,
)

__all__ = ["encode_frame", "decode_frame", "frame_header", "Encoder"]

cdef extern from *:
    """
    /* An instance of a tuple subclass (Op) with n empty slots, filled by the
       caller with PyTuple_SET_ITEM: what tuple.__new__(Op, t) does, minus
       the intermediate tuple. */
    static PyObject *smj_alloc_tuple_of(PyObject *type, Py_ssize_t n) {
        PyTypeObject *t = (PyTypeObject *)type;
        return t->tp_alloc(t, n);
    }

    /* base[start:start + n] for a 1-D, C-contiguous unsigned-byte memoryview
       base: a new view on the same managed buffer, as memory_subscript makes
       for a slice, without building the slice and index objects. */
    static PyObject *smj_subview(PyObject *base, Py_ssize_t start, Py_ssize_t n) {
        PyObject *mv = PyMemoryView_FromObject(base);
        Py_buffer *view;
        if (mv == NULL)
            return NULL;
        view = PyMemoryView_GET_BUFFER(mv);
        view->buf = (char *)view->buf + start;
        view->len = n;
        view->shape[0] = n;
        return mv;
    }
    """
    object smj_alloc_tuple_of(object type, Py_ssize_t n)
    object smj_subview(object base, Py_ssize_t start, Py_ssize_t n)
    bint PyBytes_Check(object o)
    bint PyBytes_CheckExact(object o)
    bint PyLong_Check(object o)
    bint PyTuple_Check(object o)
    unsigned long long smj_as_ull "PyLong_AsUnsignedLongLong"(object o) noexcept
    PyObject* PyErr_Occurred() noexcept
    void PyErr_Clear() noexcept

# -- format constants (mirrored in smirror.ops; the tests compare them) -----
cdef enum:
    HEADER_SIZE = 56
    HEADER_CHECKED = 48
    RECORD_HEAD_SIZE = 18
    FLAG_LZ4 = 1
    NKINDS = 15
    K_WRITE = 1
    K_TRUNCATE = 2
    K_CREATE = 3
    K_MKDIR = 4
    K_DELETE = 5
    K_RMDIR = 6
    K_RENAME = 7
    K_SETATTR = 8
    K_SYMLINK = 9
    K_HARDLINK = 10
    K_TASK = 11
    K_MARK = 12
    K_XATTR = 13
    K_MKNOD = 14
    X_REMOVE = 1            # XattrFlag.REMOVE
    R_EXCHANGE = 1          # RenameFlag.EXCHANGE
    MAX_XATTR_NAME = 255
    MAX_XATTR_VALUE = 65536
    TYPE_BITS = 0o170000
    S_FIFO = 0o010000
    S_CHR = 0o020000
    S_BLK = 0o060000
    S_SOCK = 0o140000
    M_MODE = 1
    M_UID = 2
    M_GID = 4
    M_MTIME = 8
    M_ALL = 15
    MAX_PATH = 0xFFFF
    MAX_MODE = 0o7777
    MAX_TREE_PATH = 4095    # tree paths and symlink targets (PATH_MAX with its NUL)
    NAME_MAX = 255          # one component of a tree path
    MAX_LABEL = 1024        # task name, mark label
    MAX_TASK_PAYLOAD = 65536
    MAX_MARK_PAYLOAD = 65536
    LZ4_MAX_RATIO = 256
    PATH_CACHE = 16         # path objects remembered as checked, per encode

cdef uint64_t MAX_PAYLOAD = 1 << 30
cdef uint64_t MAX_OFFSET = (<uint64_t>1 << 63) - 1
cdef uint32_t MAX_ID = 0xFFFFFFFE              # uid, gid (0xFFFFFFFF is chown's "unchanged")
cdef uint32_t MAGIC_LE = 0x464A4D53          # b"SMJF" read as little-endian u32
cdef Py_ssize_t AUTO_COMPRESS_MIN = _AUTO_COMPRESS_MIN
cdef Py_ssize_t AUTO_SAMPLE = _AUTO_SAMPLE
# What an Encoder keeps between calls (each pooled encoder at most ~10 MiB):
cdef Py_ssize_t SHRINK_ABOVE = 1 << 14       # op slots (72 bytes each)
cdef Py_ssize_t VIEWS_KEEP = 1 << 10         # held-buffer slots (80 bytes each)
cdef Py_ssize_t SCRATCH_KEEP = 8 << 20       # lz4 scratch bytes

# per-kind layout: fixed field bytes, path2 present, path2 is a tree path,
# data allowed, path is a tree path
#                     W  T  C  MD D  R  RN S   SL H  T  M  X  MN
cdef uint8_t FIXED_SIZE[15]
cdef bint HAS_PATH2[15]
cdef bint TREE_PATH2[15]
cdef bint HAS_DATA[15]
cdef bint TREE_PATH[15]
FIXED_SIZE[:] = [0, 8, 8, 4, 4, 0, 0, 0, 20, 0, 0, 0, 0, 0, 12]
HAS_PATH2[:] = [0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1, 0, 0, 1, 0]
TREE_PATH2[:] = [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0]
HAS_DATA[:] = [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0]
TREE_PATH[:] = [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1]

# Python objects the decoder hands out (borrowed into every op it builds)
cdef tuple KIND_OBJECTS = tuple([None] + [OpKind(k) for k in range(1, NKINDS)])
cdef object ZERO = 0
cdef bytes EMPTY = b""
cdef object lz4_compress = lz4.block.compress
cdef object lz4_decompress = lz4.block.decompress


# -- little-endian loads/stores (compile to single moves on x86) ------------

cdef inline uint16_t ld16(const unsigned char* p) noexcept nogil:
    return <uint16_t>p[0] | (<uint16_t>p[1] << 8)

cdef inline uint32_t ld32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))

cdef inline uint64_t ld64(const unsigned char* p) noexcept nogil:
    return <uint64_t>ld32(p) | (<uint64_t>ld32(p + 4) << 32)

cdef inline void st16(unsigned char* p, uint16_t v) noexcept nogil:
    p[0] = <unsigned char>v
    p[1] = <unsigned char>(v >> 8)

cdef inline void st32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>v
    p[1] = <unsigned char>(v >> 8)
    p[2] = <unsigned char>(v >> 16)
    p[3] = <unsigned char>(v >> 24)

cdef inline void st64(unsigned char* p, uint64_t v) noexcept nogil:
    st32(p, <uint32_t>v)
    st32(p + 4, <uint32_t>(v >> 32))


# -- path rules ---------------------------------------------------------------

cdef enum PathProblem:
    P_OK = 0
    P_NUL
    P_EMPTY
    P_ABSOLUTE
    P_DOTDOT
    P_NOT_EMPTY
    P_DOT
    P_EMPTY_NAME
    P_TOO_LONG
    P_LABEL_TOO_LONG
    P_NAME_TOO_LONG
    P_XATTR_TOO_LONG
    P_XATTR_NAMESPACE

PATH_PROBLEMS = {
    P_NUL: "contains a NUL byte", P_EMPTY: "is empty", P_ABSOLUTE: "is absolute",
    P_DOTDOT: "has a '..' component", P_NOT_EMPTY: "must be empty for this kind",
    P_DOT: "has a '.' component",
    P_EMPTY_NAME: "has an empty component ('//' or a trailing '/')",
    P_TOO_LONG: f"is longer than {MAX_TREE_PATH} bytes (PATH_MAX)",
    P_LABEL_TOO_LONG: f"is longer than {MAX_LABEL} bytes",
    P_NAME_TOO_LONG: f"has a name longer than {NAME_MAX} bytes (NAME_MAX)",
    P_XATTR_TOO_LONG: f"is longer than {MAX_XATTR_NAME} bytes (XATTR_NAME_MAX)",
    P_XATTR_NAMESPACE: "is not a name in the user., trusted., security. or system. namespace",
}


cdef inline bint has_prefix(const unsigned char* p, size_t n, const char* ns,
                            size_t k) noexcept nogil:
    """``p`` starts with the k bytes of ``ns`` and has more after them."""
    return n > k and memcmp(p, ns, k) == 0


cdef int xattr_name_problem(const unsigned char* p, size_t n) noexcept nogil:
    if memchr(p, 0, n) != NULL:
        return P_NUL
    if n > MAX_XATTR_NAME:
        return P_XATTR_TOO_LONG
    if (has_prefix(p, n, "user.", 5) or has_prefix(p, n, "trusted.", 8)
            or has_prefix(p, n, "security.", 9) or has_prefix(p, n, "system.", 7)):
        return P_OK
    return P_XATTR_NAMESPACE


cdef inline bint mknod_mode_ok(uint32_t mode) noexcept nogil:
    cdef uint32_t t = mode & TYPE_BITS
    return ((t == S_FIFO or t == S_CHR or t == S_BLK or t == S_SOCK)
            and (mode & ~(<uint32_t>TYPE_BITS)) <= MAX_MODE)


cdef inline bint mknod_rdev_ok(uint32_t mode, uint64_t rdev) noexcept nogil:
    cdef uint32_t t = mode & TYPE_BITS
    return rdev == 0 or (t != S_FIFO and t != S_SOCK)

# the component flags path_problem collects in its one pass
cdef enum:
    C_DOTDOT = 1
    C_DOT = 2
    C_EMPTY = 4
    C_LONG = 8

cdef inline int component_flags(const unsigned char* c, size_t n) noexcept nogil:
    if n == 0:
        return C_EMPTY
    if n == 1:
        return C_DOT if c[0] == b'.' else 0
    if n == 2:
        return C_DOTDOT if (c[0] == b'.' and c[1] == b'.') else 0
    return C_LONG if n > NAME_MAX else 0

cdef int path_problem(uint8_t kind, const unsigned char* p, size_t n,
                      bint second) noexcept nogil:
    """Why ``p`` cannot be the path (second=0) or path2 of ``kind``: the
    rules of smirror.ops; P_OK when it is fine."""
    cdef bint tree
    cdef int flags = 0
    cdef size_t i, start = 0
    cdef const unsigned char* nul
    if second:
        if not HAS_PATH2[kind]:
            return P_NOT_EMPTY if n else P_OK
        tree = TREE_PATH2[kind]
    else:
        tree = TREE_PATH[kind]
    if n == 0:
        return P_OK if (kind == K_MARK and not second) else P_EMPTY
    if second and kind == K_XATTR:
        return xattr_name_problem(p, n)
    if not tree:
        if memchr(p, 0, n) != NULL:
            return P_NUL
        if second:                          # a symlink target
            return P_TOO_LONG if n > MAX_TREE_PATH else P_OK
        return P_LABEL_TOO_LONG if n > MAX_LABEL else P_OK
    # one pass over a tree path: a NUL anywhere wins over everything else
    for i in range(n):
        if p[i] == 0:
            return P_NUL
        if p[i] == b'/':
            flags |= component_flags(p + start, i - start)
            start = i + 1
    flags |= component_flags(p + start, n - start)
    if n > MAX_TREE_PATH:
        return P_TOO_LONG
    if p[0] == b'/':
        return P_ABSOLUTE
    if flags:
        if flags & C_DOTDOT:
            return P_DOTDOT
        if flags & C_DOT:
            return P_DOT
        if flags & C_EMPTY:
            return P_EMPTY_NAME
        return P_NAME_TOO_LONG
    return P_OK


# -- nogil record validation ----------------------------------------------------

cdef enum RecordProblem:
    R_OK = 0
    R_TRUNCATED
    R_KIND
    R_SETATTR_MASK
    R_MASK_ON_OTHER
    R_FIRST_SEQ
    R_SEQ_ORDER
    R_NEED
    R_OFFSET_RANGE
    R_UNMASKED_FIELD
    R_MODE
    R_PATH              # value = PathProblem
    R_PATH2             # value = PathProblem
    R_DATA
    R_STRAY
    R_LAST_SEQ
    R_ID                # value = the uid or gid, other = 0 uid / 1 gid
    R_WRITE_END         # value = offset, other = data length
    R_PAYLOAD_SIZE      # value = data length, other = the kind's limit
    R_XATTR_FLAGS       # value = mask
    R_XATTR_REMOVE_DATA
    R_MKNOD_MODE        # value = mode
    R_MKNOD_RDEV        # value = rdev
    R_RENAME_FLAGS      # value = mask


cdef Py_ssize_t validate_records(const unsigned char* raw, Py_ssize_t raw_len,
                                 Py_ssize_t count, uint64_t first_seq,
                                 uint64_t last_seq, RecordError* err) noexcept nogil:
    """Check every record of a raw payload; returns 0, or -1 with ``err``
    filled. Every length is checked against what is left of the payload
    before anything is read."""
    cdef Py_ssize_t i, pos = 0, body, need, left
    cdef const unsigned char* r
    cdef uint8_t kind, mask
    cdef uint16_t path_len, path2_len
    cdef uint32_t data_len, mode, uid, gid
    cdef uint64_t seq, prev = 0, v
    cdef int problem
    for i in range(count):
        err.index = i
        err.pos = pos
        if raw_len - pos < RECORD_HEAD_SIZE:
            err.code = R_TRUNCATED
            return -1
        r = raw + pos
        kind = r[0]
        mask = r[1]
        path_len = ld16(r + 2)
        path2_len = ld16(r + 4)
        data_len = ld32(r + 6)
        seq = ld64(r + 10)
        err.seq = seq
        err.kind = kind
        if kind == 0 or kind >= NKINDS:
            err.code = R_KIND
            err.value = kind
            return -1
        if kind == K_SETATTR:
            if mask == 0 or mask > M_ALL:
                err.code = R_SETATTR_MASK
                err.value = mask
                err.pos = pos + 1
                return -1
        elif kind == K_XATTR:
            if mask > X_REMOVE:
                err.code = R_XATTR_FLAGS
                err.value = mask
                err.pos = pos + 1
                return -1
        elif kind == K_RENAME:
            if mask > R_EXCHANGE:
                err.code = R_RENAME_FLAGS
                err.value = mask
                err.pos = pos + 1
                return -1
        elif mask:
            err.code = R_MASK_ON_OTHER
            err.pos = pos + 1
            return -1
        if i == 0:
            if seq != first_seq:
                err.code = R_FIRST_SEQ
                err.value = seq
                err.other = first_seq
                err.pos = pos + 10
                return -1
        elif seq <= prev:
            err.code = R_SEQ_ORDER
            err.value = seq
            err.other = prev
            err.pos = pos + 10
            return -1
        prev = seq
        body = pos + RECORD_HEAD_SIZE
        need = <Py_ssize_t>FIXED_SIZE[kind] + path_len + path2_len + data_len
        left = raw_len - body
        if need > left:
            err.code = R_NEED
            err.value = <uint64_t>need
            err.other = <uint64_t>left
            err.pos = pos + 2
            return -1
        mode = 0
        if kind == K_WRITE or kind == K_TRUNCATE:
            v = ld64(raw + body)
            if v > MAX_OFFSET:
                err.code = R_OFFSET_RANGE
                err.value = v
                err.pos = body
                return -1
            if kind == K_WRITE and v + data_len > MAX_OFFSET:
                err.code = R_WRITE_END
                err.value = v
                err.other = data_len
                err.pos = body
                return -1
        elif kind == K_CREATE or kind == K_MKDIR:
            mode = ld32(raw + body)
        elif kind == K_SETATTR:
            mode = ld32(raw + body)
            uid = ld32(raw + body + 4)
            gid = ld32(raw + body + 8)
            v = ld64(raw + body + 12)
            err.code = R_UNMASKED_FIELD
            if not (mask & M_MODE) and mode:
                err.pos = body
                return -1
            if not (mask & M_UID) and uid:
                err.pos = body + 4
                return -1
            if not (mask & M_GID) and gid:
                err.pos = body + 8
                return -1
            if not (mask & M_MTIME) and v:
                err.pos = body + 12
                return -1
            err.code = R_ID
            if uid > MAX_ID:
                err.value = uid
                err.other = 0
                err.pos = body + 4
                return -1
            if gid > MAX_ID:
                err.value = gid
                err.other = 1
                err.pos = body + 8
                return -1
        elif kind == K_MKNOD:
            mode = ld32(raw + body)
            v = ld64(raw + body + 4)
            if not mknod_mode_ok(mode):
                err.code = R_MKNOD_MODE
                err.value = mode
                err.pos = body
                return -1
            if not mknod_rdev_ok(mode, v):
                err.code = R_MKNOD_RDEV
                err.value = v
                err.pos = body
                return -1
            mode = 0                # checked: not the permission-bits rule below
        if mode > MAX_MODE:
            err.code = R_MODE
            err.value = mode
            err.pos = body
            return -1
        body += FIXED_SIZE[kind]
        problem = path_problem(kind, raw + body, path_len, 0)
        if problem:
            err.code = R_PATH
            err.value = problem
            err.pos = body
            return -1
        body += path_len
        problem = path_problem(kind, raw + body, path2_len, 1)
        if problem:
            err.code = R_PATH2
            err.value = problem
            err.pos = body
            return -1
        body += path2_len
        if data_len and not HAS_DATA[kind]:
            err.code = R_DATA
            err.pos = pos + 6
            return -1
        if data_len and kind == K_XATTR and mask:
            err.code = R_XATTR_REMOVE_DATA
            err.pos = pos + 6
            return -1
        if ((kind == K_TASK and data_len > MAX_TASK_PAYLOAD)
                or (kind == K_MARK and data_len > MAX_MARK_PAYLOAD)
                or (kind == K_XATTR and data_len > MAX_XATTR_VALUE)):
            err.code = R_PAYLOAD_SIZE
            err.value = data_len
            err.other = payload_limit(kind)
            err.pos = pos + 6
            return -1
        pos = body + data_len
    err.index = count
    err.pos = pos
    if pos != raw_len:
        err.code = R_STRAY
        err.value = <uint64_t>(raw_len - pos)
        return -1
    if prev != last_seq:
        err.code = R_LAST_SEQ
        err.value = prev
        err.other = last_seq
        return -1
    err.code = R_OK
    return 0


cdef inline uint32_t payload_limit(uint8_t kind) noexcept nogil:
    if kind == K_TASK:
        return MAX_TASK_PAYLOAD
    if kind == K_MARK:
        return MAX_MARK_PAYLOAD
    return MAX_XATTR_VALUE


cdef str kind_name(uint8_t kind):
    return OpKind(kind).name.lower() if 0 < kind < NKINDS else f"kind {kind}"


cdef object record_error(RecordError* e, const unsigned char* raw,
                         Py_ssize_t raw_base, bint compressed,
                         Py_ssize_t payload_start, Py_ssize_t header_start):
    """The FrameError for a problem the validator found. ``raw_base`` is the
    payload's offset in the caller's buffer when it is not compressed."""
    cdef Py_ssize_t i = e.index, at
    where = f" (decompressed payload byte {e.pos})" if compressed else ""
    at = payload_start if compressed else raw_base + e.pos
    code = e.code
    # the op's seq, kind and field, for whoever must find it
    who = f"op {i} (seq {e.seq}, {kind_name(e.kind)})"
    if code == R_TRUNCATED:
        msg = f"op {i} record truncated"
    elif code == R_KIND:
        msg = f"op {i} (seq {e.seq}): unknown op kind {e.value}"
    elif code == R_SETATTR_MASK:
        msg = f"{who}: bad setattr mask 0x{e.value:02x}"
    elif code == R_MASK_ON_OTHER:
        msg = f"{who}: mask set on a {kind_name(e.kind)} op"
    elif code == R_FIRST_SEQ:
        msg = f"op 0 seq {e.value} differs from the header's first seq {e.other}"
    elif code == R_SEQ_ORDER:
        msg = f"op {i} seq {e.value} does not follow seq {e.other}"
    elif code == R_NEED:
        msg = (f"op {i} record needs {e.value} bytes after its head, the payload "
               f"has {e.other} left")
    elif code == R_OFFSET_RANGE:
        msg = f"{who}: offset/size {e.value} exceeds 2**63-1"
    elif code == R_WRITE_END:
        msg = f"{who}: write offset {e.value} + {e.other} bytes ends past 2**63-1"
    elif code == R_UNMASKED_FIELD:
        msg = f"{who}: setattr field not named by the mask is not 0"
    elif code == R_ID:
        msg = f"{who}: {'gid' if e.other else 'uid'} {e.value} out of range 0..{MAX_ID}"
    elif code == R_MODE:
        msg = f"{who}: mode 0o{e.value:o} has bits beyond 0o7777"
    elif code == R_PATH or code == R_PATH2:
        msg = (f"{who}: {'path2' if code == R_PATH2 else 'path'} "
               f"{PATH_PROBLEMS[e.value]}")
    elif code == R_DATA:
        msg = f"{who}: data on a {kind_name(e.kind)} op"
    elif code == R_PAYLOAD_SIZE:
        msg = f"{who}: payload is {e.value} bytes, the limit is {e.other}"
    elif code == R_XATTR_FLAGS:
        msg = f"{who}: bad xattr flags 0x{e.value:02x}"
    elif code == R_RENAME_FLAGS:
        msg = f"{who}: bad rename flags 0x{e.value:02x}"
    elif code == R_XATTR_REMOVE_DATA:
        msg = f"{who}: an xattr removal carries a value"
    elif code == R_MKNOD_MODE:
        msg = (f"{who}: mknod mode 0o{e.value:o} is not a fifo, socket or device type "
               f"with permission bits <= 0o7777")
    elif code == R_MKNOD_RDEV:
        msg = f"{who}: mknod of a fifo or socket has device number {e.value}, not 0"
    elif code == R_STRAY:
        msg = f"{e.value} stray bytes after the last op"
    elif code == R_LAST_SEQ:
        return FrameError(f"last op seq {e.value} differs from the header's last seq "
                          f"{e.other}", header_start + 32)
    else:
        msg = f"op {i}: invalid record (code {code})"
    return FrameError(msg + where, at)


# -- header ----------------------------------------------------------------------

cdef struct Header:
    uint8_t flags
    uint32_t count
    uint32_t stored_len
    uint32_t raw_len
    uint64_t first_seq
    uint64_t last_seq
    uint64_t payload_check


cdef int parse_header(const unsigned char* p, Py_ssize_t have, Py_ssize_t offset,
                      Header* h) except -1:
    """Validate the 56 header bytes at ``p`` (``offset`` in the caller's
    buffer) into ``h``; raises FrameError naming the problem."""
    cdef uint8_t version
    if have < HEADER_SIZE:
        raise FrameError(f"truncated frame header: need {HEADER_SIZE} bytes, "
                         f"have {have if have > 0 else 0}", offset)
    if ld32(p) != MAGIC_LE:
        raise FrameError(f"bad frame magic {PyBytes_FromStringAndSize(<char*>p, 4)!r}, "
                         f"expected b'SMJF'", offset)
    version = p[4]
    if version != 1:
        raise FrameError(f"unsupported frame version {version} (this build reads "
                         f"version 1)", offset + 4)
    if SM_XXH3_64(p, HEADER_CHECKED) != ld64(p + HEADER_CHECKED):
        raise FrameError("frame header checksum mismatch", offset + HEADER_CHECKED)
    h.flags = p[5]
    h.count = ld32(p + 8)
    h.stored_len = ld32(p + 12)
    h.raw_len = ld32(p + 16)
    h.first_seq = ld64(p + 24)
    h.last_seq = ld64(p + 32)
    h.payload_check = ld64(p + 40)
    if h.flags & ~FLAG_LZ4:
        raise FrameError(f"unknown frame flags 0x{h.flags:02x}", offset + 5)
    if ld16(p + 6) or ld32(p + 20):
        raise FrameError("reserved frame header bytes are not zero",
                         offset + (6 if ld16(p + 6) else 20))
    if h.count == 0:
        raise FrameError("frame holds no ops", offset + 8)
    if h.stored_len > MAX_PAYLOAD or h.raw_len > MAX_PAYLOAD:
        raise FrameError(f"frame payload length {max(h.stored_len, h.raw_len)} exceeds "
                         f"the limit {MAX_PAYLOAD}", offset + 12)
    if h.flags & FLAG_LZ4:
        if h.stored_len == 0 or <uint64_t>h.raw_len > <uint64_t>h.stored_len * LZ4_MAX_RATIO:
            raise FrameError(f"compressed payload of {h.stored_len} bytes cannot expand "
                             f"to the declared {h.raw_len} bytes", offset + 16)
    elif h.stored_len != h.raw_len:
        raise FrameError(f"uncompressed payload: stored length {h.stored_len} differs "
                         f"from raw length {h.raw_len}", offset + 16)
    if <uint64_t>h.raw_len < <uint64_t>h.count * RECORD_HEAD_SIZE:
        raise FrameError(f"raw payload of {h.raw_len} bytes cannot hold {h.count} ops",
                         offset + 8)
    if h.last_seq < h.first_seq or h.last_seq - h.first_seq < h.count - 1:
        raise FrameError(f"seq range {h.first_seq}..{h.last_seq} cannot hold {h.count} "
                         f"strictly increasing ops", offset + 24)
    return 0


cdef Py_ssize_t check_offset(Py_ssize_t offset, Py_ssize_t size) except -1:
    if offset < 0 or offset > size:
        raise ValueError(f"offset {offset} outside the buffer of {size} bytes")
    return offset


def frame_header(buf, Py_ssize_t offset=0):
    """Validate the header of the frame at ``offset`` (needs HEADER_SIZE bytes,
    not the payload) and return a FrameHeader; ``frame_len`` is the whole
    frame's size."""
    cdef const unsigned char[::1] view = as_bytes_view(buf)
    cdef Header h
    check_offset(offset, view.shape[0])
    parse_header(&view[0] + offset if view.shape[0] else NULL,
                 view.shape[0] - offset, offset, &h)
    return FrameHeader(1, h.flags, h.count, h.first_seq, h.last_seq, h.stored_len,
                       h.raw_len, HEADER_SIZE + <Py_ssize_t>h.stored_len)


cdef object as_bytes_view(object buf):
    """A 1-D unsigned-byte view of any contiguous buffer (no copy)."""
    try:
        mv = memoryview(buf)
    except TypeError:
        raise TypeError(f"expected a bytes-like buffer, not {type(buf).__name__}") from None
    if not mv.c_contiguous:
        raise TypeError("buffer must be contiguous")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


# -- decoder ---------------------------------------------------------------------

cdef inline void set_item(object t, Py_ssize_t i, object v):
    Py_INCREF(v)
    PyTuple_SET_ITEM(t, i, v)


cdef list build_ops(const unsigned char* raw, Py_ssize_t raw_len, Py_ssize_t count,
                    object data_base, Py_ssize_t data_shift):
    """Op tuples for a validated payload. ``data_base`` is a memoryview the
    data slices are cut from; raw byte b is data_base[b + data_shift]. The
    kind and lengths are checked again (cheaply): another thread may have
    written to a shared writable buffer since it was validated."""
    cdef list ops = [None] * count
    cdef Py_ssize_t i, pos = 0, body
    cdef const unsigned char* r
    cdef uint8_t kind, mask
    cdef uint16_t path_len, path2_len, prev_path_len = 0
    cdef uint32_t data_len
    cdef const unsigned char* prev_path = NULL
    cdef object path = EMPTY, path2, data, op
    for i in range(count):
        if raw_len - pos < RECORD_HEAD_SIZE:
            raise FrameError("frame buffer changed while it was being decoded", None)
        r = raw + pos
        kind = r[0]
        mask = r[1]
        path_len = ld16(r + 2)
        path2_len = ld16(r + 4)
        data_len = ld32(r + 6)
        body = pos + RECORD_HEAD_SIZE
        if (kind == 0 or kind >= NKINDS
                or raw_len - body < (<Py_ssize_t>FIXED_SIZE[kind] + path_len + path2_len
                                     + <Py_ssize_t>data_len)):
            raise FrameError("frame buffer changed while it was being decoded", None)
        op = smj_alloc_tuple_of(Op, 12)
        set_item(op, 0, ZERO if ld64(r + 10) == 0 else <object>ld64(r + 10))
        set_item(op, 1, <object>PyTuple_GET_ITEM(KIND_OBJECTS, kind))
        # the numeric fields default to 0 and are overwritten below
        if kind == K_WRITE:
            set_item(op, 4, <object>ld64(raw + body))
            set_item(op, 5, ZERO)
        elif kind == K_TRUNCATE:
            set_item(op, 4, ZERO)
            set_item(op, 5, <object>ld64(raw + body))
        elif kind == K_MKNOD:
            set_item(op, 4, ZERO)
            set_item(op, 5, ZERO if ld64(raw + body + 4) == 0 else <object>ld64(raw + body + 4))
        else:
            set_item(op, 4, ZERO)
            set_item(op, 5, ZERO)
        if kind == K_CREATE or kind == K_MKDIR or kind == K_SETATTR or kind == K_MKNOD:
            set_item(op, 6, <object>ld32(raw + body))
        else:
            set_item(op, 6, ZERO)
        if kind == K_SETATTR:
            set_item(op, 7, <object>ld32(raw + body + 4))
            set_item(op, 8, <object>ld32(raw + body + 8))
            set_item(op, 9, <object><int64_t>ld64(raw + body + 12))
            set_item(op, 10, <object>mask)
        else:
            set_item(op, 7, ZERO)
            set_item(op, 8, ZERO)
            set_item(op, 9, ZERO)
            set_item(op, 10, ZERO if mask == 0 else <object>mask)
        body += FIXED_SIZE[kind]
        # consecutive ops on the same file share one path object
        if not (path_len == prev_path_len and prev_path != NULL
                and memcmp(prev_path, raw + body, path_len) == 0):
            path = PyBytes_FromStringAndSize(<const char*>raw + body, path_len)
            prev_path = raw + body
            prev_path_len = path_len
        set_item(op, 2, path)
        body += path_len
        if path2_len:
            path2 = PyBytes_FromStringAndSize(<const char*>raw + body, path2_len)
        else:
            path2 = EMPTY
        set_item(op, 3, path2)
        body += path2_len
        if HAS_DATA[kind]:
            data = smj_subview(data_base, body + data_shift, data_len)
        else:
            data = EMPTY
        set_item(op, 11, data)
        ops[i] = op
        pos = body + data_len
    return ops


def decode_frame(buf, Py_ssize_t offset=0, *, bint check_payload=True):
    """Decode the frame at ``offset`` of ``buf`` (bytes, bytearray, memoryview,
    mmap, ...). Returns ``(ops, frame_len)``; the next frame of a stream starts
    at ``offset + frame_len``. Write/task/mark data are memoryviews into
    ``buf`` (or into the decompressed payload). ``check_payload=False`` skips
    only the payload checksum, for a frame checked once already and held
    since in a private immutable copy (the target queue's); everything else
    is validated as always."""
    cdef object mv = as_bytes_view(buf)
    cdef const unsigned char[::1] view = mv
    cdef Py_ssize_t size = view.shape[0], start, have
    cdef const unsigned char* base = &view[0] if size else NULL
    cdef const unsigned char* stored
    cdef const unsigned char* raw
    cdef Header h
    cdef RecordError err
    cdef uint64_t check
    cdef Py_ssize_t rc
    check_offset(offset, size)
    parse_header(base + offset if size else NULL, size - offset, offset, &h)
    start = offset + HEADER_SIZE
    have = size - start
    if have < <Py_ssize_t>h.stored_len:
        raise FrameError(f"truncated frame: header declares {h.stored_len} payload "
                         f"bytes, buffer holds {have}", start + have)
    stored = base + start
    if check_payload:
        with nogil:
            check = SM_XXH3_64(stored, h.stored_len)
        if check != h.payload_check:
            raise FrameError("frame payload checksum mismatch", start)
    if h.flags & FLAG_LZ4:
        try:
            raw_obj = lz4_decompress(mv[start:start + h.stored_len],
                                     uncompressed_size=h.raw_len)
        except Exception as exc:  # lz4.block.LZ4BlockError is not exported
            raise FrameError(f"lz4 payload does not decompress to the declared "
                             f"{h.raw_len} bytes: {exc}", start) from None
        if PyBytes_GET_SIZE(raw_obj) != h.raw_len:
            raise FrameError(f"lz4 payload decompressed to {PyBytes_GET_SIZE(raw_obj)} "
                             f"bytes, header declares {h.raw_len}", start)
        raw = <const unsigned char*>PyBytes_AS_STRING(raw_obj)
        with nogil:
            rc = validate_records(raw, h.raw_len, h.count, h.first_seq, h.last_seq, &err)
        if rc:
            raise record_error(&err, raw, 0, True, start, offset)
        ops = build_ops(raw, h.raw_len, h.count, memoryview(raw_obj), 0)
    else:
        raw = stored
        with nogil:
            rc = validate_records(raw, h.raw_len, h.count, h.first_seq, h.last_seq, &err)
        if rc:
            raise record_error(&err, raw, start, False, start, offset)
        ops = build_ops(raw, h.raw_len, h.count, mv, start)
    return ops, HEADER_SIZE + <Py_ssize_t>h.stored_len


# -- encoder ---------------------------------------------------------------------

cdef object bad_op(Py_ssize_t i, object op, str message, exc=ValueError):
    seq = op[0] if isinstance(op, tuple) and len(op) else "?"
    return exc(f"op {i} (seq {seq}): {message}")


cdef inline int as_u64(object v, uint64_t maxv, uint64_t* out) noexcept:
    """0: ok; 1: not an int; 2: out of 0..maxv. Never leaves an exception set."""
    cdef unsigned long long r
    if v is ZERO:
        out[0] = 0
        return 0
    if not PyLong_Check(v):
        return 1
    r = smj_as_ull(v)
    if r == <unsigned long long>-1 and PyErr_Occurred() != NULL:
        PyErr_Clear()               # negative or >= 2**64
        return 2
    out[0] = r
    return 2 if r > maxv else 0


cdef int bad_u64(Py_ssize_t i, object op, str name, object v, uint64_t maxv,
                 int rc) except -1:
    if rc == 1:
        raise bad_op(i, op, f"{name} must be an int, not {type(v).__name__}", TypeError)
    raise bad_op(i, op, f"{name} {v} out of range 0..{maxv}")


cdef inline uint64_t get_u64(Py_ssize_t i, object op, str name, object v,
                             uint64_t maxv) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t out = 0
    cdef int rc = as_u64(v, maxv, &out)
    if rc:
        bad_u64(i, op, name, v, maxv, rc)
    return out


cdef int unused_slow(Py_ssize_t i, object op, str name, object v, uint8_t kind) except -1:
    if not PyLong_Check(v) or v != 0:
        raise bad_op(i, op, f"{name} is not used by {kind_name(kind)} ops and must be 0, "
                            f"got {v!r}")
    return 0


cdef inline int check_unused(Py_ssize_t i, object op, str name, object v,
                             uint8_t kind) except -1:
    if v is ZERO:
        return 0
    return unused_slow(i, op, name, v, kind)


def _compress_mode(compress):
    if compress is True or compress is False or compress == "auto":
        return compress
    raise ValueError(f"compress must be True, False or 'auto', got {compress!r}")


cdef class Encoder:
    """Encodes lists of ops into frames, reusing its per-op scratch between
    calls. One Encoder must not be used by two threads at once (it raises
    RuntimeError); :func:`encode_frame` keeps a small pool of them."""

    def __cinit__(self, compress="auto"):
        self.compress = _compress_mode(compress)
        self.fields = NULL
        self.capacity = 0
        self.views = NULL
        self.views_capacity = 0
        self.views_held = 0
        self.busy = False
        self.scratch = bytearray()

    def __dealloc__(self):
        self._release_views()
        PyMem_Free(self.fields)
        PyMem_Free(self.views)

    cdef int _reserve(self, Py_ssize_t n) except -1:
        cdef OpFields* grown
        if n <= self.capacity:
            return 0
        n = max(n, 2 * self.capacity, 64)
        grown = <OpFields*>PyMem_Realloc(self.fields, n * sizeof(OpFields))
        if grown == NULL:
            raise MemoryError()
        self.fields = grown
        self.capacity = n
        return 0

    cdef int _reserve_views(self, Py_ssize_t n) except -1:
        cdef Py_buffer* grown
        if n <= self.views_capacity:
            return 0
        n = max(n, 2 * self.views_capacity, 16)
        grown = <Py_buffer*>PyMem_Realloc(self.views, n * sizeof(Py_buffer))
        if grown == NULL:
            raise MemoryError()
        self.views = grown
        self.views_capacity = n
        return 0

    cdef void _release_views(self) noexcept:
        cdef Py_ssize_t k
        for k in range(self.views_held):
            PyBuffer_Release(&self.views[k])
        self.views_held = 0

    def encode(self, ops, compress=None):
        """Encode a non-empty sequence of ops (strictly increasing seqs) into
        one frame; returns the frame bytes. ``compress`` overrides the
        Encoder's setting: True, False or 'auto'."""
        mode = self.compress if compress is None else _compress_mode(compress)
        if self.busy:
            raise RuntimeError("Encoder used by two threads at once")
        self.busy = True
        try:
            return self._encode(tuple(ops), mode)
        finally:
            self._release_views()
            if PyByteArray_GET_SIZE(self.scratch) > SCRATCH_KEEP:
                self.scratch = bytearray()
            if self.capacity > SHRINK_ABOVE:
                PyMem_Free(self.fields)
                self.fields = NULL
                self.capacity = 0
            if self.views_capacity > VIEWS_KEEP:
                PyMem_Free(self.views)
                self.views = NULL
                self.views_capacity = 0
            self.busy = False

    cdef object _encode(self, tuple ops, object mode):
        cdef Py_ssize_t n = PyTuple_GET_SIZE(ops), i, raw_len = 0, frame_len
        cdef OpFields* f
        cdef object op, v
        cdef uint64_t prev_seq = 0, u
        cdef uint8_t kind
        cdef int problem
        cdef Py_buffer* pb
        cdef unsigned char* out
        cdef unsigned char* raw
        cdef uint64_t first_seq, last_seq
        cdef bint auto
        cdef PyObject* checked[PATH_CACHE]   # borrowed: ops holds them alive
        cdef bint checked_tree[PATH_CACHE]
        cdef size_t slot
        if n == 0:
            raise ValueError("a frame needs at least one op")
        if n > 0xFFFFFFFF:
            raise ValueError(f"{n} ops do not fit one frame")
        self._reserve(n)
        memset(checked, 0, sizeof(checked))
        # pass 1, GIL held: read and check every field once
        for i in range(n):
            op = <object>PyTuple_GET_ITEM(ops, i)
            if not PyTuple_Check(op) or PyTuple_GET_SIZE(op) != 12:
                raise bad_op(i, op, "is not an Op (a 12-field tuple)", TypeError)
            f = &self.fields[i]
            f.seq = get_u64(i, op, "seq", <object>PyTuple_GET_ITEM(op, 0),
                            0xFFFFFFFFFFFFFFFF)
            if i and f.seq <= prev_seq:
                raise bad_op(i, op, f"seq must be greater than the previous op's seq "
                                    f"{prev_seq}")
            prev_seq = f.seq
            v = <object>PyTuple_GET_ITEM(op, 1)
            if as_u64(v, NKINDS - 1, &u) or u == 0:
                raise bad_op(i, op, f"unknown op kind {v!r}")
            kind = <uint8_t>u
            f.kind = kind
            # paths
            v = <object>PyTuple_GET_ITEM(op, 2)
            if not PyBytes_Check(v):
                raise bad_op(i, op, f"path must be bytes, not {type(v).__name__}", TypeError)
            if PyBytes_GET_SIZE(v) > MAX_PATH:
                raise bad_op(i, op, f"path is {len(v)} bytes long, the limit is {MAX_PATH}")
            f.path = <const unsigned char*>PyBytes_AS_STRING(v)
            f.path_len = <uint16_t>PyBytes_GET_SIZE(v)
            # ops on the same few files share path objects: a small cache of
            # objects already checked (all alive while ``ops`` is held)
            slot = (<size_t>(<PyObject*>v) >> 5) & (PATH_CACHE - 1)
            if checked[slot] != <PyObject*>v or checked_tree[slot] != TREE_PATH[kind]:
                problem = path_problem(kind, f.path, f.path_len, 0)
                if problem:
                    raise bad_op(i, op, f"{kind_name(kind)} path {v!r} {PATH_PROBLEMS[problem]}")
                if f.path_len:          # (an empty label is fine for marks only)
                    checked[slot] = <PyObject*>v
                    checked_tree[slot] = TREE_PATH[kind]
            v = <object>PyTuple_GET_ITEM(op, 3)
            if not PyBytes_Check(v):
                raise bad_op(i, op, f"path2 must be bytes, not {type(v).__name__}", TypeError)
            if PyBytes_GET_SIZE(v) > MAX_PATH:
                raise bad_op(i, op, f"path2 is {len(v)} bytes long, the limit is {MAX_PATH}")
            f.path2 = <const unsigned char*>PyBytes_AS_STRING(v)
            f.path2_len = <uint16_t>PyBytes_GET_SIZE(v)
            problem = path_problem(kind, f.path2, f.path2_len, 1)
            if problem:
                raise bad_op(i, op, f"{kind_name(kind)} path2 {v!r} {PATH_PROBLEMS[problem]}")
            # data: bytes directly, anything else through the buffer protocol
            v = <object>PyTuple_GET_ITEM(op, 11)
            if PyBytes_CheckExact(v):
                f.data = <const unsigned char*>PyBytes_AS_STRING(v)
                u = <uint64_t>PyBytes_GET_SIZE(v)
            else:
                self._reserve_views(self.views_held + 1)
                pb = &self.views[self.views_held]
                try:
                    PyObject_GetBuffer(v, pb, PyBUF_SIMPLE)
                except (TypeError, BufferError):
                    raise bad_op(i, op, f"data must be a contiguous bytes-like buffer, "
                                        f"not {type(v).__name__}", TypeError) from None
                self.views_held += 1
                f.data = <const unsigned char*>pb.buf
                u = <uint64_t>pb.len
            if u and not HAS_DATA[kind]:
                raise bad_op(i, op, f"data must be empty for {kind_name(kind)} ops")
            if u > MAX_PAYLOAD:
                raise bad_op(i, op, f"data is {u} bytes, the frame limit is {MAX_PAYLOAD}")
            if ((kind == K_TASK and u > MAX_TASK_PAYLOAD) or (kind == K_MARK and u > MAX_MARK_PAYLOAD)
                    or (kind == K_XATTR and u > MAX_XATTR_VALUE)):
                raise bad_op(i, op, f"{kind_name(kind)} payload is {u} bytes, the limit is "
                                    f"{payload_limit(kind)}")
            f.data_len = <uint32_t>u
            # numeric fields: the kind's own are range-checked, the rest must be 0
            f.u64 = 0
            f.mode = f.uid = f.gid = 0
            f.mtime_ns = 0
            f.mask = 0
            if kind == K_WRITE:
                f.u64 = get_u64(i, op, "offset", <object>PyTuple_GET_ITEM(op, 4), MAX_OFFSET)
                if f.u64 + f.data_len > MAX_OFFSET:
                    raise bad_op(i, op, f"write offset {f.u64} + {f.data_len} bytes ends "
                                        f"past 2**63-1")
            else:
                check_unused(i, op, "offset", <object>PyTuple_GET_ITEM(op, 4), kind)
            if kind == K_TRUNCATE:
                f.u64 = get_u64(i, op, "size", <object>PyTuple_GET_ITEM(op, 5), MAX_OFFSET)
            elif kind == K_MKNOD:
                f.u64 = get_u64(i, op, "size", <object>PyTuple_GET_ITEM(op, 5),
                                0xFFFFFFFFFFFFFFFF)
            else:
                check_unused(i, op, "size", <object>PyTuple_GET_ITEM(op, 5), kind)
            if kind == K_CREATE or kind == K_MKDIR or kind == K_SETATTR:
                f.mode = <uint32_t>get_u64(i, op, "mode", <object>PyTuple_GET_ITEM(op, 6),
                                           MAX_MODE)
            elif kind == K_MKNOD:
                f.mode = <uint32_t>get_u64(i, op, "mode", <object>PyTuple_GET_ITEM(op, 6),
                                           0xFFFFFFFF)
                if not mknod_mode_ok(f.mode):
                    raise bad_op(i, op, f"mknod mode 0o{f.mode:o} is not a fifo, socket or "
                                        f"device type with permission bits <= 0o7777")
                if not mknod_rdev_ok(f.mode, f.u64):
                    raise bad_op(i, op, f"mknod of a fifo or socket has device number "
                                        f"{f.u64}, not 0")
            else:
                check_unused(i, op, "mode", <object>PyTuple_GET_ITEM(op, 6), kind)
            if kind == K_SETATTR:
                self._setattr_fields(i, op, f)
            elif kind == K_XATTR:
                check_unused(i, op, "uid", <object>PyTuple_GET_ITEM(op, 7), kind)
                check_unused(i, op, "gid", <object>PyTuple_GET_ITEM(op, 8), kind)
                check_unused(i, op, "mtime_ns", <object>PyTuple_GET_ITEM(op, 9), kind)
                f.mask = <uint8_t>get_u64(i, op, "mask", <object>PyTuple_GET_ITEM(op, 10),
                                          X_REMOVE)
                if f.mask and f.data_len:
                    raise bad_op(i, op, "an xattr removal carries no value")
            elif kind == K_RENAME:
                check_unused(i, op, "uid", <object>PyTuple_GET_ITEM(op, 7), kind)
                check_unused(i, op, "gid", <object>PyTuple_GET_ITEM(op, 8), kind)
                check_unused(i, op, "mtime_ns", <object>PyTuple_GET_ITEM(op, 9), kind)
                f.mask = <uint8_t>get_u64(i, op, "mask", <object>PyTuple_GET_ITEM(op, 10),
                                          R_EXCHANGE)
            else:
                check_unused(i, op, "uid", <object>PyTuple_GET_ITEM(op, 7), kind)
                check_unused(i, op, "gid", <object>PyTuple_GET_ITEM(op, 8), kind)
                check_unused(i, op, "mtime_ns", <object>PyTuple_GET_ITEM(op, 9), kind)
                check_unused(i, op, "mask", <object>PyTuple_GET_ITEM(op, 10), kind)
            raw_len += (RECORD_HEAD_SIZE + FIXED_SIZE[kind] + f.path_len + f.path2_len
                        + <Py_ssize_t>f.data_len)
            if <uint64_t>raw_len > MAX_PAYLOAD:
                raise ValueError(f"frame payload exceeds {MAX_PAYLOAD} bytes at op {i}; "
                                 f"split the batch")

        first_seq = self.fields[0].seq
        last_seq = self.fields[n - 1].seq
        auto = mode is not True
        if mode is False or (auto and raw_len < AUTO_COMPRESS_MIN) or raw_len > AUTO_SAMPLE:
            # pass 2, GIL released: the records straight into the result
            frame = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + raw_len)
            out = <unsigned char*>PyBytes_AS_STRING(frame)
            with nogil:
                write_records(self.fields, n, out + HEADER_SIZE)
            if mode is not False and raw_len >= AUTO_COMPRESS_MIN:
                packed = self._try_lz4(frame, raw_len, auto)
                if packed is not None:
                    return self._lz4_frame(packed, n, raw_len, first_seq, last_seq)
            # (hashing each piece right after copying it measured no faster
            # than one XXH3 pass over the payload afterwards)
            with nogil:
                write_header(out, 0, n, raw_len, raw_len, first_seq, last_seq,
                             SM_XXH3_64(out + HEADER_SIZE, raw_len))
            return frame
        # small enough to compress whole: the raw payload goes to the reused
        # scratch (no large temporary next to lz4's own allocation)
        if PyByteArray_GET_SIZE(self.scratch) < raw_len:
            PyByteArray_Resize(self.scratch, raw_len)
        raw = <unsigned char*>PyByteArray_AS_STRING(self.scratch)
        with nogil:
            write_records(self.fields, n, raw)
        with memoryview(self.scratch) as whole:
            with whole[:raw_len] as raw_view:
                packed = lz4_compress(raw_view, store_size=False)
        if not auto or PyBytes_GET_SIZE(packed) <= raw_len - raw_len // 10:
            return self._lz4_frame(packed, n, raw_len, first_seq, last_seq)
        frame = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + raw_len)
        out = <unsigned char*>PyBytes_AS_STRING(frame)
        with nogil:
            memcpy(out + HEADER_SIZE, raw, raw_len)
            write_header(out, 0, n, raw_len, raw_len, first_seq, last_seq,
                         SM_XXH3_64(out + HEADER_SIZE, raw_len))
        return frame

    cdef object _try_lz4(self, bytes frame, Py_ssize_t raw_len, bint auto):
        """lz4 of the raw payload inside ``frame``, or None when 'auto' finds
        it not worth it: first a 64 KiB sample, then the whole payload, must
        each save at least 10%."""
        with memoryview(frame) as whole:
            if auto and raw_len > AUTO_SAMPLE:
                with whole[HEADER_SIZE:HEADER_SIZE + AUTO_SAMPLE] as sample:
                    packed = lz4_compress(sample, store_size=False)
                if PyBytes_GET_SIZE(packed) > AUTO_SAMPLE - AUTO_SAMPLE // 10:
                    return None
            with whole[HEADER_SIZE:] as payload:
                packed = lz4_compress(payload, store_size=False)
        if auto and PyBytes_GET_SIZE(packed) > raw_len - raw_len // 10:
            return None
        return packed

    cdef object _lz4_frame(self, bytes packed, Py_ssize_t count, Py_ssize_t raw_len,
                           uint64_t first_seq, uint64_t last_seq):
        cdef Py_ssize_t stored_len = PyBytes_GET_SIZE(packed)
        cdef const unsigned char* stored = <const unsigned char*>PyBytes_AS_STRING(packed)
        frame = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + stored_len)
        cdef unsigned char* out = <unsigned char*>PyBytes_AS_STRING(frame)
        with nogil:
            memcpy(out + HEADER_SIZE, stored, stored_len)
            write_header(out, FLAG_LZ4, count, stored_len, raw_len, first_seq, last_seq,
                         SM_XXH3_64(out + HEADER_SIZE, stored_len))
        return frame

    cdef int _setattr_fields(self, Py_ssize_t i, object op, OpFields* f) except -1:
        cdef uint64_t mask = get_u64(i, op, "mask", <object>PyTuple_GET_ITEM(op, 10), M_ALL)
        cdef object mt = <object>PyTuple_GET_ITEM(op, 9)
        if mask == 0:
            raise bad_op(i, op, f"mask 0 out of range 1..{M_ALL}")
        f.mask = <uint8_t>mask
        f.uid = <uint32_t>get_u64(i, op, "uid", <object>PyTuple_GET_ITEM(op, 7), MAX_ID)
        f.gid = <uint32_t>get_u64(i, op, "gid", <object>PyTuple_GET_ITEM(op, 8), MAX_ID)
        if not PyLong_Check(mt):
            raise bad_op(i, op, f"mtime_ns must be an int, not {type(mt).__name__}", TypeError)
        try:
            f.mtime_ns = PyLong_AsLongLong(mt)
        except OverflowError:
            raise bad_op(i, op, f"mtime_ns {mt} out of range "
                                f"{-(1 << 63)}..{(1 << 63) - 1}") from None
        if ((not (mask & M_MODE) and f.mode) or (not (mask & M_UID) and f.uid)
                or (not (mask & M_GID) and f.gid) or (not (mask & M_MTIME) and f.mtime_ns)):
            raise bad_op(i, op, "a setattr field the mask does not name is not 0 "
                                f"(mask 0x{mask:x}, mode {f.mode:o}, uid {f.uid}, "
                                f"gid {f.gid}, mtime_ns {f.mtime_ns})")
        return 0


cdef void write_records(const OpFields* fields, Py_ssize_t n,
                        unsigned char* w) noexcept nogil:
    """All records, back to back, into ``w``."""
    cdef Py_ssize_t i
    cdef const OpFields* f
    for i in range(n):
        f = &fields[i]
        w[0] = f.kind
        w[1] = f.mask
        st16(w + 2, f.path_len)
        st16(w + 4, f.path2_len)
        st32(w + 6, f.data_len)
        st64(w + 10, f.seq)
        w += RECORD_HEAD_SIZE
        if f.kind == K_WRITE or f.kind == K_TRUNCATE:
            st64(w, f.u64)
            w += 8
        elif f.kind == K_CREATE or f.kind == K_MKDIR:
            st32(w, f.mode)
            w += 4
        elif f.kind == K_SETATTR:
            st32(w, f.mode)
            st32(w + 4, f.uid)
            st32(w + 8, f.gid)
            st64(w + 12, <uint64_t>f.mtime_ns)
            w += 20
        elif f.kind == K_MKNOD:
            st32(w, f.mode)
            st64(w + 4, f.u64)
            w += 12
        memcpy(w, f.path, f.path_len)
        w += f.path_len
        if f.path2_len:
            memcpy(w, f.path2, f.path2_len)
            w += f.path2_len
        if f.data_len:
            memcpy(w, f.data, f.data_len)
            w += f.data_len


cdef void write_header(unsigned char* out, uint8_t flags, Py_ssize_t count,
                       Py_ssize_t stored_len, Py_ssize_t raw_len, uint64_t first_seq,
                       uint64_t last_seq, uint64_t payload_check) noexcept nogil:
    st32(out, MAGIC_LE)
    out[4] = 1
    out[5] = flags
    st16(out + 6, 0)
    st32(out + 8, <uint32_t>count)
    st32(out + 12, <uint32_t>stored_len)
    st32(out + 16, <uint32_t>raw_len)
    st32(out + 20, 0)
    st64(out + 24, first_seq)
    st64(out + 32, last_seq)
    st64(out + 40, payload_check)
    st64(out + 48, SM_XXH3_64(out, HEADER_CHECKED))


# encode_frame draws Encoders from a small pool so concurrent callers never
# share one, and the common single-threaded case reuses the same scratch
cdef list _pool = []

def encode_frame(ops, compress="auto"):
    """Encode a non-empty sequence of ops (strictly increasing seqs) into one
    frame; returns the frame bytes. ``compress``: True, False or 'auto'."""
    cdef Encoder enc
    mode = _compress_mode(compress)
    try:
        enc = _pool.pop()
    except IndexError:
        enc = Encoder()
    try:
        return enc.encode(ops, mode)
    finally:
        if len(_pool) < 8:
            _pool.append(enc)
