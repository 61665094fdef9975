"""ExFlow expert placement: affinity by hand, placements against brute force, the cost model against a
token-by-token simulation, and the function-preserving permutation for every router and expert kind."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zoo import upcycle
from zoo.inference.placement import (PLACERS, Placement, RoutingTrace, affinity, affinity_counts, contiguous_placement,
                                     cross_device_transitions, greedy_placement, ilp_placement, permute_model_dir,
                                     place, placement_cost, routing_trace)
from zoo.moe import EXPERTS, ROUTERS, MoEConfig
from zoo.moe.layer import build_sparse_moe
from zoo.transforms.permute import permute_experts, permute_moe

E = 4


def _trace(*indices, num_experts=3, layers=None):
    layers = layers or tuple(range(0, 2 * len(indices), 2))
    return RoutingTrace(layers, tuple(torch.tensor(i) for i in indices), (num_experts,) * len(indices))


def _random_trace(seed, tokens=40, layers=3, num_experts=4, k=2):
    g = torch.Generator().manual_seed(seed)
    idx = [torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(tokens)]) for _ in range(layers)]
    # some affinity: half the tokens follow expert e -> (e + 1) mod E from layer to layer
    for l in range(1, layers):
        idx[l][: tokens // 2] = (idx[l - 1][: tokens // 2] + 1) % num_experts
    return RoutingTrace(tuple(range(layers)), tuple(idx), (num_experts,) * layers)


# --- affinity -------------------------------------------------------------------------------------


def test_affinity_matches_a_hand_count_on_a_fixed_trace():
    # 4 tokens, E=3, K=2; token 2 has an empty slot at layer 0, token 3 no expert at layer 2
    trace = _trace([[0, 1], [1, 2], [0, -1], [2, 0]],
                   [[1, 2], [1, 0], [2, 1], [0, 2]],
                   [[0, 1], [2, 1], [1, 0], [-1, -1]])
    c01, c12 = affinity_counts(trace)
    # layer 0 -> 2: t0 {0,1}x{1,2}, t1 {1,2}x{0,1}, t2 {0}x{1,2}, t3 {0,2}x{0,2}
    want01 = torch.tensor([[1, 2, 3], [1, 2, 1], [2, 1, 1]], dtype=torch.float64)
    torch.testing.assert_close(c01, want01)
    # layer 2 -> 4: t0 {1,2}x{0,1}, t1 {0,1}x{1,2}, t2 {1,2}x{0,1}, t3 nothing
    want12 = torch.tensor([[0, 1, 1], [2, 3, 1], [2, 2, 0]], dtype=torch.float64)
    torch.testing.assert_close(c12, want12)
    p01, p12 = affinity(trace)
    # tokens choosing expert 0 at layer 0: t0, t2, t3 (3); expert 1: t0, t1; expert 2: t1, t3
    torch.testing.assert_close(p01, want01 / torch.tensor([3.0, 2.0, 2.0], dtype=torch.float64)[:, None])
    # layer 2: expert 0 chosen by t1, t3; expert 1 by t0, t1, t2; expert 2 by t0, t2, t3
    torch.testing.assert_close(p12, want12 / torch.tensor([2.0, 3.0, 3.0], dtype=torch.float64)[:, None])


def test_top1_affinity_rows_are_conditional_distributions():
    trace = _random_trace(0, k=1)
    for p in affinity(trace):
        torch.testing.assert_close(p.sum(1), torch.ones(4, dtype=torch.float64))


# --- placements -----------------------------------------------------------------------------------


def _balanced(num_experts, g):
    """Every labelled balanced assignment of `num_experts` experts to g devices (brute force)."""
    per = num_experts // g
    return [torch.tensor(a) for a in itertools.product(range(g), repeat=num_experts)
            if all(a.count(d) == per for d in range(g))]


def _naive_cross(trace, devices):
    """Cross-device transitions counted token by token, pair by pair (the independent reference)."""
    total = 0
    for t in range(trace.num_tokens):
        for pos in range(len(trace.layers) - 1):
            a = {int(i) for i in trace.indices[pos][t] if i >= 0}
            b = {int(j) for j in trace.indices[pos + 1][t] if j >= 0}
            total += sum(int(devices[pos][i]) != int(devices[pos + 1][j]) for i in a for j in b)
    return total


@pytest.mark.parametrize("method", sorted(PLACERS))
@pytest.mark.parametrize("g", [1, 2, 4])
def test_every_placement_keeps_the_balance_constraint(method, g):
    trace = _random_trace(1)
    p = place(trace, g, method)
    assert p.layers == trace.layers and p.num_devices == g
    for dev, e in zip(p.devices, trace.num_experts):
        assert dev.shape == (e,) and int(dev.min()) >= 0 and int(dev.max()) < g
        assert torch.bincount(dev, minlength=g).tolist() == [e // g] * g
    assert cross_device_transitions(trace, p) == _naive_cross(trace, p.devices)


@pytest.mark.parametrize("seed,cutoff", [(0, True), (1, True), (2, False), (3, False)])
def test_the_ilp_is_optimal_against_brute_force_and_never_worse_than_greedy(seed, cutoff):
    trace = _random_trace(seed, tokens=30, layers=3)
    best = min(_naive_cross(trace, combo) for combo in itertools.product(_balanced(4, 2), repeat=3))
    ilp = ilp_placement(trace, 2, at_least_greedy=cutoff)
    assert ilp.optimal is True
    assert cross_device_transitions(trace, ilp) == best
    greedy = greedy_placement(trace, 2)
    contiguous = contiguous_placement(trace, 2)
    assert cross_device_transitions(trace, ilp) <= cross_device_transitions(trace, greedy)
    assert cross_device_transitions(trace, ilp) <= cross_device_transitions(trace, contiguous)


def test_the_ilp_is_optimal_against_brute_force_with_one_expert_per_device():
    trace = _random_trace(4, tokens=30, layers=2)
    best = min(_naive_cross(trace, combo) for combo in itertools.product(_balanced(4, 4), repeat=2))
    ilp = ilp_placement(trace, 4, at_least_greedy=False)
    assert ilp.optimal is True and cross_device_transitions(trace, ilp) == best


def test_a_time_limited_ilp_is_still_never_worse_than_greedy():
    trace = _random_trace(7, tokens=300, layers=4, num_experts=16)
    greedy = greedy_placement(trace, 4)
    for limit in (0.05, 1.0):
        ilp = ilp_placement(trace, 4, time_limit=limit)
        assert ilp.optimal is False or limit > 0.05  # 16 experts x 4 layers: not proven in 50 ms
        assert cross_device_transitions(trace, ilp) <= cross_device_transitions(trace, greedy)
        if "fallback" in ilp.info:
            assert all(torch.equal(a, b) for a, b in zip(ilp.devices, greedy.devices))


def test_the_ilp_finds_a_planted_placement_that_contiguous_misses():
    # tokens go 0 -> 3 and 1 -> 2 (and 2 -> 1, 3 -> 0): a perfect placement puts {0, 3} on one device
    idx0 = torch.tensor([[0], [1], [2], [3]] * 5)
    trace = RoutingTrace((0, 1), (idx0, 3 - idx0), (4, 4))
    ilp = ilp_placement(trace, 2)
    assert cross_device_transitions(trace, ilp) == 0
    assert cross_device_transitions(trace, contiguous_placement(trace, 2)) == 20


# --- cost model -----------------------------------------------------------------------------------


def _naive_volumes(trace, devices, g):
    """Context-coherent EP and plain EP volumes, simulated token by token (module docstring's model)."""
    exflow = ep = 0.0
    for t in range(trace.num_tokens):
        where = None  # devices holding the token's state; None: its home, uniform over the g devices
        for pos in range(len(trace.layers)):
            dest = {int(devices[pos][e]) for e in trace.indices[pos][t] if e >= 0}
            if pos > 0:
                ep += 2 * len(dest) * (g - 1) / g
                if where is None:
                    exflow += len(dest) * (g - 1) / g
                else:
                    exflow += sum(a != b for a in where for b in dest)
            if dest:
                where = dest
    return exflow, ep


@pytest.mark.parametrize("g", [2, 4])
def test_the_cost_model_equals_a_token_by_token_simulation(g):
    trace = _random_trace(5, tokens=25, layers=4)
    idx = [i.clone() for i in trace.indices]
    idx[0][:3] = -1  # tokens with no expert yet start at their home
    idx[2][3:6] = -1  # tokens with no expert at a layer keep their place
    idx[1][6:9, 1] = -1
    trace = RoutingTrace(trace.layers, tuple(idx), trace.num_experts)
    for p in (contiguous_placement(trace, g), greedy_placement(trace, g), ilp_placement(trace, g)):
        cost = placement_cost(trace, p)
        exflow, ep = _naive_volumes(trace, p.devices, g)
        assert cost.exflow_volume == pytest.approx(exflow) and cost.ep_volume == pytest.approx(ep)
        assert cost.cross_device == _naive_cross(trace, p.devices)
        assert cost.tokens == 25


def test_with_top1_routing_the_exflow_volume_is_the_cross_device_transitions():
    trace = _random_trace(2, k=1, layers=4)
    for method in PLACERS:
        cost = placement_cost(trace, place(trace, 2, method))
        assert cost.exflow_volume == cost.cross_device


# --- the permutation ------------------------------------------------------------------------------


def _lm(router="topk", options=None, num_experts=E, experts="auto"):
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model = upcycle(lm, num_experts=num_experts, router=router, router_options=options or {}, layers="all",
                    method="noisy", method_options={"scale": 0.5})
    for moe in model.moe_layers().values():  # routers far from uniform, so the permutation matters
        for name, t in moe.router.state_dict().items():
            if t.is_floating_point() and t.dim() > 0 and name != "counts":
                t.copy_(torch.randn_like(t))
    return model.double().eval()


def _batches():
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: not in the trace
    return [{"input_ids": ids, "attention_mask": mask}]


PERMS = {0: [2, 0, 3, 1], 1: [3, 2, 1, 0], 2: [1, 0, 2, 3]}


@pytest.mark.parametrize("name", ROUTERS.names())
def test_the_permuted_model_computes_the_same_logits_for_every_router(name):
    model = _lm(name, dict(ROUTERS.entry(name).example))
    batch = _batches()[0]
    with torch.no_grad():
        ref = model(**batch).logits
    trace = routing_trace(model, [batch])
    assert trace.num_tokens == 27  # 30 positions, 3 padding
    permute_experts(model, PERMS)
    with torch.no_grad():
        got = model(**batch).logits
    # float64 model; routers take their softmax in float32, whose sums run in the new order
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-7)
    assert (got - ref).abs().max() < 1e-6 * ref.abs().max()
    after = routing_trace(model, [batch])
    for a, b in zip(after.indices, trace.permuted(PERMS).indices):  # the same choices under the new names
        assert torch.equal(a.sort(1).values, b.sort(1).values)


