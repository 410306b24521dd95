# C-level API of the journal frame kernel; the format is documented in
# src/smirror/_journal_py.py.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from cpython.buffer cimport Py_buffer

# sm_xxhash.h first: the one xxHash set-up of every kernel (see there)
cdef extern from "sm_xxhash.h":
    pass

cdef extern from "xxhash.h" nogil:
    ctypedef unsigned long long XXH64_hash_t

cdef extern from * nogil:
    XXH64_hash_t SM_XXH3_64(const void* data, size_t length)


# One op's fields, read once from the Python tuple (GIL held) so the records
# can then be written with the GIL released.
cdef struct OpFields:
    uint64_t seq
    uint64_t u64                 # WRITE offset or TRUNCATE size
    int64_t mtime_ns
    uint32_t mode
    uint32_t uid
    uint32_t gid
    uint32_t data_len
    uint16_t path_len
    uint16_t path2_len
    uint8_t kind
    uint8_t mask
    const unsigned char* path
    const unsigned char* path2
    const unsigned char* data


# Where the nogil record validator found a problem (formatted with the GIL).
cdef struct RecordError:
    int code
    Py_ssize_t index             # op index in the frame
    Py_ssize_t pos               # byte position in the raw payload
    uint64_t value               # the offending value, when there is one
    uint64_t other               # a second value for the message
    uint64_t seq                 # the op's seq and kind, once read
    uint8_t kind


cdef int path_problem(uint8_t kind, const unsigned char* p, size_t n,
                      bint second) noexcept nogil

cdef Py_ssize_t validate_records(const unsigned char* raw, Py_ssize_t raw_len,
                                 Py_ssize_t count, uint64_t first_seq,
                                 uint64_t last_seq, RecordError* err) noexcept nogil


cdef class Encoder:
    cdef OpFields* fields        # reused between calls, grown as needed
    cdef Py_ssize_t capacity
    cdef Py_buffer* views        # data buffers held during one encode
    cdef Py_ssize_t views_capacity
    cdef Py_ssize_t views_held
    cdef bytearray scratch       # raw payload before lz4, reused between calls
    cdef bint busy
    cdef readonly object compress

    cdef int _reserve(self, Py_ssize_t n) except -1
    cdef int _reserve_views(self, Py_ssize_t n) except -1
    cdef void _release_views(self) noexcept
    cdef object _encode(self, tuple ops, object mode)
    cdef int _setattr_fields(self, Py_ssize_t i, object op, OpFields* f) except -1
    cdef object _try_lz4(self, bytes frame, Py_ssize_t raw_len, bint auto)
    cdef object _lz4_frame(self, bytes packed, Py_ssize_t count, Py_ssize_t raw_len,
                           uint64_t first_seq, uint64_t last_seq)
