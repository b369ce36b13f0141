"""torch.nn.functional-compatible normalisation functions on the fastnorm:: ops.

Every check runs before any op: a call that raises leaves running statistics and
num_batches_tracked untouched (torch has already incremented num_batches_tracked by then).

CPU fast path. On a CPU tensor the fastnorm:: ops run ATen's native kernels anyway (their
reference implementation), so eagerly, outside torch.func transforms, torch.compile and dispatch
modes, each function calls the ATen function torch.nn.functional calls (`torch.layer_norm`,
`torch.group_norm`, `torch.batch_norm`, `torch.instance_norm`) without the ~10-50 us per call of
the Python checks, the custom-op dispatch and the Python autograd.Function (bench/cpu_overhead.py
measures it). The same kernels: the same outputs and running statistics, bitwise; gradients too,
except where the op path writes its own backward (BatchNorm with frozen statistics, InstanceNorm
with tracked ones), where they are torch.nn's own (tests/test_cpu_fast_path.py). Guarantees kept:
- checks: ATen checks its arguments before it computes or writes anything; when the call raises,
  fastnorm's checks run and raise fastnorm's documented exception, and when they find nothing
  wrong the original exception is raised again, unchanged (something only ATen refuses, or an
  exception from a hook, such as checkpoint's early stop: nothing is computed a second time).
  Python-level checks torch.nn.functional makes itself (values per channel, eps) run before, as
  torch's do. Inputs with no elements always take the checked path (fastnorm's handling of them
  differs from ATen's on purpose).
- state: running statistics are written by ATen only after its checks pass, and
  num_batches_tracked is incremented only after ATen returned, so a call that raises leaves
  every buffer untouched; under checkpoint recomputation the modules pass copies of the running
  buffers (the same autograd graph as the first forward, nothing written twice).
- CUDA tensors, torch.compile (fullgraph: the fastnorm:: ops stay in the graph), torch.func
  transforms (fastnorm's batching rules and in-op counter) and tensors under a dispatch mode
  (FakeTensor, make_fx, selective checkpointing) always take the op path.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from . import activations as _acts
from . import masked as _masked
from .autograd import (apply_add_norm, apply_batch_norm, apply_gated_rms_norm, apply_group_norm,
                       apply_instance_norm_tracked, apply_layer_norm, apply_layer_norm2d,
                       apply_local_response_norm, apply_modulated_norm, apply_rms_norm)
from .instance_stats_autograd import AdaINFunction as _AdaINFunction
from .ops.common import memory_format_of
from .ops.common import stat_dtype as _stat_dtype
from .ops.local_response_norm import lrn_check
from .ops.modulated import modulated_rows, residual_rows
from .ops.row_norms import gated_rms_composite, residual_pair_supported

__all__ = [
    "batch_norm", "batch_norm_act", "frozen_batch_norm",
    "layer_norm", "layer_norm_act", "layer_norm2d", "layer_norm2d_act",
    "group_norm", "group_norm_act", "instance_norm",
    "rms_norm", "add_rms_norm", "add_layer_norm", "gated_rms_norm",
    "modulated_layer_norm", "modulated_rms_norm", "gated_residual_modulated_norm",
    "adaptive_instance_norm",
    "local_response_norm",
]

_NO_ACT = (0, 0.0)  # (activation code, activation_param): none


def _act_args(activation: str, activation_param: Optional[float]):
    """(op code, param) of the *_act functions' activation arguments (fastnorm.activations)."""
    code = _acts.code_of(activation)
    return code, _acts.param_of(activation, activation_param)


def _activated(y: Tensor, act) -> Tensor:
    """torch's activation applied to an unfused result (CPU fast path, inputs with no elements)."""
    return y if act[0] == 0 else _acts.apply(act[0], y, act[1])

_is_compiling = torch.compiler.is_compiling
_functorch_level = torch._C._functorch.peek_interpreter_stack
_dispatch_modes = torch._C._len_torch_dispatch_stack
# FASTNORM_CPU_FAST_PATH=0 (or set_cpu_fast_path(False)) sends CPU calls through the ops too
_cpu_fast_path_enabled = os.environ.get("FASTNORM_CPU_FAST_PATH", "1").strip() not in ("0", "")


def set_cpu_fast_path(enabled: bool) -> bool:
    """Turn the CPU fast path on or off (for tests and comparisons); returns the previous state."""
    global _cpu_fast_path_enabled
    was, _cpu_fast_path_enabled = _cpu_fast_path_enabled, bool(enabled)
    return was


def cpu_fast_path(input: Tensor) -> bool:
    """Whether a call on `input` may call ATen directly (the module docstring says why it is the
    same computation): a CPU tensor with elements, eager (not compiling), outside torch.func
    transforms and dispatch modes. Costs about 0.2 us."""
    return (_cpu_fast_path_enabled and not _is_compiling() and input.is_cpu
            and _functorch_level() is None and _dispatch_modes() == 0 and input.numel() > 0)


# ----------------------------------------------------------------------------------------------
# checks (shared by the four norms)
# ----------------------------------------------------------------------------------------------
def _check_floating(name: str, input: Tensor, exc=NotImplementedError) -> None:
    if not input.is_floating_point():
        raise exc(f"{name}: expected a floating-point input (float16, bfloat16, float32 or "
                  f"float64), but got dtype {input.dtype}")


def _check_min_dim(name: str, input: Tensor, dims: int = 2) -> None:
    if input.dim() < dims:
        raise RuntimeError(f"{name}: expected an input with at least {dims} dimensions "
                           f"(N, C, *), but got input of shape {tuple(input.shape)}")


def _check_vector(name: str, what: str, t: Optional[Tensor], input: Tensor, numel: int,
                  shape_desc: str) -> None:
    """Parameters and buffers: the right number of elements, floating dtype, the input's device."""
    if t is None:
        return
    if t.numel() != numel:
        raise RuntimeError(f"{name}: expected {what} with {numel} elements ({shape_desc}), but got "
                           f"{what} of shape {tuple(t.shape)} for input of shape {tuple(input.shape)}")
    if not t.is_floating_point():
        raise RuntimeError(f"{name}: expected {what} of a floating-point dtype, but got {t.dtype}")
    if t.device != input.device:
        raise RuntimeError(f"{name}: expected {what} on the input's device {input.device}, "
                           f"but got {what} on {t.device}")


def _autocast_dtype(input: Tensor) -> Optional[torch.dtype]:
    """CUDA autocast runs layer_norm and group_norm in float32: torch casts the input first; here
    the kernel reads the half input and writes float32 (the cast is fused)."""
    if (input.device.type == "cuda" and input.dtype in (torch.float16, torch.bfloat16)
            and torch.is_autocast_enabled("cuda")):
        return torch.float32
    return None


def _verify_batch_size(input: Tensor) -> None:
    """torch.nn.functional's check, to the letter (an empty input of shape (1, C) raises too)."""
    if input.dim() == 0:
        raise IndexError(f"Expected an input with a batch dimension, but got a 0-dimensional "
                         f"input of shape {tuple(input.shape)}")
    values_per_channel = input.shape[0] * math.prod(input.shape[2:])
    if values_per_channel == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{input.size()}")


def _verify_spatial_size(input: Tensor) -> None:
    """torch.nn.functional's check, to the letter (empty inputs and inputs of rank < 3 too)."""
    if math.prod(input.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size "
                         f"{input.size()}")


def _check_channel_dim(name: str, input: Tensor) -> None:
    """BatchNorm and InstanceNorm index the channel dim: IndexError (as torch) when it is missing."""
    if input.dim() < 2:
        raise IndexError(f"{name}: expected an input with at least 2 dimensions (N, C, *), but "
                         f"got input of shape {tuple(input.shape)}")


