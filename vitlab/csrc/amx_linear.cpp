/* The encoder blocks' bf16 Linear products on AMX tiles, forward and backward, as PyTorch operators.
 *
 * Built by vitlab/amx.py against the installed PyTorch's headers (-mamx-tile -mamx-bf16), loaded with
 * torch.ops.load_library. The operators (their autograd formula and shapes for torch.compile are
 * registered in amx.py):
 *
 *   vitlab::amx_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor
 *       x (..., K) bf16, weight (N, K) and bias (N) float32 or bf16 -> (..., N) bf16:
 *       round_bf16(x @ round_bf16(weight)^T + round_bf16(bias)), the products summed in float32.
 *       This is F.linear(x, weight.bfloat16(), bias.bfloat16()) up to the order of the sums.
 *   vitlab::amx_linear_backward(Tensor grad, Tensor x, Tensor weight) -> (Tensor, Tensor, Tensor)
 *       grad (..., N) bf16 -> grad_x (..., K) bf16, grad_weight (N, K) and grad_bias (N) in the weight's
 *       dtype, both summed over every row of x in float32 and rounded once at the end.
 *
 * Why: at the shapes of a small ViT (2,176 rows of 64-192 features for MNIST at batch 128) a bf16
 * product through PyTorch and oneDNN spends as long getting ready (a fixed 15 us or so per call) and
 * reading one operand transposed (the weight gradient) as multiplying. Here each product is one pass:
 * the weight is rounded to bf16 and packed while it is read, the bias is added and the result rounded
 * on the way out, and the weight gradient's operands are packed once, in the layout the tiles load.
 *
 * An AMX tile multiply C[16][16] += A[16][32] B[32][16] (bf16 in, float32 sums) takes B "VNNI-packed":
 * row j of the B tile holds, for each of its 16 columns n, the pair B[2j][n], B[2j+1][n]. Every product
 * below works on 32 x 32 blocks of C (four C tiles, two A tiles, two B tiles) and zero-pads its operands
 * to whole blocks when it packs them, so any shape is handled; rows of C past the end are never stored.
 */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

