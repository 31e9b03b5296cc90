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

// gelu(x) = x/2 (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7):
// erf(z) = sign(z) (1 - (a1 t + ... + a5 t^5) e^(-z^2)), t = 1 / (1 + 0.3275911 |z|). |z| is held at 9
// (erf = 1 in fp32 well before) so that e^(-z^2) never becomes a slow denormal; 1 / (1 + ...) is rcp14 with
// one Newton step.
static inline __m512 gelu_ps(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678f));
    const __m512 az = _mm512_min_ps(_mm512_abs_ps(z), _mm512_set1_ps(9.0f));
    const __m512 d = _mm512_fmadd_ps(az, _mm512_set1_ps(0.3275911f), one);
    __m512 t = _mm512_rcp14_ps(d);
    t = _mm512_mul_ps(t, _mm512_fnmadd_ps(d, t, _mm512_set1_ps(2.0f)));
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    const __m512 e = exp2_ps(_mm512_mul_ps(_mm512_mul_ps(az, az), _mm512_set1_ps(-1.44269504f)));
    const __m512 erf_abs = _mm512_fnmadd_ps(p, e, one);
    const __m512 erf = _mm512_xor_ps(erf_abs, _mm512_and_ps(z, _mm512_set1_ps(-0.0f)));
    const __m512 half = _mm512_mul_ps(x, _mm512_set1_ps(0.5f));
    return _mm512_fmadd_ps(half, erf, half);
}
