// Precision.round_ and Precision.operand on a device (model/precision.py): x rounded to the compute format, in place
// (out == x) or into a new array, in one pass (NumPy's twin converts there and back: two).
#include "round.cuh"

extern "C" __global__ void round_format(const float* x, float* out, long long n, int mode) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = to_format(x[i], mode);
}

// Precision.keep and Precision.use on a device: float32 values stored as the format's 16 bits (bfloat16: the
// rounded float's high half, a NaN the quiet NaN 0x7fc0 of its sign, as ml_dtypes and kernels/rounding.py do; half:
// cvt.rn) and widened back (exact). CuPy has no bfloat16 dtype: its bits live in uint16 arrays.
// A NaN keeps NumPy's bits both ways (its sign and the payload's top bits: float16 <-> float32 astype), not the
// canonical NaN of PTX's cvt.
__device__ __forceinline__ unsigned short narrow_one(float v, int mode) {
    unsigned u = __float_as_uint(v);
    bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    if (mode == 1) {
        if (nan) return (unsigned short)(((u >> 16) & 0x8000u) | 0x7fc0u);
        return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    if (nan) {
        unsigned m = (u & 0x007fffffu) >> 13;
        return (unsigned short)(((u >> 16) & 0x8000u) | 0x7c00u | (m ? m : 1u));
    }
    return keep_bits(v, mode);
}

__device__ __forceinline__ float widen_one(unsigned short b, int mode) {
    if (mode == 1) return __uint_as_float((unsigned)b << 16);
    if ((b & 0x7c00u) == 0x7c00u && (b & 0x03ffu))
        return __uint_as_float(((b & 0x8000u) << 16) | 0x7f800000u | ((b & 0x03ffu) << 13));
    float y;
    asm("cvt.f32.f16 %0, %1;" : "=f"(y) : "h"(b));
    return y;
}

extern "C" __global__ void narrow_format(const float* x, unsigned short* out, long long n, int mode) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = narrow_one(x[i], mode);
}

extern "C" __global__ void widen_format(const unsigned short* bits, float* out, long long n, int mode) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = widen_one(bits[i], mode);
}

// Precision.keep_use: a linear layer's input kept in 16 bits and, in the same pass, its float32 operand (the widened
// bits: the rounded value), where narrow_format then widen_format would read it twice.
extern "C" __global__ void narrow_round(const float* x, unsigned short* bits, float* out, long long n, int mode) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        unsigned short b = narrow_one(x[i], mode);
        bits[i] = b;
        out[i] = widen_one(b, mode);
    }
}

// GPT.refresh_compute on a device: the master weights stored in the format (2 bytes an element: what the GEMMs
// read, kernels/cuda/gemm16.py) and, in the same launch, the tensors the fused kernels read in float32 (embeddings,
// biases, LayerNorm weights: nseg runs [start, start + length) of the flat buffer, packed one after another into
// wide; seg_end: each run's end in wide) as their rounded float32 values.
extern "C" __global__ void refresh_compute(const float* master, unsigned short* bits, long long n, float* wide,
                                           const long long* seg_start, const long long* seg_end, int nseg,
                                           long long nwide, int mode) {
    long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
    for (long long i = first; i < n; i += stride) bits[i] = narrow_one(master[i], mode);
    for (long long j = first; j < nwide; j += stride) {
        int lo = 0, hi = nseg - 1;  // the first run ending after j
        while (lo < hi) {
            int mid = (lo + hi) / 2;
            if (seg_end[mid] > j) hi = mid;
            else lo = mid + 1;
        }
        long long at = seg_start[lo] + j - (lo ? seg_end[lo - 1] : 0);
        wide[j] = widen_one(narrow_one(master[at], mode), mode);
    }
}

// A 16-bit wire message (parallel/wire16.py, compression.write16 / read16) made and read on a device: n words, the
// values multiplied by the power of two s (exact; skipped at 1, as write16 does) and rounded, then s's float32 bits
// as two words, low half first; widened back and unscaled (exact, but where the result is subnormal: one rounding).
extern "C" __global__ void wire_narrow(const float* x, unsigned short* words, long long n, float s, int mode) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        words[i] = narrow_one(s == 1.0f ? x[i] : x[i] * s, mode);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        unsigned b = __float_as_uint(s);
        words[n] = (unsigned short)(b & 0xffffu);
        words[n + 1] = (unsigned short)(b >> 16);
    }
}

extern "C" __global__ void wire_widen(const unsigned short* words, float* out, long long n, int mode) {
    float inv = 1.0f / __uint_as_float((unsigned)words[n] | ((unsigned)words[n + 1] << 16));
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = widen_one(words[i], mode);
        out[i] = inv == 1.0f ? v : v * inv;
    }
}
