/* Softmax attention over short token sequences on a CPU, forward and backward, float32.
 *
 * Built by vitlab/kernels.py for one token count and head size: -DTOKENS=N -DHEAD_DIM=d, d a multiple
 * of 16. Each (image, head) pair is one task: its q, k, v rows are read straight from the q/k/v
 * projection's output and its results written straight into the merged heads, so the copies that put
 * heads first and back are never made.
 *
 * Layouts (row-major):
 *   qkv   (B, N, 3, H, d)  the output of Linear(D, 3*D): q, k, v, each with its heads side by side
 *   out   (B, N, H, d)     the heads merged, ready for the output projection
 *   probs (B, H, N, N)     the softmax probabilities, kept for the backward pass
 *   gout  (B, N, H, d), gqkv (B, N, 3, H, d): the gradients of out and qkv
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
#define N TOKENS
#define DH HEAD_DIM
#define DV (DH / 16)          /* 16-float vectors per head row */
#define NV (((N) + 15) / 16)  /* vectors per row of N scores */
#define NP (NV * 16)          /* N padded to whole vectors */

static inline v16 splat(float x) { return (v16){0} + x; }
static inline v16 loadu(const float *p) { v16 r; memcpy(&r, p, sizeof r); return r; }
static inline void storeu(float *p, v16 x) { memcpy(p, &x, sizeof x); }

/* exp(x) for x <= 0, as 2^n * P(r) with the Cephes expf polynomial; relative error about 1e-7. */
static inline v16 vexp(v16 x) {
    x = x < -87.0f ? splat(-87.0f) : x;
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
    return y * scale;
}

static inline float hmax(v16 x) { float m = x[0]; for (int l = 1; l < 16; l++) m = x[l] > m ? x[l] : m; return m; }
static inline float hsum(v16 x) { float s = 0; for (int l = 0; l < 16; l++) s += x[l]; return s; }

#define R 4  /* query rows handled together, so that their dependency chains overlap */
#define NR (((N) + R - 1) / R * R)

extern "C" void attn_forward(const float *qkv, float *out, float *probs, int64_t B, int64_t H, float scale,
                             int nthreads) {
    const int64_t D = H * DH, row = 3 * D;
    const v16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H;
        const float *base = qkv + b * N * row + h * DH;
        float kt[DH][NP] __attribute__((aligned(64)));
        float q[NR][DH] __attribute__((aligned(64)));
        v16 vv[N][DV];
        memset(kt, 0, sizeof kt);
        memset(q, 0, sizeof q);
        for (int j = 0; j < N; j++) {
            for (int c = 0; c < DH; c++) { kt[c][j] = base[j * row + D + c]; q[j][c] = base[j * row + c] * scale; }
            for (int u = 0; u < DV; u++) vv[j][u] = loadu(base + j * row + 2 * D + 16 * u);
        }
        float *p = probs + bh * N * N;
        for (int i0 = 0; i0 < N; i0 += R) {
            v16 s[R][NV];
            for (int r = 0; r < R; r++) for (int w = 0; w < NV; w++) s[r][w] = splat(0.0f);
            for (int c = 0; c < DH; c++) {
                for (int w = 0; w < NV; w++) {
                    const v16 kc = *(const v16 *)&kt[c][16 * w];
                    for (int r = 0; r < R; r++) s[r][w] += q[i0 + r][c] * kc;
                }
            }
            float pr[R][NP] __attribute__((aligned(64)));
            for (int r = 0; r < R; r++) {
                v16 m = splat(-INFINITY);
                for (int w = 0; w < NV; w++) {
                    s[r][w] = (lane + (float)(16 * w)) < (float)N ? s[r][w] : splat(-INFINITY);
                    m = s[r][w] > m ? s[r][w] : m;
                }
                const v16 mx = splat(hmax(m));
                v16 tot = splat(0.0f);
                for (int w = 0; w < NV; w++) {
                    s[r][w] = vexp(s[r][w] - mx);
                    s[r][w] = (lane + (float)(16 * w)) < (float)N ? s[r][w] : splat(0.0f);
                    tot += s[r][w];
                }
                const v16 inv = splat(1.0f / hsum(tot));
                for (int w = 0; w < NV; w++) *(v16 *)&pr[r][16 * w] = s[r][w] * inv;
            }
            v16 o[R][DV];
            for (int r = 0; r < R; r++) for (int u = 0; u < DV; u++) o[r][u] = splat(0.0f);
            for (int j = 0; j < N; j++)
                for (int u = 0; u < DV; u++)
                    for (int r = 0; r < R; r++) o[r][u] += pr[r][j] * vv[j][u];
            for (int r = 0; r < R && i0 + r < N; r++) {
                memcpy(p + (i0 + r) * N, pr[r], N * sizeof(float));
                for (int u = 0; u < DV; u++) storeu(out + (b * N + i0 + r) * D + h * DH + 16 * u, o[r][u]);
            }
        }
    }
}

