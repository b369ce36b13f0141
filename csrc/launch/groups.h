// Contiguous groups (LayerNorm rows, GroupNorm / InstanceNorm NCHW groups), host side: the launch
// plans (which kernels, grid, block for a shape on this device) and the launch sequences that
// layer_norm_*.cu and group_norm_*.cu share. Raw pointers in, kernels out on the current stream;
// workspaces come from the caching allocator (at::empty). Kernels: kernels/groups_*.cuh.
//
// Batch and device invariance: how a row is reduced (cached or split, threads per row, chunks) is
// decided by the row's own length, dtype, pack width and the call's flags, never by the number of
// rows M or the SM count; those choose only how many rows a block takes and the grid. So a row's
// statistics, output and input gradient are the same bits alone, in any batch, on any GPU of an
// architecture (docs/semantics.md, "Reproducibility").
#pragma once
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.h"
#include "kernels/groups_backward.cuh"
#include "kernels/groups_forward.cuh"

namespace fastnorm {
namespace groups {

template <typename T>
inline bool aligned16(const T* p) {
  return p == nullptr || is_aligned(p, 16);
}

// ---- cached (rows in registers) plans ---------------------------------------------------------
struct CachedPlan {
  bool ok = false;     // the row fits the kernel's registers at max_tpr threads (else: split)
  int tpr = 1;         // threads per row, a power of two
  int threads = 0;     // block size
  int64_t row_blocks = 0;
};

// Threads per row of the cached kernels: a function of the row alone (the tree that reduces it).
// Each thread issues all its loads of a row before the reduction, so a resident row keeps its
// whole row in flight and an SM keeps (resident rows) x (row bytes): the fewest threads per row
// that hold the row in registers give the most resident rows, hence the most bytes in flight
// (Little's law: an H100 needs ~16 KB per SM), with a floor of enough threads that one warp load
// covers a 128-byte line of a row (narrow rows). Few rows are not given more threads per row:
// that would be another tree (the widening by M x tpr < SMs x 256 this replaced made a row's bits
// depend on its batch and GPU); a small batch is launch-bound, one launch per pass either way.
constexpr int64_t kLineBytes = 128;

// packs_per_thread: the kernel's register capacity; sub_warp_threads: block size when tpr <= 32.
// M only counts the blocks.
inline CachedPlan plan_cached(int64_t M, int64_t L, int vec, int elem_bytes, int packs_per_thread,
                              int max_tpr, int sub_warp_threads) {
  CachedPlan c;
  const int64_t packs = L / vec;
  const int64_t need = std::max<int64_t>(1, ceil_div(packs, packs_per_thread));
  if (need > max_tpr) return c;
  const int64_t line = std::min<int64_t>(packs, ceil_div(kLineBytes, int64_t(vec) * elem_bytes));
  const int tpr = std::max(pow2_ceil(need), pow2_ceil(line));
  c.ok = true;
  c.tpr = tpr;
  c.threads = tpr <= 32 ? sub_warp_threads : tpr;
  c.row_blocks = ceil_div(M, c.threads / tpr);
  return c;
}

// ---- (row, chunk) items ---------------------------------------------------------------------------
// A row of up to kItemChunkPacks packs is one item; a longer row is cut into chunks of
// kItemChunkPacks packs (four iterations of a full warp: 8 KB of 16-byte packs), the last one
// shorter. The chunks, hence a row's partials and their merge order, depend on the row's length
// and pack width alone: not on M, not on the device (a row's bits are the same in any batch on any
// GPU). The fill of the GPU comes from the number of items: M x chunks, with chunks of 8 KB an
// item of a long row is still a warp's worth of loads in flight. tpr lanes per item.
constexpr int64_t kItemChunkPacks = 4 * 32 * kUnroll;

inline Items plan_items(int64_t M, int64_t L, int vec) {
  Items it;
  it.M = M;
  it.L = L;
  const int64_t Lp = std::max<int64_t>(1, L / vec);
  const int64_t cp = std::min(Lp, kItemChunkPacks);
  it.S = ceil_div(Lp, cp);
  it.chunk = cp * vec;
  it.tpr = std::min(32, pow2_ceil(ceil_div(cp, kUnroll)));
  return it;
}

inline unsigned item_grid(const Items& it) {
  return grid_of(ceil_div(it.M * it.S, kItemThreads / it.tpr));
}


// ---- forward: LayerNorm / RMSNorm rows (with or without a residual add) and GroupNorm NCHW rows ----
// RMS: RMSNorm statistics (p.mean null); X: void, or the residual stream's dtype (add_norm:
// p.res and p.res_out set); ACT: the activation epilogue p.act (LayerNorm / GroupNorm only).
template <typename T, int VEC, bool GN, bool RMS, typename X, bool ACT>
void row_forward_vec(act_params_t<RowFwd<T>, ACT> p, const at::Tensor& like) {
  using A = acc_of<T>;
  static_assert(!GN || (!RMS && std::is_void_v<X>), "GroupNorm rows: LayerNorm statistics of x");
  using S = held_t<T, X>;  // the row as held in registers
  const cudaStream_t stream = current_stream();
  if constexpr (RMS) p.inv_len = A(1) / static_cast<A>(p.L);
  if constexpr (GN) {
    p.gn.pack_in_channel = p.gn.HW % VEC == 0;
    p.gn.div64 = p.L >= (int64_t(1) << 31);
    if (!p.gn.div64) p.gn.hw_div = FastDiv(static_cast<uint32_t>(p.gn.HW));
  }
  // register capacity by the held element size: a row held as X = float32 (half input, fp32
  // residual) gets half the packs, hence twice the threads per row
  const CachedPlan c = plan_cached(p.M, p.L, VEC, int(sizeof(S)), kFwdPacks<T, VEC, S>,
                                   kFwdCachedMaxThreads, 128);
  // rows longer than the registers hold: the (row, chunk) split (by the row's length only; a few
  // long rows that fit stay cached, fewer SMs busy but one launch and the same tree in any batch)
  if (c.ok) {
    launch(row_fwd_cached_kernel<T, VEC, GN, RMS, X, ACT>, grid_of(c.row_blocks), c.threads, 0, stream,
        p, c.tpr);
    return;
  }
  const Items it = plan_items(p.M, p.L, VEC);
  const int64_t items = it.M * it.S;
  at::Tensor ws = at::empty({(RMS ? 1 : 3) * items}, acc_options(like));
  A* wsp = ws.data_ptr<A>();
  launch(row_welford_partial_kernel<T, VEC, RMS, X>, item_grid(it), kItemThreads, 0, stream, p, it,
      wsp);
  launch(row_welford_finalize_kernel<A>, grid_of(ceil_div(p.M, 8)), 256, 0, stream,
      wsp, p.M, it.S, p.eps, p.mean, p.rstd, RMS ? p.inv_len : A(0), false);
  launch(row_apply_kernel<T, VEC, GN, X, ACT>, item_grid(it), kItemThreads, 0, stream, p, it);
}

// Packs of 16 bytes when the row length and every pointer allow, single elements otherwise.
// GroupNorm reads its per-channel weight and bias one element at a time: no alignment needed.
// An activation (p.act.kind != identity) takes the ACT kernels, which exist for LayerNorm and
// GroupNorm only (the wrappers of RMSNorm and add_norm never set one).
template <typename T, bool GN, bool RMS = false, typename X = void>
void row_forward(const RowFwd<T>& p, const at::Tensor& like, Activation act = {}) {
  constexpr int V = kVec16<T>;
  const bool vec = p.L % V == 0 && aligned16(p.x) && aligned16(p.y.ptr) &&
                   (GN || (aligned16(p.w.ptr) && aligned16(p.b.ptr))) &&
                   aligned16(p.res.ptr) && aligned16(p.res_out.ptr);
  if constexpr (!RMS && std::is_void_v<X>) {
    if (act.kind != kActIdentity) {
      ActOf<RowFwd<T>> q;
      static_cast<RowFwd<T>&>(q) = p;
      q.act = act;
      if (vec) row_forward_vec<T, V, GN, RMS, X, true>(q, like);
      else row_forward_vec<T, 1, GN, RMS, X, true>(q, like);
      return;
    }
  }
  if (vec) row_forward_vec<T, V, GN, RMS, X, false>(p, like);
  else row_forward_vec<T, 1, GN, RMS, X, false>(p, like);
}

// ---- column sums of partials -> dweight / dbias ---------------------------------------------------
// segments > 1: [segments, K, ncols] partials -> [segments, ncols] sums.
template <typename T>
void launch_col_sums(const acc_of<T>* ws1, const acc_of<T>* ws2, int64_t K, int64_t ncols,
                     Operand<T> out1, Operand<T> out2, int64_t segments = 1) {
  if ((ws1 == nullptr || !out1.present()) && (ws2 == nullptr || !out2.present())) return;
  const int ky = std::min(32, pow2_ceil(K));
  const dim3 grid(grid_of(segments * ceil_div(ncols, 1024 / ky)), 2);
  launch(col_sum_finalize_kernel<T>, grid, 1024, 0, current_stream(),
      ws1, ws2, K, ncols, ky, out1, out2, segments);
}

// ---- LayerNorm backward ----------------------------------------------------------------------------
// The cached backward's launch (rows in registers, plan c): rows per block, the grid, the column
// partials [grid, L] of dweight / dbias (p.ws_dw / p.ws_db, set here) and their fixed-order sums
// into dw_out / db_out (absent: not wanted). Shared by the LayerNorm / RMSNorm / add_norm rows and
// the gated RMSNorm rows.
template <typename T, typename P, typename K>
void launch_bwd_cached(K kernel, P p, const CachedPlan& c, int max_threads, Operand<T> dw_out,
                       Operand<T> db_out, const at::Tensor& like) {
  using A = acc_of<T>;
  const bool want_dw = dw_out.present(), want_db = db_out.present();
  const int sm = sm_count();
  const at::TensorOptions ao = acc_options(like);
  // Rows per block. A block keeps one set of column partials however many rows it loops over,
  // and writes them once: [grid, L] partials in acc type, written and read back by
  // col_sum_finalize. One row per block of tpr > 32 threads made 4096 x 768 bf16 a grid of
  // 1056 blocks (the occupancy limit) and 6.5 MB of fp32 partials (+69% over x, dy and dx).
  // So when tpr > 32 a block holds up to kRowBlockThreads / tpr rows in flight (no more than
  // give every SM one block), and the grid is one wave of resident blocks: 512-thread blocks at
  // <= 64 registers are 2 per SM (two, so that one block's barriers never idle the SM), hence
  // partials [264, L] (4096 x 768 bf16: 0.8 MB, 4% of the 18.9 MB of x, dy and dx).
  // Bytes in flight per SM stay what the registers allow, whatever the block shape: resident
  // threads / tpr rows, each loading its whole row of x and dy before the reduction, i.e.
  // (resident threads) x kBwdElems x (bytes of x + dy) x (fill L / (tpr * kBwdElems) >= 1/2):
  // 1024 x 8 x 4 B x (1/2 .. 1) = 16-32 KB for half data (4096 x 768 bf16: 8 rows x 3 KB =
  // 24 KB), 32-64 KB for fp32 -- the ~16-32 KB Little's law asks of an H100 SM (3.35 TB/s /
  // 132 SMs = 25 B/ns, times ~0.7-1 us of DRAM latency under load).
  constexpr int kRowBlockThreads = 512;
  const int block_cap = std::min(kRowBlockThreads, max_threads);  // ACT: fewer, see the kernel
  int threads = c.threads;
  if (c.tpr > 32) {
    const int64_t rows_per_sm = std::max<int64_t>(1, p.M / sm);
    int rpb = 1;
    while (int64_t(rpb) * 2 * c.tpr <= block_cap && rpb * 2 <= rows_per_sm) rpb *= 2;
    threads = c.tpr * rpb;
  }
  const int64_t row_blocks = ceil_div(p.M, threads / c.tpr);
  const int arrays = int(want_dw) + int(want_db);
  const size_t smem = ln_bwd_cached_smem<A>(threads, c.tpr, arrays);
  const int per_sm = resident_blocks(kernel, threads, smem);
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(row_blocks, int64_t(sm) * per_sm));
  at::Tensor ws_dw, ws_db;
  if (want_dw) ws_dw = at::empty({grid, p.L}, ao);
  if (want_db) ws_db = at::empty({grid, p.L}, ao);
  p.ws_dw = want_dw ? ws_dw.data_ptr<A>() : nullptr;
  p.ws_db = want_db ? ws_db.data_ptr<A>() : nullptr;
  launch(kernel, static_cast<unsigned>(grid), threads, smem, current_stream(), p, c.tpr);
  launch_col_sums<T>(p.ws_dw, p.ws_db, grid, p.L, dw_out, db_out);
}

// dw_out / db_out: [L] in T or float32, absent when not wanted; p.ws_dw / p.ws_db are set here.
// RMSNorm: p.mean null (db_out absent). add_norm: X the residual stream's dtype (p.x32 when X is
// float32 and T is not), p.dres_in / p.dres as wanted. ACT: the activation's backward (p.act,
// p.b), LayerNorm only.
template <typename T, int VEC, typename X, bool ACT>
void ln_backward_vec(row_bwd_t<T, ACT> p, Operand<T> dw_out, Operand<T> db_out, const at::Tensor& like) {
  const bool want_dw = dw_out.present(), want_db = db_out.present();
  using A = acc_of<T>;
  const int sm = sm_count();
  const cudaStream_t stream = current_stream();
  const at::TensorOptions ao = acc_options(like);
  constexpr int kMaxThreads = kBwdCachedBound<T, VEC, X, ACT>;
  const CachedPlan c = plan_cached(p.M, p.L, VEC, int(sizeof(X)), kBwdPacks<VEC>, kMaxThreads, 256);
  if (c.ok) {  // the row in registers; split below only for rows longer than they hold
    launch_bwd_cached<T>(ln_bwd_cached_kernel<T, VEC, X, ACT>, p, c, kMaxThreads, dw_out, db_out,
                         like);
    return;
  }
  at::Tensor ws_dw, ws_db;
  // long rows: row sums by (row, chunk) items, then a column-chunked pass
  const Items it = plan_items(p.M, p.L, VEC);
  const int64_t items = it.M * it.S;
  at::Tensor ws1 = at::empty({2 * items}, ao);
  row_sums_t<T, ACT> rsp;
  rsp.x = p.x;
  rsp.dy = p.dy;
  rsp.mean = p.mean;
  rsp.rstd = p.rstd;
  rsp.w = p.w;
  rsp.stat_div = 1;
  rsp.ws = ws1.data_ptr<A>();
  rsp.x32 = p.x32;
  if constexpr (ACT) {
    rsp.b = p.b;
    rsp.act = p.act;
  }
  launch(row_sums_partial_kernel<T, VEC, X, ACT>, item_grid(it), kItemThreads, 0, stream, rsp, it);
  const A* rs1 = rsp.ws + kSumDy * items;
  const A* rs2 = rsp.ws + kSumDyXhat * items;
  at::Tensor rs;
  if (it.S > 1) {
    rs = at::empty({2 * p.M}, ao);
    A* r = rs.data_ptr<A>();
    launch(row_sums_finalize_kernel<A>, grid_of(ceil_div(p.M, 8)), 256, 0, stream,
        rsp.ws, PartialsLayout::items(p.M, it.S), r + kSumDy * p.M, r + kSumDyXhat * p.M);
    rs1 = r + kSumDy * p.M;
    rs2 = r + kSumDyXhat * p.M;
  }
  int threads = kBwdSplitBound<T, ACT>;
  while (threads > 128 && ceil_div(p.L, int64_t(threads) * kBwdElems) * p.M < 2 * sm) threads /= 2;
  const int64_t S2 = ceil_div(p.L, int64_t(threads) * kBwdElems);
  const int64_t RG = std::max<int64_t>(1, std::min<int64_t>(p.M, ceil_div(2 * sm, S2)));
  if (want_dw) ws_dw = at::empty({RG, p.L}, ao);
  if (want_db) ws_db = at::empty({RG, p.L}, ao);
  p.ws_dw = want_dw ? ws_dw.data_ptr<A>() : nullptr;
  p.ws_db = want_db ? ws_db.data_ptr<A>() : nullptr;
  launch(ln_bwd_split_kernel<T, VEC, X, ACT>, grid_of(RG * S2), threads, 0, stream, p, rs1, rs2, S2, RG);
  launch_col_sums<T>(p.ws_dw, p.ws_db, RG, p.L, dw_out, db_out);
}

// An activation (p.act.kind != identity, p.b its bias) takes the ACT kernels: LayerNorm only (X == T;
// the RMSNorm and add_norm wrappers never set one).
template <typename T, typename X = T>
void ln_backward(const RowBwd<T>& p, Operand<T> dw_out, Operand<T> db_out, const at::Tensor& like,
                 Activation act = {}, Operand<T> b = {}) {
  constexpr int V = kVec16<T>;
  const bool vec = p.L % V == 0 && aligned16(p.x) && is_aligned(p.dy.ptr, 16) && aligned16(p.dx) &&
                   (!p.w.present() || is_aligned(p.w.ptr, 16)) && aligned16(p.x32) &&
                   aligned16(p.dres_in) && aligned16(p.dres);
  if constexpr (std::is_same_v<X, T>) {
    if (act.kind != kActIdentity) {
      RowBwdAct<T> q;
      static_cast<RowBwd<T>&>(q) = p;
      q.b = b;
      q.act = act;
      if (vec && aligned16(b.ptr)) ln_backward_vec<T, V, X, true>(q, dw_out, db_out, like);
      else ln_backward_vec<T, 1, X, true>(q, dw_out, db_out, like);
      return;
    }
  }
  if (vec) ln_backward_vec<T, V, X, false>(p, dw_out, db_out, like);
  else ln_backward_vec<T, 1, X, false>(p, dw_out, db_out, like);
}

// ---- LayerNorm over rows, tensor level: what layer_norm_*.cu and layer_norm2d_*.cu (channels_last)
// both launch. x: contiguous rows [M, L] of T; y: T or float32; w, b, dw, db: undefined when
// absent or not wanted; mean / rstd: [M] in the accumulation type; act: the fused activation
// (identity: the plain LayerNorm).
template <typename T>
void layer_norm_rows_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& w,
                             const at::Tensor& b, const at::Tensor& mean, const at::Tensor& rstd,
                             int64_t M, int64_t L, double eps, Activation act = {}) {
  using A = acc_of<T>;
  RowFwd<T> p;
  p.x = x.data_ptr<T>();
  p.y = operand<T>(y);
  p.w = operand<T>(w);
  p.b = operand<T>(b);
  p.mean = mean.data_ptr<A>();
  p.rstd = rstd.data_ptr<A>();
  p.M = M;
  p.L = L;
  p.eps = static_cast<A>(eps);
  row_forward<T, false>(p, x, act);
}

