/* gpt2hub's matrix-vector kernels: y = W x + b for ONE input row (batch-1 decoding): float32, bfloat16, int8 (with
   AVX512-VNNI where the CPU has it) and int4; and decode_step (at the end), a whole GPT-2 decoding step on them.

   Decoding one token reads every weight once, so its speed is how fast the weights stream from memory. Here each
   thread streams a contiguous run of rows, one row after another with four sums in flight along it, prefetching
   4 KiB ahead into L2 (the order ggml reads in); float32 weights stored [in, out] are read as they are stored (no
   transposed copy). A first version read four rows side by side (one sum each): 23 GB/s for float32 where this
   reads 27, and no faster than oneDNN for bfloat16. Against what PyTorch runs otherwise, decoding gpt2-small and
   -medium on a 2-core EPYC: float32 1.33x / 1.14x tokens/s, bfloat16 1.24x / 1.29x, int8 1.40x / 1.15x
   (native_decode.md in benchmarks/results/cpu-epyc-2core).

   Loaded with ctypes by gpt2hub/native.py, which calls these functions only on a CPU with AVX512F/BW/VL and FMA
   (gemv_bf16: and AVX512-BF16), with shapes, dtypes and contiguity checked. Threads: OpenMP, the runtime PyTorch has
   loaded (the same worker threads as PyTorch's own operators), `nt` of them.

   Layouts: W is [N, K] row-major ("out, in", nn.Linear's), except gemv_f32_t, whose W is [K, N] (OpenAI's Conv1D
   layout, which gpt2hub maps as it is for float32). x has K elements, y and b (b may be NULL) N. bfloat16 values are
   uint16_t bit patterns; bfloat16 products are summed in float32 and rounded once to bfloat16, after the bias (to
   nearest, ties to even, as PyTorch rounds). int8: W holds codes, scale[n] the bfloat16 scale of row n, x and b are
   bfloat16: y[n] = scale[n] * (codes[n] . x) + b[n], rounded so too. Each returns 0, or -1 when it could not
   allocate its buffer (nothing was written to y).
*/
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <omp.h>

typedef uint16_t bf16;
#define ROWS 4                /* gemv_f32_t: input rows per step */
/* Prefetching: [out, in] kernels 4 KiB ahead in the rows they read, gemv_f32_t 1 KiB ahead in each of its rows,
   into L2 (T1): 15-30% more GB/s than into L1 (T0) for float32 and bfloat16 matrices of 1024 and 4096 columns on
   the EPYC (into L1 2 KiB ahead was the first version; none at all was slower still for [out, in]) */
#define AHEAD_BYTES 4096
#define PREFETCH(p) _mm_prefetch((p), _MM_HINT_T1)
#define AHEAD_T 256           /* (floats: 1 KiB) */

static inline float from_bf16(bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16 to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static int64_t pad64(int64_t n) { return (n + 63) / 64 * 64; }

/* A copy of x (K elements of `size` bytes), zero-padded to a multiple of 64 elements, so the loops below read whole
   vectors of x; NULL: no memory. */
static void *padded(const void *x, int64_t K, size_t size) {
    int64_t Kp = pad64(K);
    char *p = aligned_alloc(64, (size_t)Kp * size);
    if (p) {
        memcpy(p, x, (size_t)K * size);
        memset(p + (size_t)K * size, 0, (size_t)(Kp - K) * size);
    }
    return p;
}

/* bfloat16 x as float32, zero-padded as padded() pads; NULL: no memory */
static float *widened(const bf16 *x, int64_t K) {
    int64_t Kp = pad64(K);
    float *p = aligned_alloc(64, (size_t)Kp * sizeof *p);
    if (p) {
        for (int64_t k = 0; k < Kp; k++) p[k] = k < K ? from_bf16(x[k]) : 0.0f;
    }
    return p;
}

/* masks for the last, partial step of a row: the lanes of the K - k elements left */
static inline __mmask32 mask32(int64_t left) { return left >= 32 ? 0xffffffffu : (__mmask32)((1u << left) - 1); }
static inline __mmask16 mask16(int64_t left) { return left >= 16 ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1); }

