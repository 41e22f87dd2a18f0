// Load-time weight repacking, and dequantization back to float32 (rows, embedding lookups).
#include "common.h"

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

void dequant_row(const ELinear& L, int n, float* o) {
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
    // a decode step's few rows are cheaper than waking the team (its threads may be asleep)
#pragma omp parallel for num_threads(nthreads) schedule(static) if ((size_t)n * L->K > (1u << 16))
    for (int i = 0; i < n; ++i) dequant_row(*L, (int)ids[i], out + (size_t)i * L->K);
}
