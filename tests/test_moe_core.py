"""The MoE core against transformers' MoE blocks, float64 references and invariants."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import MixtralConfig, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from zoo import MoEConfig
from zoo.kernels.reference import moe_swiglu
from zoo.moe import (
    SparseMoE,
    SwiGLU,
    SwiGLUExperts,
    TopKRouter,
    ROUTERS,
    build_sparse_moe,
    load_balancing_loss,
    load_fraction,
    router_entropy,
    router_z_loss,
)

D, F_, E = 32, 48, 4


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def test_one_expert_moe_equals_dense_mlp_outputs_and_gradients():
    dense = SwiGLU(D, F_)
    moe = SparseMoE(router=TopKRouter(D, 1, 1), experts=SwiGLUExperts.from_dense(dense, 1))
    x = torch.randn(3, 5, D, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y_moe, routing = moe(x)
    y_dense = dense(x2)
    torch.testing.assert_close(y_moe, y_dense)
    assert routing.weights.eq(1).all() and routing.indices.eq(0).all()
    g = torch.randn_like(y_dense)
    y_moe.backward(g)
    y_dense.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    gate_up, down = moe.experts.gate_up_proj.grad[0], moe.experts.down_proj.grad[0]
    torch.testing.assert_close(gate_up, torch.cat([dense.gate_proj.weight.grad, dense.up_proj.weight.grad]))
    torch.testing.assert_close(down, dense.down_proj.weight.grad)


def _mixtral_pair(top_k=2, jitter=0.0):
    cfg = MixtralConfig(hidden_size=D, intermediate_size=F_, num_local_experts=E, num_experts_per_tok=top_k,
                        router_jitter_noise=jitter)
    hf = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(std=0.2)
    ours = build_sparse_moe(MoEConfig(num_experts=E, router_options={"top_k": top_k}), D, F_)
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf.experts.down_proj)
    return hf, ours


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_parity_with_transformers_mixtral_block(top_k):
    hf, ours = _mixtral_pair(top_k)
    x = torch.randn(2, 7, D)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf = hf(xa)
    hf_logits = hf.gate(xa.detach().reshape(-1, D))[0]
    y, routing = ours(xb)
    torch.testing.assert_close(y, y_hf, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routing.logits, hf_logits)
    g = torch.randn_like(y)
    y_hf.backward(g)
    y.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.experts.gate_up_proj.grad, hf.experts.gate_up_proj.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.experts.down_proj.grad, hf.experts.down_proj.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.router.weight.grad, hf.gate.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_parity_with_transformers_qwen2_moe_block_with_shared_expert(norm_topk_prob):
    cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F_, shared_expert_intermediate_size=40,
                         num_experts=E, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob)
    hf = Qwen2MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(std=0.2)
    ours = build_sparse_moe(MoEConfig(num_experts=E, shared_expert_size=40, router_options={"top_k": 2, "norm_topk_prob": norm_topk_prob}), D, F_)
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf.experts.down_proj)
        ours.shared_expert.load_state_dict(hf.shared_expert.state_dict())
        ours.shared_expert_gate.weight.copy_(hf.shared_expert_gate.weight)
    x = torch.randn(3, 4, D)
    y, routing = ours(x)
    torch.testing.assert_close(y, hf(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routing.logits, hf.gate(x.reshape(-1, D))[0])
    if not norm_topk_prob:
        assert (routing.weights.sum(-1) < 1).all()


def test_router_matches_float64_softmax_topk():
    router = TopKRouter(D, E, 2, norm_topk_prob=True)
    x = torch.randn(10, D)
    out = router(x)
    p = torch.softmax(x.double() @ router.weight.double().T, -1)
    top = p.topk(2, -1)
    torch.testing.assert_close(out.indices, top.indices)
    torch.testing.assert_close(out.weights.double(), top.values / top.values.sum(-1, keepdim=True))
    assert out.weights.dtype == torch.float32 and out.logits.shape == (10, E)


def test_router_jitter_only_in_training():
    router = TopKRouter(D, E, 2, jitter_noise=0.5)
    x = torch.randn(64, D)
    router.eval()
    torch.testing.assert_close(router(x).logits, router(x).logits)
    router.train()
    assert not torch.equal(router(x).logits, router(x).logits)


def test_reference_experts_match_float64_per_token_loop():
    """Independent oracle: every token, every chosen expert, computed one by one in float64."""
    T, k = 9, 3
    x = torch.randn(T, D)
    gate_up = torch.randn(E, 2 * F_, D) * 0.2
    down = torch.randn(E, D, F_) * 0.2
    indices = torch.tensor([[0, 1, 2]] * 5 + [[2, 1, 0]] * 4)  # expert 3 gets no tokens
    weights = torch.rand(T, k)
    y = moe_swiglu(x, weights, indices, gate_up, down)
    ref = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = indices[t, j]
            h = gate_up[e].double() @ x[t].double()
            ref[t] += weights[t, j].double() * (down[e].double() @ (F.silu(h[:F_]) * h[F_:]))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_balance_loss_equals_transformers_load_balancing_loss_func():
    logits = torch.randn(40, E)
    for k in (1, 2):
        ours = load_balancing_loss(logits, k)
        theirs = load_balancing_loss_func((logits,), E, k)
        torch.testing.assert_close(ours, theirs)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 2:] = 0
    torch.testing.assert_close(load_balancing_loss(logits, 2, mask), load_balancing_loss_func((logits,), E, 2, mask))
    # uniform routing reaches the minimum, k
    uniform = torch.zeros(8, E)
    assert load_balancing_loss(uniform, 2).item() == pytest.approx(2.0)


def test_z_loss_entropy_and_load_against_float64():
    logits = torch.randn(30, E) * 3
    mask = torch.rand(30) > 0.3
    real = logits[mask].double()
    torch.testing.assert_close(router_z_loss(logits, mask).double(), (torch.logsumexp(real, -1) ** 2).mean())
    p = torch.softmax(real, -1)
    torch.testing.assert_close(router_entropy(logits, mask).double(), -(p * p.log()).sum(-1).mean())
    idx = torch.randint(0, E, (30, 2))
    load = load_fraction(idx, E, mask)
    assert load.sum().item() == pytest.approx(1.0)
    counts = torch.bincount(idx[mask].flatten(), minlength=E).double()
    torch.testing.assert_close(load.double(), counts / counts.sum())


def test_every_parameter_gets_a_gradient():
    moe = build_sparse_moe(MoEConfig(num_experts=E, shared_expert_size=16, router_options={"top_k": 2}), D, F_)
    y, routing = moe(torch.randn(64, D))
    (y.square().mean() + load_balancing_loss(routing.logits, 2) + router_z_loss(routing.logits)).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_empty_input_gives_empty_output():
    moe = build_sparse_moe(MoEConfig(num_experts=E, router_options={"top_k": 2}), D, F_)
    y, routing = moe(torch.randn(0, D))
    assert y.shape == (0, D) and routing.indices.shape == (0, 2)


def test_bad_input_errors_name_the_cause():
    moe = build_sparse_moe(MoEConfig(num_experts=E, router_options={"top_k": 2}), D, F_)
    with pytest.raises(ValueError, match="hidden size 16 but the layer was built for 32"):
        moe(torch.randn(2, 16))
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and num_experts=4"):
        MoEConfig(num_experts=4, router_options={"top_k": 5})
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and num_experts=4"):
        TopKRouter(D, 4, 5)
    with pytest.raises(ValueError, match=r"unknown router 'topq'; registered routers: \[.*'topk'.*\]"):
        ROUTERS.build("topq", {"top_k": 2}, hidden_size=D, num_experts=4)
    with pytest.raises(ValueError, match=r"router 'topk': TopKOptions: unknown config key\(s\) \['k'\]"):
        MoEConfig(router_options={"k": 2})
    with pytest.raises(ValueError, match=r"router 'topk' has no loss\(es\) \['balanse'\]; its losses are \['balance', 'z'\]"):
        MoEConfig(loss_coefs={"balanse": 0.01})
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['num_expert'\]"):
        MoEConfig.from_dict({"num_expert": 4})
    with pytest.raises(ValueError, match="layers='odd' is not one of"):
        MoEConfig(layers="odd")
    with pytest.raises(ValueError, match=r"layer indices \[7\] out of range for a model with 4 layers"):
        MoEConfig(layers=[0, 7]).moe_layer_indices(4)
    with pytest.raises(ValueError, match="shared_expert_gate given without a shared_expert"):
        SparseMoE(router=TopKRouter(D, E, 1), experts=SwiGLUExperts(E, D, F_), shared_expert_gate=nn.Linear(D, 1))


def test_config_round_trips_through_dict():
    cfg = MoEConfig(num_experts=8, layers=[1, 3], shared_expert_size=64, router_options={"top_k": 2})
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
