// Strided channels reduced per position (LayerNorm2d on NCHW: channels S elements apart), host
// side: plans (channel lanes per block, cached or not, vector packs, grid) and launch sequences.
// Raw pointers in, kernels out on the current stream; workspaces from the caching allocator.
// Kernels: kernels/channels_positions.cuh.
#pragma once
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

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

// A pack of V positions (V > 1) fits when S % V == 0 (a pack never crosses a channel) and every
// pointer is aligned to the bytes its pack moves, at most 16 (a float32 operand of a half input
// moves 4 bytes per element; wider packs are several 16-byte accesses): {pointer, element bytes}.
inline bool pack_fits(int64_t S, int V, std::initializer_list<std::pair<const void*, int>> ptrs) {
  if (S % V != 0) return false;
  for (const auto& [ptr, elem] : ptrs)
    if (!is_aligned(ptr, size_t(std::min(16, V * elem)))) return false;
  return true;
}

template <typename T>
int operand_bytes(const Operand<T>& o) {
  return o.f32 ? 4 : int(sizeof(T));
}

// Calls f with the widest pack of positions that fits (std::integral_constant): 16 bytes of x,
// else 8 bytes (fp16 / bf16: 4 positions, as ConvNeXt's 14 x 14 = 196 positions allow; fp32: 2),
// else single positions. Weight and bias are read per channel: no alignment needed.
template <typename T, typename F>
void with_position_pack(int64_t S, std::initializer_list<std::pair<const void*, int>> ptrs, F&& f) {
  constexpr int V16 = kVec16<T>, V8 = 8 / int(sizeof(T));
  if (pack_fits(S, V16, ptrs)) {
    f(std::integral_constant<int, V16>{});
    return;
  }
  if constexpr (V8 > 1) {
    if (pack_fits(S, V8, ptrs)) {
      f(std::integral_constant<int, V8>{});
      return;
    }
  }
  f(std::integral_constant<int, 1>{});
}

template <typename T>
void ln2d_forward(const PosFwd<T>& p) {
  with_position_pack<T>(p.S, {{p.x, int(sizeof(T))}, {p.y.ptr, operand_bytes(p.y)}},
                        [&](auto v) { ln2d_forward_vec<T, decltype(v)::value>(p); });
}

// dw_out / db_out: [C] in T or float32, absent when not wanted. p.ws_dw / p.ws_db and where the
// block's sums live (p.sums_in_smem: [2, C] within kBwdSumsSmem) are set here.
template <typename T, int V, bool ACT>
void ln2d_backward_act(PosBwd<T> p, Operand<T> dw_out, Operand<T> db_out, const at::Tensor& like) {
  using A = acc_of<T>;
  const bool want_dw = dw_out.present(), want_db = db_out.present();
  const int cy = channel_lanes(p.C, kCachePacks);
  const size_t sums = size_t(2 * p.C) * sizeof(A);
  p.sums_in_smem = (want_dw || want_db) && sums <= kBwdSumsSmem;
  const size_t smem = p.sums_in_smem ? sums : 0;
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
  with_position_pack<T>(
      p.S, {{p.x, int(sizeof(T))}, {p.dy.ptr, operand_bytes(p.dy)}, {p.dx, int(sizeof(T))}},
      [&](auto v) { ln2d_backward_vec<T, decltype(v)::value>(p, dw_out, db_out, like); });
}

// ---- LocalResponseNorm (kernels/channels_positions.cuh): p.out = y or dx --------------------
// Rows kernels' tiles: whole rows when C fits a shared-memory array (no halo: windows stop at a
// row's ends), as many rows as fit but no fewer tiles than a wave of blocks; otherwise one row's
// chunks of tile_c channels (a multiple of 32) beside the halo their windows reach (forward: the
// window's size - 1 channels; backward: twice that, the twin windows' own windows), with room
// for rounding both ends out to a 16-byte pack. 0: not even 32 channels fit beside the halo.
template <typename T, bool BWD>
inline int64_t lrn_rows_chunk(int64_t C, int64_t size) {
  constexpr int64_t cap = BWD ? kLrnBwdTile<T> : kLrnFwdTile<T>;
  if (C <= cap) return C;
  const LrnReach w = lrn_reach(size, C);
  const int64_t halo = (BWD ? 2 : 1) * (w.before + w.after) + 2 * (kVec16<T> - 1);
  const int64_t tc = halo < cap ? (cap - halo) / 32 * 32 : 0;
  return tc >= 32 ? tc : 0;
}

