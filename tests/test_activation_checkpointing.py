"""Activation checkpointing through MoE decoder layers: the same loss, aux losses, routing and gradients."""

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zoo import MoEConfig, upcycle
from zoo.models.checkpointing import activation_checkpointing
from zoo.models.lm import decoder_layers
from zoo.moe.trainer_hooks import capture_router_inputs
from zoo.pipelines.engines import TorchEngine
from zoo.pipelines.optim import OptimConfig
from zoo.pipelines.train import TrainConfig, train

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
ROUTERS = {  # plain top-k with jitter (draws random numbers), expert choice (reads the padding mask), K-means (trainer updates)
    "topk": {"top_k": 2, "jitter_noise": 0.1},
    "expert_choice": {},
    "kmeans": {"decay": 0.5},
}


def moe_lm(router: str):
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**TINY))
    model = upcycle(lm, MoEConfig(num_experts=4, router=router, router_options=ROUTERS[router]))
    with torch.no_grad():  # distinct experts, so a routing difference shows in the gradients
        for moe in model.moe_layers().values():
            moe.experts.gate_up_proj.add_(torch.randn_like(moe.experts.gate_up_proj) * 0.05)
    return model.train()


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, TINY["vocab_size"], (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding the expert-choice router must never pick, in forward or in the recomputation
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def run(model, checkpointed: bool):
    torch.manual_seed(1)  # jitter noise
    with activation_checkpointing(model) if checkpointed else torch.enable_grad():
        with capture_router_inputs(model) as seen:  # backward inside: a recomputation must not record again
            out = model(**batch())
            out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}, seen


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_checkpointed_run_equals_the_plain_run(router):
    model = moe_lm(router)
    plain, plain_grads, plain_seen = run(copy.deepcopy(model), False)
    ckpt, ckpt_grads, ckpt_seen = run(model, True)
    assert torch.equal(ckpt.loss, plain.loss) and torch.equal(ckpt.lm_loss, plain.lm_loss)
    assert ckpt.aux_losses.keys() == plain.aux_losses.keys()
    for name in plain.aux_losses:
        assert torch.equal(ckpt.aux_losses[name], plain.aux_losses[name]), name
    assert len(ckpt.routing) == len(plain.routing) == 2
    for a, b in zip(ckpt.routing, plain.routing):
        assert a.layer == b.layer and torch.equal(a.load, b.load) and torch.equal(a.entropy, b.entropy)
    for name, grad in plain_grads.items():
        assert grad is not None and ckpt_grads[name] is not None, f"{name} got no gradient"
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert [len(v) for v in ckpt_seen.values()] == [len(v) for v in plain_seen.values()]  # K-means inputs once


def test_the_block_recomputes_and_is_undone_after():
    model = moe_lm("topk")
    layers = decoder_layers(model.lm)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(**batch()).loss.backward()
    plain = len(saved)
    saved.clear()
    with activation_checkpointing(model) as n:
        assert n == 2 and all(layer.gradient_checkpointing for layer in layers) and not model.lm.config.use_cache
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            model(**batch()).loss.backward()
    assert len(saved) < plain  # only the layers' inputs are kept by the outer graph
    assert not any(layer.gradient_checkpointing for layer in layers) and model.lm.config.use_cache


def test_train_with_activation_checkpointing_gives_the_same_metrics(tmp_path):
    def metrics(ckpt: bool):
        model = moe_lm("topk")
        cfg = TrainConfig(steps=3, activation_checkpointing=ckpt, optim=OptimConfig(lr=1e-2, grad_accum=2))
        out = train(TorchEngine(model, cfg.optim, cfg.steps), lambda i: batch(), cfg, tmp_path / str(ckpt))
        rows = [json.loads(line) for line in out.metrics_path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows], model

    (plain, a), (ckpt, b) = metrics(False), metrics(True)
    assert ckpt == plain
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
