/* The one xxHash set-up every kernel includes (first, before anything
   else includes xxhash.h): xxh_x86dispatch.c must be the first to include
   xxhash.h, as it defines XXH_X86DISPATCH, which sets the accumulator
   alignment the AVX2/AVX512 variants need. On x86 the SM_XXH3_* names are
   the runtime-dispatched variants (SSE2/AVX2/AVX512 picked with cpuid at
   load time, same results), so a module runs on any x86-64; elsewhere they
   are the plain inline XXH3. */
#ifndef SM_XXHASH_H
#define SM_XXHASH_H
#if defined(__x86_64__) || defined(__i386__)
#  undef XXH_INLINE_ALL
#  include "xxh_x86dispatch.c"
#  define SM_XXH3_64(p, n) XXH3_64bits_dispatch((p), (n))
#  define SM_XXH3_64_SEED(p, n, s) XXH3_64bits_withSeed_dispatch((p), (n), (s))
#  define SM_XXH3_128(p, n) XXH3_128bits_dispatch((p), (n))
#  define SM_XXH3_128_UPDATE(s, p, n) XXH3_128bits_update_dispatch((s), (p), (n))
#else
#  ifndef XXH_INLINE_ALL
#    define XXH_INLINE_ALL
#  endif
#  include "xxhash.h"
#  define SM_XXH3_64(p, n) XXH3_64bits((p), (n))
#  define SM_XXH3_64_SEED(p, n, s) XXH3_64bits_withSeed((p), (n), (s))
#  define SM_XXH3_128(p, n) XXH3_128bits((p), (n))
#  define SM_XXH3_128_UPDATE(s, p, n) XXH3_128bits_update((s), (p), (n))
#endif
#endif
