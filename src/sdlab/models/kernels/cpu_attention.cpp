// Flash attention forward for bf16 on CPUs with AVX512-BF16 (sdlab.models.cpu_attention calls it).
//
// softmax(q k^T * scale) v per head, one pass over the keys in blocks of BK with a running row maximum m and
// row sum l (the "online softmax" of FlashAttention): for each block, s = q k^T in fp32, m' = max(m, max s),
// p = 2^((s - m') * scale * log2(e)), l = l * a + sum p, acc = acc * a + p v with a = 2^((m - m') * scale * log2(e));
// out = acc / l. m only moves when a block holds a larger score (rare after the first blocks), so most blocks
// skip the row reductions and the rescaling. Any key count: k and v are packed with zero keys up to whole
// blocks, and the padding keys' scores in the last block are set to a large negative value (p = 0).
// Both products take bf16 pairs and accumulate in fp32 (vdpbf16ps: twice the fp32 FMA rate), so each head's
// k is packed as (D/2, Lk, 2) (as 16-key tiles for AMX) and v as (Lk/2, Dp, 2) pairs and p is rounded to bf16
// before p v, as PyTorch's own bf16 kernel rounds it. Narrow heads (SD1.5's 40 channels) are where this pays:
// PyTorch's CPU kernel runs bf16 attention at its fp32 speed.
//
// Where the compiler targets AMX (Sapphire Rapids and later, built with -march=native there), both products
// run on the AMX tiles instead, 16 queries x 64 keys per block: s = q k^T as 16x16 fp32 tiles from q rows
// (zero-padded to whole 32-channel tiles) and k packed as 16-key tiles, the online softmax on those rows with AVX-512,
// then acc += p v with acc's 16-channel column groups loaded into a tile, accumulated over the block's two
// 32-key halves of p and stored back. One tile configuration (eight 16 x 64-byte tiles) serves both products.
// Heads of at most 64 channels (SD1.5's 40, SD2's and SDXL's 64) leave acc on the tiles instead
// (AttendAmxTileAcc).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <limits>

constexpr int BK = 64;   // keys per block (4 vectors of 16)
constexpr int QT = 64;   // query rows per task
#ifdef __AVX512BF16__
#include "amx.h"
#include "simd.h"


constexpr float MASKED = -1e30f;   // the score of a padding key: 2^((MASKED - m) * scale2) is 0

// Scores of the keys past the last real one (a last block of `valid` < 16 * N keys) -> MASKED.
template <int N = 4>
static inline void mask_tail(__m512 s[N], int valid) {
    for (int c = 0; c < N; ++c) {
        const int n = std::min(std::max(valid - 16 * c, 0), 16);
        s[c] = _mm512_mask_mov_ps(_mm512_set1_ps(MASKED), (__mmask16)((1u << n) - 1), s[c]);
    }
}

// One query row of a block of BK scores s: moves the running maximum m when the block holds a larger score
// (rare after the first blocks), rescaling the row sum l and the row's accumulator acc (NV vectors) by
// alpha = 2^((m - m') * scale2); writes p = 2^((s - m) * scale2) as bf16 and adds it to l.
template <int NV>
static inline void softmax_row(const __m512 s[4], float& m, __m512& l, float* acc, uint16_t* p, float scale2) {
    const __m512 mx4 = _mm512_max_ps(_mm512_max_ps(s[0], s[1]), _mm512_max_ps(s[2], s[3]));
    if (_mm512_cmp_ps_mask(mx4, _mm512_set1_ps(m), _CMP_GT_OQ)) {
        const float mnew = _mm512_reduce_max_ps(mx4);
        const float alpha = std::exp2((m - mnew) * scale2);
        m = mnew;
        l = _mm512_mul_ps(l, _mm512_set1_ps(alpha));
        for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + c * 16, _mm512_mul_ps(_mm512_loadu_ps(acc + c * 16), _mm512_set1_ps(alpha)));
    }
    const __m512 shift = _mm512_set1_ps(-m * scale2), vscale = _mm512_set1_ps(scale2);
    __m512 e[4];
    for (int c = 0; c < 4; ++c) e[c] = exp2_ps(_mm512_fmadd_ps(s[c], vscale, shift));
    _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));
    _mm512_storeu_si512(p + 32, (__m512i)_mm512_cvtne2ps_pbh(e[3], e[2]));
    l = _mm512_add_ps(l, _mm512_add_ps(_mm512_add_ps(e[0], e[1]), _mm512_add_ps(e[2], e[3])));
}

