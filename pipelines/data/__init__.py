"""Offline data for the zoo's training pipelines (imported as `zoo.pipelines.data`).

One schema (`Sample` with `Media`), webdataset shards with a validating reader, builders that
turn real offline sources (Debian packages, see ``debian-packages.txt``; the PyPI data package
easy-vqa) into deterministic
train/val/test splits, a LLaVA-JSON importer, a text corpus, and a frozen-encoder feature cache.

CLI: ``python -m zoo.pipelines.data build --out DIR --max-per-split N [--families ...]``.
"""

from .audio import decode_wav, encode_wav, resample
from .build import BUILDERS, FAMILIES, build_all, build_family
from .corpus import corpus_lines, write_corpus
from .easy_vqa import build_easy_vqa
from .emoji import build_emoji_captions, render_emoji
from .fashion_mnist import build_fashion_vqa
from .feature_cache import FeatureCache
from .llava import LlavaFormatError, import_llava
from .schema import SPLITS, Media, Sample, SchemaError, split_of
from .shards import CorruptShardError, iter_split, load_split, read_manifest, read_shards, shard_paths, write_dataset, write_shards
from .speech import build_spoken_words, espeak_wav
from .wordnet import build_wordnet_instructions, load_noun_synsets

__all__ = [
    "BUILDERS", "FAMILIES", "SPLITS", "CorruptShardError", "FeatureCache", "LlavaFormatError", "Media", "Sample",
    "SchemaError", "build_all", "build_easy_vqa", "build_emoji_captions", "build_family", "build_fashion_vqa",
    "build_spoken_words", "build_wordnet_instructions", "corpus_lines", "decode_wav", "encode_wav", "espeak_wav",
    "import_llava", "iter_split", "load_noun_synsets", "load_split", "read_manifest", "read_shards", "render_emoji",
    "resample", "shard_paths", "split_of", "write_corpus", "write_dataset", "write_shards",
]  # fmt: skip
