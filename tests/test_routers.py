"""Each router against a float64 re-derivation of its paper's rule (written here, not calling the
router's helpers), on random logits with ties, all-equal and one-hot rows; each loss against a
hand computation; the invariants the papers imply; bad options named with their range."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import zoo
from zoo.moe import ROUTERS, MoEConfig, SparseMoE, SwiGLUExperts, capture_routing
from zoo.moe.losses import localized_balancing_loss, tsallis_entropy
from zoo.moe.routers import TopKRouter

sys.path.insert(0, str(Path(__file__).parent))
from routing_helpers import identity_router  # noqa: E402

E = 4


def logit_rows(T: int = 24, R: int = E, seed: int = 0) -> torch.Tensor:
    """Random rows plus the hard cases: all equal, pairwise ties, a one-hot row, a triple tie."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(T, R, generator=g) * 2
    rows[0] = 0.0
    rows[1, :] = -1.0
    rows[1, 0] = rows[1, 2] = 2.0
    rows[2] = -30.0
    rows[2, 1] = 30.0
    rows[3, :] = 0.0
    rows[3, -1] = -1.0
    return rows


def ranked(p: list[float]) -> list[int]:
    return sorted(range(len(p)), key=lambda i: (-p[i], i))


def softmax64(row: torch.Tensor) -> list[float]:
    return torch.softmax(row.double(), dim=-1).tolist()


def as_sets(out) -> list[dict[int, float]]:
    return [{int(i): float(w) for i, w in zip(ix, ws) if i >= 0} for ix, ws in zip(out.indices, out.weights.detach())]


def assert_same_choices(got: list[dict[int, float]], want: list[dict[int, float]]) -> None:
    for t, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w), f"token {t}: chose {sorted(g)}, the rule chooses {sorted(w)}"
        for e in w:
            assert g[e] == pytest.approx(w[e], abs=1e-6), (t, e)


# --- top-p ----------------------------------------------------------------------------------------


def topp_rule(row, p, max_k):
    probs = softmax64(row)
    chosen, cum = [], 0.0
    for i in ranked(probs):
        chosen.append(i)
        cum += probs[i]
        if cum >= p - 1e-12 or len(chosen) == max_k:
            break
    return {i: probs[i] for i in chosen}


@pytest.mark.parametrize("p,max_k", [(0.4, None), (0.5, None), (0.9, 3), (1.0, None), (0.75, 2)])
def test_topp_is_the_smallest_prefix_reaching_p(p, max_k):
    rows = logit_rows()
    out = identity_router("topp", p=p, max_k=max_k)(rows)
    assert out.indices.shape == (len(rows), max_k or E)
    assert_same_choices(as_sets(out), [topp_rule(r, p, max_k or E) for r in rows])
    assert set(as_sets(out)[0]) == set(range(E)) if p == 1.0 else True


def test_topp_with_p_to_zero_is_top1():
    rows = logit_rows()
    topp = identity_router("topp", p=1e-9)(rows)
    top1 = TopKRouter(E, E, 1, norm_topk_prob=False)
    with torch.no_grad():
        top1.weight.copy_(torch.eye(E))
    ref = top1(rows[4:])  # rows without ties: torch.topk's tie order is unspecified
    torch.testing.assert_close(topp.indices[4:, :1], ref.indices)
    torch.testing.assert_close(topp.weights[4:, :1], ref.weights)
    assert (topp.indices[:, 1:] == -1).all()


def test_topp_losses_by_hand():
    router = identity_router("topp", p=0.5)
    rows = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1), -30.0],
                         [math.log(0.3), math.log(0.3), math.log(0.4), -30.0]])
    out = router(rows)
    # token 0 takes {0} (0.7 >= 0.5); token 1 takes {2, 0} (0.4, then 0.4 + 0.3 >= 0.5)
    assert as_sets(out)[0].keys() == {0} and as_sets(out)[1].keys() == {0, 2}
    p = torch.softmax(rows.double(), -1)
    f = torch.tensor([2, 0, 1, 0], dtype=torch.float64) / 2  # mean count per token
    balance = E * (f * p.mean(0)).sum()
    dynamic = -(p * p.clamp_min(1e-300).log()).sum(-1).mean()
    losses = router.aux_losses(out)
    assert losses["balance"].item() == pytest.approx(balance.item(), rel=1e-5)
    assert losses["dynamic"].item() == pytest.approx(dynamic.item(), rel=1e-5)


# --- null experts ---------------------------------------------------------------------------------


