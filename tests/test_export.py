"""HF-native export: the exported directory loads in plain transformers and gives the zoo logits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from zoo import upcycle
from zoo.io.checkpoint import verify_checkpoint
from zoo.io.export import ExportError, export_hf, hf_target, to_hf
from zoo.moe.experts import SwiGLUExperts

_SIZES = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _moe(config_cls, seed: int, lm_kw: dict | None = None, **moe_kw):
    """A tiny upcycled model whose experts, routers and shared experts all differ (so routing matters)."""
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(config_cls(**_SIZES, **(lm_kw or {})))
    model = upcycle(lm, **moe_kw)
    with torch.no_grad():
        for moe in model.moe_layers().values():
            for buf in ("weight", "projection"):  # a learned gate, or SMoE-Dropout's fixed one
                if hasattr(moe.router, buf):
                    getattr(moe.router, buf).normal_(std=0.5)
            moe.experts.gate_up_proj.add_(0.05 * torch.randn_like(moe.experts.gate_up_proj))
            moe.experts.down_proj.add_(0.05 * torch.randn_like(moe.experts.down_proj))
            if moe.shared_expert is not None:
                moe.shared_expert.down_proj.weight.normal_(std=0.05)
                moe.shared_expert_gate.weight.normal_(std=0.5)
    return model.eval()


CASES = {
    # Mistral base with a sliding window shorter than the probe: every layer MoE, renormalized top-2.
    "mixtral-from-mistral": (lambda: _moe(MistralConfig, 0, {"sliding_window": 5}, num_experts=4, router_options={"top_k": 2}), "mixtral"),
    "mixtral-from-llama-tied": (
        lambda: _moe(LlamaConfig, 1, {"tie_word_embeddings": True}, num_experts=4, router_options={"top_k": 2}), "mixtral"),
    # Qwen2 base (q/k/v biases), shared expert, no renormalization, MoE only in layer 1.
    "qwen2moe-shared-partial": (
        lambda: _moe(Qwen2Config, 2, None, num_experts=4, shared_expert_size=24,
                     layers=[1], router_options={"top_k": 2, "norm_topk_prob": False}), "qwen2_moe"),
    # Llama base, MoE in every other layer, no shared expert: a zero-width shared expert.
    "qwen2moe-from-llama-sparse": (
        lambda: _moe(LlamaConfig, 3, None, num_experts=4, layers="every_other", router_options={"top_k": 1}), "qwen2_moe"),
}

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, (build, _) in CASES.items():
        model = build()
        path = export_hf(model, root / name, extra_files={"README.md": b"# card\n"})
        with torch.no_grad():
            out[name] = (model, path, model(IDS).logits)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_target_choice_and_in_process_parity(exported, name):
    model, path, ref = exported[name]
    expected_target = CASES[name][1]
    assert hf_target(model) == expected_target
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == expected_target
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(hf).__name__ == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[expected_target]
    with torch.no_grad():
        got = hf(IDS).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    verify_checkpoint(path)  # the manifest covers every file transformers wrote
    assert (path / "README.md").read_text() == "# card\n"


def test_exported_config_fields(exported):
    qwen = json.loads((exported["qwen2moe-shared-partial"][1] / "config.json").read_text())
    assert qwen["mlp_only_layers"] == [0] and qwen["norm_topk_prob"] is False
    assert qwen["shared_expert_intermediate_size"] == 24 and qwen["qkv_bias"] is True
    sparse = json.loads((exported["qwen2moe-from-llama-sparse"][1] / "config.json").read_text())
    assert sparse["mlp_only_layers"] == [1] and sparse["shared_expert_intermediate_size"] == 0
    assert sparse["qkv_bias"] is False
    mix = json.loads((exported["mixtral-from-mistral"][1] / "config.json").read_text())
    assert mix["sliding_window"] == 5 and mix["num_local_experts"] == 4 and mix["num_experts_per_tok"] == 2


def test_plain_transformers_subprocess_without_zoo(exported, tmp_path):
    """Load every export in a fresh interpreter that never imports zoo; compare its logits."""
    dirs = {name: str(path) for name, (_, path, _) in exported.items()}
    ids_path = tmp_path / "ids.pt"
    from safetensors.torch import save_file

    save_file({"ids": IDS}, str(ids_path))
    script = textwrap.dedent(
        f"""
        import json, sys
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        dirs = json.loads({json.dumps(json.dumps(dirs))})
        ids = load_file({str(ids_path)!r})["ids"]
        out = {{}}
        for name, d in dirs.items():
            model = AutoModelForCausalLM.from_pretrained(d).eval()
            with torch.no_grad():
                out[name] = model(ids).logits.contiguous()
        assert not any(m == "zoo" or m.startswith("zoo.") for m in sys.modules), "zoo was imported"
        save_file(out, {str(tmp_path / "logits.safetensors")!r})
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "logits.safetensors"))
    for name, (_, _, ref) in exported.items():
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_refuses_what_neither_class_represents():
    biased = _moe(LlamaConfig, 4, {"attention_bias": True}, num_experts=4, router_options={"top_k": 2})
    with pytest.raises(ExportError, match=r"neither MixtralForCausalLM nor Qwen2MoeForCausalLM.*o_proj has no bias"):
        hf_target(biased)

    partial = _moe(LlamaConfig, 5, None, num_experts=4, layers=[1], router_options={"top_k": 2})
    with pytest.raises(ExportError, match=r"cannot export as mixtral: Mixtral needs every layer MoE; layers \[0\] are dense"):
        to_hf(partial, "mixtral")
    assert hf_target(partial) == "qwen2_moe"

    ungated = _moe(Qwen2Config, 6, None, num_experts=4, shared_expert_size=16, router_options={"top_k": 2})
    for moe in ungated.moe_layers().values():
        moe.shared_expert_gate = None
    with pytest.raises(ExportError, match=r"mixtral: .*no shared expert.*qwen2_moe: .*has no gate"):
        hf_target(ungated)

    class OtherExperts(SwiGLUExperts):
        pass

    other = _moe(LlamaConfig, 7, None, num_experts=4, router_options={"top_k": 2})
    moe = other.moe_layers()[0]
    replacement = OtherExperts(4, 32, 48)
    replacement.load_state_dict(moe.experts.state_dict())
    moe.experts = replacement
    with pytest.raises(ExportError, match=r"layer 0: experts are OtherExperts, not plain SwiGLUExperts"):
        hf_target(other)


