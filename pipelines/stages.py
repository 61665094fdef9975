"""Training stages as data, and the recipe runner that chains them.

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
  lora         one LoRA (PEFT) per task family on the MoE model, merged into per-family checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save

from zoo.checkpoint import load_checkpoint, save_checkpoint
from zoo.config import ModelConfig, MoEConfig, config_from_dict
from zoo.model import MultimodalMoE, build_model, model_from_checkpoint_config
from zoo.pipelines.collate import MixedBatches
from zoo.pipelines.engine import TorchEngine
from zoo.pipelines.train import TrainConfig, train
from zoo.lm import decoder_layers
from zoo.upcycle import upcycle, upcycle_from_experts

STAGE_KINDS = ("pretrain-lm", "align", "specialize", "moe-tune", "lora")

DEFAULT_TRAINS = {
    "pretrain-lm": ["language_model.*"],
    "align": ["connectors.*"],
    "specialize": ["language_model.*", "connectors.*"],
    "moe-tune": ["language_model.*.mlp.moe.*"],  # routers + experts; attention, norms, embeddings frozen
    "lora": ["*lora_*"],  # mixlora: whatever the transform left trainable (LoRA + its routers)
}


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
                 spec: EngineSpec):
    trainable = set_trainable(model, stage.trains)
    ep_size = 1
    mixed = MixedBatches(datasets, stage.data, processor, stage.batch_size, seed)
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
                                         recipe.seed + index, resume, stage.name, engine)
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
                                         recipe.seed + index, resume, f"{stage.name}:{family}", engine)
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
    _train_stage(copy_model, group_stage, datasets, processor, out / "train", seed, resume, f"{stage.name}:ffn-{out.name}", engine)
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


def stage_summary(path: Path) -> dict[str, Any]:
    """The extra fields a stage stored with its output (stage, trained params, final loss)."""
    return {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k != "model"}


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
