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
