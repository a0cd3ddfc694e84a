/* Native MX quantizers for mxfx.formats: bit-identical to the torch code in dual_level.py / mx.py.
 *
 * Plain C99, C ABI over raw pointers; the input is a contiguous [rows, k] array of bf16 or fp16 bit
 * patterns (uint16). Callers parallelize over row ranges. Build: -O3 -march=native, never -ffast-math
 * (every fp32 operation here must be the IEEE one torch performs: real divisions, no FMA contraction,
 * subnormals kept).
 *
 * A short last block (k not a multiple of the block) counts as zero padded, as blocks.split_blocks
 * does, and only its valid outputs are written. The kernels run on their callers' and OpenMP threads,
 * whose stacks may be small (musl: 128 KiB): no large local buffers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MXFX_ABI_VERSION 4

enum { RM_RINT = 0, RM_ROUND = 1, RM_FLOOR = 2 };
enum { ALG_FLOOR = 0, ALG_OCP = 1, ALG_RCEIL = 2 };
enum { FMT_E4M3 = 0, FMT_E2M1 = 1 };

#define INLINE static inline __attribute__((always_inline))

int64_t mxfx_abi_version(void) { return MXFX_ABI_VERSION; }

/* Range c of `chunks` over `total` items in whole units: [*start, *start + *count). The entry points run
   their chunks on OpenMP threads, which are torch's own (the process loads one libgomp): a pool of our
   own would compete with torch's threads, which spin after each of torch's parallel regions. */
INLINE void chunk_range(int64_t total, int64_t unit, int chunks, int c, int64_t *start, int64_t *count) {
    int64_t units = (total + unit - 1) / unit, a = unit * (units * c / chunks), b = unit * (units * (c + 1) / chunks);
    *start = a < total ? a : total;
    *count = (b < total ? b : total) - *start;
}

