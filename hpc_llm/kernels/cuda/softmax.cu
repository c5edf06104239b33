// Causal masked softmax of one query block's scores (layers.causal_softmax_ then Precision.round_), in place: one
// block per row of Tk scores; query row q (absolute position q0 + row % Tq) sees keys 0..q. One pass: max, sum of
// exp, scale and round. mode: the probabilities rounded to the compute format (round.cuh).
#include "round.cuh"

__device__ float block_reduce(float v, float* shared, bool is_max) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w /= 2) {
        if (threadIdx.x < w) {
            float o = shared[threadIdx.x + w];
            shared[threadIdx.x] = is_max ? fmaxf(shared[threadIdx.x], o) : shared[threadIdx.x] + o;
        }
        __syncthreads();
    }
    float s = shared[0];
    __syncthreads();
    return s;
}

extern "C" __global__ void masked_softmax_forward(float* att, int Tq, int Tk, int q0, int mode) {
    extern __shared__ float shared[];
    float* row = att + (long long)blockIdx.x * Tk;
    int last = q0 + (int)(blockIdx.x % Tq);  // the last key this query sees
    float m = -__int_as_float(0x7f800000);  // -inf
    for (int j = threadIdx.x; j <= last && j < Tk; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_reduce(m, shared, true);
    float s = 0.0f;
    for (int j = threadIdx.x; j < Tk; j += blockDim.x) {
        float e = j <= last ? expf(row[j] - m) : 0.0f;
        row[j] = e;
        s += e;
    }
    float inv = 1.0f / block_reduce(s, shared, false);
    for (int j = threadIdx.x; j < Tk; j += blockDim.x) row[j] = to_format(row[j] * inv, mode);
}

// datt = att (datt - sum(datt att)) over each row, in place over datt (attention_backward's softmax step),
// rounded to the compute format.
extern "C" __global__ void masked_softmax_backward(const float* att, float* datt, int Tk, int mode) {
    extern __shared__ float shared[];
    long long r = (long long)blockIdx.x * Tk;
    float s = 0.0f;
    for (int j = threadIdx.x; j < Tk; j += blockDim.x) s += datt[r + j] * att[r + j];
    s = block_reduce(s, shared, false);
    for (int j = threadIdx.x; j < Tk; j += blockDim.x)
        datt[r + j] = to_format(att[r + j] * (datt[r + j] - s), mode);
}