// dx: null when not wanted. act: the forward's activation (identity: the plain backward, b
// unread), b its bias (undefined: none).
template <typename T>
void layer_norm_rows_backward(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& mean,
                              const at::Tensor& rstd, const at::Tensor& w, const at::Tensor* dx,
                              const at::Tensor& dw, const at::Tensor& db, int64_t M, int64_t L,
                              Activation act = {}, const at::Tensor& b = at::Tensor()) {
  using A = acc_of<T>;
  RowBwd<T> p;
  p.x = x.data_ptr<T>();
  p.dy = operand<T>(dy);
  p.mean = mean.data_ptr<A>();
  p.rstd = rstd.data_ptr<A>();
  p.w = operand<T>(w);
  p.dx = dx != nullptr ? dx->data_ptr<T>() : nullptr;
  p.M = M;
  p.L = L;
  ln_backward<T>(p, dw.defined() ? operand<T>(dw) : Operand<T>{},
                 db.defined() ? operand<T>(db) : Operand<T>{}, x, act,
                 act.kind != kActIdentity ? operand<T>(b) : Operand<T>{});
}

// ---- gated RMSNorm rows (gated_rms_norm_fwd / _bwd) ---------------------------------------------------
// Groups of L = group_size elements of an [M, H] tensor (G = H / L per row), one launch per group
// column g on the cached kernels (GATE: kernels/groups_forward.cuh), the pointers offset by g * L,
// row pitch H, rstd group-major [G, M]. Both passes hold a group in registers for every dtype and
// pack width up to kGatedMaxGroup elements (the backward's smallest block, 256 threads x
// kBwdElems: kBwdCachedGatedMaxThreads); the ops take no longer groups
// (fastnorm.functional.gated_rms_norm computes those with ATen operations).
inline constexpr int64_t kGatedMaxGroup = 2048;

