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
extern "C" __global__ void narrow_format(const float* x, unsigned short* out, long long n, int mode) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        if (mode == 1) {
            unsigned u = __float_as_uint(x[i]);
            if ((u & 0x7fffffffu) > 0x7f800000u)
                out[i] = (unsigned short)(((u >> 16) & 0x8000u) | 0x7fc0u);
            else
                out[i] = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        } else {
            out[i] = keep_bits(x[i], mode);
        }
    }
}

extern "C" __global__ void widen_format(const unsigned short* bits, float* out, long long n, int mode) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        if (mode == 1) {
            out[i] = __uint_as_float((unsigned)bits[i] << 16);
        } else {
            float y;
            asm("cvt.f32.f16 %0, %1;" : "=f"(y) : "h"(bits[i]));
            out[i] = y;
        }
    }
}
