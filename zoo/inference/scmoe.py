"""SCMoE: "Unchosen Experts Can Contribute Too: Unleashing MoE Models' Power by Self-Contrast"
(Shi et al., NeurIPS 2024, arXiv 2405.14507).

Self-contrast decoding between two routings of one MoE model: the strong activation (the model's
own top-k) and a weak one (top-1, or only the rank-r expert, which the paper finds best for
Mixtral at r = 2). At each step, with `s` and `w` the strong and weak next-token log-probabilities,

    score(x) = (1 + beta) * s(x) - beta * w(x)   if  p_s(x) >= alpha * max_x' p_s(x')
    score(x) = -inf                              otherwise (the adaptive plausibility cut)

and decoding takes the argmax (or samples from softmax(score)). beta >= 0 is the contrast
strength (0: greedy on the strong model), alpha in [0, 1] the plausibility cut (0: no cut).

How it sits in transformers `generate`: a `LogitsProcessor` (`SCMoELogitsProcessor`) that runs the
weak pass itself, with its own KV cache, on the same tokens: generate's forward is the strong pass
(its cache, stopping criteria, EOS handling, streamers, batching and sampling all stay
transformers'), and the processor feeds the weak model the prompt at the first step and each new
token after, under `override_routing` with the weak settings, then returns the contrast scores.
Chosen over a custom decoding loop because it keeps every generate feature and adds one forward
per step, nothing else. The price: the processor holds state (its cache), so one processor serves
one generate call, and beam search (which reorders the batch) is refused.

Choices where the paper leaves room: the contrast is on log-probabilities (the authors' code uses
raw logits; per row the two differ by a constant, so the argmax and the softmax are the same);
the weak routing is any `override_routing` setting (`{"top_k": 1}` by default, `{"rank": 2}` the
paper's best for Mixtral); EOS is not masked (the authors' code optionally forbids it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from zoo.inference.overrides import apply_overrides, resolve_overrides
from zoo.models.lm import MoECausalLM
from zoo.models.multimodal import MultimodalMoE
from zoo.moe.context import routing_context
from zoo.moe.routers.base import check_range

DEFAULT_WEAK = {"top_k": 1}


def check_contrast(beta: float, alpha: float) -> None:
    """Raise naming the option unless beta >= 0 and 0 <= alpha <= 1."""
    check_range("beta", beta, 0, math.inf, high_open=True)
    check_range("alpha", alpha, 0, 1)


def scmoe_scores(strong_logits: torch.Tensor, weak_logits: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """SCMoE's next-token scores from the strong and weak logits.

    Args:
        strong_logits: `[B, V]` the strong activation's next-token logits.
        weak_logits: `[B, V]` the weak activation's.
        beta: contrast strength, >= 0.
        alpha: plausibility cut, in [0, 1].

    Returns:
        `[B, V]` float32 scores, -inf outside the plausible set.
    """
    check_contrast(beta, alpha)
    s = torch.log_softmax(strong_logits.float(), dim=-1)
    w = torch.log_softmax(weak_logits.float(), dim=-1)
    cutoff = torch.log(torch.tensor(float(alpha), device=s.device)) + s.max(dim=-1, keepdim=True).values
    return ((1.0 + beta) * s - beta * w).masked_fill(s < cutoff, -math.inf)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM under an `MoECausalLM` or `MultimodalMoE` (or the model itself)."""
    if isinstance(model, MultimodalMoE):
        return model.hf_model
    if isinstance(model, MoECausalLM):
        return model.lm
    return model


