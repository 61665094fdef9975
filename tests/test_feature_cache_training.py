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
from zoo.pipelines.data.feature_cache import FeatureCache
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


def _random_pngs(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def test_a_hit_gives_the_bits_of_a_miss_whatever_batch_the_item_came_in(tmp_path):
    """Features must be a function of the item alone. Encoded in a batch, an image's features
    depend on how many came with it (a convolution's reduction order; ~1e-5 here), so a stage
    would train differently on a cache another run had warmed with other batches."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0).eval()  # the tiny zoo's image tower

    def encoder(items):
        pixels = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB").resize((64, 64))))
                              .permute(2, 0, 1).float() / 255 for b in items])
        return net.forward_features(pixels)

    images = _random_pngs(8)
    with torch.no_grad():
        alone = [encoder([b])[0] for b in images]
        assert not torch.equal(encoder(images)[3], alone[3])  # the hazard is real for this encoder
    cold = FeatureCache(tmp_path / "a", "effnet@v1", encoder).encode(images)  # 8 misses in one call
    FeatureCache(tmp_path / "b", "effnet@v1", encoder).fill(images[::-1], quiet=True)
    warm = FeatureCache(tmp_path / "b", "effnet@v1", encoder)  # a new process: every item from disk
    got = warm.encode(images)
    assert warm.misses == 0
    for a, c, w in zip(alone, cold, got):
        assert torch.equal(c, a) and torch.equal(w, a)


def test_the_cache_key_names_the_thread_count(setup, tmp_path):
    model, processor, _ = setup
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = frozen_encoder_caches(model, processor, tmp_path)["image"].encoder_key
        torch.set_num_threads(2)
        two = frozen_encoder_caches(model, processor, tmp_path)["image"].encoder_key
    finally:
        torch.set_num_threads(threads)
    assert one.endswith("-cpu-t1") and two.endswith("-cpu-t2") and one[:-1] == two[:-1]
