"""The options real sizes need, through a recipe (`zoo train`): checkpointing, fused loss, bf16 masters, grouping."""

import json
from pathlib import Path

import pytest
import torch

from zoo.io.checkpoint import load_checkpoint
from zoo.pipelines.runner import load_model, run_recipe
from zoo.pipelines.stages import RecipeConfig

MICRO = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "micro.yaml"


def recipe(name: str, train: dict, **stage) -> RecipeConfig:
    moe = {"num_experts": 4, "router_options": {"top_k": 2}, "layers": "all", "loss_coefs": {"balance": 0.01}}
    return RecipeConfig(name=name, model=RecipeConfig.load(MICRO).model, data={"max_per_split": 8}, tokenizer_vocab=512,
                        stages=[{"name": "moe-tune", "kind": "moe-tune", "data": {"vqa": 1.0, "text": 1.0}, "batch_size": 2,
                                 "options": {"moe": moe}, "train": {"steps": 2, "optim": {"lr": 3e-3, "grad_accum": 2}, **train},
                                 **stage}])


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path.parent / "train" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    return out, run_recipe(recipe("plain", {}), out)["moe-tune"]


def test_checkpointing_and_the_fused_loss_give_the_plain_run(plain, tmp_path):
    out, reference = plain
    path = run_recipe(recipe("lean", {"activation_checkpointing": True, "lm_loss_chunk": 16}), tmp_path,
                      data_dir=out / "data")["moe-tune"]
    a, b = metrics(reference), metrics(path)
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-4, abs=1e-5), key
    (ref_model, _), (model, _) = load_model(reference), load_model(path)
    for (name, p), q in zip(ref_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")  # Adam: sum order


def test_bf16_masters_and_length_groups_train_and_save_fp32(plain, tmp_path):
    out, _ = plain
    path = run_recipe(recipe("fast", {"activation_checkpointing": True, "lm_loss_chunk": 16,
                                      "optim": {"lr": 3e-3, "grad_accum": 2, "precision": "bf16_master"}},
                             group_by_length=2), tmp_path, data_dir=out / "data")["moe-tune"]
    rows = metrics(path)
    assert len(rows) == 2 and all(r["loss"] == r["loss"] and r["aux_loss"] > 0 for r in rows)
    saved = load_checkpoint(path).state_dict  # the fp32 masters, not the bf16 working copies
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.float32}
    load_model(path)


@pytest.mark.slow
def test_compiled_layers_train_like_eager_and_are_eager_after(tmp_path):
    """`compile: true` (regional, MoE blocks eager) with checkpointing: the eager run's losses; modules eager after."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from train_worker import batch_at, tiny_moe_lm

    from zoo.pipelines.engines import TorchEngine
    from zoo.pipelines.optim import OptimConfig
    from zoo.pipelines.train import TrainConfig, train

    from torch._dynamo.utils import counters

    counters.clear()
    runs = {}
    for compiled in (False, True):
        model = tiny_moe_lm()
        cfg = TrainConfig(steps=2, compile=compiled, activation_checkpointing=True, optim=OptimConfig(lr=1e-2))
        result = train(TorchEngine(model, cfg.optim, cfg.steps), batch_at, cfg, tmp_path / str(compiled))
        runs[compiled] = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
        assert all(m.__dict__.get("_compiled_call_impl") is None for m in model.modules())
        assert (counters["stats"]["unique_graphs"] > 0) == compiled  # dynamo captured the regions
    for key in ("loss", "aux_loss", "grad_norm"):
        assert [r[key] for r in runs[True]] == pytest.approx([r[key] for r in runs[False]], rel=1e-4, abs=1e-5), key
