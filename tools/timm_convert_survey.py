"""How many of the normalisation layers of a set of timm models fastnorm.convert() swaps.

A normalisation layer: an instance of torch.nn's _NormBase (BatchNorm*, InstanceNorm*,
SyncBatchNorm), GroupNorm, LayerNorm or RMSNorm, or any class defined in timm.layers.norm /
timm.layers.norm_act (timm's own norm and norm + activation layers, subclasses of torch's or
not). A layer counts as swapped when its exact class is one convert() maps. Models are built
without weights on the CPU; nothing runs.

    python tools/timm_convert_survey.py [model names...]
"""
from __future__ import annotations

import collections
import sys

import timm
from torch import nn

import fastnorm  # noqa: F401
from fastnorm.convert import _tables

MODELS = [
    "efficientnet_b0", "mobilenetv2_050", "mobilenetv3_small_050", "regnetx_002", "regnety_002",
    "densenet121", "cspresnet50", "dpn68", "inception_v3", "rexnet_100", "ghostnet_050",
    "mobilevit_xxs", "resnet18", "resnet50d", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    "coat_lite_tiny", "convnext_atto", "poolformer_s12", "efficientformer_l1", "levit_128s",
    "mixer_s32_224", "swin_tiny_patch4_window7_224", "edgenext_xx_small", "tf_efficientnet_lite0",
    "mnasnet_050", "fbnetc_100", "hrnet_w18_small", "nfnet_l0", "resnetv2_50x1_bit",
    "convmixer_768_32", "maxvit_nano_rw_256", "coatnet_nano_rw_224", "efficientvit_b0",
    "fastvit_t8", "repvit_m1", "mobilenetv4_conv_small", "ese_vovnet19b_dw", "gernet_s",
    "tinynet_e",
]
_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
_TIMM_NORM_MODULES = ("timm.layers.norm", "timm.layers.norm_act")


def survey(names):
    total, swapped = collections.Counter(), collections.Counter()
    built = 0
    for name in names:
        try:
            model = timm.create_model(name, pretrained=False)
        except Exception as e:  # noqa: BLE001 (a model this timm cannot build is reported)
            print(f"skipped {name}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        built += 1
        table = _tables()[0]
        for m in model.modules():
            cls = type(m)
            if isinstance(m, _TORCH_NORMS) or cls.__module__ in _TIMM_NORM_MODULES:
                key = f"{cls.__module__}.{cls.__qualname__}"
                total[key] += 1
                swapped[key] += cls in table
    return built, total, swapped


def main(argv):
    built, total, swapped = survey(argv or MODELS)
    t, s = sum(total.values()), sum(swapped.values())
    print(f"timm {timm.__version__}, {built} models: convert() swaps {s} of {t} normalisation "
          f"layers ({100.0 * s / max(t, 1):.1f}%)")
    for key, n in total.most_common():
        print(f"{n:6d} {swapped[key]:6d}  {key}")


if __name__ == "__main__":
    main(sys.argv[1:])
