// The ABI handshake, the ISA the library was built for, and the benchmark's bandwidth probe.
#include "common.h"

EL_API int el_abi_version() { return EL_ABI_VERSION; }
// sizes of the ABI structs (0: ELinear, 1: ELayer, 2: EModel), checked against ctypes at load
EL_API int el_sizeof(int which) {
    return which == 0 ? (int)sizeof(ELinear) : which == 1 ? (int)sizeof(ELayer) : which == 2 ? (int)sizeof(EModel) : -1;
}
EL_API int el_isa() { return EL_VNNI ? 512 : EL_AVX2 ? 256 : 0; }

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