namespace {

using bf16 = uint16_t;
constexpr int64_t kBlock = 32; /* the edge of a block of C: 2 x 2 tiles of 16 x 16 */

int64_t padded(int64_t n) { return (n + kBlock - 1) / kBlock * kBlock; }

bf16 round_bf16(float f) { /* round to nearest even, as c10::BFloat16 rounds */
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16(0x7fc0); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return bf16(u >> 16);
}

float widen(bf16 h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

bf16 as_bf16(float v) { return round_bf16(v); }
bf16 as_bf16(c10::BFloat16 v) { return v.x; }

/* Linux hands out the AMX tile state only to a process that asks for it (once per process). */
bool tiles_permitted() {
    static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                        18 /* XFEATURE_XTILEDATA */) == 0;
    return granted;
}

struct TileConfig {
    uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

/* Tiles 0-3: the four 16 x 16 float32 tiles of a C block; 4, 5: A (16 rows of 32 bf16); 6, 7: B (16 rows
 * of 16 bf16 pairs). Every tile is 16 rows of 64 bytes. The configuration is per thread. */
void configure_tiles() {
    TileConfig config;
    for (int t = 0; t < 8; t++) config.rows[t] = 16, config.colsb[t] = 64;
    _tile_loadconfig(&config);
}

/* c (32 x 32 float32, rows ldc apart) = a (32 x 32*steps bf16, rows lda apart) times the packed b (16*steps
 * rows of pairs, ldb bf16 apart, starting at the block's first column). */
inline void multiply_block(const bf16 *a, int64_t lda, const bf16 *b, int64_t ldb, int64_t steps, float *c,
                           int64_t ldc = kBlock) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t s = 0; s < steps; s++) {
        _tile_loadd(4, a + s * kBlock, lda * 2);
        _tile_loadd(5, a + 16 * lda + s * kBlock, lda * 2);
        _tile_loadd(6, b + s * 16 * ldb, ldb * 2);
        _tile_loadd(7, b + s * 16 * ldb + 32, ldb * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, ldc * 4);
    _tile_stored(1, c + 16, ldc * 4);
    _tile_stored(2, c + 16 * ldc, ldc * 4);
    _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}

/* Writes rows [0, rows) and columns [0, cols) of the block c plus bias (32 floats) to out (rows ldo apart),
 * rounded to bf16. */
inline void store_rounded(const float *c, const float *bias, int64_t rows, int64_t cols, bf16 *out, int64_t ldo) {
    const __m512 b0 = _mm512_loadu_ps(bias), b1 = _mm512_loadu_ps(bias + 16);
    const __mmask32 mask = cols >= 32 ? ~__mmask32(0) : (__mmask32(1) << cols) - 1;
    for (int64_t r = 0; r < rows; r++) {
        const __m512 lo = _mm512_add_ps(_mm512_loadu_ps(c + r * kBlock), b0);
        const __m512 hi = _mm512_add_ps(_mm512_loadu_ps(c + r * kBlock + 16), b1);
        const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
        _mm512_mask_storeu_epi16(out + r * ldo, mask, h);
    }
}

/* Row j of pairs of the packed B of a product whose B[k][n] is w[n * ldw + k] (forward: x w^T) or
 * w[k * ldw + n] (the input gradient: grad w), k < K, n < N, zero beyond. */
template <typename W>
void pack_weight_row(const W *w, int64_t ldw, bool transposed, int64_t K, int64_t N, bf16 *bp, int64_t Np, int64_t j) {
    bf16 *row = bp + j * Np * 2;
    std::memset(row, 0, Np * 2 * sizeof(bf16));
    for (int64_t e = 0; e < 2; e++) {
        const int64_t k = 2 * j + e;
        if (k >= K) continue;
        if (transposed)
            for (int64_t n = 0; n < N; n++) row[2 * n + e] = as_bf16(w[n * ldw + k]);
        else
            for (int64_t n = 0; n < N; n++) row[2 * n + e] = as_bf16(w[k * ldw + n]);
    }
}

/* out (M x N bf16) = a (M x K bf16, rows K apart) times the weight packed as above, plus bias (Np floats,
 * zero past N). work: Kp * Np bf16 for the packed weight, then 32 * Kp a thread for a zero-padded block of a. */
template <typename W>
void rows_product(const bf16 *a, int64_t M, int64_t K, const W *w, int64_t ldw, bool transposed, int64_t N,
                  const float *bias, bf16 *out, bf16 *work, int nthreads) {
    const int64_t Kp = padded(K), Np = padded(N), blocks = (M + kBlock - 1) / kBlock;
    bf16 *bp = work;
#pragma omp parallel num_threads(nthreads)
    {
        configure_tiles();
        alignas(64) float c[kBlock * kBlock];
        bf16 *pad = work + Kp * Np + omp_get_thread_num() * kBlock * Kp;
#pragma omp for schedule(static)
        for (int64_t j = 0; j < Kp / 2; j++) pack_weight_row(w, ldw, transposed, K, N, bp, Np, j);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; blk++) {
            const int64_t m0 = blk * kBlock, rows = std::min(kBlock, M - m0);
            const bf16 *ab = a + m0 * K;
            int64_t lda = K;
            if (rows < kBlock || K % kBlock) { /* a whole, zero-padded block, so the tiles read no further */
                std::memset(pad, 0, kBlock * Kp * sizeof(bf16));
                for (int64_t r = 0; r < rows; r++) std::memcpy(pad + r * Kp, ab + r * K, K * sizeof(bf16));
                ab = pad, lda = Kp;
            }
            for (int64_t n0 = 0; n0 < Np; n0 += kBlock) {
                multiply_block(ab, lda, bp + n0 * 2, Np * 2, Kp / kBlock, c);
                store_rounded(c, bias + n0, rows, std::min(kBlock, N - n0), out + m0 * N + n0, N);
            }
        }
        _tile_release();
    }
}

/* Transposes the 16 x 16 matrix of 32-bit values whose rows are r[0..15], in place: 32-bit and 64-bit
 * unpacks transpose the 4 x 4 blocks inside each 128-bit lane, then two rounds of lane shuffles move
 * the blocks. */
