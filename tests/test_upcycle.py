"""Upcycling transformers causal LMs: dense equivalence at init, layer choice, losses, generate."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers import Qwen2Config, Qwen2ForCausalLM

from zoo import MoEConfig, upcycle
from zoo.models.lm import MoEBlock, decoder_layers
from zoo.moe import load_balancing_loss, router_z_loss

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def dense_lm(family="llama", **overrides):
    cfg_cls, model_cls = FAMILIES[family]
    model = model_cls(cfg_cls(**{**TINY, **overrides}))
    return model.eval()


def batch():
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("layers", ["all", "every_other", "second_half"])
def test_upcycled_model_reproduces_dense_logits(family, layers):
    lm = dense_lm(family)
    ids, mask = batch()
    with torch.no_grad():
        ref = lm(input_ids=ids, attention_mask=mask).logits
    model = upcycle(lm, num_experts=4, layers=layers, router_options={"top_k": 2}).eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    assert len(out.routing) == len(model.moe_layers())


def test_upcycled_with_shared_expert_still_equals_dense():
    lm = dense_lm()
    ids, mask = batch()
    with torch.no_grad():
        ref = lm(input_ids=ids, attention_mask=mask).logits
    model = upcycle(lm, MoEConfig(num_experts=4, shared_expert_size=16, router_options={"top_k": 1}))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "layers, expected",
    [("all", [0, 1, 2, 3]), ("every_other", [0, 2]), ("first_half", [0, 1]), ("second_half", [2, 3]), ([3, 1], [1, 3])],
)
def test_layer_choice(layers, expected):
    model = upcycle(dense_lm(), num_experts=4, layers=layers, router_options={"top_k": 2})
    assert sorted(model.moe_layers()) == expected
    for i, layer in enumerate(decoder_layers(model.lm)):
        assert isinstance(layer.mlp, MoEBlock) == (i in expected)


def test_loss_adds_weighted_aux_losses_over_real_tokens():
    model = upcycle(dense_lm(), num_experts=4, layers="every_other", router_options={"top_k": 2}, loss_coefs={"balance": 0.1, "z": 0.01})
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    # independent recomputation: run the router of each MoE layer on that layer's real-token inputs
    inputs = {}
    hooks = [moe.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0].reshape(-1, 32)))
             for i, moe in model.moe_layers().items()]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    real = mask.reshape(-1).bool()
    aux = torch.stack([load_balancing_loss(moe.router(inputs[i][real]).logits, 2) for i, moe in model.moe_layers().items()]).mean()
    z = torch.stack([router_z_loss(moe.router(inputs[i][real]).logits) for i, moe in model.moe_layers().items()]).mean()
    torch.testing.assert_close(out.aux_losses["balance"], aux)
    torch.testing.assert_close(out.aux_losses["z"], z)
    torch.testing.assert_close(out.aux_loss, 0.1 * aux + 0.01 * z)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.1 * aux + 0.01 * z)
    for stats in out.routing:
        assert stats.load.sum().item() == pytest.approx(1.0)
        assert 0 <= stats.entropy.item() <= torch.log(torch.tensor(4.0)).item() + 1e-6


def test_generate_matches_dense_greedy_generation():
    lm = dense_lm()
    prompt = torch.randint(0, TINY["vocab_size"], (1, 5))
    dense_tokens = lm.generate(prompt, max_new_tokens=8, do_sample=False)
    model = upcycle(lm, num_experts=4, router_options={"top_k": 2})
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), dense_tokens)


def test_training_step_reaches_every_parameter_and_experts_diverge():
    model = upcycle(dense_lm(), num_experts=4, router_options={"top_k": 2, "jitter_noise": 0.01}).train()
    ids, mask = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    opt.step()
    experts = model.moe_layers()[0].experts.gate_up_proj
    assert not torch.allclose(experts[0], experts[1]), "experts received identical updates"


def test_upcycle_errors_name_the_cause():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, bos_token_id=0, eos_token_id=0))
    for block in gpt2.transformer.h:
        block.mlp = torch.nn.Sequential(torch.nn.Linear(32, 32))
    with pytest.raises(ValueError, match=r"layer 0's mlp \(Sequential\) is no FFN an expert kind can hold \(it has \['0'\]\)"):
        upcycle(gpt2, num_experts=4, router_options={"top_k": 2})
    with pytest.raises(ValueError, match="Sequential has no list of decoder layers with an `mlp`"):
        upcycle(torch.nn.Sequential(torch.nn.Linear(4, 4)), num_experts=4, router_options={"top_k": 2})
    with pytest.raises(ValueError, match=r"swiglu experts use \('silu',\); LlamaMLP uses gelu"):
        upcycle(dense_lm(hidden_act="gelu"), num_experts=4, experts="swiglu", router_options={"top_k": 2})
    with pytest.raises(ValueError, match="swiglu experts have no biases; LlamaMLP has biased projections"):
        upcycle(dense_lm(mlp_bias=True), num_experts=4, experts="swiglu", router_options={"top_k": 2})
    with pytest.raises(ValueError, match="mlp experts hold plain FFNs; LlamaMLP is a gated FFN"):
        upcycle(dense_lm(), num_experts=4, experts="mlp", router_options={"top_k": 2})
    with pytest.raises(ValueError, match="need an explicit expert kind"):
        upcycle(dense_lm(), num_experts=4, experts_options={"bias": True}, router_options={"top_k": 2})
    with pytest.raises(ValueError, match="upcycler 'split' partitions the FFN's 64 neurons into num_experts=3"):
        upcycle(dense_lm(), num_experts=3, method="split", router_options={"top_k": 1})
    with pytest.raises(ValueError, match="top_k=8 must be between 1 and num_experts=4"):
        upcycle(dense_lm(), num_experts=4, router_options={"top_k": 8})
    with pytest.raises(ValueError, match="out of range for a model with 4 layers"):
        upcycle(dense_lm(), num_experts=4, layers=[4], router_options={"top_k": 2})
    with pytest.raises(ValueError, match="already an MoECausalLM"):
        upcycle(upcycle(dense_lm(), num_experts=2, router_options={"top_k": 1}), num_experts=2, router_options={"top_k": 1})
