// AVX-512 helpers shared by sdlab's CPU kernels.
#pragma once
#include <immintrin.h>
#include <cstdint>

// 2^x: a degree-3 polynomial of the fraction f = x - floor(x) (vreduceps), scaled by 2^floor(x) (vscalefps
// floors its exponent operand itself); relative error < 1e-4, twenty times below bf16's rounding. Large x
// gives inf, x below -126 a denormal or 0.
static inline __m512 exp2_ps(__m512 x) {
    const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF);                  // [0, 1)
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.07705975f), f, _mm512_set1_ps(0.22764373f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6951233f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, x);
}

// The first n <= 16 lanes (mask of n ones).
static inline __mmask16 first_lanes(int64_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
}

// Lanes `m` of 16 bf16 values at p, widened to fp32 (other lanes 0).
static inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// gelu(x) = x/2 (1 + erf(x / sqrt 2)) = x - x/2 erfc(|x| / sqrt 2) for x >= 0, x/2 erfc(|x| / sqrt 2) below;
// erfc(a) = (a1 t + ... + a5 t^5) e^(-a^2), t = 1 / (1 + 0.3275911 a), Abramowitz & Stegun 7.1.26
// (|error| < 1.5e-7, the formula oneDNN's erf GELU uses too), with 1 / sqrt 2 folded into the constants and t
// from rcp14 (relative error 2^-14: below 2e-4 relative in the result for x > -3, more in the far negative
// tail where gelu itself is below 1e-2). |x| is held at 12.7 (erfc is 0 in fp32 long before) so that
// e^(-x^2 / 2) never becomes a slow denormal; x/2 erfc takes the held value too, so gelu(inf) = inf and far
// negative x give a tiny negative number instead of 0. NaN stays NaN.
static inline __m512 gelu_ps(__m512 x) {
    const __m512 ax = _mm512_min_ps(_mm512_set1_ps(12.7f), _mm512_abs_ps(x));   // NaN stays NaN
    const __m512 t = _mm512_rcp14_ps(_mm512_fmadd_ps(ax, _mm512_set1_ps(0.3275911f * 0.70710678f), _mm512_set1_ps(1.0f)));
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    const __m512 e = exp2_ps(_mm512_mul_ps(_mm512_mul_ps(ax, ax), _mm512_set1_ps(-0.72134752f)));   // e^(-x^2 / 2)
    const __m512 held = _mm512_or_ps(ax, _mm512_and_ps(x, _mm512_set1_ps(-0.0f)));                 // x, |x| <= 12.7
    const __m512 h = _mm512_mul_ps(_mm512_mul_ps(held, _mm512_set1_ps(0.5f)), _mm512_mul_ps(p, e));   // x/2 erfc
    return _mm512_mask_sub_ps(h, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ), x, h);
}
