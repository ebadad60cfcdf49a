/* One decode step of a Granite-family model on a CPU, whole, in one call.
 *
 * Built once per machine by granite_cli.ops.native (cc -O3 -march=native -fopenmp) and called
 * through ctypes. It computes what granite_cli.model.model computes for one new token per sequence,
 * in fp32, reading weights and caches in fp32 or bf16 in place:
 *   h = embed[id] * emb_mult
 *   per layer: h = mixer(rms_norm(h)) * rho + h;  h = (moe + shared)(rms_norm(h)) * rho + h
 *   logits = lm_head(rms_norm(h)) / logits_scaling
 * The mixers are the Mamba-2 step (conv state shift, SSD state update, gated RMSNorm) and grouped-
 * query attention over the KV cache (NoPE or RoPE, optional q/k norms and biases); the feed-forward
 * is routed experts (three routings) and/or a shared or dense SwiGLU MLP. Projections are GEMVs that
 * stream each weight row once for all sequences of the batch; threads split the rows (OpenMP: the
 * same runtime torch uses, so the two share one pool of threads). Sums reduce in vector lanes, so
 * results differ from the torch path by summation order (and, in bf16, by where values round).
 *
 * The model is described by three arrays the caller fills (granite_cli.model.native_decode):
 * G (int64 globals), F (double constants) and L (int64 per layer, LSLOTS each); pointers travel as
 * int64. The indices below are the contract; the Python side names the same ones.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define BF16_DOT 1 /* vdpbf16ps: 32 bf16 products summed into 16 fp32 lanes per instruction */
#endif

typedef uint16_t bf16;

enum { G_D, G_VOCAB, G_NLAYERS, G_WDT, G_KVDT, G_CONVDT, G_EMBED, G_LMHEAD, G_NORM,
       G_DIN, G_CONVDIM, G_NH, G_HP, G_NG, G_NS, G_KCONV,
       G_QH, G_KVH, G_HD, G_MAXLEN,
       G_E, G_TOPK, G_I, G_SHARED, G_ROUTING, G_ROPE, G_N };
enum { F_EPS, F_RHO, F_EMB, F_LOGIT, F_SCALE, F_DTLO, F_DTHI, F_N };
enum { L_KIND, L_NORM1, L_NORM2,
       /* Mamba */ L_INPROJ, L_CONVW, L_CONVB, L_DTBIAS, L_A, L_D, L_GNORM, L_OUTPROJ, L_CONVST, L_SSMST,
       /* attention */ L_WQ, L_WK, L_WV, L_WO, L_KC, L_VC,
       /* feed-forward */ L_ROUTER, L_EWIN, L_EWOUT, L_SWIN, L_SWOUT,
       /* optional (0: none) */ L_BQ, L_BK, L_BV, L_BO, L_QNORM, L_KNORM, L_INB, L_OUTB, LSLOTS };

