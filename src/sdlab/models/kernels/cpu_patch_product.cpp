// A square convolution over few pixels as one matrix product on the AMX tiles (sdlab.models.patch_conv calls
// it for bf16 channels-last inference). With M output pixels (batch included), K = k*k*C_in and N = C_out:
//
//     out[m, n] = bias[n] + sum_K patches[m, K] W[n, K],   W = the weight's (C_out, k, k, C_in) memory
//
// computed as its transpose, W @ patches^T, so that the weight, the large operand, is read in place as the
// tiles' left operand (16 output channels x 32 K per tile) and only the patches are laid out for the tiles:
// (16-pixel groups, K/2, 16 pixels, 2) bf16, one 1 KB tile per 16 pixels x 32 K. PIXELS output pixels at a
// time (their patches and sums stay in L2; the weight is read again for each, from L3 after the first), each
// thread owns 32-channel blocks of the output; per pass over KC of K it adds, for each 32 x 32 block, a 2 x 2
// tile product into fp32 sums kept in 4 KB blocks (tile-contiguous: rows of a strided layout share L1 sets
// and miss), and the last pass adds the bias and writes bf16 rows of the output (M, N). While a weight block
// computes, the next one is prefetched from memory (the tiles' 16 strided rows defeat the hardware
// prefetcher). oneDNN runs these shapes (128-1152 pixels, K of 5,760-23,040) at 1.0-1.5 TFLOP/s on the AMX
// machine; this runs them at 1.4-2.2; past ~1,500 pixels oneDNN's own convolution is faster
// (docs/performance.md).
//
// The same loop serves a GEGLU (sdlab.models.cpu_linear): x's rows are the patches of a 1 x 1 "convolution",
// each block takes 16 rows of the weight's first half (a) and the same 16 of its second (the gate), and
// (a + b_a) * gelu(gate + b_g) is formed from the fp32 sums before the one bf16 write.
// And a linear layer over few tokens (linear_bf16): x's rows as the patches again, with the residual that
// follows it in a transformer block added before the one rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <type_traits>

#include "amx.h"

#ifdef SDLAB_AMX
#include "simd.h"

constexpr int64_t KC = 256;       // K per pass: the weight's 32 x KC block stays in L1 across the pixel blocks
constexpr int64_t PIXELS = 512;   // output pixels per product: their patches and fp32 sums stay in L2

// patches in tile order: packed[g][K/2][16] (uint32 = a pair of bf16 channels) for pixel groups g of 16;
// K runs over (dy, dx, c). Pixels past M and taps in the zero padding are 0.
static void gather_patches(const uint32_t* x, int64_t B, int64_t H, int64_t W, int64_t C2, int64_t k,
                           int64_t stride, int64_t pad, int64_t OH, int64_t OW, int64_t first, int64_t groups,
                           uint32_t* packed) {
    const int64_t M = B * OH * OW, K2 = k * k * C2;
    at::parallel_for(first, first + groups, 1, [&](int64_t g0, int64_t g1) {
        alignas(64) int32_t offset[16];
        for (int64_t g = g0; g < g1; ++g) {
            uint32_t* dst = packed + (g - first) * K2 * 16;
            for (int64_t dy = 0; dy < k; ++dy)
                for (int64_t dx = 0; dx < k; ++dx) {
                    __mmask16 valid = 0;
                    for (int i = 0; i < 16; ++i) {
                        const int64_t m = g * 16 + i, b = m / (OH * OW), oy = m / OW % OH, ox = m % OW;
                        const int64_t iy = oy * stride + dy - pad, ix = ox * stride + dx - pad;
                        const bool inside = m < M && iy >= 0 && iy < H && ix >= 0 && ix < W;
                        offset[i] = inside ? (int32_t)(((b * H + iy) * W + ix) * C2) : 0;
                        valid |= (__mmask16)(inside ? 1u << i : 0u);
                    }
                    const __m512i idx = _mm512_load_si512(offset);
                    uint32_t* row = dst + (dy * k + dx) * C2 * 16;
                    for (int64_t j = 0; j < C2; ++j)   // one 64-byte row: channel pair j of the 16 pixels
                        _mm512_storeu_si512(row + j * 16, _mm512_mask_i32gather_epi32(
                            _mm512_setzero_si512(), valid, idx, reinterpret_cast<const int*>(x + j), 4));
                }
        }
    });
}