inline void transpose16(__m512i r[16]) {
    __m512i t[16], s[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* s[4g + l], lane L: rows 4g..4g+3 of column 4L + l */
        s[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        s[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        s[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        s[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int l = 0; l < 4; l++) { /* row 4L + l, lane G = lane L of s[4G + l] */
        const __m512i u0 = _mm512_shuffle_i32x4(s[l], s[4 + l], 0x44), u1 = _mm512_shuffle_i32x4(s[l], s[4 + l], 0xee);
        const __m512i u2 = _mm512_shuffle_i32x4(s[8 + l], s[12 + l], 0x44);
        const __m512i u3 = _mm512_shuffle_i32x4(s[8 + l], s[12 + l], 0xee);
        r[l] = _mm512_shuffle_i32x4(u0, u2, 0x88);
        r[4 + l] = _mm512_shuffle_i32x4(u0, u2, 0xdd);
        r[8 + l] = _mm512_shuffle_i32x4(u1, u3, 0x88);
        r[12 + l] = _mm512_shuffle_i32x4(u1, u3, 0xdd);
    }
}

/* 16 bf16 of rows m and m + 1 of src (rows Q apart) from column q, interleaved into 16 pairs; zero past
 * row M and column Q. */
inline __m512i load_pairs(const bf16 *src, int64_t M, int64_t Q, int64_t m, int64_t q) {
    const __mmask16 mask = q + 16 <= Q ? __mmask16(0xffff) : q < Q ? __mmask16((1u << (Q - q)) - 1) : 0;
    const __m256i even = m < M ? _mm256_maskz_loadu_epi16(mask, src + m * Q + q) : _mm256_setzero_si256();
    const __m256i odd = m + 1 < M ? _mm256_maskz_loadu_epi16(mask, src + (m + 1) * Q + q) : _mm256_setzero_si256();
    return _mm512_or_si512(_mm512_cvtepu16_epi32(even), _mm512_slli_epi32(_mm512_cvtepu16_epi32(odd), 16));
}

/* dst (Pp x Mp bf16) = src (M x P)^T, zero-padded; rows m in [m0, m0 + 32). Taken as pairs of rows, the
 * transpose is one of 32-bit values, done 16 x 16 at a time in registers. */
void pack_transposed(const bf16 *src, int64_t M, int64_t P, int64_t Pp, int64_t Mp, int64_t m0, bf16 *dst) {
    for (int64_t p0 = 0; p0 < Pp; p0 += 16) {
        __m512i r[16];
        for (int j = 0; j < 16; j++) r[j] = load_pairs(src, M, P, m0 + 2 * j, p0);
        transpose16(r);
        for (int i = 0; i < 16; i++) _mm512_storeu_si512(dst + (p0 + i) * Mp + m0, r[i]);
    }
}

/* dst (Mp/2 rows of Qp pairs) = src (M x Q) with rows 2j and 2j+1 interleaved, zero-padded; rows m in
 * [m0, m0 + 32). */
void pack_pairs(const bf16 *src, int64_t M, int64_t Q, int64_t Qp, int64_t m0, bf16 *dst) {
    for (int64_t m = m0; m < m0 + kBlock; m += 2) {
        uint32_t *d = reinterpret_cast<uint32_t *>(dst + (m / 2) * Qp * 2);
        for (int64_t q = 0; q < Qp; q += 16) _mm512_storeu_si512(d + q, load_pairs(src, M, Q, m, q));
    }
}

/* sums (N floats) += the rows [m0, m0 + rows) of g (M x N bf16). */
void add_rows(const bf16 *g, int64_t N, int64_t m0, int64_t rows, float *sums) {
    for (int64_t n = 0; n < N; n += 16) {
        const __mmask16 mask = n + 16 <= N ? __mmask16(0xffff) : __mmask16((1u << (N - n)) - 1);
        __m512 s = _mm512_maskz_loadu_ps(mask, sums + n);
        for (int64_t r = m0; r < m0 + rows; r++)
            s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(
                                     _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, g + r * N + n)), 16)));
        _mm512_mask_storeu_ps(sums + n, mask, s);
    }
}

/* The weight and bias gradients: gw (N x K, float32) = g^T x, summed over the M rows of g (M x N) and
 * x (M x K), and gb (N) = the column sums of g. The operand with fewer columns is transposed into the
 * tiles' A, the other interleaved into B (work: Pp * Mp + Mp * Qp bf16). Each thread packs and multiplies
 * its own share of the rows, so what it reads stays in its core's caches, into partial sums of its own
 * (fwork: a thread's Np column sums and Pp * Qp products), which are added up at the end. */
