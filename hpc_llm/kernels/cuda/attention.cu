// Fused causal attention (kernels/attention.py is the twin, op for op but the order of its sums and its exp):
// forward one launch, backward three (D, then dk/dv per key tile, then dq per query tile), none growing with T,
// the batch or the heads. A thread block per (query or key tile of TILE rows, head, batch row), THREADS threads:
// thread t computes the scores of row t / 8 and keys 4 (t % 8) .. + 3 of a tile, and owns columns t % 8 + 8 k of
// row t / 8 of the output tile. Scores and probabilities live in shared memory only; forward keeps the output and
// each row's logsumexp, backward recomputes p = exp(s - logsumexp).
//
// qkv (B, T, 3C) and y (B, T, C), dy, dqkv in the qkv linear's layout, C = H x hd; lse and D (B, H, T). q is scaled
// by `scale` and, like k, v, dy and the probabilities after dropout, rounded to the compute format (round.cuh) as
// it is loaded or made. Dropout (rows non-null): Philox4x32-10 of (key // 4, query, head0 + head, rows[b]) under
// (k0, k1), word key % 4, kept iff >= thr, then times dscale.
//
// Tile products: with a 16-bit format (mode 1, 2) and a head size a multiple of 16, on tensor cores (mma.cuh, float32
// accumulators), else the scalar float32 loops (fp32 always, so its results stay the scalar path's). On tensor cores
// the q, k, v and dy tiles are staged in shared memory as the format's 16 bits, and the probabilities and score
// gradients, float32 there for the softmax, are packed to 16 bits as each warp reads them (exact: all are rounded to
// the format already); the scores and dp go to shared memory through the fragments, and the products with hd columns
// (p v, dv, dk, dq) are made CH columns at a time into `prod` (after the kernel's other shared memory) and added to the
// same per-thread accumulators.
#include "mma.cuh"

#define TILE 32
#define THREADS 256
#define MAX_HD 256
#define PER_THREAD (MAX_HD / 8)
#define PAD (TILE + 1)
#define CH 64  // the columns of an hd-wide product made per pass on tensor cores: (TILE / 16) x (CH / 16) warps
static_assert(THREADS == 32 * (TILE / 16) * (CH / 16), "one 16 x 16 block of a pass per warp");

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

__device__ void philox(unsigned c[4], unsigned k0, unsigned k1) {
    for (int r = 0; r < 10; ++r) {
        if (r) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        unsigned hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
        unsigned hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
        unsigned c1 = c[1], c3 = c[3];
        c[0] = hi1 ^ c1 ^ k0;
        c[1] = lo1;
        c[2] = hi0 ^ c3 ^ k1;
        c[3] = lo0;
    }
}

struct Drop {
    const unsigned* rows;  // null: no dropout
    int head0;
    unsigned k0, k1, thr;
    float scale;
};

// The kept flags of keys key4 .. key4 + 3 (key4 a multiple of 4) for query q of head h, batch row b.
__device__ void keep4(const Drop& d, int key4, int q, int h, int b, bool keep[4]) {
    unsigned c[4] = {(unsigned)(key4 / 4), (unsigned)q, (unsigned)(d.head0 + h), d.rows[b]};
    philox(c, d.k0, d.k1);
    for (int e = 0; e < 4; ++e) keep[e] = c[e] >= d.thr;
}

__device__ __forceinline__ float dropped(float x, bool keep, const Drop& d) {
    return d.rows ? (keep ? x * d.scale : x * 0.0f) : x;
}

