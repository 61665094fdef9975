"""Turn schema samples into model batches: a weighted mix of task families, indexed by step.

`MixedBatches(i)` is a pure function of the micro-batch index `i` (and the seed), which is what
lets the trainer resume a killed run onto exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

from zoo.models.lm import IGNORE_INDEX
from zoo.pipelines.data.audio import decode_wav
from zoo.pipelines.data.feature_cache import FeatureCache
from zoo.pipelines.data.schema import Sample

_PLACEHOLDER = {"image": "<image>", "audio": "<audio>"}


def prompt_messages(sample: Sample) -> list[dict[str, str]]:
    """The user turn: one placeholder per media item (in order), then the instruction."""
    tags = "".join(_PLACEHOLDER[m.kind] for m in sample.media)
    return [{"role": "user", "content": tags + ("\n" if tags else "") + sample.instruction}]


def answered_text(processor, sample: Sample, prompt: str) -> str:
    """The conversation with the assistant's answer, rendered by the tokenizer's own chat template.

    The template's rendering of the prompt with `add_generation_prompt` must be a prefix of it (the
    loss then masks exactly the prompt); the answer must end with the tokenizer's eos token, which
    generation stops at (appended when the template ends the turn with another token).
    """
    messages = prompt_messages(sample) + [{"role": "assistant", "content": sample.answer}]
    text = processor.apply_chat_template(messages)
    if not text.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently once the assistant's answer follows it, "
                         "so the prompt cannot be masked: use a template whose generation prompt is a prefix")
    eos = processor.tokenizer.eos_token
    return text if eos in text[len(prompt):] else text + eos


def decode_media(kind: str, data: bytes):
    """Media bytes -> what the processor takes: a PIL RGB image, or `(waveform, sampling_rate)`."""
    return Image.open(io.BytesIO(data)).convert("RGB") if kind == "image" else decode_wav(data)


def collate(samples: Sequence[Sample], processor, *, with_answers: bool = True,
            feature_caches: Mapping[str, FeatureCache] | None = None,
            sample_types: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Process samples into one batch; the loss is taken on answer tokens only.

    Args:
        samples: schema samples (any mix of families and media).
        processor: a `zoo.processor.MultimodalProcessor`.
        with_answers: include the answers and `labels` (training); else prompts end with the
            assistant tag, left-padded, for generation.
        feature_caches: modality -> cache of its frozen encoder's features; that modality's
            media then reach the model as `encoder_features` (the encoder never runs twice on
            the same media).
        sample_types: task family -> sample type id; adds `sample_types [B]` (LoRAMoE's
            localized balancing reads them through the routers' context).

    Returns:
        `input_ids`, `attention_mask` `[B, S]`, `labels` `[B, S]` (IGNORE_INDEX on prompt and padding),
        and `images [n, 3, H, W]` / `audio [n, mels, frames]` (or `encoder_features`) when any
        sample has them.
    """
    prompts = [processor.apply_chat_template(prompt_messages(s), add_generation_prompt=True) for s in samples]
    texts = [answered_text(processor, s, p) for p, s in zip(prompts, samples)] if with_answers else prompts
    items = {k: [m.data for s in samples for m in s.media if m.kind == k] for k in _PLACEHOLDER}
    cached = {k: c for k, c in (feature_caches or {}).items() if items.get(k)}
    # cached modalities are never decoded: their features come from the cache below
    images = [decode_media("image", b) for b in items["image"]] if "image" not in cached else None
    audio = [decode_media("audio", b) for b in items["audio"]] if "audio" not in cached else None
    batch = processor(texts, images=images or None, audio=audio or None, padding_side="right" if with_answers else "left",
                      precomputed=tuple(cached))
    if with_answers:
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        for row, prompt in enumerate(prompts):
            ids = processor.tokenizer(prompt)["input_ids"]
            if batch["input_ids"][row, : len(ids)].tolist() != ids:
                raise ValueError(f"sample {samples[row].id!r}: the prompt's tokens are not a prefix of the answered "
                                 "conversation's tokens, so the prompt cannot be masked (a token merges across the "
                                 "assistant turn's start)")
            labels[row, : len(ids)] = IGNORE_INDEX
        batch["labels"] = labels
    if cached:
        batch["encoder_features"] = {k: torch.stack(c.encode(items[k])) for k, c in cached.items()}
    if sample_types is not None:
        missing = sorted({s.task_family for s in samples} - set(sample_types))
        if missing:
            raise ValueError(f"sample_types has no type for task famil{'y' if len(missing) == 1 else 'ies'} {missing}")
        batch["sample_types"] = torch.tensor([sample_types[s.task_family] for s in samples])
    return batch


