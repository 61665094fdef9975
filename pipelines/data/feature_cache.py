"""Cache a frozen encoder's outputs per media sha256, so it never runs twice on the same input.

Files: ``<cache_dir>/<encoder_key>/<sha[:2]>/<sha>.safetensors`` holding one tensor
``"features"``; the encoder key is also stored in the file's metadata and checked on read.
The encoder key must change whenever the encoder's weights or preprocessing change (e.g.
``"vit-tiny@sha256:ab12..+px32"``); the cache cannot detect that by itself.
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
        encoder: Called with a list of media bytes (only the cache misses, each unique once),
            returns a tensor ``[B, ...]`` or a list of ``B`` tensors, one per input in order.

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
        """Features for each media item, running the encoder once on the unique cache misses.

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
        if todo:
            self.misses += len(todo)
            with torch.no_grad():
                out = self.encoder(list(todo.values()))
            outs = list(out.unbind(0)) if isinstance(out, torch.Tensor) else list(out)
            if len(outs) != len(todo):
                raise ValueError(f"encoder {self.encoder_key!r} returned {len(outs)} outputs for {len(todo)} inputs")
            for sha, feats in zip(todo, outs):
                self._store(self.path(sha), feats)
                found[sha] = feats.detach().cpu()
        return [found[sha] for sha in shas]

    def fill(self, items: Iterable[bytes], *, batch_size: int = 64, quiet: bool | None = None) -> int:
        """Fill the cache ahead for `items`: encode the ones not cached, `batch_size` per encoder call.

        For warming a cache over a whole dataset before training or serving (training itself fills
        it batch by batch through `encode`, under the training bar). Shows a progress bar over the
        items to encode (`zoo.progress.progress`; `quiet` as there).

        Args:
            items: Media file bytes; duplicates and cached items are skipped.
            batch_size: Misses per encoder call, >= 1.
            quiet: The progress bar: True off, False on, None on a terminal unless `ZOO_QUIET`.

        Returns:
            How many items were encoded and stored.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
        todo: dict[str, bytes] = {}
        for data in items:
            sha = hashlib.sha256(data).hexdigest()
            if sha not in todo and not self.path(sha).is_file():
                todo[sha] = data
        missing = list(todo.values())
        with progress(total=len(missing), desc=f"features {self.encoder_key}", unit="item", quiet=quiet) as bar:
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                self.encode(chunk)
                bar.update(len(chunk))
        return len(missing)

    def __call__(self, data: bytes) -> torch.Tensor:
        """Features of one media item."""
        return self.encode([data])[0]
