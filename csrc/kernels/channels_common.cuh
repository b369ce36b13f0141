// Strided channels: a channel (or a group of channels) is strided through memory.
//   BatchNorm NCHW  [N, C, S]  (S = prod(spatial)): channel c owns N runs of S contiguous elements.
//   BatchNorm NHWC  [R, C]     (R = N * S: channels_last / channels_last_3d, or S == 1).
//   GroupNorm / InstanceNorm channels_last: x[n] is an [HW, C] matrix; group g is the column
//   block [g*Cg, (g+1)*Cg).
// This file: what the strided kernels share (cursors, chunked Welford merges, trees over the row
// lanes of a block). The kernels: channels_forward.cuh, channels_backward.cuh. Host plans and
// launches: csrc/launch/channels.h.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels/activation.cuh"
#include "kernels/pack.cuh"
#include "kernels/validity.cuh"
#include "kernels/welford.cuh"

namespace fastnorm {
namespace channels {

constexpr int kThreads = 256;  // every kernel here: 256 threads (1-D for NCHW, tx * ty for NHWC)
constexpr int kUnroll = 4;     // independent loads in flight per thread per iteration

constexpr int kClThreads = 256;  // bx * by never exceeds this

// ---- Register budgets of the GroupNorm / InstanceNorm channels_last kernels --------------------
// Each of them streams memory, so what it needs from occupancy is bytes in flight: by Little's
// law an H100 SXM (3.35 TB/s over 132 SMs = 25 B/ns per SM, DRAM latency under load ~0.65-1.3 us)
// keeps its bandwidth with 16-32 KB of loads outstanding per SM. We aim for at least 32 KB:
//
//   bytes in flight per SM = min_blocks x 256 threads x packs per thread x pack bytes x inputs
//
// and pick min_blocks (the __launch_bounds__ second argument: ptxas then caps the registers at
// 16384 / ceil(min_blocks * 8 warps / 4) / 256 * 8 per thread: 4 -> 64, 3 -> 80, 2 -> 128) and
// the packs per thread together, so that the code fits the cap without spilling (checked with
// -Xptxas -v; tests/test_kernel_resources.py fails on spills at the cap and on resident blocks
// below min_blocks). 16-byte packs (VEC > 1):
//
//   kernel              inputs  VEC  min_blocks  packs  in flight per SM
//   cl_welford_partial  x       all  4           4      4 x 256 x 4 x 16 B         = 64 KB
//   cl_apply            x       8    4           2      4 x 256 x 2 x 16 B         = 32 KB
//                               4,2  4           4      4 x 256 x 4 x 16 B         = 64 KB
//   cl_bwd_sums         x, dy   all  3           2      3 x 256 x 2 x (16 + 16) B  = 48 KB
//   cl_dx               x, dy   8    2           4      2 x 256 x 4 x (16 + 16) B  = 64 KB
//                               4,2  3           2      3 x 256 x 2 x (16 + 16) B  = 48 KB
//   (a float32 dy reads 32 B a pack for VEC 8: more in flight)
//
// What does not fit: cl_apply with 8-element packs needs 73 registers at 4 packs (3 blocks);
// cl_bwd_sums and cl_dx with 8-element packs needed 128 at 4 packs, and forcing 3 blocks at 4
// packs spilled 432-716 B. At 2 packs cl_bwd_sums fits 80 once rstd is applied to the block's
// total (not held across the loop) and the item and group indices use 32-bit divisions (a 64-bit
// division is a call: at the cap, ptxas saves registers around it); cl_dx still spilled 16-24 B
// inside its loop at 80 (four coefficient arrays of 8 floats live across it), so it keeps 2
// blocks of 4 packs, which holds more in flight anyway. The scalar fallback (VEC == 1: C not a
// multiple of the pack, or a misaligned tensor) has small state and 2-8 byte loads: 4 packs at
// 5 (partial, apply) or 4 (sums, dx) blocks, as many as fit without spilling. The host plans
// (plan_cl) size grids from the resident blocks the runtime reports, not from these numbers.
template <typename T, int VEC>
inline constexpr int kClStreamBlocks = VEC > 1 ? 4 : 5;  // cl_welford_partial, cl_apply
// The MASKED instantiations (the per-(n, c) ops with a validity) also hold the sample's validity
// (its mask row or length) and a live flag per pack in flight: at the plain caps they spilled
// 4-28 bytes (ptxas -v, sm_90); one block fewer per SM (16 more registers each) holds them. The
// masked norms are the only callers, so the plain kernels keep their caps.
template <bool MASKED, int BLOCKS>
inline constexpr int kMaskedBlocks = MASKED && BLOCKS > 1 ? BLOCKS - 1 : BLOCKS;
template <typename T, int VEC>
inline constexpr int kClSumsBlocks = VEC > 1 ? 3 : 4;
template <typename T, int VEC>
inline constexpr int kClDxBlocks = VEC >= 8 ? 2 : VEC > 1 ? 3 : 4;
template <typename T, int VEC>
inline constexpr int kClPartialPacks = 4;
template <typename T, int VEC>
inline constexpr int kClApplyPacks = VEC >= 8 ? 2 : 4;
template <typename T, int VEC>
inline constexpr int kClSumsPacks = VEC > 1 ? 2 : 4;
template <typename T, int VEC>
inline constexpr int kClDxPacks = VEC >= 8 || VEC == 1 ? 4 : 2;

struct ClShape {
  int64_t N = 0, HW = 0, C = 0, G = 1, Cg = 1;
  int64_t K = 1, rpc = 1;  // HW split into K chunks of rpc rows
  int64_t CT = 1;          // channel tiles of bx packs
  int bx = 1, by = 1;      // blockDim.x == bx * by <= kClThreads
};

// Index arithmetic of the channels_last kernels in 32 bits where plan_cl guarantees it (items <
// 2^32, C < 2^31): a 64-bit division is an out-of-line routine on the GPU, and at a kernel's
// register cap the registers ptxas saves around each call are spills.
struct ClItem {
  int64_t n, k, ct;
  int64_t nk;  // n * K + k
};
__device__ __forceinline__ ClItem cl_item(int64_t item, const ClShape& s) {
  const uint32_t i = static_cast<uint32_t>(item), CT = static_cast<uint32_t>(s.CT),
                 K = static_cast<uint32_t>(s.K);
  const uint32_t nk = i / CT, n = nk / K;
  return ClItem{n, nk - n * K, i - nk * CT, nk};
}

// The (n, g) statistics rows of a pack's channels c0, c0 + 1, ... in order: one division per
// pack (the first channel's group) instead of one per channel.
struct GroupWalk {
  int64_t ng;  // n * G + group of the current channel
  uint32_t r;  // the channel's index inside its group
  __device__ __forceinline__ GroupWalk(int64_t n, int64_t G, int64_t c0, int64_t Cg) {
    const uint32_t g = static_cast<uint32_t>(c0) / static_cast<uint32_t>(Cg);
    ng = n * G + g;
    r = static_cast<uint32_t>(c0) - g * static_cast<uint32_t>(Cg);
  }
  __device__ __forceinline__ void next(int64_t Cg) {
    if (++r == static_cast<uint32_t>(Cg)) {
      r = 0;
      ++ng;
    }
  }
};

// Merge a chunk of `cnt` values per channel into K running states that share one count (every
// channel of a thread has seen the same number of values). The chunk is given relative to the
// current mean: dm = mean(v - mean), cm2 = sum((v - mean - dm)^2). Working on deviations keeps
// the precision for data far from zero (1e4 + N(0, 1) in fp32: v - mean is exact there). One
// division per chunk, shared by the K channels. Exact when count == 0 (f = 1, g = 0).
template <typename acc_t, int K>
__device__ __forceinline__ void merge_chunk(acc_t (&mean)[K], acc_t (&m2)[K], acc_t& count,
                                            const acc_t (&dm)[K], const acc_t (&cm2)[K],
                                            acc_t cnt) {
  const acc_t n = count + cnt;
  const acc_t f = cnt / n;
  const acc_t g = count * f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    mean[k] += dm[k] * f;
    m2[k] += cm2[k] + dm[k] * dm[k] * g;
  }
  count = n;
}

// Chunk statistics of L values d[0..L) (deviations from the current mean), L a power of two.
template <typename acc_t, int L>
__device__ __forceinline__ void chunk_stats(const acc_t (&d)[L], acc_t& dm, acc_t& cm2) {
  acc_t sum = acc_t(0);
#pragma unroll
  for (int i = 0; i < L; ++i) sum += d[i];
  dm = sum * (acc_t(1) / acc_t(L));  // power of two: exact scaling
  acc_t q = acc_t(0);
#pragma unroll
  for (int i = 0; i < L; ++i) {
    const acc_t e = d[i] - dm;
    q += e * e;
  }
  cm2 = q;
}

// Chan merge of VEC states that share one count (the same rows of VEC channels).
template <typename A, int VEC>
__device__ __forceinline__ void merge_shared_count(A (&ma)[VEC], A (&qa)[VEC], A& ca,
                                                   const A* mb, const A* qb, A cb) {
  if (cb == A(0)) return;
  if (ca == A(0)) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      ma[v] = mb[v];
      qa[v] = qb[v];
    }
    ca = cb;
    return;
  }
  const A n = ca + cb;
  const A f = cb / n;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const A d = mb[v] - ma[v];
    ma[v] += d * f;
    qa[v] += qb[v] + d * d * ca * f;
  }
  ca = n;
}

