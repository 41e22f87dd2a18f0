// The AVX-512 pair kernels: 8-bit activation rows against two row blocks of 4-bit weights in one pass over
// the pair (prefill's 4-row passes, the 8-row decode step). Included by linear_avx512.cpp (one translation
// unit: `bcast` and the ISA guard come from there).
#pragma once

// One 8-column step of a pair of row blocks (w0, w1): each block's 64 code bytes, low and high nibbles
// apart. pf: the first pass over the pair's rows also fetches the next pair's bytes at this offset, one
// pair ahead of use; later passes read this pair from L1. (Before: 16 KB ahead on both streams in every
// pass; 8-row SmolLM2 decode +3.4% in six in-process pairs, prefill unchanged.)
static inline __attribute__((always_inline)) void pair_step(const uint8_t* w0, const uint8_t* w1, size_t next,
                                                            bool pf, __m512i mask, __m512i& lo0, __m512i& hi0,
                                                            __m512i& lo1, __m512i& hi1) {
#if EL_PF
    if (pf) {
        _mm_prefetch((const char*)w0 + next, EL_PF_HINT);
        _mm_prefetch((const char*)w1 + next, EL_PF_HINT);
    }
#else
    (void)next;
    (void)pf;
#endif
    const __m512i v0 = _mm512_loadu_si512(w0), v1 = _mm512_loadu_si512(w1);
    lo0 = _mm512_and_si512(v0, mask);
    hi0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), mask);
    lo1 = _mm512_and_si512(v1, mask);
    hi1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), mask);
}

// 8-bit activations, 4-bit weights: MB rows against two row blocks at once. Each broadcast
// activation feeds both blocks' vpdpbusd: in block_mb the broadcasts (17 loads per 16 products) and
// not the products bound the rate. Low and high nibbles sum in separate accumulators (no product
// waits on another within a step). GS: the group size when known at compile time (0: L.gs); the
// fixed 4-step inner loop of gs 32 made a 512-row SmolLM2 prefill 10-22% faster (alternating runs).
// PF: this call is the first pass over the pair's rows (it prefetches the next pair). A template argument:
// as a run-time flag its test in the inner loop cost the 4-row prefill passes ~20% (cached weights).
template <int MB, int GS, bool PF>
static void block_mb2_i8(const ELinear& L, const EAct& A, int m0, int rb, float* y, int ldy) {
    const int G = L.G, Kp = L.Kp;
    __m512 acc[MB][2];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    const __m512i mask = _mm512_set1_epi8(0x0F);
    const uint8_t* w0 = L.w + (size_t)rb * Kp * 8;
    const uint8_t* w1 = w0 + (size_t)Kp * 8;
    for (int g = 0; g < G; ++g) {
        __m512i a[MB][2], b[MB][2];
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
            a[m][0] = a[m][1] = _mm512_set1_epi32(A.corr[(size_t)(m0 + m) * G + g]);
            b[m][0] = b[m][1] = _mm512_setzero_si512();
        }
        const int8_t* pg = A.planes + (size_t)m0 * Kp + g * (GS ? GS : L.gs);
        const int steps = GS ? GS / 8 : L.gs / 8;
        for (int p = 0; p < steps; ++p, w0 += 64, w1 += 64) {
            __m512i lo0, hi0, lo1, hi1;
            pair_step(w0, w1, 2 * (size_t)Kp * 8, PF, mask, lo0, hi0, lo1, hi1);
#pragma GCC unroll 8
            for (int m = 0; m < MB; ++m) {
                const __m512i x = bcast(pg + (size_t)m * Kp + 8 * p), z = bcast(pg + (size_t)m * Kp + 8 * p + 4);
                a[m][0] = _mm512_dpbusd_epi32(a[m][0], lo0, x);
                a[m][1] = _mm512_dpbusd_epi32(a[m][1], lo1, x);
                b[m][0] = _mm512_dpbusd_epi32(b[m][0], hi0, z);
                b[m][1] = _mm512_dpbusd_epi32(b[m][1], hi1, z);
            }
        }
        const __m512 s0 = load_scales(L, rb, g), s1 = load_scales(L, rb + 1, g);
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
            const __m512 gs = _mm512_set1_ps(A.gsc[(size_t)(m0 + m) * G + g]);
            acc[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a[m][0], b[m][0])), _mm512_mul_ps(s0, gs),
                                        acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a[m][1], b[m][1])), _mm512_mul_ps(s1, gs),
                                        acc[m][1]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
        store_block(L, rb, acc[m][0], y + (size_t)(m0 + m) * ldy);
        store_block(L, rb + 1, acc[m][1], y + (size_t)(m0 + m) * ldy);
    }
}


