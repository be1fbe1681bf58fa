/* One decode step of a dense Llama-style model for one sequence, on CPU, in one call.
 *
 * The torch path spends a batch-1 decode step in ~1,000 small ops around its int4 matmuls; here
 * the whole step (embedding, every layer, the output head) runs in C against the same weights and
 * the same KV cache tensors. Projections are 4-bit planes, w = (q - 8) * scale + zero per group of
 * 32 inputs (quant.py's format), repacked by cpu_decode.py into blocks of 16 output rows:
 *
 *   nib: [n/16][k/32][8 chunks][32 bytes]; chunk c holds inputs 4c..4c+3 of the group for the 16
 *        rows: byte 2j+t = (input 4c+2+t of row j) << 4 | (input 4c+t of row j)
 *   sz:  [n/16][k/32][32] bf16: the 16 rows' scales, then their zeros
 *
 * Activations are rounded to bf16 before each projection (as the torch int4 path does) and
 * accumulated in fp32; everything else (norms, RoPE, attention, the cache) is fp32.
 * With AVX512-BF16 the projections use _mm512_dpbf16_ps; without it, a portable loop.
 * Threads: OpenMP over row blocks (the process's libgomp, the one torch uses).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(CONCILIUM_PORTABLE)
#include <immintrin.h>
#define FAST 1
#else
#define FAST 0
#endif

#define GROUP 32
#define RB 16

typedef struct {
    int32_t n, k, nplanes;
    const uint8_t *nib[2];
    const uint16_t *sz[2];
    const float *bias; /* [n] or NULL */
} Gemv;

typedef struct {
    const float *input_norm, *post_norm;
    Gemv qkv, o, w13, w2;
} Layer;

typedef struct {
    int32_t vocab, hidden, inter, layers, heads, kv_heads, head_dim, threads;
    int32_t max_slots, max_seq;
    float eps, scale;
    const float *embed;      /* [V, H] */
    const float *final_norm; /* [H] */
    const float *cos, *sin;  /* [P, D/2] */
    float *k_cache, *v_cache; /* [L, S, Hk, T, D] */
    Gemv lm_head;
    const Layer *layer;
    float *scratch; /* see scratch_floats() */
    uint16_t *xb;   /* the widest projection input, as bf16 */
} Net;

int fast_path(void) { return FAST; }

static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf2f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* y[n] = W x (+ bias); x is rounded to bf16 first, xsum[g] = sum of group g of the rounded x. */
static void gemv(const Gemv *w, const float *x, float *y, uint16_t *xb, float *xsum, int nt) {
    const int k = w->k, groups = k / GROUP, blocks = w->n / RB;
    for (int g = 0; g < groups; g++) {
        float s = 0.f;
        for (int i = 0; i < GROUP; i++) {
            uint16_t b = f2bf(x[g * GROUP + i]);
            xb[g * GROUP + i] = b;
            s += bf2f(b);
        }
        xsum[g] = s;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int rb = 0; rb < blocks; rb++) {
#if FAST
        const __m512i mask = _mm512_set1_epi16(0x0f);
        /* bf16 of q - 8 for q = 0..15 (twice: permutexvar_epi16 indexes 32 lanes) */
        static const uint16_t lut[32] = {
            0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
            0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
            0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
            0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};
        const __m512i table = _mm512_loadu_si512(lut);
        __m512 out = w->bias ? _mm512_loadu_ps(w->bias + rb * RB) : _mm512_setzero_ps();
        for (int p = 0; p < w->nplanes; p++) {
            const uint8_t *nb = w->nib[p] + (size_t)rb * groups * 256;
            const uint16_t *sz = w->sz[p] + (size_t)rb * groups * 32;
            for (int g = 0; g < groups; g++) {
                __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
                __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
                const uint8_t *blk = nb + (size_t)g * 256;
                const uint32_t *xp = (const uint32_t *)(xb + g * GROUP);
                for (int c = 0; c < 8; c += 2) {
                    __m512i b0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(blk + c * 32)));
                    __m512i b1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(blk + c * 32 + 32)));
                    __m512i l0 = _mm512_permutexvar_epi16(_mm512_and_si512(b0, mask), table);
                    __m512i h0 = _mm512_permutexvar_epi16(_mm512_srli_epi16(b0, 4), table);
                    __m512i l1 = _mm512_permutexvar_epi16(_mm512_and_si512(b1, mask), table);
                    __m512i h1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(b1, 4), table);
                    a0 = _mm512_dpbf16_ps(a0, (__m512bh)l0, (__m512bh)_mm512_set1_epi32((int)xp[2 * c]));
                    a1 = _mm512_dpbf16_ps(a1, (__m512bh)h0, (__m512bh)_mm512_set1_epi32((int)xp[2 * c + 1]));
                    a2 = _mm512_dpbf16_ps(a2, (__m512bh)l1, (__m512bh)_mm512_set1_epi32((int)xp[2 * c + 2]));
                    a3 = _mm512_dpbf16_ps(a3, (__m512bh)h1, (__m512bh)_mm512_set1_epi32((int)xp[2 * c + 3]));
                }
                __m512 acc = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
                __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(sz + g * 32))), 16));
                __m512 ze = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(sz + g * 32 + 16))), 16));
                out = _mm512_fmadd_ps(acc, sc, out);
                out = _mm512_fmadd_ps(ze, _mm512_set1_ps(xsum[g]), out);
            }
        }
        _mm512_storeu_ps(y + rb * RB, out);
