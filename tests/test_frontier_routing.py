"""Routing and balancing as current MoE trainers do it (issue 25).

DeepSeek-V3's gate against transformers' own `DeepseekV3TopkRouter` / `DeepseekV3MoE` on shared
weights; the aux-loss-free bias as trainer-driven state (by hand, over micro-batches, exact after a
resume, 2 gloo processes equal 1); sequence-level and global-batch balance against float64
re-derivations (2 processes equal 1 on the concatenated batch); capacity with token dropping
against a naive loop.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zoo.moe import ROUTERS, MoEConfig, SparseMoE, SwiGLU, SwiGLUExperts, capture_routing, routing_losses
from zoo.moe.losses import balance_window, global_balancing_loss, max_violation, sequence_balancing_loss
from zoo.moe.routers.capacity import drop_over_capacity, token_capacity
from zoo.moe.trainer_hooks import capture_router_inputs, update_routers

D, E = 32, 8


def _hf_config(**kw):
    from transformers import DeepseekV3Config

    base = dict(vocab_size=97, hidden_size=D, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=E, num_experts_per_tok=3, n_group=4,
                topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1,
                first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                v_head_dim=8, max_position_embeddings=64)
    base.update(kw)
    return DeepseekV3Config(**base)


def _ours(cfg) -> torch.nn.Module:
    return ROUTERS.build("deepseek_v3", {"top_k": cfg.num_experts_per_tok, "n_group": cfg.n_group,
                                         "topk_group": cfg.topk_group, "routed_scaling_factor": cfg.routed_scaling_factor,
                                         "norm_topk_prob": cfg.norm_topk_prob}, hidden_size=D, num_experts=E)


def _by_expert(weights, indices):
    order = indices.sort(dim=-1).indices
    return weights.gather(1, order), indices.gather(1, order)


# --- (a) DeepSeek-V3's gate against transformers ---------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"norm_topk_prob": False}, {"n_group": 1, "topk_group": 1},
                                {"n_group": 2, "topk_group": 1, "num_experts_per_tok": 2},
                                {"routed_scaling_factor": 1.0, "num_experts_per_tok": 4}], ids=repr)
def test_deepseek_v3_router_matches_transformers_outputs_indices_and_gradients(kw):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = _hf_config(**kw)
    torch.manual_seed(0)
    ref = DeepseekV3TopkRouter(cfg)
    ours = _ours(cfg)
    with torch.no_grad():
        ref.weight.normal_(0, 0.3)
        ref.e_score_correction_bias.normal_(0, 0.2)  # a trained selection bias changes the choice
        ours.weight.copy_(ref.weight)
        ours.e_score_correction_bias.copy_(ref.e_score_correction_bias)
    x = torch.randn(40, D)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    logits_ref, w_ref, i_ref = ref(x_ref)
    out = ours(x_ours)
    torch.testing.assert_close(out.logits, logits_ref)
    w_a, i_a = _by_expert(out.weights, out.indices)
    w_b, i_b = _by_expert(w_ref, i_ref)
    assert torch.equal(i_a, i_b)
    torch.testing.assert_close(w_a, w_b)
    g = torch.randn_like(w_a)
    (w_a * g).sum().backward()
    (w_b * g).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    assert not ours.e_score_correction_bias.requires_grad and "e_score_correction_bias" in ours.state_dict()
    assert "e_score_correction_bias" not in dict(ours.named_parameters())


def test_sparse_moe_with_the_deepseek_v3_gate_equals_transformers_deepseek_v3_moe_block():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = _hf_config()
    torch.manual_seed(1)
    ref = DeepseekV3MoE(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
        ref.gate.e_score_correction_bias.normal_(0, 0.1)
    ours = SparseMoE(router=_ours(cfg), experts=SwiGLUExperts(E, D, cfg.moe_intermediate_size),
                     shared_expert=SwiGLU(D, cfg.moe_intermediate_size))
    with torch.no_grad():
        ours.router.weight.copy_(ref.gate.weight)
        ours.router.e_score_correction_bias.copy_(ref.gate.e_score_correction_bias)
        ours.experts.gate_up_proj.copy_(ref.experts.gate_up_proj)
        ours.experts.down_proj.copy_(ref.experts.down_proj)
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(ours.shared_expert, n).weight.copy_(getattr(ref.shared_experts, n).weight)
    x = torch.randn(2, 9, D)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, _ = ours(xa)
    yb = ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(ya)
    (ya * dy).sum().backward()
    (yb * dy).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    pairs = {"router.weight": ref.gate.weight, "experts.gate_up_proj": ref.experts.gate_up_proj,
             "experts.down_proj": ref.experts.down_proj, "shared_expert.gate_proj.weight": ref.shared_experts.gate_proj.weight,
             "shared_expert.down_proj.weight": ref.shared_experts.down_proj.weight}
    mine = dict(ours.named_parameters())
    for name, theirs in pairs.items():
        torch.testing.assert_close(mine[name].grad, theirs.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("options, message", [
    ({"n_group": 2, "topk_group": 3}, r"topk_group=3 must be <= n_group=2"),
    ({"n_group": 3}, r"num_experts=8 is not divisible by n_group=3"),
    ({"bias_update_rate": -0.1}, r"bias_update_rate=-0.1 must be a number in \[0, inf\)"),
    ({"capacity_factor": 0}, r"capacity_factor=0 must be a number in \(0, inf\)"),
    ({"eval_capacity_factor": -1.0}, r"eval_capacity_factor=-1.0 must be a number in \(0, inf\)"),
    ({"drop_policy": "random"}, r"drop_policy='random' must be one of \('probs', 'position'\)"),
    ({"n_group": 4, "topk_group": 1, "top_k": 3}, r"top_k=3 must be <= the 2 experts of topk_group=1 groups of 2"),
    ({"balance_level": "batch"}, r"balance_level='batch' must be one of"),
])
def test_bad_deepseek_v3_options_name_the_cause(options, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(num_experts=E, router="deepseek_v3", router_options=options)


def test_bad_topk_capacity_is_named():
    with pytest.raises(ValueError, match=r"capacity_factor=-0.5 must be a number in \(0, inf\)"):
        MoEConfig(num_experts=E, router="topk", router_options={"capacity_factor": -0.5})


# --- (b) the aux-loss-free bias: trainer-driven state ---------------------------------------------


def _router(rate=0.01, **kw):
    torch.manual_seed(0)
    r = ROUTERS.build("deepseek_v3", {"top_k": 2, "n_group": 2, "topk_group": 1, "bias_update_rate": rate, **kw},
                      hidden_size=D, num_experts=E)
    with torch.no_grad():
        r.weight.normal_(0, 0.5)
    return r


def test_bias_update_is_a_sign_step_on_the_counts_summed_over_micro_batches_and_never_in_autograd():
    router = _router(rate=0.01)
    layer = SparseMoE(router=router, experts=SwiGLUExperts(E, D, 16))
    micro = [torch.randn(2, 5, D) for _ in range(3)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # padding never counts
    from zoo.moe.context import routing_context

    counts = torch.zeros(E)
    with capture_router_inputs(layer) as seen:
        for x in micro:
            with routing_context(layer, mask=mask):
                y, out = layer(x)
            y.sum().backward()
            real = out.indices[mask.reshape(-1)]
            counts += torch.bincount(real[real >= 0], minlength=E).float()
    assert len(seen[router]) == 3 and seen[router][0].shape == (8, D)
    assert router.e_score_correction_bias.grad is None and not router.e_score_correction_bias.any()
    update_routers(seen)
    want = 0.01 * torch.sign(counts.mean() - counts)  # overloaded experts down, underloaded up (float64 rule)
    torch.testing.assert_close(router.e_score_correction_bias, want.float())
    assert want.abs().sum() > 0
    # without the recorded routing, the router re-routes the same tokens with the same weights: same step
    again = _router(rate=0.01)
    again.update(torch.cat([x.reshape(-1, D)[mask.reshape(-1)] for x in micro]), None)
    torch.testing.assert_close(again.e_score_correction_bias, want.float())
    frozen = _router(rate=0.0)
    frozen.update(torch.randn(6, D), None)
    assert not frozen.e_score_correction_bias.any()


def test_bias_balances_a_skewed_router_and_only_changes_the_choice():
    router = _router(rate=0.02, n_group=1, topk_group=1)
    with torch.no_grad():
        router.weight[0] += 2.0  # expert 0 is everyone's favourite
    x = torch.randn(256, D) + 0.5
    before = max_violation(torch.bincount(router(x).indices.reshape(-1), minlength=E).float())
    for _ in range(100):
        router.update(x, None)
    out = router(x)
    after = max_violation(torch.bincount(out.indices.reshape(-1), minlength=E).float())
    assert after < 0.5 * before, (before, after)
    s = torch.sigmoid(x @ router.weight.t())
    picked = s.gather(1, out.indices)
    torch.testing.assert_close(out.weights, picked / picked.sum(-1, keepdim=True))  # weights from s alone


def _tiny_moe_lm(router_options=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    from zoo.transforms import upcycle

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=D, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model = upcycle(lm, MoEConfig(num_experts=E, router="deepseek_v3",
                                  router_options={"top_k": 2, "n_group": 4, "topk_group": 2, "bias_update_rate": 0.01,
                                                  **(router_options or {})}))
    with torch.no_grad():
        for moe in model.moe_layers().values():
            moe.experts.gate_up_proj.add_(torch.randn_like(moe.experts.gate_up_proj) * 0.05)
            moe.router.weight.normal_(0, 0.3)
    return model


def _batch_at(i):
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(i))
    return {"input_ids": ids, "labels": ids}


def test_bias_is_checkpointed_and_a_resumed_run_continues_exactly(tmp_path):
    from zoo.pipelines.engines import TorchEngine
    from zoo.pipelines.optim import OptimConfig
    from zoo.pipelines.train import TrainConfig, train

    def run(out, steps, resume):
        model = _tiny_moe_lm().train()
        cfg = TrainConfig(steps=steps, ckpt_every=2, optim=OptimConfig(lr=1e-2, grad_accum=2))
        train(TorchEngine(model, cfg.optim, 4), _batch_at, cfg, out, resume=resume)
        return model

    straight = run(tmp_path / "a", 4, False)
    import json

    routing = [json.loads(line)["routing"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    for layer in routing[-1].values():  # MaxVio per layer in the training metrics
        assert layer["max_vio"] == pytest.approx(E * max(layer["load"]) - 1, abs=1e-3)
    run(tmp_path / "b", 2, False)
    resumed = run(tmp_path / "b", 4, True)
    biases = [m.router.e_score_correction_bias for m in straight.moe_layers().values()]
    assert all(b.any() for b in biases), "4 steps moved every layer's bias"
    a, b = straight.state_dict(), resumed.state_dict()
    assert any(k.endswith("e_score_correction_bias") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- (c) sequence-level and global-batch balance ---------------------------------------------------


def _balance_case(T=14, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(T, E, generator=g) * 2, dim=-1)
    indices = torch.topk(probs + 0.3 * torch.rand(T, E, generator=g), K, dim=-1).indices
    indices[3, 1] = -1  # an empty slot (a dropped assignment)
    mask = torch.ones(T, dtype=torch.bool)
    mask[-3:] = False
    sample_id = torch.tensor([0] * 5 + [1] * 6 + [2] * (T - 11))  # sequence 2 is all padding
    return probs, indices, mask, sample_id


def _f64_balance(probs, indices, mask, rows):
    """E * sum_e f_e P_e over `rows` (real ones), in float64 Python."""
    rows = [t for t in rows if mask[t]]
    if not rows:
        return None
    f = [sum(sum(1 for j in range(indices.shape[1]) if int(indices[t, j]) == e) for t in rows) / len(rows) for e in range(E)]
    P = [sum(float(probs[t, e].detach()) for t in rows) / len(rows) for e in range(E)]
    return E * sum(a * b for a, b in zip(f, P))


def test_sequence_balance_is_the_mean_over_sequences_of_the_per_sequence_loss_in_float64():
    probs, indices, mask, sample_id = _balance_case()
    per = [_f64_balance(probs, indices, mask, [t for t in range(len(mask)) if int(sample_id[t]) == s]) for s in range(3)]
    per = [v for v in per if v is not None]
    got = sequence_balancing_loss(probs, indices, sample_id, mask)
    assert got.item() == pytest.approx(sum(per) / len(per), rel=1e-6)
    whole = sequence_balancing_loss(probs, indices, None, mask)  # one sequence = the micro-batch loss
    assert whole.item() == pytest.approx(_f64_balance(probs, indices, mask, range(len(mask))), rel=1e-6)
    p = probs.clone().requires_grad_()
    zero = sequence_balancing_loss(p[:0], indices[:0], sample_id[:0], mask[:0])
    assert zero.item() == 0 and zero.requires_grad


def test_global_balance_in_one_process_is_the_micro_batch_loss_and_refuses_a_world_without_a_group(monkeypatch):
    probs, indices, mask, _ = _balance_case()
    got = global_balancing_loss(probs, indices, mask)
    assert got.item() == pytest.approx(_f64_balance(probs, indices, mask, range(len(mask))), rel=1e-6)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"global balance .* needs a torch.distributed process group, but WORLD_SIZE=2"):
        global_balancing_loss(probs, indices, mask)


def test_a_balance_window_counts_f_over_the_step_so_far_in_float64_and_the_last_micro_batch_sees_the_whole_step():
    probs, indices, mask, _ = _balance_case(T=21, seed=3)
    micro = [range(0, 7), range(7, 14), range(14, 21)]
    key, other = object(), object()
    with balance_window() as window:
        got = [global_balancing_loss(probs[r.start:r.stop], indices[r.start:r.stop], mask[r.start:r.stop], key=key)
               for r in micro]
        alone = global_balancing_loss(probs[7:14], indices[7:14], mask[7:14], key=other)  # another router's count
        unkeyed = global_balancing_loss(probs[7:14], indices[7:14], mask[7:14])
    assert set(window.counts) == {id(key), id(other)}
    for j, r in enumerate(micro):
        seen = [t for t in range(0, r.stop) if mask[t]]  # micro-batches 1..j: f's tokens
        real = [t for t in r if mask[t]]  # this micro-batch: P's tokens
        f = [sum(sum(1 for k in range(indices.shape[1]) if int(indices[t, k]) == e) for t in seen) / len(seen)
             for e in range(E)]
        P = [sum(float(probs[t, e]) for t in real) / len(real) for e in range(E)]
        assert got[j].item() == pytest.approx(E * sum(a * b for a, b in zip(f, P)), rel=1e-6), j
    assert got[0].item() == pytest.approx(_f64_balance(probs, indices, mask, micro[0]), rel=1e-6)  # first: alone
    want_alone = _f64_balance(probs, indices, mask, micro[1])
    assert alone.item() == pytest.approx(want_alone, rel=1e-6) and unkeyed.item() == pytest.approx(want_alone, rel=1e-6)
    with balance_window():  # a new step starts from no counts
        again = global_balancing_loss(probs[7:14], indices[7:14], mask[7:14], key=key)
        with pytest.raises(RuntimeError, match=r"balance_window\(\) is already open in this thread; one optimizer step"):
            with balance_window():
                pass
    assert again.item() == pytest.approx(want_alone, rel=1e-6)
    with balance_window(), pytest.raises(ValueError, match=r"counted 8 experts earlier in this step and 4 now"):
        global_balancing_loss(probs, indices, mask, key=key)
        global_balancing_loss(torch.softmax(probs[:, :4], -1), indices.clamp_max(3), mask, key=key)


def test_the_trainer_opens_one_balance_window_per_optimizer_step(tmp_path, monkeypatch):
    from zoo.moe import losses
    from zoo.pipelines.engines import TorchEngine
    from zoo.pipelines.optim import OptimConfig
    from zoo.pipelines.train import TrainConfig, train

    added = []
    real_add = losses.BalanceWindow.add

    def spy(self, key, counts, n):
        total = real_add(self, key, counts, n)
        added.append((self, id(key), float(n[0]), float(total[1][0])))  # the window itself: ids may be reused
        return total

    monkeypatch.setattr(losses.BalanceWindow, "add", spy)
    model = _tiny_moe_lm({"balance_level": "global"}).train()
    cfg = TrainConfig(steps=2, optim=OptimConfig(lr=1e-3, grad_accum=3))
    train(TorchEngine(model, cfg.optim, 2), _batch_at, cfg, tmp_path)
    windows = []
    for w, *_ in added:
        if not any(w is seen for seen in windows):
            windows.append(w)
    assert len(windows) == 2, "one window per optimizer step"
    for w in windows:
        per_router: dict[int, list[tuple[float, float]]] = {}
        for win, key, n, total in added:
            if win is w:
                per_router.setdefault(key, []).append((n, total))
        assert len(per_router) == 2  # both MoE layers' routers
        for calls in per_router.values():
            assert len(calls) == 3  # the step's three micro-batches, each counted once
            assert [t for _, t in calls] == pytest.approx(list(itertools.accumulate(n for n, _ in calls)))


def test_deepseek_v3_balance_levels_reach_the_loss_through_the_sequences_of_the_batch():
    router = _router(rate=0.0, balance_level="sequence")
    layer = SparseMoE(router=router, experts=SwiGLUExperts(E, D, 16))
    x = torch.randn(3, 6, D)
    with capture_routing(layer) as records:
        layer(x)
    got = routing_losses(records).losses["balance"]
    out = records[0].output
    s = torch.sigmoid(out.logits.double())
    s = s / s.sum(-1, keepdim=True)
    ones = torch.ones(18, dtype=torch.bool)
    want = sum(_f64_balance(s, out.indices, ones, range(b * 6, b * 6 + 6)) for b in range(3)) / 3
    assert got.item() == pytest.approx(want, rel=1e-6)


# --- (d) capacity with token dropping --------------------------------------------------------------


def _naive_drop(weights, indices, capacity, policy, mask):
    """Each expert keeps its first `capacity` assignments by the policy's priority (a plain loop)."""
    T, K = indices.shape
    keep = [[False] * K for _ in range(T)]
    for e in range(E):
        mine = [(t, j) for t in range(T) for j in range(K) if int(indices[t, j]) == e]
        real = [a for a in mine if mask is None or bool(mask[a[0]])]
        pad = [a for a in mine if a not in real]
        if policy == "probs":
            real = sorted(real, key=lambda a: (-float(weights[a]), a))
            pad = sorted(pad, key=lambda a: (-float(weights[a]), a))
        for t, j in (real + pad)[:capacity]:
            keep[t][j] = True
    return keep


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("capacity", [0, 1, 2, 3, 40])
def test_dropping_over_capacity_equals_a_naive_loop(policy, capacity):
    g = torch.Generator().manual_seed(capacity)
    T, K = 17, 3
    weights = torch.rand(T, K, generator=g).round(decimals=1)  # ties
    indices = torch.randint(0, E, (T, K), generator=g)
    indices[0, 2] = -1
    mask = torch.rand(T, generator=g) > 0.2
    w, i = drop_over_capacity(weights, indices, capacity, E, policy=policy, mask=mask)
    keep = _naive_drop(weights, indices, capacity, policy, mask)
    for t in range(T):
        for j in range(K):
            if keep[t][j]:
                assert i[t, j] == indices[t, j] and w[t, j] == weights[t, j], (t, j)
            else:
                assert i[t, j] == -1 and w[t, j] == 0, (t, j)
    load = torch.bincount(i[i >= 0], minlength=E)
    assert load.max() <= capacity