__device__ __forceinline__ float dot(const float* a, const float* b, int n) {
    float s = 0.0f;
#pragma unroll 4
    for (int i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

__device__ __forceinline__ bool tensor_cores(int mode, int hd) { return mode != 0 && hd % 16 == 0; }

// An operand element's 16 bits: a float holding a format value (exact: already rounded), or the bits themselves.
__device__ __forceinline__ unsigned bits16(const float* p, int i, int mode) { return keep_bits(p[i], mode); }
__device__ __forceinline__ unsigned bits16(const unsigned short* p, int i, int) { return p[i]; }

// Elements i and j as one register of 16-bit pairs, i's in the low half.
template <class E>
__device__ __forceinline__ unsigned pack(const E* p, int i, int j, int mode) {
    return bits16(p, i, mode) | (bits16(p, j, mode) << 16);
}

// One warp: the 16 x 16 block C[m * ldc + n] = sum over k < K (a multiple of 16) of A(m, k) B(k, n), with
// A(m, k) = A[m am + k ak] and B(k, n) = B[k bk + n bn] in shared memory; two m16n8k16 products per 16 of k.
template <class EA, class EB>
__device__ void warp_product(const EA* A, int am, int ak, const EB* B, int bk, int bn, int K, float* C, int ldc,
                             int mode) {
    int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    float d[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    for (int k0 = 0; k0 < K; k0 += 16) {
        unsigned a[4], b[2][2];
        for (int i = 0; i < 4; ++i) {
            int m = g + 8 * (i % 2), k = k0 + 2 * t + 8 * (i / 2);
            a[i] = pack(A, m * am + k * ak, m * am + (k + 1) * ak, mode);
        }
        for (int h = 0; h < 2; ++h)
            for (int i = 0; i < 2; ++i) {
                int n = 8 * h + g, k = k0 + 2 * t + 8 * i;
                b[h][i] = pack(B, k * bk + n * bn, (k + 1) * bk + n * bn, mode);
            }
        mma16816(d[0], a, b[0], mode);
        mma16816(d[1], a, b[1], mode);
    }
    for (int h = 0; h < 2; ++h)
        for (int i = 0; i < 4; ++i) C[(g + 8 * (i / 2)) * ldc + 8 * h + 2 * t + i % 2] = d[h][i];
}

// A tile that load_tile stored as 16-bit bits (on tensor cores).
__device__ __forceinline__ const unsigned short* bits_of(const float* tile) { return (const unsigned short*)tile; }

// Columns n0 .. n0 + CH - 1 (those below hd) of the TILE x hd product sum over k < K of A(m, k) B(k, n) into out
// (TILE x CH), A float32 (probabilities or score gradients), B a 16-bit tile: warp w the 16 x 16 block (w / 4, w % 4).
__device__ void chunk_product(const float* A, int am, int ak, const float* B, int bk, int bn, int K, int n0, int hd,
                              float* out, int mode) {
    int w = threadIdx.x / 32, m0 = 16 * (w / 4), n = n0 + 16 * (w % 4);
    if (n < hd) warp_product(A + m0 * am, am, ak, bits_of(B) + n * bn, bk, bn, K, out + m0 * CH + n - n0, CH, mode);
}

// The TILE x TILE scores of a query tile against a key tile, sum over hd of X(r, c) Y(key, c) (16-bit tiles), into
// S (ld PAD): warps w0 .. w0 + 3, a 16 x 16 block each.
__device__ void score_product(const float* X, const float* Y, int hd, float* S, int w0, int mode) {
    int w = threadIdx.x / 32 - w0, m0 = 16 * (w / 2), n0 = 16 * (w % 2);
    if (w >= 0 && w < 4)
        warp_product(bits_of(X) + m0 * hd, hd, 1, bits_of(Y) + n0 * hd, 1, hd, hd, S + m0 * PAD + n0, PAD, mode);
}

// Rows r0 .. r0 + TILE - 1 of part (0 q, 1 k, 2 v) of qkv, or of dy (part -1), into tile (TILE x hd), rounded to
// the format (q also scaled and rounded again); rows at or past T as zeros. On tensor cores stored as the format's
// 16 bits (in the first half of the tile's room), else as floats.
__device__ void load_tile(float* tile, const float* src, int part, int r0, int T, int H, int hd, float scale,
                          int mode, int b, int h) {
    long long C = (long long)H * hd, stride = part < 0 ? C : 3 * C;
    const float* base = src + (long long)b * T * stride + (part < 0 ? 0 : part * C) + (long long)h * hd;
    for (int e = threadIdx.x; e < TILE * hd; e += THREADS) {
        int r = e / hd, t = r0 + r;
        float x = t < T ? to_format(base[(long long)t * stride + e % hd], mode) : 0.0f;
        x = part == 0 ? to_format(x * scale, mode) : x;
        if (tensor_cores(mode, hd))
            ((unsigned short*)tile)[e] = keep_bits(x, mode);
        else
            tile[e] = x;
    }
}

extern "C" __global__ void attention_forward(const float* qkv, float* y, float* lse, int T, int H, int hd,
                                             float scale, int mode, const unsigned* rows, int head0, unsigned k0,
                                             unsigned k1, unsigned thr, float dscale) {
    extern __shared__ float sm[];
    float *Qs = sm, *KVs = Qs + TILE * hd, *Ps = KVs + TILE * hd, *ms = Ps + TILE * PAD, *ls = ms + TILE,
          *als = ls + TILE, *prod = sm + 2 * TILE * hd + 2 * TILE * PAD + 3 * TILE;
    const bool tc = tensor_cores(mode, hd);
    const Drop d = {rows, head0, k0, k1, thr, dscale};
    int h = blockIdx.y, b = blockIdx.z, i0 = (gridDim.x - 1 - blockIdx.x) * TILE;  // the longest tiles first
    int r = threadIdx.x / 8, c0 = threadIdx.x % 8, kk0 = 4 * c0, q = i0 + r, i1 = min(T, i0 + TILE);
    load_tile(Qs, qkv, 0, i0, T, H, hd, scale, mode, b, h);
    if (threadIdx.x < TILE) {
        ms[threadIdx.x] = neg_inf();
        ls[threadIdx.x] = 0.0f;
    }
    float acc[PER_THREAD];
    for (int k = 0; k < PER_THREAD; ++k) acc[k] = 0.0f;
    for (int j0 = 0; j0 < i1; j0 += TILE) {
        __syncthreads();
        load_tile(KVs, qkv, 1, j0, T, H, hd, scale, mode, b, h);
        __syncthreads();
        if (tc) {
            score_product(Qs, KVs, hd, Ps, 0, mode);
            __syncthreads();
        }
        for (int e = 0; e < 4; ++e) {
            int key = j0 + kk0 + e;
            float s = tc ? Ps[r * PAD + kk0 + e] : dot(Qs + r * hd, KVs + (kk0 + e) * hd, hd);
            Ps[r * PAD + kk0 + e] = (key > q || key >= T) ? neg_inf() : s;
        }
        __syncthreads();
        if (threadIdx.x < TILE) {  // the online softmax of row threadIdx.x
            float* pr = Ps + threadIdx.x * PAD;
            float m_old = ms[threadIdx.x], mx = m_old, sum = 0.0f;
            for (int kk = 0; kk < TILE; ++kk) mx = fmaxf(mx, pr[kk]);
            for (int kk = 0; kk < TILE; ++kk) {
                float p = expf(pr[kk] - mx);
                pr[kk] = p;
                sum += p;
            }
            float alpha = expf(m_old - mx);
            ls[threadIdx.x] = ls[threadIdx.x] * alpha + sum;
            ms[threadIdx.x] = mx;
            als[threadIdx.x] = alpha;
        }
        load_tile(KVs, qkv, 2, j0, T, H, hd, scale, mode, b, h);  // v: k's reads are done
        __syncthreads();
        bool keep[4] = {true, true, true, true};
        if (rows) keep4(d, j0 + kk0, q, h, b, keep);
        for (int e = 0; e < 4; ++e) {
            float* p = Ps + r * PAD + kk0 + e;
            *p = to_format(dropped(*p, keep[e], d), mode);
        }
        __syncthreads();
        float alpha = als[r];
        for (int n0 = 0; tc && n0 < hd; n0 += CH) {
            chunk_product(Ps, PAD, 1, KVs, hd, 1, TILE, n0, hd, prod, mode);
            __syncthreads();
#pragma unroll
            for (int k = 0; k < PER_THREAD; ++k) {
                int c = c0 + 8 * k;
                if (c >= hd) break;
                if (c >= n0 && c < n0 + CH) acc[k] = acc[k] * alpha + prod[r * CH + c - n0];
            }
            __syncthreads();
        }
#pragma unroll
        for (int k = 0; k < PER_THREAD && !tc; ++k) {
            int c = c0 + 8 * k;
            if (c >= hd) break;
            float s = 0.0f;
#pragma unroll 4
            for (int kk = 0; kk < TILE; ++kk) s += Ps[r * PAD + kk] * KVs[kk * hd + c];
            acc[k] = acc[k] * alpha + s;
        }
    }
    if (q >= T) return;
    float l = ls[r];
    float* out = y + ((long long)b * T + q) * H * hd + (long long)h * hd;
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k)
        if (c0 + 8 * k < hd) out[c0 + 8 * k] = acc[k] / l;
    if (c0 == 0) lse[((long long)b * H + h) * T + q] = ms[r] + logf(l);
}

// D[b, h, t] = sum over the head's columns of round(dy) * y: one thread per (b, h, t).
extern "C" __global__ void attention_backward_dot(const float* dy, const float* y, float* D, int T, int H, int hd,
                                                  int mode, int B) {
    long long n = (long long)B * H * T;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long t = i % T, h = (i / T) % H, b = i / ((long long)T * H);
        long long off = (b * T + t) * H * hd + h * hd;
        float s = 0.0f;
        for (int c = 0; c < hd; ++c) s += to_format(dy[off + c], mode) * y[off + c];
        D[i] = s;
    }
}

// One (query tile i0, key tile j0)'s probabilities after dropout and rounding (into Ps, if not null) and score
// gradients round((dropout(dO v) - D) p) (into dSs), for the 4 keys of this thread's row. On tensor cores the
// scores go through Ss (TILE x PAD; may be Ps) and dO v through dSs.
__device__ void tile_grads(const float* Qs, const float* Ks, const float* dOs, const float* Vs, const float* lse_s,
                           const float* D_s, float* Ps, float* dSs, float* Ss, int i0, int j0, int T, int hd,
                           int mode, const Drop& d, int h, int b) {
    int r = threadIdx.x / 8, kk0 = 4 * (threadIdx.x % 8), q = i0 + r;
    const bool tc = tensor_cores(mode, hd);
    if (tc) {
        score_product(Qs, Ks, hd, Ss, 0, mode);
        score_product(dOs, Vs, hd, dSs, 4, mode);
        __syncthreads();
    }
    bool keep[4] = {true, true, true, true};
    if (d.rows) keep4(d, j0 + kk0, q, h, b, keep);
    for (int e = 0; e < 4; ++e) {
        int key = j0 + kk0 + e, at = r * PAD + kk0 + e;
        float s = tc ? Ss[at] : dot(Qs + r * hd, Ks + (kk0 + e) * hd, hd);
        float p = (key > q || key >= T || q >= T) ? 0.0f : expf(s - lse_s[r]);
        float dp = dropped(tc ? dSs[at] : dot(dOs + r * hd, Vs + (kk0 + e) * hd, hd), keep[e], d);
        if (Ps) Ps[at] = to_format(dropped(p, keep[e], d), mode);
        dSs[at] = to_format((dp - D_s[r]) * p, mode);
    }
}

// Rows r0 .. of lse and D (B, H, T) into shared memory (zeros past T).
__device__ void load_rows(float* lse_s, float* D_s, const float* lse, const float* D, int r0, int T, int H, int b,
                          int h) {
    if (threadIdx.x < TILE) {
        int t = r0 + threadIdx.x;
        long long i = ((long long)b * H + h) * T + t;
        lse_s[threadIdx.x] = t < T ? lse[i] : 0.0f;
        D_s[threadIdx.x] = t < T ? D[i] : 0.0f;
    }
}

// dk and dv of key tile blockIdx.x: the sums over the query tiles that see it. Writes dqkv's k and v parts.
extern "C" __global__ void attention_backward_kv(const float* qkv, const float* dy, const float* lse, const float* D,
                                                 float* dqkv, int T, int H, int hd, float scale, int mode,
                                                 const unsigned* rows, int head0, unsigned k0, unsigned k1,
                                                 unsigned thr, float dscale) {
    extern __shared__ float sm[];
    float *Ks = sm, *Vs = Ks + TILE * hd, *Qs = Vs + TILE * hd, *dOs = Qs + TILE * hd, *Ps = dOs + TILE * hd,
          *dSs = Ps + TILE * PAD, *lse_s = dSs + TILE * PAD, *D_s = lse_s + TILE,
          *prod = sm + 4 * TILE * hd + 2 * TILE * PAD + 3 * TILE;
    const bool tc = tensor_cores(mode, hd);
    const Drop d = {rows, head0, k0, k1, thr, dscale};
    int h = blockIdx.y, b = blockIdx.z, j0 = blockIdx.x * TILE, kr = threadIdx.x / 8, c0 = threadIdx.x % 8;
    load_tile(Ks, qkv, 1, j0, T, H, hd, scale, mode, b, h);
    load_tile(Vs, qkv, 2, j0, T, H, hd, scale, mode, b, h);
    float dk[PER_THREAD], dv[PER_THREAD];
    for (int k = 0; k < PER_THREAD; ++k) dk[k] = dv[k] = 0.0f;
    for (int i0 = j0; i0 < T; i0 += TILE) {
        __syncthreads();
        load_tile(Qs, qkv, 0, i0, T, H, hd, scale, mode, b, h);
        load_tile(dOs, dy, -1, i0, T, H, hd, scale, mode, b, h);
        load_rows(lse_s, D_s, lse, D, i0, T, H, b, h);
        __syncthreads();
        tile_grads(Qs, Ks, dOs, Vs, lse_s, D_s, Ps, dSs, Ps, i0, j0, T, hd, mode, d, h, b);
        __syncthreads();
        for (int n0 = 0; tc && n0 < hd; n0 += CH) {  // dv += p^T dO, dk += dS^T q
            chunk_product(Ps, 1, PAD, dOs, hd, 1, TILE, n0, hd, prod, mode);
            chunk_product(dSs, 1, PAD, Qs, hd, 1, TILE, n0, hd, prod + TILE * CH, mode);
            __syncthreads();
#pragma unroll
            for (int k = 0; k < PER_THREAD; ++k) {
                int c = c0 + 8 * k;
                if (c >= hd) break;
                if (c < n0 || c >= n0 + CH) continue;
                dv[k] += prod[kr * CH + c - n0];
                dk[k] += prod[(TILE + kr) * CH + c - n0];
            }
            __syncthreads();
        }
#pragma unroll
        for (int k = 0; k < PER_THREAD && !tc; ++k) {
            int c = c0 + 8 * k;
            if (c >= hd) break;
            float sv = 0.0f, sk = 0.0f;
#pragma unroll 4
            for (int rr = 0; rr < TILE; ++rr) sv += Ps[rr * PAD + kr] * dOs[rr * hd + c];
#pragma unroll 4
            for (int rr = 0; rr < TILE; ++rr) sk += dSs[rr * PAD + kr] * Qs[rr * hd + c];
            dv[k] += sv;
            dk[k] += sk;
        }
    }
    int t = j0 + kr;
    if (t >= T) return;
    long long C = (long long)H * hd;
    float* out = dqkv + ((long long)b * T + t) * 3 * C + (long long)h * hd;
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        int c = c0 + 8 * k;
        if (c >= hd) break;
        out[C + c] = dk[k];
        out[2 * C + c] = dv[k];
    }
}

