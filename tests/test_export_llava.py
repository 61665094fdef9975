"""LLaVA-native export: the directory loads as LlavaForConditionalGeneration + AutoProcessor with no zoo import,
gives the zoo model's logits and writes the zoo processor's input ids; what LLaVA cannot hold is refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from zoo.io.export import ExportError, export_multimodal, llava_blockers
from zoo.models import ModelConfig
from zoo.models.builders import build_model
from zoo.processor import MultimodalProcessor

VOCAB = 300
_LM = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_VIT = {"kind": "timm", "name": "vit_tiny_patch16_224", "image_size": 32,
        "options": {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}}
_CLIP = {"kind": "open_clip", "options": {"layers": 3, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32}}
_WHISPER = {"kind": "whisper", "options": {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2,
                                           "encoder_ffn_dim": 64, "num_mel_bins": 16, "max_source_positions": 16}}
_MLP = {"kind": "mlp", "options": {"depth": 2}}
_RESAMPLER = {"kind": "resampler", "options": {"num_queries": 4, "num_layers": 1, "num_heads": 2}}
_MOE = {"num_experts": 4, "router_options": {"top_k": 2}}


def _config(name, encoders, connectors, *, model_type="llama", moe=None, **lm):
    return ModelConfig.from_dict({"name": name, "lm": {"model_type": model_type, "config": {**_LM, **lm}},
                                  "encoders": encoders, "connectors": connectors, "moe": moe})


CASES = {
    # timm ViT final features (after the last norm, CLS dropped); Llama upcycled in every layer -> Mixtral.
    "vit-final-mixtral": lambda: _config("a", {"image": _VIT}, {"image": _MLP}, moe=_MOE),
    # timm ViT block 1 of 3, CLS kept; Qwen2 base, MoE in layer 1 with a shared expert -> Qwen2-MoE.
    "vit-block1-cls-qwen2moe": lambda: _config(
        "b", {"image": {**_VIT, "feature_layer": 1, "select": "all"}}, {"image": _MLP}, model_type="qwen2",
        moe={**_MOE, "layers": [1], "shared_expert_size": 16, "router_options": {"top_k": 2, "norm_topk_prob": False}}),
    # timm ViT with a pre-norm and QuickGELU (timm's CLIP ViTs), last block's output -> CLIPVisionModel.
    "vit-prenorm-quickgelu-last": lambda: _config(
        "d", {"image": {**_VIT, "feature_layer": -1,
                        "options": {**_VIT["options"], "pre_norm": True, "act_layer": "quick_gelu"}}}, {"image": _MLP}),
    # open_clip tower (OpenAI CLIP layout), penultimate block, CLS dropped; dense Llama with tied embeddings.
    "clip-penultimate-dense-tied": lambda: _config(
        "c", {"image": {**_CLIP, "feature_layer": -2}}, {"image": _MLP}, tie_word_embeddings=True),
}
EXPECTED = {  # (vision tower class, language model class, vision_feature_layer, strategy, image tokens)
    "vit-final-mixtral": ("ViTModel", "MixtralModel", -1, "default", 16),
    "vit-block1-cls-qwen2moe": ("ViTModel", "Qwen2MoeModel", -2, "full", 17),
    "vit-prenorm-quickgelu-last": ("CLIPVisionModel", "LlamaModel", -1, "default", 16),
    "clip-penultimate-dense-tied": ("CLIPVisionModel", "LlamaModel", -2, "default", 16),
}


def _perturbed(cfg: ModelConfig, seed: int):
    """The model with every weight moved off its init (norms, biases, routers, expert copies all differ)."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tokenizer():
    from zoo.tokenizer import train_tokenizer

    lines = ["a photo of a red shirt.", "What is in this image?", "Describe the picture in detail.", "one two three"] * 20
    return train_tokenizer(lines, vocab_size=VOCAB)