/* The dot product of one row w (K long) with x, streamed front to back with four sums in flight (so no step waits
   for the last one's result) and the memory AHEAD_BYTES ahead prefetched: one template per weight type. Rows are
   read one after another, each thread a contiguous run of them: one stream per thread, which the memory system
   serves faster than four rows read side by side (27 against 23 GB/s for gpt2-small's float32 matrices). */
#define DOT_ROW(NAME, T, XT, STEP, FULL, TAIL)                                                                    \
    static inline float NAME(const T *w, const XT *x, int64_t K) {                                                \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                               \
        int64_t k = 0;                                                                                            \
        for (; k + 4 * STEP <= K; k += 4 * STEP) {                                                                \
            for (size_t line = 0; line < 4 * STEP * sizeof(T); line += 64)                                        \
                PREFETCH((const char *)(w + k) + AHEAD_BYTES + line);                                             \
            a0 = FULL(a0, w + k, x + k);                                                                          \
            a1 = FULL(a1, w + k + STEP, x + k + STEP);                                                            \
            a2 = FULL(a2, w + k + 2 * STEP, x + k + 2 * STEP);                                                    \
            a3 = FULL(a3, w + k + 3 * STEP, x + k + 3 * STEP);                                                    \
        }                                                                                                         \
        for (; k + STEP <= K; k += STEP) a0 = FULL(a0, w + k, x + k);                                             \
        if (k < K) a1 = TAIL(a1, w + k, x + k, K - k);                                                            \
        return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));                \
    }

/* bfloat16: 32 weights per step, AVX512-BF16's pairwise dot product into 16 float32 lanes */
#define BF16_FULL(a, p, x) _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(p), (__m512bh)_mm512_loadu_si512(x))
#define BF16_TAIL(a, p, x, left) \
    _mm512_dpbf16_ps(a, (__m512bh)_mm512_maskz_loadu_epi16(mask32(left), p), (__m512bh)_mm512_loadu_si512(x))
DOT_ROW(dot_bf16, bf16, bf16, 32, BF16_FULL, BF16_TAIL)

/* float32: 16 weights per step */
#define F32_FULL(a, p, x) _mm512_fmadd_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(x), a)
#define F32_TAIL(a, p, x, left) _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask16(left), p), _mm512_loadu_ps(x), a)
DOT_ROW(dot_f32, float, float, 16, F32_FULL, F32_TAIL)

/* int8: 32 codes per step, widened to float32 16 at a time */
static inline __m512 i8x16(const int8_t *p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}
static inline __m512 i8_step(__m512 a, const int8_t *p, const float *x, int64_t left) {
    a = _mm512_fmadd_ps(i8x16(p, mask16(left)), _mm512_loadu_ps(x), a);
    return _mm512_fmadd_ps(i8x16(p + 16, mask16(left - 16)), _mm512_loadu_ps(x + 16), a);
}
#define I8_FULL(a, p, x) i8_step(a, p, x, 32)
DOT_ROW(dot_i8, int8_t, float, 32, I8_FULL, i8_step)

/* -- one matrix-vector product, called by every thread of a parallel region ------------------------------------ */

enum { KIND_F32 = 0, KIND_F32_T = 1, KIND_BF16 = 2, KIND_I8 = 3, KIND_I4 = 4, KIND_I8_VNNI = 5 };
enum { OUT_SET = 0, OUT_ADD = 1, OUT_GELU = 2 };
#define BLOCK 64              /* rows per block of work (int4: one stored tile) */

/* One weight matrix W [n, k] as stored (see the top of this file; gpt2hub/native.py's Matrix mirrors it):
   KIND_F32, KIND_BF16 [n, k]; KIND_F32_T [k, n]; KIND_I8 codes [rows, k] with scale[rows] (bfloat16), and
   KIND_I8_VNNI the same multiplied with AVX512-VNNI by x quantized to 16 bits (quantize16);
   KIND_I4 codes in gpt2hub.quant's tile order ([rows / 64, k, 32] bytes, rows 64t+j and 64t+32+j in byte j's low
   and high nibble, rows 64t+16+j and 64t+48+j in byte 16+j's) with scale[(g * rows + r) * 2] and the zero after it
   for group g (of `group` inputs) of row r: W[r, i] = (code - 8) * scale + zero. bias: n values (float32, or
   bfloat16 where bias_bf16) or NULL. */
