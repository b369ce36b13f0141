"""The activations fastnorm fuses into its norm kernels (timm's BatchNormAct2d, GroupNormAct,
LayerNormAct, LayerNormAct2d): one table of names, op codes, torch references and backward
formulas.

The codes are the ops' `activation` argument and must equal csrc/kernels/activation.cuh's
`ActKind` (tests/test_norm_act.py parses the header and compares). Each activation's reference
is torch's own function, and its backward torch's own backward op, so the reference ops
(fastnorm/ops/) compute what torch computes, kinks included (relu6: the formula of torch's CUDA
hardtanh_backward, which passes dy at a NaN z as the kernels do; its CPU kernel does so only
outside its vectorized loop).

`from_module(m)` says which activation a torch or timm module computes: (name, param) when its
math is exactly one of the table's (forward and gradient, the one-sided choices at the kinks
included), None otherwise (the module then runs unfused, after the norm).
"""
from __future__ import annotations

import math
import sys
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "NAMES", "code_of", "name_of", "param_of", "apply", "grad", "derivative",
           "from_module"]


class Activation(NamedTuple):
    code: int
    forward: Callable[[Tensor, float], Tensor]
    # dy * act'(z) with torch's backward op (ATen's derivative formula of the forward)
    backward: Callable[[Tensor, Tensor, float], Tensor]
    has_param: bool = False


def _aten():
    return torch.ops.aten


def _relu6_backward(dy: Tensor, z: Tensor) -> Tensor:
    """hardtanh_backward(dy, z, 0, 6) as torch's CUDA kernel computes it (and its CPU kernel's
    scalar path): 0 where z <= 0 or z >= 6, dy elsewhere, a NaN z included. The CPU kernel's
    vectorized path gives 0 for a NaN z; fastnorm's kernels pass dy, as CUDA's does."""
    return dy.masked_fill((z <= 0) | (z >= 6), 0)


ACTIVATIONS: Dict[str, Activation] = {
    "identity": Activation(0, lambda z, p: z, lambda dy, z, p: dy),
    "relu": Activation(1, lambda z, p: F.relu(z),
                       lambda dy, z, p: _aten().threshold_backward(dy, F.relu(z), 0)),
    "relu6": Activation(2, lambda z, p: F.relu6(z), lambda dy, z, p: _relu6_backward(dy, z)),
    "leaky_relu": Activation(3, lambda z, p: F.leaky_relu(z, p),
                             lambda dy, z, p: _aten().leaky_relu_backward(dy, z, p, False), True),
    "silu": Activation(4, lambda z, p: F.silu(z), lambda dy, z, p: _aten().silu_backward(dy, z)),
    "gelu": Activation(5, lambda z, p: F.gelu(z),
                       lambda dy, z, p: _aten().gelu_backward(dy, z, approximate="none")),
    "gelu_tanh": Activation(6, lambda z, p: F.gelu(z, approximate="tanh"),
                            lambda dy, z, p: _aten().gelu_backward(dy, z, approximate="tanh")),
    "hardswish": Activation(7, lambda z, p: F.hardswish(z),
                            lambda dy, z, p: _aten().hardswish_backward(dy, z)),
    "hardsigmoid": Activation(8, lambda z, p: F.hardsigmoid(z),
                              lambda dy, z, p: _aten().hardsigmoid_backward(dy, z)),
    "mish": Activation(9, lambda z, p: F.mish(z), lambda dy, z, p: _aten().mish_backward(dy, z)),
    "sigmoid": Activation(10, lambda z, p: torch.sigmoid(z),
                          lambda dy, z, p: _aten().sigmoid_backward(dy, torch.sigmoid(z))),
    "tanh": Activation(11, lambda z, p: torch.tanh(z),
                       lambda dy, z, p: _aten().tanh_backward(dy, torch.tanh(z))),
}
NAMES = tuple(ACTIVATIONS)
_BY_CODE = {a.code: name for name, a in ACTIVATIONS.items()}
# Spellings accepted by the functional API's `activation` argument besides the table's names
# (torch's and timm's names for the same functions).
_ALIASES = {"none": "identity", "swish": "silu", "gelu_erf": "gelu", "hard_swish": "hardswish",
            "hard_sigmoid": "hardsigmoid", "leakyrelu": "leaky_relu"}


def check_code(code: int, op: str = "fastnorm") -> int:
    """The code, or ValueError for an unknown one (the C++ wrappers' activation_of says the same)."""
    if not isinstance(code, int) or code not in _BY_CODE:
        raise ValueError(f"{op}: activation must be a code in [0, {len(_BY_CODE)}) "
                         f"(fastnorm.activations), got {code}")
    return code


def name_of(code: int) -> str:
    return _BY_CODE[check_code(code)]


def code_of(name: str) -> int:
    """The op code of an activation name (a table name or an alias; case-insensitive)."""
    if not isinstance(name, str):
        raise TypeError(f"activation must be a name (str), one of {list(NAMES)}, but got "
                        f"{type(name).__name__}")
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: expected one of {list(NAMES)} (or "
                         f"{sorted(_ALIASES)})")
    return ACTIVATIONS[key].code


def param_of(name: str, param: Optional[float]) -> float:
    """The op's activation_param: leaky_relu's negative_slope (torch's default 0.01 when None);
    the other activations take none (ValueError when one is given)."""
    act = ACTIVATIONS[name_of(code_of(name))]
    if act.has_param:
        return 0.01 if param is None else float(param)
    if param is not None:
        raise ValueError(f"activation {name!r} takes no activation_param, but got {param}")
    return 0.0


def apply(code: int, z: Tensor, param: float = 0.0) -> Tensor:
    """act(z) with torch's function (z's dtype)."""
    return ACTIVATIONS[name_of(code)].forward(z, param)