void cross_product(const bf16 *g, const bf16 *x, int64_t M, int64_t N, int64_t K, float *gw, float *gb,
                   bf16 *work, float *fwork, int nthreads) {
    const bool transposed = K < N; /* then C = x^T g, the transpose of gw */
    const bf16 *u = transposed ? x : g, *v = transposed ? g : x;
    const int64_t P = transposed ? K : N, Q = transposed ? N : K;
    const int64_t Mp = padded(M), Pp = padded(P), Qp = padded(Q), Np = padded(N), blocks = Mp / kBlock;
    bf16 *at = work, *vp = work + Pp * Mp;
    const int64_t share = Np + Pp * Qp; /* floats a thread */
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
        float *sums = fwork + t * share, *part = sums + Np;
        std::memset(sums, 0, Np * sizeof(float));
        for (int64_t blk = b0; blk < b1; blk++) {
            const int64_t m0 = blk * kBlock;
            pack_transposed(u, M, P, Pp, Mp, m0, at);
            pack_pairs(v, M, Q, Qp, m0, vp);
            if (m0 < M) add_rows(g, N, m0, std::min(kBlock, M - m0), sums);
        }
        if (b1 > b0) {
            configure_tiles();
            for (int64_t p0 = 0; p0 < Pp; p0 += kBlock)
                for (int64_t q0 = 0; q0 < Qp; q0 += kBlock)
                    multiply_block(at + p0 * Mp + b0 * kBlock, Mp, vp + b0 * 16 * Qp * 2 + q0 * 2, Qp * 2, b1 - b0,
                                   part + p0 * Qp + q0, Qp);
            _tile_release();
        } else {
            std::memset(part, 0, Pp * Qp * sizeof(float));
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t p = 0; p < P; p++)
            for (int64_t q = 0; q < Q; q++) {
                float value = 0.0f;
                for (int s = 0; s < nt; s++) value += fwork[s * share + Np + p * Qp + q];
                if (transposed)
                    gw[q * K + p] = value;
                else
                    gw[p * K + q] = value;
            }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            float value = 0.0f;
            for (int s = 0; s < nt; s++) value += fwork[s * share + n];
            gb[n] = value;
        }
    }
}

void check_inputs(const at::Tensor &x, const at::Tensor &weight, const char *name) {
    TORCH_CHECK(tiles_permitted(), "vitlab::", name, ": this process may not use AMX tiles (Linux refused them)");
    TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "vitlab::", name, " runs on CPU tensors; got ",
                x.device(), " and ", weight.device());
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "vitlab::", name, " expects bf16 input; got ", x.scalar_type());
    TORCH_CHECK(weight.dim() == 2 && (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
                "vitlab::", name, " expects a 2-D float32 or bf16 weight; got ", weight.dim(), "-D ",
                weight.scalar_type());
    TORCH_CHECK(weight.size(1) > 0, "vitlab::", name, " expects a weight with at least one input feature; got ",
                weight.sizes());
}

