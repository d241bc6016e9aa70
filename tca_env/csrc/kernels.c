/* Fused CPU kernels for greedy Tree Cross Attention inference (no autograd).
 *
 * Written for tca_env/kernels.py, which compiles this file with the system C compiler on first use
 * and calls it through ctypes. Every function handles a range [start, end) of independent rows so the
 * caller can split work across threads (ctypes releases the GIL). Layouts are those of the PyTorch
 * tensors in tca_env/search.py and tca_env/tree.py, all float32 and C-contiguous; boolean masks are
 * one byte per element and may be NULL (no padding). The PyTorch code paths remain the reference:
 * tests/test_kernels.py checks these kernels against them.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define FMAX(a, b) ((a) > (b) ? (a) : (b)) /* inlined (fmaxf may be a call); inputs are NaN-free */


/* exp(x) for x <= 0 (softmax terms after subtracting the max): Cody-Waite reduction and the Cephes
 * degree-6 polynomial, within ~2 ulp of expf. Branch-free and call-free so loops over arrays of
 * arguments vectorize. Arguments below -87 give exp(-87) ~ 1.6e-38 instead of less (callers zero
 * masked entries explicitly; next to the max term, which is 1, the difference is nil). */
static inline float fexp(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = (float)(int32_t)(x * 1.44269504088896341f - 0.5f); /* nearest integer (x <= 0) */
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } s = {.i = ((int32_t)n + 127) << 23};
    return p * s.f;
}

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4))); /* for unaligned loads */

static inline v16 ld16(const float *p) { return *(const v16u *)p; }

typedef int32_t i16 __attribute__((vector_size(64)));

/* fexp on 16 lanes (x <= 0), written with vector operations so it compiles to straight-line SIMD. */
static inline v16 fexp16(v16 x) {
    const v16 lo = (v16){0} - 87.0f;
    const i16 below = x < lo;
    x = (v16)(((i16)x & ~below) | ((i16)lo & below));
    const v16 n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504088896341f - 0.5f, i16), v16);
    const v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (v16)((__builtin_convertvector(n, i16) + 127) << 23);
}

/* In place over n floats: x <- fexp(x) * m (m: 0/1 masks, or NULL). */
static inline void fexp_array(float *x, const float *m, int n) {
    int t = 0;
    for (; t + 16 <= n; t += 16) {
        v16 e = fexp16(ld16(x + t));
        if (m) e *= ld16(m + t);
        *(v16u *)(x + t) = e;
    }
    for (; t < n; t++) x[t] = fexp(x[t]) * (m ? m[t] : 1.0f);
}

/* In place over n floats: d <- sigmoid(d). */
static inline void sigmoid_array(float *d, int n) {
    int t = 0;
    const i16 absmask = (i16){0} + 0x7fffffff;
    for (; t + 16 <= n; t += 16) {
        const v16 v = ld16(d + t);
        const v16 e = fexp16((v16)((i16)v | ~absmask)); /* exp(-|d|) */
        const i16 pos = v > 0.0f;
        const v16 num = (v16)(((i16)e & ~pos) | ((i16)((v16){0} + 1.0f) & pos));
        *(v16u *)(d + t) = num / (1.0f + e);
    }
    for (; t < n; t++) {
        const float e = fexp(d[t] > 0 ? -d[t] : d[t]);
        d[t] = (d[t] > 0 ? 1.0f : e) / (1.0f + e);
    }
}

