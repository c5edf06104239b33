// LayerNorm over rows of width C (layers.layernorm_forward / _backward_input): one block per row, one pass each
// way over the row (held in registers/L1 between the statistics and the output). blockDim.x must be a power of
// two <= 1024. mode: the output rounded to the compute format, xhat kept in it (round.cuh).
#include "round.cuh"

#define LN_EPS 1e-5f

__device__ float block_sum(float v, float* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w /= 2) {
        if (threadIdx.x < w) shared[threadIdx.x] += shared[threadIdx.x + w];
        __syncthreads();
    }
    float s = shared[0];
    __syncthreads();
    return s;
}

extern "C" __global__ void layernorm_forward(const float* x, const float* w, const float* b, float* out,
                                             float* xhat, float* rstd, int C, int mode) {
    extern __shared__ float shared[];
    const float* xr = x + (long long)blockIdx.x * C;
    float s = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) s += xr[i];
    float mean = block_sum(s, shared) / C;
    float q = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float d = xr[i] - mean;
        q += d * d;
    }
    float r = rsqrtf(block_sum(q, shared) / C + LN_EPS);
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float xh = (xr[i] - mean) * r;
        long long k = (long long)blockIdx.x * C + i;
        xhat[k] = to_format(xh, mode);
        out[k] = to_format(xh * w[i] + (b ? b[i] : 0.0f), mode);
    }
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
}

// dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dout w; written to dx (added to it when accumulate: the
// residual stream's gradient, Block's dx +=). The weight and bias gradients are column sums: layernorm_weight.
extern "C" __global__ void layernorm_backward(const float* dout, const float* xhat, const float* rstd,
                                              const float* w, float* dx, int C, int accumulate) {
    extern __shared__ float shared[];
    long long row = (long long)blockIdx.x * C;
    float s = 0.0f, sx = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float g = dout[row + i] * w[i];
        s += g;
        sx += g * xhat[row + i];
    }
    float mg = block_sum(s, shared) / C;
    float mgx = block_sum(sx, shared) / C;
    float r = rstd[blockIdx.x];
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float g = dout[row + i] * w[i];
        float d = (g - mg - xhat[row + i] * mgx) * r;
        dx[row + i] = accumulate ? dx[row + i] + d : d;
    }
}

// dw[i] (+)= sum over rows of dout xhat, db[i] (+)= sum of dout: one thread per column, rows in order.
extern "C" __global__ void layernorm_weight(const float* dout, const float* xhat, float* dw, float* db,
                                            long long rows, int C, int accumulate) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= C) return;
    float a = 0.0f, c = 0.0f;
    for (long long r = 0; r < rows; ++r) {
        a += dout[r * C + i] * xhat[r * C + i];
        c += dout[r * C + i];
    }
    dw[i] = accumulate ? dw[i] + a : a;
    if (db) db[i] = accumulate ? db[i] + c : c;
}
