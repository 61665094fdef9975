"""Experts of any FFN kind and the upcyclers: dense equality at init per LM family, noisy and split."""

import copy

import pytest
import torch
from transformers import (GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM, PhiConfig, PhiForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from zoo import upcycle
from zoo.io.moe_lm import load_moe_lm, save_moe_lm
from zoo.models.lm import decoder_layers
from zoo.models.mlp import ffn_spec
from zoo.moe.experts import GLUExperts, MLPExperts, SwiGLUExperts
from zoo.transforms.upcycle import balanced_kmeans

V = 97
LLAMA_LIKE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
# family -> (build, expected expert kind, its options)
FAMILIES = {
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE)), SwiGLUExperts, {}),
    "llama-bias": (lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE, mlp_bias=True)), GLUExperts,
                   {"activation": "silu", "bias": True}),
    "qwen2": (lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_LIKE)), SwiGLUExperts, {}),
    "mistral": (lambda: MistralForCausalLM(MistralConfig(**LLAMA_LIKE)), SwiGLUExperts, {}),
    "gemma": (lambda: GemmaForCausalLM(GemmaConfig(**LLAMA_LIKE, head_dim=8)), GLUExperts,
              {"activation": "gelu_tanh", "bias": False}),
    "phi": (lambda: PhiForCausalLM(PhiConfig(**LLAMA_LIKE)), MLPExperts, {"activation": "gelu_tanh", "bias": True}),
    "phi3": (lambda: Phi3ForCausalLM(Phi3Config(**LLAMA_LIKE, pad_token_id=0)), SwiGLUExperts, {}),
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                                                n_positions=64)), MLPExperts, {"activation": "gelu_tanh", "bias": True}),
}


def dense(family):
    torch.manual_seed(0)
    lm = FAMILIES[family][0]().eval()
    with torch.no_grad():  # non-trivial biases (transformers initializes them to zero)
        for name, p in lm.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.05)
    return lm


def batch():
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_upcycles_to_its_expert_kind_and_equals_dense_at_init(family, tmp_path):
    lm = dense(family)
    ids, mask = batch()
    with torch.no_grad():
        ref = lm(input_ids=ids, attention_mask=mask).logits
    prompt = ids[:1, :5]
    dense_tokens = lm.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model = upcycle(lm, num_experts=4, router_options={"top_k": 2}).eval()
    kind, options = FAMILIES[family][1:]
    experts = model.moe_layers()[0].experts
    assert type(experts) is kind
    assert model.moe_config.experts == {SwiGLUExperts: "swiglu", GLUExperts: "glu", MLPExperts: "mlp"}[kind]
    assert model.moe_config.experts_options == options
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), dense_tokens)
    with torch.no_grad():  # experts diverge, so the round trip must carry each one's weights
        for p in model.moe_layers()[0].parameters():
            p.add_(0.01 * torch.randn_like(p))
    loaded, _ = load_moe_lm(save_moe_lm(model, tmp_path / "moe"))
    assert loaded.moe_config == model.moe_config
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits)


def _stacked(experts):
    return getattr(experts, experts.in_proj), getattr(experts, experts.out_proj)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_noisy_noise_perturbs_every_expert_by_the_scale_of_each_weight_reproducibly(family):
    mlp = decoder_layers(dense(family))[0].mlp
    spec = ffn_spec(mlp, "test")

    def build(seed):
        return upcycle(copy.deepcopy(dense(family)), num_experts=4, router_options={"top_k": 2}, method="noisy",
                       method_options={"scale": 0.05, "seed": seed}).moe_layers()[0].experts

    a, b, c = build(3), build(3), build(4)
    w_in, w_out = _stacked(a)
    for e in range(4):
        for got, want in ((w_in[e], spec.w_in), (w_out[e], spec.w_out)):
            rel = (got - want).std() / want.std()
            assert 0.035 < rel < 0.065, rel  # noise std = 0.05 * the weight's std
    assert not torch.equal(w_in[0], w_in[1])
    assert all(torch.equal(x, y) for x, y in zip(_stacked(a), _stacked(b)))
    assert not torch.equal(_stacked(a)[0], _stacked(c)[0])
    if a.in_bias is not None:  # biases stay exact copies
        torch.testing.assert_close(getattr(a, a.in_bias)[2], spec.b_in)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 1.0])
