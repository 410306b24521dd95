# C-level API of the spill-queue kernel, for other kernels to cimport: the
# record header codec. The on-disk format is documented in
# src/smirror/_memqueue_py.py (the pure-Python reference). The queue classes
# keep their C fields private to _memqueue.pyx.
from libc.stdint cimport uint32_t, uint64_t


# Write the 32-byte header of ``payload`` (``length`` bytes), a record of
# segment ``segment``, into ``header``.
cdef void encode_header_c(unsigned char* header, uint64_t seq, const unsigned char* payload,
                          size_t length, uint64_t segment) noexcept nogil

# Decode a 32-byte record header of segment ``segment``; False when its magic
# or head check is wrong.
cdef bint decode_header_c(const unsigned char* header, uint64_t segment, uint64_t* seq,
                          uint32_t* length, uint64_t* body_check) noexcept nogil
