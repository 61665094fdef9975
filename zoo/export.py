"""HF-native export: an `MoECausalLM` as a plain transformers `MixtralForCausalLM` or `Qwen2MoeForCausalLM`.

The exported directory loads with `AutoModelForCausalLM.from_pretrained(dir)` and no zoo import,
and gives the zoo model's logits. Which class is used:

- **Mixtral**: every decoder layer is MoE, no shared expert, renormalized top-k
  (`norm_topk_prob=True`), attention without biases (Llama/Mistral base).
- **Qwen2-MoE**: everything else it can hold: shared experts gated by a sigmoid, top-k with or
  without renormalization, MoE in only some layers (`mlp_only_layers`), q/k/v biases (Qwen2 base)
  or none. A model without a shared expert gets a zero-width one, which adds exactly 0.

Anything neither class can represent (an o_proj bias, a non-top-k router, non-SwiGLU or LoRA
experts, experts of different widths, another attention variant) is refused with the reasons.
The weights are moved into the transformers model in memory and written by its own
`save_pretrained` (which in transformers 5 writes per-expert keys and fuses them on load), and by
default the export is checked by running both models on a probe sequence.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.checkpoint import atomic_directory_write, check_extra_name, copy_extra_file, write_manifest
from zoo.lm import MoEBlock, MoECausalLM, decoder_layers
from zoo.moe.experts import SwiGLU, SwiGLUExperts
from zoo.moe.layer import SparseMoE
from zoo.moe.router import TopKRouter

TARGETS = ("mixtral", "qwen2_moe")
_BASES = ("llama", "mistral", "qwen2")
# Fields copied unchanged from the base LM config to either target config.
_COMMON_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "attention_dropout",
    "rope_parameters",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


class ExportError(ValueError):
    """The model cannot be written as the requested (or any) transformers MoE class."""


def _bias_kind(attn: nn.Module) -> str:
    """'none', 'qkv' (Qwen2) or 'all' (Llama attention_bias) for an attention module."""
    has = {n: getattr(getattr(attn, n, None), "bias", None) is not None for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if has["o_proj"]:
        return "all"
    if any(has.values()):
        return "qkv" if all(has[n] for n in ("q_proj", "k_proj", "v_proj")) else "mixed"
    return "none"


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _inspect(model: MoECausalLM) -> dict[str, Any]:
    """What the export needs to know about the model, plus the blockers common to both targets."""
    cfg = model.lm.config
    layers = decoder_layers(model.lm)
    moes = model.moe_layers()
    info: dict[str, Any] = {"blockers": [], "moe_layers": sorted(moes), "num_layers": len(layers)}
    blockers = info["blockers"]
    if cfg.model_type not in _BASES:
        blockers.append(f"base model type {cfg.model_type!r} is not one of {_BASES}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        blockers.append(f"hidden_act is {cfg.hidden_act!r}, the MoE classes use 'silu'")
    if not moes:
        blockers.append("the model has no MoE layers")
    kinds = {_bias_kind(layer.self_attn) for layer in layers}
    info["bias"] = kinds.pop() if len(kinds) == 1 else "mixed"
    if info["bias"] in ("all", "mixed"):
        blockers.append(f"attention biases ({info['bias']}) are not representable (o_proj has no bias in either class)")

    expert_sizes, shared_sizes, top_ks, norms = set(), set(), set(), set()
    info["shared_without_gate"] = False
    for i, moe in moes.items():
        if not isinstance(moe, SparseMoE) or type(moe.router) is not TopKRouter:
            blockers.append(f"layer {i}: router {type(getattr(moe, 'router', None)).__name__} is not the top-k softmax router")
            continue
        if type(moe.experts) is not SwiGLUExperts:
            blockers.append(f"layer {i}: experts are {type(moe.experts).__name__}, not plain SwiGLUExperts")
            continue
        expert_sizes.add(moe.experts.intermediate_size)
        top_ks.add(moe.router.top_k)
        norms.add(moe.router.norm_topk_prob)
        if moe.experts.num_experts != model.moe_config.num_experts:
            blockers.append(f"layer {i}: {moe.experts.num_experts} experts, the config says {model.moe_config.num_experts}")
        if moe.shared_expert is None:
            shared_sizes.add(0)
        elif type(moe.shared_expert) is not SwiGLU or any(
            getattr(moe.shared_expert, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")
        ):
            blockers.append(f"layer {i}: shared expert {type(moe.shared_expert).__name__} is not a bias-free SwiGLU")
        else:
            shared_sizes.add(moe.shared_expert.gate_proj.out_features)
            gate = moe.shared_expert_gate
            if gate is None:
                info["shared_without_gate"] = True
            elif not isinstance(gate, nn.Linear) or gate.bias is not None or gate.out_features != 1:
                blockers.append(f"layer {i}: shared_expert_gate is not a bias-free Linear(d, 1)")
    for name, values in (("expert width", expert_sizes), ("shared expert width", shared_sizes), ("top_k", top_ks),
                         ("norm_topk_prob", norms)):
        if len(values) > 1:
            blockers.append(f"MoE layers differ in {name}: {sorted(values)}")
    info["expert_size"] = min(expert_sizes) if expert_sizes else 0
    info["shared_size"] = min(shared_sizes) if shared_sizes else 0
    info["top_k"] = min(top_ks) if top_ks else model.moe_config.top_k
    info["norm_topk_prob"] = norms.pop() if len(norms) == 1 else model.moe_config.norm_topk_prob

    dense = [i for i in range(len(layers)) if i not in moes]
    info["dense_layers"] = dense
    dense_sizes = set()
    for i in dense:
        mlp = layers[i].mlp
        if isinstance(mlp, MoEBlock) or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            blockers.append(f"layer {i}: dense mlp {type(mlp).__name__} is not a gated SwiGLU MLP")
        elif any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
            blockers.append(f"layer {i}: dense mlp has biases (mlp_bias), which Qwen2-MoE's MLP has not")
        else:
            dense_sizes.add(mlp.gate_proj.out_features)
    if len(dense_sizes) > 1:
        blockers.append(f"dense layers differ in width: {sorted(dense_sizes)}")
    info["dense_size"] = dense_sizes.pop() if len(dense_sizes) == 1 else getattr(cfg, "intermediate_size", 0)
    return info


def _reasons(model: MoECausalLM, target: str, info: dict[str, Any]) -> list[str]:
    """Why `model` cannot be exported as `target` (empty when it can)."""
    cfg = model.lm.config
    reasons = list(info["blockers"])
    if target == "mixtral":
        if info["dense_layers"]:
            reasons.append(f"Mixtral needs every layer MoE; layers {info['dense_layers']} are dense")
        if info["shared_size"]:
            reasons.append("Mixtral has no shared expert")
        if not info["norm_topk_prob"]:
            reasons.append("Mixtral always renormalizes the top-k weights (norm_topk_prob=False here)")
        if info["bias"] != "none":
            reasons.append(f"Mixtral attention has no biases (this model: {info['bias']})")
    elif target == "qwen2_moe":
        if info["shared_without_gate"]:
            reasons.append("Qwen2-MoE gates its shared expert with sigmoid(shared_expert_gate); this one has no gate")
        if _head_dim(cfg) != cfg.hidden_size // cfg.num_attention_heads:
            reasons.append(f"Qwen2-MoE derives head_dim from hidden_size/heads; this model uses head_dim={_head_dim(cfg)}")
        if getattr(cfg, "sliding_window", None) is not None and cfg.model_type == "llama":
            reasons.append("unexpected sliding_window on a Llama config")
    else:
        raise ExportError(f"unknown export target {target!r}; known targets: {TARGETS}")
    return reasons


def hf_target(model: MoECausalLM) -> str:
    """The transformers class family that represents `model`: 'mixtral' if it can, else 'qwen2_moe'.

    Raises:
        ExportError: listing why each target cannot hold the model.
    """
    if not isinstance(model, MoECausalLM):
        raise ExportError(f"expected an MoECausalLM, got {type(model).__name__}")
    info = _inspect(model)
    why = {t: _reasons(model, t, info) for t in TARGETS}
    for t in TARGETS:
        if not why[t]:
            return t
    detail = "; ".join(f"{t}: " + ", ".join(dict.fromkeys(r)) for t, r in why.items())
    raise ExportError(f"neither MixtralForCausalLM nor Qwen2MoeForCausalLM can represent this model ({detail})")


def _target_config(model: MoECausalLM, target: str, info: dict[str, Any]):
    from transformers import MixtralConfig, Qwen2MoeConfig

    src = model.lm.config
    moe = model.moe_config
    common = {k: getattr(src, k) for k in _COMMON_FIELDS if hasattr(src, k)}
    common["hidden_act"] = "silu"
    if target == "mixtral":
        return MixtralConfig(
            **common,
            head_dim=_head_dim(src),
            intermediate_size=info["expert_size"],
            num_local_experts=moe.num_experts,
            num_experts_per_tok=info["top_k"],
            router_aux_loss_coef=moe.aux_loss_coef,
            router_jitter_noise=moe.jitter_noise,
            sliding_window=getattr(src, "sliding_window", None),
        )
    window: dict[str, Any] = {}
    if src.model_type == "qwen2":
        window = {k: getattr(src, k) for k in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")}
    elif getattr(src, "sliding_window", None) is not None:  # Mistral: every layer slides
        window = {"use_sliding_window": True, "sliding_window": src.sliding_window, "max_window_layers": 0,
                  "layer_types": ["sliding_attention"] * info["num_layers"]}
    return Qwen2MoeConfig(
        **common,
        **window,
        intermediate_size=info["dense_size"],
        moe_intermediate_size=info["expert_size"],
        shared_expert_intermediate_size=info["shared_size"],
        num_experts=moe.num_experts,
        num_experts_per_tok=info["top_k"],
        norm_topk_prob=info["norm_topk_prob"],
        router_aux_loss_coef=moe.aux_loss_coef,
        decoder_sparse_step=1,
        mlp_only_layers=info["dense_layers"],
        qkv_bias=info["bias"] == "qkv",
    )


def _rename(key: str) -> str:
    """zoo key (inside `MoECausalLM.lm`) -> transformers MoE key."""
    return key.replace(".mlp.moe.router.", ".mlp.gate.").replace(".mlp.moe.", ".mlp.")


def to_hf(model: MoECausalLM, target: str | None = None) -> nn.Module:
    """Build the transformers MoE model holding `model`'s weights (same device and dtype).

    Args:
        model: the zoo model.
        target: 'mixtral' or 'qwen2_moe'; default: `hf_target(model)`.

    Returns:
        A `MixtralForCausalLM` or `Qwen2MoeForCausalLM` in eval mode.
    """
    from transformers import AutoModelForCausalLM

    if not isinstance(model, MoECausalLM):
        raise ExportError(f"expected an MoECausalLM, got {type(model).__name__}")
    target = target or hf_target(model)
    info = _inspect(model)
    reasons = _reasons(model, target, info)
    if reasons:
        raise ExportError(f"cannot export as {target}: " + "; ".join(dict.fromkeys(reasons)))
    param = next(model.parameters())
    with warnings.catch_warnings():  # a zero-width shared expert is intended
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        hf = AutoModelForCausalLM.from_config(_target_config(model, target, info), dtype=param.dtype)
    state = {_rename(k): v for k, v in model.lm.state_dict().items()}
    hf_keys = set(hf.state_dict())
    missing = sorted(hf_keys - set(state))
    if target == "qwen2_moe" and info["shared_size"] == 0:  # zero-width shared expert: adds exactly 0
        for i in info["moe_layers"]:
            state[f"model.layers.{i}.mlp.shared_expert_gate.weight"] = torch.zeros(1, model.lm.config.hidden_size, dtype=param.dtype)
        missing = sorted(hf_keys - set(state))
        missing = [k for k in missing if ".mlp.shared_expert." not in k]
    unexpected = sorted(set(state) - hf_keys)
    if missing or unexpected:
        raise ExportError(
            f"weights do not map onto {type(hf).__name__}: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    hf.load_state_dict(state, strict=False)
    return hf.to(param.device).eval()


def check_parity(model: MoECausalLM, hf: nn.Module, *, seq_len: int = 16, seed: int = 0) -> float:
    """Run both models on one random sequence; raise `ExportError` if the logits differ.

    Tolerance: 1e-4 relative to the logits' scale in float32/float64, 2e-2 in half precision
    (the two compute the same function with a different expert summation order).

    Returns:
        The largest absolute logit difference.
    """
    cfg = model.lm.config
    n = min(seq_len, getattr(cfg, "max_position_embeddings", seq_len))
    device = next(model.parameters()).device
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed)).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(ids).logits.float()
            got = hf(ids).logits.float()
    finally:
        model.train(was_training)
    diff = (ref - got).abs().max().item()
    dtype = next(model.parameters()).dtype
    rel = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    tol = rel * max(1.0, ref.abs().max().item())
    if not diff <= tol:
        raise ExportError(f"exported {type(hf).__name__} disagrees with the zoo model: max |logit diff| {diff:.3g} > {tol:.3g}")
    return diff


def export_hf(
    model: MoECausalLM,
    directory: str | os.PathLike,
    *,
    target: str | None = None,
    extra_files: Mapping[str, str | os.PathLike | bytes] | None = None,
    verify: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a transformers MoE checkpoint directory, atomically.

    The directory holds `config.json`, `generation_config.json`, safetensors weights written by
    transformers' `save_pretrained`, the extra files (e.g. tokenizer files, `README.md`) and a
    `manifest.json` with the sha256 of every file (`zoo.checkpoint.verify_checkpoint` checks it;
    transformers ignores it).

    Args:
        model: the zoo model.
        directory: output path; must not exist unless `overwrite`.
        target: 'mixtral' or 'qwen2_moe'; default: the first that can represent the model.
        extra_files: relative name -> source path or bytes, copied into the directory.
        verify: compare the logits of both models on a probe sequence before writing.
        overwrite: replace an existing directory.

    Returns:
        The directory's path.
    """
    hf = to_hf(model, target)
    if verify:
        check_parity(model, hf)
    extras = {check_extra_name(n): s for n, s in (extra_files or {}).items()}

    def write(tmp: Path) -> None:
        hf.save_pretrained(tmp)
        for name, src in extras.items():
            if (tmp / name).exists():
                raise ExportError(f"extra file {name!r} would overwrite a file transformers wrote")
            copy_extra_file(tmp / name, src)
        write_manifest(tmp)

    return atomic_directory_write(directory, write, overwrite=overwrite)




