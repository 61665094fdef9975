"""Run recipes: build the data and tokenizer, run each stage from the one before, save and evaluate.

`pipelines/stages.py` says what a recipe and its stages are (data); this module runs them on an
engine (one-process PyTorch, or DeepSpeed under `pipelines/launch/*.sh`), writes each stage's
output as a zoo checkpoint at `OUT/<stage>/model` (`OUT/<stage>/<family>/model` for lora stages),
with its held-out metrics and, after MoE stages, the expert load by task family.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from zoo.checkpoint import load_checkpoint, save_checkpoint
from zoo.config import ModelConfig, MoEConfig
from zoo.lm import decoder_layers
from zoo.model import MultimodalMoE, build_model, model_from_checkpoint_config
from zoo.pipelines.collate import MixedBatches, frozen_encoder_caches
from zoo.pipelines.engine import TorchEngine
from zoo.pipelines.stages import LoRAStageConfig, RecipeConfig, StageConfig
from zoo.pipelines.train import train
from zoo.upcycle import upcycle, upcycle_from_experts


@dataclass
class EngineSpec:
    """Which engine runs the stages.

    Attributes:
        kind: "torch" (one process) or "deepspeed" (launched by `pipelines/launch/*.sh`).
        ds_config: DeepSpeed config name in `configs/deepspeed/` or a path ("zero2": fp32 or bf16
            from the stage's precision).
        ep_size: expert-parallel group size (DeepSpeed only).
    """

    kind: str = "torch"
    ds_config: str = "zero2"
    ep_size: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("torch", "deepspeed"):
            raise ValueError(f"engine {self.kind!r} is not one of ('torch', 'deepspeed')")
        if self.kind == "torch" and self.ep_size != 1:
            raise ValueError("ep_size > 1 needs the deepspeed engine (launch with pipelines/launch/*.sh)")


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def set_trainable(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Train exactly the parameters whose names match one of `patterns`; return their names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad = any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"no parameter matches the trainable patterns {patterns}")
    return names


def save_model(model: MultimodalMoE, cfg: ModelConfig, path: Path, tokenizer_dir: Path, extra: dict | None = None,
               extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a stage's output model (weights, ModelConfig, tokenizer files) as a zoo checkpoint."""
    files = {f"tokenizer/{p.name}": p for p in sorted(tokenizer_dir.iterdir()) if p.is_file()}
    files.update(extra_files or {})
    config = {"model": cfg.to_dict(), **(extra or {})}
    return save_checkpoint(path, model.state_dict(), config, extra_files=files, overwrite=True)


def load_model(path: Path) -> tuple[MultimodalMoE, ModelConfig]:
    """Rebuild a stage's output model from its checkpoint (verified, strict)."""
    ckpt = load_checkpoint(path)
    model, cfg = model_from_checkpoint_config(ckpt.config)
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model, cfg


def _train_stage(model, stage: StageConfig, datasets, processor, out: Path, seed: int, resume: bool, name: str,
                 spec: EngineSpec, feature_dir: Path | None = None):
    trainable = set_trainable(model, stage.trains)
    ep_size = 1
    caches = frozen_encoder_caches(model, processor, feature_dir) if feature_dir is not None else {}
    mixed = MixedBatches(datasets, stage.data, processor, stage.batch_size, seed, feature_caches=caches)
    if spec.kind == "torch":
        engine, batches = TorchEngine(model, stage.train.optim, stage.train.steps), mixed
    else:
        from zoo.pipelines.deepspeed_engine import DeepSpeedEngine

        from zoo.moe.experts import SwiGLUExperts

        trains_experts = any(isinstance(m, SwiGLUExperts) and any(p.requires_grad for p in m.parameters())
                             for m in model.modules())
        ep_size = spec.ep_size if trains_experts else 1  # no trainable experts: data parallel only
        engine = DeepSpeedEngine(model, stage.train.optim, stage.train.steps, ds_config=spec.ds_config, ep_size=ep_size)
        rank, ranks = engine.dp_rank, engine.dp_world_size
        batches = lambda i: mixed(i * ranks + rank)  # noqa: E731  each data-parallel rank its own batches
    result = train(engine, batches, stage.train, out, resume=resume, name=name)
    if spec.kind == "deepspeed" and ep_size > 1:
        from zoo.moe.expert_parallel import unshard_experts

        unshard_experts(model)  # every rank gathers the full experts; rank 0 saves them
    return result, trainable


def run_stage(
    recipe: RecipeConfig,
    stage: StageConfig,
    out_dir: Path,
    datasets: dict[str, list],
    processor,
    *,
    resume: bool = False,
    engine: EngineSpec | None = None,
) -> dict[str, Path]:
    """Run one stage from the previous stage's output (or the model config for the first).

    Returns:
        output name -> checkpoint path (`{stage.name: path}`, or one entry per task family for
        `lora`, named `<stage>-<family>`).
    """
    engine = engine or EngineSpec()
    index = recipe.stages.index(stage)
    tokenizer_dir = out_dir / "tokenizer"
    if index == 0:
        cfg = copy.deepcopy(recipe.model)
        torch.manual_seed(recipe.seed)
        model = build_model(cfg)
    else:
        prev = next(s for s in reversed(recipe.stages[:index]) if s.kind != "lora") if stage.kind == "lora" else recipe.stages[index - 1]
        start = out_dir / prev.name / "model"
        if prev.kind == "lora":
            raise ValueError(f"stage {stage.name!r} cannot start from the per-family outputs of lora stage {prev.name!r}")
        if not start.is_dir():
            raise FileNotFoundError(
                f"stage {stage.name!r} starts from stage {prev.name!r}'s output {start}, which does not exist: "
                f"run stage {prev.name!r} first"
            )
        model, cfg = load_model(start)
    if stage.kind == "moe-tune":
        seeds = load_expert_seeds(out_dir / prev.name / "model") if index > 0 else None
        upcycle_for_stage(model, stage.upcycle, seeds)
        cfg = dataclasses.replace(cfg, moe=stage.upcycle)
    stage_dir = out_dir / stage.name
    if stage.kind != "lora":
        result, trainable = _train_stage(model, stage, datasets, processor, stage_dir / "train",
                                         recipe.seed + index, resume, stage.name, engine, out_dir / "features")
        extra_files, groups = {}, {}
        if stage.experts_from:
            groups = expert_groups(stage, datasets)
            seeds = {g: _train_ffn_copy(model, stage, fams, datasets, processor, stage_dir / "experts" / g,
                                        recipe.seed + index, resume, engine) for g, fams in groups.items()}
            extra_files[EXPERT_SEEDS] = save({f"{g}/{k}": v for g, sd in seeds.items() for k, v in sd.items()})
        path = stage_dir / "model"
        if _is_main():
            _plot_routing(model, processor, {f: datasets[f] for f in stage.data}, stage_dir / "expert_load.png", stage.name)
            metrics = _evaluate(recipe, model, processor, datasets, stage.data, f"{stage.name}/model") if stage.kind == "moe-tune" else {}
            save_model(model, cfg, path, tokenizer_dir, {"stage": stage.name, "trained": trainable,
                                                          "final_loss": result.final_loss, "metrics": metrics,
                                                          **({"expert_seeds": list(groups)} if groups else {})},
                       extra_files)
        _barrier()
        return {stage.name: path}
    return _run_lora(recipe, stage, model, cfg, stage_dir, tokenizer_dir, datasets, processor, resume, index, engine)


def _run_lora(recipe, stage, base, cfg, stage_dir, tokenizer_dir, datasets, processor, resume, index, engine) -> dict[str, Path]:
    """One LoRA per task family on a copy of `base`, saved as a checkpoint `load_model` rebuilds."""
    outputs = {}
    for family in sorted(stage.data):
        model = copy.deepcopy(base)
        extra: dict[str, Any] = {"stage": stage.name, "task_family": family}
        family_stage = dataclasses.replace(stage, data={family: 1.0})
        if stage.lora.kind == "plain":
            from peft import LoraConfig, get_peft_model

            peft_lm = get_peft_model(model.hf_model, LoraConfig(
                r=stage.lora.r, lora_alpha=stage.lora.alpha, lora_dropout=stage.lora.dropout,
                target_modules=stage.lora.target_modules))
            _set_lm(model, peft_lm)
        else:
            from zoo.lora import apply_mixlora

            model.language_model = apply_mixlora(model.language_model, **_mixlora_args(stage.lora))
            family_stage = dataclasses.replace(family_stage, trains=[n for n, p in model.named_parameters() if p.requires_grad])
            extra["mixlora"] = _mixlora_args(stage.lora)
        result, trainable = _train_stage(model, family_stage, datasets, processor, stage_dir / family / "train",
                                         recipe.seed + index, resume, f"{stage.name}:{family}", engine,
                                         stage_dir.parent / "features")
        if stage.lora.kind == "plain":
            _set_lm(model, peft_lm.merge_and_unload())
        else:
            from zoo.lora import merge_lora

            merge_lora(model.language_model, unload=True)  # attention LoRA -> plain weights; LoRA experts stay
        outputs[f"{stage.name}-{family}"] = path = stage_dir / family / "model"
        if _is_main():
            _plot_routing(model, processor, {family: datasets[family]}, stage_dir / family / "expert_load.png",
                          f"{stage.name}:{family}")
            metrics = _evaluate(recipe, model, processor, datasets, [family], f"{stage.name}/{family}/model")
            save_model(model, cfg, path, tokenizer_dir,
                       {**extra, "trained": trainable, "final_loss": result.final_loss, "metrics": metrics})
        _barrier()
    return outputs


def _mixlora_args(lora: LoRAStageConfig) -> dict[str, Any]:
    return {"num_experts": lora.num_experts, "top_k": lora.top_k, "r": lora.r, "alpha": lora.alpha,
            "dropout": lora.dropout, "layers": "dense"}


EXPERT_SEEDS = "expert_seeds.safetensors"


def expert_groups(stage: StageConfig, datasets) -> dict[str, list[str]]:
    """`experts_from` groups: per task family, or per modality (from the media a family's samples carry)."""
    if stage.experts_from == "task":
        return {f: [f] for f in sorted(stage.data)}
    groups: dict[str, list[str]] = {}
    for family in sorted(stage.data):
        kinds = {m.kind for s in datasets[family][:32] for m in s.media}
        groups.setdefault("audio" if "audio" in kinds else "image" if "image" in kinds else "text", []).append(family)
    return groups


def _train_ffn_copy(model, stage: StageConfig, families, datasets, processor, out: Path, seed: int, resume, engine):
    """Train a copy of `model`'s LM FFNs on `families` alone; return its FFN weights by layer."""
    copy_model = copy.deepcopy(model)
    group_stage = dataclasses.replace(
        stage, data={f: stage.data[f] for f in families}, trains=["language_model.*.mlp.*"], experts_from=None,
        train=dataclasses.replace(stage.train, steps=stage.expert_steps, ckpt_every=0))
    _train_stage(copy_model, group_stage, datasets, processor, out / "train", seed, resume, f"{stage.name}:ffn-{out.name}",
                 engine, out.parents[2] / "features")
    ffns = {}
    for i, layer in enumerate(decoder_layers(copy_model.hf_model)):
        ffns.update({f"{i}/{k}": v.detach().clone() for k, v in layer.mlp.state_dict().items()})
    return ffns


def load_expert_seeds(path: Path) -> list[dict[int, dict[str, torch.Tensor]]] | None:
    """The FFN copies a specialize stage saved (`experts_from`), as `upcycle_from_experts` takes them."""
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


def upcycle_for_stage(model: MultimodalMoE, moe: MoEConfig, seeds=None) -> None:
    """Upcycle the model's LM in place: copies of its FFNs, or experts seeded from `seeds`."""
    if seeds:
        model.language_model = upcycle_from_experts(model.hf_model, seeds, moe)
    else:
        model.language_model = upcycle(model.hf_model, moe)


def _evaluate(recipe: RecipeConfig, model, processor, datasets, families, output: str) -> dict[str, dict[str, Any]]:
    """Score `model` on each family's test split; `{"<family>/<metric>": {value, command, dataset}}`."""
    from zoo.pipelines.eval import METRIC_OF_FAMILY, SCORED, evaluate

    if recipe.eval is None:
        return {}
    out = {}
    for family in sorted(f for f in families if f in METRIC_OF_FAMILY):
        keep = SCORED.get(family, lambda s: True)
        test = [s for s in datasets.test[family] if keep(s)][: recipe.eval.limit]  # limit what is scored
        r = evaluate(model, processor, test, family=family, train=datasets[family],
                     max_new_tokens=recipe.eval.max_new_tokens)
        command = (f"python -m zoo.pipelines.eval --checkpoint RUN/{output} --data RUN/data --family {family}"
                   + (f" --limit {recipe.eval.limit}" if recipe.eval.limit else "")
                   + f"  # RUN: the run directory of recipe {recipe.name} ($ZOO_HOME/runs/{recipe.name} for zoo build)")
        dataset = f"{family} test split, {r['n']} samples"
        out[f"{family}/{r['metric']}"] = {"value": r["value"], "command": command, "dataset": dataset}
        out[f"{family}/majority_baseline"] = {"value": r["baseline"], "command": command, "dataset": dataset}
    return out


def _plot_routing(model, processor, datasets, path: Path, title: str) -> None:
    """After an MoE stage: write the per-layer expert load of each task family as a PNG."""
    from zoo.pipelines.routing_plot import expert_load_by_family, plot_expert_load

    loads = expert_load_by_family(model, processor, datasets)
    if loads:
        plot_expert_load(loads, path, f"{title}: expert load by task family (dashed: uniform)")
        (path.with_suffix(".json")).write_text(json.dumps(loads, indent=1))


def _set_lm(model: MultimodalMoE, hf_lm: torch.nn.Module) -> None:
    """Put `hf_lm` where the transformers LM lives (inside MoECausalLM when sparse)."""
    from zoo.lm import MoECausalLM

    if isinstance(model.language_model, MoECausalLM):
        model.language_model.lm = hf_lm
    else:
        model.language_model = hf_lm



class Datasets(dict):
    """family -> training samples, with `.test` (family -> test samples) beside it."""

    def __init__(self, train: dict[str, list], test: dict[str, list]):
        super().__init__(train)
        self.test = test


def load_datasets(data_dir: Path, families: set[str], split: str = "train") -> dict[str, list]:
    """Samples of `split` per family; the plain-text `corpus` becomes samples with no instruction."""
    from zoo.pipelines.data.schema import Sample
    from zoo.pipelines.data.shards import load_split

    out = {}
    for family in sorted(families):
        if family == "corpus":
            name = "train.txt" if split == "train" else "val.txt"
            lines = (data_dir / "corpus" / name).read_text().splitlines()
            out[family] = [Sample(f"corpus-{split}-{i}", "corpus", split, "", line) for i, line in enumerate(lines) if line.strip()]
        else:
            out[family] = load_split(data_dir / family, split)
    return out


def prepare(recipe: RecipeConfig, out_dir: Path, data_dir: Path | None = None):
    """Build the data (if absent), train the tokenizer (if absent), make the processor.

    Returns:
        (train datasets per family, processor).
    """
    from zoo.pipelines.data.build import build_all
    from zoo.processor import MultimodalProcessor
    from zoo.tokenizer import load_tokenizer, train_tokenizer

    families = {f for s in recipe.stages for f in s.data}
    data_dir = Path(data_dir) if data_dir is not None else out_dir / "data"
    missing = sorted(f for f in families | {"corpus"} if not (data_dir / f).is_dir())
    if missing:
        build_all(data_dir, recipe.data.get("max_per_split"), families=tuple(missing),
                  options={f: o for f, o in recipe.data.get("options", {}).items() if f in missing})
    datasets = load_datasets(data_dir, families | {"corpus"})
    tokenizer_dir = out_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        vocab = recipe.model.lm.config.get("vocab_size")
        if vocab != recipe.tokenizer_vocab:
            raise ValueError(f"recipe {recipe.name!r}: tokenizer_vocab {recipe.tokenizer_vocab} != the LM's vocab_size {vocab}")
        texts = [t for samples in datasets.values() for s in samples for t in (s.instruction, s.answer) if t]
        train_tokenizer(texts, vocab_size=recipe.tokenizer_vocab).save_pretrained(str(tokenizer_dir))
    tokenizer = load_tokenizer(tokenizer_dir)
    processor = MultimodalProcessor.from_model(build_model(recipe.model), tokenizer)
    test = load_datasets(data_dir, families - {"corpus"}, "test") if recipe.eval is not None else {}
    return Datasets({f: d for f, d in datasets.items() if f in families}, test), processor


def run_recipe(
    recipe: RecipeConfig,
    out_dir: str | Path,
    *,
    only: list[str] | None = None,
    resume: bool = False,
    data_dir: str | Path | None = None,
    engine: EngineSpec | None = None,
) -> dict[str, Path]:
    """Run the recipe's stages in order (or only the named ones), each from the one before.

    Args:
        recipe: the recipe.
        out_dir: run directory: `data/`, `tokenizer/`, and `<stage>/` per stage.
        only: stage names to run (each needs its previous stage's output on disk).
        resume: continue each stage from its newest training checkpoint.
        data_dir: read (or build) the data here instead of `out_dir/data`.
        engine: the engine (default: one-process PyTorch).

    Returns:
        output name -> checkpoint directory, for every stage run.
    """
    engine = engine or EngineSpec()
    out_dir = Path(out_dir)
    for name in only or []:
        recipe.stage(name)  # names an unknown stage
    if engine.kind == "deepspeed":
        from zoo.pipelines.deepspeed_engine import init_distributed

        init_distributed()
    if not _is_main():
        _barrier()  # rank 0 builds the data and the tokenizer first
    datasets, processor = prepare(recipe, out_dir, data_dir)
    if _is_main():
        _barrier()
    outputs = {}
    for stage in recipe.stages:
        if only and stage.name not in only:
            continue
        outputs.update(run_stage(recipe, stage, out_dir, datasets, processor, resume=resume, engine=engine))
    return outputs