typedef struct {
    int64_t kind, group, bias_bf16, n, k, rows;
    const void *w;
    const bf16 *scale;
    const void *bias;
} matrix_t;

/* x as the products read it: float32, rounded to bfloat16 (KIND_BF16), and room for it quantized to 16 bits
   (KIND_I8_VNNI; NULL where no such product runs); all zero-padded to a multiple of 64 elements. parts: the
   partial sums of KIND_F32_T (see matvec_t). */
typedef struct {
    const float *f;
    const bf16 *b;
    int16_t *q;
    float *qs;
    float *parts;
} vec_t;

/* Where a product's rows go: y[r] = v (OUT_SET), y[r] += v (OUT_ADD: a residual) or y[r] = gelu(v) (OUT_GELU), v
   being the row's sum plus its bias; and, where yb is not NULL, yb[r] = y[r] rounded to bfloat16 (the input of a
   bfloat16 product to come, or a bfloat16 result). y may be NULL for OUT_SET (bfloat16 results only). */
typedef struct {
    int mode;
    float *y;
    bf16 *yb;
} out_t;

/* e^x for 16 floats: 2^n e^r with n = round(x / ln 2) and |r| <= ln(2) / 2, e^r by its Taylor polynomial of degree
   7 (truncation below 1e-8 relative); x clamped to [-104, 89] where e^x is 0 or inf in float32 (NaN stays NaN). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_min_ps(_mm512_set1_ps(89.0f), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);   /* ln 2 in two parts (Cephes') */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
    __m512 e = _mm512_set1_ps(1.0f / 5040.0f);
    const float c[] = {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f};
    for (int i = 0; i < 7; i++) e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(e, n);
}

/* GPT-2's GELU (PyTorch's approximate="tanh") of v[0..n) in place, tanh(u) as 1 - 2 / (e^2u + 1) */
static void gelu_tanh(float *v, int64_t n) {
    const __m512 beta = _mm512_set1_ps(0.7978845608028654f), kappa = _mm512_set1_ps(0.044715f);
    const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f), half = _mm512_set1_ps(0.5f);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = mask16(n - i);
        __m512 x = _mm512_maskz_loadu_ps(m, v + i);
        __m512 u = _mm512_mul_ps(beta, _mm512_fmadd_ps(_mm512_mul_ps(kappa, x), _mm512_mul_ps(x, x), x));
        __m512 t = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(exp16(_mm512_add_ps(u, u)), one)));
        _mm512_mask_storeu_ps(v + i, m, _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, t)));
    }
}

/* Rows n0..n0+cnt-1 of a product, their sums in s (cnt <= BLOCK, changed): plus the bias, then as `o` says */
static void finish(const matrix_t *m, out_t o, int64_t n0, int64_t cnt, float *s) {
    for (int64_t i = 0; i < cnt; i++) {
        if (m->bias) s[i] += m->bias_bf16 ? from_bf16(((const bf16 *)m->bias)[n0 + i]) : ((const float *)m->bias)[n0 + i];
        if (o.mode == OUT_ADD) s[i] += o.y[n0 + i];
    }
    if (o.mode == OUT_GELU) gelu_tanh(s, cnt);
    for (int64_t i = 0; i < cnt; i++) {
        if (o.y) o.y[n0 + i] = s[i];
        if (o.yb) o.yb[n0 + i] = to_bf16(s[i]);
    }
}

static inline __m512 nibbles(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)); }

/* The 64 sums of int4 tile t (rows 64t..64t+63) with x: per group, four sums of codes * x (16 rows each), then
   scale * sum + (zero - 8 * scale) * (the group's sum of x). */
