// The branch's bias (the row-parallel layer's, width entries; null: none), dropout on the branch, then the residual
// add (Block: x += dropout(branch + bias)): one pass. keep[i] is the kept flag (layers.DropoutMask: one byte), scale
// 1/(1 - p); keep null: no dropout. The twin's order (kernels/dropout_residual.py: + bias, * keep, * scale, then the
// add), so the two are bitwise equal.
extern "C" __global__ void dropout_residual_forward(float* x, const float* branch, const float* bias,
                                                    const unsigned char* keep, float scale, long long n,
                                                    int width) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float b = branch[i];
        if (bias) b = b + bias[i % width];
        if (keep) {
            b = b * (float)keep[i];
            b = b * scale;
        }
        x[i] = x[i] + b;
    }
}

// Backward of the branch: d_branch = dx * keep * scale (dx itself flows on to the block's input unchanged).
extern "C" __global__ void dropout_residual_backward(const float* dx, float* dbranch, const unsigned char* keep,
                                                     float scale, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        dbranch[i] = keep[i] ? dx[i] * scale : 0.0f;
}

// DropoutMask.scaled / apply_ (layers.py): out = x * keep * scale (x * 0 where dropped, as NumPy's x * False: a
// signed zero), into out (== x: in place).
extern "C" __global__ void dropout_scale(const float* x, const unsigned char* keep, float scale, float* out,
                                         long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = keep[i] ? x[i] * scale : x[i] * 0.0f;
}