def _pictures():
    """Two images already at the encoders' 32 x 32 and one 48 x 40 that the processors resize and crop."""
    g = np.random.default_rng(3)
    return [g.integers(0, 256, (32, 32, 3), dtype=np.uint8), g.integers(0, 256, (40, 48, 3), dtype=np.uint8),
            g.integers(0, 256, (32, 32, 3), dtype=np.uint8)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("llava")
    out = {}
    for i, (name, make) in enumerate(CASES.items()):
        cfg = make()
        model = _perturbed(cfg, i)
        processor = MultimodalProcessor.from_model(model, tokenizer)
        path = export_multimodal(model, processor, cfg, root / name, format="llava", card_text="# card\n")
        out[name] = (model, processor, path)
    return out


def _prompts(processor):
    chat = processor.apply_chat_template([{"role": "user", "content": "<image>\nWhat is in this image?"}],
                                         add_generation_prompt=True)
    return [chat, "<image> a photo of a red shirt. <image> one two"]


@pytest.mark.slow
def test_llava_loads_without_zoo_with_our_logits_and_input_ids(exported, tmp_path):
    """In a fresh interpreter that never imports zoo: from_pretrained both, run the processor and the model."""
    pictures = _pictures()
    save_file({f"img{i}": torch.from_numpy(p) for i, p in enumerate(pictures)}, str(tmp_path / "pictures.safetensors"))
    ours = {}
    for name, (model, processor, path) in exported.items():
        batch = processor(text=_prompts(processor), images=[Image.fromarray(p) for p in pictures])
        with torch.no_grad():
            out = model(**batch)
        ours[name] = (batch, out)
        save_file({f"{name}.images": batch["images"]}, str(tmp_path / f"{name}.ours.safetensors"))
    any_processor = next(iter(exported.values()))[1]
    job = {"dirs": {name: str(path) for name, (_, _, path) in exported.items()}, "prompts": _prompts(any_processor),
           "messages": [{"role": "user", "content": "<image>\nWhat is in this image?"}], "tmp": str(tmp_path)}
    script = textwrap.dedent(
        """
        import json, sys
        import torch
        from PIL import Image
        from safetensors.torch import load_file, save_file
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        job = json.loads(sys.argv[1])
        pics = load_file(job["tmp"] + "/pictures.safetensors")
        images = [Image.fromarray(pics[f"img{i}"].numpy()) for i in range(len(pics))]
        meta = {}
        for name, d in job["dirs"].items():
            model = LlavaForConditionalGeneration.from_pretrained(d).eval()
            processor = AutoProcessor.from_pretrained(d)
            inputs = processor(text=job["prompts"], images=images, padding=True, return_tensors="pt")
            ours = load_file(job["tmp"] + f"/{name}.ours.safetensors")[f"{name}.images"]
            with torch.no_grad():
                logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               pixel_values=ours).logits
            save_file({"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                       "pixel_values": inputs["pixel_values"], "logits": logits.contiguous()},
                      job["tmp"] + f"/{name}.llava.safetensors")
            one = processor(text=job["prompts"][:1], images=images[:1], return_tensors="pt")
            generated = model.generate(**one, max_new_tokens=6, do_sample=False)[0, one["input_ids"].shape[1]:]
            meta[name] = {"generated": generated.tolist(), "tower": type(model.model.vision_tower).__name__,
                          "lm": type(model.model.language_model).__name__,
                          "processor": type(processor).__name__, "image_processor": type(processor.image_processor).__name__,
                          "chat": processor.apply_chat_template(job["messages"], add_generation_prompt=True, tokenize=False)}
        assert not [m for m in sys.modules if m == "zoo" or m.startswith("zoo.")], "zoo was imported"
        print(json.dumps(meta))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(job)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (batch, out) in ours.items():
        tower, lm, _, _, m = EXPECTED[name]
        assert (meta[name]["tower"], meta[name]["lm"], meta[name]["processor"]) == (tower, lm, "LlavaProcessor"), meta[name]
        got = load_file(str(tmp_path / f"{name}.llava.safetensors"))
        # Input ids: ours with every <image> written m times (plain lists, the reference), right-padded with <pad>.
        rows = []
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
            row = []
            for t, keep in zip(ids, mask):
                if keep:
                    row += [t] * (m if t == 3 else 1)
            rows.append(row)
        width = max(map(len, rows))
        assert got["input_ids"].tolist() == [r + [0] * (width - len(r)) for r in rows], name
        assert got["attention_mask"].tolist() == [[1] * len(r) + [0] * (width - len(r)) for r in rows], name
        assert got["attention_mask"].tolist() == out.attention_mask.tolist()  # our spliced batch has the same layout
        # Logits on our pixel values at every real position, float32.
        real = out.attention_mask.bool()
        torch.testing.assert_close(got["logits"][real], out.logits[real], rtol=1e-5, atol=1e-5, msg=lambda s: f"{name}: {s}")
        # Pixel values: a 32 x 32 image passes through both unchanged. The 40 x 48 one is resized to 32 x 38 by
        # both, CLIPImageProcessor on uint8 pixels and ours on floats: measured max 7.8/255 on the [0, 1] scale.
        for i in (0, 2):
            torch.testing.assert_close(got["pixel_values"][i], batch["images"][i], rtol=0, atol=1e-5)
        std = torch.tensor(exported[name][1].image_processor.std)[:, None, None]
        assert ((got["pixel_values"][1] - batch["images"][1]) * std).abs().max() < 10 / 255
        assert meta[name]["chat"] == _prompts(exported[name][1])[0]
        # Greedy generation (KV cache through the exported LM) writes our tokens.
        model, processor, _ = exported[name]
        one = processor(text=_prompts(processor)[:1], images=[Image.fromarray(pictures[0])])
        assert len(meta[name]["generated"]) == 6, meta[name]["generated"]  # no early end of sequence
        assert meta[name]["generated"] == model.generate(**one, max_new_tokens=6, do_sample=False)[0].tolist(), name


@pytest.mark.slow
def test_config_records_our_feature_choice(exported):
    for name, (model, _, path) in exported.items():
        cfg = json.loads((path / "config.json").read_text())
        _, _, layer, strategy, m = EXPECTED[name]
        assert cfg["model_type"] == "llava" and cfg["image_token_index"] == 3
        assert (cfg["vision_feature_layer"], cfg["vision_feature_select_strategy"], cfg["image_seq_length"]) == (layer, strategy, m)
        assert cfg["projector_hidden_act"] == "gelu" and cfg["multimodal_projector_bias"] is True
        with torch.no_grad():  # M is what our connector gives per image
            assert model.encode("image", torch.zeros(1, 3, 32, 32))[0].shape[1] == m
        assert (path / "MODEL_CARD.md").read_text() == "# card\n" and "LlavaForConditionalGeneration" in (path / "README.md").read_text()
    vit = json.loads((exported["vit-final-mixtral"][2] / "config.json").read_text())["vision_config"]
    assert vit["model_type"] == "vit" and vit["tie_last_hidden_states"] is True and vit["layer_norm_eps"] == 1e-6


def test_export_checks_parity_and_catches_a_wrong_mapping(tokenizer, tmp_path, monkeypatch):
    import zoo.io.export.llava as llava

    cfg = CASES["vit-final-mixtral"]()
    model = _perturbed(cfg, 5)
    processor = MultimodalProcessor.from_model(model, tokenizer)
    real = llava.TimmViT.state_dict

    def swapped(self, encoder):  # a mapping bug that still loads: the two norms of block 0 trade places
        s = real(self, encoder)
        for end in ("weight", "bias"):
            a, b = f"layers.0.layernorm_before.{end}", f"layers.0.layernorm_after.{end}"
            s[a], s[b] = s[b], s[a]
        return s

    monkeypatch.setattr(llava.TimmViT, "state_dict", swapped)
    with pytest.raises(ExportError, match=r"LlavaForConditionalGeneration disagrees with the zoo model: max \|logit diff\|"):
        export_multimodal(model, processor, cfg, tmp_path / "bad", format="llava")
    assert not (tmp_path / "bad").exists()


REFUSED = {
    "qformer-connector": (lambda: _config("q", {"image": _VIT}, {"image": _RESAMPLER}),
                          [r"connectors\.image: a Q-Former-style query resampler; LLaVA's multi_modal_projector is linear"]),
    "whisper-only": (lambda: _config("w", {"audio": _WHISPER}, {"audio": _RESAMPLER}),
                     [r"encoders\.audio: a whisper audio encoder with a resampler connector \(a Q-Former-style query resampler\)",
                      r"the model has no image encoder"]),
    "moe-vision-tower": (lambda: _config("m", {"image": {**_VIT, "moe": _MOE}}, {"image": _MLP}),
                         [r"encoders\.image: a MoE vision tower \(encoders\.image\.moe, 4 experts\)"]),
    "image-and-audio": (lambda: _config("ia", {"image": _VIT, "audio": _WHISPER}, {"image": _MLP, "audio": _RESAMPLER}),
                        [r"encoders\.audio: a whisper audio encoder"]),
    "cnn-tower": (lambda: _config("e", {"image": {"kind": "timm", "name": "test_efficientnet", "image_size": 32,
                                                  "feature_layer": -1}}, {"image": _MLP}),
                  [r"test_efficientnet\): EfficientNet is not a VisionTransformer, so neither ViTModel nor CLIPVisionModel",
                   r"TimmWrapperModel .* \[B, D, h, w\]"]),
    "pre-norm-vit": (lambda: _config("p", {"image": {**_VIT, "options": {**_VIT["options"], "pre_norm": True}}}, {"image": _MLP}),
                     [r"pre_norm \(a norm_pre LayerNorm\); ViTModel has no pre-norm",
                      r"feature_layer None takes the features after timm's final norm, which CLIPVisionModel applies "
                      r"to the pooled class token only"]),
    "one-linear-connector": (lambda: _config("l", {"image": _VIT}, {"image": {"kind": "mlp", "options": {"depth": 1}}}),
                             [r"connectors\.image: an mlp of depth 1"]),
    "moe-projector": (lambda: _config("pp", {"image": _VIT}, {"image": {"kind": "moe_projector", "options": {"num_heads": 2}}}),
                      [r"connectors\.image: a language-conditioned MoE projector"]),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refuses_what_llava_cannot_hold_naming_the_part(name, tokenizer, tmp_path):
    make, patterns = REFUSED[name]
    cfg = make()
    model = build_model(cfg).eval()
    reasons = "; ".join(llava_blockers(model, cfg))
    for pattern in patterns:
        assert __import__("re").search(pattern, reasons), (pattern, reasons)
    processor = MultimodalProcessor.from_model(model, tokenizer)
    with pytest.raises(ExportError, match=r"cannot export as LlavaForConditionalGeneration: .*Use --format hf"):
        export_multimodal(model, processor, cfg, tmp_path / "out", format="llava")
    assert not (tmp_path / "out").exists()


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs" / "models").glob("*.yaml"))
WHISPER = "encoders.audio: a whisper audio encoder with a resampler connector"
CNN = "(timm efficientnet_lite0): EfficientNet is not a VisionTransformer, so neither ViTModel nor CLIPVisionModel can hold it"
SHIPPED_OUTCOME = {  # config -> the start of each refusal reason ([] = exports); a new config needs an entry
    "micro-zoo": [WHISPER],
    "moe-llava-qwen-1.8b-4e": [],
    "tiny-clip-whisper-qwen2-moe": [WHISPER, "connectors.image: a language-conditioned MoE projector"],
    "tiny-efficientnet-llama-dense": ["encoders.image " + CNN],
    "tiny-vit-llama-moe": [],
    "tiny-zoo": [WHISPER, "encoders.image " + CNN],
    "tiny-zoo-scratch-audio": [WHISPER, "encoders.image " + CNN],
    "smollm2-135m-instruct": ["the model has no image encoder"],
    "smol-moe-llava": ["encoders.audio: a whisper audio encoder with a mlp connector", "encoders.image " + CNN],
}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_model_config_exports_as_llava_or_is_refused_naming_the_part(path):
    cfg = ModelConfig.load(path)
    for enc in cfg.encoders.values():
        enc.weights = None  # random init: no pretrained file is read
    full_size = cfg.lm.config["hidden_size"] > 256
    if full_size:
        with torch.device("meta"):  # structure only, which is what the blockers read
            model = build_model(cfg)
    else:
        model = _perturbed(cfg, 11)
    reasons = llava_blockers(model, cfg)
    expected = SHIPPED_OUTCOME[path.stem]
    assert len(reasons) == len(expected) and all(r.startswith(e) for r, e in zip(reasons, expected)), reasons
    if not expected and not full_size:
        from zoo.io.export.llava import check_llava_parity, to_llava

        assert check_llava_parity(model, to_llava(model, cfg)) <= 1e-4


def test_timm_wrapper_cannot_feed_llava_as_the_refusal_says():
    """The premise of refusing TimmWrapperModel: LLaVA's projector cannot read its hidden states."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, TimmWrapperConfig

    vision = TimmWrapperConfig(architecture="vit_tiny_patch16_224", hidden_size=32,
                               model_args={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32})
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=3,
                                                      vision_feature_layer=-1, vision_feature_select_strategy="full")).eval()
    states = llava.model.vision_tower(torch.zeros(1, 3, 32, 32), output_hidden_states=-1).hidden_states
    assert tuple(states[-1].shape) == (1, 32, 4, 4)  # [B, D, h, w], the class token gone
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        llava(input_ids=torch.tensor([[1] + [3] * 16]), pixel_values=torch.zeros(1, 3, 32, 32))


def test_zoo_export_cli_writes_llava_from_a_checkpoint_directory(tokenizer, tmp_path, capsys):
    from zoo.cli import main
    from zoo.io.model_dir import save_model_dir

    cfg = CASES["clip-penultimate-dense-tied"]()
    model = _perturbed(cfg, 7)
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    save_model_dir(model, cfg, tmp_path / "ckpt", tmp_path / "tok")
    assert main(["export", str(tmp_path / "ckpt"), "--format", "llava", "--out", str(tmp_path / "llava")]) == 0
    assert "exported" in capsys.readouterr().out
    from zoo.io.checkpoint import verify_checkpoint

    verify_checkpoint(tmp_path / "llava")
    assert json.loads((tmp_path / "llava" / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]

    audio = _config("ia", {"image": _VIT, "audio": _WHISPER}, {"image": _MLP, "audio": _RESAMPLER})
    save_model_dir(build_model(audio), audio, tmp_path / "ckpt2", tmp_path / "tok")
    assert main(["export", str(tmp_path / "ckpt2"), "--format", "llava", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("zoo: error: cannot export as LlavaForConditionalGeneration: encoders.audio: a whisper") and "Traceback" not in err
    assert not (tmp_path / "x").exists()
