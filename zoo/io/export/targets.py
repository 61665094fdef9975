"""One adapter per transformers MoE class (`HF_TARGETS`): when it can hold a model, its config, its keys.

Each target has `reasons(model, info) -> [why not]`, `config(model, info) -> transformers config`
and `state_dict(model, info) -> {transformers key: tensor}` (torchtitan's `StateDictAdapter.to_hf`),
so adding a target is one class here, not edits across the exporter.

- `mixtral` (`MixtralForCausalLM`): every decoder layer is MoE, no shared expert, renormalized
  top-k (`norm_topk_prob=True`), attention without biases (Llama/Mistral base).
- `qwen2_moe` (`Qwen2MoeForCausalLM`): everything else it can hold: shared experts gated by a
  sigmoid, top-k with or without renormalization, MoE in only some layers (`mlp_only_layers`),
  q/k/v biases (Qwen2 base) or none. A model without a shared expert gets a zero-width one, which
  adds exactly 0.
- `qwen3_moe` (`Qwen3MoeForCausalLM`): a Qwen3 base (q/k RMS norms per head), softmax top-k with or
  without renormalization, MoE in some or all layers; no shared expert (the class has none).
- `deepseek_v3` (`DeepseekV3ForCausalLM`): a DeepSeek-V3 base (multi-head latent attention) with
  the `deepseek_v3` router (sigmoid, selection bias, groups, route scale), dense layers only before
  the first MoE layer (`first_k_dense_replace`) and shared experts added ungated, as wide as a
  multiple of an expert (`n_shared_experts`); none gets a zero-width one. Any other base is refused
  naming the attention the class cannot hold.
"""

from __future__ import annotations

from typing import Any

import torch

from zoo.io.export.inspect import MoEInfo, head_dim
from zoo.models.lm import MoECausalLM
from zoo.registry import Registry

HF_TARGETS: Registry = Registry("export target")

# Fields copied unchanged from the base LM config to either target config.
COMMON_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "tie_word_embeddings",
    "attention_dropout", "rope_parameters", "pad_token_id", "bos_token_id", "eos_token_id",
)


def _common(model: MoECausalLM) -> dict[str, Any]:
    src = model.lm.config
    common = {k: getattr(src, k) for k in COMMON_FIELDS if hasattr(src, k)}
    common["hidden_act"] = "silu"
    return common


def _moe_keys(model: MoECausalLM, info: MoEInfo) -> dict[str, torch.Tensor]:
    """zoo keys inside `MoECausalLM.lm` -> transformers MoE keys; each router becomes the `mlp.gate`
    weight of its top-k equivalent (`Router.as_topk`)."""
    state = {k.replace(".mlp.moe.", ".mlp."): v for k, v in model.lm.state_dict().items() if ".mlp.moe.router." not in k}
    for i, gate in info.gates.items():
        state[f"model.layers.{i}.mlp.gate.weight"] = gate.weight.detach()
    return state


@HF_TARGETS.register("mixtral")
class Mixtral:
    """`MixtralForCausalLM`."""

    hf_class = "MixtralForCausalLM"

    def reasons(self, model: MoECausalLM, info: MoEInfo) -> list[str]:
        out = list(info.blockers) + info.base_blockers + info.topk_blockers
        if info.dense_layers:
            out.append(f"Mixtral needs every layer MoE; layers {info.dense_layers} are dense")
        if info.shared_size:
            out.append("Mixtral has no shared expert")
        if not info.norm_topk_prob:
            out.append("Mixtral always renormalizes the top-k weights (norm_topk_prob=False here)")
        if info.bias != "none":
            out.append(f"Mixtral attention has no biases (this model: {info.bias})")
        return out

    def config(self, model: MoECausalLM, info: MoEInfo):
        from transformers import MixtralConfig

        src = model.lm.config
        return MixtralConfig(
            **_common(model),
            head_dim=head_dim(src),
            intermediate_size=info.expert_size,
            num_local_experts=info.num_experts,
            num_experts_per_tok=info.top_k,
            router_aux_loss_coef=info.aux_loss_coef,
            router_jitter_noise=info.jitter_noise,
            sliding_window=getattr(src, "sliding_window", None),
        )

    def state_dict(self, model: MoECausalLM, info: MoEInfo) -> dict[str, torch.Tensor]:
        return _moe_keys(model, info)

    @staticmethod
    def optional_key(key: str, info: MoEInfo) -> bool:
        """Keys the transformers model has that the export may leave out: none."""
        return False


