// What the AVX-512 product (linear_avx512.cpp) and the AMX tile product (linear_amx.cpp) share.
#pragma once
#include "common.h"

#if EL_VNNI
// the weight scales of row block rb, group g: 16 floats
static inline __m512 load_scales(const ELinear& L, int rb, int g) {
    const size_t idx = ((size_t)rb * L.G + g) * 16;
    if (L.half) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)L.scale + idx)));
    return _mm512_loadu_ps((const float*)L.scale + idx);
}

// y[n0 .. n0+15] = acc + bias for row block rb (fewer at the end of N)
static inline void store_block(const ELinear& L, int rb, __m512 acc, float* y) {
    const int n0 = rb * 16, cnt = L.N - n0 < 16 ? L.N - n0 : 16;
    const __mmask16 m = (__mmask16)(cnt == 16 ? 0xffff : ((1u << cnt) - 1));
    if (L.bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, L.bias + n0));
    _mm512_mask_storeu_ps(y + n0, m, acc);
}

// 8-bit activation rows m0..m1-1 against row block rb (nb = 1) or rb and rb + 1 (nb = 2: one pass over
// the pair for fmt 4) with the AVX-512 kernels (linear_avx512.cpp); also the rows and blocks the tile
// product leaves over
void avx512_rows(const ELinear& L, const EAct& A, int m0, int m1, int rb, int nb, float* y, int ldy);
#endif

// The AMX-int8 tile product (linear_amx.cpp). amx_mode(): 0 off, 1 the CPU's tiles, 2 tiles emulated in
// C (tests the kernel's logic on any AVX-512 CPU). amx_fits: whether L's products of M rows go to tiles.
int amx_mode();
bool amx_fits(const ELinear& L, int M);
// all of L's row blocks for M >= 8 8-bit activation rows (`omp for nowait`, as gemv_avx512)
void gemv_amx(const ELinear& L, const EAct& A, int M, float* y, int ldy);
