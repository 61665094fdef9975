"""Build what a `ModelConfig` describes: the LM (upcycled if MoE, then adapted), encoders, connectors.

Builders live apart from the module files (torchtune's component/model builders split): modules
take their parts by keyword, builders read configs and registries. The build order is fixed (LM,
upcycling, encoders, connectors, adapters, expert quantization), so one seed gives one model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from zoo.models.config import EncoderConfig, LMConfig, ModelConfig
from zoo.models.multimodal import MultimodalMoE

_DEFAULT_CONNECTOR_AUX_COEF = 0.01


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    """Build one encoder from an `EncoderConfig` through `zoo.encoders.ENCODERS`; with `cfg.moe`, its
    blocks' MLPs are upcycled (`upcycle_encoder`) and the resolved config kept as `encoder.moe_config`."""
    from zoo.encoders import ENCODERS
    from zoo.transforms.upcycle import upcycle_encoder

    encoder = ENCODERS.build(cfg.kind, cfg.builder_options())
    if cfg.moe is not None:
        encoder.moe_config = upcycle_encoder(encoder, cfg.moe, method=cfg.upcycler, method_options=cfg.upcycler_options)
    return encoder


def build_language_model(cfg: LMConfig) -> nn.Module:
    """Build the transformers causal LM from an `LMConfig`: random init, or pretrained weights (a local
    directory or a packaged source) grown to the config's `vocab_size` (`zoo.models.pretrained`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.weights is not None and torch.get_default_device().type != "meta":  # meta: shapes from the config
        from zoo.models.pretrained import load_pretrained_lm

        return load_pretrained_lm(cfg)
    hf_config = AutoConfig.for_model(cfg.model_type, **cfg.config)
    return AutoModelForCausalLM.from_config(hf_config)


def _connector_aux_coef(cfg: ModelConfig) -> float:
    """Weight of MoE connectors' balance loss: the LM router's `balance` weight, else 0.01."""
    from zoo.moe.routers import ROUTERS

    if cfg.moe is not None and "balance" in ROUTERS.get(cfg.moe.router).default_loss_coefs:
        return cfg.moe.loss_coef("balance")
    return _DEFAULT_CONNECTOR_AUX_COEF


def apply_adapters(language_model: nn.Module, adapters) -> nn.Module:
    """Apply `AdapterConfig`s in order to a language model; returns the adapted language model."""
    from zoo.transforms.adapters import ADAPTERS

    for a in adapters:
        language_model = ADAPTERS.build(a.kind, a.options).apply(language_model)
    return language_model


def build_model(cfg: ModelConfig) -> MultimodalMoE:
    """Build the whole model a `ModelConfig` describes (random weights unless the config names some).

    Build inside `with torch.device("meta"):` to check shapes of a full-size model without memory.
    """
    from zoo.encoders.connectors import build_connector
    from zoo.models.pretrained import resolve_pretrained
    from zoo.transforms.upcycle import moe_skeleton

    cfg, _ = resolve_pretrained(cfg)  # a pretrained LM: its placeholders and grown vocabulary (idempotent)
    lm = build_language_model(cfg.lm)
    d = lm.get_input_embeddings().embedding_dim
    vocab = lm.get_input_embeddings().num_embeddings
    for modality, token_id in cfg.placeholder_ids().items():
        if not 0 <= token_id < vocab:
            raise ValueError(f"build_model: the <{modality}> token id {token_id} is outside the LM vocabulary ({vocab})")
    language_model = moe_skeleton(lm, cfg.moe) if cfg.moe is not None else lm
    encoders = {m: build_encoder(e) for m, e in cfg.encoders.items()}
    connectors = {
        m: build_connector(c.kind, encoders[m].output_dim, d, **c.options) for m, c in cfg.connectors.items()
    }
    language_model = apply_adapters(language_model, cfg.adapters)
    model = MultimodalMoE(
        language_model=language_model,
        encoders=encoders,
        connectors=connectors,
        placeholder_ids=cfg.placeholder_ids(),
        connector_aux_coef=_connector_aux_coef(cfg),
    )
    frozen = [f"encoders.{m}" for m, e in cfg.encoders.items() if e.freeze]
    frozen += [f"connectors.{m}" for m, c in cfg.connectors.items() if c.freeze]
    if cfg.lm.freeze:
        frozen.append("language_model")
    model = model.freeze(*frozen)
    if cfg.quantization is not None:
        from zoo.transforms.quantize import quantize_experts

        quantize_experts(model, cfg.quantization)
    return model


def model_for_checkpoint(config: dict[str, Any]) -> tuple[MultimodalMoE, ModelConfig]:
    """Build the (untrained) model a zoo checkpoint's `config.json` describes, ready for a strict load.

    Every weight will come from the checkpoint, so configured pretrained files are not read; the
    adapters the config lists are applied as modules (what a LoRA stage did not merge).

    Args:
        config: the checkpoint config, `{"model": ModelConfig dict, ...}`.

    Returns:
        `(model, model_config)`.
    """
    cfg = ModelConfig.from_dict(config["model"])
    build_cfg = copy.deepcopy(cfg)
    build_cfg.lm.weights = None
    for enc in build_cfg.encoders.values():
        enc.weights = None
    return build_model(build_cfg), cfg


__all__ = ["apply_adapters", "build_encoder", "build_language_model", "build_model", "model_for_checkpoint"]
