// fastnorm::nc_moments / nc_affine / nc_grad_sums / nc_affine_grad on CUDA: the per-(n, c)
// primitives SwitchNorm, AdaIN and IBN are built on (docs/ops.md). Host side only: the
// work runs on the two existing kernel families, as GroupNorm with one channel per group.
//   NCHW / NCDHW (contiguous): rows (n, c) of L = prod(spatial) elements, the contiguous-groups
//     kernels (kernels/groups_*.cuh, plans in launch/groups.h):
//       moments      row_welford_partial + row_welford_finalize (var_out: var instead of rstd)
//       affine       row_apply (GN) with the GnMap of G = N * C rows: per-row scale and shift
//       grad sums    row_sums_partial (rstd null: centred sums) + row_sums_finalize
//       affine grad  gn_dx_nchw<NC>: dx = a * dy + b * (x - mean) + c per row
//   channels_last / channels_last_3d: x[n] an [L, C] matrix, G = C (kernels/channels_*.cuh, plans
//     plan_cl in launch/channels.h):
//       moments      cl_welford_partial + cl_welford_finalize (var_out)
//       affine       cl_apply<NC>
//       grad sums    cl_bwd_sums (rstd null) + row_sums_finalize
//       affine grad  cl_dx<NC>
// Packs (with_pack, common.h): 16 bytes, else 8 (fp16 rows of 14 x 14 = 196), else single
// elements, as the run (L for rows, C for channels_last) and the tensors' alignment allow.
// Validity (the masked norms: lengths or a mask, kernels/validity.cuh): the same kernels with their
// MASKED flag; the reductions add the valid positions only (the rows kernels stop a row at its
// length when lengths bound a sequence; channels_last skips an invalid position's loads), the two
// writers store 0 at the invalid positions. The channels_last moments keep each chunk's valid
// count for the finalize.
// Any other strides: .contiguous() first. Every [N, C] tensor is in the statistics dtype (float64
// for float64 input, float32 otherwise), contiguous; one given in another float dtype is cast.
// The sums always end with row_sums_finalize, even over a single partial per row (S == 1,
// K == 1): the two outputs are separate tensors (outputs of an op may not alias each other), and
// the partial kernels write one workspace of two planes.
#include "common.h"

#include <ATen/ops/empty.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels/channels_backward.cuh"
#include "kernels/channels_forward.cuh"
#include "launch/channels.h"
#include "launch/groups.h"