static void tile_i4(const matrix_t *m, const float *x, int64_t t, float *d) {
    const uint8_t *w = (const uint8_t *)m->w + t * m->k * 32;
    const __m128i low = _mm_set1_epi8(0x0f);
    __m512 y[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t g0 = 0; g0 < m->k; g0 += m->group) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, xs = a0;
        for (int64_t k = g0; k < g0 + m->group; k++) {
            PREFETCH((const char *)(w + k * 32) + AHEAD_BYTES);
            __m256i b = _mm256_loadu_si256((const __m256i *)(w + k * 32));
            __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
            __m512 xk = _mm512_set1_ps(x[k]);
            a0 = _mm512_fmadd_ps(nibbles(_mm_and_si128(lo, low)), xk, a0);
            a1 = _mm512_fmadd_ps(nibbles(_mm_and_si128(hi, low)), xk, a1);
            a2 = _mm512_fmadd_ps(nibbles(_mm_and_si128(_mm_srli_epi16(lo, 4), low)), xk, a2);
            a3 = _mm512_fmadd_ps(nibbles(_mm_and_si128(_mm_srli_epi16(hi, 4), low)), xk, a3);
        }
        for (int64_t k = g0; k < g0 + m->group; k += 16) xs = _mm512_add_ps(xs, _mm512_maskz_loadu_ps(mask16(g0 + m->group - k), x + k));
        __m512 xsum = _mm512_set1_ps(_mm512_reduce_add_ps(xs));
        const bf16 *sz = m->scale + ((g0 / m->group) * m->rows + t * BLOCK) * 2;
        __m512 a[4] = {a0, a1, a2, a3};
        for (int q = 0; q < 4; q++) {   /* 16 (scale, zero) pairs: scale in each 32-bit lane's low half */
            __m512i pair = _mm512_loadu_si512(sz + q * 32);
            __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
            __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32((int)0xffff0000u)));
            __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale, zero);
            y[q] = _mm512_fmadd_ps(offset, xsum, _mm512_fmadd_ps(scale, a[q], y[q]));
        }
    }
    for (int q = 0; q < 4; q++) _mm512_storeu_ps(d + 16 * q, y[q]);
}

/* x (K floats, zero-padded to a multiple of 64) quantized to 16 bits per block of 64: q = round(x / s) with
   s = max|x| / 32767 over the block (qs[block] = s): an error of at most max|x| / 65534 in each block, far below
   bfloat16's rounding of each value (2^-9 of it), for integer products with int8 weights. */
static void quantize16(const float *x, int64_t K, int16_t *q, float *qs) {
    for (int64_t k = 0, b = 0; k < K; k += 64, b++) {
        __m512 v[4], top = _mm512_setzero_ps();
        for (int j = 0; j < 4; j++) top = _mm512_max_ps(top, _mm512_abs_ps(v[j] = _mm512_loadu_ps(x + k + 16 * j)));
        float most = _mm512_reduce_max_ps(top);
        qs[b] = most / 32767.0f;
        __m512 inv = _mm512_set1_ps(most > 0.0f ? 32767.0f / most : 0.0f);
        for (int j = 0; j < 4; j++)
            _mm256_storeu_si256((__m256i *)(q + k + 16 * j),
                                _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v[j], inv))));
    }
}

/* int8 row w . x with x quantized by quantize16: per block of 64, two AVX512-VNNI dot products of 16-bit pairs
   summed exactly in int32, then scaled by the block's s (float32) */
static __attribute__((target("avx512vnni"))) float dot_i8_vnni(const int8_t *w, const int16_t *q, const float *qs,
                                                               int64_t K) {
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0, b = 0; k < K; k += 64, b++) {
        __m256i lo, hi;
        PREFETCH((const char *)(w + k) + AHEAD_BYTES);
        if (K - k >= 64) {
            lo = _mm256_loadu_si256((const __m256i *)(w + k));
            hi = _mm256_loadu_si256((const __m256i *)(w + k + 32));
        } else {
            lo = _mm256_maskz_loadu_epi8(mask32(K - k), w + k);
            hi = K - k > 32 ? _mm256_maskz_loadu_epi8(mask32(K - k - 32), w + k + 32) : _mm256_setzero_si256();
        }
        __m512i a = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_cvtepi8_epi16(lo), _mm512_loadu_si512(q + k));
        a = _mm512_dpwssd_epi32(a, _mm512_cvtepi8_epi16(hi), _mm512_loadu_si512(q + k + 32));
        acc[b & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(qs[b]), acc[b & 1]);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
}