// One output row: acc / l (the row's sum of p), rounded to bf16, its first D channels (acc's padding lanes are
// dropped).
static inline void write_row(const float* acc, float l, uint16_t* dst, int64_t D) {
    const __m512 inv = _mm512_set1_ps(1.f / l);
    for (int64_t c = 0; c < D; c += 16) {
        const __m256i y = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + c), inv));
        _mm256_mask_storeu_epi16(dst + c, first_lanes(D - c), y);
    }
}

// Query rows r0..r1 of one head. bf16 inputs, fp32 accumulation (AVX512-BF16 dot products of pairs).
// q: rows of D bf16 values `qs` apart; kp: (D/2, Lk, 2) bf16; vp: (Lk/2, NV*16, 2) bf16; out: rows of D bf16
// values `os` apart. scale2 = scale * log2(e).
template <int NV, int ROWS>
static void attend_rows_bf16(const uint16_t* q, int64_t qs, const uint16_t* kp, const uint16_t* vp, uint16_t* out,
                             int64_t os, int64_t D, int64_t Lk, int64_t keys, float scale2, int64_t r0, int64_t r1) {
    const int64_t Dp = NV * 16, D2 = D / 2;
    const int64_t n = r1 - r0;
    float m[QT];
    __m512 l[QT];
    alignas(64) float acc[QT * NV * 16];
    alignas(64) uint16_t p[ROWS * BK];
    for (int64_t r = 0; r < n; ++r) { m[r] = -std::numeric_limits<float>::infinity(); l[r] = _mm512_setzero_ps(); }
    std::memset(acc, 0, sizeof(float) * n * Dp);
    for (int64_t j0 = 0; j0 < Lk; j0 += BK) {
        for (int64_t rr = 0; rr < n; rr += ROWS) {
            const int rows = (int)std::min<int64_t>(ROWS, n - rr);
            __m512 s[ROWS][4];
            for (int r = 0; r < ROWS; ++r) for (int c = 0; c < 4; ++c) s[r][c] = _mm512_setzero_ps();
            const uint16_t* qrow = q + (r0 + rr) * qs;
            for (int64_t t = 0; t < D2; ++t) {
                const uint16_t* krow = kp + (t * Lk + j0) * 2;
                __m512bh k0 = (__m512bh)_mm512_loadu_si512(krow), k1 = (__m512bh)_mm512_loadu_si512(krow + 32),
                         k2 = (__m512bh)_mm512_loadu_si512(krow + 64), k3 = (__m512bh)_mm512_loadu_si512(krow + 96);
#pragma GCC unroll 8
                for (int r = 0; r < ROWS; ++r) {
                    if (r < rows) {
                        uint32_t pair;
                        std::memcpy(&pair, qrow + r * qs + 2 * t, 4);
                        __m512bh b = (__m512bh)_mm512_set1_epi32((int)pair);
                        s[r][0] = _mm512_dpbf16_ps(s[r][0], b, k0); s[r][1] = _mm512_dpbf16_ps(s[r][1], b, k1);
                        s[r][2] = _mm512_dpbf16_ps(s[r][2], b, k2); s[r][3] = _mm512_dpbf16_ps(s[r][3], b, k3);
                    }
                }
            }
            if (keys - j0 < BK) for (int r = 0; r < rows; ++r) mask_tail(s[r], (int)(keys - j0));
            for (int r = 0; r < rows; ++r) softmax_row<NV>(s[r], m[rr + r], l[rr + r], acc + (rr + r) * Dp, p + r * BK, scale2);
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
    for (int64_t r = 0; r < n; ++r) write_row(acc + r * Dp, _mm512_reduce_add_ps(l[r]), out + (r0 + r) * os, D);
}

// k of one head (`keys` rows, `ks` bf16 values apart) -> kp: (Dk/2, Lk, 2), pairs of channels per key, keys
// contiguous; channel pairs D/2..Dk/2 (Dk >= D pads the channels to whole AMX tiles) and keys past `keys` (Lk
// pads them to whole blocks) are zero.
static void pack_keys(const uint16_t* k, int64_t ks, uint16_t* kp, int64_t D, int64_t Dk, int64_t Lk, int64_t keys) {
    for (int64_t j0 = 0; j0 < Lk; j0 += BK)          // a block of keys at a time, so its rows stay in cache
        for (int64_t t = 0; t < D / 2; ++t) {
            const int64_t j1 = std::min(j0 + BK, keys);
            for (int64_t j = j0; j < j1; ++j) std::memcpy(kp + (t * Lk + j) * 2, k + j * ks + 2 * t, 4);
            std::memset(kp + (t * Lk + j1) * 2, 0, sizeof(uint16_t) * 2 * (j0 + BK - j1));   // padding keys
        }
    std::memset(kp + D * Lk, 0, sizeof(uint16_t) * (Dk - D) * Lk);
}

// The same for the AMX tiles: kp (Lk/16, Dk/2, 16, 2), 16 keys at a time, so that the tile of 16 keys x 32
// channels (key group g, channel pairs t..t+15) is 1 KB of contiguous memory at kp + (g * Dk/2 + t) * 32
// (`key_tile`), not 16 rows a whole head's keys apart (those rows share one L1 set).
static void pack_key_tiles(const uint16_t* k, int64_t ks, uint16_t* kp, int64_t D, int64_t Dk, int64_t Lk,
                           int64_t keys) {
    std::memset(kp, 0, sizeof(uint16_t) * Dk * Lk);   // padding channels and keys
    for (int64_t j = 0; j < keys; ++j) {
        uint16_t* dst = kp + ((j / 16) * (Dk / 2) * 16 + j % 16) * 2;
        for (int64_t t = 0; t < D / 2; ++t) std::memcpy(dst + t * 32, k + j * ks + 2 * t, 4);
    }
}

static inline const uint16_t* key_tile(const uint16_t* kp, int64_t Dk, int64_t j, int64_t c) {
    return kp + ((j / 16) * (Dk / 2) + c / 2) * 32;   // keys j..j+15 (j a multiple of 16), channels c..c+31
}

// v of one head (`keys` rows, `vs` bf16 values apart) -> vp: (Lk/2, Dp, 2), each channel's values for keys 2u
// and 2u+1 side by side; channels D..Dp and keys past `keys` are zero.
// With `ones`, channel D (a padding channel, D < Dp) is 1 for every real key, so p v's column D sums p.
static void pack_values(const uint16_t* v, int64_t vs, uint16_t* vp, int64_t D, int64_t Dp, int64_t Lk, int64_t keys,
                        bool ones) {
    constexpr uint16_t ONE = 0x3F80;   // 1.0 in bf16
    for (int64_t u = 0; u < Lk / 2; ++u) {
        uint16_t* dst = vp + u * Dp * 2;
        if (2 * u + 1 < keys) {
            const uint16_t* a = v + 2 * u * vs;
            const uint16_t* b = a + vs;
            for (int64_t c = 0; c < D; ++c) { dst[2 * c] = a[c]; dst[2 * c + 1] = b[c]; }
            std::memset(dst + 2 * D, 0, sizeof(uint16_t) * 2 * (Dp - D));
            if (ones) dst[2 * D] = dst[2 * D + 1] = ONE;
        } else {
            std::memset(dst, 0, sizeof(uint16_t) * 2 * Dp);
            if (2 * u < keys) {
                for (int64_t c = 0; c < D; ++c) dst[2 * c] = v[2 * u * vs + c];
                if (ones) dst[2 * D] = ONE;
            }
        }
    }
}

// Packs each head's k and v, then runs `attend` over tiles of QT query rows in parallel. `Dk`: k's channels
// padded (D for the AVX-512 path, whole 32-channel tiles for AMX); `Dp`: v's padded to 16-lane vectors;
// `ones`: v's channel D set to 1 (pack_values); `amx`: k packed for the AMX tiles (pack_key_tiles).
template <typename Attend>
static void run_heads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                      int64_t heads, int64_t Dk, int64_t Dp, Attend attend, bool ones = false, bool amx = false) {
    const int64_t B = q.size(0), Lq = q.size(1), keys = k.size(1), Lk = (keys + BK - 1) / BK * BK, D = q.size(2) / heads;
    const int64_t BH = B * heads, tiles = (Lq + QT - 1) / QT;
    auto kp = at::empty({BH, Dk * Lk}, k.options());   // (Dk/2, Lk, 2) per head, or (Lk/16, Dk/2, 16, 2) for AMX
    auto vp = at::empty({BH, Lk / 2, Dp, 2}, v.options());
    auto u16 = [](const at::Tensor& x) { return reinterpret_cast<uint16_t*>(x.data_ptr<at::BFloat16>()); };
    const uint16_t *qd = u16(q), *kd = u16(k), *vd = u16(v);
    uint16_t *kpd = u16(kp), *vpd = u16(vp), *od = u16(out);
    const int64_t qb = q.stride(0), qs = q.stride(1), kb = k.stride(0), ks = k.stride(1), vb = v.stride(0), vs = v.stride(1);
    const int64_t ob = out.stride(0), os = out.stride(1);
    at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bh = begin; bh < end; ++bh) {
            const int64_t b = bh / heads, h = bh % heads;
            (amx ? pack_key_tiles : pack_keys)(kd + b * kb + h * D, ks, kpd + bh * Dk * Lk, D, Dk, Lk, keys);
            pack_values(vd + b * vb + h * D, vs, vpd + bh * Lk * Dp, D, Dp, Lk, keys, ones);
        }
    });
    at::parallel_for(0, BH * tiles, 1, [&](int64_t begin, int64_t end) {
        attend.begin();
        for (int64_t t = begin; t < end; ++t) {
            const int64_t bh = t / tiles, tile = t % tiles, b = bh / heads, h = bh % heads;
            const int64_t r0 = tile * QT, r1 = std::min<int64_t>(Lq, r0 + QT);
            attend(qd + b * qb + h * D, qs, kpd + bh * Dk * Lk, vpd + bh * Lk * Dp, od + b * ob + h * D, os, D, Lk, keys, r0, r1);
        }
        attend.end();
    });
}