@pytest.mark.parametrize("router, options", [("topk", {"top_k": 2}), ("deepseek_v3", {"top_k": 2, "n_group": 2})])
def test_capacity_in_a_router_drops_to_empty_slots_train_and_eval_factors_and_the_output_is_the_residual(router, options):
    torch.manual_seed(0)
    r = ROUTERS.build(router, {**options, "capacity_factor": 0.5, "drop_policy": "position"}, hidden_size=D, num_experts=E)
    with torch.no_grad():
        r.weight.normal_(0, 0.5)
    layer = SparseMoE(router=r, experts=SwiGLUExperts(E, D, 16)).train()
    x = torch.randn(24, D, requires_grad=True)
    y, out = layer(x)
    C = token_capacity(24, 2, E, 0.5)
    assert C == 3 and torch.bincount(out.indices[out.indices >= 0], minlength=E).max() <= C
    r.capacity_factor = None
    free = r(x)
    dropped = out.indices < 0
    assert dropped.any() and torch.equal(out.indices[~dropped], free.indices[~dropped])
    assert torch.equal(out.weights[dropped], torch.zeros(int(dropped.sum())))
    none = dropped.all(dim=1)  # tokens with every slot dropped: the MoE adds exactly 0
    assert none.any() and not y[none].any()
    y.sum().backward()
    assert x.grad is not None
    r.capacity_factor = 0.5
    r.eval()
    assert torch.equal(r(x).indices, free.indices)  # eval_capacity_factor None: no dropping in eval
    r.eval_capacity_factor = 0.5
    assert torch.equal(r(x).indices, out.indices)


