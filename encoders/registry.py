"""`ENCODERS` and `CONNECTORS`: the registered modality encoders and encoder -> LM connectors.

Encoders are built from the fields of a `zoo.models.EncoderConfig` (`name`, `options`,
`feature_layer`, `select`, `image_size`, `weights`); each entry rejects fields it has no use for.
Every encoder has `forward(media) -> [n, N, D]` and `output_dim` (D). Connectors are built from
`(in_dim, out_dim, **options)` and share one call shape (see `connectors.py`).
"""

from zoo.registry import Registry

ENCODERS: Registry = Registry("encoder")
CONNECTORS: Registry = Registry("connector", context=("in_dim", "out_dim"))


def reject_unused(kind: str, **fields) -> None:
    """Raise naming the `EncoderConfig` fields set for an encoder kind that does not use them."""
    used = sorted(name for name, value in fields.items() if value not in (None, {}))
    if used:
        raise ValueError(f"encoder {kind!r} does not use {used}; leave them unset")


__all__ = ["CONNECTORS", "ENCODERS", "reject_unused"]