def test_noisy_drop_reinitializes_exactly_r_f_neurons_per_expert_with_the_dense_statistics(family, ratio):
    spec = ffn_spec(decoder_layers(dense(family))[0].mlp, "test")
    experts = upcycle(dense(family), num_experts=4, router_options={"top_k": 2}, method="noisy",
                      method_options={"mode": "drop", "ratio": ratio, "seed": 1}).moe_layers()[0].experts
    f = spec.intermediate_size
    w_in, w_out = _stacked(experts)
    dropped_sets = []
    for e in range(4):
        out_changed = (w_out[e] != spec.w_out).any(dim=0)  # [f] neurons whose down column changed
        rows = (w_in[e] != spec.w_in).any(dim=1)  # [f] or [2f]
        in_changed = rows.reshape(-1, f).all(dim=0) if experts.gated else rows
        assert torch.equal(in_changed, out_changed)
        assert int(out_changed.sum()) == round(ratio * f)
        dropped_sets.append(out_changed)
    if ratio == 1.0:  # fully re-initialized: the statistics of the dense matrix
        torch.testing.assert_close(w_out.std(), spec.w_out.std(), rtol=0.1, atol=0)
    if ratio == 0.25:
        assert not torch.equal(dropped_sets[0], dropped_sets[1])  # each expert drops its own neurons


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2", "phi3"])
@pytest.mark.parametrize("partition", ["random", "coactivation"])
def test_split_experts_summed_equal_the_dense_ffn(family, partition):
    lm = dense(family)
    mlp = copy.deepcopy(decoder_layers(lm)[0].mlp)
    ids, mask = batch()
    model = upcycle(lm, num_experts=4, router_options={"top_k": 2}, method="split",
                    method_options={"partition": partition, "output_scale": "none"},
                    calibration={"input_ids": ids, "attention_mask": mask})
    experts = model.moe_layers()[0].experts
    assert experts.intermediate_size == 16 and model.moe_config.expert_intermediate_size == 16
    x = torch.randn(11, 32, dtype=torch.float64)
    experts, mlp = experts.double(), mlp.double()
    all_on = torch.arange(4).expand(11, 4)
    torch.testing.assert_close(experts(x, torch.ones(11, 4, dtype=torch.float64), all_on), mlp(x))
    neurons = torch.cat([getattr(experts, experts.out_proj)[e] for e in range(4)], dim=1)  # [d, f] permuted
    assert sorted(neurons.sum(0).tolist()) == pytest.approx(sorted(ffn_spec(mlp, "t").w_out.sum(0).tolist()))


def test_split_with_k_equal_e_and_a_flat_router_equals_dense_and_drift_shrinks_with_k():
    ids, mask = batch()
    with torch.no_grad():
        ref = dense("llama")(input_ids=ids, attention_mask=mask).logits
    model = upcycle(dense("llama"), num_experts=4, router_options={"top_k": 4}, method="split",
                    method_options={"router_scale": 0.0}).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref, rtol=1e-5, atol=1e-5)
    drift = {}
    for k in (1, 2, 3):
        m = upcycle(dense("llama"), num_experts=4, router_options={"top_k": k}, method="split").eval()
        with torch.no_grad():
            drift[k] = ((m(input_ids=ids, attention_mask=mask).logits - ref).norm() / ref.norm()).item()
    assert drift[1] > drift[2] > drift[3] > 0


def test_balanced_kmeans_recovers_planted_groups_in_equal_sizes():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 50, generator=g) * 3
    labels = torch.arange(32) % 4
    features = centers[labels] + 0.3 * torch.randn(32, 50, generator=g)
    assign = balanced_kmeans(features, 4, torch.Generator().manual_seed(5))
    assert torch.bincount(assign).tolist() == [8, 8, 8, 8]
    for c in range(4):  # each cluster is one planted group
        assert len(set(labels[assign == c].tolist())) == 1


def test_upcycler_errors_name_the_cause():
    with pytest.raises(ValueError, match="mode='sideways' is not 'noise' or 'drop'"):
        upcycle(dense("llama"), num_experts=2, router_options={"top_k": 1}, method="noisy", method_options={"mode": "sideways"})
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\], got 1.5"):
        upcycle(dense("llama"), num_experts=2, router_options={"top_k": 1}, method="noisy",
                method_options={"mode": "drop", "ratio": 1.5})
    with pytest.raises(ValueError, match="needs calibration inputs"):
        upcycle(dense("llama"), num_experts=2, router_options={"top_k": 1}, method="split",
                method_options={"partition": "coactivation"})
    with pytest.raises(ValueError, match=r"makes experts of width 64/4 = 16, but expert_intermediate_size=32"):
        upcycle(dense("llama"), num_experts=4, expert_intermediate_size=32, router_options={"top_k": 1}, method="split")
    with pytest.raises(ValueError, match="copies the dense FFN \\(width 64\\) into each expert, but expert_intermediate_size=32"):
        upcycle(dense("llama"), num_experts=4, expert_intermediate_size=32, router_options={"top_k": 1})