def null_rule(row, k):
    probs = softmax64(row)
    top = ranked(probs)[:k]
    true = [i for i in top if i < E]
    total = sum(probs[i] for i in true)
    return {i: probs[i] / total for i in true}


@pytest.mark.parametrize("k,n", [(1, 2), (2, 2), (3, 4), (2, 0)])
def test_null_experts_renormalize_the_true_experts_and_empty_the_null_slots(k, n):
    rows = logit_rows(R=E + n)
    out = identity_router("null_experts", R=E + n, top_k=k, num_null=n)(rows)
    assert out.logits.shape == (len(rows), E + n) and out.indices.shape == (len(rows), k)
    assert_same_choices(as_sets(out), [null_rule(r, k) for r in rows])


def test_null_experts_with_none_equal_topk_outputs_and_losses():
    torch.manual_seed(0)
    x = torch.randn(30, 16)
    null = ROUTERS.build("null_experts", {"top_k": 2, "num_null": 0}, hidden_size=16, num_experts=E)
    topk = TopKRouter(16, E, 2)
    with torch.no_grad():
        topk.weight.copy_(null.weight)
    a, b = null(x), topk(x)
    torch.testing.assert_close(a.weights, b.weights)
    assert torch.equal(a.indices, b.indices)
    la, lb = null.aux_losses(a), topk.aux_losses(b)
    torch.testing.assert_close(la["balance"], lb["balance"])
    torch.testing.assert_close(la["z"], lb["z"])


def test_null_aware_balance_loss_by_hand():
    router = identity_router("null_experts", R=E + 2, top_k=2, num_null=2)
    rows = torch.tensor([[3.0, 2.0, 0.0, 0.0, 1.0, -5.0],   # takes 0, 1
                         [0.0, 0.0, 0.0, 3.0, 0.0, 2.0]])   # takes 3, null 5
    out = router(rows)
    assert as_sets(out)[1].keys() == {3} and as_sets(out)[1][3] == pytest.approx(1.0)
    p = torch.softmax(rows.double(), -1).mean(0)
    f = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.float64) / 2
    f[4:] = f[4:].mean()  # the null experts share their load
    assert router.aux_losses(out)["balance"].item() == pytest.approx((6 * (f * p).sum()).item(), rel=1e-5)


# --- expert choice --------------------------------------------------------------------------------


def expert_choice_rule(rows, capacity_factor, real):
    scores = torch.softmax(rows.double(), -1)
    tokens = [t for t in range(len(rows)) if real[t]]
    c = min(len(tokens), max(1, math.ceil(capacity_factor * len(tokens) / E)))
    want = [dict() for _ in rows]
    for e in range(E):
        for t in sorted(tokens, key=lambda t: (-scores[t, e].item(), t))[:c]:
            want[t][e] = scores[t, e].item()
    return want, c


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0, 4.0])
def test_expert_choice_experts_take_their_top_c_real_tokens(capacity_factor):
    rows = logit_rows(T=21)
    real = torch.ones(21, dtype=torch.bool)
    real[[5, 11, 20]] = False  # padding
    out = identity_router("expert_choice", capacity_factor=capacity_factor)(rows, mask=real)
    want, c = expert_choice_rule(rows, capacity_factor, real)
    assert_same_choices(as_sets(out), want)
    per_expert = (out.indices >= 0).sum(0)
    assert per_expert.tolist() == [c] * E, "every expert takes exactly its capacity"
    assert (out.indices[~real] == -1).all(), "padding is never chosen"


def _tiny_lm(router: str, **options):
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    return zoo.upcycle(lm, MoEConfig(num_experts=E, router=router, router_options=options)).eval()


def test_expert_choice_in_generation_is_not_causal_and_one_sequence_gets_every_expert():
    model = _tiny_lm("expert_choice", capacity_factor=1.0)
    ids = torch.randint(0, 97, (1, 6))
    with capture_routing(model.lm) as records:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    decode = [r for r in records if r.output.indices.shape[0] == 1]  # one new token per step
    assert decode and all((r.output.indices >= 0).all() for r in decode), "alone, a new token gets all E experts"
    # The prompt's routing depends on the other tokens routed with it: append a token to the
    # prompt and an earlier position's output changes (a causal router could not do that).
    with torch.no_grad():
        short = model(input_ids=ids).logits
        longer = model(input_ids=torch.cat([ids, ids[:, :3]], dim=1)).logits
    assert not torch.allclose(short, longer[:, :6], atol=1e-6)
    # Left padding of the prompt is never chosen while generating.
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with capture_routing(model.lm) as records:
        model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=1, do_sample=False)
    prefill = [r for r in records if r.output.indices.shape[0] == 9]
    assert prefill and all((r.output.indices[:3] == -1).all() for r in prefill)


