"""Connectors: LLaVA MLP, Q-Former resampler, Parrot-style language-conditioned MoE projector."""

import pytest
import torch
import torch.nn.functional as F

from zoo.encoders.connectors import LanguageMoEProjector, MLPProjector, QueryResampler, build_connector


def test_mlp_projector_is_linear_gelu_linear():
    proj = MLPProjector(8, 16)
    x = torch.randn(2, 5, 8)
    l1, l2 = proj.net[0], proj.net[2]
    ref = F.linear(F.gelu(F.linear(x, l1.weight, l1.bias)), l2.weight, l2.bias)
    out, routing = proj(x)
    torch.testing.assert_close(out, ref)
    assert routing is None


def test_mlp_projector_stride_stacks_consecutive_tokens():
    proj = MLPProjector(8, 16, stride=4)
    x = torch.randn(2, 10, 8)
    out, _ = proj(x)
    assert out.shape == (2, 3, 16)  # ceil(10 / 4)
    l1, l2 = proj.net[0], proj.net[2]
    for t in range(3):  # LM token t sees encoder tokens 4t..4t+3 side by side (zeros past the end)
        run = torch.cat([x[:, 4 * t + i] if 4 * t + i < 10 else torch.zeros(2, 8) for i in range(4)], dim=-1)
        torch.testing.assert_close(out[:, t], F.linear(F.gelu(F.linear(run, l1.weight, l1.bias)), l2.weight, l2.bias))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        MLPProjector(8, 16, stride=0)


def test_resampler_fixed_queries_and_key_permutation_invariance():
    res = QueryResampler(12, 16, num_queries=4, num_layers=2, num_heads=4).eval()
    a = torch.randn(3, 10, 12)
    out, _ = res(a)
    assert out.shape == (3, 4, 16)
    assert res(torch.randn(3, 7, 12))[0].shape == (3, 4, 16)  # any number of encoder tokens
    perm = torch.randperm(10)
    torch.testing.assert_close(res(a[:, perm])[0], out, atol=1e-5, rtol=1e-5)  # attends to a set


def test_language_moe_projector_matches_manual_expert_mixture():
    proj = LanguageMoEProjector(8, 16, num_experts=4, top_k=2, hidden_dim=12, num_heads=2).eval()
    feats, text = torch.randn(3, 5, 8), torch.randn(3, 6, 16)
    mask = torch.ones(3, 6, dtype=torch.long)
    out, routing = proj(feats, text, mask)
    assert out.shape == (3, 5, 16) and routing.indices.shape == (3, 2)
    ref = torch.zeros_like(out)
    for n in range(3):
        for w, e in zip(routing.weights[n], routing.indices[n]):
            h = F.gelu(feats[n] @ proj.w1[e].T + proj.b1[e])
            ref[n] += w * (h @ proj.w2[e].T + proj.b2[e])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # Routing is language conditioned: other text, other router logits.
    _, other = proj(feats, torch.randn(3, 6, 16), mask)
    assert not torch.allclose(other.logits, routing.logits)
    # Masked text positions are ignored.
    padded = torch.cat([text, torch.randn(3, 2, 16)], dim=1)
    pmask = torch.cat([mask, torch.zeros(3, 2, dtype=torch.long)], dim=1)
    torch.testing.assert_close(proj(feats, padded, pmask)[0], out, atol=1e-5, rtol=1e-5)


def test_unknown_connector_lists_known():
    with pytest.raises(ValueError, match=r"unknown connector 'qformer'.*'mlp'"):
        build_connector("qformer", 4, 4)
