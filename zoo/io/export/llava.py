"""LLaVA-native export: a `MultimodalMoE` as a transformers `LlavaForConditionalGeneration` + `LlavaProcessor`.

The written directory loads with `LlavaForConditionalGeneration.from_pretrained(dir)` and
`AutoProcessor.from_pretrained(dir)` and no zoo import, and gives the zoo model's logits (LLaVA,
Liu et al. 2023, "Visual Instruction Tuning": vision tower -> projector -> LM, image features
replacing the `<image>` tokens). The parts:

- `language_model`: the LM as exported by `HF_TARGETS` (`MixtralForCausalLM` / `Qwen2MoeForCausalLM`
  for an MoE LM) or the dense transformers LM itself; its base model becomes LLaVA's
  `model.language_model`, its head `lm_head`.
- `multi_modal_projector`: our `mlp` connector of depth 2 (linear -> exact GELU -> linear, with
  biases) is exactly LLaVA's `linear_1` / `act` / `linear_2` (`projector_hidden_act="gelu"`,
  `multimodal_projector_bias=True`).
- `vision_tower`: one adapter per transformers vision class (`VISION_TOWERS`): a timm
  `VisionTransformer` without a pre-norm becomes a `ViTModel` (the layout transformers' own timm
  -> ViT conversion maps: one class token, no pre-norm), one with a pre-norm (timm's CLIP ViTs) a
  `CLIPVisionModel`, and an open_clip tower a `CLIPVisionModel` (the layout of OpenAI CLIP:
  pre-norm, class embedding). The first adapter that holds the tower is used (`choose_tower`).
  Our feature choice maps onto LLaVA's options:
  block j's output is `hidden_states[j + 1]`, so `feature_layer` k gives `vision_feature_layer =
  (k mod L) - L`; timm's final features (`feature_layer: None`, after the last norm) are
  `hidden_states[-1]` with `tie_last_hidden_states=True` in the ViT config; `select: patch` (CLS
  dropped) is `vision_feature_select_strategy="default"`, `select: all` is `"full"`.

Why not transformers' `TimmWrapperModel` for timm towers: LLaVA reads `hidden_states
[vision_feature_layer]` as `[B, N, D]` tokens, but `TimmWrapperModel` returns timm's
`forward_intermediates` outputs, which are `[B, D, h, w]` maps without the prefix tokens, so
LLaVA's projector multiplies the wrong axis (measured: "mat1 and mat2 shapes cannot be
multiplied (128x4 and 32x32)" for a 32-wide ViT on 32x32 images). Towers no class holds (a CNN,
a ViT with register tokens or layer scale, a pre-norm ViT's final-norm features, a MoE tower), connectors other than
the depth-2 MLP (the Q-Former resampler, the MoE projector) and any second modality (Whisper +
resampler) are refused with every reason, each naming the part.

The processor: a `LlavaProcessor` over our tokenizer (same ids, chat template) and a
`CLIPImageProcessor` doing our resize-short-side / center-crop / normalize; it expands each
`<image>` into the number of tokens the tower gives (patches, +1 with the class token kept), so
its input ids are ours with every placeholder repeated M times.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.io.checkpoint import atomic_directory_write, write_manifest
from zoo.io.export.hf import ExportError, hf_target, to_hf
from zoo.models.lm import MoECausalLM
from zoo.registry import Registry

VISION_TOWERS: Registry = Registry("LLaVA vision tower")

CONNECTOR_NAMES = {"resampler": "a Q-Former-style query resampler", "moe_projector": "a language-conditioned MoE projector"}
PROJECTOR = "LLaVA's multi_modal_projector is linear -> GELU -> linear"

TIMM_WRAPPER_REASON = (
    "transformers' TimmWrapperModel would hold its weights, but its hidden_states are timm forward_intermediates "
    "feature maps [B, D, h, w] without prefix tokens, while LLaVA projects hidden_states[vision_feature_layer] "
    "as [B, N, D] tokens"
)


def _bias(layer: nn.Module) -> torch.Tensor:
    """A linear or conv layer's bias, or zeros (the transformers class always has one)."""
    if layer.bias is not None:
        return layer.bias.detach()
    return layer.weight.new_zeros(layer.weight.shape[0])


def _gelu_name(act: nn.Module) -> str | None:
    """The transformers `hidden_act` computing `act`, or None."""
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[act.approximate]
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    return None


