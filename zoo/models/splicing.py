"""Placeholder splicing: replace each `<image>`/`<audio>` token by its media's connector tokens.

LLaVA-style: text carries one placeholder token per media item; the item's M connector tokens take
its place (labels there are `IGNORE_INDEX`), and the batch is re-padded to the longest spliced
sample. Media are given flat, in the order their placeholders appear in the batch (sample 0
first, left to right), as in transformers' LLaVA (`pixel_values [num_images, 3, H, W]`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zoo.models.lm import IGNORE_INDEX


@dataclass
class SplicedInputs:
    """The LM-ready batch after splicing.

    Attributes:
        inputs_embeds: `[B, L, d]`.
        attention_mask: `[B, L]`, 1 for real (text or media) positions.
        position_ids: `[B, L]`, counting real positions from 0 (pads get 0).
        labels: `[B, L]` with `IGNORE_INDEX` at media, placeholder and pad positions (None if no labels).
        media_mask: `[B, L]` bool, True where a connector token sits.
        connector_routing: modality -> `RouterOutput` of MoE connectors (one row per media item).
        encoder_routing: modality -> `RoutingRecord`s of the MoE layers inside its encoder.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    media_mask: torch.Tensor
    connector_routing: dict
    encoder_routing: dict = field(default_factory=dict)


def placeholder_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          placeholder_ids: dict[str, int]) -> dict[str, list[list[int]]]:
    """Modality -> per sample, the positions of its placeholder tokens among the real tokens."""
    out = {}
    for modality, token_id in placeholder_ids.items():
        hits = (input_ids == token_id) & attention_mask.bool()  # [B, S]
        out[modality] = [row.nonzero().flatten().tolist() for row in hits]
    return out


def splice_media(
    text: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: dict[str, list[list[int]]],
    tokens: dict[str, torch.Tensor],
    labels: torch.Tensor | None,
    padding_side: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Cut each sample's real text at its placeholders and insert the media tokens, then re-pad.

    Args:
        text: `[B, S, d]` embedded input ids.
        attention_mask: `[B, S]`.
        positions: from `placeholder_positions` (the counts must match `tokens`).
        tokens: modality -> `[n, M, d]` connector outputs, in placeholder order over the batch.
        labels: `[B, S]` or None.
        padding_side: "left" or "right".

    Returns:
        `(inputs_embeds [B, L, d], attention_mask [B, L], position_ids [B, L], labels [B, L] | None,
        media_mask [B, L])`.
    """
    next_item = {m: 0 for m in tokens}
    seqs, lab_seqs, media_flags = [], [], []
    for b in range(text.shape[0]):
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
    return embeds, mask, position_ids, out_labels, media_mask


__all__ = ["SplicedInputs", "placeholder_positions", "splice_media"]
