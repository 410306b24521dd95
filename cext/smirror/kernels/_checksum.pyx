# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Block-checksum kernel: weak rolling sums, XXH3-128 block hashes, file
signatures read with pread, and the rsync-style rolling delta search.

Reference implementation with the same names: ``smirror._checksum_py``.

Weak checksum of bytes b_0..b_{n-1} (no character offset)::

    s1 = sum(b_i)                 mod 2**16
    s2 = sum((n - i) * b_i)       mod 2**16
    weak = s1 | (s2 << 16)

It rolls one byte at a time (see ``weak_roll``); computed block-wise it uses
SIMD: the closed form is evaluated 16/32 bytes at a time with wide lanes.
"""
from libc.stdint cimport uint32_t, uint64_t, int64_t
from libc.stdlib cimport free, realloc, calloc

import operator

from smirror.errors import DeltaError

# numpy (~0.1 s to import) is loaded by the two functions that return
# signatures as arrays; digests, weak sums and the delta search never need it
cdef object _np = None


cdef object _numpy():
    global _np
    if _np is None:
        import numpy
        _np = numpy
    return _np

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void** memptr, size_t alignment, size_t size)

cdef extern from *:
    """
    #include <stdint.h>
    #include <stddef.h>
    #include <string.h>

    /* Append n bytes to (s1, s2): the serial form, for short tails. */
    static inline void sm_weak_serial(const unsigned char* p, size_t n,
                                      uint32_t* s1p, uint32_t* s2p) {
        uint32_t s1 = *s1p, s2 = *s2p;
        for (size_t i = 0; i < n; i++) { s1 += p[i]; s2 += s1; }
        *s1p = s1; *s2p = s2;
    }

    #if defined(__x86_64__) || defined(__i386__)
    #include <immintrin.h>

    static inline uint32_t sm_hsum128(__m128i v) {
        v = _mm_add_epi32(v, _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 3, 2)));
        v = _mm_add_epi32(v, _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1)));
        return (uint32_t)_mm_cvtsi128_si32(v);
    }

    /* 16-byte chunks. Per chunk: ps += s1 (each earlier chunk weighs 16 more
       per later chunk), s1 += sad(bytes), s2 += bytes * (16..1). All lanes
       wrap mod 2**32, which keeps the low 16 bits exact. */
    static void sm_weak_sse2(const unsigned char* p, size_t n,
                             uint32_t* s1p, uint32_t* s2p) {
        size_t chunks = n / 16;
        if (chunks) {
            const __m128i zero = _mm_setzero_si128();
            const __m128i w_lo = _mm_setr_epi16(16, 15, 14, 13, 12, 11, 10, 9);
            const __m128i w_hi = _mm_setr_epi16(8, 7, 6, 5, 4, 3, 2, 1);
            __m128i v_s1 = zero, v_ps = zero, v_s2a = zero, v_s2b = zero;
            for (size_t c = 0; c < chunks; c++) {
                __m128i v = _mm_loadu_si128((const __m128i*)(p + 16 * c));
                v_ps = _mm_add_epi32(v_ps, v_s1);
                v_s1 = _mm_add_epi32(v_s1, _mm_sad_epu8(v, zero));
                v_s2a = _mm_add_epi32(v_s2a, _mm_madd_epi16(_mm_unpacklo_epi8(v, zero), w_lo));
                v_s2b = _mm_add_epi32(v_s2b, _mm_madd_epi16(_mm_unpackhi_epi8(v, zero), w_hi));
            }
            uint32_t s1 = *s1p;
            *s2p += (uint32_t)(16 * chunks) * s1 + 16u * sm_hsum128(v_ps)
                    + sm_hsum128(_mm_add_epi32(v_s2a, v_s2b));
            *s1p = s1 + sm_hsum128(v_s1);
        }
        sm_weak_serial(p + 16 * chunks, n - 16 * chunks, s1p, s2p);
    }

    /* 32-byte chunks, two independent accumulator sets to hide latency;
       maddubs(bytes, 32..1) then madd(.., 1) gives the weighted sums. */
    __attribute__((target("avx2")))
    static void sm_weak_avx2(const unsigned char* p, size_t n,
                             uint32_t* s1p, uint32_t* s2p) {
        size_t pairs = n / 64;
        if (pairs) {
            const __m256i zero = _mm256_setzero_si256();
            const __m256i taps = _mm256_setr_epi8(
                32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17,
                16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1);
            const __m256i ones = _mm256_set1_epi16(1);
            __m256i v_s1 = zero, v_ps = zero, v_s2 = zero, v_c0 = zero;
            for (size_t c = 0; c < pairs; c++) {
                __m256i a = _mm256_loadu_si256((const __m256i*)(p + 64 * c));
                __m256i b = _mm256_loadu_si256((const __m256i*)(p + 64 * c + 32));
                __m256i sad_a = _mm256_sad_epu8(a, zero);
                /* chunk a precedes chunk b: a's sum weighs 32 more */
                v_ps = _mm256_add_epi32(v_ps, v_s1);
                v_c0 = _mm256_add_epi32(v_c0, sad_a);
                v_s1 = _mm256_add_epi32(v_s1, _mm256_add_epi32(sad_a, _mm256_sad_epu8(b, zero)));
                v_s2 = _mm256_add_epi32(v_s2, _mm256_madd_epi16(_mm256_maddubs_epi16(a, taps), ones));
                v_s2 = _mm256_add_epi32(v_s2, _mm256_madd_epi16(_mm256_maddubs_epi16(b, taps), ones));
            }
            __m128i ps = _mm_add_epi32(_mm256_castsi256_si128(v_ps), _mm256_extracti128_si256(v_ps, 1));
            __m128i c0 = _mm_add_epi32(_mm256_castsi256_si128(v_c0), _mm256_extracti128_si256(v_c0, 1));
            __m128i s2 = _mm_add_epi32(_mm256_castsi256_si128(v_s2), _mm256_extracti128_si256(v_s2, 1));
            __m128i s1v = _mm_add_epi32(_mm256_castsi256_si128(v_s1), _mm256_extracti128_si256(v_s1, 1));
            uint32_t s1 = *s1p;
            /* each pair: earlier pairs' bytes weigh 64 more, chunk a 32 more */
            *s2p += (uint32_t)(64 * pairs) * s1 + 64u * sm_hsum128(ps)
                    + 32u * sm_hsum128(c0) + sm_hsum128(s2);
            *s1p = s1 + sm_hsum128(s1v);
        }
        sm_weak_sse2(p + 64 * pairs, n - 64 * pairs, s1p, s2p);
    }

    #endif

    /* portable: closed form with wide accumulators, vectorised by gcc */
    static void sm_weak_generic(const unsigned char* p, size_t n,
                                uint32_t* s1p, uint32_t* s2p) {
        uint32_t a = 0, b = 0;
        for (size_t i = 0; i < n; i++) { a += p[i]; b += (uint32_t)(n - i) * p[i]; }
        *s2p += (uint32_t)n * *s1p + b;
        *s1p += a;
    }

    typedef void (*sm_weak_fn)(const unsigned char*, size_t, uint32_t*, uint32_t*);
    static sm_weak_fn sm_weak_impl = sm_weak_generic;
    static const char* sm_weak_name = "generic";

    /* Use the named variant; returns 0, or -1 if this CPU/build lacks it. */
    static int sm_weak_use(const char* name) {
        if (strcmp(name, "generic") == 0) { sm_weak_impl = sm_weak_generic; sm_weak_name = "generic"; return 0; }
    #if defined(__x86_64__) || defined(__i386__)
        if (strcmp(name, "sse2") == 0 && __builtin_cpu_supports("sse2")) {
            sm_weak_impl = sm_weak_sse2; sm_weak_name = "sse2"; return 0;
        }
        if (strcmp(name, "avx2") == 0 && __builtin_cpu_supports("avx2")) {
            sm_weak_impl = sm_weak_avx2; sm_weak_name = "avx2"; return 0;
        }
    #endif
        return -1;
    }

    /* the fastest variant this CPU runs */
    static void sm_weak_select(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_cpu_init();
    #endif
        if (sm_weak_use("avx2") != 0 && sm_weak_use("sse2") != 0) sm_weak_use("generic");
    }
    """
    void sm_weak_select() nogil
    int sm_weak_use(const char* name) nogil
    void sm_weak_impl(const unsigned char* p, size_t n, uint32_t* s1, uint32_t* s2) noexcept nogil
    const char* sm_weak_name

sm_weak_select()

# Signatures of files are read in chunks of this size into one buffer that is
# kept for the next call (freed memory returned to the host costs ~2.6 us a
# page to touch again).
cdef enum:
    READ_CHUNK = 8 * 1024 * 1024
    PIPE_SLOT = 2 * 1024 * 1024     # one slot of the buffer while pipelining
    POOL_MAX = 4
    MIN_TABLE = 16

cdef void* _pool[POOL_MAX]
cdef int _pool_count = 0

READ_CHUNK_SIZE = READ_CHUNK
WEAK_SIMD = sm_weak_name.decode()     # the variant picked at import


def _use_weak_variant(name) -> str:
    """Switch the weak-checksum code path ("avx2", "sse2", "generic"), for
    tests that check every variant; returns the previous one. ValueError if
    this CPU cannot run it. Not thread-safe against running hashes."""
    old = sm_weak_name.decode()
    if sm_weak_use(name.encode()) != 0:
        raise ValueError(f"weak checksum variant {name!r} is not available here")
    return old


cdef unsigned char* _take_buffer() except NULL:
    # runs with the GIL held, so the pool needs no other lock
    global _pool_count
    cdef void* mem = NULL
    if _pool_count:
        _pool_count -= 1
        return <unsigned char*>_pool[_pool_count]
    if posix_memalign(&mem, 4096, READ_CHUNK) != 0:
        raise MemoryError(f"cannot allocate a {READ_CHUNK} B read buffer")
    return <unsigned char*>mem


cdef void _give_buffer(unsigned char* buf) noexcept:
    global _pool_count
    if _pool_count < POOL_MAX:
        _pool[_pool_count] = buf
        _pool_count += 1
    else:
        free(buf)


# ---------------------------------------------------------------- C-level API

cdef void weak_append(WeakSums* sums, const unsigned char* data, size_t length) noexcept nogil:
    sm_weak_impl(data, length, &sums.s1, &sums.s2)


cdef inline uint32_t _pack(uint32_t s1, uint32_t s2) noexcept nogil:
    return (s1 & 0xffff) | (s2 << 16)


cdef uint32_t weak_of(const unsigned char* data, size_t length) noexcept nogil:
    cdef uint32_t s1 = 0, s2 = 0
    sm_weak_impl(data, length, &s1, &s2)
    return _pack(s1, s2)


cdef XXH128_hash_t strong_of(const unsigned char* data, size_t length) noexcept nogil:
    return SM_XXH3_128(data, length)


cdef void sign_buffer(const unsigned char* data, size_t length, size_t block_size,
                      uint32_t* weak_out, uint64_t* strong_out) noexcept nogil:
    cdef size_t off = 0, n, i = 0
    cdef XXH128_hash_t h
    while off < length:
        n = length - off if length - off < block_size else block_size
        # weak first: the block is then in L1 for the strong hash
        if weak_out != NULL:
            weak_out[i] = weak_of(data + off, n)
        h = SM_XXH3_128(data + off, n)
        strong_out[2 * i] = h.low64
        strong_out[2 * i + 1] = h.high64
        off += n
        i += 1


# ----------------------------------------------------------- argument checks

cdef const unsigned char[::1] _bytes_view(object data, str what) except *:
    """Any contiguous buffer as bytes, without copying; a clear error otherwise."""
    cdef const unsigned char[::1] view
    try:
        view = data
        return view
    except (TypeError, ValueError, BufferError):
        pass
    try:
        mv = memoryview(data)
    except TypeError:
        raise TypeError(f"{what}: expected a bytes-like object (bytes, bytearray, "
                        f"memoryview, mmap), got {type(data).__name__}") from None
    if not mv.c_contiguous:
        raise ValueError(f"{what}: the buffer is not C-contiguous (shape {mv.shape}, "
                         f"strides {mv.strides}); pass a contiguous copy")
    view = mv.cast("B")
    return view


cdef size_t _check_block_size(object block_size) except 0:
    if isinstance(block_size, bool) or not hasattr(block_size, "__index__"):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    block_size = operator.index(block_size)
    if block_size < 1 or block_size > (1 << 40):
        raise ValueError(f"block_size must be between 1 and 2**40, got {block_size}")
    return <size_t>block_size


cdef int _check_fd(object fd) except -1:
    if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
        raise ValueError(f"fd must be an open file descriptor (int >= 0), got {fd!r}")
    return <int>fd


# ------------------------------------------------------------ Python API

def weak_checksum(data) -> int:
    """Weak 32-bit checksum of a whole buffer: s1 | s2 << 16."""
    cdef const unsigned char[::1] view = _bytes_view(data, "weak_checksum")
    cdef size_t n = view.shape[0]
    cdef uint32_t w
    if n < 65536:
        return weak_of(&view[0] if n else NULL, n)
    with nogil:
        w = weak_of(&view[0], n)
    return w


def weak_roll(weak, out_byte, in_byte, length) -> int:
    """Roll a weak checksum of a ``length``-byte window one byte forward:
    ``out_byte`` leaves at the front, ``in_byte`` enters at the back."""
    if not (0 <= out_byte <= 255 and 0 <= in_byte <= 255):
        raise ValueError(f"bytes must be 0..255, got {out_byte}, {in_byte}")
    # only the low 16 bits of every term matter
    cdef uint32_t w = weak & 0xFFFFFFFF, o = out_byte, i = in_byte, n = length & 0xFFFF
    cdef uint32_t s1 = (w & 0xffff) - o + i
    cdef uint32_t s2 = (w >> 16) - n * o + s1
    return _pack(s1, s2)


def strong_digest(data) -> bytes:
    """XXH3-128 of a whole buffer, 16 bytes canonical (big-endian)."""
    cdef const unsigned char[::1] view = _bytes_view(data, "strong_digest")
    cdef size_t n = view.shape[0]
    cdef XXH128_hash_t h
    cdef XXH128_canonical_t canon
    if n < 65536:
        h = SM_XXH3_128(&view[0] if n else NULL, n)
    else:
        with nogil:
            h = SM_XXH3_128(&view[0], n)
    XXH128_canonicalFromHash(&canon, h)
    return bytes(canon.digest[:16])


def block_signature(data, block_size, with_weak):
    """(weak uint32 (n,) or None, strong uint64 (n, 2)) for n = ceil(len /
    block_size) blocks; the last block may be short."""
    cdef const unsigned char[::1] view = _bytes_view(data, "block_signature")
    cdef size_t bs = _check_block_size(block_size)
    cdef size_t length = view.shape[0]
    cdef size_t count = (length + bs - 1) // bs
    np = _numpy()
    strong = np.empty((count, 2), dtype=np.uint64)
    cdef uint64_t[:, ::1] strong_view = strong
    cdef uint32_t[::1] weak_view
    cdef uint32_t* weak_ptr = NULL
    weak = None
    if with_weak:
        weak = np.empty(count, dtype=np.uint32)
        weak_view = weak
        if count:
            weak_ptr = &weak_view[0]
    if count:
        with nogil:
            sign_buffer(&view[0], length, bs, weak_ptr, &strong_view[0, 0])
    return weak, strong


cdef class StreamDigest:
    """XXH3-128 of a byte stream fed in pieces (``update``), e.g. the windows
    of a large file's mapping; ``digest()`` equals ``strong_digest`` of the
    concatenation. Pieces of 64 KiB or more are hashed with the GIL released.
    Not thread-safe: one thread feeds one digest."""
    cdef XXH3_state_t* state

    def __cinit__(self):
        self.state = XXH3_createState()
        if self.state == NULL:
            raise MemoryError("cannot allocate an XXH3 state")
        XXH3_128bits_reset(self.state)

    def __dealloc__(self):
        if self.state != NULL:
            XXH3_freeState(self.state)

    def update(self, data):
        cdef const unsigned char[::1] view = _bytes_view(data, "StreamDigest.update")
        cdef size_t n = view.shape[0]
        if n == 0:
            return
        if n < 65536:
            SM_XXH3_128_UPDATE(self.state, &view[0], n)
        else:
            with nogil:
                SM_XXH3_128_UPDATE(self.state, &view[0], n)

    def digest(self) -> bytes:
        """The digest of everything fed so far, 16 bytes canonical."""
        cdef XXH128_canonical_t canon
        XXH128_canonicalFromHash(&canon, XXH3_128bits_digest(self.state))
        return bytes(canon.digest[:16])


# File reading: chunks of the file, in order, in slots of one buffer. For
# files of more than two slots a reader thread (plain pthread, no GIL, all
# signals blocked) preads the next slots while the caller hashes the current
# one, so the copy out of the page cache (or the wait for the disk) overlaps
# the hashing; otherwise, or if no thread can be started, it reads inline.
cdef extern from *:
    """
    #ifndef _GNU_SOURCE
    #  define _GNU_SOURCE     /* sched_getaffinity, CPU_COUNT */
    #endif
    #include <pthread.h>
    #include <sched.h>
    #include <signal.h>
    #include <string.h>
    #include <errno.h>
    #include <unistd.h>

    #define SM_MAX_SLOTS 64

    /* Read up to want bytes at offset; fewer only at end of file.
       Returns the count, or -1 with *err set. */
    static ssize_t sm_pread_full(int fd, unsigned char* buf, size_t want,
                                 uint64_t offset, int* err) {
        size_t got = 0;
        while (got < want) {
            ssize_t r = pread(fd, buf + got, want - got, (off_t)(offset + got));
            if (r > 0) got += (size_t)r;
            else if (r == 0) break;
            else if (errno != EINTR) { *err = errno; return -1; }
        }
        return (ssize_t)got;
    }

    typedef struct {
        int fd, threaded, nslots, stopped, holding, k;
        uint64_t start, end, next_off;
        unsigned char* buf;
        size_t slot_size;
        int err;                       /* errno of a failed read, 0 if none */
        pthread_t thread;
        pthread_mutex_t mu;
        pthread_cond_t cv;
        int cancel;                    /* shared from here on, under mu */
        int full[SM_MAX_SLOTS];
        ssize_t fill[SM_MAX_SLOTS];
        int slot_err[SM_MAX_SLOTS];
    } sm_reader;

    static void* sm_reader_main(void* arg) {
        sm_reader* r = (sm_reader*)arg;
        uint64_t off = r->start;
        for (int k = 0; off < r->end; k++) {
            int s = k % r->nslots, cancel;
            pthread_mutex_lock(&r->mu);
            while (r->full[s] && !r->cancel) pthread_cond_wait(&r->cv, &r->mu);
            cancel = r->cancel;
            pthread_mutex_unlock(&r->mu);
            if (cancel) break;
            size_t want = r->end - off < r->slot_size ? (size_t)(r->end - off) : r->slot_size;
            int err = 0;
            ssize_t n = sm_pread_full(r->fd, r->buf + (size_t)s * r->slot_size, want, off, &err);
            pthread_mutex_lock(&r->mu);
            r->fill[s] = n;
            r->slot_err[s] = err;
            r->full[s] = 1;
            pthread_cond_broadcast(&r->cv);
            pthread_mutex_unlock(&r->mu);
            if (n < 0 || (size_t)n < want) break;
            off += (uint64_t)n;
        }
        return NULL;
    }

    /* CPUs this process may run on: a reader thread only pays off with two */
    static int sm_cpus_allowed(void) {
    #ifdef CPU_COUNT
        cpu_set_t set;
        if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
    #endif
        return 2;
    }

    /* A reader thread pays off only if a CPU is idle: on a busy machine the
       two threads just take turns and the hand-offs cost 10-25%. The
       1-minute load average (which counts this thread) tells, cheaply. */
    static int sm_spare_cpu(void) {
        int cpus = sm_cpus_allowed();
        double load;
        if (cpus < 2) return 0;
        if (getloadavg(&load, 1) == 1 && load > cpus - 0.5) return 0;
        return 1;
    }

    /* Reads [start, end) of fd in order. */
    static void sm_reader_open(sm_reader* r, int fd, uint64_t start, uint64_t end, uint64_t size_hint,
                               unsigned char* buf, size_t buf_size, size_t slot_size,
                               int want_thread) {
        memset(r, 0, sizeof(*r));
        r->fd = fd;
        r->start = r->next_off = start;
        r->end = end;
        r->buf = buf;
        r->slot_size = slot_size;
        r->nslots = (int)(buf_size / slot_size > SM_MAX_SLOTS ? SM_MAX_SLOTS : buf_size / slot_size);
        if (want_thread && r->nslots >= 2 && size_hint > 2 * (uint64_t)slot_size) {
            sigset_t all, old;
            pthread_mutex_init(&r->mu, NULL);
            pthread_cond_init(&r->cv, NULL);
            sigfillset(&all);
            /* signals belong to the main thread; the reader inherits this mask */
            pthread_sigmask(SIG_BLOCK, &all, &old);
            r->threaded = pthread_create(&r->thread, NULL, sm_reader_main, r) == 0;
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            if (!r->threaded) {
                pthread_mutex_destroy(&r->mu);
                pthread_cond_destroy(&r->cv);
            }
        }
    }

    /* The next chunk (the slot of the previous call is handed back). *got is
       its length: less than asked means end of file, 0 when nothing is left.
       NULL on a read error (r->err set). */
    static const unsigned char* sm_reader_next(sm_reader* r, size_t* got) {
        *got = 0;
        if (r->stopped || r->next_off >= r->end) {
            if (r->threaded && r->holding) {
                pthread_mutex_lock(&r->mu);
                r->full[(r->k - 1) % r->nslots] = 0;
                r->holding = 0;
                pthread_cond_broadcast(&r->cv);
                pthread_mutex_unlock(&r->mu);
            }
            return r->buf;
        }
        size_t want = r->end - r->next_off < r->slot_size
                      ? (size_t)(r->end - r->next_off) : r->slot_size;
        const unsigned char* data;
        ssize_t n;
        if (!r->threaded) {
            int err = 0;
            n = sm_pread_full(r->fd, r->buf, want, r->next_off, &err);
            data = r->buf;
            if (n < 0) r->err = err;
        } else {
            int s = r->k % r->nslots;
            pthread_mutex_lock(&r->mu);
            if (r->holding) {
                r->full[(r->k - 1) % r->nslots] = 0;
                pthread_cond_broadcast(&r->cv);
            }
            while (!r->full[s]) pthread_cond_wait(&r->cv, &r->mu);
            n = r->fill[s];
            if (n < 0) r->err = r->slot_err[s];
            pthread_mutex_unlock(&r->mu);
            r->holding = 1;
            r->k++;
            data = r->buf + (size_t)s * r->slot_size;
        }
        if (n < 0) { r->stopped = 1; return NULL; }
        *got = (size_t)n;
        r->next_off += (uint64_t)n;
        if ((size_t)n < want) r->stopped = 1;
        return data;
    }

    static void sm_reader_close(sm_reader* r) {
        if (!r->threaded) return;
        pthread_mutex_lock(&r->mu);
        r->cancel = 1;
        pthread_cond_broadcast(&r->cv);
        pthread_mutex_unlock(&r->mu);
        pthread_join(r->thread, NULL);
        pthread_mutex_destroy(&r->mu);
        pthread_cond_destroy(&r->cv);
        r->threaded = 0;
    }
    """
    ctypedef struct sm_reader:
        int err
        int threaded
        uint64_t next_off
    int sm_spare_cpu() nogil
    void sm_reader_open(sm_reader* r, int fd, uint64_t start, uint64_t end, uint64_t size_hint,
                        unsigned char* buf, size_t buf_size, size_t slot_size,
                        int want_thread) nogil
    const unsigned char* sm_reader_next(sm_reader* r, size_t* got) nogil
    void sm_reader_close(sm_reader* r) nogil


cdef extern from "Python.h":
    int PyErr_CheckSignals() noexcept


cdef int _reraise() except -1:
    # the error indicator is already set (by PyErr_CheckSignals): propagate it
    return -1


cdef bint _interrupted(size_t* chunks) noexcept nogil:
    """Every 32 chunks (64-256 MiB), briefly take the GIL and run pending
    signal handlers, so Ctrl-C stops the signature of a huge file."""
    cdef bint hit = False
    chunks[0] += 1
    if chunks[0] % 32 == 0:
        with gil:
            hit = PyErr_CheckSignals() != 0
    return hit


cdef _raise_read(int fd, int err, uint64_t offset):
    import os
    raise OSError(err, f"reading fd {fd} at byte {offset}: {os.strerror(err)}")


cdef enum ReaderMode:
    READER_NEVER = 0
    READER_ALWAYS = 1
    READER_AUTO = 2

cdef int _reader_mode = READER_AUTO
_READER_MODES = {"never": READER_NEVER, "always": READER_ALWAYS, "auto": READER_AUTO}


def _use_reader_thread(mode) -> str:
    """How fd_signature and fd_digest read files of more than two slots:
    "auto" (default: a pipelining reader thread when a CPU looks idle),
    "always" (True) or "never" (False). Tests and benchmarks use it to run
    both paths. Returns the previous mode."""
    global _reader_mode
    if mode is True or mode is False:
        mode = "always" if mode else "never"
    if mode not in _READER_MODES:
        raise ValueError(f"reader mode must be auto, always or never, got {mode!r}")
    old = [k for k, v in _READER_MODES.items() if v == _reader_mode][0]
    _reader_mode = _READER_MODES[mode]
    return old


cdef inline bint _want_reader_thread() noexcept nogil:
    if _reader_mode == READER_AUTO:
        return sm_spare_cpu()
    return _reader_mode == READER_ALWAYS


cdef size_t _slot_for(size_t bs) noexcept nogil:
    """Slot size: a whole number of blocks near PIPE_SLOT (small enough to be
    hashed while it is still in cache), or 0 if blocks are too large for that."""
    if bs <= PIPE_SLOT:
        return PIPE_SLOT - PIPE_SLOT % bs
    if bs <= READ_CHUNK // 2:
        return bs
    return 0


def fd_signature(fd, length, block_size, with_weak, start=0):
    """Signature of the ``length`` bytes of an open file from offset
    ``start`` on, read with pread into one reused buffer, GIL released for
    the read+hash loop. Raises DeltaError if the file ends before."""
    cdef int cfd = _check_fd(fd)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    cdef uint64_t first = start
    cdef size_t bs = _check_block_size(block_size)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0, got {length!r}")
    cdef uint64_t total = length
    cdef size_t count = (total + bs - 1) // bs
    np = _numpy()
    strong = np.empty((count, 2), dtype=np.uint64)
    cdef uint64_t[:, ::1] strong_view = strong
    cdef uint32_t[::1] weak_view
    cdef uint32_t* weak_ptr = NULL
    weak = None
    if with_weak:
        weak = np.empty(count, dtype=np.uint32)
        weak_view = weak
        if count:
            weak_ptr = &weak_view[0]
    if count == 0:
        return weak, strong

    cdef uint64_t* strong_ptr = &strong_view[0, 0]
    cdef size_t slot = _slot_for(bs)
    cdef XXH3_state_t* state = NULL
    if slot == 0:
        state = XXH3_createState()
        if state == NULL:
            raise MemoryError("cannot allocate an XXH3 state")
    cdef unsigned char* buf
    try:
        buf = _take_buffer()
    except BaseException:
        XXH3_freeState(state)
        raise
    cdef sm_reader reader
    cdef const unsigned char* data
    cdef size_t got, want, pos, take, blk = 0
    cdef uint64_t off = 0, block_left = 0
    cdef bint short_read = False
    cdef bint threads, interrupted = False
    cdef size_t chunks = 0
    cdef WeakSums sums
    cdef XXH128_hash_t h
    with nogil:
        threads = total > 2 * PIPE_SLOT and _want_reader_thread()
        if slot:
            # slots hold whole blocks: one-shot hashes per block
            sm_reader_open(&reader, cfd, first, first + total, total, buf, READ_CHUNK, slot, threads)
            while off < total:
                if _interrupted(&chunks):
                    interrupted = True
                    break
                want = slot if total - off > slot else <size_t>(total - off)
                data = sm_reader_next(&reader, &got)
                if data == NULL:
                    break
                if got < want:
                    off += got
                    short_read = True
                    break
                sign_buffer(data, got, bs,
                            weak_ptr + blk if weak_ptr != NULL else NULL,
                            strong_ptr + 2 * blk)
                blk += (got + bs - 1) // bs
                off += got
        else:
            # blocks larger than a slot: stream each block through the slots
            sm_reader_open(&reader, cfd, first, first + total, total, buf, READ_CHUNK, READ_CHUNK // 2,
                           threads)
            while off < total:
                if _interrupted(&chunks):
                    interrupted = True
                    break
                data = sm_reader_next(&reader, &got)
                if data == NULL:
                    break
                pos = 0
                while pos < got:
                    if block_left == 0:
                        XXH3_128bits_reset(state)
                        sums.s1 = 0
                        sums.s2 = 0
                        block_left = bs if total - off > bs else total - off
                    take = got - pos if got - pos < block_left else <size_t>block_left
                    SM_XXH3_128_UPDATE(state, data + pos, take)
                    if weak_ptr != NULL:
                        weak_append(&sums, data + pos, take)
                    pos += take
                    off += take
                    block_left -= take
                    if block_left == 0:
                        h = XXH3_128bits_digest(state)
                        strong_ptr[2 * blk] = h.low64
                        strong_ptr[2 * blk + 1] = h.high64
                        if weak_ptr != NULL:
                            weak_ptr[blk] = _pack(sums.s1, sums.s2)
                        blk += 1
                if got == 0 or (off < total and got < READ_CHUNK // 2):
                    short_read = True
                    break
        sm_reader_close(&reader)
    XXH3_freeState(state)
    _give_buffer(buf)
    if interrupted:
        _reraise()
    if reader.err:
        _raise_read(cfd, reader.err, reader.next_off)
    if short_read:
        raise DeltaError(f"file (fd {cfd}) ended at byte {first + off} while its signature "
                         f"needs {first + total} B: it was truncated meanwhile")
    return weak, strong


def fd_digest(fd) -> bytes:
    """XXH3-128 of a whole open file (from offset 0 to its end), streamed
    through one reused buffer with the GIL released; 16 bytes canonical."""
    import os
    cdef int cfd = _check_fd(fd)
    cdef uint64_t size_hint = 0
    try:
        size_hint = os.fstat(cfd).st_size
    except OSError:
        pass                    # the read below reports the real problem
    cdef XXH3_state_t* state = XXH3_createState()
    if state == NULL:
        raise MemoryError("cannot allocate an XXH3 state")
    cdef unsigned char* buf
    try:
        buf = _take_buffer()
    except BaseException:
        XXH3_freeState(state)
        raise
    cdef sm_reader reader
    cdef const unsigned char* data
    cdef size_t got
    cdef bint threads, interrupted = False
    cdef size_t chunks = 0
    cdef XXH128_hash_t h
    cdef XXH128_canonical_t canon
    with nogil:
        threads = size_hint > 2 * PIPE_SLOT and _want_reader_thread()
        XXH3_128bits_reset(state)
        sm_reader_open(&reader, cfd, 0, <uint64_t>-1, size_hint, buf, READ_CHUNK, PIPE_SLOT,
                       threads)
        while True:
            if _interrupted(&chunks):
                interrupted = True
                break
            data = sm_reader_next(&reader, &got)
            if data == NULL or got == 0:
                break
            SM_XXH3_128_UPDATE(state, data, got)
        sm_reader_close(&reader)
        h = XXH3_128bits_digest(state)
    XXH3_freeState(state)
    _give_buffer(buf)
    if interrupted:
        _reraise()
    if reader.err:
        _raise_read(cfd, reader.err, reader.next_off)
    XXH128_canonicalFromHash(&canon, h)
    return bytes(canon.digest[:16])


# ------------------------------------------------------------ delta search

ctypedef struct Slot:
    uint32_t weak
    uint32_t index1          # block index + 1; 0 marks an empty slot

ctypedef struct Op:
    int64_t kind
    int64_t offset
    int64_t length

ctypedef struct OpList:
    Op* ops
    size_t count
    size_t capacity
    bint failed              # out of memory


cdef extern from *:
    """
    #define SM_MIX(w) ((uint64_t)(uint32_t)(w) * 0x9E3779B97F4A7C15ULL)

    /* Roll the window [pos, pos + n) one byte at a time until its weak sum
       passes the filter or the window starts at last; returns the new pos.
       Few live values and no data-dependent inner loop: this is the cost
       per byte of every changed region. */
    static inline size_t sm_roll(const unsigned char* src, size_t pos, size_t last,
                                 size_t n, uint32_t* s1p, uint32_t* s2p,
                                 const uint64_t* filter, int shift) {
        uint32_t s1 = *s1p, s2 = *s2p, len = (uint32_t)n;
        while (pos < last) {
            uint32_t out = src[pos], in = src[pos + n];
            s1 += in - out;
            s2 += s1 - len * out;
            pos++;
            uint64_t bit = SM_MIX((s1 & 0xffff) | (s2 << 16)) >> shift;
            if ((filter[bit >> 6] >> (bit & 63)) & 1) break;
        }
        *s1p = s1;
        *s2p = s2;
        return pos;
    }
    """
    size_t sm_roll(const unsigned char* src, size_t pos, size_t last, size_t n,
                   uint32_t* s1, uint32_t* s2, const uint64_t* filter, int shift) nogil


cdef inline uint64_t _mix(uint32_t weak) noexcept nogil:
    # Fibonacci hashing spreads the clustered rsync sums; table slots and
    # filter bits are the top bits of this product
    return <uint64_t>weak * 0x9E3779B97F4A7C15ULL


cdef void _emit(OpList* out, int64_t kind, int64_t offset, int64_t length) noexcept nogil:
    cdef Op* last
    cdef Op* grown
    if length <= 0 or out.failed:
        return
    if out.count:
        last = &out.ops[out.count - 1]
        if last.kind == kind and last.offset + last.length == offset:
            last.length += length
            return
    if out.count == out.capacity:
        grown = <Op*>realloc(out.ops, (out.capacity * 2 + 16) * sizeof(Op))
        if grown == NULL:
            out.failed = True
            return
        out.ops = grown
        out.capacity = out.capacity * 2 + 16
    out.ops[out.count].kind = kind
    out.ops[out.count].offset = offset
    out.ops[out.count].length = length
    out.count += 1


cdef inline bint _strong_is(const unsigned char* p, size_t n,
                            const uint64_t* strong, size_t index) noexcept nogil:
    cdef XXH128_hash_t h = SM_XXH3_128(p, n)
    return h.low64 == strong[2 * index] and h.high64 == strong[2 * index + 1]


cdef int _search(const unsigned char* src, size_t src_len, size_t bs,
                 uint64_t target_length, const uint32_t* weak, const uint64_t* strong,
                 Slot* table, int shift, size_t mask,
                 uint64_t* filter, int filter_shift, OpList* out) noexcept nogil:
    cdef size_t full = <size_t>(target_length // bs)
    cdef size_t tail_len = <size_t>(target_length % bs)
    cdef size_t pos = 0, lit_start = 0, slot, idx, j
    cdef int64_t prev = -1, matched
    cdef uint32_t s1 = 0, s2 = 0, w
    cdef bint have_sums = False, dup
    cdef uint64_t mixed, fbit
    cdef XXH128_hash_t h
    cdef bint have_h

    # table of full blocks; a block equal (weak and strong) to an earlier one
    # is left out, so runs of identical blocks do not lengthen the probes
    for j in range(full):
        w = weak[j]
        slot = _mix(w) >> shift
        dup = False
        while table[slot].index1:
            idx = table[slot].index1 - 1
            if (table[slot].weak == w and strong[2 * idx] == strong[2 * j]
                    and strong[2 * idx + 1] == strong[2 * j + 1]):
                dup = True
                break
            slot = (slot + 1) & mask
        if not dup:
            table[slot].weak = w
            table[slot].index1 = <uint32_t>(j + 1)
            fbit = _mix(w) >> filter_shift
            filter[fbit >> 6] |= 1ULL << (fbit & 63)

    if full:
        while pos + bs <= src_len:
            if not have_sums:
                s1 = 0
                s2 = 0
                sm_weak_impl(src + pos, bs, &s1, &s2)
                have_sums = True
            w = _pack(s1, s2)
            matched = -1
            # adjacent fast path: an unchanged run costs one weak + one strong
            if prev >= 0 and <size_t>(prev + 1) < full and weak[prev + 1] == w \
                    and _strong_is(src + pos, bs, strong, prev + 1):
                matched = prev + 1
            else:
                # a sparse bit filter (~1 bit in 16 set, L1/L2-resident)
                # turns away most rolling positions without probing: no
                # data-dependent loop, so the CPU overlaps the iterations
                mixed = _mix(w)
                fbit = mixed >> filter_shift
                if (filter[fbit >> 6] >> (fbit & 63)) & 1:
                    have_h = False
                    slot = mixed >> shift
                    while table[slot].index1:
                        if table[slot].weak == w:
                            if not have_h:
                                h = SM_XXH3_128(src + pos, bs)
                                have_h = True
                            idx = table[slot].index1 - 1
                            if h.low64 == strong[2 * idx] and h.high64 == strong[2 * idx + 1]:
                                matched = idx
                                break
                        slot = (slot + 1) & mask
            if matched >= 0:
                _emit(out, 1, lit_start, pos - lit_start)
                _emit(out, 0, matched * <int64_t>bs, bs)
                pos += bs
                lit_start = pos
                prev = matched
                have_sums = False
                continue
            prev = -1
            if pos + bs >= src_len:
                break
            pos = sm_roll(src, pos, src_len - bs, bs, &s1, &s2, filter, filter_shift)

    # the target's short last block can only match the source's tail
    if tail_len and src_len >= tail_len and src_len - tail_len >= lit_start:
        pos = src_len - tail_len
        if weak_of(src + pos, tail_len) == weak[full] and \
                _strong_is(src + pos, tail_len, strong, full):
            _emit(out, 1, lit_start, pos - lit_start)
            _emit(out, 0, full * <int64_t>bs, tail_len)
            lit_start = src_len
    _emit(out, 1, lit_start, src_len - lit_start)
    return 0


def delta_ops(src, block_size, target_length, weak, strong):
    """Rolling delta of ``src`` against a target signature. Returns merged
    ops: (0, target_offset, length) copies and (1, source_offset, length)
    literals, which rebuild ``src`` in order."""
    cdef const unsigned char[::1] view = _bytes_view(src, "delta_ops source")
    cdef size_t bs = _check_block_size(block_size)
    if not isinstance(target_length, int) or target_length < 0:
        raise ValueError(f"target_length must be an int >= 0, got {target_length!r}")
    cdef uint64_t tlen = target_length
    cdef uint64_t count = (tlen + bs - 1) // bs
    cdef const uint32_t[::1] weak_view
    cdef const uint64_t[:, ::1] strong_view
    try:
        weak_view = weak
    except (TypeError, ValueError, BufferError) as exc:
        raise DeltaError(f"weak checksums must be a contiguous uint32 array: {exc}") from None
    try:
        strong_view = strong
    except (TypeError, ValueError, BufferError) as exc:
        raise DeltaError(f"strong hashes must be a contiguous uint64 (n, 2) array: {exc}") from None
    if <uint64_t>weak_view.shape[0] != count or <uint64_t>strong_view.shape[0] != count \
            or strong_view.shape[1] != 2:
        raise DeltaError(f"a target of {tlen} B in {bs} B blocks has {count} blocks, but the "
                         f"signature has {weak_view.shape[0]} weak and "
                         f"{strong_view.shape[0]}x{strong_view.shape[1]} strong entries")
    if count >= 0xFFFFFFF0:
        raise DeltaError(f"signature of {count} blocks is too large; use larger blocks")

    cdef size_t full = <size_t>(tlen // bs)
    cdef size_t table_size = MIN_TABLE
    cdef int bits = 4
    # load <= 50%: a miss (the common case while rolling) ends in ~2 probes
    while table_size < 2 * full:
        table_size <<= 1
        bits += 1
    cdef size_t filter_bits = 1 << 16
    cdef int filter_log = 16
    while filter_bits < 32 * full:
        filter_bits <<= 1
        filter_log += 1
    cdef Slot* table = <Slot*>calloc(table_size, sizeof(Slot))
    cdef uint64_t* filter = <uint64_t*>calloc(filter_bits // 64, sizeof(uint64_t))
    if table == NULL or filter == NULL:
        free(table)
        free(filter)
        raise MemoryError(f"cannot allocate a {table_size}-slot block table")
    cdef OpList out
    out.ops = NULL
    out.count = 0
    out.capacity = 0
    out.failed = False
    cdef size_t src_len = view.shape[0]
    cdef const unsigned char* src_ptr = &view[0] if src_len else NULL
    cdef const uint32_t* weak_ptr = &weak_view[0] if count else NULL
    cdef const uint64_t* strong_ptr = &strong_view[0, 0] if count else NULL
    cdef size_t i
    try:
        with nogil:
            _search(src_ptr, src_len, bs, tlen, weak_ptr, strong_ptr,
                    table, 64 - bits, table_size - 1, filter, 64 - filter_log, &out)
        if out.failed:
            raise MemoryError("out of memory while building the delta")
        return [(out.ops[i].kind, out.ops[i].offset, out.ops[i].length)
                for i in range(out.count)]
    finally:
        free(table)
        free(filter)
        free(out.ops)
