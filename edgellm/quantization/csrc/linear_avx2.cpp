// The quantized product on AVX2 (+ FMA, F16C): vpmaddubsw / vpmaddwd, or AVX-VNNI's vpdpbusd when present.
#include "common.h"

#if EL_AVX2
static inline __m256i dp_u8s8(__m256i acc, __m256i u, __m256i v) {  // u: 0..15, no saturation
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, v);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, v), _mm256_set1_epi16(1)));
#endif
}

// w: -127..127, v: -128..127; |v| as the unsigned operand (|-128| = 128 fits a u8) and w takes v's sign,
// so no product saturates
static inline __m256i dp_s8s8(__m256i acc, __m256i w, __m256i v) {
    return _mm256_add_epi32(
        acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(v), _mm256_sign_epi8(w, v)), _mm256_set1_epi16(1)));
}

static inline __m256i bc8(const int8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

// 8 weight scales of row block rb's group g from row 8h on (float16 or float32 as stored)
static inline __m256 scale8(const ELinear& L, int rb, int g, int h) {
    const size_t idx = ((size_t)rb * L.G + g) * 16 + 8 * h;
    return L.half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)L.scale + idx)))
                  : _mm256_loadu_ps((const float*)L.scale + idx);
}

// one activation row, rows 0-7 and 8-15 of the block in two 256-bit halves
template <int P>
static void block_avx2(const ELinear& L, const EAct& A, int m, int rb, float* y) {
    const int G = L.G, Kp = L.Kp;
    const int8_t* pl = A.planes + (size_t)m * P * Kp;
    const float* gsc = A.gsc + (size_t)m * G;
    const int32_t* corr = A.corr + (size_t)m * G * P;
    const __m256i mask = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8((char)0x80);
    const uint8_t* w = L.w + (size_t)rb * Kp * (L.fmt == 4 ? 8 : 16);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int g = 0; g < G; ++g) {
        const int8_t* p0 = pl + g * L.gs;
        __m256i x0, x1, y0, y1;
        if (L.fmt == 4) {
            x0 = y0 = _mm256_set1_epi32(corr[P * g]);
            x1 = y1 = P == 2 ? _mm256_set1_epi32(corr[2 * g + 1]) : _mm256_setzero_si256();
            for (int p = 0; p < L.gs / 8; ++p, w += 64, p0 += 8) {
#if EL_PF
                _mm_prefetch((const char*)w + EL_PF, EL_PF_HINT);
#endif
                const __m256i v0 = _mm256_loadu_si256((const __m256i*)w), v1 = _mm256_loadu_si256((const __m256i*)(w + 32));
                const __m256i lo0 = _mm256_and_si256(v0, mask), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), mask);
                const __m256i lo1 = _mm256_and_si256(v1, mask), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), mask);
                const __m256i b0 = bc8(p0), c0 = bc8(p0 + 4);
                x0 = dp_u8s8(dp_u8s8(x0, lo0, b0), hi0, c0);
                y0 = dp_u8s8(dp_u8s8(y0, lo1, b0), hi1, c0);
                if (P == 2) {
                    const __m256i b1 = bc8(p0 + Kp), c1 = bc8(p0 + Kp + 4);
                    x1 = dp_u8s8(dp_u8s8(x1, lo0, b1), hi0, c1);
                    y1 = dp_u8s8(dp_u8s8(y1, lo1, b1), hi1, c1);
                }
            }
        } else {  // signed weights (code - 128): the correction term is not needed
            x0 = x1 = y0 = y1 = _mm256_setzero_si256();
            for (int c = 0; c < L.gs / 4; ++c, w += 64, p0 += 4) {
#if EL_PF
                _mm_prefetch((const char*)w + EL_PF, EL_PF_HINT);
#endif
                const __m256i v0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)w), flip);
                const __m256i v1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w + 32)), flip);
                const __m256i b0 = bc8(p0);
                x0 = dp_s8s8(x0, v0, b0);
                y0 = dp_s8s8(y0, v1, b0);
                if (P == 2) {
                    const __m256i b1 = bc8(p0 + Kp);
                    x1 = dp_s8s8(x1, v0, b1);
                    y1 = dp_s8s8(y1, v1, b1);
                }
            }
        }
        const __m256i d0 = P == 2 ? _mm256_add_epi32(x0, _mm256_slli_epi32(x1, 8)) : x0;
        const __m256i d1 = P == 2 ? _mm256_add_epi32(y0, _mm256_slli_epi32(y1, 8)) : y0;
        const __m256 s0 = scale8(L, rb, g, 0), s1 = scale8(L, rb, g, 1);
        const __m256 gs = _mm256_set1_ps(gsc[g]);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(s0, gs), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_mul_ps(s1, gs), acc1);
    }
    alignas(32) float out[16];
    _mm256_store_ps(out, acc0);
    _mm256_store_ps(out + 8, acc1);
    store_rows(L, rb, out, y);
}

