"""Frozen-encoder features from the cache reach the model exactly as if the encoder had run."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.models import ModelConfig
from zoo.models import build_model
from zoo.pipelines.collate import collate, frozen_encoder_caches
from zoo.pipelines.data.audio import encode_wav
from zoo.pipelines.data.schema import Media, Sample
from zoo.processor import MultimodalProcessor
from zoo.tokenizer import train_tokenizer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "models" / "micro-zoo.yaml"


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), color).save(buf, format="PNG")
    return Media("image", buf.getvalue())


def _wav(freq):
    t = np.arange(8000) / 16000
    return Media("audio", encode_wav((0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model(ModelConfig.load(str(CONFIG)))  # both encoders frozen in this config
    tok = train_tokenizer(["What is shown?", "Transcribe the audio.", "a red square", "hello"] * 10, vocab_size=300)
    processor = MultimodalProcessor.from_model(model, tok)
    red, blue, tone = _png((200, 10, 10)), _png((10, 10, 200)), _wav(440)
    samples = [Sample("a", "vqa", "train", "What is shown?", "a red square", (red,)),
               Sample("b", "asr", "train", "Transcribe the audio.", "hello", (tone,)),
               Sample("c", "vqa", "train", "What is shown?", "a red square", (red, blue))]
    return model, processor, samples


def test_cached_features_give_the_same_loss_and_the_encoder_runs_once_per_image(setup, tmp_path):
    model, processor, samples = setup
    model.train()
    model.encoders["image"].register_buffer("num_batches_tracked", torch.tensor(7))  # 0-dim, as BatchNorm's
    caches = frozen_encoder_caches(model, processor, tmp_path)
    assert set(caches) == {"image", "audio"}
    plain = collate(samples, processor)
    cached = collate(samples, processor, feature_caches=caches)
    assert "images" not in cached and set(cached["encoder_features"]) == {"image", "audio"}
    torch.testing.assert_close(model(**cached).loss, model(**plain).loss, rtol=1e-6, atol=1e-6)
    assert caches["image"].misses == 2  # red twice, blue once: two unique images
    collate(samples, processor, feature_caches=caches)
    assert caches["image"].misses == 2 and caches["image"].hits >= 3


def test_trainable_encoders_get_no_cache_and_refuse_precomputed_features(setup, tmp_path):
    model, processor, samples = setup
    cached = collate(samples[:1], processor, feature_caches=frozen_encoder_caches(model, processor, tmp_path))
    model.encoders["image"].requires_grad_(True)
    try:
        assert "image" not in frozen_encoder_caches(model, processor, tmp_path)
        with pytest.raises(ValueError, match="image encoder is trainable: precomputed features would cut its gradient"):
            model(**cached)
    finally:
        model.encoders["image"].requires_grad_(False)
    plain = collate(samples[:1], processor)
    with pytest.raises(ValueError, match=r"both images and encoder_features\['image'\] were given"):
        model(**plain, encoder_features=cached["encoder_features"])
