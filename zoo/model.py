"""`MultimodalMoE`: modality encoders + connectors + a causal LM (dense or sparse MoE).

Text carries one placeholder token per media item (`<image>`, `<audio>`). Each placeholder is
replaced by its connector's output tokens (LLaVA-style splicing); labels there are -100. Media are
given flat, in the order their placeholders appear in the batch (sample 0 first, left to right),
as in transformers' LLaVA (`pixel_values [num_images, 3, H, W]`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from zoo.config import ModelConfig
from zoo.lm import MoECausalLM
from zoo.moe.capture import LayerRoutingStats
from zoo.moe.losses import load_balancing_loss

IGNORE_INDEX = -100
_MEDIA_NAMES = {"image": "images", "audio": "audio clips"}


@dataclass
class SplicedInputs:
    """The LM-ready batch after splicing.

    Attributes:
        inputs_embeds: `[B, L, d]`.
        attention_mask: `[B, L]`, 1 for real (text or media) positions.
        position_ids: `[B, L]`, counting real positions from 0 (pads get 0).
        labels: `[B, L]` with -100 at media, placeholder and pad positions (None if no labels given).
        media_mask: `[B, L]` bool, True where a connector token sits.
        connector_routing: modality -> `RouterOutput` of MoE connectors (one row per media item).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    media_mask: torch.Tensor
    connector_routing: dict


