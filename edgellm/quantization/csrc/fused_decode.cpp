// The fused decode step: all layers of a model in one call. Every family's layer is an ELayer (common.h):
// pre-norm kind, optional post norms, sequential or parallel residual, gated or plain MLP and its activation.
#include "attention.h"

static void rmsnorm_row(const float* x, const float* w, int n, float eps, float* out) {
    const float ss = dotf(x, x, n);
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; ++i) out[i] = (x[i] * r) * w[i];
}

static void layernorm_row(const float* x, const float* w, const float* b, int n, float eps, float* out) {
    float mean = 0.f;
    for (int i = 0; i < n; ++i) mean += x[i];
    mean /= (float)n;
    float var = 0.f;
    for (int i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
    const float r = 1.0f / sqrtf(var / (float)n + eps);
    for (int i = 0; i < n; ++i) out[i] = (x[i] - mean) * r * w[i] + (b ? b[i] : 0.f);
}

// a norm of kind 0 (RMSNorm) or 1 (LayerNorm, bias b optional)
static inline void norm_kind(int kind, const float* x, const float* w, const float* b, int n, float eps, float* out) {
    if (kind == 1)
        layernorm_row(x, w, b, n, eps, out);
    else
        rmsnorm_row(x, w, n, eps, out);
}

static inline void norm_row(const ELayer& Ly, int second, const float* x, int n, float eps, float* out) {
    norm_kind(Ly.norm, x, second ? Ly.ln2 : Ly.ln1, second ? Ly.ln2b : Ly.ln1b, n, eps, out);
}

// h += (post ? rmsnorm(v, post) : v) for one row; v is overwritten by the normed value
static inline void add_residual(float* h, float* v, const float* post, int n, float eps) {
    if (post) rmsnorm_row(v, post, n, eps, v);
    for (int i = 0; i < n; ++i) h[i] += v[i];
}

static inline float act_scalar(int kind, float g) {
    if (kind == 0) return g / (1.0f + expf(-g));
    if (kind == 1) return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
}

#if EL_VNNI
static inline __m512 act512(int kind, __m512 g) {
    const __m512 one = _mm512_set1_ps(1.0f);
    if (kind == 0) return _mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    // gelu(tanh): g * (1 - 1 / (exp(2u) + 1)) = g * sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3)
    const __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
    const __m512 u2 = _mm512_mul_ps(_mm512_set1_ps(2.0f * 0.7978845608028654f),
                                    _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), g3, g));
    return _mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), u2))));
}
#elif EL_AVX2
static inline __m256 act256(int kind, __m256 g) {
    const __m256 one = _mm256_set1_ps(1.0f);
    if (kind == 0) return _mm256_div_ps(g, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    const __m256 g3 = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
    const __m256 u2 = _mm256_mul_ps(_mm256_set1_ps(2.0f * 0.7978845608028654f),
                                    _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), g3, g));
    return _mm256_div_ps(g, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), u2))));
}
#endif