# --- the multimodal model -----------------------------------------------------------------------

FORMATS = ("hf",)

_EXPORT_README = """\
# {name}: Hugging Face export of a moe-zoo multimodal model

Written by `zoo export` (moe-zoo {zoo_version}). Every file's sha256 is in `manifest.json`.

| path | what it is | how to load it |
|---|---|---|
| `language_model/` | the language model as a transformers `{lm_class}` with the tokenizer | `AutoModelForCausalLM.from_pretrained(...)`, `AutoTokenizer.from_pretrained(...)` (no zoo needed) |
{encoder_rows}| `multimodal_config.json` | the moe-zoo `ModelConfig` (encoders, connectors, LM, MoE), placeholder token ids, and this table as data | `json.load` |
| `processor/` | tokenizer + `processor.json` (image size/mean/std, audio mel settings) | `zoo.processor.MultimodalProcessor.from_pretrained(...)` |
{card_row}
How the parts fit: each medium goes through its encoder (`[n, ...] -> [n, N, D]`), then its
connector (`-> [n, M, d_model]`); the connector's output rows replace the placeholder token
(`<image>` id {image_id}, `<audio>` id {audio_id}) in the LM's input embeddings (one placeholder
per medium, expanded to M positions), and the LM runs on the result.

Why not `LlavaForConditionalGeneration`: {llava_reason}

Rebuild the whole model with moe-zoo: `zoo.model.build_model(ModelConfig.from_dict(cfg["model"]))`,
then load `encoders/*.safetensors` into `model.encoders[m]`, `connectors/*.safetensors` into
`model.connectors[m]`, and the LM weights from `language_model/`.
"""