template <typename T, int VEC, int GATE>
void gated_forward_vec(GatedRowFwd<T> p, int64_t G) {
  using A = acc_of<T>;
  using S = fwd_held_t<T, void, GATE>;
  p.inv_len = A(1) / static_cast<A>(p.L);
  const CachedPlan c = plan_cached(p.M, p.L, VEC, int(sizeof(S)), kFwdPacks<T, VEC, S>,
                                   kFwdCachedMaxThreads, 128);
  TORCH_CHECK(c.ok, "gated_rms_norm_fwd: group_size ", p.L, " is longer than the kernel holds");
  for (int64_t g = 0; g < G; ++g) {
    GatedRowFwd<T> q = p;
    q.x = p.x + g * p.L;
    q.gate = p.gate + g * p.L;
    q.y = p.y.advanced(g * p.L);
    q.w = p.w.advanced(g * p.L);
    q.rstd = p.rstd + g * p.M;
    launch(row_fwd_cached_kernel<T, VEC, false, true, void, false, GATE>, grid_of(c.row_blocks),
           c.threads, 0, current_stream(), q, c.tpr);
  }
}

template <typename T, int GATE>
void gated_forward(const GatedRowFwd<T>& p, int64_t G) {
  constexpr int V = kVec16<T>;
  const bool vec = p.L % V == 0 && p.ld % V == 0 && aligned16(p.x) && aligned16(p.gate) &&
                   aligned16(p.y.ptr) && aligned16(p.w.ptr);
  if (vec) gated_forward_vec<T, V, GATE>(p, G);
  else gated_forward_vec<T, 1, GATE>(p, G);
}