def test_a_placement_applied_to_a_model_makes_its_cost_the_contiguous_cost_of_the_new_trace():
    model = _lm()
    trace = routing_trace(model, _batches())
    for g in (2, 4):
        p = ilp_placement(trace, g)
        permuted = _lm()
        permute_experts(permuted, p.permutations())
        new = routing_trace(permuted, _batches())
        assert placement_cost(new, contiguous_placement(new, g)) == placement_cost(trace, p)


@pytest.mark.parametrize("kind", EXPERTS.names())
def test_every_expert_kind_is_permuted_with_its_router_rows(kind):
    torch.manual_seed(0)
    moe = build_sparse_moe(MoEConfig(num_experts=E, router="null_experts", router_options={"top_k": 2, "num_null": 2},
                                     experts=kind, shared_expert_size=8), 16, 12).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(20, 16, dtype=torch.float64)
    with torch.no_grad():
        y0, r0 = moe(x)
        null_rows = moe.router.weight[E:].clone()
        permute_moe(moe, [3, 1, 0, 2])
        y1, r1 = moe(x)
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-6 * float(y0.abs().max()))  # float32 router weights
    assert torch.equal(moe.router.weight[E:], null_rows)  # the null choices stay after the experts
    inverse = torch.argsort(torch.tensor([3, 1, 0, 2]))
    assert torch.equal(r1.indices.sort(1).values, torch.where(r0.indices < 0, -1, inverse[r0.indices.clamp_min(0)]).sort(1).values)


