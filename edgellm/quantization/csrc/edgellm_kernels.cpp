// edgellm native CPU kernels (built at first use by edgellm/quantization/kernels.py, cached).
//
// Plain C ABI (no PyTorch headers, so it compiles in about a second), called through ctypes
// with tensor data pointers. Threads come from the OpenMP runtime PyTorch already loaded.
//
// Weight layout ("repacked at load"; the disk layout stays MLC's):
//   rows are grouped in blocks of 16 (N padded to a multiple of 16, padded rows have zero scale);
//   fmt 4 (q4*/q3*: codes 0..15 in nibbles, value = (code - off) * scale):
//       per row block, per 8 consecutive columns c..c+7, 64 bytes: byte 4r+j holds
//       code(row r, col c+j) in its low nibble and code(row r, col c+4+j) in its high nibble;
//   fmt 8 (q8f16_1: value = (code - 128) * scale, code = q + 128):
//       per row block, per 4 columns c..c+3, 64 bytes: byte 4r+j = code(row r, col c+j);
//   scales: [row blocks][groups][16] (f16 or f32);
//   fmt 32: plain float32 [N][K] weights (unquantized models).
//
// Quantized products: each group of `gs` activations is written as a 16-bit integer (magnitude
// up to ACT_MAX) times a per-group float scale, split into two signed bytes, and multiplied with
// the unsigned weight codes by AVX512-VNNI (vpdpbusd). The integer dot product of a group is
// exact; the only rounding is the activation's 2^-15 relative step, far below the f16 rounding
// of the weights' own scales: results match the float32 dequantized reference to about 1e-5, and
// a row's result never depends on the other rows in the product (batching changes no token).

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <omp.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__F16C__)
#define EL_VNNI 1
#else
#define EL_VNNI 0
#endif
// AVX2 + FMA + F16C (x86-64-v3 laptops without AVX-512): the same integer arithmetic with
// vpmaddubsw (or AVX-VNNI's vpdpbusd when present) on 256-bit vectors.
#if !EL_VNNI && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define EL_AVX2 1
#else
#define EL_AVX2 0
#endif
#if EL_VNNI || EL_AVX2
#include <immintrin.h>
#endif

#define EL_API extern "C"
#ifndef EL_STREAMS
#define EL_STREAMS 4  // weight streams per thread in single-row products
#endif
#ifndef EL_PF
#define EL_PF 4096  // software prefetch distance in bytes for weight / cache streams (0 = off)
#endif

struct ELinear {
    const uint8_t* w;     // fmt 4 / 8 codes (layout above)
    const void* scale;    // [Nb][G][16], f16 (half=1) or f32
    const float* bias;    // [N] or null
    const float* wf;      // fmt 32: [N][K] float32
    int32_t N, K, Kp, G, gs, fmt, half, off;
};

struct ELayer {
    const float* ln1;  // input RMSNorm weight [H]
    const float* ln2;  // post-attention RMSNorm weight [H]
    const float* qn;   // per-head q RMSNorm weight [D] (qwen3) or null
    const float* kn;
    ELinear qkv, o, gu, down;
};

struct EModel {
    int32_t L, H, nh, nkv, D, rot, I, maxpos;
    float eps, scale;
    const float* cos;  // [maxpos][rot]
    const float* sin;
    const ELayer* layers;
};

EL_API int el_version() { return 4; }
EL_API int el_has_vnni() { return EL_VNNI; }
EL_API int el_isa() { return EL_VNNI ? 512 : EL_AVX2 ? 256 : 0; }

// ------------------------------------------------------------------------------------------
// helpers

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; --exp; }
            man &= 0x3ff;
            bits = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float scale_at(const ELinear& L, size_t idx) {
    return L.half ? half_to_float(((const uint16_t*)L.scale)[idx]) : ((const float*)L.scale)[idx];
}

static inline int nib_code(const ELinear& L, int n, int k) {
    const int rb = n >> 4, r = n & 15, p = k >> 3, c = k & 7;
    const uint8_t b = L.w[((size_t)rb * (L.Kp >> 3) + p) * 64 + 4 * r + (c & 3)];
    return c < 4 ? (b & 15) : (b >> 4);
}

#if EL_VNNI
// exp(x) for float32 lanes: Cephes polynomial, about 1 ulp.
static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33654f)), _mm512_set1_ps(88.72283f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif

#if EL_AVX2
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.72283f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    __m256 y = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    // 2^n split in two factors so n = 128 (x near the top of the range) stays representable
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
    const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(y, f1), f2);
}

static inline float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}
#endif

static inline float dotf(const float* a, const float* b, int n) {
#if EL_VNNI
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
    }
    return hsum(_mm512_add_ps(s0, s1));
#elif EL_AVX2
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    float s = hsum8(_mm256_add_ps(s0, s1));
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
#else
    float s = 0.f;
    for (int i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
#endif
}

// y[i] += a * x[i]
static inline void axpy(float* y, float a, const float* x, int n) {
    int i = 0;
#if EL_VNNI
    __m512 va = _mm512_set1_ps(a);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i),
                                                        _mm512_maskz_loadu_ps(m, y + i)));
        return;
    }
#elif EL_AVX2
    const __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; ++i) y[i] += a * x[i];
}

// Reads `bytes` bytes with `nthreads` threads, each thread its own contiguous share as `streams`
// interleaved sequential streams (several streams per core reach more of the DRAM bandwidth);
// returns a checksum so the loads are not optimized away. The benchmark's bandwidth probe.
EL_API double el_read(const void* p, size_t bytes, int nthreads, int streams) {
    double total = 0;
    if (streams < 1) streams = 1;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const size_t chunk = bytes / nt / streams / 256 * 256;
        const char* base = (const char*)p + (size_t)t * chunk * streams;
#if EL_VNNI
        __m512 acc = _mm512_setzero_ps();
        for (size_t o = 0; o < chunk; o += 256)
            for (int s = 0; s < streams; ++s) {
                const float* f = (const float*)(base + s * chunk + o);
                acc = _mm512_add_ps(acc, _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(f), _mm512_loadu_ps(f + 16)),
                                                       _mm512_add_ps(_mm512_loadu_ps(f + 32), _mm512_loadu_ps(f + 48))));
            }
        total += hsum(acc);