// out[i] = act(g[i]) * u[i] (gated) or act(g[i]) (u null), i < n
static void act_span(const ELayer& Ly, const float* g, const float* u, float* out, int n) {
    const int kind = Ly.act;
    int i = 0;
#if EL_VNNI
    if (kind != 2)
        for (; i + 16 <= n; i += 16) {
            __m512 a = act512(kind, _mm512_loadu_ps(g + i));
            if (u) a = _mm512_mul_ps(a, _mm512_loadu_ps(u + i));
            _mm512_storeu_ps(out + i, a);
        }
#elif EL_AVX2
    if (kind != 2)
        for (; i + 8 <= n; i += 8) {
            __m256 a = act256(kind, _mm256_loadu_ps(g + i));
            if (u) a = _mm256_mul_ps(a, _mm256_loadu_ps(u + i));
            _mm256_storeu_ps(out + i, a);
        }
#endif
    for (; i < n; ++i) out[i] = act_scalar(kind, g[i]) * (u ? u[i] : 1.0f);
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

static int max_kp(const EModel& Mo, int* maxG) {
    int kp = 0, g = 0;
    for (int l = 0; l < Mo.L; ++l) {
        const ELinear* ls[4] = {&Mo.layers[l].qkv, &Mo.layers[l].o, &Mo.layers[l].gu, &Mo.layers[l].down};
        for (auto* L : ls) {
            if (L->Kp > kp) kp = L->Kp;
            if (L->G > g) g = L->G;
        }
    }
    if (Mo.head) {
        kp = Mo.head->Kp > kp ? Mo.head->Kp : kp;
        g = Mo.head->G > g ? Mo.head->G : g;
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
               round64((size_t)nthreads * maxkeys * (Mo.nh / Mo.nkv)) + 2 * round64((size_t)B * G) + round64((size_t)B * Mo.H) +
               round64((size_t)B * Mo.nh * ATTN_MAX_PARTS * (Mo.D + 2));
    return f * 4 + round64((size_t)B * G * 2) * 4 + round64((size_t)B * 2 * Kp) + 256;
}

template <typename T>
static void decode_impl(const EModel* Mp, int B, const int64_t* pos, float* h, T* const* kc, T* const* vc,
                        const int32_t* cap, const int32_t* widx, const int32_t* kfrom, void* scratch, int maxkeys,
                        int nthreads, float* logits, const int64_t* ids, int32_t* argmax) {
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
    // tasks: (row, KV head, part); a row uses its own attn_parts(keys) of the P slots
    int P = 1;
    for (int i = 0; i < Mo.L * B; ++i) {
        const int p = attn_parts(widx[i] - kfrom[i] + 1);
        P = p > P ? p : P;
    }
    float* part = f;  // [B][nkv][P][rep][D + 2]: unnormalized output, m, l
    f += round64((size_t)B * nh * ATTN_MAX_PARTS * (D + 2));
    EAct A;
    A.gsc = f;
    f += round64((size_t)B * G);
    float* mo = f;  // [B][H] the MLP's output
    f += round64((size_t)B * H);
    float* gsc8 = f;
    f += round64((size_t)B * G);
    A.corr = (int32_t*)f;
    A.planes = (int8_t*)(A.corr + round64((size_t)B * G * 2));
#if EL_VNNI
    if (B >= 8) {  // 8-bit rows in tiles of 8 too (EAct): the planes' and corrections' second halves
        A.planes8 = A.planes + (size_t)B * Kp;
        A.corr8 = A.corr + (size_t)B * G;
        A.gsc8 = gsc8;
        A.M8 = B / 8 * 8;
    }
#endif
    A.Kp = Kp;
    A.G = G;
    EBarrier bar;

#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num();
        if (ids) {  // the new tokens' embeddings (no torch call, no team wake-up of its own before the step)
#pragma omp for schedule(static) nowait
            for (int b = 0; b < B; ++b) dequant_row(*Mo.embed, (int)ids[b], h + (size_t)b * H);
            bar.wait();
        }
        for (int l = 0; l < Mo.L; ++l) {
            const ELayer& Ly = Mo.layers[l];
            EAct Aq = A;
            Aq.Kp = Ly.qkv.Kp;
            Aq.G = Ly.qkv.G;
            // row-wise steps are shared out by row (each row's work is independent of the others)
#pragma omp for schedule(static) nowait
            for (int b = 0; b < B; ++b) {
                if (B > 1) prefetch_kv_dest(b * Mo.L + l, nkv, D, cap, widx, kc, vc);
                if (l > 0)  // the previous layer's MLP output
                    add_residual(h + (size_t)b * H, mo + (size_t)b * H, Mo.layers[l - 1].pn2, H, Mo.eps);
                norm_row(Ly, 0, h + (size_t)b * H, H, Mo.eps, xn + (size_t)b * H);
                if (Ly.qkv.fmt != 32) quant_act_rows(Ly.qkv, xn, H, b, b + 1, Aq);
            }
            bar.wait();
            gemv_for(Ly.qkv, xn, H, Aq, B, qkv, QKV, bar);
            // q/k norms, rotary embedding, cache write
#pragma omp for schedule(static) nowait
            for (int t = 0; t < B * (nh + nkv); ++t) {
                const int b = t / (nh + nkv), hd = t % (nh + nkv);
                float* x = qkv + (size_t)b * QKV + (size_t)hd * D;
                const float* nw = hd < nh ? Ly.qn : Ly.kn;
                if (nw) rmsnorm_row(x, nw, D, Mo.eps, x);
                const int64_t p = pos[b];
                rope_head(x, Mo.cos + p * rot, Mo.sin + p * rot, rot);
                if (hd >= nh) {
                    const int kh = hd - nh;
                    const size_t off = ((size_t)kh * cap[b * Mo.L + l] + widx[b * Mo.L + l]) * kv_row<T>(D);
                    kv_put(kc[b * Mo.L + l] + off, x, D);
                    kv_put(vc[b * Mo.L + l] + off, x + (size_t)nkv * D, D);
                }
            }
            bar.wait();
#pragma omp for schedule(static) nowait
            for (int t = 0; t < B * nkv * P; ++t) {
                AttnTask a;
                if (!attn_task<T>(t, l, Mo.L, nkv, P, D, cap, widx, kfrom, &a)) continue;
                const void* next_k = nullptr;
                size_t next_bytes = 0;
#if EL_PF
                AttnTask next;
                if (t + 1 < B * nkv * P && attn_task<T>(t + 1, l, Mo.L, nkv, P, D, cap, widx, kfrom, &next)) {
                    prefetch_task(next, D, kc, vc);
                    next_k = kc[next.i] + next.base;
                    next_bytes = (size_t)(next.k1 - next.k0) * kv_row<T>(D) * sizeof(T);
                }
#endif
                float* pr = part + (size_t)t * rep * (D + 2);
                attend_group(qkv + (size_t)a.b * QKV + (size_t)a.kh * rep * D, rep, kc[a.i] + a.base, vc[a.i] + a.base,
                             a.k1 - a.k0, D, Mo.scale, Mo.softcap, sc + (size_t)tid * maxkeys * rep, pr,
                             pr + (size_t)rep * D, pr + (size_t)rep * D + rep, next_k, next_bytes);
            }
            bar.wait();
            EAct Ao = A;
            Ao.Kp = Ly.o.Kp;
            Ao.G = Ly.o.G;
            // merge the key-range parts of every (sequence, query head)
#pragma omp for schedule(static) nowait
            for (int b = 0; b < B; ++b) {
                    const int np = attn_parts(widx[b * Mo.L + l] - kfrom[b * Mo.L + l] + 1);
                    for (int hq = 0; hq < nh; ++hq) {
                        const int kh = hq / rep, r = hq % rep;
                        float M = -INFINITY;
                        for (int pi = 0; pi < np; ++pi) {
                            const float* pr = part + (size_t)((b * nkv + kh) * P + pi) * rep * (D + 2);
                            const float m = pr[(size_t)rep * D + r];
                            M = m > M ? m : M;
                        }
                        float* o = att + (size_t)b * nh * D + (size_t)hq * D;
                        float lsum = 0.f;
                        for (int d = 0; d < D; ++d) o[d] = 0.f;
                        for (int pi = 0; pi < np; ++pi) {
                            const float* pr = part + (size_t)((b * nkv + kh) * P + pi) * rep * (D + 2);
                            const float w = expf(pr[(size_t)rep * D + r] - M);
                            lsum += w * pr[(size_t)rep * D + rep + r];
                            axpy(o, w, pr + (size_t)r * D, D);
                        }
                        const float inv = 1.0f / lsum;
                        for (int d = 0; d < D; ++d) o[d] *= inv;
                    }
                if (Ly.o.fmt != 32) quant_act_rows(Ly.o, att, nh * D, b, b + 1, Ao);
            }
            bar.wait();
            gemv_for(Ly.o, att, nh * D, Ao, B, tmp, H, bar);
            EAct Ag = A;
            Ag.Kp = Ly.gu.Kp;
            Ag.G = Ly.gu.G;
#pragma omp for schedule(static) nowait
            for (int b = 0; b < B; ++b) {
                {
                    float* hb = h + (size_t)b * H;
                    if (Ly.parallel) {  // the MLP reads the layer's input
                        norm_row(Ly, 1, hb, H, Mo.eps, xn + (size_t)b * H);
                        add_residual(hb, tmp + (size_t)b * H, Ly.pn1, H, Mo.eps);
                    } else {
                        add_residual(hb, tmp + (size_t)b * H, Ly.pn1, H, Mo.eps);
                        norm_row(Ly, 1, hb, H, Mo.eps, xn + (size_t)b * H);
                    }
                }
                if (Ly.gu.fmt != 32) quant_act_rows(Ly.gu, xn, H, b, b + 1, Ag);
            }
            bar.wait();
            const int GW = Ly.gated ? 2 * I : I;  // gu row width
            gemv_for(Ly.gu, xn, H, Ag, B, gu, GW, bar);
            EAct Ad = A;
            Ad.Kp = Ly.down.Kp;
            Ad.G = Ly.down.G;
            if (B >= nthreads) {  // a row per task: its activation, then its quantization (one barrier less)
#pragma omp for schedule(static) nowait
                for (int b = 0; b < B; ++b) {
                    const float* g = gu + (size_t)b * GW;
                    act_span(Ly, g, Ly.gated ? g + I : nullptr, act + (size_t)b * I, I);
                    if (Ly.down.fmt != 32) quant_act_rows(Ly.down, act, I, b, b + 1, Ad);
                }
                bar.wait();
            } else {
                const int chunks = (I + 255) / 256;
#pragma omp for schedule(static) nowait
                for (int t = 0; t < B * chunks; ++t) {
                    const int b = t / chunks, c0 = (t % chunks) * 256, n = I - c0 < 256 ? I - c0 : 256;
                    const float* g = gu + (size_t)b * GW + c0;
                    act_span(Ly, g, Ly.gated ? g + I : nullptr, act + (size_t)b * I + c0, n);
                }
                bar.wait();
                if (Ly.down.fmt != 32) {
#pragma omp for schedule(static) nowait
                    for (int b = 0; b < B; ++b) quant_act_rows(Ly.down, act, I, b, b + 1, Ad);
                    bar.wait();
                }
            }
            gemv_for(Ly.down, act, I, Ad, B, mo, H, bar);
        }
        // the tail: the last residual, the final norm (in place) and the head's activations, row by row
        const ELinear* head = logits ? Mo.head : nullptr;
        EAct Ah = A;
        if (head) {
            Ah.Kp = head->Kp;
            Ah.G = head->G;
        }
#pragma omp for schedule(static) nowait
        for (int b = 0; b < B; ++b) {
            float* hb = h + (size_t)b * H;
            add_residual(hb, mo + (size_t)b * H, Mo.layers[Mo.L - 1].pn2, H, Mo.eps);
            if (Mo.fn_kind >= 0) norm_kind(Mo.fn_kind, hb, Mo.fn_w, Mo.fn_b, H, Mo.eps, hb);
            if (head && head->fmt != 32) quant_act_rows(*head, h, H, b, b + 1, Ah);
        }
        if (head) {
            bar.wait();
            gemv_for(*head, h, H, Ah, B, logits, head->N, bar);
            if (argmax) {  // greedy rows' tokens while the logits are still in this step's caches
#pragma omp for schedule(static) nowait
                for (int b = 0; b < B; ++b) argmax[b] = argmax_row(logits + (size_t)b * head->N, head->N);
            }
        }
    }
}

// h [B][H]: hidden states of the B new tokens (in: embeddings, or written from ids [B] (token ids < embed->N)
// when given; out: after the final norm when the model has one of fn_kind's kinds, else before it). logits [B][head->N] (or null): the head's products.
// For layer l and sequence b (index b*L+l): kc/vc point at [nkv][cap][row] caches (kv_kind 0:
// float32, 1: float16, 2: int8 rows of D codes + a float32 scale), the new key goes to index
// widx, attention reads indices kfrom..widx. argmax [B] (or null; needs logits): each row's argmax_row.
EL_API void el_decode(const EModel* Mp, int B, const int64_t* pos, float* h, void* const* kc, void* const* vc,
                      const int32_t* cap, const int32_t* widx, const int32_t* kfrom, void* scratch, int maxkeys,
                      int nthreads, int kv_kind, float* logits, const int64_t* ids, int32_t* argmax) {
    if (kv_kind == 2)
        decode_impl<int8_t>(Mp, B, pos, h, (int8_t* const*)kc, (int8_t* const*)vc, cap, widx, kfrom, scratch,
                            maxkeys, nthreads, logits, ids, argmax);
    else if (kv_kind == 1)
        decode_impl<uint16_t>(Mp, B, pos, h, (uint16_t* const*)kc, (uint16_t* const*)vc, cap, widx, kfrom, scratch,
                              maxkeys, nthreads, logits, ids, argmax);
    else
        decode_impl<float>(Mp, B, pos, h, (float* const*)kc, (float* const*)vc, cap, widx, kfrom, scratch, maxkeys,
                           nthreads, logits, ids, argmax);
}