namespace fastnorm {
namespace {

struct NcDims {
  int64_t N = 0, C = 0, L = 1;
};

// The input of every op: on the kernels' device, floating, rank >= 3.
NcDims nc_dims(const at::Tensor& x, const char* op) {
  check_kernel_device(x, op);
  check_float_dtype(x.scalar_type(), op);
  TORCH_CHECK(x.dim() >= 3, op, ": expected an input of rank >= 3 (N, C, *spatial), got shape ",
              x.sizes());
  NcDims d;
  d.N = x.size(0);
  d.C = x.size(1);
  for (int64_t i = 2; i < x.dim(); ++i) d.L *= x.size(i);
  return d;
}

// An [N, C] per-(n, c) tensor: the input's device, a floating dtype, shape (N, C) -> contiguous in
// the statistics dtype.
at::Tensor nc_stat(const at::Tensor& t, const at::Tensor& x, const NcDims& d, const char* op,
                   const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
              x.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == d.N && t.size(1) == d.C, op, ": expected ", name,
              " of shape [", d.N, ", ", d.C, "] (N, C of the input of shape ", x.sizes(),
              "), got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected ", name,
              " of a floating dtype, got ", t.scalar_type());
  return t.to(stat_dtype(x.scalar_type())).contiguous();
}

// grad_out: the input's device and shape, the input's dtype or float32; read in x's layout.
at::Tensor nc_grad(const at::Tensor& g, const at::Tensor& input, at::MemoryFormat fmt,
                   const char* op) {
  TORCH_CHECK(g.device() == input.device(), op, ": grad_out is on ", g.device(),
              " but input is on ", input.device());
  TORCH_CHECK(g.sizes() == input.sizes(), op, ": expected grad_out of the input's shape ",
              input.sizes(), ", got shape ", g.sizes());
  TORCH_CHECK(g.scalar_type() == input.scalar_type() || g.scalar_type() == at::kFloat, op,
              ": expected grad_out of the input's dtype (torch.",
              c10::getDtypeNames(input.scalar_type()).first, ") or torch.float32, got torch.",
              c10::getDtypeNames(g.scalar_type()).first);
  return g.contiguous(fmt);
}

// The validity of the masked norms (docs/ops.md): lengths (int64 [N]) or mask (bool [N, *spatial]),
// on the input's device, at most one; the kernels' Validity over it, or absent.
Validity nc_validity(const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask,
                     const at::Tensor& x, const NcDims& d, const char* op, at::Tensor& keep) {
  Validity v;
  TORCH_CHECK(!(has(lengths) && has(mask)), op, ": expected at most one of lengths and mask, got both");
  v.L = d.L;
  v.C = d.C;
  v.W = x.size(-1);
  v.div64 = d.L >= (int64_t(1) << 31);
  if (!v.div64 && v.W > 0) v.w_div = FastDiv(static_cast<uint32_t>(v.W));
  if (has(lengths)) {
    const at::Tensor& t = *lengths;
    TORCH_CHECK(t.device() == x.device(), op, ": lengths is on ", t.device(), " but input is on ",
                x.device());
    TORCH_CHECK(t.scalar_type() == at::kLong, op, ": expected lengths of dtype torch.int64, got torch.",
                c10::getDtypeNames(t.scalar_type()).first);
    TORCH_CHECK(t.dim() == 1 && t.size(0) == d.N, op, ": expected lengths of shape [", d.N,
                "] (N of the input of shape ", x.sizes(), "), got shape ", t.sizes());
    keep = t.contiguous();
    v.lengths = keep.data_ptr<int64_t>();
  } else if (has(mask)) {
    const at::Tensor& t = *mask;
    TORCH_CHECK(t.device() == x.device(), op, ": mask is on ", t.device(), " but input is on ",
                x.device());
    TORCH_CHECK(t.scalar_type() == at::kBool, op, ": expected a mask of dtype torch.bool, got torch.",
                c10::getDtypeNames(t.scalar_type()).first);
    std::vector<int64_t> want{d.N};
    for (int64_t i = 2; i < x.dim(); ++i) want.push_back(x.size(i));
    TORCH_CHECK(t.sizes() == at::IntArrayRef(want), op, ": expected a mask of shape ",
                at::IntArrayRef(want),
                " (N and the spatial sizes of the input of shape ", x.sizes(), "), got shape ",
                t.sizes());
    keep = t.contiguous();
    v.mask = keep.data_ptr<bool>();
  }
  return v;
}

bool present(const Validity& v) { return v.lengths != nullptr || v.mask != nullptr; }

// Items of the row kernels: the (row, chunk) plan GroupNorm's split passes use.
groups::Items nc_items(const NcDims& d, int vec) {
  return groups::plan_items(d.N * d.C, d.L, vec);
}

// ---- nc_moments ----------------------------------------------------------------------------------
template <typename T, int VEC, bool MASKED>
void moments_rows(const T* x, const NcDims& d, const Validity& valid, acc_of<T>* mean, acc_of<T>* var,
                  const at::Tensor& like) {
  using A = acc_of<T>;
  const cudaStream_t stream = current_stream();
  groups::RowFwd<T> p;
  p.x = x;
  p.M = d.N * d.C;
  p.L = d.L;
  p.valid = valid;
  const groups::Items it = nc_items(d, VEC);
  const int64_t items = it.M * it.S;
  at::Tensor ws = at::empty({3 * items}, acc_options(like));
  A* wsp = ws.data_ptr<A>();
  launch(groups::row_welford_partial_kernel<T, VEC, false, void, MASKED>, groups::item_grid(it),
         groups::kItemThreads, 0, stream, p, it, wsp);
  launch(groups::row_welford_finalize_kernel<A>, grid_of(ceil_div(p.M, 8)), 256, 0, stream,
         static_cast<const A*>(wsp), p.M, it.S, A(0), mean, var, A(0), true);
}

// MASKED: the partials' valid counts, one per (n, chunk), follow the two planes.
template <typename T, int VEC, bool MASKED>
void moments_cl(const T* x, const NcDims& d, const Validity& valid, acc_of<T>* mean, acc_of<T>* var,
                const at::Tensor& like) {
  using A = acc_of<T>;
  const cudaStream_t stream = current_stream();
  const channels::ClShape s = channels::plan_cl_sums(d.N, d.L, d.C, d.C, VEC);
  const int64_t plane = s.N * s.K * s.C;
  at::Tensor ws = at::empty({2 * plane + (MASKED ? s.N * s.K : 0)}, acc_options(like));
  const A* wsp = ws.data_ptr<A>();
  launch(channels::cl_welford_partial_kernel<T, VEC, MASKED>, grid_of(s.N * s.K * s.CT), s.bx * s.by,
         0, stream, x, s, ws.data_ptr<A>(), valid);
  launch(channels::cl_welford_finalize_kernel<A>, grid_of(ceil_div(s.N * s.G, 8)), 256, 0, stream,
         wsp, s, A(0), mean, var, true, MASKED ? wsp + 2 * plane : nullptr);
}

// The kernels' MASKED flag as a compile-time constant.
template <typename F>
void with_masked(bool masked, F&& f) {
  if (masked) f(std::true_type{});
  else f(std::false_type{});
}

std::tuple<at::Tensor, at::Tensor> nc_moments(const at::Tensor& input,
                                              const std::optional<at::Tensor>& lengths,
                                              const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "fastnorm::nc_moments";
  const NcDims d = nc_dims(input, op);
  DeviceGuard guard(input.device());
  at::Tensor keep;
  const Validity valid = nc_validity(lengths, mask, input, d, op, keep);
  const at::ScalarType dt = input.scalar_type();
  at::MemoryFormat fmt;
  const bool cl = channels_last_layout(input, fmt);
  const at::Tensor x = cl ? input : input.contiguous();
  at::Tensor mean = at::empty({d.N, d.C}, acc_options(x));
  at::Tensor var = at::empty({d.N, d.C}, acc_options(x));
  if (d.N * d.C == 0) return {mean, var};
  if (d.L == 0 && present(valid)) {  // no valid position: 0, 0 (docs/ops.md)
    mean.zero_();
    var.zero_();
    return {mean, var};
  }
  if (d.L == 0) {  // moments of nothing: NaN, as torch.var_mean
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::nc_moments", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    const T* xp = x.data_ptr<T>();
    A* mp = mean.data_ptr<A>();
    A* vp = var.data_ptr<A>();
    auto fits = [&](int v) { return (cl ? d.C : d.L) % v == 0 && pack_aligned(xp, v, sizeof(T)); };
    with_pack<T>(fits, [&](auto v) {
      constexpr int V = decltype(v)::value;
      with_masked(present(valid), [&](auto m) {
        constexpr bool MASKED = decltype(m)::value;
        if (!cl) moments_rows<T, V, MASKED>(xp, d, valid, mp, vp, x);
        else moments_cl<T, V, MASKED>(xp, d, valid, mp, vp, x);
      });
    });
  });
  return {mean, var};
}

