"""Run hpc_llm/kernels/cuda/attention.cu on the CPU and compare it with its NumPy twin: a check of the kernels'
logic (tiles, barriers, online softmax, Philox masks, rounding) where no GPU is at hand.

    python scripts/dev/attention_on_host.py

The .cu source is compiled as C++20 by g++ with a shim for CUDA's built-ins (each thread block run as THREADS host
threads meeting at a std::barrier for __syncthreads, blocks one after another; shared memory one host array; the
C library's expf and logf for CUDA's, GCC's _Float16 for PTX's half conversions), then run on random inputs for a
few shapes in fp32, bf16 and fp16, with and without dropout; forward and the three backward kernels are compared with
kernels/attention.py within tests/kernels/test_attention.py's bound. The 16-bit formats with a head size a multiple
of 16 take the tensor-core tile products: mma.cuh's PTX mma.sync is replaced by an emulation (MMA below) that reads
the warp's 32 lanes' fragments as PTX's ISA lays them out and sums each output's 16 products (exact in float32) in
order k = 0 .. 15 in float32, then adds that sum to the accumulator. What it cannot check: the tensor cores' own
summation order and internal precision, the GPU's expf, scheduling and memory limits (the gpu-marked tests do)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "kernels")]

import test_attention as T  # noqa: E402  (the bound, and the inputs)

from hpc_llm.kernels import attention as flash  # noqa: E402
from hpc_llm.model.precision import Precision  # noqa: E402

SHIM = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
using std::min;
struct Dim { unsigned x = 0, y = 0, z = 0; };
thread_local Dim threadIdx, blockIdx;
Dim blockDim, gridDim;
std::barrier<>* g_bar;
float* g_smem;
inline void __syncthreads() { g_bar->arrive_and_wait(); }
#define __global__
#define __device__
#define __forceinline__ inline
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
std::barrier<>** g_warp_bar;  // one per warp of the block
"""

MMA = r"""
#pragma once
#include <bit>
#include "round.cuh"
struct Lanes { unsigned a[32][4], b[32][2]; };
Lanes g_lanes[32];  // a block of up to 1024 threads
inline float widen16(unsigned bits, int mode) {
    bits &= 0xffffu;
    return mode == 1 ? __uint_as_float(bits << 16) : (float)std::bit_cast<_Float16>((unsigned short)bits);
}
// mma.sync m16n8k16 of one warp: each lane posts its fragments, then computes its own four outputs.
inline void mma16816(float d[4], const unsigned a[4], const unsigned b[2], int mode) {
    int w = threadIdx.x / 32, l = threadIdx.x % 32, g = l / 4, t = l % 4;
    Lanes& x = g_lanes[w];
    memcpy(x.a[l], a, sizeof x.a[l]);
    memcpy(x.b[l], b, sizeof x.b[l]);
    g_warp_bar[w]->arrive_and_wait();
    auto A = [&](int m, int k) {
        return widen16(x.a[4 * (m % 8) + k % 8 / 2][m / 8 + 2 * (k / 8)] >> (16 * (k % 2)), mode);
    };
    auto B = [&](int k, int n) { return widen16(x.b[4 * n + k % 8 / 2][k / 8] >> (16 * (k % 2)), mode); };
    for (int i = 0; i < 4; ++i) {
        int m = g + 8 * (i / 2), n = 2 * t + i % 2;
        float s = 0.0f;
        for (int k = 0; k < 16; ++k) s += A(m, k) * B(k, n);
        d[i] += s;
    }
    g_warp_bar[w]->arrive_and_wait();
}
"""

MAIN = r"""
#include "attention_host.cu"
template <class F> void launch(Dim grid, int threads, size_t smem, F f) {
    gridDim = grid; blockDim = {(unsigned)threads, 1, 1};
    std::vector<float> sm(smem / 4 + 1);
    for (unsigned z = 0; z < grid.z; ++z) for (unsigned y = 0; y < grid.y; ++y) for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bar(threads); g_bar = &bar; g_smem = sm.data();
        std::vector<std::barrier<>*> warps;
        for (int w = 0; w < threads / 32; ++w) warps.push_back(new std::barrier<>(32));
        g_warp_bar = warps.data();
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t)
            ts.emplace_back([&, t] { blockIdx = {x, y, z}; threadIdx = {(unsigned)t, 0, 0}; f(); });
        for (auto& t : ts) t.join();
        for (auto* w : warps) delete w;
    }
}
std::vector<float> readf(const char* p, size_t n) {
    std::vector<float> v(n); FILE* f = fopen(p, "rb"); if (fread(v.data(), 4, n, f) != n) exit(3); fclose(f); return v;
}
void writef(const char* p, const std::vector<float>& v) {
    FILE* f = fopen(p, "wb"); fwrite(v.data(), 4, v.size(), f); fclose(f);
}
int main(int argc, char** argv) {
    int B = atoi(argv[1]), T = atoi(argv[2]), H = atoi(argv[3]), hd = atoi(argv[4]), mode = atoi(argv[5]);
    int drop = atoi(argv[6]), head0 = atoi(argv[11]);
    unsigned k0 = strtoul(argv[7], 0, 10), k1 = strtoul(argv[8], 0, 10), thr = strtoul(argv[9], 0, 10);
    float dscale = atof(argv[10]), scale = 1.0f / sqrtf((float)hd);
    size_t C = (size_t)H * hd;
    auto qkv = readf("qkv.bin", B * T * 3 * C), dy = readf("dy.bin", B * T * C);
    std::vector<unsigned> rows(B); for (int b = 0; b < B; ++b) rows[b] = atoi(argv[12]) + b;
    const unsigned* rp = drop ? rows.data() : nullptr;
    std::vector<float> y(B * T * C), lse(B * H * T), D(B * H * T), dqkv(B * T * 3 * C, NAN);
    unsigned tiles = (T + TILE - 1) / TILE;
    size_t sm = 4 * (4 * TILE * hd + 2 * TILE * (TILE + 1) + 3 * TILE + 2 * TILE * CH);
    launch({tiles, (unsigned)H, (unsigned)B}, THREADS, sm, [&] {
        attention_forward(qkv.data(), y.data(), lse.data(), T, H, hd, scale, mode, rp, head0, k0, k1, thr, dscale); });
    std::vector<float> yk(y); for (auto& v : yk) v = to_format(v, mode);  // y kept in the format
    launch({4, 1, 1}, 64, 0, [&] { attention_backward_dot(dy.data(), yk.data(), D.data(), T, H, hd, mode, B); });
    launch({tiles, (unsigned)H, (unsigned)B}, THREADS, sm, [&] { attention_backward_kv(qkv.data(), dy.data(),
        lse.data(), D.data(), dqkv.data(), T, H, hd, scale, mode, rp, head0, k0, k1, thr, dscale); });
    launch({tiles, (unsigned)H, (unsigned)B}, THREADS, sm, [&] { attention_backward_q(qkv.data(), dy.data(),
        lse.data(), D.data(), dqkv.data(), T, H, hd, scale, mode, rp, head0, k0, k1, thr, dscale); });
    writef("y.bin", y); writef("dqkv.bin", dqkv);
}
"""

