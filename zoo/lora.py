"""LoRA transforms over a built causal LM: attention LoRA, MixLoRA and LoRAMoE experts.

Hand-written rather than through PEFT because PEFT has no LoRA *experts with routing*: it adapts
each linear with one (or a fixed set of) adapters but cannot pick an adapter per token with a
router, add a balance loss, or share one frozen FFN among E LoRA experts. Plain LoRA on a linear is
simple enough to write once here, so attention LoRA and the experts merge, save and load the same
way; tests check both against PEFT (`get_peft_model`) with the same A/B weights.

- `apply_mixlora` (Li et al. 2024, MixLoRA): inside each chosen frozen dense FFN, E LoRA experts
  on `gate_proj`/`up_proj`/`down_proj` and a top-k router; expert e computes
  `down_e(act(gate_e(x)) * up_e(x))` with `W_e = W + (alpha / r) B_e A_e` for each projection. The
  frozen base projections of `gate`/`up` are computed once for all tokens. Plus plain LoRA on the
  attention projections.
- `apply_loramoe` (Dou et al. 2023, LoRAMoE): E LoRA experts beside the frozen FFN on its output
  side, `y = FFN(x) + sum_e p_e(x) (alpha / r) B_e A_e x`, with soft routing over all experts.

The routed FFN of both is a `zoo.moe.SparseMoE` (a `TopKRouter` from `zoo.moe` and an experts
module with the usual `(x, weights, indices)` call) in a `zoo.lm.MoEBlock`, so `capture_routing`
records its logits like any MoE layer and `MoECausalLM` adds the balance loss to the training loss.

Merging: attention LoRA merges into its linear exactly (`merge_lora`, `unmerge_lora`). LoRA
experts cannot be merged into one dense FFN: the router picks a different expert (or mix) per
token and the SwiGLU is nonlinear in the gate/up weights, so no single weight reproduces them. They
stay a module whose parameters save and load through `state_dict` (re-apply the transform with the
same arguments to a fresh base model before `load_state_dict`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.config import MoEConfig
from zoo.lm import MoEBlock, MoECausalLM, decoder_layers
from zoo.moe.layer import SparseMoE
from zoo.moe.router import build_router

_GATED = ("gate_proj", "up_proj", "down_proj")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _init_lora_a(a: torch.Tensor) -> None:
    """PEFT's default A init (`kaiming_uniform_(a=sqrt(5))`), per expert for stacked `[E, r, in]`."""
    for sub in a.view(-1, *a.shape[-2:]):
        nn.init.kaiming_uniform_(sub, a=math.sqrt(5))


class LoRALinear(nn.Module):
    """A frozen linear plus a low-rank update: `base(x) + (alpha / r) * B(A(dropout(x)))`.

    Args:
        base_layer: the linear to adapt (its weights are frozen here).
        r: rank.
        alpha: scaling numerator; the update is scaled by `alpha / r`.
        dropout: dropout on the LoRA input.

    Parameters:
        lora_A: `[r, in_features]`, Kaiming-uniform (as PEFT).
        lora_B: `[out_features, r]`, zeros, so the layer starts equal to `base_layer`.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRALinear: rank r must be >= 1, got {r}")
        self.base_layer = base_layer
        self.r = r
        self.scaling = alpha / r
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, device=w.device, dtype=w.dtype))
        _init_lora_a(self.lora_A)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        for p in base_layer.parameters():
            p.requires_grad_(False)

    def delta_weight(self) -> torch.Tensor:
        """`(alpha / r) * B @ A`, `[out_features, in_features]`."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., in_features] -> [..., out_features]`."""
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into `base_layer.weight`; the forward then skips the LoRA path."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge: already merged")
        self.base_layer.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from `base_layer.weight` again (exact up to float rounding)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: not merged")
        self.base_layer.weight -= self.delta_weight()
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}, merged={self.merged}"