# --- 2 gloo processes equal 1: the bias update under expert parallelism, the global balance loss ----


def _two_rank_data():
    g = torch.Generator().manual_seed(11)
    micro = [torch.randn(6, D, generator=g) for _ in range(4)]  # one step: rank 0 gets micro 0, 1; rank 1 gets 2, 3
    probs = torch.softmax(torch.randn(14, E, generator=g), dim=-1)
    indices = torch.topk(torch.rand(14, E, generator=g), 2, dim=-1).indices
    mask = torch.rand(14, generator=g) > 0.2
    return micro, probs, indices, mask


def _bias_layer():
    torch.manual_seed(5)
    router = _router(rate=0.01)
    return SparseMoE(router=router, experts=SwiGLUExperts(E, D, 16))


def _one_process_reference():
    micro, probs, indices, mask = _two_rank_data()
    layer = _bias_layer()
    biases = []
    for _ in range(2):  # two optimizer steps over the same 4 micro-batches
        with capture_router_inputs(layer) as seen:
            for x in micro:
                layer(x)[0].sum().backward()
        update_routers(seen)
        biases.append(layer.router.e_score_correction_bias.clone())
    p = probs.clone().requires_grad_()
    loss = global_balancing_loss(p, indices, mask)
    loss.backward()
    key = object()
    q = probs.clone().requires_grad_()
    with balance_window():  # one step of two micro-batches: rows 0-6, then 7-13
        window = [global_balancing_loss(q[r], indices[r], mask[r], key=key) for r in (slice(0, 7), slice(7, 14))]
    sum(window).backward()
    return {"biases": biases, "loss": loss.detach(), "grad": p.grad,
            "window": [w.detach() for w in window], "window_grad": q.grad}


