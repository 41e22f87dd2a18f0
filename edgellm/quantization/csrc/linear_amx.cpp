// The int8 product on AMX tiles (Intel Sapphire Rapids and later) for products of 8 rows or more (prefill,
// and decode steps of 8 or more sequences) with 8-bit activations and 4-bit (fmt 4) or 8-bit (fmt 8) codes.
//
// Tiles: C0..C3 (tmm0-3) hold the int32 sums of two h-row activation tiles (h = 16, or 8 for products of
// 8-15 rows) against two 16-row weight blocks, A0/A1 (tmm4-5) h activation rows x kc bytes, B0/B1 (tmm6-7)
// kc/4 rows of (16 weight rows x 4 codes): exactly the packed layout's 64-byte chunks (fmt 8 in place; fmt 4
// once each chunk's low and high nibbles are split into two rows). Per group: zero C, tdpbsud (signed
// activations x unsigned codes) over the group's kc-byte chunks, store C, then the AVX-512 kernels' own
// float epilogue (correction + sum, times weight scale times activation scale, fma into the row's sum), so
// results equal theirs bit for bit (integer sums are exact in any order). Rows past the last full tile and
// an odd last block go to the AVX-512 kernels.
//
// The tile code is a template over the tile operations: HwTiles (the CPU's, inline asm, so no compiler
// flag is needed) or EmuTiles (the same operations in C: the kernel's logic runs and is tested on any
// AVX-512 CPU). Nothing here runs on its own: quantization/amx.py turns the hardware mode on only after
// el_amx_selftest(1) has matched the AVX-512 kernels in a child process on this machine, and only from the
// row count where el_amx_time found the tiles faster (amx_check.cpp).
#include "avx512.h"

static std::atomic<int> g_amx{0};
#define AMX_MIN_ROWS 8  // the shortest row tile the kernel makes
static std::atomic<int> g_min_rows{16};  // the fewest rows a product needs to go to tiles
static std::atomic<long> g_tile_products{0};  // products with rows on tiles (the tests' evidence that they were)
int amx_mode() { return g_amx.load(std::memory_order_relaxed); }
EL_API long el_amx_products() { return g_tile_products.load(std::memory_order_relaxed); }
// products of fewer than `rows` rows (at least AMX_MIN_ROWS) stay on the AVX-512 kernels (quantization/amx.py
// sets this from the timing: where the tiles were not faster); returns the threshold before (rows <= 0: only
// that)
EL_API int el_amx_min_rows(int rows) {
    if (rows <= 0) return g_min_rows.load(std::memory_order_relaxed);
    return g_min_rows.exchange(rows < AMX_MIN_ROWS ? AMX_MIN_ROWS : rows, std::memory_order_relaxed);
}

#if EL_VNNI
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

struct TileCfg {  // ldtilecfg's 64-byte operand (palette 1)
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};
static_assert(sizeof(TileCfg) == 64, "the tile configuration is 64 bytes");

// kc: the bytes of a group each tdpbsud covers (the group size, at most 64)
static inline int chunk_bytes(const ELinear& L) { return L.gs < 64 ? L.gs : 64; }

bool amx_fits(const ELinear& L, int M) {
    if (M < g_min_rows.load(std::memory_order_relaxed) || amx_mode() == 0 || (L.fmt != 4 && L.fmt != 8) || L.abits != 8) return false;
    const int kc = chunk_bytes(L);
    return kc >= 8 && kc % 8 == 0 && L.gs % kc == 0 && L.Kp % L.gs == 0;
}

// h: rows of the activation and sum tiles (16 or 8)
static TileCfg tile_config(int kc, int h) {
    TileCfg c{};
    c.palette = 1;
    for (int t = 0; t < 8; ++t) {
        c.rows[t] = t < 6 ? (uint8_t)h : (uint8_t)(kc / 4);
        c.colsb[t] = t >= 4 && t < 6 ? (uint16_t)kc : 64;
    }
    return c;
}

// tile numbers: C = 0..3 (2 * row tile + block), A = 4 + row tile, B = 6 + block
#define EL_TZ(n) __asm__ volatile("tilezero %%tmm" #n ::)
#define EL_TL(n) __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #n ::"r"(p), "r"(stride) : "memory")
#define EL_TS(n) __asm__ volatile("tilestored %%tmm" #n ", (%0,%1,1)" ::"r"(p), "r"(stride) : "memory")
// AT&T operand order: B, A, C
#define EL_TDP(c, a, b) __asm__ volatile("tdpbsud %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)

