"""`moe-tune`: upcycle the LM to a sparse MoE and train routers + experts with their losses (MoE-LLaVA stage 3).

The upcycler (`zoo.UPCYCLERS`) initializes the experts from the dense FFNs; when the previous
stage saved specialized FFN copies (`specialize` with `experts_from`), expert j starts from copy j
(mod the number of copies). Attention, norms and embeddings stay frozen by default.

`encoder_moe` also upcycles vision towers' MLP blocks in the same stage (CLIP-MoE: a trained
encoder's FFNs become experts, `zoo.transforms.upcycle_encoder`), whose routers and experts then
train too, with their routers' losses in the loss. The tower trains in this stage even when its
config freezes it (no feature cache while it does); the saved config records the tower's MoE, so
the output reloads, and keeps its `freeze` flag for the stages after.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from zoo.config import sub_config
from zoo.moe.config import MoEConfig
from zoo.pipelines.stages.base import STAGES, Branch, StageContext, nothing_after, sample_batches, single_branch
from zoo.pipelines.stages.specialize import load_expert_seeds
from zoo.transforms.upcycle import UPCYCLERS, upcycle, upcycle_encoder


@dataclass
class MoETuneOptions:
    """Options of `moe-tune`.

    Attributes:
        moe: the MoE to upcycle the LM into (`zoo.MoEConfig` fields: num_experts, router,
            router_options, loss_coefs, layers, ...).
        upcycler: the `UPCYCLERS` entry that initializes the experts.
        upcycler_options: its options.
        calibration_samples: training samples per family in the calibration batch of upcyclers
            that look at activations (`split` with `partition: coactivation`).
        encoder_moe: encoder name (e.g. "image") -> `EncoderMoE`: also upcycle that vision tower.
    """

    moe: Any = None
    upcycler: str = "copy"
    upcycler_options: dict[str, Any] = field(default_factory=dict)
    calibration_samples: int = 8
    encoder_moe: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.moe is None:
            raise ValueError("a moe-tune stage needs `options.moe` (num_experts, router_options, layers, ...)")
        self.moe = sub_config(MoEConfig, self.moe, "moe")
        UPCYCLERS.options(self.upcycler, self.upcycler_options)
        self.encoder_moe = {name: sub_config(EncoderMoE, spec, f"encoder_moe.{name}")
                            for name, spec in (self.encoder_moe or {}).items()}


@dataclass
class EncoderMoE:
    """How `moe-tune` upcycles one encoder (an entry of `MoETuneOptions.encoder_moe`).

    Attributes:
        moe: `MoEConfig` fields; `layers` indexes the tower's blocks.
        upcycler: the `UPCYCLERS` entry ("copy": the tower's features equal the dense ones at init).
        upcycler_options: its options.
    """

    moe: Any = None
    upcycler: str = "copy"
    upcycler_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.moe is None:
            raise ValueError("an encoder_moe entry needs `moe` (num_experts, router_options, layers, ...)")
        self.moe = sub_config(MoEConfig, self.moe, "moe")
        UPCYCLERS.options(self.upcycler, self.upcycler_options)


@torch.no_grad()
def calibration_batch(ctx: StageContext, model, options: MoETuneOptions) -> dict[str, torch.Tensor]:
    """The LM's inputs (`inputs_embeds`, `attention_mask`) for the first `calibration_samples`
    training samples of each of the stage's families, media spliced in by the dense model."""
    (batch,) = sample_batches(ctx, ctx.cfg.data, options.calibration_samples)
    keys = ("attention_mask", "images", "audio", "encoder_features")
    spliced = model.splice(batch["input_ids"], **{k: batch[k] for k in keys if k in batch})
    return {"inputs_embeds": spliced.inputs_embeds, "attention_mask": spliced.attention_mask}


@STAGES.register("moe-tune", options=MoETuneOptions, example={"moe": {"num_experts": 2, "router_options": {"top_k": 1}}})
class MoETune:
    """Upcycle before training; routers and experts train (with the routers' aux losses)."""

    default_trains = ["language_model.*.mlp.moe.*"]  # routers + experts; attention, norms, embeddings frozen
    forks = False
    evaluates = True

    def __init__(self, **options) -> None:
        self.options = MoETuneOptions(**options)

    def branches(self, cfg):
        return single_branch(cfg)

    def before_training(self, ctx: StageContext, model, model_cfg, branch: Branch):
        o = self.options
        seeds = load_expert_seeds(ctx.start_dir) if ctx.start_dir is not None else None
        needs = getattr(UPCYCLERS.build(o.upcycler, o.upcycler_options), "needs_calibration", False)
        model.language_model = upcycle(model.hf_model, o.moe, method=o.upcycler, method_options=o.upcycler_options,
                                       expert_seeds=seeds, calibration=calibration_batch(ctx, model, o) if needs else None)
        encoders = dict(model_cfg.encoders)
        for name, spec in o.encoder_moe.items():
            if name not in model.encoders:
                raise ValueError(f"moe-tune: encoder_moe names encoder {name!r}; the model's encoders are {sorted(model.encoders)}")
            if encoders[name].moe is not None:
                raise ValueError(f"moe-tune: encoder {name!r} is already an MoE (its config has `moe`)")
            encoder = model.encoders[name]
            encoder.moe_config = upcycle_encoder(encoder, spec.moe, method=spec.upcycler, method_options=spec.upcycler_options)
            model.frozen.discard(f"encoders.{name}")  # its experts train in this stage (no no_grad, no feature cache)
            encoders[name] = dataclasses.replace(encoders[name], moe=encoder.moe_config, upcycler=spec.upcycler,
                                                 upcycler_options=dict(spec.upcycler_options))
        return model, dataclasses.replace(model_cfg, moe=model.language_model.moe_config, encoders=encoders)

    def trainable(self, model, branch: Branch) -> list[str]:
        return [*self.default_trains, *(f"encoders.{name}.*.moe.*" for name in self.options.encoder_moe)]

    after_training = nothing_after


__all__ = ["EncoderMoE", "MoETune", "MoETuneOptions"]