def in_checkpoint_recomputation() -> bool:
    """True while autograd is running a backward pass. A module's forward runs then only when
    torch.utils.checkpoint recomputes a segment (reentrant or not); running statistics must not
    be updated a second time (torch updates them twice:
    https://github.com/pytorch/pytorch/issues/96136)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _empty_result(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """What torch's batch_norm returns for an input with no elements, whatever the other arguments
    (its kernel is skipped, no shape or dtype check runs): a copy of the input, still connected
    to autograd, times weight[0] plus bias[0] (IndexError for a weight or bias with no
    elements, as in torch)."""
    y = input.clone()
    if weight is not None:
        y = y * weight[0]
    if bias is not None:
        y = y + bias[0]
    return y


def _empty_affine(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """An input with no elements, affine parameters broadcast against it (shapes already checked)."""
    y = input.clone()
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


# ----------------------------------------------------------------------------------------------
# BatchNorm
# ----------------------------------------------------------------------------------------------
def _batch_norm_problem(input: Tensor, running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], weight: Optional[Tensor],
                        bias: Optional[Tensor], training: bool) -> Optional[Exception]:
    """The first reason the op cannot take these arguments (None when it can), as the exception
    to raise."""
    name = "batch_norm"
    if not training:
        for what, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is None:
                return RuntimeError(f"{name}: {what} must be defined in evaluation mode "
                                    f"(training=False)")
    if (running_mean is None) != (running_var is None):
        return ValueError(f"{name}: running_mean and running_var must either both be None or "
                          f"neither be None, but got "
                          f"running_mean={'None' if running_mean is None else 'Tensor'} and "
                          f"running_var={'None' if running_var is None else 'Tensor'}")
    try:
        _check_floating(name, input)
        # torch counts no channels in an input of rank < 2: parameters must then be empty,
        # and only then does the missing channel dim raise
        c = input.shape[1] if input.dim() > 1 else 0
        desc = f"one per channel, C={c}"
        for what, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                        ("running_var", running_var)):
            _check_vector(name, what, t, input, c, desc)
        _check_channel_dim(name, input)
    except (NotImplementedError, IndexError, RuntimeError) as e:
        return e
    return None


def _batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                momentum: Optional[float], eps: float,
                num_batches_tracked: Optional[Tensor] = None, check_eps: bool = True,
                act=_NO_ACT) -> Tensor:
    """batch_norm with the module's extras: num_batches_tracked (incremented in place by the op,
    on the device) and momentum=None (cumulative average, factor 1/num_batches_tracked).
    Checks in torch's order: values per channel, eps (check_eps: batch_norm's own; instance_norm
    has none), then the arguments; an input with no elements is accepted whatever the other
    arguments, as torch does. act: a fused activation, (code, param)."""
    name = "batch_norm"
    if training:
        _verify_batch_size(input)
    if check_eps:
        if training and eps <= 0.0:
            raise ValueError(f"{name} eps must be positive during training, but got {eps}")
        if eps < 0.0:
            raise ValueError(f"{name} eps must be non-negative, but got {eps}")
    refused = None
    if (cpu_fast_path(input) and (running_mean is None) == (running_var is None)
            and (training or running_mean is not None)):
        updates = training and running_mean is not None
        factor = momentum
        if momentum is None:
            # the cumulative average (the modules' momentum=None); 1 / the counter after this call
            factor = (1.0 / (float(num_batches_tracked) + 1.0) if updates and num_batches_tracked
                      is not None else None)
        if factor is not None or not updates:
            try:
                y = torch.batch_norm(input, weight, bias, running_mean, running_var, training,
                                     0.0 if factor is None else factor, eps, False)
            except Exception as e:  # noqa: BLE001 (the checks below say why, else it is raised)
                refused = e
            else:
                if training and num_batches_tracked is not None:
                    num_batches_tracked.add_(1)  # after the call: an error counts nothing
                return _activated(y, act)
    problem = _batch_norm_problem(input, running_mean, running_var, weight, bias, training)
    if problem is not None:
        if input.numel() != 0:
            raise problem
    if refused is not None:
        raise refused  # not an argument fastnorm checks: ATen's own reason (or a hook's)
    if problem is not None:
        # torch skips every check for an empty input (a 1-D (0,) input, statistics of any size
        # or none in eval): its result, and the counter advanced as its module does
        y = _empty_result(input, weight, bias)
        if training and num_batches_tracked is not None:
            with torch.no_grad():
                num_batches_tracked.add_(1)
        return _activated(y, act) if y.is_floating_point() else y
    if momentum is None and num_batches_tracked is None and training and running_mean is not None:
        raise ValueError(f"{name}: momentum=None (cumulative average) needs num_batches_tracked")
    y, _, _ = apply_batch_norm(input, weight, bias, running_mean, running_var,
                               num_batches_tracked, training, momentum, eps, *act)
    return y


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Same as torch.nn.functional.batch_norm: running statistics are updated in place when
    training and given."""
    if momentum is None:
        raise TypeError("batch_norm(): argument 'momentum' must be float, not NoneType (the "
                        "cumulative average, momentum=None, is the BatchNorm modules' option)")
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def batch_norm_act(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                   activation: str = "identity",
                   activation_param: Optional[float] = None) -> Tensor:
    """`activation(batch_norm(input, ...))` with the activation fused into the norm: the kernel
    applies it to z = xhat * weight + bias before the store, rounding once to the input's dtype,
    and the backward recomputes z from the input and the batch statistics (no pre-activation
    tensor is saved). The arguments, checks, errors and running-statistics update are
    batch_norm's (torch.nn.functional.batch_norm's).

    activation: "identity", "relu", "relu6", "leaky_relu", "silu" (alias "swish"), "gelu",
    "gelu_tanh", "hardswish", "hardsigmoid", "mish", "sigmoid" or "tanh" (fastnorm.activations);
    activation_param: leaky_relu's negative_slope (default 0.01), None for the others.
    Gradients are torch's (its backward formula of each activation, one-sided choices at the
    kinks included). On CPU, eagerly, the norm is ATen's and the activation torch's function
    after it (fastnorm.functional's CPU fast path): the same values to rounding.
    """
    if momentum is None:
        raise TypeError("batch_norm_act(): argument 'momentum' must be float, not NoneType")
    act = _act_args(activation, activation_param)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       act=act)


# ----------------------------------------------------------------------------------------------
# FrozenBatchNorm (torchvision.ops.FrozenBatchNorm2d)
# ----------------------------------------------------------------------------------------------
def frozen_batch_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      running_mean: Tensor, running_var: Tensor, eps: float = 1e-5) -> Tensor:
    """torchvision.ops.FrozenBatchNorm2d's computation, for an (N, C, *) input: per channel c

        y = x * scale[c] + shift[c],  scale = weight * rsqrt(running_var + eps),
                                      shift = bias - running_mean * scale

    (weight None: ones, bias None: zeros). Nothing is updated; training and evaluation are the
    same. The output dtype is torch's type promotion of the input and the four per-channel
    tensors, as torchvision's elementwise formula gives it (a float16 input with float32 buffers
    gives float32; autocast does not change it: multiply and add are not autocast ops). The
    output keeps the input's memory format (channels_last in, channels_last out).

    Computed by BatchNorm's evaluation path (one elementwise pass: fastnorm::batch_norm_fwd with
    training=False on CUDA, ATen's batch_norm on CPU) as
    (x - running_mean) * rsqrt(running_var + eps) * weight + bias in float32 (float64 for float64),
    rounded once to the output dtype. torchvision rounds scale and shift to the buffers' dtype
    first and then x * scale and the sum to the output dtype: the two agree to a few units in the
    last place of the output dtype (fastnorm's is the closer to the exact value; for float16
    buffers scale is not rounded to float16 here). When the input's dtype is below the promoted
    dtype (float16 input, float32 buffers) the input is cast up first, as torchvision's
    promotion does; mixed-dtype per-channel tensors are cast to the output dtype (C elements).

    Gradients flow to input (dx = dy * weight * rsqrt(running_var + eps)), and to weight and bias
    when they require grad. When running_mean or running_var require grad (as buffers they do
    not) torchvision's formula is evaluated with torch ops so that they get theirs too.
    """
    return _frozen_batch_norm(input, weight, bias, running_mean, running_var, eps)