INLINE float f32_of(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
INLINE uint32_t bits_of(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

/* ---- input dtype <-> fp32 (f16 = 1: IEEE half, f16 = 0: bfloat16) ---- */

INLINE float half_to_f32(uint32_t h) {
    /* exact (FP16 library / c10 fp16_ieee_to_fp32_value) */
    uint32_t w = h << 16, sign = w & 0x80000000u, two_w = w + w;
    float normalized = f32_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    float denormalized = f32_of((two_w >> 17) | (126u << 23)) - 0.5f;
    return f32_of(sign | (two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized)));
}

INLINE uint32_t f32_to_half(float f) {
    /* round to nearest even, overflow to inf (c10 fp16_ieee_from_fp32_value); NaN -> a quiet NaN */
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t w = bits_of(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = f32_of((bias >> 1) + 0x07800000u) + base;
    uint32_t b = bits_of(base);
    uint32_t nonsign = ((b >> 13) & 0x7C00u) + (b & 0x0FFFu);
    return (sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign);
}

INLINE uint32_t f32_to_bf16(float f) {
    /* round to nearest even on the fp32 bits; NaN -> a quiet NaN */
    uint32_t b = bits_of(f);
    uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    return (b & 0x7FFFFFFFu) > 0x7F800000u ? ((b >> 16) | 0x40u) : r;
}

INLINE float in_to_f32(uint32_t v, int f16) { return f16 ? half_to_f32(v) : f32_of(v << 16); }
INLINE uint32_t f32_to_in(float f, int f16) { return f16 ? f32_to_half(f) : f32_to_bf16(f); }
/* |x| bit pattern at or above which a value is inf/NaN */
INLINE uint32_t inf_bits(int f16) { return f16 ? 0x7C00u : 0x7F80u; }

/* ---- element codecs ---- */

/* rint for k >= 0 (or NaN): exact under the default round-to-nearest-even mode */
INLINE float rint_pos(float k) { return k < 0x1.0p23f ? (k + 0x1.0p23f) - 0x1.0p23f : k; }
INLINE float floor_pos(float k) { float t = rint_pos(k); return t > k ? t - 1.0f : t; }
INLINE float ceil_pos(float k) { float t = rint_pos(k); return t < k ? t + 1.0f : t; }

/* E2M1 code of an fp32 value, exactly as elements._e2m1_encode_arith computes it */
INLINE uint32_t e2m1_code(float v, int rm) {
    uint32_t b = bits_of(v);
    uint32_t neg = b >> 31;
    float a = f32_of(b & 0x7FFFFFFFu);
    int isnan = (b & 0x7FFFFFFFu) > 0x7F800000u;
    float big = (a >= 2.0f ? 1.0f : 0.0f) + (a >= 4.0f ? 1.0f : 0.0f);
    float k = a * (a >= 4.0f ? 0.5f : (a >= 2.0f ? 1.0f : 2.0f)); /* a / spacing, exact */
    float r;
    if (rm == RM_RINT)
        r = rint_pos(k);
    else if (rm == RM_ROUND)
        r = floor_pos(k + 0.5f);
    else
        r = neg ? ceil_pos(k) : floor_pos(k);
    float c = r + 2.0f * big;
    c = c > 7.0f ? 7.0f : c;
    c = isnan ? 0.0f : c;
    return (uint32_t)(int32_t)c | ((neg & (uint32_t)!isnan) << 3);
}

/* The same E2M1 code for a value known to be finite with |v| < 8 and at most 11 significant bits (a
   bf16 or fp16 value times a power of two, so that the k + 0.5 of "round" is exact): round the
   significand to one fraction bit on the integer bits (a >= 1), or compare against the half-way
   points of the spacing-0.5 range (a < 1). */
INLINE uint32_t e2m1_code_fast(float v, int rm) {
    /* compares on the magnitude bits (ordered like the values; integer compares never trap) */
    uint32_t b = bits_of(v), a = b & 0x7FFFFFFFu, neg = b >> 31;
    uint32_t add, sub;
    if (rm == RM_RINT) { /* thresholds 0.25 (tie to 0) and 0.75 (tie to 1.0) */
        add = 0x1FFFFFu + ((a >> 22) & 1u);
        sub = (a > 0x3E800000u ? 1u : 0u) + (a >= 0x3F400000u ? 1u : 0u);
    } else if (rm == RM_ROUND) {
        add = 0x200000u;
        sub = (a >= 0x3E800000u ? 1u : 0u) + (a >= 0x3F400000u ? 1u : 0u);
    } else { /* signed floor: the magnitude of a negative value rounds up */
        add = neg ? 0x3FFFFFu : 0u;
        sub = neg ? (a > 0u ? 1u : 0u) + (a > 0x3F000000u ? 1u : 0u) : (a >= 0x3F000000u ? 1u : 0u);
    }
    uint32_t nrm = ((a + add) >> 22) - 252u; /* (exponent, fraction bit) - (127, 0) + 2 */
    nrm = nrm < 7u ? nrm : 7u;
    return (a < 0x3F800000u ? sub : nrm) | (neg << 3);
}

/* E4M3 byte of an fp32 value (not NaN), saturating to +-448, round half to even: the clamp to 448
   followed by c10's fp8e4m3fn_from_fp32_value, done on the magnitude bits */
INLINE uint32_t e4m3_code(float v) {
    uint32_t b = bits_of(v), sign = (b >> 24) & 0x80u, a = b & 0x7FFFFFFFu;
    a = a < 0x43E00000u ? a : 0x43E00000u; /* |v| <= 448 */
    uint32_t normal = (a + (0x7FFFFu - (120u << 23)) + ((a >> 20) & 1u)) >> 20;
    uint32_t denorm = bits_of(f32_of(a) + f32_of(141u << 23)) - (141u << 23);
    return (a < (121u << 23) ? denorm : normal) | sign;
}

/* 2**(127 - byte) as fp32 (e8m0.pow2_reciprocal), byte < 255 */
INLINE float pow2_reciprocal(uint32_t byte) {
    int32_t e = 254 - (int32_t)byte;
    return f32_of(e > 0 ? (uint32_t)e << 23 : 0x00400000u);
}

/* ---- single-level MX (mx.quantize_mx) ---- */

/* 32 values scaled by recip and encoded: E4M3 bytes (32) or packed E2M1 (16 bytes), AND keep */
INLINE void encode32(const uint16_t *restrict x, float recip, uint32_t keep, int f16, int fmt, int rm,
                     uint8_t *restrict q) {
    if (fmt == FMT_E4M3) {
        for (int i = 0; i < 32; i++) {
            /* (bf16 input: torch rounds v to bf16 first; v is exact unless |v| < 2**-126, which E4M3
               rounds to a signed zero either way, so that rounding is skipped here) */
            float v = in_to_f32(x[i], f16) * recip;
            q[i] = (uint8_t)(e4m3_code(v) & keep);
        }
    } else {
        uint32_t c[32];
        for (int i = 0; i < 32; i++) {
            float v = in_to_f32(x[i], f16) * recip;
            if (!f16) v = f32_of(f32_to_bf16(v) << 16); /* bf16 * bf16 rounds to bf16 */
            /* |v| < 8 in a finite block (its exponent is at most emax + 127 - byte); NaN only where
               keep == 0 */
            c[i] = e2m1_code_fast(v, rm) & keep;
        }
        for (int i = 0; i < 16; i++) q[i] = (uint8_t)(c[2 * i] | (c[2 * i + 1] << 4));
    }
}

#define GROUP 16 /* blocks whose scales are computed together */

/* m[g] = max of a[32 g .. 32 g + 31] for g < 16, by folding neighbours (vectorizes without a horizontal
   reduction per block); a is clobbered */
INLINE void fold_max16(uint32_t *restrict a, uint32_t *restrict m) {
    uint32_t b[256];
    for (int j = 0; j < 256; j++) b[j] = a[2 * j] > a[2 * j + 1] ? a[2 * j] : a[2 * j + 1];
    for (int j = 0; j < 128; j++) a[j] = b[2 * j] > b[2 * j + 1] ? b[2 * j] : b[2 * j + 1];
    for (int j = 0; j < 64; j++) b[j] = a[2 * j] > a[2 * j + 1] ? a[2 * j] : a[2 * j + 1];
    for (int j = 0; j < 32; j++) a[j] = b[2 * j] > b[2 * j + 1] ? b[2 * j] : b[2 * j + 1];
    for (int j = 0; j < 16; j++) m[j] = a[2 * j] > a[2 * j + 1] ? a[2 * j] : a[2 * j + 1];
}

/* E8M0 byte of a block from its abs-max bits m (e8m0.shared_scale_bytes); branch-free */
INLINE uint32_t scale_byte(uint32_t m, int f16, int fmt, int alg) {
    float amax = in_to_f32(m, f16);
    uint32_t byte;
    if (alg == ALG_RCEIL) {
        uint32_t s = bits_of(amax * (fmt == FMT_E4M3 ? (float)(1.0 / 448.0) : (float)(1.0 / 6.0)));
        uint32_t e = (s >> 23) & 0xFFu, mant = s & 0x7FFFFFu;
        uint32_t up = ((e - 1u < 253u) & (mant > 0)) | ((e == 0) & (mant > (1u << 22)));
        byte = e + up;
    } else {
        int32_t e = (int32_t)(bits_of(amax) >> 23) - (fmt == FMT_E4M3 ? 8 : 2);
        byte = e > 0 ? (uint32_t)e : 0;
    }
    return m >= inf_bits(f16) ? 0xFFu : byte;
}

/* The scale byte of a block from its abs-max bits, with the multiplier and AND mask its elements are
   encoded with: an inf/NaN block scales every element to NaN, which encodes as 0, so keep = 0. */
INLINE uint8_t block_scale(uint32_t m, int f16, int fmt, int alg, float *recip, uint32_t *keep) {
    uint32_t byte = scale_byte(m, f16, fmt, alg);
    *keep = byte == 0xFFu ? 0u : 0xFFu;
    uint32_t zero = (byte == 0xFFu) | ((alg == ALG_FLOOR) & (byte == 0));
    *recip = zero ? 0.0f : pow2_reciprocal(byte);
    return (uint8_t)byte;
}

/* GROUP consecutive blocks of bs values (bs a multiple of 32, <= 1024) */
INLINE void mx_group(const uint16_t *restrict x, int bs, int f16, int fmt, int alg, int rm,
                     uint8_t *restrict q, uint8_t *restrict scale) {
    uint32_t a[32 * GROUP], m[GROUP], keep[GROUP];
    float recip[GROUP];
    for (int g = 0; g < GROUP; g++) {
        for (int i = 0; i < 32; i++) a[32 * g + i] = x[g * bs + i] & 0x7FFFu;
        for (int j = 1; j < bs / 32; j++)
            for (int i = 0; i < 32; i++) {
                uint32_t v = x[g * bs + 32 * j + i] & 0x7FFFu;
                a[32 * g + i] = v > a[32 * g + i] ? v : a[32 * g + i];
            }
    }
    fold_max16(a, m);
    for (int g = 0; g < GROUP; g++) scale[g] = block_scale(m[g], f16, fmt, alg, &recip[g], &keep[g]);
    int qb = fmt == FMT_E4M3 ? bs : bs / 2;
    for (int g = 0; g < GROUP; g++)
        for (int j = 0; j < bs / 32; j++)
            encode32(x + g * bs + 32 * j, recip[g], keep[g], f16, fmt, rm, q + g * qb + (fmt == FMT_E4M3 ? 32 : 16) * j);
}

/* One block of n <= bs values (n < bs: a row's ragged last block, whose zero padding changes neither its
   abs-max nor its valid codes); a last partial 32 values go through a zero-padded 32-value buffer. */
INLINE void mx_block(const uint16_t *restrict x, int n, int f16, int fmt, int alg, int rm, uint8_t *restrict q,
                     uint8_t *restrict scale) {
    int whole = n & ~31, qb = fmt == FMT_E4M3 ? 32 : 16;
    uint16_t part[32] = {0};
    memcpy(part, x + whole, (size_t)(n - whole) * 2);
    uint32_t a[32], m = 0, keep;
    for (int i = 0; i < 32; i++) a[i] = part[i] & 0x7FFFu;
    for (int j = 0; j < whole; j += 32)
        for (int i = 0; i < 32; i++) {
            uint32_t v = x[j + i] & 0x7FFFu;
            a[i] = v > a[i] ? v : a[i];
        }
    for (int i = 0; i < 32; i++) m = a[i] > m ? a[i] : m;
    float recip;
    *scale = block_scale(m, f16, fmt, alg, &recip, &keep);
    for (int j = 0; j < whole; j += 32) encode32(x + j, recip, keep, f16, fmt, rm, q + qb * (j / 32));
    if (whole < n) {
        uint8_t qpart[32];
        encode32(part, recip, keep, f16, fmt, rm, qpart);
        memcpy(q + qb * (whole / 32), qpart, (size_t)(fmt == FMT_E4M3 ? n - whole : (n - whole) / 2));
    }
}

/* n consecutive complete blocks: GROUP at a time, the last n % GROUP one by one */
INLINE void mx_blocks(const uint16_t *restrict x, int64_t n, int bs, int f16, int fmt, int alg, int rm,
                      uint8_t *restrict q, uint8_t *restrict scale) {
    int64_t qb = fmt == FMT_E4M3 ? bs : bs / 2, g = 0;
    for (; g + GROUP <= n; g += GROUP) mx_group(x + g * bs, bs, f16, fmt, alg, rm, q + g * qb, scale + g);
    for (; g < n; g++) mx_block(x + g * bs, bs, f16, fmt, alg, rm, q + g * qb, scale + g);
}

INLINE void mx_rows(const uint16_t *restrict x, int64_t rows, int64_t k, int bs, int f16, int fmt, int alg,
                    int rm, uint8_t *restrict q, uint8_t *restrict scale) {
    if (k % bs == 0) { /* the blocks of all rows are one contiguous sequence */
        mx_blocks(x, rows * (k / bs), bs, f16, fmt, alg, rm, q, scale);
        return;
    }
    int64_t nb = k / bs + 1, full = k / bs, qrow = fmt == FMT_E4M3 ? k : k / 2;
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * k;
        uint8_t *qr = q + r * qrow, *sr = scale + r * nb;
        mx_blocks(xr, full, bs, f16, fmt, alg, rm, qr, sr);
        mx_block(xr + full * bs, (int)(k - full * bs), f16, fmt, alg, rm,
                 qr + (fmt == FMT_E4M3 ? full * bs : full * bs / 2), sr + full);
    }
}

/* specializations: block size is runtime, everything else a compile-time constant */
#define MX_CASE(F16, FMT, ALG, RM) mx_rows(x + r0 * k, n, k, (int)bs, F16, FMT, ALG, RM, q + r0 * qrow, scale + r0 * nb)
#define MX_ALGS(F16, FMT, RM)                                                   \
    do {                                                                        \
        if (alg == ALG_FLOOR) MX_CASE(F16, FMT, ALG_FLOOR, RM);                 \
        else if (alg == ALG_OCP) MX_CASE(F16, FMT, ALG_OCP, RM);                \
        else MX_CASE(F16, FMT, ALG_RCEIL, RM);                                  \
    } while (0)
#define MX_ENTRY(NAME, F16)                                                                          \
    int NAME(const uint16_t *x, int64_t rows, int64_t k, int64_t bs, int fmt, int alg, int rm,        \
             uint8_t *q, uint8_t *scale, int chunks) {                                               \
        if (bs <= 0 || bs % 32 || bs > 1024 || k <= 0 || rows < 0 || chunks < 1) return -1;           \
        if (fmt != FMT_E4M3 && k % 2) return -1;                                                     \
        int64_t qrow = fmt == FMT_E4M3 ? k : k / 2, nb = (k + bs - 1) / bs;                          \
        _Pragma("omp parallel for num_threads(chunks) schedule(static) if(chunks > 1)")              \
        for (int c = 0; c < chunks; c++) {                                                           \
            int64_t r0, n;                                                                           \
            chunk_range(rows, 1, chunks, c, &r0, &n);                                                \
            if (fmt == FMT_E4M3) MX_ALGS(F16, FMT_E4M3, RM_RINT);                                    \
            else if (rm == RM_RINT) MX_ALGS(F16, FMT_E2M1, RM_RINT);                                 \
            else if (rm == RM_ROUND) MX_ALGS(F16, FMT_E2M1, RM_ROUND);                               \
            else MX_ALGS(F16, FMT_E2M1, RM_FLOOR);                                                   \
        }                                                                                            \
        return 0;                                                                                    \
    }

MX_ENTRY(mx_quant_bf16, 0)
MX_ENTRY(mx_quant_fp16, 1)

/* ---- dual-level MX (dual_level.quantize_dual_level) ---- */

/* level0 of a 512-block: max |x| over its finite values times fp32(1/6), 0 where not a normal fp32;
   -1 when the block holds an inf or NaN (so that the fast path is not taken; callers store max(l, 0)) */
INLINE float dual_level0(const uint16_t *restrict x, int f16) {
    const uint32_t inf = inf_bits(f16);
    uint32_t acc[32], all[32]; /* (not "= {0}": gcc 12 then does not vectorize the loop) */
    for (int i = 0; i < 32; i++) acc[i] = all[i] = 0;
    for (int j = 0; j < 16; j++)
        for (int i = 0; i < 32; i++) {
            uint32_t a = x[32 * j + i] & 0x7FFFu, f = a < inf ? a : 0; /* (no reassignment: gcc
                                                                           would not vectorize) */
            all[i] = a > all[i] ? a : all[i];
            acc[i] = f > acc[i] ? f : acc[i];
        }
    uint32_t m = 0, m_all = 0;
    for (int i = 0; i < 32; i++) {
        m = acc[i] > m ? acc[i] : m;
        m_all = all[i] > m_all ? all[i] : m_all;
    }
    int nonfinite = m_all >= inf;
    float l0 = in_to_f32(m, f16) * f32_of(0x3E2AAAABu);
    l0 = l0 < 0x1.0p-126f ? 0.0f : l0;
    return nonfinite ? -l0 : l0; /* -0.0f for l0 == 0 */
}

/* One 512-block, padded; nsub = number of 32-blocks to emit (16 except in a tail). */
INLINE void dual_block(const uint16_t *restrict x, int nsub, int f16, int rm, uint8_t *restrict q,
                       float *restrict level0, uint8_t *restrict level1) {
    const uint32_t inf = inf_bits(f16);
    float l0 = dual_level0(x, f16);
    l0 = __builtin_fabsf(l0); /* (dual_level0 flags inf/NaN blocks by the sign) */
    *level0 = l0;
    for (int s = 0; s < nsub; s++) {
        const uint16_t *xs = x + 32 * s;
        uint32_t t[32];
        uint32_t m1 = 0;
        for (int i = 0; i < 32; i++) {
            uint32_t xi = xs[i];
            uint32_t ti = f32_to_in(in_to_f32(xi, f16) / l0, f16); /* IEEE fp32 division */
            ti = (xi & 0x7FFFu) == 0 ? xi : ti;                    /* x == 0 keeps x (no 0/0) */
            t[i] = ti;
            uint32_t a = ti & 0x7FFFu;
            m1 = a > m1 ? a : m1;
        }
        uint8_t *qs = q + 16 * s;
        if (m1 >= inf) {
            level1[s] = 0xFF;
            memset(qs, 0, 16);
            continue;
        }
        int32_t e = (int32_t)(bits_of(in_to_f32(m1, f16)) >> 23);
        uint32_t byte = e > 2 ? (uint32_t)(e - 2) : 0;
        level1[s] = (uint8_t)byte;
        float recip = e == 0 ? 0.0f : pow2_reciprocal(byte);
        uint32_t c[32];
        for (int i = 0; i < 32; i++) {
            float v = in_to_f32(t[i], f16) * recip;
            if (!f16) v = f32_of(f32_to_bf16(v) << 16);
            c[i] = e2m1_code(v, rm);
        }
        for (int i = 0; i < 16; i++) qs[i] = (uint8_t)(c[2 * i] | (c[2 * i + 1] << 4));
    }
}

/* A bf16 512-block whose values are all finite and whose level0 is a normal fp32 number (the common
   case): every quotient is finite with |t| <= 6, so no x == 0 select is needed, no 32-block is
   inf/NaN, the level-1 multiplier is 0 or >= 1 and t * multiplier is exact (no bf16 rounding). */
INLINE void dual_block_fast_bf16(const uint16_t *restrict x, float l0, int rm, uint8_t *restrict q,
                                 uint8_t *restrict level1) {
    uint32_t t[512], a[512], m[16], c[512];
    float recip[16];
    for (int i = 0; i < 512; i++) {
        uint32_t b = bits_of(f32_of((uint32_t)x[i] << 16) / l0); /* IEEE fp32 division */
        uint32_t tb = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;    /* to bf16, nearest even */
        t[i] = tb;
        a[i] = tb & 0x7FFFFFFFu;
    }
    fold_max16(a, m);
    for (int s = 0; s < 16; s++) {
        uint32_t e = m[s] >> 23;
        uint32_t byte = e > 2u ? e - 2u : 0u;
        level1[s] = (uint8_t)byte;
        recip[s] = e == 0 ? 0.0f : pow2_reciprocal(byte);
    }
    for (int s = 0; s < 16; s++)
        for (int i = 0; i < 32; i++) c[32 * s + i] = e2m1_code_fast(f32_of(t[32 * s + i]) * recip[s], rm);
    for (int i = 0; i < 256; i++) q[i] = (uint8_t)(c[2 * i] | (c[2 * i + 1] << 4));
}

INLINE void dual_rows(const uint16_t *restrict x, int64_t rows, int64_t k, int f16, int rm, uint8_t *restrict q,
                      float *restrict level0, uint8_t *restrict level1) {
    int64_t nb0 = (k + 511) / 512, nb1 = (k + 31) / 32, full = k / 512;
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * k;
        uint8_t *qr = q + r * (k / 2), *l1 = level1 + r * nb1;
        float *l0 = level0 + r * nb0;
        for (int64_t b = 0; b < full; b++) {
            const uint16_t *xb = xr + 512 * b;
            if (!f16) {
                float l = dual_level0(xb, f16);
                if (l > 0.0f) {
                    l0[b] = l;
                    dual_block_fast_bf16(xb, l, rm, qr + 256 * b, l1 + 16 * b);
                    continue;
                }
            }
            dual_block(xb, 16, f16, rm, qr + 256 * b, l0 + b, l1 + 16 * b);
        }
        if (full < nb0) {
            uint16_t buf[512];
            uint8_t qbuf[256], l1buf[16];
            int64_t rest = k - 512 * full;
            int nsub = (int)((rest + 31) / 32);
            memset(buf, 0, sizeof buf);
            memcpy(buf, xr + 512 * full, (size_t)rest * 2);
            dual_block(buf, nsub, f16, rm, qbuf, l0 + full, l1buf);
            memcpy(qr + 256 * full, qbuf, (size_t)rest / 2);
            memcpy(l1 + 16 * full, l1buf, (size_t)nsub);
        }
    }
}

