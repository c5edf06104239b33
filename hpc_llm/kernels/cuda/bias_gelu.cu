// Bias + tanh-GELU (layers.gelu_forward after the fc layer's bias): one pass forward, one backward.
// n = rows x width elements; the bias has width entries. mode: round the output to the compute format (round.cuh).
#include "round.cuh"

#define GELU_C 0.7978845608028654f  // sqrt(2 / pi)

// out = 0.5 x (1 + t), t = tanh(x (c + c 0.044715 x^2)), x = h + bias; x and t kept for backward (t in 16 bits
// when mode > 0: Precision.keep). bias, x_out, t_keep, t_out may be null (no bias; x not written; not kept).
extern "C" __global__ void bias_gelu_forward(const float* h, const float* bias, float* x_out, float* out,
                                             unsigned short* t_keep, float* t_out, long long n, int width,
                                             int mode) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float x = bias ? h[i] + bias[i % width] : h[i];
        float t = x * x;
        t = t * (GELU_C * 0.044715f);
        t = t + GELU_C;
        t = t * x;
        t = tanhf(t);
        float o = (t + 1.0f) * x;
        o = o * 0.5f;
        if (x_out) x_out[i] = x;
        out[i] = to_format(o, mode);
        if (mode > 0 && t_keep) t_keep[i] = keep_bits(t, mode);
        if (t_out) t_out[i] = t;
    }
}

// dx = dout (0.5 (1 + t) + 0.5 (1 - t^2) x c (1 + 3 0.044715 x^2)), in place over dout (layers.gelu_backward);
// the bias gradient is the column sums of dx (a reduction the linear layer's W does).
extern "C" __global__ void bias_gelu_backward(float* dout, const float* x, const float* t, long long n, int mode) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float xs = x[i], ts = t[i];
        float in = xs * xs;
        in = in * (0.5f * 3.0f * 0.044715f * GELU_C);
        in = in + 0.5f * GELU_C;
        in = in * xs;
        float s2 = ts * ts;
        s2 = 1.0f - s2;
        in = in * s2;
        float d = ts * 0.5f;
        d = d + 0.5f;
        d = d + in;
        dout[i] = to_format(dout[i] * d, mode);
    }
}