CASES = [
    (2, 70, 2, 16, 0),
    (1, 45, 3, 20, 5),
    (3, 33, 1, 8, 0),
    (1, 96, 2, 40, 2),
    (1, 50, 2, 64, 1),
    (1, 40, 1, 80, 0),
]  # B, T, H, hd, head0: hd 16, 64, 80 take the tensor-core products in bf16 and fp16 (80: two passes, one partial)


def build(work: Path) -> Path:
    cuda = REPO / "hpc_llm" / "kernels" / "cuda"
    rnd = (cuda / "round.cuh").read_text()
    # fp16's conversions are PTX inline assembly: GCC's _Float16 rounds to nearest even too
    rnd = rnd.replace(
        'asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));',
        "h = std::bit_cast<unsigned short>((_Float16)x);",
    )
    rnd = rnd.replace(
        'asm("cvt.f32.f16 %0, %1;" : "=f"(y) : "h"(h));', "y = (float)std::bit_cast<_Float16>(h);"
    )
    (work / "round.cuh").write_text("#include <bit>\n" + rnd)
    (work / "mma.cuh").write_text(MMA)
    src = (
        (cuda / "attention.cu")
        .read_text()
        .replace("extern __shared__ float sm[];", "float* sm = g_smem;")
    )
    (work / "attention_host.cu").write_text(SHIM + src)
    (work / "main.cpp").write_text(MAIN)
    exe = work / "attention_host"
    cmd = [
        "g++",
        "-std=c++20",
        "-O1",
        "-ffp-contract=off",
        f"-I{work}",
        "-o",
        str(exe),
        "main.cpp",
        "-lpthread",
    ]
    subprocess.run(cmd, cwd=work, check=True)
    return exe


def check(exe: Path, work: Path, shape, precision: str, p: float) -> float:
    """Runs one case; returns the largest |kernel - twin| (asserting the bound)."""
    B, Tn, H, HD, head0 = shape
    T.B, T.T, T.H, T.HD = B, Tn, H, HD  # the test module's shapes, read by its helpers
    qkv, dy = T._inputs(np.float32, 3)
    qkv.tofile(work / "qkv.bin")
    dy.tofile(work / "dy.bin")
    drop = None
    if p:
        thr = min(0xFFFFFFFF, round(p * 2.0**32))
        drop = flash.AttnDropout(
            p, (12345, 678910), thr, 1 / (1 - p), tuple(range(10, 10 + B)), head0
        )
    d = (*drop.key, drop.threshold, drop.scale) if drop else (0, 0, 0, 1.0)
    mode = {"fp32": 0, "bf16": 1, "fp16": 2}[precision]
    args = [B, Tn, H, HD, mode, int(drop is not None), *d, head0, 10]
    subprocess.run([str(exe), *map(str, args)], cwd=work, check=True)
    y = np.fromfile(work / "y.bin", np.float32).reshape(B, Tn, H * HD)
    dqkv = np.fromfile(work / "dqkv.bin", np.float32).reshape(B, Tn, 3 * H * HD)
    assert np.isfinite(dqkv).all(), "an element of dqkv was not written"
    prec = Precision(precision)
    wy, lse = flash.flash_forward(qkv, H, prec, drop)
    kept, kept_y = (prec.use(prec.keep(x), np.float32) for x in (qkv, wy))
    want = flash.flash_backward(dy, kept, kept_y, lse, H, prec, drop)
    u = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}[precision]
    T.assert_within_bound((y, dqkv), (wy, want), qkv, dy, drop, u)
    return float(max(np.abs(y - wy).max(), np.abs(dqkv - want).max()))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        exe = build(work)
        for shape in CASES:
            for precision in ("fp32", "bf16", "fp16"):
                for p in (0.0, 0.2):
                    err = check(exe, work, shape, precision, p)
                    print(
                        f"B T H hd head0 {shape} {precision} dropout {p}: max |kernel - twin| {err:.3g}"
                    )
    print("attention.cu on the host equals its twin within the bound")


if __name__ == "__main__":
    main()