#define DUAL_CASE(F16, RM) \
    dual_rows(x + r0 * k, n, k, F16, RM, q + r0 * (k / 2), level0 + r0 * ((k + 511) / 512), level1 + r0 * ((k + 31) / 32))
#define DUAL_ENTRY(NAME, F16)                                                                                   \
    int NAME(const uint16_t *x, int64_t rows, int64_t k, int rm, uint8_t *q, float *level0, uint8_t *level1,     \
             int chunks) {                                                                                      \
        if (k <= 0 || k % 2 || rows < 0 || chunks < 1) return -1;                                               \
        _Pragma("omp parallel for num_threads(chunks) schedule(static) if(chunks > 1)")                         \
        for (int c = 0; c < chunks; c++) {                                                                      \
            int64_t r0, n;                                                                                      \
            chunk_range(rows, 1, chunks, c, &r0, &n);                                                           \
            if (rm == RM_RINT) DUAL_CASE(F16, RM_RINT);                                                         \
            else if (rm == RM_ROUND) DUAL_CASE(F16, RM_ROUND);                                                  \
            else DUAL_CASE(F16, RM_FLOOR);                                                                      \
        }                                                                                                       \
        return 0;                                                                                               \
    }

DUAL_ENTRY(dual_level_quant_bf16, 0)
DUAL_ENTRY(dual_level_quant_fp16, 1)

