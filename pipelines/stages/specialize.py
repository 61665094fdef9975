"""`specialize`: instruction-tune the dense model (MoE-LLaVA stage 2), optionally training FFN copies per group.

With `experts_from` the stage then trains one copy of the LM's FFNs per group of task families
("modality": image / audio / text families; "task": one per family) on that group's data alone,
and saves them beside its output (`expert_seeds.safetensors`) to seed the experts of the next
`moe-tune` stage (Uni-MoE stage 2: experts that start specialized).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from zoo.io.checkpoint import load_checkpoint
from zoo.models.lm import decoder_layers
from zoo.pipelines.stages.base import STAGES, Branch, StageContext, default_trainable, keep, single_branch

EXPERT_SEEDS = "expert_seeds.safetensors"
EXPERTS_FROM = ("modality", "task")


@dataclass
class SpecializeOptions:
    """Options of `specialize`.

    Attributes:
        experts_from: None, "modality" or "task": train one FFN copy per group after the stage.
        expert_steps: optimizer steps of each FFN copy.
    """

    experts_from: str | None = None
    expert_steps: int = 100

    def __post_init__(self) -> None:
        if self.experts_from is not None and self.experts_from not in EXPERTS_FROM:
            raise ValueError(f"experts_from={self.experts_from!r} is not one of {EXPERTS_FROM} (or null)")
        if self.expert_steps < 1:
            raise ValueError(f"expert_steps must be >= 1, got {self.expert_steps}")


def expert_groups(experts_from: str, data: dict[str, float], datasets) -> dict[str, list[str]]:
    """`experts_from` groups: per task family, or per modality (from the media a family's samples carry)."""
    if experts_from == "task":
        return {f: [f] for f in sorted(data)}
    groups: dict[str, list[str]] = {}
    for family in sorted(data):
        kinds = {m.kind for s in datasets[family][:32] for m in s.media}
        groups.setdefault("audio" if "audio" in kinds else "image" if "image" in kinds else "text", []).append(family)
    return groups


def train_ffn_copy(ctx: StageContext, model, families: list[str], out: Path, steps: int) -> dict[str, torch.Tensor]:
    """Train a copy of `model`'s LM FFNs on `families` alone; return its FFN weights as `{"<layer>/<key>": tensor}`."""
    copy_model = copy.deepcopy(model)
    stage = ctx.cfg
    group_stage = dataclasses.replace(
        stage, data={f: stage.data[f] for f in families}, trains=["language_model.*.mlp.*"],
        train=dataclasses.replace(stage.train, steps=steps, ckpt_every=0))
    ctx.train(copy_model, group_stage, out / "train", f"{stage.name}:ffn-{out.name}")
    ffns = {}
    for i, layer in enumerate(decoder_layers(copy_model.hf_model)):
        ffns.update({f"{i}/{k}": v.detach().clone() for k, v in layer.mlp.state_dict().items()})
    return ffns


def load_expert_seeds(path: Path) -> list[dict[int, dict[str, torch.Tensor]]] | None:
    """The FFN copies a specialize stage saved beside its output, as `upcycle(expert_seeds=)` takes them."""
    ckpt = load_checkpoint(path)
    groups = ckpt.config.get("expert_seeds")
    if not groups:
        return None
    tensors = load_file(str(ckpt.paths[EXPERT_SEEDS]))
    copies = []
    for g in groups:
        layers: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            group, layer, name = key.split("/", 2)
            if group == g:
                layers.setdefault(int(layer), {})[name] = value
        copies.append(layers)
    return copies


@STAGES.register("specialize", options=SpecializeOptions)
class Specialize:
    """Train the LM and connectors on the instruction mix; then, with `experts_from`, the FFN copies."""

    default_trains = ["language_model.*", "connectors.*"]
    forks = False
    evaluates = False

    def __init__(self, **options) -> None:
        self.options = SpecializeOptions(**options)

    def branches(self, cfg):
        return single_branch(cfg)

    before_training = keep
    trainable = default_trainable

    def after_training(self, ctx: StageContext, model, model_cfg, branch: Branch):
        if self.options.experts_from is None:
            return model, model_cfg, {}, {}
        groups = expert_groups(self.options.experts_from, ctx.cfg.data, ctx.datasets)
        stage_dir = ctx.out_dir / branch.path
        seeds = {g: train_ffn_copy(ctx, model, fams, stage_dir / "experts" / g, self.options.expert_steps)
                 for g, fams in groups.items()}
        files = {EXPERT_SEEDS: save({f"{g}/{k}": v for g, sd in seeds.items() for k, v in sd.items()})}
        return model, model_cfg, {"expert_seeds": list(groups)}, files


__all__ = ["EXPERT_SEEDS", "Specialize", "SpecializeOptions", "expert_groups", "load_expert_seeds", "train_ffn_copy"]