def _frozen_batch_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       running_mean: Tensor, running_var: Tensor, eps: float,
                       act=_NO_ACT) -> Tensor:
    """frozen_batch_norm; act: an activation (code, param) fused into the pass (timm's
    FrozenBatchNormAct2d)."""
    name = "frozen_batch_norm"
    for what, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            raise RuntimeError(f"{name}: {what} must be a tensor (frozen statistics), got None")
    if input.dim() < 2:
        raise RuntimeError(f"{name}: expected an input with at least 2 dimensions (N, C, *), but "
                           f"got input of shape {tuple(input.shape)}")
    _check_floating(name, input)
    c = input.shape[1]
    params = (("weight", weight), ("bias", bias), ("running_mean", running_mean),
              ("running_var", running_var))
    out_dtype = input.dtype
    for what, t in params:
        _check_vector(name, what, t, input, c, f"one per channel, C={c}")
        if t is not None:
            out_dtype = torch.promote_types(out_dtype, t.dtype)
    if torch.is_grad_enabled() and (running_mean.requires_grad or running_var.requires_grad):
        shape = [1, c] + [1] * (input.dim() - 2)
        scale = torch.rsqrt(running_var.reshape(shape) + eps)
        if weight is not None:
            scale = weight.reshape(shape) * scale
        shift = -running_mean.reshape(shape) * scale
        if bias is not None:
            shift = bias.reshape(shape) + shift
        return _activated(input * scale + shift, act)
    x = input if input.dtype == out_dtype else input.to(out_dtype)
    w, b, rm, rv = (t if t is None or t.dtype == out_dtype else t.to(out_dtype)
                    for _, t in params)
    return _batch_norm(x, rm, rv, w, b, False, 0.0, eps, check_eps=False, act=act)


# ----------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------
def layer_norm(input: Tensor, normalized_shape: Union[int, Sequence[int]],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """Same as torch.nn.functional.layer_norm."""
    return _layer_norm(input, normalized_shape, weight, bias, eps)


def layer_norm_act(input: Tensor, normalized_shape: Union[int, Sequence[int]],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5, activation: str = "identity",
                   activation_param: Optional[float] = None) -> Tensor:
    """`activation(layer_norm(input, normalized_shape, weight, bias, eps))` with the activation
    fused into the norm (timm's LayerNormAct): z = xhat * weight + bias in float32 (float64 for
    float64), the activation applied before the one rounding to the output dtype; the backward
    recomputes z. Arguments, checks and errors are layer_norm's; `activation` and
    `activation_param` as in batch_norm_act."""
    return _layer_norm(input, normalized_shape, weight, bias, eps,
                       _act_args(activation, activation_param))


def _layer_norm(input: Tensor, normalized_shape: Union[int, Sequence[int]],
                weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                act=_NO_ACT) -> Tensor:
    refused = None
    if cpu_fast_path(input):
        try:
            return _activated(torch.layer_norm(
                input, (normalized_shape,) if isinstance(normalized_shape, int)
                else normalized_shape, weight, bias, eps, False), act)
        except Exception as e:  # noqa: BLE001 (the checks below say why, else it is raised)
            refused = e
    name = "layer_norm"
    shape: List[int] = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    _check_floating(name, input)
    k = len(shape)
    if k == 0 or input.dim() < k or list(input.shape[input.dim() - k:]) != shape:
        raise RuntimeError(f"{name}: given normalized_shape={shape}, expected input with shape "
                           f"[*, {', '.join(map(str, shape))}], but got input of shape {list(input.shape)}")
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None and list(t.shape) != shape:
            raise RuntimeError(f"{name}: expected {what} of shape {shape} (normalized_shape), but "
                               f"got {what} of shape {list(t.shape)}")
        _check_vector(name, what, t, input, math.prod(shape), f"normalized_shape={shape}")
    if refused is not None:
        raise refused  # not an argument fastnorm checks: ATen's own reason (or a hook's)
    if math.prod(shape) == 0:
        # nothing to normalise over (torch returns the empty result; the op needs N > 0)
        return _activated(_empty_affine(input, weight, bias), act)
    y, _, _ = apply_layer_norm(input, shape, weight, bias, eps, _autocast_dtype(input), *act)
    return y


# ----------------------------------------------------------------------------------------------
# LayerNorm2d (channels-first LayerNorm)
# ----------------------------------------------------------------------------------------------
def layer_norm2d(input: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                 eps: float = 1e-6) -> Tensor:
    """LayerNorm over the C channels of each position of an (N, C, *) input: timm's LayerNorm2d,
    `F.layer_norm(x.permute(0, 2, 3, 1), (C,), weight, bias, eps).permute(0, 3, 1, 2)`, for any
    spatial rank ((N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W)) and without the permute
    copies. The output keeps the input's memory format (channels_last in, channels_last out).
    Half inputs are computed in float32; under CUDA autocast the output is float32 (as
    layer_norm's)."""
    return _layer_norm2d(input, weight, bias, eps)


def layer_norm2d_act(input: Tensor, weight: Optional[Tensor] = None,
                     bias: Optional[Tensor] = None, eps: float = 1e-6,
                     activation: str = "identity",
                     activation_param: Optional[float] = None) -> Tensor:
    """`activation(layer_norm2d(input, weight, bias, eps))` with the activation fused into the
    norm (timm's LayerNormAct2d): applied to z = xhat * weight + bias in float32 (float64 for
    float64) before the one rounding; the backward recomputes z. Arguments, checks and errors are
    layer_norm2d's; `activation` and `activation_param` as in batch_norm_act. The output keeps
    the input's memory format."""
    return _layer_norm2d(input, weight, bias, eps, _act_args(activation, activation_param))


def _layer_norm2d(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  act=_NO_ACT) -> Tensor:
    refused = None
    if cpu_fast_path(input) and input.dim() >= 2:
        try:
            # ATen's LayerNorm over the (N, *, C) view: no copy for channels_last input
            y = torch.layer_norm(input.movedim(1, -1), (input.shape[1],), weight, bias, eps, False)
            y = _activated(y, act)
            return y.movedim(-1, 1).contiguous(memory_format=memory_format_of(input))
        except Exception as e:  # noqa: BLE001 (the checks below say why, else it is raised)
            refused = e
    name = "layer_norm2d"
    if input.dim() < 2:
        raise RuntimeError(f"{name}: expected an input of shape (N, C, *) with at least 2 "
                           f"dimensions, but got input of shape {list(input.shape)}")
    _check_floating(name, input)
    c = input.shape[1]
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None and list(t.shape) != [c]:
            raise RuntimeError(f"{name}: expected {what} of shape [{c}] (one per channel of input "
                               f"of shape {list(input.shape)}), but got {what} of shape "
                               f"{list(t.shape)}")
        _check_vector(name, what, t, input, c, f"one per channel, C={c}")
    if refused is not None:
        raise refused  # not an argument fastnorm checks: ATen's own reason (or a hook's)
    if c == 0:
        # nothing to normalise over (torch's composition returns the empty result)
        shape = [1, 0] + [1] * (input.dim() - 2)
        return _activated(_empty_affine(input, None if weight is None else weight.reshape(shape),
                                        None if bias is None else bias.reshape(shape)), act)
    y, _, _ = apply_layer_norm2d(input, weight, bias, eps, _autocast_dtype(input), *act)
    return y


# ----------------------------------------------------------------------------------------------
# GroupNorm and InstanceNorm
# ----------------------------------------------------------------------------------------------
def _group_norm_checks(name: str, input: Tensor, num_groups: int, weight, bias) -> None:
    """torch's checks in torch's order: rank, values per group (torch.nn.functional's
    _verify_batch_size over [N*C/G, G, *spatial]), divisibility, parameters, dtype."""
    _check_min_dim(name, input)
    c = input.shape[1]
    if name == "group_norm":
        values = (input.shape[0] * c // num_groups) * math.prod(input.shape[2:])
        if values == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"size {[input.shape[0] * c // num_groups, num_groups] + list(input.shape[2:])}")
    if num_groups <= 0 or c % num_groups != 0:
        raise RuntimeError(f"{name}: expected the number of channels C={c} of input of shape "
                           f"{tuple(input.shape)} to be divisible by num_groups={num_groups}")
    if c == 0 or math.prod(input.shape[2:]) == 0:
        raise RuntimeError(f"{name}: expected at least one channel and one spatial element "
                           f"(C > 0, HxW > 0), but got input of shape {tuple(input.shape)}")
    for what, t in (("weight", weight), ("bias", bias)):
        _check_vector(name, what, t, input, c, f"one per channel, C={c}")
    if input.numel() == 0 and weight is None and bias is None:
        return  # an empty batch of any dtype: torch returns it as it is
    _check_floating(name, input)


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Same as torch.nn.functional.group_norm (channels_last input gives channels_last output)."""
    return _group_norm(input, num_groups, weight, bias, eps)


def group_norm_act(input: Tensor, num_groups: int, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5,
                   activation: str = "identity",
                   activation_param: Optional[float] = None) -> Tensor:
    """`activation(group_norm(input, num_groups, weight, bias, eps))` with the activation fused
    into the norm (timm's GroupNormAct): applied to z = xhat * weight + bias in float32 (float64
    for float64) before the one rounding; the backward recomputes z. Arguments, checks and errors
    are group_norm's; `activation` and `activation_param` as in batch_norm_act. channels_last
    input gives channels_last output."""
    return _group_norm(input, num_groups, weight, bias, eps,
                       _act_args(activation, activation_param))


def _group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor],
                bias: Optional[Tensor], eps: float, act=_NO_ACT) -> Tensor:
    # more values per group than 1 (torch's check, which ATen does not make) when C % G == 0;
    # otherwise ATen refuses and the checks below raise in torch's order
    refused = None
    if num_groups > 0 and cpu_fast_path(input) and input.numel() > num_groups:
        try:
            return _activated(torch.group_norm(input, num_groups, weight, bias, eps, False), act)
        except Exception as e:  # noqa: BLE001 (the checks below say why, else it is raised)
            refused = e
    _group_norm_checks("group_norm", input, num_groups, weight, bias)
    if refused is not None:
        raise refused  # not an argument fastnorm checks: ATen's own reason (or a hook's)
    if not input.is_floating_point():  # an empty batch, accepted by the checks (as torch)
        return input.clone()
    y, _, _ = apply_group_norm(input, weight, bias, num_groups, eps, _autocast_dtype(input), *act)
    return y


def instance_norm(input: Tensor, running_mean: Optional[Tensor] = None,
                  running_var: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Same as torch.nn.functional.instance_norm."""
    return _instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                          momentum, eps)