// Within each 128-bit lane, a 4 x 4 transposition of 32-bit words across four registers: word i of that lane
// of out[j] <- word j of it in v[i] (its own inverse).
static inline void transpose_4x4(const __m512i v[4], __m512i out[4]) {
    const __m512i a0 = _mm512_unpacklo_epi32(v[0], v[1]), a1 = _mm512_unpackhi_epi32(v[0], v[1]);
    const __m512i a2 = _mm512_unpacklo_epi32(v[2], v[3]), a3 = _mm512_unpackhi_epi32(v[2], v[3]);
    out[0] = _mm512_unpacklo_epi64(a0, a2);
    out[1] = _mm512_unpackhi_epi64(a0, a2);
    out[2] = _mm512_unpacklo_epi64(a1, a3);
    out[3] = _mm512_unpackhi_epi64(a1, a3);
}

// 16 pixels' rows of 16 bf16 channels (rows N apart; the first n are read, the rest count as 0) as channel
// pairs: o[j], lane p: channels (2j, 2j + 1) of pixel p. The inverse of write_tile's transposition.
static inline void load_pairs(const uint16_t* rows, int64_t N, int64_t n, __m512i o[8]) {
    auto row = [&](int64_t p) { return _mm256_maskz_loadu_epi32(p < n ? (__mmask8)0xFF : (__mmask8)0, rows + p * N); };
    const __m512i lo = _mm512_set_epi64(13, 12, 9, 8, 5, 4, 1, 0), hi = _mm512_set_epi64(15, 14, 11, 10, 7, 6, 3, 2);
    __m512i u[8];   // u[h * 4 + i], 128-bit lane l: channel pairs 4h..4h+3 of pixel 4l + i
    for (int i = 0; i < 4; ++i) {
        const __m512i r01 = _mm512_inserti64x4(_mm512_castsi256_si512(row(i)), row(4 + i), 1);
        const __m512i r23 = _mm512_inserti64x4(_mm512_castsi256_si512(row(8 + i)), row(12 + i), 1);
        u[i] = _mm512_permutex2var_epi64(r01, lo, r23);
        u[4 + i] = _mm512_permutex2var_epi64(r01, hi, r23);
    }
    transpose_4x4(u, o);
    transpose_4x4(u + 4, o + 4);
}

// A 16 (channels) x 16 (pixels) fp32 tile plus the channels' bias, and plus `other` where given (bf16 rows laid
// out as the output's: a residual added before the one rounding), as bf16 rows of the output: out[p][n].
// Transposed in registers: channel pairs rounded to bf16 and interleaved into one 32-bit lane per pixel, then
// two unpack stages bring each pixel's 8 pairs into one 128-bit lane of two registers, and one two-source
// permute puts two pixels' rows into one register.
static void write_tile(const float* tile, const uint16_t* bias, const uint16_t* other, uint16_t* out, int64_t N,
                       int64_t pixels) {
    alignas(64) float b[16] = {};
    if (bias) _mm512_store_ps(b, load_bf16(bias, 0xFFFF));
    __m512i o[8];   // other's channel pairs (load_pairs): bf16 channel 2j in the low half of a lane, 2j + 1 high
    if (other) load_pairs(other, N, std::min<int64_t>(16, pixels), o);
    // word 2p <- word p (channel c, pixel p), word 2p + 1 <- word 16 + p (channel c + 1, pixel p)
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512i w[8];   // w[j], lane p: channels (2j, 2j + 1) of pixel p
    for (int j = 0; j < 8; ++j) {
        __m512 r0 = _mm512_add_ps(_mm512_load_ps(tile + 32 * j), _mm512_set1_ps(b[2 * j]));
        __m512 r1 = _mm512_add_ps(_mm512_load_ps(tile + 32 * j + 16), _mm512_set1_ps(b[2 * j + 1]));
        if (other) {
            r0 = _mm512_add_ps(r0, _mm512_castsi512_ps(_mm512_slli_epi32(o[j], 16)));
            r1 = _mm512_add_ps(r1, _mm512_castsi512_ps(_mm512_and_si512(o[j], _mm512_set1_epi32((int)0xFFFF0000u))));
        }
        w[j] = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(r1, r0));
    }
    __m512i u[8];   // u[h * 4 + i], 128-bit lane l: channel pairs 4h..4h+3 of pixel 4l + i
    transpose_4x4(w, u);
    transpose_4x4(w + 4, u + 4);
    // pixel 4l + i = lane l of u[i] then lane l of u[4 + i]: two pixels' 32-byte rows per permute
    const __m512i lanes01 = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), lanes23 = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    const int64_t n = std::min<int64_t>(16, pixels);
    for (int i = 0; i < 4; ++i) {
        const __m512i r01 = _mm512_permutex2var_epi64(u[i], lanes01, u[4 + i]);
        const __m512i r23 = _mm512_permutex2var_epi64(u[i], lanes23, u[4 + i]);
        if (i < n) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * N), _mm512_castsi512_si256(r01));
        if (4 + i < n) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (4 + i) * N), _mm512_extracti64x4_epi64(r01, 1));
        if (8 + i < n) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (8 + i) * N), _mm512_castsi512_si256(r23));
        if (12 + i < n) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (12 + i) * N), _mm512_extracti64x4_epi64(r23, 1));
    }
}

