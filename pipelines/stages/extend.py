"""`extend`: MoExtend: add M experts per MoE layer for new data, train only them and their router rows.

The stage starts from an MoE checkpoint and trains on the new modality's or task's families
(`data`). Each MoE layer gets `num_new` experts (`zoo.transforms.extend`), initialized from the
old expert the new data selects most; old experts, old router rows and everything else stay
bit-identical (gradient masks, no weight decay on those stacks). The output's `ModelConfig.moe`
has `num_experts + num_new`; its config records which old expert seeded each new one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from zoo.pipelines.stages.base import STAGES, Branch, StageContext, sample_batches, single_branch
from zoo.transforms.esft import expert_relevance
from zoo.transforms.extend import extend_moe, extended_params, old_row_masks


@dataclass
class ExtendOptions:
    """Options of `extend`.

    Attributes:
        num_new: M, new experts per MoE layer (>= 1).
        score_samples: samples per family used to pick each new expert's seed.
    """

    num_new: int = 1
    score_samples: int = 32

    def __post_init__(self) -> None:
        if self.num_new < 1:
            raise ValueError(f"num_new must be >= 1, got {self.num_new}")
        if self.score_samples < 1:
            raise ValueError(f"score_samples must be >= 1, got {self.score_samples}")


@STAGES.register("extend", options=ExtendOptions, example={"num_new": 2})
class Extend:
    """Add experts for the stage's data; train only the new experts and router rows."""

    default_trains: list[str] = []  # the extended stacks (their old rows masked; see `trainable`)
    forks = False
    evaluates = True

    def __init__(self, **options) -> None:
        self.options = ExtendOptions(**options)
        self._handles: list = []
        self._seeds: dict = {}

    def branches(self, cfg):
        return single_branch(cfg)

    def before_training(self, ctx: StageContext, model, model_cfg, branch: Branch):
        o = self.options
        if model_cfg.moe is None:
            raise ValueError("an extend stage starts from an MoE model (put it after moe-tune)")
        relevance = expert_relevance(model, sample_batches(ctx, branch.data, o.score_samples, ctx.cfg.batch_size), "token")
        moes = model.language_model.moe_layers()
        e = model_cfg.moe.num_experts
        for layer, moe in moes.items():
            seeds = [int(i) for i in relevance[layer].argsort(descending=True, stable=True)[: o.num_new].tolist()]
            seeds = (seeds * o.num_new)[: o.num_new]  # M > E: cycle through the ranking
            extend_moe(moe, model_cfg.moe, o.num_new, seeds, f"extend: layer {layer}")
            self._handles += old_row_masks(moe, e)
            self._seeds[layer] = seeds
        moe_cfg = dataclasses.replace(model_cfg.moe, num_experts=e + o.num_new)
        model.language_model.moe_config = moe_cfg
        return model, dataclasses.replace(model_cfg, moe=moe_cfg)

    def trainable(self, model, branch: Branch) -> list[str]:
        names = {id(p): n for n, p in model.named_parameters()}
        return [names[id(p)] for p in extended_params(model.language_model.moe_layers())]

    def after_training(self, ctx: StageContext, model, model_cfg, branch: Branch):
        for h in self._handles:
            h.remove()
        self._handles = []
        info = {"new_experts": self.options.num_new, "seeded_from": {str(k): v for k, v in self._seeds.items()}}
        return model, model_cfg, {"extend": info}, {}


__all__ = ["Extend", "ExtendOptions"]