/* Horizontal sums of four 16-lane vectors into o[0..3], one shuffle tree for all four. */
static inline void hsum4(v16 a, v16 b, v16 c, v16 d, float *o) {
    v16 x = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    v16 y = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    v16 z = __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
            __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    z += __builtin_shufflevector(z, z, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    z += __builtin_shufflevector(z, z, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    o[0] = z[0]; o[1] = z[4]; o[2] = z[8]; o[3] = z[12];
}

static inline float hsum16(v16 x) {
    x += __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    x += __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    x += __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    x += __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return x[0];
}

/* <a, b> over n floats (one vector when n = 16; the callers pass a compile-time 16 where they can). */
static inline __attribute__((always_inline)) float dot(const float *a, const float *b, int n) {
    if (n == 16) return hsum16(ld16(a) * ld16(b));
    float s = 0.0f;
    for (int t = 0; t < n; t++) s += a[t] * b[t];
    return s;
}

/* y += a * x over n floats. */
static inline __attribute__((always_inline)) void axpy(float a, const float *x, float *y, int n) {
    if (n == 16) {
        *(v16u *)y = ld16(y) + a * ld16(x);
        return;
    }
    for (int t = 0; t < n; t++) y[t] += a * x[t];
}

/* Per-head dot products of a query row and a key row, both [H, dh]: o[h] = <q_h, k_h>. */
static inline __attribute__((always_inline)) void head_dots(const float *q, const float *k, int H, int dh,
                                                            float *o) {
    int h = 0;
    if (dh == 16)
        for (; h + 4 <= H; h += 4)
            hsum4(ld16(q + h * 16) * ld16(k + h * 16), ld16(q + h * 16 + 16) * ld16(k + h * 16 + 16),
                  ld16(q + h * 16 + 32) * ld16(k + h * 16 + 32), ld16(q + h * 16 + 48) * ld16(k + h * 16 + 48),
                  o + h);
    for (; h < H; h++) o[h] = dot(q + h * dh, k + h * dh, dh);
}

/* Per-head softmax over the b children and the policy at one node, from the scores sc [b][H]:
 * p [b][H] per-head softmax, lp [b] log pi = log max(mean_h p, FLT_MIN) (-INFINITY for padded children). */
static inline __attribute__((always_inline)) void policy_from_scores(const float *sc, const uint8_t *mk, int b, int H,
                                                                     float *p, float *lp) {
    for (int c = 0; c < b; c++) lp[c] = 0.0f;
    for (int h = 0; h < H; h++) {
        float mx = -INFINITY, z = 0.0f;
        for (int c = 0; c < b; c++)
            if (!mk || mk[c]) mx = FMAX(mx, sc[c * H + h]);
        for (int c = 0; c < b; c++) {
            p[c * H + h] = (!mk || mk[c]) ? fexp(sc[c * H + h] - mx) : 0.0f;
            z += p[c * H + h];
        }
        const float inv = 1.0f / z;
        for (int c = 0; c < b; c++) {
            p[c * H + h] *= inv;
            lp[c] += p[c * H + h];
        }
    }
    for (int c = 0; c < b; c++) lp[c] = (!mk || mk[c]) ? logf(FMAX(lp[c] / H, FLT_MIN)) : -INFINITY;
}

/* Scores of the b children at one node (sc [b][H]) and the policy there (see policy_from_scores). */
static inline __attribute__((always_inline)) void node_policy(const float *qi, const float *K, const uint8_t *mk, int b,
                                                              int H, int dh, float *sc, float *p, float *lp) {
    const int D = H * dh;
    for (int c = 0; c < b; c++) head_dots(qi, K + (int64_t)c * D, H, dh, sc + c * H);
    policy_from_scores(sc, mk, b, H, p, lp);
}

#define DH_MAX 256 /* largest head width handled */
#define QB 16      /* queries advanced together, level by level: their row loads are in flight together */

/* Greedy descent and read-out for queries [start, end) of q [B*M, H, dh] (pre-scaled).
 *
 * keys[s], values[s]: [B, b^(s+1), H, dh], the candidates of step s (0 <= s < k); masks[s]: [B, b^(s+1)]
 * or NULL. tok_k, tok_v: [B, b^k * P, H, dh]; tok_mask: [B, b^k * P] or NULL.
 * The policy at a node is mean_h softmax_c(<q_h, k_{c,h}>) (masked children get 0); greedy takes the
 * first argmax. S = the b-1 unselected siblings of every step, then the P slots of the chosen bucket;
 * out[i] = per-head softmax attention over S (masked entries get weight 0). path (may be NULL):
 * [B*M, k+1] node index per level.
 */
static inline __attribute__((always_inline)) void
greedy_readout(int64_t M, int H, int dh, int b, int k, int P,
               const float *q, const float *const *keys, const float *const *values,
               const uint8_t *const *masks, const float *tok_k, const float *tok_v,
               const uint8_t *tok_mask, float *out, int64_t *path, int64_t start, int64_t end) {
    const int D = H * dh;
    const int nS = (b - 1) * k + P;
    float *logit = malloc(sizeof(float) * (size_t)QB * H * nS); /* [QB][H][nS], then the weights */
    float *realf = malloc(sizeof(float) * (size_t)QB * H * nS); /* 1 for real entries of S, else 0 */
    const float **vrow = malloc(sizeof(float *) * (size_t)QB * nS);
    float *sc = malloc(sizeof(float) * (size_t)QB * b * H); /* [QB][b][H] children's scores */
    float *pr = malloc(sizeof(float) * (size_t)QB * H);     /* [QB][H] binary policy per head */
    float *ex = malloc(sizeof(float) * (size_t)b * H);
    float *prob = malloc(sizeof(float) * (size_t)b);
    int64_t node[QB], tree[QB];
    int64_t nb = 1; /* b^k */
    for (int s = 0; s < k; s++) nb *= b;
    const int64_t slots = nb * P;

    for (int64_t i0 = start; i0 < end; i0 += QB) {
        const int nq = end - i0 < QB ? (int)(end - i0) : QB;
        for (int j = 0; j < nq; j++) {
            node[j] = 0;
            tree[j] = (i0 + j) / M;
            if (path) path[(i0 + j) * (k + 1)] = 0;
        }
        int64_t width = 1;
        for (int s = 0; s < k; s++) {
            width *= b;
            const uint8_t *ms = masks[s];
            for (int j = 0; j < nq; j++) {
                const float *K = keys[s] + (tree[j] * width + node[j] * b) * D;
                for (int c = 0; c < b; c++) head_dots(q + (i0 + j) * D, K + (int64_t)c * D, H, dh, sc + (j * b + c) * H);
            }
            if (b == 2 && !ms) { /* two children, no padding: p_h(child 0) = sigmoid(s0 - s1) */
                for (int j = 0; j < nq; j++)
                    for (int h = 0; h < H; h++) pr[j * H + h] = sc[(j * 2) * H + h] - sc[(j * 2 + 1) * H + h];
                sigmoid_array(pr, nq * H);
            }
            for (int j = 0; j < nq; j++) {
                const int64_t first = tree[j] * width + node[j] * b; /* row of child 0 in the level table */
                const uint8_t *mk = ms ? ms + first : NULL;
                const float *scj = sc + j * b * H;
                int a = 0;
                if (b == 2 && !ms) {
                    /* mean_h p_h(0) >= 1/2 <=> child 0 (ties go to the first child, as argmax) */
                    float p0 = 0.0f;
                    for (int h = 0; h < H; h++) p0 += pr[j * H + h];
                    a = p0 >= 0.5f * H ? 0 : 1;
                } else {
                    policy_from_scores(scj, mk, b, H, ex, prob); /* prob: log pi, -inf when padded */
                    float best = -INFINITY;
                    for (int c = 0; c < b; c++)
                        if (prob[c] > best) { best = prob[c]; a = c; }
                }
                int n = s * (b - 1);
                for (int c = 0; c < b; c++) {
                    if (c == a) continue;
                    const float r = (!mk || mk[c]) ? 1.0f : 0.0f;
                    for (int h = 0; h < H; h++) {
                        logit[(j * H + h) * nS + n] = scj[c * H + h];
                        realf[(j * H + h) * nS + n] = r;
                    }
                    vrow[j * nS + n] = values[s] + (first + c) * D;
                    __builtin_prefetch(vrow[j * nS + n]);
                    n++;
                }
                node[j] = node[j] * b + a;
                if (path) path[(i0 + j) * (k + 1) + s + 1] = node[j];
                /* this query's next children (or bucket slots), needed after the other QB - 1 queries */
                const float *next = s + 1 < k ? keys[s + 1] + (tree[j] * width * b + node[j] * b) * D
                                              : tok_k + (tree[j] * slots + node[j] * P) * D;
                for (int t = 0; t < 2 * D; t += 16) __builtin_prefetch(next + t);
            }
        }
        /* the bucket's tokens join S */
        for (int j = 0; j < nq; j++) {
            const int64_t tfirst = tree[j] * slots + node[j] * P;
            for (int t = 0, n = (b - 1) * k; t < P; t++, n++) {
                const float r = (!tok_mask || tok_mask[tfirst + t]) ? 1.0f : 0.0f;
                head_dots(q + (i0 + j) * D, tok_k + (tfirst + t) * D, H, dh, ex);
                for (int h = 0; h < H; h++) {
                    logit[(j * H + h) * nS + n] = ex[h];
                    realf[(j * H + h) * nS + n] = r;
                }
                vrow[j * nS + n] = tok_v + (tfirst + t) * D;
            }
        }
        /* softmax over S per (query, head): subtract the max of the real entries, exponentiate the
         * whole block at once (vectorized), zero the padded entries */
        for (int jh = 0; jh < nq * H; jh++) {
            float *lg = logit + jh * nS;
            const float *rf = realf + jh * nS;
            float mx = -INFINITY;
            for (int e = 0; e < nS; e++)
                if (rf[e] != 0.0f) mx = FMAX(mx, lg[e]);
            for (int e = 0; e < nS; e++) lg[e] -= mx;
        }
        fexp_array(logit, realf, nq * H * nS);
        for (int j = 0; j < nq; j++) {
            float *o = out + (i0 + j) * D;
            for (int h = 0; h < H; h++) {
                const float *w = logit + (j * H + h) * nS;
                float z = 0.0f;
                for (int e = 0; e < nS; e++) z += w[e];
                const float inv = 1.0f / z;
                float *oh = o + h * dh;
                if (dh == 16) { /* one vector register */
                    v16 acc = {0};
                    for (int e = 0; e < nS; e++) acc += w[e] * ld16(vrow[j * nS + e] + h * 16);
                    *(v16u *)oh = acc * inv;
                    continue;
                }
                float acc[DH_MAX];
                for (int t = 0; t < dh; t++) acc[t] = 0.0f;
                for (int e = 0; e < nS; e++) {
                    const float *v = vrow[j * nS + e] + h * dh;
                    const float we = w[e];
                    for (int t = 0; t < dh; t++) acc[t] += we * v[t];
                }
                for (int t = 0; t < dh; t++) oh[t] = acc[t] * inv;
            }
        }
    }
    free(logit); free(realf); free(vrow); free(sc); free(pr); free(ex); free(prob);
}

/* Greedy descent and read-out (see greedy_readout above); dh = 16 (the paper's D = 64 with 4 heads)
 * and dh = 8, 32 get specialised copies whose per-head loops unroll into registers. Returns -1 when
 * dh > DH_MAX. */
int tca_greedy_readout(int64_t M, int H, int dh, int b, int k, int P, const float *q, const float *const *keys,
                       const float *const *values, const uint8_t *const *masks, const float *tok_k,
                       const float *tok_v, const uint8_t *tok_mask, float *out, int64_t *path, int64_t start,
                       int64_t end) {
    if (dh > DH_MAX) return -1;
#define CALL(DH) greedy_readout(M, H, DH, b, k, P, q, keys, values, masks, tok_k, tok_v, tok_mask, out, path, start, end)
    if (dh == 16) CALL(16);
    else if (dh == 8) CALL(8);
    else if (dh == 32) CALL(32);
    else CALL(dh);
#undef CALL
    return 0;
}

/* Self-attention inside groups of c children, groups [start, end) of qkv [G, c, 3, H, dh] (q pre-scaled
 * or not: scale multiplies the scores). mask: [G, c] or NULL; a masked child is never attended to; a
 * group with no real child attends uniformly (its node is masked anyway). out: [G, c, H, dh].
 */
static inline __attribute__((always_inline)) void
group_attention(int c, int H, int dh, float scale, const float *qkv, const uint8_t *mask, float *out, int64_t start,
                int64_t end) {
    const int D = H * dh;
    if (c == 2 && !mask && dh == 16 && H % 4 == 0 && H <= 64) {
        /* two children, no padding (the binary tree's usual case): out_i = v_1 + sigmoid(s_i0 - s_i1) (v_0 - v_1)
         * per head, with the sigmoids of 16 (group, child, head) triples at a time */
        const int per = 2 * H;                /* sigmoids per group */
        const int gb = per >= 16 ? 1 : 16 / per; /* groups per vector of 16 */
        float d[16 * 64], tmp[4];
        for (int64_t g0 = start; g0 < end; g0 += gb) {
            const int ng = end - g0 < gb ? (int)(end - g0) : gb;
            for (int j = 0; j < ng; j++) {
                const float *base = qkv + (g0 + j) * 6 * (int64_t)D;
                for (int i = 0; i < 2; i++) {
                    const float *qi = base + (int64_t)i * 3 * D;
                    for (int h = 0; h < H; h += 4) {
                        float s0[4];
                        head_dots(qi + h * 16, base + D + h * 16, 4, 16, s0);
                        head_dots(qi + h * 16, base + 4 * D + h * 16, 4, 16, tmp);
                        for (int t = 0; t < 4; t++) d[j * per + i * H + h + t] = scale * (s0[t] - tmp[t]);
                    }
                }
            }
            sigmoid_array(d, ng * per);
            for (int j = 0; j < ng; j++) {
                const float *base = qkv + (g0 + j) * 6 * (int64_t)D;
                for (int i = 0; i < 2; i++) {
                    float *oi = out + ((g0 + j) * 2 + i) * (int64_t)D;
                    for (int h = 0; h < H; h++) {
                        const v16 v0 = ld16(base + 2 * D + h * 16), v1 = ld16(base + 5 * D + h * 16);
                        *(v16u *)(oi + h * 16) = v1 + d[j * per + i * H + h] * (v0 - v1);
                    }
                }
            }
        }
        return;
    }
    float *sc = malloc(sizeof(float) * (size_t)c * H); /* scores of one query child over the c keys */
    for (int64_t g = start; g < end; g++) {
        const float *base = qkv + g * (int64_t)c * 3 * D;
        const uint8_t *m = mask ? mask + g * c : NULL;
        int any = 0;
        if (m) for (int j = 0; j < c; j++) any |= m[j];
        for (int i = 0; i < c; i++) {
            const float *qi = base + (int64_t)i * 3 * D;
            float *oi = out + (g * c + i) * (int64_t)D;
            for (int j = 0; j < c; j++) {
                if (m && !any) { /* no real child: uniform weights, as the PyTorch layer */
                    for (int h = 0; h < H; h++) sc[j * H + h] = 0.0f;
                } else if (m && !m[j]) {
                    for (int h = 0; h < H; h++) sc[j * H + h] = -INFINITY;
                } else {
                    head_dots(qi, base + (int64_t)j * 3 * D + D, H, dh, sc + j * H);
                    for (int h = 0; h < H; h++) sc[j * H + h] *= scale;
                }
            }
            for (int h = 0; h < H; h++) {
                float mx = -INFINITY, z = 0.0f;
                for (int j = 0; j < c; j++) mx = FMAX(mx, sc[j * H + h]);
                for (int j = 0; j < c; j++) {
                    const float e = sc[j * H + h] == -INFINITY ? 0.0f : fexp(sc[j * H + h] - mx);
                    sc[j * H + h] = e;
                    z += e;
                }
                const float inv = 1.0f / z;
                float *oh = oi + h * dh;
                for (int t = 0; t < dh; t++) oh[t] = 0.0f;
                for (int j = 0; j < c; j++)
                    if (sc[j * H + h] != 0.0f) axpy(sc[j * H + h] * inv, base + (int64_t)j * 3 * D + 2 * D + h * dh, oh, dh);
            }
        }
    }
    free(sc);
}

/* ------------------------------------------------------------------------------------------------
 * Training: sampled (or replayed, or greedy) descent + read-out with the path statistics, and its
 * backward pass. One query at a time (training batches are small); scores, policy and read-out are
 * those of greedy_readout, and additionally
 *   log pi_c = log max(mean_h softmax_c(s_ch), FLT_MIN) for real children (-inf for padded ones),
 *   log_prob = sum over steps of log pi_{chosen}, entropy = sum over steps of -sum_c p_c log p_c
 *   (p_c = exp(log pi_c)), exactly the quantities of tca_env/search.py.
 * Choice: actions[i, s] when given, else argmax_c (log pi_c + gumbel[i, s, c]) when gumbel is given,
 * else the greedy first argmax of log pi_c.
 * ------------------------------------------------------------------------------------------------ */


/* Softmax over the nS entries of S for each head: lg [nS][H] logits -> w [nS][H] weights. */
static inline __attribute__((always_inline)) void s_softmax(const float *lg, const uint8_t *real, int nS, int H, float *w) {
    for (int h = 0; h < H; h++) {
        float mx = -INFINITY, z = 0.0f;
        for (int e = 0; e < nS; e++)
            if (real[e]) mx = FMAX(mx, lg[e * H + h]);
        for (int e = 0; e < nS; e++) {
            w[e * H + h] = real[e] ? fexp(lg[e * H + h] - mx) : 0.0f;
            z += w[e * H + h];
        }
        for (int e = 0; e < nS; e++) w[e * H + h] /= z;
    }
}

typedef struct {
    float *sc, *p, *lp;    /* [k][b][H], [k][b][H], [k][b] */
    float *lg, *w;         /* [nS][H] */
    uint8_t *real;         /* [nS] */
    int64_t *row;          /* [nS] row of the entry in its key and value tables */
    int *level;            /* [nS] step s for siblings, -1 for tokens */
    int *child;            /* [nS] child position for siblings */
} Work;

static Work work_alloc(int b, int k, int H, int nS) {
    Work w;
    const int kk = k > 0 ? k : 1;
    w.sc = malloc(sizeof(float) * (size_t)kk * b * H);
    w.p = malloc(sizeof(float) * (size_t)kk * b * H);
    w.lp = malloc(sizeof(float) * (size_t)kk * b);
    w.lg = malloc(sizeof(float) * (size_t)nS * H);
    w.w = malloc(sizeof(float) * (size_t)nS * H);
    w.real = malloc((size_t)nS);
    w.row = malloc(sizeof(int64_t) * (size_t)nS);
    w.level = malloc(sizeof(int) * (size_t)nS);
    w.child = malloc(sizeof(int) * (size_t)nS);
    return w;
}

static void work_free(Work *w) {
    free(w->sc); free(w->p); free(w->lp); free(w->lg); free(w->w); free(w->real); free(w->row);
    free(w->level); free(w->child);
}

/* Walk query i down the tree (choosing, or following path when follow != 0), filling the work
 * arrays with the policy at every step and S; returns log_prob and entropy through lp_sum / ent_sum. */
static inline __attribute__((always_inline)) void walk(int64_t i, int64_t M, int H, int dh, int b, int k, int P, const float *q,
                 const float *const *keys, const uint8_t *const *masks, const float *tok_k,
                 const uint8_t *tok_mask, const float *gumbel, const int64_t *actions, int64_t *path, int follow,
                 Work *W, float *lp_sum, float *ent_sum) {
    const int D = H * dh;
    const float *qi = q + i * D;
    const int64_t tree = i / M;
    int64_t node = 0, width = 1, slots = P;
    for (int s = 0; s < k; s++) slots *= b;
    float lps = 0.0f, ents = 0.0f;
    int n = 0;
    if (!follow) path[i * (k + 1)] = 0;
    for (int s = 0; s < k; s++) {
        width *= b;
        const int64_t first = tree * width + node * b;
        const uint8_t *mk = masks[s] ? masks[s] + first : NULL;
        float *sc = W->sc + s * b * H, *p = W->p + s * b * H, *lp = W->lp + s * b;
        node_policy(qi, keys[s] + first * D, mk, b, H, dh, sc, p, lp);
        int a = 0;
        if (follow) {
            a = (int)(path[i * (k + 1) + s + 1] - b * path[i * (k + 1) + s]);
        } else if (actions) {
            a = (int)actions[i * k + s];
        } else {
            float best = -INFINITY;
            for (int c = 0; c < b; c++) {
                if (mk && !mk[c]) continue;
                const float v = gumbel ? lp[c] + gumbel[(i * k + s) * b + c] : lp[c];
                if (v > best) { best = v; a = c; }
            }
        }
        lps += lp[a];
        for (int c = 0; c < b; c++)
            if (lp[c] > -INFINITY) {
                const float pc = fexp(lp[c]);
                ents -= pc * lp[c];
            }
        for (int c = 0; c < b; c++) {
            if (c == a) continue;
            W->real[n] = !mk || mk[c];
            for (int h = 0; h < H; h++) W->lg[n * H + h] = sc[c * H + h];
            W->row[n] = first + c;
            W->level[n] = s;
            W->child[n] = c;
            n++;
        }
        node = node * b + a;
        if (!follow) path[i * (k + 1) + s + 1] = node;
    }
    const int64_t tfirst = tree * slots + node * P;
    for (int t = 0; t < P; t++, n++) {
        W->real[n] = !tok_mask || tok_mask[tfirst + t];
        head_dots(qi, tok_k + (tfirst + t) * D, H, dh, W->lg + n * H);
        W->row[n] = tfirst + t;
        W->level[n] = -1;
        W->child[n] = t;
    }
    *lp_sum = lps;
    *ent_sum = ents;
}

static inline __attribute__((always_inline)) void
search_readout_fwd(int64_t M, int H, int dh, int b, int k, int P, const float *q, const float *const *keys,
                   const float *const *values, const uint8_t *const *masks, const float *tok_k, const float *tok_v,
                   const uint8_t *tok_mask, const float *gumbel, const int64_t *actions, float *out, int64_t *path,
                   float *logp, float *ent, int64_t start, int64_t end) {
    const int D = H * dh, nS = (b - 1) * k + P;
    Work W = work_alloc(b, k, H, nS);
    for (int64_t i = start; i < end; i++) {
        walk(i, M, H, dh, b, k, P, q, keys, masks, tok_k, tok_mask, gumbel, actions, path, 0, &W, logp + i, ent + i);
        s_softmax(W.lg, W.real, nS, H, W.w);
        float *o = out + i * D;
        for (int t = 0; t < D; t++) o[t] = 0.0f;
        for (int e = 0; e < nS; e++) {
            if (!W.real[e]) continue;
            const float *v = (W.level[e] < 0 ? tok_v : values[W.level[e]]) + W.row[e] * D;
            for (int h = 0; h < H; h++) {
                const float a = W.w[e * H + h];
                axpy(a, v + h * dh, o + h * dh, dh);
            }
        }
    }
    work_free(&W);
}

/* Backward of tca_search_readout_fwd along the given path. g_out [B*M, H, dh], g_logp / g_ent [B*M]
 * (either may be NULL: zero). Gradients are accumulated (+=) into dq and the key / value tables'
 * gradients (same layouts as the tables); ranges [start, end) must not split a tree across threads. */
static inline __attribute__((always_inline)) void
search_readout_bwd(int64_t M, int H, int dh, int b, int k, int P, const float *q, const float *const *keys,
                   const float *const *values, const uint8_t *const *masks, const float *tok_k, const float *tok_v,
                   const uint8_t *tok_mask, const int64_t *path, const float *g_out, const float *g_logp,
                   const float *g_ent, float *dq, float *const *dkeys, float *const *dvalues, float *dtok_k,
                   float *dtok_v, int64_t start, int64_t end) {
    const int D = H * dh, nS = (b - 1) * k + P;
    Work W = work_alloc(b, k, H, nS);
    float *ds = malloc(sizeof(float) * (size_t)(k > 0 ? k : 1) * b * H); /* d score [k][b][H] */
    float *dl = malloc(sizeof(float) * (size_t)nS * H);
    float *dpi = malloc(sizeof(float) * (size_t)b);
    float lps, ents;
    for (int64_t i = start; i < end; i++) {
        walk(i, M, H, dh, b, k, P, q, keys, masks, tok_k, tok_mask, NULL, NULL, (int64_t *)path, 1, &W, &lps, &ents);
        const float *qi = q + i * D, *go = g_out + i * D;
        float *dqi = dq + i * D;
        /* read-out: out_h = sum_e w_eh v_eh */
        s_softmax(W.lg, W.real, nS, H, W.w);
        for (int h = 0; h < H; h++) {
            float dot_go = 0.0f; /* sum_e w_eh <g_h, v_eh> */
            for (int e = 0; e < nS; e++) {
                if (!W.real[e]) { dl[e * H + h] = 0.0f; continue; }
                const float *v = (W.level[e] < 0 ? tok_v : values[W.level[e]]) + W.row[e] * D + h * dh;
                const float da = dot(go + h * dh, v, dh);
                dl[e * H + h] = da;
                dot_go += W.w[e * H + h] * da;
            }
            for (int e = 0; e < nS; e++) dl[e * H + h] = W.w[e * H + h] * (dl[e * H + h] - dot_go);
        }
        for (int e = 0; e < nS; e++) {
            if (!W.real[e]) continue;
            float *dv = (W.level[e] < 0 ? dtok_v : dvalues[W.level[e]]) + W.row[e] * D;
            for (int h = 0; h < H; h++) {
                const float a = W.w[e * H + h];
                axpy(a, go + h * dh, dv + h * dh, dh);
            }
            if (W.level[e] < 0) { /* token key: its score's gradient goes to the key and the query here */
                const float *kr = tok_k + W.row[e] * D;
                float *dk = dtok_k + W.row[e] * D;
                for (int h = 0; h < H; h++) {
                    const float g = dl[e * H + h];
                    axpy(g, qi + h * dh, dk + h * dh, dh);
                    axpy(g, kr + h * dh, dqi + h * dh, dh);
                }
            }
        }
        /* policy: d log pi and d entropy -> d pi -> per-head softmax -> d scores, plus the read-out's
         * gradient on the siblings' scores */
        const float gl = g_logp ? g_logp[i] : 0.0f, ge = g_ent ? g_ent[i] : 0.0f;
        for (int s = 0; s < k; s++) {
            const int a = (int)(path[i * (k + 1) + s + 1] - b * path[i * (k + 1) + s]);
            const float *p = W.p + s * b * H, *lp = W.lp + s * b;
            float *dss = ds + s * b * H;
            for (int c = 0; c < b; c++) {
                dpi[c] = 0.0f;
                if (lp[c] == -INFINITY) continue;
                const float pc = fexp(lp[c]);
                const float dlp = (c == a ? gl : 0.0f) - ge * pc * (lp[c] + 1.0f); /* d/d log pi_c */
                float mean = 0.0f;
                for (int h = 0; h < H; h++) mean += p[c * H + h];
                mean /= H;
                dpi[c] = mean >= FLT_MIN ? dlp / mean : 0.0f;
            }
            for (int h = 0; h < H; h++) {
                float acc = 0.0f;
                for (int c = 0; c < b; c++) acc += p[c * H + h] * dpi[c] / H;
                for (int c = 0; c < b; c++) dss[c * H + h] = p[c * H + h] * (dpi[c] / H - acc);
            }
        }
        for (int e = 0; e < nS; e++) /* siblings' read-out gradient joins their scores */
            if (W.level[e] >= 0)
                for (int h = 0; h < H; h++) ds[(W.level[e] * b + W.child[e]) * H + h] += dl[e * H + h];
        for (int64_t s = 0, width = 1; s < k; s++) {
            width *= b;
            const int64_t first = (i / M) * width + path[i * (k + 1) + s] * b;
            for (int c = 0; c < b; c++) {
                const float *kr = keys[s] + (first + c) * D;
                float *dk = dkeys[s] + (first + c) * D;
                for (int h = 0; h < H; h++) {
                    const float g = ds[(s * b + c) * H + h];
                    if (g == 0.0f) continue;
                    axpy(g, qi + h * dh, dk + h * dh, dh);
                    axpy(g, kr + h * dh, dqi + h * dh, dh);
                }
            }
        }
    }
    free(ds); free(dl); free(dpi);
    work_free(&W);
}

/* Backward of tca_group_attention: g_out [G, c, H, dh] -> d_qkv [G, c, 3, H, dh] (overwritten). */
static inline __attribute__((always_inline)) void
group_attention_bwd(int c, int H, int dh, float scale, const float *qkv, const uint8_t *mask, const float *g_out,
                    float *dqkv, int64_t start, int64_t end) {
    const int D = H * dh;
    float *w = malloc(sizeof(float) * (size_t)c);
    float *da = malloc(sizeof(float) * (size_t)c);
    for (int64_t g = start; g < end; g++) {
        const float *base = qkv + g * (int64_t)c * 3 * D;
        float *dbase = dqkv + g * (int64_t)c * 3 * D;
        for (int64_t t = 0; t < (int64_t)c * 3 * D; t++) dbase[t] = 0.0f;
        const uint8_t *m = mask ? mask + g * c : NULL;
        int any = 0;
        if (m) for (int j = 0; j < c; j++) any |= m[j];
        for (int i = 0; i < c; i++) {
            const float *qi = base + (int64_t)i * 3 * D;
            float *dqi = dbase + (int64_t)i * 3 * D;
            const float *gi = g_out + (g * c + i) * (int64_t)D;
            for (int h = 0; h < H; h++) {
                float mx = -INFINITY, z = 0.0f;
                for (int j = 0; j < c; j++) {
                    if (m && any && !m[j]) { w[j] = -INFINITY; continue; }
                    w[j] = any || !m ? scale * dot(qi + h * dh, base + (int64_t)j * 3 * D + D + h * dh, dh) : 0.0f;
                    mx = FMAX(mx, w[j]);
                }
                for (int j = 0; j < c; j++) { w[j] = w[j] == -INFINITY ? 0.0f : fexp(w[j] - mx); z += w[j]; }
                float s = 0.0f;
                for (int j = 0; j < c; j++) {
                    w[j] /= z;
                    const float *v = base + (int64_t)j * 3 * D + 2 * D + h * dh;
                    float *dv = dbase + (int64_t)j * 3 * D + 2 * D + h * dh;
                    da[j] = dot(gi + h * dh, v, dh);
                    s += w[j] * da[j];
                    axpy(w[j], gi + h * dh, dv, dh);
                }
                if (m && !any) continue; /* constant logits: no gradient to q or k */
                for (int j = 0; j < c; j++) {
                    const float dl = scale * w[j] * (da[j] - s);
                    if (dl == 0.0f) continue;
                    const float *kj = base + (int64_t)j * 3 * D + D + h * dh;
                    float *dkj = dbase + (int64_t)j * 3 * D + D + h * dh;
                    axpy(dl, kj, dqi + h * dh, dh);
                    axpy(dl, qi + h * dh, dkj, dh);
                }
            }
        }
    }
    free(w); free(da);
}

/* Exported entry points: dh = 16 (the paper's D = 64 with 4 heads) gets a specialised copy. */
void tca_group_attention(int c, int H, int dh, float scale, const float *qkv, const uint8_t *mask, float *out,
                         int64_t start, int64_t end) {
    if (dh == 16) group_attention(c, H, 16, scale, qkv, mask, out, start, end);
    else group_attention(c, H, dh, scale, qkv, mask, out, start, end);
}

void tca_group_attention_bwd(int c, int H, int dh, float scale, const float *qkv, const uint8_t *mask,
                             const float *g_out, float *dqkv, int64_t start, int64_t end) {
    if (dh == 16) group_attention_bwd(c, H, 16, scale, qkv, mask, g_out, dqkv, start, end);
    else group_attention_bwd(c, H, dh, scale, qkv, mask, g_out, dqkv, start, end);
}

void tca_search_readout_fwd(int64_t M, int H, int dh, int b, int k, int P, const float *q, const float *const *keys,
                            const float *const *values, const uint8_t *const *masks, const float *tok_k,
                            const float *tok_v, const uint8_t *tok_mask, const float *gumbel, const int64_t *actions,
                            float *out, int64_t *path, float *logp, float *ent, int64_t start, int64_t end) {
    if (dh == 16)
        search_readout_fwd(M, H, 16, b, k, P, q, keys, values, masks, tok_k, tok_v, tok_mask, gumbel, actions, out,
                           path, logp, ent, start, end);
    else
        search_readout_fwd(M, H, dh, b, k, P, q, keys, values, masks, tok_k, tok_v, tok_mask, gumbel, actions, out,
                           path, logp, ent, start, end);
}

void tca_search_readout_bwd(int64_t M, int H, int dh, int b, int k, int P, const float *q, const float *const *keys,
                            const float *const *values, const uint8_t *const *masks, const float *tok_k,
                            const float *tok_v, const uint8_t *tok_mask, const int64_t *path, const float *g_out,
                            const float *g_logp, const float *g_ent, float *dq, float *const *dkeys,
                            float *const *dvalues, float *dtok_k, float *dtok_v, int64_t start, int64_t end) {
    if (dh == 16)
        search_readout_bwd(M, H, 16, b, k, P, q, keys, values, masks, tok_k, tok_v, tok_mask, path, g_out, g_logp,
                           g_ent, dq, dkeys, dvalues, dtok_k, dtok_v, start, end);
    else
        search_readout_bwd(M, H, dh, b, k, P, q, keys, values, masks, tok_k, tok_v, tok_mask, path, g_out, g_logp,
                           g_ent, dq, dkeys, dvalues, dtok_k, dtok_v, start, end);
}

/* ------------------------------------------------------------------------------------------------
 * Inference aggregator passes (no autograd), rows [start, end) of D floats (D a multiple of 16 takes
 * the vector path): layer norm, and the fused "residual + layer norm + masked mean" and
 * "ReLU + masked mean" passes around the feed-forward's matrix products (tca_env/tree.py), also used
 * by the training aggregation's forward (tca_env/fused_tree.py) without the norms' affine maps.
 * ------------------------------------------------------------------------------------------------ */

/* Mean and 1/std of one row (two passes, as PyTorch's layer norm). */
static inline __attribute__((always_inline)) float row_stats(const float *x, float eps, int D, float *mean_out) {
    float mean, var;
    if (D % 16 == 0) {
        v16 s = {0}, s2 = {0};
        for (int t = 0; t < D; t += 16) s += ld16(x + t);
        mean = hsum16(s) / D;
        for (int t = 0; t < D; t += 16) {
            const v16 d = ld16(x + t) - mean;
            s2 += d * d;
        }
        var = hsum16(s2) / D;
    } else {
        float s = 0.0f, s2 = 0.0f;
        for (int t = 0; t < D; t++) s += x[t];
        mean = s / D;
        for (int t = 0; t < D; t++) s2 += (x[t] - mean) * (x[t] - mean);
        var = s2 / D;
    }
    *mean_out = mean;
    return 1.0f / sqrtf(var + eps);
}

/* y = layer norm of x, with the affine map when gamma is given (else the normalised row); returns rstd. */
static inline __attribute__((always_inline)) float norm_row(const float *x, const float *gamma, const float *beta,
                                                            float eps, float *y, int D) {
    float mean;
    const float rstd = row_stats(x, eps, D, &mean);
    if (gamma)
        for (int t = 0; t < D; t++) y[t] = (x[t] - mean) * rstd * gamma[t] + beta[t];
    else
        for (int t = 0; t < D; t++) y[t] = (x[t] - mean) * rstd;
    return rstd;
}

/* Rows [start, end) of x: y = layer norm (affine when gamma is given, else normalised only); rstd per
 * row when rstd is not NULL. */
void tca_norm_rows(int D, const float *x, const float *gamma, const float *beta, float eps, float *y, float *rstd,
                   int64_t start, int64_t end) {
    for (int64_t r = start; r < end; r++) {
        const float rs = D == 64 ? norm_row(x + r * D, gamma, beta, eps, y + r * D, 64)
                                 : norm_row(x + r * D, gamma, beta, eps, y + r * D, D);
        if (rstd) rstd[r] = rs;
    }
}

/* Groups [start, end) of c rows: h = o + x (written into o), y = layer norm of h (as tca_norm_rows,
 * rstd optional), hm[g] = sum_i w_gi h_i with w = mask weights [G, c] (NULL: 1/c). */
void tca_residual_norm_mean(int c, int D, float *o, const float *x, const float *gamma, const float *beta, float eps,
                            const float *w, float *y, float *rstd, float *hm, int64_t start, int64_t end) {
    for (int64_t g = start; g < end; g++) {
        float *acc = hm + g * D;
        for (int t = 0; t < D; t++) acc[t] = 0.0f;
        for (int i = 0; i < c; i++) {
            const int64_t r = g * c + i;
            float *h = o + r * D;
            const float *xr = x + r * D;
            const float wi = w ? w[r] : 1.0f / c;
            for (int t = 0; t < D; t++) {
                h[t] += xr[t];
                acc[t] += wi * h[t];
            }
            const float rs = D == 64 ? norm_row(h, gamma, beta, eps, y + r * D, 64)
                                     : norm_row(h, gamma, beta, eps, y + r * D, D);
            if (rstd) rstd[r] = rs;
        }
    }
}

/* Groups [start, end) of c rows of width F: r = max(r, 0) (in place), rm[g] = sum_i w_gi r_i. */
void tca_relu_mean(int c, int F, float *r, const float *w, float *rm, int64_t start, int64_t end) {
    for (int64_t g = start; g < end; g++) {
        float *acc = rm + g * F;
        for (int t = 0; t < F; t++) acc[t] = 0.0f;
        for (int i = 0; i < c; i++) {
            float *ri = r + (g * c + i) * (int64_t)F;
            const float wi = w ? w[g * c + i] : 1.0f / c;
            for (int t = 0; t < F; t++) {
                ri[t] = ri[t] > 0.0f ? ri[t] : 0.0f;
                acc[t] += wi * ri[t];
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * Training aggregation (tca_env/fused_tree.py): the backward's layer-norm pass (the forward uses
 * tca_norm_rows and tca_residual_norm_mean without the affine map).
 * ------------------------------------------------------------------------------------------------ */

/* Backward of the normalisation for rows [start, end): given dxh (gradient w.r.t. the normalised row,
 * already multiplied by the norm's weight), dh = rstd * (dxh - mean(dxh) - xh * mean(dxh * xh)), plus
 * w_row[r] * dnode[grp[r]] (the masked mean's direct path); written into dh. */
void tca_norm_backward(int D, const float *dxh, const float *xh, const float *rstd, const float *w_row,
                       const float *dnode, const int64_t *grp, float *dh, int64_t start, int64_t end) {
    for (int64_t r = start; r < end; r++) {
        const float *g = dxh + r * D, *y = xh + r * D, *dn = dnode + grp[r] * D;
        float s = 0.0f, sy = 0.0f;
        for (int t = 0; t < D; t++) { s += g[t]; sy += g[t] * y[t]; }
        s /= D;
        sy /= D;
        const float rs = rstd[r], w = w_row[r];
        float *o = dh + r * D;
        for (int t = 0; t < D; t++) o[t] = rs * (g[t] - s - y[t] * sy) + w * dn[t];
    }
}

/* Rows [start, end): out[r] = w_row[r] * src[grp[r]], zeroed where relu_out[r] <= 0 when relu_out is given
 * (the backward of "mean over children, then ReLU" in one pass). src [G, F], out and relu_out [R, F]. */
void tca_expand_rows(int F, const float *src, const int64_t *grp, const float *w_row, const float *relu_out,
                     float *out, int64_t start, int64_t end) {
    for (int64_t r = start; r < end; r++) {
        const float *a = src + grp[r] * F;
        const float w = w_row[r];
        float *o = out + r * F;
        if (relu_out) {
            const float *z = relu_out + r * F;
            for (int t = 0; t < F; t++) o[t] = z[t] > 0.0f ? w * a[t] : 0.0f;
        } else {
            for (int t = 0; t < F; t++) o[t] = w * a[t];
        }
    }
}