// acc[h][m]: rows rb * 16 + 8h .. + 7 of activation row m0 + m, plus the bias, into y
template <int MB>
static void store_i8(const ELinear& L, const __m256 (&acc)[2][MB], int m0, int rb, float* y, int ldy) {
    for (int h = 0; h < 2; ++h) {
        const int n0 = rb * 16 + 8 * h, cnt = L.N - n0 < 8 ? L.N - n0 : 8;
        for (int m = 0; m < MB; ++m) {
            float* o = y + (size_t)(m0 + m) * ldy + n0;
            if (cnt == 8 && !L.bias) {
                _mm256_storeu_ps(o, acc[h][m]);
                continue;
            }
            alignas(32) float v[8];
            _mm256_store_ps(v, acc[h][m]);
            for (int r = 0; r < cnt; ++r) o[r] = v[r] + (L.bias ? L.bias[n0 + r] : 0.f);
        }
    }
}

// acc[h][m] += s[h][m] (group g's integer sums of activation row m0 + m) x weight scales x activation scale
template <int MB>
static inline void scale_group(const ELinear& L, const EAct& A, int m0, int rb, int g, const __m256i (&s)[2][MB],
                               __m256 (&acc)[2][MB]) {
    const __m256 sc[2] = {scale8(L, rb, g, 0), scale8(L, rb, g, 1)};
    for (int m = 0; m < MB; ++m) {
        const __m256 gs = _mm256_set1_ps(A.gsc[(size_t)(m0 + m) * L.G + g]);
        for (int h = 0; h < 2; ++h)
            acc[h][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[h][m]), _mm256_mul_ps(sc[h], gs), acc[h][m]);
    }
}