// dw_out: [H] (T or float32), absent when not wanted.
template <typename T, int VEC, int GATE>
void gated_backward_vec(GatedRowBwd<T> p, int64_t G, Operand<T> dw_out, const at::Tensor& like) {
  using X = std::conditional_t<GATE == kGateFirst, acc_of<T>, T>;  // the row as held
  constexpr int kMaxThreads = kBwdCachedBound<T, VEC, X, false, GATE>;
  const CachedPlan c = plan_cached(p.M, p.L, VEC, int(sizeof(X)), kBwdPacks<VEC>, kMaxThreads, 256);
  TORCH_CHECK(c.ok, "gated_rms_norm_bwd: group_size ", p.L, " is longer than the kernel holds");
  for (int64_t g = 0; g < G; ++g) {
    GatedRowBwd<T> q = p;
    q.x = p.x + g * p.L;
    q.gate = p.gate + g * p.L;
    q.dy = p.dy.advanced(g * p.L);
    q.w = p.w.advanced(g * p.L);
    q.rstd = p.rstd + g * p.M;
    q.dx = p.dx != nullptr ? p.dx + g * p.L : nullptr;
    q.dgate = p.dgate != nullptr ? p.dgate + g * p.L : nullptr;
    launch_bwd_cached<T>(ln_bwd_cached_kernel<T, VEC, X, false, GATE>, q, c, kMaxThreads,
                         dw_out.advanced(g * p.L), Operand<T>{}, like);
  }
}