def _check_gated(mlp: nn.Module, index: int, who: str) -> None:
    if isinstance(mlp, MoEBlock):
        raise ValueError(
            f"{who}: layer {index}'s mlp is already a sparse MoE layer ({type(mlp.moe.experts).__name__}); "
            "LoRA experts go inside a dense gated FFN (choose other layers, e.g. layers='dense')"
        )
    missing = [n for n in _GATED if not isinstance(getattr(mlp, n, None), nn.Linear)]
    if missing:
        raise ValueError(
            f"{who}: layer {index}'s mlp ({type(mlp).__name__}) has no {'/'.join(missing)} linear(s); "
            f"LoRA experts need a gated MLP with {', '.join(_GATED)} and act_fn"
        )
    if not callable(getattr(mlp, "act_fn", None)):
        raise ValueError(f"{who}: layer {index}'s mlp ({type(mlp).__name__}) has no act_fn")


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
            _init_lora_a(a.data)
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
            `[T, d]` in x's dtype.
        """
        base = self.base
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
            y.index_add_(0, tok, out * weights[tok, slot].unsqueeze(-1).to(out.dtype))
        return y

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, r={self.r}, scaling={self.scaling}"


class LoRAMoEExperts(nn.Module):
    """E LoRA experts beside one frozen dense FFN, on its output side (LoRAMoE).

    `y = base(x) + sum_k w_k (alpha / r) B[i_k] A[i_k] x`; with a soft router (k = E, weights the
    full softmax) every expert contributes to every token.

    Args:
        base: the frozen dense MLP `[T, d] -> [T, d]` (any MLP; no gated structure is needed).
        hidden_size: d.
        num_experts: E.
        r: LoRA rank.
        alpha: LoRA scaling numerator.
        dropout: dropout on the LoRA input.

    Parameters:
        lora_A: `[E, r, d]`; lora_B: `[E, d, r]` (zeros).
    """

    def __init__(
        self, base: nn.Module, hidden_size: int, num_experts: int, r: int, alpha: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRAMoEExperts: rank r must be >= 1, got {r}")
        self.base = base
        self.num_experts = num_experts
        self.r = r
        self.scaling = alpha / r
        ref = next(base.parameters())
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, hidden_size, device=ref.device, dtype=ref.dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, hidden_size, r, device=ref.device, dtype=ref.dtype))
        _init_lora_a(self.lora_A.data)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`x [T, d]`, `weights [T, k]`, `indices [T, k]` -> `[T, d]`."""
        gates = torch.zeros(x.shape[0], self.num_experts, device=x.device, dtype=weights.dtype)
        gates = gates.scatter(1, indices, weights)  # [T, E]
        low = torch.einsum("td,erd->ter", self.dropout(x), self.lora_A)  # [T, E, r]
        delta = torch.einsum("ter,edr->ted", low, self.lora_B) * self.scaling  # [T, E, d]
        return self.base(x) + torch.einsum("ted,te->td", delta, gates.to(delta.dtype))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, r={self.r}, scaling={self.scaling}"


def _layer_indices(layers: str | Sequence[int], decoder: nn.ModuleList, cfg_fields: dict) -> list[int]:
    if layers == "dense":
        return [i for i, layer in enumerate(decoder) if not isinstance(layer.mlp, MoEBlock)]
    return MoEConfig(**cfg_fields, layers=layers).moe_layer_indices(len(decoder))


def _attention_lora(decoder: nn.ModuleList, targets: Sequence[str], r: int, alpha: float, dropout: float, who: str) -> int:
    count = 0
    for layer in decoder:
        for name, module in list(layer.named_modules()):
            if not name or name.split(".")[0] == "mlp":  # the layer itself; FFN projections are not attention
                continue
            for t in targets:
                child = getattr(module, t, None)
                if isinstance(child, nn.Linear):
                    setattr(module, t, LoRALinear(child, r, alpha, dropout))
                    count += 1
    if count == 0:
        raise ValueError(
            f"{who}: attention_lora found no nn.Linear named {list(targets)} in the decoder layers "
            "(pass attention_targets= with the model's projection names, or attention_lora=False)"
        )
    return count


