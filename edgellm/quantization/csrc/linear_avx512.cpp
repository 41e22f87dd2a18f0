// The quantized product with AVX512-VNNI (vpdpbusd on 512-bit vectors).
#include "avx512.h"

#if EL_VNNI
// acc += u (unsigned bytes) . the 4 signed bytes at p broadcast, as one instruction with an embedded
// broadcast operand (GCC does not fold the intrinsics' broadcast; measured 10-17% faster for 8 rows)
static inline __m512i dpb(__m512i acc, __m512i u, const int8_t* p) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*(const int32_t(*)[1])p));
    return acc;
}

static inline __m512i bcast(const int8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

// One activation row against NB row blocks at once (NB independent weight streams keep more
// memory requests in flight than one); split accumulators hide vpdpbusd latency.
template <int NB, int P>
static void block_m1(const ELinear& L, const EAct& A, int m, const int* rbs, float* y) {
    const int G = L.G, Kp = L.Kp;
    const int8_t* pl = A.planes + (size_t)m * P * Kp;
    const float* gsc = A.gsc + (size_t)m * G;
    const int32_t* corr = A.corr + (size_t)m * G * P;
    __m512 acc[NB];
    const uint8_t* w[NB];
    const size_t stride = (size_t)Kp * (L.fmt == 4 ? 8 : 16);
    for (int i = 0; i < NB; ++i) {
        acc[i] = _mm512_setzero_ps();
        w[i] = L.w + (size_t)rbs[i] * stride;
    }
    const __m512i mask = _mm512_set1_epi8(0x0F);
    const size_t es = L.half ? 2 : 4;
    for (int g = 0; g < G; ++g) {
        __m512i a0[NB], a1[NB], b0[NB], b1[NB];
#if EL_PF
        // the scales 16 groups ahead, non-temporal like the codes ([Nb][G][16]: a block's, then the next
        // block's): SmolLM2 one stream +3 to +4% (per-step alternating pairs of one build)
        for (int i = 0; i < NB; ++i)
            _mm_prefetch((const char*)L.scale + ((size_t)rbs[i] * G + g + 16) * 16 * es, EL_PF_HINT);
#endif
        for (int i = 0; i < NB; ++i) {
            a0[i] = _mm512_set1_epi32(corr[P * g]);
            a1[i] = P == 2 ? _mm512_set1_epi32(corr[2 * g + 1]) : _mm512_setzero_si512();
            b0[i] = b1[i] = _mm512_setzero_si512();
        }
        const int8_t* p0 = pl + g * L.gs;
        if (L.fmt == 4) {
            for (int p = 0; p < L.gs / 8; ++p, p0 += 8) {
                const __m512i x0 = bcast(p0), x1 = P == 2 ? bcast(p0 + Kp) : x0;
                const __m512i y0 = bcast(p0 + 4), y1 = P == 2 ? bcast(p0 + Kp + 4) : y0;
                for (int i = 0; i < NB; ++i) {
#if EL_PF
                    _mm_prefetch((const char*)w[i] + EL_PF, EL_PF_HINT);
#endif
                    const __m512i v = _mm512_loadu_si512(w[i]);
                    w[i] += 64;
                    const __m512i lo = _mm512_and_si512(v, mask);
                    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
                    a0[i] = _mm512_dpbusd_epi32(a0[i], lo, x0);
                    if (P == 2) a1[i] = _mm512_dpbusd_epi32(a1[i], lo, x1);
                    b0[i] = _mm512_dpbusd_epi32(b0[i], hi, y0);
                    if (P == 2) b1[i] = _mm512_dpbusd_epi32(b1[i], hi, y1);
                }
            }
        } else {
            const int C = L.gs / 4;
            int c = 0;
            for (; c + 2 <= C; c += 2, p0 += 8) {
                const __m512i x0 = bcast(p0), x1 = P == 2 ? bcast(p0 + Kp) : x0;
                const __m512i y0 = bcast(p0 + 4), y1 = P == 2 ? bcast(p0 + Kp + 4) : y0;
                for (int i = 0; i < NB; ++i) {
#if EL_PF
                    _mm_prefetch((const char*)w[i] + EL_PF, EL_PF_HINT);
                    _mm_prefetch((const char*)w[i] + EL_PF + 64, EL_PF_HINT);
#endif
                    const __m512i v = _mm512_loadu_si512(w[i]), u = _mm512_loadu_si512(w[i] + 64);
                    w[i] += 128;
                    a0[i] = _mm512_dpbusd_epi32(a0[i], v, x0);
                    if (P == 2) a1[i] = _mm512_dpbusd_epi32(a1[i], v, x1);
                    b0[i] = _mm512_dpbusd_epi32(b0[i], u, y0);
                    if (P == 2) b1[i] = _mm512_dpbusd_epi32(b1[i], u, y1);
                }
            }
            for (; c < C; ++c, p0 += 4) {
                const __m512i x0 = bcast(p0), x1 = P == 2 ? bcast(p0 + Kp) : x0;
                for (int i = 0; i < NB; ++i) {
                    const __m512i v = _mm512_loadu_si512(w[i]);
                    w[i] += 64;
                    a0[i] = _mm512_dpbusd_epi32(a0[i], v, x0);
                    if (P == 2) a1[i] = _mm512_dpbusd_epi32(a1[i], v, x1);
                }
            }
        }
        const __m512 gs = _mm512_set1_ps(gsc[g]);
        for (int i = 0; i < NB; ++i) {
            const __m512i d = P == 2 ? _mm512_add_epi32(_mm512_add_epi32(a0[i], b0[i]),
                                                        _mm512_slli_epi32(_mm512_add_epi32(a1[i], b1[i]), 8))
                                     : _mm512_add_epi32(a0[i], b0[i]);
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(load_scales(L, rbs[i], g), gs), acc[i]);
        }
    }
    for (int i = 0; i < NB; ++i) store_block(L, rbs[i], acc[i], y);
}