// 8-bit activations, 4-bit weights, MB activation rows (1..4) at once: each 32-byte load of weight
// nibbles (8 rows x 4 columns) serves MB rows. A vpmaddubsw product of nibbles and 8-bit activations
// is at most 2 * 15 * 127 = 3810 in magnitude, so up to 8 of them (one group of 32 columns) are summed
// in 16 bits and widened once per group by vpmaddwd: the integer dot products are exact, as the
// 16-bit-activation kernel's. With AVX-VNNI, vpdpbusd accumulates in 32 bits directly. Both 8-row
// halves of the block are walked in one pass over its weights.
template <int MB>
static void block_avx2_i8(const ELinear& L, const EAct& A, int m0, int rb, float* y, int ldy) {
    constexpr int NH = 2;
    const int G = L.G, Kp = L.Kp, Q = L.gs / 8;
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const uint8_t* w = L.w + (size_t)rb * Kp * 8;
    __m256 acc[NH][MB];
    for (int h = 0; h < NH; ++h)
        for (int m = 0; m < MB; ++m) acc[h][m] = _mm256_setzero_ps();
    for (int g = 0; g < G; ++g) {
        __m256i s[NH][MB];
        const int32_t* corr = A.corr + (size_t)m0 * G + g;
        for (int m = 0; m < MB; ++m) s[0][m] = _mm256_set1_epi32(corr[(size_t)m * G]);
        for (int h = 1; h < NH; ++h)
            for (int m = 0; m < MB; ++m) s[h][m] = s[0][m];
        const int8_t* a = A.planes + (size_t)m0 * Kp + g * L.gs;
#if defined(__AVXVNNI__)
        for (int p = 0; p < Q; ++p, w += 64, a += 8) {
#if EL_PF
            _mm_prefetch((const char*)w + EL_PF, EL_PF_HINT);
#endif
            for (int h = 0; h < NH; ++h) {
                const __m256i v = _mm256_loadu_si256((const __m256i*)(w + 32 * h));
                const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                for (int m = 0; m < MB; ++m) {
                    s[h][m] = _mm256_dpbusd_avx_epi32(s[h][m], lo, bc8(a + (size_t)m * Kp));
                    s[h][m] = _mm256_dpbusd_avx_epi32(s[h][m], hi, bc8(a + (size_t)m * Kp + 4));
                }
            }
        }
#else
        const __m256i ones = _mm256_set1_epi16(1);
        for (int p0 = 0; p0 < Q; p0 += 4) {  // 4 steps of 8 columns: 8 products per 16-bit sum
            const int p1 = p0 + 4 < Q ? p0 + 4 : Q;
            __m256i t[NH][MB];
            for (int h = 0; h < NH; ++h)
                for (int m = 0; m < MB; ++m) t[h][m] = _mm256_setzero_si256();
            for (int p = p0; p < p1; ++p, w += 64, a += 8) {
#if EL_PF
                _mm_prefetch((const char*)w + EL_PF, EL_PF_HINT);
#endif
                for (int h = 0; h < NH; ++h) {
                    const __m256i v = _mm256_loadu_si256((const __m256i*)(w + 32 * h));
                    const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                    for (int m = 0; m < MB; ++m) {
                        const int8_t* am = a + (size_t)m * Kp;
                        t[h][m] = _mm256_add_epi16(t[h][m], _mm256_add_epi16(_mm256_maddubs_epi16(lo, bc8(am)),
                                                                             _mm256_maddubs_epi16(hi, bc8(am + 4))));
                    }
                }
            }
            for (int h = 0; h < NH; ++h)
                for (int m = 0; m < MB; ++m) s[h][m] = _mm256_add_epi32(s[h][m], _mm256_madd_epi16(t[h][m], ones));
        }
#endif
        scale_group<MB>(L, A, m0, rb, g, s, acc);
    }
    store_i8<MB>(L, acc, m0, rb, y, ldy);
}

// block_avx2_i8 for groups of a multiple of 32 columns without AVX-VNNI: each 32 columns' 4 steps are
// unrolled with their 16-bit sums (NH x MB) in registers, and the 32-bit sums of longer groups and the
// float accumulators are touched once per 32 columns. Same integer sums and float accumulation order
// as block_avx2_i8, about 1.3x its speed (GCC keeps block_avx2_i8's runtime-length loops' sums on the stack).
template <int MB, bool G32>  // G32: groups of exactly 32 columns (the loop over a group's 32s drops out)
static void block_avx2_i8_c32(const ELinear& L, const EAct& A, int m0, int rb, float* y, int ldy) {
    const int G = L.G, Kp = L.Kp, C = G32 ? 1 : L.gs / 32;
    const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const uint8_t* w = L.w + (size_t)rb * Kp * 8;
    __m256 acc[2][MB];
    for (int h = 0; h < 2; ++h)
        for (int m = 0; m < MB; ++m) acc[h][m] = _mm256_setzero_ps();
    const int8_t* a = A.planes + (size_t)m0 * Kp;
    for (int g = 0; g < G; ++g) {
        __m256i s[2][MB];
        for (int m = 0; m < MB; ++m) s[0][m] = s[1][m] = _mm256_set1_epi32(A.corr[(size_t)(m0 + m) * G + g]);
        for (int c = 0; c < C; ++c, a += 32) {
            __m256i t[2][MB];
#pragma GCC unroll 4
            for (int p = 0; p < 4; ++p, w += 64) {
#if EL_PF
                _mm_prefetch((const char*)w + EL_PF, EL_PF_HINT);
#endif
                const __m256i v0 = _mm256_loadu_si256((const __m256i*)w), v1 = _mm256_loadu_si256((const __m256i*)(w + 32));
                const __m256i lo0 = _mm256_and_si256(v0, mask), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), mask);
                const __m256i lo1 = _mm256_and_si256(v1, mask), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), mask);
