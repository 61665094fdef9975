"""`zoo experiment`: a recipe's variants × seeds, scored with confidence intervals over seeds.

One training run is not evidence: the same code and seed on two of our machines gave asr exact
match 0.862 and 0.715. An experiment config (`configs/experiments/<name>.yaml`) names a base
recipe, the overrides every variant shares (`overrides`: usually the budget), named variants
(overrides of stages and options), the seeds, the stage whose outputs are measured, and the
claims to test (`compare`). `run_experiment` then

1. plans every (variant, seed) run as a recipe; each stage gets a key (sha256 of the code, the
   model, data and tokenizer settings, the seed, and the configs of the stage and of every stage
   it starts from), so stages that variants share run once per seed and are reused (also across
   experiments that use the same store);
2. runs the stages the measured stage needs, skipping those already finished (a `done.json`
   beside their outputs): after a kill, a re-run continues where it stopped (a stage that was
   training resumes from its newest training checkpoint);
3. measures each output: the task metric per family on the test split (greedy generation, the
   majority-answer baseline beside it), mean experts per token over the language model's MoE
   layers, active parameters and FLOPs per token, trainable parameters, stored bytes, wall time;
4. reports per variant and family the mean and the 95% Student-t interval over seeds
   (`zoo.pipelines.experiment_stats`), each claim's paired difference with its interval and
   verdict: `results.json`, `results.md` and `results.png` (`zoo.pipelines.experiment_report`).

A run that fails is recorded with its error and the others go on (the command then exits 1).

Seeds: run seed s sets the recipe's seed to `1000 s` (model initialization, data order: stage i
draws batches with seed `1000 s + i`), each stage's `train.seed` to `1000 s + i` (dropout, router
noise), the global torch RNG to `1000 s + i` before stage i's hooks (LoRA and router
initialization), and adds `1000 s` to the seed of every upcycler that takes one (noisy and split
upcycling). The data itself is the same for every seed (one benchmark, built once).

Layout (OUT: the experiment's directory; STORE: the stage store, shareable between experiments):

    STORE/data-<key>/                  the built data (one per data config)
    STORE/tokenizer-<key>/tokenizer/   the tokenizer (one per data config, families and vocabulary)
    STORE/features/                    the frozen-encoder feature cache
    STORE/stage-<key>/                 one stage: model/ (or <family>/model/ per family), train/,
                                       done.json, measure-<key>.json (its measurements), lock
    OUT/runs/<variant>/seed-<s>/       a run directory: symlinks to the above
    OUT/results.json, results.md, results.png
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import functools
import hashlib
import json
import math
import os
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.config import config_from_dict, in_file, load_yaml, rewrap, sub_config, to_plain
from zoo.pipelines.experiment_report import EFFICIENCY, summarize, write_reports, write_text_atomic
from zoo.pipelines.experiment_stats import EXPECTATIONS

SEED_STRIDE = 1000
# Bump when the harness changes what a stage computes (its seeding): stored stages are not reused.
HARNESS_VERSION = 1
INFERENCE_OPTIONS = ("top_k", "rank", "disable", "force")


@dataclass
class Comparison:
    """A claim from a paper: variant `a` against its control `b`, paired by seed.

    Attributes:
        a: the method's variant.
        b: the control's variant.
        claim: the claim in words.
        paper: where it comes from.
        expect: what `a - b` should be: "higher", "lower", "not_lower" (no worse than `margin`
            below), "not_higher".
        metric: "task" (each family's task metric) or one of the efficiency fields
            (`experts_per_token`, `max_vio`, `active_params`, `flops_per_token`, `trainable_params`,
            `stored_bytes`, `wall_s`).
        margin: tolerance of the "not_*" expectations, in the metric's units.
    """

    a: str
    b: str
    claim: str = ""
    paper: str = ""
    expect: str = "higher"
    metric: str = "task"
    margin: float = 0.02

    def __post_init__(self) -> None:
        if self.expect not in EXPECTATIONS:
            raise ValueError(f"compare {self.a} vs {self.b}: expect must be one of {list(EXPECTATIONS)}, got {self.expect!r}")
        if self.metric != "task" and self.metric not in EFFICIENCY:
            raise ValueError(f"compare {self.a} vs {self.b}: metric must be 'task' or one of {list(EFFICIENCY)}, "
                             f"got {self.metric!r}")


@dataclass
class MeasureSpec:
    """How each measured output is scored.

    Attributes:
        limit: scored test samples per family (None: all).
        max_new_tokens: greedy generation length.
        batch_size: generation batch size.
        routing_samples: test samples per family in the forward pass that counts experts per token.
    """

    limit: int | None = 100
    max_new_tokens: int = 12
    batch_size: int = 16
    routing_samples: int = 16


@dataclass
class ExperimentConfig:
    """Variants × seeds of one recipe.

    Attributes:
        name: the experiment's name.
        recipe: the base recipe (a YAML path, relative to the experiment file, or a shipped name).
        seeds: run seeds (at least one; 3-5 for an interval that says something).
        variants: variant name -> overrides (below); `{}` is the recipe as it is.
        only: keep only these stages of the recipe (in its order); default all.
        extend: stage configs appended to the recipe (for every variant).
        overrides: overrides applied to every variant before its own (e.g. fewer steps).
        measure: the stage whose outputs are measured (default: the last one). Only it and the
            stages it starts from (transitively) run.
        factor: dotted paths (fnmatch patterns) in which variants may differ, e.g.
            `stages.moe-tune.options.moe.router`; when given, a difference anywhere else is an
            error naming the path (the fair control). Paths are over the resolved recipe:
            `stages.<stage name>.<field>...`, `data...`, `model...`.
        eval: how outputs are scored (`MeasureSpec`).
        compare: the claims (`Comparison`).
        level: confidence level of every interval.
        description: what the study asks, in words (copied into results.md).
        equal: efficiency field -> relative tolerance: fields the variants are meant to have equal
            (e.g. `{trainable_params: 0.1}` for adapters compared at equal trainable parameters);
            results.md states whether the measured means are within it.

    Overrides are a mapping: `stages: {<stage name>: <partial stage config> | null}` deep-merges
    into that stage (`null` drops it; lists are replaced, not merged; a different `kind`, `router`,
    `upcycler`, `adapter` or `experts` starts its options afresh: `NAME_OPTIONS`), and any other
    recipe field (`data`, `tokenizer_vocab`, `model`) replaces or deep-merges into the recipe's.
    An unknown stage, field or option is an error naming it. A variant may also hold `inference:` (`zoo.inference.override_routing` keywords:
    `top_k`, `rank`, `disable`, `force`): its outputs are measured under that routing override,
    so variants that differ only there share every stage (SMoE-Dropout's k at inference).
    """

    name: str
    recipe: str
    seeds: list[int]
    variants: dict[str, Any]
    only: list[str] | None = None
    extend: list[dict] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    measure: str | None = None
    factor: list[str] | None = None
    eval: MeasureSpec = field(default_factory=MeasureSpec)
    compare: list[Comparison] = field(default_factory=list)
    level: float = 0.95
    description: str = ""
    equal: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"experiment {self.name!r}"
        if not isinstance(self.seeds, list) or not self.seeds:
            raise ValueError(f"{where}: `seeds` must list at least one seed, got {self.seeds!r}")
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in self.seeds):
            raise ValueError(f"{where}: seeds must be non-negative integers, got {self.seeds}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"{where}: duplicate seeds in {self.seeds}")
        if not isinstance(self.variants, dict) or not self.variants:
            raise ValueError(f"{where}: `variants` must name at least one variant (name -> overrides)")
        for name, value in self.variants.items():
            if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
                raise ValueError(f"{where}: variant names must be non-empty strings without '/' (they name "
                                 f"directories), got {name!r} (YAML reads a bare null/yes/no/1 as a non-string: quote it)")
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{where}: variant {name!r} must be a mapping of overrides, got {type(value).__name__}")
        self.variants = {k: dict(v or {}) for k, v in self.variants.items()}
        for name, value in self.variants.items():
            inference = value.get("inference")
            if inference is not None and (not isinstance(inference, dict)
                                          or set(inference) - set(INFERENCE_OPTIONS)):
                raise ValueError(f"{where}: variant {name!r}: `inference` must map override_routing options "
                                 f"{list(INFERENCE_OPTIONS)} to values, got {inference!r}")
        unknown = sorted(set(self.equal or {}) - set(EFFICIENCY))
        if unknown:
            raise ValueError(f"{where}: `equal` names {unknown}; efficiency fields: {list(EFFICIENCY)}")
        self.eval = sub_config(MeasureSpec, self.eval, f"{where}: eval")
        self.compare = [sub_config(Comparison, c, f"{where}: compare[{i}]") for i, c in enumerate(self.compare or [])]
        for c in self.compare:
            for v in (c.a, c.b):
                if v not in self.variants:
                    raise ValueError(f"{where}: compare names variant {v!r}; variants: {list(self.variants)}")
        if not 0 < self.level < 1:
            raise ValueError(f"{where}: level must be in (0, 1), got {self.level}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExperimentConfig:
        """Read an experiment YAML file, or a shipped one by name (`configs/experiments/<name>.yaml`)."""
        from zoo.resources import config_path

        p = Path(path)
        if not p.is_file() and p.suffix == "" and len(p.parts) == 1:
            p = config_path("experiments", str(path), ".yaml")
        if not p.is_file():
            raise FileNotFoundError(f"experiment {str(path)!r} does not exist")
        data = load_yaml(p)
        if not isinstance(data, dict):
            raise ValueError(f"experiment {str(p)!r} must be a YAML mapping")
        recipe = data.get("recipe")
        if isinstance(recipe, str) and Path(recipe).suffix and not Path(recipe).is_absolute():
            data["recipe"] = str((p.parent / recipe).resolve())
        with in_file(p):
            return config_from_dict(cls, data)


# ---------------------------------------------------------------------------------------- planning


# A registered name and the settings that belong to it: overriding the name with a different one
# starts them afresh (a topk router's `top_k` means nothing to a topp router).
NAME_OPTIONS = {"kind": ("options",), "router": ("router_options", "loss_coefs"), "upcycler": ("upcycler_options",),
                "adapter": ("adapter_options",), "experts": ("experts_options",)}


def _deep_merge(base: Any, patch: Any) -> Any:
    """`patch` over `base`: mappings merge key by key, everything else (lists included) is replaced.

    Where `patch` changes a registered name (`kind`, `router`, `upcycler`, `adapter`, `experts`),
    the base's settings of the old name (`NAME_OPTIONS`) are dropped before merging.
    """
    if isinstance(base, Mapping) and isinstance(patch, Mapping):
        out = dict(base)
        for name, owned in NAME_OPTIONS.items():
            if name in patch and patch[name] != base.get(name):
                for key in owned:
                    out.pop(key, None)
        for k, v in patch.items():
            out[k] = _deep_merge(out[k], v) if k in out else copy.deepcopy(v)
        return out
    return copy.deepcopy(patch)


def _recipe_fields() -> list[str]:
    from zoo.pipelines.stages import RecipeConfig

    return [f.name for f in dataclasses.fields(RecipeConfig) if f.name not in ("name", "stages", "seed", "eval")]


def apply_overrides(recipe: dict, overrides: Mapping[str, Any], where: str) -> dict:
    """The raw recipe dict with `overrides` applied (see `ExperimentConfig`).

    Raises:
        ValueError: an override names a stage the recipe does not have, a recipe field that does
            not exist or cannot be overridden, or renames a stage.
    """
    out = copy.deepcopy(recipe)
    for key, value in (overrides or {}).items():
        if key == "stages":
            if not isinstance(value, Mapping):
                raise TypeError(f"{where}: `stages` overrides map stage names to partial stage configs, got "
                                f"{type(value).__name__}")
            for name, patch in value.items():
                names = [s.get("name") for s in out["stages"]]
                if name not in names:
                    raise ValueError(f"{where}: overrides stage {name!r}, which recipe {out.get('name')!r} does not have; "
                                     f"stages: {names}")
                i = names.index(name)
                if patch is None:
                    del out["stages"][i]
                    continue
                if not isinstance(patch, Mapping):
                    raise TypeError(f"{where}: the override of stage {name!r} must be a mapping or null, got "
                                    f"{type(patch).__name__}")
                if patch.get("name", name) != name:
                    raise ValueError(f"{where}: the override of stage {name!r} renames it to {patch['name']!r}; "
                                     "a variant keeps the recipe's stage names")
                out["stages"][i] = _deep_merge(out["stages"][i], dict(patch))
        else:
            allowed = _recipe_fields()
            if key not in allowed:
                raise ValueError(f"{where}: unknown recipe field {key!r} in the overrides; overridable: {allowed} "
                                 "and `stages` (seed and eval are the experiment's)")
            out[key] = _deep_merge(out.get(key), value) if key in out else copy.deepcopy(value)
    return out


def recipe_path(exp: ExperimentConfig) -> Path:
    """The experiment's recipe file (a path, or a shipped recipe's name)."""
    from zoo.resources import config_path

    p = Path(exp.recipe)
    if not p.is_file() and p.suffix == "" and len(p.parts) == 1:
        p = config_path("recipes", exp.recipe, ".yaml")
    if not p.is_file():
        raise FileNotFoundError(f"experiment {exp.name!r}: recipe {exp.recipe!r} does not exist")
    return p.resolve()


def base_recipe_dict(exp: ExperimentConfig) -> dict:
    """The experiment's recipe as a raw dict: the file, `only` stages kept, `extend` appended, `overrides` applied."""
    p = recipe_path(exp)
    raw = load_yaml(p)
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list):
        raise ValueError(f"experiment {exp.name!r}: recipe {str(p)!r} is not a recipe mapping with `stages`")
    if isinstance(raw.get("model"), str) and not Path(raw["model"]).is_absolute():
        raw["model"] = str((p.parent / raw["model"]).resolve())
    if exp.only is not None:
        names = [s.get("name") for s in raw["stages"]]
        unknown = [n for n in exp.only if n not in names]
        if unknown:
            raise ValueError(f"experiment {exp.name!r}: `only` names stages {unknown} that recipe {raw.get('name')!r} "
                             f"does not have; stages: {names}")
        raw["stages"] = [s for s in raw["stages"] if s.get("name") in exp.only]
    raw["stages"] = [*raw["stages"], *copy.deepcopy(exp.extend or [])]
    raw["name"] = f"{exp.name}"
    return apply_overrides(raw, exp.overrides, f"experiment {exp.name!r}: overrides")


