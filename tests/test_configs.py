"""Registry-driven: every model config in configs/models loads, round-trips and builds."""

from pathlib import Path

import pytest
import torch

from zoo import MoEConfig, ModelConfig
from zoo.models.lm import MoECausalLM
from zoo.models import build_model

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "models").glob("*.yaml"))
TINY_PARAMS = 20_000_000


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _dummy_media(model, ids):
    kw = {}
    if "image" in model.encoders:
        n = int((ids == model.placeholder_ids["image"]).sum())
        kw["images"] = torch.randn(n, 3, *model.encoders["image"].image_size)
    if "audio" in model.encoders:
        a = model.encoders["audio"]
        kw["audio"] = torch.randn(int((ids == model.placeholder_ids["audio"]).sum()), a.n_mels, a.num_frames)
    return kw


def test_there_are_configs():
    names = [p.stem for p in CONFIGS]
    assert "moe-llava-qwen-1.8b-4e" in names and sum(n.startswith("tiny-") for n in names) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_round_trips_and_builds(path, tmp_path):
    cfg = ModelConfig.load(path)
    assert cfg.name == path.stem
    assert ModelConfig.from_yaml(cfg.to_yaml()) == cfg
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    with torch.device("meta"):
        meta = build_model(cfg)
    assert isinstance(meta.language_model, MoECausalLM) == (cfg.moe is not None)
    if _n_params(meta) > TINY_PARAMS:
        return  # full size: the meta build (and test_full_size_shapes) is the check
    model = build_model(cfg)
    assert _n_params(model) == _n_params(meta)
    tokens = list(model.placeholder_ids.values())
    row = [10, *tokens, 11, 12]
    ids = torch.tensor([row, list(range(13, 13 + len(row)))])  # one sample with every modality, one without
    out = model(ids, labels=ids, **_dummy_media(model, ids))
    assert torch.isfinite(out.loss)
    assert out.logits.shape[-1] == cfg.lm.config["vocab_size"]


def test_full_size_moe_llava_shapes_on_meta():
    cfg = ModelConfig.load(next(p for p in CONFIGS if p.stem == "moe-llava-qwen-1.8b-4e"))
    with torch.device("meta"):
        model = build_model(cfg)
        feats = model.encoders["image"](torch.empty(2, 3, 336, 336))
        tokens, _ = model.connectors["image"](feats)
        ids = torch.tensor([[5, cfg.image_token_id, 6]], device="meta")
    assert feats.shape == (2, 576, 1024)  # ViT-L/14 @ 336: 24 x 24 patches, width 1024
    assert tokens.shape == (2, 576, 2048)
    lm = model.language_model
    assert sorted(lm.moe_layers()) == list(range(0, 24, 2))
    moe = lm.moe_layers()[0]
    assert (moe.router.num_experts, moe.router.top_k) == (4, 2)
    assert tuple(moe.experts.gate_up_proj.shape) == (4, 2 * 5504, 2048)
    assert 3.0e9 < _n_params(model) < 3.7e9  # MoE-LLaVA-Qwen-1.8Bx4: ~3.1B LM + 0.3B CLIP-L
    assert ids.shape == (1, 3)


def test_unknown_keys_are_named_at_every_level():
    base = ModelConfig.load(next(p for p in CONFIGS if p.stem == "tiny-vit-llama-moe")).to_dict()
    with pytest.raises(ValueError, match=r"ModelConfig: unknown config key\(s\) \['encoder'\]"):
        ModelConfig.from_dict({**base, "encoder": {}})
    bad = {**base, "encoders": {"image": {**base["encoders"]["image"], "feature_layr": -2}}}
    with pytest.raises(ValueError, match=r"encoders\.image: EncoderConfig: unknown config key\(s\) \['feature_layr'\]"):
        ModelConfig.from_dict(bad)
    with pytest.raises(ValueError, match=r"moe: MoEConfig: unknown config key\(s\) \['expert'\]"):
        ModelConfig.from_dict({**base, "moe": {"expert": 4}})
    with pytest.raises(ValueError, match=r"moe\.router_options: MoEConfig: router 'topk': TopKOptions: unknown config key\(s\) \['topk'\] \(did you mean 'top_k'\?\)"):
        ModelConfig.from_dict({**base, "moe": {"router_options": {"topk": 2}}})
    with pytest.raises(ValueError, match=r"connectors\.image: connector 'mlp': unknown option\(s\) \['dept'\]; accepted options are \['depth', 'stride'\]"):
        ModelConfig.from_dict({**base, "connectors": {"image": {"kind": "mlp", "options": {"dept": 2}}}})
    with pytest.raises(ValueError, match=r"adapters\[0\]: adapter 'lora': LoRAOptions: unknown config key\(s\) \['rank'\]"):
        ModelConfig.from_dict({**base, "adapters": [{"kind": "lora", "options": {"rank": 4}}]})
    with pytest.raises(ValueError, match=r"unknown encoder 'timmm'; registered encoders: \['open_clip', 'timm', 'whisper'\]"):
        ModelConfig.from_dict({**base, "encoders": {"image": {**base["encoders"]["image"], "kind": "timmm"}}})
    with pytest.raises(ValueError, match=r"unknown modality \['video'\]"):
        ModelConfig.from_dict({**base, "encoders": {"video": base["encoders"]["image"]}})
    with pytest.raises(ValueError, match=r"every encoder needs a connector"):
        ModelConfig.from_dict({**base, "connectors": {}})
    assert isinstance(ModelConfig.from_dict(base).moe, MoEConfig)


def test_placeholder_outside_vocab_is_refused():
    cfg = ModelConfig.load(next(p for p in CONFIGS if p.stem == "tiny-vit-llama-moe"))
    cfg.image_token_id = 5000
    with pytest.raises(ValueError, match=r"<image> token id 5000 is outside the LM vocabulary \(1024\)"):
        build_model(cfg)


RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_with_its_stage_options_checked(path):
    """A shipped recipe parses, names its model, and every stage's kind builds with its options."""
    from zoo.pipelines.stages import RecipeConfig

    recipe = RecipeConfig.load(path)
    assert recipe.name == path.stem and recipe.stages
    names = [s.name for s in recipe.stages]
    assert len(set(names)) == len(names), f"{path.name}: duplicate stage names {names}"
    for stage in recipe.stages:
        stage.stage()  # unknown kind or option: an error naming it
        if stage.start_from:
            assert stage.start_from in names[:names.index(stage.name)], f"{stage.name} starts from a later/unknown stage"