static inline float bf2f(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f2bf(float f) { /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

static inline float ld(const void *p, int bf, size_t i) {
    return bf ? bf2f(((const bf16 *)p)[i]) : ((const float *)p)[i];
}

static inline void st(void *p, int bf, size_t i, float v) {
    if (bf) ((bf16 *)p)[i] = f2bf(v);
    else ((float *)p)[i] = v;
}

static inline float silu(float x) { return x / (1.0f + expf(-x)); }

/* 16 floats as one vector: gcc and clang lower these to the widest units -march=native offers. */
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef uint16_t h16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u16v __attribute__((vector_size(64)));

static inline v16 ldf(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline v16 ldh(const bf16 *p) { /* 16 bf16 widened to fp32 (exact) */
    h16 h;
    memcpy(&h, p, sizeof h);
    u16v u = __builtin_convertvector(h, u16v) << 16;
    v16 f;
    memcpy(&f, &u, sizeof f);
    return f;
}

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static inline float hsum(v16 v) { /* a tree of halves: four dependent adds, not sixteen */
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

typedef int32_t i16v __attribute__((vector_size(64)));

static inline v16 as_f(i16v v) {
    v16 f;
    memcpy(&f, &v, sizeof f);
    return f;
}

static inline i16v as_i(v16 v) {
    i16v i;
    memcpy(&i, &v, sizeof i);
    return i;
}

/* exp(x) for x <= 0 on 16 lanes: x = k·ln2 + r with |r| <= ln2/2 (k rounded to nearest),
 * exp(r) by its degree-7 Taylor polynomial (relative error below 1e-7), times 2^k put into the
 * exponent bits. Lanes below -87 (where 2^k leaves the normal range) give 0. */
static inline v16 vexp_neg(v16 x) {
    const i16v live = x >= -87.0f;
    const v16 xc = as_f((as_i(x) & live) | (as_i((v16){0} - 87.0f) & ~live));
    const i16v ki = __builtin_convertvector(xc * 1.44269504088896341f - 0.5f, i16v); /* trunc: nearest for <= 0 */
    const v16 k = __builtin_convertvector(ki, v16);
    const v16 r = xc - k * 0.693145751953125f - k * 1.428606765330187e-06f;
    v16 p = (v16){0} + 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return as_f((as_i(p) + (ki << 23)) & live);
}

static inline v16 ldw(const void *p, int bf, size_t i) {
    return bf ? ldh((const bf16 *)p + i) : ldf((const float *)p + i);
}

/* Software prefetch of the rows PF_ROWS ahead (two blocks of four), one cache line of each of four
 * rows `stride` bytes apart: with it a 2,304 x 512 fp32 GEMV read 24-26 GB/s on 2 threads, without
 * it 19-21. Prefetches never fault, so rows past a matrix's end cost nothing but the hint. */
enum { PF_ROWS = 8 };
static inline void prefetch4(const void *p, size_t stride) {
    const char *c = p;
    __builtin_prefetch(c);
    __builtin_prefetch(c + stride);
    __builtin_prefetch(c + 2 * stride);
    __builtin_prefetch(c + 3 * stride);
}

/* out[r] = W[r, :] · x for the `nr` (at most 4) rows from W, each K long. Four rows at a time keep
 * four independent accumulator chains, so the loop waits on memory, not on the adder. */
static void dot_rows(const void *W, int bf, int nr, int K, const float *x, float *out, int pf) {
    const int K16 = K & ~15;
    if (nr == 4) { /* four named accumulators: kept in registers (an indexed array may not be) */
        v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        if (bf) {
            const bf16 *w = W;
            for (int k = 0; k < K16; k += 16) {
                if (pf && (k & 31) == 0) prefetch4(w + (size_t)PF_ROWS * K + k, K * 2);
                const v16 xv = ldf(x + k);
                a0 += ldh(w + k) * xv;
                a1 += ldh(w + (size_t)K + k) * xv;
                a2 += ldh(w + (size_t)2 * K + k) * xv;
                a3 += ldh(w + (size_t)3 * K + k) * xv;
            }
        } else {
            const float *w = W;
            for (int k = 0; k < K16; k += 16) {
                if (pf) prefetch4(w + (size_t)PF_ROWS * K + k, K * 4);
                const v16 xv = ldf(x + k);
                a0 += ldf(w + k) * xv;
                a1 += ldf(w + (size_t)K + k) * xv;
                a2 += ldf(w + (size_t)2 * K + k) * xv;
                a3 += ldf(w + (size_t)3 * K + k) * xv;
            }
        }
        out[0] = hsum(a0);
        out[1] = hsum(a1);
        out[2] = hsum(a2);
        out[3] = hsum(a3);
    } else {
        for (int r = 0; r < nr; r++) {
            v16 a = {0};
            for (int k = 0; k < K16; k += 16) a += ldw(W, bf, (size_t)r * K + k) * ldf(x + k);
            out[r] = hsum(a);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int k = K16; k < K; k++) out[r] += ld(W, bf, (size_t)r * K + k) * x[k];
}

#ifdef BF16_DOT
/* dot_rows for bf16 weights and bf16 x (the activations rounded to bf16, as a bf16 model's are). */
static void dot_rows_bf16(const bf16 *W, int nr, int K, const bf16 *x, float *out, int pf) {
    const int K32 = K & ~31;
    if (nr == 4) { /* four named accumulators: kept in registers (an indexed array may not be) */
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int k = 0; k < K32; k += 32) {
            if (pf) prefetch4(W + (size_t)PF_ROWS * K + k, K * 2);
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(W + k), xv);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(W + (size_t)K + k), xv);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(W + (size_t)2 * K + k), xv);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(W + (size_t)3 * K + k), xv);
        }
        out[0] = _mm512_reduce_add_ps(a0);
        out[1] = _mm512_reduce_add_ps(a1);
        out[2] = _mm512_reduce_add_ps(a2);
        out[3] = _mm512_reduce_add_ps(a3);
    } else {
        for (int r = 0; r < nr; r++) {
            __m512 a = _mm512_setzero_ps();
            for (int k = 0; k < K32; k += 32)
                a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(W + (size_t)r * K + k),
                                     (__m512bh)_mm512_loadu_si512(x + k));
            out[r] = _mm512_reduce_add_ps(a);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int k = K32; k < K; k++) out[r] += bf2f(W[(size_t)r * K + k]) * bf2f(x[k]);
}
#endif