// The 32 rows of A (the weight) a block takes: rows [nb * step, + 16) and the 16 rows `second` rows on; a
// convolution's block is 32 consecutive channels (step 32, second 16), a GEGLU's the same 16 channels of its
// two halves (step 16, second = the half's width).
struct Rows {
    int64_t step, second;
};

// A GEGLU block's epilogue, done in slices while the next block's tile products run (the tiles multiply on
// their own unit; vector work issued between them overlaps): tiles 0, 1 hold a's 16 channels x pixels 0-15,
// 16-31, tiles 2, 3 the gate's; each unit of work forms one channel row, a <- (a + b_a) * gelu(gate + b_g),
// or writes a finished 16 x 16 tile (units 16 and 33).
struct GatedEpilogue {
    static constexpr int UNITS = 34;
    alignas(64) float tile[4][256];
    alignas(64) float ba[16], bg[16];
    uint16_t* out = nullptr;
    int64_t N = 0, pixels = 0;
    int next = UNITS;

    // the tiles 0-3 of the block that just finished, for output rows out[0..pixels) x 16 channels
    void start(const uint16_t* bias_a, const uint16_t* bias_g, uint16_t* out_, int64_t N_, int64_t pixels_) {
        finish();
        _tile_stored(0, tile[0], 64); _tile_stored(1, tile[1], 64);
        _tile_stored(2, tile[2], 64); _tile_stored(3, tile[3], 64);
        _mm512_store_ps(ba, bias_a ? load_bf16(bias_a, 0xFFFF) : _mm512_setzero_ps());
        _mm512_store_ps(bg, bias_g ? load_bf16(bias_g, 0xFFFF) : _mm512_setzero_ps());
        out = out_, N = N_, pixels = pixels_, next = 0;
    }
    void step(int units) {
        for (; units > 0 && next < UNITS; --units, ++next) {
            const int t = next / 17, c = next % 17;
            if (c == 16) {
                write_tile(tile[t], nullptr, nullptr, out + t * 16 * N, N, pixels - t * 16);
                continue;
            }
            const __m512 va = _mm512_add_ps(_mm512_load_ps(tile[t] + c * 16), _mm512_set1_ps(ba[c]));
            const __m512 vg = _mm512_add_ps(_mm512_load_ps(tile[t + 2] + c * 16), _mm512_set1_ps(bg[c]));
            _mm512_store_ps(tile[t] + c * 16, _mm512_mul_ps(va, gelu_ps(vg)));
        }
    }
    void finish() { step(UNITS); }
};

