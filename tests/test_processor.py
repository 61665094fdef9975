"""Tokenizer (trained here), chat template and the one-call multimodal processor."""

from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.models import ModelConfig
from zoo.models import build_model
from zoo.processor import MultimodalProcessor
from zoo.tokenizer import SPECIAL_TOKENS, build_corpus, train_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(build_corpus(max_synsets=4000), vocab_size=1024)


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig.load(CONFIGS / "tiny-clip-whisper-qwen2-moe.yaml")).eval()


def test_tokenizer_special_ids_and_round_trip(tokenizer):
    cfg = ModelConfig()
    assert tokenizer.convert_tokens_to_ids("<image>") == cfg.image_token_id == 3
    assert tokenizer.convert_tokens_to_ids("<audio>") == cfg.audio_token_id == 4
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert len(tokenizer) == 1024 and tokenizer.pad_token_id == 0
    text = "<image> A tabby cat sits on a mat; naïve café ☕ 123."
    ids = tokenizer(text).input_ids
    assert ids[0] == 3 and ids.count(3) == 1
    assert tokenizer.decode(ids) == text  # byte-level: lossless on any text
    plain = "a photo of the dog and a small bird"
    assert len(tokenizer(plain).input_ids) < len(plain) / 2.5  # it learned English merges


def test_chat_template(tokenizer):
    proc = MultimodalProcessor(tokenizer)
    msgs = [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "A cat."}]
    assert proc.apply_chat_template(msgs) == "<|user|>\n<image>What is this?</s>\n<|assistant|>\nA cat.</s>\n"
    assert proc.apply_chat_template(msgs[:1], add_generation_prompt=True).endswith("</s>\n<|assistant|>\n")
    with pytest.raises(Exception, match="unknown chat role"):
        proc.apply_chat_template([{"role": "robot", "content": "hi"}])


def test_processor_batch_feeds_the_model(tokenizer, model):
    proc = MultimodalProcessor.from_model(model, tokenizer)
    texts = ["<image> a red square <audio> a beep", "no media here", "<image><image> two photos"]
    images = [np.full((40, 60, 3), 200, np.uint8), np.zeros((32, 32, 3), np.uint8), torch.rand(3, 50, 50)]
    audio = [(np.sin(np.arange(4000) / 5).astype(np.float32), 8000)]
    batch = proc(text=texts, images=images, audio=audio, return_labels=True)
    assert batch["images"].shape == (3, 3, 32, 32)
    assert batch["audio"].shape == (1, 16, 32)
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape == (3, int(lengths.max()))
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["input_ids"][1, lengths[1] :] == tokenizer.pad_token_id).all()
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)
    # 2 images and 1 clip spliced: image tokens (16 patches each) + 4 resampler queries replace 4 placeholders.
    assert out.attention_mask[0].sum() == lengths[0] - 2 + 16 + 4
    assert out.attention_mask[2].sum() == lengths[2] - 2 + 32


def test_processor_errors_name_the_cause(tokenizer, model):
    proc = MultimodalProcessor.from_model(model, tokenizer)
    with pytest.raises(ValueError, match=r"holds 2 <image> placeholder\(s\) but 1 images"):
        proc(text="<image><image>", images=[np.zeros((8, 8, 3), np.uint8)])
    text_only = MultimodalProcessor(tokenizer)
    with pytest.raises(ValueError, match=r"audio given but this processor has no audio processor"):
        text_only(text="<audio>", audio=[np.zeros(100, np.float32)])


def test_processor_save_and_load(tokenizer, model, tmp_path):
    proc = MultimodalProcessor.from_model(model, tokenizer)
    proc.save_pretrained(tmp_path)
    again = MultimodalProcessor.from_pretrained(tmp_path)
    texts = ["<image> hello <audio>"]
    images, audio = [np.random.default_rng(0).integers(0, 255, (30, 30, 3), dtype=np.uint8)], [np.ones(3000, np.float32)]
    a, b = proc(texts, images, audio), again(texts, images, audio)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert again.tokenizer.chat_template == tokenizer.chat_template