/* y[b, n] = sum_k W[n, k] x[b, k] for n < N, b < B; x rows are K apart, y rows ldy apart. Each
 * block of four rows is read from memory once; the other sequences find it in L1. */
static void gemv(const void *W, int bf, int N, int K, const float *x, int B, float *y, int ldy) {
    const size_t es = bf ? 2 : 4;
#ifdef BF16_DOT
    bf16 *xh = NULL;
    if (bf) {
        xh = malloc(sizeof(bf16) * (size_t)B * K);
        for (size_t i = 0; i < (size_t)B * K; i++) xh[i] = f2bf(x[i]);
    }
#endif
#pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < N; n0 += 4) {
        const int nr = N - n0 < 4 ? N - n0 : 4;
        const void *w = (const char *)W + (size_t)n0 * K * es;
        for (int b = 0; b < B; b++) {
            float o[4];
#ifdef BF16_DOT
            if (bf) dot_rows_bf16((const bf16 *)w, nr, K, xh + (size_t)b * K, o, b == 0);
            else
#endif
                dot_rows(w, bf, nr, K, x + (size_t)b * K, o, b == 0);
            for (int r = 0; r < nr; r++) y[(size_t)b * ldy + n0 + r] = o[r];
        }
    }
#ifdef BF16_DOT
    free(xh);
#endif
}

/* out[b] = x[b] * rsqrt(mean(x[b]^2) + eps) * w, over rows of n (w in fp32). */
static void rms_norm(const float *x, const float *w, int B, int n, float eps, float *out) {
    for (int b = 0; b < B; b++) {
        const float *xb = x + (size_t)b * n;
        float ss = 0.0f;
        for (int i = 0; i < n; i++) ss += xb[i] * xb[i];
        float r = 1.0f / sqrtf(ss / (float)n + eps);
        for (int i = 0; i < n; i++) out[(size_t)b * n + i] = xb[i] * r * w[i];
    }
}

/* SwiGLU over rows: m[b, i] = silu(hin[b, i]) * hin[b, width + i]; hin rows are 2·width. */
static void swiglu(const float *hin, int B, int width, float *m) {
    for (int b = 0; b < B; b++)
        for (int i = 0; i < width; i++)
            m[(size_t)b * width + i] = silu(hin[(size_t)b * 2 * width + i]) * hin[(size_t)b * 2 * width + width + i];
}