def llava_blocker(model_config: Any) -> str | None:
    """Why the model cannot be a transformers `LlavaForConditionalGeneration` (None if it could).

    LLaVA needs exactly one image encoder that transformers builds itself (a CLIP / SigLIP vision
    model), a linear-GELU-linear projector, and no other media. The zoo's image towers come from
    timm or open_clip, which transformers cannot represent.
    """
    encoders = dict(getattr(model_config, "encoders", {}) or {})
    image = encoders.get("image")
    if image is None:
        return "the model has no image encoder"
    reasons = [f"its image encoder is a {image.kind} tower ({image.name or 'custom'}), which transformers cannot represent "
               "(LLaVA's vision_tower must be a transformers CLIP/SigLIP vision model)"]
    if set(encoders) - {"image"}:
        reasons.append(f"it also has {sorted(set(encoders) - {'image'})} encoder(s), which LLaVA has no place for")
    return "; ".join(reasons)


def _module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    # Cloned, contiguous, on CPU: safetensors refuses tensors that share storage.
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}


def export_multimodal(
    model: nn.Module,
    processor: Any,
    model_config: Any,
    directory: str | os.PathLike,
    *,
    format: str = "hf",
    name: str | None = None,
    card_text: str | None = None,
    verify: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a `MultimodalMoE` as HF-native files, atomically, with a README saying what each is.

    Layout: `language_model/` (a `MixtralForCausalLM` / `Qwen2MoeForCausalLM` via `export_hf`,
    or the dense LM's own `save_pretrained`, plus the tokenizer), `encoders/<modality>.safetensors`,
    `connectors/<modality>.safetensors`, `multimodal_config.json`, `processor/`, `MODEL_CARD.md`
    (when `card_text` is given), `README.md`, and `manifest.json`.

    Args:
        model: the `zoo.model.MultimodalMoE`.
        processor: its `zoo.processor.MultimodalProcessor`.
        model_config: its `zoo.config.ModelConfig`.
        directory: output path; must not exist unless `overwrite`.
        format: "hf" (the only one); "llava" is refused with the reason.
        name: the model's name for the README (default: the config's).
        card_text: the model card to copy in as `MODEL_CARD.md`.
        verify: check the exported MoE LM's logits against the zoo LM.
        overwrite: replace an existing directory.

    Returns:
        The directory's path.
    """
    import json
    import tempfile

    from safetensors.torch import save_file

    import zoo
    from zoo.config import ModelConfig

    if format == "llava":
        raise ExportError(
            f"cannot export as LlavaForConditionalGeneration: {llava_blocker(model_config)}. "
            "Use --format hf: the LM in transformers format plus the encoder and connector weights in safetensors files"
        )
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; supported: {FORMATS} (llava is explained by --format llava)")
    if not isinstance(model_config, ModelConfig):
        raise ExportError(f"model_config must be a zoo.config.ModelConfig, got {type(model_config).__name__}")
    lm = model.language_model
    is_moe = isinstance(lm, MoECausalLM)
    hf_lm = to_hf(lm) if is_moe else lm
    if is_moe and verify:
        check_parity(lm, hf_lm)
    name = name or model_config.name

    def write(tmp: Path) -> None:
        lm_dir = tmp / "language_model"
        hf_lm.save_pretrained(lm_dir)
        with tempfile.TemporaryDirectory() as scratch:
            processor.tokenizer.save_pretrained(scratch)
            for f in sorted(Path(scratch).iterdir()):
                if (lm_dir / f.name).exists():
                    raise ExportError(f"tokenizer file {f.name!r} would overwrite a file transformers wrote")
                shutil.copyfile(f, lm_dir / f.name)
        processor.save_pretrained(tmp / "processor")
        files: dict[str, dict[str, str]] = {"encoders": {}, "connectors": {}}
        for kind in ("encoders", "connectors"):
            for modality, module in getattr(model, kind).items():
                rel = f"{kind}/{modality}.safetensors"
                (tmp / kind).mkdir(exist_ok=True)
                save_file(_module_state(module), str(tmp / rel), metadata={"format": "pt", "modality": modality})
                files[kind][modality] = rel
        meta = {
            "format": "moe-zoo-hf-export",
            "format_version": 1,
            "model": model_config.to_dict(),
            "placeholder_ids": dict(model.placeholder_ids),
            "language_model": {"path": "language_model", "class": type(hf_lm).__name__},
            **files,
        }
        (tmp / "multimodal_config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if card_text is not None:
            (tmp / "MODEL_CARD.md").write_text(card_text, encoding="utf-8")
        rows = ""
        for modality, enc in model_config.encoders.items():
            con = model_config.connectors[modality]
            rows += (f"| `encoders/{modality}.safetensors` | the {modality} encoder's state dict ({enc.kind}"
                     f"{': ' + enc.name if enc.name else ''}) | `safetensors.torch.load_file`, keys of `model.encoders['{modality}']` |\n")
            rows += (f"| `connectors/{modality}.safetensors` | the {modality} connector's state dict ({con.kind}) | "
                     f"`safetensors.torch.load_file`, keys of `model.connectors['{modality}']` |\n")
        ids = model_config.placeholder_ids()
        readme = _EXPORT_README.format(
            name=name,
            zoo_version=zoo.__version__,
            lm_class=type(hf_lm).__name__,
            encoder_rows=rows,
            card_row="| `MODEL_CARD.md` | the model card (task family, metrics and the commands that measured them) | |\n"
            if card_text is not None else "",
            image_id=ids.get("image", model_config.image_token_id),
            audio_id=ids.get("audio", model_config.audio_token_id),
            llava_reason=llava_blocker(model_config) or "not attempted by this exporter",
        )
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        write_manifest(tmp)

    return atomic_directory_write(directory, write, overwrite=overwrite)


__all__ = ["ExportError", "FORMATS", "TARGETS", "check_parity", "export_hf", "export_multimodal", "hf_target", "llava_blocker", "to_hf"]