// MB activation rows at once (weights unpacked once for all of them; 8 rows x 2 planes of
// accumulators still fit the 32 vector registers). The loops over rows here and in block_mb2_i8 are
// unrolled explicitly: left rolled, GCC kept the float sums in memory and stored them every group
// (q8 products 15-29% slower).
template <int MB, int P>
static void block_mb(const ELinear& L, const EAct& A, int m0, int rb, float* y, int ldy) {
    const int G = L.G, Kp = L.Kp;
    __m512 acc[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    const __m512i mask = _mm512_set1_epi8(0x0F);
    const uint8_t* w = L.w + (size_t)rb * Kp * (L.fmt == 4 ? 8 : 16);
    for (int g = 0; g < G; ++g) {
        // 8-bit activations: the high nibbles go to their own accumulators (b0), so no vpdpbusd waits
        // on another within a step (two dependent ones per row halved the 8-row rate)
        __m512i a0[MB], a1[MB], b0[MB];
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
            const int32_t* c = A.corr + ((size_t)(m0 + m) * G + g) * P;
            a0[m] = _mm512_set1_epi32(c[0]);
            a1[m] = P == 2 ? _mm512_set1_epi32(c[1]) : _mm512_setzero_si512();
            b0[m] = _mm512_setzero_si512();
        }
        const int kg = g * L.gs;
        if (L.fmt == 4) {
            for (int p = 0; p < L.gs / 8; ++p, w += 64) {
#if EL_PF
                _mm_prefetch((const char*)w + EL_PF, _MM_HINT_T0);
#endif
                const __m512i v = _mm512_loadu_si512(w);
                const __m512i lo = _mm512_and_si512(v, mask);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
#pragma GCC unroll 8
                for (int m = 0; m < MB; ++m) {
                    const int8_t* p0 = A.planes + (size_t)(m0 + m) * P * Kp + kg + 8 * p;
                    a0[m] = dpb(a0[m], lo, p0);
                    if (P == 2) {
                        a1[m] = dpb(a1[m], lo, p0 + Kp);
                        a0[m] = dpb(a0[m], hi, p0 + 4);
                        a1[m] = dpb(a1[m], hi, p0 + Kp + 4);
                    } else {
                        b0[m] = dpb(b0[m], hi, p0 + 4);
                    }
                }
            }
            if (P == 1) {
#pragma GCC unroll 8
                for (int m = 0; m < MB; ++m) a0[m] = _mm512_add_epi32(a0[m], b0[m]);
            }
        } else {
            for (int c = 0; c < L.gs / 4; ++c, w += 64) {
#if EL_PF
                _mm_prefetch((const char*)w + EL_PF, _MM_HINT_T0);
#endif
                const __m512i v = _mm512_loadu_si512(w);
#pragma GCC unroll 8
                for (int m = 0; m < MB; ++m) {
                    const int8_t* p0 = A.planes + (size_t)(m0 + m) * P * Kp + kg + 4 * c;
                    a0[m] = dpb(a0[m], v, p0);
                    if (P == 2) a1[m] = dpb(a1[m], v, p0 + Kp);
                }
            }
        }
        const __m512 sc = load_scales(L, rb, g);
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
            __m512i d = P == 2 ? _mm512_add_epi32(a0[m], _mm512_slli_epi32(a1[m], 8)) : a0[m];
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d),
                                     _mm512_mul_ps(sc, _mm512_set1_ps(A.gsc[(size_t)(m0 + m) * G + g])), acc[m]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) store_block(L, rb, acc[m], y + (size_t)(m0 + m) * ldy);
}

#include "linear_avx512_pairs.h"

// rows m0..m1-1 against row block rb
template <int P>
static void rows_mb(const ELinear& L, const EAct& A, int m0, int m1, int rb, float* y, int ldy) {
    int m = m0;
    for (; m + 8 <= m1; m += 8) block_mb<8, P>(L, A, m, rb, y, ldy);
    for (; m + 4 <= m1; m += 4) block_mb<4, P>(L, A, m, rb, y, ldy);
    switch (m1 - m) {
        case 3: block_mb<3, P>(L, A, m, rb, y, ldy); break;
        case 2: block_mb<2, P>(L, A, m, rb, y, ldy); break;
        case 1: block_mb<1, P>(L, A, m, rb, y, ldy); break;
        default: break;
    }
}