def _instance_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor], bias: Optional[Tensor], use_input_stats: bool,
                   momentum: float, eps: float, update_running_stats: bool = True) -> Tensor:
    """instance_norm; update_running_stats=False computes exactly the same graph (a checkpoint
    recomputation must save the same tensors) but leaves the running buffers alone.
    Checks in torch's order: spatial size, statistics present in eval, rank, then the rest."""
    name = "instance_norm"
    if use_input_stats:
        _verify_spatial_size(input)
    elif running_mean is None or running_var is None:
        raise RuntimeError(f"{name}: expected running_mean and running_var to be defined when "
                           f"use_input_stats is false")
    _check_channel_dim(name, input)
    n, c = input.shape[0], input.shape[1]
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: running_mean and running_var must either both be None or "
                         f"neither be None")
    if input.numel() == 0:
        # torch's instance_norm is a batch_norm over (1, N*C, *) with the parameters repeated N
        # times, and batch_norm skips every check for an empty input: its result. Better than
        # torch when N == 0: the running statistics stay as they are (torch's become NaN) and
        # affine parameters broadcast per channel (torch raises IndexError on weight[0]).
        if n == 0:
            shape = [1, c] + [1] * (input.dim() - 2)
            checked = (("weight", weight), ("bias", bias))
            if use_input_stats:  # torch writes a [C] average into them
                checked += (("running_mean", running_mean), ("running_var", running_var))
            for what, t in checked:
                _check_vector(name, what, t, input, c, f"one per channel, C={c}")
            return _empty_affine(input, None if weight is None else weight.reshape(shape),
                                 None if bias is None else bias.reshape(shape))
        if use_input_stats:
            for what, t in (("running_mean", running_mean), ("running_var", running_var)):
                _check_vector(name, what, t, input, c, f"one per channel, C={c}")
        return _empty_result(input, None if weight is None else weight.repeat(n),
                             None if bias is None else bias.repeat(n))
    refused = None
    if cpu_fast_path(input):
        try:
            if running_mean is None:  # the op path's GroupNorm with one group per channel
                return torch.group_norm(input, c, weight, bias, eps, False)
            if use_input_stats and not update_running_stats:
                # the same graph as the first forward's, the module's buffers left alone
                running_mean, running_var = running_mean.clone(), running_var.clone()
            y = torch.instance_norm(input, weight, bias, running_mean, running_var,
                                    use_input_stats, momentum, eps, False)
            # torch's output is contiguous; fastnorm's keeps the input's memory format
            return y if input.is_contiguous() else y.contiguous(memory_format=memory_format_of(input))
        except Exception as e:  # noqa: BLE001 (the checks below say why, else it is raised)
            refused = e
    for what, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check_vector(name, what, t, input, c, f"one per channel, C={c}")
    if not use_input_stats:
        # Frozen running statistics: exactly BatchNorm's eval (one affine pass per channel).
        if refused is not None:
            problem = _batch_norm_problem(input, running_mean, running_var, weight, bias, False)
            raise refused if problem is None else problem
        return _batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps,
                           check_eps=False)
    if running_mean is None:
        # Per-instance statistics: GroupNorm with one group per channel.
        _group_norm_checks(name, input, c, weight, bias)
        if refused is not None:
            raise refused  # not an argument fastnorm checks: ATen's own reason (or a hook's)
        y, _, _ = apply_group_norm(input, weight, bias, c, eps, None)
        return y
    # Tracked running statistics in training: as torch does, a BatchNorm over (1, N*C, *) whose
    # running buffers are the module's repeated N times, then averaged back into the module's.
    _check_floating(name, input)
    for what, t in (("weight", weight), ("bias", bias)):
        _check_vector(name, what, t, input, c, f"one per channel, C={c}")
    if refused is not None:
        raise refused  # not an argument fastnorm checks: ATen's own reason (or a hook's)
    y, _, _ = apply_instance_norm_tracked(input, weight, bias, running_mean, running_var,
                                          momentum, eps, update_running_stats)
    return y


# ----------------------------------------------------------------------------------------------
# Masked (variable-length) BatchNorm, InstanceNorm and GroupNorm (fastnorm/masked.py)
# ----------------------------------------------------------------------------------------------
__all__ += ["masked_batch_norm", "masked_instance_norm", "masked_group_norm"]

_VALIDITY_DOC = """
    Validity (at most one; neither: exactly the plain function):
      lengths: an integer tensor [N] (any integer dtype and device): positions [0, lengths[n])
        of the last dimension are valid (for (N, C, H, W): columns w < lengths[n] of every row),
        values clamped to [0, W]. Not for an (N, C) input (it has no length dimension).
      mask: a bool tensor broadcastable to (N, *spatial) (for an (N, C) input: (N,), which
        samples count); True = valid.
    Statistics cover the valid positions only; outputs and input gradients are 0 at the invalid
    ones (the padding stays inert for the layers after), with no NaN for a sample with no valid
    position. Output in the input's dtype and memory format."""