// Whether the rows kernels take these channels and window: false when not even 32 channels fit
// beside the halo (C above the tile and windows of about 1000 channels or more, 500 in fp64):
// the caller runs the NCHW kernels instead (local_response_norm.cu).
template <typename T, bool BWD>
inline bool lrn_rows_fit(int64_t C, int64_t size) {
  return lrn_rows_chunk<T, BWD>(C, size) > 0;
}

// Grid: one wave of resident blocks walking the units (NCHW) or tiles (rows) grid-stride. NCHW:
// every thread keeps its group's window loads in flight (wave_grid). Rows: each tile's staging
// has all its loads in flight at once (kLrnStage packs per thread and array: a full forward
// tile is 16 KB), and an SM holds up to eight blocks (shared memory allows it), so one block's
// staging overlaps the others' arithmetic.
template <typename T, int V, bool BWD>
void lrn_nchw_run(const LrnArgs<T>& p) {
  constexpr int G = kLrnGroup<T, V>;
  const int64_t units = p.N * (p.S / V) * ceil_div(p.C, G);
  auto kernel = BWD ? lrn_bwd_kernel<T, V> : lrn_fwd_kernel<T, V>;
  const int per_sm = resident_blocks(kernel, kPosThreads, 0);
  launch(kernel, grid_of(wave_grid(ceil_div(units, kPosThreads), per_sm)), kPosThreads, 0,
         current_stream(), p);
}

template <typename T, int V, bool BWD>
void lrn_rows_run(LrnArgs<T> p) {
  constexpr int64_t cap = BWD ? kLrnBwdTile<T> : kLrnFwdTile<T>;
  auto kernel = BWD ? lrn_bwd_rows_kernel<T, V> : lrn_fwd_rows_kernel<T, V>;
  const int64_t wave = int64_t(sm_count()) * resident_blocks(kernel, kPosThreads, 0);
  const int64_t rows = p.N * p.S;
  p.tile_c = lrn_rows_chunk<T, BWD>(p.C, p.size);
  p.ctiles = ceil_div(p.C, p.tile_c);
  p.tile_rows = p.tile_c == p.C ? std::max<int64_t>(1, std::min(cap / p.C, ceil_div(rows, wave))) : 1;
  const int64_t tiles = ceil_div(rows, p.tile_rows) * p.ctiles;
  launch(kernel, grid_of(std::min(tiles, wave)), kPosThreads, 0, current_stream(), p);
}

// Packs: the widest of 16 and 8 bytes that divides the run (NCHW: S, so a pack never crosses a
// channel; rows: C, so none crosses a row) and whose alignment x, dy and (NCHW, which stores in
// packs) out have; single elements otherwise. rows: the caller checked lrn_rows_fit.
template <typename T, bool BWD>
void lrn(const LrnArgs<T>& p, bool rows) {
  auto fits = [&](int v) {
    return (rows ? p.C : p.S) % v == 0 && pack_aligned(p.x, v, sizeof(T)) &&
           pack_aligned(p.dy, v, sizeof(T)) && (rows || pack_aligned(p.out, v, sizeof(T)));
  };
  with_pack<T>(fits, [&](auto v) {
    if (rows) lrn_rows_run<T, decltype(v)::value, BWD>(p);
    else lrn_nchw_run<T, decltype(v)::value, BWD>(p);
  });
}

}  // namespace positions
}  // namespace fastnorm