struct HwTiles {
    static void config(const TileCfg& c) { __asm__ volatile("ldtilecfg %0" ::"m"(c)); }
    static void release() { __asm__ volatile("tilerelease" ::); }
    static void zero(int t) {
        switch (t) {
            case 0: EL_TZ(0); break;
            case 1: EL_TZ(1); break;
            case 2: EL_TZ(2); break;
            default: EL_TZ(3); break;
        }
    }
    static void load(int t, const void* p, long stride) {
        switch (t) {
            case 4: EL_TL(4); break;
            case 5: EL_TL(5); break;
            case 6: EL_TL(6); break;
            default: EL_TL(7); break;
        }
    }
    static void store(int t, void* p, long stride) {
        switch (t) {
            case 0: EL_TS(0); break;
            case 1: EL_TS(1); break;
            case 2: EL_TS(2); break;
            default: EL_TS(3); break;
        }
    }
    static void dp(int c) {  // C_c += A_(c / 2) . B_(c % 2)
        switch (c) {
            case 0: EL_TDP(0, 4, 6); break;
            case 1: EL_TDP(1, 4, 7); break;
            case 2: EL_TDP(2, 5, 6); break;
            default: EL_TDP(3, 5, 7); break;
        }
    }
};

// The same operations on a thread's eight 1 KB tiles in memory, as the Intel SDM defines them
// (rows and bytes per row from the configuration; a load zeroes the bytes past them).
struct EmuTiles {
    struct State {
        TileCfg cfg;
        alignas(64) uint8_t t[8][16][64];
    };
    static State& st() {
        static thread_local State s;
        return s;
    }
    static void config(const TileCfg& c) {
        st().cfg = c;
        memset(st().t, 0, sizeof(st().t));
    }
    static void release() {}
    static void zero(int t) { memset(st().t[t], 0, sizeof(st().t[t])); }
    static void load(int t, const void* p, long stride) {
        State& S = st();
        memset(S.t[t], 0, sizeof(S.t[t]));
        for (int r = 0; r < S.cfg.rows[t]; ++r) memcpy(S.t[t][r], (const uint8_t*)p + r * stride, S.cfg.colsb[t]);
    }
    static void store(int t, void* p, long stride) {
        State& S = st();
        for (int r = 0; r < S.cfg.rows[t]; ++r) memcpy((uint8_t*)p + r * stride, S.t[t][r], S.cfg.colsb[t]);
    }
    static void dp(int c) {  // tdpbsud: C[m][n] += sum over k, i < 4 of signed A[m][4k+i] * unsigned B[k][4n+i]
        State& S = st();
        const int a = 4 + c / 2, b = 6 + c % 2;
        for (int m = 0; m < S.cfg.rows[c]; ++m)
            for (int n = 0; n < S.cfg.colsb[c] / 4; ++n) {
                int32_t acc;
                memcpy(&acc, &S.t[c][m][4 * n], 4);
                for (int k = 0; k < S.cfg.colsb[a] / 4; ++k)
                    for (int i = 0; i < 4; ++i)
                        acc += (int32_t)(int8_t)S.t[a][m][4 * k + i] * (int32_t)S.t[b][k][4 * n + i];
                memcpy(&S.t[c][m][4 * n], &acc, 4);
            }
    }
};

// Row block rb's codes as B rows ([Kp / 4][64]: row k/4 = 4 codes of each of the 16 weight rows): fmt 8
// in place; fmt 4 into buf, each 64-byte chunk (8 codes a row) split into its low and high nibbles.
static const uint8_t* block_rows(const ELinear& L, int rb, uint8_t* buf) {
    if (L.fmt == 8) return L.w + (size_t)rb * L.Kp * 16;
    const uint8_t* w = L.w + (size_t)rb * L.Kp * 8;
    const __m512i mask = _mm512_set1_epi8(0x0F);
    for (int p = 0; p < L.Kp / 8; ++p) {
        const __m512i v = _mm512_loadu_si512(w + (size_t)p * 64);
        _mm512_store_si512(buf + (size_t)p * 128, _mm512_and_si512(v, mask));
        _mm512_store_si512(buf + (size_t)p * 128 + 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), mask));
    }
    return buf;
}

