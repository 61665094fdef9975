"""bf16 weights with fp32 masters ("bf16_master"): what the engine updates, checkpoints and hands back."""

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from zoo.io.checkpoint import load_checkpoint
from zoo.pipelines.engines import TorchEngine
from zoo.pipelines.optim import OptimConfig, build_optimizer, decay_groups
from zoo.pipelines.precision import MasterWeights
from zoo.pipelines.train import TrainConfig, checkpoints, train

sys.path.insert(0, str(Path(__file__).parent))
from train_worker import batch_at, tiny_moe_lm  # noqa: E402


def test_master_weights_cast_once_keep_fp32_aside_and_restore_exactly():
    model = tiny_moe_lm()
    model.lm.model.norm.weight.requires_grad = False  # a frozen parameter
    experts = model.moe_layers()[0].experts.gate_up_proj
    experts.zoo_no_decay = True
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    master = MasterWeights(model, keep_fp32=["lm.model.layers.1"])
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name.startswith("lm.model.layers.1.") else torch.bfloat16), name
    assert len(master.masters) == sum(p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(m.dtype == torch.float32 for m in master.masters)
    assert any(getattr(m, "zoo_no_decay", False) for m in master.masters)  # marks travel to the masters
    with master.full_precision():
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]), name
    master.restore()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[name]), name


def _reference_steps(model: nn.Module, optim: OptimConfig, steps: int) -> list[float]:
    """bf16 weights + fp32 masters by hand: autocast forward, bf16 grads summed into fp32, AdamW on the masters."""
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [nn.Parameter(p.detach().clone()) for p in params]
    for p in model.parameters():  # the weights, not the buffers (rotary frequencies stay fp32)
        p.data = p.data.to(torch.bfloat16)
    optimizer, scheduler = build_optimizer(decay_groups(masters, optim.weight_decay), optim, steps)
    torch.manual_seed(0)  # the router's jitter draws what the trainer's seeded run draws
    losses = []
    for step in range(steps):
        total = 0.0
        for micro in range(optim.grad_accum):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**batch_at(step * optim.grad_accum + micro)).loss
            (loss / optim.grad_accum).backward()
            for p, m in zip(params, masters):
                m.grad = p.grad.float() if m.grad is None else m.grad + p.grad.float()
                p.grad = None
            total += loss.item() / optim.grad_accum
        torch.nn.utils.clip_grad_norm_(masters, optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in zip(params, masters):
                p.copy_(m)
        losses.append(total)
    for p, m in zip(params, masters):
        p.data = m.data
    return losses


def test_bf16_master_training_equals_the_reference_and_hands_back_fp32(tmp_path):
    optim = OptimConfig(lr=1e-2, grad_accum=2, grad_clip=0.5, weight_decay=0.1, precision="bf16_master")
    reference = tiny_moe_lm()
    ref_losses = _reference_steps(reference, optim, 3)
    model = tiny_moe_lm()
    cfg = TrainConfig(steps=3, optim=optim)
    result = train(TorchEngine(model, cfg.optim, cfg.steps), batch_at, cfg, tmp_path)
    losses = [json.loads(line)["loss"] for line in result.metrics_path.read_text().splitlines()]
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    saved = load_checkpoint(result.checkpoint).state_dict
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.dtype == torch.float32, f"{name} is not fp32 after training"
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
        assert torch.equal(saved[name], p), f"checkpoint {name} is not the fp32 master"


def test_bf16_master_trains_like_autocast():
    """Same data, the two bf16 modes: losses agree to bf16 noise over a few steps."""
    runs = {}
    for precision in ("bf16", "bf16_master"):
        model = tiny_moe_lm()
        engine = TorchEngine(model, OptimConfig(lr=1e-2, precision=precision), 4)
        runs[precision] = []
        for step in range(4):
            with engine.autocast():
                loss = model(**batch_at(step)).loss
            engine.backward(loss)
            engine.step()
            runs[precision].append(loss.item())
    assert runs["bf16_master"] == pytest.approx(runs["bf16"], abs=0.02)
    assert runs["bf16_master"][-1] < runs["bf16_master"][0]


def test_bf16_master_resume_continues_the_uninterrupted_run(tmp_path):
    cfg = TrainConfig(steps=4, ckpt_every=2, keep_checkpoints=4, optim=OptimConfig(lr=1e-2, precision="bf16_master"))
    straight = tiny_moe_lm()
    result = train(TorchEngine(straight, cfg.optim, cfg.steps), batch_at, cfg, tmp_path / "straight")
    rows = result.metrics_path.read_text().splitlines()
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(checkpoints(tmp_path / "straight")[0], resumed_dir / "checkpoints" / "step-00000002")
    (resumed_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in rows[:2]))
    resumed = tiny_moe_lm(seed=1)  # other weights: everything must come from the checkpoint
    train(TorchEngine(resumed, cfg.optim, cfg.steps), batch_at, cfg, resumed_dir, resume=True)
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines]  # noqa: E731
    assert strip((resumed_dir / "metrics.jsonl").read_text().splitlines()) == strip(rows)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), f"{name} differs after resume"


def test_deepspeed_takes_bf16_master_as_its_bf16():
    pytest.importorskip("deepspeed")
    from zoo.pipelines.engines.deepspeed_engine import resolve_config

    cfg = resolve_config("zero2", OptimConfig(precision="bf16_master"), has_experts=True)
    assert cfg["bf16"]["enabled"] is True and cfg["zero_optimization"]["stage"] == 2
    assert copy.deepcopy(cfg) == resolve_config("zero2", OptimConfig(precision="bf16"), has_experts=True)