def masked_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                      training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
                      lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
    """batch_norm with per-channel statistics over every valid (n, position) of the batch: in
    training T valid positions per channel (T <= 1: ValueError; one host read of T, skipped
    while torch.compile traces) and running_var updated with the unbiased batch variance
    (T / (T - 1)); in eval the running statistics."""
    if lengths is None and mask is None:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if momentum is None:
        raise TypeError("masked_batch_norm(): argument 'momentum' must be float, not NoneType "
                        "(the cumulative average, momentum=None, is the BatchNorm modules' option)")
    return _masked.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                              eps, lengths, mask)


def masked_instance_norm(input: Tensor, running_mean: Optional[Tensor] = None,
                         running_var: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                         bias: Optional[Tensor] = None, use_input_stats: bool = True,
                         momentum: float = 0.1, eps: float = 1e-5, *,
                         lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
    """instance_norm with per-(n, c) statistics over sample n's valid positions. Running
    statistics (use_input_stats and buffers given) are updated with the average, over the samples
    with at least 2 valid positions, of the per-(n, c) mean and unbiased variance (none: left
    unchanged); use_input_stats=False normalises with them."""
    if lengths is None and mask is None:
        return instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                             momentum, eps)
    if momentum is None:
        raise TypeError("masked_instance_norm(): argument 'momentum' must be float, not NoneType")
    return _masked.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                                 momentum, eps, lengths, mask)


def masked_group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None,
                      bias: Optional[Tensor] = None, eps: float = 1e-5, *,
                      lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
    """group_norm with per-(n, group) statistics over the group's channels x sample n's valid
    positions."""
    if lengths is None and mask is None:
        return group_norm(input, num_groups, weight, bias, eps)
    return _masked.group_norm(input, num_groups, weight, bias, eps, lengths, mask)


for _f in (masked_batch_norm, masked_instance_norm, masked_group_norm):
    if _f.__doc__:  # None under python -OO
        _f.__doc__ += _VALIDITY_DOC
del _f


# ----------------------------------------------------------------------------------------------
# RMSNorm and the fused residual-add norms
# ----------------------------------------------------------------------------------------------
def _rms_eps(eps: Optional[float], dtype: torch.dtype) -> float:
    """torch's default: the machine epsilon of the computation dtype (float32 for half inputs,
    which torch.nn.RMSNorm's documentation calls torch.finfo(x.dtype).eps)."""
    return torch.finfo(_stat_dtype(dtype)).eps if eps is None else eps


def _check_normalized_shape(name: str, input: Tensor, shape: List[int],
                            params=()) -> None:
    """torch's checks of layer_norm/rms_norm, in its order, with the shapes in the message."""
    k = len(shape)
    if k == 0:
        raise RuntimeError(f"{name}: expected normalized_shape to be at least 1-dimensional, i.e., "
                           f"containing at least one element, but got normalized_shape = {shape}")
    if list(input.shape[max(input.dim() - k, 0):]) != shape or input.dim() < k:
        raise RuntimeError(f"{name}: given normalized_shape={shape}, expected input with shape "
                           f"[*, {', '.join(map(str, shape))}], but got input of shape {list(input.shape)}")
    for what, t in params:
        if t is not None and list(t.shape) != shape:
            raise RuntimeError(f"{name}: expected {what} of shape {shape} (normalized_shape), but "
                               f"got {what} of shape {list(t.shape)}")
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{name}: expected {what} on the input's device {input.device}, "
                               f"but got {what} on {t.device}")


def _op_dtypes(input: Tensor, *params: Optional[Tensor]) -> bool:
    """The dtypes the ops take: parameters of the input's dtype or float32."""
    return all(t is None or t.dtype in (input.dtype, torch.float32) for t in params)


