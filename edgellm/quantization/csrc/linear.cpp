// Activation quantization, the product's dispatch per ISA, and el_linear.
#include "common.h"

// ------------------------------------------------------------------------------------------
// activation quantization: x [M][K] (row stride ldx) -> per row: planes int8 [2][Kp] (value =
// plane0 + 256 * plane1), group scales [G], corrections [G][2] = -off * sum(plane values in the group)


static void quant_row(const float* x, int K, int Kp, int gs, int off, int8_t* pl, float* gsc, int32_t* corr) {
    const int G = Kp / gs;
    const float A = (float)ACT_MAX;
    for (int g = 0; g < G; ++g) {
        const int k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K;
        int32_t s0 = 0, s1 = 0;
#if EL_VNNI
        if (gs == 32 && k1 - k0 == 32) {
            __m512 x0 = _mm512_loadu_ps(x + k0), x1 = _mm512_loadu_ps(x + k0 + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
            const float inv = amax > 0.f ? A / amax : 0.f;
            gsc[g] = amax > 0.f ? amax / A : 0.f;
            const __m512 vi = _mm512_set1_ps(inv);
            const __m512i c128 = _mm512_set1_epi32(128), m255 = _mm512_set1_epi32(255);
            __m512i t0 = _mm512_setzero_si512(), t1 = t0;
            for (int h = 0; h < 2; ++h) {
                __m512i a = _mm512_cvt_roundps_epi32(_mm512_mul_ps(h ? x1 : x0, vi),
                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                a = _mm512_max_epi32(_mm512_min_epi32(a, _mm512_set1_epi32(ACT_MAX)), _mm512_set1_epi32(-ACT_MAX));
                __m512i a0 = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(a, c128), m255), c128);
                __m512i a1 = _mm512_srai_epi32(_mm512_sub_epi32(a, a0), 8);
                _mm_storeu_si128((__m128i*)(pl + k0 + 16 * h), _mm512_cvtepi32_epi8(a0));
                _mm_storeu_si128((__m128i*)(pl + Kp + k0 + 16 * h), _mm512_cvtepi32_epi8(a1));
                t0 = _mm512_add_epi32(t0, a0);
                t1 = _mm512_add_epi32(t1, a1);
            }
            corr[2 * g + 0] = -off * _mm512_reduce_add_epi32(t0);
            corr[2 * g + 1] = -off * _mm512_reduce_add_epi32(t1);
            continue;
        }
#endif
#if EL_AVX2
        if (gs == 32 && k1 - k0 == 32) {
            const __m256 sign = _mm256_set1_ps(-0.0f);
            __m256 xv[4], m = _mm256_setzero_ps();
            for (int h = 0; h < 4; ++h) {
                xv[h] = _mm256_loadu_ps(x + k0 + 8 * h);
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, xv[h]));
            }
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            const float amax = _mm_cvtss_f32(m4);
            const float inv = amax > 0.f ? A / amax : 0.f;
            gsc[g] = amax > 0.f ? amax / A : 0.f;
            const __m256 vi = _mm256_set1_ps(inv);
            const __m256i c128 = _mm256_set1_epi32(128), m255 = _mm256_set1_epi32(255);
            const __m256i lim = _mm256_set1_epi32(ACT_MAX), nlim = _mm256_set1_epi32(-ACT_MAX);
            alignas(32) int32_t t0[32], t1[32];
            for (int h = 0; h < 4; ++h) {
                __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(xv[h], vi));
                a = _mm256_max_epi32(_mm256_min_epi32(a, lim), nlim);
                const __m256i a0 = _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(a, c128), m255), c128);
                _mm256_store_si256((__m256i*)(t0 + 8 * h), a0);
                _mm256_store_si256((__m256i*)(t1 + 8 * h), _mm256_srai_epi32(_mm256_sub_epi32(a, a0), 8));
            }
            for (int i = 0; i < 32; ++i) {
                pl[k0 + i] = (int8_t)t0[i];
                pl[Kp + k0 + i] = (int8_t)t1[i];
                s0 += t0[i];
                s1 += t1[i];
            }
            corr[2 * g + 0] = -off * s0;
            corr[2 * g + 1] = -off * s1;
            continue;
        }
