// CPU emulation of the CUDA execution model, for running fastnorm's kernels in CI (a test
// artifact: never installed). Force-included (g++ -include cuda_emu.h -DFASTNORM_EMULATION) ahead
// of the csrc/ sources, after tools/cuda_emu/rewrite.py has rewritten two kinds of declaration
// (kernel arithmetic is untouched): each kernel's __launch_bounds__ becomes a kernel_entry() call
// at the top of its body, and __shared__ variables become references to block_shared() /
// dynamic_shared() memory.
//
// Model: the blocks of a grid run one after another; the threads of a block are fibers that run
// until they reach __syncthreads, __syncwarp or a shuffle, where the scheduler checks the
// collective (every live thread at one barrier; every lane of the mask at the same shuffle) and
// performs it. Violations raise from the launch, naming the kernel, block and thread.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// Execution-space keywords: nothing on the CPU.
#undef __host__
#undef __device__
#undef __global__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline __attribute__((always_inline))
// rewrite.py removes every __launch_bounds__ and __shared__; one left over is an error here.
#define __launch_bounds__(...) FASTNORM_EMU_launch_bounds_not_rewritten
#define __shared__ FASTNORM_EMU_shared_not_rewritten

namespace fastnorm_emu {

// ---- the running thread ---------------------------------------------------------------------
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// ---- collectives (each one is a scheduling point) ---------------------------------------------
enum ShflMode : int { kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflBfly = 3 };

// A collective is identified by the file:line where the source names it.
#define FASTNORM_EMU_INLINE inline __attribute__((always_inline))
uint64_t shfl_at(const char* file, int line, ShflMode mode,
                                           unsigned mask, uint64_t bits, int b, int width);
void syncthreads_at(const char* file, int line);
void syncwarp_at(const char* file, int line, unsigned mask);

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a wide type");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

template <typename T>
FASTNORM_EMU_INLINE T shfl_xor(const char* file, int line, unsigned mask, T v, int lane_mask, int width = 32) {
  return from_bits<T>(shfl_at(file, line, kShflBfly, mask, to_bits(v), lane_mask, width));
}
template <typename T>
FASTNORM_EMU_INLINE T shfl_idx(const char* file, int line, unsigned mask, T v, int src, int width = 32) {
  return from_bits<T>(shfl_at(file, line, kShflIdx, mask, to_bits(v), src, width));
}
template <typename T>
FASTNORM_EMU_INLINE T shfl_up(const char* file, int line, unsigned mask, T v, unsigned delta, int width = 32) {
  return from_bits<T>(shfl_at(file, line, kShflUp, mask, to_bits(v), int(delta), width));
}
template <typename T>
FASTNORM_EMU_INLINE T shfl_down(const char* file, int line, unsigned mask, T v, unsigned delta, int width = 32) {
  return from_bits<T>(shfl_at(file, line, kShflDown, mask, to_bits(v), int(delta), width));
}
FASTNORM_EMU_INLINE void syncwarp_mask(const char* file, int line, unsigned mask = 0xffffffffu) {
  syncwarp_at(file, line, mask);
}

// ---- kernels, shared memory ---------------------------------------------------------------------
// First statement of every kernel (rewrite.py): records coverage, checks the block against the
// kernel's __launch_bounds__ (0: none given).
void kernel_entry(const char* pretty_function, int max_threads, int min_blocks = 0);
// A __shared__ variable of `bytes` bytes: one allocation per block (exact size, so the sanitizer
// variant sees overruns), filled with 0xFF (NaN in every float type) when the block starts.
void* block_shared(const void* key, size_t bytes);
// extern __shared__: the launch's dynamic shared memory (exact size, 0xFF-filled per block).
void* dynamic_shared();

// ---- host side --------------------------------------------------------------------------------
// Advances whenever an occupancy answer may change for the same kernel, block, shared memory and
// device ordinal: new kernel resources, or a new launch record (whose log lists every query the
// host plans make). Host caches of the answers (csrc/device.h) are keyed by it.
uint64_t occupancy_epoch();

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

using BlockBody = void (*)(void* ctx);
// Runs every block of a launch; throws c10::Error on an invalid launch or a detected violation.
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, BlockBody body, void* ctx);

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  // The arguments converted to the parameter types once, like CUDA's parameter buffer; every
  // thread then calls the kernel with its own copies.
  struct Call {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  } call{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem,
           [](void* c) {
             Call* k = static_cast<Call*>(c);
             std::apply(k->kernel, k->params);
           },
           &call);
}

}  // namespace fastnorm_emu

#define FASTNORM_EMU_CHECK(expr)                                                             \
  do {                                                                                       \
    const cudaError_t fastnorm_emu_err_ = (expr);                                            \
    TORCH_CHECK(fastnorm_emu_err_ == cudaSuccess, "fastnorm emulation: ", #expr, " failed (", \
                static_cast<int>(fastnorm_emu_err_), ")");                                   \
  } while (0)

// ---- CUDA's built-in variables and device functions ---------------------------------------------
#define threadIdx (::fastnorm_emu::thread_idx())
#define blockIdx (::fastnorm_emu::block_idx())
#define blockDim (::fastnorm_emu::block_dim())
#define gridDim (::fastnorm_emu::grid_dim())
#define warpSize 32

#define __syncthreads() ::fastnorm_emu::syncthreads_at(__FILE__, __LINE__)
#define __syncwarp(...) ::fastnorm_emu::syncwarp_mask(__FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_sync(...) ::fastnorm_emu::shfl_idx(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::fastnorm_emu::shfl_xor(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::fastnorm_emu::shfl_up(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::fastnorm_emu::shfl_down(__FILE__, __LINE__, __VA_ARGS__)

// Math: correctly rounded here; the GPU's rsqrtf is approximate (not bit-identical by design).
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<unsigned long long>(a) * b) >> 32);
}

// cuda_runtime.h's typed overload of cudaFuncSetAttribute exists only under nvcc.
template <typename... Params>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