// dq of query tile blockIdx.x (the longest first): the sum over the key tiles it sees, times scale. Writes dqkv's
// q part.
extern "C" __global__ void attention_backward_q(const float* qkv, const float* dy, const float* lse, const float* D,
                                                float* dqkv, int T, int H, int hd, float scale, int mode,
                                                const unsigned* rows, int head0, unsigned k0, unsigned k1,
                                                unsigned thr, float dscale) {
    extern __shared__ float sm[];
    float *Qs = sm, *dOs = Qs + TILE * hd, *Ks = dOs + TILE * hd, *Vs = Ks + TILE * hd, *dSs = Vs + TILE * hd,
          *lse_s = dSs + TILE * PAD, *D_s = lse_s + TILE, *Ss = D_s + TILE,
          *prod = sm + 4 * TILE * hd + 2 * TILE * PAD + 3 * TILE;
    const bool tc = tensor_cores(mode, hd);
    const Drop d = {rows, head0, k0, k1, thr, dscale};
    int h = blockIdx.y, b = blockIdx.z, i0 = (gridDim.x - 1 - blockIdx.x) * TILE;
    int r = threadIdx.x / 8, c0 = threadIdx.x % 8, i1 = min(T, i0 + TILE);
    load_tile(Qs, qkv, 0, i0, T, H, hd, scale, mode, b, h);
    load_tile(dOs, dy, -1, i0, T, H, hd, scale, mode, b, h);
    load_rows(lse_s, D_s, lse, D, i0, T, H, b, h);
    float dq[PER_THREAD];
    for (int k = 0; k < PER_THREAD; ++k) dq[k] = 0.0f;
    for (int j0 = 0; j0 < i1; j0 += TILE) {
        __syncthreads();
        load_tile(Ks, qkv, 1, j0, T, H, hd, scale, mode, b, h);
        load_tile(Vs, qkv, 2, j0, T, H, hd, scale, mode, b, h);
        __syncthreads();
        tile_grads(Qs, Ks, dOs, Vs, lse_s, D_s, nullptr, dSs, Ss, i0, j0, T, hd, mode, d, h, b);
        __syncthreads();
        for (int n0 = 0; tc && n0 < hd; n0 += CH) {  // dq += dS k
            chunk_product(dSs, PAD, 1, Ks, hd, 1, TILE, n0, hd, prod, mode);
            __syncthreads();
#pragma unroll
            for (int k = 0; k < PER_THREAD; ++k) {
                int c = c0 + 8 * k;
                if (c >= hd) break;
                if (c >= n0 && c < n0 + CH) dq[k] += prod[r * CH + c - n0];
            }
            __syncthreads();
        }
#pragma unroll
        for (int k = 0; k < PER_THREAD && !tc; ++k) {
            int c = c0 + 8 * k;
            if (c >= hd) break;
            float s = 0.0f;
#pragma unroll 4
            for (int kk = 0; kk < TILE; ++kk) s += dSs[r * PAD + kk] * Ks[kk * hd + c];
            dq[k] += s;
        }
    }
    int q = i0 + r;
    if (q >= T) return;
    float* out = dqkv + ((long long)b * T + q) * 3 * H * hd + (long long)h * hd;
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k)
        if (c0 + 8 * k < hd) out[c0 + 8 * k] = dq[k] * scale;
}
