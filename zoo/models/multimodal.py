"""`MultimodalMoE`: modality encoders + connectors + a causal LM (dense or sparse MoE).

Text carries one placeholder token per media item (`<image>`, `<audio>`); each is replaced by its
connector's output tokens (`zoo.models.splicing`). The LM is an unmodified transformers causal LM,
or a `MoECausalLM` whose router losses join the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from zoo.models.lm import MoECausalLM
from zoo.models.loss import causal_lm_loss
from zoo.models.splicing import SplicedInputs, placeholder_positions, splice_media
from zoo.moe.capture import LayerRoutingStats, capture_routing, routing_losses

_MEDIA_NAMES = {"image": "images", "audio": "audio clips"}


@dataclass
class MultimodalOutput(ModelOutput):
    """Output of `MultimodalMoE.forward`.

    Attributes:
        loss: `lm_loss` + the LM's weighted router losses + `connector_aux_coef * connector_aux_loss`.
        lm_loss: next-token cross-entropy over text positions.
        aux_loss: the LM's weighted router losses (0 for a dense LM).
        aux_losses: the LM's router losses by name, each averaged over MoE layers (unweighted).
        connector_aux_loss: balance loss of MoE connectors' routers (0 if none).
        logits: `[B, L, V]` over the spliced sequence.
        past_key_values: the LM's cache.
        routing: per MoE decoder layer `LayerRoutingStats`.
        attention_mask: `[B, L]` of the spliced sequence (to align logits with tokens).
        labels: `[B, L]` spliced labels.
        encoder_aux_loss: the weighted router losses of MoE layers inside encoders (in `loss`).
        encoder_routing: modality -> per encoder MoE block `LayerRoutingStats`.
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None
    connector_aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object | None = None
    routing: list[LayerRoutingStats] | None = None
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    encoder_aux_loss: torch.Tensor | None = None
    encoder_routing: dict | None = None


class MultimodalMoE(nn.Module):
    """Encoders and connectors per modality feeding a causal LM through placeholder splicing.

    Args:
        language_model: a transformers causal LM, or a `zoo.models.MoECausalLM` (e.g. from `upcycle`).
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
        positions = placeholder_positions(input_ids, attention_mask, self.placeholder_ids)
        for modality, token_id in self.placeholder_ids.items():
            count = sum(len(row) for row in positions[modality])
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
        encoder_routing: dict = {}
        for modality, pos in positions.items():
            owners = [b for b, row in enumerate(pos) for _ in row]
            if not owners:
                continue
            owner = torch.tensor(owners, device=input_ids.device)
            with capture_routing(self.encoders[modality]) as records:
                out, route = self.encode(modality, media[modality], text[owner], text_mask[owner],
                                         precomputed=modality in precomputed)
            if records:
                encoder_routing[modality] = records
            tokens[modality] = out.to(text.dtype)
            if route is not None:
                routing[modality] = route

        embeds, mask, position_ids, out_labels, media_mask = splice_media(
            text, attention_mask, positions, tokens, labels, padding_side)
        return SplicedInputs(embeds, mask, position_ids, out_labels, media_mask, routing, encoder_routing)

    # -- forward / generate ---------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        encoder_features: dict[str, torch.Tensor] | None = None,
        sample_types: torch.Tensor | None = None,
        loss_chunk: int | None = None,
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
            sample_types: `[B]` int type of each sample (e.g. world-knowledge vs task), handed to
                the MoE LM's routers per token (LoRAMoE's localized balancing); needs an MoE LM.
            loss_chunk: with `labels`, the LM loss fused with the head over chunks of this many
                tokens (`zoo.models.loss`): the same loss without `[B, S, V]` logits (`logits` is
                then None). None: transformers' loss over the full logits.
            **lm_kwargs: passed to the LM (`use_cache`, ...).

        Returns:
            `MultimodalOutput`; logits are over the spliced sequence (`output.attention_mask`).
        """
        s = self.splice(input_ids, attention_mask, images=images, audio=audio, labels=labels,
                        encoder_features=encoder_features)
        if sample_types is not None:
            if not isinstance(self.language_model, MoECausalLM):
                raise ValueError("MultimodalMoE: sample_types were given but the language model has no MoE layers to use them")
            if sample_types.shape != (input_ids.shape[0],):
                raise ValueError(f"MultimodalMoE: sample_types must be [B]={input_ids.shape[0]}, got {tuple(sample_types.shape)}")
            ids = torch.arange(input_ids.shape[0], device=input_ids.device)
            lm_kwargs["token_context"] = {"sample_type": sample_types.to(input_ids.device)[:, None].expand_as(s.attention_mask),
                                          "sample_id": ids[:, None].expand_as(s.attention_mask)}
        inputs = dict(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, position_ids=s.position_ids, **lm_kwargs)
        if loss_chunk and s.labels is not None and not isinstance(self.language_model, MoECausalLM):
            out = causal_lm_loss(self.language_model, s.labels, chunk_size=loss_chunk, **inputs)
        elif loss_chunk and s.labels is not None:
            out = self.language_model(labels=s.labels, loss_chunk=loss_chunk, **inputs)
        else:
            out = self.language_model(labels=s.labels, **inputs)
        zero = s.inputs_embeds.new_zeros(())
        conn_aux = zero
        for modality, route in s.connector_routing.items():
            conn_aux = conn_aux + self.connectors[modality].router.aux_losses(route)["balance"]
        if isinstance(self.language_model, MoECausalLM):
            aux, aux_losses, routing = out.aux_loss, out.aux_losses, out.routing
        else:
            aux, aux_losses, routing = zero, {}, []
        enc_aux, encoder_routing = zero, {}
        for modality, records in s.encoder_routing.items():
            routed = routing_losses(records)
            weighted = routed.weighted(getattr(getattr(self.encoders[modality], "moe_config", None), "loss_coefs", None))
            if weighted is not None:
                enc_aux = enc_aux + weighted.to(zero.device)
            encoder_routing[modality] = routed.stats
        loss = None
        if labels is not None:
            loss = out.loss + self.connector_aux_coef * conn_aux + enc_aux
        return MultimodalOutput(
            loss=loss,
            lm_loss=getattr(out, "lm_loss", None) if isinstance(self.language_model, MoECausalLM) else out.loss,
            aux_loss=aux,
            aux_losses=aux_losses,
            connector_aux_loss=conn_aux,
            logits=out.logits,
            past_key_values=getattr(out, "past_key_values", None),
            routing=routing,
            encoder_aux_loss=enc_aux,
            encoder_routing=encoder_routing,
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
        return self.language_model.generate(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, **generate_kwargs)


__all__ = ["MultimodalMoE", "MultimodalOutput", "SplicedInputs"]