/* The sums of rows n0..n0+cnt-1 (one block) with x */
static void block_sums(const matrix_t *m, const vec_t *x, int64_t n0, int64_t cnt, float *d) {
    int64_t K = m->k;
    const int8_t *codes = m->w;
    switch (m->kind) {
    case KIND_F32:
        for (int64_t i = 0; i < cnt; i++) d[i] = dot_f32((const float *)m->w + (n0 + i) * K, x->f, K);
        break;
    case KIND_BF16:
        for (int64_t i = 0; i < cnt; i++) d[i] = dot_bf16((const bf16 *)m->w + (n0 + i) * K, x->b, K);
        break;
    case KIND_I8:
        for (int64_t i = 0; i < cnt; i++) d[i] = from_bf16(m->scale[n0 + i]) * dot_i8(codes + (n0 + i) * K, x->f, K);
        break;
    case KIND_I8_VNNI:
        for (int64_t i = 0; i < cnt; i++)
            d[i] = from_bf16(m->scale[n0 + i]) * dot_i8_vnni(codes + (n0 + i) * K, x->q, x->qs, K);
        break;
    default:
        tile_i4(m, x->f, n0 / BLOCK, d);
    }
}

/* acc[0..N) += x[r] * W[r, :] for R rows of a [K, N] matrix (R a constant where inlined) */
static inline __attribute__((always_inline)) void axpy_rows(float *acc, const float *w, const float *x, int64_t N,
                                                            int R) {
    __m512 xk[ROWS];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) xk[r] = _mm512_set1_ps(x[r]);
    for (int64_t n = 0; n < N; n += 16) {
        __mmask16 m = mask16(N - n);
        __m512 a = _mm512_load_ps(acc + n);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            PREFETCH((const char *)(w + r * N + n + AHEAD_T));
            a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + r * N + n), xk[r], a);
        }
        _mm512_store_ps(acc + n, a);
    }
}

static int64_t padded_n(int64_t n) { return (n + 15) / 16 * 16; }

/* float32 W stored [K, N]: each thread sums x[k] * W[k, :] over a contiguous run of rows k into a partial result of
   its own in `parts` (N rounded up to 16 floats per thread, 64-byte aligned), streaming its part of the matrix front
   to back; then the partials are added: no transposed copy needed. */
static void matvec_t(const matrix_t *m, const float *x, out_t o, float *parts) {
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    int64_t N = m->n, K = m->k, Np = padded_n(N), k0 = K * t / T, k1 = K * (t + 1) / T;
    const float *W = m->w;
    float *acc = parts + Np * t;
    memset(acc, 0, (size_t)Np * sizeof *acc);
    for (int64_t k = k0; k < k1; k += ROWS) {
        if (k1 - k >= ROWS) axpy_rows(acc, W + k * N, x + k, N, ROWS);
        else for (int64_t r = k; r < k1; r++) axpy_rows(acc, W + r * N, x + r, N, 1);
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += BLOCK) {
        float s[BLOCK];
        int64_t cnt = N - n0 < BLOCK ? N - n0 : BLOCK;
        for (int64_t i = 0; i < cnt; i++) {
            s[i] = 0.0f;
            for (int u = 0; u < T; u++) s[i] += parts[Np * u + n0 + i];
        }
        finish(m, o, n0, cnt, s);
    }
}

/* out <- W x + b as `o` says, by every thread of the enclosing parallel region (which all call it; it ends with a
   barrier). */
static void matvec(const matrix_t *m, const vec_t *x, out_t o) {
    if (m->kind == KIND_F32_T) {
        matvec_t(m, x->f, o, x->parts);
        return;
    }
    if (m->kind == KIND_I8_VNNI) {
#pragma omp single
        quantize16(x->f, m->k, x->q, x->qs);
    }
    int64_t blocks = (m->n + BLOCK - 1) / BLOCK;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {   /* each thread a contiguous run of blocks, one row after another */
        float d[BLOCK];
        int64_t n0 = b * BLOCK, cnt = m->n - n0 < BLOCK ? m->n - n0 : BLOCK;
        block_sums(m, x, n0, cnt, d);
        finish(m, o, n0, cnt, d);
    }
}