#pragma GCC unroll 4
                for (int m = 0; m < MB; ++m) {
                    const int8_t* am = a + (size_t)m * Kp + 8 * p;
                    const __m256i b = bc8(am), bh = bc8(am + 4);
                    const __m256i x0 = _mm256_add_epi16(_mm256_maddubs_epi16(lo0, b), _mm256_maddubs_epi16(hi0, bh));
                    const __m256i x1 = _mm256_add_epi16(_mm256_maddubs_epi16(lo1, b), _mm256_maddubs_epi16(hi1, bh));
                    t[0][m] = p ? _mm256_add_epi16(t[0][m], x0) : x0;
                    t[1][m] = p ? _mm256_add_epi16(t[1][m], x1) : x1;
                    // keeps each step's sums in the accumulators: GCC otherwise re-associates the 16-bit
                    // additions into a tree and spills every product to the stack
                    __asm__("" : "+x"(t[0][m]), "+x"(t[1][m]));
                }
            }
            for (int m = 0; m < MB; ++m)
                for (int h = 0; h < 2; ++h) s[h][m] = _mm256_add_epi32(s[h][m], _mm256_madd_epi16(t[h][m], ones));
        }
        scale_group<MB>(L, A, m0, rb, g, s, acc);
    }
    store_i8<MB>(L, acc, m0, rb, y, ldy);
}

// 8-bit activations against 8-bit weights (fmt 8), MB activation rows (1..3) per pass over a row block's
// weights: |a| x (w with a's sign) by vpmaddubsw (|a| <= 127, |w| <= 127: a pair's sum fits 16 bits), each
// widened by vpmaddwd; the weights are loaded and flipped to signed once for the MB rows. Same integer
// sums and float accumulation order as block_avx2<1> (one row at a time, which it replaces for M > 1).
template <int MB>
static void block_avx2_q8(const ELinear& L, const EAct& A, int m0, int rb, float* y, int ldy) {
    const int G = L.G, Kp = L.Kp, C = L.gs / 4;
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    const uint8_t* w = L.w + (size_t)rb * Kp * 16;
    __m256 acc[2][MB];
    for (int h = 0; h < 2; ++h)
        for (int m = 0; m < MB; ++m) acc[h][m] = _mm256_setzero_ps();
    const int8_t* a = A.planes + (size_t)m0 * Kp;
    for (int g = 0; g < G; ++g) {
        __m256i s[2][MB];
        for (int h = 0; h < 2; ++h)
            for (int m = 0; m < MB; ++m) s[h][m] = _mm256_setzero_si256();
        for (int c = 0; c < C; ++c, w += 64, a += 4) {
#if EL_PF
            _mm_prefetch((const char*)w + EL_PF, EL_PF_HINT);
#endif
            const __m256i v0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)w), flip);
            const __m256i v1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w + 32)), flip);
#pragma GCC unroll 4
            for (int m = 0; m < MB; ++m) {
                const __m256i b = bc8(a + (size_t)m * Kp), ab = _mm256_abs_epi8(b);
                s[0][m] = _mm256_add_epi32(s[0][m], _mm256_madd_epi16(_mm256_maddubs_epi16(ab, _mm256_sign_epi8(v0, b)), ones));
                s[1][m] = _mm256_add_epi32(s[1][m], _mm256_madd_epi16(_mm256_maddubs_epi16(ab, _mm256_sign_epi8(v1, b)), ones));
            }
        }
        scale_group<MB>(L, A, m0, rb, g, s, acc);
    }
    store_i8<MB>(L, acc, m0, rb, y, ldy);
}