// out (M, N) = patches @ W^T + bias (+ other, an (M, N) residual, where given), or for a GEGLU (gated) out (M, N) = (patches @ W_a^T + b_a) *
// gelu(patches @ W_g^T + b_g) with W = [W_a; W_g]. W: rows of K bf16, K a multiple of 32, `blocks` blocks
// of 32 rows (`rows`); packed: (Mp/16, K/2, 16, 2). Passes of kc over K; S: the fp32 sums between passes,
// per 32 x 32 block (row block, pixel block) 4 tiles of 16 x 16 (unused when kc = K).
template <bool gated>
static void product(const uint16_t* W, const uint16_t* packed, const uint16_t* bias, const uint16_t* other, uint16_t* out, float* S,
                    int64_t M, int64_t Mp, int64_t blocks, int64_t N, int64_t K, int64_t kc, Rows rows) {
    at::parallel_for(0, blocks, 1, [&](int64_t nb0, int64_t nb1) {
        configure_full_tiles();
        alignas(64) float tile[4][256];
        std::conditional_t<gated, GatedEpilogue, char> pending;   // gated: the previous block's epilogue
        const int slice = (GatedEpilogue::UNITS + (int)(kc / 32) - 1) / (int)(kc / 32);   // units per K step
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
            const int64_t k1 = std::min(K, k0 + kc);
            for (int64_t nb = nb0; nb < nb1; ++nb) {
                const uint16_t* a = W + nb * rows.step * K;          // rows 0-15 of the block; 16-31 at a + second * K
                // the weight block after this one (the next rows, or this thread's first at the next K)
                // is fetched from memory into L2 while this one computes: 32 rows x (k1 - k0) in 64-byte lines
                const bool wraps = nb + 1 == nb1;
                const char* ahead = reinterpret_cast<const char*>(W + (wraps ? nb0 : nb + 1) * rows.step * K + (wraps ? k1 : k0));
                const int64_t row_lines = wraps ? (std::min(K, k1 + kc) - k1) / 32 : (k1 - k0) / 32;
                const int64_t lines = 32 * row_lines, steps = Mp / 32 * ((k1 - k0) / 32);
                const int64_t per_step = (lines + steps - 1) / std::max<int64_t>(steps, 1);
                int64_t line = 0;
                for (int64_t p0 = 0; p0 < Mp; p0 += 32) {
                    float* s = S ? S + (nb * (Mp / 32) + p0 / 32) * 1024 : nullptr;
                    if (k0 == 0) { _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); }
                    else { _tile_loadd(0, s, 64); _tile_loadd(1, s + 256, 64); _tile_loadd(2, s + 512, 64); _tile_loadd(3, s + 768, 64); }
                    const uint16_t* b = packed + (p0 / 16) * K * 16;  // pixels p0..p0+15; the next 16 at + K * 16
                    for (int64_t k = k0; k < k1; k += 32) {
                        for (int64_t i = 0; i < per_step && line < lines; ++i, ++line) {
                            const int64_t r = line / row_lines;
                            _mm_prefetch(ahead + ((r / 16) * rows.second + r % 16) * K * 2 + (line % row_lines) * 64, _MM_HINT_T1);
                        }
                        _tile_loadd(4, a + k, K * 2);                 // rows 0-15 x 32 K
                        _tile_loadd(6, b + k * 16, 64);               // 32 K x pixels 0-15
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_loadd(7, b + K * 16 + k * 16, 64);      // 32 K x pixels 16-31
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_loadd(5, a + rows.second * K + k, K * 2);   // rows 16-31 x 32 K
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                        if constexpr (gated) pending.step(slice);
                    }
                    if (k1 < K) {
                        _tile_stored(0, s, 64); _tile_stored(1, s + 256, 64); _tile_stored(2, s + 512, 64); _tile_stored(3, s + 768, 64);
                        continue;
                    }
                    if constexpr (gated) {
                        const int64_t n = nb * 16;
                        pending.start(bias ? bias + n : nullptr, bias ? bias + N + n : nullptr, out + p0 * N + n, N, M - p0);
                    } else {
                        _tile_stored(0, tile[0], 64); _tile_stored(1, tile[1], 64);
                        _tile_stored(2, tile[2], 64); _tile_stored(3, tile[3], 64);
                        const int64_t n0 = nb * 32;
                        for (int t = 0; t < 4; ++t) {
                            const int64_t n = n0 + (t / 2) * 16, p = p0 + (t % 2) * 16;
                            write_tile(tile[t], bias ? bias + n : nullptr, other ? other + p * N + n : nullptr, out + p * N + n, N, M - p);
                        }
                    }
                }
            }
        }
        if constexpr (gated) pending.finish();
        _tile_release();
    });
}

// Runs run(first, last, rows) over groups of `rows` <= PIXELS output rows (Mp a multiple of 32). By thread,
// with a group for each thread or more, each thread takes whole groups, of a size that gives every thread as
// many, in one parallel region (its gathers and products run inline there: the whole weight streams through
// each thread's L2); otherwise the groups go one at a time and the threads share each one's weight blocks.
// A GEGLU gains by thread (8,192 x 640 -> 2 x 2,560: 38.7 -> 27.9 ms); a convolution's larger weight loses
// (2,048 pixels x 11,520 -> 1,280: 28.7 -> 36.3 ms).
template <class Run>
static void over_row_groups(int64_t Mp, bool by_thread, Run run) {
    const int64_t threads = at::get_num_threads();
    int64_t rows = std::min(Mp, PIXELS), groups = (Mp + rows - 1) / rows;
    if (!by_thread || groups < threads) {
        run(0, groups, rows);
        return;
    }
    groups = (groups + threads - 1) / threads * threads;
    rows = ((Mp + groups - 1) / groups + 31) / 32 * 32;
    groups = (Mp + rows - 1) / rows;
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) { run(g0, g1, rows); });
}
#endif

