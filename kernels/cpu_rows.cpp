// A few rows times a linear's weight on an AVX2 CPU: out[r, n] = sum_k x[r, k] * w[n, k] + bias[n];
// and the RMSNorm that comes before most of them, as one call instead of torch's seven small ops.
//
// A decoding step or a verify has 1-33 rows, so the product only streams the weight: it is laid
// out once as panels of 8 output columns, [N / 8][K][8], one contiguous run of memory per panel,
// and each panel is read once for all the rows. Threads split the panels (OpenMP, the same
// runtime as torch, so they share one pool).
//
// Every output is one chain of FMAs over k = 0 .. K-1 in order, whatever the row count or the
// number of panels a block takes: a row's result is bit for bit the same alone (a decoding
// step) or among others (a verify).
#include <immintrin.h>

// From 3 rows the block is slow enough that the hardware prefetcher falls behind its one stream:
// fetching the panel 64 k (2 KB) ahead made 3-8-row products 10-20% faster over all of SmolLM2's
// weights (docs/performance.md). More than 8 rows' accumulators would not leave the registers the
// block needs (so more rows go 8 at a time, below), and 1-2 rows are bound by memory bandwidth anyway.
constexpr int PREFETCH_K = 64;

template <int R, int P>  // R rows x P panels of accumulators, in registers
static inline void block(const float* x, int K, const float* panels, const float* bias,
                         float* out, int N, int n0) {
    constexpr bool prefetch = P == 1 && R >= 3 && R <= 8;
    __m256 acc[R][P];
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) acc[r][p] = _mm256_setzero_ps();
    const float* w[P];
    for (int p = 0; p < P; ++p) w[p] = panels + (size_t)(n0 / 8 + p) * K * 8;
    for (int k = 0; k < K; ++k) {
        if (prefetch && !(k & 1))  // a cache line holds two k of a panel
            _mm_prefetch((const char*)(w[0] + (size_t)(k + PREFETCH_K) * 8), _MM_HINT_T0);
        __m256 wk[P];
        for (int p = 0; p < P; ++p) wk[p] = _mm256_loadu_ps(w[p] + (size_t)k * 8);
        for (int r = 0; r < R; ++r) {
            const __m256 xk = _mm256_broadcast_ss(x + (size_t)r * K + k);
            for (int p = 0; p < P; ++p) acc[r][p] = _mm256_fmadd_ps(xk, wk[p], acc[r][p]);
        }
    }
    for (int p = 0; p < P; ++p) {
        const __m256 b = bias ? _mm256_loadu_ps(bias + n0 + 8 * p) : _mm256_setzero_ps();
        for (int r = 0; r < R; ++r)
            _mm256_storeu_ps(out + (size_t)r * N + n0 + 8 * p, _mm256_add_ps(acc[r][p], b));
    }
}

template <int R, int P>
static void all_panels(const float* x, int K, const float* panels, const float* bias, float* out,
                       int N, int threads) {
    const int groups = N / (8 * P);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int g = 0; g < groups; ++g) block<R, P>(x, K, panels, bias, out, N, g * 8 * P);
    for (int n0 = groups * 8 * P; n0 < N; n0 += 8) block<R, 1>(x, K, panels, bias, out, N, n0);
}

template <int R>
static void rows(const float* x, int K, const float* panels, const float* bias, float* out, int N,
                 int threads) {
    // one or two rows: four panels a block, enough independent FMAs to hide their latency; from
    // three rows one panel a block (two were 1.3-2x slower per FMA for 3-6 rows here)
    if (R <= 2) all_panels<R, 4>(x, K, panels, bias, out, N, threads);
    else all_panels<R, 1>(x, K, panels, bias, out, N, threads);
}

// Past 8 rows the accumulators no longer fit beside the prefetch, so more rows are taken 8 at a
// time, but all of them inside one panel while it is still in cache: the weight streams from
// memory once whatever the row count (passes of 12 rows read it again per pass, and 9-12 rows
// without the prefetch ran at half speed; docs/performance.md, fifteenth session).
constexpr int ROWS_PER_BLOCK = 8;

static void panel_for_all_rows(const float* x, int M, int K, const float* panels, const float* bias,
                               float* out, int N, int n0) {
    for (int r0 = 0; r0 < M; r0 += ROWS_PER_BLOCK) {
        const int left = M - r0 < ROWS_PER_BLOCK ? M - r0 : ROWS_PER_BLOCK;
        const float* xr = x + (size_t)r0 * K;
        float* o = out + (size_t)r0 * N;
        switch (left) {
            case 1: block<1, 1>(xr, K, panels, bias, o, N, n0); break;
            case 2: block<2, 1>(xr, K, panels, bias, o, N, n0); break;
            case 3: block<3, 1>(xr, K, panels, bias, o, N, n0); break;
            case 4: block<4, 1>(xr, K, panels, bias, o, N, n0); break;
            case 5: block<5, 1>(xr, K, panels, bias, o, N, n0); break;
            case 6: block<6, 1>(xr, K, panels, bias, o, N, n0); break;
            case 7: block<7, 1>(xr, K, panels, bias, o, N, n0); break;
            default: block<8, 1>(xr, K, panels, bias, o, N, n0); break;
        }
    }
}

extern "C" void rows_times_panels(const float* x, int M, int K, const float* panels,
                                  const float* bias, float* out, int N, int threads) {
    switch (M) {
        case 1: rows<1>(x, K, panels, bias, out, N, threads); return;
        case 2: rows<2>(x, K, panels, bias, out, N, threads); return;
        case 3: rows<3>(x, K, panels, bias, out, N, threads); return;
        case 4: rows<4>(x, K, panels, bias, out, N, threads); return;
        case 5: rows<5>(x, K, panels, bias, out, N, threads); return;
        case 6: rows<6>(x, K, panels, bias, out, N, threads); return;
        case 7: rows<7>(x, K, panels, bias, out, N, threads); return;
        case 8: rows<8>(x, K, panels, bias, out, N, threads); return;
        default: break;
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int g = 0; g < N / 8; ++g) panel_for_all_rows(x, M, K, panels, bias, out, N, g * 8);
}

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, row by row (so, again, whatever rows share the call)
extern "C" void rms_norm_rows(const float* x, int M, int D, const float* w, float eps, float* out) {
    for (int r = 0; r < M; ++r) {
        const float* xr = x + (size_t)r * D;
        float* o = out + (size_t)r * D;
        __m256 acc = _mm256_setzero_ps();
        int k = 0;
        for (; k + 8 <= D; k += 8) {
            const __m256 v = _mm256_loadu_ps(xr + k);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, acc);
        float squares = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        for (; k < D; ++k) squares += xr[k] * xr[k];
        const float scale = 1.0f / __builtin_sqrtf(squares / D + eps);
        const __m256 s = _mm256_set1_ps(scale);
        for (k = 0; k + 8 <= D; k += 8)
            _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), s), _mm256_loadu_ps(w + k)));
        for (; k < D; ++k) o[k] = xr[k] * scale * w[k];
    }
}
