// dialora's fused kernels for CUDA devices: the CUDA bodies of the custom ops in
// common/src/model/ops.rs (whose CPU bodies and plain-candle references sit beside them there).
// Compiled to PTX by common/build.rs when the `cuda` feature is on. Every kernel comes in an f32
// and a bf16 version (suffix _f32 / _bf16); arithmetic and reductions are in f32 for both.
//
// Row kernels (softmax, RMSNorm, cross-entropy) run one block per row; element-wise kernels one
// thread per element (grid-stride). Accurate expf/logf (no fast-math): the CPU bodies are the
// reference to 1e-5.

#include <cuda_bf16.h>
#include <stdint.h>

#define BLOCK 256

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

// Block-wide sum / max of one value per thread (blockDim.x == BLOCK); every thread gets it.
__device__ float block_sum(float v) {
    __shared__ float shared[BLOCK / 32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < BLOCK / 32 ? shared[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ float block_max(float v) {
    __shared__ float shared[BLOCK / 32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < BLOCK / 32 ? shared[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// softmax(scale * s + causal mask) in place; row r of `rows` sees keys 0..=past + r % t.
template <typename T>
__device__ void causal_softmax(T *s, int cols, int t, int past, float scale) {
    const long row = blockIdx.x;
    T *x = s + row * cols;
    const int seen = past + (int)(row % t) + 1;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < seen; j += BLOCK) m = fmaxf(m, to_f(x[j]) * scale);
    m = block_max(m);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < seen; j += BLOCK) sum += expf(to_f(x[j]) * scale - m);
    sum = block_sum(sum);
    const float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < cols; j += BLOCK)
        x[j] = from_f<T>(j < seen ? expf(to_f(x[j]) * scale - m) * inv : 0.0f);
}

// dS = scale * P * (dP - sum(P * dP)) in place over dP.
template <typename T>
__device__ void softmax_backward(T *dp, const T *p, int cols, float scale) {
    const long row = blockIdx.x;
    T *d = dp + row * cols;
    const T *pr = p + row * cols;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < cols; j += BLOCK) dot += to_f(pr[j]) * to_f(d[j]);
    dot = block_sum(dot);
    for (int j = threadIdx.x; j < cols; j += BLOCK)
        d[j] = from_f<T>(scale * to_f(pr[j]) * (to_f(d[j]) - dot));
}

// RMSNorm backward w.r.t. x: dx = r * (g - xhat * mean(g * xhat)), g = dy * w, r = rsqrt(ms + eps).
template <typename T>
__device__ void rms_norm_backward(const T *x, const T *w, const T *dy, T *dx, int d, float eps) {
    const long row = blockIdx.x;
    const T *xr = x + row * d;
    const T *dr = dy + row * d;
    T *o = dx + row * d;
    float ss = 0.0f, gx = 0.0f;
    for (int j = threadIdx.x; j < d; j += BLOCK) {
        float xv = to_f(xr[j]);
        ss += xv * xv;
        gx += to_f(dr[j]) * to_f(w[j]) * xv;
    }
    ss = block_sum(ss);
    gx = block_sum(gx);
    const float r = rsqrtf(ss / d + eps);
    const float dot = gx * r / d;
    for (int j = threadIdx.x; j < d; j += BLOCK) {
        float xhat = to_f(xr[j]) * r;
        o[j] = from_f<T>(r * (to_f(dr[j]) * to_f(w[j]) - xhat * dot));
    }
}

// Token cross-entropy of a row of logits, and in place its gradient
// scale * (softmax(x) - onehot(target)); the row's loss goes to losses[row] (f32).
template <typename T>
__device__ void cross_entropy(T *logits, const uint32_t *targets, float *losses, int v,
                              float scale, int write_grad) {
    const long row = blockIdx.x;
    T *x = logits + row * v;
    const uint32_t tg = targets[row];
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += BLOCK) m = fmaxf(m, to_f(x[j]));
    m = block_max(m);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < v; j += BLOCK) sum += expf(to_f(x[j]) - m);
    sum = block_sum(sum);
    const float picked = to_f(x[tg]);
    __syncthreads();  // every thread read x[tg] before it is overwritten
    if (threadIdx.x == 0) losses[row] = m + logf(sum) - picked;
    if (!write_grad) return;
    const float f = scale / sum;
    for (int j = threadIdx.x; j < v; j += BLOCK) {
        float g = expf(to_f(x[j]) - m) * f;
        if (j == (int)tg) g -= scale;
        x[j] = from_f<T>(g);
    }
}