# --- DynMoLE --------------------------------------------------------------------------------------


def dynmole_rule(row, p, keep, tau, q):
    probs = softmax64(row)
    s = (1 - sum(pi**q for pi in probs)) / (q - 1)
    order = ranked(probs)
    if s > tau:
        return {i: probs[i] for i in order}
    chosen, cum = [], 0.0
    for i in order:
        chosen.append(i)
        cum += probs[i]
        if cum >= p - 1e-12 and len(chosen) >= keep:
            break
    return {i: probs[i] for i in chosen}


@pytest.mark.parametrize("p,keep,tau,q", [(0.75, 1, 0.9, 1.1), (0.5, 2, 0.6, 2.0), (0.9, 1, 5.0, 0.5), (0.4, 1, 0.3, 1.5)])
def test_dynmole_routes_uncertain_tokens_to_every_expert_and_the_rest_top_p(p, keep, tau, q):
    rows = logit_rows()
    out = identity_router("dynmole", p=p, keep_top_k=keep, entropy_threshold=tau, q=q)(rows)
    assert_same_choices(as_sets(out), [dynmole_rule(r, p, keep, tau, q) for r in rows])


def test_tsallis_entropy_and_the_dynmole_losses_by_hand():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert tsallis_entropy(probs, 2.0).item() == pytest.approx(((1 - 0.375) + 0.0) / 2)  # q=2: 1 - sum p^2
    assert tsallis_entropy(probs, 1.0).item() == pytest.approx((1.5 * math.log(2)) / 2, rel=1e-6)  # Shannon
    router = identity_router("dynmole", p=0.6, keep_top_k=1, entropy_threshold=10.0, q=2.0)
    rows = probs.clamp_min(1e-12).log()
    out = router(rows)
    assert as_sets(out)[0].keys() == {0, 1} and as_sets(out)[1].keys() == {0}
    load = torch.tensor([[0.5, 0.25, 0, 0], [1.0, 0, 0, 0]]).mean(0)
    balance = E * (load * probs.mean(0)).sum()
    losses = router.aux_losses(out)
    assert losses["balance"].item() == pytest.approx(balance.item(), rel=1e-4)
    assert losses["tsallis"].item() == pytest.approx(0.3125, rel=1e-4)


# --- SMoE-Dropout ---------------------------------------------------------------------------------


def test_smoe_dropout_takes_top_k_of_a_fixed_router_with_softmax_weights_and_a_linear_k_schedule():
    router = identity_router("smoe_dropout", k_min=1)
    assert not list(router.parameters()), "the router never trains: it has no parameters"
    rows = logit_rows()[4:]  # no ties (torch.topk's tie order is unspecified)
    for k in range(1, E + 1):
        router.set_active_k(k)
        out = router(rows)
        want = []
        for r in rows:
            top = sorted(range(E), key=lambda i: -r[i].item())[:k]
            z = torch.softmax(r[top].double(), -1).tolist()
            want.append(dict(zip(top, z)))
        assert_same_choices(as_sets(out), want)
    ks = []
    for step in range(12):
        router.schedule(step, 12)
        ks.append(int(router.active_k))
    assert ks == [1 + (4 * s) // 12 for s in range(12)] and ks[0] == 1 and ks[-1] == E
    assert sorted(set(ks)) == [1, 2, 3, 4] and ks == sorted(ks)


def test_smoe_dropout_router_is_bit_identical_after_training_and_k_grew(tmp_path):
    from zoo.pipelines.engines import TorchEngine
    from zoo.pipelines.optim import OptimConfig
    from zoo.pipelines.train import TrainConfig, train

    model = _tiny_lm("smoe_dropout", k_min=1).train()
    before = {i: m.router.projection.clone() for i, m in model.moe_layers().items()}
    seen = []
    for m in model.moe_layers().values():
        m.register_forward_hook(lambda mod, a, o: seen.append(o[1].indices.shape[1]))

    def batch_at(i):
        ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}

    cfg = TrainConfig(steps=8, optim=OptimConfig(lr=1e-2))
    train(TorchEngine(model, cfg.optim, cfg.steps), batch_at, cfg, tmp_path)
    for i, m in model.moe_layers().items():
        assert torch.equal(m.router.projection, before[i])
    assert seen[::2] == [1, 1, 2, 2, 3, 3, 4, 4]  # two MoE layers per step