def _apply_lora_experts(model, who, *, num_experts, top_k, norm_topk_prob, layers, make_experts, attention_lora,
                        attention_targets, r, alpha, dropout, aux_loss_coef) -> MoECausalLM:
    if num_experts < 1:
        raise ValueError(f"{who}: num_experts must be >= 1, got {num_experts}")
    if r < 1:
        raise ValueError(f"{who}: rank r must be >= 1, got {r}")
    wrapped = isinstance(model, MoECausalLM)
    lm = model.lm if wrapped else model
    decoder = decoder_layers(lm)
    fields = dict(num_experts=num_experts, top_k=top_k, norm_topk_prob=norm_topk_prob, aux_loss_coef=aux_loss_coef)
    indices = _layer_indices(layers, decoder, fields)
    if not indices and not attention_lora:
        raise ValueError(f"{who}: layers={layers!r} selects no decoder layer and attention_lora is off: nothing to adapt")
    if wrapped and indices and model.moe_config.top_k != top_k:
        raise ValueError(
            f"{who}: the model's MoE layers use top_k={model.moe_config.top_k} and MoECausalLM computes one balance "
            f"loss with that k for every layer; LoRA experts with top_k={top_k} would get the wrong k. "
            f"Use top_k={model.moe_config.top_k}"
        )
    for i in indices:
        _check_gated(decoder[i].mlp, i, who)
    for p in lm.parameters():  # everything that exists now is base weight
        p.requires_grad_(False)
    if attention_lora:
        _attention_lora(decoder, attention_targets, r, alpha, dropout, who)
    std = getattr(getattr(lm, "config", None), "initializer_range", 0.02)
    for i in indices:
        mlp = decoder[i].mlp
        ref = mlp.gate_proj.weight
        d = mlp.down_proj.out_features
        router = build_router("topk", d, num_experts, top_k, norm_topk_prob=norm_topk_prob)
        with torch.no_grad():
            nn.init.normal_(router.weight, std=std)
        moe = SparseMoE(router=router.to(device=ref.device, dtype=ref.dtype), experts=make_experts(mlp, d))
        decoder[i].mlp = MoEBlock(moe)
    if wrapped:
        return model
    return MoECausalLM(lm, MoEConfig(**fields, layers=indices))


def apply_mixlora(
    model: nn.Module,
    *,
    num_experts: int,
    top_k: int,
    r: int,
    alpha: float,
    layers: str | Sequence[int] = "dense",
    attention_lora: bool = True,
    attention_targets: Sequence[str] = ATTENTION_TARGETS,
    dropout: float = 0.0,
    aux_loss_coef: float = 0.01,
) -> MoECausalLM:
    """MixLoRA: E routed LoRA experts inside chosen frozen dense FFNs, plus attention LoRA.

    Every existing parameter of the model is frozen; only the LoRA matrices and the new routers
    train. LoRA B starts at zero, so the model's outputs are unchanged at initialization.

    Args:
        model: a transformers causal LM (Llama, Qwen2, Mistral, ...), changed in place, or a
            `MoECausalLM` (e.g. from `upcycle`; its dense layers get the experts).
        num_experts: E LoRA experts per FFN.
        top_k: experts per token; weights are the renormalized top-k softmax (Mixtral convention).
        r: LoRA rank (experts and attention).
        alpha: LoRA scaling numerator (`alpha / r`).
        layers: decoder layers that get LoRA experts: `"dense"` (every layer whose mlp is still a
            dense FFN), one of `zoo.config.LAYER_PATTERNS`, or explicit indices.
        attention_lora: add plain LoRA to the attention projections of every decoder layer.
        attention_targets: attribute names of the attention projections to adapt.
        dropout: LoRA dropout.
        aux_loss_coef: weight of the load-balancing loss when a plain LM is wrapped (an
            `MoECausalLM` keeps its own settings).

    Returns:
        The model as an `MoECausalLM` (the same object if one was given), whose loss adds
        `aux_loss_coef * load_balancing_loss` over the MixLoRA (and any other MoE) layers.

    Raises:
        ValueError: a chosen layer has no dense gated MLP (`gate_proj`/`up_proj`/`down_proj`,
            `act_fn`) or is already MoE; an `MoECausalLM` with a different `top_k`; no attention
            projection found; nothing to adapt.
    """
    return _apply_lora_experts(
        model, "apply_mixlora", num_experts=num_experts, top_k=top_k, norm_topk_prob=True, layers=layers,
        make_experts=lambda mlp, d: MixLoRAExperts(mlp, num_experts, r, alpha, dropout),
        attention_lora=attention_lora, attention_targets=attention_targets, r=r, alpha=alpha, dropout=dropout,
        aux_loss_coef=aux_loss_coef,
    )


