"""The import path of fastnorm/instance_stats_modules.py before its rename, kept because models
pickled then name their SwitchNorm, AdaIN and IBN layers' classes by it."""
from .instance_stats_modules import (IBN, AdaptiveInstanceNorm, SwitchNorm1d,  # noqa: F401
                                     SwitchNorm2d, SwitchNorm3d)