// Refuses the call where the tiles cannot run (`product`: the name in the message).
static void require_amx(const char* product) {
#ifdef SDLAB_AMX
    TORCH_CHECK(amx_permitted(), "the ", product, " needs the AMX tiles");
#else
    TORCH_CHECK(false, "the ", product, " needs the AMX tiles (this build has none)");
#endif
}

// An optional contiguous bf16 operand of `numel` values (a bias, a residual): its data, or nullptr where absent.
static const uint16_t* optional_bf16(const c10::optional<at::Tensor>& t, int64_t numel, const char* message) {
    if (!t.has_value() || !t->defined()) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->numel() == numel && t->is_contiguous(), message);
    return reinterpret_cast<const uint16_t*>(t->data_ptr<at::BFloat16>());
}

#ifdef SDLAB_AMX
// Rows p0 .. p0 + rows of x (M, K) in tile order, as gather_patches lays out patches: x as a 1 x M image of K
// channels, whose 1 x 1 "patches" are its rows.
static void gather_rows(const at::Tensor& x, int64_t p0, int64_t rows, at::Tensor& packed) {
    const int64_t M = x.size(0), K = x.size(1);
    gather_patches(reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>()), 1, 1, M, K / 2, 1, 1, 0, 1, M,
                   p0 / 16, rows / 16, reinterpret_cast<uint32_t*>(packed.data_ptr<at::BFloat16>()));
}
#endif

// x: (B, C_in, H, W) bf16 channels-last; weight: (C_out, K) bf16 with K = k*k*C_in over (dy, dx, c) (a
// channels-last (C_out, C_in, k, k) weight's memory); bias: (C_out,) bf16 or undefined. Zero padding `pad`,
// stride `stride`. Returns the (B, OH, OW, C_out) bf16 output. K and C_out must be multiples of 32.
at::Tensor patch_product_bf16(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, int64_t k,
                              int64_t stride, int64_t pad) {
    require_amx("patch product");
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
                "x must be a channels-last (B, C, H, W) bf16 tensor");
    const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), N = weight.size(0), K = k * k * C;
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 2 && weight.is_contiguous()
                && weight.size(1) == K, "weight must be a contiguous (C_out, k*k*C_in) bf16 tensor");
    TORCH_CHECK(K % 32 == 0 && N % 32 == 0 && C % 2 == 0, "k*k*C_in and C_out must be multiples of 32");
    TORCH_CHECK(k >= 1 && stride >= 1 && pad >= 0 && H + 2 * pad >= k && W + 2 * pad >= k, "bad convolution");
    const uint16_t* bias_data = optional_bf16(bias, N, "bias must be (C_out,) bf16");
    const int64_t OH = (H + 2 * pad - k) / stride + 1, OW = (W + 2 * pad - k) / stride + 1, M = B * OH * OW;
    TORCH_CHECK(B * H * W * C / 2 < (int64_t(1) << 31), "x is too large for the patch product");
    auto out = at::empty({B, OH, OW, N}, x.options());
#ifdef SDLAB_AMX
    // groups of output pixels: their patches in tile order, then their product
    const int64_t Mp = (M + 31) / 32 * 32;
    uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    over_row_groups(Mp, false, [&](int64_t first, int64_t last, int64_t Gp) {
        auto packed = at::empty({Gp / 16, K / 2, 16, 2}, x.options());
        auto sums = at::empty({N, Gp}, x.options().dtype(at::kFloat));
        for (int64_t g = first; g < last; ++g) {
            const int64_t p0 = g * Gp, gp = std::min(Gp, Mp - p0);
            gather_patches(reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>()), B, H, W, C / 2, k, stride, pad,
                           OH, OW, p0 / 16, gp / 16, reinterpret_cast<uint32_t*>(packed.data_ptr<at::BFloat16>()));
            product<false>(reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()),
                           reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()), bias_data, nullptr, o + p0 * N,
                           sums.data_ptr<float>(), std::min(gp, M - p0), gp, N / 32, N, K, KC, Rows{32, 16});
        }
    });
#endif
    return out;
}