at::Tensor amx_linear(const at::Tensor &x, const at::Tensor &weight, const std::optional<at::Tensor> &bias) {
    check_inputs(x, weight, "amx_linear");
    const int64_t N = weight.size(0), K = weight.size(1);
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "vitlab::amx_linear: expected input (..., ", K, ") for a weight (",
                N, ", ", K, "); got ", x.sizes());
    const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = N;
    at::Tensor out = at::empty(sizes, x.options());
    const int64_t M = xc.numel() / K;
    if (M == 0 || N == 0) return out;
    const int nthreads = at::get_num_threads();
    const int64_t Kp = padded(K), Np = padded(N);
    at::Tensor work = at::empty({Kp * Np + nthreads * kBlock * Kp}, x.options());
    at::Tensor bias_rounded = at::zeros({Np}, x.options().dtype(at::kFloat)); /* as F.linear's bf16 bias */
    if (bias.has_value() && bias->defined()) {
        TORCH_CHECK(bias->numel() == N && (bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16),
                    "vitlab::amx_linear: expected a float32 or bf16 bias of ", N, " values; got ", bias->sizes(), " ",
                    bias->scalar_type());
        const at::Tensor bc = bias->contiguous();
        float *br = bias_rounded.data_ptr<float>();
        for (int64_t n = 0; n < N; n++)
            br[n] = widen(bc.scalar_type() == at::kFloat ? as_bf16(bc.data_ptr<float>()[n])
                                                         : as_bf16(bc.data_ptr<c10::BFloat16>()[n]));
    }
    const bf16 *xp = reinterpret_cast<const bf16 *>(xc.data_ptr());
    bf16 *op = reinterpret_cast<bf16 *>(out.data_ptr()), *wp = reinterpret_cast<bf16 *>(work.data_ptr());
    const float *bp = bias_rounded.data_ptr<float>();
    if (wc.scalar_type() == at::kFloat)
        rows_product(xp, M, K, wc.data_ptr<float>(), K, true, N, bp, op, wp, nthreads);
    else
        rows_product(xp, M, K, wc.data_ptr<c10::BFloat16>(), K, true, N, bp, op, wp, nthreads);
    return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> amx_linear_backward(const at::Tensor &grad, const at::Tensor &x,
                                                                   const at::Tensor &weight) {
    check_inputs(x, weight, "amx_linear_backward");
    const int64_t N = weight.size(0), K = weight.size(1);
    TORCH_CHECK(grad.scalar_type() == at::kBFloat16, "vitlab::amx_linear_backward expects a bf16 gradient; got ",
                grad.scalar_type());
    TORCH_CHECK(x.size(-1) == K && grad.size(-1) == N && grad.numel() / std::max<int64_t>(N, 1) ==
                x.numel() / K,
                "vitlab::amx_linear_backward: expected the gradient (..., ", N, ") and input (..., ", K,
                ") of one product; got ", grad.sizes(), " and ", x.sizes());
    const at::Tensor gc = grad.contiguous(), xc = x.contiguous(), wc = weight.contiguous();
    at::Tensor grad_x = at::empty(x.sizes(), x.options());
    at::Tensor grad_w = at::empty({N, K}, weight.options().dtype(at::kFloat));
    at::Tensor grad_b = at::empty({N}, weight.options().dtype(at::kFloat));
    const int64_t M = xc.numel() / K; /* K > 0: check_inputs */
    if (M == 0 || N == 0) {
        grad_x.zero_(), grad_w.zero_(), grad_b.zero_();
    } else {
        const int nthreads = at::get_num_threads();
        const int64_t Mp = padded(M), Kp = padded(K), Np = padded(N);
        const int64_t rows_work = Np * Kp + nthreads * kBlock * Np;
        const int64_t cross_work = std::min(Np, Kp) * Mp + Mp * std::max(Np, Kp);
        at::Tensor work = at::empty({std::max(rows_work, cross_work)}, x.options());
        const int64_t Pp = std::min(Np, Kp), Qp = std::max(Np, Kp);
        at::Tensor fwork = at::empty({std::max(Kp, nthreads * (Np + Pp * Qp))}, x.options().dtype(at::kFloat));
        const bf16 *gp = reinterpret_cast<const bf16 *>(gc.data_ptr()), *xp = reinterpret_cast<const bf16 *>(xc.data_ptr());
        bf16 *wp = reinterpret_cast<bf16 *>(work.data_ptr()), *gxp = reinterpret_cast<bf16 *>(grad_x.data_ptr());
        /* grad_x (M x K) = grad (M x N) times weight (N x K): B[k = n][n = k] = weight[n * K + k] */
        float *no_bias = fwork.data_ptr<float>();
        std::memset(no_bias, 0, Kp * sizeof(float));
        if (wc.scalar_type() == at::kFloat)
            rows_product(gp, M, N, wc.data_ptr<float>(), K, false, K, no_bias, gxp, wp, nthreads);
        else
            rows_product(gp, M, N, wc.data_ptr<c10::BFloat16>(), K, false, K, no_bias, gxp, wp, nthreads);
        cross_product(gp, xp, M, N, K, grad_w.data_ptr<float>(), grad_b.data_ptr<float>(), wp,
                      fwork.data_ptr<float>(), nthreads);
    }
    if (weight.scalar_type() != at::kFloat) grad_w = grad_w.to(weight.scalar_type()), grad_b = grad_b.to(weight.scalar_type());
    return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vitlab, m) {
    m.def("amx_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
    m.def("amx_linear_backward(Tensor grad, Tensor x, Tensor weight) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vitlab, CPU, m) {
    m.impl("amx_linear", &amx_linear);
    m.impl("amx_linear_backward", &amx_linear_backward);
}
