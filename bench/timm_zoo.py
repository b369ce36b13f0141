"""How much of timm's zoo fastnorm.convert() reaches: the normalisation layers of many timm models
(built without weights, on the CPU), and how many of them convert() swaps for fastnorm's.

    python bench/timm_zoo.py [--models NAME ...] [--json FILE]

A normalisation layer is a module whose class is, or derives from, a class defined in torch's or
timm's normalisation modules (torch.nn BatchNorm*/LayerNorm/GroupNorm/InstanceNorm*/RMSNorm/
LocalResponseNorm, timm.layers.norm and norm_act: LayerNorm, LayerNorm2d, GroupNorm, GroupNorm1,
RmsNorm, BatchNormAct2d, GroupNormAct, LayerNormAct, ..., EvoNorm, FilterResponseNorm) or
torchvision's FrozenBatchNorm2d. Containers (ConvNormAct and the like) are not norm layers; their
norm child is. The printed figure is swapped / all over every model in the list; the per-class
table lists what stays unswapped.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

# The families convert() is meant to cover (EfficientNet, MobileNetV2/V3, RegNet, DenseNet, CSPNet,
# DPN, Inception-v3, RexNet, GhostNet, MobileViT, ViT/DeiT, CoaT, ResNet-GN, PoolFormer, ConvNeXt)
# and more of the zoo: ResNets, BiT/ResNetV2 (GroupNormAct), hybrids, Swin, MaxViT, EVA...
MODELS = (
    "resnet18", "resnet50", "resnet50d", "seresnext26d_32x4d", "res2net50_26w_4s", "resnest14d",
    "efficientnet_b0", "efficientnet_b4", "efficientnetv2_rw_t", "tf_mixnet_s", "mnasnet_100",
    "mobilenetv2_100", "mobilenetv3_large_100", "mobilenetv4_conv_small", "lcnet_050",
    "regnety_008", "regnetx_016", "regnetz_b16", "densenet121", "cspresnet50", "cspdarknet53",
    "cs3darknet_s", "darknet53", "dpn68", "inception_v3", "rexnet_100", "ghostnet_100",
    "mobilevit_s", "xception41", "tresnet_m", "gernet_s", "ese_vovnet19b_dw", "halonet26t",
    "hrnet_w18_small", "dla34", "vgg11_bn", "selecsls42b", "hgnetv2_b0", "repvit_m1",
    "resnetv2_50x1_bit", "resnetv2_50", "vit_small_r26_s32_224", "resnet50_gn",
    "vit_small_patch16_224", "deit_small_patch16_224", "beit_base_patch16_224",
    "eva02_tiny_patch14_224", "coat_lite_tiny", "swin_tiny_patch4_window7_224", "mixer_b16_224",
    "poolformer_s12", "convnext_tiny", "convnextv2_atto", "edgenext_small", "inception_next_tiny",
    "maxvit_tiny_tf_224", "coatnet_0_rw_224", "fastvit_t8", "efficientformer_l1", "levit_128",
    "efficientvit_b0", "tiny_vit_5m_224", "nest_tiny", "pvt_v2_b0", "twins_svt_small",
    "crossvit_9_240", "visformer_tiny", "gcvit_xxtiny", "focalnet_tiny_srf", "davit_tiny",
    "mvitv2_tiny", "sequencer2d_s",
)

_NORM_MODULES = (
    "torch.nn.modules.batchnorm", "torch.nn.modules.normalization", "torch.nn.modules.instancenorm",
    "timm.layers.norm", "timm.layers.norm_act", "timm.layers.evo_norm",
    "timm.layers.filter_response_norm", "torchvision.ops.misc",
)


def is_norm_layer(module: nn.Module) -> bool:
    """A class defined in (or derived from one of) torch's / timm's / torchvision's norm modules."""
    return any(c.__module__ in _NORM_MODULES for c in type(module).__mro__ if c is not nn.Module)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def survey(models: Sequence[str]) -> Dict:
    """{'models': [{name, norms, swapped}], 'classes': {class: [total, unswapped]}, totals}."""
    import timm

    import fastnorm

    rows: List[Dict] = []
    classes: Dict[str, List[int]] = collections.defaultdict(lambda: [0, 0])
    for name in models:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = timm.create_model(name, pretrained=False)
        norms: List[Tuple[str, type]] = [(n, type(m)) for n, m in model.named_modules() if is_norm_layer(m)]
        fastnorm.convert(model)
        swapped = {n for n, _ in fastnorm.converted_modules(model)}
        rows.append({"model": name, "norms": len(norms), "swapped": sum(n in swapped for n, _ in norms)})
        for n, cls in norms:
            entry = classes[_class_name(cls)]
            entry[0] += 1
            entry[1] += n not in swapped
    total = sum(r["norms"] for r in rows)
    swapped_total = sum(r["swapped"] for r in rows)
    return {"models": rows, "classes": dict(classes), "norms": total, "swapped": swapped_total,
            "fraction": swapped_total / total if total else 1.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--json", help="also write the survey to this file")
    args = ap.parse_args(argv)
    s = survey(args.models)
    for r in s["models"]:
        print(f"{r['model']:32s} norm layers {r['norms']:4d}  swapped {r['swapped']:4d}")
    print(f"\n{len(s['models'])} models: convert() swaps {s['swapped']} of {s['norms']} "
          f"normalisation layers ({100 * s['fraction']:.1f}%)")
    left = sorted(((v[1], k, v[0]) for k, v in s["classes"].items() if v[1]), reverse=True)
    if left:
        print("left unswapped:")
        for n, k, t in left:
            print(f"  {n:5d} of {t:5d}  {k}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
