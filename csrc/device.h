// Where host code meets the CUDA runtime, in one place: the device check, the device guard, the
// stream, device properties, kernel launches and the key the ops register under.
//
// The CPU emulation tier (tools/cuda_emu) compiles the unchanged csrc/ sources with g++ and
// FASTNORM_EMULATION defined; its header, force-included, then supplies the CUDA runtime and
// execution model, and the ops register on CPU as fastnorm_emu::*. Nothing else differs.
#pragma once
#include <ATen/core/Tensor.h>

#include <utility>

#ifndef FASTNORM_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define FASTNORM_OP_NAMESPACE fastnorm
#define FASTNORM_DISPATCH_KEY CUDA
#else
#define FASTNORM_OP_NAMESPACE fastnorm_emu
#define FASTNORM_DISPATCH_KEY CPU
#endif

namespace fastnorm {

#ifndef FASTNORM_EMULATION
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;
using DeviceGuard = c10::cuda::CUDAGuard;
#define FASTNORM_DEVICE_CHECK(expr) C10_CUDA_CHECK(expr)

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Every kernel launch goes through here; a bad configuration raises at the call, not later.
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#else
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;
using DeviceGuard = ::fastnorm_emu::DeviceGuard;
#define FASTNORM_DEVICE_CHECK(expr) FASTNORM_EMU_CHECK(expr)

inline cudaStream_t current_stream() { return nullptr; }

template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t /*stream*/, Args&&... args) {
  ::fastnorm_emu::launch(kernel, grid, block, smem, std::forward<Args>(args)...);
}
#endif

// The one device check of the host wrappers: inputs live on the device the kernels run on.
inline void check_kernel_device(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.device().type() == kKernelDevice, op, ": expected a ",
              c10::DeviceTypeName(kKernelDevice), " input, got device ", t.device());
}

// Multiprocessors of the current device (cached per device: plans size grids from it).
inline int sm_count() {
  static thread_local int cached_device = -1, cached_count = 0;
  int dev = 0;
  FASTNORM_DEVICE_CHECK(cudaGetDevice(&dev));
  if (dev != cached_device) {
    FASTNORM_DEVICE_CHECK(cudaDeviceGetAttribute(&cached_count, cudaDevAttrMultiProcessorCount, dev));
    cached_device = dev;
  }
  return cached_count;
}

// Blocks of `kernel` one SM holds at once with this block size and dynamic shared memory (the
// runtime's occupancy calculator: registers, shared memory, threads), at least 1. Plans size
// grids from it rather than from an assumed blocks-per-SM.
template <typename... Params>
inline int resident_blocks(void (*kernel)(Params...), int threads, size_t smem) {
  int n = 0;
  FASTNORM_DEVICE_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem));
  return n > 0 ? n : 1;
}

}  // namespace fastnorm
