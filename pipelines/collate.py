"""Turn schema samples into model batches: a weighted mix of task families, indexed by step.

`MixedBatches(i)` is a pure function of the micro-batch index `i` (and the seed), which is what
lets the trainer resume a killed run onto exactly the batches it would have seen.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import torch
from PIL import Image

from zoo.pipelines.data.audio import decode_wav
from zoo.pipelines.data.schema import Sample

_PLACEHOLDER = {"image": "<image>", "audio": "<audio>"}


def prompt_messages(sample: Sample) -> list[dict[str, str]]:
    """The user turn: one placeholder per media item (in order), then the instruction."""
    tags = "".join(_PLACEHOLDER[m.kind] for m in sample.media)
    return [{"role": "user", "content": tags + ("\n" if tags else "") + sample.instruction}]


def collate(samples: Sequence[Sample], processor, *, with_answers: bool = True) -> dict[str, torch.Tensor]:
    """Process samples into one batch; the loss is taken on answer tokens only.

    Args:
        samples: schema samples (any mix of families and media).
        processor: a `zoo.processor.MultimodalProcessor`.
        with_answers: include the answers and `labels` (training); else prompts end with the
            assistant tag, left-padded, for generation.

    Returns:
        `input_ids`, `attention_mask` `[B, S]`, `labels` `[B, S]` (-100 on prompt and padding),
        and `images [n, 3, H, W]` / `audio [n, mels, frames]` when any sample has them.
    """
    prompts = [processor.apply_chat_template(prompt_messages(s), add_generation_prompt=True) for s in samples]
    texts = [p + s.answer + processor.tokenizer.eos_token + "\n" for p, s in zip(prompts, samples)] if with_answers else prompts
    images = [Image.open(io.BytesIO(m.data)).convert("RGB") for s in samples for m in s.media if m.kind == "image"]
    audio = [decode_wav(m.data) for s in samples for m in s.media if m.kind == "audio"]
    batch = processor(texts, images=images or None, audio=audio or None, padding_side="right" if with_answers else "left")
    if with_answers:
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for row, prompt in enumerate(prompts):
            labels[row, : len(processor.tokenizer(prompt)["input_ids"])] = -100
        batch["labels"] = labels
    return batch


class MixedBatches:
    """Batches drawn from task families with given weights, deterministic in (seed, index).

    Args:
        datasets: task family -> training samples.
        weights: task family -> sampling weight (families not listed are not drawn).
        processor: a `MultimodalProcessor`.
        batch_size: samples per micro-batch.
        seed: base seed.
    """

    def __init__(self, datasets: Mapping[str, Sequence[Sample]], weights: Mapping[str, float], processor,
                 batch_size: int, seed: int = 0) -> None:
        missing = sorted(f for f in weights if not datasets.get(f))
        if missing:
            raise ValueError(f"no training samples for task famil{'y' if len(missing) == 1 else 'ies'} {missing}; "
                             f"available: {sorted(f for f in datasets if datasets[f])}")
        self.families = sorted(weights)
        self.datasets = {f: list(datasets[f]) for f in self.families}
        self.weights = torch.tensor([float(weights[f]) for f in self.families])
        if (self.weights <= 0).any():
            raise ValueError(f"data mix weights must be positive, got {dict(weights)}")
        self.processor = processor
        self.batch_size = batch_size
        self.seed = seed

    def samples_at(self, index: int) -> list[Sample]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        fams = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g).tolist()
        out = []
        for f in fams:
            data = self.datasets[self.families[f]]
            out.append(data[int(torch.randint(len(data), (1,), generator=g))])
        return out

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        return collate(self.samples_at(index), self.processor)
