// AMX set-up shared by sdlab's CPU kernels: compiled where the compiler targets AMX (-march=native on
// Sapphire Rapids and later).
#pragma once
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdint>
#define SDLAB_AMX 1

// Linux hands a process the AMX tile state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA);
// without it the first tile instruction faults. Asked once; false where the kernel refuses.
static inline bool amx_permitted() {
    static const bool permitted = [] {
        constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }();
    return permitted;
}

struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// All eight tiles as 16 rows x 64 bytes (16 x 32 bf16, or 16 x 16 fp32) for this thread, until _tile_release.
static inline void configure_full_tiles() {
    TileConfig cfg;
    for (int i = 0; i < 8; ++i) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
    _tile_loadconfig(&cfg);
}
#endif