extern "C" void attn_backward(const float *qkv, const float *probs, const float *gout, float *gqkv, int64_t B,
                              int64_t H, float scale, int nthreads) {
    const int64_t D = H * DH, row = 3 * D;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H;
        const float *base = qkv + b * N * row + h * DH;
        const float *gob = gout + b * N * D + h * DH;
        float *gbase = gqkv + b * N * row + h * DH;
        const float *p = probs + bh * N * N;
        float vt[DH][NP] __attribute__((aligned(64)));
        float gs[N][NP] __attribute__((aligned(64)));
        float pp[N][NP] __attribute__((aligned(64)));
        v16 qq[N][DV], kk[N][DV], go[N][DV];
        memset(vt, 0, sizeof vt);
        memset(pp, 0, sizeof pp);
        for (int j = 0; j < N; j++) {
            for (int c = 0; c < DH; c++) vt[c][j] = base[j * row + 2 * D + c];
            for (int u = 0; u < DV; u++) {
                qq[j][u] = loadu(base + j * row + 16 * u);
                kk[j][u] = loadu(base + j * row + D + 16 * u);
                go[j][u] = loadu(gob + j * D + 16 * u);
            }
            memcpy(pp[j], p + j * N, N * sizeof(float));
        }
        /* gS = P * (gP - rowsum(P * gP)) * scale, where gP[i][j] = gO_i . v_j */
        for (int i = 0; i < N; i++) {
            v16 gp[NV];
            for (int w = 0; w < NV; w++) gp[w] = splat(0.0f);
            const float *goi = (const float *)go[i];
            for (int c = 0; c < DH; c++) {
                const v16 gc = splat(goi[c]);
                for (int w = 0; w < NV; w++) gp[w] += gc * *(const v16 *)&vt[c][16 * w];
            }
            v16 dotv = splat(0.0f);
            for (int w = 0; w < NV; w++) dotv += *(const v16 *)&pp[i][16 * w] * gp[w];
            const v16 dot = splat(hsum(dotv));
            for (int w = 0; w < NV; w++) *(v16 *)&gs[i][16 * w] = *(const v16 *)&pp[i][16 * w] * (gp[w] - dot) * scale;
        }
        /* gQ_i = sum_j gS[i][j] k_j */
        for (int i = 0; i < N; i++) {
            v16 acc[DV];
            for (int u = 0; u < DV; u++) acc[u] = splat(0.0f);
            for (int j = 0; j < N; j++) {
                const v16 w = splat(gs[i][j]);
                for (int u = 0; u < DV; u++) acc[u] += w * kk[j][u];
            }
            for (int u = 0; u < DV; u++) storeu(gbase + i * row + 16 * u, acc[u]);
        }
        /* gK_j = sum_i gS[i][j] q_i;  gV_j = sum_i P[i][j] gO_i */
        for (int j = 0; j < N; j++) {
            v16 gk[DV], gv[DV];
            for (int u = 0; u < DV; u++) { gk[u] = splat(0.0f); gv[u] = splat(0.0f); }
            for (int i = 0; i < N; i++) {
                const v16 w = splat(gs[i][j]), pw = splat(pp[i][j]);
                for (int u = 0; u < DV; u++) { gk[u] += w * qq[i][u]; gv[u] += pw * go[i][u]; }
            }
            for (int u = 0; u < DV; u++) {
                storeu(gbase + j * row + D + 16 * u, gk[u]);
                storeu(gbase + j * row + 2 * D + 16 * u, gv[u]);
            }
        }
    }
}