// ---------------------------------------------------------------------------------------------
// NCHW traversal. Channel c's elements, counted in vectors of V (V divides S): flat index
// i in [0, N * Sv), i = n * Sv + s, at vector offset (n * C + c) * Sv + s. A thread visits
// i = start, start + step, ...; the cursor advances (offset, s) without a division per element.
struct NchwCursor {
  int64_t off;        // vector offset of the current element
  int64_t s;          // its position inside the row (vectors)
  int64_t remaining;  // elements left for this thread
  int64_t sv, doff, ds, wrap;

  __device__ __forceinline__ void init(int64_t start, int64_t step, int64_t N, int64_t C,
                                       int64_t Sv, int64_t c) {
    sv = Sv;
    const int64_t M = N * Sv;
    if (start >= M || Sv == 0) {
      remaining = 0;
      off = s = doff = ds = wrap = 0;
      return;
    }
    remaining = (M - 1 - start) / step + 1;
    const int64_t n = start / Sv;
    s = start - n * Sv;
    off = (n * C + c) * Sv + s;
    const int64_t dn = step / Sv;
    ds = step - dn * Sv;
    doff = dn * C * Sv + ds;
    wrap = (C - 1) * Sv;
  }
  __device__ __forceinline__ void next() {
    off += doff;
    s += ds;
    if (s >= sv) {
      s -= sv;
      off += wrap;
    }
  }
};