def _two_rank_check(rank: int, world: int, ref: dict) -> None:
    from zoo.moe.expert_parallel import shard_experts

    micro, probs, indices, mask = _two_rank_data()
    assert ref["biases"][0].any() and not torch.equal(ref["biases"][0], ref["biases"][1])
    layer = shard_experts(_bias_layer())
    for step in range(2):
        with capture_router_inputs(layer) as seen:
            for x in micro[2 * rank: 2 * rank + 2]:
                layer(x)[0].sum().backward()
        update_routers(seen)
        torch.testing.assert_close(layer.router.e_score_correction_bias, ref["biases"][step],
                                   msg=lambda m: f"rank {rank} step {step} bias: {m}")
    rows = slice(0, 9) if rank == 0 else slice(9, 14)  # uneven shares of the global batch
    p = probs[rows].clone().requires_grad_()
    loss = global_balancing_loss(p, indices[rows], mask[rows])
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    torch.testing.assert_close(mean / world, ref["loss"], msg=lambda m: f"rank {rank} mean global loss: {m}")
    torch.testing.assert_close(p.grad / world, ref["grad"][rows], msg=lambda m: f"rank {rank} grad: {m}")
    # over a step's micro-batches: micro-batch j of the global batch is rank 0's rows then rank 1's
    parts = [slice(0, 4), slice(7, 11)] if rank == 0 else [slice(4, 7), slice(11, 14)]
    q = probs.clone().requires_grad_()
    key = object()
    with balance_window():
        window = [global_balancing_loss(q[r], indices[r], mask[r], key=key) for r in parts]
    sum(window).backward()
    for j, w in enumerate(window):
        mean = w.detach().clone()
        dist.all_reduce(mean)
        torch.testing.assert_close(mean / world, ref["window"][j], msg=lambda m: f"rank {rank} micro {j} window loss: {m}")
    for r in parts:
        torch.testing.assert_close(q.grad[r] / world, ref["window_grad"][r], msg=lambda m: f"rank {rank} window grad: {m}")


