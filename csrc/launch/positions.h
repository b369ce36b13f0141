// Strided channels reduced per position (LayerNorm2d on NCHW: channels S elements apart), host
// side: plans (channel lanes per block, cached or not, vector packs, grid) and launch sequences.
// Raw pointers in, kernels out on the current stream; workspaces from the caching allocator.
// Kernels: kernels/channels_positions.cuh.
#pragma once
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "kernels/channels_positions.cuh"
#include "launch/groups.h"  // launch_col_sums: the fixed-order [K, C] -> [C] finalize

namespace fastnorm {
namespace positions {

// Channel lanes per block (8, 16 or 32; positions per block = 256 / lanes): the fewest lanes
// that give each lane at most `per_lane` channels, so that the forward's lane keeps its packs in
// registers (per_lane = kCachePacks) when C <= 256. At least 8 lanes: then a tile is at most 32
// position packs, one warp or less along positions, which is what lets the backward sum a
// channel's tile with width-PX shuffles; at most 32, which leaves 8 packs (128 bytes of fp32
// positions at V = 4) per channel row of a warp, still whole 32-byte sectors.
inline int channel_lanes(int64_t C, int64_t per_lane) {
  int cy = 8;
  while (cy < 32 && int64_t(cy) * per_lane < C) cy <<= 1;
  return cy;
}

// The backward's per-block dweight/dbias sums live in dynamic shared memory, [2, C]; kept within
// 32 KB (beside the 16 KB static merge buffer, under the 48 KB needing no opt-in). Wider C: the op
// wrapper runs the rows family on a channels_last copy instead.
template <typename T>
inline constexpr int64_t kMaxBwdChannels = (32 * 1024) / (2 * int64_t(sizeof(acc_of<T>)));

// Grid: one wave of resident blocks (the occupancy calculator's count for this kernel, block and
// shared memory), each walking tiles grid-stride; fewer when there are fewer tiles. Why one wave
// is enough: a resident thread has its loads for a tile in flight at once — cached forward: all
// its C / lanes packs (up to 8 x 16 bytes) before the first use; otherwise a 4-deep unrolled walk
// over its channels, 4 x 16 bytes — so an SM with r resident 256-thread blocks keeps about
// r x 256 x 64 bytes = r x 16 KB in flight, while an H100 needs ~16-32 KB per SM (3.35 TB/s x
// ~1 us latency / 132 SMs). Any r >= 2 covers it; more blocks than a wave would only re-split
// the same tiles.
inline int64_t wave_grid(int64_t tiles, int per_sm) {
  return std::max<int64_t>(1, std::min<int64_t>(tiles, int64_t(sm_count()) * per_sm));
}

template <typename T, int V, bool CACHED, bool ACT>
void ln2d_forward_run(const PosFwd<T>& p, int cy) {
  const int64_t tiles = ceil_div(p.N * (p.S / V), kPosThreads / cy);
  const int per_sm = resident_blocks(ln2d_fwd_kernel<T, V, CACHED, ACT>, kPosThreads, 0);
  launch(ln2d_fwd_kernel<T, V, CACHED, ACT>, grid_of(wave_grid(tiles, per_sm)), kPosThreads, 0,
         current_stream(), p, cy);
}

// ACT: the activation epilogue compiled in only when there is one (p.act not the identity).
template <typename T, int V, bool ACT>
void ln2d_forward_act(const PosFwd<T>& p) {
  const int cy = channel_lanes(p.C, kCachePacks);
  if (p.C <= int64_t(cy) * kCachePacks) ln2d_forward_run<T, V, true, ACT>(p, cy);
  else ln2d_forward_run<T, V, false, ACT>(p, cy);
}

template <typename T, int V>
void ln2d_forward_vec(const PosFwd<T>& p) {
  if (p.act.kind != kActIdentity) ln2d_forward_act<T, V, true>(p);
  else ln2d_forward_act<T, V, false>(p);
}

// 16-byte packs of V positions when S % V == 0 (a pack never crosses a channel) and x and y are
// 16-byte aligned (every pack offset is then a multiple of V elements); single positions
// otherwise. Weight and bias are read per channel: no alignment needed.
template <typename T>
void ln2d_forward(const PosFwd<T>& p) {
  constexpr int V = kVec16<T>;
  const bool vec = p.S % V == 0 && groups::aligned16(p.x) && groups::aligned16(p.y.ptr);
  if (vec) ln2d_forward_vec<T, V>(p);
  else ln2d_forward_vec<T, 1>(p);
}

// dw_out / db_out: [C] in T or float32, absent when not wanted. p.ws_dw / p.ws_db are set here.
template <typename T, int V, bool ACT>
void ln2d_backward_act(PosBwd<T> p, Operand<T> dw_out, Operand<T> db_out, const at::Tensor& like) {
  using A = acc_of<T>;
  const bool want_dw = dw_out.present(), want_db = db_out.present();
  const int cy = channel_lanes(p.C, kCachePacks);
  const size_t smem = want_dw || want_db ? size_t(2 * p.C) * sizeof(A) : 0;
  const int64_t tiles = ceil_div(p.N * (p.S / V), kPosThreads / cy);
  const int per_sm = resident_blocks(ln2d_bwd_kernel<T, V, ACT>, kPosThreads, smem);
  // one wave (see wave_grid): also bounds the [grid, C] partials, read once by the finalize
  const int64_t grid = std::min<int64_t>(wave_grid(tiles, per_sm), kMaxGrid);
  at::Tensor ws_dw, ws_db;
  if (want_dw) ws_dw = at::empty({grid, p.C}, acc_options(like));
  if (want_db) ws_db = at::empty({grid, p.C}, acc_options(like));
  p.ws_dw = want_dw ? ws_dw.data_ptr<A>() : nullptr;
  p.ws_db = want_db ? ws_db.data_ptr<A>() : nullptr;
  launch(ln2d_bwd_kernel<T, V, ACT>, static_cast<unsigned>(grid), kPosThreads, smem,
         current_stream(), p, cy);
  groups::launch_col_sums<T>(p.ws_dw, p.ws_db, grid, p.C, dw_out, db_out);
}

template <typename T, int V>
void ln2d_backward_vec(PosBwd<T> p, Operand<T> dw_out, Operand<T> db_out, const at::Tensor& like) {
  if (p.act.kind != kActIdentity) ln2d_backward_act<T, V, true>(p, dw_out, db_out, like);
  else ln2d_backward_act<T, V, false>(p, dw_out, db_out, like);
}

template <typename T>
void ln2d_backward(const PosBwd<T>& p, Operand<T> dw_out, Operand<T> db_out,
                   const at::Tensor& like) {
  constexpr int V = kVec16<T>;
  const bool vec = p.S % V == 0 && groups::aligned16(p.x) && is_aligned(p.dy.ptr, 16) &&
                   groups::aligned16(p.dx);
  if (vec) ln2d_backward_vec<T, V>(p, dw_out, db_out, like);
  else ln2d_backward_vec<T, 1>(p, dw_out, db_out, like);
}

// LocalResponseNorm: one kernel each way (kernels/channels_positions.cuh), p.out = y or dx.
// NCHW (CL = false): 16-byte packs of V positions when S % V == 0 (a pack never crosses a channel)
// and x, dy and out are 16-byte aligned; single positions otherwise. Rows (CL = true: channels
// last, or S == 1): scalar loads along the row; a group's outputs stored as one pack when C is a
// multiple of the group (every group then starts G elements apart) and out is 16-byte aligned.
// Grid: one wave of resident blocks walking the units grid-stride (wave_grid: every thread keeps
// its group's window loads in flight, as the LayerNorm2d forward does).
template <typename T, int V, bool CL, bool BWD>
void lrn_run(const LrnArgs<T>& p) {
  constexpr int G = kLrnGroup<T, V>;
  const int64_t items = CL ? p.N * p.S : p.N * (p.S / V);
  const int64_t units = items * ceil_div(p.C, G);
  auto kernel = BWD ? lrn_bwd_kernel<T, V, CL> : lrn_fwd_kernel<T, V, CL>;
  const int per_sm = resident_blocks(kernel, kPosThreads, 0);
  launch(kernel, grid_of(wave_grid(ceil_div(units, kPosThreads), per_sm)), kPosThreads, 0,
         current_stream(), p);
}

template <typename T, bool BWD>
void lrn(LrnArgs<T> p, bool rows) {
  constexpr int V = kVec16<T>;
  if (rows) {
    p.vec_store = p.C % kLrnGroup<T, 1> == 0 && groups::aligned16(p.out);
    lrn_run<T, 1, true, BWD>(p);
    return;
  }
  const bool vec = p.S % V == 0 && groups::aligned16(p.x) && groups::aligned16(p.out) &&
                   (!BWD || groups::aligned16(p.dy));
  if (vec) lrn_run<T, V, false, BWD>(p);
  else lrn_run<T, 1, false, BWD>(p);
}

}  // namespace positions
}  // namespace fastnorm