@dataclass
class MultimodalOutput(ModelOutput):
    """Output of `MultimodalMoE.forward`.

    Attributes:
        loss: `lm_loss` + the LM's weighted MoE aux losses + `connector_aux_coef * connector_aux_loss`.
        lm_loss: next-token cross-entropy over text positions.
        aux_loss: LM load-balancing loss (0 for a dense LM).
        z_loss: LM router z-loss (0 for a dense LM).
        connector_aux_loss: balance loss of MoE connectors' routers (0 if none).
        logits: `[B, L, V]` over the spliced sequence.
        past_key_values: the LM's cache.
        routing: per MoE decoder layer `LayerRoutingStats`.
        attention_mask: `[B, L]` of the spliced sequence (to align logits with tokens).
        labels: `[B, L]` spliced labels.
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    connector_aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object | None = None
    routing: list[LayerRoutingStats] | None = None
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None


class MultimodalMoE(nn.Module):
    """Encoders and connectors per modality feeding a causal LM through placeholder splicing.

    Args:
        language_model: a transformers causal LM, or a `zoo.lm.MoECausalLM` (e.g. from `upcycle`).
        encoders: modality ("image", "audio") -> encoder, `[n, ...] -> [n, N, D]`.
        connectors: modality -> connector, `(features, text, text_mask) -> ([n, M, d], routing | None)`.
        placeholder_ids: modality -> placeholder token id.
        connector_aux_coef: weight of MoE connectors' balance loss.
    """

    def __init__(
        self,
        *,
        language_model: nn.Module,
        encoders: dict[str, nn.Module],
        connectors: dict[str, nn.Module],
        placeholder_ids: dict[str, int],
        connector_aux_coef: float = 0.01,
    ) -> None:
        super().__init__()
        if set(encoders) != set(connectors):
            raise ValueError(f"MultimodalMoE: encoders {sorted(encoders)} and connectors {sorted(connectors)} differ")
        missing = sorted(set(encoders) - set(placeholder_ids))
        if missing:
            raise ValueError(f"MultimodalMoE: no placeholder token id for modality {missing}")
        self.language_model = language_model
        self.encoders = nn.ModuleDict(encoders)
        self.connectors = nn.ModuleDict(connectors)
        self.placeholder_ids = {m: int(placeholder_ids[m]) for m in encoders}
        self.connector_aux_coef = connector_aux_coef
        self.frozen: set[str] = set()

    # -- freezing -------------------------------------------------------------------------------

    def freeze(self, *names: str) -> MultimodalMoE:
        """Freeze submodules by path ("encoders.image", "connectors.audio", "language_model").

        Frozen modules get `requires_grad=False` and stay in eval mode (BatchNorm statistics and
        dropout never change); frozen encoders also run under `torch.no_grad()`.
        """
        for name in names:
            self.get_submodule(name).requires_grad_(False).eval()
            self.frozen.add(name)
        return self

    def train(self, mode: bool = True) -> MultimodalMoE:
        super().train(mode)
        for name in self.frozen:
            self.get_submodule(name).eval()
        return self

    # -- helpers --------------------------------------------------------------------------------

    @property
    def hf_model(self) -> nn.Module:
        """The transformers causal LM (inside `MoECausalLM` when sparse)."""
        lm = self.language_model
        return lm.lm if isinstance(lm, MoECausalLM) else lm

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[B, S] -> [B, S, d]` through the LM's input embeddings."""
        return self.hf_model.get_input_embeddings()(input_ids)

    def encode(self, modality: str, media: torch.Tensor, text=None, text_mask=None, *, precomputed: bool = False):
        """Encoder then connector for one modality: `[n, ...] -> ([n, M, d], routing | None)`.

        With `precomputed`, `media` already holds the encoder's output features `[n, N, D]`.
        """
        encoder = self.encoders[modality]
        if precomputed:
            features = media
        elif f"encoders.{modality}" in self.frozen:
            with torch.no_grad():
                features = encoder(media)
        else:
            features = encoder(media)
        return self.connectors[modality](features, text, text_mask)

    def _check_media(self, input_ids, attention_mask, media: dict) -> dict[str, list[list[int]]]:
        """Placeholder positions per modality and sample; raises naming any mismatch."""
        for modality, value in media.items():
            if value is None:
                continue
            if modality not in self.encoders:
                raise ValueError(
                    f"MultimodalMoE: {_MEDIA_NAMES[modality]} were given but this model has no {modality} "
                    f"encoder (its encoders: {sorted(self.encoders) or 'none'})"
                )
        positions: dict[str, list[list[int]]] = {}
        for modality, token_id in self.placeholder_ids.items():
            hits = (input_ids == token_id) & attention_mask.bool()  # [B, S]
            positions[modality] = [row.nonzero().flatten().tolist() for row in hits]
            count = int(hits.sum())
            given = media.get(modality)
            n = 0 if given is None else len(given)
            if count != n:
                what = "more placeholders than" if count > n else "fewer placeholders than"
                raise ValueError(
                    f"MultimodalMoE: {what} {_MEDIA_NAMES[modality]}: input_ids hold {count} <{modality}> "
                    f"placeholder token(s) (id {token_id}) but {n} {_MEDIA_NAMES[modality]} were given"
                )
        return positions

    # -- splicing -------------------------------------------------------------------------------

    def splice(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        images: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str = "right",
        encoder_features: dict[str, torch.Tensor] | None = None,
    ) -> SplicedInputs:
        """Replace each placeholder by its media's connector tokens and re-pad the batch.

        Args:
            input_ids: `[B, S]` with one placeholder token per media item.
            attention_mask: `[B, S]` (1 = real token); padding may be on either side.
            images: `[n_images, 3, H, W]`, in placeholder order over the batch.
            audio: `[n_clips, n_mels, frames]`, in placeholder order over the batch.
            labels: `[B, S]` or None.
            padding_side: where the spliced batch is padded ("left" for generation).
            encoder_features: modality -> precomputed output of its (frozen) encoder `[n, N, D]`,
                in place of that modality's media (e.g. from a feature cache); the encoder is
                skipped, the connector runs as usual.

        Returns:
            `SplicedInputs` of length L = the longest spliced sample.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"MultimodalMoE: input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"MultimodalMoE: padding_side must be 'left' or 'right', got {padding_side!r}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"MultimodalMoE: labels {tuple(labels.shape)} do not match input_ids {tuple(input_ids.shape)}")
        media = {"image": images, "audio": audio}
        precomputed = dict(encoder_features or {})
        for modality, features in precomputed.items():
            if modality not in self.encoders:
                raise ValueError(f"MultimodalMoE: encoder_features for {modality!r}, but this model has no {modality} encoder")
            if media.get(modality) is not None:
                raise ValueError(f"MultimodalMoE: both {_MEDIA_NAMES[modality]} and encoder_features[{modality!r}] were given")
            if any(p.requires_grad for p in self.encoders[modality].parameters()):
                raise ValueError(
                    f"MultimodalMoE: encoder_features[{modality!r}] given, but the {modality} encoder is trainable: "
                    "precomputed features would cut its gradient"
                )
            media[modality] = features
        positions = self._check_media(input_ids, attention_mask, media)
        text = self.embed_tokens(input_ids)  # [B, S, d]
        is_placeholder = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in self.placeholder_ids.values():
            is_placeholder |= input_ids == token_id
        text_mask = attention_mask.bool() & ~is_placeholder  # [B, S] text the connectors may read

        # Encode every modality present: tokens[modality] is [n, M, d], in placeholder order.
        tokens: dict[str, torch.Tensor] = {}
        routing: dict = {}
        for modality, pos in positions.items():
            owners = [b for b, row in enumerate(pos) for _ in row]
            if not owners:
                continue
            owner = torch.tensor(owners, device=input_ids.device)
            out, route = self.encode(modality, media[modality], text[owner], text_mask[owner],
                                     precomputed=modality in precomputed)
            tokens[modality] = out.to(text.dtype)
            if route is not None:
                routing[modality] = route

        # Walk each sample's real tokens; cut at placeholders, insert media tokens.
        next_item = {m: 0 for m in tokens}
        seqs, lab_seqs, media_flags = [], [], []
        for b in range(input_ids.shape[0]):
            real = attention_mask[b].bool().nonzero().flatten()  # positions of real tokens
            marks = sorted((p, m) for m, pos in positions.items() for p in pos[b])
            pieces, lab_pieces, flags = [], [], []
            start = 0
            keep = real.tolist()
            for p, m in marks + [(None, None)]:
                stop = len(keep) if p is None else keep.index(p)
                idx = real[start:stop]
                pieces.append(text[b, idx])
                flags.append(torch.zeros(len(idx), dtype=torch.bool, device=text.device))
                if labels is not None:
                    lab_pieces.append(labels[b, idx])
                if p is None:
                    break
                item = tokens[m][next_item[m]]  # [M, d]
                next_item[m] += 1
                pieces.append(item)
                flags.append(torch.ones(len(item), dtype=torch.bool, device=text.device))
                if labels is not None:
                    lab_pieces.append(torch.full((len(item),), IGNORE_INDEX, dtype=labels.dtype, device=labels.device))
                start = stop + 1  # skip the placeholder itself
            seqs.append(torch.cat(pieces))
            media_flags.append(torch.cat(flags))
            if labels is not None:
                lab_seqs.append(torch.cat(lab_pieces))

        length = max(len(s) for s in seqs)
        batch, d = len(seqs), text.shape[-1]
        embeds = text.new_zeros(batch, length, d)
        mask = attention_mask.new_zeros(batch, length)
        media_mask = torch.zeros(batch, length, dtype=torch.bool, device=text.device)
        out_labels = None if labels is None else labels.new_full((batch, length), IGNORE_INDEX)
        for b, seq in enumerate(seqs):
            n = len(seq)
            sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
            embeds[b, sl] = seq
            mask[b, sl] = 1
            media_mask[b, sl] = media_flags[b]
            if out_labels is not None:
                out_labels[b, sl] = lab_seqs[b]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return SplicedInputs(embeds, mask, position_ids, out_labels, media_mask, routing)

    # -- forward / generate ---------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        encoder_features: dict[str, torch.Tensor] | None = None,
        **lm_kwargs,
    ) -> MultimodalOutput:
        """Splice media into the text and run the LM.

        Args:
            input_ids: `[B, S]` with placeholders.
            attention_mask: `[B, S]`.
            images: `[n_images, 3, H, W]` (flat over the batch, placeholder order).
            audio: `[n_clips, n_mels, frames]`.
            labels: `[B, S]`, -100 where no loss is taken (placeholders are masked anyway).
            encoder_features: precomputed frozen-encoder outputs per modality (see `splice`).
            **lm_kwargs: passed to the LM (`use_cache`, ...).

        Returns:
            `MultimodalOutput`; logits are over the spliced sequence (`output.attention_mask`).
        """
        s = self.splice(input_ids, attention_mask, images=images, audio=audio, labels=labels,
                        encoder_features=encoder_features)
        out = self.language_model(
            inputs_embeds=s.inputs_embeds,
            attention_mask=s.attention_mask,
            position_ids=s.position_ids,
            labels=s.labels,
            **lm_kwargs,
        )
        zero = s.inputs_embeds.new_zeros(())
        conn_aux = zero
        for route in s.connector_routing.values():
            conn_aux = conn_aux + load_balancing_loss(route.logits, route.indices.shape[1])
        if isinstance(out, ModelOutput) and hasattr(out, "aux_loss") and out.aux_loss is not None:
            aux, z, routing = out.aux_loss, out.z_loss, out.routing
        else:
            aux, z, routing = zero, zero, []
        loss = None
        if labels is not None:
            loss = out.loss + self.connector_aux_coef * conn_aux
        return MultimodalOutput(
            loss=loss,
            lm_loss=getattr(out, "lm_loss", None) if isinstance(self.language_model, MoECausalLM) else out.loss,
            aux_loss=aux,
            z_loss=z,
            connector_aux_loss=conn_aux,
            logits=out.logits,
            past_key_values=getattr(out, "past_key_values", None),
            routing=routing,
            attention_mask=s.attention_mask,
            labels=s.labels,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        encoder_features: dict[str, torch.Tensor] | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Generate text after a prompt with media (the batch is spliced and left-padded).

        Args:
            input_ids: `[B, S]` prompt with placeholders.
            attention_mask: `[B, S]`.
            images: `[n_images, 3, H, W]`.
            audio: `[n_clips, n_mels, frames]`.
            encoder_features: precomputed frozen-encoder outputs per modality (see `splice`).
            **generate_kwargs: transformers `generate` options (`max_new_tokens`, `do_sample`, ...).

        Returns:
            `[B, T]` the new token ids only (the prompt is given as embeddings).
        """
        s = self.splice(input_ids, attention_mask, images=images, audio=audio, padding_side="left",
                        encoder_features=encoder_features)
        return self.hf_model.generate(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, **generate_kwargs)