@pytest.mark.parametrize("adapter", ["mixlora", "loramoe"])
def test_lora_experts_are_permuted_and_their_shared_base_is_not(adapter):
    from zoo.transforms.adapters import ADAPTERS

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    options = {"num_experts": E, "r": 2, "alpha": 4, "router": "topk", "router_options": {"top_k": 2}}
    model = ADAPTERS.build(adapter, options).apply(lm).double().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "router" in n:
                p.copy_(torch.randn_like(p))
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        permute_experts(model, {layer: [1, 3, 0, 2] for layer in model.moe_layers()})
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=1e-7)


def test_loramoe_groups_allow_only_permutations_within_a_group():
    model = _lm("loramoe", {"groups": [2, 2]})
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 1: router LoRAMoERouter's buffer expert_group is rebuilt from its options"):
        permute_experts(model, {0: [1, 0, 3, 2], 1: [2, 3, 0, 1]})
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # layer 0 was put back
    permute_experts(model, {0: [1, 0, 3, 2], 1: [0, 1, 3, 2]})
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=1e-7)


def test_a_router_whose_rows_are_not_its_experts_is_refused_by_name_and_left_as_it_was():
    from torch import nn

    from zoo.moe.routers.topk import TopKRouter

    @ROUTERS.register("transposed_test_router")
    class TransposedRouter(TopKRouter):  # stores its weight as [d, E]: row e is not expert e
        def __init__(self, hidden_size, num_experts):
            super().__init__(hidden_size, num_experts, 2)
            self.weight = nn.Parameter(torch.randn(hidden_size, num_experts))

        def forward(self, x, mask=None):
            logits = x @ self.weight
            w, i = torch.topk(torch.softmax(logits.float(), -1), 2, dim=-1)
            from zoo.moe.routers import RouterOutput
            return RouterOutput(logits, w / w.sum(-1, keepdim=True), i)

    try:
        moe = build_sparse_moe(MoEConfig(num_experts=E, router="transposed_test_router", router_options={}), 16, 12)
        before = {k: v.clone() for k, v in moe.state_dict().items()}
        with pytest.raises(ValueError, match="router TransposedRouter and experts SwiGLUExperts row by row changed the "
                                             "layer's routing"):
            permute_moe(moe, [1, 0, 3, 2], where="layer 0")
        assert all(torch.equal(v, before[k]) for k, v in moe.state_dict().items())
    finally:
        ROUTERS.unregister("transposed_test_router")


