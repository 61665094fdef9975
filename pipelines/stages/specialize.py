"""`specialize`: instruction-tune the dense model (MoE-LLaVA stage 2), optionally training FFN copies per group.

With `experts_from` the stage then trains one copy of the LM's FFNs per group of training data
("modality": image / audio / text families; "task": one per family; "cluster": clusters of the
samples themselves) on that group alone, and saves them beside its output
(`expert_seeds.safetensors`) to seed the experts of the next `moe-tune` stage (Uni-MoE stage 2:
experts that start specialized).

`cluster` is CLIP-MoE's Diversified Multiplet Upcycling (Zhang et al., 2024, "CLIP-MoE: Towards
Building Mixture of Experts for CLIP with Diversified Multiplet Upcycling"): the samples are
clustered by their features and copy j is fine-tuned on cluster j, so the experts start diverse.
CLIP-MoE clusters with the model's own features at successive stages; here a sample's feature is
the trained dense model's mean last-layer FFN input over its real tokens (media tokens included),
one space for every modality, and the clustering is balanced spherical k-means (every copy gets
the same number of samples; a choice: the paper uses plain k-means).
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
from zoo.pipelines.datasets import Datasets
from zoo.pipelines.stages.base import STAGES, Branch, StageContext, default_trainable, keep, single_branch

EXPERT_SEEDS = "expert_seeds.safetensors"
EXPERTS_FROM = ("modality", "task", "cluster")


@dataclass
class SpecializeOptions:
    """Options of `specialize`.

    Attributes:
        experts_from: None, "modality", "task" or "cluster": train one FFN copy per group after the stage.
        expert_steps: optimizer steps of each FFN copy.
        num_clusters: clusters (so FFN copies) for `experts_from: cluster`.
        cluster_samples: training samples per family that are clustered (the first ones).
    """

    experts_from: str | None = None
    expert_steps: int = 100
    num_clusters: int = 2
    cluster_samples: int = 256

    def __post_init__(self) -> None:
        if self.experts_from is not None and self.experts_from not in EXPERTS_FROM:
            raise ValueError(f"experts_from={self.experts_from!r} is not one of {EXPERTS_FROM} (or null)")
        if self.expert_steps < 1:
            raise ValueError(f"expert_steps must be >= 1, got {self.expert_steps}")
        if self.num_clusters < 2:
            raise ValueError(f"num_clusters must be >= 2, got {self.num_clusters}")
        if self.cluster_samples < 1:
            raise ValueError(f"cluster_samples must be >= 1, got {self.cluster_samples}")


def expert_groups(experts_from: str, data: dict[str, float], datasets) -> dict[str, list[str]]:
    """`experts_from` groups: per task family, or per modality (from the media a family's samples carry)."""
    if experts_from == "task":
        return {f: [f] for f in sorted(data)}
    groups: dict[str, list[str]] = {}
    for family in sorted(data):
        kinds = {m.kind for s in datasets[family][:32] for m in s.media}
        groups.setdefault("audio" if "audio" in kinds else "image" if "image" in kinds else "text", []).append(family)
    return groups


@torch.no_grad()
def sample_features(model, processor, samples: list, batch_size: int = 16) -> torch.Tensor:
    """`[N, d]`: each sample's mean last-layer FFN input over its real tokens, from `model`."""
    from zoo.pipelines.collate import collate

    layer = decoder_layers(model.hf_model)[-1]
    got: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    handle = layer.mlp.register_forward_pre_hook(lambda module, args: got.append(args[0].detach().float()))
    feats = []
    try:
        for start in range(0, len(samples), batch_size):
            got.clear()
            batch = collate(samples[start : start + batch_size], processor)
            out = model(**batch)
            x = got[-1]  # [B, S, d]
            mask = getattr(out, "attention_mask", None)
            mask = torch.ones(x.shape[:2]) if mask is None or mask.shape != x.shape[:2] else mask.float()
            feats.append((x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1))
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(feats)


def cluster_groups(ctx: StageContext, model, options: SpecializeOptions) -> tuple[dict[str, Datasets], dict]:
    """`experts_from: cluster`: per cluster the stage's datasets restricted to its samples, and a summary."""
    from zoo.transforms.upcycle import balanced_kmeans

    samples, owners = [], []
    for family in sorted(ctx.cfg.data):
        chosen = list(ctx.datasets[family][: options.cluster_samples])
        samples += chosen
        owners += [family] * len(chosen)
    k = options.num_clusters
    n = len(samples) - len(samples) % k
    if n < k:
        raise ValueError(f"experts_from: cluster needs at least num_clusters={k} samples, the stage has {len(samples)}")
    feats = sample_features(model, ctx.processor, samples[:n])
    assign = balanced_kmeans(feats, k, torch.Generator().manual_seed(ctx.seed))
    groups, summary = {}, {}
    for c in range(k):
        members = [i for i in range(n) if assign[i] == c]
        by_family = {f: [samples[i] for i in members if owners[i] == f] for f in sorted(ctx.cfg.data)}
        by_family = {f: v for f, v in by_family.items() if v}
        groups[f"cluster{c}"] = Datasets(by_family, ctx.datasets.test)
        summary[f"cluster{c}"] = {f: len(v) for f, v in by_family.items()}
    return groups, summary


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
        stage_dir = ctx.out_dir / branch.path
        extra = {}
        if self.options.experts_from == "cluster":
            clusters, extra["expert_clusters"] = cluster_groups(ctx, model, self.options)
            seeds = {g: train_ffn_copy(dataclasses.replace(ctx, datasets=data), model, sorted(data),
                                       stage_dir / "experts" / g, self.options.expert_steps)
                     for g, data in clusters.items()}
        else:
            groups = expert_groups(self.options.experts_from, ctx.cfg.data, ctx.datasets)
            seeds = {g: train_ffn_copy(ctx, model, fams, stage_dir / "experts" / g, self.options.expert_steps)
                     for g, fams in groups.items()}
        files = {EXPERT_SEEDS: save({f"{g}/{k}": v for g, sd in seeds.items() for k, v in sd.items()})}
        return model, model_cfg, {"expert_seeds": list(seeds), **extra}, files


__all__ = ["EXPERT_SEEDS", "Specialize", "SpecializeOptions", "cluster_groups", "expert_groups", "load_expert_seeds",
           "sample_features", "train_ffn_copy"]
