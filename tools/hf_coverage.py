"""How much of Hugging Face transformers' and diffusers' norm modules fastnorm.convert() reaches:
tiny random models (each architecture's own config class with tiny sizes, built on the CPU, no
downloads), their norm modules, and how many of them convert() swaps.

    python tools/hf_coverage.py [--only NAME ...] [--json FILE] [--no-diffusers]
                                [--no-transformers] [--classes]

A norm module is a module without child modules whose class name contains "Norm" or that is a
torch.nn norm class (BatchNorm*, LayerNorm, GroupNorm, InstanceNorm*, RMSNorm, LocalResponseNorm);
a module with children (Wav2Vec2LayerNormConvLayer) is a container, not counted (its norm child
is). diffusers' modulated norm layers (AdaLayerNorm*, *Zero*, *Modulated*, *Continuous*,
AdaLayerNormShift, SpatialNorm, AdaGroupNorm: a norm whose scale and shift come from a
conditioning input) count as one norm module each, the norm modules inside them not apart;
AdaLayerNormSingle and HunyuanVideoAdaNorm hold no norm (conditioning projections) and are not
norm modules. The tables list per model the norm modules (of them, modulated) and how many were
swapped, the diffusers one per family too, and the classes left as they are with the reason
fastnorm gives (fastnorm.huggingface.recognise, fastnorm.diffusers_modulated.recognise).
--classes adds every class with "Norm" in its name of both packages, one instance each built from
its signature: which convention recognises it, or why it is left alone.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastnorm  # noqa: E402
from fastnorm import diffusers_modulated, huggingface  # noqa: E402

_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
                nn.LocalResponseNorm)

# tiny sizes every config that has the attribute gets
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            head_dim=8, moe_intermediate_size=16, num_experts=4, num_local_experts=4,
            n_routed_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=16,
            max_position_embeddings=64)

# model_type -> config overrides (on top of TINY); None for the TINY defaults alone
TRANSFORMERS_MODELS: Dict[str, Optional[dict]] = {
    "llama": None, "mistral": None, "mixtral": None, "qwen2": None, "qwen2_moe": None,
    "qwen3": None, "qwen3_moe": None,
    "qwen3_next": dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                       linear_value_head_dim=8),
    "gemma": None, "gemma2": None, "gemma3_text": None, "phi": None, "phi3": None, "olmo": None,
    "olmo2": None, "olmo3": None, "olmoe": None, "cohere": None, "cohere2": None, "granite": None,
    "granitemoe": None,
    "deepseek_v3": dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                        v_head_dim=8, head_dim=4, n_shared_experts=1, first_k_dense_replace=1,
                        n_group=1, topk_group=1),
    "t5": dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4),
    "mamba": dict(state_size=8),
    "mamba2": dict(expand=2, num_heads=8, head_dim=8, n_groups=2, state_size=8),
    "falcon_mamba": dict(state_size=8),
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1,
                      mamba_d_state=8, mamba_rms_norm=True),
    "jamba": dict(mamba_d_state=8),
    "bamba": dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8,
                  mamba_expand=2),
    "nemotron_h": dict(mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=8,
                       expand=2),
    "recurrent_gemma": None, "starcoder2": None, "stablelm": None, "gpt_neox": None,
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4), "bert": None, "roberta": None, "vit": None,
    "convnext": dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_hidden_layers=None),
    "convnextv2": dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                       num_hidden_layers=None),
    "dinov2": None, "helium": None, "smollm3": None, "glm": None, "glm4": None, "exaone4": None,
    "ernie4_5": None, "arcee": None, "apertus": None, "seed_oss": None, "hunyuan_v1_dense": None,
    "llama4_text": None, "moshi": None, "kimi_linear": None,
    "falcon": dict(head_dim=None), "bloom": None, "opt": None, "mpt": None,
    "whisper": dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                    num_mel_bins=16),
    "swin": dict(num_attention_heads=None, num_hidden_layers=None, hidden_size=None,
                 embed_dim=16, depths=[1, 1], num_heads=[2, 4], image_size=32, patch_size=4,
                 window_size=4),
    "vitdet": None, "esm": None, "mt5": None, "umt5": None, "longt5": None,
    "switch_transformers": None, "cpmant": None, "imagegpt": None, "mobilebert": None,
    "squeezebert": dict(embedding_size=32),
    "gemma3n_text": dict(num_kv_shared_layers=0, layer_types=["sliding_attention",
                                                              "full_attention"],
                         activation_sparsity_pattern=[0.0, 0.0], hidden_size_per_layer_input=8,
                         laurel_rank=4, altup_num_inputs=2),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], mamba_d_state=8, mamba_headdim=8,
                   mamba_ngroups=1, n_mamba_heads=8),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"], mamba_n_heads=8,
                             mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8, mamba_expand=2),
    "qwen3_5_text": None, "olmo_hybrid": None, "deepseek_v2": None, "deepseek_v4": None,
    "dots1": dict(first_k_dense_replace=1, n_shared_experts=1), "nanochat": None, "lfm2": None,
    "gpt_oss": None, "minimax": None, "bitnet": None, "doge": None, "internlm3": None,
    "dinov3_convnext": None, "cohere2_moe": None, "ernie4_5_moe": None, "vaultgemma": None,
    "hunyuan_v1_moe": None, "glm4_moe": None, "ministral": None, "flex_olmo": None,
    "afmoe": None,
}

def _warnings_off():
    warnings.filterwarnings("ignore")
    try:
        import transformers
        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


def build_transformers(model_type: str, overrides: Optional[dict] = None,
                       device: str = "meta") -> nn.Module:
    """A tiny random AutoModel of `model_type` from its own config class (no downloads), on the
    meta device by default (convert() probes copies of the modules: it needs no data)."""
    import transformers
    cfg_cls = transformers.CONFIG_MAPPING[model_type]
    defaults = cfg_cls()
    kw = {k: v for k, v in TINY.items() if hasattr(defaults, k)}
    for k, v in (overrides or {}).items():
        if v is None:
            kw.pop(k, None)
        else:
            kw[k] = v
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.AutoModel.from_config(cfg_cls(**kw))


def _plain_norm(m: nn.Module) -> bool:
    return not m._modules and ("Norm" in type(m).__name__ or isinstance(m, _TORCH_NORMS))


_MODULATED = re.compile(r"Ada|Zero|Modulat|Continuous|SpatialNorm")


def is_modulated(m: nn.Module) -> bool:
    """A diffusers modulated norm layer: a module with children, of a diffusers class named
    like one, holding a norm module (AdaGroupNorm calls F.group_norm itself)."""
    cls = diffusers_modulated.originals().get(type(m), type(m))
    return (bool(m._modules) and cls.__module__.split(".")[0] == "diffusers"
            and bool(_MODULATED.search(cls.__name__))
            and (cls.__name__ == "AdaGroupNorm"
                 or any(_plain_norm(c) for c in m.modules() if c is not m)))


def is_norm_module(m: nn.Module) -> bool:
    """A norm module without children, or a modulated norm layer (the modules convert() may
    swap)."""
    return _plain_norm(m) or is_modulated(m)


class Counts(NamedTuple):
    total: int  # norm modules (a modulated layer counts as one, its norm child not apart)
    swapped: int
    probed: int  # of the swapped: transformers / diffusers classes (the others: torch.nn's)
    modulated: int  # of the total: modulated norm layers
    modulated_swapped: int
    missed: Dict[str, List]  # class name -> [count, the reason fastnorm gives]


def _reason(m: nn.Module) -> str:
    if is_modulated(m):
        return diffusers_modulated.recognise(m).reason
    if type(m).__module__.split(".")[0] in huggingface.ROOTS:
        return huggingface.recognise(m).reason
    return "not probed"


def count(model: nn.Module) -> Counts:
    """convert() the model and count its norm modules."""
    fastnorm.convert(model)
    converted = {id(m) for _, m in fastnorm.converted_modules(model)}
    inside = set()  # the modules inside modulated layers: counted with them
    for m in model.modules():
        if id(m) not in inside and is_modulated(m):
            inside.update(id(c) for c in m.modules() if c is not m)
    total = swapped = modulated = modulated_swapped = probed = 0
    missed: Dict[str, List] = {}
    for m in model.modules():
        if id(m) in inside or not is_norm_module(m):
            continue
        total += 1
        mod = is_modulated(m)
        modulated += mod
        if id(m) in converted:
            swapped += 1
            modulated_swapped += mod
            probed += type(m) in huggingface.originals() or mod
        else:
            entry = missed.setdefault(type(m).__name__, [0, _reason(m)])
            entry[0] += 1
    return Counts(total, swapped, probed, modulated, modulated_swapped, missed)


# ----------------------------------------------------------------------------------------------
# diffusers
# ----------------------------------------------------------------------------------------------
def _diffusers_models() -> Dict[str, Callable[[], nn.Module]]:
    import diffusers as D

    def unet():
        return D.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                             block_out_channels=(32, 64), norm_num_groups=8,
                             down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                             up_block_types=("AttnUpBlock2D", "UpBlock2D"))

    def unet_cond():
        return D.UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4,
                                      layers_per_block=1, block_out_channels=(32, 64),
                                      norm_num_groups=8, cross_attention_dim=32,
                                      attention_head_dim=8,
                                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))

    def vae():
        return D.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                               block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                               down_block_types=("DownEncoderBlock2D",) * 2,
                               up_block_types=("UpDecoderBlock2D",) * 2)

    def sd3():
        return D.SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                       attention_head_dim=8, num_attention_heads=4,
                                       joint_attention_dim=32, caption_projection_dim=32,
                                       pooled_projection_dim=16, out_channels=4,
                                       qk_norm="rms_norm", dual_attention_layers=(0,))

    def flux():
        return D.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1,
                                        num_single_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=16,
                                        pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))

    def wan():
        return D.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2,
                                       attention_head_dim=8, in_channels=4, out_channels=4,
                                       text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                       rope_max_seq_len=32)

    def cogvideox():
        return D.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8,
                                             in_channels=4, out_channels=4, time_embed_dim=8,
                                             text_embed_dim=16, num_layers=1, sample_width=8,
                                             sample_height=8, sample_frames=5, patch_size=2,
                                             temporal_compression_ratio=4,
                                             max_text_seq_length=8)

    def pixart():
        return D.PixArtTransformer2DModel(sample_size=8, num_layers=1, attention_head_dim=8,
                                          num_attention_heads=2, in_channels=4, out_channels=8,
                                          cross_attention_dim=16, caption_channels=16)

    def ltx():
        return D.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1,
                                            patch_size_t=1, num_attention_heads=2,
                                            attention_head_dim=8, cross_attention_dim=16,
                                            num_layers=1, caption_channels=16)

    def hunyuan_video():
        return D.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4,
                                                num_attention_heads=2, attention_head_dim=8,
                                                num_layers=1, num_single_layers=1,
                                                num_refiner_layers=1, patch_size=1,
                                                patch_size_t=1, text_embed_dim=16,
                                                pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))

    def sana():
        return D.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                        attention_head_dim=8, num_layers=1,
                                        num_cross_attention_heads=2,
                                        cross_attention_head_dim=8, cross_attention_dim=16,
                                        caption_channels=16, sample_size=8)

    def dit():
        return D.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                       num_layers=2, sample_size=8, patch_size=2,
                                       num_embeds_ada_norm=10)

    def mochi():
        return D.MochiTransformer3DModel(patch_size=2, num_attention_heads=2,
                                         attention_head_dim=8, num_layers=2,
                                         pooled_projection_dim=16, in_channels=4,
                                         text_embed_dim=16, time_embed_dim=8,
                                         max_sequence_length=8)

    def lumina2():
        return D.Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4,
                                           hidden_size=32, num_layers=1, num_refiner_layers=1,
                                           num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                                           axes_dim_rope=(4, 6, 6), axes_lens=(16, 16, 16),
                                           cap_feat_dim=16)

    def hunyuan_dit():
        return D.HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                   patch_size=2, sample_size=8, hidden_size=16, num_layers=2,
                                   cross_attention_dim=16, cross_attention_dim_t5=16,
                                   pooled_projection_dim=8, text_len=4, text_len_t5=4)

    def allegro():
        return D.AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=8,
                                           in_channels=4, out_channels=4, num_layers=1,
                                           cross_attention_dim=16, sample_height=8,
                                           sample_width=8, sample_frames=2, caption_channels=16)

    # variants measured by the coverage only (the tests build one model per family)
    def sd3_0():
        return D.SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                       attention_head_dim=8, num_attention_heads=4,
                                       joint_attention_dim=32, caption_projection_dim=32,
                                       pooled_projection_dim=16, out_channels=4)

    def flux_guidance():
        return D.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2,
                                        num_single_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=16,
                                        pooled_projection_dim=16, guidance_embeds=True,
                                        axes_dims_rope=(2, 2, 4))

    def wan_i2v():
        return D.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2,
                                       attention_head_dim=8, in_channels=4, out_channels=4,
                                       text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1,
                                       image_dim=16, added_kv_proj_dim=16, rope_max_seq_len=32)

    def cogvideox_1_5():
        return D.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8,
                                             in_channels=4, out_channels=4, time_embed_dim=8,
                                             ofs_embed_dim=8, text_embed_dim=16, num_layers=2,
                                             sample_width=8, sample_height=8, sample_frames=5,
                                             patch_size=2, patch_size_t=2,
                                             temporal_compression_ratio=4,
                                             max_text_seq_length=8,
                                             use_rotary_positional_embeddings=True)

    def hunyuan_video_i2v():
        return D.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4,
                                                num_attention_heads=2, attention_head_dim=8,
                                                num_layers=1, num_single_layers=1,
                                                num_refiner_layers=1, patch_size=1,
                                                patch_size_t=1, text_embed_dim=16,
                                                pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
                                                image_condition_type="token_replace")

    def pixart_sigma():
        return D.PixArtTransformer2DModel(sample_size=8, num_layers=2, attention_head_dim=8,
                                          num_attention_heads=2, in_channels=4, out_channels=8,
                                          cross_attention_dim=16, caption_channels=16,
                                          use_additional_conditions=True)

    def sana_video():
        return D.SanaVideoTransformer3DModel(in_channels=4, out_channels=4,
                                             num_attention_heads=2, attention_head_dim=8,
                                             num_layers=1, num_cross_attention_heads=2,
                                             cross_attention_head_dim=8, cross_attention_dim=16,
                                             caption_channels=16, sample_size=8)

    def sana_guidance():
        return D.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                        attention_head_dim=8, num_layers=2,
                                        num_cross_attention_heads=2,
                                        cross_attention_head_dim=8, cross_attention_dim=16,
                                        caption_channels=16, sample_size=8, guidance_embeds=True,
                                        qk_norm="rms_norm_across_heads")

    return {"UNet2DModel": unet, "UNet2DConditionModel": unet_cond, "AutoencoderKL": vae,
            "SD3Transformer2DModel": sd3, "FluxTransformer2DModel": flux,
            "WanTransformer3DModel": wan, "CogVideoXTransformer3DModel": cogvideox,
            "PixArtTransformer2DModel": pixart, "LTXVideoTransformer3DModel": ltx,
            "HunyuanVideoTransformer3DModel": hunyuan_video, "SanaTransformer2DModel": sana,
            "DiTTransformer2DModel": dit, "MochiTransformer3DModel": mochi,
            "Lumina2Transformer2DModel": lumina2, "HunyuanDiT2DModel": hunyuan_dit,
            "AllegroTransformer3DModel": allegro,
            "SD3Transformer2DModel/sd3.0": sd3_0, "FluxTransformer2DModel/guidance": flux_guidance,
            "WanTransformer3DModel/i2v": wan_i2v,
            "CogVideoXTransformer3DModel/1.5": cogvideox_1_5,
            "HunyuanVideoTransformer3DModel/i2v": hunyuan_video_i2v,
            "PixArtTransformer2DModel/sigma": pixart_sigma,
            "SanaVideoTransformer3DModel": sana_video,
            "SanaTransformer2DModel/guidance": sana_guidance}


# diffusers model -> the family its modulated norms are counted under (None: not one of them)
DIFFUSERS_FAMILIES = {
    "DiTTransformer2DModel": "DiT", "PixArtTransformer2DModel": "PixArt",
    "PixArtTransformer2DModel/sigma": "PixArt", "SD3Transformer2DModel": "SD3",
    "SD3Transformer2DModel/sd3.0": "SD3", "FluxTransformer2DModel": "Flux",
    "FluxTransformer2DModel/guidance": "Flux", "WanTransformer3DModel": "Wan",
    "WanTransformer3DModel/i2v": "Wan", "CogVideoXTransformer3DModel": "CogVideoX",
    "CogVideoXTransformer3DModel/1.5": "CogVideoX",
    "HunyuanVideoTransformer3DModel": "HunyuanVideo",
    "HunyuanVideoTransformer3DModel/i2v": "HunyuanVideo",
    "LTXVideoTransformer3DModel": "LTX-Video", "SanaTransformer2DModel": "Sana",
    "SanaTransformer2DModel/guidance": "Sana", "SanaVideoTransformer3DModel": "Sana",
    "MochiTransformer3DModel": "Mochi", "Lumina2Transformer2DModel": "Lumina2",
    # the twelfth: HunyuanDiT and Allegro
    "HunyuanDiT2DModel": "HunyuanDiT / Allegro",
    "AllegroTransformer3DModel": "HunyuanDiT / Allegro",
}


# ----------------------------------------------------------------------------------------------
# every norm class, one instance each
# ----------------------------------------------------------------------------------------------
def _instance(cls: type) -> Optional[nn.Module]:
    """An instance (on the meta device) of a norm class built from its own signature: sizes 48,
    eps 1e-6, group size 16, 2 groups (n_groups), 4 groups (num_groups); None when its
    constructor wants something else (a config)."""
    import inspect
    kw = {}
    try:
        for pn, p in list(inspect.signature(cls.__init__).parameters.items())[1:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if pn in ("eps", "epsilon", "variance_epsilon", "norm_eps"):
                kw[pn] = 1e-6
            elif pn == "group_size":
                kw[pn] = 16
            elif pn in ("n_groups", "ngroups"):
                kw[pn] = 2
            elif pn == "num_groups":
                kw[pn] = 4
            elif p.default is p.empty:
                kw[pn] = 48
    except (TypeError, ValueError):
        return None
    try:
        with torch.device("meta"):
            return cls(**kw)
    except Exception:  # noqa: BLE001
        return None


def scan_classes() -> dict:
    """Every class with "Norm" in its name defined in transformers' modeling files and in
    diffusers' models: {"recognised": {convention: [classes]}, "refused": {class: reason},
    "containers": [...], "not_built": [...]}."""
    import importlib
    import pkgutil
    import transformers
    import diffusers
    names = [m.name for pkg in (transformers.models, diffusers.models)
             for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
             if not m.ispkg and (m.name.split(".")[-1].startswith("modeling_")
                                 or m.name.startswith("diffusers."))]
    out = dict(recognised={}, refused={}, containers=[], not_built=[])
    seen = set()
    for mn in sorted(names):
        try:
            mod = importlib.import_module(mn)
        except Exception:  # noqa: BLE001  (optional dependencies)
            continue
        for name, cls in vars(mod).items():
            if not (isinstance(cls, type) and issubclass(cls, nn.Module) and "Norm" in name
                    and cls.__module__ == mn) or cls in seen:
                continue
            seen.add(cls)
            m = _instance(cls)
            label = f"{name} ({mn.split('.')[-1]})"
            if m is None:
                out["not_built"].append(label)
            elif m._modules:
                out["containers"].append(label)
            else:
                v = huggingface.recognise(m)
                if v.recipe is None:
                    out["refused"][label] = v.reason
                else:
                    out["recognised"].setdefault(v.recipe.conv, []).append(label)
    return out


def _report_classes(res: dict) -> None:
    n_rec = sum(len(v) for v in res["recognised"].values())
    print(f"\n== norm classes (one instance each, built from their signatures): {n_rec} "
          f"recognised, {len(res['refused'])} left alone, {len(res['containers'])} containers, "
          f"{len(res['not_built'])} not built without a config")
    for conv, classes in sorted(res["recognised"].items(), key=lambda kv: -len(kv[1])):
        examples = ", ".join(c.split(" ")[0] for c in classes[:4])
        print(f"  {conv:14s} {len(classes):4d}  e.g. {examples}")
    for cls, why in sorted(res["refused"].items()):
        print(f"  left alone: {cls}: {why}")


# ----------------------------------------------------------------------------------------------
def _run(name: str, build: Callable[[], nn.Module], rows: list, missed_all: dict,
         failed: list) -> None:
    t0 = time.time()
    try:
        model = build()
    except Exception as e:  # noqa: BLE001
        failed.append((name, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
        return
    c = count(model)
    rows.append(dict(model=name, norms=c.total, swapped=c.swapped, probed=c.probed,
                     modulated=c.modulated, modulated_swapped=c.modulated_swapped,
                     seconds=round(time.time() - t0, 2)))
    for cls, (n, reason) in c.missed.items():
        e = missed_all.setdefault(cls, [0, reason, set()])
        e[0] += n
        e[2].add(name)


def _line(label: str, r: dict, modulated: bool) -> str:
    line = f"{label:36s} {r['norms']:6d} {r['swapped']:8d} {r['probed']:7d}"
    if modulated:
        line += f" {r['modulated']:10d} {r['modulated_swapped']:8d}"
    return line


def _sum(rows: list) -> dict:
    return {k: sum(r[k] for r in rows) for k in
            ("norms", "swapped", "probed", "modulated", "modulated_swapped")}


def _report(title: str, rows: list, missed: dict, failed: list, modulated: bool) -> dict:
    print(f"\n== {title}")
    print(f"{'model':36s} {'norms':>6s} {'swapped':>8s} {'probed':>7s}"
          + (f" {'modulated':>10s} {'swapped':>8s}" if modulated else ""))
    for r in rows:
        print(_line(r["model"], r, modulated))
    t = _sum(rows)
    pct = 100.0 * t["swapped"] / max(t["norms"], 1)
    print(_line(f"total ({len(rows)} models)", t, modulated) + f"   {pct:.1f}% swapped")
    if missed:
        print("not swapped:")
        for cls, (n, reason, where) in sorted(missed.items(), key=lambda kv: -kv[1][0]):
            print(f"  {cls:36s} {n:4d}  {reason}  [{', '.join(sorted(where))}]")
    for name, why in failed:
        print(f"  (not built: {name}: {why})")
    return dict(models=rows, total=t["norms"], swapped=t["swapped"], probed=t["probed"],
                modulated=t["modulated"], modulated_swapped=t["modulated_swapped"],
                percent=round(pct, 2),
                not_swapped={k: dict(count=v[0], reason=v[1], models=sorted(v[2]))
                             for k, v in missed.items()},
                not_built=dict(failed))


def _report_families(rows: list) -> dict:
    """Per family of DIFFUSERS_FAMILIES: its models' norm modules and modulated layers."""
    fams: Dict[str, list] = {}
    for r in rows:
        f = DIFFUSERS_FAMILIES.get(r["model"])
        if f is not None:
            fams.setdefault(f, []).append(r)
    print(f"\n== the {len(fams)} diffusion transformer families")
    print(f"{'family':36s} {'norms':>6s} {'swapped':>8s} {'probed':>7s} {'modulated':>10s} "
          f"{'swapped':>8s}")
    out = {}
    for f, rs in fams.items():
        out[f] = t = _sum(rs)
        print(_line(f"{f} ({len(rs)} models)", t, True))
    t = _sum([r for rs in fams.values() for r in rs])
    pct = 100.0 * t["swapped"] / max(t["norms"], 1)
    mpct = 100.0 * t["modulated_swapped"] / max(t["modulated"], 1)
    print(_line(f"total ({len(fams)} families)", t, True)
          + f"   {pct:.1f}% swapped ({mpct:.1f}% of the modulated)")
    return dict(families=out, total=t, percent=round(pct, 2), modulated_percent=round(mpct, 2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="model types / diffusers class names")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--classes", action="store_true",
                    help="also every norm class of both packages, one instance each")
    args = ap.parse_args(argv)
    _warnings_off()
    torch.set_num_threads(1)
    out = {}
    rows, missed, failed = [], {}, []
    if not args.no_transformers:
        for mt, ov in TRANSFORMERS_MODELS.items():
            if args.only and mt not in args.only:
                continue
            _run(mt, lambda mt=mt, ov=ov: build_transformers(mt, ov), rows, missed, failed)
        import transformers
        out["transformers"] = _report(f"transformers {transformers.__version__}", rows, missed,
                                      failed, False)
    if not args.no_diffusers:
        import diffusers
        rows, missed, failed = [], {}, []
        for name, build in _diffusers_models().items():
            if args.only and name not in args.only:
                continue
            _run(name, build, rows, missed, failed)
        out["diffusers"] = _report(f"diffusers {diffusers.__version__}", rows, missed, failed,
                                   True)
        out["diffusers_families"] = _report_families(rows)
    if args.classes:
        out["classes"] = scan_classes()
        _report_classes(out["classes"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=list)
    return 0


if __name__ == "__main__":
    sys.exit(main())
