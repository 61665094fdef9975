"""The staged pipeline on the micro recipe: every stage runs, freezes what it says, chains weights."""

import fnmatch
from pathlib import Path

import pytest
import torch

from zoo.io.checkpoint import load_checkpoint
from zoo.pipelines.data.shards import shard_paths
from zoo.pipelines.runner import load_model, run_recipe
from zoo.pipelines.stages import RecipeConfig, StageConfig

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "micro.yaml"


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro")
    recipe = RecipeConfig.load(RECIPE)
    return recipe, out, run_recipe(recipe, out)


def _weights(path):
    return load_checkpoint(path).state_dict


@pytest.mark.slow
def test_every_stage_runs_and_writes_its_checkpoint(micro_run):
    recipe, out, outputs = micro_run
    assert list(outputs) == recipe.outputs()
    assert "mixlora-text" in outputs and "lora-vqa" in outputs
    for path in outputs.values():
        assert (path / "manifest.json").exists() and (path / "tokenizer" / "tokenizer.json").exists()


@pytest.mark.slow
def test_frozen_parameters_are_bit_identical_to_the_previous_stage(micro_run):
    recipe, out, outputs = micro_run
    for index, stage in enumerate(recipe.stages[1:], start=1):
        prev = recipe.start_of(index)
        if stage.kind in ("lora", "esft", "extend"):  # they train what they choose at run time (tested on their own)
            continue
        before, after = _weights(outputs[prev.name]), _weights(outputs[stage.name])
        if stage.kind == "moe-tune":  # upcycling wraps the LM: language_model.X -> language_model.lm.X
            before = {k.replace("language_model.", "language_model.lm.", 1): v for k, v in before.items()}
        trained = changed = 0
        patterns = stage.trains or stage.stage().trainable(None, None)
        for name, tensor in after.items():
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                trained += 1
                changed += not torch.equal(tensor, before.get(name, torch.empty(0)))
            else:
                # frozen: exactly the previous stage's tensor (the stage started from its weights)
                assert torch.equal(tensor, before[name]), f"{stage.name}: frozen {name} changed"
        assert trained and changed, f"{stage.name}: nothing it trains changed"


@pytest.mark.slow
def test_moe_tune_upcycles_the_specialized_ffn(micro_run):
    recipe, out, outputs = micro_run
    dense, moe = _weights(outputs["specialize"]), _weights(outputs["moe-tune"])
    assert not any(".mlp.moe." in k for k in dense)
    assert any(".mlp.moe.experts.gate_up_proj" in k for k in moe)
    assert torch.equal(dense["language_model.model.layers.1.mlp.gate_proj.weight"],
                       moe["language_model.lm.model.layers.1.mlp.gate_proj.weight"])  # dense layer kept


@pytest.mark.slow
def test_moe_stages_plot_expert_load_per_family(micro_run):
    import json

    recipe, out, outputs = micro_run
    png = out / "moe-tune" / "expert_load.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loads = json.loads(png.with_suffix(".json").read_text())
    assert set(loads) == set(recipe.stage("moe-tune").data)
    for family, layers in loads.items():
        assert set(layers) == {"0"}  # every_other on 2 layers: layer 0 only
        assert sum(layers["0"]) == pytest.approx(1.0)
    assert not (out / "specialize" / "expert_load.png").exists()  # dense stage: nothing to plot
    assert (out / "lora" / "vqa" / "expert_load.png").exists()


@pytest.mark.slow
def test_lora_outputs_differ_per_family_and_keep_the_base_architecture(micro_run):
    recipe, out, outputs = micro_run
    base, vqa, asr = (_weights(outputs[k]) for k in ("moe-tune", "lora-vqa", "lora-asr"))
    assert set(vqa) == set(base) == set(asr), "merged LoRA checkpoints must have the base model's keys"
    q = "language_model.lm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(vqa[q], base[q]) and not torch.equal(vqa[q], asr[q])
    mlp = "language_model.lm.model.layers.0.mlp.moe.experts.gate_up_proj"
    assert torch.equal(vqa[mlp], base[mlp]), "LoRA on attention only must leave the experts alone"


