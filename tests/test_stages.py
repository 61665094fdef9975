"""The staged pipeline on the micro recipe: every stage runs, freezes what it says, chains weights."""

import fnmatch
from pathlib import Path

import pytest
import torch

from zoo.checkpoint import load_checkpoint
from zoo.pipelines.data.shards import shard_paths
from zoo.pipelines.stages import RecipeConfig, StageConfig, run_recipe

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
    expected = [s.name for s in recipe.stages if s.kind != "lora"]
    expected += [f"lora-{f}" for s in recipe.stages if s.kind == "lora" for f in sorted(s.data)]
    assert list(outputs) == expected
    for path in outputs.values():
        assert (path / "manifest.json").exists() and (path / "tokenizer" / "tokenizer.json").exists()


@pytest.mark.slow
def test_frozen_parameters_are_bit_identical_to_the_previous_stage(micro_run):
    recipe, out, outputs = micro_run
    for prev, stage in zip(recipe.stages, recipe.stages[1:]):
        if stage.kind == "lora":
            continue
        before, after = _weights(outputs[prev.name]), _weights(outputs[stage.name])
        if stage.kind == "moe-tune":  # upcycling wraps the LM: language_model.X -> language_model.lm.X
            before = {k.replace("language_model.", "language_model.lm.", 1): v for k, v in before.items()}
        trained = changed = 0
        for name, tensor in after.items():
            if any(fnmatch.fnmatchcase(name, p) for p in stage.trains):
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
    with pytest.raises(ValueError, match="kind 'moe' is not one of"):
        StageConfig(name="x", kind="moe", data={"vqa": 1})
    with pytest.raises(ValueError, match="needs `upcycle:`"):
        StageConfig(name="x", kind="moe-tune", data={"vqa": 1})
    recipe = RecipeConfig.load(RECIPE)
    with pytest.raises(ValueError, match="has no stage 'finetune'"):
        recipe.stage("finetune")


def test_every_shipped_recipe_parses():
    for path in sorted(RECIPE.parent.glob("*.yaml")):
        recipe = RecipeConfig.load(path)
        assert recipe.stages, path
