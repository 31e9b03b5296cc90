// GroupNorm (optionally followed by SiLU) and LayerNorm for bf16 activations on CPUs with AVX512-BF16
// (sdlab.models.cpu_norm calls them); fp32 arithmetic, one rounding to bf16.
//
// GroupNorm on channels-last maps: two passes over x instead of PyTorch's GroupNorm and SiLU's four:
//   1. per channel and task of PIXELS pixels (in parallel), the fp32 sums of d = x - x0 and d^2, x0 the
//      task's first pixel; combined in double (Chan et al.) into each channel's mean and sum of squared
//      deviations, then the group's: no cancellation of large sums, whatever the offset or pixel count;
//   2. y = x * a_c + b_c with a_c = weight_c / sqrt(var_g + eps), b_c = bias_c - mean_g * a_c, then
//      silu(y) = y / (1 + 2^(-y log2 e)), rounded to bf16 once (PyTorch rounds y to bf16 before its SiLU).
// LayerNorm over each row's C channels: the row's mean, then the mean of (x - mean)^2 (the row is in L1 by
// then), then y = (x - mean) / sqrt(var + eps) * weight + bias in the same pass that writes it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#ifdef __AVX512BF16__
#include "simd.h"

constexpr int64_t PIXELS = 256;   // pixels per task

// A norm's weight or bias (C,) bf16, fp16 or fp32 as fp32; `fill` for every channel where it has none.
static std::vector<float> affine_fp32(const c10::optional<at::Tensor>& t, int64_t C, float fill) {
    if (!t.has_value() || !t->defined()) return std::vector<float>(C, fill);
    const auto type = t->scalar_type();
    TORCH_CHECK(t->numel() == C && (type == at::kBFloat16 || type == at::kHalf || type == at::kFloat),
                "the norm's weight and bias must be (C,) bf16, fp16 or fp32");
    const at::Tensor f = t->to(at::kFloat).contiguous();
    return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + C);
}

// x: (B, C, H, W) bf16 in channels-last memory, weight and bias: (C,) bf16, fp16 or fp32, or none -> the same
// layout as x.
at::Tensor group_norm_bf16(at::Tensor x, c10::optional<at::Tensor> weight, c10::optional<at::Tensor> bias,
                           int64_t groups, double eps, bool silu, bool overwrite) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
                "x must be a channels-last (B, C, H, W) bf16 tensor");
    const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
    TORCH_CHECK(groups > 0 && C % groups == 0 && HW > 0, "the channels must split into the groups, over some pixels");
    // overwrite: the result goes into x itself (its last pass reads each vector of x before writing it)
    auto out = overwrite ? x : at::empty_like(x);   // channels-last, as x
    const uint16_t* xd = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    uint16_t* od = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    const int64_t V = (C + 15) / 16, tasks = (HW + PIXELS - 1) / PIXELS, cg = C / groups;
    std::vector<float> sums(B * tasks * V * 32);   // per task, per 16 channels: 16 sums of d, then 16 of d^2
    at::parallel_for(0, B * tasks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
            const int64_t b = t / tasks, p0 = (t % tasks) * PIXELS, p1 = std::min(HW, p0 + PIXELS);
            const uint16_t* image = xd + b * HW * C;
            for (int64_t v = 0; v < V; ++v) {
                const __mmask16 m = first_lanes(C - v * 16);
                const __m512 x0 = load_bf16(image + p0 * C + v * 16, m);
                __m512 s = _mm512_setzero_ps(), s2 = _mm512_setzero_ps();
                for (int64_t p = p0; p < p1; ++p) {
                    const __m512 d = _mm512_sub_ps(load_bf16(image + p * C + v * 16, m), x0);
                    s = _mm512_add_ps(s, d);
                    s2 = _mm512_fmadd_ps(d, d, s2);
                }
                _mm512_storeu_ps(&sums[(t * V + v) * 32], s);
                _mm512_storeu_ps(&sums[(t * V + v) * 32 + 16], s2);
            }
        }
    });
    std::vector<float> scale(B * C), shift(B * C);   // y = x * scale + shift
    const std::vector<float> w = affine_fp32(weight, C, 1.f), bi = affine_fp32(bias, C, 0.f);
    std::vector<double> mean(C), m2(C);   // per channel: mean and sum of squared deviations over the pixels
    std::vector<double> task_mean(tasks);
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t c = 0; c < C; ++c) {
            double total = 0;
            m2[c] = 0;
            for (int64_t k = 0; k < tasks; ++k) {
                const int64_t t = b * tasks + k, n = std::min(HW, (k + 1) * PIXELS) - k * PIXELS;
                const double s = sums[(t * V + c / 16) * 32 + c % 16], s2 = sums[(t * V + c / 16) * 32 + 16 + c % 16];
                uint32_t bits = uint32_t(xd[(b * HW + k * PIXELS) * C + c]) << 16;
                float x0;
                std::memcpy(&x0, &bits, 4);
                task_mean[k] = x0 + s / n;
                m2[c] += s2 - s * s / n;
                total += task_mean[k] * n;
            }
            mean[c] = total / HW;
            for (int64_t k = 0; k < tasks; ++k) {
                const int64_t n = std::min(HW, (k + 1) * PIXELS) - k * PIXELS;
                m2[c] += n * (task_mean[k] - mean[c]) * (task_mean[k] - mean[c]);
            }
        }
        for (int64_t g = 0; g < groups; ++g) {
            double mg = 0, var = 0;
            for (int64_t c = g * cg; c < (g + 1) * cg; ++c) mg += mean[c] / cg;
            for (int64_t c = g * cg; c < (g + 1) * cg; ++c) var += (m2[c] / HW + (mean[c] - mg) * (mean[c] - mg)) / cg;
            const double rstd = 1.0 / std::sqrt(std::max(var, 0.0) + eps);
            for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
                scale[b * C + c] = float(rstd * w[c]);
                shift[b * C + c] = float(bi[c] - mg * rstd * w[c]);
            }
        }
    }
    const __m512 minus_log2e = _mm512_set1_ps(-1.4426950408889634f), one = _mm512_set1_ps(1.f);
    at::parallel_for(0, B * tasks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
            const int64_t b = t / tasks, p0 = (t % tasks) * PIXELS, p1 = std::min(HW, p0 + PIXELS);
            for (int64_t p = p0; p < p1; ++p) {
                const uint16_t* src = xd + (b * HW + p) * C;
                uint16_t* dst = od + (b * HW + p) * C;
                for (int64_t v = 0; v < V; ++v) {
                    const __mmask16 m = first_lanes(C - v * 16);
                    __m512 y = _mm512_fmadd_ps(load_bf16(src + v * 16, m), _mm512_maskz_loadu_ps(m, &scale[b * C + v * 16]),
                                               _mm512_maskz_loadu_ps(m, &shift[b * C + v * 16]));
                    if (silu) y = _mm512_div_ps(y, _mm512_add_ps(one, exp2_ps(_mm512_mul_ps(y, minus_log2e))));
                    _mm256_mask_storeu_epi16(dst + v * 16, m, (__m256i)_mm512_cvtneps_pbh(y));
                }
            }
        }
    });
    return out;
}

