"""Training stages as data: what a recipe and each of its stages are (run by `pipelines/runner.py`).

A recipe (`configs/recipes/*.yaml`) names a model config, the data, and stages in order. Each
stage says what trains (parameter-name patterns; everything else is frozen), its data mix, its
loop settings, and what it starts from: the previous stage's output checkpoint (the first stage
starts from the model config). Every stage writes a zoo checkpoint at `OUT/<stage>/model`, so any
stage can be re-run alone once the one before it has run.

Stage kinds (MoE-LLaVA / Uni-MoE order):
  pretrain-lm  the dense LM on text (the tiny zoo has no pretrained LM offline);
  align        connectors only (stage 1);
  specialize   instruction-tune the dense model (stage 2);
  moe-tune     upcycle the LM and train routers + experts with aux losses, attention frozen (stage 3);
  lora         one LoRA per task family on the MoE model (PEFT, merged; or MixLoRA experts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zoo.config import ModelConfig, MoEConfig, config_from_dict
from zoo.pipelines.train import TrainConfig

STAGE_KINDS = ("pretrain-lm", "align", "specialize", "moe-tune", "lora")

DEFAULT_TRAINS = {
    "pretrain-lm": ["language_model.*"],
    "align": ["connectors.*"],
    "specialize": ["language_model.*", "connectors.*"],
    "moe-tune": ["language_model.*.mlp.moe.*"],  # routers + experts; attention, norms, embeddings frozen
    "lora": ["*lora_*"],  # mixlora: whatever the transform left trainable (LoRA + its routers)
}


@dataclass
class LoRAStageConfig:
    """LoRA settings of a `lora` stage.

    Attributes:
        kind: "plain" (PEFT LoRA on `target_modules`, merged after training) or "mixlora"
            (LoRA experts with a top-k router inside each still-dense FFN, plus attention LoRA;
            `zoo.lora.apply_mixlora`; the attention LoRA is merged, the LoRA experts stay).
        r: rank.
        alpha: scaling numerator (`alpha / r`).
        dropout: LoRA dropout.
        target_modules: module names to adapt inside the LM.
        num_experts: mixlora: LoRA experts per FFN.
        top_k: mixlora: experts per token (must equal the upcycled MoE's top_k, if any).
    """

    kind: str = "plain"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    num_experts: int = 4
    top_k: int = 2

    def __post_init__(self) -> None:
        if self.kind not in ("plain", "mixlora"):
            raise ValueError(f"lora: kind {self.kind!r} is not one of ('plain', 'mixlora')")


@dataclass
class StageConfig:
    """One stage of a recipe.

    Attributes:
        name: the stage's name (its output goes to `OUT/<name>/model`).
        kind: one of `STAGE_KINDS`.
        data: task family -> sampling weight.
        train: loop settings (steps, optimizer, checkpoints).
        batch_size: samples per micro-batch.
        trains: parameter-name patterns (fnmatch) that train; default per kind (`DEFAULT_TRAINS`).
        upcycle: `moe-tune` only: the MoE to upcycle the LM into. When the previous stage saved
            specialized FFN copies (`experts_from`), expert j starts from copy j (j mod copies).
        lora: `lora` only: LoRA settings; one adapter is trained per task family in `data`.
        experts_from: `specialize` only: after the stage, train one copy of the LM's FFNs per
            "modality" (image / audio / text families) or per "task" (family) on that group's
            data alone, to seed the experts of the next moe-tune stage (Uni-MoE stage 2).
        expert_steps: optimizer steps of each FFN copy.
    """

    name: str
    kind: str
    data: dict[str, float]
    train: TrainConfig = field(default_factory=TrainConfig)
    batch_size: int = 8
    trains: list[str] | None = None
    upcycle: MoEConfig | None = None
    lora: LoRAStageConfig | None = None
    experts_from: str | None = None
    expert_steps: int = 100

    def __post_init__(self) -> None:
        if self.experts_from is not None and (self.kind != "specialize" or self.experts_from not in ("modality", "task")):
            raise ValueError(f"stage {self.name!r}: experts_from={self.experts_from!r} needs kind specialize and "
                             "one of ('modality', 'task')")
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"stage {self.name!r}: kind {self.kind!r} is not one of {STAGE_KINDS}")
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if isinstance(self.upcycle, dict):
            self.upcycle = MoEConfig.from_dict(self.upcycle)
        if isinstance(self.lora, dict):
            self.lora = config_from_dict(LoRAStageConfig, self.lora)
        if self.kind == "moe-tune" and self.upcycle is None:
            raise ValueError(f"stage {self.name!r}: a moe-tune stage needs `upcycle:` (num_experts, top_k, layers, ...)")
        if self.kind == "lora" and self.lora is None:
            self.lora = LoRAStageConfig()
        if self.trains is None:
            self.trains = list(DEFAULT_TRAINS[self.kind])
        if not self.data:
            raise ValueError(f"stage {self.name!r}: `data` must name at least one task family")


@dataclass
class EvalSpec:
    """Held-out evaluation written into each output checkpoint (and so into its model card).

    Attributes:
        limit: test samples per family (None: all).
        max_new_tokens: greedy generation length.
    """

    limit: int | None = 200
    max_new_tokens: int = 12


@dataclass
class RecipeConfig:
    """Stages in order, the model they start from and the data they read.

    Attributes:
        name: recipe name.
        model: the model config (a dict, or a path to a YAML file relative to the repository).
        stages: the stages, in order.
        data: data builder settings: `max_per_split`, and `options` (family -> builder keywords).
            Data already built in the run directory is reused as it is.
        tokenizer_vocab: BPE vocabulary size (must equal the LM's `vocab_size`).
        seed: base seed of data order.
        eval: evaluate the moe-tune and lora outputs on the test splits (None: no eval).
    """

    name: str
    model: Any
    stages: list[StageConfig]
    data: dict[str, Any] = field(default_factory=dict)
    tokenizer_vocab: int = 1024
    seed: int = 0
    eval: EvalSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.eval, dict):
            self.eval = config_from_dict(EvalSpec, self.eval)
        if isinstance(self.model, (str, Path)):
            self.model = ModelConfig.load(str(self.model))
        elif isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        self.stages = [s if isinstance(s, StageConfig) else config_from_dict(StageConfig, s) for s in self.stages]
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"recipe {self.name!r}: duplicate stage names in {names}")

    @classmethod
    def load(cls, path: str | Path) -> RecipeConfig:
        data = yaml.safe_load(Path(path).read_text())
        if isinstance(data.get("model"), str) and not Path(data["model"]).is_absolute():
            data["model"] = str((Path(path).parent / data["model"]).resolve())
        return config_from_dict(cls, data)

    def outputs(self) -> list[str]:
        """Names of the checkpoints the recipe writes: each stage's name, or `<stage>-<family>` for lora."""
        return [n for s in self.stages for n in ([f"{s.name}-{f}" for f in sorted(s.data)] if s.kind == "lora" else [s.name])]

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ValueError(f"recipe {self.name!r} has no stage {name!r}; stages: {[s.name for s in self.stages]}")