// ---- nc_affine -----------------------------------------------------------------------------------
// y = x * scale + shift per (n, c), and where the forward kernels' params (groups::RowFwd for
// row_apply, channels::ClFwd for cl_apply<NC>) carry it: rstd = scale, b = shift; mean null (rows)
// or unused (NC), w absent.
template <typename T>
struct NcScaleShift {
  using A = acc_of<T>;
  const T* x = nullptr;
  Operand<T> y;
  const A* scale = nullptr;
  Operand<T> shift;

  template <typename P>
  P params() const {
    P p;
    p.x = x;
    p.y = y;
    p.b = shift;
    p.mean = nullptr;
    p.rstd = const_cast<A*>(scale);  // read only (RowFwd's rstd is row_welford's output too)
    return p;
  }
};

// NCHW: row_apply with the GnMap of N * C groups of one "channel" each (kernels/groups_forward.cuh):
// mean null (0), rstd = scale, w absent (1), b = shift, all per row.
template <typename T, int VEC, bool MASKED>
void affine_rows(groups::RowFwd<T> p, const NcDims& d) {
  p.M = d.N * d.C;
  p.L = d.L;
  p.gn.G = p.M;
  p.gn.Cg = 1;
  p.gn.HW = d.L;
  p.gn.pack_in_channel = true;  // a row is one "channel"; with VEC > 1, L % VEC == 0
  p.gn.div64 = d.L >= (int64_t(1) << 31);
  if (!p.gn.div64) p.gn.hw_div = FastDiv(static_cast<uint32_t>(d.L));
  const groups::Items it = nc_items(d, VEC);
  launch(groups::row_apply_kernel<T, VEC, true, void, false, MASKED>, groups::item_grid(it),
         groups::kItemThreads, 0, current_stream(), p, it);
}