template <typename T, int GATE>
void gated_backward(const GatedRowBwd<T>& p, int64_t G, Operand<T> dw_out, const at::Tensor& like) {
  constexpr int V = kVec16<T>;
  const bool vec = p.L % V == 0 && p.ld % V == 0 && aligned16(p.x) && aligned16(p.gate) &&
                   is_aligned(p.dy.ptr, 16) && aligned16(p.dx) && aligned16(p.dgate) &&
                   aligned16(p.w.ptr);
  if (vec) gated_backward_vec<T, V, GATE>(p, G, dw_out, like);
  else gated_backward_vec<T, 1, GATE>(p, G, dw_out, like);
}


// ---- modulated rows (modulated_norm_fwd / _bwd) ----------------------------------------------------
// LayerNorm / RMSNorm rows of [M, L] with the modulation of [Q, L] rows, Q = M / mod_rows, and with
// a residual (X non-void) AdaLN-Zero's gated residual sum (kernels/groups_forward.cuh ModRowFwd,
// groups_backward.cuh ModRowBwd). Rows up to kModulatedMaxRow elements, held in registers by both
// passes in every dtype and pack width (the backward's smallest block, 256 threads x kBwdElems);
// fastnorm.functional computes longer rows with the LayerNorm / RMSNorm kernels and ATen.
inline constexpr int64_t kModulatedMaxRow = 2048;
// half / bf16 / fp32 rows in 16-byte packs: 512-thread blocks, rows of 4096
inline constexpr int64_t kModulatedMaxPackedRow = 4096;

