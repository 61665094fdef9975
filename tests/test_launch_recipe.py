"""The micro recipe (every stage kind) through pipelines/launch/recipe.sh: 2 processes on gloo, ep_size=2,
under DeepSpeed (ZeRO-2) and under FSDP2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoo.io.checkpoint import load_checkpoint
from zoo.pipelines.runner import load_model, run_recipe
from zoo.pipelines.stages import RecipeConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipes" / "micro.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("engine,port", [("deepspeed", "29531"), ("fsdp", "29533")])
def test_recipe_runs_every_stage_with_expert_parallelism(tmp_path, engine, port):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    recipe = RecipeConfig.load(RECIPE)
    data = tmp_path / "data"
    run_recipe(recipe, tmp_path / "single", only=[recipe.stages[0].name], data_dir=data)  # builds the data once
    env = {**os.environ, "GPUS_PER_NODE": "2", "EP_SIZE": "2", "LAUNCHER": "torchrun", "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "MASTER_PORT": port, "ENGINE": engine}
    out = tmp_path / engine
    proc = subprocess.run(["bash", str(ROOT / "pipelines/launch/recipe.sh"), "--recipe", str(RECIPE), "--out", str(out),
                           "--data-dir", str(data)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": /" in line)  # rank 0 only
    assert list(printed) == recipe.outputs()
    for name, path in printed.items():
        assert (Path(path) / "manifest.json").exists(), name
    # experts were trained sharded (ep_size=2) and gathered back: the checkpoint holds all 4 experts
    weights = load_checkpoint(out / "moe-tune" / "model").state_dict
    gate_up = weights["language_model.lm.model.layers.0.mlp.moe.experts.gate_up_proj"]
    assert gate_up.shape[0] == 4
    before = load_checkpoint(out / "specialize" / "model").state_dict["language_model.model.layers.0.mlp.gate_proj.weight"]
    assert not all(torch.equal(gate_up[e, : before.shape[0]], before) for e in range(4)), "experts did not train"
    model, _ = load_model(Path(printed["mixlora-text"]))  # strict reload, LoRA experts rebuilt first
    assert any(n.endswith("gate_lora_A") for n, _ in model.named_parameters())
