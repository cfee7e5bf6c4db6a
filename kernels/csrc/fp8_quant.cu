// Per-token FP8 (e4m3) quantization of activations, one CUDA block per row, for the FP8 GEMMs' inputs:
//   scale[r] = max(amax(|x[r, :]|) / 448, 1e-12)   (or one static scale for every row)
//   q[r, c]  = e4m3(clamp(x[r, c] / scale[r], -448, 448))   (round to nearest even, IEEE division)
// which is bit for bit what kernels/fp8.py's PyTorch reference computes. Called through ctypes: the launch
// costs a few microseconds of host time, where a Triton launch costs tens (measured on an H200), and at
// decode and mid-size token counts that host time, not the GPU's, bounds an FP8 layer.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 512;
constexpr float kFp8Max = 448.0f;

template <class T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}

__device__ __forceinline__ __nv_fp8_e4m3 encode(float v, float scale) {
  return __nv_fp8_e4m3(fminf(fmaxf(__fdiv_rn(v, scale), -kFp8Max), kFp8Max));
}

// Rows whose length and start are multiples of 8 elements load 16 bytes (8 values) per thread and step.
template <class T>
__global__ void __launch_bounds__(kThreads) quantize_rows(const T* __restrict__ x, __nv_fp8_e4m3* __restrict__ q,
                                                          float* __restrict__ scales,
                                                          const float* __restrict__ static_scale, int k,
                                                          int64_t stride_x, int64_t stride_q, bool vector) {
  const T* row = x + blockIdx.x * stride_x;
  __nv_fp8_e4m3* out = q + blockIdx.x * stride_q;
  constexpr int kVec = 16 / sizeof(T);
  __shared__ float warp_max[kThreads / 32];
  float scale;
  if (static_scale != nullptr) {
    scale = *static_scale;
  } else {
    float amax = 0.0f;
    if (vector) {
      for (int i = threadIdx.x * kVec; i < k; i += kThreads * kVec) {
        uint4 packed = *reinterpret_cast<const uint4*>(row + i);
        T const* values = reinterpret_cast<T const*>(&packed);
#pragma unroll
        for (int j = 0; j < kVec; ++j) amax = fmaxf(amax, fabsf(to_float(values[j])));
      }
    } else {
      for (int i = threadIdx.x; i < k; i += kThreads) amax = fmaxf(amax, fabsf(to_float(row[i])));
    }
    for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
    __syncthreads();
    if (threadIdx.x < 32) {
      amax = threadIdx.x < kThreads / 32 ? warp_max[threadIdx.x] : 0.0f;
      for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
      if (threadIdx.x == 0) warp_max[0] = fmaxf(amax / kFp8Max, 1e-12f);
    }
    __syncthreads();
    scale = warp_max[0];
  }
  if (threadIdx.x == 0) scales[blockIdx.x] = scale;
  if (vector) {
    for (int i = threadIdx.x * kVec; i < k; i += kThreads * kVec) {
      uint4 packed = *reinterpret_cast<const uint4*>(row + i);
      T const* values = reinterpret_cast<T const*>(&packed);
      __nv_fp8_e4m3 codes[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) codes[j] = encode(to_float(values[j]), scale);
      if constexpr (kVec == 8) {
        *reinterpret_cast<uint2*>(out + i) = *reinterpret_cast<uint2*>(codes);
      } else {
        *reinterpret_cast<uint32_t*>(out + i) = *reinterpret_cast<uint32_t*>(codes);
      }
    }
  } else {
    for (int i = threadIdx.x; i < k; i += kThreads) out[i] = encode(to_float(row[i]), scale);
  }
}

template <class T>
int launch(const void* x, void* q, float* scales, const float* static_scale, int rows, int k, int64_t stride_x,
           int64_t stride_q, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  bool vector = k % kVec == 0 && stride_x % kVec == 0 && stride_q % kVec == 0 &&
                reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(q) % kVec == 0;
  quantize_rows<T><<<rows, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<__nv_fp8_e4m3*>(q), scales,
                                                  static_scale, k, stride_x, stride_q, vector);
  return cudaPeekAtLastError() == cudaSuccess ? 0 : 4;
}

}  // namespace

// dtype: 0 bfloat16, 1 float16, 2 float32. Returns 0, or 4 on a CUDA error (the codes of kernels/cutlass24.py).
extern "C" int sf_fp8_quantize_rows(int dtype, const void* x, void* q, float* scales, const float* static_scale,
                                    int rows, int k, int64_t stride_x, int64_t stride_q, cudaStream_t stream) {
  if (rows == 0) return 0;
  switch (dtype) {
    case 0:
      return launch<__nv_bfloat16>(x, q, scales, static_scale, rows, k, stride_x, stride_q, stream);
    case 1:
      return launch<__half>(x, q, scales, static_scale, rows, k, stride_x, stride_q, stream);
    case 2:
      return launch<float>(x, q, scales, static_scale, rows, k, stride_x, stride_q, stream);
    default:
      return 1;
  }
}