@HF_TARGETS.register("qwen2_moe")
class Qwen2Moe:
    """`Qwen2MoeForCausalLM`."""

    hf_class = "Qwen2MoeForCausalLM"

    def reasons(self, model: MoECausalLM, info: MoEInfo) -> list[str]:
        cfg = model.lm.config
        out = list(info.blockers) + info.base_blockers + info.topk_blockers
        if info.shared_without_gate:
            out.append("Qwen2-MoE gates its shared expert with sigmoid(shared_expert_gate); this one has no gate")
        if head_dim(cfg) != cfg.hidden_size // cfg.num_attention_heads:
            out.append(f"Qwen2-MoE derives head_dim from hidden_size/heads; this model uses head_dim={head_dim(cfg)}")
        if getattr(cfg, "sliding_window", None) is not None and cfg.model_type == "llama":
            out.append("unexpected sliding_window on a Llama config")
        return out

    def config(self, model: MoECausalLM, info: MoEInfo):
        from transformers import Qwen2MoeConfig

        src = model.lm.config
        window: dict[str, Any] = {}
        if src.model_type == "qwen2":
            window = {k: getattr(src, k) for k in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")}
        elif getattr(src, "sliding_window", None) is not None:  # Mistral: every layer slides
            window = {"use_sliding_window": True, "sliding_window": src.sliding_window, "max_window_layers": 0,
                      "layer_types": ["sliding_attention"] * info.num_layers}
        return Qwen2MoeConfig(
            **_common(model),
            **window,
            intermediate_size=info.dense_size,
            moe_intermediate_size=info.expert_size,
            shared_expert_intermediate_size=info.shared_size,
            num_experts=info.num_experts,
            num_experts_per_tok=info.top_k,
            norm_topk_prob=info.norm_topk_prob,
            router_aux_loss_coef=info.aux_loss_coef,
            decoder_sparse_step=1,
            mlp_only_layers=info.dense_layers,
            qkv_bias=info.bias == "qkv",
        )

    def state_dict(self, model: MoECausalLM, info: MoEInfo) -> dict[str, torch.Tensor]:
        state = _moe_keys(model, info)
        if info.shared_size == 0:  # zero-width shared expert: its gate is a zero row, it adds exactly 0
            param = next(model.parameters())
            for i in info.moe_layers:
                state[f"model.layers.{i}.mlp.shared_expert_gate.weight"] = torch.zeros(
                    1, model.lm.config.hidden_size, dtype=param.dtype, device=param.device)
        return state

    @staticmethod
    def optional_key(key: str, info: MoEInfo) -> bool:
        """Keys the transformers model has that the export may leave out (the zero-width shared expert)."""
        return info.shared_size == 0 and ".mlp.shared_expert." in key


@HF_TARGETS.register("qwen3_moe")
class Qwen3Moe:
    """`Qwen3MoeForCausalLM`."""

    hf_class = "Qwen3MoeForCausalLM"

    def reasons(self, model: MoECausalLM, info: MoEInfo) -> list[str]:
        out = list(info.blockers) + info.topk_blockers
        if info.base != "qwen3":
            out.append(f"Qwen3-MoE attention normalizes q and k per head (q_norm/k_norm); a {info.base!r} base has "
                       "no such norms")
        if info.shared_size or info.shared_without_gate:
            out.append("Qwen3-MoE has no shared expert")
        return out

    def config(self, model: MoECausalLM, info: MoEInfo):
        from transformers import Qwen3MoeConfig

        src = model.lm.config
        window = {k: getattr(src, k) for k in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
                  if hasattr(src, k)}
        return Qwen3MoeConfig(
            **_common(model),
            **window,
            head_dim=head_dim(src),
            attention_bias=getattr(src, "attention_bias", False),
            intermediate_size=info.dense_size,
            moe_intermediate_size=info.expert_size,
            num_experts=info.num_experts,
            num_experts_per_tok=info.top_k,
            norm_topk_prob=info.norm_topk_prob,
            router_aux_loss_coef=info.aux_loss_coef,
            decoder_sparse_step=1,
            mlp_only_layers=info.dense_layers,
        )

    def state_dict(self, model: MoECausalLM, info: MoEInfo) -> dict[str, torch.Tensor]:
        return _moe_keys(model, info)

    @staticmethod
    def optional_key(key: str, info: MoEInfo) -> bool:
        return False


# DeepSeek-V3 router settings the transformers gate holds once for every layer.
_DEEPSEEK_FIELDS = {"top_k": "num_experts_per_tok", "n_group": "n_group", "topk_group": "topk_group",
                    "routed_scaling_factor": "routed_scaling_factor", "norm_topk_prob": "norm_topk_prob"}


@HF_TARGETS.register("deepseek_v3")
class DeepseekV3:
    """`DeepseekV3ForCausalLM`."""

    hf_class = "DeepseekV3ForCausalLM"

    def reasons(self, model: MoECausalLM, info: MoEInfo) -> list[str]:
        from zoo.moe.routers.deepseek_v3 import DeepSeekV3Router

        out = list(info.blockers)
        if info.base != "deepseek_v3":
            out.append(f"DeepseekV3ForCausalLM holds multi-head latent attention (kv_a_proj_with_mqa, kv_a_layernorm, "
                       f"kv_b_proj, a shared RoPE key); a {info.base!r} base's q/k/v attention has no exact form in it")
        elif getattr(model.lm.config, "num_mtp_layers", 0):
            out.append("multi-token prediction layers are not exported")
        settings: dict[str, set] = {}
        for i, router in info.routers.items():
            if type(router) is not DeepSeekV3Router:
                out.append(f"layer {i}: DeepSeek-V3's gate holds the deepseek_v3 router, not {type(router).__name__}")
                continue
            if router.score_function != "sigmoid":
                out.append(f"layer {i}: DeepSeek-V3's gate scores with a sigmoid, this router with {router.score_function}")
            if router.num_experts // router.n_group < 2:
                out.append(f"layer {i}: DeepSeek-V3's gate scores a group by its top-2 experts; "
                           f"this router has {router.num_experts // router.n_group} per group")
            if router.eval_capacity_factor is not None:
                out.append(f"layer {i}: DeepSeek-V3 never drops tokens; eval_capacity_factor={router.eval_capacity_factor}")
            for name in _DEEPSEEK_FIELDS:
                settings.setdefault(name, set()).add(getattr(router, name))
        for name, values in settings.items():
            if len(values) > 1:
                out.append(f"MoE layers differ in {name}: {sorted(values)}")
        if info.moe_layers and info.dense_layers and max(info.dense_layers) > min(info.moe_layers):
            out.append(f"DeepSeek-V3 has dense layers only before the first MoE layer (first_k_dense_replace); "
                       f"dense layers {info.dense_layers}, MoE layers {info.moe_layers}")
        if info.shared_size and info.shared_gated:
            out.append("DeepSeek-V3 adds its shared experts ungated; this one is scaled by sigmoid(shared_expert_gate)")
        if info.shared_size and info.expert_size and info.shared_size % info.expert_size:
            out.append(f"DeepSeek-V3's shared experts are n_shared_experts * moe_intermediate_size wide; "
                       f"{info.shared_size} is not a multiple of {info.expert_size}")
        return out

    def config(self, model: MoECausalLM, info: MoEInfo):
        from transformers import DeepseekV3Config

        src = model.lm.config.to_dict()
        router = info.routers[info.moe_layers[0]]
        for k in ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype"):
            src.pop(k, None)
        src.update({hf: getattr(router, ours) for ours, hf in _DEEPSEEK_FIELDS.items()})
        src.update(n_routed_experts=info.num_experts, moe_intermediate_size=info.expert_size,
                   n_shared_experts=info.shared_size // info.expert_size, first_k_dense_replace=min(info.moe_layers),
                   intermediate_size=info.dense_size, router_aux_loss_coef=info.aux_loss_coef)
        return DeepseekV3Config(**{k: v for k, v in src.items() if k != "num_local_experts"})

    def state_dict(self, model: MoECausalLM, info: MoEInfo) -> dict[str, torch.Tensor]:
        state = {k.replace(".mlp.shared_expert.", ".mlp.shared_experts."): v for k, v in _moe_keys(model, info).items()}
        for i, router in info.routers.items():  # the gate and its aux-loss-free bias, as trained
            state[f"model.layers.{i}.mlp.gate.weight"] = router.weight.detach()
            state[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] = router.e_score_correction_bias.detach()
        return state

    @staticmethod
    def optional_key(key: str, info: MoEInfo) -> bool:
        """The zero-width shared expert of a model without one."""
        return info.shared_size == 0 and ".mlp.shared_experts." in key


__all__ = ["COMMON_FIELDS", "HF_TARGETS", "DeepseekV3", "Mixtral", "Qwen2Moe", "Qwen3Moe"]
