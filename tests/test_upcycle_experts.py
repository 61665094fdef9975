"""upcycle_from_experts: experts seeded from specialized FFN copies (Uni-MoE stage 2, MedPLIB)."""

import copy

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from zoo import MoEConfig
from zoo.models.lm import MoEBlock, decoder_layers
from zoo.moe import RouterOutput
from zoo.transforms import upcycle_from_experts

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def dense_lm(**overrides):
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()


def specialized_copy(base):
    """The base model with every FFN re-drawn, as if fine-tuned on one modality."""
    c = copy.deepcopy(base)
    with torch.no_grad():
        for layer in decoder_layers(c):
            for p in layer.mlp.parameters():
                p.normal_(std=0.05)
    return c


class ForcedRouter(nn.Module):
    """Sends every token to one expert with weight 1 (keyword-injected into `SparseMoE`); no losses."""

    default_loss_coefs = {}

    def __init__(self, hidden_size, num_experts, expert):
        super().__init__()
        self.hidden_size, self.num_experts, self.expert = hidden_size, num_experts, expert

    def forward(self, x, mask=None):
        t = x.shape[0]
        logits = torch.zeros(t, self.num_experts, dtype=x.dtype)
        logits[:, self.expert] = 1.0
        return RouterOutput(logits, torch.ones(t, 1), torch.full((t, 1), self.expert, dtype=torch.long))

    def aux_losses(self, output, mask=None, context=None):
        return {}


def ffn_state_dicts(model):
    return {i: {k: v.clone() for k, v in layer.mlp.state_dict().items()} for i, layer in enumerate(decoder_layers(model))}


@pytest.mark.parametrize("form", ["models", "state_dicts"])
def test_routing_to_expert_j_reproduces_the_jth_specialized_model(form):
    base = dense_lm()
    copies = [specialized_copy(base), specialized_copy(base)]
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    with torch.no_grad():
        refs = [c(input_ids=ids).logits for c in copies]
    assert not torch.allclose(refs[0], refs[1], atol=1e-3)
    given = copies if form == "models" else [ffn_state_dicts(c) for c in copies]
    model = upcycle_from_experts(base, given, MoEConfig(num_experts=2, router_options={"top_k": 1}))
    for j, ref in enumerate(refs):
        for moe in model.moe_layers().values():
            moe.router = ForcedRouter(TINY["hidden_size"], 2, j)
        with torch.no_grad():
            out = model(input_ids=ids)
        torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)


def test_more_experts_than_copies_cycle_through_them_and_routers_are_fresh():
    base = dense_lm()
    copies = [specialized_copy(base), specialized_copy(base)]
    model = upcycle_from_experts(base, copies, num_experts=4, layers=[1], router_options={"top_k": 2})
    assert sorted(model.moe_layers()) == [1]
    experts = model.moe_layers()[1].experts
    mlp1 = decoder_layers(copies[1])[1].mlp
    torch.testing.assert_close(experts.gate_up_proj[3], torch.cat([mlp1.gate_proj.weight, mlp1.up_proj.weight]))
    torch.testing.assert_close(experts.down_proj[3], mlp1.down_proj.weight)
    assert torch.equal(experts.gate_up_proj[0], experts.gate_up_proj[2])
    assert not torch.equal(experts.gate_up_proj[0], experts.gate_up_proj[1])
    assert model.moe_layers()[1].router.weight.std() > 0


def test_errors_name_the_cause_and_leave_the_model_unchanged():
    base = dense_lm()
    good = specialized_copy(base)
    cases = [
        (dict(copies=[good, good, good], num_experts=4), "not a multiple of the 3 specialized copies"),
        (dict(copies=[], num_experts=2), "non-empty list"),
        (dict(copies=[good, dense_lm(intermediate_size=40)], num_experts=2), r"copy 1, layer 0: gate_proj.weight has shape \(40, 32\)"),
        (dict(copies=[good, {0: ffn_state_dicts(good)[0]}], num_experts=2), "copy 1, layer 1: the copy has no entry for layer 1"),
        (dict(copies=[good, {0: {**ffn_state_dicts(good)[0], "gate_proj.bias": torch.zeros(48)},
                             1: ffn_state_dicts(good)[1]}], num_experts=2), r"unexpected keys \['gate_proj.bias'\]"),
        (dict(copies=[good, GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4))], num_experts=2),
         r"copy 1, layer 0: the copy's mlp \(GPT2MLP\) is a plain FFN \(c_fc/c_proj \(Conv1D\)\) but the model's "
         r"\(LlamaMLP\) is a gated FFN"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            upcycle_from_experts(base, kw["copies"], num_experts=kw["num_experts"], router_options={"top_k": 1})
        assert not any(isinstance(layer.mlp, MoEBlock) for layer in decoder_layers(base))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(ValueError, match=r"layer 0: c_fc.weight has shape \(32, 128\) but the model's FFN has \(32, 64\)"):
        upcycle_from_experts(GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_inner=64)),
                             [gpt2], num_experts=1, router_options={"top_k": 1})