// NHWC: a thread's rows r0, r0 + step, ... < R of the [R, Cv] pack view, at pack column cv.
struct NhwcCursor {
  int64_t off;        // pack offset of the current row
  int64_t doff;       // between the thread's rows
  int64_t remaining;  // rows left for this thread
  __device__ __forceinline__ NhwcCursor(int64_t Cv, int64_t cv, int64_t R, int64_t r0,
                                        int64_t step)
      : off(r0 * Cv + cv), doff(step * Cv), remaining(r0 < R ? (R - 1 - r0) / step + 1 : 0) {}
  __device__ __forceinline__ void next() { off += doff; }
};

// The element loop of the BatchNorm kernels, over the packs a cursor (NchwCursor, NhwcCursor)
// visits: groups of kUnroll packs whose loads are all issued before the first use (the bytes in
// flight), then the rest one at a time. load(off) reads what one pack needs (x, dy or both);
// use(v, offs) takes a group in visiting order: v and offs are arrays of kUnroll, or of 1 for the
// rest (a statistics pass merges a group as one chunk).
template <typename Cursor, typename Load, typename Use>
__device__ __forceinline__ void stream_packs(Cursor cur, const Load& load, const Use& use) {
  using L = decltype(load(int64_t{0}));
  while (cur.remaining >= kUnroll) {
    L v[kUnroll];
    int64_t offs[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      offs[u] = cur.off;
      v[u] = load(cur.off);
      cur.next();
    }
    cur.remaining -= kUnroll;
    use(v, offs);
  }
  while (cur.remaining > 0) {
    const L v[1] = {load(cur.off)};
    const int64_t offs[1] = {cur.off};
    cur.next();
    cur.remaining -= 1;
    use(v, offs);
  }
}

// The number of packs of a group stream_packs hands to `use` (kUnroll or 1).
template <typename A>
inline constexpr int group_size_v = static_cast<int>(std::extent_v<std::remove_reference_t<A>>);

// x and dy packs read together (the backward's loops).
template <typename P, typename PD>
struct XDy {
  P x;
  PD dy;
};

// stream_packs' load for the backward's loops: dy at off, and x unless WITH_X is false (the
// eval dx without an activation needs no x).
template <bool WITH_X, typename P, typename PD>
struct LoadXDy {
  const P* __restrict__ xv;
  const PD* __restrict__ dyv;
  __device__ __forceinline__ XDy<P, PD> operator()(int64_t off) const {
    XDy<P, PD> l;
    if constexpr (WITH_X) l.x = xv[off];
    l.dy = dyv[off];
    return l;
  }
};