def _layer_norm_eps(norms: list[nn.Module], where: str, out: list[str]) -> float:
    """The one eps of `norms` (all affine `nn.LayerNorm`s with a bias); appends a reason otherwise."""
    eps = set()
    for n in norms:
        if not isinstance(n, nn.LayerNorm) or not n.elementwise_affine or n.bias is None:
            out.append(f"{where}: {type(n).__name__} is not an affine LayerNorm with a bias")
            return 1e-6
        eps.add(n.eps)
    if len(eps) > 1:
        out.append(f"{where}: LayerNorms differ in eps {sorted(eps)}")
    return eps.pop() if eps else 1e-6


def _selection(layer: int, num_layers: int, select: str) -> tuple[int, str]:
    """Block `layer`'s output (any sign) as LLaVA's `(vision_feature_layer, vision_feature_select_strategy)`.

    `hidden_states` holds the embeddings then one entry per block, so block j is entry j + 1, i.e.
    `j - num_layers` from the end.
    """
    return layer % num_layers - num_layers, "full" if select == "all" else "default"


def _timm_vit_reasons(encoder: nn.Module, hf_class: str) -> list[str]:
    """Why a timm encoder is not a ViT `hf_class` can hold, apart from the pre-norm (which decides the class).

    Checked: a `VisionTransformer` with exactly one class token, learned positions over CLS +
    patches, a plain stride-patch conv, plain pre-LN `Block`s (no layer scale, no q/k norm, the
    usual scale), `Mlp`s with GELU / tanh-GELU / QuickGELU, affine LayerNorms of one eps.
    """
    from timm.layers import Attention, Mlp, PatchEmbed
    from timm.models.vision_transformer import Block, VisionTransformer

    where = f"encoders.image (timm {getattr(encoder, 'model_name', '?')})"
    vit = getattr(encoder, "model", None)
    if type(vit) is not VisionTransformer:
        return [f"{where}: {type(vit).__name__} is not a VisionTransformer, so neither ViTModel nor CLIPVisionModel "
                "can hold it; " + TIMM_WRAPPER_REASON]
    out: list[str] = []
    if vit.cls_token is None or vit.num_prefix_tokens != 1:
        out.append(f"{where}: {vit.num_prefix_tokens} prefix tokens (class/register); {hf_class} has exactly one class token")
    if getattr(vit, "no_embed_class", False) or vit.pos_embed is None:
        out.append(f"{where}: position embeddings do not cover the class token (no_embed_class / none), as {hf_class}'s do")
    if getattr(vit, "dynamic_img_size", False):
        out.append(f"{where}: dynamic_img_size; {hf_class} takes one image size")
    pe = vit.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.norm, nn.Identity) or getattr(pe, "dynamic_img_pad", False) \
            or pe.proj.kernel_size != pe.proj.stride or pe.proj.padding != (0, 0):
        out.append(f"{where}: its patch embedding is not a plain stride-patch Conv2d")
    norms = [vit.norm] + ([] if isinstance(vit.norm_pre, nn.Identity) else [vit.norm_pre])
    for i, blk in enumerate(vit.blocks):
        if type(blk) is not Block:
            out.append(f"{where}: block {i} is a {type(blk).__name__}, not a plain pre-LN Block")
            continue
        norms += [blk.norm1, blk.norm2]
        if not (isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity)):
            out.append(f"{where}: block {i} has layer scale (init_values); {hf_class} has none")
        attn = blk.attn
        if type(attn) is not Attention or not all(isinstance(getattr(attn, n, nn.Identity()), nn.Identity)
                                                   for n in ("q_norm", "k_norm", "norm")):
            out.append(f"{where}: block {i} attention has q/k norms or a scale norm ({type(attn).__name__})")
        elif not math.isclose(attn.scale, attn.head_dim ** -0.5):
            out.append(f"{where}: block {i} attention scale {attn.scale} is not head_dim**-0.5")
        mlp = blk.mlp
        if type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity) or _gelu_name(mlp.act) is None:
            out.append(f"{where}: block {i} MLP is a {type(mlp).__name__} with {type(getattr(mlp, 'act', None)).__name__}; "
                       f"{hf_class}'s is fc1 -> GELU -> fc2")
    _layer_norm_eps(norms, where, out)
    if len({blk.mlp.fc1.out_features for blk in vit.blocks if type(blk) is Block}) > 1:
        out.append(f"{where}: blocks differ in MLP width")
    return out


