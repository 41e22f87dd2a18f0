// Decode attention: scores, softmax and the weighted sum of values for the query heads of one KV head.
#include "attention.h"

#if EL_VNNI
// a[16] -> one vector whose lane 4k+m is the sum of the lanes of a[k+4m]
static inline __m512 reduce16(const __m512* a) {
    __m512 c[8], e[4], g[2];
    for (int i = 0; i < 8; ++i)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)
        e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; ++i)
        g[i] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * i], e[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(e[2 * i], e[2 * i + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(g[0], g[1], 0x88), _mm512_shuffle_ps(g[0], g[1], 0xDD));
}
#endif

#if EL_VNNI
// out[h][0 .. 16 NV) = sum_j s[h][j] V[j][...] for HN heads over one chunk of at most 64 dimensions (the
// last vector masked by `last`). Every index into acc is a compile-time constant and every loop over it is
// unrolled (the pragmas: GCC left some instances rolled): otherwise GCC keeps the array in memory and
// stores all of it after every key (the PV loop ran at a third of its speed).
template <typename T, int HN, int NV>
static inline void pv_chunk(const float* s, int n, int sn, const T* vr, int R, __mmask16 last, float* out, int D) {
    __m512 acc[HN][NV];
#pragma GCC unroll 8
    for (int h = 0; h < HN; ++h)
#pragma GCC unroll 4
        for (int c = 0; c < NV; ++c) acc[h][c] = _mm512_setzero_ps();
    for (int j = 0; j < n; ++j, vr += R) {
#if EL_PF
        for (size_t b = 0; b < 16 * NV * sizeof(T); b += 64) _mm_prefetch((const char*)vr + EL_PF + b, _MM_HINT_T0);
#endif
        __m512 v[NV];
#pragma GCC unroll 4
        for (int c = 0; c < NV; ++c) v[c] = kv_load(vr + 16 * c, c == NV - 1 ? last : (__mmask16)0xffff);
#pragma GCC unroll 8
        for (int h = 0; h < HN; ++h) {
            const __m512 p = _mm512_set1_ps(s[(size_t)h * sn + j]);
#pragma GCC unroll 4
            for (int c = 0; c < NV; ++c) acc[h][c] = _mm512_fmadd_ps(p, v[c], acc[h][c]);
        }
    }
#pragma GCC unroll 8
    for (int h = 0; h < HN; ++h)
#pragma GCC unroll 4
        for (int c = 0; c < NV; ++c)
            _mm512_mask_storeu_ps(out + (size_t)h * D + 16 * c, c == NV - 1 ? last : (__mmask16)0xffff, acc[h][c]);
}

template <typename T, int HN>
static void pv_heads(const float* s, int n, int sn, const T* V, int D, float* acc_out) {
    const int R = kv_row<T>(D);
    for (int d0 = 0; d0 < D; d0 += 64) {
        const int w = D - d0 < 64 ? D - d0 : 64;
        const __mmask16 last = (__mmask16)((w & 15) ? ((1u << (w & 15)) - 1) : 0xffff);
        switch ((w + 15) / 16) {
            case 4: pv_chunk<T, HN, 4>(s, n, sn, V + d0, R, last, acc_out + d0, D); break;
            case 3: pv_chunk<T, HN, 3>(s, n, sn, V + d0, R, last, acc_out + d0, D); break;
            case 2: pv_chunk<T, HN, 2>(s, n, sn, V + d0, R, last, acc_out + d0, D); break;
            default: pv_chunk<T, HN, 1>(s, n, sn, V + d0, R, last, acc_out + d0, D); break;
        }
    }
}
#endif

#if EL_VNNI
// Scores of 16 consecutive keys (rows of R elements) for one query head of DC * 16 dimensions, the
// head's query held in registers and each key's dot product in two chains (the trip count is known:
// with D a run-time bound the loop ran one dependent fma per iteration)
template <typename T, int DC>
static inline __m512 qk16(const float* qh, const T* K, int R) {
    __m512 qv[DC];
    for (int c = 0; c < DC; ++c) qv[c] = _mm512_loadu_ps(qh + 16 * c);
    __m512 a[16];
    for (int i = 0; i < 16; ++i) {
        const T* kr = K + (size_t)(4 * (i & 3) + (i >> 2)) * R;
        __m512 x0 = _mm512_mul_ps(kv_load(kr, 0xffff), qv[0]);
        __m512 x1 = DC > 1 ? _mm512_mul_ps(kv_load(kr + 16, 0xffff), qv[1]) : _mm512_setzero_ps();
        for (int c = 2; c < DC; c += 2) {
            x0 = _mm512_fmadd_ps(kv_load(kr + 16 * c, 0xffff), qv[c], x0);
            if (c + 1 < DC) x1 = _mm512_fmadd_ps(kv_load(kr + 16 * c + 16, 0xffff), qv[c + 1], x1);
        }
        a[i] = _mm512_add_ps(x0, x1);
    }
    return reduce16(a);
}

// scores (times sc) of keys j..j+15 for every one of the rep query heads, D = 64 or 128
template <typename T>
static inline void qk16_heads(const float* q, int rep, int D, const T* K, int R, __m512 sc, float* s, int n, int j) {
    for (int h = 0; h < rep; ++h) {
        const __m512 r = D == 64 ? qk16<T, 4>(q + (size_t)h * D, K, R) : qk16<T, 8>(q + (size_t)h * D, K, R);
        _mm512_storeu_ps(s + (size_t)h * n + j, _mm512_mul_ps(r, sc));
    }
}
#endif

#include "attention_avx2.h"  // the AVX2 build's scores and weighted sums

#if EL_PF && (EL_VNNI || EL_AVX2)
// prefetch `count` rows (R elements each), `ahead` bytes ahead of `rows`
template <typename T>
static inline void prefetch_rows(const T* rows, int count, int R, size_t ahead = EL_PF) {
    const char* pf = (const char*)rows + ahead;
    for (size_t b = 0; b < (size_t)count * R * sizeof(T); b += 64) _mm_prefetch(pf + b, _MM_HINT_T0);
}

// What one block of keys' scores fetches beside its own keys: the block's value rows (read by the weighted
// sum after the softmax) and the next share of the caller's next key rows. A batched decode step's caches
// come from DRAM (the weight stream evicts them between steps), and fetched only as they were read, each
// task's loads waited for memory, then its arithmetic ran with the memory idle: the same task over cached
// rows took half the time. Spread over the score blocks, 8-row SmolLM2 steps' attention -14..-18%
// (0.86-0.95 -> 0.72-0.79 ms; 1.71 -> 1.54 after 200-token prompts), one row unchanged or better.
struct BlockPrefetch {
    const char* next;
    size_t lines, share, at = 0;
    BlockPrefetch(const void* next_k, size_t bytes, int blocks)
        : next((const char*)next_k), lines(next_k ? bytes / 64 : 0),
          share(blocks > 0 ? (lines + blocks - 1) / blocks : 0) {}
    template <typename T>
    inline void operator()(const T* vrows, int count, int R) {
        prefetch_rows(vrows, count, R, 0);
        for (size_t q = 0; q < share && at < lines; ++q, ++at) _mm_prefetch(next + at * 64, _MM_HINT_T0);
    }
};
#endif

// ks[i] = scale times key row i's own scale (int8 rows), for `count` rows from `rows`
template <typename T>
static inline void key_scales(const T* rows, int count, int R, int D, float scale, float* ks) {
    for (int i = 0; i < count; ++i) ks[i] = kv_scale(rows + (size_t)i * R, D) * scale;
}

template <typename T>
void attend_group(const float* q, int rep, const T* K, const T* V, int n, int D, float scale, float softcap,
                  float* s, float* acc_out, float* m_out, float* l_out, const void* next_k, size_t next_bytes) {
    int j = 0;
    const int R = kv_row<T>(D);
    const bool scaled = sizeof(T) == 1;  // int8 rows carry their own scale
#if EL_VNNI
    const __mmask16 tail = (__mmask16)((D & 15) ? ((1u << (D & 15)) - 1) : 0xffff);
    const int Dfull = D & ~15;
#if EL_PF
    BlockPrefetch fetch(next_k, next_bytes, n / 16);
#endif
    for (; j + 16 <= n; j += 16) {
#if EL_PF
        prefetch_rows(K + (size_t)j * R, 16, R);
        fetch(V + (size_t)j * R, 16, R);
#endif
        __m512 sc16 = _mm512_set1_ps(scale);
        if (scaled) {
            alignas(64) float ks[16];
            key_scales(K + (size_t)j * R, 16, R, D, scale, ks);
            sc16 = _mm512_load_ps(ks);
        }
        if (D == 64 || D == 128) {
            if (sizeof(T) != 4 && rep > 1) {  // 16-bit / 8-bit keys: converted once for all the heads
                alignas(64) float kf[16 * 128];
                for (int i = 0; i < 16; ++i)
                    for (int d = 0; d < D; d += 16)
                        _mm512_store_ps(kf + i * D + d, kv_load(K + (size_t)(j + i) * R + d, 0xffff));
                qk16_heads<float>(q, rep, D, kf, D, sc16, s, n, j);
            } else {
                qk16_heads<T>(q, rep, D, K + (size_t)j * R, R, sc16, s, n, j);
            }
            continue;
        }
        for (int h = 0; h < rep; ++h) {
            const float* qh = q + (size_t)h * D;
            __m512 a[16];
            for (int i = 0; i < 16; ++i) {
                const T* kr = K + (size_t)(j + 4 * (i & 3) + (i >> 2)) * R;
                __m512 acc = _mm512_setzero_ps();
                int d = 0;
                for (; d < Dfull; d += 16) acc = _mm512_fmadd_ps(kv_load(kr + d, 0xffff), _mm512_loadu_ps(qh + d), acc);
                if (d < D) acc = _mm512_fmadd_ps(kv_load(kr + d, tail), _mm512_maskz_loadu_ps(tail, qh + d), acc);
                a[i] = acc;
            }
            _mm512_storeu_ps(s + (size_t)h * n + j, _mm512_mul_ps(reduce16(a), sc16));
        }
    }
    for (; j < n; ++j) {  // the last n % 16 keys one at a time (the scalar loop below converts each
                          // float16 element in software: it used to cost more than all the rest)
        const T* kr = K + (size_t)j * R;
        const float sj = kv_scale(kr, D) * scale;
        for (int h = 0; h < rep; ++h) {
            const float* qh = q + (size_t)h * D;
            __m512 acc = _mm512_setzero_ps();
            int d = 0;
            for (; d < Dfull; d += 16) acc = _mm512_fmadd_ps(kv_load(kr + d, 0xffff), _mm512_loadu_ps(qh + d), acc);
            if (d < D) acc = _mm512_fmadd_ps(kv_load(kr + d, tail), _mm512_maskz_loadu_ps(tail, qh + d), acc);
            s[(size_t)h * n + j] = _mm512_reduce_add_ps(acc) * sj;
        }
    }
#elif EL_AVX2
    if (D % 8 == 0 && D <= 256) {
        alignas(32) float kf[8 * 256];
#if EL_PF
        BlockPrefetch fetch(next_k, next_bytes, n / 8);
#endif
        for (; j + 8 <= n; j += 8) {
#if EL_PF
            prefetch_rows(K + (size_t)j * R, 8, R);
            fetch(V + (size_t)j * R, 8, R);
#endif
            __m256 sc8 = _mm256_set1_ps(scale);
            if (scaled) {
                alignas(32) float ks[8];
                key_scales(K + (size_t)j * R, 8, R, D, scale, ks);
                sc8 = _mm256_load_ps(ks);
            }
            if (sizeof(T) == 4) {  // float32 rows are read in place
                qk8_heads(q, rep, D, (const float*)(const void*)(K + (size_t)j * R), R, sc8, s, n, j);
                continue;
            }
            for (int i = 0; i < 8; ++i)  // each row converted once for all the heads
                for (int d = 0; d < D; d += 8) _mm256_store_ps(kf + i * D + d, kv_load8(K + (size_t)(j + i) * R + d));
            qk8_heads(q, rep, D, kf, D, sc8, s, n, j);
        }
    }
#endif
    for (; j < n; ++j) {
        const T* kr = K + (size_t)j * R;
        const float sj = kv_scale(kr, D) * scale;
        for (int h = 0; h < rep; ++h) s[(size_t)h * n + j] = dot_kv(q + (size_t)h * D, kr, D) * sj;
    }
    if (softcap > 0.f) {
        const float inv = 1.0f / softcap;
        for (size_t i = 0; i < (size_t)rep * n; ++i) s[i] = tanhf(s[i] * inv) * softcap;
    }
    for (int h = 0; h < rep; ++h) {
        float* sh = s + (size_t)h * n;
        float mx = -INFINITY, sum = 0.f;
        int i = 0;
#if EL_VNNI
        __m512 vmx = _mm512_set1_ps(-INFINITY);
        for (; i + 16 <= n; i += 16) vmx = _mm512_max_ps(vmx, _mm512_loadu_ps(sh + i));
        mx = _mm512_reduce_max_ps(vmx);
#endif
        for (; i < n; ++i) mx = sh[i] > mx ? sh[i] : mx;
        i = 0;
#if EL_VNNI
        __m512 vs = _mm512_setzero_ps();
        const __m512 vm = _mm512_set1_ps(mx);
        for (; i + 16 <= n; i += 16) {
            const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sh + i), vm));
            _mm512_storeu_ps(sh + i, e);
            vs = _mm512_add_ps(vs, e);
        }
        if (i < n) {
            const __mmask16 mk = (__mmask16)((1u << (n - i)) - 1);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sh + i), vm));
            _mm512_mask_storeu_ps(sh + i, mk, e);
            vs = _mm512_add_ps(vs, _mm512_maskz_mov_ps(mk, e));
            i = n;
        }
        sum = hsum(vs);
