"""Exports of issue 25: a DeepSeek-V3-style MoE to `DeepseekV3ForCausalLM`, softmax top-k on a Qwen3 base
to `Qwen3MoeForCausalLM`; plain transformers loads each directory and generates the zoo model's tokens.
What a class cannot hold is refused naming it."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, LlamaConfig, Qwen3Config

from zoo import upcycle
from zoo.io.export import ExportError, export_hf, hf_target, to_hf
from zoo.moe import MoEConfig

V = 96
IDS = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(7))


def _deepseek_base(layers=3):
    return DeepseekV3Config(vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=48,
                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                            first_k_dense_replace=layers, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                            qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64, num_mtp_layers=0)


def _randomize(model):
    with torch.no_grad():
        for moe in model.moe_layers().values():
            moe.router.weight.normal_(std=0.5)
            if hasattr(moe.router, "e_score_correction_bias"):
                moe.router.e_score_correction_bias.normal_(std=0.2)  # a trained aux-free bias changes the choice
            moe.experts.gate_up_proj.add_(0.05 * torch.randn_like(moe.experts.gate_up_proj))
            moe.experts.down_proj.add_(0.05 * torch.randn_like(moe.experts.down_proj))
            if moe.shared_expert is not None:
                moe.shared_expert.down_proj.weight.normal_(std=0.05)
    return model.eval()


DEEPSEEK_ROUTER = {"top_k": 2, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5}


def deepseek_moe(shared=48, gate=False, base=None, layers="after_1"):
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(base or _deepseek_base())
    return _randomize(upcycle(lm, MoEConfig(num_experts=8, router="deepseek_v3", router_options=DEEPSEEK_ROUTER,
                                            layers=layers, shared_expert_size=shared, shared_expert_gate=gate)))


def qwen3_moe(**kw):
    torch.manual_seed(1)
    lm = AutoModelForCausalLM.from_config(Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=48,
                                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                      head_dim=8, max_position_embeddings=64))
    return _randomize(upcycle(lm, MoEConfig(num_experts=4, router_options={"top_k": 2, "norm_topk_prob": False}, **kw)))


@pytest.mark.parametrize("build, target, hf_class", [
    (lambda: deepseek_moe(), "deepseek_v3", "DeepseekV3ForCausalLM"),
    (lambda: deepseek_moe(shared=0, layers="all"), "deepseek_v3", "DeepseekV3ForCausalLM"),
    (lambda: qwen3_moe(layers=[1]), "qwen3_moe", "Qwen3MoeForCausalLM"),
    (lambda: qwen3_moe(), "qwen3_moe", "Qwen3MoeForCausalLM"),
], ids=["deepseek-shared-first-dense", "deepseek-all-moe-no-shared", "qwen3-partial", "qwen3-all"])
def test_export_loads_in_plain_transformers_with_the_same_logits_and_generated_tokens(build, target, hf_class, tmp_path):
    model = build()
    assert hf_target(model) == target
    path = export_hf(model, tmp_path / "hf")  # verifies the logits in memory first
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == [hf_class]
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(hf).__name__ == hf_class
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(hf.generate(IDS, **kw), model.generate(IDS, **kw))
    if target == "deepseek_v3":
        assert cfg["n_group"] == 4 and cfg["topk_group"] == 2 and cfg["routed_scaling_factor"] == 2.5
        assert cfg["first_k_dense_replace"] == (1 if cfg["n_shared_experts"] else 0)
        for i, moe in model.moe_layers().items():
            torch.testing.assert_close(hf.model.layers[i].mlp.gate.e_score_correction_bias,
                                       moe.router.e_score_correction_bias)


def test_what_deepseek_v3_cannot_hold_is_refused_naming_it():
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2, max_position_embeddings=64))
    on_llama = upcycle(llama, MoEConfig(num_experts=8, router="deepseek_v3", router_options=DEEPSEEK_ROUTER))
    with pytest.raises(ExportError, match=r"deepseek_v3: DeepseekV3ForCausalLM holds multi-head latent attention.*"
                                          r"a 'llama' base's q/k/v attention has no exact form in it"):
        hf_target(on_llama)
    with pytest.raises(ExportError, match=r"ungated; this one is scaled by sigmoid\(shared_expert_gate\)"):
        to_hf(deepseek_moe(gate=True), "deepseek_v3")
    with pytest.raises(ExportError, match=r"dense layers only before the first MoE layer .* dense layers \[1\], MoE layers \[0, 2\]"):
        to_hf(deepseek_moe(layers=[0, 2]), "deepseek_v3")
    with pytest.raises(ExportError, match=r"Qwen3-MoE attention normalizes q and k per head"):
        to_hf(deepseek_moe(), "qwen3_moe")
    with pytest.raises(ExportError, match=r"Qwen3-MoE has no shared expert"):
        to_hf(qwen3_moe(shared_expert_size=16), "qwen3_moe")
    softmax = deepseek_moe()
    for moe in softmax.moe_layers().values():
        moe.router.score_function = "softmax"
    with pytest.raises(ExportError, match=r"scores with a sigmoid, this router with softmax"):
        to_hf(softmax, "deepseek_v3")