// ---------------------------------------------------------------------------------------------
// Block-level reductions with a fixed order.

// NHWC blocks are (tx, ty): threadIdx.x picks V channels, threadIdx.y a row lane. Merge the
// states of the ty row lanes per channel with a tree over threadIdx.y (ty a power of two).
// Every thread returns the total for its V channels. `smem`: 3 * blockDim.x * blockDim.y * V.
template <typename acc_t, int V>
__device__ __forceinline__ void tree_merge_rows(acc_t (&mean)[V], acc_t (&m2)[V],
                                                acc_t (&cnt)[V], acc_t* smem) {
  const int W = blockDim.x * V;
  const int plane = blockDim.y * W;
  acc_t* s_mean = smem;
  acc_t* s_m2 = smem + plane;
  acc_t* s_cnt = smem + 2 * plane;
  const int col = threadIdx.x * V;
  __syncthreads();  // smem may still be read by a previous call
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int i = threadIdx.y * W + col + j;
    s_mean[i] = mean[j];
    s_m2[i] = m2[j];
    s_cnt[i] = cnt[j];
  }
  __syncthreads();
  for (int stride = blockDim.y >> 1; stride > 0; stride >>= 1) {
    if (threadIdx.y < stride) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int i = threadIdx.y * W + col + j;
        const int o = (threadIdx.y + stride) * W + col + j;
        Welford<acc_t> a(s_mean[i], s_m2[i], s_cnt[i]);
        a.merge(Welford<acc_t>(s_mean[o], s_m2[o], s_cnt[o]));
        s_mean[i] = a.mean;
        s_m2[i] = a.m2;
        s_cnt[i] = a.count;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    mean[j] = s_mean[col + j];
    m2[j] = s_m2[col + j];
    cnt[j] = s_cnt[col + j];
  }
}

// Same tree for two sums per channel. `smem`: 2 * blockDim.x * blockDim.y * V.
template <typename acc_t, int V>
__device__ __forceinline__ void tree_sum2_rows(acc_t (&a)[V], acc_t (&b)[V], acc_t* smem) {
  const int W = blockDim.x * V;
  const int plane = blockDim.y * W;
  acc_t* s_a = smem;
  acc_t* s_b = smem + plane;
  const int col = threadIdx.x * V;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int i = threadIdx.y * W + col + j;
    s_a[i] = a[j];
    s_b[i] = b[j];
  }
  __syncthreads();
  for (int stride = blockDim.y >> 1; stride > 0; stride >>= 1) {
    if (threadIdx.y < stride) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int i = threadIdx.y * W + col + j;
        const int o = (threadIdx.y + stride) * W + col + j;
        s_a[i] = s_a[i] + s_a[o];
        s_b[i] = s_b[i] + s_b[o];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    a[j] = s_a[col + j];
    b[j] = s_b[col + j];
  }
}

// ---------------------------------------------------------------------------------------------
// Fused activation epilogue of the BatchNorm kernels (template flag ACT, kernels/activation.cuh).
// With ACT false both are the identity at compile time: the plain kernels' code is unchanged.

// y = act(z), z = xhat * w + b in the accumulation type.
template <bool ACT, typename acc_t>
__device__ __forceinline__ acc_t act_out(const Activation& act, acc_t z) {
  if constexpr (ACT) return activate(act, z);
  else return z;
}

// The gradient reaching z: dy * act'(z), z = (x - mean) * (w * rstd) + b recomputed from x and
// the saved statistics as the forward formed it (affine_z, kernels/pack.cuh: the same rounding).
template <bool ACT, typename acc_t>
__device__ __forceinline__ acc_t act_grad(const Activation& act, acc_t x, acc_t mean, acc_t gs,
                                          acc_t shift, acc_t dy) {
  if constexpr (ACT) return activation_grad(act, affine_z(x, mean, gs, shift), dy);
  else return dy;
}

// ---------------------------------------------------------------------------------------------
// Arguments.

// What the apply kernels take their per-channel coefficients from.
enum ApplyMode : int {
  kModeFinal = 0,  // the finalize kernel's output (workspace `coef`)
  kModeEval = 1,   // the running statistics (forward eval) / rstd and weight (backward eval, dx only)
  kModeFused = 2,  // statistics of the block's own chunk, which is the whole channel (grid of one
                   // chunk): stats + finalize + apply in one launch
};

}  // namespace channels
}  // namespace fastnorm
