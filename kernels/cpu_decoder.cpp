// Whole layers for the few rows of a decoding step, a verify or a draft, each in one call:
// `decoder_layers`, a Llama-family target's stack, and `eagle3_chain`, an EAGLE-3 head's greedy
// chain of k tokens (below). For the target, per layer: the norm, the fused q|k|v product,
// per-head norms (Qwen3), RoPE, the K/V cache write, attention over the cache, the output
// product, the residual, the norm, the gate|up product, SiLU(gate) * up, the down product and
// the residual -- with no Python between them. A step in PyTorch spent ~20 ms of its ~45 on the
// ops around the products and the dispatch between them (docs/performance.md); here they cost
// what their arithmetic costs.
//
// The products are cpu_rows.cpp's. As there, every number a row gets is computed from that
// row's inputs alone, in an order that does not depend on how many rows share the call, so a
// row is bit for bit the same in a 1-token step and in a verify; attention keeps that by
// walking each row's visible keys in increasing position, one FMA chain per output.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern "C" void rows_times_panels(const float* x, int M, int K, const float* panels, const float* bias,
                                  float* out, int N, int threads);
extern "C" void rms_norm_rows(const float* x, int M, int D, const float* w, float eps, float* out);

struct DecoderShape {  // mirrored by cpu_rows.py's DecoderShape
    int layers, hidden, heads, kv_heads, head_dim, inner, cache_len;
    float eps;
};

struct LayerWeights {  // mirrored by cpu_rows.py's LayerWeights; biases and q/k norms may be null
    const float *input_norm, *post_norm, *q_norm, *k_norm;
    const float *qkv, *qkv_bias, *o, *o_bias, *gate_up, *gate_up_bias, *down, *down_bias;
};

// e^x, each lane on its own (a value gets the same bits in any lane of any call): Cephes'
// range reduction to [-ln2/2, ln2/2] and degree-5 polynomial, 2^n through the exponent bits
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline float sum8(__m256 v) {  // a fixed order, so a fixed result
    float l[8];
    _mm256_storeu_ps(l, v);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

static inline float dot(const float* a, const float* b, int n) {  // n % 8 == 0
    __m256 acc = _mm256_setzero_ps();
    for (int d = 0; d < n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    return sum8(acc);
}

// x * cos + (x rolled by half) * signed sin: RoPE in the rotate-half layout (head_dim % 8 == 0)
static inline void rope(const float* x, const float* c, const float* s, float* out, int hd) {
    const int half = hd / 2;
    if (half % 8) {  // the rolled half does not start on a vector: lane by lane, the same arithmetic
        for (int i = 0; i < hd; ++i) out[i] = x[i] * c[i] + x[(i + half) % hd] * s[i];
        return;
    }
    for (int i = 0; i < hd; i += 8) {
        const __m256 xi = _mm256_loadu_ps(x + i), xr = _mm256_loadu_ps(x + (i + half) % hd);
        _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_mul_ps(xi, _mm256_loadu_ps(c + i)),
                                                _mm256_mul_ps(xr, _mm256_loadu_ps(s + i))));
    }
}

static void add_rows(float* h, const float* delta, int n) {
    for (int i = 0; i < n; i += 8)
        _mm256_storeu_ps(h + i, _mm256_add_ps(_mm256_loadu_ps(h + i), _mm256_loadu_ps(delta + i)));
}

// act[r, i] = silu(gate[r, i]) * up[r, i], gate|up side by side in each row of gu (inner % 8 == 0)
static void silu_times_up(const float* gu, int M, int inner, float* act) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (int r = 0; r < M; ++r) {
        const float* g = gu + (size_t)r * 2 * inner;
        for (int i = 0; i < inner; i += 8) {
            const __m256 x = _mm256_loadu_ps(g + i);
            const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, x))));
            _mm256_storeu_ps(act + (size_t)r * inner + i, _mm256_mul_ps(silu, _mm256_loadu_ps(g + inner + i)));
        }
    }
}