def frozen_encoder_caches(model, processor, cache_dir: str | Path) -> dict[str, FeatureCache]:
    """A feature cache for each encoder the model keeps frozen (eval mode, no gradient).

    The cache key names the encoder class and a sha256 of its weights, so a different or retrained
    encoder never reads another's features, and the device (with torch's thread count on CPU),
    which set the float reduction order: features computed at 2 threads differ in the last bits
    from features computed at 1 (tiny zoo ViT: up to 4e-5), so a run at 1 thread must not read
    them, or its result would depend on which run warmed the store.
    """
    caches = {}
    for modality, encoder in model.encoders.items():
        if f"encoders.{modality}" not in model.frozen or any(p.requires_grad for p in encoder.parameters()):
            continue
        digest = hashlib.sha256()
        for name, tensor in sorted(encoder.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())  # 0-dim too
        proc = processor.image_processor if modality == "image" else processor.audio_processor
        device = next(iter(encoder.parameters()), torch.empty(0)).device
        numerics = f"cpu-t{torch.get_num_threads()}" if device.type == "cpu" else str(device.type)

        def run(items, encoder=encoder, proc=proc, modality=modality):
            return encoder(proc([decode_media(modality, b) for b in items]))

        caches[modality] = FeatureCache(cache_dir, f"{modality}-{type(encoder).__name__}-{digest.hexdigest()[:16]}-{numerics}", run)
    return caches


class MixedBatches:
    """Batches drawn from task families with given weights, deterministic in (seed, index).

    With `group_by_length = n >= 2`, micro-batches come in blocks of n: block `i // n` draws the
    samples of n micro-batches at once (from the seed and the block index), sorts them by media
    (kind and count) and then by text length, cuts them into n micro-batches of neighbours, and
    shuffles the order of those n (LLaVA's `group_by_modality_length`, with mega-batches of n).
    Padding shrinks; the mix over a block is the same as without grouping, and micro-batch `i` is
    still a pure function of (seed, i), so a resumed run sees the same batches.

    Args:
        datasets: task family -> training samples.
        weights: task family -> sampling weight (families not listed are not drawn).
        processor: a `MultimodalProcessor`.
        batch_size: samples per micro-batch.
        seed: base seed.
        feature_caches: see `collate`.
        sample_types: see `collate`.
        group_by_length: micro-batches per length-sorted block; 0 or 1: no grouping.
    """

    def __init__(self, datasets: Mapping[str, Sequence[Sample]], weights: Mapping[str, float], processor,
                 batch_size: int, seed: int = 0, feature_caches: Mapping[str, FeatureCache] | None = None,
                 sample_types: Mapping[str, int] | None = None, group_by_length: int = 0) -> None:
        if group_by_length < 0:
            raise ValueError(f"group_by_length must be >= 0 (0: no grouping), got {group_by_length}")
        self.group_by_length = group_by_length
        self._lengths: dict[tuple[str, str], int] = {}
        self._block: tuple[int, list[list[Sample]]] | None = None
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
        self.feature_caches = dict(feature_caches or {})
        self.sample_types = dict(sample_types) if sample_types is not None else None

    def _draw(self, g: torch.Generator, n: int) -> list[Sample]:
        fams = torch.multinomial(self.weights, n, replacement=True, generator=g).tolist()
        out = []
        for f in fams:
            data = self.datasets[self.families[f]]
            out.append(data[int(torch.randint(len(data), (1,), generator=g))])
        return out

    def samples_at(self, index: int) -> list[Sample]:
        if self.group_by_length < 2:
            return self._draw(torch.Generator().manual_seed(self.seed * 1_000_003 + index), self.batch_size)
        block, position = divmod(index, self.group_by_length)
        if self._block is None or self._block[0] != block:  # one block at a time: the trainer walks indices in order
            self._block = (block, self._grouped(block))
        return list(self._block[1][position])

    def length_key(self, sample: Sample) -> tuple:
        """What length grouping sorts by: the media (kind, count) pairs, then the instruction and answer tokens
        (the chat template adds the same tokens to every sample)."""
        media = tuple(sorted(Counter(m.kind for m in sample.media).items()))
        key = (sample.task_family, sample.key)
        if key not in self._lengths:
            tokenize = self.processor.tokenizer
            self._lengths[key] = sum(len(tokenize(t, add_special_tokens=False)["input_ids"])
                                     for t in (sample.instruction, sample.answer) if t)
        return media, self._lengths[key]

    def _grouped(self, block: int) -> list[list[Sample]]:
        """Block `block`'s micro-batches: drawn together, sorted by `length_key`, cut, shuffled."""
        n, size = self.group_by_length, self.batch_size
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + block + (1 << 40))  # not a plain index's draw
        samples = self._draw(g, n * size)
        order = sorted(range(len(samples)), key=lambda i: (self.length_key(samples[i]), i))
        batches = [[samples[i] for i in order[k * size : (k + 1) * size]] for k in range(n)]
        return [batches[k] for k in torch.randperm(n, generator=g).tolist()]

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        return collate(self.samples_at(index), self.processor, feature_caches=self.feature_caches,
                       sample_types=self.sample_types)