static void mamba(const int64_t *G, const double *F, const int64_t *L, int B, const float *u, float *out,
                  float *work) {
    const int d = (int)G[G_D], din = (int)G[G_DIN], cd = (int)G[G_CONVDIM], nh = (int)G[G_NH], hp = (int)G[G_HP];
    const int ng = (int)G[G_NG], ns = (int)G[G_NS], kc = (int)G[G_KCONV], wbf = (int)G[G_WDT], cbf = (int)G[G_CONVDT];
    const int proj = 2 * din + 2 * ng * ns + nh;
    float *zx = work;                      /* [B, proj]: z | xBC | dt */
    float *xc = zx + (size_t)B * proj;     /* [B, conv]: conv + SiLU */
    float *y = xc + (size_t)B * cd;        /* [B, din] */
    float *dt = y + (size_t)B * din;       /* [B, nh] */
    const float *convw = (const float *)L[L_CONVW], *convb = (const float *)L[L_CONVB];
    const float *dtb = (const float *)L[L_DTBIAS], *A = (const float *)L[L_A], *Dp = (const float *)L[L_D];
    const float *gw = (const float *)L[L_GNORM];
    void *cst = (void *)L[L_CONVST];
    float *S = (float *)L[L_SSMST];
    const float lo = (float)F[F_DTLO], hi = (float)F[F_DTHI], eps = (float)F[F_EPS];

    gemv((const void *)L[L_INPROJ], wbf, proj, d, u, B, zx, proj);
    if (L[L_INB])
        for (int b = 0; b < B; b++)
            for (int i = 0; i < proj; i++) zx[(size_t)b * proj + i] += ((const float *)L[L_INB])[i];
    for (int b = 0; b < B; b++) {
        const float *xbc = zx + (size_t)b * proj + din;
        for (int c = 0; c < cd; c++) { /* window = state (k-1 taps) | new input; state shifts left */
            size_t base = ((size_t)b * cd + c) * (kc - 1);
            float acc = 0.0f;
            for (int j = 0; j < kc - 1; j++) acc += ld(cst, cbf, base + j) * convw[(size_t)c * kc + j];
            float xin = cbf ? bf2f(f2bf(xbc[c])) : xbc[c];
            acc += xin * convw[(size_t)c * kc + kc - 1];
            if (convb) acc += convb[c];
            for (int j = 0; j < kc - 2; j++) st(cst, cbf, base + j, ld(cst, cbf, base + j + 1));
            st(cst, cbf, base + kc - 2, xin);
            xc[(size_t)b * cd + c] = silu(acc);
        }
        for (int h = 0; h < nh; h++) {
            float v = zx[(size_t)b * proj + din + cd + h] + dtb[h];
            v = v > 20.0f ? v : log1pf(expf(v)); /* softplus, threshold 20 as torch's */
            if (lo > 0.0f || !isinf(hi)) v = fminf(fmaxf(v, lo), hi);
            dt[(size_t)b * nh + h] = v;
        }
    }
    const int hpg = nh / ng;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < nh; h++) {
            const float dth = dt[(size_t)b * nh + h], decay = expf(dth * A[h]);
            const float *x = xc + (size_t)b * cd + (size_t)h * hp;
            const float *Bv = xc + (size_t)b * cd + din + (size_t)(h / hpg) * ns;
            const float *Cv = xc + (size_t)b * cd + din + (size_t)ng * ns + (size_t)(h / hpg) * ns;
            float *Sh = S + ((size_t)b * nh + h) * hp * ns;
            for (int p = 0; p < hp; p++) {
                float *row = Sh + (size_t)p * ns;
                const float dx = dth * x[p];
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int s = 0; s < ns; s++) {
                    float v = row[s] * decay + dx * Bv[s];
                    row[s] = v;
                    acc += v * Cv[s];
                }
                y[(size_t)b * din + (size_t)h * hp + p] = acc + Dp[h] * x[p];
            }
        }
    const int gs = din / ng; /* gated RMSNorm: v = y·silu(z), normalised per group */
    for (int b = 0; b < B; b++) {
        float *yb = y + (size_t)b * din;
        const float *z = zx + (size_t)b * proj;
        for (int i = 0; i < din; i++) yb[i] = silu(z[i]) * yb[i];
        for (int g0 = 0; g0 < din; g0 += gs) {
            float ss = 0.0f;
            for (int i = 0; i < gs; i++) ss += yb[g0 + i] * yb[g0 + i];
            float r = 1.0f / sqrtf(ss / (float)gs + eps);
            for (int i = 0; i < gs; i++) yb[g0 + i] = yb[g0 + i] * r * gw[g0 + i];
        }
    }
    gemv((const void *)L[L_OUTPROJ], wbf, d, din, y, B, out, d);
    if (L[L_OUTB])
        for (int b = 0; b < B; b++)
            for (int i = 0; i < d; i++) out[(size_t)b * d + i] += ((const float *)L[L_OUTB])[i];
}

/* The four horizontal sums of a0..a3 at once: halves added pairwise, three shuffle levels for four sums
 * instead of three for each. */
