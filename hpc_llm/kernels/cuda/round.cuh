// Rounding to the compute format (model/precision.py), folded into the kernel that produces a value: mode 0 keeps
// float32, 1 rounds to bfloat16, 2 to IEEE half (both round to nearest even), the result held in a float.
#pragma once

__device__ __forceinline__ float to_format(float x, int mode) {
    if (mode == 1) {
        unsigned u = __float_as_uint(x);
        if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x007fffffu) ? __uint_as_float(u | 0x00400000u) : x;
        u += 0x7fffu + ((u >> 16) & 1u);
        return __uint_as_float(u & 0xffff0000u);
    }
    if (mode == 2) {
        unsigned short h;
        float y;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
        asm("cvt.f32.f16 %0, %1;" : "=f"(y) : "h"(h));
        return y;
    }
    return x;
}

// The 16 bits kept for backward (Precision.keep): bfloat16's are a float's high half after rounding; half's from
// the conversion.
__device__ __forceinline__ unsigned short keep_bits(float x, int mode) {
    if (mode == 1) return (unsigned short)(__float_as_uint(to_format(x, 1)) >> 16);
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}