#endif
        float amax = 0.f;
        for (int k = k0; k < k1; ++k) amax = fmaxf(amax, fabsf(x[k]));
        const float inv = amax > 0.f ? A / amax : 0.f;
        gsc[g] = amax > 0.f ? amax / A : 0.f;
        for (int k = k0; k < k0 + gs; ++k) {
            int32_t a = k < k1 ? (int32_t)nearbyintf(x[k] * inv) : 0;
            a = a > ACT_MAX ? ACT_MAX : a < -ACT_MAX ? -ACT_MAX : a;
            const int32_t a0 = ((a + 128) & 255) - 128, a1 = (a - a0) >> 8;
            pl[k] = (int8_t)a0;
            pl[Kp + k] = (int8_t)a1;
            s0 += a0;
            s1 += a1;
        }
        corr[2 * g + 0] = -off * s0;
        corr[2 * g + 1] = -off * s1;
    }
}

// 8-bit activations: per group, a = round(x * 127 / max|x|) in -127..127 (one plane), scale
// max|x| / 127, correction -off * sum(a)
static void quant_row8(const float* x, int K, int Kp, int gs, int off, int8_t* pl, float* gsc, int32_t* corr) {
    const int G = Kp / gs;
    for (int g = 0; g < G; ++g) {
        const int k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K;
        int32_t s = 0;
#if defined(__AVX2__) && defined(__FMA__)
        if (gs == 32 && k1 - k0 == 32) {
            const __m256 sign = _mm256_set1_ps(-0.0f);
            __m256 xv[4], mx = _mm256_setzero_ps();
            for (int h = 0; h < 4; ++h) {
                xv[h] = _mm256_loadu_ps(x + k0 + 8 * h);
                mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, xv[h]));
            }
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            const float amax = _mm_cvtss_f32(m4);
            const float inv = amax > 0.f ? 127.0f / amax : 0.f;
            gsc[g] = amax > 0.f ? amax / 127.0f : 0.f;
            const __m256 vi = _mm256_set1_ps(inv);
            __m256i q[4];
            for (int h = 0; h < 4; ++h) q[h] = _mm256_cvtps_epi32(_mm256_mul_ps(xv[h], vi));  // |q| <= 127
            // int32 -> int8 keeping order: packs works per 128-bit lane, the permute restores it
            const __m256i p01 = _mm256_packs_epi32(q[0], q[1]), p23 = _mm256_packs_epi32(q[2], q[3]);
            const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23),
                                                          _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i*)(pl + k0), b);
            const __m256i t = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
            t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
            t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
            corr[g] = -off * _mm_cvtsi128_si32(t4);
            continue;
        }
#endif
        float amax = 0.f;
        for (int k = k0; k < k1; ++k) amax = fmaxf(amax, fabsf(x[k]));
        const float inv = amax > 0.f ? 127.0f / amax : 0.f;
        gsc[g] = amax > 0.f ? amax / 127.0f : 0.f;
        for (int k = k0; k < k0 + gs; ++k) {
            int32_t a = k < k1 ? (int32_t)nearbyintf(x[k] * inv) : 0;
            a = a > 127 ? 127 : a < -127 ? -127 : a;
            pl[k] = (int8_t)a;
            s += a;
        }
        corr[g] = -off * s;
    }
}

