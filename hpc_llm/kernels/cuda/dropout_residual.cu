// Dropout on a branch, then the residual add (Block: x += dropout(branch)): one pass. keep[i] is the kept flag
// (layers.DropoutMask: one byte), scale 1/(1 - p); keep null: no dropout, the add alone.
extern "C" __global__ void dropout_residual_forward(float* x, const float* branch, const unsigned char* keep,
                                                    float scale, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float b = branch[i];
        if (keep) b = keep[i] ? b * scale : 0.0f;
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
