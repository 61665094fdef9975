"""Activations experts may use, by name (what expert configs store), and naming a dense FFN's activation.

Names follow what the function computes: `gelu` is the exact erf GELU, `gelu_tanh` its tanh
approximation (transformers' `gelu_new` and `gelu_pytorch_tanh`), `quick_gelu` is `x sigmoid(1.702 x)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}

# transformers activation classes (and torch modules) -> the name of what they compute
_BY_CLASS = {
    "SiLUActivation": "silu", "SiLU": "silu",
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
    "ReLU": "relu",
    "QuickGELUActivation": "quick_gelu",
}


def activation_name(act: object) -> str:
    """The `ACTIVATIONS` name of an activation module or function, or its class name if it has none."""
    for known, fn in ACTIVATIONS.items():
        if act is fn:
            return known
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if act is F.silu:
        return "silu"
    if act is F.gelu:
        return "gelu"
    if act is F.relu:
        return "relu"
    name = type(act).__name__
    if name == "GELUActivation" and getattr(act, "act", None) is not None and getattr(act.act, "__name__", "") == "_gelu_python":
        return "gelu"
    return _BY_CLASS.get(name, getattr(act, "__name__", name))


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function for an `ACTIVATIONS` name.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not one of {sorted(ACTIVATIONS)}") from None


__all__ = ["ACTIVATIONS", "activation_fn", "activation_name"]