// One (row, head): softmax(q . k_j * scale) over the keys the row sees, times v_j. `keys` and
// `scores` are this task's scratch (room for span + 8).
static void attend_one(const float* q, const float* k_cache, const float* v_cache, int hd, float scale,
                       const int* keys, int n, float* scores, float* out) {
    float top = -INFINITY;
    for (int i = 0; i < n; ++i) {
        scores[i] = dot(q, k_cache + (size_t)keys[i] * hd, hd) * scale;
        top = scores[i] > top ? scores[i] : top;
    }
    for (int i = n; i < ((n + 7) & ~7); ++i) scores[i] = top;  // padding lanes, never summed
    const __m256 m = _mm256_set1_ps(top);
    for (int i = 0; i < n; i += 8) _mm256_storeu_ps(scores + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + i), m)));
    float total = 0.0f;
    for (int i = 0; i < n; ++i) total += scores[i];
    for (int d = 0; d < hd; d += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int i = 0; i < n; ++i)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[i]), _mm256_loadu_ps(v_cache + (size_t)keys[i] * hd + d), acc);
        _mm256_storeu_ps(out + d, _mm256_mul_ps(acc, _mm256_set1_ps(1.0f / total)));
    }
}

// The rows' q|k|v products (qkv [M, (H + 2 KV) hd]) to RoPE'd queries q [M, H, hd] and, at
// their slots, RoPE'd keys and values in the cache; per-head norms first where given
static void queries_and_cache(const float* qkv, int M, int H, int KV, int hd, const float* q_norm,
                              const float* k_norm, float eps, const float* cos, const float* sin_signed,
                              const int64_t* slots, float* k_cache, float* v_cache, int cache_len,
                              float* q, float* normed) {
    const int n_qkv = (H + 2 * KV) * hd;
    for (int r = 0; r < M; ++r) {
        const float *row = qkv + (size_t)r * n_qkv, *c = cos + (size_t)r * hd, *sn = sin_signed + (size_t)r * hd;
        for (int head = 0; head < H; ++head) {
            const float* src = row + head * hd;
            if (q_norm) { rms_norm_rows(src, 1, hd, q_norm, eps, normed); src = normed; }
            rope(src, c, sn, q + ((size_t)r * H + head) * hd, hd);
        }
        for (int g = 0; g < KV; ++g) {
            const float* src = row + (H + g) * hd;
            if (k_norm) { rms_norm_rows(src, 1, hd, k_norm, eps, normed); src = normed; }
            const size_t at = ((size_t)g * cache_len + slots[r]) * hd;
            rope(src, c, sn, k_cache + at, hd);
            memcpy(v_cache + at, row + (H + KV + g) * hd, hd * sizeof(float));
        }
    }
}

// y [M, H, hd]: each row's heads attending over the cache positions it sees (mask row, or 0..
// positions[r]); keys and scores: scratch of `room` per (row, head)
static void attention(const float* q, int M, int H, int KV, int hd, const float* k_cache, const float* v_cache,
                      int cache_len, const int64_t* positions, const uint8_t* mask, int span, int seen,
                      size_t room, int* keys, float* scores, float* y, int threads) {
    const float scale = 1.0f / sqrtf((float)hd);
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && (size_t)M * H * seen >= 2048)
    for (int t = 0; t < M * H; ++t) {
        const int r = t / H, head = t % H, g = head / (H / KV);
        int* mine = keys + (size_t)t * room;
        int n = 0;
        if (mask) {
            for (int j = 0; j < span; ++j)
                if (mask[(size_t)r * span + j]) mine[n++] = j;
        } else {
            for (int j = 0; j <= positions[r]; ++j) mine[n++] = j;
        }
        const size_t kv_at = (size_t)g * cache_len * hd;
        attend_one(q + (size_t)t * hd, k_cache + kv_at, v_cache + kv_at, hd, scale, mine, n,
                   scores + (size_t)t * room, y + (size_t)t * hd);
    }
}

// h += down(silu(gate) * up) of norm(h): the MLP half of a layer, with its residual
static void mlp(float* h, int M, int D, int I, const float* norm, float eps, const float* gate_up,
                const float* gate_up_bias, const float* down, const float* down_bias, float* x, float* gu,
                float* act, float* delta, int threads) {
    rms_norm_rows(h, M, D, norm, eps, x);
    rows_times_panels(x, M, D, gate_up, gate_up_bias, gu, 2 * I, threads);
    silu_times_up(gu, M, I, act);
    rows_times_panels(act, M, I, down, down_bias, delta, D, threads);
    add_rows(h, delta, M * D);
}

// The widest range of cache positions a row sees: the mask's span, or the last row position + 1
// (sizes each (row, head)'s attention scratch)
static int widest_view(const int64_t* positions, int M, const uint8_t* mask, int span) {
    if (mask) return span;
    int seen = 0;
    for (int r = 0; r < M; ++r) seen = positions[r] + 1 > seen ? (int)positions[r] + 1 : seen;
    return seen;
}

