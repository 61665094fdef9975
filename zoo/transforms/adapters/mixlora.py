"""MixLoRA (Li et al. 2024, "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based
Mixture of Experts", arXiv 2404.15159): E routed LoRA experts inside each chosen frozen dense FFN.

Expert e computes `down_e(act(gate_e(x)) * up_e(x))` with `W_e = W + (alpha / r) B_e A_e` for each
projection; a router (top-2 in the paper) picks the experts per token and adds the balance loss.
The frozen base projections of `gate`/`up` are computed once for all tokens. Plus plain LoRA on
the attention projections (the paper's attention-layer adapters), which merges after training;
the LoRA experts cannot be merged (per-token routing; the SwiGLU is nonlinear in the adapted
weights) and stay modules, recorded in the model config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels.reference import connected_zeros
from zoo.models.lm import MoECausalLM
from zoo.transforms.adapters.lora import init_lora_a
from zoo.transforms.adapters.lora_experts import LoRAExpertOptions, insert_lora_experts, merge_attention_lora
from zoo.transforms.adapters.registry import ADAPTERS


class MixLoRAExperts(nn.Module):
    """E LoRA experts inside one frozen dense gated FFN (MixLoRA).

    Expert e is the base FFN with each projection `P in {gate, up, down}` replaced by
    `P + (alpha / r) B_P[e] A_P[e]`. With E=1 and top-1 it is plain LoRA on the three projections.

    Args:
        base: the dense gated MLP (`gate_proj`, `up_proj`, `down_proj` linears, `act_fn`); frozen.
        num_experts: E.
        r: LoRA rank.
        alpha: LoRA scaling numerator.
        dropout: dropout on each LoRA input.

    Parameters (d = hidden size, f = FFN width):
        gate_lora_A, up_lora_A: `[E, r, d]`; gate_lora_B, up_lora_B: `[E, f, r]` (zeros).
        down_lora_A: `[E, r, f]`; down_lora_B: `[E, d, r]` (zeros).
    """

    def __init__(self, base: nn.Module, num_experts: int, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"MixLoRAExperts: rank r must be >= 1, got {r}")
        self.base = base
        self.num_experts = num_experts
        self.r = r
        self.scaling = alpha / r
        w = base.gate_proj.weight
        f, d = w.shape
        shapes = {"gate": (f, d), "up": (f, d), "down": (d, f)}
        for name, (out_f, in_f) in shapes.items():
            a = nn.Parameter(torch.empty(num_experts, r, in_f, device=w.device, dtype=w.dtype))
            init_lora_a(a.data)
            setattr(self, f"{name}_lora_A", a)
            setattr(self, f"{name}_lora_B", nn.Parameter(torch.zeros(num_experts, out_f, r, device=w.device, dtype=w.dtype)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in base.parameters():
            p.requires_grad_(False)

    def _lora(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        a, b = getattr(self, f"{name}_lora_A")[e], getattr(self, f"{name}_lora_B")[e]  # [r, in], [out, r]
        return F.linear(F.linear(self.dropout(x), a), b) * self.scaling

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Combine the chosen LoRA experts.

        Args:
            x: `[T, d]`.
            weights: `[T, k]` combine weights (float32 from the router).
            indices: `[T, k]` expert ids.

        Returns:
            `[T, d]` in x's dtype; connected to autograd (zero gradients) when no slot is filled
            (zero tokens, or every slot empty), as `zoo.kernels.reference.grouped_experts` is.
        """
        base = self.base
        if not bool((indices >= 0).any()):
            return connected_zeros(x, *(p for p in self.parameters(recurse=False)), weights.to(x.dtype))
        gate0, up0 = base.gate_proj(x), base.up_proj(x)  # [T, f] each, shared by all experts
        y = torch.zeros_like(x)
        for e in range(self.num_experts):
            tok, slot = torch.where(indices == e)  # [n], [n]
            if tok.numel() == 0:
                continue
            xe = x[tok]  # [n, d]
            g = gate0[tok] + self._lora("gate", e, xe)  # [n, f]
            u = up0[tok] + self._lora("up", e, xe)
            h = base.act_fn(g) * u
            out = base.down_proj(h) + self._lora("down", e, h)  # [n, d]
            # under autocast `out` is bf16 while `y` keeps x's dtype: accumulate in y's
            y.index_add_(0, tok, (out * weights[tok, slot].unsqueeze(-1).to(out.dtype)).to(y.dtype))
        return y

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, r={self.r}, scaling={self.scaling}"


@dataclass
class MixLoRAOptions(LoRAExpertOptions):
    """MixLoRA's options (see `LoRAExpertOptions`); the paper's defaults: top-2 of E, attention LoRA on."""


def apply_mixlora(model: nn.Module, **options) -> MoECausalLM:
    """MixLoRA: E routed LoRA experts inside chosen frozen dense FFNs, plus attention LoRA.

    Every existing parameter of the model is frozen; only the LoRA matrices and the new routers
    train. LoRA B starts at zero, so the model's outputs are unchanged at initialization.

    Args:
        model: a transformers causal LM (Llama, Qwen2, Mistral, ...), changed in place, or a
            `MoECausalLM` (e.g. from `upcycle`; its dense layers get the experts).
        **options: `MixLoRAOptions` fields (`num_experts`, `r`, `alpha`, `router`,
            `router_options`, `layers`, `attention_lora`, `target_modules`, `dropout`, `loss_coefs`).

    Returns:
        The model as an `MoECausalLM` (the same object if one was given), whose loss adds the
        routers' weighted losses over the MixLoRA (and any other MoE) layers.

    Raises:
        ValueError: a chosen layer has no dense gated MLP (`gate_proj`/`up_proj`/`down_proj`,
            `act_fn`) or is already MoE; no attention projection found; nothing to adapt; a bad option.
    """
    return MixLoRA(**options).apply(model)


@ADAPTERS.register("mixlora", options=MixLoRAOptions, example={"num_experts": 2, "r": 4, "alpha": 8})
class MixLoRA:
    """The `mixlora` adapter: `apply` inserts the experts (+ attention LoRA); `merge` folds the attention LoRA."""

    preserves_output = True  # LoRA B starts at zero

    def __init__(self, **options) -> None:
        self.options = MixLoRAOptions(**options)

    def apply(self, language_model: nn.Module) -> MoECausalLM:
        o = self.options
        return insert_lora_experts(
            language_model, o, lambda mlp, d: MixLoRAExperts(mlp, o.num_experts, o.r, o.alpha, o.dropout), "mixlora")

    def merge(self, language_model: nn.Module) -> tuple[nn.Module, dict]:
        return merge_attention_lora(language_model, self.options)


__all__ = ["MixLoRA", "MixLoRAExperts", "MixLoRAOptions", "apply_mixlora"]