#else
        float acc = 0;
        for (size_t o = 0; o < chunk; o += 256)
            for (int s = 0; s < streams; ++s) {
                const float* f = (const float*)(base + s * chunk + o);
                for (int j = 0; j < 64; j += 8) acc += f[j];
            }
        total += acc;
#endif
    }
    return total;
}

// ------------------------------------------------------------------------------------------
// repacking (load time)

// MLC words [N][Kp/epw] (value j of a word at bits*j) -> fmt 4 layout; rows >= N get `off`.
EL_API void el_repack_nib(const uint32_t* qw, int N, int Kp, int bits, int epw, int off, uint8_t* out, int nthreads) {
    const int Nb = (N + 15) / 16, P = Kp / 8, W = Kp / epw;
    const uint32_t mask = (1u << bits) - 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int rb = 0; rb < Nb; ++rb) {
        for (int r = 0; r < 16; ++r) {
            const int n = rb * 16 + r;
            const uint32_t* row = n < N ? qw + (size_t)n * W : nullptr;
            for (int p = 0; p < P; ++p) {
                uint8_t* o = out + ((size_t)rb * P + p) * 64 + 4 * r;
                for (int j = 0; j < 4; ++j) {
                    int lo = off, hi = off;
                    if (row) {
                        const int k0 = 8 * p + j, k1 = k0 + 4;
                        lo = (row[k0 / epw] >> (bits * (k0 % epw))) & mask;
                        hi = (row[k1 / epw] >> (bits * (k1 % epw))) & mask;
                    }
                    o[j] = (uint8_t)(lo | (hi << 4));
                }
            }
        }
    }
}

// int8 codes [N][Kp] -> fmt 8 layout (code + 128); rows >= N get 128 (zero).
EL_API void el_repack_q8(const int8_t* q, int N, int Kp, uint8_t* out, int nthreads) {
    const int Nb = (N + 15) / 16, C = Kp / 4;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int rb = 0; rb < Nb; ++rb) {
        for (int r = 0; r < 16; ++r) {
            const int n = rb * 16 + r;
            for (int c = 0; c < C; ++c) {
                uint8_t* o = out + ((size_t)rb * C + c) * 64 + 4 * r;
                for (int j = 0; j < 4; ++j)
                    o[j] = n < N ? (uint8_t)((int)q[(size_t)n * Kp + 4 * c + j] + 128) : (uint8_t)128;
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// dequantization: rows n0..n1-1 of the layer as float32 [n1-n0][K] (row stride ldo)

static void dequant_row(const ELinear& L, int n, float* o) {
    const int rb = n >> 4, r = n & 15, K = L.K, gs = L.gs;
    if (L.fmt == 32) {
        memcpy(o, L.wf + (size_t)n * K, sizeof(float) * K);
        return;
    }
    for (int g = 0; g < L.G; ++g) {
        const float s = scale_at(L, ((size_t)rb * L.G + g) * 16 + r);
        const int k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K;
        if (L.fmt == 4) {
            const float off = (float)L.off;
#if EL_VNNI || EL_AVX2
            const __m256i sh = _mm256_setr_epi32(0, 8, 16, 24, 4, 12, 20, 28);
            const __m256 vs = _mm256_set1_ps(s), voff = _mm256_set1_ps(off);
            int k = k0;
            for (; k + 8 <= k1; k += 8) {
                uint32_t u;
                memcpy(&u, L.w + ((size_t)rb * (L.Kp >> 3) + (k >> 3)) * 64 + 4 * r, 4);
                __m256i v = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)u), sh), _mm256_set1_epi32(15));
                _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(v), voff), vs));
            }
            for (; k < k1; ++k) o[k] = ((float)nib_code(L, n, k) - off) * s;
#else
            for (int k = k0; k < k1; ++k) o[k] = ((float)nib_code(L, n, k) - off) * s;
#endif
        } else {
            const int C = L.Kp >> 2;
            for (int k = k0; k < k1; ++k) {
                const uint8_t b = L.w[((size_t)rb * C + (k >> 2)) * 64 + 4 * r + (k & 3)];
                o[k] = ((float)b - 128.0f) * s;
            }
        }
    }
}

EL_API void el_dequant(const ELinear* L, int n0, int n1, float* out, int ldo, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = n0; n < n1; ++n) dequant_row(*L, n, out + (size_t)(n - n0) * ldo);
}

EL_API void el_gather(const ELinear* L, const int64_t* ids, int n, float* out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n > 4)
    for (int i = 0; i < n; ++i) dequant_row(*L, (int)ids[i], out + (size_t)i * L->K);
}

// ------------------------------------------------------------------------------------------
// activation quantization: x [M][K] (row stride ldx) -> per row: planes int8 [2][Kp] (value =
// plane0 + 256 * plane1), group scales [G], corrections [G][2] = -off * sum(plane values in the group)

static const int ACT_MAX = 127 * 256 + 127;  // the largest value two signed bytes hold

struct EAct {
    int8_t* planes;
    float* gsc;
    int32_t* corr;
    int Kp, G;
};

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

static void quant_act_rows(const ELinear& L, const float* x, int ldx, int m0, int m1, const EAct& A) {
    for (int m = m0; m < m1; ++m)
        quant_row(x + (size_t)m * ldx, L.K, L.Kp, L.gs, L.off, A.planes + (size_t)m * 2 * A.Kp,
                  A.gsc + (size_t)m * A.G, A.corr + (size_t)m * A.G * 2);
}

// ------------------------------------------------------------------------------------------
// y[m][n] = sum_k W[n][k] x[m][k] (+ bias) for one block of 16 rows