// Returns 0, or -1 where its scratch could not be allocated (nothing written then).
//   caches: [2 * layers] pointers, layer l's K then V, each [kv_heads, cache_len, head_dim]
//   h: [M, hidden], the embeddings in, the last layer's output (before the final norm) out
//   cos, sin_signed: [M, head_dim] at each row's RoPE position
//   slots: [M] cache positions the rows' K/V go to
//   mask: [M, span] (1 = may attend) over cache positions 0..span-1; null: row r sees 0..positions[r]
//   capture: hidden states to copy into features [M, n_capture * hidden], in transformers'
//   numbering (0 = the embeddings, i = the output of layer i - 1)
extern "C" int decoder_layers(const DecoderShape* s, const LayerWeights* weights, float* const* caches,
                              float* h, int M, const float* cos, const float* sin_signed,
                              const int64_t* positions, const int64_t* slots, const uint8_t* mask, int span,
                              const int* capture, int n_capture, float* features, int threads) {
    const int D = s->hidden, H = s->heads, KV = s->kv_heads, hd = s->head_dim, I = s->inner;
    const int n_qkv = (H + 2 * KV) * hd;
    const int seen = widest_view(positions, M, mask, span);
    const size_t room = (size_t)seen + 8;
    const size_t floats = (size_t)M * (D + n_qkv + 2 * H * hd + D + 2 * I + I + hd) + (size_t)M * H * room;
    float* scratch = (float*)malloc(floats * sizeof(float) + (size_t)M * H * room * sizeof(int));
    if (!scratch) return -1;
    float *x = scratch, *qkv = x + (size_t)M * D, *q = qkv + (size_t)M * n_qkv, *y = q + (size_t)M * H * hd;
    float *delta = y + (size_t)M * H * hd, *gu = delta + (size_t)M * D, *act = gu + (size_t)M * 2 * I;
    float *normed = act + (size_t)M * I, *scores = normed + (size_t)M * hd;
    int* keys = (int*)(scores + (size_t)M * H * room);

    auto keep = [&](int index) {  // copy h into the features where `index` is captured
        for (int c = 0; c < n_capture; ++c)
            if (capture[c] == index)
                for (int r = 0; r < M; ++r)
                    memcpy(features + ((size_t)r * n_capture + c) * D, h + (size_t)r * D, D * sizeof(float));
    };
    keep(0);
    for (int l = 0; l < s->layers; ++l) {
        const LayerWeights& w = weights[l];
        float *k_cache = caches[2 * l], *v_cache = caches[2 * l + 1];
        rms_norm_rows(h, M, D, w.input_norm, s->eps, x);
        rows_times_panels(x, M, D, w.qkv, w.qkv_bias, qkv, n_qkv, threads);
        queries_and_cache(qkv, M, H, KV, hd, w.q_norm, w.k_norm, s->eps, cos, sin_signed, slots, k_cache, v_cache,
                          s->cache_len, q, normed);
        // every row's K/V is in the cache before any row attends (a verify's rows see each other)
        attention(q, M, H, KV, hd, k_cache, v_cache, s->cache_len, positions, mask, span, seen, room, keys, scores,
                  y, threads);
        rows_times_panels(y, M, H * hd, w.o, w.o_bias, delta, D, threads);
        add_rows(h, delta, M * D);
        mlp(h, M, D, I, w.post_norm, s->eps, w.gate_up, w.gate_up_bias, w.down, w.down_bias, x, gu, act, delta, threads);
        keep(l + 1);
    }
    free(scratch);
    return 0;
}

struct DraftShape {  // mirrored by cpu_rows.py's DraftShape
    int hidden, heads, kv_heads, head_dim, inner, draft_vocab, vocab, cache_len, norm_before_residual, norm_output;
    float eps;
};

struct DraftWeights {  // mirrored by cpu_rows.py's DraftWeights; biases may be null
    const float *input_norm, *hidden_norm, *post_norm, *final_norm;
    const float *qkv, *qkv_bias, *o, *o_bias, *gate_up, *gate_up_bias, *down, *down_bias, *lm_head;
    const float* embed;             // the token embedding the drafter reads, [vocab, hidden]
    const int64_t* d2t;             // draft id -> target id offset, [draft_vocab]
    const float *cos, *sin_signed;  // RoPE tables, [cache_len, head_dim]
    float *k_cache, *v_cache;       // the drafter's layer, [kv_heads, cache_len, head_dim]
};