static inline v4 hsum4(v16 a0, v16 a1, v16 a2, v16 a3) {
    const v16 t01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                    __builtin_shufflevector(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const v16 t23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                    __builtin_shufflevector(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const v16 u = __builtin_shufflevector(t01, t23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                  __builtin_shufflevector(t01, t23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    const v8 w = __builtin_shufflevector(u, u, 0, 1, 4, 5, 8, 9, 12, 13) +
                 __builtin_shufflevector(u, u, 2, 3, 6, 7, 10, 11, 14, 15);
    return __builtin_shufflevector(w, w, 0, 2, 4, 6) + __builtin_shufflevector(w, w, 1, 3, 5, 7);
}

/* The largest of n values, 16 lanes at a time (fmaxf would be a libm call per value). */
static float row_max(const float *p, int n) {
    v16 m = (v16){0} - INFINITY;
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        const v16 x = ldf(p + j);
        const i16v gt = x > m;
        m = as_f((as_i(x) & gt) | (as_i(m) & ~gt));
    }
    float mx = -INFINITY;
    for (int i = 0; i < 16; i++) mx = m[i] > mx ? m[i] : mx;
    for (; j < n; j++) mx = p[j] > mx ? p[j] : mx;
    return mx;
}

/* p[j] = exp(p[j] - mx) over n values, in place; returns their sum. */
static float exp_sum(float *p, int n, float mx) {
    v16 acc = {0};
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        const v16 e = vexp_neg(ldf(p + j) - mx);
        memcpy(p + j, &e, sizeof e);
        acc += e;
    }
    float sum = hsum(acc);
    for (; j < n; j++) {
        p[j] = expf(p[j] - mx);
        sum += p[j];
    }
    return sum;
}

enum { BLK = 256 };

/* Ask for the cache lines of one K or V row ahead of use. The keys and values are read in blocks,
 * alternating between the two; with these hints one thread's attention over 16k keys took 7.9 ms
 * for ten layers instead of 10.5 (a plain read of the same bytes: 5.9). */
static inline void prefetch_row(const void *X, int kbf, size_t i, int hd) {
    const char *a = (const char *)X + i * (kbf ? 2 : 4);
    for (int off = 0; off < hd * (kbf ? 2 : 4); off += 64) __builtin_prefetch(a + off);
}
/* o[r] = o[r] * corr[r] + sum_j p[r, j] V[j] for R query heads and n value rows of head size 16·NC
 * (p rows BLK apart): each value row is loaded once for the R heads, whose R·NC accumulators stay
 * in registers. `next`: the next block's key rows to prefetch meanwhile (NULL: none). */
#define PV_ROWS(NAME, R, NC)                                                                          \
    static void NAME(const void *V, int kbf, size_t base, int n, const float *p, float *o,           \
                     const float *corr, const void *next) {                                           \
        v16 acc[R][NC];                                                                               \
        for (int r = 0; r < R; r++)                                                                   \
            for (int c = 0; c < NC; c++) acc[r][c] = ldf(o + r * 16 * NC + 16 * c) * corr[r];         \
        for (int j = 0; j < n; j++) {                                                                 \
            if (next) prefetch_row(next, kbf, (size_t)j * 16 * NC, 16 * NC);                          \
            v16 v[NC];                                                                                \
            for (int c = 0; c < NC; c++) v[c] = ldw(V, kbf, base + (size_t)j * 16 * NC + 16 * c);     \
            for (int r = 0; r < R; r++)                                                               \
                for (int c = 0; c < NC; c++) acc[r][c] += p[r * BLK + j] * v[c];                     \
        }                                                                                             \
        for (int r = 0; r < R; r++) memcpy(o + r * 16 * NC, acc[r], sizeof acc[r]);                   \
    }

PV_ROWS(pv_4x64, 4, 4)
PV_ROWS(pv_2x128, 2, 8)

/* One KV head's attention for its `rep` (at most 64) query heads q [rep, hd] over s keys; output o
 * [rep, hd]; p: scratch of rep·BLK floats. One pass over the keys and values in blocks (the
 * online softmax: a running maximum and sum per query head, the partial output rescaled when the
 * maximum grows), so each key and value row is read from memory once, and a block's scores stay in
 * L1. Each key row is loaded once for four query heads. */
static void attend(const void *K, const void *V, int kbf, size_t base, int hd, int s, int rep, const float *q,
                   float scale, float *p, float *o) {
    const int nc = hd / 16, vec = hd % 16 == 0 && nc <= 16;
    float mrun[64], lrun[64];
    for (int r = 0; r < rep; r++) {
        mrun[r] = -INFINITY;
        lrun[r] = 0.0f;
    }
    for (int i = 0; i < rep * hd; i++) o[i] = 0.0f;
    for (int j0 = 0; j0 < s; j0 += BLK) {
        const int n = s < j0 + BLK ? s - j0 : BLK;
        for (int r0 = 0; r0 < rep; r0 += 4) { /* scores of the block: p[r, j - j0] */
            const int nr = rep - r0 < 4 ? rep - r0 : 4;
            const float *qr = q + (size_t)r0 * hd;
            float *pr = p + (size_t)r0 * BLK;
            for (int j = 0; j < n; j++) {
                const size_t row = base + (size_t)(j0 + j) * hd;
                if (r0 == 0) prefetch_row(V, kbf, row, hd); /* the values this block needs next */
                if (vec && nr == 4) {
                    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                    for (int c = 0; c < nc; c++) {
                        const v16 kv = ldw(K, kbf, row + 16 * c);
                        a0 += kv * ldf(qr + 16 * c);
                        a1 += kv * ldf(qr + hd + 16 * c);
                        a2 += kv * ldf(qr + 2 * hd + 16 * c);
                        a3 += kv * ldf(qr + 3 * hd + 16 * c);
                    }
                    const v4 z = hsum4(a0, a1, a2, a3);
                    for (int r = 0; r < 4; r++) pr[r * BLK + j] = z[r] * scale;
                } else {
                    for (int r = 0; r < nr; r++) {
                        float acc = 0.0f;
                        if (vec) {
                            v16 a = {0};
                            for (int c = 0; c < nc; c++) a += ldw(K, kbf, row + 16 * c) * ldf(qr + r * hd + 16 * c);
                            acc = hsum(a);
                        } else {
                            for (int i = 0; i < hd; i++) acc += qr[(size_t)r * hd + i] * ld(K, kbf, row + i);
                        }
                        pr[r * BLK + j] = acc * scale;
                    }
                }
            }
        }
        float corr[64];
        for (int r = 0; r < rep; r++) {
            float *pr = p + (size_t)r * BLK;
            const float bm = row_max(pr, n), m = bm > mrun[r] ? bm : mrun[r];
            corr[r] = expf(mrun[r] - m); /* 0 on the first block */
            lrun[r] = lrun[r] * corr[r] + exp_sum(pr, n, m);
            mrun[r] = m;
        }
        /* values: each row loaded once for 4 (head size 64) or 2 (128) query heads */
        const int nn = s - (j0 + BLK) < BLK ? s - (j0 + BLK) : BLK;
        const void *next = nn > 0 ? (const char *)K + (base + (size_t)(j0 + BLK) * hd) * (kbf ? 2 : 4) : NULL;
        const size_t vb = base + (size_t)j0 * hd;
        int r0 = 0;
        if (vec && nc == 4)
            for (; r0 + 4 <= rep; r0 += 4)
                pv_4x64(V, kbf, vb, n, p + (size_t)r0 * BLK, o + (size_t)r0 * hd, corr + r0, r0 ? NULL : next);
        if (vec && nc == 8)
            for (; r0 + 2 <= rep; r0 += 2)
                pv_2x128(V, kbf, vb, n, p + (size_t)r0 * BLK, o + (size_t)r0 * hd, corr + r0, r0 ? NULL : next);
        for (int r = r0; r < rep; r++) {
            const float *pr = p + (size_t)r * BLK;
            float *orow = o + (size_t)r * hd;
            if (vec) {
                v16 acc[16];
                for (int c = 0; c < nc; c++) acc[c] = ldf(orow + 16 * c) * corr[r];
                for (int j = 0; j < n; j++)
                    for (int c = 0; c < nc; c++) acc[c] += pr[j] * ldw(V, kbf, base + (size_t)(j0 + j) * hd + 16 * c);
                memcpy(orow, acc, sizeof(float) * hd);
            } else {
                for (int i = 0; i < hd; i++) orow[i] *= corr[r];
                for (int j = 0; j < n; j++)
                    for (int i = 0; i < hd; i++) orow[i] += pr[j] * ld(V, kbf, base + (size_t)(j0 + j) * hd + i);
            }
        }
    }
    for (int r = 0; r < rep; r++)
        for (int i = 0; i < hd; i++) o[(size_t)r * hd + i] /= lrun[r];
}

static void attention(const int64_t *G, const double *F, const int64_t *L, int B, int pos, const float *u,
                      float *out, float *work) {
    const int d = (int)G[G_D], qh = (int)G[G_QH], kvh = (int)G[G_KVH], hd = (int)G[G_HD], wbf = (int)G[G_WDT];
    const int kbf = (int)G[G_KVDT];
    const size_t maxlen = (size_t)G[G_MAXLEN];
    const int rep = qh / kvh, s = pos + 1;
    const float scale = (float)F[F_SCALE];
    float *q = work, *k = q + (size_t)B * qh * hd, *v = k + (size_t)B * kvh * hd;
    float *o = v + (size_t)B * kvh * hd;      /* [B, qh·hd] */
    float *sc = o + (size_t)B * qh * hd;      /* [B·kvh, rep, BLK] a block's scores per KV head */
    void *K = (void *)L[L_KC], *V = (void *)L[L_VC];

    gemv((const void *)L[L_WQ], wbf, qh * hd, d, u, B, q, qh * hd);
    gemv((const void *)L[L_WK], wbf, kvh * hd, d, u, B, k, kvh * hd);
    gemv((const void *)L[L_WV], wbf, kvh * hd, d, u, B, v, kvh * hd);
    const float *bq = (const float *)L[L_BQ], *bk = (const float *)L[L_BK], *bv = (const float *)L[L_BV];
    for (int b = 0; b < B; b++) {
        if (bq)
            for (int i = 0; i < qh * hd; i++) q[(size_t)b * qh * hd + i] += bq[i];
        if (bk)
            for (int i = 0; i < kvh * hd; i++) k[(size_t)b * kvh * hd + i] += bk[i];
        if (bv)
            for (int i = 0; i < kvh * hd; i++) v[(size_t)b * kvh * hd + i] += bv[i];
    }
    if (L[L_QNORM]) { /* per-head RMSNorm of q and k (Qwen3), before the rotation */
        rms_norm(q, (const float *)L[L_QNORM], B * qh, hd, (float)F[F_EPS], q);
        rms_norm(k, (const float *)L[L_KNORM], B * kvh, hd, (float)F[F_EPS], k);
    }
    if (G[G_ROPE]) { /* rotate-half RoPE at this position: pairs (i, i + hd/2) turn by pos·inv_freq[i] */
        const float *inv = (const float *)G[G_ROPE];
        const int half = hd / 2;
        for (int i = 0; i < half; i++) {
            const float a = (float)pos * inv[i], c = cosf(a), sn = sinf(a);
            for (int row = 0; row < B * (qh + kvh); row++) {
                float *x = row < B * qh ? q + (size_t)row * hd : k + (size_t)(row - B * qh) * hd;
                const float x1 = x[i], x2 = x[i + half];
                x[i] = x1 * c - x2 * sn;
                x[i + half] = x2 * c + x1 * sn;
            }
        }
    }
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int g = 0; g < kvh; g++) {
            const size_t base = ((size_t)b * kvh + g) * maxlen * hd;
            for (int i = 0; i < hd; i++) {
                st(K, kbf, base + (size_t)pos * hd + i, k[((size_t)b * kvh + g) * hd + i]);
                st(V, kbf, base + (size_t)pos * hd + i, v[((size_t)b * kvh + g) * hd + i]);
            }
            attend(K, V, kbf, base, hd, s, rep, q + ((size_t)b * qh + (size_t)g * rep) * hd, scale,
                   sc + ((size_t)b * kvh + g) * rep * BLK, o + ((size_t)b * qh + (size_t)g * rep) * hd);
        }
    gemv((const void *)L[L_WO], wbf, d, qh * hd, o, B, out, d);
    if (L[L_BO])
        for (int b = 0; b < B; b++)
            for (int i = 0; i < d; i++) out[(size_t)b * d + i] += ((const float *)L[L_BO])[i];
}

static void feed_forward(const int64_t *G, const int64_t *L, int B, const float *u, float *out, float *work) {
    const int d = (int)G[G_D], E = (int)G[G_E], topk = (int)G[G_TOPK], I = (int)G[G_I], S = (int)G[G_SHARED];
    const int wbf = (int)G[G_WDT], routing = (int)G[G_ROUTING];
    const int wide = I > S ? I : S;
    float *hin = work;                          /* [B, 2·wide] */
    float *m = hin + (size_t)B * 2 * wide;      /* [B, wide] */
    float *o = m + (size_t)B * wide;            /* [B, d] */
    float *xs = o + (size_t)B * d;              /* [B, d]: the rows routed to one expert */
    float *rl = xs + (size_t)B * d;             /* [B, E] router logits */
    float *wt = rl + (size_t)B * E;             /* [B, topk] */
    int ids[64 * 16], rows[64];
    float rw[64];
    for (size_t i = 0; i < (size_t)B * d; i++) out[i] = 0.0f;
    if (E) {
        gemv((const void *)L[L_ROUTER], wbf, E, d, u, B, rl, E);
        for (int b = 0; b < B; b++) { /* top-k by value, first index on ties (as torch.topk) */
            float *lg = rl + (size_t)b * E;
            if (routing != 0) { /* softmax over all experts first */
                float mx = -INFINITY, sum = 0.0f;
                for (int e = 0; e < E; e++) mx = fmaxf(mx, lg[e]);
                for (int e = 0; e < E; e++) { lg[e] = expf(lg[e] - mx); sum += lg[e]; }
                for (int e = 0; e < E; e++) lg[e] /= sum;
            }
            for (int j = 0; j < topk; j++) {
                int best = -1;
                for (int e = 0; e < E; e++) {
                    int used = 0;
                    for (int i = 0; i < j; i++) used |= ids[b * topk + i] == e;
                    if (!used && (best < 0 || lg[e] > lg[best])) best = e;
                }
                ids[b * topk + j] = best;
                wt[(size_t)b * topk + j] = lg[best];
            }
            float *w = wt + (size_t)b * topk;
            if (routing == 0) { /* Granite: softmax over the k chosen logits */
                float mx = w[0], sum = 0.0f;
                for (int j = 0; j < topk; j++) { w[j] = expf(w[j] - mx); sum += w[j]; }
                for (int j = 0; j < topk; j++) w[j] /= sum;
            } else if (routing == 2) { /* renormalised */
                float sum = 0.0f;
                for (int j = 0; j < topk; j++) sum += w[j];
                for (int j = 0; j < topk; j++) w[j] /= sum;
            }
        }
        const char *win = (const char *)L[L_EWIN], *wout = (const char *)L[L_EWOUT];
        const size_t es = wbf ? 2 : 4;
        for (int e = 0; e < E; e++) { /* the tokens routed to expert e, in one pass over its weights */
            int n = 0;
            for (int b = 0; b < B; b++)
                for (int j = 0; j < topk; j++)
                    if (ids[b * topk + j] == e) {
                        rows[n] = b;
                        rw[n] = wt[(size_t)b * topk + j];
                        memcpy(xs + (size_t)n * d, u + (size_t)b * d, sizeof(float) * d);
                        n++;
                    }
            if (!n) continue;
            gemv(win + (size_t)e * 2 * I * d * es, wbf, 2 * I, d, xs, n, hin, 2 * I);
            swiglu(hin, n, I, m);
            gemv(wout + (size_t)e * d * I * es, wbf, d, I, m, n, o, d);
            for (int r = 0; r < n; r++)
                for (int i = 0; i < d; i++) out[(size_t)rows[r] * d + i] += o[(size_t)r * d + i] * rw[r];
        }
    }
    if (S) {
        gemv((const void *)L[L_SWIN], wbf, 2 * S, d, u, B, hin, 2 * S);
        swiglu(hin, B, S, m);
        gemv((const void *)L[L_SWOUT], wbf, d, S, m, B, o, d);
        for (size_t i = 0; i < (size_t)B * d; i++) out[i] += o[i];
    }
}

/* The lengths of G, F and one layer's row of L, for the caller to check its tables against. */
int granite_abi(int which) { return which == 0 ? G_N : which == 1 ? F_N : LSLOTS; }

/* Floats of scratch one step of B sequences needs (the caller's buffer, `work`); attention's scores
 * take a block of keys at a time, so it does not grow with the depth. */
int64_t granite_step_work(const int64_t *G, int B) {
    const int64_t d = G[G_D], din = G[G_DIN], cd = G[G_CONVDIM], nh = G[G_NH], ng = G[G_NG], ns = G[G_NS];
    const int64_t qh = G[G_QH], kvh = G[G_KVH], hd = G[G_HD], E = G[G_E], I = G[G_I], S = G[G_SHARED];
    const int64_t proj = 2 * din + 2 * ng * ns + nh, wide = I > S ? I : S;
    int64_t mam = B * (proj + cd + din + nh);
    int64_t att = B * (2 * qh * hd + 2 * kvh * hd) + B * kvh * (qh / (kvh ? kvh : 1)) * (int64_t)BLK;
    int64_t ffn = B * (3 * wide + 2 * d + E + 16);
    int64_t mix = mam > att ? mam : att;
    return 3 * B * d + (mix > ffn ? mix : ffn) + B * G[G_VOCAB];
}

/* One token for each of B sequences at position pos: ids [B]; logits [B, vocab] (fp32). Returns 0;
 * -1 when B, topk or query heads per KV head are beyond the fixed tables; -2 for a token id outside the vocabulary. */
int granite_step(const int64_t *G, const double *F, const int64_t *Ls, int B, const int64_t *ids, int pos,
                 float *work, float *logits) {
    const int d = (int)G[G_D], wbf = (int)G[G_WDT];
    if (B > 64 || G[G_TOPK] > 16 || (G[G_KVH] && G[G_QH] / G[G_KVH] > 64)) return -1;
    for (int b = 0; b < B; b++)
        if (ids[b] < 0 || ids[b] >= G[G_VOCAB]) return -2;
    float *h = work, *u = h + (size_t)B * d, *mo = u + (size_t)B * d, *rest = mo + (size_t)B * d;
    const float rho = (float)F[F_RHO], eps = (float)F[F_EPS], emb = (float)F[F_EMB];
    for (int b = 0; b < B; b++)
        for (int i = 0; i < d; i++) h[(size_t)b * d + i] = ld((const void *)G[G_EMBED], wbf, (size_t)ids[b] * d + i) * emb;
    for (int l = 0; l < (int)G[G_NLAYERS]; l++) {
        const int64_t *L = Ls + (size_t)l * LSLOTS;
        rms_norm(h, (const float *)L[L_NORM1], B, d, eps, u);
        if (L[L_KIND] == 0) mamba(G, F, L, B, u, mo, rest);
        else attention(G, F, L, B, pos, u, mo, rest);
        for (size_t i = 0; i < (size_t)B * d; i++) h[i] = mo[i] * rho + h[i];
        rms_norm(h, (const float *)L[L_NORM2], B, d, eps, u);
        feed_forward(G, L, B, u, mo, rest);
        for (size_t i = 0; i < (size_t)B * d; i++) h[i] = mo[i] * rho + h[i];
    }
    rms_norm(h, (const float *)G[G_NORM], B, d, eps, u);
    const int64_t v = G[G_VOCAB];
    gemv((const void *)G[G_LMHEAD], wbf, (int)v, d, u, B, logits, (int)v);
    const float ls = (float)F[F_LOGIT];
    if (ls != 1.0f)
        for (size_t i = 0; i < (size_t)B * v; i++) logits[i] /= ls;
    return 0;
}
