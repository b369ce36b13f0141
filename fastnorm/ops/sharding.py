"""DTensor sharding rules for the row ops (tensor and sequence parallelism).

With these rules the row ops (LayerNorm, RMSNorm, the fused residual-add norms and gated
RMSNorm, forward and backward) run on DTensors: a row op normalises each row on its own, so an
input sharded on a row dim (any dim before the normalised trailing dims: batch, sequence) is
normalised locally, with no communication, and its outputs are sharded the same way. That is
what TorchTitan-style sequence parallelism (`SequenceParallel()`, activations sharded on the
sequence dim) and plain data-parallel sharding of the batch dim need. The rules, one mesh dim at
a time:

- activations (input, residual, gate, grad_out, ...): a Shard of a row dim is kept; a Shard of a
  normalised dim, a Partial or a _StridedShard input is redistributed to Replicate first (the op
  needs whole rows; a Partial sum of rows does not normalise to the sum of normalised rows);
- weight / bias: Replicate (SequenceParallel replicates them);
- y, residual_out, dx, dresidual, dgate: the activations' placement;
- dweight / dbias: Partial("sum") on every mesh dim where the activations are sharded on a row
  dim (each rank holds the sum over its own rows; DTensor all-reduces them when they are
  redistributed, by full_tensor(), or by the optimizer step), Replicate elsewhere;
- the statistics (mean, rstd): see below.

Statistics. fastnorm's statistics are flat [M] vectors, M = the product of the row dims, row-major
over them (torch's native_layer_norm keeps them shaped like the input's rows, [*rows, 1, ...], so
its rule can give them the input's placement; fastnorm's cannot). The local op writes the
statistics of its local rows, in local row-major order. That block is a plain Shard(0) of the flat
vector only when the rows are sharded on the first row dim (evenly, unless it is the only row
dim); for a Shard(d), d > 0 (the sequence dim of [batch, seq, hidden]), rank r holds, for every
index of the dims before d, one contiguous run: what DTensor's own flatten of such a tensor gives,
_StridedShard(0, split_factor = product of the (local) sizes of the row dims before d), a spec
with use_strided_shard_as_shard_order=False (the split factor is literal, not a shard order). The
statistics get that placement, computed as DTensor's view rule computes it for flatten (mesh dims
in order, each dividing the local row sizes the next one sees), so they describe the data
exactly: full_tensor() of a statistic gives the unsharded op's statistics, and a backward whose
inputs arrive in another placement can have them redistributed like any DTensor. Where no exact
placement exists DTensor's flatten refuses too, and so does this rule: a row dim that the mesh
does not divide evenly stays sharded only when it is the last row dim and no later mesh dim shards
it again (then only the run lengths differ between ranks); otherwise that mesh dim is
redistributed to Replicate before the op (correct, at the price of a gather). Gated RMSNorm's
rstd is group-major, [G, M] flattened (G groups along the last dim): the same rule, with G one
more leading dim of the statistic.

Registration. The rules are registered with DTensor's sharding propagator when
torch.distributed.tensor is imported: at once if it already is, else by a one-shot import hook (so
`import fastnorm` does not pay for importing torch.distributed.tensor, ~0.6 s, and works where
torch.distributed is unavailable). `register()` registers them explicitly (idempotent).

Why not torch.distributed.tensor.experimental.register_sharding (the public API): (1) it derives
the sharding cache key from the schema's first `int` argument (hashing the arguments from there
on), which is the fused activation code of layer_norm_* and missing from rms_norm_* and
add_norm_*, so normalized_shape (int[]), output_mask (bool[]), out_dtype and rms would be left out
of the key: two calls differing only in them would share one cached decision and the
first call's output shapes / dtypes (a masked-off gradient is an empty tensor); (2) it expands one
per-mesh-dim placement list to every mesh dim independently, while a statistic's placement on one
mesh dim depends on the others (the split factor counts the local rows the earlier mesh dims
leave) and needs the spec flag above. So the rules use the lower-level
`DTensor._op_dispatcher.sharding_propagator.register_op_strategy` with a full-mesh strategy and a
RuntimeSchemaInfo that hashes every argument.

Adding an op (gated RMSNorm, ...) is one ROW_OPS entry naming its arguments' and outputs' roles;
argument positions come from the live schema (torch.ops.fastnorm.<op>.default._schema), so
trailing arguments added later (weight_offset, round_normalized, ...) need nothing here.
"""
from __future__ import annotations

import importlib.abc
import math
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

_DTENSOR = "torch.distributed.tensor"


