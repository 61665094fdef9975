"""MoE inside the vision encoder (CLIP-MoE): features equal at init, routing and losses reach the model."""

import copy

import pytest
import torch

from zoo.encoders.vision import OpenClipVisionEncoder, TimmVisionEncoder
from zoo.models.builders import build_model
from zoo.models.config import ModelConfig
from zoo.moe.experts import MLPExperts
from zoo.pipelines.routing_plot import expert_load_by_family, plot_expert_load
from zoo.transforms.upcycle import upcycle_encoder

TOWERS = {
    "timm": lambda: TimmVisionEncoder("vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=2, patch_size=8,
                                      image_size=32),
    "open_clip": lambda: OpenClipVisionEncoder(vision_cfg={"layers": 2, "width": 32, "head_width": 16, "patch_size": 8,
                                                           "image_size": 32}, feature_layer=-1),
}


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_upcycled_tower_gives_the_dense_features_at_init_and_diverges_when_trained(tower):
    torch.manual_seed(0)
    enc = TOWERS[tower]().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = enc(images)
    dense = copy.deepcopy(enc)
    cfg = upcycle_encoder(enc, num_experts=4, router_options={"top_k": 2}, layers=[1])
    assert (cfg.experts, cfg.experts_options) == ("mlp", {"activation": "gelu", "bias": True})
    moes = [m for m in enc.modules() if isinstance(m, MLPExperts)]
    assert len(moes) == 1
    with torch.no_grad():
        torch.testing.assert_close(enc(images), ref, rtol=1e-5, atol=1e-5)
    noisy = copy.deepcopy(dense)
    upcycle_encoder(noisy, num_experts=4, router_options={"top_k": 2}, method="noisy", method_options={"scale": 0.1})
    with torch.no_grad():
        assert not torch.allclose(noisy(images), ref, atol=1e-4)
    with pytest.raises(ValueError, match="already has MoE layers"):
        upcycle_encoder(enc, num_experts=2, router_options={"top_k": 1})
    with pytest.raises(ValueError, match="has no list of blocks with an `mlp`"):
        upcycle_encoder(torch.nn.Linear(3, 3), num_experts=2, router_options={"top_k": 1})


def _micro_cfg(**image_moe):
    return ModelConfig.from_dict({
        "lm": {"model_type": "llama", "config": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                                                 "num_hidden_layers": 2, "num_attention_heads": 4,
                                                 "num_key_value_heads": 2, "pad_token_id": 0}},
        "encoders": {"image": {"kind": "timm", "name": "vit_tiny_patch16_224", "image_size": 32, "freeze": False,
                               "options": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
                               **image_moe}},
        "connectors": {"image": {"kind": "mlp", "options": {"depth": 2}}},
    })


def _batch():
    ids = torch.tensor([[1, 3, 5, 6, 7], [1, 3, 8, 9, 0]])
    return dict(input_ids=ids, attention_mask=(ids != 0).long(), images=torch.randn(2, 3, 32, 32), labels=ids)


def test_encoder_moe_in_the_model_config_trains_with_its_router_losses_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = build_model(_micro_cfg(moe={"num_experts": 4, "router_options": {"top_k": 2}, "layers": "all",
                                        "loss_coefs": {"balance": 0.5}}))
    batch = _batch()
    out = model(**batch)
    assert sorted(out.encoder_routing) == ["image"] and len(out.encoder_routing["image"]) == 2
    assert out.encoder_aux_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + model.connector_aux_coef * out.connector_aux_loss
                               + out.encoder_aux_loss)  # a dense LM: no LM aux loss
    out.loss.backward()
    router = next(m.router for m in model.encoders["image"].modules() if hasattr(m, "router"))
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    state = copy.deepcopy(model.state_dict())
    rebuilt = build_model(_micro_cfg(moe={"num_experts": 4, "router_options": {"top_k": 2}, "layers": "all",
                                          "loss_coefs": {"balance": 0.5}}))
    rebuilt.load_state_dict(state)  # strict: the config alone rebuilds the structure
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(**batch).logits, model(**batch).logits)


def test_encoder_moe_blocks_appear_in_the_expert_load_plot(tmp_path, monkeypatch):
    import zoo.pipelines.routing_plot as rp

    model = build_model(_micro_cfg(moe={"num_experts": 4, "router_options": {"top_k": 1}, "layers": [1]}))
    monkeypatch.setattr(rp, "collate", lambda samples, processor: _batch())
    loads = expert_load_by_family(model, None, {"vqa": [0, 1]}, samples=2)
    assert list(loads["vqa"]) == ["image encoder 1"]
    assert sum(loads["vqa"]["image encoder 1"]) == pytest.approx(1.0)
    assert plot_expert_load(loads, tmp_path / "load.png").exists()


def test_encoder_moe_config_errors_name_the_cause():
    with pytest.raises(ValueError, match="unknown upcycler 'nope'|upcycler 'nope'"):
        _micro_cfg(moe={"num_experts": 2, "router_options": {"top_k": 1}}, upcycler="nope")
    with pytest.raises(ValueError, match="layer indices \\[5\\] out of range for a model with 2 layers"):
        build_model(_micro_cfg(moe={"num_experts": 2, "router_options": {"top_k": 1}, "layers": [5]}))
