"""What both harness adapters share: load a zoo model by name, score token sequences, generate with media.

No harness is imported here: the adapters (`lm_eval_model`, `lmms_eval_model`) turn their requests
into these calls.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo.pipelines.harness import HarnessError
from zoo.tokenizer import AUDIO, IMAGE

# What a harness passes for generation that we honour; anything else is named in the error.
GREEDY_KEYS = ("until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_beams")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav",)
_MODALITY_WORDS = {"image": ("images", "image encoder"), "audio": ("audio", "audio tower")}


def load_zoo_model(name: str, *, device: str = "cpu", dtype: str | torch.dtype | None = None,
                   cards_dir: str | os.PathLike | None = None):
    """`(model, processor, label)` for a checkpoint directory or a card `NAME[@VERSION]` (what `zoo load` takes).

    Raises:
        HarnessError: `name` is neither a directory nor a card (the known cards are named).
    """
    from zoo.catalog.cards import Catalog, CatalogError
    from zoo.catalog.load import load_card, load_directory
    from zoo.cli import local_dir
    from zoo.errors import check_device

    if not name:
        raise HarnessError("zoo: no model given: pass --model_args name=<card name or checkpoint directory>")
    if isinstance(dtype, str):
        if dtype in ("auto", ""):
            dtype = None
        elif not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise HarnessError(f"zoo: unknown dtype {dtype!r}; use float32, bfloat16, float16 or float64")
        else:
            dtype = getattr(torch, dtype)
    path = local_dir(name, None, cards_dir)
    card = None
    if path is None:
        try:
            card = Catalog.from_dir(cards_dir).get(name)
        except CatalogError as e:
            raise HarnessError(f"zoo: unknown zoo model {name!r} in --model_args name=...: not a checkpoint directory, "
                               f"and {e}") from None
    device = harness_device(device)
    check_device(device)
    if card is None:
        model, processor, _ = load_directory(path, device=device, dtype=dtype)
        return model, processor, str(path)
    model, processor, _, _ = load_card(card, device=device, dtype=dtype)
    return model, processor, card.ref


def harness_device(device: str | None) -> str:
    """The device to load on: as lm-eval's `hf` model does, a CUDA device on a machine without CUDA
    (lm-eval's own default is "cuda:0") falls back to the CPU with a warning; any other device is
    checked (`zoo.errors.check_device`: an absent one is refused by name)."""
    import warnings

    device = str(device or "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"zoo: device {device!r} asked for but no CUDA device is available; running on cpu", stacklevel=3)
        return "cpu"
    return device


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """PCM WAV bytes -> `(mono float32 in [-1, 1], rate)`, as the zoo's data pipeline decodes them."""
    from zoo.pipelines.data.audio import decode_wav as decode

    return decode(data)


def classify_media(visuals: Sequence[Any] | None, where: str) -> list[tuple[str, Any]]:
    """A harness's visuals -> `[(modality, item)]` in order: PIL images, audio dicts, file paths.

    Accepted: a `PIL.Image.Image`; an audio dict `{"array", "sampling_rate"}` (datasets' `Audio`
    feature) or an `(array, sampling_rate)` pair; a path to an image or a `.wav` file.

    Raises:
        HarnessError: anything else (video, an array without a rate, ...), naming `where`.
    """
    from PIL import Image

    out: list[tuple[str, Any]] = []
    for item in visuals or ():
        if item is None:
            continue
        if isinstance(item, Image.Image):
            out.append(("image", item.convert("RGB")))
        elif isinstance(item, dict) and "array" in item and "sampling_rate" in item:
            out.append(("audio", (np.asarray(item["array"], dtype=np.float32), int(item["sampling_rate"]))))
        elif isinstance(item, tuple) and len(item) == 2 and np.isscalar(item[1]):
            out.append(("audio", (np.asarray(item[0], dtype=np.float32), int(item[1]))))
        elif isinstance(item, (str, Path)):
            suffix = Path(item).suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                with Image.open(item) as im:
                    out.append(("image", im.convert("RGB")))
            elif suffix in AUDIO_SUFFIXES:
                out.append(("audio", decode_wav(Path(item).read_bytes())))
            else:
                raise HarnessError(f"zoo: {where}: cannot read media file {str(item)!r} (images {IMAGE_SUFFIXES}, "
                                   f"audio {AUDIO_SUFFIXES}; zoo models take no video)")
        else:
            raise HarnessError(f"zoo: {where}: a visual of type {type(item).__name__} is neither an image, an audio "
                               "dict {'array', 'sampling_rate'} nor a media file path")
    return out


class ZooRunner:
    """A loaded `MultimodalMoE` and its processor, with batched scoring and generation.

    Args:
        model: the `MultimodalMoE` (eval mode).
        processor: its `MultimodalProcessor`.
        label: how errors name the model (card ref or directory).
        batch_size: requests per forward / generate call.
        max_length: the longest sequence the LM is given (default: its `max_position_embeddings`).
    """

    def __init__(self, model, processor, label: str, *, batch_size: int = 8, max_length: int | None = None) -> None:
        if batch_size < 1:
            raise HarnessError(f"zoo: batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.label = label
        self.batch_size = int(batch_size)
        self._max_length = int(max_length) if max_length else None

    @property
    def lm(self):
        return self.model.language_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        config = self.model.hf_model.config
        for key in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(config, key, None)
            if value:
                return int(value)
        return 2048

    # -- checks ---------------------------------------------------------------------------------

    def check_media(self, modalities: set[str], task: str | None) -> None:
        """Refuse media the model has no tower for, naming the task, the model and its towers."""
        for modality in sorted(modalities):
            if modality not in self.model.encoders:
                words, tower = _MODALITY_WORDS[modality]
                raise HarnessError(
                    f"zoo: task {task or '?'!r} gives {words} but zoo model {self.label!r} has no {tower} "
                    f"(its media: {sorted(self.model.encoders) or 'none, text only'})")

    # -- prompts --------------------------------------------------------------------------------

    def user_prompt(self, text: str, media: Sequence[tuple[str, Any]], *, chat_template: bool = True) -> str:
        """The prompt for `text` with `media`: one placeholder per item before the text (the zoo's own
        prompt layout, `zoo.pipelines.collate.prompt_messages`), unless the text already holds exactly
        one placeholder per item; then the chat template's user turn and generation prompt."""
        counts = {m: sum(1 for k, _ in media if k == m) for m in ("image", "audio")}
        in_text = {"image": text.count(IMAGE), "audio": text.count(AUDIO)}
        if media and in_text != counts:
            if any(in_text.values()):
                raise HarnessError(f"zoo: the prompt holds {in_text['image']} {IMAGE} and {in_text['audio']} {AUDIO} "
                                   f"placeholders but {counts['image']} images and {counts['audio']} audio clips "
                                   "were given (give one per item, or none to have them put before the text)")
            tags = "".join(IMAGE if kind == "image" else AUDIO for kind, _ in media)
            text = tags + "\n" + text
        if not chat_template:
            return text
        return self.processor.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)

    # -- scoring --------------------------------------------------------------------------------

    @torch.no_grad()
    def score_tokens(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """`(sum log p(continuation | context), continuation is greedy)` per `(context ids, continuation ids)`.

        Text only, through `model.language_model`; batches of similar lengths, right-padded with the
        attention mask given (routers see which tokens are real); the context is cut from the left
        to fit `max_length`. Log-probabilities in float64 from the LM's logits.
        """
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            rows = []
            for i in chunk:
                context, continuation = requests[i]
                if not context or not continuation:
                    raise HarnessError("zoo: a loglikelihood request needs a non-empty context and continuation")
                if len(continuation) > self.max_length:
                    raise HarnessError(f"zoo: a continuation of {len(continuation)} tokens exceeds max_length {self.max_length}")
                rows.append((list(context) + list(continuation))[-(self.max_length + 1) :][:-1])
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for b, r in enumerate(rows):
                ids[b, : len(r)] = torch.tensor(r)
                mask[b, : len(r)] = 1
            logits = self.lm(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logp = torch.log_softmax(logits.double(), dim=-1)  # [B, S, V]
            for b, i in enumerate(chunk):
                cont = torch.tensor(requests[i][1], device=logp.device)
                n = len(rows[b])
                picked = logp[b, n - len(cont) : n]  # [C, V]: the positions that predict the continuation
                out[i] = (float(picked.gather(-1, cont[:, None]).sum()), bool((picked.argmax(-1) == cont).all()))
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def score_with_media(self, contexts: Sequence[str], continuations: Sequence[str],
                         media: Sequence[Sequence[tuple[str, Any]]]) -> list[tuple[float, bool]]:
        """Like `score_tokens` for prompts with media: the model splices each item's tokens in place of its
        placeholder and the continuation is scored on the spliced sequence (one request per call: media
        change the sequence lengths)."""
        out = []
        tok = self.tokenizer
        for context, continuation, items in zip(contexts, continuations, media):
            ctx = tok(context)["input_ids"]  # as the processor tokenizes (its special tokens included)
            batch = self.processor(context + continuation, images=[x for k, x in items if k == "image"] or None,
                                   audio=[x for k, x in items if k == "audio"] or None)
            whole = batch["input_ids"][0].tolist()
            if whole[: len(ctx)] != ctx or len(whole) == len(ctx):
                raise HarnessError("zoo: the continuation does not tokenize apart from the context "
                                   "(a token merges across the boundary, or the continuation is empty)")
            labels = batch["input_ids"].clone()
            labels[:, : len(ctx)] = -100
            batch = {k: v.to(self.device) for k, v in batch.items()}
            o = self.model(**batch, labels=labels.to(self.device))
            logp = torch.log_softmax(o.logits[0, :-1].double(), dim=-1)  # position t predicts token t + 1
            target = o.labels[0, 1:]
            keep = target != -100
            cont = target[keep]
            picked = logp[keep]
            out.append((float(picked.gather(-1, cont[:, None]).sum()), bool((picked.argmax(-1) == cont).all())))
        return out

    # -- generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], media: Sequence[Sequence[tuple[str, Any]]], *, max_new_tokens: int,
                 until: Sequence[str] = (), do_sample: bool = False, temperature: float = 0.0,
                 top_p: float | None = None, top_k: int | None = None, num_beams: int = 1) -> list[str]:
        """Generate after each (templated) prompt with its media, batched: the path `zoo eval` takes
        (processor, left padding, `MultimodalMoE.generate`, stop at eos), then each text is cut at the
        first stop string in `until`.

        Text-only prompts longer than `max_length - max_new_tokens` tokens lose their start.
        """
        tok = self.tokenizer
        order = sorted(range(len(prompts)), key=lambda i: -len(tok(prompts[i], add_special_tokens=False)["input_ids"]))
        out: list[str | None] = [None] * len(prompts)
        options: dict[str, Any] = {"do_sample": bool(do_sample) or temperature > 0, "num_beams": int(num_beams)}
        if options["do_sample"]:
            options.update(temperature=temperature or 1.0, top_p=top_p, top_k=top_k)
        keep = self.max_length - max_new_tokens
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            texts = [prompts[i] for i in chunk]
            images = [x for i in chunk for k, x in media[i] if k == "image"]
            audio = [x for i in chunk for k, x in media[i] if k == "audio"]
            batch = self.processor(texts, images=images or None, audio=audio or None, padding_side="left")
            if not images and not audio and keep > 0 and batch["input_ids"].shape[1] > keep:
                batch["input_ids"], batch["attention_mask"] = batch["input_ids"][:, -keep:], batch["attention_mask"][:, -keep:]
            batch = {k: v.to(self.device) for k, v in batch.items()}
            new = self.model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, **options)
            for b, i in enumerate(chunk):
                text = tok.decode(new[b], skip_special_tokens=True)
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                out[i] = text
        return out  # type: ignore[return-value]


def make_runner(model, processor, *, name: str | None, pretrained: str | None, device: str | None, dtype,
                cards_dir: str | None, batch_size: Any, max_length: Any) -> ZooRunner:
    """The `ZooRunner` both harness models wrap: a model instance with its processor, or one loaded by
    card name / checkpoint directory (`name=` or lm-eval's usual `pretrained=`, not both differently)."""
    if model is not None:
        if processor is None:
            raise HarnessError("zoo: a model instance needs its processor (processor=...)")
        label = name or getattr(getattr(model, "config", None), "name", None) or type(model).__name__
    else:
        if name and pretrained and name != pretrained:
            raise HarnessError(f"zoo: name={name!r} and pretrained={pretrained!r} differ; give one")
        model, processor, label = load_zoo_model(name or pretrained or "", device=device or "cpu", dtype=dtype,
                                                 cards_dir=cards_dir)
    return ZooRunner(model, processor, label, batch_size=parse_batch_size(batch_size),
                     max_length=int(max_length) if max_length else None)


def parse_batch_size(value: Any, default: int = 8) -> int:
    """lm-eval's `--batch_size` (an int, a numeric string, or "auto"/"auto:N", which take `default`)."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HarnessError(f"zoo: batch_size must be an integer or 'auto', got {value!r}") from None


def flag(value: Any) -> bool | None:
    """A `--model_args` boolean (True/False, or a string such as 'true', '0')."""
    if value is None or isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes")


def generation_options(gen_kwargs: dict, default_max: int, where: str) -> dict:
    """A harness's generation kwargs -> `ZooRunner.generate` options (`until`, `max_new_tokens`, sampling)."""
    unknown = sorted(set(gen_kwargs) - set(GREEDY_KEYS))
    if unknown:
        raise HarnessError(f"zoo: {where}: unsupported generation option(s) {unknown}; supported: {list(GREEDY_KEYS)}")
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens", default_max))
    return {"until": until, "max_new_tokens": int(max_new), "do_sample": bool(gen_kwargs.get("do_sample", False)),
            "temperature": float(gen_kwargs.get("temperature") or 0.0), "top_p": gen_kwargs.get("top_p"),
            "top_k": gen_kwargs.get("top_k"), "num_beams": int(gen_kwargs.get("num_beams") or 1)}


__all__ = ["ZooRunner", "classify_media", "decode_wav", "flag", "generation_options", "harness_device", "load_zoo_model", "parse_batch_size"]