@dataclass(frozen=True)
class RowOpRule:
    """How a row op's arguments and outputs are placed (names as in the op's schema).

    rows: the activation whose shape gives the row dims (all but the normalised trailing dims).
    acts: activation-shaped arguments (sharded like the rows; an absent Tensor? is skipped).
    stats: flat statistics arguments.
    outputs: one role per return: "act" (like the activations), "stat" (flat statistic),
        "grad" (a parameter gradient: the sum over the local rows).
    mask: the bool[] argument saying which outputs are computed (a masked-off output is an empty
        tensor, placed Replicate), aligned with the returns; None when the op has none.
    normalized: the int[] argument that is the normalised trailing shape, or the number of
        trailing dims normalised.
    stat_groups: for group-major statistics, [G, M] flattened with G = last dim // this int
        argument (gated RMSNorm's rstd); None for [M], M the product of the row dims.
    Every other tensor argument (weight, bias, anything added later) must be Replicate.
    """
    rows: str
    acts: Tuple[str, ...]
    stats: Tuple[str, ...]
    outputs: Tuple[str, ...]
    mask: Optional[str] = None
    normalized: Union[str, int] = "normalized_shape"
    stat_groups: Optional[str] = None


ROW_OPS: Dict[str, RowOpRule] = {
    "layer_norm_fwd": RowOpRule("input", ("input",), (), ("act", "stat", "stat")),
    "layer_norm_bwd": RowOpRule("input", ("grad_out", "input"), ("mean", "rstd"),
                                ("act", "grad", "grad"), mask="output_mask"),
    "rms_norm_fwd": RowOpRule("input", ("input",), (), ("act", "stat")),
    "rms_norm_bwd": RowOpRule("input", ("grad_out", "input"), ("rstd",), ("act", "grad"),
                              mask="output_mask"),
    # add_norm with rms=True returns an empty mean: any placement describes it exactly
    "add_norm_fwd": RowOpRule("input", ("input", "residual"), (), ("act", "act", "stat", "stat")),
    "add_norm_bwd": RowOpRule("residual_out", ("grad_out", "grad_residual_out", "residual_out"),
                              ("mean", "rstd"), ("act", "act", "grad", "grad"),
                              mask="output_mask"),
    # groups of group_size along the last dim; rstd is group-major, [G, M] flattened
    "gated_rms_norm_fwd": RowOpRule("input", ("input", "gate"), (), ("act", "stat"),
                                    normalized=1, stat_groups="group_size"),
    "gated_rms_norm_bwd": RowOpRule("input", ("grad_out", "input", "gate"), ("rstd",),
                                    ("act", "act", "grad"), mask="output_mask", normalized=1,
                                    stat_groups="group_size"),
}

_lock = threading.Lock()
_registered: Dict[str, bool] = {}


# ----------------------------------------------------------------------------------------------
# placements
# ----------------------------------------------------------------------------------------------
def row_placements(placements: Sequence, row_shape: Sequence[int], mesh_sizes: Sequence[int],
                   stat_lead: Sequence[int] = ()):
    """(activation placements, statistic placements) the op runs with, for activations placed
    `placements` whose row dims have the global sizes `row_shape`, on a mesh of `mesh_sizes`;
    the statistic is the flat [*stat_lead, *row_shape] (stat_lead: (G,) for group-major ones).

    A Shard of a row dim is kept where the flat statistics can describe it exactly (module
    docstring), anything else becomes Replicate. The statistic placements are the ones DTensor's
    view rule gives a row-sharded tensor flattened to [M]: Shard(0) for the first row dim,
    _StridedShard(0, split_factor=product of the local sizes of the dims before it) for a later
    one (a spec with use_strided_shard_as_shard_order=False; a split factor of 1 is a Shard(0))."""
    from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard

    n = len(row_shape)
    act = [p if isinstance(p, Shard) and not isinstance(p, _StridedShard) and 0 <= p.dim < n
           else Replicate() for p in placements]
    while True:  # demoting one mesh dim can make an earlier uneven one the last: re-check
        local = list(stat_lead) + list(row_shape)  # the statistic, unflattened
        lead = len(stat_lead)
        stats = []
        demoted = False
        for i, p in enumerate(act):
            if not isinstance(p, Shard):
                stats.append(Replicate())
                continue
            d, size = lead + p.dim, mesh_sizes[i]
            if local[d] % size != 0 and (p.dim != n - 1 or any(
                    isinstance(q, Shard) and q.dim == p.dim for q in act[i + 1:])):
                act[i] = Replicate()
                demoted = True
                break
            split = math.prod(local[:d])
            stats.append(Shard(0) if split == 1 else _StridedShard(0, split_factor=split))
            local[d] //= size
        if not demoted:
            return tuple(act), tuple(stats)


def _param_grad_placements(act):
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

    return tuple(Partial("sum") if isinstance(p, Shard) else Replicate() for p in act)


# ----------------------------------------------------------------------------------------------
# the strategy
# ----------------------------------------------------------------------------------------------
def _bound_args(op, op_schema) -> Dict[str, object]:
    """Argument name -> value (OpStrategy for a DTensor) for the call, defaults filled in."""
    args = op._schema.arguments
    bound = {}
    for i, a in enumerate(args):
        if i < len(op_schema.args_schema):
            bound[a.name] = op_schema.args_schema[i]
        elif a.name in op_schema.kwargs_schema:
            bound[a.name] = op_schema.kwargs_schema[a.name]
        else:
            bound[a.name] = a.default_value if a.has_default_value() else None
    return bound


