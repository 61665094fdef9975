"""The LM loss without the full logits: a fused linear + cross-entropy over chunks of tokens.

transformers' causal-LM loss makes `[tokens, V]` logits, casts them to fp32, log-softmaxes them
and differentiates that: at 1024 tokens and SmolLM2's 49,152-token vocabulary that is 100 MB of
bf16 logits and three 200 MB fp32 tensors per step, all memory traffic. `linear_cross_entropy`
computes the loss a chunk of rows at a time and, when a gradient is wanted, the gradients of the
hidden states and of the head in the same pass (Liger-Kernel's fused linear cross-entropy): at
most `[chunk, V]` fp32 logits exist at once (the head's gradient keeps `[rows, V]` in the GEMM
dtype, bf16 under autocast, up to 2048 rows), the head's three GEMMs run once each, and rows whose
label is ignored (prompts, padding) never reach the head.

`causal_lm_loss` is the same loss as transformers' `ForCausalLM` forward (labels shifted inside,
mean over the tokens that count) computed from the decoder's last hidden states.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

IGNORE_INDEX = -100  # label value that takes no loss (transformers' convention)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's GEMMs run in: autocast's when it is on, else the inputs' promoted dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


_GRAD_ROWS = 2048  # rows whose head gradient one GEMM computes (a [rows, V] buffer in the GEMM dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and (when needed) its gradients in one pass over row chunks; backward only scales them.

    Per chunk of rows: logits `[c, V]` by one GEMM into a reused buffer, log-softmax in fp32 (at
    least) into another, the loss from it, then in place the gradient `(softmax - onehot) / n` in
    fp32, cast to the GEMM dtype (what autocast's backward of `.float()` does), and the hidden
    states' gradient by one GEMM. The head's gradient is one GEMM per `_GRAD_ROWS` rows over their
    kept chunk gradients (as the plain loss's backward: one GEMM over all rows). Buffers are reused
    across chunks: on CPU a fresh 50 MB tensor costs more in page faults than the softmax on it.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, softcap: float | None, dtype: torch.dtype):
        # hidden [n, d] (rows that count only), weight [V, d], bias [V] | None, labels [n]
        n, d = hidden.shape
        vocab = weight.shape[0]
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        want = want_h or want_w or want_b
        acc = torch.promote_types(dtype, torch.float32)  # softmax, loss and bias gradient: fp32 at least
        device = hidden.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        grad_h = grad_w = grad_b = None
        with torch.autocast(device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            c0 = max(1, min(chunk_size, n))
            logits = torch.empty(c0, vocab, dtype=dtype, device=device)
            upcast = torch.empty(c0, vocab, dtype=acc, device=device) if acc != dtype else None
            logp = torch.empty(c0, vocab, dtype=acc, device=device)  # log-softmax, then the gradient
            rows = torch.arange(c0, device=device)
            group = max(1, min(n, max(_GRAD_ROWS, c0)))
            kept = torch.empty(group, vocab, dtype=dtype, device=device) if want_w else None
            if want_h:
                grad_h = torch.empty(n, d, dtype=dtype, device=device)
            if want_b:
                grad_b = torch.zeros(vocab, dtype=acc, device=device)
            for g0 in range(0, n, group):  # row groups sharing one head-gradient GEMM
                g1 = min(g0 + group, n)
                for s in range(g0, g1, c0):
                    e = min(s + c0, g1)
                    c, ys = e - s, labels[s:e]
                    z = logits[:c]
                    torch.mm(h[s:e], w.T, out=z)  # [c, V]
                    if b is not None:
                        z.add_(b)
                    x = z if upcast is None else upcast[:c].copy_(z)
                    t = None
                    if softcap is not None:  # Gemma's final-logit soft cap: cap * tanh(z / cap)
                        t = torch.tanh(x / softcap)
                        x = t * softcap
                    lp = logp[:c]
                    torch.log_softmax(x, dim=-1, out=lp)
                    total -= lp.gather(1, ys[:, None]).sum(dtype=torch.float64)
                    if not want:
                        continue
                    g = lp.exp_()  # softmax
                    g[rows[:c], ys] -= 1.0
                    if t is not None:
                        g.mul_(1.0 - t * t)
                    g.mul_(1.0 / n)
                    if want_b:
                        grad_b += g.sum(0)
                    if want_w:
                        g = kept[s - g0 : e - g0].copy_(g)
                    elif upcast is not None:
                        g = z.copy_(g)  # the logits are spent: their buffer takes the gradient
                    if want_h:
                        torch.mm(g, w, out=grad_h[s:e])
                if want_w:
                    part = kept[: g1 - g0].T @ h[g0:g1]  # [V, d]
                    if g1 == n and g0 == 0:
                        grad_w = part
                    elif grad_w is None:
                        grad_w = part.to(acc)
                    else:
                        grad_w += part
        loss = (total / n).to(acc) if n else torch.full((), float("nan"), dtype=acc, device=device)
        ctx.save_for_backward(
            grad_h.to(hidden.dtype) if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        scale = None if float(grad_loss) == 1.0 else grad_loss
        grads = [g if g is None or scale is None else g * scale.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 256,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` against `labels`, chunk by chunk.

    Equals `F.cross_entropy((hidden @ weight.T + bias).float(), labels, ignore_index=...)` (and its
    gradients) without ever holding more than `[chunk_size, V]` fp32 logits. The GEMMs run in
    autocast's dtype when autocast is on (as `nn.Linear` would), else in the inputs' dtype; the
    softmax runs in fp32, and the head's gradient is accumulated over chunks in fp32.

    Args:
        hidden: `[N, d]` hidden states (any leading shape is flattened with `labels`).
        weight: `[V, d]` output head (tied or not).
        labels: `[N]` target ids, `ignore_index` where no loss is taken.
        bias: `[V]` head bias, if any.
        chunk_size: rows per chunk.
        ignore_index: label value that takes no loss.
        softcap: final-logit soft cap `c` (logits become `c * tanh(z / c)`), e.g. Gemma 2/3's.

    Returns:
        Scalar fp32 loss; NaN when no label counts (as torch's mean cross-entropy).
    """
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    d = hidden.shape[-1]
    hidden, labels = hidden.reshape(-1, d), labels.reshape(-1)
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"linear_cross_entropy: {hidden.shape[0]} hidden rows but {labels.shape[0]} labels")
    keep = labels != ignore_index
    rows = keep.nonzero().squeeze(1)  # [n]
    return _LinearCrossEntropy.apply(hidden.index_select(0, rows), weight, bias, labels[rows], chunk_size, softcap,
                                     _compute_dtype(hidden, weight))