// One step of an EAGLE-3 head for M rows (a chain's next token, or a depth of a tree): each row
// (g [hidden], the token at its position) runs the head's layer -- K/V written at its slot, its
// attention over the cache positions it sees (mask row, or 0..positions[r]) -- then the final
// norm and the draft-vocab head. g is overwritten with the rows' new hidden states (the normed
// ones with norm_output), logits [M, draft_vocab] written. Returns 0, or -1 where its scratch
// could not be allocated.
extern "C" int eagle3_step(const DraftShape* s, const DraftWeights* w, float* g, const int64_t* tokens, int M,
                           const int64_t* positions, const int64_t* slots, const uint8_t* mask, int span,
                           float* logits, int threads) {
    const int D = s->hidden, H = s->heads, KV = s->kv_heads, hd = s->head_dim, I = s->inner, V = s->draft_vocab;
    const int n_qkv = (H + 2 * KV) * hd;
    const int seen = widest_view(positions, M, mask, span);
    const size_t room = (size_t)seen + 8;
    const size_t floats = (size_t)M * (2 * D + n_qkv + 2 * H * hd + 4 * D + 3 * I + 2 * hd) + (size_t)M * H * room;
    float* scratch = (float*)malloc(floats * sizeof(float) + (size_t)M * H * room * sizeof(int));
    if (!scratch) return -1;
    float *a = scratch, *qkv = a + (size_t)M * 2 * D, *q = qkv + (size_t)M * n_qkv, *y = q + (size_t)M * H * hd;
    float *h = y + (size_t)M * H * hd, *x = h + (size_t)M * D, *delta = x + (size_t)M * D, *normed = delta + (size_t)M * D;
    float *gu = normed + (size_t)M * D, *act = gu + (size_t)M * 2 * I, *cos_rows = act + (size_t)M * I;
    float *sin_rows = cos_rows + (size_t)M * hd, *scores = sin_rows + (size_t)M * hd;
    int* keys = (int*)(scores + (size_t)M * H * room);
    for (int r = 0; r < M; ++r) {
        float *ar = a + (size_t)r * 2 * D, *gr = g + (size_t)r * D;
        rms_norm_rows(w->embed + (size_t)tokens[r] * D, 1, D, w->input_norm, s->eps, ar);
        rms_norm_rows(gr, 1, D, w->hidden_norm, s->eps, ar + D);
        memcpy(h + (size_t)r * D, s->norm_before_residual ? ar + D : gr, D * sizeof(float));
        memcpy(cos_rows + (size_t)r * hd, w->cos + (size_t)positions[r] * hd, hd * sizeof(float));
        memcpy(sin_rows + (size_t)r * hd, w->sin_signed + (size_t)positions[r] * hd, hd * sizeof(float));
    }
    rows_times_panels(a, M, 2 * D, w->qkv, w->qkv_bias, qkv, n_qkv, threads);
    queries_and_cache(qkv, M, H, KV, hd, nullptr, nullptr, s->eps, cos_rows, sin_rows, slots, w->k_cache, w->v_cache,
                      s->cache_len, q, nullptr);
    attention(q, M, H, KV, hd, w->k_cache, w->v_cache, s->cache_len, positions, mask, span, seen, room, keys, scores, y,
              threads);
    rows_times_panels(y, M, H * hd, w->o, w->o_bias, delta, D, threads);
    add_rows(h, delta, M * D);
    mlp(h, M, D, I, w->post_norm, s->eps, w->gate_up, w->gate_up_bias, w->down, w->down_bias, x, gu, act, delta, threads);
    rms_norm_rows(h, M, D, w->final_norm, s->eps, normed);
    rows_times_panels(normed, M, D, w->lm_head, nullptr, logits, V, threads);
    memcpy(g, s->norm_output ? normed : h, (size_t)M * D * sizeof(float));
    free(scratch);
    return 0;
}