def rms_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
             eps: Optional[float] = None, *, weight_offset: float = 0.0,
             normalized_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Same as torch.nn.functional.rms_norm: y = x / sqrt(mean(x^2) + eps) * weight over the
    trailing normalized_shape dims, computed in float32 for half inputs (float64 for float64)
    and rounded once to the input's dtype; eps=None is the computation dtype's epsilon. Under
    CUDA autocast a half input gives a float32 output, as torch's.

    Two options reproduce the conventions of other libraries' RMSNorms exactly:

    - `weight_offset=c`: the weight applied is `c + weight`, formed in the computation dtype
      (Gemma's `1 + weight`, Transformer Engine's zero-centred gamma). Needs a weight; gradients
      reach `weight` as through that sum.
    - `normalized_dtype=D`: the normalised value x / sqrt(mean(x^2) + eps), formed in the
      computation dtype, is rounded to D before the weight multiplies it, and the output's dtype is
      torch.promote_types(D, weight.dtype) (D without a weight). This
      is Hugging Face's Llama-style RMSNorm (`weight * x_normed.to(input_dtype)`, D = the input's
      dtype: a float32 weight under bfloat16 activations gives a float32 output, as there) and T5's
      (D = the weight's dtype when it is half, float32 otherwise). The backward treats the rounding
      as the identity, as autograd does through `.to()`.

    With either option autocast does not change the output's dtype (the modules they reproduce
    cast explicitly): the input's dtype, or the promotion above.

    On CPU (the fast path) the options are computed with the same ATen ops, in the same order, as
    those libraries' modules, so the results are bitwise theirs; on CUDA by the fused kernel
    (float32 statistics reduced in a different order: equal to within rounding)."""
    if isinstance(normalized_shape, int):
        raise TypeError(f"rms_norm(): argument 'normalized_shape' (position 2) must be tuple of "
                        f"ints, not int")
    shape = list(normalized_shape)
    if weight_offset != 0.0 or normalized_dtype is not None:
        return _rms_norm_convention(input, shape, weight, eps, float(weight_offset),
                                    normalized_dtype)
    refused = None
    if cpu_fast_path(input):
        try:
            return torch.rms_norm(input, shape, weight, eps)
        except Exception as e:  # noqa: BLE001 (the checks below say why, else it is raised)
            refused = e
    _check_rms_args("rms_norm", input, shape, weight)
    if refused is not None:
        raise refused  # not an argument fastnorm checks: ATen's own reason (or a hook's)
    if input.is_complex() or not _op_dtypes(input, weight):
        return torch.rms_norm(input, shape, weight, eps)  # ATen's own: pairs the op does not take
    if input.numel() == 0:
        # nothing to normalise (torch returns the empty result); autograd stays connected
        return input.clone() if weight is None else (input * weight).to(input.dtype)
    y, _ = apply_rms_norm(input, shape, weight, _rms_eps(eps, input.dtype), _autocast_dtype(input),
                          False)
    return y


def _check_rms_args(name: str, input: Tensor, shape: List[int], weight: Optional[Tensor]) -> None:
    if not (input.is_floating_point() or input.is_complex()):
        raise NotImplementedError(f"{name}: expected a floating-point input (float16, bfloat16, "
                                  f"float32 or float64), but got dtype {input.dtype}")
    if shape and input.dim() < len(shape):
        raise ValueError(f"{name}: expected an input with at least {len(shape)} dimensions for "
                         f"normalized_shape={shape}, but got input of shape {list(input.shape)}")
    _check_normalized_shape(name, input, shape, (("weight", weight),))


def _rms_norm_composite(input: Tensor, shape: List[int], weight: Optional[Tensor], eps: float,
                        weight_offset: float, normalized_dtype: Optional[torch.dtype],
                        out_dtype: torch.dtype) -> Tensor:
    """rms_norm's conventions with ATen ops, spelled as Hugging Face's modules spell them (the CPU
    fast path: bitwise theirs), and for the dtype combinations the kernel does not take."""
    sd = _stat_dtype(input.dtype)
    dims = list(range(input.dim() - len(shape), input.dim()))
    xs = input.to(sd)
    y = xs * torch.rsqrt(xs.pow(2).mean(dims, keepdim=True) + eps)
    if normalized_dtype is not None:
        y = y.to(normalized_dtype)
    if weight is not None:
        w = weight.to(sd) + weight_offset if weight_offset != 0.0 else weight
        y = w * y
    return y.to(out_dtype)


def _rms_norm_convention(input: Tensor, shape: List[int], weight: Optional[Tensor],
                         eps: Optional[float], weight_offset: float,
                         normalized_dtype: Optional[torch.dtype]) -> Tensor:
    name = "rms_norm"
    _check_rms_args(name, input, shape, weight)
    if input.is_complex():
        raise NotImplementedError(f"{name}: weight_offset and normalized_dtype take a real "
                                  f"floating-point input, but got dtype {input.dtype}")
    if weight_offset != 0.0 and weight is None:
        raise ValueError(f"{name}: weight_offset={weight_offset} needs a weight (the weight applied "
                         f"is weight_offset + weight), but got weight=None")
    if normalized_dtype is not None and not normalized_dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point normalized_dtype, but got "
                        f"{normalized_dtype}")
    eps = _rms_eps(eps, input.dtype)
    sd = _stat_dtype(input.dtype)
    if normalized_dtype is None:
        out_dtype = input.dtype  # the modules these options reproduce cast explicitly: no autocast
    else:
        out_dtype = torch.promote_types(normalized_dtype,
                                        normalized_dtype if weight is None else weight.dtype)
    # the kernel: rounds the normalised value to the input dtype only (a wider D rounds nothing),
    # weights of the input's dtype or float32, outputs of the input's dtype or float32
    rounds_to_input = normalized_dtype == input.dtype
    exact_d = normalized_dtype is None or rounds_to_input or (
        normalized_dtype == torch.float32 and sd == torch.float32)
    w_eff = weight
    if weight is not None and weight_offset != 0.0:
        w_eff = weight.to(sd) + weight_offset
    if (cpu_fast_path(input) or input.numel() == 0 or not exact_d
            or not _op_dtypes(input, w_eff) or out_dtype not in (input.dtype, torch.float32)):
        return _rms_norm_composite(input, shape, weight, eps, weight_offset, normalized_dtype,
                                   out_dtype)
    y, _ = apply_rms_norm(input, shape, w_eff, eps,
                          None if out_dtype == input.dtype else out_dtype, rounds_to_input)
    return y


_GATE_CODES = {"silu": 4, "sigmoid": 10}  # fastnorm.activations' codes (ops.row_norms.GATE_ACTIVATIONS)
# The longest group the fused kernels hold in registers in both passes (csrc/launch/groups.h
# kGatedMaxGroup); longer groups are computed with ATen operations.
_GATED_MAX_GROUP = 2048


def gated_rms_norm(input: Tensor, gate: Optional[Tensor], weight: Optional[Tensor] = None,
                   eps: float = 1e-6, *, group_size: Optional[int] = None,
                   norm_before_gate: bool = True, activation: str = "silu",
                   normalized_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The gated RMSNorm of state-space and linear-attention models, over the last dim of input
    (hidden size H) in groups of `group_size` consecutive elements (None: one group of H), with
    statistics in float32 (float64 for float64) and act = silu or sigmoid:

    - norm_before_gate=False (Mamba-2's `norm(x * silu(gate))`, as Hugging Face's
      MambaRMSNormGated and its copies in Bamba, Zamba2, NemotronH, GraniteMoeHybrid compute it):
      h = x * act(gate) (gate None: h = x), each group normalised, h_n = h / sqrt(mean(h^2) + eps);
      y = weight * round_D(h_n) in torch.promote_types(D, weight.dtype) with D = normalized_dtype,
      or without it round_input(weight * h_n).
    - norm_before_gate=True (Qwen3-Next's and OLMo-Hybrid's `norm(x) * silu(gate)`, Kimi-Linear's
      with sigmoid): x_n = x / sqrt(mean(x^2) + eps) per group; with D: n = weight * round_D(x_n)
      (in torch.promote_types(D, weight.dtype)), without it n = weight * x_n in float32; then
      y = round_input(n * act(gate)). The gate is required.

    gate has input's shape; weight has H elements. Gradients reach input, gate and weight (the
    roundings are the identity to them, as through `.to()`).

    On CPU (the fast path) it is computed with the ATen operations those modules use, in their
    order: bitwise theirs. Otherwise one fused kernel per pass (fastnorm::gated_rms_norm_fwd /
    _bwd), for a gate of the input's dtype, weights of the input's dtype or float32,
    normalized_dtype None or the input's dtype, and groups of up to 2048 elements; other
    combinations, torch.func transforms and forward-mode AD use the ATen composition."""
    name = "gated_rms_norm"
    _check_floating(name, input)
    if input.dim() < 1:
        raise ValueError(f"{name}: expected an input of at least 1 dimension, but got a 0-dim input")
    h = input.shape[-1]
    if activation not in _GATE_CODES:
        raise ValueError(f"{name}: expected activation 'silu' or 'sigmoid', but got {activation!r}")
    if gate is None and norm_before_gate:
        raise ValueError(f"{name}: norm_before_gate=True multiplies by act(gate): a gate is needed")
    if gate is not None:
        if gate.shape != input.shape:
            raise RuntimeError(f"{name}: expected gate of the input's shape {list(input.shape)}, "
                               f"but got gate of shape {list(gate.shape)}")
        _check_floating(name, gate)
    gs = h if group_size is None else int(group_size)
    if gs <= 0 or h % gs != 0:
        raise ValueError(f"{name}: expected group_size dividing the last dim ({h}), but got "
                         f"group_size={group_size}")
    if weight is not None and list(weight.shape) != [h]:
        raise RuntimeError(f"{name}: expected weight of shape [{h}] (the last dim), but got "
                           f"weight of shape {list(weight.shape)}")
    for what, t in (("gate", gate), ("weight", weight)):
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{name}: expected {what} on the input's device {input.device}, "
                               f"but got {what} on {t.device}")
    if (gate is not None and gate.dtype == input.dtype and input.numel() > 0
            and gs <= _GATED_MAX_GROUP and _op_dtypes(input, weight)
            and normalized_dtype in (None, input.dtype) and not cpu_fast_path(input)
            and _functorch_level() is None and _forward_ad._current_level < 0):
        y, _ = apply_gated_rms_norm(input, gate, weight, float(eps), gs, bool(norm_before_gate),
                                    _GATE_CODES[activation], normalized_dtype is not None)
        return y
    y, _ = gated_rms_composite(input, gate, weight, eps, gs, norm_before_gate,
                               _GATE_CODES[activation], normalized_dtype)
    return y


def _check_residual(name: str, input: Tensor, residual: Tensor, what: str = "input") -> None:
    """A residual added to `input` (named `what`): its shape, a floating dtype, its device."""
    if input.shape != residual.shape:
        raise RuntimeError(f"{name}: expected {what} and residual of the same shape, but got {what} "
                           f"of shape {list(input.shape)} and residual of shape {list(residual.shape)}")
    if not residual.is_floating_point():
        raise NotImplementedError(f"{name}: expected a floating-point residual (float16, bfloat16, "
                                  f"float32 or float64), but got dtype {residual.dtype}")
    if residual.device != input.device:
        raise RuntimeError(f"{name}: expected residual on the {what}'s device {input.device}, but "
                           f"got residual on {residual.device}")


def _add_norm_aten(input: Tensor, residual: Tensor, shape: List[int], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float, rms: bool):
    """add_norm with ATen ops (the same semantics): dtype pairs the op does not take, empty
    inputs, and the CPU fast path."""
    acc = torch.float64 if torch.float64 in (input.dtype, residual.dtype) else torch.float32
    r = (input.to(acc) + residual.to(acc)).to(residual.dtype)
    w = None if weight is None else weight.to(acc)
    if rms:
        y = torch.rms_norm(r.to(acc), shape, w, eps)
    else:
        y = torch.layer_norm(r.to(acc), shape, w, None if bias is None else bias.to(acc), eps, False)
    return y.to(input.dtype), r