# -- building from a config -----------------------------------------------------------------------


def build_encoder(cfg) -> nn.Module:
    """Build one encoder from an `EncoderConfig`."""
    from zoo.encoders.audio import WhisperAudioEncoder
    from zoo.encoders.vision import OpenClipVisionEncoder, TimmVisionEncoder

    if cfg.kind == "timm":
        return TimmVisionEncoder(
            cfg.name,
            feature_layer=cfg.feature_layer,
            select=cfg.select,
            image_size=cfg.image_size,
            weights=cfg.weights,
            **cfg.options,
        )
    if cfg.kind == "open_clip":
        vision_cfg = dict(cfg.options)
        if cfg.image_size is not None:
            vision_cfg["image_size"] = cfg.image_size
        return OpenClipVisionEncoder(
            cfg.name,
            vision_cfg=vision_cfg,
            feature_layer=-1 if cfg.feature_layer is None else cfg.feature_layer,
            select=cfg.select,
            weights=cfg.weights,
        )
    return WhisperAudioEncoder(
        cfg.options, feature_layer=-1 if cfg.feature_layer is None else cfg.feature_layer, weights=cfg.weights
    )


def build_language_model(cfg) -> nn.Module:
    """Build the transformers causal LM from an `LMConfig` (random init, or a local directory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.weights is not None:
        return AutoModelForCausalLM.from_pretrained(cfg.weights, local_files_only=True, **cfg.config)
    hf_config = AutoConfig.for_model(cfg.model_type, **cfg.config)
    return AutoModelForCausalLM.from_config(hf_config)


def build_model(cfg: ModelConfig) -> MultimodalMoE:
    """Build the whole model a `ModelConfig` describes (random weights unless the config names some).

    Build inside `with torch.device("meta"):` to check shapes of a full-size model without memory.
    """
    from zoo.encoders.connectors import build_connector
    from zoo.upcycle import upcycle

    lm = build_language_model(cfg.lm)
    d = lm.get_input_embeddings().embedding_dim
    vocab = lm.get_input_embeddings().num_embeddings
    for modality, token_id in cfg.placeholder_ids().items():
        if not 0 <= token_id < vocab:
            raise ValueError(f"build_model: the <{modality}> token id {token_id} is outside the LM vocabulary ({vocab})")
    language_model = upcycle(lm, cfg.moe) if cfg.moe is not None else lm
    encoders = {m: build_encoder(e) for m, e in cfg.encoders.items()}
    connectors = {
        m: build_connector(c.kind, encoders[m].output_dim, d, **c.options) for m, c in cfg.connectors.items()
    }
    model = MultimodalMoE(
        language_model=language_model,
        encoders=encoders,
        connectors=connectors,
        placeholder_ids=cfg.placeholder_ids(),
        connector_aux_coef=cfg.moe.aux_loss_coef if cfg.moe is not None else 0.01,
    )
    frozen = [f"encoders.{m}" for m, e in cfg.encoders.items() if e.freeze]
    frozen += [f"connectors.{m}" for m, c in cfg.connectors.items() if c.freeze]
    if cfg.lm.freeze:
        frozen.append("language_model")
    return model.freeze(*frozen)


__all__ = ["IGNORE_INDEX", "MultimodalMoE", "MultimodalOutput", "SplicedInputs", "build_encoder", "build_language_model", "build_model"]


def model_from_checkpoint_config(config: dict) -> tuple[MultimodalMoE, ModelConfig]:
    """Build the (untrained) model a zoo checkpoint's `config.json` describes, ready for a strict load.

    Every weight will come from the checkpoint, so configured pretrained files are not read. A
    checkpoint trained with MixLoRA records its settings under `"mixlora"`: its LoRA experts are
    modules, not merged weights, so they are rebuilt here (its attention LoRA was merged).

    Args:
        config: the checkpoint config, `{"model": ModelConfig dict, ...}`.

    Returns:
        `(model, model_config)`.
    """
    import copy

    cfg = ModelConfig.from_dict(config["model"])
    build_cfg = copy.deepcopy(cfg)
    build_cfg.lm.weights = None
    for enc in build_cfg.encoders.values():
        enc.weights = None
    model = build_model(build_cfg)
    if config.get("mixlora"):
        from zoo.lora import apply_mixlora

        model.language_model = apply_mixlora(model.language_model, **config["mixlora"], attention_lora=False)
    return model, cfg
