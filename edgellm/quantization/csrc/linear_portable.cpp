// The quantized product without AVX2 / AVX-512: the same integer arithmetic, scalar.
#include "common.h"

#if !EL_VNNI && !EL_AVX2
template <int P>
static void block_generic(const ELinear& L, const EAct& A, int m, int rb, float* y) {
    const int G = L.G, Kp = L.Kp;
    const int8_t* pl = A.planes + (size_t)m * P * Kp;
    float acc[16] = {0};
    for (int r = 0; r < 16; ++r) {
        const int n = rb * 16 + r;
        if (n >= L.N) break;
        for (int g = 0; g < G; ++g) {
            const int32_t* c = A.corr + ((size_t)m * G + g) * P;
            int32_t a0 = c[0], a1 = P == 2 ? c[1] : 0;
            for (int k = g * L.gs; k < (g + 1) * L.gs; ++k) {
                int code;
                if (L.fmt == 4) {
                    code = nib_code(L, n, k);
                } else {
                    code = L.w[((size_t)rb * (Kp >> 2) + (k >> 2)) * 64 + 4 * r + (k & 3)];
                }
                a0 += code * pl[k];
                if (P == 2) a1 += code * pl[Kp + k];
            }
            const int32_t d = (int32_t)((uint32_t)a0 + ((uint32_t)a1 << 8));
            acc[r] += (float)d * (scale_at(L, ((size_t)rb * G + g) * 16 + r) * A.gsc[(size_t)m * G + g]);
        }
    }
    store_rows(L, rb, acc, y);
}

void gemv_portable(const ELinear& L, const EAct& A, int M, float* y, int ldy) {
    const int Nb = (L.N + 15) / 16;
#pragma omp for schedule(static) nowait
    for (int rb = 0; rb < Nb; ++rb)
        for (int m = 0; m < M; ++m)
            if (act_planes(L) == 1)
                block_generic<1>(L, A, m, rb, y + (size_t)m * ldy);
            else
                block_generic<2>(L, A, m, rb, y + (size_t)m * ldy);
}
#endif