def _timm_blocks(vit: nn.Module, p: str, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """A timm ViT's blocks under transformers keys: `p` formats the layer prefix, `names` maps our parts to theirs."""
    s = {}
    for i, blk in enumerate(vit.blocks):
        at = p.format(i)
        q, k, v = blk.attn.qkv.weight.chunk(3)  # timm's fused qkv rows are [q; k; v]
        qb, kb, vb = _bias(blk.attn.qkv).chunk(3)
        parts = {"q": (q, qb), "k": (k, kb), "v": (v, vb), "o": (blk.attn.proj.weight, _bias(blk.attn.proj)),
                 "norm1": (blk.norm1.weight, blk.norm1.bias), "norm2": (blk.norm2.weight, blk.norm2.bias),
                 "fc1": (blk.mlp.fc1.weight, _bias(blk.mlp.fc1)), "fc2": (blk.mlp.fc2.weight, _bias(blk.mlp.fc2))}
        for part, (w, b) in parts.items():
            s[f"{at}{names[part]}.weight"] = w
            s[f"{at}{names[part]}.bias"] = b
    return s


@VISION_TOWERS.register("vit")
class TimmViT:
    """A timm `VisionTransformer` without a pre-norm as a transformers `ViTModel` (Dosovitskiy et al. 2021).

    Holds: patch conv (+bias), one class token, learned position embeddings over CLS + patches,
    pre-LN blocks (fused qkv split into q/k/v, GELU MLP), the final LayerNorm (timm's final
    features are `hidden_states[-1]` through `tie_last_hidden_states`). ViTModel has no pre-norm
    (`CLIPVisionModel` takes those towers), no register tokens, no layer scale and no q/k norm.
    The pooler (unused by LLaVA) is written as zeros.
    """

    hf_class = "ViTModel"
    encoder_kind = "timm"

    def reasons(self, encoder: nn.Module) -> list[str]:
        out = _timm_vit_reasons(encoder, self.hf_class)
        vit = encoder.model
        if not out and not isinstance(vit.norm_pre, nn.Identity):
            out.append(f"encoders.image (timm {encoder.model_name}): pre_norm (a norm_pre {type(vit.norm_pre).__name__}); "
                       "ViTModel has no pre-norm")
        return out

    def config(self, encoder: nn.Module):
        from transformers import ViTConfig

        vit = encoder.model
        blk = vit.blocks[0]
        return ViTConfig(
            hidden_size=vit.embed_dim,
            num_hidden_layers=len(vit.blocks),
            num_attention_heads=blk.attn.num_heads,
            intermediate_size=blk.mlp.fc1.out_features,
            hidden_act=_gelu_name(blk.mlp.act),
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            layer_norm_eps=vit.norm.eps,
            image_size=encoder.image_size[0],
            patch_size=vit.patch_embed.proj.kernel_size[0],
            num_channels=vit.patch_embed.proj.in_channels,
            qkv_bias=blk.attn.qkv.bias is not None,
            # timm's final features (after the last norm) are ViTModel's last_hidden_state: tie it in.
            tie_last_hidden_states=encoder.feature_layer is None,
        )

    def state_dict(self, encoder: nn.Module) -> dict[str, torch.Tensor]:
        vit = encoder.model
        pe = vit.patch_embed.proj
        d = vit.embed_dim
        s = {
            "embeddings.cls_token": vit.cls_token,
            "embeddings.position_embeddings": vit.pos_embed,
            "embeddings.patch_embeddings.projection.weight": pe.weight,
            "embeddings.patch_embeddings.projection.bias": _bias(pe),
            "layernorm.weight": vit.norm.weight,
            "layernorm.bias": vit.norm.bias,
            "pooler.dense.weight": vit.norm.weight.new_zeros(d, d),  # LLaVA never runs the pooler
            "pooler.dense.bias": vit.norm.weight.new_zeros(d),
        }
        s |= _timm_blocks(vit, "layers.{}.", {
            "q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "o": "attention.o_proj",
            "norm1": "layernorm_before", "norm2": "layernorm_after", "fc1": "mlp.fc1", "fc2": "mlp.fc2"})
        if vit.blocks[0].attn.qkv.bias is None:  # qkv_bias=False: ViTModel has no q/k/v biases either
            s = {k: v for k, v in s.items() if not (k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")))}
        return {k: v.detach() for k, v in s.items()}

    def selection(self, encoder: nn.Module) -> tuple[int, str]:
        if encoder.feature_layer is None:  # the final norm's output: hidden_states[-1], tied
            return -1, "full" if encoder.select == "all" else "default"
        return _selection(encoder.feature_layer, len(encoder.model.blocks), encoder.select)


_CLIP_KEYS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
              "norm1": "layer_norm1", "norm2": "layer_norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


@VISION_TOWERS.register("timm_clip")
class TimmClipViT:
    """A timm `VisionTransformer` with a pre-norm (`pre_norm=True`, timm's CLIP ViTs) as a `CLIPVisionModel`.

    Holds what `ViTModel` would plus `norm_pre` as CLIP's `pre_layrnorm`; a patch-conv bias (CLIP's
    conv has none) is folded into the patch positions' embeddings, which add to the same tokens.
    timm's final norm becomes CLIP's `post_layernorm`, which transformers applies to the pooled
    class token only, so the final features (`feature_layer: None`) are refused; any block's output
    (`feature_layer: -1` for the last) maps.
    """

    hf_class = "CLIPVisionModel"
    encoder_kind = "timm"

    def reasons(self, encoder: nn.Module) -> list[str]:
        out = _timm_vit_reasons(encoder, self.hf_class)
        if out:
            return out
        where = f"encoders.image (timm {encoder.model_name})"
        vit = encoder.model
        if isinstance(vit.norm_pre, nn.Identity):
            out.append(f"{where}: no pre-norm; CLIPVisionModel always applies pre_layrnorm")
        if encoder.feature_layer is None and not isinstance(vit.norm, nn.Identity):
            out.append(f"{where}: feature_layer None takes the features after timm's final norm, which CLIPVisionModel "
                       "applies to the pooled class token only (feature_layer -1 takes the last block's output)")
        return out

    def config(self, encoder: nn.Module):
        from transformers import CLIPVisionConfig

        vit = encoder.model
        blk = vit.blocks[0]
        return CLIPVisionConfig(
            hidden_size=vit.embed_dim,
            intermediate_size=blk.mlp.fc1.out_features,
            num_hidden_layers=len(vit.blocks),
            num_attention_heads=blk.attn.num_heads,
            num_channels=vit.patch_embed.proj.in_channels,
            image_size=encoder.image_size[0],
            patch_size=vit.patch_embed.proj.kernel_size[0],
            hidden_act=_gelu_name(blk.mlp.act),
            layer_norm_eps=vit.norm_pre.eps,
            attention_dropout=0.0,
        )

    def state_dict(self, encoder: nn.Module) -> dict[str, torch.Tensor]:
        vit = encoder.model
        pos = vit.pos_embed[0].detach().clone()  # [1 + N, D]
        pos[1:] += _bias(vit.patch_embed.proj)  # conv bias -> the patch positions (CLS gets none in timm)
        s = {
            "embeddings.class_embedding": vit.cls_token[0, 0],
            "embeddings.patch_embedding.weight": vit.patch_embed.proj.weight,
            "embeddings.position_embedding.weight": pos,
            "pre_layrnorm.weight": vit.norm_pre.weight, "pre_layrnorm.bias": vit.norm_pre.bias,
            "post_layernorm.weight": vit.norm.weight, "post_layernorm.bias": vit.norm.bias,
        }
        s |= _timm_blocks(vit, "encoder.layers.{}.", _CLIP_KEYS)
        return {k: v.detach() for k, v in s.items()}

    def selection(self, encoder: nn.Module) -> tuple[int, str]:
        return _selection(encoder.feature_layer, len(encoder.model.blocks), encoder.select)


@VISION_TOWERS.register("clip_vision")
class OpenClipViT:
    """An open_clip visual tower as a transformers `CLIPVisionModel` (Radford et al. 2021).

    Holds: bias-free patch conv, class embedding, learned position embeddings, `ln_pre`, pre-LN
    blocks (`nn.MultiheadAttention`'s packed in_proj split into q/k/v; GELU or QuickGELU MLP),
    `ln_post` (CLIP's post_layernorm, which LLaVA's hidden states never pass). A tower without
    `ln_pre`, with layer scale, a custom (q/k-normed) block or non-learned positions is refused.
    """

    hf_class = "CLIPVisionModel"
    encoder_kind = "open_clip"

    def reasons(self, encoder: nn.Module) -> list[str]:
        where = f"encoders.image (open_clip {getattr(encoder, 'model_name', '?')})"
        v = getattr(encoder, "model", None)
        if type(v).__name__ != "VisionTransformer" or not hasattr(v, "conv1"):
            return [f"{where}: {type(v).__name__} is not open_clip's VisionTransformer"]
        out: list[str] = []
        if v.conv1.bias is not None:
            out.append(f"{where}: its patch conv has a bias; CLIP's has none")
        if not isinstance(v.ln_pre, nn.LayerNorm):
            out.append(f"{where}: no ln_pre (no_ln_pre); CLIPVisionModel always applies pre_layrnorm")
        grid = v.conv1.weight.shape[0]
        if not isinstance(getattr(v, "positional_embedding", None), nn.Parameter) or v.positional_embedding.shape[-1] != grid:
            out.append(f"{where}: its position embedding is not learned (pos_embed_type); CLIP's is")
        norms = [v.ln_pre, v.ln_post]
        for i, blk in enumerate(v.transformer.resblocks):
            if type(blk).__name__ != "ResidualAttentionBlock" or hasattr(blk, "ln_1_kv"):
                out.append(f"{where}: block {i} is a {type(blk).__name__} (q/k norms, scaled attention, cross attention)")
                continue
            norms += [blk.ln_1, blk.ln_2]
            if not (isinstance(blk.ls_1, nn.Identity) and isinstance(blk.ls_2, nn.Identity)):
                out.append(f"{where}: block {i} has layer scale (ls_init_value); CLIP has none")
            attn = blk.attn
            if not attn._qkv_same_embed_dim or attn.in_proj_bias is None or attn.bias_k is not None:
                out.append(f"{where}: block {i} attention is not a packed-in_proj MultiheadAttention with biases")
            if _gelu_name(blk.mlp.gelu) not in ("gelu", "quick_gelu"):
                out.append(f"{where}: block {i} MLP activation {type(blk.mlp.gelu).__name__} is not GELU or QuickGELU")
        _layer_norm_eps(norms, where, out)
        return out

    def config(self, encoder: nn.Module):
        from transformers import CLIPVisionConfig

        v = encoder.model
        blk = v.transformer.resblocks[0]
        return CLIPVisionConfig(
            hidden_size=v.transformer.width,
            intermediate_size=blk.mlp.c_fc.out_features,
            num_hidden_layers=len(v.transformer.resblocks),
            num_attention_heads=blk.attn.num_heads,
            num_channels=v.conv1.in_channels,
            image_size=encoder.image_size[0],
            patch_size=v.conv1.kernel_size[0],
            hidden_act=_gelu_name(blk.mlp.gelu),
            layer_norm_eps=v.ln_pre.eps,
            attention_dropout=0.0,
        )

    def state_dict(self, encoder: nn.Module) -> dict[str, torch.Tensor]:
        v = encoder.model
        s = {
            "embeddings.class_embedding": v.class_embedding,
            "embeddings.patch_embedding.weight": v.conv1.weight,
            "embeddings.position_embedding.weight": v.positional_embedding,
            "pre_layrnorm.weight": v.ln_pre.weight, "pre_layrnorm.bias": v.ln_pre.bias,
            "post_layernorm.weight": v.ln_post.weight, "post_layernorm.bias": v.ln_post.bias,
        }
        for i, blk in enumerate(v.transformer.resblocks):
            p = f"encoder.layers.{i}."
            q, k, w = blk.attn.in_proj_weight.chunk(3)  # MultiheadAttention packs [q; k; v]
            qb, kb, wb = blk.attn.in_proj_bias.chunk(3)
            s |= {
                p + "self_attn.q_proj.weight": q, p + "self_attn.q_proj.bias": qb,
                p + "self_attn.k_proj.weight": k, p + "self_attn.k_proj.bias": kb,
                p + "self_attn.v_proj.weight": w, p + "self_attn.v_proj.bias": wb,
                p + "self_attn.out_proj.weight": blk.attn.out_proj.weight, p + "self_attn.out_proj.bias": blk.attn.out_proj.bias,
                p + "layer_norm1.weight": blk.ln_1.weight, p + "layer_norm1.bias": blk.ln_1.bias,
                p + "layer_norm2.weight": blk.ln_2.weight, p + "layer_norm2.bias": blk.ln_2.bias,
                p + "mlp.fc1.weight": blk.mlp.c_fc.weight, p + "mlp.fc1.bias": blk.mlp.c_fc.bias,
                p + "mlp.fc2.weight": blk.mlp.c_proj.weight, p + "mlp.fc2.bias": blk.mlp.c_proj.bias,
            }
        return {k: t.detach() for k, t in s.items()}

    def selection(self, encoder: nn.Module) -> tuple[int, str]:
        return _selection(encoder.feature_layer, len(encoder.model.transformer.resblocks), encoder.select)


def choose_tower(encoder: nn.Module, kind: str):
    """`(the first VISION_TOWERS adapter that holds the encoder, [])`, or `(None, every adapter's reasons)`."""
    towers = [t for t in (VISION_TOWERS.build(n) for n in VISION_TOWERS.names()) if t.encoder_kind == kind]
    if not towers:
        kinds = sorted({VISION_TOWERS.build(n).encoder_kind for n in VISION_TOWERS.names()})
        return None, [f"encoders.image: a {kind} encoder; LLaVA-native towers exist for {kinds} encoders"]
    reasons: list[str] = []
    for tower in towers:
        why = tower.reasons(encoder)
        if not why:
            return tower, []
        reasons += why
    return None, list(dict.fromkeys(reasons))


def _language_model(model: nn.Module) -> tuple[nn.Module | None, list[str]]:
    """(the transformers causal LM LLaVA's language_model + lm_head come from, reasons it cannot be)."""
    from transformers import PreTrainedModel

    lm = model.language_model
    if isinstance(lm, MoECausalLM):
        try:
            hf_target(lm)
        except ExportError as e:
            return None, [f"language_model: {e}"]
        return lm, []
    if not isinstance(lm, PreTrainedModel) or lm.get_output_embeddings() is None:
        return None, [f"language_model: a {type(lm).__name__}, not a plain transformers causal LM (adapters not merged?)"]
    return lm, []


def llava_blockers(model: nn.Module, model_config: Any) -> list[str]:
    """Every reason `model` cannot be a `LlavaForConditionalGeneration`, each naming the part ([] if it can).

    Args:
        model: the `MultimodalMoE`.
        model_config: its `zoo.models.ModelConfig`.
    """
    out: list[str] = []
    encoders = dict(model_config.encoders)
    for modality in sorted(set(encoders) - {"image"}):
        enc, con = encoders[modality], model_config.connectors[modality]
        out.append(f"encoders.{modality}: a {enc.kind} {modality} encoder with a {con.kind} connector "
                   f"({CONNECTOR_NAMES.get(con.kind, con.kind)}); LLaVA has a vision tower only")
    if "image" not in encoders:
        out.append("the model has no image encoder; LLaVA needs exactly one vision tower")
    else:
        enc, con = encoders["image"], model_config.connectors["image"]
        if enc.moe is not None:
            out.append(f"encoders.image: a MoE vision tower (encoders.image.moe, {enc.moe.num_experts} experts); "
                       "transformers' vision towers (ViTModel, CLIPVisionModel, TimmWrapperModel) have dense MLPs")
        else:
            out += choose_tower(model.encoders["image"], enc.kind)[1]
        if con.kind != "mlp":
            out.append(f"connectors.image: {CONNECTOR_NAMES.get(con.kind, 'a ' + con.kind + ' connector')}; {PROJECTOR}")
        else:
            net = model.connectors["image"].net
            if len(net) != 3 or _gelu_name(net[1]) != "gelu":
                out.append(f"connectors.image: an mlp of depth {(len(net) + 1) // 2}; {PROJECTOR} (depth 2)")
            if getattr(model.connectors["image"], "stride", 1) != 1:
                out.append(f"connectors.image: an mlp that stacks {model.connectors['image'].stride} tokens into one; "
                           f"{PROJECTOR} (one LM token per vision token)")
    if model_config.adapters:
        out.append(f"adapters: {[a.kind for a in model_config.adapters]} are not merged into the LM; "
                   "LLaVA's language_model is a plain transformers model")
    else:
        out += _language_model(model)[1]
    return out


def llava_blocker(model: nn.Module, model_config: Any) -> str | None:
    """`llava_blockers` as one sentence, or None when the model can be exported as LLaVA."""
    reasons = llava_blockers(model, model_config)
    return "; ".join(reasons) if reasons else None


def _refuse(model: nn.Module, model_config: Any) -> None:
    reasons = llava_blockers(model, model_config)
    if reasons:
        raise ExportError(
            "cannot export as LlavaForConditionalGeneration: " + "; ".join(reasons)
            + ". Use --format hf: the LM in transformers format plus the encoder and connector weights in safetensors files"
        )


def image_tokens(encoder: nn.Module) -> int:
    """M, the LM tokens one image becomes (the encoder's token count: patches, +1 if the class token is kept)."""
    with torch.no_grad():
        return int(encoder(next(encoder.parameters()).new_zeros(1, 3, *encoder.image_size)).shape[1])


def to_llava(model: nn.Module, model_config: Any):
    """Build the `LlavaForConditionalGeneration` holding `model`'s weights (same dtype, on CPU, eval mode).

    Raises:
        ExportError: naming every part LLaVA cannot hold (see `llava_blockers`).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    _refuse(model, model_config)
    encoder = model.encoders["image"]
    tower, _ = choose_tower(encoder, model_config.encoders["image"].kind)
    layer, strategy = tower.selection(encoder)
    lm, _ = _language_model(model)
    hf_lm = to_hf(lm) if isinstance(lm, MoECausalLM) else lm
    text_config = hf_lm.config
    dtype = next(model.parameters()).dtype
    tokens = image_tokens(encoder)
    vision_config = tower.config(encoder)
    grid = (vision_config.image_size // vision_config.patch_size) ** 2
    if tokens != grid + 1 - (strategy == "default"):  # what LlavaProcessor will write per <image>
        raise ExportError(f"encoders.image gives {tokens} tokens per image, but LLaVA's processor would write "
                          f"{grid + 1 - (strategy == 'default')} (patches {grid}, strategy {strategy!r})")
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=model_config.image_token_id,
        image_seq_length=tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    with warnings.catch_warnings():  # a zero-width shared expert is intended
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        llava = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    net = model.connectors["image"].net
    state = {f"model.vision_tower.{k}": v for k, v in tower.state_dict(encoder).items()}
    for name, linear in (("linear_1", net[0]), ("linear_2", net[2])):  # net[1] is the GELU
        state[f"model.multi_modal_projector.{name}.weight"] = linear.weight
        state[f"model.multi_modal_projector.{name}.bias"] = linear.bias
    prefix = hf_lm.base_model_prefix + "."
    for k, v in hf_lm.state_dict().items():
        state["model.language_model." + k[len(prefix):] if k.startswith(prefix) else k] = v
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    want = set(llava.state_dict())
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise ExportError(
            f"weights do not map onto LlavaForConditionalGeneration: missing {missing[:6]}, unexpected {unexpected[:6]}")
    llava.load_state_dict(state, strict=True)
    return llava.eval()


def to_llava_processor(processor: Any, llava: nn.Module):
    """A `LlavaProcessor` with our tokenizer and chat template and our image transform as a `CLIPImageProcessor`.

    Our `ImageProcessor` resizes the short side to `floor(S / crop_pct)`, center-crops S x S, scales
    to [0, 1] and normalizes; `CLIPImageProcessor` does the same steps, on uint8 pixels. An S x S
    image passes through both unchanged; a resized one differs by the resampling on uint8 (measured
    up to 7.8/255 on a noise image), and where the scaled long side has a fraction >= 0.5 ours
    rounds it up while CLIPImageProcessor (like torchvision and timm) floors it, so the crop is
    resampled one pixel wider (120 x 160 -> 32 x 43 vs 32 x 42). Input ids are identical.
    """
    from transformers import CLIPImageProcessor, LlavaProcessor
    from transformers.image_utils import PILImageResampling

    from zoo.tokenizer import IMAGE

    ip = processor.image_processor
    vision = llava.config.vision_config
    resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}
    if ip.interpolation not in resample:
        raise ExportError(f"image interpolation {ip.interpolation!r} has no CLIPImageProcessor resample; known: {sorted(resample)}")
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": int(math.floor(ip.image_size / ip.crop_pct))},
        resample=resample[ip.interpolation],
        do_center_crop=True,
        crop_size={"height": ip.image_size, "width": ip.image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(ip.mean),
        image_std=list(ip.std),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
        chat_template=processor.tokenizer.chat_template,
        image_token=IMAGE,
        num_additional_image_tokens=1,  # the class token both towers prepend
    )


def expand_image_tokens(input_ids: torch.Tensor, image_token_id: int, num_tokens: int) -> torch.Tensor:
    """Our ids `[1, S]` with each `<image>` repeated `num_tokens` times: what LLaVA's processor writes."""
    row = []
    for t in input_ids[0].tolist():
        row += [t] * (num_tokens if t == image_token_id else 1)
    return torch.tensor([row], dtype=input_ids.dtype, device=input_ids.device)


def check_llava_parity(model: nn.Module, llava: nn.Module, *, text_len: int = 12, seed: int = 0) -> float:
    """Run both models on one prompt holding two random images; raise `ExportError` if the logits differ.

    Tolerance as `check_parity`: 1e-4 relative to the logits' scale in float32/float64, 2e-2 in half.

    Returns:
        The largest absolute logit difference.
    """
    cfg = llava.config
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    images = torch.randn(2, 3, *model.encoders["image"].image_size, generator=g).to(device, dtype)
    image_id = cfg.image_token_id
    words = torch.tensor([i for i in range(cfg.text_config.vocab_size) if i not in model.placeholder_ids.values()])
    text = words[torch.randint(0, len(words), (1, text_len), generator=g)]  # no placeholder among the text
    ids = torch.cat([text[:, :3], torch.tensor([[image_id]]), text[:, 3:8], torch.tensor([[image_id]]), text[:, 8:]], 1)
    ids = ids.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(ids, images=images).logits.float()
            got = llava.to(device)(input_ids=expand_image_tokens(ids, image_id, cfg.image_seq_length),
                                   pixel_values=images).logits.float()
    finally:
        model.train(was_training)
    if ref.shape != got.shape:
        raise ExportError(f"LLaVA spliced {got.shape[1]} positions where the zoo model has {ref.shape[1]} "
                          f"(image_seq_length {cfg.image_seq_length})")
    diff = (ref - got).abs().max().item()
    rel = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    tol = rel * max(1.0, ref.abs().max().item())
    if not diff <= tol:
        raise ExportError(f"exported LlavaForConditionalGeneration disagrees with the zoo model: max |logit diff| {diff:.3g} > {tol:.3g}")
    return diff


_README = """\
# {name}: LLaVA-native export of a moe-zoo model

Written by `zoo export --format llava` (moe-zoo {zoo_version}). Every file's sha256 is in `manifest.json`.
Loads with plain transformers, no moe-zoo needed:

```python
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained(path)
processor = AutoProcessor.from_pretrained(path)
```

| part | transformers class | from the zoo model |
|---|---|---|
| `model.vision_tower` | `{tower_class}` | `encoders.image` ({encoder}) |
| `model.multi_modal_projector` | linear -> GELU -> linear | `connectors.image` (mlp, depth 2) |
| `model.language_model` + `lm_head` | `{lm_class}` | the language model |
| processor | `LlavaProcessor` + `CLIPImageProcessor` | our tokenizer, chat template and image transform |

Image features: `vision_feature_layer={layer}`, `vision_feature_select_strategy="{strategy}"`; each
`<image>` (id {image_id}) becomes {tokens} tokens. `moe_zoo.json` holds the moe-zoo `ModelConfig`.
"""


def export_llava(
    model: nn.Module,
    processor: Any,
    model_config: Any,
    directory: str | os.PathLike,
    *,
    name: str | None = None,
    card_text: str | None = None,
    verify: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a `MultimodalMoE` as a `LlavaForConditionalGeneration` + `LlavaProcessor` directory, atomically.

    Layout: what `save_pretrained` of the model and the processor write (config, safetensors,
    tokenizer, processor config, chat template), `moe_zoo.json` (the `ModelConfig`), `README.md`,
    `MODEL_CARD.md` (when `card_text` is given) and `manifest.json`.

    Args:
        model: the `zoo.models.MultimodalMoE`.
        processor: its `zoo.processor.MultimodalProcessor`.
        model_config: its `zoo.models.ModelConfig`.
        directory: output path; must not exist unless `overwrite`.
        name: the model's name for the README (default: the config's).
        card_text: the model card to copy in as `MODEL_CARD.md`.
        verify: compare the logits of both models on a prompt with two images before writing.
        overwrite: replace an existing directory.

    Raises:
        ExportError: a part LLaVA cannot hold (every reason, each naming the part), or a parity failure.
    """
    import zoo

    llava = to_llava(model, model_config)
    if verify:
        check_llava_parity(model, llava)
    llava_processor = to_llava_processor(processor, llava)
    cfg = llava.config
    enc = model_config.encoders["image"]

    def write(tmp: Path) -> None:
        llava.save_pretrained(tmp)
        llava_processor.save_pretrained(tmp)
        meta = {"format": "moe-zoo-llava-export", "format_version": 1, "model": model_config.to_dict()}
        (tmp / "moe_zoo.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if card_text is not None:
            (tmp / "MODEL_CARD.md").write_text(card_text, encoding="utf-8")
        readme = _README.format(
            name=name or model_config.name, zoo_version=zoo.__version__,
            tower_class=type(llava.model.vision_tower).__name__,
            encoder=f"{enc.kind}{': ' + enc.name if enc.name else ''}",
            lm_class=type(llava.model.language_model).__name__,
            layer=cfg.vision_feature_layer, strategy=cfg.vision_feature_select_strategy,
            image_id=cfg.image_token_id, tokens=cfg.image_seq_length)
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        write_manifest(tmp)

    return atomic_directory_write(directory, write, overwrite=overwrite)


__all__ = ["TIMM_WRAPPER_REASON", "VISION_TOWERS", "check_llava_parity", "choose_tower", "expand_image_tokens", "export_llava",
           "image_tokens", "llava_blocker", "llava_blockers", "to_llava", "to_llava_processor"]