/* -- the one-row products gpt2hub/native.py calls ------------------------------------------------------------- */

/* One product for gpt2hub/native.py: x (K values: bfloat16 for KIND_BF16 and KIND_I8, else float32) copied
   zero-padded in the form the kind reads (int8's bfloat16 inputs widened to float32) */
static int product(const matrix_t *m, const void *x, out_t o, int nt) {
    vec_t v = {NULL, NULL, NULL, NULL, NULL};
    void *xs = m->kind == KIND_BF16 ? padded(x, m->k, sizeof(bf16))
             : m->kind == KIND_I8   ? (void *)widened(x, m->k)
                                    : padded(x, m->k, sizeof(float));
    if (m->kind == KIND_BF16) v.b = xs;
    else v.f = xs;
    if (xs && m->kind == KIND_F32_T) v.parts = aligned_alloc(64, (size_t)padded_n(m->n) * (size_t)(nt > 0 ? nt : 1) * 4);
    if (xs && (m->kind != KIND_F32_T || v.parts)) {
#pragma omp parallel num_threads(nt)
        matvec(m, &v, o);
    }
    int failed = !xs || (m->kind == KIND_F32_T && !v.parts);
    free(v.parts);
    free(xs);
    return failed ? -1 : 0;
}

int gemv_bf16(const bf16 *W, const bf16 *x, const bf16 *b, bf16 *y, int64_t N, int64_t K, int nt) {
    return product(&(matrix_t){KIND_BF16, 0, 1, N, K, N, W, NULL, b}, x, (out_t){OUT_SET, NULL, y}, nt);
}

int gemv_f32(const float *W, const float *x, const float *b, float *y, int64_t N, int64_t K, int nt) {
    return product(&(matrix_t){KIND_F32, 0, 0, N, K, N, W, NULL, b}, x, (out_t){OUT_SET, y, NULL}, nt);
}

int gemv_f32_t(const float *W, const float *x, const float *b, float *y, int64_t N, int64_t K, int nt) {
    return product(&(matrix_t){KIND_F32_T, 0, 0, N, K, N, W, NULL, b}, x, (out_t){OUT_SET, y, NULL}, nt);
}

int gemv_i8(const int8_t *W, const bf16 *scale, const bf16 *x, const bf16 *b, bf16 *y, int64_t N, int64_t K,
            int nt) {
    return product(&(matrix_t){KIND_I8, 0, 1, N, K, N, W, scale, b}, x, (out_t){OUT_SET, NULL, y}, nt);
}

/* -- a whole decoding step: one token through GPT-2, in one parallel region ----------------------------------- */

/* One block's weights (gpt2hub/native.py's Layer mirrors it). qkv: up to three products whose outputs lie side by
   side (queries, keys, values: one matrix for a fused [3C, C] weight, the others n = 0). ln*: float32 layer-norm
   scale and shift. kv: this block's KV cache [2, heads, max_len, head_dim] (keys, then values), float32 or
   bfloat16 as the model's cache_bf16 says. */
typedef struct {
    matrix_t qkv[3], out, fc, proj;
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    double eps1, eps2;
    void *kv;
} layer_t;

/* The model (gpt2hub/native.py's Model mirrors it): C channels, H heads, V logits, L blocks, caches of max_len
   positions; embeddings float32 or bfloat16 (emb_bf16) [V, C] and [context, C]; the final norm; the head. */
typedef struct {
    int64_t C, H, V, L, max_len, emb_bf16, cache_bf16;
    const void *tok_emb, *pos_emb;
    const float *lnf_w, *lnf_b;
    double epsf;
    matrix_t head;
    const layer_t *layers;
} model_t;

static inline float value(const void *p, int64_t i, int64_t is_bf16) {
    return is_bf16 ? from_bf16(((const bf16 *)p)[i]) : ((const float *)p)[i];
}

