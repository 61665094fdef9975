"""`lora`: one adapter per task family on the model so far (the per-family checkpoints of the zoo),
or one on the whole mix (`per_family: false`).

The adapter is any `zoo.ADAPTERS` entry (`lora`: plain LoRA through PEFT; `mixlora`; `loramoe`).
After training it is merged where it can be (`merge: true`): what remains as modules (MixLoRA's
LoRA experts, an unmerged LoRA) is recorded in the output's `ModelConfig.adapters`, so
`zoo.load` rebuilds it from the config alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from zoo.models.config import AdapterConfig
from zoo.pipelines.stages.base import STAGES, Branch, StageConfig, StageContext, single_branch
from zoo.transforms.adapters import ADAPTERS


@dataclass
class LoRAStageOptions:
    """Options of `lora`.

    Attributes:
        adapter: the `ADAPTERS` entry ("lora", "mixlora", "loramoe", ...).
        adapter_options: its options (e.g. `{r: 8, alpha: 16, target_modules: [q_proj, v_proj]}`).
        merge: fold what can be folded into the base weights after training.
        per_family: one adapter per task family (outputs `<stage>-<family>`); false: one adapter on
            the whole data mix (output `<stage>`), as LoRAMoE trains world-knowledge and task
            samples together.
    """

    adapter: str = "lora"
    adapter_options: dict[str, Any] = field(default_factory=dict)
    merge: bool = True
    per_family: bool = True

    def __post_init__(self) -> None:
        ADAPTERS.options(self.adapter, self.adapter_options)


@STAGES.register("lora", options=LoRAStageOptions)
class LoRA:
    """Per family: apply the adapter to a copy of the start model, train what it made trainable, merge."""

    default_trains: list[str] = []  # what the adapter left trainable
    evaluates = True

    def __init__(self, **options) -> None:
        self.options = LoRAStageOptions(**options)
        self.forks = self.options.per_family

    def branches(self, cfg: StageConfig) -> list[Branch]:
        if not self.options.per_family:
            return single_branch(cfg)
        return [Branch(f"{cfg.name}-{f}", {f: 1.0}, f"{cfg.name}/{f}", f"{cfg.name}:{f}", family=f) for f in sorted(cfg.data)]

    def before_training(self, ctx: StageContext, model, model_cfg, branch: Branch):
        model.language_model = ADAPTERS.build(self.options.adapter, self.options.adapter_options).apply(model.language_model)
        return model, model_cfg

    def trainable(self, model, branch: Branch) -> list[str]:
        return [f"language_model.{n}" for n, p in model.language_model.named_parameters() if p.requires_grad]

    def after_training(self, ctx: StageContext, model, model_cfg, branch: Branch):
        o = self.options
        remaining: dict | None = dict(o.adapter_options)
        if o.merge:
            model.language_model, remaining = ADAPTERS.build(o.adapter, o.adapter_options).merge(model.language_model)
        if remaining is not None:
            model_cfg = replace(model_cfg, adapters=[*model_cfg.adapters, AdapterConfig(o.adapter, remaining)])
        return model, model_cfg, ({"task_family": branch.family} if branch.family else {}), {}


__all__ = ["LoRA", "LoRAStageOptions"]