def variant_recipe_dict(exp: ExperimentConfig, variant: str) -> dict:
    """The raw recipe dict of one variant (before seeding)."""
    if variant not in exp.variants:
        raise ValueError(f"experiment {exp.name!r} has no variant {variant!r}; variants: {list(exp.variants)}")
    overrides = {k: v for k, v in exp.variants[variant].items() if k != "inference"}
    raw = apply_overrides(base_recipe_dict(exp), overrides, f"experiment {exp.name!r}: variant {variant!r}")
    raw["name"] = f"{exp.name}-{variant}"
    raw["eval"] = None  # the experiment measures its outputs itself (`MeasureSpec`)
    return raw


def _upcycler_seeds(options: Any, offset: int) -> Any:
    """`options` with `offset` added to the seed of every upcycler in it that takes one (noisy, split)."""
    from zoo.transforms.upcycle import UPCYCLERS

    if isinstance(options, list):
        return [_upcycler_seeds(v, offset) for v in options]
    if not isinstance(options, dict):
        return options
    out = {k: _upcycler_seeds(v, offset) for k, v in options.items()}
    name = out.get("upcycler")
    if isinstance(name, str) and name in UPCYCLERS.names():
        fields = {f.name: f for f in dataclasses.fields(UPCYCLERS.options(name, {}))} if UPCYCLERS.entry(name).options else {}
        if "seed" in fields:
            opts = dict(out.get("upcycler_options") or {})
            opts["seed"] = int(opts.get("seed", fields["seed"].default)) + offset
            out["upcycler_options"] = opts
    return out