def grad(code: int, dy: Tensor, z: Tensor, param: float = 0.0) -> Tensor:
    """dy * act'(z) with torch's backward op (dy and z of one dtype)."""
    return ACTIVATIONS[name_of(code)].backward(dy, z, param)


def _timm_table() -> Dict[type, Callable[[nn.Module], Optional[Tuple[str, float]]]]:
    """timm's activation modules whose math is exactly a table entry (when timm is imported).

    timm's HardSwish (x * relu6(x + 3) / 6) and HardSigmoid (relu6(x + 3) / 6, in place: add_,
    clamp_, div_) are torch's hardswish / hardsigmoid written with other ops: the same function
    and, by autograd, the same gradient, at z = -3 and z = 3 too (tests/test_norm_act.py checks
    both at the kinks); they differ from torch's kernels only in rounding. Left out: HardMish,
    QuickGELU, PReLU (not in the table) and the *Me variants (their own autograd Functions,
    which timm uses only when torch lacks the native function).
    """
    acts = sys.modules.get("timm.layers.activations")
    if acts is None:
        return {}
    table = {}
    for cls_name, name in (("Swish", "silu"), ("Mish", "mish"), ("Sigmoid", "sigmoid"),
                           ("Tanh", "tanh"), ("GELU", "gelu"), ("GELUTanh", "gelu_tanh"),
                           ("HardSwish", "hardswish"), ("HardSigmoid", "hardsigmoid")):
        cls = getattr(acts, cls_name, None)
        if isinstance(cls, type):
            table[cls] = (lambda n: lambda m: (n, 0.0))(name)
    return table


def _gelu(m: nn.Module):
    approx = getattr(m, "approximate", "none")
    if approx == "none":
        return "gelu", 0.0
    if approx == "tanh":
        return "gelu_tanh", 0.0
    return None


_TORCH_TABLE: Dict[type, Callable[[nn.Module], Optional[Tuple[str, float]]]] = {
    nn.Identity: lambda m: ("identity", 0.0),
    nn.ReLU: lambda m: ("relu", 0.0),
    nn.ReLU6: lambda m: ("relu6", 0.0),
    nn.LeakyReLU: lambda m: ("leaky_relu", float(m.negative_slope)),
    nn.SiLU: lambda m: ("silu", 0.0),
    nn.GELU: _gelu,
    nn.Hardswish: lambda m: ("hardswish", 0.0),
    nn.Hardsigmoid: lambda m: ("hardsigmoid", 0.0),
    nn.Mish: lambda m: ("mish", 0.0),
    nn.Sigmoid: lambda m: ("sigmoid", 0.0),
    nn.Tanh: lambda m: ("tanh", 0.0),
}


def from_module(m: nn.Module) -> Optional[Tuple[str, float]]:
    """(name, param) of the activation module `m` computes, or None when fastnorm cannot fuse it:
    a class not in the table (exactly the class: a subclass may compute something else), or a
    module with hooks (fusing would skip them). In-place or not makes no difference (the fused
    kernel writes the activation's output once)."""
    if (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
            or getattr(m, "_backward_pre_hooks", None)):
        return None
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    rule = _TORCH_TABLE.get(type(m)) or _timm_table().get(type(m))
    return None if rule is None else rule(m)


# hardsigmoid's slope as torch's backward kernels write it: 1.0f / 6.0f, a float32 constant
# (also in float64)
_ONE_SIXTH = float(torch.tensor(1.0 / 6.0, dtype=torch.float32))


def _gelu_tanh_derivative(z: Tensor) -> Tensor:
    beta, kappa = math.sqrt(2.0 / math.pi), 0.044715
    t = torch.tanh(beta * (z + kappa * z * z * z))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * beta * (1 + 3 * kappa * z * z)


def _mish_derivative(z: Tensor) -> Tensor:
    t = torch.tanh(torch.log1p(torch.exp(z)))
    return t + z * torch.sigmoid(z) * (1 - t * t)


_DERIVATIVES: Dict[str, Callable[[Tensor, float], Tensor]] = {
    "identity": lambda z, p: torch.ones_like(z),
    "relu": lambda z, p: (z > 0).to(z.dtype),
    "relu6": lambda z, p: ((z > 0) & (z < 6)).to(z.dtype),
    "leaky_relu": lambda z, p: torch.where(z > 0, torch.ones_like(z), torch.full_like(z, p)),
    "silu": lambda z, p: torch.sigmoid(z) * (1 + z * (1 - torch.sigmoid(z))),
    "gelu": lambda z, p: (0.5 * (1 + torch.erf(z * math.sqrt(0.5)))
                          + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)),
    "gelu_tanh": lambda z, p: _gelu_tanh_derivative(z),
    # torch's kinks: hardswish' is 0 at z = -3 and 1 at z = 3, hardsigmoid' 0 at both
    "hardswish": lambda z, p: torch.where(z <= -3, 0.0, torch.where(z < 3, z / 3 + 0.5, 1.0)),
    "hardsigmoid": lambda z, p: ((z > -3) & (z < 3)).to(z.dtype) * _ONE_SIXTH,
    "mish": lambda z, p: _mish_derivative(z),
    "sigmoid": lambda z, p: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
    "tanh": lambda z, p: 1 - torch.tanh(z) ** 2,
}


def derivative(code: int, z: Tensor, param: float = 0.0) -> Tensor:
    """act'(z) written with differentiable torch ops (the same one-sided choices at the kinks as
    torch's backward): the backward of the fused norms uses it when that backward must itself be
    differentiable (double backward, torch.func transforms) and for forward-mode AD."""
    return _DERIVATIVES[name_of(code)](z, param)