template <int NV, int ROWS>
struct AttendAvx512 {
    float scale2;
    void begin() const {}
    void end() const {}
    void operator()(const uint16_t* q, int64_t qs, const uint16_t* kp, const uint16_t* vp, uint16_t* out, int64_t os,
                    int64_t D, int64_t Lk, int64_t keys, int64_t r0, int64_t r1) const {
        attend_rows_bf16<NV, ROWS>(q, qs, kp, vp, out, os, D, Lk, keys, scale2, r0, r1);
    }
};

template <int NV, int ROWS>
static void run_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                     int64_t heads, float scale2) {
    const int64_t D = q.size(2) / heads;
    run_heads(q, k, v, out, heads, D, NV * 16, AttendAvx512<NV, ROWS>{scale2});
}

#ifdef SDLAB_AMX
// What both AMX paths share: the score scale, k's padded width and one tile configuration for a thread's
// tasks (eight tiles of 16 rows x 64 bytes), released after them.
struct AmxTiles {
    float scale2;
    int64_t Dk;
    void begin() const { configure_full_tiles(); }
    void end() const { _tile_release(); }
};

// Query rows r0..r1 of one head on the AMX tiles, 16 at a time. Tiles 0-3: s (16 queries x 16 keys each, fp32),
// then tile 0 also acc's column groups; 4 and 6: q, then p; 5 and 7: k, then v.
// q: rows of D bf16 values `qs` apart; kp: (Lk/16, Dk/2, 16, 2) (`key_tile`); vp: (Lk/2, Dp, 2); Dk: D rounded up
// to 32.
template <int NV>
struct AttendAmx : AmxTiles {
    void operator()(const uint16_t* q, int64_t qs, const uint16_t* kp, const uint16_t* vp, uint16_t* out, int64_t os,
                    int64_t D, int64_t Lk, int64_t keys, int64_t r0, int64_t r1) const {
        constexpr int64_t Dp = NV * 16;
        alignas(64) uint16_t qbuf[16 * 160];     // 16 query rows, channels zero-padded to Dk (<= 160)
        alignas(64) float sbuf[16 * BK];          // s of one block
        alignas(64) uint16_t pbuf[16 * BK];       // p of one block, bf16
        alignas(64) float acc[16 * Dp];
        float m[16];
        __m512 l[16];
        for (int64_t g0 = r0; g0 < r1; g0 += 16) {
            const int64_t rows = std::min<int64_t>(16, r1 - g0);
            std::memset(qbuf, 0, sizeof(uint16_t) * 16 * Dk);
            for (int64_t r = 0; r < rows; ++r) std::memcpy(qbuf + r * Dk, q + (g0 + r) * qs, sizeof(uint16_t) * D);
            std::memset(acc, 0, sizeof(acc));
            for (int r = 0; r < 16; ++r) { m[r] = -std::numeric_limits<float>::infinity(); l[r] = _mm512_setzero_ps(); }
            for (int64_t j0 = 0; j0 < Lk; j0 += BK) {
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int64_t t = 0; t < Dk; t += 32) {   // 32 channels (16 pairs) per tile
                    _tile_loadd(4, qbuf + t, Dk * 2);
                    _tile_loadd(5, key_tile(kp, Dk, j0, t), 64);      _tile_dpbf16ps(0, 4, 5);
                    _tile_loadd(7, key_tile(kp, Dk, j0 + 16, t), 64); _tile_dpbf16ps(1, 4, 7);
                    _tile_loadd(5, key_tile(kp, Dk, j0 + 32, t), 64); _tile_dpbf16ps(2, 4, 5);
                    _tile_loadd(7, key_tile(kp, Dk, j0 + 48, t), 64); _tile_dpbf16ps(3, 4, 7);
                }
                _tile_stored(0, sbuf, BK * 4); _tile_stored(1, sbuf + 16, BK * 4);
                _tile_stored(2, sbuf + 32, BK * 4); _tile_stored(3, sbuf + 48, BK * 4);
                for (int r = 0; r < 16; ++r) {
                    __m512 sv[4];
                    for (int c = 0; c < 4; ++c) sv[c] = _mm512_load_ps(sbuf + r * BK + c * 16);
                    if (keys - j0 < BK) mask_tail(sv, (int)(keys - j0));
                    softmax_row<NV>(sv, m[r], l[r], acc + r * Dp, pbuf + r * BK, scale2);
                }
                _tile_loadd(4, pbuf, BK * 2);        // p, keys j0..j0+31
                _tile_loadd(6, pbuf + 32, BK * 2);   // p, keys j0+32..j0+63
                const uint16_t* vb = vp + (j0 / 2) * Dp * 2;
                for (int c = 0; c < NV; ++c) {       // acc's channels 16c..16c+15
                    _tile_loadd(0, acc + c * 16, Dp * 4);
                    _tile_loadd(5, vb + c * 32, Dp * 4);               _tile_dpbf16ps(0, 4, 5);
                    _tile_loadd(7, vb + 16 * Dp * 2 + c * 32, Dp * 4); _tile_dpbf16ps(0, 6, 7);
                    _tile_stored(0, acc + c * 16, Dp * 4);
                }
            }
            for (int64_t r = 0; r < rows; ++r) write_row(acc + r * Dp, _mm512_reduce_add_ps(l[r]), out + (g0 + r) * os, D);
        }
    }
};