// One row of 8-bit activations against NB row blocks at once (4-bit weights): NB independent weight
// streams keep more memory requests in flight than one (single-row decode is bound by bandwidth).
// Same integer sums and the same float accumulation order as block_avx2_i8<1>.
template <int NB>
static void block_avx2_m1s(const ELinear& L, const EAct& A, int m, const int* rbs, float* y) {  // y: row m's output
    const int G = L.G, Kp = L.Kp, Q = L.gs / 8;
    const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const uint8_t* w[NB];
    __m256 acc[NB][2];
    for (int i = 0; i < NB; ++i) {
        w[i] = L.w + (size_t)rbs[i] * Kp * 8;
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    }
    const int8_t* a = A.planes + (size_t)m * Kp;
    for (int g = 0; g < G; ++g) {
        const __m256i c = _mm256_set1_epi32(A.corr[(size_t)m * G + g]);
        __m256i s[NB][2];
        for (int i = 0; i < NB; ++i) s[i][0] = s[i][1] = c;
        for (int p0 = 0; p0 < Q; p0 += 4) {
            const int p1 = p0 + 4 < Q ? p0 + 4 : Q;
            __m256i t[NB][2];
            for (int i = 0; i < NB; ++i) t[i][0] = t[i][1] = _mm256_setzero_si256();
            for (int p = p0; p < p1; ++p, a += 8) {
                const __m256i b = bc8(a), bh = bc8(a + 4);
                for (int i = 0; i < NB; ++i) {
#if EL_PF
                    _mm_prefetch((const char*)w[i] + EL_PF, EL_PF_HINT);
#endif
                    for (int h = 0; h < 2; ++h) {
                        const __m256i v = _mm256_loadu_si256((const __m256i*)(w[i] + 32 * h));
                        const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
#if defined(__AVXVNNI__)
                        s[i][h] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(s[i][h], lo, b), hi, bh);
#else
                        t[i][h] = _mm256_add_epi16(t[i][h], _mm256_add_epi16(_mm256_maddubs_epi16(lo, b),
                                                                             _mm256_maddubs_epi16(hi, bh)));
#endif
                    }
                    w[i] += 64;
                }
            }
#if !defined(__AVXVNNI__)
            for (int i = 0; i < NB; ++i)
                for (int h = 0; h < 2; ++h) s[i][h] = _mm256_add_epi32(s[i][h], _mm256_madd_epi16(t[i][h], ones));
#endif
        }
        const __m256 gs = _mm256_set1_ps(A.gsc[(size_t)m * G + g]);
        for (int i = 0; i < NB; ++i)
            for (int h = 0; h < 2; ++h) {
                const __m256 sc = scale8(L, rbs[i], g, h);
                acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[i][h]), _mm256_mul_ps(sc, gs), acc[i][h]);
            }
    }
    for (int i = 0; i < NB; ++i) {
        alignas(32) float out[16];
        _mm256_store_ps(out, acc[i][0]);
        _mm256_store_ps(out + 8, acc[i][1]);
        store_rows(L, rbs[i], out, y);
    }
}

#if !defined(__AVXVNNI__)
template <bool G32>
static void rows_c32(const ELinear& L, const EAct& A, int m0, int m1, int rb, float* y, int ldy) {
    int m = m0;
    for (; m + 4 <= m1; m += 4) block_avx2_i8_c32<4, G32>(L, A, m, rb, y, ldy);
    switch (m1 - m) {
        case 3: block_avx2_i8_c32<3, G32>(L, A, m, rb, y, ldy); break;
        case 2: block_avx2_i8_c32<2, G32>(L, A, m, rb, y, ldy); break;
        case 1: block_avx2_i8_c32<1, G32>(L, A, m, rb, y, ldy); break;
        default: break;
    }
}
#endif

