"""`esft`: expert-specialized fine-tuning of an MoE model per task family, with expert adapters.

ESFT (Wang et al., 2024, deepseek-ai/ESFT; `zoo.transforms.esft`): before training, each branch
scores every routed expert on its task family's data (`metric`: "gate" average gate score or
"token" selection ratio), keeps per layer the smallest set reaching share `p`, and trains only
those experts: gradient masks on the stacked `[E, ...]` parameters and no weight decay on them,
so every other expert, the routers and everything else stay bit-identical. The output is the
fine-tuned model plus its expert adapter (`esft_experts.safetensors`: the selected rows) with the
selection, the relevance scores, the base checkpoint's manifest sha256 and the adapter's size next
to the model's in its config (`esft`). `apply_expert_adapter` puts the adapter on the base; a model
card with `base:` naming the start model's card installs the adapter alone (`zoo.io.expert_adapter`),
and `zoo.load` of that card loads the base and applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

from safetensors.torch import save

from zoo.io.expert_adapter import EMBEDDED_KEY, EMBEDDED_WEIGHTS
from zoo.pipelines.stages.base import STAGES, Branch, StageConfig, StageContext, sample_batches, single_branch
from zoo.transforms.esft import (RELEVANCE, adapter_tensors, base_identity, expert_gradient_masks, expert_relevance,
                                 moe_layers_of, select_experts, stacked_params)

ADAPTER_FILE = EMBEDDED_WEIGHTS


@dataclass
class ESFTOptions:
    """Options of `esft`.

    Attributes:
        metric: "gate" (average gate score) or "token" (token selection ratio).
        p: the relevance share each layer's selected experts must reach, in (0, 1].
        score_samples: training samples per family the relevance is measured on.
        per_family: one branch (and adapter) per task family; false: one on the whole mix.
    """

    metric: str = "token"
    p: float = 0.2
    score_samples: int = 64
    per_family: bool = True

    def __post_init__(self) -> None:
        if self.metric not in RELEVANCE:
            raise ValueError(f"metric={self.metric!r} is not one of {RELEVANCE}")
        if not 0 < self.p <= 1:
            raise ValueError(f"p must be in (0, 1], got {self.p}")
        if self.score_samples < 1:
            raise ValueError(f"score_samples must be >= 1, got {self.score_samples}")


@STAGES.register("esft", options=ESFTOptions, example={"p": 0.5})
class ESFT:
    """Per family: score the experts, train only the relevant ones, save them as an expert adapter."""

    default_trains: list[str] = []  # the selected experts' stacked parameters (see `trainable`)
    evaluates = True

    def __init__(self, **options) -> None:
        self.options = ESFTOptions(**options)
        self.forks = self.options.per_family
        self._state: dict[str, dict] = {}

    def branches(self, cfg: StageConfig) -> list[Branch]:
        if not self.options.per_family:
            return single_branch(cfg)
        return [Branch(f"{cfg.name}-{f}", {f: 1.0}, f"{cfg.name}/{f}", f"{cfg.name}:{f}", family=f) for f in sorted(cfg.data)]

    def before_training(self, ctx: StageContext, model, model_cfg, branch: Branch):
        o = self.options
        batches = sample_batches(ctx, branch.data, o.score_samples, ctx.cfg.batch_size)
        relevance = expert_relevance(model, batches, o.metric)
        selected = select_experts(relevance, o.p)
        for moe in moe_layers_of(model).values():
            for p in stacked_params(moe).values():
                p.zoo_no_decay = True  # AdamW's decay would move the masked rows (see `decay_groups`)
        self._state[branch.path] = {"relevance": relevance, "selected": selected,
                                    "handles": expert_gradient_masks(model, selected)}
        return model, model_cfg

    def trainable(self, model, branch: Branch) -> list[str]:
        selected = self._state[branch.path]["selected"]
        names = {id(p): n for n, p in model.named_parameters()}
        return [names[id(p)] for layer, moe in moe_layers_of(model).items() if selected.get(layer)
                for p in stacked_params(moe).values()]

    def after_training(self, ctx: StageContext, model, model_cfg, branch: Branch):
        state = self._state.pop(branch.path)
        for h in state["handles"]:
            h.remove()
        blob = save(adapter_tensors(model, state["selected"]))
        info = {
            "metric": self.options.metric, "p": self.options.p,
            "experts": {str(k): v for k, v in sorted(state["selected"].items())},
            "relevance": {str(k): [round(float(x), 6) for x in v] for k, v in state["relevance"].items()},
            "base_sha256": base_identity(ctx.start_dir),
            "adapter_bytes": len(blob),
            "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        }
        extra = {EMBEDDED_KEY: info, **({"task_family": branch.family} if branch.family else {})}
        return model, model_cfg, extra, {ADAPTER_FILE: blob}


__all__ = ["ADAPTER_FILE", "ESFT", "ESFTOptions"]
