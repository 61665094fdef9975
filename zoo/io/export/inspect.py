"""What an HF MoE export needs to know about an `MoECausalLM`, and what blocks every target."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from zoo.models.lm import MoECausalLM, decoder_layers
from zoo.models.mlp import gated_mlp
from zoo.moe.experts import SwiGLU, SwiGLUExperts
from zoo.moe.layer import SparseMoE
from zoo.moe.routers import TopKRouter  # noqa: F401  (the gate the HF classes hold)

BASES = ("llama", "mistral", "qwen2")


def bias_kind(attn: nn.Module) -> str:
    """'none', 'qkv' (Qwen2) or 'all' (Llama attention_bias) for an attention module."""
    has = {n: getattr(getattr(attn, n, None), "bias", None) is not None for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if has["o_proj"]:
        return "all"
    if any(has.values()):
        return "qkv" if all(has[n] for n in ("q_proj", "k_proj", "v_proj")) else "mixed"
    return "none"


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


@dataclass
class MoEInfo:
    """The shape of an `MoECausalLM` as the HF MoE classes see it.

    Attributes:
        blockers: reasons no target can hold the model.
        base: the base LM's `model_type`.
        base_blockers: why the Mixtral / Qwen2-MoE classes cannot hold the base LM (other targets
            check `base` themselves).
        topk_blockers: routers that do not reduce to softmax top-k (what the Mixtral / Qwen MoE
            gates hold; the DeepSeek-V3 target checks `routers` itself).
        routers: MoE layer -> its router module.
        shared_gated: every shared expert is scaled by a `shared_expert_gate` (Qwen2-MoE) rather
            than added as is (DeepSeek-V3).
        moe_layers, dense_layers: decoder layer indices.
        num_layers: decoder layers.
        num_experts: E.
        bias: attention bias kind ('none', 'qkv', 'all', 'mixed').
        expert_size, shared_size, dense_size: FFN widths.
        top_k, norm_topk_prob, jitter_noise: the (top-k) routers' settings.
        aux_loss_coef: weight of the balance loss.
        shared_without_gate: a shared expert without the sigmoid gate.
        gates: MoE layer -> the top-k router equivalent to its router (what the HF gate holds).
    """

    blockers: list[str] = field(default_factory=list)
    base: str = ""
    base_blockers: list[str] = field(default_factory=list)
    topk_blockers: list[str] = field(default_factory=list)
    routers: dict = field(default_factory=dict)
    shared_gated: bool = True
    moe_layers: list[int] = field(default_factory=list)
    dense_layers: list[int] = field(default_factory=list)
    num_layers: int = 0
    num_experts: int = 0
    bias: str = "none"
    expert_size: int = 0
    shared_size: int = 0
    dense_size: int = 0
    top_k: int = 0
    norm_topk_prob: bool = True
    jitter_noise: float = 0.0
    aux_loss_coef: float = 0.0
    shared_without_gate: bool = False
    gates: dict = field(default_factory=dict)


def inspect_moe_lm(model: MoECausalLM) -> MoEInfo:
    """Read the export-relevant shape of `model`, plus the blockers common to every target."""
    cfg = model.lm.config
    layers = decoder_layers(model.lm)
    moes = model.moe_layers()
    info = MoEInfo(moe_layers=sorted(moes), num_layers=len(layers), base=cfg.model_type)
    blockers = info.blockers
    if cfg.model_type not in BASES:
        info.base_blockers.append(f"base model type {cfg.model_type!r} is not one of {BASES}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        blockers.append(f"hidden_act is {cfg.hidden_act!r}, the MoE classes use 'silu'")
    if not moes:
        blockers.append("the model has no MoE layers")
    kinds = {bias_kind(layer.self_attn) for layer in layers if hasattr(layer, "self_attn")}
    info.bias = kinds.pop() if len(kinds) == 1 else "mixed"
    if info.bias in ("all", "mixed"):
        blockers.append(f"attention biases ({info.bias}) are not representable (o_proj has no bias in either class)")

    expert_sizes, shared_sizes, top_ks, norms, jitters, counts = set(), set(), set(), set(), set(), set()
    for i, moe in moes.items():
        if not isinstance(moe, SparseMoE):
            blockers.append(f"layer {i}: not a SparseMoE")
            continue
        info.routers[i] = moe.router
        if getattr(moe, "residual_coefficient", None) is not None:
            blockers.append(f"layer {i}: a residual MoE (a learned coefficient mixing the dense FFN and the experts) "
                            "has no transformers MoE class")
        topk, why = moe.router.as_topk()
        if topk is None:
            info.topk_blockers.append(
                f"layer {i}: router {type(moe.router).__name__} does not reduce to top-k softmax routing: {why}")
        else:
            info.gates[i] = topk
            top_ks.add(topk.top_k)
            norms.add(topk.norm_topk_prob)
            jitters.add(topk.jitter_noise)
        if type(moe.experts) is not SwiGLUExperts:
            blockers.append(f"layer {i}: experts are {type(moe.experts).__name__}, not plain SwiGLUExperts")
            continue
        expert_sizes.add(moe.experts.intermediate_size)
        counts.add(moe.experts.num_experts)
        if moe.shared_expert is None:
            shared_sizes.add(0)
        elif type(moe.shared_expert) is not SwiGLU or any(
            getattr(moe.shared_expert, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")
        ):
            blockers.append(f"layer {i}: shared expert {type(moe.shared_expert).__name__} is not a bias-free SwiGLU")
        else:
            shared_sizes.add(moe.shared_expert.gate_proj.out_features)
            gate = moe.shared_expert_gate
            if gate is None:
                info.shared_without_gate = True
                info.shared_gated = False
            elif not isinstance(gate, nn.Linear) or gate.bias is not None or gate.out_features != 1:
                blockers.append(f"layer {i}: shared_expert_gate is not a bias-free Linear(d, 1)")
    for name, values in (("expert count", counts), ("expert width", expert_sizes), ("shared expert width", shared_sizes),
                         ("top_k", top_ks), ("norm_topk_prob", norms), ("jitter_noise", jitters)):
        if len(values) > 1:
            blockers.append(f"MoE layers differ in {name}: {sorted(values)}")
    info.num_experts = min(counts) if counts else 0
    info.expert_size = min(expert_sizes) if expert_sizes else 0
    info.shared_size = min(shared_sizes) if shared_sizes else 0
    info.top_k = min(top_ks) if top_ks else 0
    info.norm_topk_prob = norms.pop() if len(norms) == 1 else True
    info.jitter_noise = jitters.pop() if len(jitters) == 1 else 0.0
    info.aux_loss_coef = model.loss_coefs.get("balance", TopKRouter.default_loss_coefs["balance"])

    info.dense_layers = [i for i in range(len(layers)) if i not in moes]
    dense_sizes = set()
    for i in info.dense_layers:
        try:
            spec = gated_mlp(layers[i].mlp, f"layer {i}: dense mlp")
        except ValueError as e:
            blockers.append(str(e))
            continue
        if spec.has_bias:
            blockers.append(f"layer {i}: dense mlp has biases (mlp_bias), which Qwen2-MoE's MLP has not")
        elif spec.activation != "silu":
            blockers.append(f"layer {i}: dense mlp uses {spec.activation}, the MoE classes use silu")
        else:
            dense_sizes.add(spec.intermediate_size)
    if len(dense_sizes) > 1:
        blockers.append(f"dense layers differ in width: {sorted(dense_sizes)}")
    info.dense_size = dense_sizes.pop() if len(dense_sizes) == 1 else getattr(cfg, "intermediate_size", 0)
    return info


__all__ = ["BASES", "MoEInfo", "bias_kind", "head_dim", "inspect_moe_lm"]
