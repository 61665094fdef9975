"""MultimodalMoE: splicing, text-only equivalence, freezing, generation, overfitting, input errors."""

from pathlib import Path

import pytest
import torch

from zoo.models import ModelConfig
from zoo.models.lm import MoECausalLM
from zoo.models import IGNORE_INDEX, build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
IMG, AUD = 3, 4


def _model(name="tiny-vit-llama-moe"):
    return build_model(ModelConfig.load(CONFIGS / f"{name}.yaml")).eval()


def _hand_spliced(model, ids, images):
    """One sample's embedding sequence built by hand: text embeddings, each <image> -> its tokens."""
    emb = model.hf_model.get_input_embeddings()
    parts, k = [], 0
    for t in ids.tolist():
        if t == IMG:
            parts.append(model.connectors["image"](model.encoders["image"](images[k : k + 1]))[0][0])
            k += 1
        else:
            parts.append(emb(torch.tensor([t])))
    return torch.cat(parts)


def test_splice_matches_hand_built_sequence_and_masks_labels():
    model = _model()
    ids = torch.tensor([[10, IMG, 11, 12, IMG, 13], [20, 21, 22, 0, 0, 0], [IMG, 30, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    images = torch.randn(3, 3, 32, 32)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    with torch.no_grad():
        s = model.splice(ids, mask, images=images, labels=labels)
        refs = [
            _hand_spliced(model, ids[0], images[0:2]),
            _hand_spliced(model, ids[1, :3], images[:0]),
            _hand_spliced(model, ids[2, :2], images[2:3]),
        ]
    n_img = 16  # 32 px / 8 px patches
    assert [len(r) for r in refs] == [4 + 2 * n_img, 3, 1 + n_img]
    assert s.inputs_embeds.shape == (3, 4 + 2 * n_img, 64)
    for b, ref in enumerate(refs):
        torch.testing.assert_close(s.inputs_embeds[b, : len(ref)], ref)
        assert s.attention_mask[b].tolist() == [1] * len(ref) + [0] * (s.inputs_embeds.shape[1] - len(ref))
        assert (s.inputs_embeds[b, len(ref) :] == 0).all()
    want0 = [10] + [IGNORE_INDEX] * n_img + [11, 12] + [IGNORE_INDEX] * n_img + [13]
    assert s.labels[0].tolist() == want0
    assert s.labels[1, :3].tolist() == [20, 21, 22] and (s.labels[1, 3:] == IGNORE_INDEX).all()
    assert s.labels[2, : 1 + n_img].tolist() == [IGNORE_INDEX] * n_img + [30]
    assert s.media_mask.sum().item() == 3 * n_img
    # Left padding (generation) puts the same sequences at the end.
    left = model.splice(ids, mask, images=images, padding_side="left")
    for b, ref in enumerate(refs):
        torch.testing.assert_close(left.inputs_embeds[b, left.inputs_embeds.shape[1] - len(ref) :], ref)


def test_forward_logits_equal_lm_on_hand_built_embeddings():
    model = _model()
    ids = torch.tensor([[10, IMG, 11, 12]])
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model(ids, images=images)
        ref = model.language_model(inputs_embeds=_hand_spliced(model, ids[0], images)[None]).logits
    torch.testing.assert_close(out.logits, ref)


@pytest.mark.parametrize("name", ["tiny-vit-llama-moe", "tiny-efficientnet-llama-dense"])
def test_sample_without_media_equals_text_only_lm(name):
    model = _model(name)
    side = model.encoders["image"].image_size
    ids = torch.tensor([[10, IMG, 11, 12, 13], [40, 41, 42, 43, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        out = model(ids, mask, images=torch.randn(1, 3, *side))
        ref = model.language_model(input_ids=ids[1:, :4]).logits
    assert isinstance(model.language_model, MoECausalLM) == (name == "tiny-vit-llama-moe")
    torch.testing.assert_close(out.logits[1, :4], ref[0], atol=1e-5, rtol=1e-5)


def test_frozen_encoders_get_no_gradient_and_the_rest_does():
    model = _model("tiny-clip-whisper-qwen2-moe").train()
    assert model.frozen == {"encoders.image", "encoders.audio"}
    ids = torch.tensor([[10, IMG, 11, AUD, 12], [IMG, 13, 14, 15, 16]])
    images, audio = torch.randn(2, 3, 32, 32), torch.randn(1, 16, 32)
    out = model(ids, images=images, audio=audio, labels=ids)
    out.loss.backward()
    enc_params = list(model.encoders.parameters())
    assert enc_params and all(not p.requires_grad and p.grad is None for p in enc_params)
    assert not any(m.training for enc in model.encoders.values() for m in enc.modules())  # frozen: eval mode
    for name, p in model.connectors.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.hf_model.get_input_embeddings().weight.grad is not None
    # The loss adds the LM's MoE aux loss and the MoE connector's balance loss.
    coef = model.language_model.moe_config.loss_coef("balance")
    torch.testing.assert_close(out.aux_loss, coef * out.aux_losses["balance"] + 0.0 * out.aux_losses["z"])
    expected = out.lm_loss + coef * out.aux_losses["balance"] + model.connector_aux_coef * out.connector_aux_loss
    torch.testing.assert_close(out.loss, expected)
    assert out.connector_aux_loss > 0 and len(out.routing) == 2


def test_generate_with_media_equals_greedy_forward_loop():
    model = _model()
    ids = torch.tensor([[10, IMG, 11, 12]])
    images = torch.randn(1, 3, 32, 32)
    gen = model.generate(ids, images=images, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    cur = ids
    with torch.no_grad():
        for _ in range(4):
            nxt = model(cur, images=images).logits[:, -1].argmax(-1, keepdim=True)
            cur = torch.cat([cur, nxt], dim=1)
    assert gen.tolist() == cur[:, 4:].tolist()
    # Batched (left-padded after splicing) generation matches one sample at a time.
    batch = torch.tensor([[10, IMG, 11, 12], [IMG, 50, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    imgs = torch.randn(2, 3, 32, 32)
    both = model.generate(batch, mask, images=imgs, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    one = model.generate(batch[1:, :2], images=imgs[1:], max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert both[1].tolist() == one[0].tolist()


def test_bad_inputs_name_the_cause():
    model = _model()
    ids = torch.tensor([[10, IMG, 11, IMG]])
    with pytest.raises(ValueError, match=r"more placeholders than images.*2 <image> placeholder.*1 images"):
        model(ids, images=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"fewer placeholders than images"):
        model(ids[:, :2], images=torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"wrong image size \(48, 48\).*expects \(32, 32\)"):
        model(ids[:, :2], images=torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"audio clips were given but this model has no audio encoder"):
        model(ids[:, :2], images=torch.randn(1, 3, 32, 32), audio=torch.randn(1, 80, 3000))


def test_tiny_model_overfits_image_caption_pairs():
    """Four synthetic images with distinct captions: loss collapses and greedy decoding recalls each caption."""
    model = _model().train()
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    captions = torch.randint(8, 1000, (4, 6))
    ids = torch.cat([torch.full((4, 1), IMG), captions, torch.full((4, 1), 2)], dim=1)  # <image> caption </s>
    labels = ids.clone()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(50):
        loss = model(ids, images=images, labels=labels).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = model(ids, images=images, labels=labels).lm_loss.item()
    assert final < 0.05 * first, (first, final)
    for i in range(4):
        out = model.generate(ids[i : i + 1, :1], images=images[i : i + 1], max_new_tokens=6, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        assert out[0].tolist() == captions[i].tolist()
