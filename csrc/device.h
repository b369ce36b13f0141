// Where host code meets the CUDA runtime, in one place: the device check, the device guard, the
// stream, device properties, kernel launches and the key the ops register under.
//
// The CPU emulation tier (tools/cuda_emu) compiles the unchanged csrc/ sources with g++ and
// FASTNORM_EMULATION defined; its header, force-included, then supplies the CUDA runtime and
// execution model, and the ops register on CPU as fastnorm_emu::*. Nothing else differs.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <unordered_map>
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

// What an occupancy answer depends on besides the kernel, block size and dynamic shared memory:
// on a GPU, the device; in the emulation also the emulator's state (the kernel resources it was
// given, a new launch record), which it counts in an epoch. (Its device sizes are device ordinals.)
struct OccupancyKey {
  const void* kernel;
  int threads;
  size_t smem;
  int device;
  bool operator==(const OccupancyKey&) const = default;
};

struct OccupancyKeyHash {
  size_t operator()(const OccupancyKey& k) const noexcept {
    size_t h = std::hash<const void*>()(k.kernel);
    for (uint64_t v : {uint64_t(k.threads), uint64_t(k.smem), uint64_t(k.device)})
      h = (h ^ std::hash<uint64_t>()(v)) * 0x100000001b3ull;
    return h;
  }
};

inline uint64_t occupancy_epoch() {
#ifdef FASTNORM_EMULATION
  return ::fastnorm_emu::occupancy_epoch();
#else
  return 0;
#endif
}

// Blocks of `kernel` one SM holds at once with this block size and dynamic shared memory (the
// runtime's occupancy calculator: registers, shared memory, threads), at least 1. Plans size
// grids from it rather than from an assumed blocks-per-SM. The calculator costs microseconds of
// host time and nearly every op call asks it: answers are cached per host thread (no lock, no
// race between threads), keyed by everything they depend on.
inline int resident_blocks_of(const void* kernel, int threads, size_t smem) {
  struct Cache {
    std::unordered_map<OccupancyKey, int, OccupancyKeyHash> blocks;
    uint64_t epoch = 0;
  };
  static thread_local Cache cache;
  int dev = 0;
  FASTNORM_DEVICE_CHECK(cudaGetDevice(&dev));
  const uint64_t epoch = occupancy_epoch();
  if (epoch != cache.epoch || cache.blocks.size() >= 4096) {  // stale, or shapes without end
    cache.blocks.clear();
    cache.epoch = epoch;
  }
  const OccupancyKey key{kernel, threads, smem, dev};
  const auto it = cache.blocks.find(key);
  if (it != cache.blocks.end()) return it->second;
  int n = 0;
  FASTNORM_DEVICE_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
      &n, kernel, threads, smem, cudaOccupancyDefault));
  n = n > 0 ? n : 1;
  cache.blocks.emplace(key, n);
  return n;
}

template <typename... Params>
inline int resident_blocks(void (*kernel)(Params...), int threads, size_t smem) {
  return resident_blocks_of(reinterpret_cast<const void*>(kernel), threads, smem);
}

}  // namespace fastnorm
