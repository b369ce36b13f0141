// Fused activation epilogues: the activation a norm kernel applies to z = xhat * w + b before the
// store (timm's BatchNormAct2d / GroupNormAct / LayerNormAct), and its derivative, which the
// backward kernels apply to dy after recomputing z from x and the saved statistics (so no
// pre-activation tensor is saved).
//
// Kernels take the epilogue as a compile-time flag (template <..., bool ACT>): ACT = false is the
// plain norm, unchanged; ACT = true reads the activation from the params (Activation below) and
// switches on its kind per element. The kind is uniform over the grid, so the switch never
// diverges; it costs a few integer instructions per pack in kernels bound by memory. One ACT
// instantiation per kernel instead of one per activation keeps the build (and CI) at 2x rather
// than 12x the kernels.
//
// The codes are the op schemas' `activation` argument; fastnorm/activations.py holds the same
// table (names, torch references) and a test checks that the two agree.
#pragma once
#include <cuda_runtime.h>

#include <cmath>

namespace fastnorm {

enum ActKind : int {
  kActIdentity = 0,
  kActRelu = 1,
  kActRelu6 = 2,
  kActLeakyRelu = 3,  // param: negative_slope
  kActSilu = 4,
  kActGelu = 5,       // exact (erf)
  kActGeluTanh = 6,   // approximate="tanh"
  kActHardswish = 7,
  kActHardsigmoid = 8,
  kActMish = 9,
  kActSigmoid = 10,
  kActTanh = 11,
  kActCount = 12,
};

struct Activation {
  int kind = kActIdentity;
  // LeakyReLU's negative_slope (unused by the others) as torch holds it: float32 for float32 /
  // half / bf16 data (ATen's opmath type), float64 for float64 data
  float param = 0.f;
  double param64 = 0.0;
};

namespace act_math {
// Overloads that keep fp64 in fp64 and fp32 in the single-precision functions.
__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }
__device__ __forceinline__ float log1p_(float v) { return log1pf(v); }
__device__ __forceinline__ double log1p_(double v) { return log1p(v); }
__device__ __forceinline__ float tanh_(float v) { return tanhf(v); }
__device__ __forceinline__ double tanh_(double v) { return tanh(v); }
__device__ __forceinline__ float erf_(float v) { return erff(v); }
__device__ __forceinline__ double erf_(double v) { return erf(v); }

// The activation's parameter in the accumulation type (Activation::param / param64).
__device__ __forceinline__ float param_(const Activation& a, float) { return a.param; }
__device__ __forceinline__ double param_(const Activation& a, double) { return a.param64; }

template <typename A>
__device__ __forceinline__ A sigmoid(A z) {
  return A(1) / (A(1) + exp_(-z));
}
// tanh(softplus(z)) as torch's mish computes it: tanh(log1p(exp(z))) (exp overflow -> inf -> 1).
template <typename A>
__device__ __forceinline__ A tanh_softplus(A z) {
  return tanh_(log1p_(exp_(z)));
}
// clamp(v, 0, 6) with NaN passed through.
template <typename A>
__device__ __forceinline__ A relu6_(A v) {
  return v < A(0) ? A(0) : (v > A(6) ? A(6) : v);
}
template <typename A>
__device__ __forceinline__ A gelu_tanh_inner(A z) {
  const A kBeta = A(0.7978845608028654);  // sqrt(2 / pi)
  const A kKappa = A(0.044715);
  return kBeta * (z + kKappa * z * z * z);
}
}  // namespace act_math

// The gate of gated RMSNorm, silu(g) or sigmoid(g), and d(loss)/dg = d * gate'(g): a two-way choice
// (uniform over the grid) with activate's / activation_grad's formulas, not their switch over every
// kind (the gated row kernels keep their registers for the row).
template <typename A>
__device__ __forceinline__ A gate_value(bool silu, A g) {
  const A s = act_math::sigmoid(g);
  return silu ? g * s : s;
}
template <typename A>
__device__ __forceinline__ A gate_grad(bool silu, A g, A d) {
  const A s = act_math::sigmoid(g);
  return silu ? d * s * (A(1) + g * (A(1) - s)) : d * s * (A(1) - s);
}

