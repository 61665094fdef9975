"""The fused head + cross-entropy (`zoo.models.loss`): the plain loss and its gradients, without the logits."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from zoo import upcycle
from zoo.models.loss import causal_lm_loss, linear_cross_entropy

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def plain(hidden, weight, labels, bias=None, softcap=None):
    z = hidden @ weight.T + (bias if bias is not None else 0)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, labels)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk, grad_rows", [(1, 2048), (5, 2048), (64, 2048), (3, 7)])
def test_equals_cross_entropy_and_its_gradients_in_float64(bias, softcap, chunk, grad_rows, monkeypatch):
    monkeypatch.setattr("zoo.models.loss._GRAD_ROWS", grad_rows)  # 7: the head's gradient summed over row groups
    n, d, v = 23, 8, 50  # chunks that do not divide the rows
    hidden = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, dtype=torch.float64, requires_grad=True) if bias else None
    labels = torch.randint(0, v, (n,))
    labels[::4] = -100
    inputs = [hidden, weight] + ([b] if bias else [])
    fused = linear_cross_entropy(hidden, weight, labels, bias=b, chunk_size=chunk, softcap=softcap)
    ref = plain(hidden, weight, labels, b, softcap)
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(fused * 1.7, inputs), torch.autograd.grad(ref * 1.7, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_no_label_that_counts_gives_nan_like_cross_entropy():
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8)
    labels = torch.full((4,), -100)
    assert torch.isnan(linear_cross_entropy(hidden, weight, labels)) and torch.isnan(F.cross_entropy(hidden @ weight.T, labels))


def test_under_autocast_the_gemms_run_in_bf16_and_the_softmax_in_fp32():
    """Autocast: the same as the plain loss under autocast (bf16 logits, fp32 loss), fp32 gradients for fp32 inputs."""
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    labels = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(hidden, weight, labels, chunk_size=16)
        ref = F.cross_entropy(F.linear(hidden, weight).float(), labels)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(fused, [hidden, weight])
    want = torch.autograd.grad(ref, [hidden, weight])
    assert [g.dtype for g in got] == [torch.float32, torch.float32]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-3)  # bf16 GEMMs on both sides, summed in other orders


def _lm():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY))


def _batch():
    ids = torch.randint(0, TINY["vocab_size"], (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a prompt
    return ids, mask, labels


def test_causal_lm_loss_equals_transformers_loss_and_every_gradient():
    ids, mask, labels = _batch()
    a, b = _lm(), _lm()
    hf = a(input_ids=ids, attention_mask=mask, labels=labels).loss  # transformers casts the logits to fp32
    torch.testing.assert_close(causal_lm_loss(b, labels, chunk_size=4, input_ids=ids, attention_mask=mask).loss, hf)
    a, b = a.double(), b.double()  # float64: next-token cross-entropy from the logits, exactly
    logits = a(input_ids=ids, attention_mask=mask).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, TINY["vocab_size"]), labels[:, 1:].reshape(-1))
    fused = causal_lm_loss(b, labels, chunk_size=4, input_ids=ids, attention_mask=mask)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, ref, rtol=1e-12, atol=1e-12)
    ref.backward()
    fused.loss.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_moe_lm_with_loss_chunk_equals_the_plain_loss_aux_losses_and_gradients():
    ids, mask, labels = _batch()
    models = [upcycle(_lm(), num_experts=4, router_options={"top_k": 2}) for _ in range(2)]
    outs = [models[0](input_ids=ids, attention_mask=mask, labels=labels),
            models[1](input_ids=ids, attention_mask=mask, labels=labels, loss_chunk=8)]
    assert outs[1].logits is None
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[1].aux_losses, outs[0].aux_losses, rtol=0, atol=0)
    for out in outs:
        out.loss.backward()
    for (name, pa), pb in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_a_wrapped_head_is_refused_by_name():
    lm = _lm()
    lm.lm_head = torch.nn.Sequential(lm.lm_head)
    ids, mask, labels = _batch()
    with pytest.raises(ValueError, match="plain nn.Linear output head.*Sequential.*lm_loss_chunk: 0"):
        causal_lm_loss(lm, labels, chunk_size=4, input_ids=ids)