def _add_norm(name: str, input: Tensor, residual: Tensor, normalized_shape, weight, bias, eps,
              rms: bool):
    shape: List[int] = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    _check_residual(name, input, residual)
    _check_floating(name, input)
    params = (("weight", weight), ("bias", bias))
    _check_normalized_shape(name, input, shape, params)
    for what, t in params:
        if t is not None and not t.is_floating_point():
            raise RuntimeError(f"{name}: expected {what} of a floating-point dtype, but got {t.dtype}")
    if rms:
        eps = _rms_eps(eps, input.dtype)
    op_ok = (residual_pair_supported(input.dtype, residual.dtype) and _op_dtypes(input, weight, bias)
             and input.numel() > 0)
    if not op_ok or cpu_fast_path(input):
        return _add_norm_aten(input, residual, shape, weight, bias, eps, rms)
    out, r, _, _ = apply_add_norm(input, residual, shape, weight, bias, eps, rms)
    return out, r


def add_rms_norm(input: Tensor, residual: Tensor, normalized_shape: Union[int, Sequence[int]],
                 weight: Optional[Tensor] = None, eps: Optional[float] = None):
    """The pre-norm transformer step with RMSNorm, fused: returns (output, residual_out) where
    residual_out = input + residual (summed in float32, or float64 for float64 data, and stored
    in residual's dtype: a float32 residual stream under bf16/fp16 activations works) and
    output = rms_norm(residual_out, normalized_shape, weight, eps) in input's dtype. Gradients
    reach input, residual and weight from both outputs."""
    return _add_norm("add_rms_norm", input, residual, normalized_shape, weight, None, eps, True)


def add_layer_norm(input: Tensor, residual: Tensor, normalized_shape: Union[int, Sequence[int]],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5):
    """add_rms_norm with LayerNorm: returns (layer_norm(residual_out, normalized_shape, weight,
    bias, eps) in input's dtype, residual_out = input + residual in residual's dtype)."""
    return _add_norm("add_layer_norm", input, residual, normalized_shape, weight, bias, eps, False)


# ----------------------------------------------------------------------------------------------
# Modulated norms of diffusion transformers (AdaLN, AdaLN-Zero)
# ----------------------------------------------------------------------------------------------
# The longest rows the fused kernels take in both passes (csrc/launch/groups.h kModulatedMaxRow,
# kModulatedMaxPackedRow: rows of 16-byte packs of half, bfloat16 or float32); longer rows take the
# ATen composition.
_MODULATED_MAX_ROW, _MODULATED_MAX_PACKED_ROW = 2048, 4096
# Segments of fewer rows than this run per token (the operand expanded to every row): the
# segmented backward gives each segment blocks of its own, idle for most of their rows.
_MODULATED_MIN_SEGMENT = 8


