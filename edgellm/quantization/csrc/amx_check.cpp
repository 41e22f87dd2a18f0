// The gate of the AMX tile product (linear_amx.cpp): a bit-exact self-test against the AVX-512 kernels and a
// timing of both, which quantization/amx.py runs in a child process on the machine before it turns the
// tiles on.
#include "common.h"

#include <chrono>
#include <initializer_list>
#include <vector>

EL_API int el_amx_set(int mode);
EL_API int el_amx_mode();
EL_API int el_amx_min_rows(int rows);
EL_API void el_linear(const ELinear* Lp, const float* x, int M, int ldx, float* y, int ldy, int nthreads);

namespace {
// A random product of M rows: codes (fmt 4: nibbles, fmt 8: bytes) in groups of gs, f16 scales, biases.
struct Product {
    ELinear L{};
    std::vector<uint8_t> w;
    std::vector<uint16_t> sc;
    std::vector<float> bias, x;
    int M;

    Product(int fmt, int rows, int N, int K, int gs, uint32_t seed) : M(rows) {
        auto rnd = [&seed]() {
            seed = seed * 1664525u + 1013904223u;
            return seed >> 8;
        };
        const int Nb = (N + 15) / 16, G = K / gs;
        w.resize((size_t)Nb * K * (fmt == 4 ? 8 : 16));
        sc.resize((size_t)Nb * G * 16);
        bias.resize(N);
        x.resize((size_t)M * K);
        for (auto& v : w) v = (uint8_t)rnd();
        for (auto& v : sc) v = float_to_half(0.001f * (float)(1 + rnd() % 100));
        for (auto& v : bias) v = (float)(rnd() % 200) / 100.0f - 1.0f;
        for (auto& v : x) v = (float)(rnd() % 4001) / 1000.0f - 2.0f;
        L.w = w.data();
        L.scale = sc.data();
        L.bias = bias.data();
        L.N = N;
        L.K = L.Kp = K;
        L.G = G;
        L.gs = gs;
        L.fmt = fmt;
        L.half = 1;
        L.off = fmt == 4 ? 8 : 128;
        L.abits = 8;
    }
    void run(float* y, int nthreads) const { el_linear(&L, x.data(), M, L.K, y, L.N, nthreads); }
};

// The tile mode and row threshold as found, put back when the scope ends; meanwhile every product of 8 rows
// or more may go to tiles (the self-test and the timing choose the mode themselves)
struct AmxScope {
    const int mode = el_amx_mode(), rows = el_amx_min_rows(0);
    AmxScope() { el_amx_min_rows(8); }
    ~AmxScope() {
        el_amx_min_rows(rows);
        el_amx_set(mode);
    }
};
}  // namespace

// The tile product in `mode` against the AVX-512 kernels on products that reach every path (4-bit codes in
// groups of 32 and 8-bit codes in groups of 128 (two chunks a group); two 16-row tiles, one and a tail of
// rows, also within the pair kernels' 8-row tiles; one 8-row tile (8-15 rows) and its tail; an odd, partial
// last row block; biases): 0 when every result is equal bit for bit, 1 when one differs, 2 when the mode is
// unavailable. The mode and the row threshold in use before are restored.
EL_API int el_amx_selftest(int mode) {
    const AmxScope scope;
    if (el_amx_set(mode) != 0) return 2;
    int bad = 0;
    for (int fmt : {4, 8})
        for (int M : {53, 29, 13, 8}) {
            const Product p(fmt, M, 40, fmt == 4 ? 96 : 256, fmt == 4 ? 32 : 128, 12345u + 7u * M + fmt);
            std::vector<float> y0((size_t)M * 40), y1(y0.size());
            el_amx_set(mode);
            p.run(y1.data(), 1);
            el_amx_set(0);
            p.run(y0.data(), 1);
            bad |= memcmp(y0.data(), y1.data(), y0.size() * sizeof(float)) != 0;
        }
    return bad;
}

// Seconds per product (the best of `reps`, after one warm-up) of M rows against a random N x K 4-bit weight
// (groups of 32) on `nthreads` threads, with the tiles in `mode` (0: the AVX-512 kernels); -1 when the mode
// is unavailable. The mode and the row threshold in use before are restored.
EL_API double el_amx_time(int mode, int M, int N, int K, int reps, int nthreads) {
    const AmxScope scope;
    if (el_amx_set(mode) != 0) return -1.0;
    const Product p(4, M, N, K, 32, 777u);
    std::vector<float> y((size_t)M * N);
    p.run(y.data(), nthreads);
    double best = 1e30;
    for (int r = 0; r < reps; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        p.run(y.data(), nthreads);
        const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        best = t < best ? t : best;
    }
    return best;
}