// rows m0..m1-1 against the row blocks rb, rb + 1 (8-bit activations, 4-bit weights)
// block_mb2_i8 / block_mb2_i8_8 with PF = first
template <int MB, int GS>
static inline void mb2(const ELinear& L, const EAct& A, int m, int rb, float* y, int ldy, bool first) {
    if (MB == 8)
        first ? block_mb2_i8_8<GS, true>(L, A, m, rb, y, ldy) : block_mb2_i8_8<GS, false>(L, A, m, rb, y, ldy);
    else
        first ? block_mb2_i8<MB, GS, true>(L, A, m, rb, y, ldy) : block_mb2_i8<MB, GS, false>(L, A, m, rb, y, ldy);
}

template <int GS>
static void pair_rows(const ELinear& L, const EAct& A, int m0, int m1, int rb, float* y, int ldy) {
    int m = m0;
    if (A.planes8)  // m0 starts a tile (gemv_planes' row tiles are multiples of 8)
        for (; m + 8 <= m1 && m + 8 <= A.M8; m += 8) mb2<8, GS>(L, A, m, rb, y, ldy, m == m0);
    for (; m + 4 <= m1; m += 4) mb2<4, GS>(L, A, m, rb, y, ldy, m == m0);
    switch (m1 - m) {
        case 3: mb2<3, GS>(L, A, m, rb, y, ldy, m == m0); break;
        case 2: mb2<2, GS>(L, A, m, rb, y, ldy, m == m0); break;
        case 1: mb2<1, GS>(L, A, m, rb, y, ldy, m == m0); break;
        default: break;
    }
}

void avx512_rows(const ELinear& L, const EAct& A, int m0, int m1, int rb, int nb, float* y, int ldy) {
    if (nb == 2 && L.fmt == 4 && L.gs == 32)
        pair_rows<32>(L, A, m0, m1, rb, y, ldy);
    else if (nb == 2 && L.fmt == 4)
        pair_rows<0>(L, A, m0, m1, rb, y, ldy);
    else
        for (int b = 0; b < nb; ++b) rows_mb<1>(L, A, m0, m1, rb + b, y, ldy);
}

template <int P>
static void gemv_planes(const ELinear& L, const EAct& A, int M, float* y, int ldy) {
    const int Nb = (L.N + 15) / 16;
    if (P == 1 && amx_fits(L, M)) {  // a CPU with AMX-int8 (and the tiles' permission): its tile product
        gemv_amx(L, A, M, y, ldy);
        return;
    }
#if EL_STREAMS > 1
    if (M == 1) {  // EL_STREAMS weight streams per thread: blocks i, i + per, i + 2 per...
        const int per = (Nb + EL_STREAMS - 1) / EL_STREAMS;
#pragma omp for schedule(static) nowait
        for (int i = 0; i < per; ++i) {
            int rbs[EL_STREAMS];
            switch (stream_blocks(i, per, Nb, EL_STREAMS, rbs)) {
                case 1: block_m1<1, P>(L, A, 0, rbs, y); break;
                case 2: block_m1<2, P>(L, A, 0, rbs, y); break;
#if EL_STREAMS > 2
                case 3: block_m1<3, P>(L, A, 0, rbs, y); break;
#endif
#if EL_STREAMS > 3
                case 4: block_m1<4, P>(L, A, 0, rbs, y); break;
#endif
                default: break;
            }
        }
        return;
    }
#endif
    if (P == 1 && L.fmt == 4 && M > 1) {
        // row blocks in pairs (block_mb2_i8); rows in tiles whose activations (~256 KB) stay in L2
        int mt = (256 << 10) / (L.Kp > 0 ? L.Kp : 1) / 8 * 8;
        mt = mt < 16 ? 16 : mt;
        const int pairs = (Nb + 1) / 2;
        for (int t0 = 0; t0 < M; t0 += mt) {
            const int t1 = t0 + mt < M ? t0 + mt : M;
#pragma omp for schedule(static) nowait
            for (int i = 0; i < pairs; ++i) avx512_rows(L, A, t0, t1, 2 * i, 2 * i + 1 == Nb ? 1 : 2, y, ldy);
        }
        return;
    }
#pragma omp for schedule(static) nowait
    for (int rb = 0; rb < Nb; ++rb) {
        if (M == 1)
            block_m1<1, P>(L, A, 0, &rb, y);
        else
            rows_mb<P>(L, A, 0, M, rb, y, ldy);
    }
}

void gemv_avx512(const ELinear& L, const EAct& A, int M, float* y, int ldy) {
    if (act_planes(L) == 1)
        gemv_planes<1>(L, A, M, y, ldy);
    else
        gemv_planes<2>(L, A, M, y, ldy);
}
#endif