static inline void store_rows(const ELinear& L, int rb, const float* v, float* y) {
    const int n0 = rb * 16, cnt = L.N - n0 < 16 ? L.N - n0 : 16;
    for (int r = 0; r < cnt; ++r) y[n0 + r] = v[r] + (L.bias ? L.bias[n0 + r] : 0.f);
}

#if EL_VNNI
static inline __m512 load_scales(const ELinear& L, int rb, int g) {
    const size_t idx = ((size_t)rb * L.G + g) * 16;
    if (L.half) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)L.scale + idx)));
    return _mm512_loadu_ps((const float*)L.scale + idx);
}

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

static inline void store_block(const ELinear& L, int rb, __m512 acc, float* y) {
    const int n0 = rb * 16, cnt = L.N - n0 < 16 ? L.N - n0 : 16;
    const __mmask16 m = (__mmask16)(cnt == 16 ? 0xffff : ((1u << cnt) - 1));
    if (L.bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, L.bias + n0));
    _mm512_mask_storeu_ps(y + n0, m, acc);
}

// One activation row against NB row blocks at once (NB independent weight streams keep more
// memory requests in flight than one); split accumulators hide vpdpbusd latency.
template <int NB>
static void block_m1(const ELinear& L, const EAct& A, int m, const int* rbs, float* y) {
    const int G = L.G, Kp = L.Kp;
    const int8_t* pl = A.planes + (size_t)m * 2 * Kp;
    const float* gsc = A.gsc + (size_t)m * G;
    const int32_t* corr = A.corr + (size_t)m * G * 2;
    __m512 acc[NB];
    const uint8_t* w[NB];
    const size_t stride = (size_t)Kp * (L.fmt == 4 ? 8 : 16);
    for (int i = 0; i < NB; ++i) {
        acc[i] = _mm512_setzero_ps();
        w[i] = L.w + (size_t)rbs[i] * stride;
    }
    const __m512i mask = _mm512_set1_epi8(0x0F);
    for (int g = 0; g < G; ++g) {
        __m512i a0[NB], a1[NB], b0[NB], b1[NB];
        for (int i = 0; i < NB; ++i) {
            a0[i] = _mm512_set1_epi32(corr[2 * g]);
            a1[i] = _mm512_set1_epi32(corr[2 * g + 1]);
            b0[i] = b1[i] = _mm512_setzero_si512();
        }
        const int8_t* p0 = pl + g * L.gs;
        if (L.fmt == 4) {
            for (int p = 0; p < L.gs / 8; ++p, p0 += 8) {
                const __m512i x0 = bcast(p0), x1 = bcast(p0 + Kp);
                const __m512i y0 = bcast(p0 + 4), y1 = bcast(p0 + Kp + 4);
                for (int i = 0; i < NB; ++i) {
#if EL_PF
                    _mm_prefetch((const char*)w[i] + EL_PF, _MM_HINT_T0);
#endif
                    const __m512i v = _mm512_loadu_si512(w[i]);
                    w[i] += 64;
                    const __m512i lo = _mm512_and_si512(v, mask);
                    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
                    a0[i] = _mm512_dpbusd_epi32(a0[i], lo, x0);
                    a1[i] = _mm512_dpbusd_epi32(a1[i], lo, x1);
                    b0[i] = _mm512_dpbusd_epi32(b0[i], hi, y0);
                    b1[i] = _mm512_dpbusd_epi32(b1[i], hi, y1);
                }
            }
        } else {
            const int C = L.gs / 4;
            int c = 0;
            for (; c + 2 <= C; c += 2, p0 += 8) {
                const __m512i x0 = bcast(p0), x1 = bcast(p0 + Kp);
                const __m512i y0 = bcast(p0 + 4), y1 = bcast(p0 + Kp + 4);
                for (int i = 0; i < NB; ++i) {
#if EL_PF
                    _mm_prefetch((const char*)w[i] + EL_PF, _MM_HINT_T0);
                    _mm_prefetch((const char*)w[i] + EL_PF + 64, _MM_HINT_T0);
#endif
                    const __m512i v = _mm512_loadu_si512(w[i]), u = _mm512_loadu_si512(w[i] + 64);
                    w[i] += 128;
                    a0[i] = _mm512_dpbusd_epi32(a0[i], v, x0);
                    a1[i] = _mm512_dpbusd_epi32(a1[i], v, x1);
                    b0[i] = _mm512_dpbusd_epi32(b0[i], u, y0);
                    b1[i] = _mm512_dpbusd_epi32(b1[i], u, y1);
                }
            }
            for (; c < C; ++c, p0 += 4) {
                const __m512i x0 = bcast(p0), x1 = bcast(p0 + Kp);
                for (int i = 0; i < NB; ++i) {
                    const __m512i v = _mm512_loadu_si512(w[i]);
                    w[i] += 64;
                    a0[i] = _mm512_dpbusd_epi32(a0[i], v, x0);
                    a1[i] = _mm512_dpbusd_epi32(a1[i], v, x1);
                }
            }
        }
        const __m512 gs = _mm512_set1_ps(gsc[g]);
        for (int i = 0; i < NB; ++i) {
            const __m512i d = _mm512_add_epi32(_mm512_add_epi32(a0[i], b0[i]),
                                               _mm512_slli_epi32(_mm512_add_epi32(a1[i], b1[i]), 8));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(load_scales(L, rbs[i], g), gs), acc[i]);
        }
    }
    for (int i = 0; i < NB; ++i) store_block(L, rbs[i], acc[i], y);
}