/* y = layer_norm(x) (biased variance, as PyTorch), in float32 and bfloat16 */
static void layer_norm(const float *x, const float *w, const float *b, double eps, int64_t C, float *y, bf16 *yb) {
    double mean = 0.0, var = 0.0;
    for (int64_t c = 0; c < C; c++) mean += x[c];
    mean /= (double)C;
    for (int64_t c = 0; c < C; c++) var += (x[c] - mean) * (x[c] - mean);
    float inv = (float)(1.0 / sqrt(var / (double)C + eps)), mu = (float)mean;
    for (int64_t c = 0; c < C; c++) {
        y[c] = (x[c] - mu) * inv * w[c] + b[c];
        yb[c] = to_bf16(y[c]);
    }
}

/* 16 cached values of one position from d on (masked to `left`), as float32 */
static inline __m512 cached16(const void *row, int64_t d, int64_t left, int64_t is_bf16) {
    if (!is_bf16) return _mm512_maskz_loadu_ps(mask16(left), (const float *)row + d);
    __m256i h = _mm256_maskz_loadu_epi16(mask16(left), (const bf16 *)row + d);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Head h of one block at position pos: its key and value (in qkv) written to the cache, then softmax(q K^T /
   sqrt(head_dim)) V over positions 0..pos into out[h * head_dim ...]. sc: pos + 1 floats of scratch. */
static void attend(const model_t *m, void *kv, const float *qkv, int64_t h, int64_t pos, float *out, bf16 *outb,
                   float *sc) {
    int64_t C = m->C, D = C / m->H, cb = m->cache_bf16, esz = cb ? 2 : 4;
    char *keys = (char *)kv + (size_t)(h * m->max_len * D) * esz;
    char *vals = (char *)kv + (size_t)((m->H + h) * m->max_len * D) * esz;
    for (int64_t d = 0; d < D; d++) {   /* LayerCache.update's write */
        float k = qkv[C + h * D + d], v = qkv[2 * C + h * D + d];
        if (cb) {
            ((bf16 *)keys)[pos * D + d] = to_bf16(k);
            ((bf16 *)vals)[pos * D + d] = to_bf16(v);
        } else {
            ((float *)keys)[pos * D + d] = k;
            ((float *)vals)[pos * D + d] = v;
        }
    }
    const float *q = qkv + h * D;
    float scale = 1.0f / sqrtf((float)D), top = -INFINITY, total = 0.0f;
    for (int64_t t = 0; t <= pos; t++) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16)
            a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask16(D - d), q + d), cached16(keys + t * D * esz, d, D - d, cb), a);
        sc[t] = _mm512_reduce_add_ps(a) * scale;
        top = sc[t] > top ? sc[t] : top;
    }
    for (int64_t t = 0; t <= pos; t += 16) {   /* softmax's exponentials, 16 at a time */
        __mmask16 mk = mask16(pos + 1 - t);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sc + t), _mm512_set1_ps(top)));
        _mm512_mask_storeu_ps(sc + t, mk, e);
        total += _mm512_mask_reduce_add_ps(mk, e);
    }
    for (int64_t d = 0; d < D; d += 16) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t t = 0; t <= pos; t++)
            a = _mm512_fmadd_ps(_mm512_set1_ps(sc[t]), cached16(vals + t * D * esz, d, D - d, cb), a);
        float part[16];
        _mm512_storeu_ps(part, _mm512_div_ps(a, _mm512_set1_ps(total)));
        for (int64_t i = 0; i < 16 && d + i < D; i++) {
            out[h * D + d + i] = part[i];
            outb[h * D + d + i] = to_bf16(part[i]);
        }
    }
}

/* The buffers of one step, each zero-padded to a multiple of 64 elements (the products read whole vectors): the
   residual stream x and the three inputs of products (h: a layer norm's output, att: attention's, f: GELU's), which
   share the room for 16-bit x and the partial sums */
typedef struct {
    float *x, *qkv, *sc;
    vec_t h, att, f;
    void *block;
} work_t;

