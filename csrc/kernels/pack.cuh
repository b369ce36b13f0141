// The vocabulary every kernel speaks: the accumulation type, packs of elements moved by one
// memory instruction, tensors whose dtype is the data's or float32, a fast divider.
// Framework-free device code (cuda + c10's Half/BFloat16 value types only).
#pragma once
#include <cuda_runtime.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastnorm {

// Accumulation (and statistics) type: fp64 for fp64 data, fp32 otherwise.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_of = typename AccOf<T>::type;

// Elements per 16-byte access.
template <typename T> inline constexpr int kVec16 = 16 / int(sizeof(T));
// Elements per 8-byte access: the fallback pack when 16 bytes do not divide a run (fp16 at 14 x 14
// = 196 positions); 1 for fp64.
template <typename T> inline constexpr int kVec8 = 8 / int(sizeof(T));

__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return rsqrt(v); }

// z = xhat * w + b as the row and position kernels form it, forward and backward alike:
// (x - mean) * scale + shift with scale = rstd * w, the product and the sum rounded once. An
// explicit fma, not one left to contraction (nvcc contracts, g++ does not, and other spellings
// contract differently): a backward that recomputes z from the saved statistics finds the
// forward's z bit for bit, so an activation's kink falls on the same side of it.
__device__ __forceinline__ float affine_z(float x, float mean, float scale, float shift) {
  return fmaf(x - mean, scale, shift);
}
__device__ __forceinline__ double affine_z(double x, double mean, double scale, double shift) {
  return fma(x - mean, scale, shift);
}

// V consecutive elements moved by one load or store (the host checks the alignment).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Loads VEC consecutive elements. p must be aligned to min(16, VEC * sizeof(T)) bytes (the host
// checks the base pointer; offsets are multiples of VEC elements).
template <typename T, int VEC>
__device__ __forceinline__ void load_raw(const T* __restrict__ p, T (&v)[VEC]) {
  constexpr int kBytes = int(sizeof(T)) * VEC;
  if constexpr (VEC == 1) {
    v[0] = p[0];
  } else if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) {
      const uint4 u = reinterpret_cast<const uint4*>(p)[i];
      memcpy(reinterpret_cast<char*>(v) + 16 * i, &u, 16);
    }
  } else if constexpr (kBytes == 8) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    memcpy(v, &u, 8);
  } else if constexpr (kBytes == 4) {
    const uint32_t u = *reinterpret_cast<const uint32_t*>(p);
    memcpy(v, &u, 4);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = p[i];
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_raw(T* __restrict__ p, const T (&v)[VEC]) {
  constexpr int kBytes = int(sizeof(T)) * VEC;
  if constexpr (VEC == 1) {
    p[0] = v[0];
  } else if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) {
      uint4 u;
      memcpy(&u, reinterpret_cast<const char*>(v) + 16 * i, 16);
      reinterpret_cast<uint4*>(p)[i] = u;
    }
  } else if constexpr (kBytes == 8) {
    uint2 u;
    memcpy(&u, v, 8);
    *reinterpret_cast<uint2*>(p) = u;
  } else if constexpr (kBytes == 4) {
    uint32_t u;
    memcpy(&u, v, 4);
    *reinterpret_cast<uint32_t*>(p) = u;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = v[i];
  }
}

template <typename A, typename T, int VEC>
__device__ __forceinline__ void load_acc(const T* __restrict__ p, A (&a)[VEC]) {
  T v[VEC];
  load_raw<T, VEC>(p, v);
#pragma unroll
  for (int i = 0; i < VEC; ++i) a[i] = static_cast<A>(v[i]);
}

template <typename T, int VEC, typename A>
__device__ __forceinline__ void store_as(T* p, const A (&a)[VEC]) {
  T v[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) v[i] = static_cast<T>(a[i]);
  store_raw<T, VEC>(p, v);
}

// A tensor whose dtype is the data's (T) or float32 — parameters and running statistics under
// AMP, a float32 grad_out, an autocast float32 output, fp32 parameter gradients — or absent
// (null). Which of the two is a run-time flag: one kernel serves both. Values are read and
// written as the accumulation type.
template <typename T>
struct Operand {
  using A = acc_of<T>;
  void* ptr = nullptr;
  bool f32 = false;

  __host__ __device__ bool present() const { return ptr != nullptr; }
  // The operand n elements further on (absent stays absent).
  __host__ __device__ Operand advanced(int64_t n) const {
    if (ptr == nullptr) return *this;
    const int64_t bytes = (std::is_same_v<T, float> || f32) ? 4 : int64_t(sizeof(T));
    return Operand{static_cast<char*>(ptr) + n * bytes, f32};
  }

  __device__ __forceinline__ A get(int64_t i) const {
    if (std::is_same_v<T, float> || f32) return static_cast<A>(static_cast<const float*>(ptr)[i]);
    return static_cast<A>(static_cast<const T*>(ptr)[i]);
  }
  __device__ __forceinline__ A get_or(int64_t i, A absent) const {
    return ptr != nullptr ? get(i) : absent;
  }
  __device__ __forceinline__ void set(int64_t i, A v) const {
    if (std::is_same_v<T, float> || f32) static_cast<float*>(ptr)[i] = static_cast<float>(v);
    else static_cast<T*>(ptr)[i] = static_cast<T>(v);
  }
  // VEC consecutive elements from i (a multiple of VEC; the host checks the alignment)
  template <int VEC>
  __device__ __forceinline__ void load(int64_t i, A (&a)[VEC]) const {
    if (std::is_same_v<T, float> || f32) load_acc<A, float, VEC>(static_cast<const float*>(ptr) + i, a);
    else load_acc<A, T, VEC>(static_cast<const T*>(ptr) + i, a);
  }
  template <int VEC>
  __device__ __forceinline__ void store(int64_t i, const A (&a)[VEC]) const {
    if (std::is_same_v<T, float> || f32) store_as<float, VEC, A>(static_cast<float*>(ptr) + i, a);
    else store_as<T, VEC, A>(static_cast<T*>(ptr) + i, a);
  }
};

// n / d for 0 <= n < 2^31 and 1 <= d < 2^31 with a multiply and a shift (the round-up method
// PyTorch's IntDivider uses).
struct FastDiv {
  uint32_t d = 1, m = 1, s = 0;
  FastDiv() = default;
  __host__ explicit FastDiv(uint32_t divisor) : d(divisor) {
    s = 0;
    while (s < 32 && (uint64_t(1) << s) < divisor) ++s;
    const uint64_t one = 1;
    m = static_cast<uint32_t>(((one << 32) * ((one << s) - divisor)) / divisor + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> s; }
};

}  // namespace fastnorm
