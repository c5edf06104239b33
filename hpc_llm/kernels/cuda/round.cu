// Precision.round_ and Precision.operand on a device (model/precision.py): x rounded to the compute format, in place
// (out == x) or into a new array, in one pass (NumPy's twin converts there and back: two).
#include "round.cuh"

extern "C" __global__ void round_format(const float* x, float* out, long long n, int mode) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = to_format(x[i], mode);
}