/* ---- test hook: the E2M1 encoder on fp32 values ---- */
void e2m1_encode_f32(const float *x, int64_t n, int rm, uint8_t *codes) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        codes[i] = (uint8_t)(rm == RM_RINT ? e2m1_code(v, RM_RINT)
                             : rm == RM_ROUND ? e2m1_code(v, RM_ROUND) : e2m1_code(v, RM_FLOOR));
    }
}

/* ---- quantized matmuls from packed operands (mxfx.ops.matmul) ----
 *
 * out[m, n] (fp32) of an MX matmul, reading the weight's packed bytes (FP4 nibbles or E4M3 bytes, ND or
 * FRACTAL_NZ) and its E8M0 scales where they lie; nothing is decoded ahead of the call. The order of the
 * arithmetic, on both paths (AVX512-BF16 and portable C) alike:
 *   p[g]  = the 32 products of group g summed in fp32 from 0, pair by pair in the pairing below, the high
 *           element of a pair added before the low one (VDPBF16PS's order, Intel SDM); every product of
 *           two FP4/FP8 values is exact in fp32, and so is the whole sum for FP4 x FP4;
 *   single level (npu_quant_matmul):  acc = 0; for g in order: acc = acc + (p[g] * sa[m, g]) * sb[n, g]
 *   dual level: for each level-0 group G: acc0 = 0; for g in G: acc0 = acc0 + (p[g] * sa) * sb;
 *               acc = acc + (l0a[m, G] * l0b[G, n]) * acc0        (acc = 0 before the first G)
 * as the ops-nn golden orders the groups and scales. Pairing (which two elements share a bf16 pair, set
 * by the weight's format): FP4, in each 8 elements 0..7 the pairs (t, t + 4); E4M3, in each 4 elements
 * the pairs (t, t + 2). The activation is handed in already decoded to bf16 pairs in that pairing
 * (mx_pairs, once per call); E8M0 bytes decode as 2**(b - 127), 0xFF as NaN.
 *
 * Weight bytes: byte (n, c) at b + (n / 16) * s_nb + (n % 16) * s_n + (c / c0) * s_cb + c % c0 (ND: s_nb =
 * 16 s_n, c0 larger than a row, s_cb = 0; NZ: the fractal strides; c0 a power of two, so that no division
 * is done per group). Weight scale (n, g) at
 * sb + n * sb_n + (g / 2) * sb_p + (g % 2) * sb_2, of which sb_limit bytes from sb are readable.
 * Callers split n over threads in multiples of 16 (one lane per n, 16 n at a time).
 */

#define PAIRS 16 /* bf16 pairs per 32-group */
#define CHUNK 16 /* groups decoded at once: one level-0 group of 512 */
#define ROWS 8   /* activation rows whose partial sums are computed together */
#define WBLOCK (CHUNK * PAIRS * 16) /* one 16-lane block's decoded chunk (uint32 pairs) */
#define PBLOCK (ROWS * CHUNK * 16)  /* a block's partial sums (floats) */

INLINE float bf16_f32(uint32_t h) { return f32_of(h << 16); }

INLINE uint32_t e2m1_bf16(uint32_t code) {
    static const uint16_t values[16] = {0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
                                        0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0};
    return values[code & 15u];
}

INLINE uint32_t e4m3_bf16(uint32_t byte) {
    uint32_t mag = byte & 0x7Fu, sign = (byte & 0x80u) << 8;
    uint32_t r = mag == 0x7Fu ? 0x7FC0u                                    /* NaN */
                 : mag >= 8u  ? (mag << 4) + (120u << 7)                    /* normal: rebias the exponent */
                              : bits_of((float)mag * 0x1.0p-9f) >> 16;     /* subnormal, exact */
    return r | sign;
}

INLINE float e8m0_f32(uint32_t byte) {
    return f32_of(byte == 0xFFu ? 0x7FC00000u : byte == 0 ? 0x00400000u : byte << 23);
}

/* element index of the low half of pair kp (the high half is + half) for a weight format */
INLINE int64_t pair_low(int64_t kp, int fmt_w) {
    return fmt_w == FMT_E2M1 ? 8 * (kp >> 2) + (kp & 3) : 4 * (kp >> 1) + (kp & 1);
}
INLINE int64_t pair_half(int fmt_w) { return fmt_w == FMT_E2M1 ? 4 : 2; }

typedef struct {
    const uint8_t *b;
    int64_t s_n, s_nb, s_cb, c0, kbytes; /* kbytes: valid bytes of a weight row; c0 a power of two */
    int c0_log2;
    const uint8_t *sb;
    int64_t sb_n, sb_p, sb_2, sb_limit;
    int fmt;
} weight_t;

INLINE const uint8_t *weight_byte(const weight_t *w, int64_t n, int64_t c) {
    return w->b + (n >> 4) * w->s_nb + (n & 15) * w->s_n + (c >> w->c0_log2) * w->s_cb + (c & (w->c0 - 1));
}

INLINE int64_t scale_offset(const weight_t *w, int64_t n, int64_t g) {
    return n * w->sb_n + (g >> 1) * w->sb_p + (g & 1) * w->sb_2;
}

/* Group g of lanes n0 .. n0 + lanes - 1 decoded to bf16 pairs dst[kp * 16 + lane] (zero past k or the
   lanes), one element at a time. */
static void decode_group_scalar(const weight_t *w, int64_t n0, int lanes, int64_t g, int64_t k,
                                uint32_t *restrict dst) {
    int64_t half = pair_half(w->fmt);
    for (int kp = 0; kp < PAIRS; kp++)
        for (int l = 0; l < 16; l++) {
            uint32_t v[2] = {0, 0};
            for (int i = 0; i < 2 && l < lanes; i++) {
                int64_t e = 32 * g + pair_low(kp, w->fmt) + i * half;
                if (e >= k) continue;
                v[i] = w->fmt == FMT_E2M1 ? e2m1_bf16(*weight_byte(w, n0 + l, e >> 1) >> (4 * (e & 1)))
                                          : e4m3_bf16(*weight_byte(w, n0 + l, e));
            }
            dst[kp * 16 + l] = v[0] | (v[1] << 16);
        }
}

static void decode_scales_scalar(const weight_t *w, int64_t n0, int lanes, int64_t g, float *restrict dst) {
    for (int l = 0; l < 16; l++) dst[l] = l < lanes ? e8m0_f32(w->sb[scale_offset(w, n0 + l, g)]) : 0.0f;
}

