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
// next_k / next_bytes: the key rows the caller reads next (its next task's), prefetched a share per block of
// keys while the scores are computed, or null.
template <typename T>
void attend_group(const float* q, int rep, const T* K, const T* V, int n, int D, float scale, float softcap,
                  float* s, float* acc_out, float* m_out, float* l_out, const void* next_k = nullptr,
                  size_t next_bytes = 0);
// number of key ranges each (sequence, kv head) is split into, so every thread has work
#define ATTN_MAX_PARTS 8
int attn_parts(int nkeys);

// ---- the fused decode step's attention tasks (fused_decode.cpp) ----

// Attention task t of layer l: (sequence, KV head, key-range part) -> its sequence/layer index i, the
// keys k0..k1-1 it reads and their offset in the cache; false for a part the sequence does not use.
struct AttnTask {
    int b, kh, i, k0, k1;
    size_t base;
};

template <typename T>
static inline bool attn_task(int t, int l, int L, int nkv, int P, int D, const int32_t* cap, const int32_t* widx,
                             const int32_t* kfrom, AttnTask* a) {
    a->b = t / (nkv * P);
    a->kh = (t / P) % nkv;
    a->i = a->b * L + l;
    const int pi = t % P, n = widx[a->i] - kfrom[a->i] + 1, np = attn_parts(n);
    if (pi >= np) return false;
    a->k0 = (int)((int64_t)n * pi / np);
    a->k1 = (int)((int64_t)n * (pi + 1) / np);
    a->base = ((size_t)a->kh * cap[a->i] + kfrom[a->i] + a->k0) * kv_row<T>(D);
    return true;
}

// The first EL_PF bytes of a task's keys and values (attend_group prefetches the rest as it goes): each
// (sequence, KV head) reads caches of its own, and when the weights streaming through the step have
// evicted them, waiting for those first lines cost more than the task's arithmetic (batched SmolLM2
// steps: attention 0.9 ms of 3.1).
template <typename T>
static inline void prefetch_task(const AttnTask& a, int D, T* const* kc, T* const* vc) {
    size_t bytes = (size_t)(a.k1 - a.k0) * kv_row<T>(D) * sizeof(T);
    bytes = bytes < (size_t)EL_PF ? bytes : (size_t)EL_PF;
    for (size_t o = 0; o < bytes; o += 64) {
        __builtin_prefetch((const char*)(kc[a.i] + a.base) + o, 0, 3);
        __builtin_prefetch((const char*)(vc[a.i] + a.base) + o, 0, 3);
    }
}

// The cache rows sequence/layer i's new key and value go to, fetched for writing a product ahead of the rope
// phase (the weight stream evicted them). 8-row SmolLM2 step +1.3% (same-build ABBA); one row: no change.
template <typename T>
static inline void prefetch_kv_dest(int i, int nkv, int D, const int32_t* cap, const int32_t* widx, T* const* kc,
                                    T* const* vc) {
    for (int kh = 0; kh < nkv; ++kh) {
        const size_t off = ((size_t)kh * cap[i] + widx[i]) * kv_row<T>(D);
        for (size_t o = 0; o < (size_t)kv_row<T>(D) * sizeof(T); o += 64) {
            __builtin_prefetch((const char*)(kc[i] + off) + o, 1, 3);
            __builtin_prefetch((const char*)(vc[i] + off) + o, 1, 3);
        }
    }
}