def _row_op_strategy(rule: RowOpRule, op_schema):
    from torch.distributed.tensor._dtensor_spec import DTensorSpec
    from torch.distributed.tensor._op_schema import OpSpec, OpStrategy
    from torch.distributed.tensor._ops.utils import generate_redistribute_costs
    from torch.distributed.tensor.placement_types import Replicate

    op = op_schema.op
    bound = _bound_args(op, op_schema)
    # The DTensor arguments, in the order DTensor lists their input specs (args, then kwargs).
    names = [n for n in (a.name for a in op._schema.arguments)
             if n not in op_schema.kwargs_schema] + list(op_schema.kwargs_schema)
    inputs = [(n, bound[n]) for n in names if isinstance(bound.get(n), OpStrategy)]
    mesh = op_schema.get_mesh_from_args()
    mesh_sizes = tuple(mesh.shape)
    replicate = tuple(Replicate() for _ in mesh_sizes)

    # Candidates: each activation's own placement (as far as the op can keep it), and Replicate.
    candidates = []
    rows = bound.get(rule.rows)
    if isinstance(rows, OpStrategy):
        x_shape = tuple(rows.strategies[0].output_spec.tensor_meta.shape)
        k = rule.normalized if isinstance(rule.normalized, int) else len(bound[rule.normalized])
        n_rows = len(x_shape) - k
        lead = (x_shape[-1] // bound[rule.stat_groups],) if rule.stat_groups else ()
        for name in rule.acts:
            st = bound.get(name)
            if not isinstance(st, OpStrategy):
                continue
            spec = st.strategies[0].output_spec
            if len(spec.placements) == len(mesh_sizes) and tuple(spec.shape) == x_shape:
                cand = row_placements(spec.placements, x_shape[:n_rows], mesh_sizes, lead)
                if cand not in candidates:
                    candidates.append(cand)
    if (replicate, replicate) not in candidates:
        candidates.append((replicate, replicate))

    def spec_of(placements, tensor_meta=None):
        # literal _StridedShard split factors (the flatten convention), not a shard order
        return DTensorSpec(mesh, placements, tensor_meta=tensor_meta,
                           use_strided_shard_as_shard_order=False)

    mask = bound.get(rule.mask) if rule.mask else None
    strategies = []
    for act, stats in candidates:
        grads = _param_grad_placements(act)
        out_specs = []
        for i, role in enumerate(rule.outputs):
            if mask is not None and i < len(mask) and not mask[i]:
                out_specs.append(spec_of(replicate))  # masked off: an empty tensor
            else:
                out_specs.append(spec_of({"act": act, "stat": stats, "grad": grads}[role]))
        in_specs, costs = [], []
        for name, st in inputs:
            placements = act if name in rule.acts else stats if name in rule.stats else replicate
            spec = spec_of(placements, st.strategies[0].output_spec.tensor_meta)
            in_specs.append(spec)
            costs.append(generate_redistribute_costs(st, spec))
        strategies.append(OpSpec(output_specs=tuple(out_specs), input_specs=in_specs,
                                 redistribute_cost=costs))
    return OpStrategy(strategies)


# ----------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------
def register() -> bool:
    """Register the rules of every ROW_OPS op with DTensor (idempotent; imports
    torch.distributed.tensor). Returns whether every op has its rule."""
    from functools import partial

    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo

    propagator = DTensor._op_dispatcher.sharding_propagator
    with _lock:
        for name, rule in ROW_OPS.items():
            if _registered.get(name):
                continue
            packet = getattr(torch.ops.fastnorm, name, None)
            if packet is None:  # an op this build does not define (yet)
                continue
            op = packet.default
            # every argument is part of the cache key (tensors always are)
            info = RuntimeSchemaInfo(static_argnum=0,
                                     static_kwargkey=[a.name for a in op._schema.arguments])
            propagator.register_op_strategy(op, partial(_row_op_strategy, rule), info)
            _registered[name] = True
    return all(_registered.get(n) for n in ROW_OPS)


def _register_quietly() -> None:
    try:
        register()
    except Exception as e:  # noqa: BLE001 (never break an import: say why and go on)
        warnings.warn(f"fastnorm: DTensor sharding rules for the row ops not registered "
                      f"({type(e).__name__}: {e}); fastnorm ops on DTensors will raise",
                      RuntimeWarning, stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs _register_quietly once torch.distributed.tensor has been imported: finds its spec
    with the other finders and wraps the loader's exec_module; removes itself when it fires."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _DTENSOR:
            return None
        spec = None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        if spec is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _unhook()
            _register_quietly()

        try:
            loader.exec_module = exec_then_register
        except (AttributeError, TypeError):
            return spec  # a loader we cannot wrap: register() stays available
        return spec


_hook: Optional[_AfterImport] = None


def _unhook() -> None:
    global _hook
    if _hook is not None:
        try:
            sys.meta_path.remove(_hook)
        except ValueError:
            pass
        _hook = None


def _install() -> None:
    global _hook
    try:
        import torch.distributed as dist
        if not dist.is_available():
            return
    except Exception:  # noqa: BLE001
        return
    if _DTENSOR in sys.modules:
        _register_quietly()
    elif _hook is None:
        _hook = _AfterImport()
        sys.meta_path.insert(0, _hook)


_install()
