// Shared declarations of edgellm's native CPU kernels: the C ABI structs, the ISA selection, SIMD helpers.
//
// The library (built at first use by edgellm/quantization/kernels.py from every .cpp here, compiled
// together with -march=native, cached) has a plain C ABI: no PyTorch headers, called through ctypes
// with tensor data pointers. Threads come from the OpenMP runtime PyTorch already loaded.
//
// Files: common.h (this), info.cpp (ABI handshake, ISA, bandwidth probe), repack.cpp (weight layout,
// dequantization), linear.cpp (activation quantization, the product's dispatch, el_linear),
// linear_avx512.cpp / linear_avx2.cpp / linear_portable.cpp (the quantized product per ISA),
// linear_amx.cpp (AMX-int8 tiles for products of 8 rows or more; avx512.h: what it shares with AVX-512;
// amx_check.cpp: its self-test and timing),
// attention.h / attention.cpp (KV cache elements, decode attention), fused_decode.cpp (el_decode).
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
// Quantized products: each group of `gs` activations is written as an integer times a per-group
// float scale and multiplied with the unsigned weight codes by u8s8 dot products (AVX512-VNNI
// vpdpbusd, AVX-VNNI, or AVX2 vpmaddubsw + vpmaddwd). ELinear.abits picks the activations:
//   16 ("high"): magnitude up to ACT_MAX, split into two signed bytes (two planes). The integer dot
//      product of a group is exact; the only rounding is the activation's 2^-15 relative step, far
//      below the f16 rounding of the weights' own scales: within about 1e-5 of the float32
//      dequantized reference.
//   8 ("normal"): magnitude up to 127, one plane, as llama.cpp's Q8 activations: half the
//      integer work, a relative step of 2^-7 per group (perplexity moves by well under 1%).
// Every row is quantized on its own: a row's result never depends on the other rows in the product.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <omp.h>
#include <sched.h>

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
#if defined(__znver3__) || defined(__znver4__) || defined(__znver5__)
// AMD Zen 4/5 (GCC 12's -march=native names them znver3): two streams per thread read 1.5B-shaped
// weights at 58-59 GB/s where four reached 53-54 (alternating in one run, 78 GB/s read figure)
#define EL_STREAMS 2
#else
#define EL_STREAMS 4  // weight streams per thread in single-row products
#endif
#endif
#ifndef EL_STREAMS_AVX2
#define EL_STREAMS_AVX2 2  // AVX2 has 16 vector registers: two streams keep the accumulators in them
#endif
#ifndef EL_PF
#define EL_PF 4096  // software prefetch distance in bytes for weight / cache streams (0 = off)
#endif
// Weight streams are prefetched non-temporal: a step reads every weight once, and a whole model's are
// larger than the caches, so a normal fill only evicted what the step reads again (the KV cache,
// activations, the next layer's norms). In-process pairs on Zen 5 (AVX-512): SmolLM2 decode +7% (1
// stream, short context), +14% (after a 512-token prompt), +10% (8 streams); 1.5B shape +1..4%; prefill
// unchanged. AVX2 build on the same machine: 1 stream +5.5%, 8 streams unchanged.
#define EL_PF_HINT _MM_HINT_NTA

// The C ABI: kernels.py mirrors these structs (ctypes) and refuses a library whose el_abi_version()
// or el_sizeof() differ from its own. Bump EL_ABI_VERSION on any change of a struct or a signature.
#define EL_ABI_VERSION 10

struct ELinear {
    const uint8_t* w;     // fmt 4 / 8 codes (layout above)
    const void* scale;    // [Nb][G][16], f16 (half=1) or f32
    const float* bias;    // [N] or null
    const float* wf;      // fmt 32: [N][K] float32
    int32_t N, K, Kp, G, gs, fmt, half, off;
    int32_t abits;  // activation bits of quantized products: 16 (exact, "high") or 8 ("normal")
};

// activation planes per row: 2 for 16-bit activations (value = plane0 + 256 * plane1), 1 for 8-bit
static inline int act_planes(const ELinear& L) { return L.abits == 8 ? 1 : 2; }

// One decoder layer of the fused step, described generically (every family's layer is one of these):
//   x = h if parallel else h + pn1(attn(norm(h, ln1)))
//   h = h + pn1(attn(norm(h, ln1))) + pn2(mlp(norm(x, ln2)))
// norm is RMSNorm (norm=0) or LayerNorm with bias (norm=1); pn1/pn2 (Gemma 2's post norms) are
// RMSNorms or null; mlp = down(act(gate) * up) with gu = [gate; up] rows (gated=1) or down(act(up)).
struct ELayer {
    const float* ln1;   // input norm weight [H]
    const float* ln2;   // norm before the MLP [H]
    const float* ln1b;  // LayerNorm biases [H] (norm=1) or null
    const float* ln2b;
    const float* pn1;   // RMSNorm of the attention output [H] (gemma2) or null
    const float* pn2;   // RMSNorm of the MLP output [H] (gemma2) or null
    const float* qn;    // per-head q RMSNorm weight [D] (qwen3) or null
    const float* kn;
    int32_t norm;      // 0: RMSNorm, 1: LayerNorm with bias
    int32_t parallel;  // 1: the MLP reads the layer's input, not the attention's output (gpt_neox)
    int32_t act;       // 0: silu, 1: gelu (tanh approximation), 2: gelu (erf)
    int32_t gated;     // 1: gu holds [gate; up] (2I rows); 0: gu holds I rows
    ELinear qkv, o, gu, down;
};

