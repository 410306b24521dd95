# C-level API of the block-checksum kernel; other kernels may cimport it.
from libc.stdint cimport uint32_t, uint64_t

# sm_xxhash.h first: the one xxHash set-up of every kernel (see there)
cdef extern from "sm_xxhash.h":
    pass

cdef extern from "xxhash.h" nogil:
    ctypedef struct XXH128_hash_t:
        uint64_t low64
        uint64_t high64
    ctypedef struct XXH128_canonical_t:
        unsigned char digest[16]
    ctypedef struct XXH3_state_t:
        pass
    ctypedef enum XXH_errorcode:
        XXH_OK
        XXH_ERROR
    XXH128_hash_t XXH3_128bits(const void* data, size_t length)
    XXH3_state_t* XXH3_createState()
    XXH_errorcode XXH3_freeState(XXH3_state_t* state)
    XXH_errorcode XXH3_128bits_reset(XXH3_state_t* state)
    XXH_errorcode XXH3_128bits_update(XXH3_state_t* state, const void* data, size_t length)
    XXH128_hash_t XXH3_128bits_digest(const XXH3_state_t* state)
    void XXH128_canonicalFromHash(XXH128_canonical_t* dst, XXH128_hash_t hash)

cdef extern from * nogil:
    # runtime-dispatched (SSE2/AVX2/AVX512) variants, same results
    XXH128_hash_t SM_XXH3_128(const void* data, size_t length)
    XXH_errorcode SM_XXH3_128_UPDATE(XXH3_state_t* state, const void* data, size_t length)


# Weak checksum state: s1 = sum of bytes, s2 = sum of (length - i) * byte_i,
# both kept mod 2**32 (only their low 16 bits make the checksum).
ctypedef struct WeakSums:
    uint32_t s1
    uint32_t s2

# Append ``length`` bytes to a running weak state (concatenation rule:
# s2 += length * s1 + s2(chunk); s1 += s1(chunk)).
cdef void weak_append(WeakSums* sums, const unsigned char* data, size_t length) noexcept nogil
# The 32-bit weak checksum of one buffer: (s1 & 0xffff) | (s2 & 0xffff) << 16.
cdef uint32_t weak_of(const unsigned char* data, size_t length) noexcept nogil
# XXH3-128 of one buffer (runtime-dispatched SIMD).
cdef XXH128_hash_t strong_of(const unsigned char* data, size_t length) noexcept nogil
# Signature of a buffer: ceil(length / block_size) entries; weak_out may be
# NULL; strong_out holds (low64, high64) pairs.
cdef void sign_buffer(const unsigned char* data, size_t length, size_t block_size,
                      uint32_t* weak_out, uint64_t* strong_out) noexcept nogil