// The gated GELU of a linear layer's two output halves (GEGLU): x: (M, K) bf16 rows (contiguous), weight:
// (2N, K) bf16 = [W_a; W_g], bias: (2N,) bf16 or undefined. Returns (M, N) bf16
// (x W_a^T + b_a) * gelu(x W_g^T + b_g), rounded once. K must be a multiple of 32 and N of 16.
at::Tensor geglu_bf16(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias) {
    require_amx("GEGLU product");
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) bf16 tensor");
    const int64_t M = x.size(0), K = x.size(1), N = weight.size(0) / 2;
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 2 && weight.is_contiguous()
                && weight.size(1) == K && weight.size(0) % 2 == 0, "weight must be a contiguous (2N, K) bf16 tensor");
    TORCH_CHECK(K % 32 == 0 && N % 16 == 0 && N > 0 && M > 0, "K must be a multiple of 32 and N of 16");
    TORCH_CHECK(M * K / 2 < (int64_t(1) << 31), "x is too large for the GEGLU product");
    const uint16_t* bias_data = optional_bf16(bias, 2 * N, "bias must be (2N,) bf16");
    auto out = at::empty({M, N}, x.options());
#ifdef SDLAB_AMX
    // groups of rows: x's rows in tile order (gather_rows), then their product
    const int64_t Mp = (M + 31) / 32 * 32;
    uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    over_row_groups(Mp, true, [&](int64_t first, int64_t last, int64_t Gp) {
        auto packed = at::empty({Gp / 16, K / 2, 16, 2}, x.options());
        for (int64_t g = first; g < last; ++g) {
            const int64_t p0 = g * Gp, gp = std::min(Gp, Mp - p0);
            gather_rows(x, p0, gp, packed);
            product<true>(reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()),
                          reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()), bias_data, nullptr, o + p0 * N,
                          nullptr, std::min(gp, M - p0), gp, N / 16, N, K, K, Rows{16, N});
        }
    });
#endif
    return out;
}

// A linear layer over few rows: x: (M, K) bf16 rows (contiguous), weight: (N, K) bf16 (contiguous), bias: (N,)
// bf16 or undefined, other: (M, N) bf16 (contiguous) or undefined. Returns (M, N) bf16 x W^T + bias + other,
// rounded once. K and N must be multiples of 32. Up to K = 1,280 each block's sums stay on the tiles for the
// whole of K (no partial sums through memory: SD1.5's 512 x 1,280 -> 1,280 0.92 -> 0.85 ms against oneDNN,
// 1.29 -> 1.07 ms in the step); deeper ones take passes of 1,280 (512 x 5,120 -> 1,280 3.84 -> 3.52 ms
// isolated against 256-deep passes, oneDNN 3.78; no difference in the step, so cpu_linear keeps them on oneDNN).
at::Tensor linear_bf16(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, c10::optional<at::Tensor> other) {
    require_amx("linear product");
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) bf16 tensor");
    const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == K,
                "weight must be a contiguous (N, K) bf16 tensor");
    TORCH_CHECK(K % 32 == 0 && N % 32 == 0 && N > 0 && M > 0, "K and N must be multiples of 32");
    TORCH_CHECK(M * K / 2 < (int64_t(1) << 31), "x is too large for the linear product");
    const uint16_t* bias_data = optional_bf16(bias, N, "bias must be (N,) bf16");
    TORCH_CHECK(!other.has_value() || !other->defined() || (other->dim() == 2 && other->size(0) == M),
                "other must be a contiguous (M, N) bf16 tensor");
    const uint16_t* other_data = optional_bf16(other, M * N, "other must be a contiguous (M, N) bf16 tensor");
    auto out = at::empty({M, N}, x.options());
#ifdef SDLAB_AMX
    const int64_t Mp = (M + 31) / 32 * 32, kc = std::min<int64_t>(K, 1280);
    uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    over_row_groups(Mp, false, [&](int64_t first, int64_t last, int64_t Gp) {
        auto packed = at::empty({Gp / 16, K / 2, 16, 2}, x.options());
        auto sums = at::empty({kc < K ? N : 0, Gp}, x.options().dtype(at::kFloat));
        for (int64_t g = first; g < last; ++g) {
            const int64_t p0 = g * Gp, gp = std::min(Gp, Mp - p0);
            gather_rows(x, p0, gp, packed);
            product<false>(reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()),
                           reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()), bias_data,
                           other_data ? other_data + p0 * N : nullptr, o + p0 * N, kc < K ? sums.data_ptr<float>() : nullptr,
                           std::min(gp, M - p0), gp, N / 32, N, K, kc, Rows{32, 16});
        }
    });
#endif
    return out;
}
