"""Plain LoRA: the `lora` adapter (through PEFT) and `LoRALinear`, the zoo's own LoRA linear.

Plain LoRA on a model (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") goes
through PEFT (`get_peft_model` + `merge_and_unload`): the `lora` entry of `ADAPTERS`.

`LoRALinear` is hand-written for the attention LoRA that MixLoRA and LoRAMoE add beside their LoRA
experts: those experts are zoo modules (PEFT has no routed LoRA experts), and writing the plain
linear once here lets both merge, save and load the same way. Tests check it against PEFT with the
same A/B weights.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from zoo.transforms.adapters.registry import ADAPTERS

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def init_lora_a(a: torch.Tensor) -> None:
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
        init_lora_a(self.lora_A)
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


def add_attention_lora(decoder: nn.ModuleList, targets: Sequence[str], r: int, alpha: float, dropout: float,
                       who: str) -> int:
    """Wrap every `nn.Linear` named one of `targets` outside the FFNs of `decoder`'s layers in `LoRALinear`.

    Returns:
        How many linears were wrapped.

    Raises:
        ValueError: none was found (naming the targets).
    """
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
            f"{who}: attention LoRA found no nn.Linear named {list(targets)} in the decoder layers "
            "(pass target_modules= with the model's projection names, or attention_lora=False)"
        )
    return count


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


def _hf_lm(language_model: nn.Module) -> nn.Module:
    from zoo.models.lm import MoECausalLM

    return language_model.lm if isinstance(language_model, MoECausalLM) else language_model


def _set_hf_lm(language_model: nn.Module, hf: nn.Module) -> nn.Module:
    from zoo.models.lm import MoECausalLM

    if isinstance(language_model, MoECausalLM):
        language_model.lm = hf
        return language_model
    return hf


@dataclass
class LoRAOptions:
    """Options of the plain `lora` adapter (PEFT `LoraConfig` fields).

    Attributes:
        r: rank (>= 1).
        alpha: scaling numerator (`alpha / r`).
        dropout: LoRA dropout.
        target_modules: module names to adapt inside the LM.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"rank r must be >= 1, got {self.r}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        self.target_modules = list(self.target_modules)


@ADAPTERS.register("lora", options=LoRAOptions, example={"r": 4, "alpha": 8})
class PlainLoRA:
    """Plain LoRA through PEFT on `target_modules` of the LM (Hu et al. 2021).

    `apply` wraps the transformers LM in a `PeftModel` (inside `MoECausalLM` when sparse), so only
    the LoRA matrices train; `merge` folds them into the base weights (`merge_and_unload`), after
    which nothing of the adapter remains.
    """

    preserves_output = True  # LoRA B starts at zero

    def __init__(self, **options) -> None:
        self.options = LoRAOptions(**options)

    def apply(self, language_model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        o = self.options
        with warnings.catch_warnings():  # PEFT reads transformers' deprecated alias; not ours to act on
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            peft_lm = get_peft_model(_hf_lm(language_model), LoraConfig(
                r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=list(o.target_modules)))
        return _set_hf_lm(language_model, peft_lm)

    def merge(self, language_model: nn.Module) -> tuple[nn.Module, dict | None]:
        return _set_hf_lm(language_model, _hf_lm(language_model).merge_and_unload()), None


__all__ = [
    "ATTENTION_TARGETS", "LoRALinear", "LoRAOptions", "PlainLoRA", "add_attention_lora", "init_lora_a",
    "lora_modules", "merge_lora", "unmerge_lora",
]