@pytest.mark.slow
def test_a_stage_reruns_alone_from_its_predecessor(micro_run, tmp_path):
    recipe, out, outputs = micro_run
    again = run_recipe(recipe, out, only=["specialize"])
    assert list(again) == ["specialize"]
    with pytest.raises(FileNotFoundError, match="run stage 'align' first"):
        run_recipe(recipe, tmp_path, only=["specialize"], data_dir=out / "data")


@pytest.mark.slow
def test_corrupt_shard_error_names_the_shard(micro_run, tmp_path):
    recipe, out, _ = micro_run
    import shutil

    data = tmp_path / "data"
    shutil.copytree(out / "data", data)
    shard = shard_paths(data / "vqa", "train")[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(Exception, match=shard.name):
        run_recipe(recipe, tmp_path / "run", only=None, data_dir=data)


def test_recipe_and_stage_errors_name_the_cause():
    with pytest.raises(ValueError, match=r"stage 'x': unknown stage kind 'moe'; registered stage kinds: \[.*'moe-tune'"):
        StageConfig(name="x", kind="moe", data={"vqa": 1})
    with pytest.raises(ValueError, match="needs `options.moe`"):
        StageConfig(name="x", kind="moe-tune", data={"vqa": 1})
    with pytest.raises(ValueError, match=r"stage 'x': stage kind 'lora': LoRAStageOptions: unknown config key\(s\) \['r'\]"):
        StageConfig(name="x", kind="lora", data={"vqa": 1}, options={"r": 4})
    with pytest.raises(ValueError, match=r"adapter 'lora': LoRAOptions: unknown config key\(s\) \['rank'\]"):
        StageConfig(name="x", kind="lora", data={"vqa": 1}, options={"adapter_options": {"rank": 4}})
    with pytest.raises(ValueError, match=r"unknown adapter 'lora2'"):
        StageConfig(name="x", kind="lora", data={"vqa": 1}, options={"adapter": "lora2"})
    recipe = RecipeConfig.load(RECIPE)
    with pytest.raises(ValueError, match="has no stage 'finetune'"):
        recipe.stage("finetune")


def test_every_shipped_recipe_parses():
    for path in sorted(RECIPE.parent.glob("*.yaml")):
        recipe = RecipeConfig.load(path)
        assert recipe.stages, path


@pytest.mark.slow
def test_mixlora_output_reloads_with_its_lora_experts_over_the_frozen_ffn(micro_run):
    recipe, out, outputs = micro_run
    base, mix = _weights(outputs["moe-tune"]), _weights(outputs["mixlora-text"])
    experts = [k for k in mix if ".mlp.moe.experts.gate_lora_A" in k]
    assert experts and all(".layers.1." in k for k in experts), "MixLoRA goes into the still-dense FFN (layer 1)"
    for k, v in base.items():
        if ".mlp." in k and ".layers.1." in k:  # the frozen dense FFN sits under the LoRA experts, unchanged
            match = [m for m in mix if m.endswith(k.split(".layers.1.mlp.")[1]) and ".layers.1.mlp." in m]
            assert any(torch.equal(v, mix[m]) for m in match), k
    model, cfg = load_model(outputs["mixlora-text"])  # strict: rebuilds the LoRA experts first
    assert any(n.endswith("gate_lora_A") for n, _ in model.named_parameters())
    from zoo.catalog import load_directory

    loaded, processor, _ = load_directory(outputs["mixlora-text"])  # what zoo.load runs
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_outputs_carry_their_held_out_metrics(micro_run):
    import json

    recipe, out, outputs = micro_run
    vqa = json.loads((outputs["lora-vqa"] / "config.json").read_text())["metrics"]
    assert set(vqa) == {"vqa/exact_match", "vqa/majority_baseline"}
    assert 0 <= vqa["vqa/exact_match"]["value"] <= 1 and "--family vqa" in vqa["vqa/exact_match"]["command"]
    base = json.loads((outputs["moe-tune"] / "config.json").read_text())["metrics"]
    assert {"asr/exact_match", "text/accuracy", "vqa/exact_match"} <= set(base)


@pytest.mark.slow
def test_specialize_experts_from_task_seeds_each_expert_with_its_ffn_copy(micro_run):
    from zoo import upcycle
    from zoo.pipelines.stages.specialize import load_expert_seeds

    recipe, out, outputs = micro_run
    seeds = load_expert_seeds(outputs["specialize"])
    assert len(seeds) == len(recipe.stage("specialize").data)  # experts_from: task -> one copy per family
    dense, _ = load_model(outputs["specialize"])
    base = dense.hf_model.model.layers[0].mlp.gate_proj.weight
    assert all(not torch.equal(s[0]["gate_proj.weight"], base) for s in seeds), "copies were not trained"
    assert not torch.equal(seeds[0][0]["gate_proj.weight"], seeds[1][0]["gate_proj.weight"])
    model, _ = load_model(outputs["specialize"])
    model.language_model = upcycle(model.hf_model, recipe.stage("moe-tune").options.moe, expert_seeds=seeds)
    experts = model.language_model.moe_layers()[0].experts
    for j, s in enumerate(seeds):  # expert j starts as copy j, exactly
        assert torch.equal(experts.gate_up_proj[j], torch.cat([s[0]["gate_proj.weight"], s[0]["up_proj.weight"]]))
        assert torch.equal(experts.down_proj[j], s[0]["down_proj.weight"])


def test_run_cli_reports_bad_input_in_one_line_naming_the_cause(tmp_path):
    import os
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: r\nmodel: {RECIPE.parents[1] / 'models' / 'micro-zoo.yaml'}\n"
                   "stages:\n  - {name: a, kind: align, data: {vqa: 1}, batchsize: 4}\n")
    cmd = [sys.executable, "-m", "zoo.pipelines.run", "--recipe", str(bad), "--out", str(tmp_path / "run")]
    env = {k: v for k, v in os.environ.items() if k != "ZOO_DEBUG"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert (f"zoo: error: {bad}: stages[0]: stage 'a': StageConfig: unknown config key(s) ['batchsize'] "
            "(did you mean 'batch_size'?)") in proc.stderr
    assert "Traceback" not in proc.stderr
    debug = subprocess.run(cmd, capture_output=True, text=True, env={**env, "ZOO_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.fixture
def plugin_stage():
    """A stage kind registered from this test file, not from the package."""
    from dataclasses import dataclass

    from zoo.pipelines.stages import STAGES
    from zoo.pipelines.stages.base import single_branch

    @dataclass
    class ScaleOptions:
        factor: float = 2.0

    @STAGES.register("scale-connectors", options=ScaleOptions)
    class ScaleConnectors:
        """Scales the connectors' weights before training them; records the factor in the output."""

        default_trains = ["connectors.*"]
        forks = False
        evaluates = False

        def __init__(self, **options):
            self.options = ScaleOptions(**options)

        def branches(self, cfg):
            return single_branch(cfg)

        def before_training(self, ctx, model, model_cfg, branch):
            with torch.no_grad():
                for p in model.connectors.parameters():
                    p.mul_(self.options.factor)
            return model, model_cfg

        def trainable(self, model, branch):
            return list(self.default_trains)

        def after_training(self, ctx, model, model_cfg, branch):
            return model, model_cfg, {"scaled_by": self.options.factor}, {"note.txt": b"scaled"}

    yield "scale-connectors"
    STAGES.unregister("scale-connectors")


@pytest.mark.slow
def test_a_stage_registered_outside_the_package_runs_inside_a_recipe(micro_run, plugin_stage, tmp_path):
    import json

    _, out, outputs = micro_run
    recipe = RecipeConfig(name="plugin", model=RecipeConfig.load(RECIPE).model, tokenizer_vocab=512, seed=0, stages=[
        {"name": "align", "kind": "align", "data": {"caption": 1.0}, "batch_size": 2, "train": {"steps": 1}},
        {"name": "scaled", "kind": plugin_stage, "data": {"vqa": 1.0}, "batch_size": 2, "train": {"steps": 1},
         "options": {"factor": 3.0}},
    ])
    result = run_recipe(recipe, tmp_path / "run", data_dir=out / "data")
    assert list(result) == ["align", "scaled"]
    cfg = json.loads((result["scaled"] / "config.json").read_text())
    assert cfg["stage"] == "scaled" and cfg["scaled_by"] == 3.0 and (result["scaled"] / "note.txt").read_bytes() == b"scaled"
    before, after = _weights(result["align"]), _weights(result["scaled"])
    lm = [k for k in after if k.startswith("language_model.")]
    assert lm and all(torch.equal(before[k], after[k]) for k in lm)  # only the connectors trained
    with pytest.raises(ValueError, match=r"stage kind 'scale-connectors': ScaleOptions: unknown config key\(s\) \['factr'\]"):
        StageConfig(name="s", kind=plugin_stage, data={"vqa": 1.0}, options={"factr": 1.0})


@pytest.mark.slow
@pytest.mark.parametrize("router", __import__("zoo.moe", fromlist=["ROUTERS"]).ROUTERS.names())
def test_every_router_trains_in_a_moe_tune_stage_and_reloads_through_zoo_load(micro_run, router, tmp_path):
    import json

    from zoo.catalog import load_directory
    from zoo.moe import ROUTERS

    _, out, _ = micro_run
    options = {"moe": {"num_experts": 4, "router": router, "router_options": dict(ROUTERS.entry(router).example),
                       "layers": "all"}}
    recipe = RecipeConfig(name=f"micro-{router}", model=RecipeConfig.load(RECIPE).model, tokenizer_vocab=512, stages=[
        {"name": "moe-tune", "kind": "moe-tune", "data": {"vqa": 1.0, "text": 1.0}, "batch_size": 2,
         "train": {"steps": 2}, "options": options}])
    result = run_recipe(recipe, tmp_path / "run", data_dir=out / "data")
    path = result["moe-tune"]
    metrics = [json.loads(line) for line in (path.parent / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(0 < r["experts_per_token"] <= 4 for r in metrics[-1]["routing"].values())
    model, _ = load_model(path)
    loaded, processor, cfg = load_directory(path)  # what zoo.load runs
    assert cfg.moe.router == router
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    batch = processor(["<image> what is this?"], images=[torch.rand(3, 40, 40)])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


@pytest.mark.slow
def test_loramoe_with_localized_balancing_trains_on_the_mix_with_sample_types(micro_run):
    import json

    recipe, out, outputs = micro_run
    path = outputs["loramoe"]
    metrics = [json.loads(line) for line in (path.parent / "train" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["aux/lbc"] > 0 for m in metrics), "the localized balancing constraint reached the loss"
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model"]["adapters"][-1]["kind"] == "loramoe" and "task_family" not in cfg
    model, _ = load_model(path)  # rebuilt from the config alone: the LoRAMoE experts are modules
    assert any("lora_A" in n and ".mlp.moe.experts." in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="stage 'loramoe' starts from 'nope', which is not an earlier stage"):
        RecipeConfig(name="r", model=recipe.model, stages=[{**_stage_dict(recipe.stage("loramoe")), "start_from": "nope"}])


def _stage_dict(stage):
    import dataclasses

    d = {f.name: getattr(stage, f.name) for f in dataclasses.fields(stage)}
    d["options"] = dataclasses.asdict(d["options"])
    return d


def test_specialize_experts_from_cluster_trains_one_copy_per_balanced_cluster_of_samples(micro_run, tmp_path):
    """CLIP-MoE multiplet upcycling: copies trained on clusters of samples; moe-tune seeds expert j from copy j."""
    import dataclasses

    from zoo import upcycle
    from zoo.pipelines.stages import StageConfig
    from zoo.pipelines.stages.specialize import load_expert_seeds

    recipe, out, outputs = micro_run
    spec = recipe.stage("specialize")
    stage = StageConfig(name="specialize", kind="specialize", data=spec.data, batch_size=4,
                        options={"experts_from": "cluster", "num_clusters": 2, "expert_steps": 1},
                        train={"steps": 1, "optim": {"lr": 3.0e-3}})
    short = dataclasses.replace(recipe, stages=[recipe.stages[0], recipe.stages[1], stage])
    got = run_recipe(short, tmp_path, data_dir=out / "data")
    cfg = load_checkpoint(got["specialize"]).config
    clusters = cfg["expert_clusters"]
    assert sorted(clusters) == ["cluster0", "cluster1"] == cfg["expert_seeds"]
    sizes = [sum(c.values()) for c in clusters.values()]
    assert sizes[0] == sizes[1] > 0  # balanced
    total = sum(len(v) for f, v in _train_sets(short, tmp_path, out / "data").items() if f in spec.data)
    assert sum(sizes) == total - total % 2
    seeds = load_expert_seeds(got["specialize"])
    assert len(seeds) == 2 and not torch.equal(seeds[0][0]["gate_proj.weight"], seeds[1][0]["gate_proj.weight"])
    model, _ = load_model(got["specialize"])
    model.language_model = upcycle(model.hf_model, num_experts=4, router_options={"top_k": 2}, expert_seeds=seeds)
    experts = model.language_model.moe_layers()[0].experts
    assert torch.equal(experts.down_proj[3], seeds[1][0]["down_proj.weight"])  # expert 3 <- copy 3 % 2
    with pytest.raises(ValueError, match="num_clusters must be >= 2, got 1"):
        StageConfig(name="s", kind="specialize", data={"vqa": 1.0}, options={"experts_from": "cluster", "num_clusters": 1})


def _train_sets(recipe, out, data_dir):
    from zoo.pipelines.datasets import prepare

    return prepare(recipe, out, data_dir)[0]


def test_moe_tune_split_coactivation_calibrates_on_its_training_data_and_reloads(micro_run, tmp_path):
    import dataclasses

    recipe, out, outputs = micro_run
    tune = recipe.stage("moe-tune")
    options = {"moe": {"num_experts": 4, "router_options": {"top_k": 2}, "layers": "every_other"},
               "upcycler": "split", "upcycler_options": {"partition": "coactivation"}, "calibration_samples": 2}
    stage = StageConfig(name="moe-tune", kind="moe-tune", data=tune.data, batch_size=4, options=options,
                        train={"steps": 1, "optim": {"lr": 3.0e-3}})
    short = dataclasses.replace(recipe, stages=[recipe.stages[0], stage])
    got = run_recipe(short, tmp_path, data_dir=out / "data")
    moe = load_checkpoint(got["moe-tune"]).config["model"]["moe"]
    assert moe["expert_intermediate_size"] == 16 and moe["experts"] == "swiglu"  # micro f=64 split in 4
    model, _ = load_model(got["moe-tune"])
    assert model.language_model.moe_layers()[0].experts.gate_up_proj.shape == (4, 32, 32)


def test_esft_trains_only_the_selected_experts_and_its_adapter_restores_the_model(micro_run):
    """ESFT: unselected experts bit-identical to moe-tune's; base + adapter == the esft checkpoint."""
    from zoo.transforms.esft import load_adapter_tensors

    recipe, out, outputs = micro_run
    cfg = load_checkpoint(outputs["esft"]).config
    info = cfg["esft"]
    assert info["base_sha256"] and 0 < info["adapter_bytes"] < info["model_bytes"]
    base, tuned = _weights(outputs["moe-tune"]), _weights(outputs["esft"])
    for layer, ids in info["experts"].items():
        scores = torch.tensor(info["relevance"][layer])
        assert scores.sum().item() == pytest.approx(1.0, abs=1e-4)
        for name in ("gate_up_proj", "down_proj"):
            key = f"language_model.lm.model.layers.{layer}.mlp.moe.experts.{name}"
            for e in range(base[key].shape[0]):
                assert torch.equal(base[key][e], tuned[key][e]) == (e not in ids), (layer, name, e)
    assert all(torch.equal(base[k], tuned[k]) for k in base if ".experts." not in k)
    from safetensors.torch import load_file

    from zoo.pipelines.stages.esft import ADAPTER_FILE

    model, _ = load_model(outputs["moe-tune"])
    selected = {int(k): v for k, v in info["experts"].items()}
    load_adapter_tensors(model, selected, load_file(str(outputs["esft"] / ADAPTER_FILE)))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in tuned.items())


def test_extend_adds_experts_and_keeps_every_old_weight_bit_identical(micro_run):
    """MoExtend: old experts, old router rows and all else equal moe-tune's; the new rows trained; reloads."""
    recipe, out, outputs = micro_run
    base, ext = _weights(outputs["moe-tune"]), _weights(outputs["extend"])
    info = load_checkpoint(outputs["extend"]).config["extend"]
    e = recipe.stage("moe-tune").options.moe.num_experts
    stacked = [k for k in ext if ".mlp.moe.experts." in k or k.endswith(".mlp.moe.router.weight")]
    assert stacked
    for k in stacked:
        assert ext[k].shape[0] == e + 2
        assert torch.equal(ext[k][:e], base[k]), f"old rows of {k} changed"
    assert any(not torch.equal(ext[k][e:], base[k][info["seeded_from"][k.split("layers.")[1].split(".")[0]]])
               for k in stacked), "the new experts did not train"
    assert all(torch.equal(base[k], ext[k]) for k in base if k not in stacked)
    model, cfg = load_model(outputs["extend"])
    assert cfg.moe.num_experts == e + 2 and model.language_model.moe_layers()[0].experts.num_experts == e + 2


@pytest.mark.slow
def test_moe_tune_upcycles_the_vision_tower_mid_recipe(micro_run):
    """CLIP-MoE in a stage: the image tower's MLP becomes experts that train, and the output reloads."""
    import json

    from zoo.moe.layer import SparseMoE

    recipe, out, outputs = micro_run
    dense, moe = _weights(outputs["specialize"]), _weights(outputs["moe-vision"])
    experts = [k for k in moe if k.startswith("encoders.image.") and ".mlp.moe.experts." in k]
    assert experts and not any(".mlp.moe." in k for k in dense if k.startswith("encoders.image."))
    model, cfg = load_model(outputs["moe-vision"])  # strict: the config rebuilds the tower's MoE
    assert cfg.encoders["image"].moe is not None and cfg.encoders["image"].moe.num_experts == 2
    assert cfg.encoders["image"].upcycler == "noisy" and cfg.encoders["image"].freeze  # kept for later stages
    assert any(isinstance(m, SparseMoE) for m in model.encoders["image"].modules())
    loads = json.loads((out / "moe-vision" / "expert_load.json").read_text())
    assert all("image encoder 0" in layers for layers in loads.values())
    # it trained: the tower's experts moved from their init (the same noisy upcycle of the dense tower)
    from zoo.transforms.upcycle import upcycle_encoder

    start, _ = load_model(outputs["specialize"])
    spec = recipe.stage("moe-vision").stage().options.encoder_moe["image"]
    upcycle_encoder(start.encoders["image"], spec.moe, method=spec.upcycler, method_options=spec.upcycler_options)
    init = {f"encoders.image.{k}": v for k, v in start.encoders["image"].state_dict().items()}
    assert set(experts) <= set(init)
    assert any(not torch.equal(init[k], moe[k]) for k in experts), "the tower's experts did not train"
    assert all(torch.allclose(init[k], moe[k], atol=0.05) for k in experts)


@pytest.mark.slow
def test_a_stage_trains_the_same_bits_on_a_cold_and_on_a_warm_feature_cache(micro_run, tmp_path):
    """A stage's result must not depend on which earlier run warmed the frozen-encoder cache."""
    import shutil

    from zoo.pipelines.collate import frozen_encoder_caches
    from zoo.pipelines.datasets import prepare

    recipe, out, outputs = micro_run
    runs = {}
    for name in ("cold", "warm"):
        runs[name] = tmp_path / name
        shutil.copytree(out, runs[name], ignore=shutil.ignore_patterns("features"))
    datasets, processor = prepare(recipe, runs["warm"], runs["warm"] / "data")
    model, _ = load_model(out / "align" / "model")
    caches = frozen_encoder_caches(model, processor, runs["warm"] / "features")
    media = {k: [m.data for f in sorted(datasets, reverse=True) for s in datasets[f] for m in s.media if m.kind == k]
             for k in caches}
    assert sum(caches[k].fill(media[k], quiet=True) for k in caches) > 0  # warmed in another order than training's
    weights = {}
    for name, run in runs.items():
        got = run_recipe(recipe, run, only=["specialize"])
        weights[name] = _weights(got["specialize"])
    assert weights["cold"].keys() == weights["warm"].keys()
    for key in weights["cold"]:
        assert torch.equal(weights["cold"][key], weights["warm"][key]), key