template <typename T>
inline int64_t modulated_max_row(int vec) {
  return vec > 1 && sizeof(acc_of<T>) == 4 ? kModulatedMaxPackedRow : kModulatedMaxRow;
}

template <typename T, int VEC, bool RMS, typename X>
void modulated_forward_vec(const ModRowFwd<T>& p) {
  using S = held_t<T, X>;
  ModRowFwd<T> q = p;
  if constexpr (RMS) q.inv_len = acc_of<T>(1) / static_cast<acc_of<T>>(p.L);
  const CachedPlan c = plan_cached(p.M, p.L, VEC, int(sizeof(S)), kFwdPacks<T, VEC, S>,
                                   kFwdCachedMaxThreads, 128);
  TORCH_CHECK(c.ok && p.L <= modulated_max_row<T>(VEC), "modulated_norm_fwd: rows of ", p.L,
              " elements are longer than the kernels hold");
  launch(row_fwd_cached_kernel<T, VEC, false, RMS, X, false, kGateNone, true>,
         grid_of(c.row_blocks), c.threads, 0, current_stream(), q, c.tpr);
}

template <typename T, bool RMS, typename X>
void modulated_forward(const ModRowFwd<T>& p) {
  constexpr int V = kVec16<T>;
  const bool vec = p.L % V == 0 && aligned16(p.x) && aligned16(p.y.ptr) && aligned16(p.w.ptr) &&
                   aligned16(p.b.ptr) && aligned16(p.res.ptr) && aligned16(p.res_out.ptr) &&
                   aligned16(p.scale.ptr) && aligned16(p.shift.ptr) && aligned16(p.gate.ptr);
  if (vec) modulated_forward_vec<T, V, RMS, X>(p);
  else modulated_forward_vec<T, 1, RMS, X>(p);
}

