"""Independent float64 reference formulas for the four norms.

Written directly from the definitions with elementary torch ops in float64; nothing here calls
torch.nn.functional's norms or fastnorm, so a bug shared by both would still be caught.
"""
from __future__ import annotations

import math

import torch


def _f64(t):
    return None if t is None else t.detach().to(torch.float64)


def _moments(x, dims):
    """Mean and biased variance over `dims` (kept)."""
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    return mean, var


def _affine_channel(y, weight, bias):
    shape = [1, -1] + [1] * (y.dim() - 2)
    if weight is not None:
        y = y * _f64(weight).reshape(shape)
    if bias is not None:
        y = y + _f64(bias).reshape(shape)
    return y


def batch_norm_train(x, weight=None, bias=None, eps=1e-5):
    """Returns (y, batch_mean[C], biased_var[C], unbiased_var[C])."""
    x = _f64(x)
    dims = [0] + list(range(2, x.dim()))
    mean, var = _moments(x, dims)
    y = (x - mean) / torch.sqrt(var + eps)
    n = x.numel() // x.shape[1]
    unbiased = var.flatten() * n / (n - 1)
    return _affine_channel(y, weight, bias), mean.flatten(), var.flatten(), unbiased


def batch_norm_eval(x, running_mean, running_var, weight=None, bias=None, eps=1e-5):
    x = _f64(x)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x - _f64(running_mean).reshape(shape)) / torch.sqrt(_f64(running_var).reshape(shape) + eps)
    return _affine_channel(y, weight, bias)


def running_update(running, batch, momentum):
    """PyTorch's direction: (1 - m) * running + m * batch."""
    return (1 - momentum) * _f64(running) + momentum * _f64(batch)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    x = _f64(x)
    if isinstance(normalized_shape, int):
        normalized_shape = [normalized_shape]
    k = len(normalized_shape)
    dims = list(range(x.dim() - k, x.dim()))
    mean, var = _moments(x, dims)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * _f64(weight)
    if bias is not None:
        y = y + _f64(bias)
    return y


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    x = _f64(x)
    n, c = x.shape[0], x.shape[1]
    spatial = x.shape[2:]
    g = x.reshape(n, num_groups, (c // num_groups) * math.prod(spatial))
    mean, var = _moments(g, [2])
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return _affine_channel(y, weight, bias)


def instance_norm(x, weight=None, bias=None, eps=1e-5):
    """Per-instance statistics. Returns (y, mean[N, C], unbiased_var[N, C])."""
    x = _f64(x)
    dims = list(range(2, x.dim()))
    mean, var = _moments(x, dims)
    y = (x - mean) / torch.sqrt(var + eps)
    m = math.prod(x.shape[2:])
    unbiased = var.reshape(x.shape[0], x.shape[1]) * m / (m - 1)
    return _affine_channel(y, weight, bias), mean.reshape(x.shape[0], x.shape[1]), unbiased
