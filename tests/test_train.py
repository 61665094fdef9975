"""The trainer and the plain-PyTorch engine: schedule, accumulation, freezing, resume, NaN."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.utils import ModelOutput

from zoo.io.checkpoint import load_checkpoint
from zoo.pipelines.engines import NonFiniteError, TorchEngine
from zoo.pipelines.optim import OptimConfig, cosine_with_warmup
from zoo.pipelines.train import TrainConfig, checkpoints, train

sys.path.insert(0, str(Path(__file__).parent))
from train_worker import batch_at, tiny_moe_lm  # noqa: E402

WORKER = Path(__file__).parent / "train_worker.py"


def losses(metrics: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]


def test_cosine_schedule_against_closed_form():
    kw = dict(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert cosine_with_warmup(0, **kw) == pytest.approx(0.1)
    assert cosine_with_warmup(9, **kw) == pytest.approx(1.0)
    assert cosine_with_warmup(10, **kw) == pytest.approx(1.0)
    assert cosine_with_warmup(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine_with_warmup(110, **kw) == pytest.approx(0.1)


def test_gradient_accumulation_equals_the_large_batch():
    """2 micro-batches of 2 sequences == 1 batch of 4 (equal token counts, dense LM)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))

    batch = batch_at(0)
    a, b = model(), model()
    ea = TorchEngine(a, OptimConfig(lr=1e-2, grad_accum=1), 3)
    eb = TorchEngine(b, OptimConfig(lr=1e-2, grad_accum=2), 3)
    ea.backward(a(**batch).loss)
    for half in (slice(0, 2), slice(2, 4)):
        eb.backward(b(**{k: v[half] for k, v in batch.items()}).loss)
        if half.start == 0:
            assert eb.step() is None  # no update before the boundary
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6)
    ra, rb = ea.step(), eb.step()
    assert rb is not None and rb.grad_norm == pytest.approx(ra.grad_norm, rel=1e-5)
    assert all(p.grad is None for p in b.parameters())


def test_frozen_parameters_stay_bit_identical_and_experts_update(tmp_path):
    model = tiny_moe_lm()
    for name, p in model.named_parameters():
        p.requires_grad = "mlp" in name  # MoE-LLaVA stage 3: attention frozen
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(steps=3, optim=OptimConfig(lr=1e-2))
    result = train(TorchEngine(model, cfg.optim, cfg.steps), batch_at, cfg, tmp_path)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    line = json.loads(result.metrics_path.read_text().splitlines()[-1])
    assert set(line["routing"]) == {"0", "1"} and sum(line["routing"]["0"]["load"]) == pytest.approx(1.0)
    assert line["aux_loss"] > 0 and line["tokens_per_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("router", ["topk", "smoe_dropout", "kmeans"])
def test_kill_and_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, router):
    """Also for trainer-driven router state: SMoE-Dropout's scheduled k and K-means centroids."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    route = ["--router", router]
    subprocess.run([sys.executable, str(WORKER), str(tmp_path / "whole"), *route], check=True, env=env, capture_output=True)
    whole = losses(tmp_path / "whole" / "metrics.jsonl")
    assert len(whole) == 60

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(WORKER), str(out), *route], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 23:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(metrics.read_text().splitlines())
    assert done_at_kill < 60, "the run finished before it could be killed"
    last = checkpoints(out)[-1]
    assert int(last.name.split("-")[1]) <= done_at_kill

    subprocess.run([sys.executable, str(WORKER), str(out), "--resume", *route], check=True, env=env, capture_output=True)
    assert losses(metrics) == whole


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    class Poisonable(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x, poison):
            return ModelOutput(loss=(self.w * x).sum() * poison)

    model = Poisonable()
    cfg = TrainConfig(steps=10, ckpt_every=2, optim=OptimConfig(lr=0.1))
    batch = lambda i: {"x": torch.ones(3), "poison": torch.tensor(float("nan") if i == 5 else 1.0)}  # noqa: E731
    # batch 5 is the 6th step, as metrics.jsonl counts (5 lines written before it)
    with pytest.raises(NonFiniteError, match=r"stage 'train': loss is nan at step 6 .*halted.*last good checkpoint: .*step-00000004"):
        train(TorchEngine(model, cfg.optim, cfg.steps), batch, cfg, tmp_path)
    good = load_checkpoint(checkpoints(tmp_path)[-1])
    assert checkpoints(tmp_path)[-1].name == "step-00000004"
    assert torch.isfinite(good.state_dict["w"]).all()


def test_bf16_autocast_trains(tmp_path):
    model = tiny_moe_lm()
    cfg = TrainConfig(steps=2, optim=OptimConfig(lr=1e-2, precision="bf16"))
    result = train(TorchEngine(model, cfg.optim, cfg.steps), batch_at, cfg, tmp_path)
    assert math.isfinite(result.final_loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bad_config_errors_name_the_cause():
    with pytest.raises(ValueError, match="precision='fp8' is not one of"):
        OptimConfig(precision="fp8")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['step'\]"):
        TrainConfig.from_dict({"step": 3})
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        TorchEngine(frozen, OptimConfig(), 1)


def test_wandb_offline_run_logs_losses_and_expert_load(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = TrainConfig(steps=2, wandb=True, optim=OptimConfig(lr=1e-2))
    train(TorchEngine(tiny_moe_lm(), cfg.optim, cfg.steps), batch_at, cfg, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb")), "no offline wandb run was written"