def test_a_checkpoint_permuted_by_a_placement_gives_the_same_logits(tmp_path):
    from zoo.io.model_dir import load_model_dir, save_model_dir
    from zoo.models import ModelConfig, build_model

    cfg = ModelConfig.from_dict({"name": "t", "lm": {"model_type": "llama", "config": {
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64}},
        "moe": {"num_experts": E, "router": "topk", "router_options": {"top_k": 2}, "layers": "all"}})
    model = build_model(cfg).eval()
    with torch.no_grad():
        for moe in model.language_model.moe_layers().values():
            for p in [*moe.experts.parameters(), moe.router.weight]:
                p.add_(torch.randn_like(p) * 0.5)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    save_model_dir(model, cfg, tmp_path / "src", tok, extra={"stage": "moe-tune"})
    batches = _batches()
    trace = routing_trace(model, batches)
    p = ilp_placement(trace, 2)
    permute_model_dir(tmp_path / "src", tmp_path / "dst", p)
    new, _, ckpt = load_model_dir(tmp_path / "dst")
    new.eval()
    with torch.no_grad():
        torch.testing.assert_close(new(**batches[0]).logits, model(**batches[0]).logits, rtol=1e-5, atol=1e-5)
    assert ckpt.config["stage"] == "moe-tune" and ckpt.config["expert_placement"]["method"] == "ilp"
    assert "tokenizer/tokenizer.json" in ckpt.paths
    new_trace = routing_trace(new, batches)
    assert cross_device_transitions(new_trace, contiguous_placement(new_trace, 2)) == cross_device_transitions(trace, p)
    with pytest.raises(ValueError, match=r"the placement covers MoE layers \[0, 2\] but .* has MoE layers \[0, 1, 2\]"):
        permute_model_dir(tmp_path / "src", tmp_path / "bad", contiguous_placement(_trace([[0]], [[1]], num_experts=4), 2))


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_is_refused_naming_the_cause():
    trace = _random_trace(0)
    for method in PLACERS:
        with pytest.raises(ValueError, match=r"num_devices=3 must divide num_experts=4 \(layer 0\)"):
            place(trace, 3, method)
    with pytest.raises(ValueError, match=r"num_devices=0 must be an integer >= 1"):
        place(trace, 0)
    with pytest.raises(ValueError, match=r"placement method 'spectral' is not one of \['contiguous', 'greedy', 'ilp'\]"):
        place(trace, 2, "spectral")
    with pytest.raises(ValueError, match="layer 2 routes 3 tokens but layer 0 routes 4: every layer of a trace must "
                                         "route the same tokens"):
        _trace([[0], [1], [2], [0]], [[0], [1], [2]])
    with pytest.raises(ValueError, match=r"layer 2 has expert ids \[3\] outside 0..2"):
        _trace([[0], [1]], [[3], [1]])
    with pytest.raises(ValueError, match=r"layers must be strictly increasing, got \[2, 0\]"):
        _trace([[0]], [[1]], layers=(2, 0))
    other = _trace([[0]], [[1]], [[2]], num_experts=4)  # layers 0, 2, 4
    with pytest.raises(ValueError, match=r"the placement covers MoE layers \[0, 1, 2\] but the trace has \[0, 2, 4\]"):
        placement_cost(other, contiguous_placement(trace, 2))
    with pytest.raises(ValueError, match=r"layer 1 puts experts on devices \[0, 0, 0, 1\]; each of the 2 devices 0..1 "
                                         r"must hold exactly 2"):
        Placement((0, 1), (torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 0, 1])), 2)
    moe = build_sparse_moe(MoEConfig(num_experts=E, router="topk"), 16, 12)
    with pytest.raises(ValueError, match=r"a permutation of the 4 experts 0..3 is needed, got \[0, 0, 1, 2\]"):
        permute_moe(moe, [0, 0, 1, 2])
    shard = build_sparse_moe(MoEConfig(num_experts=E, router="topk"), 16, 12)
    shard.experts.gate_up_proj = torch.nn.Parameter(shard.experts.gate_up_proj[:2].detach().clone())  # E / P rows
    with pytest.raises(ValueError, match=r"experts SwiGLUExperts hold gate_up_proj of shape \(2, 24, 16\), not stacked "
                                         r"over its num_experts=4 \(a shard of expert parallelism\?\)"):
        permute_moe(shard, [1, 0, 3, 2])
    with pytest.raises(ValueError, match=r"layer\(s\) \[5\] are not MoE layers \(MoE layers: \[0, 1, 2\]\)"):
        permute_experts(_lm(), {5: [0, 1, 2, 3]})
    with pytest.raises(ValueError, match="time_limit=0 must be a number of seconds > 0"):
        ilp_placement(trace, 2, time_limit=0)


def test_a_trace_of_kv_cached_generation_joins_the_prefill_and_every_step():
    from zoo.inference.placement import trace_from_records
    from zoo.moe import capture_routing

    model = _lm()
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    with capture_routing(model.lm) as records:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    trace = trace_from_records(records)
    assert trace.layers == (0, 1, 2) and trace.num_tokens == 2 * 5 + 2 * 2  # prefill + two one-token steps
    prefill = routing_trace(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    assert all(torch.equal(a[:10], b) for a, b in zip(trace.indices, prefill.indices))