struct EModel {
    int32_t L, H, nh, nkv, D, rot, I, maxpos;
    float eps, scale;
    float softcap;     // attention scores -> tanh(s / softcap) * softcap when > 0 (gemma2)
    const float* cos;  // [maxpos][rot]: the first rot dims of every head rotate (partial rotary)
    const float* sin;
    const ELayer* layers;
    // the step's tail, when the model's are of these kinds (else the caller runs its own modules):
    int32_t fn_kind;       // final norm: 0 RMSNorm, 1 LayerNorm (fn_b may be null), -1 none here
    const float* fn_w;
    const float* fn_b;
    const ELinear* head;   // the output matrix: el_decode writes logits [B][head->N] when given one
    const ELinear* embed;  // the token embedding (rows dequantized into h when el_decode is given ids) or null
};

// row n of a quantized (or float) matrix as float32 [K] (repack.cpp)
void dequant_row(const ELinear& L, int n, float* o);

static const int ACT_MAX = 127 * 256 + 127;  // the largest value two signed bytes hold

struct EAct {
    int8_t* planes;
    float* gsc;
    int32_t* corr;
    int Kp, G;
    // 8-bit activations of rows 0..M8-1 also in tiles of 8 rows, group-interleaved (null: none): planes8
    // [M8 / 8][G][8][gs], corr8 / gsc8 [M8 / 8][G][8]. The 8-row product (linear_avx512.cpp) reads a
    // group of all 8 rows from one base pointer.
    int8_t* planes8 = nullptr;
    int32_t* corr8 = nullptr;
    float* gsc8 = nullptr;
    int M8 = 0;
};

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

static inline size_t round64(size_t n) { return (n + 63) & ~(size_t)63; }

// The row blocks of single-row task i when each task walks `ns` weight streams over Nb blocks:
// i, i + per, i + 2 per... (those below Nb) into rbs; returns how many.
static inline int stream_blocks(int i, int per, int Nb, int ns, int* rbs) {
    int cnt = 0;
    for (int k = 0; k < ns; ++k)
        if (i + k * per < Nb) rbs[cnt++] = i + k * per;
    return cnt;
}

// y[n0 .. n0+15] = v + bias for one block of 16 rows (fewer at the end)
static inline void store_rows(const ELinear& L, int rb, const float* v, float* y) {
    const int n0 = rb * 16, cnt = L.N - n0 < 16 ? L.N - n0 : 16;
    for (int r = 0; r < cnt; ++r) y[n0 + r] = v[r] + (L.bias ? L.bias[n0 + r] : 0.f);
}

// ------------------------------------------------------------------------------------------
// The barrier between the phases of a parallel region. libgomp's own barrier spins only ~100
// times before it sleeps on a futex whenever the process holds more OpenMP threads than CPUs,
// which is the normal case here: PyTorch's pool on the main thread plus the engine thread's
// team. A decode step has ~7 barriers a layer; asleep, each cost tens of microseconds (measured:
// SmolLM2 decode 465 -> 114 tok/s once a second thread held a team). This one spins on a
// shared phase counter, then yields the CPU (an oversubscribed machine still makes progress).
// Every thread of the team calls wait(); declare it before the region (shared), zero-initialized.
struct EBarrier {
    std::atomic<int> arrived{0};
    std::atomic<unsigned> phase{0};

    void wait() {
        const int n = omp_get_num_threads();
        if (n == 1) return;
        const unsigned ph = phase.load(std::memory_order_acquire);
        if (arrived.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
            arrived.store(0, std::memory_order_relaxed);
            phase.store(ph + 1, std::memory_order_release);
            return;
        }
        for (int spins = 0; phase.load(std::memory_order_acquire) == ph; ++spins) {
            if (spins < (1 << 16)) {
#if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
#elif defined(__aarch64__)
                __asm__ __volatile__("yield");
#endif
            } else {
                sched_yield();
            }
        }
    }
};

// ------------------------------------------------------------------------------------------
// functions shared between the files

// the index of the largest of x[0..n) (the first on ties; the first NaN if any, as numpy's argmax)
int32_t argmax_row(const float* x, int n);
// activation rows m0..m1-1 of x (row stride ldx) quantized into A: row m's planes at
// A.planes + m * act_planes(L) * A.Kp, its group scales at A.gsc + m * A.G, its corrections at
// A.corr + m * A.G * act_planes(L) (linear.cpp)
void quant_act_rows(const ELinear& L, const float* x, int ldx, int m0, int m1, const EAct& A);
// y [M][N] (row stride ldy) = x @ W^T + bias, work-shared over row blocks: call inside a parallel
// region with the region's barrier; ends with bar.wait() (linear.cpp)
void gemv_for(const ELinear& L, const float* x, int ldx, const EAct& A, int M, float* y, int ldy, EBarrier& bar);
// the quantized product over all row blocks for one ISA (`omp for nowait`: no barrier; linear_*.cpp)
void gemv_avx512(const ELinear& L, const EAct& A, int M, float* y, int ldy);
void gemv_avx2(const ELinear& L, const EAct& A, int M, float* y, int ldy);
void gemv_portable(const ELinear& L, const EAct& A, int M, float* y, int ldy);