#else
        float out[RB];
        for (int j = 0; j < RB; j++) out[j] = w->bias ? w->bias[rb * RB + j] : 0.f;
        for (int p = 0; p < w->nplanes; p++) {
            const uint8_t *nb = w->nib[p] + (size_t)rb * groups * 256;
            const uint16_t *sz = w->sz[p] + (size_t)rb * groups * 32;
            for (int g = 0; g < groups; g++) {
                float acc[RB] = {0};
                const uint8_t *blk = nb + (size_t)g * 256;
                for (int c = 0; c < 8; c++)
                    for (int j = 0; j < RB; j++)
                        for (int t = 0; t < 2; t++) {
                            uint8_t b = blk[c * 32 + 2 * j + t];
                            acc[j] += (float)((int)(b & 15) - 8) * bf2f(xb[g * GROUP + 4 * c + t]);
                            acc[j] += (float)((int)(b >> 4) - 8) * bf2f(xb[g * GROUP + 4 * c + 2 + t]);
                        }
                for (int j = 0; j < RB; j++)
                    out[j] += acc[j] * bf2f(sz[g * 32 + j]) + bf2f(sz[g * 32 + 16 + j]) * xsum[g];
            }
        }
        memcpy(y + rb * RB, out, sizeof out);
#endif
    }
}

static void rmsnorm(const float *x, const float *w, float *out, int n, float eps) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

static void rope(float *v, const float *c, const float *s, int half) {
    for (int i = 0; i < half; i++) {
        float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c[i] - x2 * s[i];
        v[i + half] = x2 * c[i] + x1 * s[i];
    }
}

/* Floats of workspace `step` needs (the caller allocates them). */
long scratch_floats(const Net *m) {
    long h = m->hidden, d = m->head_dim, big = m->inter > h ? m->inter : h;
    long qkv = (m->heads + 2L * m->kv_heads) * d;
    if (m->heads * d > big) big = m->heads * d;
    return 3 * h + qkv + m->heads * d + m->max_seq + 2L * m->inter + big / GROUP + 16;
}

/* Logits [V] of `token` at `pos` in cache slot `slot`; writes the token's keys and values. */
void step(const Net *m, int token, int pos, int slot, float *logits) {
    const int H = m->hidden, D = m->head_dim, Hq = m->heads, Hk = m->kv_heads, I = m->inter;
    const int T = m->max_seq, half = D / 2, nt = m->threads, rep = Hq / Hk;
    float *x = m->scratch, *res = x + H, *h = res + H;
    float *qkv = h + H, *att = qkv + (Hq + 2 * Hk) * D, *sc = att + Hq * D;
    float *g = sc + T, *xsum = g + 2 * I;
    const float *c = m->cos + (size_t)pos * half, *s = m->sin + (size_t)pos * half;

    memcpy(res, m->embed + (size_t)token * H, H * sizeof(float));
    for (int l = 0; l < m->layers; l++) {
        const Layer *L = m->layer + l;
        if (l > 0)
            for (int i = 0; i < H; i++) res[i] += x[i];
        rmsnorm(res, L->input_norm, h, H, m->eps);
        gemv(&L->qkv, h, qkv, m->xb, xsum, nt);
        float *q = qkv, *k = qkv + Hq * D, *v = k + Hk * D;
        for (int hd = 0; hd < Hq; hd++) rope(q + hd * D, c, s, half);
        size_t base = ((size_t)l * m->max_slots + slot) * Hk;
        for (int hd = 0; hd < Hk; hd++) {
            rope(k + hd * D, c, s, half);
            memcpy(m->k_cache + ((base + hd) * T + pos) * D, k + hd * D, D * sizeof(float));
            memcpy(m->v_cache + ((base + hd) * T + pos) * D, v + hd * D, D * sizeof(float));
        }
        for (int hd = 0; hd < Hq; hd++) {
            const float *qh = q + hd * D;
            const float *K = m->k_cache + (base + hd / rep) * T * D;
            const float *V = m->v_cache + (base + hd / rep) * T * D;
            float mx = -INFINITY, sum = 0.f;
            for (int t = 0; t <= pos; t++) {
                float dot = 0.f;
                for (int i = 0; i < D; i++) dot += qh[i] * K[(size_t)t * D + i];
                sc[t] = dot * m->scale;
                if (sc[t] > mx) mx = sc[t];
            }
            for (int t = 0; t <= pos; t++) {
                sc[t] = expf(sc[t] - mx);
                sum += sc[t];
            }
            float *o = att + hd * D;
            for (int i = 0; i < D; i++) o[i] = 0.f;
            for (int t = 0; t <= pos; t++) {
                float p = sc[t] / sum;
                for (int i = 0; i < D; i++) o[i] += p * V[(size_t)t * D + i];
            }
        }
        gemv(&L->o, att, x, m->xb, xsum, nt);
        for (int i = 0; i < H; i++) res[i] += x[i];
        rmsnorm(res, L->post_norm, h, H, m->eps);
        gemv(&L->w13, h, g, m->xb, xsum, nt);
        for (int i = 0; i < I; i++) g[i] = g[i] / (1.f + expf(-g[i])) * g[I + i];
        gemv(&L->w2, g, x, m->xb, xsum, nt);
    }
    for (int i = 0; i < H; i++) res[i] += x[i];
    rmsnorm(res, m->final_norm, h, H, m->eps);
    gemv(&m->lm_head, h, logits, m->xb, xsum, nt);
}