template <typename T, int VEC, bool MASKED>
void affine_cl(channels::ClFwd<T> p, const NcDims& d) {
  constexpr auto kernel = channels::cl_apply_kernel<T, VEC, false, true, MASKED>;
  p.s = channels::plan_cl(d.N, d.L, d.C, d.C, VEC, sm_count(),
                          resident_blocks(kernel, channels::kClThreads, 0));
  launch(kernel, grid_of(p.s.N * p.s.K * p.s.CT), p.s.bx * p.s.by, 0, current_stream(), p);
}

at::Tensor nc_affine(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& shift,
                     const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "fastnorm::nc_affine";
  const NcDims d = nc_dims(input, op);
  DeviceGuard guard(input.device());
  at::Tensor keep;
  const Validity valid = nc_validity(lengths, mask, input, d, op, keep);
  const at::ScalarType dt = input.scalar_type();
  const at::Tensor sc = nc_stat(scale, input, d, op, "scale");
  const at::Tensor sh = nc_stat(shift, input, d, op, "shift");
  at::MemoryFormat fmt;
  const bool cl = channels_last_layout(input, fmt);
  const at::Tensor x = cl ? input : input.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (x.numel() == 0) return y;
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::nc_affine", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    const T* xp = x.data_ptr<T>();
    auto fits = [&](int v) {
      return (cl ? d.C : d.L) % v == 0 && pack_aligned(xp, v, sizeof(T)) &&
             pack_aligned(y.data_ptr(), v, sizeof(T));
    };
    NcScaleShift<T> q;
    q.x = xp;
    q.y = operand<T>(y);
    q.scale = sc.data_ptr<A>();
    q.shift = operand<T>(sh);
    with_pack<T>(fits, [&](auto v) {
      with_masked(present(valid), [&](auto m) {
        constexpr int V = decltype(v)::value;
        constexpr bool MASKED = decltype(m)::value;
        if (!cl) {
          auto p = q.template params<groups::RowFwd<T>>();
          p.valid = valid;
          affine_rows<T, V, MASKED>(p, d);
        } else {
          auto p = q.template params<channels::ClFwd<T>>();
          p.valid = valid;
          affine_cl<T, V, MASKED>(p, d);
        }
      });
    });
  });
  return y;
}

// ---- nc_grad_sums --------------------------------------------------------------------------------
template <typename T, int VEC, bool MASKED>
void grad_sums_rows(groups::RowSums<T> p, const NcDims& d, acc_of<T>* sum_dy, acc_of<T>* sum_dy_xc,
                    const at::Tensor& like) {
  using A = acc_of<T>;
  const cudaStream_t stream = current_stream();
  const groups::Items it = nc_items(d, VEC);
  const int64_t items = it.M * it.S;
  at::Tensor ws = at::empty({2 * items}, acc_options(like));
  p.ws = ws.data_ptr<A>();
  launch(groups::row_sums_partial_kernel<T, VEC, T, false, MASKED>, groups::item_grid(it),
         groups::kItemThreads, 0, stream, p, it);
  // rstd null: the kSumDyXhat plane holds sum(dy * (x - mean))
  launch(groups::row_sums_finalize_kernel<A>, grid_of(ceil_div(it.M, 8)), 256, 0, stream,
         static_cast<const A*>(p.ws), groups::PartialsLayout::items(it.M, it.S), sum_dy, sum_dy_xc);
}