def seeded_recipe_dict(raw: dict, seed: int) -> dict:
    """`raw` with run seed `seed` in every random source the recipe controls (see the module docstring)."""
    out = copy.deepcopy(raw)
    base = seed * SEED_STRIDE
    out["seed"] = base
    for i, stage in enumerate(out["stages"]):
        train = dict(stage.get("train") or {})
        train["seed"] = base + i
        stage["train"] = train
        if "options" in stage:
            stage["options"] = _upcycler_seeds(stage["options"], base)
    return out


def build_recipe(raw: dict, where: str):
    """A validated `RecipeConfig` from a raw dict, errors prefixed with `where`."""
    from zoo.pipelines.stages import RecipeConfig

    try:
        return config_from_dict(RecipeConfig, copy.deepcopy(raw))
    except (TypeError, ValueError) as e:
        raise rewrap(e, where) from None


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    """Leaves of nested dicts as `{dotted path: value}`; an empty mapping is no leaf (as if absent)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def recipe_paths(recipe) -> dict[str, Any]:
    """The resolved recipe as `{dotted path: leaf value}`, stages keyed by name (`stages.<name>.<field>`)."""
    plain = to_plain(recipe)
    plain["stages"] = {s["name"]: {k: v for k, v in s.items() if k != "name"} for s in plain["stages"]}
    for key in ("name", "eval", "seed"):
        plain.pop(key, None)
    out: dict[str, Any] = {}
    _flatten(plain, "", out)
    return out


def check_factor(exp: ExperimentConfig, recipes: Mapping[str, Any]) -> None:
    """Raise if two variants differ outside the declared `factor` paths (nothing to check without one).

    Raises:
        ValueError: naming the first path and the two variants that differ there.
    """
    if exp.factor is None:
        return
    names = list(recipes)
    paths = {}
    for v, r in recipes.items():
        paths[v] = recipe_paths(r)
        _flatten({"inference": exp.variants[v].get("inference") or {}}, "", paths[v])
    ref = names[0]
    for other in names[1:]:
        a, b = paths[ref], paths[other]
        for path in sorted(set(a) | set(b)):
            same = path in a and path in b and a[path] == b[path]
            if same:
                continue
            # a path present in one only: a subtree that exists in one variant (a stage, an option)
            if not any(fnmatch.fnmatchcase(path, f) or fnmatch.fnmatchcase(path, f + ".*") for f in exp.factor):
                show = lambda d: repr(d[path]) if path in d else "absent"  # noqa: E731
                raise ValueError(
                    f"experiment {exp.name!r}: variants {ref!r} and {other!r} differ in {path} ({show(a)} vs {show(b)}), "
                    f"outside the declared factor {exp.factor}: make them equal or add the path to `factor`"
                )


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """sha256 of the library and training sources (a stage is reused only by the same code).

    Computed once per process: the process runs the code it imported, whatever changes on disk later.
    """
    import zoo
    import zoo.encoders
    import zoo.kernels
    import zoo.pipelines

    digest = hashlib.sha256(f"harness-{HARNESS_VERSION}".encode())
    for pkg in (zoo, zoo.encoders, zoo.kernels, zoo.pipelines):
        root = Path(pkg.__file__).resolve().parent
        for path in sorted(root.rglob("*.py")):
            if path.name.startswith("experiment") or path.name == "cli.py":  # the harness, its reports and
                continue  # the command line do not change what a stage computes
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class RunPlan:
    """One (variant, seed) run.

    Attributes:
        variant: the variant's name.
        seed: the run seed.
        recipe: its seeded `RecipeConfig`.
        chain: indices of the stages it runs, in order (the measured stage and those it starts from).
        keys: stage name -> stage key (for the stages in `chain`).
        data_key: key of the data directory.
        tokenizer_key: key of the tokenizer directory.
        inference: routing override the outputs are measured under (`override_routing` keywords).
    """

    variant: str
    seed: int
    recipe: Any
    chain: list[int]
    keys: dict[str, str]
    data_key: str
    tokenizer_key: str
    inference: dict = field(default_factory=dict)

    @property
    def measured(self):
        return self.recipe.stages[self.chain[-1]]

    @property
    def name(self) -> str:
        return f"{self.variant}/seed-{self.seed}"


def _chain(recipe, measure: str | None) -> list[int]:
    index = len(recipe.stages) - 1 if measure is None else recipe.stages.index(recipe.stage(measure))
    chain = [index]
    while (start := recipe.start_of(chain[-1])) is not None:
        chain.append(recipe.stages.index(start))
    return chain[::-1]


def plan(exp: ExperimentConfig, *, variants: list[str] | None = None, seeds: list[int] | None = None) -> list[RunPlan]:
    """Every (variant, seed) run of the experiment, with its stage keys; checks the factor.

    Args:
        exp: the experiment.
        variants: plan only these variants (default all).
        seeds: plan only these seeds (default the experiment's).

    Raises:
        ValueError: bad overrides (an unknown stage, field or option), a variant outside the
            declared factor, an unknown variant or measured stage.
    """
    unknown = sorted(set(variants or []) - set(exp.variants))
    if unknown:
        raise ValueError(f"experiment {exp.name!r} has no variant(s) {unknown}; variants: {list(exp.variants)}")
    if seeds is not None and not seeds:
        raise ValueError(f"experiment {exp.name!r}: the seed list is empty")
    raws = {v: variant_recipe_dict(exp, v) for v in exp.variants}
    recipes = {v: build_recipe(r, f"experiment {exp.name!r}: variant {v!r}") for v, r in raws.items()}
    check_factor(exp, recipes)
    for v, r in recipes.items():
        if exp.measure is not None:
            try:
                r.stage(exp.measure)
            except ValueError as e:
                raise ValueError(f"experiment {exp.name!r}: variant {v!r}: measure: {e}") from None
    code = _code_version()
    runs = []
    for v in variants or list(exp.variants):
        for s in seeds if seeds is not None else exp.seeds:
            recipe = build_recipe(seeded_recipe_dict(raws[v], s), f"experiment {exp.name!r}: variant {v!r}")
            data_key = _hash({"code": code, "data": recipe.data})
            families = sorted({f for st in recipe.stages for f in st.data})
            tokenizer_key = _hash({"data": data_key, "families": families, "vocab": recipe.tokenizer_vocab,
                                   "lm": recipe.model.lm.config.get("vocab_size")})
            chain = _chain(recipe, exp.measure)
            common = {"code": code, "model": to_plain(recipe.model), "tokenizer": tokenizer_key, "seed": recipe.seed}
            keys = {}
            for pos, i in enumerate(chain):
                links = [(j, to_plain(recipe.stages[j])) for j in chain[: pos + 1]]
                keys[recipe.stages[i].name] = _hash({**common, "stages": links})
            runs.append(RunPlan(v, s, recipe, chain, keys, data_key, tokenizer_key, dict(exp.variants[v].get("inference") or {})))
    return runs


# ----------------------------------------------------------------------------------------- running


def _count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def routing_cost(model, batch: dict) -> dict[str, Any]:
    """Experts per token, active parameters and FLOPs per token of the language model on `batch`.

    An expert's parameters are the ones stacked over experts in a `SparseMoE`'s experts module
    (first dimension E: the routed FFN experts, MixLoRA's and LoRAMoE's LoRA experts; a frozen
    FFN the LoRA experts sit on is shared, so always active). Per MoE layer, `E - experts/token`
    experts' parameters are inactive for an average token (null experts and empty slots count as
    no expert). FLOPs per token: `2 x` the active parameters that multiply (the input embedding
    lookup is not a matmul; a tied output head counts once), the usual 2N forward estimate
    without attention's sequence-length term.

    Args:
        model: a `MultimodalMoE`.
        batch: its inputs (`collate` with answers).

    Returns:
        `{"experts_per_token": mean over the LM's MoE layers or None (dense), "per_layer": [...],
        "max_vio": MaxVio (max load / mean load - 1) averaged over the MoE layers or None,
        "max_vio_per_layer", "active_params", "total_params", "flops_per_token"}` (LM only).
    """
    import torch

    from zoo.moe.capture import capture_routing
    from zoo.moe.losses import experts_per_token, load_fraction, max_violation

    lm = model.language_model
    with torch.no_grad(), capture_routing(lm) as records:
        model(**batch)
    total = _count_params(lm)
    inactive = 0.0
    per_layer: dict[str, float] = {}
    max_vio: dict[str, float] = {}
    for r in records:
        e = r.num_experts
        ept = float(experts_per_token(r.output.indices, r.context.get("mask")))
        per_layer[r.name] = ept
        max_vio[r.name] = float(max_violation(load_fraction(r.output.indices, e, r.context.get("mask"))))
        experts = lm.get_submodule(r.name).experts
        stacked = sum(p.numel() for p in experts.parameters() if p.dim() and p.shape[0] == e)
        inactive += stacked * (1 - ept / e)
    hf = model.hf_model
    emb, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    active = total - inactive
    return {
        "experts_per_token": sum(per_layer.values()) / len(per_layer) if per_layer else None,
        "per_layer": per_layer,
        "max_vio": sum(max_vio.values()) / len(max_vio) if max_vio else None,
        "max_vio_per_layer": max_vio,
        "total_params": total,
        "active_params": round(active),
        "flops_per_token": round(2 * (active - (0 if tied else emb.weight.numel()))),
    }


def _trainable_params(output: Path) -> int | None:
    """Parameters the output's stage trained: the names in its config, sized from its final training
    checkpoint; for an ESFT output the rows of its expert adapter (ESFT masks the gradient of the
    stacked expert tensors to the selected experts' rows, so the trained names overstate it)."""
    from safetensors import safe_open

    from zoo.io.checkpoint import WEIGHTS_NAME
    from zoo.io.expert_adapter import EMBEDDED_WEIGHTS
    from zoo.pipelines.train import checkpoints

    if (output / EMBEDDED_WEIGHTS).is_file():
        with safe_open(str(output / EMBEDDED_WEIGHTS), "pt") as f:
            return sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys())
    config = json.loads((output / "config.json").read_text())
    names = set(config.get("trained") or [])
    found = checkpoints(output.parent / "train")
    if not found or not (found[-1] / WEIGHTS_NAME).is_file():
        return None
    with safe_open(str(found[-1] / WEIGHTS_NAME), "pt") as f:
        return sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys() if n in names)