/* partial sums p[r][g][lane] of rows r < rows, groups g < gc of the chunk starting at group g_first */
static void partials_scalar(const uint32_t *act, int64_t lda, int rows, int64_t g_first, int gc,
                            const uint32_t *restrict wbuf, float *restrict pbuf) {
    for (int r = 0; r < rows; r++)
        for (int g = 0; g < gc; g++) {
            const uint32_t *a = act + r * lda + (g_first + g) * PAIRS, *wg = wbuf + g * PAIRS * 16;
            float p[16];
            for (int l = 0; l < 16; l++) p[l] = 0.0f;
            for (int kp = 0; kp < PAIRS; kp++) {
                float hi = bf16_f32(a[kp] >> 16), lo = bf16_f32(a[kp] & 0xFFFFu);
                for (int l = 0; l < 16; l++) {
                    uint32_t b = wg[kp * 16 + l];
                    p[l] = p[l] + hi * bf16_f32(b >> 16);
                    p[l] = p[l] + lo * bf16_f32(b & 0xFFFFu);
                }
            }
            memcpy(pbuf + (r * CHUNK + g) * 16, p, sizeof p);
        }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_BF16_DOT 1

/* E4M3 magnitudes 0 .. 127 as bf16 (127: NaN) */
static const uint16_t E4M3_BF16[128] __attribute__((aligned(64))) = {
    0x0000, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60, 0x3C80, 0x3C90, 0x3CA0, 0x3CB0,
    0x3CC0, 0x3CD0, 0x3CE0, 0x3CF0, 0x3D00, 0x3D10, 0x3D20, 0x3D30, 0x3D40, 0x3D50, 0x3D60, 0x3D70,
    0x3D80, 0x3D90, 0x3DA0, 0x3DB0, 0x3DC0, 0x3DD0, 0x3DE0, 0x3DF0, 0x3E00, 0x3E10, 0x3E20, 0x3E30,
    0x3E40, 0x3E50, 0x3E60, 0x3E70, 0x3E80, 0x3E90, 0x3EA0, 0x3EB0, 0x3EC0, 0x3ED0, 0x3EE0, 0x3EF0,
    0x3F00, 0x3F10, 0x3F20, 0x3F30, 0x3F40, 0x3F50, 0x3F60, 0x3F70, 0x3F80, 0x3F90, 0x3FA0, 0x3FB0,
    0x3FC0, 0x3FD0, 0x3FE0, 0x3FF0, 0x4000, 0x4010, 0x4020, 0x4030, 0x4040, 0x4050, 0x4060, 0x4070,
    0x4080, 0x4090, 0x40A0, 0x40B0, 0x40C0, 0x40D0, 0x40E0, 0x40F0, 0x4100, 0x4110, 0x4120, 0x4130,
    0x4140, 0x4150, 0x4160, 0x4170, 0x4180, 0x4190, 0x41A0, 0x41B0, 0x41C0, 0x41D0, 0x41E0, 0x41F0,
    0x4200, 0x4210, 0x4220, 0x4230, 0x4240, 0x4250, 0x4260, 0x4270, 0x4280, 0x4290, 0x42A0, 0x42B0,
    0x42C0, 0x42D0, 0x42E0, 0x42F0, 0x4300, 0x4310, 0x4320, 0x4330, 0x4340, 0x4350, 0x4360, 0x4370,
    0x4380, 0x4390, 0x43A0, 0x43B0, 0x43C0, 0x43D0, 0x43E0, 0x7FC0,
};

/* the E2M1 codes as bf16 for vpermw, which reads 5 index bits per word: the table repeats the 16 codes */
INLINE __m512i e2m1_lut(void) {
    return _mm512_set_epi16(
        (short)0xC0C0, (short)0xC080, (short)0xC040, (short)0xC000, (short)0xBFC0, (short)0xBF80,
        (short)0xBF00, (short)0x8000, 0x40C0, 0x4080, 0x4040, 0x4000, 0x3FC0, 0x3F80, 0x3F00, 0x0000,
        (short)0xC0C0, (short)0xC080, (short)0xC040, (short)0xC000, (short)0xBFC0, (short)0xBF80,
        (short)0xBF00, (short)0x8000, 0x40C0, 0x4080, 0x4040, 0x4000, 0x3FC0, 0x3F80, 0x3F00, 0x0000);
}

/* bf16 of the E4M3 byte in each word's low byte (the high byte is ignored): the magnitude from two
   64-entry tables t0:t1, t2:t3 (vpermi2w reads 6 index bits; bit 6 picks the table), the sign moved from
   bit 7 to bit 15 */
INLINE __m512i e4m3_words(__m512i x, __m512i t0, __m512i t1, __m512i t2, __m512i t3) {
    __m512i r = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(x, _mm512_set1_epi16(0x40)),
                                        _mm512_permutex2var_epi16(t0, x, t1), _mm512_permutex2var_epi16(t2, x, t3));
    return _mm512_ternarylogic_epi32(r, _mm512_slli_epi16(x, 8), _mm512_set1_epi16((short)0x8000), 0xF8);
}

/* z[q] holds 4 dwords of each of the lanes 4q .. 4q + 3 (lane-major); v[j] = dword j of the 16 lanes */
INLINE void transpose16x4(const __m512i *z, __m512i *v) {
    const __m512i ia = _mm512_set_epi32(29, 25, 21, 17, 13, 9, 5, 1, 28, 24, 20, 16, 12, 8, 4, 0);
    const __m512i ib = _mm512_add_epi32(ia, _mm512_set1_epi32(2));
    const __m512i lo = _mm512_set_epi32(23, 22, 21, 20, 19, 18, 17, 16, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
    __m512i u0 = _mm512_permutex2var_epi32(z[0], ia, z[1]), u1 = _mm512_permutex2var_epi32(z[0], ib, z[1]);
    __m512i u2 = _mm512_permutex2var_epi32(z[2], ia, z[3]), u3 = _mm512_permutex2var_epi32(z[2], ib, z[3]);
    v[0] = _mm512_permutex2var_epi32(u0, lo, u2);
    v[1] = _mm512_permutex2var_epi32(u0, hi, u2);
    v[2] = _mm512_permutex2var_epi32(u1, lo, u3);
    v[3] = _mm512_permutex2var_epi32(u1, hi, u3);
}

static void decode_group_avx(const weight_t *w, int64_t n0, int lanes, int64_t g, uint32_t *restrict dst) {
    __m512i *out = (__m512i *)dst;
    if (w->fmt == FMT_E2M1) {
        const __m512i lut = e2m1_lut();
        /* the lanes' 16 bytes as rows, four to a register, transposed: v[j] = dword j of every lane */
        const uint8_t *base = weight_byte(w, n0, 16 * g);
        __m512i z[4], v[4];
        for (int q = 0; q < 4; q++) {
            if (w->s_n == 16 && lanes == 16) { /* NZ with c0 = 16: the 16 lanes' bytes are contiguous */
                z[q] = _mm512_loadu_si512(base + 64 * q);
                continue;
            }
            if (w->s_n == 32 && w->c0 == 32 && lanes == 16) { /* NZ with c0 = 32 (the dual-level weight): each
                lane's 32 bytes hold this group and its even or odd neighbour; four lanes' halves picked */
                const uint8_t *pair = base - (16 * g & 31) + 128 * q;
                __m512i y0 = _mm512_loadu_si512(pair), y1 = _mm512_loadu_si512(pair + 64);
                z[q] = g & 1 ? _mm512_shuffle_i32x4(y0, y1, 0xDD) : _mm512_shuffle_i32x4(y0, y1, 0x88);
                continue;
            }
            __m128i row[4]; /* masked byte loads only where lanes are missing (they are slower) */
            for (int i = 0; i < 4; i++)
                row[i] = lanes == 16 ? _mm_loadu_si128((const __m128i *)(base + (4 * q + i) * w->s_n))
                                     : _mm_maskz_loadu_epi8(4 * q + i < lanes ? 0xFFFF : 0, base + (4 * q + i) * w->s_n);
            z[q] = _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(row[0]), row[1], 1),
                                                         row[2], 2), row[3], 3);
        }
        transpose16x4(z, v);
        for (int j = 0; j < 4; j++) { /* 4 bytes = elements 8j .. 8j + 7 */
            _mm512_store_si512(out + 4 * j + 0, _mm512_permutexvar_epi16(v[j], lut));
            _mm512_store_si512(out + 4 * j + 1, _mm512_permutexvar_epi16(_mm512_srli_epi16(v[j], 4), lut));
            _mm512_store_si512(out + 4 * j + 2, _mm512_permutexvar_epi16(_mm512_srli_epi16(v[j], 8), lut));
            _mm512_store_si512(out + 4 * j + 3, _mm512_permutexvar_epi16(_mm512_srli_epi16(v[j], 12), lut));
        }
    } else {
        const __m512i t0 = _mm512_load_si512(E4M3_BF16), t1 = _mm512_load_si512(E4M3_BF16 + 32);
        const __m512i t2 = _mm512_load_si512(E4M3_BF16 + 64), t3 = _mm512_load_si512(E4M3_BF16 + 96);
        /* the lanes' 32 bytes, two lanes to a register, then each half of 16 bytes transposed */
        const uint8_t *base = weight_byte(w, n0, 32 * g);
        __m512i y[8], z[4], vv[8];
        for (int i = 0; i < 8; i++) {
            if (lanes == 16) { /* every row there: plain loads (masked byte loads cost a fifth of mxfp8's time) */
                const __m256i *p0 = (const __m256i *)(base + 2 * i * w->s_n), *p1 = (const __m256i *)(base + (2 * i + 1) * w->s_n);
                y[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(p0)), _mm256_loadu_si256(p1), 1);
                continue;
            }
            __m256i r0 = _mm256_maskz_loadu_epi8(2 * i < lanes ? 0xFFFFFFFFu : 0, base + 2 * i * w->s_n);
            __m256i r1 = _mm256_maskz_loadu_epi8(2 * i + 1 < lanes ? 0xFFFFFFFFu : 0, base + (2 * i + 1) * w->s_n);
            y[i] = _mm512_inserti64x4(_mm512_castsi256_si512(r0), r1, 1);
        }
        for (int h = 0; h < 2; h++) {
            for (int q = 0; q < 4; q++)
                z[q] = h ? _mm512_shuffle_i32x4(y[2 * q], y[2 * q + 1], 0xDD) : _mm512_shuffle_i32x4(y[2 * q], y[2 * q + 1], 0x88);
            transpose16x4(z, vv + 4 * h);
        }
        for (int j = 0; j < 8; j++) { /* 4 bytes = elements 4j .. 4j + 3 */
            __m512i v = vv[j];
            __m512i bytes[2] = {v, _mm512_srli_epi16(v, 8)}; /* each word's low byte is the element */
            for (int t = 0; t < 2; t++) _mm512_store_si512(out + 2 * j + t, e4m3_words(bytes[t], t0, t1, t2, t3));
        }
    }
}

