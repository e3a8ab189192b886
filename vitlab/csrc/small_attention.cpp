/* Softmax attention over short token sequences on a CPU, forward and backward, in float32 arithmetic
 * on q, k, v (and gradients) stored as float32 or as bf16.
 *
 * Built by vitlab/kernels.py for one token count and head size: -DTOKENS=N -DHEAD_DIM=d, d a multiple
 * of 16. The 16 lanes of a vector hold 16 different images: one task is a group of 16 images and one
 * head, and every step of attention (the dot products, the softmax over keys, the weighted sums) is
 * then the same vertical vector operation on all 16, with no reduction across lanes and no lanes
 * wasted on padding the 17 keys to 32. A 16 x 16 transpose in registers turns 16 images' rows of q, k
 * and v, read straight from the q/k/v projection, into these lane vectors, and turns the results back
 * into rows of the merged heads. The last group of a batch that is not a multiple of 16 fills its
 * spare lanes with copies of its last image and never writes them out.
 *
 * Layouts (row-major; G = ceil(B / 16) groups):
 *   qkv   (B, N, 3, H, d)     the output of Linear(D, 3*D): q, k, v, each with its heads side by side
 *   out   (B, N, H, d)        the heads merged, ready for the output projection
 *   probs (G, H, N, N, 16)    the softmax probabilities, image b in lane b % 16 of group b / 16; kept for
 *                             the backward pass (kernels.probabilities gives them as (B, H, N, N))
 *   gout  (B, N, H, d), gqkv (B, N, 3, H, d): the gradients of out and qkv
 *
 * softmax_rows, the explicit path's softmax over rows of N scores, uses the same layout trick: 16
 * consecutive rows are one group, and each of the N columns becomes a lane vector.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
#define LANES 16
#define N TOKENS
#define DH HEAD_DIM
#define KBLOCKS (((N) + 23) / 24)             /* blocks of keys whose scores stay in registers */
#define KB (((N) + KBLOCKS - 1) / KBLOCKS)    /* keys per block, at most 24 */
#define NK (KB * KBLOCKS)                     /* keys padded to whole blocks (the padding scores unused) */

static inline v16 splat(float x) { return (v16){0} + x; }
static inline v16 loadu(const float *p) { v16 r; memcpy(&r, p, sizeof r); return r; }
static inline void storeu(float *p, v16 x) { memcpy(p, &x, sizeof x); }

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#endif
#endif
#ifndef SHUFFLE
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (i16v){__VA_ARGS__})
#endif

/* Transposes the 16 x 16 matrix whose rows are r[0..15], in place. Stage s swaps bit s of the row
 * index with bit s of the lane index, for s = 8, 4, 2, 1; after all four, row i lane j holds what
 * row j lane i held. */
#define EXPAND(...) __VA_ARGS__
#define STAGE(s, LO, HI)                                                             \
    for (int i = 0; i < 16; i++)                                                     \
        if (!(i & (s))) {                                                            \
            const v16 a = r[i], b = r[i + (s)];                                      \
            r[i] = SHUFFLE(a, b, EXPAND LO);                                         \
            r[i + (s)] = SHUFFLE(a, b, EXPAND HI);                                   \
        }