def _two_rank_worker(rank: int, world: int, init_file: str, errors) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        ref = _one_process_reference()
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        try:
            _two_rank_check(rank, world, ref)
        finally:
            dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def test_two_gloo_processes_equal_one_for_the_bias_update_under_ep_and_the_global_balance_loss():
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        raised = None
        try:
            mp.start_processes(_two_rank_worker, args=(2, os.path.join(tmp, "init"), errors), nprocs=2,
                               start_method="spawn")
        except mp.ProcessRaisedException as e:
            raised = e
        found = []
        while not errors.empty():
            found.append(errors.get())
    assert not found and raised is None, "\n".join(found) or str(raised)


# --- (e) per-layer expert counts, layer patterns, residual MoE --------------------------------------


def _dense_lm(layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=D, intermediate_size=48, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


@pytest.mark.parametrize("layers, want", [("every_2", [0, 2]), ("every_3", [0, 3]), ("after_1", [1, 2, 3]),
                                          ("pattern:DMMD", [1, 2]), ("all", [0, 1, 2, 3])])
def test_layer_patterns_pick_the_megatron_and_deepseek_layers(layers, want):
    assert MoEConfig(layers=layers).moe_layer_indices(4) == want


@pytest.mark.parametrize("kw, message", [
    ({"layers": "pattern:DM"}, r"layers='pattern:DM' gives 2 layers, the model has 4"),
    ({"layers": "after_4"}, r"layers='after_4' leaves no MoE layer in a model with 4 layers"),
    ({"layer_experts": [4, 8]}, r"layer_experts has 2 entries but 4 of the 4 layers are MoE \(\[0, 1, 2, 3\]\)"),
])
def test_bad_layer_patterns_and_per_layer_counts_name_the_cause(kw, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kw).moe_layer_indices(4)


@pytest.mark.parametrize("kw, message", [
    ({"layers": [0, 2], "layer_experts": [4]}, r"layer_experts has 1 entries but layers=\[0, 2\] names 2 MoE layers"),
    ({"layers": "every_0"}, r"layers='every_0' is not one of"),
    ({"layer_experts": [4, 0]}, r"layer_experts=\[4, 0\] must be a non-empty list of integers >= 1"),
    ({"layer_experts": [4, 2], "router_options": {"top_k": 3}}, r"top_k=3 must be between 1 and num_experts=2"),
    ({"residual": True, "shared_expert_size": 8}, r"residual=True brings its own dense FFN; shared_expert_size must be 0"),
])
def test_bad_moe_configs_name_the_cause(kw, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kw)


def test_per_layer_expert_counts_build_a_pyramid_that_equals_the_dense_model_and_round_trips(tmp_path):
    from zoo.io.moe_lm import load_moe_lm, save_moe_lm
    from zoo.transforms import upcycle

    ids = torch.randint(0, 97, (2, 7))
    dense = _dense_lm()
    want = dense(ids).logits
    model = upcycle(dense, MoEConfig(num_experts=4, layers="every_2", layer_experts=[2, 6], router_options={"top_k": 2}))
    assert {i: m.experts.num_experts for i, m in model.moe_layers().items()} == {0: 2, 2: 6}
    assert {i: m.router.num_experts for i, m in model.moe_layers().items()} == {0: 2, 2: 6}
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    out = model.train()(ids, labels=ids)
    out.loss.backward()
    assert [len(s.load) for s in out.routing] == [2, 6]
    save_moe_lm(model, tmp_path / "m")
    again, _ = load_moe_lm(tmp_path / "m")
    torch.testing.assert_close(again.eval()(ids).logits, model.eval()(ids).logits)


def test_residual_moe_is_the_softmax_mix_of_a_top1_moe_and_the_dense_ffn_and_starts_as_the_dense_model():
    from zoo.transforms import upcycle

    ids = torch.randint(0, 97, (2, 7))
    dense = _dense_lm(layers=2)
    want = dense(ids).logits
    model = upcycle(dense, MoEConfig(num_experts=4, residual=True, router_options={"top_k": 1}))
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    moe = model.moe_layers()[0]
    with torch.no_grad():
        for p in [*moe.experts.parameters(), *moe.residual_coefficient.parameters()]:
            p.normal_(0, 0.2)
    x = torch.randn(5, D)
    y, out = moe(x)
    routed = moe.experts(x, out.weights, out.indices)
    c = torch.softmax(moe.residual_coefficient(x), dim=-1)
    torch.testing.assert_close(y, c[:, :1] * routed + c[:, 1:] * moe.shared_expert(x))
    assert out.indices.shape == (5, 1)
    model.train()(ids, labels=ids).loss.backward()
    assert moe.residual_coefficient.weight.grad is not None and moe.residual_coefficient.weight.grad.any()


def test_a_residual_moe_checkpoint_round_trips(tmp_path):
    from zoo.io.moe_lm import load_moe_lm, save_moe_lm
    from zoo.transforms import upcycle

    ids = torch.randint(0, 97, (2, 7))
    model = upcycle(_dense_lm(layers=2), MoEConfig(num_experts=4, residual=True, router_options={"top_k": 1}))
    with torch.no_grad():
        model.moe_layers()[1].residual_coefficient.bias.copy_(torch.tensor([0.3, -0.2]))
    save_moe_lm(model, tmp_path / "m")
    again, _ = load_moe_lm(tmp_path / "m")
    torch.testing.assert_close(again(ids).logits, model.eval()(ids).logits)


# --- MaxVio ------------------------------------------------------------------------------------------


def test_max_vio_by_hand_and_in_the_per_layer_stats():
    assert max_violation(torch.tensor([2.0, 2.0, 2.0, 2.0])).item() == 0
    assert max_violation(torch.tensor([4.0, 2.0, 1.0, 1.0])).item() == pytest.approx(4 / 2 - 1)
    assert max_violation(torch.zeros(4)).item() == 0
    layer = SparseMoE(router=_router(rate=0.0), experts=SwiGLUExperts(E, D, 16))
    with capture_routing(layer) as records:
        layer(torch.randn(2, 6, D))
    stats = routing_losses(records).stats[0]
    counts = torch.bincount(records[0].output.indices.reshape(-1), minlength=E).double()
    assert stats.max_vio.item() == pytest.approx((counts.max() / counts.mean() - 1).item(), rel=1e-6)