/* E8M0 bytes (one per dword, 0 past the mask) as fp32: 2**(b - 127), 0 -> 2**-127, 0xFF -> NaN */
INLINE __m512 e8m0_lanes(__m512i b, __mmask16 mask) {
    __m512i f = _mm512_slli_epi32(b, 23);
    f = _mm512_mask_mov_epi32(f, _mm512_cmpeq_epi32_mask(b, _mm512_setzero_si512()), _mm512_set1_epi32(0x00400000));
    f = _mm512_mask_mov_epi32(f, _mm512_cmpeq_epi32_mask(b, _mm512_set1_epi32(0xFF)), _mm512_set1_epi32(0x7FC00000));
    return _mm512_castsi512_ps(_mm512_maskz_mov_epi32(mask, f));
}

/* The scales of groups g_first .. g_first + gc - 1 of lanes n0 .. n0 + lanes - 1 as dst[16 g + lane]:
   where a row's scale bytes lie in group order (sb_p = 2, sb_2 = 1: [N, K/64, 2] pairs, as the schemes
   prepare them), one gather of a dword per lane serves four groups (a gather per group was a quarter of
   the M = 1 profile); else (a [K/64, N, 2] checkpoint layout) a gather per group; plain C where a dword
   read would leave the scales */
static void decode_chunk_scales_avx(const weight_t *w, int64_t n0, int lanes, int64_t g_first, int gc,
                                    float *restrict dst) {
    const __mmask16 mask = (__mmask16)((1u << lanes) - 1u);
    const __m512i offsets = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32((int)w->sb_n));
    int64_t first = scale_offset(w, n0, g_first), last = scale_offset(w, n0 + lanes - 1, g_first + gc - 1);
    int in_order = w->sb_p == 2 && w->sb_2 == 1, step = in_order ? 4 : 1; /* groups per gather */
    for (int g = 0; g < gc; g += step) {
        int64_t at = in_order ? first + g : scale_offset(w, n0, g_first + g);
        if (w->sb_n < 0 || w->sb_n > (1 << 26) || (in_order ? last + 3 - (gc - 1 - g) : at + (lanes - 1) * w->sb_n + 3)
                                                          >= w->sb_limit) {
            for (int t = 0; t < step && g + t < gc; t++)
                decode_scales_scalar(w, n0, lanes, g_first + g + t, dst + 16 * (g + t));
            continue;
        }
        __m512i d = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, offsets, w->sb + at, 1);
        for (int t = 0; t < step && g + t < gc; t++)
            _mm512_storeu_ps(dst + 16 * (g + t),
                             e8m0_lanes(_mm512_and_si512(_mm512_srli_epi32(d, 8 * t), _mm512_set1_epi32(0xFF)), mask));
    }
}

/* one whole 32-group of an activation row (16 bytes of packed E2M1 or 32 E4M3 bytes at x) as mx_pairs'
   16 pair dwords: its 32 values as bf16 words in element order, then each 128-bit lane (8 elements)
   shuffled into the weight format's pairing */
static void pairs_group_avx(const uint8_t *x, int fmt_x, int fmt_w, uint32_t *out) {
    __m512i words;
    if (fmt_x == FMT_E2M1) {
        /* byte i -> bytes 2i (low nibble: element 2i) and 2i + 1 (high nibble), then to words */
        __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)x));
        __m256i nibbles = _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi16(0x0F)),
                                          _mm256_and_si256(_mm256_slli_epi16(b, 4), _mm256_set1_epi16(0x0F00)));
        words = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(nibbles), e2m1_lut());
    } else {
        words = e4m3_words(_mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)x)),
                           _mm512_load_si512(E4M3_BF16), _mm512_load_si512(E4M3_BF16 + 32),
                           _mm512_load_si512(E4M3_BF16 + 64), _mm512_load_si512(E4M3_BF16 + 96));
    }
    /* word order of each 8 elements: E2M1 weights pair (t, t + 4), E4M3 weights (t, t + 2) per 4 */
    const __m512i fp4 = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15));
    const __m512i fp8 = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15));
    _mm512_storeu_si512(out, _mm512_shuffle_epi8(words, fmt_w == FMT_E2M1 ? fp4 : fp8));
}

/* as partials_scalar, 8 (row, group) sums at a time so that the dot products' latencies overlap */
static void partials_avx(const uint32_t *act, int64_t lda, int rows, int64_t g_first, int gc,
                         const uint32_t *restrict wbuf, float *restrict pbuf) {
    int total = rows * gc;
    for (int c0 = 0; c0 < total; c0 += 8) {
        const uint32_t *ap[8];
        const __m512i *wp[8];
        int dst[8];
        for (int c = 0; c < 8; c++) {
            int i = c0 + c < total ? c0 + c : c0, r = i / gc, g = i % gc;
            ap[c] = act + r * lda + (g_first + g) * PAIRS;
            wp[c] = (const __m512i *)(wbuf + g * PAIRS * 16);
            dst[c] = (r * CHUNK + g) * 16;
        }
        __m512 acc[8];
        for (int c = 0; c < 8; c++) acc[c] = _mm512_setzero_ps();
        for (int kp = 0; kp < PAIRS; kp++)
            for (int c = 0; c < 8; c++)
                acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)_mm512_set1_epi32((int)ap[c][kp]),
                                          (__m512bh)_mm512_load_si512(wp[c] + kp));
        for (int c = 0; c < 8 && c0 + c < total; c++) _mm512_store_ps(pbuf + dst[c], acc[c]);
    }
}

/* partials_avx for ROWS rows and an even number of groups: two groups of eight rows at a time, each
   weight vector loaded once for the eight rows */