template <typename T, int VEC, bool MASKED>
void grad_sums_cl(channels::ClBwd<T> p, const NcDims& d, acc_of<T>* sum_dy, acc_of<T>* sum_dy_xc,
                  const at::Tensor& like) {
  using A = acc_of<T>;
  const cudaStream_t stream = current_stream();
  p.s = channels::plan_cl_sums(d.N, d.L, d.C, d.C, VEC);
  const channels::ClShape& s = p.s;
  const int64_t plane = s.N * s.K * s.C;
  at::Tensor ws = at::empty({2 * plane}, acc_options(like));
  launch(channels::cl_bwd_sums_kernel<T, VEC, false, MASKED>, grid_of(s.N * s.K * s.CT), s.bx * s.by, 0,
         stream, p, ws.data_ptr<A>());
  // rstd null: the kSumDyXhat plane holds sum(dy * (x - mean))
  const int64_t nc = d.N * d.C;
  launch(groups::row_sums_finalize_kernel<A>, grid_of(ceil_div(nc, 8)), 256, 0, stream,
         static_cast<const A*>(ws.data_ptr<A>()), groups::PartialsLayout::channels_last(s.N, s.K, s.C),
         sum_dy, sum_dy_xc);
}

std::tuple<at::Tensor, at::Tensor> nc_grad_sums(const at::Tensor& grad_out, const at::Tensor& input,
                                                const at::Tensor& mean,
                                                const std::optional<at::Tensor>& lengths,
                                                const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "fastnorm::nc_grad_sums";
  const NcDims d = nc_dims(input, op);
  DeviceGuard guard(input.device());
  at::Tensor keep;
  const Validity valid = nc_validity(lengths, mask, input, d, op, keep);
  const at::ScalarType dt = input.scalar_type();
  const at::Tensor mu = nc_stat(mean, input, d, op, "mean");
  at::MemoryFormat fmt;
  const bool cl = channels_last_layout(input, fmt);
  const at::Tensor x = cl ? input : input.contiguous();
  const at::Tensor dy = nc_grad(grad_out, input, fmt, op);
  at::Tensor sum_dy = at::empty({d.N, d.C}, acc_options(x));
  at::Tensor sum_dy_xc = at::empty({d.N, d.C}, acc_options(x));
  if (d.N * d.C == 0) return {sum_dy, sum_dy_xc};
  if (d.L == 0) {  // sums over nothing
    sum_dy.zero_();
    sum_dy_xc.zero_();
    return {sum_dy, sum_dy_xc};
  }
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::nc_grad_sums", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    const T* xp = x.data_ptr<T>();
    auto fits = [&](int v) {
      return (cl ? d.C : d.L) % v == 0 && pack_aligned(xp, v, sizeof(T)) &&
             pack_aligned(dy.data_ptr(), v, dy.element_size());
    };
    A* o_dy = sum_dy.data_ptr<A>();
    A* o_xc = sum_dy_xc.data_ptr<A>();
    if (!cl) {
      groups::RowSums<T> p;
      p.x = xp;
      p.dy = operand<T>(dy);
      p.mean = mu.data_ptr<A>();
      p.rstd = nullptr;  // centred sums: sum(dy * (x - mean))
      p.stat_div = 1;
      p.valid = valid;
      with_pack<T>(fits, [&](auto v) {
        with_masked(present(valid), [&](auto m) {
          grad_sums_rows<T, decltype(v)::value, decltype(m)::value>(p, d, o_dy, o_xc, x);
        });
      });
    } else {
      channels::ClBwd<T> p;
      p.x = xp;
      p.dy = operand<T>(dy);
      p.mean = mu.data_ptr<A>();
      p.rstd = nullptr;
      p.valid = valid;
      with_pack<T>(fits, [&](auto v) {
        with_masked(present(valid), [&](auto m) {
          grad_sums_cl<T, decltype(v)::value, decltype(m)::value>(p, d, o_dy, o_xc, x);
        });
      });
    }
  });
  return {sum_dy, sum_dy_xc};
}

// ---- nc_affine_grad ------------------------------------------------------------------------------
// dx = a * dy + b * (x - mean) + c per (n, c), and where groups::GnDx carries it for the dx
// kernels' NC flag (kernels/groups_backward.cuh): w = a (absent without dy), c1 = c, c2 = b,
// rstd unused.
template <typename T>
struct NcAffineGrad {
  using A = acc_of<T>;
  const T* x = nullptr;
  Operand<T> dy;  // absent without grad_out: the a * dy term drops
  const A* mean = nullptr;
  Operand<T> a;
  const A* b = nullptr;
  const A* c = nullptr;
  T* dx = nullptr;

