"""One call from raw text, images and audio to a model-ready batch.

    processor = MultimodalProcessor.from_model(model, tokenizer)
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>What is this?"}],
                                           add_generation_prompt=True)
    batch = processor(text=[prompt], images=[photo])  # input_ids, attention_mask, images
    model.generate(**batch, max_new_tokens=8)

Media are listed flat, in the order their placeholders appear over the batch (as the model takes them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from zoo.encoders.processing import AudioProcessor, ImageProcessor
from zoo.models.lm import IGNORE_INDEX
from zoo.tokenizer import AUDIO, IMAGE, load_tokenizer


class MultimodalProcessor:
    """Tokenizer + image processor + audio processor.

    Args:
        tokenizer: a `PreTrainedTokenizerFast` with `<image>`/`<audio>` special tokens
            (`zoo.tokenizer.train_tokenizer`, or a pretrained LM's with them added:
            `zoo.models.pretrained`).
        image_processor: None if the model takes no images.
        audio_processor: None if the model takes no audio.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: ImageProcessor | None = None,
        audio_processor: AudioProcessor | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.audio_processor = audio_processor
        vocab = tokenizer.get_vocab()  # a pretrained LM's tokenizer has only the placeholders its model needs
        self.image_token_id = vocab.get(IMAGE)
        self.audio_token_id = vocab.get(AUDIO)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any) -> MultimodalProcessor:
        """Processors matching a `MultimodalMoE`'s encoders (image size, mean/std, mel bins, frames)."""
        enc = model.encoders
        image = ImageProcessor.from_encoder(enc["image"]) if "image" in enc else None
        audio = AudioProcessor.from_encoder(enc["audio"]) if "audio" in enc else None
        for modality, token_id in model.placeholder_ids.items():
            expected = tokenizer.convert_tokens_to_ids(IMAGE if modality == "image" else AUDIO)
            if expected != token_id:
                raise ValueError(
                    f"MultimodalProcessor: the tokenizer's <{modality}> id is {expected} but the model expects {token_id}"
                )
        return cls(tokenizer, image, audio)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """Render `[{"role": "system" | "user" | "assistant", "content": ...}, ...]` as prompt text."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def __call__(
        self,
        text: str | Sequence[str],
        images: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
        *,
        return_labels: bool = False,
        padding_side: str = "right",
        precomputed: Sequence[str] = (),
    ) -> dict[str, torch.Tensor]:
        """Tokenize, pad and process media.

        Args:
            text: one string or a batch; `<image>` / `<audio>` mark where each media item goes.
            images: PIL images / `[H, W, C]` arrays / `[C, H, W]` tensors, flat over the batch.
            audio: `(waveform, sampling_rate)` pairs (or waveforms at the processor's rate), flat.
            return_labels: add `labels` = input_ids with padding set to -100.
            padding_side: "right" (training) or "left".
            precomputed: modalities ("image", "audio") whose media reach the model separately,
                as `encoder_features`: their placeholders are kept and no media are expected.

        Returns:
            `input_ids [B, S]`, `attention_mask [B, S]`, and `images [n, 3, H, W]` /
            `audio [n, n_mels, frames]` when given (and `labels [B, S]` if asked).
        """
        texts = [text] if isinstance(text, str) else list(text)
        enc = self.tokenizer(texts, padding=True, padding_side=padding_side, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        for modality, name, items, proc, token_id in (
            ("image", "images", images, self.image_processor, self.image_token_id),
            ("audio", "audio", audio, self.audio_processor, self.audio_token_id),
        ):
            if modality in precomputed:
                if items is not None:
                    raise ValueError(f"MultimodalProcessor: {name} given for a modality marked precomputed")
                continue
            count = int((batch["input_ids"] == token_id).sum()) if token_id is not None else 0
            n = len(items) if items is not None else 0
            if n and proc is None:
                raise ValueError(f"MultimodalProcessor: {name} given but this processor has no {name} processor")
            if count != n:
                token = IMAGE if name == "images" else AUDIO
                raise ValueError(f"MultimodalProcessor: the text holds {count} {token} placeholder(s) but {n} {name} were given")
            if n:
                batch[name] = proc(items)
        if return_labels:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        return batch

    def save_pretrained(self, path: str | Path) -> None:
        """Write the tokenizer and `processor.json` (image/audio processor settings)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        settings = {
            "image": None if self.image_processor is None else vars(self.image_processor) | {},
            "audio": None if self.audio_processor is None else vars(self.audio_processor) | {},
        }
        (path / "processor.json").write_text(json.dumps(settings, indent=2, default=list))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MultimodalProcessor:
        """Load what `save_pretrained` wrote (offline)."""
        path = Path(path)
        settings = json.loads((path / "processor.json").read_text())
        image = ImageProcessor(**settings["image"]) if settings["image"] else None
        audio = AudioProcessor(**settings["audio"]) if settings["audio"] else None
        return cls(load_tokenizer(path), image, audio)


__all__ = ["MultimodalProcessor"]