def head_of(lm: nn.Module) -> tuple[nn.Module, nn.Linear, float | None]:
    """`(decoder, head, softcap)` of a transformers causal LM, for `causal_lm_loss`.

    Raises:
        ValueError: the LM's output head is not a plain `nn.Linear` (e.g. a LoRA-wrapped head), or
            its logits are transformed in a way the fused loss does not reproduce (both named).
    """
    head = lm.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(f"the fused LM loss needs a plain nn.Linear output head; {type(lm).__name__}'s is "
                         f"{type(head).__name__} (train with lm_loss_chunk: 0)")
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    for field in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(config, field, None) not in (None, 1, 1.0):
            raise ValueError(f"the fused LM loss does not apply {type(lm).__name__}'s {field}={getattr(config, field)} "
                             f"(train with lm_loss_chunk: 0)")
    return lm.get_decoder(), head, getattr(config, "final_logit_softcapping", None)


def causal_lm_loss(lm: nn.Module, labels: torch.Tensor, *, chunk_size: int, **inputs) -> CausalLMOutputWithPast:
    """transformers' causal-LM forward with labels, its loss fused with the head (no logits returned).

    The loss equals `lm(**inputs, labels=labels).loss`: next-token cross-entropy with the labels
    shifted inside, averaged over the positions whose shifted label is not `IGNORE_INDEX`.

    Args:
        lm: a transformers `*ForCausalLM` (see `head_of` for what is refused).
        labels: `[B, S]` token ids, `IGNORE_INDEX` where no loss is taken.
        chunk_size: rows per chunk of `linear_cross_entropy`.
        **inputs: the decoder's inputs (`input_ids` or `inputs_embeds`, `attention_mask`, ...).

    Returns:
        `CausalLMOutputWithPast` with `loss` and `past_key_values`; `logits` is None.
    """
    decoder, head, softcap = head_of(lm)
    out = decoder(**inputs)
    hidden = out.last_hidden_state  # [B, S, d]
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # [B, S]: the next token
    loss = linear_cross_entropy(hidden, head.weight, shifted.to(hidden.device), bias=head.bias, chunk_size=chunk_size,
                                softcap=softcap)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None))


__all__ = ["IGNORE_INDEX", "causal_lm_loss", "head_of", "linear_cross_entropy"]