// MB activation rows at once (weights unpacked once for all of them; 8 rows x 2 planes of
// accumulators still fit the 32 vector registers)
template <int MB>
static void block_mb(const ELinear& L, const EAct& A, int m0, int rb, float* y, int ldy) {
    const int G = L.G, Kp = L.Kp;
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    const __m512i mask = _mm512_set1_epi8(0x0F);
    const uint8_t* w = L.w + (size_t)rb * Kp * (L.fmt == 4 ? 8 : 16);
    for (int g = 0; g < G; ++g) {
        __m512i a0[MB], a1[MB];
        for (int m = 0; m < MB; ++m) {
            const int32_t* c = A.corr + ((size_t)(m0 + m) * G + g) * 2;
            a0[m] = _mm512_set1_epi32(c[0]);
            a1[m] = _mm512_set1_epi32(c[1]);
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
                for (int m = 0; m < MB; ++m) {
                    const int8_t* p0 = A.planes + (size_t)(m0 + m) * 2 * Kp + kg + 8 * p;
                    a0[m] = dpb(a0[m], lo, p0);
                    a1[m] = dpb(a1[m], lo, p0 + Kp);
                    a0[m] = dpb(a0[m], hi, p0 + 4);
                    a1[m] = dpb(a1[m], hi, p0 + Kp + 4);
                }
            }
        } else {
            for (int c = 0; c < L.gs / 4; ++c, w += 64) {
#if EL_PF
                _mm_prefetch((const char*)w + EL_PF, _MM_HINT_T0);
#endif
                const __m512i v = _mm512_loadu_si512(w);
                for (int m = 0; m < MB; ++m) {
                    const int8_t* p0 = A.planes + (size_t)(m0 + m) * 2 * Kp + kg + 4 * c;
                    a0[m] = dpb(a0[m], v, p0);
                    a1[m] = dpb(a1[m], v, p0 + Kp);
                }
            }
        }
        const __m512 sc = load_scales(L, rb, g);
        for (int m = 0; m < MB; ++m) {
            __m512i d = _mm512_add_epi32(a0[m], _mm512_slli_epi32(a1[m], 8));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d),
                                     _mm512_mul_ps(sc, _mm512_set1_ps(A.gsc[(size_t)(m0 + m) * G + g])), acc[m]);
        }
    }
    for (int m = 0; m < MB; ++m) store_block(L, rb, acc[m], y + (size_t)(m0 + m) * ldy);
}
#endif

#if !EL_VNNI && !EL_AVX2
// Portable path (no AVX2/AVX-512): the same integer arithmetic, scalar.
static void block_generic(const ELinear& L, const EAct& A, int m, int rb, float* y) {
    const int G = L.G, Kp = L.Kp;
    const int8_t* pl = A.planes + (size_t)m * 2 * Kp;
    float acc[16] = {0};
    for (int r = 0; r < 16; ++r) {
        const int n = rb * 16 + r;
        if (n >= L.N) break;
        for (int g = 0; g < G; ++g) {
            const int32_t* c = A.corr + ((size_t)m * G + g) * 2;
            int32_t a0 = c[0], a1 = c[1];
            for (int k = g * L.gs; k < (g + 1) * L.gs; ++k) {
                int code;
                if (L.fmt == 4) {
                    code = nib_code(L, n, k);
                } else {
                    code = L.w[((size_t)rb * (Kp >> 2) + (k >> 2)) * 64 + 4 * r + (k & 3)];
                }
                a0 += code * pl[k];
                a1 += code * pl[Kp + k];
            }
            const int32_t d = (int32_t)((uint32_t)a0 + ((uint32_t)a1 << 8));
            acc[r] += (float)d * (scale_at(L, ((size_t)rb * G + g) * 16 + r) * A.gsc[(size_t)m * G + g]);
        }
    }
    store_rows(L, rb, acc, y);
}
#endif

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

// one activation row, rows 0-7 and 8-15 of the block in two 256-bit halves
static void block_avx2(const ELinear& L, const EAct& A, int m, int rb, float* y) {
    const int G = L.G, Kp = L.Kp;
    const int8_t* pl = A.planes + (size_t)m * 2 * Kp;
    const float* gsc = A.gsc + (size_t)m * G;
    const int32_t* corr = A.corr + (size_t)m * G * 2;
    const __m256i mask = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8((char)0x80);
    const uint8_t* w = L.w + (size_t)rb * Kp * (L.fmt == 4 ? 8 : 16);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int g = 0; g < G; ++g) {
        const int8_t* p0 = pl + g * L.gs;
        __m256i x0, x1, y0, y1;
        if (L.fmt == 4) {
            x0 = y0 = _mm256_set1_epi32(corr[2 * g]);
            x1 = y1 = _mm256_set1_epi32(corr[2 * g + 1]);
            for (int p = 0; p < L.gs / 8; ++p, w += 64, p0 += 8) {
#if EL_PF
                _mm_prefetch((const char*)w + EL_PF, _MM_HINT_T0);
#endif
                const __m256i v0 = _mm256_loadu_si256((const __m256i*)w), v1 = _mm256_loadu_si256((const __m256i*)(w + 32));
                const __m256i lo0 = _mm256_and_si256(v0, mask), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), mask);
                const __m256i lo1 = _mm256_and_si256(v1, mask), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), mask);
                const __m256i b0 = bc8(p0), b1 = bc8(p0 + Kp);
                const __m256i c0 = bc8(p0 + 4), c1 = bc8(p0 + Kp + 4);
                x0 = dp_u8s8(dp_u8s8(x0, lo0, b0), hi0, c0);
                x1 = dp_u8s8(dp_u8s8(x1, lo0, b1), hi0, c1);
                y0 = dp_u8s8(dp_u8s8(y0, lo1, b0), hi1, c0);
                y1 = dp_u8s8(dp_u8s8(y1, lo1, b1), hi1, c1);
            }
        } else {  // signed weights (code - 128): the correction term is not needed
            x0 = x1 = y0 = y1 = _mm256_setzero_si256();
            for (int c = 0; c < L.gs / 4; ++c, w += 64, p0 += 4) {
#if EL_PF
                _mm_prefetch((const char*)w + EL_PF, _MM_HINT_T0);
#endif
                const __m256i v0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)w), flip);
                const __m256i v1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w + 32)), flip);
                const __m256i b0 = bc8(p0), b1 = bc8(p0 + Kp);
                x0 = dp_s8s8(x0, v0, b0);
                x1 = dp_s8s8(x1, v0, b1);
                y0 = dp_s8s8(y0, v1, b0);
                y1 = dp_s8s8(y1, v1, b1);
            }
        }
        const __m256i d0 = _mm256_add_epi32(x0, _mm256_slli_epi32(x1, 8));
        const __m256i d1 = _mm256_add_epi32(y0, _mm256_slli_epi32(y1, 8));
        const size_t idx = ((size_t)rb * G + g) * 16;
        __m256 s0, s1;
        if (L.half) {
            s0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)L.scale + idx)));
            s1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)L.scale + idx + 8)));
        } else {
            s0 = _mm256_loadu_ps((const float*)L.scale + idx);
            s1 = _mm256_loadu_ps((const float*)L.scale + idx + 8);
        }
        const __m256 gs = _mm256_set1_ps(gsc[g]);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(s0, gs), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_mul_ps(s1, gs), acc1);
    }
    alignas(32) float out[16];
    _mm256_store_ps(out, acc0);
    _mm256_store_ps(out + 8, acc1);
    store_rows(L, rb, out, y);
}
#endif

