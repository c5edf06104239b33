// Tensor-core tile products for the 16-bit formats (attention.cu): PTX's mma.sync m16n8k16 (sm_80+), bfloat16 or
// half operands, float32 accumulators. Fragments as PTX's ISA lays them out ("Matrix Fragments for mma.m16n8k16
// with floating point type"): lane l, g = l / 4, t = l % 4; A (16 x 16, row) registers a[i] hold rows
// g + 8 (i % 2), columns 2t + 8 (i / 2) + {0, 1}; B (16 x 8, col) registers b[i] rows 2t + 8 i + {0, 1}, column g;
// C/D (16 x 8) d[i] row g + 8 (i / 2), column 2t + i % 2. The lower-indexed element in a register's low half.
#pragma once
#include "round.cuh"

// d += A B over one warp (mode 1 bfloat16, 2 half operands).
__device__ __forceinline__ void mma16816(float d[4], const unsigned a[4], const unsigned b[2], int mode) {
    if (mode == 1)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