#elif EL_AVX2
        __m256 vs = _mm256_setzero_ps();
        const __m256 vm = _mm256_set1_ps(mx);
        for (; i + 8 <= n; i += 8) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sh + i), vm));
            _mm256_storeu_ps(sh + i, e);
            vs = _mm256_add_ps(vs, e);
        }
        sum = hsum8(vs);
#endif
        for (; i < n; ++i) {
            sh[i] = expf(sh[i] - mx);
            sum += sh[i];
        }
        m_out[h] = mx;
        l_out[h] = sum;
    }
    if (scaled)  // the value rows' scales go with the weights of the sum (after l above)
        for (j = 0; j < n; ++j) {
            const float vs = kv_scale(V + (size_t)j * R, D);
            for (int h = 0; h < rep; ++h) s[(size_t)h * n + j] *= vs;
        }
#if EL_VNNI
    for (int h0 = 0; h0 < rep; h0 += 6) {
        const int hn = rep - h0 < 6 ? rep - h0 : 6;
        const float* sh = s + (size_t)h0 * n;
        float* ao = acc_out + (size_t)h0 * D;
        switch (hn) {
            case 1: pv_heads<T, 1>(sh, n, n, V, D, ao); break;
            case 2: pv_heads<T, 2>(sh, n, n, V, D, ao); break;
            case 3: pv_heads<T, 3>(sh, n, n, V, D, ao); break;
            case 4: pv_heads<T, 4>(sh, n, n, V, D, ao); break;
            case 5: pv_heads<T, 5>(sh, n, n, V, D, ao); break;
            default: pv_heads<T, 6>(sh, n, n, V, D, ao); break;
        }
    }