static void partials_avx_rows(const uint32_t *act, int64_t lda, int64_t g_first, int gc,
                              const uint32_t *restrict wbuf, float *restrict pbuf) {
    for (int g = 0; g < gc; g += 2) {
        const uint32_t *a = act + (g_first + g) * PAIRS;
        const __m512i *w0 = (const __m512i *)(wbuf + g * PAIRS * 16), *w1 = w0 + PAIRS;
        __m512 acc0[ROWS], acc1[ROWS];
        for (int r = 0; r < ROWS; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
        for (int kp = 0; kp < PAIRS; kp++) {
            __m512bh b0 = (__m512bh)_mm512_load_si512(w0 + kp), b1 = (__m512bh)_mm512_load_si512(w1 + kp);
            for (int r = 0; r < ROWS; r++) {
                acc0[r] = _mm512_dpbf16_ps(acc0[r], (__m512bh)_mm512_set1_epi32((int)a[r * lda + kp]), b0);
                acc1[r] = _mm512_dpbf16_ps(acc1[r], (__m512bh)_mm512_set1_epi32((int)a[r * lda + PAIRS + kp]), b1);
            }
        }
        for (int r = 0; r < ROWS; r++) {
            _mm512_store_ps(pbuf + (r * CHUNK + g) * 16, acc0[r]);
            _mm512_store_ps(pbuf + (r * CHUNK + g + 1) * 16, acc1[r]);
        }
    }
}

/* `rows` (at most ROWS) rows of two 16-lane blocks (wbuf, wbuf + WBLOCK; sbuf, sbuf + 16 * CHUNK), the
   partial sums and their scaling (scale_rows_avx's order) group by group: each activation broadcast serves
   both blocks' dot products, each weight vector the rows, and no partial sum leaves the registers */
INLINE void rows2_avx_n(const int rows, float *o, int64_t ldo, const int *lanes, const uint32_t *act, int64_t lda,
                        int64_t g_first, int gc, const uint32_t *restrict wbuf, const float *sar, int64_t lds,
                        const float *sbuf, const float *l0a, int64_t ldl0a, const float *l0) {
    __mmask16 mask[2] = {(__mmask16)((1u << lanes[0]) - 1u), (__mmask16)((1u << lanes[1]) - 1u)};
    __m512 acc[2][ROWS];
    for (int b = 0; b < 2; b++)
        for (int r = 0; r < rows; r++)
            acc[b][r] = l0a ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[b], o + r * ldo + 16 * b);
    for (int g = 0; g < gc; g++) {
        const uint32_t *a = act + (g_first + g) * PAIRS;
        const __m512i *w0 = (const __m512i *)(wbuf + g * PAIRS * 16), *w1 = (const __m512i *)(wbuf + WBLOCK) + g * PAIRS;
        __m512 p0[ROWS], p1[ROWS];
        for (int r = 0; r < rows; r++) p0[r] = p1[r] = _mm512_setzero_ps();
        for (int kp = 0; kp < PAIRS; kp++) {
            __m512bh b0 = (__m512bh)_mm512_load_si512(w0 + kp), b1 = (__m512bh)_mm512_load_si512(w1 + kp);
            for (int r = 0; r < rows; r++) {
                __m512bh x = (__m512bh)_mm512_set1_epi32((int)a[r * lda + kp]);
                p0[r] = _mm512_dpbf16_ps(p0[r], x, b0);
                p1[r] = _mm512_dpbf16_ps(p1[r], x, b1);
            }
        }
        __m512 s0 = _mm512_load_ps(sbuf + 16 * g), s1 = _mm512_load_ps(sbuf + 16 * (CHUNK + g));
        for (int r = 0; r < rows; r++) {
            __m512 x = _mm512_set1_ps(sar[r * lds + g]);
            acc[0][r] = _mm512_add_ps(acc[0][r], _mm512_mul_ps(_mm512_mul_ps(p0[r], x), s0));
            acc[1][r] = _mm512_add_ps(acc[1][r], _mm512_mul_ps(_mm512_mul_ps(p1[r], x), s1));
        }
    }
    for (int b = 0; b < 2; b++)
        for (int r = 0; r < rows; r++) {
            float *out = o + r * ldo + 16 * b;
            __m512 total = acc[b][r];
            if (l0a)
                total = _mm512_add_ps(_mm512_maskz_loadu_ps(mask[b], out),
                                      _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(l0a[r * ldl0a]),
                                                                  _mm512_loadu_ps(l0 + 16 * b)), acc[b][r]));
            _mm512_mask_storeu_ps(out, mask[b], total);
        }
}

/* rows2_avx_n with its row count a constant in each copy, so that the accumulators stay in registers */
__attribute__((noinline)) static void rows2_avx(int rows, float *o, int64_t ldo, const int *lanes, const uint32_t *act,
                                                int64_t lda, int64_t g_first, int gc, const uint32_t *restrict wbuf,
                                                const float *sar, int64_t lds, const float *sbuf, const float *l0a,
                                                int64_t ldl0a, const float *l0) {
    switch (rows) {
#define ROWS2_CASE(R) case R: rows2_avx_n(R, o, ldo, lanes, act, lda, g_first, gc, wbuf, sar, lds, sbuf, l0a, ldl0a, l0); break;
        ROWS2_CASE(1) ROWS2_CASE(2) ROWS2_CASE(3) ROWS2_CASE(4) ROWS2_CASE(5) ROWS2_CASE(6) ROWS2_CASE(7) ROWS2_CASE(8)
#undef ROWS2_CASE
    }
}

/* the scaling of the partial sums of rows 0 .. rows - 1 (output rows o + r * ldo), as mx_matmul's plain C
   loop does it, the rows interleaved so that their chains of additions overlap */
static void scale_rows_avx(float *o, int64_t ldo, int rows, int lanes, const float *pbuf, const float *sar,
                           int64_t lds, const float *sbuf, int gc, const float *l0a, int64_t ldl0a,
                           const float *l0) {
    __mmask16 mask = (__mmask16)((1u << lanes) - 1u);
    __m512 acc[ROWS];
    for (int r = 0; r < rows; r++) acc[r] = l0a ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, o + r * ldo);
    for (int g = 0; g < gc; g++) {
        __m512 s = _mm512_load_ps(sbuf + 16 * g);
        for (int r = 0; r < rows; r++)
            acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(_mm512_mul_ps(_mm512_load_ps(pbuf + (r * CHUNK + g) * 16),
                                                                       _mm512_set1_ps(sar[r * lds + g])), s));
    }
    for (int r = 0; r < rows; r++) {
        __m512 total = acc[r];
        if (l0a)
            total = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, o + r * ldo),
                                  _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(l0a[r * ldl0a]), _mm512_loadu_ps(l0)), acc[r]));
        _mm512_mask_storeu_ps(o + r * ldo, mask, total);
    }
}

#endif

/* The activation [rows, k] (packed FP4 or E4M3 bytes, row stride ldx bytes) as bf16 pairs [rows,
   pairs]: pairs = 16 * groups, elements past k are 0; and its E8M0 scales (byte (r, g) at scale + r * s_m
   + (g / 2) * s_p + (g % 2) * s_2) as fp32 [rows, groups]; vector = 0: plain C only. */
int mx_pairs(const uint8_t *x, int64_t rows, int64_t ldx, int64_t k, int fmt_x, int fmt_w, int64_t pairs,
             uint32_t *out, const uint8_t *scale, int64_t s_m, int64_t s_p, int64_t s_2, float *scale_out, int vector) {
    if (rows < 0 || k <= 0 || pairs * 2 < k || pairs % PAIRS) return -1;
#ifndef HAVE_BF16_DOT
    if (vector) return -2;
#endif
    int64_t half = pair_half(fmt_w), groups = (k + 31) / 32;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < groups; g++)
            scale_out[r * groups + g] = e8m0_f32(scale[r * s_m + (g >> 1) * s_p + (g & 1) * s_2]);
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *xr = x + r * ldx;
        int64_t whole = vector ? k / 32 : 0; /* the vector path takes the whole groups, this loop the rest */
#ifdef HAVE_BF16_DOT
        for (int64_t g = 0; g < whole; g++)
            pairs_group_avx(xr + g * (fmt_x == FMT_E2M1 ? 16 : 32), fmt_x, fmt_w, out + r * pairs + g * PAIRS);
#endif
        for (int64_t kp = whole * PAIRS; kp < pairs; kp++) {
            int64_t e[2] = {pair_low(kp, fmt_w), pair_low(kp, fmt_w) + half};
            uint32_t v[2];
            for (int i = 0; i < 2; i++) {
                if (e[i] >= k) v[i] = 0;
                else if (fmt_x == FMT_E2M1) v[i] = e2m1_bf16(xr[e[i] >> 1] >> (4 * (e[i] & 1)));
                else v[i] = e4m3_bf16(xr[e[i]]);
            }
            out[r * pairs + kp] = v[0] | (v[1] << 16);
        }
    }
    return 0;
}

/* the scaling of the partial sums of rows 0 .. rows - 1 of one block (output rows o + r * ldo), in the
   order the header describes; l0a: NULL for single level */
