"""Inference-time routing control: overrides (every router, against a float64 re-derivation of each
rule written here), scoping (weights and buffers bit-identical, no hook left), KV-cached generation
under an override; SCMoE against a hand computation and its greedy limits; MoTE attribution on a
model with a planted expert."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import zoo
from zoo.inference import (ExpertAttribution, RoutingOverride, attribute_experts, override_routing, reroute,
                           scmoe_generate, scmoe_scores, selection_rates)
from zoo.inference.overrides import REROUTE_RULES
from zoo.models import ModelConfig, build_model
from zoo.moe import ROUTERS, MoEConfig, SparseMoE, SwiGLUExperts, capture_routing
from zoo.moe.routers import TopKRouter

sys.path.insert(0, str(Path(__file__).parent))
from routing_helpers import identity_router  # noqa: E402

E = 4
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


# --- helpers --------------------------------------------------------------------------------------


def as_sets(weights, indices) -> list[dict[int, float]]:
    return [{int(i): float(w) for i, w in zip(ix, ws) if i >= 0} for ix, ws in zip(indices, weights.detach())]


def assert_same(got: list[dict[int, float]], want: list[dict[int, float]]) -> None:
    for t, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w), f"token {t}: chose {sorted(g)}, the rule chooses {sorted(w)}"
        for e in w:
            assert math.isclose(g[e], w[e], rel_tol=1e-5, abs_tol=1e-6), f"token {t} expert {e}: {g[e]} vs {w[e]}"


def tiny_lm(router: str = "topk", layers="all", seed: int = 0, **options):
    """A 2-layer Llama upcycled to E experts with distinct random experts and a sharp router."""
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model = zoo.upcycle(lm, MoEConfig(num_experts=E, router=router, router_options=options, layers=layers))
    randomize(model)
    return model.eval()


def randomize(model):
    with torch.no_grad():
        for moe in (m for m in model.modules() if isinstance(m, SparseMoE)):
            for p in moe.experts.parameters():
                p.normal_(0, 0.2)
            for attr in ("weight", "projection", "centroids"):
                if hasattr(moe.router, attr):
                    getattr(moe.router, attr).normal_(0, 0.5)


# --- float64 re-derivation of each router's rule under an override --------------------------------

SOFTMAX_ROUTERS = {"topk", "topp", "null_experts", "expert_choice", "dynmole", "loramoe"}


def reference(name: str, router, row: list[float], ov: RoutingOverride) -> dict[int, float]:
    """One token's {expert: weight} under `ov`, from the papers' rules in plain float64 Python."""
    R, n_exp = len(row), router.num_experts
    allowed = [i for i in range(R) if i not in ov.disable]
    if name in SOFTMAX_ROUTERS:
        z = max(row[i] for i in allowed)
        ex = {i: math.exp(row[i] - z) for i in allowed}
        s = {i: ex[i] / sum(ex.values()) for i in allowed}
    else:
        s = {i: row[i] for i in allowed}
    ranking = sorted(ov.force, key=lambda i: (-s[i], i)) + sorted((i for i in allowed if i not in ov.force),
                                                                   key=lambda i: (-s[i], i))
    if ov.rank is not None:
        chosen = [ranking[ov.rank - 1]]
    else:
        if ov.top_k is not None:
            n = ov.top_k
        elif name in ("topk", "null_experts"):
            n = router.top_k
        elif name == "smoe_dropout":
            n = int(router.active_k)
        elif name == "kmeans":
            n = 1
        elif name in ("loramoe", "expert_choice"):
            n = len(allowed)
        else:  # topp / dynmole: the shortest prefix (forced first) reaching p
            cum, n = 0.0, 0
            for i in ranking:
                cum += s[i]
                n += 1
                if cum >= router.p - 1e-12:
                    break
            if name == "topp":
                n = min(n, router.max_k)
            else:
                n = max(n, router.keep_top_k)
                q = router.q
                tsallis = (1 - sum(p ** q for p in s.values())) / (q - 1)
                if tsallis > router.entropy_threshold:
                    n = len(allowed)
        n = min(max(n, len(ov.force)), len(allowed))
        chosen = ranking[:n]
    if name in ("topk",) and router.norm_topk_prob or name in ("null_experts",):
        true = [i for i in chosen if i < n_exp]
        total = sum(s[i] for i in true)
        return {i: s[i] / total for i in true} if total > 0 else {}
    if name == "smoe_dropout":
        z = max(s[i] for i in chosen)
        ex = {i: math.exp(s[i] - z) for i in chosen}
        return {i: ex[i] / sum(ex.values()) for i in chosen}
    if name == "kmeans":
        return {i: 1.0 / len(chosen) for i in chosen}
    return {i: s[i] for i in chosen}


ROUTER_OPTIONS = {"topk": {"top_k": 2}, "topp": {"p": 0.5}, "null_experts": {"top_k": 2, "num_null": 2},
                  "dynmole": {"p": 0.6, "entropy_threshold": 0.6}, "expert_choice": {"capacity_factor": 1.0},
                  "smoe_dropout": {}, "kmeans": {}, "loramoe": {}}
OVERRIDES = [RoutingOverride(), RoutingOverride(top_k=1), RoutingOverride(top_k=3), RoutingOverride(rank=2),
             RoutingOverride(disable=(1,)), RoutingOverride(force=(2,)), RoutingOverride(top_k=2, disable=(0, 3)),
             RoutingOverride(top_k=2, force=(3,)), RoutingOverride(disable=(2,), force=(0, 1))]


def test_every_registered_router_has_a_reroute_rule():
    assert set(ROUTERS.names()) <= set(REROUTE_RULES), sorted(set(ROUTERS.names()) - set(REROUTE_RULES))


@pytest.mark.parametrize("name", sorted(ROUTER_OPTIONS))
@pytest.mark.parametrize("ov", OVERRIDES, ids=repr)
def test_reroute_follows_each_routers_rule_under_every_override(name, ov):
    R = E + 2 if name == "null_experts" else E
    router = identity_router(name, R=R, **ROUTER_OPTIONS[name])
    if name == "smoe_dropout":
        router.set_active_k(2)
    if name == "kmeans":
        router.centroids.copy_(torch.eye(E))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, R, generator=g) * 2
    out = router(x)
    weights, indices = reroute(router, out.logits, ov)
    if name == "expert_choice" and ov.top_k is None and ov.rank is None:
        return  # its column-wise own rule: test_expert_choice_keeps_its_rule_over_the_experts_left
    want = [reference(name, router, row, ov) for row in out.logits.double().tolist()]
    assert_same(as_sets(weights, indices), want)
    if ov == RoutingOverride():  # no change: the router's own decision
        assert_same(as_sets(out.weights, out.indices), want)


@pytest.mark.parametrize("ov", [RoutingOverride(), RoutingOverride(disable=(1,)), RoutingOverride(force=(2,)),
                                RoutingOverride(disable=(0,), force=(3,))], ids=repr)
def test_expert_choice_keeps_its_rule_over_the_experts_left(ov):
    router = identity_router("expert_choice", capacity_factor=1.0)
    x = torch.randn(12, E, generator=torch.Generator().manual_seed(2))
    real = torch.ones(12, dtype=torch.bool)
    real[-3:] = False
    weights, indices = reroute(router, router(x, mask=real).logits, ov, real)
    left = [e for e in range(E) if e not in ov.disable]
    p = torch.softmax(x.double().masked_fill(torch.tensor([e in ov.disable for e in range(E)]), -math.inf), dim=-1)
    c = math.ceil(1.0 * 9 / len(left))
    want = [dict() for _ in range(12)]
    for e in left:
        takers = range(9) if e in ov.force else sorted(range(9), key=lambda t: (-float(p[t, e]), t))[:c]
        for t in takers:
            want[t][e] = float(p[t, e])
    assert_same(as_sets(weights, indices), want)
    if ov == RoutingOverride():
        out = router(x, mask=real)
        assert torch.equal(out.indices, indices) and torch.equal(out.weights, weights)


def test_top_k_equal_to_e_on_a_topk_layer_is_the_dense_softmax_mixture():
    torch.manual_seed(0)
    for norm in (True, False):
        moe = SparseMoE(router=TopKRouter(16, E, 1, norm_topk_prob=norm), experts=SwiGLUExperts(E, 16, 24)).double()
        x = torch.randn(10, 16, dtype=torch.float64)
        with override_routing(moe, top_k=E):
            y, routing = moe(x)
        p = torch.softmax(x @ moe.router.weight.T, dim=-1)  # [T, E]
        dense = sum(p[:, e: e + 1] * moe.experts.expert(e)(x) for e in range(E))
        torch.testing.assert_close(y, dense, rtol=1e-6, atol=1e-6)
        assert routing.indices.shape == (10, E)
        y1, _ = moe(x)  # outside the block: top-1 again
        assert not torch.allclose(y1, dense)


def test_override_leaves_weights_buffers_and_no_hooks_behind():
    for router, options in (("topk", {"top_k": 2}), ("smoe_dropout", {}), ("kmeans", {})):
        model = tiny_lm(router, **options)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        ids = torch.randint(3, 97, (2, 5))
        with override_routing(model, top_k={0: 1}, disable={1: [0]}) as plan:
            assert sorted(plan) == ["lm.model.layers.0.mlp.moe", "lm.model.layers.1.mlp.moe"]
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
            model(input_ids=ids)
        with pytest.raises(RuntimeError, match="boom"), override_routing(model, force=[1]):
            raise RuntimeError("boom")
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        for name, module in model.named_modules():
            assert not module._forward_hooks and not module._forward_pre_hooks, name


def test_override_changes_routing_only_inside_the_block_and_only_where_named():
    model = tiny_lm("topk", top_k=2)
    ids = torch.randint(3, 97, (2, 7))
    with capture_routing(model.lm) as plain:
        model(input_ids=ids)
    with override_routing(model, top_k={0: 1}, disable={1: [2]}, force={1: [3]}), capture_routing(model.lm) as records:
        model(input_ids=ids)
    by_layer = {r.layer: r.output for r in records}
    assert by_layer[0].indices.shape[1] == 1
    assert by_layer[0].indices[:, 0].tolist() == plain[0].output.indices[:, 0].tolist(), "top-1 = the best of top-2"
    assert (by_layer[1].indices != 2).all() and (by_layer[1].indices == 3).any(dim=1).all()
    with capture_routing(model.lm) as again:
        model(input_ids=ids)
    assert all(torch.equal(a.output.indices, p.output.indices) for a, p in zip(again, plain))


def test_nested_overrides_the_inner_block_wins_on_the_layers_it_names():
    model = tiny_lm("topk", top_k=2)
    ids = torch.randint(3, 97, (1, 6))
    with override_routing(model, top_k=1), override_routing(model, disable={1: [0]}), \
            capture_routing(model.lm) as records:
        model(input_ids=ids)
    by_layer = {r.layer: r.output.indices for r in records}
    assert by_layer[0].shape[1] == 1, "layer 0: the outer top-1"
    assert by_layer[1].shape[1] == 2 and (by_layer[1] != 0).all(), "layer 1: the inner setting replaces the outer"


def test_a_router_left_with_fewer_experts_than_its_k_uses_all_that_are_left():
    router = identity_router("topk", top_k=2)
    x = torch.randn(5, E)
    weights, indices = reroute(router, router(x).logits, RoutingOverride(disable=(0, 1, 2)))
    assert indices.tolist() == [[3]] * 5 and weights.tolist() == [[1.0]] * 5


def test_smoe_dropout_override_is_self_slimming_without_touching_active_k():
    model = tiny_lm("smoe_dropout")
    ids = torch.randint(3, 97, (1, 6))
    slim = copy.deepcopy(model)
    for moe in (m for m in slim.modules() if isinstance(m, SparseMoE)):
        moe.router.set_active_k(1)
    with torch.no_grad(), override_routing(model, top_k=1):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, slim(input_ids=ids).logits.detach())
    assert all(int(m.router.active_k) == E for m in model.modules() if isinstance(m, SparseMoE))


@pytest.mark.parametrize("router, options, override", [
    ("topk", {"top_k": 2}, {"top_k": {1: 1}, "disable": {0: [1, 2]}}),
    ("topk", {"top_k": 2}, {"rank": 2}),
    ("smoe_dropout", {}, {"top_k": 1, "force": {0: [3]}}),
    ("expert_choice", {"capacity_factor": 1.0}, {"top_k": 2}),  # token choice: causal, so the cache is exact
    ("null_experts", {"top_k": 2, "num_null": 1}, {"top_k": 3, "disable": [0]}),
])
def test_kv_cached_generation_equals_uncached_generation_under_an_override(router, options, override):
    model = tiny_lm(router, **options)
    ids = torch.randint(3, 97, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    plain = model.generate(**kw)
    with override_routing(model, **override):
        cached = model.generate(**kw, use_cache=True)
        uncached = model.generate(**kw, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    assert cached.tolist() != plain.tolist(), "the override changed nothing: the test could not fail"


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 0}, r"top_k=0 must be an integer in \[1, inf\]"),
    ({"top_k": E + 1}, rf"layer 0: top_k={E + 1} must be an integer in \[1, {E}\] \(num_experts={E}\)"),
    ({"top_k": E, "disable": [0]}, rf"top_k={E} must be an integer in \[1, {E - 1}\] \(num_experts={E}, 1 disabled\)"),
    ({"rank": E + 1}, rf"rank={E + 1} must be an integer in \[1, {E}\]"),
    ({"disable": [E]}, rf"disable expert id={E} must be an integer in \[0, {E - 1}\]"),
    ({"force": {1: [-1]}}, r"force expert id=-1 must be an integer in \[0, inf\]"),
    ({"disable": [1], "force": [1]}, r"\[1\] are both disabled and forced"),
    ({"top_k": 1, "force": [0, 1]}, r"force names 2 experts \[0, 1\] but top_k=1"),
    ({"rank": 1, "top_k": 1}, r"rank=1 and top_k=1 both given"),
    ({"disable": list(range(E))}, r"leaves no expert of the 4"),
    ({"top_k": {5: 1}}, r"top_k names layer 5, but the model's MoE layers are \[0, 1\]"),
    ({"disable": {"model.layers.9": [0]}}, r"disable names layer 'model.layers.9'"),
    ({"disable": "x"}, r"disable='x' must be an expert id or a list"),
])
def test_bad_overrides_name_the_cause(kwargs, message):
    model = tiny_lm("topk", top_k=2)
    with pytest.raises(ValueError, match=message):
        with override_routing(model, **kwargs):
            pass
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="has no SparseMoE layer"):
        with override_routing(torch.nn.Linear(2, 2), top_k=1):
            pass


# --- SCMoE ----------------------------------------------------------------------------------------


def test_scmoe_scores_equal_a_hand_computation():
    g = torch.Generator().manual_seed(3)
    strong, weak = torch.randn(3, 9, generator=g) * 3, torch.randn(3, 9, generator=g) * 3
    beta, alpha = 0.7, 0.2
    got = scmoe_scores(strong, weak, beta, alpha)
    for b in range(3):
        zs, zw = strong[b].double().tolist(), weak[b].double().tolist()
        ls = [z - math.log(sum(math.exp(v) for v in zs)) for z in zs]
        lw = [z - math.log(sum(math.exp(v) for v in zw)) for z in zw]
        ps = [math.exp(v) for v in ls]
        for x in range(9):
            if ps[x] < alpha * max(ps):
                assert got[b, x] == -math.inf
            else:
                assert math.isclose(float(got[b, x]), (1 + beta) * ls[x] - beta * lw[x], rel_tol=1e-5, abs_tol=1e-5)
    assert (got == -math.inf).any() and (got > -math.inf).sum(-1).min() >= 1
    # The official code's raw-logit form gives the same argmax.
    raw = ((1 + beta) * strong - beta * weak).masked_fill(strong < math.log(alpha) + strong.max(-1, keepdim=True).values,
                                                           -math.inf)
    assert torch.equal(raw.argmax(-1), got.argmax(-1))


def _scmoe_reference(model, ids, mask, weak, beta, alpha, steps):
    """SCMoE by hand: both passes recomputed on the whole sequence each step (no cache)."""
    cur, m = ids, mask
    with torch.no_grad():
        for _ in range(steps):
            pos = (m.cumsum(-1) - 1).clamp_min(0)
            strong = model.lm(input_ids=cur, attention_mask=m, position_ids=pos).logits[:, -1]
            with override_routing(model, **weak):
                weak_logits = model.lm(input_ids=cur, attention_mask=m, position_ids=pos).logits[:, -1]
            nxt = scmoe_scores(strong, weak_logits, beta, alpha).argmax(-1, keepdim=True)
            cur, m = torch.cat([cur, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return cur


@pytest.mark.parametrize("weak", [{"top_k": 1}, {"rank": 2}])
def test_scmoe_generate_equals_the_formula_applied_step_by_step_without_cache(weak):
    model = tiny_lm("topk", top_k=2)
    ids = torch.randint(3, 97, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = scmoe_generate(model, ids, mask, weak=weak, beta=1.0, alpha=0.05, **kw)
    want = _scmoe_reference(model, ids, mask, weak, 1.0, 0.05, 6)
    assert got.tolist() == want.tolist()
    assert got.tolist() != model.generate(input_ids=ids, attention_mask=mask, **kw).tolist(), \
        "SCMoE chose as greedy did: the test could not fail"


def test_scmoe_with_beta_zero_or_identical_routing_is_greedy():
    model = tiny_lm("topk", top_k=2)
    ids = torch.randint(3, 97, (2, 6))
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    greedy = model.generate(input_ids=ids, attention_mask=mask, **kw).tolist()
    assert scmoe_generate(model, ids, mask, weak={"top_k": 1}, beta=0.0, alpha=0.1, **kw).tolist() == greedy
    assert scmoe_generate(model, ids, mask, weak={"top_k": 2}, beta=0.9, alpha=0.1, **kw).tolist() == greedy


@pytest.mark.slow
def test_scmoe_on_a_multimodal_model_with_beta_zero_is_its_greedy_generate():
    torch.manual_seed(0)
    model = build_model(ModelConfig.load(CONFIGS / "tiny-vit-llama-moe.yaml")).eval()
    randomize(model)
    ids = torch.tensor([[10, 3, 11, 12], [3, 50, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    images = torch.randn(2, 3, 32, 32)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    greedy = model.generate(ids, mask, images=images, **kw)
    assert scmoe_generate(model, ids, mask, images=images, beta=0.0, **kw).tolist() == greedy.tolist()


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": -0.1}, r"beta=-0.1 must be a number in \[0, inf\)"),
    ({"alpha": 1.5}, r"alpha=1.5 must be a number in \[0, 1\]"),
    ({"alpha": -0.01}, r"alpha=-0.01 must be a number in \[0, 1\]"),
    ({"num_beams": 2}, r"num_beams=2"),
    ({"weak": {"top_k": 9}}, r"top_k=9 must be an integer in \[1, 4\]"),
])
def test_bad_scmoe_options_name_the_cause(kwargs, message):
    model = tiny_lm("topk", top_k=2)
    ids = torch.randint(3, 97, (1, 4))
    with pytest.raises(ValueError, match=message):
        scmoe_generate(model, ids, max_new_tokens=2, **kwargs)


# --- MoTE attribution -----------------------------------------------------------------------------

PLANTED, KIND_A, KIND_B = 3, range(10, 40), range(50, 80)


def planted_model():
    """One MoE layer (layer 0) whose expert 3 only tokens of kind A choose.

    Layer 0's attention output is zeroed, so its router reads RMSNorm(embedding) alone; kind-A
    embeddings carry +4 on dimension 0 and kind-B -4, other tokens 0, and router row 3 is 10 * e_0
    while the other rows have no dimension-0 component.
    """
    model = tiny_lm("topk", layers=[0], top_k=2)
    lm = model.lm.model
    with torch.no_grad():
        lm.layers[0].self_attn.o_proj.weight.zero_()
        emb = lm.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[list(KIND_A), 0] = 4.0
        emb[list(KIND_B), 0] = -4.0
        router = lm.layers[0].mlp.moe.router
        router.weight[:, 0] = 0.0
        router.weight[PLANTED] = 0.0
        router.weight[PLANTED, 0] = 10.0
    return model


def prompts(kind, n=4, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(list(kind))[torch.randint(0, len(kind), (n, length), generator=g)]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # some padding, left out of the counts
    return [{"input_ids": ids, "attention_mask": mask}]


def test_mote_ranks_the_planted_expert_first_and_switching_it_off_changes_only_that_behaviour():
    model = planted_model()
    a, b = prompts(KIND_A), prompts(KIND_B, seed=1)
    rates, n = selection_rates(model, a)
    assert n == 4 * 6 - 2 and rates[0][PLANTED] == 1.0, "premise: every kind-A token chooses the planted expert"
    assert math.isclose(float(rates[0].sum()), 2.0), "top-2: the rates of a layer add up to k"
    assert selection_rates(model, b)[0][0][PLANTED] == 0.0, "premise: no kind-B token does"
    attribution = attribute_experts(model, a, b)
    assert attribution.ranking(0)[0] == PLANTED
    assert attribution.top(1) == {0: [PLANTED]} == attribution.top(1, per_layer=False)
    with torch.no_grad():
        before = {k: model(**p[0]).logits for k, p in (("a", a), ("b", b))}
        with override_routing(model, disable=attribution.top(1)):
            after = {k: model(**p[0]).logits for k, p in (("a", a), ("b", b))}
    torch.testing.assert_close(after["b"], before["b"], rtol=1e-5, atol=1e-5)  # kind B: unchanged
    real = a[0]["attention_mask"].bool()
    changed = (after["a"].argmax(-1) != before["a"].argmax(-1))[real]
    assert changed.any() and (after["a"] - before["a"]).abs().max() > 0.1, "kind A: the behaviour changed"
    # Forcing it through (1) puts it on every kind-B token.
    with override_routing(model, force=attribution.top(1)), capture_routing(model.lm) as records:
        model(**b[0])
    assert (records[0].output.indices == PLANTED).any(dim=1).all()


def test_attribution_top_per_layer_and_over_all_layers_by_hand():
    attribution = ExpertAttribution(
        behaviour={0: torch.tensor([0.5, 0.9, 0.1, 0.3]), 2: torch.tensor([0.2, 0.2, 0.8, 0.6])},
        contrast={0: torch.tensor([0.5, 0.1, 0.3, 0.2]), 2: torch.tensor([0.1, 0.3, 0.1, 0.6])})
    # scores: layer 0 [0, .8, -.2, .1]; layer 2 [.1, -.1, .7, 0]
    assert attribution.ranking(0) == [1, 3, 0, 2] and attribution.ranking(2) == [2, 0, 3, 1]
    assert attribution.top(2) == {0: [1, 3], 2: [0, 2]}
    assert attribution.top(3) == {0: [1, 3], 2: [0, 2]}, "only experts chosen more on the behaviour set"
    assert attribution.top(2, per_layer=False) == {0: [1], 2: [2]}
    with pytest.raises(ValueError, match=r"n=0 must be an integer in \[1, inf\]"):
        attribution.top(0)
    with pytest.raises(ValueError, match=r"no layer 1; layers are \[0, 2\]"):
        attribution.ranking(1)


@pytest.mark.slow
def test_selection_rates_on_a_multimodal_model_count_the_spliced_real_tokens_of_its_lm():
    torch.manual_seed(0)
    model = build_model(ModelConfig.load(CONFIGS / "tiny-vit-llama-moe.yaml")).eval()
    randomize(model)
    batch = {"input_ids": torch.tensor([[10, 3, 11, 12], [3, 50, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
             "images": torch.randn(2, 3, 32, 32)}
    rates, n = selection_rates(model, [batch], within=model.language_model)
    spliced = model(**batch).attention_mask
    assert n == int(spliced.sum()) and sorted(rates) == [0]  # every other layer: layer 0 of 2
    assert math.isclose(float(rates[0].sum()), 2.0, rel_tol=1e-6)