def _stored_bytes(output: Path) -> int:
    """What a release of the output stores: its weights, or for an ESFT output its expert adapter alone."""
    config = json.loads((output / "config.json").read_text())
    esft = config.get("esft") if isinstance(config.get("esft"), dict) else None
    if esft and "adapter_bytes" in esft:
        return int(esft["adapter_bytes"])
    return sum(p.stat().st_size for p in output.glob("model*.safetensors"))


def _routing_override(model, inference: Mapping[str, Any] | None):
    """`override_routing` on the model's language model, or nothing."""
    if not inference:
        return contextlib.nullcontext()
    from zoo.inference.overrides import override_routing

    return override_routing(model.language_model, **dict(inference))


def measure_output(output: Path, families: list[str], test: Mapping[str, list], train: Mapping[str, list],
                   spec: MeasureSpec, inference: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Score one stage output: task metric per family, routing cost, trainable parameters, stored bytes.

    Args:
        output: the output's model directory.
        families: the families it is scored on.
        test: family -> test samples.
        train: family -> training samples (the majority-answer baseline).
        spec: how it is scored.
        inference: `override_routing` keywords for the language model's MoE layers (None: as trained).

    Returns:
        `{"families": {family: {"metric", "value", "baseline", "n"}}, **routing_cost, "trainable_params",
        "stored_bytes"}`.
    """
    import torch

    from zoo.catalog.load import load_directory
    from zoo.pipelines.collate import collate
    from zoo.pipelines.eval import METRIC_OF_FAMILY, SCORED, evaluate

    torch.manual_seed(0)
    model, processor, _ = load_directory(output)
    with _routing_override(model, inference):
        scored = {}
        for family in [f for f in families if f in METRIC_OF_FAMILY]:
            keep = SCORED.get(family, lambda s: True)
            samples = [s for s in test[family] if keep(s)][: spec.limit]
            r = evaluate(model, processor, samples, family=family, train=train[family], batch_size=spec.batch_size,
                         max_new_tokens=spec.max_new_tokens)
            scored[family] = {k: r[k] for k in ("metric", "value", "baseline", "n")}
        samples = [s for f in sorted(families) if f in test for s in test[f][: spec.routing_samples]]
        cost = routing_cost(model, collate(samples, processor)) if samples else {}
    return {"families": scored, **cost, "trainable_params": _trainable_params(output), "stored_bytes": _stored_bytes(output)}


@dataclass
class RunResult:
    """What one (variant, seed) run gave.

    Attributes:
        variant, seed: the run.
        outputs: output name -> measurement (`measure_output`) with `family` (the branch's, or None).
        wall_s: seconds its stages took from scratch (shared stages included, as if run alone).
        error: the failure, if it failed.
    """

    variant: str
    seed: int
    outputs: dict[str, dict] = field(default_factory=dict)
    wall_s: float | None = None
    error: str | None = None


class StageBusy(RuntimeError):
    """Another live process holds a stage's (or a measurement's) lock.

    Attributes:
        pid: the holder's process id.
    """

    def __init__(self, message: str, pid: int):
        super().__init__(message)
        self.pid = pid


@contextlib.contextmanager
def _stage_lock(stage_dir: Path, name: str, wait_s: float | None = None, poll_s: float = 2.0, on_wait=None,
                lock_name: str = "lock"):
    """Hold `stage_dir/<lock_name>` (this process's pid) while the stage runs, so that two experiments
    sharing a store never train the same stage at once; a lock left by a killed process is taken over.

    Args:
        stage_dir: the stage's store directory.
        name: the stage's name (for messages).
        wait_s: how long to wait for a live holder (None: until it ends; 0: refuse at once).
        poll_s: seconds between checks of the holder.
        on_wait: called once with the holder's pid when this process starts waiting.
        lock_name: the lock file's name (one per thing locked: the stage, each measurement).

    Raises:
        StageBusy: a live process still holds the lock after `wait_s`.
    """
    lock = stage_dir / lock_name
    deadline = None if wait_s is None else time.monotonic() + wait_s
    waiting = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                if deadline is not None and time.monotonic() >= deadline:
                    raise StageBusy(f"stage {name!r} ({stage_dir}) is being run by process {pid}; run this "
                                    "experiment after it ends (or remove the lock if that process is not ours)", pid) from None
                if not waiting and on_wait is not None:
                    on_wait(pid)
                waiting = True
                time.sleep(poll_s)
                continue
            lock.unlink(missing_ok=True)  # stale: its process was killed
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Runner:
    """Runs planned stages into the store, once each, and measures the outputs.

    A stage (or measurement) another live process is running is not waited for: `run` raises
    `StageBusy` and the caller runs other runs first (`run_experiment`).

    Args:
        exp, out_dir, store: the experiment, its directory, the stage store.
        since: `time.time()` from which a stage finished in the store counts as executed by this
            invocation, whichever process ran it (`run_experiments` with several jobs); None: only
            the stages this runner trained.
        counted: stage keys already counted as executed by this invocation (shared between the
            experiments of one `run_experiments` call, so each trained stage is counted once).

    Attributes:
        last: `time.time()` of the latest stage finish or measurement this runner saw.
    """

    def __init__(self, exp: ExperimentConfig, out_dir: Path, store: Path, since: float | None = None,
                 counted: set[str] | None = None):
        self.exp, self.out_dir, self.store, self.since = exp, out_dir, store, since
        self.counted = counted if counted is not None else set()
        self.last = 0.0
        self.prepared: dict[str, tuple] = {}
        self.failed: dict[str, str] = {}
        self.executed: list[str] = []
        self.reused: list[str] = []
        self.threads: set[int | None] = set()  # torch threads the run's stages trained with

    def _data(self, run: RunPlan):
        """(datasets with `.test` for every family, processor, tokenizer dir) of the run's data, built once."""
        from zoo.pipelines.datasets import load_datasets, prepare

        if run.tokenizer_key not in self.prepared:
            data_dir = self.store / f"data-{run.data_key}"
            tok_root = self.store / f"tokenizer-{run.tokenizer_key}"
            guard = self.store / f"prepare-{run.tokenizer_key}"  # two experiments sharing the store build it once
            guard.mkdir(parents=True, exist_ok=True)
            with _stage_lock(guard, "data and tokenizer"):
                datasets, processor = prepare(run.recipe, tok_root, data_dir)
            families = sorted(set(datasets) - {"corpus"})
            datasets.test = load_datasets(data_dir, set(families), "test")
            self.prepared[run.tokenizer_key] = (datasets, processor, tok_root / "tokenizer")
        return self.prepared[run.tokenizer_key]

    def _link(self, link: Path, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(os.readlink(link)) == target:
                return
            if link.is_dir() and not link.is_symlink():
                raise FileExistsError(f"{link} is a directory, not the store link the experiment expects")
            link.unlink()
        link.symlink_to(target, target_is_directory=True)

    def run_dir(self, run: RunPlan) -> Path:
        return self.out_dir / "runs" / run.variant / f"seed-{run.seed}"

    def _stage(self, run: RunPlan, index: int, datasets, processor, bar) -> float:
        """Run stage `index` of `run` unless its key is done; return its recorded wall time."""
        import torch

        from zoo.pipelines.runner import run_stage

        stage = run.recipe.stages[index]
        key = run.keys[stage.name]
        stage_dir = self.store / f"stage-{key}"
        self._link(self.run_dir(run) / stage.name, stage_dir)
        done = stage_dir / "done.json"
        if done.is_file():
            return self._reuse(key, done)
        if key in self.failed:
            raise RuntimeError(f"stage {stage.name!r} failed in an earlier run: {self.failed[key]}")
        if bar is not None:
            bar.set_postfix_str(f"{run.name}: {stage.name}")

        try:
            with _stage_lock(stage_dir, stage.name, wait_s=0):
                if done.is_file():  # another process sharing the store finished it meanwhile
                    return self._reuse(key, done)
                t0 = time.perf_counter()
                torch.manual_seed(run.recipe.seed + index)  # the stage's hooks draw from it (LoRA, router init)
                outputs = run_stage(run.recipe, stage, self.run_dir(run), datasets, processor, resume=True)
        except StageBusy as e:
            if bar is not None:
                bar.set_postfix_str(f"{run.name}: {stage.name}: process {e.pid} runs it; other runs first")
            raise
        except Exception as e:
            self.failed[key] = f"{type(e).__name__}: {e}"
            raise
        wall = round(time.perf_counter() - t0, 2)  # after a kill: the resumed part only
        write_text_atomic(done, json.dumps({"stage": stage.name, "key": key, "wall_s": wall, "run": run.name,
                                            "threads": torch.get_num_threads(), "pid": os.getpid(),
                                            "outputs": {k: str(Path(v).relative_to(self.run_dir(run))) for k, v in outputs.items()},
                                            "finished_at": time.time()}, indent=1))
        self.executed.append(key)
        self.counted.add(key)
        self.last = max(self.last, time.time())
        self.threads.add(torch.get_num_threads())
        return wall

    def _reuse(self, key: str, done: Path) -> float:
        """Count a finished stage (executed if it finished since `self.since`); its recorded wall time."""
        record = json.loads(done.read_text())
        self.threads.add(record.get("threads"))
        self.last = max(self.last, record.get("finished_at", 0))
        fresh = self.since is not None and record.get("finished_at", 0) >= self.since and key not in self.counted
        if fresh:
            self.counted.add(key)
        (self.executed if fresh else self.reused).append(key)
        return record["wall_s"]

    def _measure(self, run: RunPlan, datasets) -> dict[str, dict]:
        stage = run.measured
        stage_dir = self.store / f"stage-{run.keys[stage.name]}"
        spec_key = _hash({"eval": dataclasses.asdict(self.exp.eval), "inference": run.inference})
        cached = stage_dir / f"measure-{spec_key}.json"
        if cached.is_file():
            self.last = max(self.last, cached.stat().st_mtime)
            return json.loads(cached.read_text())
        with _stage_lock(stage_dir, f"{stage.name} (measurement)", wait_s=0, lock_name=f"measure-{spec_key}.lock"):
            if cached.is_file():
                return json.loads(cached.read_text())
            out = {}
            for branch in stage.stage().branches(stage):
                path = self.run_dir(run) / branch.path / "model"
                out[branch.output] = {"family": branch.family,
                                      **measure_output(path, sorted(branch.data), datasets.test, datasets, self.exp.eval,
                                                      run.inference)}
            write_text_atomic(cached, json.dumps(out, indent=1))
        self.last = max(self.last, time.time())
        return out

    def run(self, run: RunPlan, bar=None) -> RunResult:
        result = RunResult(run.variant, run.seed)
        try:
            datasets, processor, tokenizer = self._data(run)
            rd = self.run_dir(run)
            rd.mkdir(parents=True, exist_ok=True)
            self._link(rd / "tokenizer", tokenizer)
            self._link(rd / "features", self.store / "features")
            result.wall_s = round(sum(self._stage(run, i, datasets, processor, bar) for i in run.chain), 2)
            result.outputs = self._measure(run, datasets)
        except StageBusy:
            raise  # not a failure: the caller retries the run later
        except Exception as e:  # one failing run is reported; the others go on
            result.error = f"{type(e).__name__}: {e}"
            (self.run_dir(run)).mkdir(parents=True, exist_ok=True)
            (self.run_dir(run) / "error.txt").write_text(traceback.format_exc())
        return result


def plan_budget(plans: Mapping[str, list[RunPlan]], store: str | os.PathLike, limits: Mapping[str, int | None]) -> dict:
    """What running planned experiments into one store costs: stages, optimizer steps, answers to generate.

    Stages and measurements are counted once however many runs and experiments share them; those
    already done in `store` are counted apart.

    Args:
        plans: experiment name -> its planned runs.
        store: the stage store.
        limits: experiment name -> its `eval.limit` (test answers per family; None: all).

    Returns:
        `{"stages", "stages_done", "steps", "measurements", "answers"}`: distinct stages and those
        already done; the main-loop optimizer steps still to train (times the branches of a
        per-family stage; what a stage trains in its hooks, e.g. specialize's FFN copies, is not
        counted); distinct measurements; at most this many generated test answers (an eval without
        a limit counts 0).
    """
    store = Path(store)
    stages: dict[str, int] = {}
    done: set[str] = set()
    measured: dict[tuple, int] = {}
    for name, runs in plans.items():
        for r in runs:
            for i in r.chain:
                st = r.recipe.stages[i]
                key = r.keys[st.name]
                stages[key] = st.train.steps * len(st.stage().branches(st))
                if (store / f"stage-{key}" / "done.json").is_file():
                    done.add(key)
            st = r.measured
            families = [f for b in st.stage().branches(st) for f in b.data if f != "corpus"]
            limit = limits.get(name)
            measured[(r.keys[st.name], json.dumps(r.inference, sort_keys=True), limit)] = len(families) * (limit or 0)
    return {"stages": len(stages), "stages_done": len(done), "steps": sum(v for k, v in stages.items() if k not in done),
            "measurements": len(measured), "answers": sum(measured.values())}


def machine() -> dict[str, Any]:
    """What ran the experiment: CPU, cores, torch and transformers versions, torch's thread count.

    The thread count matters: it changes the order of float reductions, so a stage trained at 1
    thread and at 2 differs from its first steps on (and training amplifies it into another sample
    of the seed-to-seed distribution). `done.json` records it per stage.
    """
    import platform

    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads()}


def run_experiment(
    exp: ExperimentConfig,
    out_dir: str | os.PathLike,
    *,
    store: str | os.PathLike | None = None,
    variants: list[str] | None = None,
    seeds: list[int] | None = None,
    quiet: bool | None = None,
    poll_s: float = 2.0,
    write: bool = True,
    started: float | None = None,
    failed: dict[str, str] | None = None,
    counted: set[str] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Plan, run (reusing finished stages), measure and report an experiment.

    A run whose next stage another process sharing the store is training waits its turn: the
    other runs go first, and when every run left is held up this process polls every `poll_s`.

    Args:
        exp: the experiment.
        out_dir: its directory (`runs/`, `results.json`, `results.md`, `results.png`).
        store: the stage store (default `out_dir/store`); experiments sharing one reuse each
            other's stages.
        variants: run only these variants.
        seeds: run only these seeds.
        quiet: no progress bar over runs (None: `zoo.progress.is_quiet`).
        poll_s: seconds between retries when every run left waits for another process.
        write: write `results.json/md/png` (False: a worker of `run_experiments` only trains).
        started: `time.time()` the whole invocation began (`run_experiments` with several jobs):
            stages any process finished since count as executed, and the report's wall time is
            from it to this experiment's last stage or measurement.
        failed: stage key -> error, shared between calls: a stage that failed is not retried.
        counted: stage keys counted as executed by an earlier experiment of this invocation.
        jobs: the processes the invocation ran (recorded in the report).

    Returns:
        The results dict written to `results.json`.
    """
    from zoo.progress import progress

    out_dir = Path(out_dir)
    store = Path(store) if store is not None else out_dir / "store"
    runs = plan(exp, variants=variants, seeds=seeds)
    out_dir.mkdir(parents=True, exist_ok=True)
    store.mkdir(parents=True, exist_ok=True)
    runner = _Runner(exp, out_dir, store.resolve(), since=started, counted=counted)
    if failed is not None:
        runner.failed = failed
    t0 = time.time() if started is None else started
    results: list[RunResult | None] = [None] * len(runs)
    pending = list(range(len(runs)))
    with progress(total=len(runs), desc=f"experiment {exp.name}", unit="run", quiet=quiet) as bar:
        while pending:
            held = []
            for i in pending:
                try:
                    results[i] = runner.run(runs[i], bar)
                    bar.update(1)
                except StageBusy:
                    held.append(i)
            if len(held) == len(pending):
                time.sleep(poll_s)
            pending = held
    report = summarize(exp, results, runs)
    report["executed_stages"] = len(runner.executed)
    report["reused_stages"] = len(runner.reused)
    report["wall_s"] = round((runner.last or time.time()) - started if started is not None else time.time() - t0, 1)
    report["jobs"] = jobs
    report["machine"] = {**machine(), "stage_threads": sorted(runner.threads, key=lambda t: (t is None, t or 0))}
    if write:
        write_reports(exp, report, out_dir)
    return report


def _worker(exps: list[ExperimentConfig], root: str, store: str, variants, seeds, quiet: bool | None = True,
            failed: dict[str, str] | None = None) -> None:
    """One process of `run_experiments`: train (and measure) every experiment, in its order."""
    for exp in exps:
        run_experiment(exp, Path(root) / exp.name, store=store, variants=variants, seeds=seeds, quiet=quiet, write=False,
                       failed=failed)


def run_experiments(
    exps: list[ExperimentConfig],
    root: str | os.PathLike,
    *,
    store: str | os.PathLike | None = None,
    jobs: int = 1,
    variants: list[str] | None = None,
    seeds: list[int] | None = None,
    quiet: bool | None = None,
) -> list[dict[str, Any]]:
    """Run experiments sharing one stage store, in `jobs` processes; report each.

    With `jobs > 1`, the extra processes go through the same experiments starting at other points
    of the list; the stage locks keep any stage from training twice, and a process that finds a
    stage taken trains another run's stage meanwhile. When all are done, this process writes every
    report from the store. Each process trains with torch's thread count (`OMP_NUM_THREADS`), so
    on a 2-core machine two 1-thread jobs use both cores. The results do not depend on `jobs`: a
    stage's bits depend only on its key and the thread count (the feature cache is keyed by the
    thread count too, and a hit gives the bits of a miss).

    Args:
        exps: the experiments.
        root: experiments root: `root/<name>/results.*`.
        store: the stage store (default `root/store`).
        jobs: processes, >= 1.
        variants, seeds, quiet: as `run_experiment`.

    Returns:
        One report per experiment, in order.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r} must be an integer >= 1")
    root = Path(root)
    store = Path(store) if store is not None else root / "store"
    if jobs == 1:
        return [run_experiment(e, root / e.name, store=store, variants=variants, seeds=seeds, quiet=quiet) for e in exps]
    import multiprocessing

    started = time.time()
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    n = len(exps)
    procs = [ctx.Process(target=_worker, args=(exps[k * n // jobs:] + exps[: k * n // jobs], str(root), str(store), variants, seeds),
                         name=f"zoo-experiment-job-{k}", daemon=True) for k in range(1, jobs)]
    for proc in procs:
        proc.start()
    failed: dict[str, str] = {}
    counted: set[str] = set()  # each stage trained in this invocation is counted by the first experiment using it
    try:
        _worker(exps, str(root), str(store), variants, seeds, quiet, failed)
    finally:
        for proc in procs:
            proc.join()
    # every stage and measurement is in the store now, or failed (here: reported; in a job: retried once)
    return [run_experiment(e, root / e.name, store=store, variants=variants, seeds=seeds, quiet=True, started=started,
                           failed=failed, counted=counted, jobs=jobs) for e in exps]


__all__ = ["Comparison", "ExperimentConfig", "MeasureSpec", "RunPlan", "RunResult", "apply_overrides", "check_factor",
           "machine", "measure_output", "plan", "plan_budget", "recipe_paths", "routing_cost", "run_experiment", "run_experiments",
           "seeded_recipe_dict", "StageBusy"]
