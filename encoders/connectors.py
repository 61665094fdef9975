"""Connectors: encoder features `[n, N, D_enc]` -> LM-space tokens `[n, M, d_lm]`.

Every connector has one call shape, so the model treats them alike:

    connector(features [n, N, D], text=None [n, S, d_lm], text_mask=None [n, S]) -> (tokens [n, M, d_lm], routing)

`text` is the embedded text of the sample each media item belongs to (only language-conditioned
connectors read it); `routing` is a `zoo.moe.RouterOutput` for MoE connectors, else None, so the
model can add their balance loss without any module keeping state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.encoders.registry import CONNECTORS
from zoo.moe.routers import RouterOutput, TopKRouter


@CONNECTORS.register("mlp")
class MLPProjector(nn.Module):
    """LLaVA's `multi_modal_projector`: linear -> GELU -> linear (depth 2), or a single linear (depth 1).

    With `stride` k > 1, each run of k consecutive encoder tokens is concatenated into one before the
    projection (`[n, N, D] -> [n, ceil(N / k), k D]`, the last run zero-padded), so a long sequence
    (Whisper's 50 frames a second) reaches the LM k times shorter: the frame-stacking downsampler
    of speech LLMs (e.g. LLaMA-Omni's k = 5), kept as an option of the MLP so the projector stays
    LLaVA's when k = 1.

    Args:
        in_dim: encoder feature size D.
        out_dim: LM hidden size d.
        depth: number of linear layers (LLaVA-1.5 "mlp2x_gelu" is 2).
        stride: encoder tokens per LM token (1: LLaVA's one to one).
    """

    def __init__(self, in_dim: int, out_dim: int, *, depth: int = 2, stride: int = 1) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"MLPProjector: depth must be >= 1, got {depth}")
        if stride < 1:
            raise ValueError(f"MLPProjector: stride must be >= 1, got {stride}")
        self.stride = stride
        layers: list[nn.Module] = [nn.Linear(in_dim * stride, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, text=None, text_mask=None) -> tuple[torch.Tensor, None]:
        """`[n, N, D] -> ([n, ceil(N / stride), d], None)`: one LM token per `stride` encoder tokens."""
        if self.stride > 1:
            n, length, dim = features.shape
            pad = -length % self.stride
            if pad:
                features = torch.cat([features, features.new_zeros(n, pad, dim)], dim=1)
            features = features.reshape(n, (length + pad) // self.stride, self.stride * dim)  # [n, N/k, kD]
        return self.net(features), None


class _CrossAttentionBlock(nn.Module):
    """Pre-norm block: queries self-attend, cross-attend to features, then an MLP (BLIP-2 Q-Former layer)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """q `[n, M, c]`, kv `[n, N, c]` -> `[n, M, c]`."""
        h = self.norm_self(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        kv = self.norm_kv(kv)
        q = q + self.cross_attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.norm_mlp(q))


@CONNECTORS.register("resampler", example={"num_queries": 4, "num_layers": 1, "num_heads": 2})
class QueryResampler(nn.Module):
    """Q-Former-style resampler: M learned queries cross-attend to the encoder features.

    Compresses any number N of encoder tokens to a fixed M (Uni-MoE's audio connector, BLIP-2,
    Flamingo's perceiver resampler).

    Args:
        in_dim: encoder feature size D.
        out_dim: LM hidden size d.
        num_queries: M, the number of output tokens.
        width: internal width c (default `out_dim`).
        num_layers: stacked cross-attention blocks.
        num_heads: attention heads (must divide `width`).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        num_queries: int = 32,
        width: int | None = None,
        num_layers: int = 2,
        num_heads: int = 8,
    ) -> None:
        super().__init__()
        width = width or out_dim
        if width % num_heads:
            raise ValueError(f"QueryResampler: width {width} is not divisible by num_heads {num_heads}")
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.in_proj = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(_CrossAttentionBlock(width, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, out_dim)

    def forward(self, features: torch.Tensor, text=None, text_mask=None) -> tuple[torch.Tensor, None]:
        """`[n, N, D] -> ([n, M, d], None)`."""
        kv = self.in_proj(features)  # [n, N, c]
        q = self.queries.to(kv.dtype).expand(features.shape[0], -1, -1)  # [n, M, c]
        for block in self.blocks:
            q = block(q, kv)
        return self.out_proj(self.norm(q)), None


@CONNECTORS.register("moe_projector", example={"num_experts": 4, "top_k": 2, "num_heads": 2})
class LanguageMoEProjector(nn.Module):
    """Parrot-style language-conditioned MoE projector.

    The image's mean feature cross-attends to the text embeddings of its sample; the resulting
    language-guided summary is routed (`zoo.moe.TopKRouter`, one decision per image) over E MLP
    projector experts, and the image's tokens are projected by the weighted top-k experts.

    Args:
        in_dim: encoder feature size D.
        out_dim: LM hidden size d (the text embeddings' size).
        num_experts: E projector experts.
        top_k: k experts per image.
        hidden_dim: expert MLP width (default `out_dim`).
        num_heads: cross-attention heads (must divide `in_dim`).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        num_experts: int = 4,
        top_k: int = 2,
        hidden_dim: int | None = None,
        num_heads: int = 4,
    ) -> None:
        super().__init__()
        if in_dim % num_heads:
            raise ValueError(f"LanguageMoEProjector: in_dim {in_dim} is not divisible by num_heads {num_heads}")
        hidden_dim = hidden_dim or out_dim
        self.in_dim, self.out_dim = in_dim, out_dim
        self.text_norm = nn.LayerNorm(out_dim)
        self.cross_attn = nn.MultiheadAttention(in_dim, num_heads, kdim=out_dim, vdim=out_dim, batch_first=True)
        self.router = TopKRouter(in_dim, num_experts, top_k)
        # E two-layer GELU MLPs with stacked weights: [E, H, D] and [E, d, H].
        self.w1 = nn.Parameter(torch.randn(num_experts, hidden_dim, in_dim) * in_dim**-0.5)
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.randn(num_experts, out_dim, hidden_dim) * hidden_dim**-0.5)
        self.b2 = nn.Parameter(torch.zeros(num_experts, out_dim))

    def forward(
        self, features: torch.Tensor, text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RouterOutput]:
        """Project with experts chosen by the language-guided image summary.

        Args:
            features: `[n, N, D]`.
            text: `[n, S, d]` embedded text of each image's sample (None: route on the image alone).
            text_mask: `[n, S]`, 1 where `text` is real (placeholders and padding are 0).

        Returns:
            tokens `[n, N, d]` and the `RouterOutput` over the n images (`[n, E]`, `[n, k]`, `[n, k]`).
        """
        summary = features.mean(dim=1)  # [n, D]
        if text is not None and text.shape[1] > 0:
            pad = None if text_mask is None else ~text_mask.bool()  # True = ignore
            if pad is not None:
                pad = pad & ~(pad.all(dim=1, keepdim=True))  # a sample with no text attends to all (zeros) rather than NaN
            guided = self.cross_attn(summary[:, None], self.text_norm(text), self.text_norm(text), key_padding_mask=pad, need_weights=False)[0]
            summary = summary + guided[:, 0]  # [n, D]
        routing = self.router(summary)
        out = features.new_zeros(*features.shape[:2], self.out_dim)  # [n, N, d]
        for j in range(routing.indices.shape[1]):
            idx = routing.indices[:, j]  # [n]
            h = F.gelu(torch.einsum("nsd,nhd->nsh", features, self.w1[idx]) + self.b1[idx][:, None])  # [n, N, H]
            y = torch.einsum("nsh,noh->nso", h, self.w2[idx]) + self.b2[idx][:, None]  # [n, N, d]
            out = out + routing.weights[:, j, None, None].to(y.dtype) * y
        return out, routing


def build_connector(kind: str, in_dim: int, out_dim: int, **options) -> nn.Module:
    """Build a registered connector (`CONNECTORS.build`); an unknown kind or option is named."""
    return CONNECTORS.build(kind, options, in_dim=in_dim, out_dim=out_dim)
