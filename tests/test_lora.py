"""LoRA transforms: MixLoRA / LoRAMoE experts and attention LoRA, checked against PEFT and the base model."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from zoo import upcycle
from zoo.models.lm import MoEBlock, MoECausalLM, decoder_layers
from zoo.transforms.adapters import (
    LoRALinear,
    LoRAMoEExperts,
    MixLoRAExperts,
    apply_loramoe,
    apply_mixlora,
    lora_modules,
    merge_lora,
    unmerge_lora,
)
from zoo.moe import capture_routing, load_balancing_loss

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
FFN = ["gate_proj", "up_proj", "down_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def dense_lm():
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def batch():
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def randomize_lora(model, std=0.1):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=std)


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_one_expert_top1_mixlora_with_attention_lora_equals_peft():
    """E=1, top-1 MixLoRA is plain LoRA on gate/up/down; attention LoRA is plain LoRA on q/k/v/o."""
    base = dense_lm()
    ids, mask = batch()
    base_logits = logits(base, ids, mask)
    ref = copy.deepcopy(base)
    model = apply_mixlora(base, num_experts=1, r=4, alpha=8, attention_lora=True, router_options={"top_k": 1})
    randomize_lora(model)
    peft = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=FFN + ATTN))
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(model.lm)):
            experts = layer.mlp.moe.experts
            peft_layer = decoder_layers(peft)[i]
            for name in FFN:
                target = getattr(peft_layer.mlp, name)
                target.lora_A["default"].weight.copy_(getattr(experts, f"{name.split('_')[0]}_lora_A")[0])
                target.lora_B["default"].weight.copy_(getattr(experts, f"{name.split('_')[0]}_lora_B")[0])
            for name in ATTN:
                ours, target = getattr(layer.self_attn, name), getattr(peft_layer.self_attn, name)
                target.lora_A["default"].weight.copy_(ours.lora_A)
                target.lora_B["default"].weight.copy_(ours.lora_B)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    ref_out = peft(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out.logits, ref_out.logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.logits, base_logits, atol=1e-3)  # the LoRA weights matter
    # gradients of the LoRA matrices agree too (1 expert: no balance-loss gradient reaches them)
    out.lm_loss.backward()
    ref_out.loss.backward()
    layer, peft_layer = decoder_layers(model.lm)[1], decoder_layers(peft)[1]
    torch.testing.assert_close(layer.mlp.moe.experts.down_lora_B.grad[0],
                               peft_layer.mlp.down_proj.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.mlp.moe.experts.gate_lora_A.grad[0],
                               peft_layer.mlp.gate_proj.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.self_attn.v_proj.lora_A.grad,
                               peft_layer.self_attn.v_proj.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["mixlora", "loramoe"])
def test_zero_lora_b_leaves_the_base_model_unchanged(kind):
    base = dense_lm()
    ids, mask = batch()
    ref = logits(base, ids, mask)
    if kind == "mixlora":
        model = apply_mixlora(base, num_experts=4, r=4, alpha=8, router_options={"top_k": 2})
    else:
        model = apply_loramoe(base, num_experts=4, r=4, alpha=8, attention_lora=True)
    assert len(model.moe_layers()) == TINY["num_hidden_layers"]
    torch.testing.assert_close(logits(model, ids, mask), ref, rtol=1e-5, atol=1e-6)


def test_only_lora_and_router_train_and_base_stays_bit_identical():
    model = apply_mixlora(dense_lm(), num_experts=4, r=4, alpha=8, router_options={"top_k": 2}).train()
    randomize_lora(model, std=0.05)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".mlp.moe.router." in n for n in trainable)
    assert {n for n in trainable if "router" in n} == {f"lm.model.layers.{i}.mlp.moe.router.weight" for i in range(2)}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert p.grad is None, n
            assert torch.equal(p, frozen_before[n]), n
        else:
            assert not torch.equal(p, trained_before[n]), f"{n} did not change"


def test_balance_loss_is_in_the_loss_and_matches_the_pure_function():
    model = apply_mixlora(dense_lm(), num_experts=4, r=4, alpha=8, router_options={"top_k": 2}, loss_coefs={"balance": 0.1})
    ids, mask = batch()
    with capture_routing(model.lm) as records:
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert [r.layer for r in records] == [0, 1]
    assert all(r.output.indices.shape == (ids.numel(), 2) for r in records)
    expected = torch.stack([load_balancing_loss(r.output.logits, 2, mask) for r in records]).mean()
    torch.testing.assert_close(out.aux_losses["balance"], expected)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.aux_loss, 0.1 * expected)  # the z-loss keeps the router's default weight 0
    torch.testing.assert_close(out.loss, out.lm_loss + 0.1 * expected)
    grad = torch.autograd.grad(out.aux_loss, decoder_layers(model.lm)[0].mlp.moe.router.weight)[0]
    assert grad.abs().sum() > 0  # the balance loss trains the router


def test_attention_lora_merge_unmerge_and_unload_keep_the_logits():
    base = dense_lm()
    q_before = decoder_layers(base)[0].self_attn.q_proj.weight.detach().clone()
    model = apply_mixlora(base, num_experts=2, r=4, alpha=8, router_options={"top_k": 1})
    randomize_lora(model)
    ids, mask = batch()
    ref = logits(model, ids, mask)
    assert merge_lora(model) == 4 * TINY["num_hidden_layers"]
    q = decoder_layers(model.lm)[0].self_attn.q_proj
    assert q.merged and not torch.allclose(q.base_layer.weight, q_before)
    torch.testing.assert_close(logits(model, ids, mask), ref, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(q.base_layer.weight, q_before, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids, mask), ref, rtol=1e-5, atol=1e-5)
    merge_lora(model, unload=True)
    assert not lora_modules(model)
    assert "lm.model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    assert isinstance(decoder_layers(model.lm)[0].mlp.moe.experts, MixLoRAExperts)  # experts are not merged
    torch.testing.assert_close(logits(model, ids, mask), ref, rtol=1e-5, atol=1e-5)


def test_mixlora_saves_and_loads_through_state_dict():
    model = apply_mixlora(dense_lm(), num_experts=4, r=4, alpha=8, router_options={"top_k": 2})
    randomize_lora(model)
    ids, mask = batch()
    fresh = apply_mixlora(dense_lm(), num_experts=4, r=4, alpha=8, router_options={"top_k": 2})  # other base init, other LoRA init
    assert not torch.allclose(logits(fresh, ids, mask), logits(model, ids, mask))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(fresh, ids, mask), logits(model, ids, mask), rtol=0, atol=0)


def test_mixlora_on_an_upcycled_model_adapts_only_its_dense_layers():
    moe_lm = upcycle(dense_lm(), num_experts=4, layers=[1], router_options={"top_k": 2})
    model = apply_mixlora(moe_lm, num_experts=4, r=4, alpha=8, router_options={"top_k": 2})
    assert model is moe_lm
    layers = decoder_layers(model.lm)
    assert isinstance(layers[0].mlp.moe.experts, MixLoRAExperts)
    assert not layers[1].mlp.moe.experts.gate_up_proj.requires_grad  # upcycled experts are frozen base weights
    with pytest.raises(ValueError, match="already a sparse MoE layer"):
        apply_mixlora(upcycle(dense_lm(), num_experts=4, router_options={"top_k": 2}), num_experts=4, r=4, alpha=8, layers="all", router_options={"top_k": 2})
    # Routers own their losses: LoRA experts with another k on an upcycled model each use their own k.
    mixed = apply_mixlora(upcycle(dense_lm(), num_experts=4, layers=[1], router_options={"top_k": 2}), num_experts=4,
                          r=4, alpha=8, router_options={"top_k": 1})
    ids, mask = batch()
    with capture_routing(mixed.lm) as records:
        out = mixed(input_ids=ids, attention_mask=mask, labels=ids)
    ks = {r.layer: r.output.indices.shape[1] for r in records}
    assert ks == {0: 1, 1: 2}
    expected = torch.stack([load_balancing_loss(r.output.logits, ks[r.layer], mask) for r in records]).mean()
    torch.testing.assert_close(out.aux_losses["balance"], expected)


def test_loramoe_is_soft_routed_and_matches_its_formula():
    base = dense_lm()
    mlp_ref = copy.deepcopy(decoder_layers(base)[0].mlp)
    model = apply_loramoe(base, num_experts=3, r=4, alpha=8)
    randomize_lora(model)
    block = decoder_layers(model.lm)[0].mlp
    assert isinstance(block, MoEBlock) and isinstance(block.moe.experts, LoRAMoEExperts)
    x = torch.randn(2, 5, TINY["hidden_size"])
    with torch.no_grad():
        y, routing = block.moe(x)
        e = block.moe.experts
        probs = torch.softmax(x @ block.moe.router.weight.T, dim=-1)  # [2, 5, E]
        delta = sum(probs[..., k, None] * (x @ e.lora_A[k].T @ e.lora_B[k].T) * 2.0 for k in range(3))
        ref = mlp_ref(x) + delta
    assert routing.indices.shape == (10, 3)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_errors_name_the_cause():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    with pytest.raises(ValueError, match="gate_proj/up_proj/down_proj"):
        apply_mixlora(gpt2, num_experts=2, r=4, alpha=8, attention_lora=False, router_options={"top_k": 1})
    with pytest.raises(ValueError, match="no nn.Linear named"):
        apply_mixlora(dense_lm(), num_experts=2, r=4, alpha=8, target_modules=["qkv"], router_options={"top_k": 1})
    with pytest.raises(ValueError, match="top_k=3 must be between 1 and num_experts=2"):
        apply_mixlora(dense_lm(), num_experts=2, r=4, alpha=8, router_options={"top_k": 3})
    with pytest.raises(ValueError, match="rank r must be >= 1"):
        apply_mixlora(dense_lm(), num_experts=2, r=0, alpha=8, router_options={"top_k": 1})
    with pytest.raises(ValueError, match="has no LoRALinear"):
        merge_lora(apply_mixlora(dense_lm(), num_experts=2, r=4, alpha=8, attention_lora=False, router_options={"top_k": 1}))
    lin = LoRALinear(torch.nn.Linear(4, 4), r=2, alpha=2)
    with pytest.raises(RuntimeError, match="not merged"):
        lin.unmerge()
    assert isinstance(apply_mixlora(dense_lm(), num_experts=2, r=4, alpha=8, router_options={"top_k": 1}), MoECausalLM)


@pytest.mark.parametrize("kind", ["mixlora", "loramoe"])
def test_lora_experts_train_under_bf16_autocast(kind):
    """Under CPU bf16 autocast the experts' outputs are bf16 while the residual stream stays fp32: the
    combine must accumulate in the stream's dtype (it failed in index_add_ before) and match fp32 closely."""
    lm = dense_lm()
    options = {"r": 4, "alpha": 8, "num_experts": 4}
    if kind == "mixlora":
        options["router_options"] = {"top_k": 2}
    from zoo.transforms.adapters import ADAPTERS

    model = ADAPTERS.build(kind, options).apply(lm)
    randomize_lora(model)
    ids, mask = batch()
    ref = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    out.backward()
    assert out.dtype == torch.float32 and abs(out.item() - ref.item()) < 0.05
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)