// x: (..., C) bf16 with contiguous rows, weight and bias: (C,) bf16, fp16 or fp32, or none -> the same shape.
at::Tensor layer_norm_bf16(at::Tensor x, c10::optional<at::Tensor> weight, c10::optional<at::Tensor> bias, double eps) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() >= 1 && x.is_contiguous() && x.size(-1) > 0,
                "x must be a contiguous bf16 tensor of rows");
    const int64_t C = x.size(-1), M = x.numel() / C, V = (C + 15) / 16;
    const std::vector<float> w = affine_fp32(weight, C, 1.f), b = affine_fp32(bias, C, 0.f);
    auto out = at::empty_like(x);
    const uint16_t* xd = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    uint16_t* od = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    at::parallel_for(0, M, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const uint16_t* row = xd + r * C;
            __m512 s = _mm512_setzero_ps();
            for (int64_t v = 0; v < V; ++v) s = _mm512_add_ps(s, load_bf16(row + v * 16, first_lanes(C - v * 16)));
            const float mean = _mm512_reduce_add_ps(s) / C;
            const __m512 vmean = _mm512_set1_ps(mean);
            __m512 s2 = _mm512_setzero_ps();
            for (int64_t v = 0; v < V; ++v) {
                const __mmask16 m = first_lanes(C - v * 16);
                const __m512 d = _mm512_maskz_sub_ps(m, load_bf16(row + v * 16, m), vmean);
                s2 = _mm512_fmadd_ps(d, d, s2);
            }
            const float rstd = 1.f / std::sqrt(_mm512_reduce_add_ps(s2) / C + (float)eps);
            const __m512 a = _mm512_set1_ps(rstd), c = _mm512_set1_ps(-mean * rstd);   // (x - mean) * rstd
            uint16_t* dst = od + r * C;
            for (int64_t v = 0; v < V; ++v) {
                const __mmask16 m = first_lanes(C - v * 16);
                const __m512 normed = _mm512_fmadd_ps(load_bf16(row + v * 16, m), a, c);
                const __m512 y = _mm512_fmadd_ps(normed, _mm512_maskz_loadu_ps(m, &w[v * 16]),
                                                 _mm512_maskz_loadu_ps(m, &b[v * 16]));
                _mm256_mask_storeu_epi16(dst + v * 16, m, (__m256i)_mm512_cvtneps_pbh(y));
            }
        }
    });
    return out;
}
#endif