// Heads of at most 64 channels (SD1.5's 40, SD2's and SDXL's 64) keep acc on the tiles across all key blocks
// instead of loading and storing it for every block: 32-key blocks, s on tiles 0 and 1, acc's NV <= 4 column
// groups on 2..5, q and p on 6 (q's first 32 channels on 5 where acc leaves it free), k and v on 7. The next
// block's scores are issued before this block's softmax, so the products run while the vector units work.
// The row sums come from the tiles too where v has a padding channel (`ones`: D < NV * 16): v carries a column
// of ones there (pack_values), so acc[:, D] = sum p, over the same bf16 p as the numerator; else the vector
// units add them up.
// The running maximum moves only when a block's score passes it by more than RESCALE (in the exponent's
// log2 units, so p <= 2^RESCALE): each move costs a round trip of acc's tiles through memory, and an exact
// running maximum moves on about a third of the blocks of 16 rows. 2 keeps the error against fp64 within a few
// per cent of PyTorch's bf16 kernel (the largest p is then not always exactly 1 before rounding), and the
// call 4-7 % faster than with an exact maximum (`tests/test_cpu_attention.py`, bench_attention.py).
constexpr int BK32 = 32;
constexpr float RESCALE = 2.f;

template <int NV>
struct AttendAmxTileAcc : AmxTiles {
    bool ones;   // v's channel D holds ones (the row sums come from the tiles)
    // s of the 16 queries in qbuf and keys j0..j0+31 -> tiles 0 and 1. With at most three of acc's column
    // groups (heads of up to 48 channels) tile 5 is free and holds q's first 32 channels for all key blocks.
    void scores(const uint16_t* qbuf, const uint16_t* kp, int64_t j0) const {
        _tile_zero(0); _tile_zero(1);
        int64_t t = 0;
        if constexpr (NV <= 3) {
            _tile_loadd(7, key_tile(kp, Dk, j0, 0), 64);      _tile_dpbf16ps(0, 5, 7);
            _tile_loadd(7, key_tile(kp, Dk, j0 + 16, 0), 64); _tile_dpbf16ps(1, 5, 7);
            t = 32;
        }
        for (; t < Dk; t += 32) {   // 32 channels (16 pairs) per tile
            _tile_loadd(6, qbuf + t, Dk * 2);
            _tile_loadd(7, key_tile(kp, Dk, j0, t), 64);      _tile_dpbf16ps(0, 6, 7);
            _tile_loadd(7, key_tile(kp, Dk, j0 + 16, t), 64); _tile_dpbf16ps(1, 6, 7);
        }
    }
    void store_acc(float* acc) const {
        _tile_stored(2, acc, NV * 64);
        if (NV > 1) _tile_stored(3, acc + 16, NV * 64);
        if (NV > 2) _tile_stored(4, acc + 32, NV * 64);
        if (NV > 3) _tile_stored(5, acc + 48, NV * 64);
    }
    void load_acc(const float* acc) const {
        _tile_loadd(2, acc, NV * 64);
        if (NV > 1) _tile_loadd(3, acc + 16, NV * 64);
        if (NV > 2) _tile_loadd(4, acc + 32, NV * 64);
        if (NV > 3) _tile_loadd(5, acc + 48, NV * 64);
    }
    void operator()(const uint16_t* q, int64_t qs, const uint16_t* kp, const uint16_t* vp, uint16_t* out, int64_t os,
                    int64_t D, int64_t Lk, int64_t keys, int64_t r0, int64_t r1) const {
        constexpr int64_t Dp = NV * 16;
        constexpr float NONE = -std::numeric_limits<float>::infinity();
        alignas(64) uint16_t qbuf[16 * 64];       // 16 query rows, channels zero-padded to Dk (<= 64)
        alignas(64) float sbuf[16 * BK32];
        alignas(64) uint16_t pbuf[16 * BK32];
        alignas(64) float acc[16 * Dp];
        float m[16], alpha[16];
        __m512 l[16];                             // the row sums where v has no column of ones
        __m512 limit[16], shift[16];              // per row: m + margin, and -m * scale2 (set when m moves)
        const __m512 vscale = _mm512_set1_ps(scale2);
        const int64_t blocks_end = (keys + BK32 - 1) / BK32 * BK32;
        const float margin = RESCALE / scale2;   // in score units
        for (int64_t g0 = r0; g0 < r1; g0 += 16) {
            const int64_t rows = std::min<int64_t>(16, r1 - g0);
            std::memset(qbuf, 0, sizeof(qbuf));
            for (int64_t r = 0; r < rows; ++r) std::memcpy(qbuf + r * Dk, q + (g0 + r) * qs, sizeof(uint16_t) * D);
            for (int r = 0; r < 16; ++r) { m[r] = NONE; l[r] = _mm512_setzero_ps(); limit[r] = _mm512_set1_ps(NONE); }
            _tile_zero(2); if (NV > 1) _tile_zero(3); if (NV > 2) _tile_zero(4); if (NV > 3) _tile_zero(5);
            if constexpr (NV <= 3) _tile_loadd(5, qbuf, Dk * 2);
            scores(qbuf, kp, 0);
            for (int64_t j0 = 0; j0 < blocks_end; j0 += BK32) {
                _tile_stored(0, sbuf, BK32 * 4); _tile_stored(1, sbuf + 16, BK32 * 4);
                if (j0 + BK32 < blocks_end) scores(qbuf, kp, j0 + BK32);
                uint32_t moved = 0;   // rows whose acc needs * alpha
                for (int r = 0; r < 16; ++r) {
                    __m512 s[2] = {_mm512_load_ps(sbuf + r * BK32), _mm512_load_ps(sbuf + r * BK32 + 16)};
                    if (keys - j0 < BK32) mask_tail<2>(s, (int)(keys - j0));
                    const __m512 mx = _mm512_max_ps(s[0], s[1]);
                    if (_mm512_cmp_ps_mask(mx, limit[r], _CMP_GT_OQ)) {
                        const float mnew = _mm512_reduce_max_ps(mx);
                        if (m[r] != NONE) {
                            alpha[r] = std::exp2((m[r] - mnew) * scale2);
                            l[r] = _mm512_mul_ps(l[r], _mm512_set1_ps(alpha[r]));
                            moved |= 1u << r;
                        }
                        m[r] = mnew;
                        limit[r] = _mm512_set1_ps(mnew + margin);
                        shift[r] = _mm512_set1_ps(-mnew * scale2);
                    }
                    const __m512 e0 = exp2_ps(_mm512_fmadd_ps(s[0], vscale, shift[r])), e1 = exp2_ps(_mm512_fmadd_ps(s[1], vscale, shift[r]));
                    _mm512_store_si512(pbuf + r * BK32, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
                    if (!ones) l[r] = _mm512_add_ps(l[r], _mm512_add_ps(e0, e1));
                }
                if (moved) {   // those rows of acc * alpha, through memory
                    store_acc(acc);
                    for (uint32_t bits = moved; bits; bits &= bits - 1) {
                        const int r = __builtin_ctz(bits);
                        for (int c = 0; c < NV; ++c)
                            _mm512_store_ps(acc + r * Dp + c * 16, _mm512_mul_ps(_mm512_load_ps(acc + r * Dp + c * 16), _mm512_set1_ps(alpha[r])));
                    }
                    load_acc(acc);
                }
                _tile_loadd(6, pbuf, BK32 * 2);
                const uint16_t* vb = vp + (j0 / 2) * Dp * 2;   // keys j0..j0+31 as 16 pairs
                _tile_loadd(7, vb, Dp * 4); _tile_dpbf16ps(2, 6, 7);
                if (NV > 1) { _tile_loadd(7, vb + 32, Dp * 4); _tile_dpbf16ps(3, 6, 7); }
                if (NV > 2) { _tile_loadd(7, vb + 64, Dp * 4); _tile_dpbf16ps(4, 6, 7); }
                if (NV > 3) { _tile_loadd(7, vb + 96, Dp * 4); _tile_dpbf16ps(5, 6, 7); }
            }
            store_acc(acc);
            for (int64_t r = 0; r < rows; ++r)
                write_row(acc + r * Dp, ones ? acc[r * Dp + D] : _mm512_reduce_add_ps(l[r]), out + (g0 + r) * os, D);
        }
    }
};

template <int NV>
static void run_amx(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                    int64_t heads, float scale2) {
    const int64_t D = q.size(2) / heads, Dk = (D + 31) / 32 * 32;
    if constexpr (NV <= 4) {
        const bool ones = D < NV * 16;   // a padding channel for the row sums
        run_heads(q, k, v, out, heads, Dk, NV * 16, AttendAmxTileAcc<NV>{{scale2, Dk}, ones}, ones, true);
    } else {
        run_heads(q, k, v, out, heads, Dk, NV * 16, AttendAmx<NV>{{scale2, Dk}}, false, true);
    }
}
#endif

// Whether flash_attention_bf16 runs on the AMX tiles here (built for them, and the OS grants them).
bool uses_amx() {
#ifdef SDLAB_AMX
    return amx_permitted();
#else
    return false;
#endif
}

// Multi-head attention on (batch, tokens, channels) tensors: q: (B, Lq, C), k and v: (B, Lk, C) bf16 with
// contiguous channels (rows may be views into a wider tensor), C = heads * D. Returns (B, Lq, C) bf16.
// allow_amx = false keeps to the AVX512-BF16 products where the tiles would be used (for tests).
at::Tensor flash_attention_bf16(at::Tensor q, at::Tensor k, at::Tensor v, int64_t heads, double scale2,
                                   bool allow_amx) {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
                "q, k and v must be bf16");
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
                "q, k and v must be (batch, tokens, channels) with contiguous channels");
    TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(2) == q.size(2) && v.size(2) == q.size(2)
                && v.size(1) == k.size(1), "q, k and v do not match");
    TORCH_CHECK(heads > 0 && q.size(2) % heads == 0 && (q.size(2) / heads) % 2 == 0, "the head width must be even");
    TORCH_CHECK(k.size(1) > 0, "there must be keys");
    auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