#else
#if EL_AVX2
    if (D % 8 == 0) {
        for (int h0 = 0; h0 < rep; h0 += 3) {
            const int hn = rep - h0 < 3 ? rep - h0 : 3;
            const float* sh = s + (size_t)h0 * n;
            float* ao = acc_out + (size_t)h0 * D;
            switch (hn) {
                case 1: pv8_heads<T, 1>(sh, n, n, V, D, ao); break;
                case 2: pv8_heads<T, 2>(sh, n, n, V, D, ao); break;
                default: pv8_heads<T, 3>(sh, n, n, V, D, ao); break;
            }
        }
        return;
    }
#endif
    for (int h = 0; h < rep; ++h) {
        float* o = acc_out + (size_t)h * D;
        for (int d = 0; d < D; ++d) o[d] = 0.f;
        for (j = 0; j < n; ++j) axpy_kv(o, s[(size_t)h * n + j], V + (size_t)j * R, D);
    }
#endif
}


// Key-range parts of one sequence's attention: a function of its own number of keys only (not of the
// batch or the thread count), so a row's result is the same whichever rows are decoded with it.
int attn_parts(int nkeys) {
    const int p = nkeys / 128;
    return p < 1 ? 1 : p > ATTN_MAX_PARTS ? ATTN_MAX_PARTS : p;
}

template void attend_group<float>(const float*, int, const float*, const float*, int, int, float, float, float*, float*,
                                  float*, float*, const void*, size_t);
template void attend_group<uint16_t>(const float*, int, const uint16_t*, const uint16_t*, int, int, float, float, float*,
                                     float*, float*, float*, const void*, size_t);
template void attend_group<int8_t>(const float*, int, const int8_t*, const int8_t*, int, int, float, float, float*, float*,
                                   float*, float*, const void*, size_t);
