"""`moe-tune`: upcycle the LM to a sparse MoE and train routers + experts with their losses (MoE-LLaVA stage 3).

The upcycler (`zoo.UPCYCLERS`) initializes the experts from the dense FFNs; when the previous
stage saved specialized FFN copies (`specialize` with `experts_from`), expert j starts from copy j
(mod the number of copies). Attention, norms and embeddings stay frozen by default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from zoo.config import sub_config
from zoo.moe.config import MoEConfig
from zoo.pipelines.stages.base import (STAGES, Branch, StageContext, default_trainable, nothing_after, sample_batches,
                                      single_branch)
from zoo.pipelines.stages.specialize import load_expert_seeds
from zoo.transforms.upcycle import UPCYCLERS, upcycle


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
    """

    moe: Any = None
    upcycler: str = "copy"
    upcycler_options: dict[str, Any] = field(default_factory=dict)
    calibration_samples: int = 8

    def __post_init__(self) -> None:
        if self.moe is None:
            raise ValueError("a moe-tune stage needs `options.moe` (num_experts, router_options, layers, ...)")
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
        return model, dataclasses.replace(model_cfg, moe=model.language_model.moe_config)

    trainable = default_trainable
    after_training = nothing_after


__all__ = ["MoETune", "MoETuneOptions"]