// act(z). NaN propagates as in torch (comparisons are written so that a NaN z falls through to z).
template <typename A>
__device__ __forceinline__ A activate(const Activation& a, A z) {
  using namespace act_math;
  switch (a.kind) {
    case kActRelu:
      return z < A(0) ? A(0) : z;
    case kActRelu6:
      return relu6_(z);
    case kActLeakyRelu:
      return z > A(0) ? z : z * param_(a, z);
    case kActSilu:
      return z * sigmoid(z);
    case kActGelu:
      return A(0.5) * z * (A(1) + erf_(z * A(0.7071067811865476)));
    case kActGeluTanh:
      return A(0.5) * z * (A(1) + tanh_(gelu_tanh_inner(z)));
    case kActHardswish:  // torch's formula, x * clamp(x + 3, 0, 6) / 6, rounding included
      return z * relu6_(z + A(3)) / A(6);
    case kActHardsigmoid:
      return relu6_(z + A(3)) / A(6);
    case kActMish:
      return z * tanh_softplus(z);
    case kActSigmoid:
      return sigmoid(z);
    case kActTanh:
      return tanh_(z);
    default:
      return z;
  }
}

// dy * act'(z): the gradient reaching z. At the kinks the one-sided choices are torch's backward
// formulas: relu 0 at z == 0, relu6 0 at 0 and 6, leaky_relu the slope at 0, hardswish
// z / 3 + 1/2 on the open interval (-3, 3) (0 at -3, dy at 3), hardsigmoid 1/6 on (-3, 3).
// A NaN z takes what torch's comparisons give it: relu and relu6 pass dy (threshold_backward and
// hardtanh_backward zero only z <= 0 / z >= 6), leaky_relu dy * slope, hardsigmoid 0.
template <typename A>
__device__ __forceinline__ A activation_grad(const Activation& a, A z, A dy) {
  using namespace act_math;
  switch (a.kind) {
    case kActRelu:
      return z <= A(0) ? A(0) : dy;
    case kActRelu6:
      return (z <= A(0) || z >= A(6)) ? A(0) : dy;
    case kActLeakyRelu:
      return z > A(0) ? dy : dy * param_(a, z);
    case kActSilu: {
      const A s = sigmoid(z);
      return dy * s * (A(1) + z * (A(1) - s));
    }
    case kActGelu: {
      const A cdf = A(0.5) * (A(1) + erf_(z * A(0.7071067811865476)));
      const A pdf = exp_(A(-0.5) * z * z) * A(0.3989422804014327);  // 1 / sqrt(2 pi)
      return dy * (cdf + z * pdf);
    }
    case kActGeluTanh: {
      const A kBeta = A(0.7978845608028654);
      const A kKappa = A(0.044715);
      const A t = tanh_(gelu_tanh_inner(z));
      const A dinner = kBeta * (A(1) + A(3) * kKappa * z * z);
      return dy * (A(0.5) * (A(1) + t) + A(0.5) * z * (A(1) - t * t) * dinner);
    }
    case kActHardswish:  // torch 2.14: 0 at z = -3, dy at z = 3 (the open interval takes the slope)
      return z <= A(-3) ? A(0) : (z < A(3) ? dy * (z / A(3) + A(0.5)) : dy);
    case kActHardsigmoid:  // torch's constant: 1/6 rounded to float32 (in fp64 too), not dy / 6
      return (z > A(-3) && z < A(3)) ? dy * static_cast<A>(1.0f / 6.0f) : A(0);
    case kActMish: {
      const A s = sigmoid(z);
      const A t = tanh_softplus(z);
      return dy * (t + z * s * (A(1) - t * t));
    }
    case kActSigmoid: {
      const A s = sigmoid(z);
      return dy * s * (A(1) - s);
    }
    case kActTanh: {
      const A t = tanh_(z);
      return dy * (A(1) - t * t);
    }
    default:
      return dy;
  }
}

}  // namespace fastnorm