// Rows per block of the modulated backward and the chunk a block takes: functions of the row's
// length and dtype only (the partials of a segment, hence dscale / dshift of a sample, do not
// depend on the batch or the GPU). A chunk is about kModChunkBytes of the rows (64 rows of 2 KB,
// 16 of Flux's 6 KB bf16 rows): partials of 8 bytes per column per chunk, ~4-8% of the bytes of x,
// dy and dx, and a grid of hundreds of blocks for one 4096-token sample.
inline constexpr int64_t kModChunkBytes = 128 * 1024;

template <typename T, int VEC, typename X>
void modulated_backward_vec(ModRowBwd<T> p, Operand<T> dw_out, Operand<T> db_out,
                            Operand<T> dg_out, const at::Tensor& like) {
  using A = acc_of<T>;
  constexpr int kMaxThreads = kBwdCachedBound<T, VEC, X, false, kGateNone, true>;
  const CachedPlan c = plan_cached(p.M, p.L, VEC, int(sizeof(X)), kBwdPacks<VEC>, kMaxThreads, 256);
  TORCH_CHECK(c.ok && p.L <= modulated_max_row<T>(VEC), "modulated_norm_bwd: rows of ", p.L,
              " elements are longer than the kernels hold");
  const int threads = c.tpr <= 32 ? c.threads : std::max(c.tpr, kMaxThreads);
  const int rpb = threads / c.tpr;
  const int64_t rows_bytes = int64_t(rpb) * p.L * int64_t(sizeof(X));
  int64_t iters = 1;
  while (iters < 64 && 2 * iters * rows_bytes <= kModChunkBytes) iters *= 2;
  p.chunk_rows = rpb * iters;
  p.part_rows = p.mod_rows > 1 ? p.mod_rows : p.M;
  p.chunks = ceil_div(p.part_rows, p.chunk_rows);
  const int64_t segments = p.M / p.part_rows;
  const int64_t grid = segments * p.chunks;
  TORCH_CHECK(grid <= kMaxGrid, "modulated_norm_bwd: ", grid, " blocks exceed the grid limit");
  at::Tensor ws_dw, ws_db, ws_dg;
  const at::TensorOptions ao = acc_options(like);
  const bool want_dw = dw_out.present(), want_db = db_out.present();
  const bool want_dg = dg_out.present() && p.mod_rows > 1 && p.input != nullptr;
  if (want_dw) ws_dw = at::empty({grid, p.L}, ao);
  if (want_db) ws_db = at::empty({grid, p.L}, ao);
  if (want_dg) ws_dg = at::empty({grid, p.L}, ao);
  p.ws_dw = want_dw ? ws_dw.data_ptr<A>() : nullptr;
  p.ws_db = want_db ? ws_db.data_ptr<A>() : nullptr;
  p.ws_dg = want_dg ? ws_dg.data_ptr<A>() : nullptr;
  const size_t smem =
      ln_bwd_cached_smem<A>(threads, c.tpr, int(want_dw) + int(want_db) + int(want_dg));
  launch(ln_bwd_cached_kernel<T, VEC, X, false, kGateNone, true>, static_cast<unsigned>(grid),
         threads, smem, current_stream(), p, c.tpr);
  launch_col_sums<T>(p.ws_dw, p.ws_db, p.chunks, p.L, dw_out, db_out, segments);
  if (want_dg) launch_col_sums<T>(p.ws_dg, nullptr, p.chunks, p.L, dg_out, Operand<T>{}, segments);
}

