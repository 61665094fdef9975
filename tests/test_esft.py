"""ESFT: relevance against a hand computation, selection, masked training, expert adapters."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zoo import upcycle
from zoo.io.checkpoint import CheckpointError
from zoo.io.moe_lm import load_moe_lm, save_moe_lm
from zoo.moe.routers import RouterOutput
from zoo.transforms.esft import (apply_expert_adapter, esft_param_groups, expert_gradient_masks, expert_relevance,
                                 routing_relevance, save_expert_adapter, select_experts)


def test_relevance_matches_a_hand_computation_on_a_fixed_trace():
    # B=2 samples of S=2 tokens, K=2 slots, E=3; sample 1's second token is padding
    indices = torch.tensor([[0, 1], [1, 2], [0, -1], [2, 1]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [1.0, 0.0], [0.5, 0.5]])
    out = RouterOutput(torch.zeros(4, 3), weights, indices)
    mask = torch.tensor([[1, 1], [1, 0]])
    gate = routing_relevance(out, mask, 3, "gate")
    torch.testing.assert_close(gate, torch.tensor([[0.35, 0.45, 0.20], [1.0, 0.0, 0.0]]))
    token = routing_relevance(out, mask, 3, "token")
    torch.testing.assert_close(token, torch.tensor([[0.25, 0.50, 0.25], [0.5, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="metric 'loss' is not one of"):
        routing_relevance(out, mask, 3, "loss")


def test_select_takes_the_smallest_set_reaching_the_share_p():
    scores = {0: torch.tensor([0.2, 0.5, 0.3]), 2: torch.tensor([1.0, 1.0, 0.0])}
    assert select_experts(scores, 0.5) == {0: [1], 2: [0]}
    assert select_experts(scores, 0.6) == {0: [1, 2], 2: [0, 1]}
    assert select_experts(scores, 1.0) == {0: [0, 1, 2], 2: [0, 1]}
    for p in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"p must be in \(0, 1\]"):
            select_experts(scores, p)
    with pytest.raises(ValueError, match="layer 0's experts all have relevance 0"):
        select_experts({0: torch.zeros(3)}, 0.5)


def _moe(seed=0):
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2))
    return upcycle(lm, num_experts=4, router_options={"top_k": 2}, method="noisy", method_options={"scale": 0.1})


def _batches():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (3, 4, 10), generator=g)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]


def test_relevance_of_a_model_sums_to_one_per_layer_and_trains_only_the_selected_experts(tmp_path):
    model = _moe()
    for metric in ("gate", "token"):
        rel = expert_relevance(model, _batches(), metric)
        assert sorted(rel) == [0, 1]
        for scores in rel.values():
            assert scores.shape == (4,) and float(scores.sum()) == pytest.approx(1.0, abs=1e-5)
    selected = {0: [1], 1: [0, 2]}
    base_dir = save_moe_lm(model, tmp_path / "base")
    for p in model.parameters():
        p.requires_grad_(False)
    for moe in model.moe_layers().values():
        for p in moe.experts.parameters():
            p.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handles = expert_gradient_masks(model, selected)
    opt = torch.optim.AdamW(esft_param_groups(model, selected, weight_decay=0.1), lr=1e-2)
    model.train()
    for batch in _batches():
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    for h in handles:
        h.remove()
    after = model.state_dict()
    for layer, moe in model.moe_layers().items():
        for name in ("gate_up_proj", "down_proj"):
            key = f"lm.model.layers.{layer}.mlp.moe.experts.{name}"
            for e in range(4):
                same = torch.equal(before[key][e], after[key][e])
                assert same == (e not in selected[layer]), (layer, name, e)
    assert all(torch.equal(before[k], after[k]) for k in before if ".experts." not in k)

    adapter = save_expert_adapter(model, selected, tmp_path / "adapter", base_dir)
    size = (adapter / "experts.safetensors").stat().st_size
    expert_bytes = sum(p[0].numel() * p.element_size() for moe in model.moe_layers().values()
                       for p in (moe.experts.gate_up_proj, moe.experts.down_proj))  # one expert per layer
    assert 0 <= size - 3 * expert_bytes / 2 < 2048  # 3 experts of 2 layers' worth, plus the header
    restored, _ = load_moe_lm(base_dir)
    apply_expert_adapter(restored, adapter, base_dir)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in after.items())  # base + adapter == merged

    other = save_moe_lm(_moe(seed=1), tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"was made for base [0-9a-f]{64}, but .* is [0-9a-f]{64}"):
        apply_expert_adapter(load_moe_lm(other)[0], adapter, other)
    with pytest.raises(ValueError, match=r"layer 1 has experts 0..3, not \[7\]"):
        expert_gradient_masks(model, {1: [7]})


def test_extend_moe_keeps_old_outputs_for_tokens_the_new_rows_lose_and_refuses_what_it_cannot_extend():
    from zoo import MoEConfig
    from zoo.moe.layer import build_sparse_moe
    from zoo.transforms.extend import extend_moe

    cfg = MoEConfig(num_experts=4, router_options={"top_k": 2})
    torch.manual_seed(0)
    moe = build_sparse_moe(cfg, 32, 48)
    with torch.no_grad():  # tokens whose two best old logits are positive: a zero new row never wins
        x = 50 * (moe.router.weight[0] + moe.router.weight[1]) + 0.01 * torch.randn(6, 32)
        ref, before = moe(x)
        assert (before.logits.topk(2).values > 0).all()
        extend_moe(moe, cfg, 2, [1, 3])
        moe.router.weight[4:] = 0
        got, routing = moe(x)
    assert moe.experts.num_experts == 6 and int(routing.indices.max()) < 4
    torch.testing.assert_close(got, ref)  # new experts only add choices: old routing, old outputs
    with pytest.raises(ValueError, match="number of new experts must be >= 1"):
        extend_moe(moe, cfg, 0, [])
    null_cfg = MoEConfig(num_experts=4, router="null_experts", router_options={"top_k": 2, "num_null": 2})
    with pytest.raises(ValueError, match="MoExtend adds rows to a router whose state is one weight"):
        extend_moe(build_sparse_moe(null_cfg, 32, 48), null_cfg, 1, [0])
