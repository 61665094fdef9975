"""A byte-level BPE tokenizer trained here, on text the project assembles from installed packages.

No tokenizer can be downloaded on our machines, so the zoo trains its own: a byte-level BPE
(`tokenizers`) over English the installed packages carry — WordNet lemmas and glosses for ImageNet
synsets bundled with timm, and the docstrings of a fixed set of Python standard-library modules —
plus caption and chat phrases. The placeholder and chat tokens are special tokens with fixed ids,
so `ModelConfig.image_token_id` / `audio_token_id` hold for every tokenizer trained here. The
result is a `transformers.PreTrainedTokenizerFast` (padding, chat template, `save_pretrained`).
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Iterable

PAD, BOS, EOS, IMAGE, AUDIO = "<pad>", "<s>", "</s>", "<image>", "<audio>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
# Order fixes the ids: <pad>=0, <s>=1, </s>=2, <image>=3, <audio>=4 (ModelConfig defaults).
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE, AUDIO, SYSTEM, USER, ASSISTANT)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' + message['role'] + '; use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_DOC_MODULES = (
    "argparse", "collections", "csv", "dataclasses", "datetime", "decimal", "email", "fractions",
    "functools", "heapq", "http.client", "inspect", "itertools", "json", "logging", "pathlib",
    "pickle", "random", "re", "shutil", "statistics", "string", "subprocess", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "zipfile",
)

_CAPTIONS = (
    "a photo of a {}.", "a picture showing a {}.", "there is a {} in this image.",
    "a close-up photo of the {}.", "the {} in the picture.", "describe the {}.",
)
_CHAT = (
    "What is in this image?", "Describe the picture in detail.", "What do you hear in this clip?",
    "Transcribe the audio.", "The image shows", "The audio contains", "Answer the question.",
)


def build_corpus(max_synsets: int = 20000) -> list[str]:
    """English text assembled offline from installed packages (deterministic for fixed versions).

    Args:
        max_synsets: how many WordNet synset definitions (from timm's bundled ImageNet-21k info) to use.

    Returns:
        A list of lines.
    """
    import timm.data

    info = Path(timm.data.__file__).parent / "_info"
    lines: list[str] = []
    lemmas = {}
    for row in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines():
        key, _, lemma = row.partition("\t")
        lemmas[key] = lemma
    for i, row in enumerate((info / "imagenet_synset_to_definition.txt").read_text().splitlines()):
        if i >= max_synsets:
            break
        key, _, definition = row.partition("\t")
        lemma = lemmas.get(key, "")
        lines.append(f"{lemma}: {definition}")
        first = lemma.split(",")[0].strip()
        if first:
            lines.append(_CAPTIONS[i % len(_CAPTIONS)].format(first))
    for name in _DOC_MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__ or ""]
        with warnings.catch_warnings():  # some module attributes are deprecated aliases (typing.io)
            warnings.simplefilter("ignore", DeprecationWarning)
            docs += [getattr(obj, "__doc__", None) for obj in vars(module).values() if callable(obj)]
        docs = [doc for doc in docs if isinstance(doc, str)]
        lines += [line.strip() for doc in docs for line in doc.splitlines() if line.strip()]
    lines += list(_CHAT) * 10
    return lines


def train_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 1024):
    """Train a byte-level BPE with the zoo's special tokens and chat template.

    Args:
        texts: training lines (default: `build_corpus()`).
        vocab_size: total size including the special tokens and the 256 byte symbols.

    Returns:
        A `transformers.PreTrainedTokenizerFast`; `<image>` has id 3 and `<audio>` id 4.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"train_tokenizer: vocab_size {vocab_size} is below the {len(SPECIAL_TOKENS) + 256} fixed symbols")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) if texts is not None else build_corpus(), trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, (token, tok.token_to_id(token))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE, "audio_token": AUDIO},
        additional_special_tokens=[IMAGE, AUDIO, SYSTEM, USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def load_tokenizer(path: str | Path):
    """Load a tokenizer saved with `save_pretrained` (offline)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


__all__ = ["AUDIO", "CHAT_TEMPLATE", "IMAGE", "SPECIAL_TOKENS", "build_corpus", "load_tokenizer", "train_tokenizer"]
