// Flash attention forward for bf16 on CPUs with AVX512-BF16 (sdlab.models.cpu_attention builds and calls it).
//
// softmax(q k^T * scale) v per head, one pass over the keys in blocks of BK with a running row maximum m and
// row sum l (the "online softmax" of FlashAttention): for each block, s = q k^T * scale * log2(e) in fp32,
// m' = max(m, max s), p = 2^(s - m'), l = l * 2^(m - m') + sum p, acc = acc * 2^(m - m') + p v; out = acc / l.
// Both products take bf16 pairs and accumulate in fp32 (vdpbf16ps: twice the fp32 FMA rate), so k is stored
// as (D/2, Lk, 2) and v as (Lk/2, Dp, 2) pairs and p is rounded to bf16 before p v, as PyTorch's own bf16
// kernel rounds it. Narrow heads (SD1.5's 40 channels) are where this pays: PyTorch's CPU kernel runs bf16
// attention at its fp32 speed.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <limits>

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int i16 __attribute__((vector_size(64)));

static inline v16 load(const float* p) { v16 v; std::memcpy(&v, p, 64); return v; }
static inline void store(float* p, v16 v) { std::memcpy(p, &v, 64); }
static inline v16 splat(float x) { return (v16){} + x; }

static inline float hsum(v16 v) {
    v = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v = v + __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v = v + __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
}

// 2^x for x <= 0 (x >= -126 after clamping): 2^floor(x) from the exponent bits times a degree-6 polynomial
// of the fraction (relative error ~2e-7).
static inline v16 exp2v(v16 x) {
    x = x < -126.f ? splat(-126.f) : x;
    i16 xi = __builtin_convertvector(x, i16);                 // truncation toward zero
    v16 xf = __builtin_convertvector(xi, v16);
    i16 adjust = xf > x;                                      // -1 where truncation rounded up (x < 0)
    xi = xi + adjust;
    xf = __builtin_convertvector(xi, v16);
    v16 f = x - xf;                                           // [0, 1)
    v16 p = splat(1.5353362e-4f);
    p = p * f + 1.3398874e-3f;
    p = p * f + 9.6181293e-3f;
    p = p * f + 5.5504109e-2f;
    p = p * f + 2.4022651e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    i16 bits = (xi + 127) << 23;
    v16 scale;
    std::memcpy(&scale, &bits, 64);
    return p * scale;
}

constexpr int BK = 64;   // keys per block (4 vectors of 16)
constexpr int QT = 64;   // query rows per task
#ifdef __AVX512BF16__
#include <immintrin.h>

// bf16 inputs, fp32 accumulation (AVX512-BF16 dot products of pairs). q: (Lq, D) bf16; kp: (D/2, Lk, 2) bf16;
// vp: (Lk/2, NV*16, 2) bf16; out: (Lq, D) fp32. scale2 = scale * log2(e).
template <int NV, int ROWS>
static void attend_rows_bf16(const uint16_t* q, const uint16_t* kp, const uint16_t* vp, float* out, int64_t D,
                             int64_t Lk, float scale2, int64_t r0, int64_t r1) {
    const int64_t Dp = NV * 16, D2 = D / 2;
    const int64_t n = r1 - r0;
    float m[QT], l[QT];
    alignas(64) float acc[QT * NV * 16];
    alignas(64) uint16_t p[ROWS * BK];
    for (int64_t r = 0; r < n; ++r) { m[r] = -std::numeric_limits<float>::infinity(); l[r] = 0.f; }
    std::memset(acc, 0, sizeof(float) * n * Dp);
    const __m512 vscale = _mm512_set1_ps(scale2);
    for (int64_t j0 = 0; j0 < Lk; j0 += BK) {
        for (int64_t rr = 0; rr < n; rr += ROWS) {
            const int rows = (int)std::min<int64_t>(ROWS, n - rr);
            __m512 s[ROWS][4];
            for (int r = 0; r < ROWS; ++r) for (int c = 0; c < 4; ++c) s[r][c] = _mm512_setzero_ps();
            const uint16_t* qrow = q + (r0 + rr) * D;
            for (int64_t t = 0; t < D2; ++t) {
                const uint16_t* krow = kp + (t * Lk + j0) * 2;
                __m512bh k0 = (__m512bh)_mm512_loadu_si512(krow), k1 = (__m512bh)_mm512_loadu_si512(krow + 32),
                         k2 = (__m512bh)_mm512_loadu_si512(krow + 64), k3 = (__m512bh)_mm512_loadu_si512(krow + 96);
#pragma GCC unroll 8
                for (int r = 0; r < ROWS; ++r) {
                    if (r < rows) {
                        uint32_t pair;
                        std::memcpy(&pair, qrow + r * D + 2 * t, 4);
                        __m512bh b = (__m512bh)_mm512_set1_epi32((int)pair);
                        s[r][0] = _mm512_dpbf16_ps(s[r][0], b, k0); s[r][1] = _mm512_dpbf16_ps(s[r][1], b, k1);
                        s[r][2] = _mm512_dpbf16_ps(s[r][2], b, k2); s[r][3] = _mm512_dpbf16_ps(s[r][3], b, k3);
                    }
                }
            }
            for (int r = 0; r < rows; ++r) {
                for (int c = 0; c < 4; ++c) s[r][c] = _mm512_mul_ps(s[r][c], vscale);
                __m512 mx4 = _mm512_max_ps(_mm512_max_ps(s[r][0], s[r][1]), _mm512_max_ps(s[r][2], s[r][3]));
                const float mx = _mm512_reduce_max_ps(mx4);
                const int64_t row = rr + r;
                const float mnew = mx > m[row] ? mx : m[row];
                const float alpha = std::exp2(m[row] - mnew);
                __m512 e[4];
                v16 sum = splat(0.f);
                for (int c = 0; c < 4; ++c) {
                    v16 x; std::memcpy(&x, &s[r][c], 64);
                    v16 ev = exp2v(x - mnew);
                    sum += ev;
                    std::memcpy(&e[c], &ev, 64);
                }
                _mm512_storeu_si512(p + r * BK, (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));
                _mm512_storeu_si512(p + r * BK + 32, (__m512i)_mm512_cvtne2ps_pbh(e[3], e[2]));
                l[row] = l[row] * alpha + hsum(sum);
                m[row] = mnew;
                if (alpha != 1.f) {
                    float* a = acc + row * Dp;
                    for (int c = 0; c < NV; ++c) store(a + c * 16, load(a + c * 16) * alpha);
                }
            }
            __m512 o[ROWS][NV];
            for (int r = 0; r < ROWS; ++r) for (int c = 0; c < NV; ++c)
                o[r][c] = r < rows ? _mm512_loadu_ps(acc + (rr + r) * Dp + c * 16) : _mm512_setzero_ps();
            for (int u = 0; u < BK / 2; ++u) {
                const uint16_t* vrow = vp + ((j0 / 2 + u) * Dp) * 2;
                __m512bh vv[NV];
                for (int c = 0; c < NV; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vrow + c * 32);
#pragma GCC unroll 8
                for (int r = 0; r < ROWS; ++r) {
                    uint32_t pair;
                    std::memcpy(&pair, p + r * BK + 2 * u, 4);
                    __m512bh b = (__m512bh)_mm512_set1_epi32((int)pair);
                    for (int c = 0; c < NV; ++c) o[r][c] = _mm512_dpbf16_ps(o[r][c], b, vv[c]);
                }
            }
            for (int r = 0; r < rows; ++r) for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + (rr + r) * Dp + c * 16, o[r][c]);
        }
    }
    for (int64_t r = 0; r < n; ++r) {
        const float inv = 1.f / l[r];
        float* dst = out + (r0 + r) * D;
        for (int64_t c = 0; c < D; ++c) dst[c] = acc[r * Dp + c] * inv;
    }
}