static void scale_rows(float *o, int64_t ldo, int rows, int lanes, const float *pbuf, const float *sar, int64_t lds,
                       const float *sbuf, int gc, const float *l0a, int64_t ldl0a, const float *l0) {
    for (int r = 0; r < rows; r++) {
        float *orow = o + r * ldo, acc[16], total[16];
        for (int l = 0; l < 16; l++) total[l] = l < lanes ? orow[l] : 0.0f;
        for (int l = 0; l < 16; l++) acc[l] = l0a ? 0.0f : total[l];
        for (int g = 0; g < gc; g++) {
            const float *p = pbuf + (r * CHUNK + g) * 16, *s = sbuf + 16 * g;
            for (int l = 0; l < 16; l++) acc[l] = acc[l] + (p[l] * sar[r * lds + g]) * s[l];
        }
        if (l0a) {
            float f = l0a[r * ldl0a];
            for (int l = 0; l < 16; l++) total[l] = total[l] + (f * l0[l]) * acc[l];
        } else {
            memcpy(total, acc, sizeof acc);
        }
        for (int l = 0; l < lanes; l++) orow[l] = total[l];
    }
}

int mx_matmul_isa(void) {
#ifdef HAVE_BF16_DOT
    return 1;
#else
    return 0;
#endif
}

/* mx_matmul's columns n_start .. n_start + count on the calling thread */
static int matmul_range(const uint32_t *act, const float *sa, int64_t m, int64_t k, weight_t w, const float *l0a,
                        const float *l0b, int64_t ldl0b, int64_t n_start, int64_t count, float *out, int64_t ldo,
                        int vector) {
    int fmt_w = w.fmt;
    int64_t kbytes = w.kbytes;
    int64_t groups = (k + 31) / 32, lda = groups * PAIRS, groups0 = (groups + CHUNK - 1) / CHUNK;
    int64_t gbytes = fmt_w == FMT_E2M1 ? 16 : 32;
    /* scratch (42 KiB: off the stack), 64-byte aligned: two blocks' decoded chunks and their scales, one
       block's partial sums */
    char *scratch = malloc(64 + (2 * (WBLOCK + CHUNK * 16) + PBLOCK) * 4);
    if (!scratch) return -3;
    uint32_t *wbuf = (uint32_t *)(scratch + (64 - (uintptr_t)scratch % 64));
    float *sbuf = (float *)(wbuf + 2 * WBLOCK), *pbuf = sbuf + 2 * CHUNK * 16;
    for (int64_t r = 0; r < m; r++)
        for (int64_t l = 0; l < count; l++) out[r * ldo + n_start + l] = 0.0f;
    /* chunk by chunk, the lanes' blocks inside, two at a time: an NZ weight is read in storage order, and
       the activation's chunk stays in cache across the blocks */
    for (int64_t ch = 0; ch < groups0; ch++) {
        int64_t g_first = ch * CHUNK;
        int gc = (int)(groups - g_first < CHUNK ? groups - g_first : CHUNK);
        for (int64_t n1 = n_start; n1 < n_start + count; n1 += 32) {
            int blocks = n_start + count - n1 > 16 ? 2 : 1, lanes[2];
            float l0[2][16];
            for (int bl = 0; bl < blocks; bl++) {
                int64_t n0 = n1 + 16 * bl;
                lanes[bl] = (int)(n_start + count - n0 < 16 ? n_start + count - n0 : 16);
                for (int g = 0; g < gc; g++) {
                    uint32_t *dst = wbuf + bl * WBLOCK + g * PAIRS * 16;
                    int64_t gg = g_first + g;
#ifdef HAVE_BF16_DOT
                    /* a group whose bytes all lie in the rows (the last one of a ragged k may not) */
                    if (vector && (gg + 1) * gbytes <= kbytes && (gg + 1) * 32 <= k) {
                        decode_group_avx(&w, n0, lanes[bl], gg, dst);
                        continue;
                    }
#endif
                    decode_group_scalar(&w, n0, lanes[bl], gg, k, dst);
                }
                float *sdst = sbuf + bl * CHUNK * 16;
#ifdef HAVE_BF16_DOT
                if (vector) decode_chunk_scales_avx(&w, n0, lanes[bl], g_first, gc, sdst);
                else
#endif
                    for (int g = 0; g < gc; g++) decode_scales_scalar(&w, n0, lanes[bl], g_first + g, sdst + 16 * g);
                for (int l = 0; l < 16; l++) l0[bl][l] = l0b && l < lanes[bl] ? l0b[ch * ldl0b + n0 + l] : 0.0f;
            }
            for (int64_t r0 = 0; r0 < m; r0 += ROWS) {
                int rows = (int)(m - r0 < ROWS ? m - r0 : ROWS);
                const uint32_t *a = act + r0 * lda;
#ifdef HAVE_BF16_DOT
                if (vector && blocks == 2) { /* the common case: partial sums and scaling at once */
                    rows2_avx(rows, out + r0 * ldo + n1, ldo, lanes, a, lda, g_first, gc, wbuf, sa + r0 * groups + g_first,
                              groups, sbuf, l0b ? l0a + r0 * groups0 + ch : NULL, groups0, &l0[0][0]);
                    continue;
                }
#endif
                for (int bl = 0; bl < blocks; bl++) {
                    const uint32_t *wb = wbuf + bl * WBLOCK;
                    const float *sbl = sbuf + bl * CHUNK * 16;
                    float *pb = pbuf, *o0 = out + r0 * ldo + n1 + 16 * bl;
#ifdef HAVE_BF16_DOT
                    if (vector && rows == ROWS && gc % 2 == 0) partials_avx_rows(a, lda, g_first, gc, wb, pb);
                    else if (vector) partials_avx(a, lda, rows, g_first, gc, wb, pb);
                    else
#endif
                        partials_scalar(a, lda, rows, g_first, gc, wb, pb);
#ifdef HAVE_BF16_DOT
                    if (vector) {
                        scale_rows_avx(o0, ldo, rows, lanes[bl], pb, sa + r0 * groups + g_first, groups, sbl, gc,
                                       l0b ? l0a + r0 * groups0 + ch : NULL, groups0, l0[bl]);
                        continue;
                    }
#endif
                    scale_rows(o0, ldo, rows, lanes[bl], pb, sa + r0 * groups + g_first, groups, sbl, gc,
                               l0b ? l0a + r0 * groups0 + ch : NULL, groups0, l0[bl]);
                }
            }
        }
    }
    free(scratch);
    return 0;
}

/* out[m, n0 .. n0 + count) (row stride ldo) for n0 = n_start (a multiple of 16); act: [m, pairs] bf16
   pairs, sa: [m, groups] scales; l0a [m, groups0] and l0b (row stride ldl0b) for dual level, or NULL.
   out is written, not accumulated into; the columns are split into `chunks` ranges of whole 16-lane
   blocks. vector = 0 takes the portable path. */
int mx_matmul(const uint32_t *act, const float *sa, int64_t m, int64_t k, const uint8_t *b, int fmt_w, int64_t s_n,
              int64_t s_nb, int64_t s_cb, int64_t c0, int64_t kbytes, const uint8_t *sb, int64_t sb_n, int64_t sb_p,
              int64_t sb_2, int64_t sb_limit, const float *l0a, const float *l0b, int64_t ldl0b, int64_t n_start,
              int64_t count, int64_t n_total, float *out, int64_t ldo, int vector, int chunks) {
    if (m < 0 || k <= 0 || n_start % 16 || count < 0 || n_start + count > n_total || c0 <= 0 || (c0 & (c0 - 1)) ||
        chunks < 1)
        return -1;
#ifndef HAVE_BF16_DOT
    if (vector) return -2;
#endif
    weight_t w = {b, s_n, s_nb, s_cb, c0, kbytes, __builtin_ctzll((unsigned long long)c0), sb, sb_n, sb_p, sb_2,
                  sb_limit, fmt_w};
    int rc = 0;
#pragma omp parallel for num_threads(chunks) schedule(static) if(chunks > 1) reduction(min : rc)
    for (int c = 0; c < chunks; c++) {
        int64_t start, n;
        chunk_range(count, 16, chunks, c, &start, &n);
        int r = matmul_range(act, sa, m, k, w, l0a, l0b, ldl0b, n_start + start, n, out, ldo, vector);
        rc = r < rc ? r : rc;
    }
    return rc;
}
