/* gpt2hub's matrix-vector kernels: y = W x + b for ONE input row (batch-1 decoding): float32, bfloat16 and int8.

   Decoding one token reads every weight once, so its speed is how fast the weights stream from memory. Here each
   thread streams a contiguous run of rows, one row after another with four sums in flight along it, prefetching
   2 KiB ahead (the order ggml reads in); float32 weights stored [in, out] are read as they are stored (no
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
#include <string.h>
#include <omp.h>

typedef uint16_t bf16;
#define ROWS 4                /* gemv_f32_t: input rows per step */
#define AHEAD_BYTES 2048      /* [out, in] kernels prefetch 2 KiB ahead in the row they read */
#define AHEAD_T 256           /* gemv_f32_t prefetches 1 KiB ahead in each row it streams */

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

/* A copy of x (K elements of `size` bytes), zero-padded to a multiple of 64 elements, so the loops below read whole
   vectors of x; NULL: no memory. */
static void *padded(const void *x, int64_t K, size_t size) {
    int64_t Kp = (K + 63) / 64 * 64;
    char *p = aligned_alloc(64, (size_t)Kp * size);
    if (p) {
        memcpy(p, x, (size_t)K * size);
        memset(p + (size_t)K * size, 0, (size_t)(Kp - K) * size);
    }
    return p;
}

/* bfloat16 x as float32, zero-padded as padded() pads; NULL: no memory */
static float *widened(const bf16 *x, int64_t K) {
    int64_t Kp = (K + 63) / 64 * 64;
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
                _mm_prefetch((const char *)(w + k) + AHEAD_BYTES + line, _MM_HINT_T0);                            \
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

/* The loop every [out, in] kernel runs: rows shared among nt threads in contiguous runs, FINISH(n, sum) storing row n */
#define BY_ROWS(DOT, FINISH)                                                                                      \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                                  \
    for (int64_t n = 0; n < N; n++) FINISH(n, DOT(W + n * K, xs, K));

int gemv_bf16(const bf16 *W, const bf16 *x, const bf16 *b, bf16 *y, int64_t N, int64_t K, int nt) {
    bf16 *xs = padded(x, K, sizeof *xs);
    if (!xs) return -1;
#define FINISH_BF16(n, s) y[n] = to_bf16((s) + (b ? from_bf16(b[n]) : 0.0f))
    BY_ROWS(dot_bf16, FINISH_BF16)
    free(xs);
    return 0;
}

int gemv_f32(const float *W, const float *x, const float *b, float *y, int64_t N, int64_t K, int nt) {
    float *xs = padded(x, K, sizeof *xs);
    if (!xs) return -1;
#define FINISH_F32(n, s) y[n] = (s) + (b ? b[n] : 0.0f)
    BY_ROWS(dot_f32, FINISH_F32)
    free(xs);
    return 0;
}

int gemv_i8(const int8_t *W, const bf16 *scale, const bf16 *x, const bf16 *b, bf16 *y, int64_t N, int64_t K,
            int nt) {
    float *xs = widened(x, K);
    if (!xs) return -1;
#define FINISH_I8(n, s) y[n] = to_bf16(from_bf16(scale[n]) * (s) + (b ? from_bf16(b[n]) : 0.0f))
    BY_ROWS(dot_i8, FINISH_I8)
    free(xs);
    return 0;
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
            _mm_prefetch((const char *)(w + r * N + n + AHEAD_T), _MM_HINT_T0);
            a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + r * N + n), xk[r], a);
        }
        _mm512_store_ps(acc + n, a);
    }
}

/* float32 W stored [K, N]: each thread sums x[k] * W[k, :] over a contiguous run of rows k into a partial y of its
   own (streaming its part of the matrix front to back), then the partials are added: no transposed copy needed. */
int gemv_f32_t(const float *W, const float *x, const float *b, float *y, int64_t N, int64_t K, int nt) {
    int64_t Np = (N + 15) / 16 * 16;
    float *parts = aligned_alloc(64, (size_t)Np * (size_t)(nt > 0 ? nt : 1) * sizeof *parts);
    if (!parts) return -1;
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        int64_t k0 = K * t / T, k1 = K * (t + 1) / T;
        float *acc = parts + Np * t;
        memset(acc, 0, (size_t)Np * sizeof *acc);
        for (int64_t k = k0; k < k1; k += ROWS) {
            if (k1 - k >= ROWS) axpy_rows(acc, W + k * N, x + k, N, ROWS);
            else for (int64_t r = k; r < k1; r++) axpy_rows(acc, W + r * N, x + r, N, 1);
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            float s = 0.0f;
            for (int u = 0; u < T; u++) s += parts[Np * u + n];
            y[n] = s + (b ? b[n] : 0.0f);
        }
    }
    free(parts);
    return 0;
}
