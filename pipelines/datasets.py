"""A run's data: build it (if absent), load the splits per task family, train the tokenizer, make the processor."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from zoo.io.checkpoint import atomic_directory_write
from zoo.models.builders import build_model
from zoo.models.pretrained import resolve_pretrained


class Datasets(dict):
    """family -> training samples, with `.test` (family -> test samples) and `.heldout_text` (held-out
    English lines for perplexity, empty unless the recipe's eval asks for it) beside it."""

    def __init__(self, train: dict[str, list], test: dict[str, list], heldout_text: list[str] | None = None):
        super().__init__(train)
        self.test = test
        self.heldout_text = list(heldout_text or [])


def load_datasets(data_dir: Path, families: set[str], split: str = "train") -> dict[str, list]:
    """Samples of `split` per family; the plain-text `corpus` becomes samples with no instruction."""
    from zoo.pipelines.data.schema import Sample
    from zoo.pipelines.data.shards import load_split

    out = {}
    for family in sorted(families):
        if family == "corpus":
            name = "train.txt" if split == "train" else "val.txt"
            lines = (data_dir / "corpus" / name).read_text().splitlines()
            out[family] = [Sample(f"corpus-{split}-{i}", "corpus", split, "", line) for i, line in enumerate(lines) if line.strip()]
        else:
            out[family] = load_split(data_dir / family, split)
    return out


def prepare(recipe, out_dir: Path, data_dir: Path | None = None):
    """Build the data (if absent), get the tokenizer (if absent), make the processor.

    The tokenizer is the pretrained LM's own, with the media placeholders added, when the recipe's
    model starts from pretrained weights (`zoo.models.pretrained`); otherwise a byte-level BPE
    trained on the run's data (`recipe.tokenizer_vocab` must equal the LM's `vocab_size`).

    Returns:
        (train datasets per family with `.test`, processor).
    """
    from zoo.pipelines.data.build import build_all
    from zoo.processor import MultimodalProcessor
    from zoo.tokenizer import load_tokenizer, train_tokenizer

    families = {f for s in recipe.stages for f in s.data}
    data_dir = Path(data_dir) if data_dir is not None else out_dir / "data"
    missing = sorted(f for f in families | {"corpus"} if not (data_dir / f).is_dir())
    if missing:
        build_all(data_dir, recipe.data.get("max_per_split"), families=tuple(missing),
                  options={f: o for f, o in recipe.data.get("options", {}).items() if f in missing})
    datasets = load_datasets(data_dir, families | {"corpus"})
    tokenizer_dir = out_dir / "tokenizer"
    model_cfg, pretrained_tokenizer = resolve_pretrained(recipe.model)
    if pretrained_tokenizer is not None:  # the LM's own tokenizer and chat template, placeholders added; no BPE
        if not (tokenizer_dir / "tokenizer.json").exists():
            atomic_directory_write(tokenizer_dir, lambda tmp: pretrained_tokenizer.save_pretrained(str(tmp)), overwrite=True)
    elif not (tokenizer_dir / "tokenizer.json").exists():
        vocab = recipe.model.lm.config.get("vocab_size")
        if vocab != recipe.tokenizer_vocab:
            raise ValueError(f"recipe {recipe.name!r}: tokenizer_vocab {recipe.tokenizer_vocab} != the LM's vocab_size {vocab}")
        texts = [t for samples in datasets.values() for s in samples for t in (s.instruction, s.answer) if t]
        train_tokenizer(texts, vocab_size=recipe.tokenizer_vocab).save_pretrained(str(tokenizer_dir))
    tokenizer = load_tokenizer(tokenizer_dir)
    # the processor needs the encoders' settings and the placeholder ids, not the LM's weights
    model = build_model(dataclasses.replace(model_cfg, lm=dataclasses.replace(model_cfg.lm, weights=None)))
    processor = MultimodalProcessor.from_model(model, tokenizer)
    test = load_datasets(data_dir, families - {"corpus"}, "test") if recipe.eval is not None else {}
    out = Datasets({f: d for f, d in datasets.items() if f in families}, test)
    if recipe.eval is not None and recipe.eval.perplexity:
        from zoo.pipelines.eval import heldout_text

        out.heldout_text = heldout_text(data_dir, recipe.eval.perplexity)
    return out, processor


__all__ = ["Datasets", "load_datasets", "prepare"]