// An EAGLE-3 head's greedy chain of k tokens: from g [hidden] (its fused target features, then
// its own hidden state) and the token at position start, k steps, each taking the argmax (mapped
// to a target id) as the next token. Writes tokens [k] and each one's drafter probability [k].
// Returns 0, or -1 where its scratch could not be allocated.
extern "C" int eagle3_chain(const DraftShape* s, const DraftWeights* w, float* g, int64_t token, int64_t start,
                            int k, int64_t* tokens, float* confidence, int threads) {
    const int V = s->draft_vocab;
    float* logits = (float*)malloc((size_t)V * sizeof(float));
    if (!logits) return -1;
    for (int j = 0; j < k; ++j) {
        const int64_t pos = start + j;
        if (eagle3_step(s, w, g, &token, 1, &pos, &pos, nullptr, 0, logits, threads) != 0) {
            free(logits);
            return -1;
        }
        int best = 0;
        for (int v = 1; v < V; ++v) best = logits[v] > logits[best] ? v : best;  // the first of equal maxima
        float total = 0.0f;
        for (int v = 0; v < V; ++v) total += expf(logits[v] - logits[best]);
        token = best + w->d2t[best];
        tokens[j] = token;
        confidence[j] = 1.0f / total;
    }
    free(logits);
    return 0;
}

// An EAGLE-3 head's catch-up: rows built from target features (g [n, hidden], after fc) and the
// next tokens, at `positions`, leave only their K/V in the drafter's cache -- the norms, the k|v
// product (kv panels, [K V] of the head's q|k|v) and RoPE, nothing else. Returns 0, or -1 where
// its scratch could not be allocated.
extern "C" int eagle3_catch_up(const DraftShape* s, const DraftWeights* w, const float* kv_panels,
                               const float* kv_bias, const float* g, const int64_t* tokens,
                               const int64_t* positions, int n, int threads) {
    const int D = s->hidden, KV = s->kv_heads, hd = s->head_dim, n_kv = 2 * KV * hd;
    float* scratch = (float*)malloc(((size_t)n * (2 * D + n_kv)) * sizeof(float));
    if (!scratch) return -1;
    float *a = scratch, *kv = a + (size_t)n * 2 * D;
    for (int r = 0; r < n; ++r) {
        rms_norm_rows(w->embed + (size_t)tokens[r] * D, 1, D, w->input_norm, s->eps, a + (size_t)r * 2 * D);
        rms_norm_rows(g + (size_t)r * D, 1, D, w->hidden_norm, s->eps, a + (size_t)r * 2 * D + D);
    }
    rows_times_panels(a, n, 2 * D, kv_panels, kv_bias, kv, n_kv, threads);
    for (int r = 0; r < n; ++r) {
        const float *row = kv + (size_t)r * n_kv, *c = w->cos + (size_t)positions[r] * hd;
        const float* sn = w->sin_signed + (size_t)positions[r] * hd;
        for (int h = 0; h < KV; ++h) {
            const size_t at = ((size_t)h * s->cache_len + positions[r]) * hd;
            rope(row + h * hd, c, sn, w->k_cache + at, hd);
            memcpy(w->v_cache + at, row + (KV + h) * hd, hd * sizeof(float));
        }
    }
    free(scratch);
    return 0;
}

// Per row of x [R, V] (logits), of softmax(x * inv_t): the argmax (the first of equal maxima,
// as torch's), and unless `argmax_only` the log-sum-exp, the entropy and the top-1 probability --
// what a round reads after its verify (greedy acceptance, the bonus, the router's signals).
extern "C" void row_stats_rows(const float* x, int R, int V, float inv_t, int argmax_only, int64_t* argmax,
                               float* lse, float* entropy, float* top1) {
    for (int r = 0; r < R; ++r) {
        const float* row = x + (size_t)r * V;
        int best = 0;
        for (int v = 1; v < V; ++v) best = row[v] > row[best] ? v : best;
        argmax[r] = best;
        if (argmax_only) continue;
        const float top = row[best] * inv_t;
        const __m256 t = _mm256_set1_ps(inv_t), m = _mm256_set1_ps(top);
        __m256 s = _mm256_setzero_ps(), sd = _mm256_setzero_ps();
        int v = 0;
        for (; v + 8 <= V; v += 8) {  // sum e^(x - max) and sum e^(x - max) (x - max)
            const __m256 d = _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(row + v), t), m);
            const __m256 e = exp8(d);
            s = _mm256_add_ps(s, e);
            sd = _mm256_fmadd_ps(e, d, sd);
        }
        float total = sum8(s), weighted = sum8(sd);
        for (; v < V; ++v) {
            const float d = row[v] * inv_t - top, e = expf(d);
            total += e;
            weighted += e * d;
        }
        const float log_total = logf(total);
        lse[r] = top + log_total;
        entropy[r] = log_total - weighted / total;  // -sum p log p, p = e / total
        top1[r] = 1.0f / total;
    }
}