def apply_loramoe(
    model: nn.Module,
    *,
    num_experts: int,
    r: int,
    alpha: float,
    layers: str | Sequence[int] = "dense",
    attention_lora: bool = False,
    attention_targets: Sequence[str] = ATTENTION_TARGETS,
    dropout: float = 0.0,
) -> MoECausalLM:
    """LoRAMoE: E LoRA experts beside each chosen frozen FFN, softly routed (no top-k).

    The router is a `TopKRouter` with `k = E` and no renormalization, i.e. the full softmax.
    The Switch balance loss is constant under soft routing (every expert gets every token), so the
    wrapper's `aux_loss_coef` is 0; LoRAMoE's localized balancing constraint is not implemented.

    Args:
        model: a transformers causal LM (changed in place) or an `MoECausalLM` whose top_k is E.
        num_experts: E.
        r: LoRA rank.
        alpha: LoRA scaling numerator.
        layers: as in `apply_mixlora`.
        attention_lora: also add plain LoRA to the attention projections.
        attention_targets: attention projection names.
        dropout: LoRA dropout.

    Returns:
        An `MoECausalLM`; equal to the input model at initialization (LoRA B is zero).
    """
    return _apply_lora_experts(
        model, "apply_loramoe", num_experts=num_experts, top_k=num_experts, norm_topk_prob=False, layers=layers,
        make_experts=lambda mlp, d: LoRAMoEExperts(mlp, d, num_experts, r, alpha, dropout),
        attention_lora=attention_lora, attention_targets=attention_targets, r=r, alpha=alpha, dropout=dropout,
        aux_loss_coef=0.0,
    )


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path -> `LoRALinear` for every plain LoRA linear in `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module, *, unload: bool = False) -> int:
    """Merge every `LoRALinear` (attention LoRA) into its base weight.

    LoRA experts (`MixLoRAExperts`, `LoRAMoEExperts`) are left as they are: they cannot be merged
    into one dense FFN (per-token routing; the SwiGLU is nonlinear in the adapted weights).

    Args:
        model: any module containing `LoRALinear`s.
        unload: also replace each merged `LoRALinear` by its plain `nn.Linear`, so the state dict
            has the base model's key names again (`...q_proj.weight`); then there is no unmerge.

    Returns:
        The number of linears merged.

    Raises:
        ValueError: the model has no `LoRALinear`.
    """
    found = lora_modules(model)
    if not found:
        raise ValueError(f"merge_lora: {type(model).__name__} has no LoRALinear to merge")
    for name, module in found.items():
        if not module.merged:
            module.merge()
        if unload:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, module.base_layer)
    return len(found)


def unmerge_lora(model: nn.Module) -> int:
    """Undo `merge_lora` (without `unload`) on every merged `LoRALinear`; returns how many."""
    merged = [m for m in lora_modules(model).values() if m.merged]
    if not merged:
        raise ValueError(f"unmerge_lora: {type(model).__name__} has no merged LoRALinear")
    for module in merged:
        module.unmerge()
    return len(merged)


__all__ = [
    "ATTENTION_TARGETS",
    "LoRALinear",
    "LoRAMoEExperts",
    "MixLoRAExperts",
    "apply_loramoe",
    "apply_mixlora",
    "lora_modules",
    "merge_lora",
    "unmerge_lora",
]