// rows m0..m1-1 of the 8-bit activations against row block rb (4-bit weights)
static void rows_avx2_i8(const ELinear& L, const EAct& A, int m0, int m1, int rb, float* y, int ldy) {
    int m = m0;
#if !defined(__AVXVNNI__)
    if (L.gs == 32) {
        rows_c32<true>(L, A, m0, m1, rb, y, ldy);
        return;
    }
    if (L.gs % 32 == 0) {
        rows_c32<false>(L, A, m0, m1, rb, y, ldy);
        return;
    }
#endif
    for (; m + 4 <= m1; m += 4) block_avx2_i8<4>(L, A, m, rb, y, ldy);
    switch (m1 - m) {
        case 3: block_avx2_i8<3>(L, A, m, rb, y, ldy); break;
        case 2: block_avx2_i8<2>(L, A, m, rb, y, ldy); break;
        case 1: block_avx2_i8<1>(L, A, m, rb, y, ldy); break;
        default: break;
    }
}

void gemv_avx2(const ELinear& L, const EAct& A, int M, float* y, int ldy) {
    const int Nb = (L.N + 15) / 16;
    if (act_planes(L) == 2) {
#pragma omp for schedule(static) nowait
        for (int rb = 0; rb < Nb; ++rb)
            for (int m = 0; m < M; ++m) block_avx2<2>(L, A, m, rb, y + (size_t)m * ldy);
        return;
    }
    if (L.fmt == 8 && M > 1 && L.gs % 4 == 0) {  // 8-bit weights, several rows
#pragma omp for schedule(static) nowait
        for (int rb = 0; rb < Nb; ++rb) {
            int m = 0;  // 3 rows a pass: 4 need more than AVX2's 16 registers (sums spilled to the stack)
            for (; m + 3 <= M; m += 3) block_avx2_q8<3>(L, A, m, rb, y, ldy);
            switch (M - m) {
                case 2: block_avx2_q8<2>(L, A, m, rb, y, ldy); break;
                case 1: block_avx2_q8<1>(L, A, m, rb, y, ldy); break;
                default: break;
            }
        }
        return;
    }
    const bool i8 = L.fmt == 4 && L.gs % 8 == 0;
    // rows of activations per pass over the weights: about 128 KB of them stay in L2
    int mt = M;
    if (i8) {
        mt = (128 << 10) / (L.Kp > 0 ? L.Kp : 1) / 4 * 4;
        mt = mt < 16 ? 16 : mt;
    }
#if EL_STREAMS_AVX2 > 1
    if (i8 && M == 1) {  // EL_STREAMS_AVX2 weight streams per thread: blocks i, i + per, i + 2 per...
        const int per = (Nb + EL_STREAMS_AVX2 - 1) / EL_STREAMS_AVX2;
#pragma omp for schedule(static) nowait
        for (int i = 0; i < per; ++i) {
            int rbs[EL_STREAMS_AVX2];
            switch (stream_blocks(i, per, Nb, EL_STREAMS_AVX2, rbs)) {
                case 1: block_avx2_m1s<1>(L, A, 0, rbs, y); break;
                case 2: block_avx2_m1s<2>(L, A, 0, rbs, y); break;
                default: break;
            }
        }
        return;
    }
#endif
    for (int t0 = 0; t0 < M; t0 += mt) {
        const int t1 = t0 + mt < M ? t0 + mt : M;
#pragma omp for schedule(static) nowait
        for (int rb = 0; rb < Nb; ++rb) {
            if (i8) {
                rows_avx2_i8(L, A, t0, t1, rb, y, ldy);
                continue;
            }
            for (int m = t0; m < t1; ++m) block_avx2<1>(L, A, m, rb, y + (size_t)m * ldy);
        }
    }
}
#endif