static inline void transpose16(v16 r[16]) {
    STAGE(8, (0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
          (8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
    STAGE(4, (0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
          (4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
    STAGE(2, (0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
          (2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
    STAGE(1, (0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
          (1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
}
#undef STAGE
#undef EXPAND

/* exp(x) for x <= 0, as 2^n * P(r) with the Cephes expf polynomial; relative error about 1e-7.
 * Below -87 (where float32 runs out of normal numbers), and for -inf, it is 0; NaN stays NaN. */
static inline v16 vexp(v16 x0) {
    v16 x = x0 < -87.0f ? splat(-87.0f) : x0;
    v16 t = x * 1.44269504088896341f;
    v16 n = __builtin_convertvector(__builtin_convertvector(t - 0.5f, i16v), v16);  /* round(t), as t <= 0 */
    v16 r = x - n * 0.693359375f - n * -2.12194440e-4f;
    v16 y = splat(1.9875691500E-4f);
    y = y * r + 1.3981999507E-3f;
    y = y * r + 8.3334519073E-3f;
    y = y * r + 4.1665795894E-2f;
    y = y * r + 1.6666665459E-1f;
    y = y * r + 5.0000001201E-1f;
    y = y * r * r + r + 1.0f;
    i16v e = (__builtin_convertvector(n, i16v) + 127) << 23;
    v16 scale; memcpy(&scale, &e, sizeof scale);
    return x0 < -87.0f ? splat(0.0f) : y * scale;
}

/* Rows of q, k, v and their gradients are float32, or bf16 (uint16_t) where the products around the
 * attention run in bf16: loads widen to float32, stores round to nearest even, as PyTorch's casts do. */
typedef uint16_t h16v __attribute__((vector_size(32)));
typedef uint32_t u16v __attribute__((vector_size(64)));

static inline v16 load16(const float *p) { return loadu(p); }
static inline v16 load16(const uint16_t *p) {
    h16v h; memcpy(&h, p, sizeof h);
    const u16v w = __builtin_convertvector(h, u16v) << 16;
    v16 r; memcpy(&r, &w, sizeof r);
    return r;
}
static inline void store16(float *p, v16 x) { storeu(p, x); }
static inline void store16(uint16_t *p, v16 x) {
    u16v u; memcpy(&u, &x, sizeof u);
    const u16v rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const u16v bits = x != x ? (u16v){0} + 0x7FC0u : rounded;  /* NaN: the quiet NaN c10::BFloat16 gives */
    const h16v h = __builtin_convertvector(bits, h16v);
    memcpy(p, &h, sizeof h);
}

/* The 16 images of one group: where image l's rows start, the last real image standing in for spare lanes. */
template <typename T>
struct Group {
    const T *row0[LANES];
    int64_t b0;
    int lanes;  /* real images in the group */
};

template <typename T>
static inline Group<T> group_of(const T *x, int64_t g, int64_t B, int64_t image_stride, int64_t offset) {
    Group<T> grp;
    grp.b0 = g * LANES;
    grp.lanes = (int)(B - grp.b0 < LANES ? B - grp.b0 : LANES);
    for (int l = 0; l < LANES; l++) {
        const int64_t b = grp.b0 + (l < grp.lanes ? l : grp.lanes - 1);
        grp.row0[l] = x + b * image_stride + offset;
    }
    return grp;
}

/* tile[n * DH + c] = lane vector of element c of token n's row (rows `stride` apart), times `mul`. */
template <typename T>
static inline void load_tile(const Group<T> &grp, int64_t stride, v16 *tile, float mul) {
    v16 r[16];
    for (int n = 0; n < N; n++)
        for (int u = 0; u < DH; u += 16) {
            for (int l = 0; l < LANES; l++) r[l] = load16(grp.row0[l] + n * stride + u);
            transpose16(r);
            for (int t = 0; t < 16; t++) tile[n * DH + u + t] = r[t] * mul;
        }
}

/* The inverse for one token: acc[t] is the lane vector of element u + t; writes the group's real images'
 * rows at dst + b * image_stride + n * stride + u. */
template <typename T, typename G>
static inline void store_row(v16 acc[16], T *dst, const G &grp, int64_t image_stride, int64_t stride, int n, int u) {
    transpose16(acc);
    for (int l = 0; l < grp.lanes; l++) store16(dst + (grp.b0 + l) * image_stride + n * stride + u, acc[l]);
}

/* s[j] = sum_c a[c] * b[j * DH + c] for j < NK, with a = a row of one tile and b a whole tile. */
static inline void row_dots(const v16 *a, const v16 *b, v16 *s) {
    for (int j0 = 0; j0 < NK; j0 += KB) {
        v16 acc[KB];  /* fully unrolled, so that the KB sums live in registers */
#pragma GCC unroll 24
        for (int jj = 0; jj < KB; jj++) acc[jj] = splat(0.0f);
        for (int c = 0; c < DH; c++) {
            const v16 ac = a[c];
#pragma GCC unroll 24
            for (int jj = 0; jj < KB; jj++) acc[jj] += ac * b[(j0 + jj) * DH + c];
        }
#pragma GCC unroll 24
        for (int jj = 0; jj < KB; jj++) s[j0 + jj] = acc[jj];
    }
}

/* acc[t] = sum_i w[i * wstride] * x[i * DH + u + t] over i < N: the weighted sum of N tile rows, columns u..u+15. */
static inline void weighted_rows(const v16 *w, int wstride, const v16 *x, int u, v16 acc[16]) {
#pragma GCC unroll 16
    for (int t = 0; t < 16; t++) acc[t] = splat(0.0f);
    for (int i = 0; i < N; i++) {
        const v16 wi = w[i * wstride];
#pragma GCC unroll 16
        for (int t = 0; t < 16; t++) acc[t] += wi * x[i * DH + u + t];
    }
}

static inline v16 *scratch(size_t vectors) {
    return (v16 *)aligned_alloc(64, vectors * sizeof(v16));
}

template <typename T>
static void forward(const T *qkv, T *out, float *probs, int64_t B, int64_t H, float scale, int nthreads) {
    const int64_t D = H * DH, row = 3 * D, G = (B + LANES - 1) / LANES;
#pragma omp parallel num_threads(nthreads)
    {
        v16 *const Q = scratch((size_t)(N + 2 * NK) * DH), *const K = Q + N * DH, *const V = K + NK * DH;
        memset(K + N * DH, 0, (NK - N) * DH * sizeof(v16));  /* padding keys: finite, unused */
#pragma omp for schedule(static)
        for (int64_t gh = 0; gh < G * H; gh++) {
            const int64_t g = gh / H, h = gh % H;
            const auto grp = group_of(qkv, g, B, N * row, h * DH);
            load_tile(grp, row, Q, scale);
            load_tile(group_of(qkv, g, B, N * row, D + h * DH), row, K, 1.0f);
            load_tile(group_of(qkv, g, B, N * row, 2 * D + h * DH), row, V, 1.0f);
            float *p = probs + gh * N * N * LANES;
            for (int i = 0; i < N; i++) {
                v16 s[NK];
                row_dots(Q + i * DH, K, s);
                v16 m = s[0];
                for (int j = 1; j < N; j++) m = s[j] > m ? s[j] : m;
                v16 total = splat(0.0f);
                for (int j = 0; j < N; j++) total += (s[j] = vexp(s[j] - m));
                const v16 inv = 1.0f / total;
                for (int j = 0; j < N; j++) storeu(p + (i * N + j) * LANES, s[j] *= inv);
                for (int u = 0; u < DH; u += 16) {
                    v16 acc[16];
                    weighted_rows(s, 1, V, u, acc);
                    store_row(acc, out + h * DH, grp, N * D, D, i, u);
                }
            }
        }
        free(Q);
    }
}

template <typename T>
static void backward(const T *qkv, const float *probs, const T *gout, T *gqkv, int64_t B, int64_t H, float scale,
                     int nthreads) {
    const int64_t D = H * DH, row = 3 * D, G = (B + LANES - 1) / LANES;
#pragma omp parallel num_threads(nthreads)
    {
        v16 *const Q = scratch((size_t)(3 * N + NK) * DH + (size_t)2 * N * N);
        v16 *const K = Q + N * DH, *const GO = K + N * DH, *const V = GO + N * DH;
        v16 *const P = V + NK * DH, *const GS = P + N * N;
        memset(V + N * DH, 0, (NK - N) * DH * sizeof(v16));
#pragma omp for schedule(static)
        for (int64_t gh = 0; gh < G * H; gh++) {
            const int64_t g = gh / H, h = gh % H;
            const auto qgrp = group_of(qkv, g, B, N * row, h * DH);
            load_tile(qgrp, row, Q, 1.0f);
            load_tile(group_of(qkv, g, B, N * row, D + h * DH), row, K, 1.0f);
            load_tile(group_of(qkv, g, B, N * row, 2 * D + h * DH), row, V, 1.0f);
            load_tile(group_of(gout, g, B, N * D, h * DH), D, GO, 1.0f);
            memcpy(P, probs + gh * N * N * LANES, N * N * sizeof(v16));
            T *const gq = gqkv + h * DH, *const gk = gq + D, *const gv = gq + 2 * D;
            /* gS = P * (gP - rowsum(P * gP)) * scale, where gP[i][j] = gO_i . v_j;  gQ_i = sum_j gS[i][j] k_j */
            for (int i = 0; i < N; i++) {
                v16 gp[NK];
                row_dots(GO + i * DH, V, gp);
                v16 dot = splat(0.0f);
                for (int j = 0; j < N; j++) dot += P[i * N + j] * gp[j];
                for (int j = 0; j < N; j++) GS[i * N + j] = P[i * N + j] * (gp[j] - dot) * scale;
                for (int u = 0; u < DH; u += 16) {
                    v16 acc[16];
                    weighted_rows(GS + i * N, 1, K, u, acc);
                    store_row(acc, gq, qgrp, N * row, row, i, u);
                }
            }
            /* gK_j = sum_i gS[i][j] q_i;  gV_j = sum_i P[i][j] gO_i */
            for (int j = 0; j < N; j++)
                for (int u = 0; u < DH; u += 16) {
                    v16 acc[16];
                    weighted_rows(GS + j, N, Q, u, acc);
                    store_row(acc, gk, qgrp, N * row, row, j, u);
                    weighted_rows(P + j, N, GO, u, acc);
                    store_row(acc, gv, qgrp, N * row, row, j, u);
                }
        }
        free(Q);
    }
}

extern "C" void attn_forward(const float *qkv, float *out, float *probs, int64_t B, int64_t H, float scale,
                             int nthreads) {
    forward(qkv, out, probs, B, H, scale, nthreads);
}

extern "C" void attn_backward(const float *qkv, const float *probs, const float *gout, float *gqkv, int64_t B,
                              int64_t H, float scale, int nthreads) {
    backward(qkv, probs, gout, gqkv, B, H, scale, nthreads);
}

/* The same with qkv, out, gout and gqkv in bf16; the arithmetic and the probabilities stay float32. */
extern "C" void attn_forward_bf16(const uint16_t *qkv, uint16_t *out, float *probs, int64_t B, int64_t H,
                                  float scale, int nthreads) {
    forward(qkv, out, probs, B, H, scale, nthreads);
}

extern "C" void attn_backward_bf16(const uint16_t *qkv, const float *probs, const uint16_t *gout, uint16_t *gqkv,
                                   int64_t B, int64_t H, float scale, int nthreads) {
    backward(qkv, probs, gout, gqkv, B, H, scale, nthreads);
}

/* Rows of N floats <-> lane vectors: col[j] holds element j of the 16 rows row[0..15]. Whole blocks of
 * 16 columns go through a transpose in registers, the rest one element at a time. */
static inline void load_columns(const float *const row[LANES], v16 col[N]) {
    for (int u = 0; u + 16 <= N; u += 16) {
        v16 r[16];
        for (int l = 0; l < LANES; l++) r[l] = loadu(row[l] + u);
        transpose16(r);
        for (int t = 0; t < 16; t++) col[u + t] = r[t];
    }
    for (int j = N / 16 * 16; j < N; j++)
        for (int l = 0; l < LANES; l++) col[j][l] = row[l][j];
}

/* The inverse, writing only the first `lanes` rows. */
static inline void store_columns(const v16 col[N], float *const row[LANES], int lanes) {
    for (int u = 0; u + 16 <= N; u += 16) {
        v16 r[16];
        for (int t = 0; t < 16; t++) r[t] = col[u + t];
        transpose16(r);
        for (int l = 0; l < lanes; l++) storeu(row[l] + u, r[l]);
    }
    for (int j = N / 16 * 16; j < N; j++)
        for (int l = 0; l < lanes; l++) row[l][j] = col[j][l];
}

/* y = softmax(x) over each row of N: x and y (rows, N), row-major. */
extern "C" void softmax_rows(const float *x, float *y, int64_t rows, int nthreads) {
    const int64_t groups = (rows + LANES - 1) / LANES;
    static const float zeros[N] = {0};  /* stands in for the rows missing from the last group */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t r0 = g * LANES;
        const int n = (int)(rows - r0 < LANES ? rows - r0 : LANES);
        const float *in[LANES];
        float *out[LANES];
        for (int l = 0; l < LANES; l++) {
            in[l] = l < n ? x + (r0 + l) * N : zeros;
            out[l] = y + (r0 + (l < n ? l : 0)) * N;  /* only the first n are written */
        }
        v16 col[N];
        load_columns(in, col);
        v16 m = col[0], total = splat(0.0f);
        for (int j = 1; j < N; j++) m = col[j] > m ? col[j] : m;
        for (int j = 0; j < N; j++) total += (col[j] = vexp(col[j] - m));
        const v16 inv = 1.0f / total;
        for (int j = 0; j < N; j++) col[j] *= inv;
        store_columns(col, out, n);
    }
}

/* The explicit path's two products, on q, k and v as the q/k/v taps hand them on: (B, H, N, d) tensors
 * given by their strides in floats over (b, h, n), each head row contiguous; usually views of qkv.
 *
 * head_scores:       scores (B, H, N, N) = scale * q k^T
 * head_weighted_sum: out (B, N, H, d) = attn v, attn (B, H, N, N) contiguous; out is the merged heads. */
extern "C" void head_scores(const float *q, const float *k, const int64_t *qs, const int64_t *ks, float *scores,
                            int64_t B, int64_t H, float scale, int nthreads) {
    const int64_t G = (B + LANES - 1) / LANES;
#pragma omp parallel num_threads(nthreads)
    {
        v16 *const Q = scratch((size_t)(N + NK) * DH), *const K = Q + N * DH;
        memset(K + N * DH, 0, (NK - N) * DH * sizeof(v16));
#pragma omp for schedule(static)
        for (int64_t gh = 0; gh < G * H; gh++) {
            const int64_t g = gh / H, h = gh % H;
            const auto grp = group_of(q, g, B, qs[0], h * qs[1]);
            load_tile(grp, qs[2], Q, scale);
            load_tile(group_of(k, g, B, ks[0], h * ks[1]), ks[2], K, 1.0f);
            for (int i = 0; i < N; i++) {
                v16 s[NK];
                row_dots(Q + i * DH, K, s);
                /* lane l of s[j] is image l's score for key j: transposed into each image's row */
                float *rows[LANES];
                for (int l = 0; l < LANES; l++)  /* spare lanes point at the first row: never written */
                    rows[l] = scores + ((grp.b0 + (l < grp.lanes ? l : 0)) * H + h) * N * N + i * N;
                store_columns(s, rows, grp.lanes);
            }
        }
        free(Q);
    }
}

extern "C" void head_weighted_sum(const float *attn, const float *v, const int64_t *vs, float *out, int64_t B,
                                  int64_t H, int nthreads) {
    const int64_t D = H * DH, G = (B + LANES - 1) / LANES;
#pragma omp parallel num_threads(nthreads)
    {
        v16 *const V = scratch((size_t)N * DH + N);
        v16 *const W = V + N * DH;
#pragma omp for schedule(static)
        for (int64_t gh = 0; gh < G * H; gh++) {
            const int64_t g = gh / H, h = gh % H;
            const auto grp = group_of(v, g, B, vs[0], h * vs[1]);
            load_tile(grp, vs[2], V, 1.0f);
            const auto agrp = group_of(attn, g, B, H * N * N, h * N * N);
            for (int i = 0; i < N; i++) {
                /* W[j]: lane l holds image l's weight for key j */
                const float *rows[LANES];
                for (int l = 0; l < LANES; l++) rows[l] = agrp.row0[l] + i * N;
                load_columns(rows, W);
                for (int u = 0; u < DH; u += 16) {
                    v16 acc[16];
                    weighted_rows(W, 1, V, u, acc);
                    store_row(acc, out + h * DH, grp, N * D, D, i, u);
                }
            }
        }
        free(V);
    }
}
