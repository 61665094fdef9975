"""Modality encoders, connectors and processors (imported as `zoo.encoders`).

Registries: `ENCODERS` (timm, open_clip, whisper) and `CONNECTORS` (mlp, resampler, moe_projector).
"""

from zoo.encoders import audio, connectors, vision  # noqa: F401  (register their entries)
from zoo.encoders.registry import CONNECTORS, ENCODERS

__all__ = ["CONNECTORS", "ENCODERS"]