static void block_f32(const ELinear& L, const float* x, int ldx, int M, int rb, float* y, int ldy) {
    const int n0 = rb * 16, n1 = n0 + 16 < L.N ? n0 + 16 : L.N;
    for (int m = 0; m < M; ++m)
        for (int n = n0; n < n1; ++n)
            y[(size_t)m * ldy + n] = dotf(L.wf + (size_t)n * L.K, x + (size_t)m * ldx, L.K) + (L.bias ? L.bias[n] : 0.f);
}

// Work-shared product over row blocks (call inside a parallel region; ends with a barrier).
static void gemv_for(const ELinear& L, const float* x, int ldx, const EAct& A, int M, float* y, int ldy) {
    const int Nb = (L.N + 15) / 16;
#if EL_VNNI && EL_STREAMS > 1
    if (M == 1 && L.fmt != 32) {  // EL_STREAMS weight streams per thread: blocks i, i + per, i + 2 per...
        const int per = (Nb + EL_STREAMS - 1) / EL_STREAMS;
#pragma omp for schedule(static)
        for (int i = 0; i < per; ++i) {
            int rbs[EL_STREAMS], cnt = 0;
            for (int k = 0; k < EL_STREAMS; ++k)
                if (i + k * per < Nb) rbs[cnt++] = i + k * per;
            switch (cnt) {
                case 1: block_m1<1>(L, A, 0, rbs, y); break;
                case 2: block_m1<2>(L, A, 0, rbs, y); break;
#if EL_STREAMS > 2
                case 3: block_m1<3>(L, A, 0, rbs, y); break;
#endif
#if EL_STREAMS > 3
                case 4: block_m1<4>(L, A, 0, rbs, y); break;
#endif
                default: break;
            }
        }
        return;
    }
#endif
#pragma omp for schedule(static)
    for (int rb = 0; rb < Nb; ++rb) {
        if (L.fmt == 32) {
            block_f32(L, x, ldx, M, rb, y, ldy);
            continue;
        }
#if EL_VNNI
        int m = 0;
        if (M == 1) {
            block_m1<1>(L, A, 0, &rb, y);
            continue;
        }
        for (; m + 8 <= M; m += 8) block_mb<8>(L, A, m, rb, y, ldy);
        for (; m + 4 <= M; m += 4) block_mb<4>(L, A, m, rb, y, ldy);
        switch (M - m) {
            case 3: block_mb<3>(L, A, m, rb, y, ldy); break;
            case 2: block_mb<2>(L, A, m, rb, y, ldy); break;
            case 1: block_mb<1>(L, A, m, rb, y, ldy); break;
            default: break;
        }
#elif EL_AVX2
        for (int m = 0; m < M; ++m) block_avx2(L, A, m, rb, y + (size_t)m * ldy);
#else
        for (int m = 0; m < M; ++m) block_generic(L, A, m, rb, y + (size_t)m * ldy);
#endif
    }
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
        t_gsc = (float*)malloc(ng * sizeof(float));
        t_corr = (int32_t*)malloc(ng * 2 * sizeof(int32_t));
        t_cap_groups = ng;
    }
    EAct A;
    A.planes = t_planes;
    A.gsc = t_gsc;
    A.corr = t_corr;
    A.Kp = Kp;
    A.G = G;
    return A;
}

// y [M][N] (row stride ldy) = x [M][K] (row stride ldx) @ W^T + bias
EL_API void el_linear(const ELinear* Lp, const float* x, int M, int ldx, float* y, int ldy, int nthreads) {
    const ELinear& L = *Lp;
    EAct A = {};
    if (L.fmt != 32) A = act_buffers(M, L.Kp, L.G);
#pragma omp parallel num_threads(nthreads)
    {
        if (L.fmt != 32) {
#pragma omp for schedule(static)
            for (int m = 0; m < M; ++m) quant_act_rows(L, x, ldx, m, m + 1, A);
        }
        gemv_for(L, x, ldx, A, M, y, ldy);
    }
}

// ------------------------------------------------------------------------------------------
// fused decode step for Llama-shaped models (llama, mistral, qwen2, qwen3)

static void rmsnorm_row(const float* x, const float* w, int n, float eps, float* out) {
    const float ss = dotf(x, x, n);
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; ++i) out[i] = (x[i] * r) * w[i];
}

