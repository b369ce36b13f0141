// Strided channels (BatchNorm NCHW / NHWC, GroupNorm / InstanceNorm channels_last), host side:
// the launch plans (chunks per channel, block shapes, fused or general path, grids for this
// device). The op wrappers (batch_norm_*.cu, group_norm_*.cu) run them. Kernels: kernels/channels_*.cuh.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>

#include "common.h"
#include "kernels/channels_common.cuh"

namespace fastnorm {
namespace channels {

constexpr int64_t kMaxGridY = 65535;

// ---- BatchNorm ---------------------------------------------------------------------------------
// One wave of the kernel that runs on the plan: resident blocks per SM (registers and shared
// memory, from the occupancy calculator) times the SMs. (An assumed 8 blocks per SM made the
// stem's stats kernel 1.65 waves where 5 fit.)
inline int64_t target_blocks(int per_sm) { return static_cast<int64_t>(sm_count()) * per_sm; }

// NCHW: blocks per channel for M vectors per channel.
inline int64_t nchw_chunks(int64_t M, int64_t C, int per_sm) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kUnroll * 2;
  const int64_t g_work = std::max<int64_t>(1, ceil_div(M, per_block));
  const int64_t g_fill = std::max<int64_t>(1, ceil_div(target_blocks(per_sm), std::min(C, kMaxGridY)));
  return std::min<int64_t>(std::min(g_work, g_fill), kMaxGridY);
}

struct NhwcCfg {
  int tx, ty;
  int64_t tiles;  // grid.x
  int64_t G;      // grid.y
};

inline NhwcCfg nhwc_cfg(int64_t R, int64_t C, int V, int per_sm) {
  NhwcCfg k;
  const int64_t Cv = C / V;
  k.tx = 1;
  while (k.tx < 32 && k.tx < Cv) k.tx <<= 1;
  k.ty = kThreads / k.tx;
  k.tiles = ceil_div(Cv, k.tx);
  TORCH_CHECK(k.tiles <= std::numeric_limits<int32_t>::max(), "fastnorm batch_norm: too many channels");
  const int64_t g_work = std::max<int64_t>(1, ceil_div(R, static_cast<int64_t>(k.ty) * kUnroll * 2));
  const int64_t g_fill = std::max<int64_t>(1, ceil_div(target_blocks(per_sm), k.tiles));
  k.G = std::min<int64_t>(std::min(g_work, g_fill), kMaxGridY);
  return k;
}

// One block per channel (tile) when the chunk count is 1 anyway, or the per-thread work is small:
// the fused single-launch path.
constexpr int64_t kFuseVectorsPerThread = 4 * kUnroll;

inline bool fuse_nchw(int64_t M, int64_t G) {
  return G == 1 || M <= static_cast<int64_t>(kThreads) * kFuseVectorsPerThread;
}

inline bool fuse_nhwc(int64_t R, const NhwcCfg& k) {
  return k.G == 1 || R <= static_cast<int64_t>(k.ty) * kFuseVectorsPerThread;
}

// The plan of one BatchNorm pass (forward or backward): NCHW chunks per channel or the NHWC
// tiles, and whether the fused single-launch path applies. per_sm: resident blocks per SM of the
// pass's kernels (the fewer of its reduction and elementwise kernels).
struct BnPlan {
  int64_t Sv = 0;    // NCHW: packs per (n, c) plane (S / V); 0 for NHWC
  int64_t G = 1;     // chunks per channel (grid.y of NCHW, k.G of NHWC)
  NhwcCfg k{};       // NHWC tiles (unused for NCHW)
  bool fused = false;
};

inline BnPlan plan_bn(bool nhwc, int64_t N, int64_t S, int64_t C, int V, int per_sm) {
  BnPlan b;
  if (!nhwc) {
    b.Sv = S / V;
    b.G = nchw_chunks(N * b.Sv, C, per_sm);
    b.fused = fuse_nchw(N * b.Sv, b.G);
  } else {
    b.k = nhwc_cfg(N * S, C, V, per_sm);
    b.G = b.k.G;
    b.fused = fuse_nhwc(N * S, b.k);
  }
  return b;
}

// Finalize kernels: threadIdx.x picks the channel, ty threads share its G1 partials (~4 each).
struct FinCfg {
  dim3 grid, block;
};

inline FinCfg finalize_cfg(int64_t C, int64_t G1) {
  int ty = 1;
  while (ty < kThreads && static_cast<int64_t>(ty) * 4 < G1) ty <<= 1;
  const int tx = kThreads / ty;
  const int64_t blocks = ceil_div(C, tx);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fastnorm batch_norm: too many channels");
  return FinCfg{dim3(static_cast<unsigned>(blocks)), dim3(tx, ty)};
}

inline dim3 nchw_grid(int64_t G, int64_t C) {
  return dim3(static_cast<unsigned>(G), static_cast<unsigned>(std::min(C, kMaxGridY)));
}

inline dim3 nhwc_grid(const NhwcCfg& k, int64_t G) {
  return dim3(static_cast<unsigned>(k.tiles), static_cast<unsigned>(G));
}

// ---- GroupNorm / InstanceNorm channels_last ----------------------------------------------------
// The sample's part of a channels_last plan (both plans below start from it); the kernels index
// items and channels in 32 bits (ClItem, GroupWalk).
inline ClShape cl_shape(int64_t N, int64_t HW, int64_t C, int64_t G) {
  TORCH_CHECK(C <= std::numeric_limits<int32_t>::max(), "fastnorm group_norm: ", C,
              " channels: at most 2^31 - 1 are supported on the channels_last path");
  ClShape s;
  s.N = N;
  s.HW = HW;
  s.C = C;
  s.G = G;
  s.Cg = C / G;
  return s;
}

inline void check_cl_items(const ClShape& s) {
  TORCH_CHECK(s.N * s.K * s.CT <= std::numeric_limits<uint32_t>::max(), "fastnorm group_norm: ",
              s.N * s.K * s.CT, " work items: at most 2^32 - 1 are supported on the channels_last path");
}

// channels_last blocks: bx channel packs x by rows; the HW rows of each n split into K chunks so
// that one wave of the kernel fills the GPU: per_sm x SMs blocks, per_sm the blocks of that
// kernel one SM holds (resident_blocks(): its registers and shared memory, see the budgets in
// kernels/channels_common.cuh). Each block takes one (n, chunk, tile) item, so the grid is rounded
// down to whole waves (a grid of one wave plus a few blocks takes two waves' time); chunks keep at
// least 16 rows (the per-chunk partials [N, K, C] stay a small fraction of the data). When even
// the most chunks leave the GPU short of blocks (small HW: 8 x 1280 x 16 x 16 fp16 made 128
// blocks for 132 SMs), the channel tiles get narrower first (down to 32 packs = 512 bytes per
// row), which adds blocks without adding partials; tiles are balanced (no tile mostly idle).
// When N x tiles alone exceed a wave, K = 1 and the grid is what the data gives.
// The reductions (statistics, backward sums) are planned by plan_cl_sums below, not here: this
// plan's chunks follow N and the device, which only the elementwise passes (apply, dx) may.
inline ClShape plan_cl(int64_t N, int64_t HW, int64_t C, int64_t G, int vec, int sm, int per_sm) {
  ClShape s = cl_shape(N, HW, C, G);
  const int64_t Cp = C / vec;
  const int64_t target = static_cast<int64_t>(std::max(per_sm, 1)) * sm;
  auto kmax_for = [&](int64_t bx) {  // most row chunks with >= max(by, 16) rows each
    const int64_t by = std::max<int64_t>(1, kClThreads / bx);
    return std::max<int64_t>(1, HW / std::max<int64_t>(by, 16));
  };
  int64_t CT = ceil_div(Cp, std::min<int64_t>(Cp, kClThreads));
  while (ceil_div(Cp, CT) > 32 && N * CT * kmax_for(ceil_div(Cp, CT)) < target) ++CT;
  s.bx = static_cast<int>(ceil_div(Cp, CT));
  s.CT = ceil_div(Cp, s.bx);
  s.by = std::max(1, kClThreads / s.bx);
  const int64_t fit = target / (N * s.CT);  // chunks per (n, tile) that keep the grid in one wave
  const int64_t K = std::max<int64_t>(1, std::min(fit, kmax_for(s.bx)));
  s.rpc = ceil_div(HW, K);
  s.K = ceil_div(HW, s.rpc);
  check_cl_items(s);
  return s;
}

// channels_last reductions (GroupNorm / InstanceNorm statistics and backward sums, the per-(n, c)
// moments and gradient sums): the block shape and the row chunks decide the tree that reduces each
// (n, channel), so they are functions of (HW, C, vec) alone, never of N or the device: a sample's
// statistics are the same bits in any batch on any GPU. Tiles of at most kClTilePacks channel
// packs (512 bytes of a row: whole 128-byte lines), balanced, so that a block has >= 8 row lanes
// and a small batch still has tiles x chunks blocks; chunks of kClChunkRows rows or more (a whole
// multiple of by), more rows for large HW so that a sample has at most kClMaxChunks chunks: the
// partials [N, K, C] (2 values per channel per >= 64 rows) stay within ~4% of a forward's bytes,
// and one sample of a 64 x 64 map is still ~60 chunks x tiles blocks.
constexpr int64_t kClTilePacks = 32;
constexpr int64_t kClChunkRows = 64;
constexpr int64_t kClMaxChunks = 256;

inline ClShape plan_cl_sums(int64_t N, int64_t HW, int64_t C, int64_t G, int vec) {
  ClShape s = cl_shape(N, HW, C, G);
  const int64_t Cp = C / vec;
  const int64_t tiles = ceil_div(Cp, std::max<int64_t>(1, std::min<int64_t>(Cp, kClTilePacks)));
  s.bx = static_cast<int>(std::max<int64_t>(1, ceil_div(Cp, tiles)));  // balanced tiles
  s.CT = ceil_div(Cp, s.bx);
  s.by = std::max(1, kClThreads / s.bx);
  const int64_t rows = std::max({kClChunkRows, int64_t(s.by), ceil_div(HW, kClMaxChunks)});
  s.rpc = std::max<int64_t>(1, std::min(HW, round_up(rows, int64_t(s.by))));
  s.K = std::max<int64_t>(1, ceil_div(HW, s.rpc));
  check_cl_items(s);
  return s;
}

}  // namespace channels
}  // namespace fastnorm