def _modulated_row_fits(input: Tensor, d: int) -> bool:
    if d <= _MODULATED_MAX_ROW:
        return True
    return (d <= _MODULATED_MAX_PACKED_ROW and input.dtype != torch.float64
            and d % (16 // input.element_size()) == 0)


def _modulation_rows(name: str, what: str, t: Tensor, input: Tensor):
    """A modulation operand broadcast against input [..., D], as rows: (t2 [Q, D], R) where row m
    of input's M = Q * R rows takes t2[m // R]. Per sample [B, 1, D] / [B, D] against [B, S, D],
    per frame [B, F, 1, D] against [B, F, P, D], per token, one for all ([D]) map so with no copy
    of more than Q * D elements; any other broadcast is expanded to [M, D] (R = 1). Differentiable
    ops: the gradient comes back to t's own shape through them."""
    if t.device != input.device:
        raise RuntimeError(f"{name}: expected {what} on the input's device {input.device}, but "
                           f"got {what} on {t.device}")
    if not t.is_floating_point():
        raise RuntimeError(f"{name}: expected {what} of a floating-point dtype, but got {t.dtype}")
    shape = list(input.shape)
    ts = [1] * (len(shape) - t.dim()) + list(t.shape)
    ok = t.dim() <= len(shape) and all(a in (1, b) for a, b in zip(ts, shape))
    if not ok:
        raise RuntimeError(f"{name}: expected {what} broadcastable to the input's shape {shape}, "
                           f"but got {what} of shape {list(t.shape)}")
    d = shape[-1]
    lead, tl = shape[:-1], ts[:-1]
    j = len(lead)
    while j > 0 and tl[j - 1] == 1:
        j -= 1
    t = t.reshape(ts).expand(ts[:-1] + [d])
    m = math.prod(lead)
    if tl[:j] == lead[:j]:
        q = math.prod(lead[:j])
        return t.reshape(q, d), m // q if q > 0 else 1
    return t.expand(shape).reshape(m, d), 1


def _modulated(name: str, input: Tensor, residual: Optional[Tensor], gate: Optional[Tensor],
               scale: Optional[Tensor], shift: Optional[Tensor], weight: Optional[Tensor],
               bias: Optional[Tensor], eps: float, scale_offset: float, rms: bool, eager: bool):
    """(y, residual_out or None). eager: the CPU fast path spells the plain form (no residual) as
    diffusers' modules do: norm in the input's dtype, then `* (scale_offset + scale) + shift`."""
    _check_floating(name, input)
    if input.dim() < 1:
        raise ValueError(f"{name}: expected an input of at least 1 dimension, but got a 0-dim input")
    d = input.shape[-1]
    _check_normalized_shape(name, input, [d], (("weight", weight), ("bias", bias)))
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise RuntimeError(f"{name}: expected {what} of a floating-point dtype, but got {t.dtype}")
    if residual is not None:
        _check_residual(name, input, residual, "branch")
    mods = {w: t for w, t in (("scale", scale), ("shift", shift), ("gate", gate)) if t is not None}
    rows = {w: _modulation_rows(name, w, t, input) for w, t in mods.items()}
    scale_offset, eps = float(scale_offset), float(eps)
    if eager and residual is None and cpu_fast_path(input):
        y = torch.rms_norm(input, [d], weight, eps) if rms else \
            torch.layer_norm(input, [d], weight, bias, eps)
        y = y * (scale_offset + scale) if scale is not None else y * scale_offset
        if shift is not None:
            y = y + shift
        return y.to(input.dtype), None
    m = input.numel() // d if d > 0 else 0
    seg = min([r for _, r in rows.values()], default=max(m, 1))
    if seg < _MODULATED_MIN_SEGMENT:
        seg = 1
    args = {}
    for w, (t2, r) in rows.items():
        if r != seg:  # a coarser operand against the finest one's segments
            t2 = t2.unsqueeze(1).expand(t2.shape[0], r // seg, d).reshape(-1, d)
        args[w] = t2
    x2 = input.reshape(m, d)
    r2 = None if residual is None else residual.reshape(m, d)
    sc, sh, g = args.get("scale"), args.get("shift"), args.get("gate")
    kernel = (input.numel() > 0 and _modulated_row_fits(input, d)
              and _op_dtypes(input, weight, bias, sc, sh, g)
              and (residual is None or residual_pair_supported(input.dtype, residual.dtype))
              and not cpu_fast_path(input) and _functorch_level() is None
              and _forward_ad._current_level < 0)
    if kernel:
        y, r_out, _, _ = apply_modulated_norm(x2, sc, sh, weight, bias, r2, g, eps, scale_offset,
                                              seg, rms)
    else:  # the same formulas with ATen operations (also the CPU path of the gated residual)
        sd = _stat_dtype(input.dtype)
        if residual is not None:
            sd = torch.promote_types(sd, _stat_dtype(residual.dtype))
        r_out = residual_rows(x2, r2, g, seg) if residual is not None else None
        rows_in = r_out if r_out is not None else x2
        y, _, _ = modulated_rows(rows_in.to(sd), sc, sh, weight, bias, eps, scale_offset, seg, rms)
        y = y.to(input.dtype)
    y = y.reshape(input.shape)
    return y, (None if residual is None else r_out.reshape(input.shape))


def modulated_layer_norm(input: Tensor, scale: Optional[Tensor] = None,
                         shift: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                         bias: Optional[Tensor] = None, eps: float = 1e-6,
                         scale_offset: float = 1.0) -> Tensor:
    """The adaptive LayerNorm of diffusion transformers (DiT's adaLN, PixArt, SD3, Flux, Wan):

        y = layer_norm(input, (D,), weight, bias, eps) * (scale_offset + scale) + shift

    over the last dim D, with scale and shift (either may be None) broadcastable to input:
    per sample ([B, D] unsqueezed to [B, 1, D]), per frame ([B, F, 1, D]), per token ([B, S, D]),
    or any other broadcast. Statistics and the modulation are computed in float32 (float64 for
    float64) and rounded once to input's dtype; scale, shift, weight and bias may be float32 with a
    half input. Gradients reach every tensor argument (dscale and dshift are sums over the tokens
    sharing a modulation row, in a fixed order).

    On CPU (the fast path) it is computed as diffusers' modules spell it, with ATen operations in
    the input's dtype: bitwise theirs. Otherwise one fused kernel per pass
    (fastnorm::modulated_norm_fwd / _bwd) for D up to 2048, and up to 4096 for half, bfloat16 and
    float32 rows of a multiple of 16 bytes; longer rows, torch.func transforms and forward-mode AD
    use the ATen composition."""
    y, _ = _modulated("modulated_layer_norm", input, None, None, scale, shift, weight, bias, eps,
                      scale_offset, False, True)
    return y


def modulated_rms_norm(input: Tensor, scale: Optional[Tensor] = None,
                       shift: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                       eps: float = 1e-6, scale_offset: float = 1.0) -> Tensor:
    """modulated_layer_norm with RMSNorm: y = rms_norm(input, (D,), weight, eps) *
    (scale_offset + scale) + shift (Lumina's, HunyuanDiT's and Liger's modulated RMSNorm)."""
    y, _ = _modulated("modulated_rms_norm", input, None, None, scale, shift, weight, None, eps,
                      scale_offset, True, True)
    return y


def gated_residual_modulated_norm(residual: Tensor, branch: Tensor, gate: Optional[Tensor] = None,
                                  scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                                  weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                                  eps: float = 1e-6, scale_offset: float = 1.0,
                                  kind: str = "layer"):
    """AdaLN-Zero's gated residual step fused with the next modulated norm: returns
    (out, residual_out) with

        residual_out = residual + gate * branch      (gate None: residual + branch)
        out = modulated_{kind}_norm(residual_out, scale, shift, weight, bias, eps, scale_offset)

    residual_out is summed in float32 (float64 for float64) and stored once in residual's dtype
    (a float32 residual stream with half branches works); out is in branch's dtype and is the
    norm of the stored residual_out. gate, scale and shift broadcast against branch as in
    modulated_layer_norm. kind: "layer" (LayerNorm) or "rms" (RMSNorm, no bias). Gradients reach
    every tensor argument from both outputs."""
    name = "gated_residual_modulated_norm"
    if kind not in ("layer", "rms"):
        raise ValueError(f"{name}: expected kind 'layer' or 'rms', but got {kind!r}")
    if kind == "rms" and bias is not None:
        raise ValueError(f"{name}: kind='rms' (RMSNorm) takes no bias, but got a bias")
    if not isinstance(residual, Tensor):
        raise TypeError(f"{name}: expected residual to be a Tensor, but got {type(residual).__name__}")
    _check_floating(name, branch)
    return _modulated(name, branch, residual, gate, scale, shift, weight, bias, eps, scale_offset,
                      kind == "rms", False)


# ----------------------------------------------------------------------------------------------
# AdaIN (the autograd.Function lives in instance_stats_autograd.py)
# ----------------------------------------------------------------------------------------------
def adaptive_instance_norm(content: Tensor, style: Tensor, eps: float = 1e-5,
                           unbiased: bool = True) -> Tensor:
    """Adaptive instance normalisation (Huang & Belongie 2017):

        AdaIN(x, y) = sigma(y) * (x - mu(x)) / sigma(x) + mu(y)

    per (n, c), over the spatial positions of (N, C, *) tensors, sigma = sqrt(var + eps), var
    unbiased (as the widely used PyTorch implementation computes it) or biased with
    unbiased=False. content and style share N, C, dtype and device; their spatial sizes may
    differ. Gradients reach both. The output has content's dtype and memory format.

    A spatial extent of one position with unbiased=True gives NaN (the unbiased variance of one
    value is undefined), as the reference's var() does."""
    name = "adaptive_instance_norm"
    for what, t in (("content", content), ("style", style)):
        if t.dim() < 3:
            raise ValueError(f"{name}: expected {what} of at least 3 dimensions (N, C, *), but "
                             f"got {what} of shape {tuple(t.shape)}")
        _check_floating(name, t, RuntimeError)
    if content.shape[:2] != style.shape[:2]:
        raise RuntimeError(f"{name}: expected style with content's (N, C) = "
                           f"{tuple(content.shape[:2])}, but got style of shape "
                           f"{tuple(style.shape)} for content of shape {tuple(content.shape)}")
    if style.dtype != content.dtype:
        raise RuntimeError(f"{name}: expected style of content's dtype {content.dtype}, but got "
                           f"{style.dtype}")
    if style.device != content.device:
        raise RuntimeError(f"{name}: expected style on content's device {content.device}, but "
                           f"got {style.device}")
    return _AdaINFunction.apply(content, style, float(eps), bool(unbiased))


# ----------------------------------------------------------------------------------------------
# LocalResponseNorm
# ----------------------------------------------------------------------------------------------
def local_response_norm(input: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> Tensor:
    """torch.nn.functional.local_response_norm: for (N, C, *) input, y = x / div^beta with
    div = k + alpha * (x^2 averaged over the zero-padded window of `size` channels
    [c - size // 2, c + (size - 1) // 2], divided by size). One fused kernel each way on CUDA
    (torch runs pad, pooling and pow as separate passes); float16/bfloat16 are computed in
    float32 and rounded once (under CUDA autocast the output is float32, as torch's: autocast
    runs its pow in float32). The output keeps the input's memory format. On CPU, eagerly, float32
    and float64 run torch's own composition (the same bits), float16 / bfloat16 the op's (torch's
    CPU pooling refuses them at rank >= 4); an input with no elements is returned as is, as torch
    does; a non-floating input is torch's business (its composition's dtype rules)."""
    refused = None
    # float16 / bfloat16 take the op path on CPU too: torch's pooling has no CPU kernel for them
    # at rank >= 4 (NotImplementedError), and the op computes them in float32, rounded once
    if ((cpu_fast_path(input) and input.dtype in (torch.float32, torch.float64))
            or (not input.is_floating_point() and input.dim() >= 3)):
        try:
            return torch.nn.functional.local_response_norm(input, size, alpha, beta, k)
        except Exception as e:  # noqa: BLE001 (the checks below say why, else it is raised)
            refused = e
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"local_response_norm: size must be an int (channels in a window), got "
                        f"{type(size).__name__} {size!r}")
    lrn_check(input, size)
    if refused is not None:
        raise refused  # not an argument fastnorm checks: torch's own reason (or a hook's)
    if input.numel() == 0:
        return input  # torch returns its empty input itself
    y = apply_local_response_norm(input, size, float(alpha), float(beta), float(k))
    if _autocast_dtype(input) is not None:
        # CUDA autocast runs torch's pow in float32, so its x / div^beta comes out float32
        y = y.float()
    return y