static void rope_head(float* x, const float* c, const float* s, int rot) {
    const int half = rot / 2;
    float tmp[512];
    for (int i = 0; i < half; ++i) {
        tmp[i] = x[i] * c[i] + (-x[i + half]) * s[i];
        tmp[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
    }
    memcpy(x, tmp, sizeof(float) * rot);
}

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

static inline uint16_t float_to_half(float f) {  // round to nearest even, as torch's .to(float16)
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    x &= 0x7fffffff;
    if (x >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (x > 0x7f800000 ? 0x200 : 0));  // inf / nan
    if (x >= 0x477ff000) return (uint16_t)(sign | 0x7c00);  // overflows to inf
    if (x < 0x38800000) {  // subnormal half (or zero)
        const uint32_t m = (x & 0x7fffff) | 0x800000;
        const int shift = 113 - (int)(x >> 23) + 13;
        if (shift > 24) return (uint16_t)sign;
        uint32_t h = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) ++h;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((x - 0x38000000) >> 13);
    const uint32_t rem = x & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
    return (uint16_t)(sign | h);
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
// (one part of the sequence: parts are merged by merge_parts). Each key and value row is read
// once for all the heads. Outputs per head: unnormalized sum_j exp(s_j - m) v_j, m, and
// l = sum_j exp(s_j - m). s = scratch of rep * n floats.
#if EL_VNNI
template <typename T, int HN>
static void pv_heads(const float* s, int n, int sn, const T* V, int D, float* acc_out) {
    const int R = kv_row<T>(D);
    for (int d0 = 0; d0 < D; d0 += 64) {
        const int w = D - d0 < 64 ? D - d0 : 64, nv = (w + 15) / 16;
        const __mmask16 last = (__mmask16)((w & 15) ? ((1u << (w & 15)) - 1) : 0xffff);
        __m512 acc[HN][4];
        for (int h = 0; h < HN; ++h)
            for (int c = 0; c < 4; ++c) acc[h][c] = _mm512_setzero_ps();
        const T* vr = V + d0;
        if (nv == 4 && last == 0xffff) {
            for (int j = 0; j < n; ++j, vr += R) {
#if EL_PF
                for (size_t b = 0; b < 64 * sizeof(T); b += 64) _mm_prefetch((const char*)vr + EL_PF + b, _MM_HINT_T0);
#endif
                const __m512 v0 = kv_load(vr, 0xffff), v1 = kv_load(vr + 16, 0xffff), v2 = kv_load(vr + 32, 0xffff),
                             v3 = kv_load(vr + 48, 0xffff);
                for (int h = 0; h < HN; ++h) {
                    const __m512 p = _mm512_set1_ps(s[(size_t)h * sn + j]);
                    acc[h][0] = _mm512_fmadd_ps(p, v0, acc[h][0]);
                    acc[h][1] = _mm512_fmadd_ps(p, v1, acc[h][1]);
                    acc[h][2] = _mm512_fmadd_ps(p, v2, acc[h][2]);
                    acc[h][3] = _mm512_fmadd_ps(p, v3, acc[h][3]);
                }
            }
        } else {
            for (int j = 0; j < n; ++j, vr += R) {
                __m512 v[4];
                for (int c = 0; c < nv; ++c) v[c] = kv_load(vr + 16 * c, c == nv - 1 ? last : 0xffff);
                for (int h = 0; h < HN; ++h) {
                    const __m512 p = _mm512_set1_ps(s[(size_t)h * sn + j]);
                    for (int c = 0; c < nv; ++c) acc[h][c] = _mm512_fmadd_ps(p, v[c], acc[h][c]);
                }
            }
        }
        for (int h = 0; h < HN; ++h)
            for (int c = 0; c < nv; ++c)
                _mm512_mask_storeu_ps(acc_out + (size_t)h * D + d0 + 16 * c, c == nv - 1 ? last : 0xffff, acc[h][c]);
    }
}
#endif

template <typename T>
static void attend_group(const float* q, int rep, const T* K, const T* V, int n, int D, float scale, float* s,
                         float* acc_out, float* m_out, float* l_out) {
    int j = 0;
    const int R = kv_row<T>(D);
    const bool scaled = sizeof(T) == 1;  // int8 rows carry their own scale
#if EL_VNNI
    const __mmask16 tail = (__mmask16)((D & 15) ? ((1u << (D & 15)) - 1) : 0xffff);
    const int Dfull = D & ~15;
    for (; j + 16 <= n; j += 16) {
#if EL_PF
        {
            const char* pf = (const char*)(K + (size_t)j * R) + EL_PF;
            for (size_t b = 0; b < 16 * (size_t)R * sizeof(T); b += 64) _mm_prefetch(pf + b, _MM_HINT_T0);
        }
#endif
        __m512 sc16 = _mm512_set1_ps(scale);
        if (scaled) {
            alignas(64) float ks[16];
            for (int i = 0; i < 16; ++i) ks[i] = kv_scale(K + (size_t)(j + i) * R, D) * scale;
            sc16 = _mm512_load_ps(ks);
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
#endif
    for (; j < n; ++j) {
        const T* kr = K + (size_t)j * R;
        const float sj = kv_scale(kr, D) * scale;
        for (int h = 0; h < rep; ++h) s[(size_t)h * n + j] = dot_kv(q + (size_t)h * D, kr, D) * sj;
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
    for (int h = 0; h < rep; ++h) {
        float* o = acc_out + (size_t)h * D;
        for (int d = 0; d < D; ++d) o[d] = 0.f;
        for (j = 0; j < n; ++j) axpy_kv(o, s[(size_t)h * n + j], V + (size_t)j * R, D);
    }
#endif
}

// number of key ranges each (sequence, kv head) is split into, so every thread has work
static int attn_parts(int B, int nkv, int nthreads, int maxkeys) {
    int p = (2 * nthreads + B * nkv - 1) / (B * nkv);
    if (p > 8) p = 8;
    const int by_len = maxkeys / 64;
    if (p > by_len) p = by_len;
    return p < 1 ? 1 : p;
}

#ifdef EL_PROF
#include <x86intrin.h>
extern "C" {
uint64_t el_prof[4][16];
}
#define EL_MARK(k)                                         \
    do {                                                   \
        uint64_t el_t1 = __rdtsc();                        \
        if (tid < 4) el_prof[tid][k] += el_t1 - el_t0;     \
        el_t0 = el_t1;                                     \
    } while (0)
#else
#define EL_MARK(k) \
    do {           \
    } while (0)
#endif

static size_t round64(size_t n) { return (n + 63) & ~(size_t)63; }

static int max_kp(const EModel& Mo, int* maxG) {
    int kp = 0, g = 0;
    for (int l = 0; l < Mo.L; ++l) {
        const ELinear* ls[4] = {&Mo.layers[l].qkv, &Mo.layers[l].o, &Mo.layers[l].gu, &Mo.layers[l].down};
        for (auto* L : ls) {
            if (L->Kp > kp) kp = L->Kp;
            if (L->G > g) g = L->G;
        }
    }
    *maxG = g;
    return kp;
}

EL_API size_t el_decode_scratch_bytes(const EModel* Mp, int B, int maxkeys, int nthreads) {
    const EModel& Mo = *Mp;
    int G;
    const int Kp = max_kp(Mo, &G);
    const int QKV = (Mo.nh + 2 * Mo.nkv) * Mo.D;
    size_t f = round64((size_t)B * Mo.H) * 2 + round64((size_t)B * QKV) + round64((size_t)B * Mo.nh * Mo.D) +
               round64((size_t)B * 2 * Mo.I) + round64((size_t)B * Mo.I) +
               round64((size_t)nthreads * maxkeys * (Mo.nh / Mo.nkv)) + round64((size_t)B * G) + round64((size_t)B * Mo.H) +
               round64((size_t)B * Mo.nh * 8 * (Mo.D + 2));
    return f * 4 + round64((size_t)B * G * 2) * 4 + round64((size_t)B * 2 * Kp) + 256;
}

template <typename T>
static void decode_impl(const EModel* Mp, int B, const int64_t* pos, float* h, T* const* kc, T* const* vc,
                        const int32_t* cap, const int32_t* widx, const int32_t* kfrom, void* scratch, int maxkeys,
                        int nthreads) {
    const EModel& Mo = *Mp;
    const int H = Mo.H, D = Mo.D, nh = Mo.nh, nkv = Mo.nkv, I = Mo.I, rot = Mo.rot;
    const int QKV = (nh + 2 * nkv) * D, rep = nh / nkv;
    int G;
    const int Kp = max_kp(Mo, &G);
    float* f = (float*)scratch;
    float* xn = f;
    f += round64((size_t)B * H);
    float* tmp = f;
    f += round64((size_t)B * H);
    float* qkv = f;
    f += round64((size_t)B * QKV);
    float* att = f;
    f += round64((size_t)B * nh * D);
    float* gu = f;
    f += round64((size_t)B * 2 * I);
    float* act = f;
    f += round64((size_t)B * I);
    float* sc = f;
    f += round64((size_t)nthreads * maxkeys * rep);
    int nmax = 1;
    for (int i = 0; i < Mo.L * B; ++i) nmax = widx[i] - kfrom[i] + 1 > nmax ? widx[i] - kfrom[i] + 1 : nmax;
    const int P = attn_parts(B, nkv, nthreads, nmax);
    float* part = f;  // [B][nkv][P][rep][D + 2]: unnormalized output, m, l
    f += round64((size_t)B * nh * 8 * (D + 2));
    EAct A;
    A.gsc = f;
    f += round64((size_t)B * G);
    f += round64((size_t)B * H);  // spare
    A.corr = (int32_t*)f;
    A.planes = (int8_t*)(A.corr + round64((size_t)B * G * 2));
    A.Kp = Kp;
    A.G = G;

#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num();
#ifdef EL_PROF
        uint64_t el_t0 = __rdtsc();
#endif
        for (int l = 0; l < Mo.L; ++l) {
            const ELayer& Ly = Mo.layers[l];
            EAct Aq = A;
            Aq.Kp = Ly.qkv.Kp;
            Aq.G = Ly.qkv.G;
#pragma omp single
            {
                for (int b = 0; b < B; ++b) {
                    if (l > 0)
                        for (int i = 0; i < H; ++i) h[(size_t)b * H + i] += tmp[(size_t)b * H + i];
                    rmsnorm_row(h + (size_t)b * H, Ly.ln1, H, Mo.eps, xn + (size_t)b * H);
                }
                if (Ly.qkv.fmt != 32) quant_act_rows(Ly.qkv, xn, H, 0, B, Aq);
            }
EL_MARK(0);
            gemv_for(Ly.qkv, xn, H, Aq, B, qkv, QKV);
EL_MARK(1);
            // q/k norms, rotary embedding, cache write
#pragma omp for schedule(static)
            for (int t = 0; t < B * (nh + nkv); ++t) {
                const int b = t / (nh + nkv), hd = t % (nh + nkv);
                float* x = qkv + (size_t)b * QKV + (size_t)hd * D;
                const float* nw = hd < nh ? Ly.qn : Ly.kn;
                if (nw) rmsnorm_row(x, nw, D, Mo.eps, x);
                const int64_t p = pos[b];
                rope_head(x, Mo.cos + p * rot, Mo.sin + p * rot, rot);
                if (hd >= nh) {
                    const int kh = hd - nh;
                    const size_t off = ((size_t)kh * cap[l * B + b] + widx[l * B + b]) * kv_row<T>(D);
                    kv_put(kc[l * B + b] + off, x, D);
                    kv_put(vc[l * B + b] + off, x + (size_t)nkv * D, D);
                }
            }
EL_MARK(2);
#pragma omp for schedule(static)
            for (int t = 0; t < B * nkv * P; ++t) {
                const int b = t / (nkv * P), kh = (t / P) % nkv, pi = t % P, i = l * B + b;
                const int n = widx[i] - kfrom[i] + 1, k0 = (int)((int64_t)n * pi / P), k1 = (int)((int64_t)n * (pi + 1) / P);
                const size_t base = ((size_t)kh * cap[i] + kfrom[i] + k0) * kv_row<T>(D);
                float* pr = part + (size_t)t * rep * (D + 2);
                attend_group(qkv + (size_t)b * QKV + (size_t)kh * rep * D, rep, kc[i] + base, vc[i] + base, k1 - k0, D,
                             Mo.scale, sc + (size_t)tid * maxkeys * rep, pr, pr + (size_t)rep * D,
                             pr + (size_t)rep * D + rep);
            }
EL_MARK(3);
            EAct Ao = A;
            Ao.Kp = Ly.o.Kp;
            Ao.G = Ly.o.G;
#pragma omp single
            {
                // merge the key-range parts of every (sequence, query head)
                for (int b = 0; b < B; ++b)
                    for (int hq = 0; hq < nh; ++hq) {
                        const int kh = hq / rep, r = hq % rep;
                        float M = -INFINITY;
                        for (int pi = 0; pi < P; ++pi) {
                            const float* pr = part + (size_t)((b * nkv + kh) * P + pi) * rep * (D + 2);
                            const float m = pr[(size_t)rep * D + r];
                            M = m > M ? m : M;
                        }
                        float* o = att + (size_t)b * nh * D + (size_t)hq * D;
                        float lsum = 0.f;
                        for (int d = 0; d < D; ++d) o[d] = 0.f;
                        for (int pi = 0; pi < P; ++pi) {
                            const float* pr = part + (size_t)((b * nkv + kh) * P + pi) * rep * (D + 2);
                            const float w = expf(pr[(size_t)rep * D + r] - M);
                            lsum += w * pr[(size_t)rep * D + rep + r];
                            axpy(o, w, pr + (size_t)r * D, D);
                        }
                        const float inv = 1.0f / lsum;
                        for (int d = 0; d < D; ++d) o[d] *= inv;
                    }
                if (Ly.o.fmt != 32) quant_act_rows(Ly.o, att, nh * D, 0, B, Ao);
            }
EL_MARK(4);
            gemv_for(Ly.o, att, nh * D, Ao, B, tmp, H);
EL_MARK(5);
            EAct Ag = A;
            Ag.Kp = Ly.gu.Kp;
            Ag.G = Ly.gu.G;
#pragma omp single
            {
                for (int b = 0; b < B; ++b) {
                    for (int i = 0; i < H; ++i) h[(size_t)b * H + i] += tmp[(size_t)b * H + i];
                    rmsnorm_row(h + (size_t)b * H, Ly.ln2, H, Mo.eps, xn + (size_t)b * H);
                }
                if (Ly.gu.fmt != 32) quant_act_rows(Ly.gu, xn, H, 0, B, Ag);
            }
EL_MARK(6);
            gemv_for(Ly.gu, xn, H, Ag, B, gu, 2 * I);
EL_MARK(7);
            {
                const int chunks = (I + 255) / 256;
#pragma omp for schedule(static)
                for (int t = 0; t < B * chunks; ++t) {
                    const int b = t / chunks, c0 = (t % chunks) * 256, n = I - c0 < 256 ? I - c0 : 256;
                    float* g = gu + (size_t)b * 2 * I;
                    // silu(gate) * up on a slice: pass a view whose "up" half is I further on
                    int i = 0;
#if EL_VNNI
                    for (; i + 16 <= n; i += 16) {
                        const __m512 gg = _mm512_loadu_ps(g + c0 + i), uu = _mm512_loadu_ps(g + I + c0 + i);
                        const __m512 sg = _mm512_div_ps(
                            gg, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), gg))));
                        _mm512_storeu_ps(act + (size_t)b * I + c0 + i, _mm512_mul_ps(sg, uu));
                    }
#elif EL_AVX2
                    for (; i + 8 <= n; i += 8) {
                        const __m256 gg = _mm256_loadu_ps(g + c0 + i), uu = _mm256_loadu_ps(g + I + c0 + i);
                        const __m256 sg = _mm256_div_ps(
                            gg, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), gg))));
                        _mm256_storeu_ps(act + (size_t)b * I + c0 + i, _mm256_mul_ps(sg, uu));
                    }
#endif
                    for (; i < n; ++i) {
                        const float gg = g[c0 + i];
                        act[(size_t)b * I + c0 + i] = (gg / (1.0f + expf(-gg))) * g[I + c0 + i];
                    }
                }
            }