// silu(g) * u
template <typename T>
__device__ void swiglu(const T *g, const T *u, T *out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float x = to_f(g[i]);
        out[i] = from_f<T>(x / (1.0f + expf(-x)) * to_f(u[i]));
    }
}

// out[0..n] = dg, out[n..2n] = du for a = silu(g) * u.
template <typename T>
__device__ void swiglu_backward(const T *g, const T *u, const T *da, T *out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float x = to_f(g[i]), uu = to_f(u[i]), d = to_f(da[i]);
        float sig = 1.0f / (1.0f + expf(-x));
        out[i] = from_f<T>(d * uu * sig * (1.0f + x * (1.0f - sig)));
        out[n + i] = from_f<T>(d * x * sig);
    }
}

// The dropout mask value of element i: a pure function of (stream, i), the same as
// `DropoutMask::value` in common/src/model/ops.rs. One 64-bit hash (SplitMix64's finaliser)
// per group of four elements gives four 16-bit uniforms; an element is dropped when its
// uniform is below `threshold` (p * 65536), and kept ones are scaled by `keep` (1 / (1 - p)).
__device__ __forceinline__ float mask_value(uint64_t stream, long i, uint32_t threshold, float keep) {
    uint64_t z = stream + (uint64_t)(i >> 2) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    uint32_t u = (uint32_t)((z >> (16 * (i & 3))) & 0xFFFF);
    return u < threshold ? 0.0f : keep;
}

template <typename T>
__device__ void dropout(const T *x, T *out, long n, uint64_t stream, uint32_t threshold, float keep) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = from_f<T>(to_f(x[i]) * mask_value(stream, i, threshold, keep));
}

template <typename T>
__device__ void add_dropped(T *acc, const T *t, long n, uint64_t stream, uint32_t threshold, float keep) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        acc[i] = from_f<T>(to_f(acc[i]) + to_f(t[i]) * mask_value(stream, i, threshold, keep));
}

#define INSTANTIATE(SUF, T)                                                                       \
    extern "C" __global__ void causal_softmax_##SUF(T *s, int cols, int t, int past, float scale) { \
        causal_softmax<T>(s, cols, t, past, scale);                                               \
    }                                                                                             \
    extern "C" __global__ void softmax_backward_##SUF(T *dp, const T *p, int cols, float scale) { \
        softmax_backward<T>(dp, p, cols, scale);                                                  \
    }                                                                                             \
    extern "C" __global__ void rms_norm_backward_##SUF(const T *x, const T *w, const T *dy, T *dx, \
                                                       int d, float eps) {                        \
        rms_norm_backward<T>(x, w, dy, dx, d, eps);                                               \
    }                                                                                             \
    extern "C" __global__ void cross_entropy_##SUF(T *logits, const uint32_t *targets,           \
                                                   float *losses, int v, float scale,             \
                                                   int write_grad) {                              \
        cross_entropy<T>(logits, targets, losses, v, scale, write_grad);                          \
    }                                                                                             \
    extern "C" __global__ void swiglu_##SUF(const T *g, const T *u, T *out, long n) {             \
        swiglu<T>(g, u, out, n);                                                                  \
    }                                                                                             \
    extern "C" __global__ void swiglu_backward_##SUF(const T *g, const T *u, const T *da, T *out, \
                                                     long n) {                                    \
        swiglu_backward<T>(g, u, da, out, n);                                                     \
    }                                                                                             \
    extern "C" __global__ void dropout_##SUF(const T *x, T *out, long n, uint64_t stream,         \
                                             uint32_t threshold, float keep) {                    \
        dropout<T>(x, out, n, stream, threshold, keep);                                           \
    }                                                                                             \
    extern "C" __global__ void add_dropped_##SUF(T *acc, const T *t, long n, uint64_t stream,     \
                                                 uint32_t threshold, float keep) {                \
        add_dropped<T>(acc, t, n, stream, threshold, keep);                                       \
    }

INSTANTIATE(f32, float)
INSTANTIATE(bf16, __nv_bfloat16)
