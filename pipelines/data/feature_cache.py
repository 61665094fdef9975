"""Cache a frozen encoder's outputs per media sha256, so it never runs twice on the same input.

Files: ``<cache_dir>/<encoder_key>/<sha[:2]>/<sha>.safetensors`` holding one tensor
``"features"``; the encoder key is also stored in the file's metadata and checked on read.
The encoder key must change whenever the encoder's weights or preprocessing change (e.g.
``"vit-tiny@sha256:ab12..+px32"``); the cache cannot detect that by itself. It should also name
whatever changes the float reduction order (device, thread count): features computed under another
order differ in the last bits, and a hit would then not equal a miss.

A cache hit must give the bits a miss gives, or a stage's result would depend on which earlier run
warmed the cache. So the encoder runs on **one item per call**: a batched GEMM's reduction order
depends on the batch size, and the same image encoded in a batch of 8 and alone differs by up to
2e-5 (the tiny zoo's ViT, CPU, measured), which training amplifies into a different model. One call
per item is about 2.5x slower than batched encoding (tiny ViT, 64 images: 0.66 s vs 0.29 s), paid
once per item per store.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zoo.progress import progress

_SAFE = re.compile(r"[^A-Za-z0-9_.@+=\-]")


class FeatureCache:
    """Features of a frozen encoder keyed by the sha256 of the media bytes.

    Args:
        cache_dir: Root directory of the cache.
        encoder_key: Names the encoder *and* its weights/preprocessing version.
        encoder: Called with a list of media bytes and returns a tensor ``[B, ...]`` or a list of
            ``B`` tensors, one per input in order. The cache calls it with one miss at a time
            (``B == 1``; see the module docstring).

    Attributes:
        hits: Lookups answered from disk or memory since construction.
        misses: Inputs the encoder had to run on.
    """

    def __init__(self, cache_dir: str | os.PathLike, encoder_key: str, encoder: Callable[[list[bytes]], torch.Tensor | Sequence[torch.Tensor]]):
        if not encoder_key:
            raise ValueError("encoder_key must name the encoder (and its version)")
        self.encoder_key = encoder_key
        self.encoder = encoder
        self.dir = Path(cache_dir) / _SAFE.sub("_", encoder_key)
        self.hits = 0
        self.misses = 0

    def path(self, sha256: str) -> Path:
        """Cache file of one media item."""
        return self.dir / sha256[:2] / f"{sha256}.safetensors"

    def _load(self, path: Path) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            got = (f.metadata() or {}).get("encoder_key")
            if got != self.encoder_key:
                raise ValueError(f"{path} was written for encoder {got!r}, not {self.encoder_key!r}")
            return f.get_tensor("features")

    def _store(self, path: Path, features: torch.Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"features": features.detach().cpu().contiguous()}, tmp, metadata={"encoder_key": self.encoder_key})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def encode(self, items: Sequence[bytes]) -> list[torch.Tensor]:
        """Features for each media item, running the encoder once on each unique cache miss, alone.

        Args:
            items: Media file bytes (e.g. `Media.data`).

        Returns:
            One CPU tensor per item, in order.

        Raises:
            ValueError: If the encoder returns a different number of outputs than inputs.
        """
        shas = [hashlib.sha256(b).hexdigest() for b in items]
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, bytes] = {}
        for sha, data in zip(shas, items):
            if sha in found or sha in todo:
                continue
            path = self.path(sha)
            if path.is_file():
                found[sha] = self._load(path)
            else:
                todo[sha] = data
        self.hits += len(items) - len(todo)
        for sha, data in todo.items():
            self.misses += 1
            with torch.no_grad():
                out = self.encoder([data])
            outs = list(out.unbind(0)) if isinstance(out, torch.Tensor) else list(out)
            if len(outs) != 1:
                raise ValueError(f"encoder {self.encoder_key!r} returned {len(outs)} outputs for 1 input")
            self._store(self.path(sha), outs[0])
            found[sha] = outs[0].detach().cpu()
        return [found[sha] for sha in shas]

    def fill(self, items: Iterable[bytes], *, quiet: bool | None = None) -> int:
        """Fill the cache ahead for `items`: encode the ones not cached.

        For warming a cache over a whole dataset before training or serving (training itself fills
        it batch by batch through `encode`, under the training bar); the features are the bits
        `encode` would store. Shows a progress bar over the items to encode
        (`zoo.progress.progress`; `quiet` as there).

        Args:
            items: Media file bytes; duplicates and cached items are skipped.
            quiet: The progress bar: True off, False on, None on a terminal unless `ZOO_QUIET`.

        Returns:
            How many items were encoded and stored.
        """
        todo: dict[str, bytes] = {}
        for data in items:
            sha = hashlib.sha256(data).hexdigest()
            if sha not in todo and not self.path(sha).is_file():
                todo[sha] = data
        with progress(total=len(todo), desc=f"features {self.encoder_key}", unit="item", quiet=quiet) as bar:
            for data in todo.values():
                self.encode([data])
                bar.update(1)
        return len(todo)

    def __call__(self, data: bytes) -> torch.Tensor:
        """Features of one media item."""
        return self.encode([data])[0]
