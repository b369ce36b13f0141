"""fastnorm: fused BatchNorm, LayerNorm, InstanceNorm and GroupNorm for PyTorch.

    import fastnorm
    bn = fastnorm.BatchNorm2d(64)          # drop-in for torch.nn.BatchNorm2d
    model = fastnorm.convert(model)        # swap the torch.nn norm layers of a built model
"""
__version__ = "0.1.0"

from . import ops  # noqa: F401  (defines the fastnorm:: ops: schemas, reference and fake kernels)
from . import autograd  # noqa: F401
from . import _ext

_ext.load()  # after the schemas exist: the extension registers CUDA kernels under them

from . import functional  # noqa: E402
from .convert import convert, converted_modules, revert  # noqa: E402
from .modules import *  # noqa: E402,F401,F403
from .modules import __all__ as _modules_all  # noqa: E402
from .sync_batchnorm import SyncBatchNorm  # noqa: E402
from .instance_stats_modules import *  # noqa: E402,F401,F403  (SwitchNorm, AdaIN, IBN)
from .instance_stats_modules import __all__ as _instance_stats_all  # noqa: E402
from .masked_modules import *  # noqa: E402,F401,F403  (masked BatchNorm, InstanceNorm, GroupNorm)
from .masked_modules import __all__ as _masked_all  # noqa: E402

__all__ = ["functional", "convert", "revert", "converted_modules", *_modules_all, "SyncBatchNorm",
           *_instance_stats_all, *_masked_all]