void quant_act_rows(const ELinear& L, const float* x, int ldx, int m0, int m1, const EAct& A) {
    if (L.abits == 8) {
        for (int m = m0; m < m1; ++m) {
            int8_t* pl = A.planes + (size_t)m * A.Kp;
            float* gsc = A.gsc + (size_t)m * A.G;
            int32_t* corr = A.corr + (size_t)m * A.G;
            quant_row8(x + (size_t)m * ldx, L.K, L.Kp, L.gs, L.off, pl, gsc, corr);
            if (m < A.M8 && L.fmt == 4) {  // the row's place in its 8-row tile
                const size_t t = (size_t)(m / 8) * A.G * 8, r = m % 8;
                for (int g = 0; g < A.G; ++g) {
#if EL_VNNI
                    if (L.gs == 32)  // (a call of memcpy per group cost 1% of an 8-row decode step)
                        _mm256_storeu_si256((__m256i*)(A.planes8 + ((t + (size_t)g * 8) + r) * 32),
                                            _mm256_loadu_si256((const __m256i*)(pl + (size_t)g * 32)));
                    else
#endif
                        memcpy(A.planes8 + ((t + (size_t)g * 8) + r) * L.gs, pl + (size_t)g * L.gs, L.gs);
                    A.corr8[t + (size_t)g * 8 + r] = corr[g];
                    A.gsc8[t + (size_t)g * 8 + r] = gsc[g];
                }
            }
        }
        return;
    }
    for (int m = m0; m < m1; ++m)
        quant_row(x + (size_t)m * ldx, L.K, L.Kp, L.gs, L.off, A.planes + (size_t)m * 2 * A.Kp,
                  A.gsc + (size_t)m * A.G, A.corr + (size_t)m * A.G * 2);
}

static void block_f32(const ELinear& L, const float* x, int ldx, int M, int rb, float* y, int ldy) {
    const int n0 = rb * 16, n1 = n0 + 16 < L.N ? n0 + 16 : L.N;
    for (int m = 0; m < M; ++m)
        for (int n = n0; n < n1; ++n)
            y[(size_t)m * ldy + n] = dotf(L.wf + (size_t)n * L.K, x + (size_t)m * ldx, L.K) + (L.bias ? L.bias[n] : 0.f);
}


void gemv_for(const ELinear& L, const float* x, int ldx, const EAct& A, int M, float* y, int ldy, EBarrier& bar) {
    if (L.fmt == 32) {
        const int Nb = (L.N + 15) / 16;
#pragma omp for schedule(static) nowait
        for (int rb = 0; rb < Nb; ++rb) block_f32(L, x, ldx, M, rb, y, ldy);
    } else {
#if EL_VNNI
        gemv_avx512(L, A, M, y, ldy);
#elif EL_AVX2
        gemv_avx2(L, A, M, y, ldy);
#else
        gemv_portable(L, A, M, y, ldy);
#endif
    }
    bar.wait();
}

// ------------------------------------------------------------------------------------------
// scratch for activation quantization (per calling thread, grown as needed)

static thread_local int8_t* t_planes = nullptr;
static thread_local float* t_gsc = nullptr;
static thread_local int32_t* t_corr = nullptr;
static thread_local size_t t_cap_planes = 0, t_cap_groups = 0;

static EAct act_buffers(int M, int Kp, int G) {
    const size_t np = (size_t)M * 2 * Kp + 64, ng = (size_t)M * G + 16;
    if (np > t_cap_planes) {
        free(t_planes);
        t_planes = (int8_t*)malloc(np);
        t_cap_planes = np;
    }
    if (ng > t_cap_groups) {
        free(t_gsc);
        free(t_corr);
        t_gsc = (float*)malloc(ng * 2 * sizeof(float));
        t_corr = (int32_t*)malloc(ng * 2 * sizeof(int32_t));
        t_cap_groups = ng;
    }
    EAct A;
    A.planes = t_planes;
    A.gsc = t_gsc;
    A.corr = t_corr;
    A.Kp = Kp;
    A.G = G;
#if EL_VNNI
    // 8-bit rows in tiles of 8 too (the planes' and corrections' second halves, gsc's) for the few rows
    // of a decode batch, whose weights stream from memory; a prefill's many rows reuse each weight
    // block from L1, where two passes of 4 rows were 2-10% faster (q4f16_1 prefill, in-process pairs)
    if (M >= 8 && M <= 32) {
        A.planes8 = t_planes + (size_t)M * Kp;
        A.corr8 = t_corr + (size_t)M * G;
        A.gsc8 = t_gsc + (size_t)M * G;
        A.M8 = M / 8 * 8;
    }
#endif
    return A;
}

