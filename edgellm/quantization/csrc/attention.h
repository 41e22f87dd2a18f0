// Key/value cache elements and the decode attention over them (attention.cpp).
#pragma once
#include "common.h"

// key/value cache elements: float32, float16 (stored as uint16 bits) or int8. An int8 row (one head,
// one position) is D codes followed by its float32 scale (4 bytes): value = code * scale, as
// edgellm/engine/kv_pool.py writes them. Attention applies the row scales to whole dot products.
static inline float kv_get(const float* p, size_t i) { return p[i]; }
static inline float kv_get(const uint16_t* p, size_t i) { return half_to_float(p[i]); }
static inline float kv_get(const int8_t* p, size_t i) { return (float)p[i]; }

template <typename T>
static inline int kv_row(int D) {  // elements per cache row
    return sizeof(T) == 1 ? D + 4 : D;
}
template <typename T>
static inline float kv_scale(const T*, int) {
    return 1.0f;
}
static inline float kv_scale(const int8_t* row, int D) {
    float s;
    memcpy(&s, row + D, 4);
    return s;
}

static inline void kv_put(float* dst, const float* src, int n) { memcpy(dst, src, sizeof(float) * n); }
static inline void kv_put(uint16_t* dst, const float* src, int n) {
    int i = 0;
#if EL_VNNI
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i*)(dst + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif EL_AVX2
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i*)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; i < n; ++i) dst[i] = float_to_half(src[i]);
}

// codes round(x / scale), scale = max|x| / 127 (0 for an all-zero row), as kv_pool.quantize_rows
static inline void kv_put(int8_t* dst, const float* src, int n) {
    float amax = 0.f;
    for (int i = 0; i < n; ++i) amax = fmaxf(amax, fabsf(src[i]));
    const float scale = amax / 127.0f;
    for (int i = 0; i < n; ++i) dst[i] = scale > 0.f ? (int8_t)nearbyintf(src[i] / scale) : 0;
    memcpy(dst + n, &scale, 4);
}

#if EL_VNNI
static inline __m512 kv_load(const int8_t* p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}
static inline __m512 kv_load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 kv_load(const uint16_t* p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
#endif

#if EL_AVX2
static inline __m256 kv_load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 kv_load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline __m256 kv_load8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
#endif

template <typename T>
static inline float dot_kv(const float* q, const T* k, int D) {
    int d = 0;
    float s = 0.f;
#if EL_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; d + 16 <= D; d += 16) {
        a0 = _mm256_fmadd_ps(kv_load8(k + d), _mm256_loadu_ps(q + d), a0);
        a1 = _mm256_fmadd_ps(kv_load8(k + d + 8), _mm256_loadu_ps(q + d + 8), a1);
    }
    s = hsum8(_mm256_add_ps(a0, a1));
#endif
    for (; d < D; ++d) s += q[d] * kv_get(k, d);
    return s;
}

template <typename T>
static inline void axpy_kv(float* o, float p, const T* v, int D) {
    int d = 0;
#if EL_AVX2
    const __m256 vp = _mm256_set1_ps(p);
    for (; d + 8 <= D; d += 8) _mm256_storeu_ps(o + d, _mm256_fmadd_ps(vp, kv_load8(v + d), _mm256_loadu_ps(o + d)));
#endif
    for (; d < D; ++d) o[d] += p * kv_get(v, d);
}

// Attention of the `rep` query heads that share one key/value head, over keys [0, n) of K/V
// (one part of the sequence: parts are merged by the caller). Each key and value row is read
// once for all the heads. Outputs per head: unnormalized sum_j exp(s_j - m) v_j, m, and
// l = sum_j exp(s_j - m). s = scratch of rep * n floats. softcap > 0: scores become
// tanh(s / softcap) * softcap before the softmax. Instantiated for float, uint16_t (float16), int8_t.
template <typename T>
void attend_group(const float* q, int rep, const T* K, const T* V, int n, int D, float scale, float softcap,
                  float* s, float* acc_out, float* m_out, float* l_out);
// number of key ranges each (sequence, kv head) is split into, so every thread has work
#define ATTN_MAX_PARTS 8
int attn_parts(int nkeys);