// activation rows m0 .. m0 + h nt - 1 (nt = 1 or 2 row tiles of h = 16 or 8 rows) against row blocks
// rb .. rb + nb - 1
template <class T>
static void tile_rows(const ELinear& L, const EAct& A, int m0, int nt, int h, int rb, int nb,
                      const uint8_t* const* B, float* y, int ldy) {
    const int G = L.G, Kp = L.Kp, gs = L.gs, kc = chunk_bytes(L);
    alignas(64) float acc[2][16][2][16];  // [row tile][row][block][16 weight rows]
    alignas(64) int32_t c[4][16][16];
    memset(acc, 0, sizeof(acc));
    for (int g = 0; g < G; ++g) {
        for (int r = 0; r < nt; ++r)
            for (int b = 0; b < nb; ++b) T::zero(2 * r + b);
        for (int k0 = g * gs; k0 < (g + 1) * gs; k0 += kc) {
            for (int r = 0; r < nt; ++r) T::load(4 + r, A.planes + (size_t)(m0 + h * r) * Kp + k0, Kp);
            for (int b = 0; b < nb; ++b) T::load(6 + b, B[b] + (size_t)k0 / 4 * 64, 64);
            for (int r = 0; r < nt; ++r)
                for (int b = 0; b < nb; ++b) T::dp(2 * r + b);
        }
        for (int r = 0; r < nt; ++r)
            for (int b = 0; b < nb; ++b) T::store(2 * r + b, c[2 * r + b], 64);
        const __m512 s0 = load_scales(L, rb, g), s1 = nb > 1 ? load_scales(L, rb + 1, g) : s0;
        for (int r = 0; r < nt; ++r)
            for (int i = 0; i < h; ++i) {
                const size_t mg = (size_t)(m0 + h * r + i) * G + g;
                const __m512i corr = _mm512_set1_epi32(A.corr[mg]);
                const __m512 sa = _mm512_set1_ps(A.gsc[mg]);
                for (int b = 0; b < nb; ++b) {
                    const __m512i d = _mm512_add_epi32(corr, _mm512_load_si512(c[2 * r + b][i]));
                    _mm512_store_ps(acc[r][i][b], _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(b ? s1 : s0, sa),
                                                                  _mm512_load_ps(acc[r][i][b])));
                }
            }
    }
    for (int r = 0; r < nt; ++r)
        for (int i = 0; i < h; ++i)
            for (int b = 0; b < nb; ++b)
                store_block(L, rb + b, _mm512_load_ps(acc[r][i][b]), y + (size_t)(m0 + h * r + i) * ldy);
}

// a thread's buffer of at least n bytes, 64-aligned (grown as needed, kept for the thread's life)
static uint8_t* thread_buffer(size_t n) {
    static thread_local uint8_t* buf = nullptr;
    static thread_local size_t cap = 0;
    if (n > cap) {
        free(buf);
        cap = (n + 63) / 64 * 64;
        buf = (uint8_t*)aligned_alloc(64, cap);
    }
    return buf;
}

template <class T>
static void gemv_tiles(const ELinear& L, const EAct& A, int M, float* y, int ldy) {
    // row tiles of 16, or of 8 for 8-15 rows (a decode step of 8+ sequences); the rest to the AVX-512 kernels
    const int h = M >= 16 ? 16 : AMX_MIN_ROWS, Mh = M / h * h;
    const int Nb = (L.N + 15) / 16, pairs = (Nb + 1) / 2;
    const size_t rows_bytes = (size_t)L.Kp / 4 * 64;  // one block's B rows
    uint8_t* buf = L.fmt == 4 ? thread_buffer(2 * rows_bytes) : nullptr;
    if (Mh > 0 && omp_get_thread_num() == 0) g_tile_products.fetch_add(1, std::memory_order_relaxed);
    bool configured = false;
#pragma omp for schedule(static) nowait
    for (int i = 0; i < pairs; ++i) {
        if (!configured) {
            T::config(tile_config(chunk_bytes(L), h));
            configured = true;
        }
        const int rb = 2 * i, nb = rb + 1 < Nb ? 2 : 1;
        const uint8_t* B[2] = {nullptr, nullptr};
        for (int b = 0; b < nb; ++b) B[b] = block_rows(L, rb + b, buf ? buf + b * rows_bytes : nullptr);
        int m = 0;
        for (; m + 2 * h <= Mh; m += 2 * h) tile_rows<T>(L, A, m, 2, h, rb, nb, B, y, ldy);
        if (m < Mh) tile_rows<T>(L, A, m, 1, h, rb, nb, B, y, ldy);
        if (Mh < M) avx512_rows(L, A, Mh, M, rb, nb, y, ldy);
    }
    if (configured) T::release();
}

void gemv_amx(const ELinear& L, const EAct& A, int M, float* y, int ldy) {
    if (amx_mode() == 1)
        gemv_tiles<HwTiles>(L, A, M, y, ldy);
    else
        gemv_tiles<EmuTiles>(L, A, M, y, ldy);
}

// 1 when the CPU has AMX-TILE and AMX-INT8 (cpuid leaf 7: edx bits 24 and 25)
EL_API int el_amx_cpu() {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (d >> 24 & 1) && (d >> 25 & 1);
}

// mode 0: off; 1: the CPU's tiles (Linux must first grant the process the tile state); 2: emulated.
// 0 when set, -1 when the mode is unavailable here (the mode is then unchanged).
EL_API int el_amx_set(int mode) {
    if (mode == 1) {
        const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        if (!el_amx_cpu() || syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return -1;
    } else if (mode != 0 && mode != 2) {
        return -1;
    }
    g_amx.store(mode, std::memory_order_relaxed);
    return 0;
}

#else
bool amx_fits(const ELinear&, int) { return false; }
void gemv_amx(const ELinear&, const EAct&, int, float*, int) {}
EL_API int el_amx_cpu() { return 0; }
EL_API int el_amx_set(int mode) { return mode == 0 ? 0 : -1; }
#endif

EL_API int el_amx_mode() { return amx_mode(); }