  groups::GnDx<T> params() const {
    groups::GnDx<T> p;
    p.x = x;
    p.dy = dy;
    p.mean = mean;
    p.w = dy.present() ? a : Operand<T>{};
    p.c1 = c;
    p.c2 = b;
    p.dx = dx;
    return p;
  }
};

template <typename T, int VEC, bool MASKED>
void affine_grad_rows(const groups::GnDx<T>& p, const NcDims& d) {
  const groups::Items it = nc_items(d, VEC);
  launch(groups::gn_dx_nchw_kernel<T, VEC, false, true, MASKED>, groups::item_grid(it),
         groups::kItemThreads, 0, current_stream(), p, it);
}

template <typename T, int VEC, bool MASKED>
void affine_grad_cl(const groups::GnDx<T>& p, const NcDims& d) {
  constexpr auto kernel = channels::cl_dx_kernel<T, VEC, false, true, MASKED>;
  const channels::ClShape s = channels::plan_cl(d.N, d.L, d.C, d.C, VEC, sm_count(),
                                                resident_blocks(kernel, channels::kClThreads, 0));
  launch(kernel, grid_of(s.N * s.K * s.CT), s.bx * s.by, 0, current_stream(), p, s);
}

at::Tensor nc_affine_grad(const std::optional<at::Tensor>& grad_out, const at::Tensor& input,
                          const at::Tensor& mean, const at::Tensor& a, const at::Tensor& b,
                          const at::Tensor& c, const std::optional<at::Tensor>& lengths,
                          const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "fastnorm::nc_affine_grad";
  const NcDims d = nc_dims(input, op);
  DeviceGuard guard(input.device());
  at::Tensor keep;
  const Validity valid = nc_validity(lengths, mask, input, d, op, keep);
  const at::ScalarType dt = input.scalar_type();
  const at::Tensor mu = nc_stat(mean, input, d, op, "mean");
  const at::Tensor ka = nc_stat(a, input, d, op, "a");
  const at::Tensor kb = nc_stat(b, input, d, op, "b");
  const at::Tensor kc = nc_stat(c, input, d, op, "c");
  at::MemoryFormat fmt;
  const bool cl = channels_last_layout(input, fmt);
  const at::Tensor x = cl ? input : input.contiguous();
  const at::Tensor dy = has(grad_out) ? nc_grad(*grad_out, input, fmt, op) : at::Tensor();
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (x.numel() == 0) return dx;
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::nc_affine_grad", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    NcAffineGrad<T> q;
    q.x = x.data_ptr<T>();
    q.dy = operand<T>(dy);
    q.mean = mu.data_ptr<A>();
    q.a = operand<T>(ka);
    q.b = kb.data_ptr<A>();
    q.c = kc.data_ptr<A>();
    q.dx = dx.data_ptr<T>();
    groups::GnDx<T> p = q.params();
    p.valid = valid;
    auto fits = [&](int v) {
      return (cl ? d.C : d.L) % v == 0 && pack_aligned(p.x, v, sizeof(T)) &&
             pack_aligned(p.dx, v, sizeof(T)) &&
             (!dy.defined() || pack_aligned(dy.data_ptr(), v, dy.element_size()));
    };
    with_pack<T>(fits, [&](auto v) {
      with_masked(present(valid), [&](auto m) {
        constexpr int V = decltype(v)::value;
        constexpr bool MASKED = decltype(m)::value;
        if (!cl) affine_grad_rows<T, V, MASKED>(p, d);
        else affine_grad_cl<T, V, MASKED>(p, d);
      });
    });
  });
  return dx;
}

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY_IMPL(FASTNORM_OP_NAMESPACE, FASTNORM_DISPATCH_KEY, m) {
  m.impl("nc_moments", TORCH_FN(fastnorm::nc_moments));
  m.impl("nc_affine", TORCH_FN(fastnorm::nc_affine));
  m.impl("nc_grad_sums", TORCH_FN(fastnorm::nc_grad_sums));
  m.impl("nc_affine_grad", TORCH_FN(fastnorm::nc_affine_grad));
}
