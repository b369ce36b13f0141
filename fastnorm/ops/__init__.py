"""The fastnorm:: ops: schemas, reference kernels, fake kernels and batching rules.

One registry for every backend (docs/ops.md is the contract):
- schemas are defined once, in the one `fastnorm` library object (common.lib);
- the reference implementation (ATen's own native ops) is registered as CompositeExplicitAutograd,
  so CPU and every other device work without a compiler;
- the compiled extension registers CUDA kernels under the same names; a direct CUDA registration
  takes precedence over the composite one;
- fake kernels make the ops traceable by torch.compile, batching rules run them under
  torch.func.vmap; autograd lives in fastnorm/autograd.py and fastnorm/instance_stats_autograd.py.

One module per family, each holding its ops' schemas, references, fakes and batching rules:
    row_norms            layer_norm, rms_norm, add_norm (LayerNorm or RMSNorm of input + residual)
    group_norm           group_norm (InstanceNorm too)
    batch_norm           batch_norm
    layer_norm2d         layer_norm2d (channels-first LayerNorm)
    instance_stats       the per-(n, c) primitives nc_* (SwitchNorm, AdaIN, IBN)
    local_response_norm  local_response_norm
    modulated            modulated_norm (AdaLN: LayerNorm or RMSNorm rows times (c + scale) plus shift,
                         optionally of a gated residual sum)
    common               what they share: the library object, statistics dtype, memory format,
                         reference, fused-activation and batching helpers
SyncBatchNorm's ops (reference kernels only) are defined with its module,
fastnorm/sync_batchnorm.py.
"""
from __future__ import annotations

# Importing a family defines its ops; SCHEMAS and OP_NAMES list them in this order.
from . import row_norms, group_norm, batch_norm, layer_norm2d  # noqa: I001
from . import instance_stats, local_response_norm, modulated  # noqa: I001

_FAMILIES = (row_norms, group_norm, batch_norm, layer_norm2d, instance_stats, local_response_norm,
             modulated)
# name -> schema of every op the compiled extension implements (tools/cuda_emu defines them too)
SCHEMAS = {name: schema for family in _FAMILIES for name, schema in family.SCHEMAS.items()}
OP_NAMES = tuple(f"fastnorm::{n}" for n in SCHEMAS)

try:  # DTensor sharding rules of the row ops, registered once torch.distributed.tensor is imported
    from . import sharding  # noqa: E402,F401
except Exception:  # noqa: BLE001 (an optional feature: importing fastnorm never fails for it)
    pass
