// Decode attention's AVX2 pieces (CPUs without AVX-512): scores of 8 keys per horizontal reduction and the
// weighted sum of values with the accumulators in registers. Included by attention.cpp.
#pragma once
#include "attention.h"

#if EL_AVX2 && !EL_VNNI
// a[8] -> one vector whose lane i is the sum of a[i]'s lanes
static inline __m256 reduce8(const __m256* a) {
    const __m256 c0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 c1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(c0, c1, 0x20), _mm256_permute2f128_ps(c0, c1, 0x31));
}

// Scores (times sc) of 8 consecutive key rows of kf (float, row stride ld) for every query head, D % 8 == 0:
// one horizontal reduction per 8 keys and head instead of one per key (that reduction was the cost).
static inline void qk8_heads(const float* q, int rep, int D, const float* kf, int ld, __m256 sc, float* s, int n,
                             int j) {
    for (int h = 0; h < rep; ++h) {
        const float* qh = q + (size_t)h * D;
        __m256 a[8];
        for (int i = 0; i < 8; ++i) {
            const float* kr = kf + (size_t)i * ld;
            __m256 x0 = _mm256_mul_ps(_mm256_loadu_ps(kr), _mm256_loadu_ps(qh)), x1 = _mm256_setzero_ps();
            int d = 8;
            for (; d + 16 <= D; d += 16) {
                x1 = _mm256_fmadd_ps(_mm256_loadu_ps(kr + d), _mm256_loadu_ps(qh + d), x1);
                x0 = _mm256_fmadd_ps(_mm256_loadu_ps(kr + d + 8), _mm256_loadu_ps(qh + d + 8), x0);
            }
            if (d < D) x1 = _mm256_fmadd_ps(_mm256_loadu_ps(kr + d), _mm256_loadu_ps(qh + d), x1);
            a[i] = _mm256_add_ps(x0, x1);
        }
        _mm256_storeu_ps(s + (size_t)h * n + j, _mm256_mul_ps(reduce8(a), sc));
    }
}

// out[h][0 .. 8 NV) = sum_j s[h][j] V[j][...] for HN heads over one chunk of 8 NV dimensions: the
// accumulators stay in registers (HN * NV <= 12 of AVX2's 16) and each value row is converted once for
// the HN heads (before: one pass over V per head, loading and storing the output at every key).
template <typename T, int HN, int NV>
static inline void pv8_chunk(const float* s, int n, int sn, const T* vr, int R, float* out, int D) {
    __m256 acc[HN][NV];
#pragma GCC unroll 4
    for (int h = 0; h < HN; ++h)
#pragma GCC unroll 4
        for (int c = 0; c < NV; ++c) acc[h][c] = _mm256_setzero_ps();
    for (int j = 0; j < n; ++j, vr += R) {
#if EL_PF
        for (size_t b = 0; b < 8 * NV * sizeof(T); b += 64) _mm_prefetch((const char*)vr + EL_PF + b, _MM_HINT_T0);
#endif
        __m256 v[NV];
#pragma GCC unroll 4
        for (int c = 0; c < NV; ++c) v[c] = kv_load8(vr + 8 * c);
#pragma GCC unroll 4
        for (int h = 0; h < HN; ++h) {
            const __m256 p = _mm256_set1_ps(s[(size_t)h * sn + j]);
#pragma GCC unroll 4
            for (int c = 0; c < NV; ++c) acc[h][c] = _mm256_fmadd_ps(p, v[c], acc[h][c]);
        }
    }
#pragma GCC unroll 4
    for (int h = 0; h < HN; ++h)
#pragma GCC unroll 4
        for (int c = 0; c < NV; ++c) _mm256_storeu_ps(out + (size_t)h * D + 8 * c, acc[h][c]);
}

template <typename T, int HN>
static void pv8_heads(const float* s, int n, int sn, const T* V, int D, float* acc_out) {
    const int R = kv_row<T>(D);
    for (int d0 = 0; d0 < D; d0 += 32) {
        switch ((D - d0 < 32 ? D - d0 : 32) / 8) {
            case 4: pv8_chunk<T, HN, 4>(s, n, sn, V + d0, R, acc_out + d0, D); break;
            case 3: pv8_chunk<T, HN, 3>(s, n, sn, V + d0, R, acc_out + d0, D); break;
            case 2: pv8_chunk<T, HN, 2>(s, n, sn, V + d0, R, acc_out + d0, D); break;
            default: pv8_chunk<T, HN, 1>(s, n, sn, V + d0, R, acc_out + d0, D); break;
        }
    }
}
#endif