static int64_t widest_t(const model_t *m) {   /* the widest [K, N] product's N, for its partial sums */
    int64_t n = m->head.kind == KIND_F32_T ? m->head.n : 0;
    for (int64_t l = 0; l < m->L; l++) {
        const layer_t *y = m->layers + l;
        const matrix_t *all[] = {&y->qkv[0], &y->qkv[1], &y->qkv[2], &y->out, &y->fc, &y->proj};
        for (int i = 0; i < 6; i++)
            if (all[i]->kind == KIND_F32_T && all[i]->n > n) n = all[i]->n;
    }
    return n;
}

static int work_alloc(const model_t *m, int nt, work_t *w) {
    int64_t C = pad64(m->C), F = pad64(4 * m->C), Q = pad64(3 * m->C), P = padded_n(widest_t(m)) * nt;
    int64_t S = pad64(m->max_len) * nt, B = pad64(F / 64);
    /* floats: x, h, qkv, att, f, parts, scores, block scales; then 16-bit: h, att, f in bfloat16, x in 16 bits */
    size_t floats = (size_t)(2 * C + Q + C + F + P + S + B), halves = (size_t)(2 * C + F + F);
    char *p = aligned_alloc(64, (floats * 4 + halves * 2 + 63) / 64 * 64);
    if (!p) return -1;
    memset(p, 0, floats * 4 + halves * 2);
    float *h = (float *)p + C, *att = h + C + Q, *f = att + C, *parts = f + F, *qs = parts + P + S;
    bf16 *hb = (bf16 *)(qs + B), *attb = hb + C, *fb = attb + C;
    int16_t *q = (int16_t *)(fb + F);
    *w = (work_t){(float *)p, h + C, parts + P, {h, hb, q, qs, parts}, {att, attb, q, qs, parts},
                  {f, fb, q, qs, parts}, p};
    return 0;
}

static void block_step(const model_t *m, const layer_t *y, int64_t pos, work_t *w) {
    int64_t off = 0;
    float *h = (float *)w->h.f, *att = (float *)w->att.f;
#pragma omp single
    layer_norm(w->x, y->ln1_w, y->ln1_b, y->eps1, m->C, h, (bf16 *)w->h.b);
    for (int i = 0; i < 3; i++) {
        if (y->qkv[i].n) matvec(&y->qkv[i], &w->h, (out_t){OUT_SET, w->qkv + off, NULL});
        off += y->qkv[i].n;
    }
    int t = omp_get_thread_num();
#pragma omp for schedule(static)
    for (int64_t j = 0; j < m->H; j++)
        attend(m, y->kv, w->qkv, j, pos, att, (bf16 *)w->att.b, w->sc + pad64(m->max_len) * t);
    matvec(&y->out, &w->att, (out_t){OUT_ADD, w->x, NULL});
#pragma omp single
    layer_norm(w->x, y->ln2_w, y->ln2_b, y->eps2, m->C, h, (bf16 *)w->h.b);
    matvec(&y->fc, &w->h, (out_t){OUT_GELU, (float *)w->f.f, (bf16 *)w->f.b});
    matvec(&y->proj, &w->f, (out_t){OUT_ADD, w->x, NULL});
}

/* Logits (float32 [V]) of `token` at position `pos`, its keys and values written to the caches, which hold
   positions 0..pos-1 already (pos < max_len). Activations are float32 throughout; products with bfloat16 weights
   read them rounded to bfloat16. 0, or -1 when the step's buffers could not be allocated (nothing written). */
int decode_step(const model_t *m, int64_t token, int64_t pos, float *logits, int nt) {
    work_t w;
    if (nt < 1) nt = 1;
    if (work_alloc(m, nt, &w)) return -1;
#pragma omp parallel num_threads(nt)
    {
#pragma omp single
        for (int64_t c = 0; c < m->C; c++)
            w.x[c] = value(m->tok_emb, token * m->C + c, m->emb_bf16) + value(m->pos_emb, pos * m->C + c, m->emb_bf16);
        for (int64_t l = 0; l < m->L; l++) block_step(m, m->layers + l, pos, &w);
#pragma omp single
        layer_norm(w.x, m->lnf_w, m->lnf_b, m->epsf, m->C, (float *)w.h.f, (bf16 *)w.h.b);
        matvec(&m->head, &w.h, (out_t){OUT_SET, logits, NULL});
    }
    free(w.block);
    return 0;
}