template <int NV, int ROWS>
static void run_bf16(const torch::Tensor& q, const torch::Tensor& kp, const torch::Tensor& vp, torch::Tensor& out, float scale2) {
    const int64_t BH = q.size(0), Lq = q.size(1), D = q.size(2), Lk = kp.size(2);
    const int64_t tiles = (Lq + QT - 1) / QT;
    const uint16_t* qd = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
    const uint16_t* kd = reinterpret_cast<const uint16_t*>(kp.data_ptr<at::BFloat16>());
    const uint16_t* vd = reinterpret_cast<const uint16_t*>(vp.data_ptr<at::BFloat16>());
    float* od = out.data_ptr<float>();
    at::parallel_for(0, BH * tiles, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
            const int64_t bh = t / tiles, tile = t % tiles;
            const int64_t r0 = tile * QT, r1 = std::min<int64_t>(Lq, r0 + QT);
            attend_rows_bf16<NV, ROWS>(qd + bh * Lq * D, kd + bh * D * Lk, vd + bh * Lk * NV * 16, od + bh * Lq * D,
                                       D, Lk, scale2, r0, r1);
        }
    });
}

// q: (BH, Lq, D) bf16; kp: (BH, D/2, Lk, 2) bf16; vp: (BH, Lk/2, Dp, 2) bf16. Returns (BH, Lq, D) fp32.
torch::Tensor flash_attention_bf16(torch::Tensor q, torch::Tensor kp, torch::Tensor vp, double scale2) {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 && kp.scalar_type() == at::kBFloat16 && vp.scalar_type() == at::kBFloat16,
                "q, k and v must be bf16");
    TORCH_CHECK(q.is_contiguous() && kp.is_contiguous() && vp.is_contiguous(), "q, k and v must be contiguous");
    TORCH_CHECK(q.dim() == 3 && kp.dim() == 4 && vp.dim() == 4 && kp.size(3) == 2 && vp.size(3) == 2, "bad layout");
    TORCH_CHECK(kp.size(0) == q.size(0) && vp.size(0) == q.size(0) && kp.size(1) * 2 == q.size(2)
                && vp.size(1) * 2 == kp.size(2) && vp.size(2) == (q.size(2) + 15) / 16 * 16, "q, k and v do not match");
    TORCH_CHECK(kp.size(2) % BK == 0, "keys must be a multiple of 64");
    auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(torch::kFloat32));
    const int64_t nv = vp.size(2) / 16;
    switch (nv) {
        case 1: run_bf16<1, 6>(q, kp, vp, out, scale2); break;
        case 2: run_bf16<2, 6>(q, kp, vp, out, scale2); break;
        case 3: run_bf16<3, 4>(q, kp, vp, out, scale2); break;
        case 4: run_bf16<4, 4>(q, kp, vp, out, scale2); break;
        case 5: run_bf16<5, 3>(q, kp, vp, out, scale2); break;
        case 6: run_bf16<6, 2>(q, kp, vp, out, scale2); break;
        case 8: run_bf16<8, 2>(q, kp, vp, out, scale2); break;
        case 10: run_bf16<10, 2>(q, kp, vp, out, scale2); break;
        default: TORCH_CHECK(false, "unsupported head width");
    }
    return out;
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef __AVX512BF16__
    m.def("flash_attention_bf16", &flash_attention_bf16);
#endif
}