// 8-bit activations, 4-bit weights: 8 rows against two row blocks in one pass over the weights, the
// rows' activations read from their 8-row tile (EAct.planes8: one base pointer for all rows; with
// eight row pointers the compiler ran out of general registers). Each (row, block) sums its low- and
// high-nibble products in one accumulator (16 independent chains hide vpdpbusd's latency) and the
// float sums stay in memory (the 16 integer sums and the unpacked weights fill the registers).
// Against two passes of block_mb2_i8<4> (one core, same results): equal on L1-resident weights, +7%
// from L3, +22% from DRAM, where an 8-stream decode step reads its weights.
template <int GS, bool PF>
static void block_mb2_i8_8(const ELinear& L, const EAct& A, int m0, int rb, float* y, int ldy) {
    constexpr int MB = 8;
    const int G = L.G, Kp = L.Kp, gs = GS ? GS : L.gs;
    alignas(64) float acc[MB][2][16];
    memset(acc, 0, sizeof(acc));
    const __m512i mask = _mm512_set1_epi8(0x0F);
    const uint8_t* w0 = L.w + (size_t)rb * Kp * 8;
    const uint8_t* w1 = w0 + (size_t)Kp * 8;
    const size_t t = (size_t)(m0 / 8) * G * 8;
    const int8_t* pg = A.planes8 + t * gs;
    const int32_t* cg = A.corr8 + t;
    const float* sg = A.gsc8 + t;
    for (int g = 0; g < G; ++g, pg += 8 * gs, cg += 8, sg += 8) {
        __m512i a[MB][2];
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
            a[m][0] = _mm512_set1_epi32(cg[m]);
            a[m][1] = _mm512_set1_epi32(cg[m]);
        }
#pragma GCC unroll 4
        for (int p = 0; p < gs / 8; ++p, w0 += 64, w1 += 64) {
            __m512i lo0, hi0, lo1, hi1;
            pair_step(w0, w1, 2 * (size_t)Kp * 8, PF, mask, lo0, hi0, lo1, hi1);
#pragma GCC unroll 8
            for (int m = 0; m < MB; ++m) {
                const __m512i x = bcast(pg + m * gs + 8 * p), z = bcast(pg + m * gs + 8 * p + 4);
                a[m][0] = _mm512_dpbusd_epi32(a[m][0], lo0, x);
                a[m][1] = _mm512_dpbusd_epi32(a[m][1], lo1, x);
                a[m][0] = _mm512_dpbusd_epi32(a[m][0], hi0, z);
                a[m][1] = _mm512_dpbusd_epi32(a[m][1], hi1, z);
            }
        }
#if EL_PF
        if (PF) {  // and the next pair's scales of this group, non-temporal too (not prefetched, their
                        // misses stalled the products: SmolLM2 8-stream step +4 to +5%, per-step
                        // alternating pairs of one build)
            const size_t es = L.half ? 2 : 4;
            _mm_prefetch((const char*)L.scale + ((size_t)(rb + 2) * G + g) * 16 * es, EL_PF_HINT);
            _mm_prefetch((const char*)L.scale + ((size_t)(rb + 3) * G + g) * 16 * es, EL_PF_HINT);
        }
#endif
        const __m512 s0 = load_scales(L, rb, g), s1 = load_scales(L, rb + 1, g);
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
            const __m512 sa = _mm512_set1_ps(sg[m]);
            _mm512_store_ps(acc[m][0], _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][0]), _mm512_mul_ps(s0, sa),
                                                       _mm512_load_ps(acc[m][0])));
            _mm512_store_ps(acc[m][1], _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][1]), _mm512_mul_ps(s1, sa),
                                                       _mm512_load_ps(acc[m][1])));
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
        store_block(L, rb, _mm512_load_ps(acc[m][0]), y + (size_t)(m0 + m) * ldy);
        store_block(L, rb + 1, _mm512_load_ps(acc[m][1]), y + (size_t)(m0 + m) * ldy);
    }
}