# --- K-means --------------------------------------------------------------------------------------


def test_kmeans_routes_to_the_nearest_centroid_and_updates_by_hand():
    router = ROUTERS.build("kmeans", {"decay": 0.5}, hidden_size=2, num_experts=3)
    with torch.no_grad():
        router.centroids.copy_(torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]]))
        router.initialized.fill_(True)
    x = torch.tensor([[1.0, 0.0], [3.0, 1.0], [0.0, 3.0], [0.5, 0.5], [2.0, 0.0]])  # [2, 0] ties 0 and 1
    out = router(x)
    d = ((x[:, None].double() - router.centroids[None].double()) ** 2).sum(-1)
    want = [min(range(3), key=lambda e: (d[t, e].item(), e)) for t in range(5)]
    assert out.indices[:, 0].tolist() == want == [0, 1, 2, 0, 0]
    assert (out.weights == 1).all() and out.weights.shape == (5, 1)
    router.update(x)
    expect = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    expect[0] = 0.5 * expect[0] + 0.5 * torch.tensor([(1.0 + 0.5 + 2.0) / 3, 0.5 / 3])
    expect[1] = 0.5 * expect[1] + 0.5 * torch.tensor([3.0, 1.0])
    expect[2] = 0.5 * expect[2] + 0.5 * torch.tensor([0.0, 3.0])
    torch.testing.assert_close(router.centroids, expect)
    running = ROUTERS.build("kmeans", {"decay": None}, hidden_size=2, num_experts=3)
    running.update(x)  # first update: centroids on tokens 0, 2, 4, then the running mean of their clusters
    assert bool(running.initialized) and running.counts.sum().item() == 5
    state = running.state_dict()
    assert {"centroids", "counts", "initialized"} <= set(state), "the centroids are checkpointed buffers"


# --- DeepSeek-V3 (sigmoid, selection bias, group-limited top-k) -----------------------------------