// dw_out / db_out: the column sums wanted, per segment ([M / part_rows, L]): per token (mod_rows
// == 1) dweight and dbias; per segment A = sum(dy * xhat) and B = sum(dy) (ModRowBwd); dg_out:
// dgate per segment ([Q, L]; per token p.dgate is stored by the kernel).
template <typename T, typename X>
void modulated_backward(const ModRowBwd<T>& p, Operand<T> dw_out, Operand<T> db_out,
                        Operand<T> dg_out, const at::Tensor& like) {
  constexpr int V = kVec16<T>;
  const bool vec = p.L % V == 0 && aligned16(row_src<X>(p.x, p.x32)) && is_aligned(p.dy.ptr, 16) &&
                   aligned16(p.dx) && aligned16(p.w.ptr) && aligned16(p.b.ptr) &&
                   aligned16(p.dres_in) && aligned16(p.dres) && aligned16(p.scale.ptr) &&
                   aligned16(p.gate.ptr) && aligned16(p.dscale.ptr) && aligned16(p.dgate.ptr) &&
                   aligned16(p.input);
  if (vec) modulated_backward_vec<T, V, X>(p, dw_out, db_out, dg_out, like);
  else modulated_backward_vec<T, 1, X>(p, dw_out, db_out, dg_out, like);
}

}  // namespace groups
}  // namespace fastnorm
