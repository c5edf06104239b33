// AdamW over a whole shard in one launch, and the squared gradient norm in two (kernels/cuda/device.py).
//
// The shard is a table of segments: the moments m and v hold them back to back (segment s at moment offset
// mom[s], length len[s]); its parameters and gradients start at flat[s] of the flat buffers; decay[s] says whether
// weight decay applies. A thread takes moment element j, finds its segment by binary search over mom (sorted), and
// runs the arithmetic of optim.AdamW._update in the same order, one rounding per step, so with --fmad=false it
// equals the NumPy twin bit for bit.

struct AdamCoef {
    double keep, g1, g2, eps, step, b1, b2;
};

template <typename T>
__device__ void adamw_one(T* p, const T* g, T* m, T* v, const long long* flat, const long long* mom,
                          const long long* len, const unsigned char* decay, int nseg, long long j,
                          const AdamCoef c) {
    int lo = 0, hi = nseg - 1;
    while (lo < hi) {  // the last segment whose moment offset is <= j
        int mid = (lo + hi + 1) / 2;
        if (mom[mid] <= j) lo = mid; else hi = mid - 1;
    }
    long long i = flat[lo] + (j - mom[lo]);
    T pv = p[i], gv = g[i], mv = m[j], vv = v[j];
    if (decay[lo]) pv = pv * (T)c.keep;
    mv = mv * (T)c.b1;
    mv = mv + gv * (T)c.g1;
    vv = vv * (T)c.b2;
    T t = gv * gv;
    t = t * (T)c.g2;
    vv = vv + t;
    t = sqrt(vv);
    t = t + (T)c.eps;
    T u = mv * (T)c.step;
    u = u / t;
    p[i] = pv - u;
    m[j] = mv;
    v[j] = vv;
}

#define ADAMW(NAME, T)                                                                                     \
    extern "C" __global__ void NAME(T* p, const T* g, T* m, T* v, const long long* flat,                   \
                                    const long long* mom, const long long* len,                           \
                                    const unsigned char* decay, int nseg, long long total, double keep,    \
                                    double g1, double g2, double eps, double step, double b1, double b2) { \
        const AdamCoef c = {keep, g1, g2, eps, step, b1, b2};                                              \
        for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < total;                    \
             j += (long long)gridDim.x * blockDim.x)                                                       \
            adamw_one<T>(p, g, m, v, flat, mom, len, decay, nseg, j, c);                                   \
    }

ADAMW(adamw_f32, float)
ADAMW(adamw_f64, double)

// Pass 1 of the norm: each block's sum of g^2 in float64 over the ranges [start[r], start[r] + len[r]) of g,
// walked as one index space (offsets off[r] = the sum of the lengths before r), into partial[blockIdx.x].
// Pass 2 (sumsq_finish): one block adds the partials in a fixed order: the same bits on every rank and run.
template <typename T>
__device__ void sumsq_part(const T* g, const long long* start, const long long* off, int nr,
                           long long total, double* partial) {
    __shared__ double acc[256];
    double s = 0.0;
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < total;
         j += (long long)gridDim.x * blockDim.x) {
        int lo = 0, hi = nr - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (off[mid] <= j) lo = mid; else hi = mid - 1;
        }
        double x = (double)g[start[lo] + (j - off[lo])];
        s += x * x;
    }
    acc[threadIdx.x] = s;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w /= 2) {
        if (threadIdx.x < w) acc[threadIdx.x] += acc[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = acc[0];
}

extern "C" __global__ void sumsq_f32(const float* g, const long long* start, const long long* off, int nr,
                                     long long total, double* partial) {
    sumsq_part<float>(g, start, off, nr, total, partial);
}

extern "C" __global__ void sumsq_f64(const double* g, const long long* start, const long long* off, int nr,
                                     long long total, double* partial) {
    sumsq_part<double>(g, start, off, nr, total, partial);
}

extern "C" __global__ void sumsq_finish(const double* partial, int n, double* out) {
    __shared__ double acc[256];
    double s = 0.0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) s += partial[j];
    acc[threadIdx.x] = s;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w /= 2) {
        if (threadIdx.x < w) acc[threadIdx.x] += acc[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = acc[0];
}