// y [M][N] (row stride ldy) = x [M][K] (row stride ldx) @ W^T + bias
EL_API void el_linear(const ELinear* Lp, const float* x, int M, int ldx, float* y, int ldy, int nthreads) {
    const ELinear& L = *Lp;
    EAct A = {};
    if (L.fmt != 32) A = act_buffers(M, L.Kp, L.G);
    EBarrier bar;
#pragma omp parallel num_threads(nthreads)
    {
        if (L.fmt != 32) {
#pragma omp for schedule(static) nowait
            for (int m = 0; m < M; ++m) quant_act_rows(L, x, ldx, m, m + 1, A);
            bar.wait();
        }
        gemv_for(L, x, ldx, A, M, y, ldy, bar);
    }
}

// ------------------------------------------------------------------------------------------
// greedy sampling's argmax (numpy's semantics: the first maximum; the first NaN wins over everything)

// the vector scans' lanes merged: the largest value, the first index on ties (no lane holds a NaN)
[[maybe_unused]] static inline void best_lane(const float* v, const int32_t* k, int lanes, float* best, int32_t* at) {
    *best = v[0];
    *at = k[0];
    for (int l = 1; l < lanes; ++l)
        if (v[l] > *best || (v[l] == *best && k[l] < *at)) {
            *best = v[l];
            *at = k[l];
        }
}

int32_t argmax_row(const float* x, int n) {
    int i = 0;
    float best = -INFINITY;
    int32_t at = 0;
#if EL_VNNI
    if (n >= 16) {
        // per lane: the largest value seen and its index (strictly greater replaces: the first on ties)
        __m512 bv = _mm512_loadu_ps(x);
        __m512i bi = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __m512i idx = bi;
        const __m512i step = _mm512_set1_epi32(16);
        __mmask16 nan = _mm512_cmp_ps_mask(bv, bv, _CMP_UNORD_Q);
        for (i = 16; i + 16 <= n; i += 16) {
            idx = _mm512_add_epi32(idx, step);
            const __m512 v = _mm512_loadu_ps(x + i);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            const __mmask16 gt = _mm512_cmp_ps_mask(v, bv, _CMP_GT_OQ);
            bv = _mm512_mask_mov_ps(bv, gt, v);
            bi = _mm512_mask_mov_epi32(bi, gt, idx);
        }
        if (nan) {  // rare: the scalar scan below finds the first NaN
            i = 0;
        } else {
            alignas(64) float v[16];
            alignas(64) int32_t k[16];
            _mm512_store_ps(v, bv);
            _mm512_store_epi32(k, bi);
            best_lane(v, k, 16, &best, &at);
        }
    }
#elif EL_AVX2
    if (n >= 8) {  // as the AVX-512 scan, 8 lanes (a head's 49k logits: ~25 us scalar, ~5 here)
        __m256 bv = _mm256_loadu_ps(x);
        __m256i bi = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256i idx = bi;
        const __m256i step = _mm256_set1_epi32(8);
        __m256 nan = _mm256_cmp_ps(bv, bv, _CMP_UNORD_Q);
        for (i = 8; i + 8 <= n; i += 8) {
            idx = _mm256_add_epi32(idx, step);
            const __m256 v = _mm256_loadu_ps(x + i);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            const __m256 gt = _mm256_cmp_ps(v, bv, _CMP_GT_OQ);
            bv = _mm256_blendv_ps(bv, v, gt);
            bi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi), _mm256_castsi256_ps(idx), gt));
        }
        if (_mm256_movemask_ps(nan)) {  // rare: the scalar scan below finds the first NaN
            i = 0;
        } else {
            alignas(32) float v[8];
            alignas(32) int32_t k[8];
            _mm256_store_ps(v, bv);
            _mm256_store_si256((__m256i*)k, bi);
            best_lane(v, k, 8, &best, &at);
        }
    }
#endif
    for (; i < n; ++i) {
        const float v = x[i];
        if (v != v) return i;
        if (v > best || (i == 0 && !(best > v))) {
            best = v;
            at = i;
        }
    }
    return at;
}

// out[b] = argmax of row b of x [B][n]
EL_API void el_argmax_rows(const float* x, int B, int n, int32_t* out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (B > 1)
    for (int b = 0; b < B; ++b) out[b] = argmax_row(x + (size_t)b * n, n);
}