def test_parity_check_catches_a_wrong_mapping(tmp_path, monkeypatch):
    import zoo.io.export.targets as targets

    model = CASES["mixtral-from-llama-tied"][0]()
    real = targets._moe_keys
    # A mapping bug that still loads: expert weights land in the wrong layer.
    swap = lambda k: k.replace("layers.0.mlp.experts", "layers.X").replace(  # noqa: E731
        "layers.1.mlp.experts", "layers.0.mlp.experts").replace("layers.X", "layers.1.mlp.experts")
    monkeypatch.setattr(targets, "_moe_keys", lambda m, info: {swap(k): v for k, v in real(m, info).items()})
    with pytest.raises(ExportError, match="disagrees with the zoo model: max \\|logit diff\\|"):
        export_hf(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("router", __import__("zoo.moe", fromlist=["ROUTERS"]).ROUTERS.names())
def test_every_router_exports_when_it_reduces_to_top_k_and_is_refused_with_the_reason_otherwise(router, tmp_path):
    from zoo.moe import ROUTERS

    options = dict(ROUTERS.entry(router).example)
    if router == "null_experts":
        options = {"top_k": 2, "num_null": 0}  # reduces to top-k; with null experts it is refused below
    model = _moe(LlamaConfig, 8, None, num_experts=4, router=router, router_options=options)
    topk, why = model.moe_layers()[0].router.as_topk()
    if topk is None:
        with pytest.raises(ExportError, match=f"does not reduce to top-k softmax routing: {re.escape(why)}"):
            hf_target(model)
        return
    out = export_hf(model, tmp_path / "hf")  # checks logits parity against the zoo model
    assert (out / "config.json").is_file()


def test_null_experts_with_null_choices_are_refused_naming_them():
    model = _moe(LlamaConfig, 9, None, num_experts=4, router="null_experts", router_options={"top_k": 2, "num_null": 2})
    with pytest.raises(ExportError, match="2 null experts let a token use fewer than top_k=2 experts"):
        hf_target(model)