#ifdef SDLAB_AMX
    if (allow_amx && uses_amx()) {
        switch ((q.size(2) / heads + 15) / 16) {
            case 1: run_amx<1>(q, k, v, out, heads, scale2); return out;
            case 2: run_amx<2>(q, k, v, out, heads, scale2); return out;
            case 3: run_amx<3>(q, k, v, out, heads, scale2); return out;
            case 4: run_amx<4>(q, k, v, out, heads, scale2); return out;
            case 5: run_amx<5>(q, k, v, out, heads, scale2); return out;
            case 6: run_amx<6>(q, k, v, out, heads, scale2); return out;
            case 8: run_amx<8>(q, k, v, out, heads, scale2); return out;
            case 10: run_amx<10>(q, k, v, out, heads, scale2); return out;
            default: TORCH_CHECK(false, "unsupported head width");
        }
    }
#endif
    switch ((q.size(2) / heads + 15) / 16) {   // 16-lane vectors per head
        case 1: run_bf16<1, 6>(q, k, v, out, heads, scale2); break;
        case 2: run_bf16<2, 6>(q, k, v, out, heads, scale2); break;
        case 3: run_bf16<3, 4>(q, k, v, out, heads, scale2); break;
        case 4: run_bf16<4, 4>(q, k, v, out, heads, scale2); break;
        case 5: run_bf16<5, 3>(q, k, v, out, heads, scale2); break;
        case 6: run_bf16<6, 2>(q, k, v, out, heads, scale2); break;
        case 8: run_bf16<8, 2>(q, k, v, out, heads, scale2); break;
        case 10: run_bf16<10, 2>(q, k, v, out, heads, scale2); break;
        default: TORCH_CHECK(false, "unsupported head width");
    }
    return out;
}
#endif