def deepseek_v3_rule(row, bias, k, n_group, topk_group, scale, norm, score="sigmoid"):
    """DeepSeek-V3's gate for one token in float64 Python: {expert: weight}."""
    n = len(row)
    if score == "sigmoid":
        s = [1 / (1 + math.exp(-v)) for v in row]
    else:
        s = softmax64(torch.tensor(row))
    c = [s[i] + bias[i] for i in range(n)]
    per = n // n_group
    group_score = [sum(sorted(c[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(n_group)]
    groups = sorted(range(n_group), key=lambda g: (-group_score[g], g))[:topk_group]
    allowed = [i for i in range(n) if i // per in groups]
    chosen = sorted(allowed, key=lambda i: (-c[i], i))[:k]
    total = sum(s[i] for i in chosen) if norm else 1.0
    return {i: s[i] / total * scale for i in chosen}


@pytest.mark.parametrize("k, n_group, topk_group, scale, norm, score", [
    (2, 4, 2, 2.5, True, "sigmoid"), (3, 2, 1, 1.0, False, "sigmoid"), (2, 8, 3, 1.5, True, "sigmoid"),
    (4, 1, 1, 1.0, True, "sigmoid"), (2, 4, 2, 1.0, True, "softmax")])
def test_deepseek_v3_is_the_sigmoid_bias_group_limited_rule(k, n_group, topk_group, scale, norm, score):
    router = identity_router("deepseek_v3", R=8, num_experts=8, top_k=k, n_group=n_group, topk_group=topk_group,
                             routed_scaling_factor=scale, norm_topk_prob=norm, score_function=score)
    bias = (torch.arange(8, dtype=torch.float32) % 3 - 1) * 0.15  # a trained bias: changes choices, not weights
    router.e_score_correction_bias.copy_(bias)
    rows = logit_rows(T=32, R=8, seed=3)
    out = router(rows)
    want = [deepseek_v3_rule(r.tolist(), bias.tolist(), k, n_group, topk_group, scale, norm, score) for r in rows.double()]
    assert_same_choices(as_sets(out), want)


# --- LoRAMoE --------------------------------------------------------------------------------------


def test_loramoe_router_is_soft_and_its_localized_balancing_loss_matches_a_hand_computation():
    router = identity_router("loramoe", groups=[2, 2], delta=0.2)
    rows = logit_rows(T=6)
    out = router(rows)
    torch.testing.assert_close(out.weights, torch.softmax(rows, -1))
    assert (out.indices == torch.arange(E)).all()
    assert router.aux_losses(out) == {}, "no sample types, no constraint"
    sample_id = torch.tensor([0, 0, 0, 1, 1, 1])
    sample_type = torch.tensor([1, 1, 1, 0, 0, 0])
    w = torch.softmax(rows.double(), -1)
    q = torch.stack([w[:3].sum(0), w[3:].sum(0)])  # [samples, experts]
    coef = torch.tensor([[0.8, 0.8, 1.2, 1.2], [1.2, 1.2, 0.8, 0.8]], dtype=torch.float64)  # sample 0 is type 1
    z = (q * coef).flatten()
    want = z.var() / z.mean()
    got = router.aux_losses(out, context={"sample_type": sample_type, "sample_id": sample_id})["lbc"]
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    direct = localized_balancing_loss(out.weights, sample_type, sample_id, torch.tensor([0, 0, 1, 1]), 0.2)
    assert direct.item() == pytest.approx(want.item(), rel=1e-5)


def test_loramoe_lbc_reaches_the_loss_through_sample_types():
    from zoo.models import ModelConfig, build_model

    cfg = ModelConfig.from_dict({"lm": {"model_type": "llama", "config": dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)},
        "adapters": [{"kind": "loramoe", "options": {"num_experts": 4, "r": 2, "alpha": 4,
                                                    "router_options": {"groups": [2, 2], "delta": 0.1}}}]})
    model = build_model(cfg)
    ids = torch.randint(5, 97, (2, 7))
    out = model(ids, labels=ids, sample_types=torch.tensor([0, 1]))
    assert set(out.aux_losses) == {"lbc"} and out.aux_losses["lbc"] > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 0.1 * out.aux_losses["lbc"])
    assert model(ids, labels=ids).aux_losses == {}


# --- everywhere: the registry's routers in LoRA experts ------------------------------------------


@pytest.mark.parametrize("name", ROUTERS.names())
@pytest.mark.parametrize("adapter", ["mixlora", "loramoe"])
def test_every_router_drives_lora_experts(name, adapter):
    from zoo.transforms.adapters import ADAPTERS

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    options = dict(ROUTERS.entry(name).example)
    model = ADAPTERS.build(adapter, {"num_experts": E, "r": 2, "alpha": 4, "router": name,
                                     "router_options": options}).apply(lm).train()
    ids = torch.randint(0, 97, (2, 6))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_A" in n and ".mlp." in n]
    assert lora and all(p.grad is not None for p in lora)


# --- bad options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,options,message", [
    ("topp", {"p": 0.0}, r"p=0.0 must be a number in \(0, 1\]"),
    ("topp", {"p": 1.5}, r"p=1.5 must be a number in \(0, 1\]"),
    ("topp", {"max_k": 9}, r"max_k=9 must be between 1 and num_experts=4"),
    ("null_experts", {"num_null": -1}, r"num_null=-1 must be an integer in \[0, inf\]"),
    ("null_experts", {"top_k": 9, "num_null": 2}, r"top_k=9 must be between 1 and num_experts \+ num_null=6"),
    ("expert_choice", {"capacity_factor": 0}, r"capacity_factor=0 must be a number in \(0, inf\)"),
    ("dynmole", {"q": 0}, r"q=0 must be a number in \(0, inf\)"),
    ("dynmole", {"p": 2}, r"p=2 must be a number in \(0, 1\]"),
    ("smoe_dropout", {"k_min": 3, "k_max": 2}, r"k_min=3 must be <= k_max=2"),
    ("smoe_dropout", {"k_min": 5}, r"k_min=5 <= k_max=4 must hold"),
    ("kmeans", {"decay": 1.0}, r"decay=1.0 must be a number in \[0, 1\)"),
    ("loramoe", {"groups": [2, 1]}, r"groups=\[2, 1\] must add up to num_experts=4"),
    ("topp", {"threshold": 0.5}, r"router 'topp': TopPOptions: unknown config key\(s\) \['threshold'\]; known keys are \['max_k', 'p'\]"),
])
def test_bad_router_options_name_the_option_value_and_range(name, options, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(num_experts=E, router=name, router_options=options)


def test_a_sparse_moe_layer_with_no_tokens_still_backpropagates_for_every_router():
    for name in ROUTERS.names():
        router = ROUTERS.build(name, dict(ROUTERS.entry(name).example), hidden_size=8, num_experts=E)
        moe = SparseMoE(router=router, experts=SwiGLUExperts(E, 8, 12))
        x = torch.randn(0, 8, requires_grad=True)
        y, _ = moe(x)
        y.sum().backward()  # must not raise "does not require grad"
        assert x.grad is not None and x.grad.shape == (0, 8)