class SCMoELogitsProcessor(LogitsProcessor):
    """Runs the weak pass with its own KV cache and turns generate's strong logits into SCMoE scores.

    Put it first in the processor list (it contrasts the raw strong logits). One instance per
    generate call.

    Args:
        lm: the transformers causal LM that generate runs (its MoE layers get the weak override).
        weak: `override_routing` keywords of the weak activation (`{"top_k": 1}`, `{"rank": 2}`, ...).
        beta: contrast strength, >= 0.
        alpha: plausibility cut, in [0, 1].
        prompt_embeds: `[B, S, d]` when generate starts from embeddings (a spliced multimodal
            prompt); None when it starts from `input_ids`.
        prompt_mask: `[B, S]` the prompt's attention mask (None: no padding).
    """

    def __init__(self, lm: nn.Module, *, weak: Mapping | None = None, beta: float = 0.5, alpha: float = 0.1,
                 prompt_embeds: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None) -> None:
        check_contrast(beta, alpha)
        self.lm, self.beta, self.alpha = lm, beta, alpha
        self.plan = resolve_overrides(lm, **dict(DEFAULT_WEAK if weak is None else weak))
        self.prompt_embeds, self.prompt_mask = prompt_embeds, prompt_mask
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._position: torch.Tensor | None = None
        self._seen = -1

    def _weak_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        if self._cache is None:
            if self.prompt_embeds is not None:
                feed, length = {"inputs_embeds": self.prompt_embeds}, self.prompt_embeds.shape[1]
            else:
                feed, length = {"input_ids": input_ids}, n
            mask = self.prompt_mask
            if mask is None:
                mask = torch.ones(input_ids.shape[0], length, dtype=torch.long, device=input_ids.device)
            position = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate computes it
        else:
            if n != self._seen + 1:
                raise RuntimeError(f"SCMoELogitsProcessor: expected {self._seen + 1} tokens, got {n}: one processor "
                                   "serves one generate call (and no beam search)")
            feed = {"input_ids": input_ids[:, -1:]}
            mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)
            position = self._position[:, -1:] + 1
        prefill = routing_context(self.lm, mask=mask) if self._cache is None else contextlib.nullcontext()
        with apply_overrides(self.plan), prefill:  # decode steps match no context mask (as in generate)
            out = self.lm(**feed, attention_mask=mask, position_ids=position, past_key_values=self._cache, use_cache=True)
        self._cache, self._mask, self._position, self._seen = out.past_key_values, mask, position, n
        return out.logits[:, -1, :]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """`input_ids [B, n]` (the tokens so far), `scores [B, V]` (strong logits) -> `[B, V]` SCMoE scores."""
        with torch.no_grad():
            weak = self._weak_logits(input_ids)
        return scmoe_scores(scores, weak, self.beta, self.alpha)


@torch.no_grad()
def scmoe_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   weak: Mapping | None = None, beta: float = 0.5, alpha: float = 0.1,
                   images: torch.Tensor | None = None, audio: torch.Tensor | None = None,
                   encoder_features: dict[str, torch.Tensor] | None = None, **generate_kwargs) -> torch.Tensor:
    """Generate with SCMoE decoding; returns what the model's own `generate` returns.

    Args:
        model: an `MoECausalLM`, a `MultimodalMoE` with an MoE LM, or a transformers causal LM
            whose MLPs are `SparseMoE` layers.
        input_ids: `[B, S]` prompt (with media placeholders for a `MultimodalMoE`).
        attention_mask: `[B, S]`.
        weak: `override_routing` keywords of the weak activation (default top-1).
        beta: contrast strength, >= 0 (0: greedy).
        alpha: plausibility cut, in [0, 1].
        images, audio, encoder_features: media of a `MultimodalMoE` prompt.
        **generate_kwargs: transformers `generate` options (`max_new_tokens`, `do_sample`, ...;
            more `logits_processor`s run after SCMoE's).

    Raises:
        ValueError: beta < 0, alpha outside [0, 1], a bad weak override (see `override_routing`),
            or beam search.
    """
    check_contrast(beta, alpha)
    beams = generate_kwargs.get("num_beams", 1)
    if beams != 1:
        raise ValueError(f"scmoe_generate: num_beams={beams}: SCMoE's weak pass keeps its own cache, which beam "
                         "search's reordering would break; use num_beams=1 (greedy or sampling)")
    lm = _causal_lm(model)
    extra = list(generate_kwargs.pop("logits_processor", None) or [])
    if isinstance(model, MultimodalMoE):
        s = model.splice(input_ids, attention_mask, images=images, audio=audio, padding_side="left",
                         encoder_features=encoder_features)
        processor = SCMoELogitsProcessor(lm, weak=weak, beta=beta, alpha=alpha, prompt_embeds=s.inputs_embeds,
                                         prompt_mask=s.attention_mask)
        return model.language_model.generate(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask,
                                             logits_processor=LogitsProcessorList([processor, *extra]), **generate_kwargs)
    if images is not None or audio is not None or encoder_features is not None:
        raise ValueError(f"scmoe_generate: media given, but {type(model).__name__} is not a MultimodalMoE")
    processor = SCMoELogitsProcessor(lm, weak=weak, beta=beta, alpha=alpha, prompt_mask=attention_mask)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                          logits_processor=LogitsProcessorList([processor, *extra]), **generate_kwargs)


__all__ = ["DEFAULT_WEAK", "SCMoELogitsProcessor", "check_contrast", "scmoe_generate", "scmoe_scores"]