EL_MARK(8);
            EAct Ad = A;
            Ad.Kp = Ly.down.Kp;
            Ad.G = Ly.down.G;
            if (Ly.down.fmt != 32) {
#pragma omp for schedule(static)
                for (int b = 0; b < B; ++b) quant_act_rows(Ly.down, act, I, b, b + 1, Ad);
            }
EL_MARK(9);
            gemv_for(Ly.down, act, I, Ad, B, tmp, H);
EL_MARK(10);
        }
#pragma omp single
        for (int b = 0; b < B; ++b)
            for (int i = 0; i < H; ++i) h[(size_t)b * H + i] += tmp[(size_t)b * H + i];
    }
}

// h [B][H]: hidden states of the B new tokens (in: embeddings, out: before the final norm).
// For layer l and sequence b (index l*B+b): kc/vc point at [nkv][cap][row] caches (kv_kind 0:
// float32, 1: float16, 2: int8 rows of D codes + a float32 scale), the new key goes to index
// widx, attention reads indices kfrom..widx.
EL_API void el_decode(const EModel* Mp, int B, const int64_t* pos, float* h, void* const* kc, void* const* vc,
                      const int32_t* cap, const int32_t* widx, const int32_t* kfrom, void* scratch, int maxkeys,
                      int nthreads, int kv_kind) {
    if (kv_kind == 2)
        decode_impl<int8_t>(Mp, B, pos, h, (int8_t* const*)kc, (int8_t* const*)vc, cap, widx, kfrom, scratch,
                            maxkeys, nthreads);
    else if (kv_kind == 1)
        decode_impl<uint16_t>(Mp, B, pos, h, (uint16_t* const*)kc, (uint16_t* const*)vc, cap, widx, kfrom, scratch,
                              maxkeys, nthreads);
    else
        decode_impl<float>(Mp, B, pos, h, (float* const*)kc, (float* const*)vc, cap, widx, kfrom, scratch, maxkeys,
                           nthreads);
}
