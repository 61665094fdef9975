"""Multi-adapter serving: one base MoE and many ESFT expert adapters in one batch (ExpertWeave).

ExpertWeave (2025, "ExpertWeave: Efficiently Serving Expert-Specialized Fine-Tuned Adapters at
Scale"): ESFT adapters (`zoo.transforms.esft`) replace a few routed experts of a base MoE and leave
its routers alone, so many of them can share one copy of the base. Each MoE layer gets one expert
pool holding the base's E experts and every adapter's replacement rows, and a remap table; a token
is routed by the base router as usual, and its expert ids are then sent to its request's adapter's
copy of each expert. Every request's output equals that of the merged model of its adapter
(`apply_expert_adapter` on a copy of the base), at the memory of one base plus the adapters' rows.

What we chose where the paper is specific to its system:

- The pool is one stacked `[E + R_l, ...]` parameter per layer (R_l: the adapters' rows for layer
  l, packed back to back in adapter order), built once when the server is made. The paper's
  virtual-memory weight manager exists to add and drop adapters at run time without fragmentation;
  here the adapter set is fixed per server (make a new one to change it), so plain concatenation
  has no fragmentation and no padding to the largest adapter.
- Rerouting is a gather from a `[A + 1, E]` table (row 0: the base, the identity; row a: adapter a,
  expert e -> its pool row) by the token's adapter id, done in PyTorch between the router and the
  experts (`SparseMoE(expert_map=...)`) instead of the paper's fused kernel; the experts then run
  through the same dropless op (and Triton kernels on CUDA) as always, over the bigger pool.
- The per-token adapter id reaches every MoE layer as the `adapter` entry of `routing_context`,
  like the padding mask. A call with no adapter ids is refused rather than served by the base,
  so a forgotten id cannot silently answer with the wrong model.
- Adapters must carry expert rows only: ESFT trains no router, so a tensor that is not a stacked
  expert parameter of an MoE layer (a router row, say) is refused, naming it.

`generate(server, prompts, adapters=[...])` is greedy decoding of a batch that mixes adapters
(left padding, a KV cache; each step hands the step's adapter ids to the layers).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from zoo.io.checkpoint import CheckpointError, weights_identity
from zoo.io.expert_adapter import ExpertAdapter, read_expert_adapter
from zoo.models.lm import MoECausalLM
from zoo.moe.context import routing_context
from zoo.transforms.esft import stacked_params

ADAPTER_KEY = "adapter"  # the routing_context entry: per-token adapter index, 0 = the base


class AdapterExpertMap(nn.Module):
    """Reroute a layer's expert ids to pool rows by each token's adapter: `table[adapter[t], e]`.

    Args:
        table: `[A + 1, E]` long; row 0 is the base (the identity), row a maps adapter a's experts
            to their pool rows and every other expert to the base's.
    """

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table.long(), persistent=False)  # a serving layout, not a weight

    def forward(self, indices: torch.Tensor, context: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Map the router's choices.

        Args:
            indices: `[T, K]` expert ids in `[0, E)`, -1 for an empty slot (kept).
            context: the layer's per-token tensors; `context["adapter"]` `[T]` is each token's
                adapter index in `[0, A]` (checked by the server, not here: no host sync per layer).

        Returns:
            `[T, K]` rows of the expert pool.

        Raises:
            ValueError: the call has no adapter ids.
        """
        adapter = context.get(ADAPTER_KEY)
        if adapter is None:
            raise ValueError(f"this MoE layer serves {self.table.shape[0] - 1} expert adapters and got no per-token "
                             f"adapter ids: pass them as routing_context(..., {ADAPTER_KEY}=[B, S]) "
                             "(MultiAdapterMoE.forward and generate do)")
        e = self.table.shape[1]
        flat = adapter.to(self.table.device).long().unsqueeze(-1) * e + indices.clamp(min=0)  # [T, K]
        return torch.where(indices >= 0, self.table.reshape(-1)[flat], indices)

    def extra_repr(self) -> str:
        return f"adapters={self.table.shape[0] - 1}, num_experts={self.table.shape[1]}"


class MultiAdapterMoE(nn.Module):
    """A base `MoECausalLM` serving many ESFT expert adapters at once from one expert pool.

    Built in place: each MoE layer's stacked experts grow to `E + R_l` rows (the base's, then each
    adapter's replacements in the order given) and the layer gets an `AdapterExpertMap`; routers
    and every other weight are the base's, untouched. Keep no other reference to `model`: it now
    needs adapter ids on every call.

    Args:
        model: the base, loaded from `base_dir` (an `MoECausalLM`, e.g. `load_moe_lm(base_dir)[0]`).
        adapters: adapter id -> an `ExpertAdapter` or an adapter directory (`read_expert_adapter`).
        base_dir: the checkpoint `model` was loaded from; every adapter's `base_sha256` must be its
            `weights_identity`.

    Raises:
        CheckpointError: an adapter was made for another base (its id and both hashes named), or
            an adapter directory is corrupt.
        ValueError: no adapters, an id that is not a non-empty string, a model that is not an
            `MoECausalLM`, is pooled already or holds expert-parallel shards, an adapter whose layers, experts, tensors or shapes
            do not fit the model (named), or one that carries non-expert tensors (router rows).
    """

    def __init__(self, model: nn.Module, adapters: Mapping[str, ExpertAdapter | str | os.PathLike],
                 base_dir: str | os.PathLike) -> None:
        super().__init__()
        if not isinstance(model, MoECausalLM):
            raise ValueError(f"multi-adapter serving takes an MoECausalLM, got {type(model).__name__}")
        if not adapters:
            raise ValueError("multi-adapter serving: no adapters given (serve the base model alone)")
        bad = [k for k in adapters if not isinstance(k, str) or not k]
        if bad:
            raise ValueError(f"multi-adapter serving: adapter ids must be non-empty strings (None is the base), got {bad}")
        layers = model.moe_layers()
        sharded = [i for i, moe in layers.items() if hasattr(moe.experts, "num_local_experts")]
        if sharded:
            raise ValueError(f"multi-adapter serving: MoE layers {sharded} hold an expert-parallel shard "
                             "(shard_experts): serving pools whole, unsharded expert stacks only")
        pooled = [i for i, moe in layers.items() if moe.expert_map is not None]
        if pooled:
            raise ValueError(f"multi-adapter serving: MoE layers {pooled} already have an expert map (pooled twice?)")
        have = weights_identity(base_dir)
        read = {}
        for name, adapter in adapters.items():
            read[name] = adapter if isinstance(adapter, ExpertAdapter) else read_expert_adapter(adapter)
            if read[name].base_sha256 != have:
                raise CheckpointError(f"expert adapter {name!r} was made for base {read[name].base_sha256}, "
                                      f"but the served base {str(base_dir)!r} is {have}")
            _check_adapter(name, read[name], layers)
        self.model = model
        self.adapter_names: tuple[str, ...] = tuple(read)
        self.num_base_experts = {i: moe.experts.num_experts for i, moe in layers.items()}
        for i, moe in layers.items():
            _pool_layer(i, moe, list(read.values()))

    @property
    def config(self):
        """The wrapped transformers model's config."""
        return self.model.config

    def adapter_ids(self, adapters: Sequence[str | None]) -> torch.Tensor:
        """Each request's adapter index `[B]` (0: the base, for None; a: the a-th adapter id).

        Raises:
            ValueError: an adapter id this server does not hold (named with the request and the ids it holds).
        """
        index = {name: a for a, name in enumerate(self.adapter_names, start=1)}
        out = []
        for r, name in enumerate(adapters):
            if name is not None and name not in index:
                raise ValueError(f"request {r} names adapter {name!r}, unknown to this server; it holds "
                                 f"{list(self.adapter_names)} (None: the base)")
            out.append(0 if name is None else index[name])
        return torch.tensor(out, dtype=torch.long)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                adapters: Sequence[str | None], **kwargs):
        """The LM's forward with each row served by its adapter.

        Args:
            input_ids: `[B, S]`.
            attention_mask: `[B, S]`, 1 for real tokens.
            adapters: B adapter ids (None: the base).
            **kwargs: passed to the transformers model (`position_ids`, `past_key_values`, ...).

        Returns:
            The transformers output (`logits [B, S, V]`, `past_key_values`).
        """
        ids = self._per_token(adapters, input_ids)
        with routing_context(self.model.lm, mask=attention_mask, **{ADAPTER_KEY: ids}):
            return self.model.lm(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _per_token(self, adapters: Sequence[str | None], input_ids: torch.Tensor) -> torch.Tensor:
        if len(adapters) != input_ids.shape[0]:
            raise ValueError(f"multi-adapter serving: {len(adapters)} adapter ids for a batch of {input_ids.shape[0]} requests")
        return self.adapter_ids(adapters).to(input_ids.device)[:, None].expand(input_ids.shape)  # [B, S]

    def expert_bytes(self) -> int:
        """Bytes of the stacked expert weights in the pool (base experts + every adapter's rows)."""
        return sum(p.numel() * p.element_size() for moe in self.model.moe_layers().values()
                   for p in stacked_params(moe).values())

    def base_expert_bytes(self) -> int:
        """Bytes of the base's stacked expert weights alone: what one merged copy holds."""
        total = 0
        for i, moe in self.model.moe_layers().items():
            e, rows = self.num_base_experts[i], moe.experts.num_experts
            total += sum(p.numel() * p.element_size() * e // rows for p in stacked_params(moe).values())
        return total


def _check_adapter(name: str, adapter: ExpertAdapter, layers: Mapping[int, nn.Module]) -> None:
    """Refuse an adapter whose layers, expert ids, tensors or shapes do not fit the base's MoE layers."""
    where = f"expert adapter {name!r}"
    for layer, ids in adapter.experts.items():
        if layer not in layers:
            raise ValueError(f"{where}: layer {layer} is not an MoE layer (MoE layers: {sorted(layers)})")
        e = layers[layer].experts.num_experts
        out = [i for i in ids if not 0 <= i < e]
        if out:
            raise ValueError(f"{where}: layer {layer} has experts 0..{e - 1}, not {out}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where}: layer {layer} lists an expert twice: {ids}")
    expected = {f"{layer}/{p}": (len(ids), *t.shape[1:]) for layer, ids in adapter.experts.items()
                for p, t in stacked_params(layers[layer]).items()}
    extra = sorted(set(adapter.tensors) - set(expected))
    if extra:
        raise ValueError(f"{where} carries tensors that are not rows of its layers' stacked experts: {extra}; ESFT "
                         f"trains experts only and serving shares the base's routers, so such an adapter cannot be served")
    for key, shape in expected.items():
        if key not in adapter.tensors:
            raise ValueError(f"{where}: no tensor {key!r} (it has {sorted(adapter.tensors)})")
        if tuple(adapter.tensors[key].shape) != shape:
            raise ValueError(f"{where}: {key} has shape {tuple(adapter.tensors[key].shape)}, the model's experts need {shape}")


def _pool_layer(layer: int, moe: nn.Module, adapters: Sequence[ExpertAdapter]) -> None:
    """Grow `moe`'s stacked experts by every adapter's rows for `layer` and give it the remap table."""
    experts = moe.experts
    e = experts.num_experts
    params = stacked_params(moe)
    table = torch.arange(e).repeat(len(adapters) + 1, 1)  # [A + 1, E]
    chunks = {name: [p.detach()] for name, p in params.items()}
    row = e
    for a, adapter in enumerate(adapters, start=1):
        ids = adapter.experts.get(layer, [])
        for j, expert in enumerate(ids):
            table[a, expert] = row + j
        for name, p in params.items():
            if ids:
                chunks[name].append(adapter.tensors[f"{layer}/{name}"].to(device=p.device, dtype=p.dtype))
        row += len(ids)
    for name, parts in chunks.items():
        setattr(experts, name, nn.Parameter(torch.cat(parts), requires_grad=False))  # [E + R_l, ...]
    experts.num_experts = row
    moe.expert_map = AdapterExpertMap(table.to(next(iter(params.values())).device))


def left_pad(prompts: Sequence[Sequence[int] | torch.Tensor], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts of different lengths, padded on the left.

    Returns:
        input_ids `[B, S_max]` and attention_mask `[B, S_max]` (0 on padding).

    Raises:
        ValueError: no prompts, or an empty one (named).
    """
    rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
    if not rows:
        raise ValueError("generate: no prompts")
    empty = [i for i, r in enumerate(rows) if r.numel() == 0]
    if empty:
        raise ValueError(f"generate: prompts {empty} are empty")
    s = max(r.numel() for r in rows)
    ids = torch.full((len(rows), s), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), s), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, s - r.numel():] = r
        mask[i, s - r.numel():] = 1
    return ids, mask


def _eos_ids(lm: nn.Module, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]


@torch.no_grad()
def generate(model: MultiAdapterMoE | MoECausalLM, batch: Sequence[Sequence[int] | torch.Tensor] | Mapping[str, torch.Tensor],
             adapters: Sequence[str | None] | None = None, *, max_new_tokens: int = 16,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0) -> list[list[int]]:
    """Greedy decoding of a batch whose requests name their adapters (one forward per step for all).

    Args:
        model: a `MultiAdapterMoE`, or a plain `MoECausalLM` (then `adapters` must be None or all
            None: the adapter-by-adapter baseline runs the same loop on each merged model).
        batch: prompts (token id lists or 1-D tensors, any lengths; padded on the left here), or
            `{"input_ids": [B, S], "attention_mask": [B, S]}` already padded on the left.
        adapters: B adapter ids (None: the base); default: the base for every request.
        max_new_tokens: new tokens per request, >= 1.
        eos_token_id: a request stops after emitting one of these; default the LM's
            `generation_config.eos_token_id`; `[]`: never stop early.
        pad_token_id: what left padding holds (never attended to).

    Returns:
        Per request, its new tokens (up to and including its end-of-sequence token), as transformers'
        greedy `generate` of that request alone on its adapter's merged model gives them.

    Raises:
        ValueError: a bad `max_new_tokens`, a batch padded on the right, adapter ids that do not
            match the batch or are unknown to the server (named).
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(batch, Mapping):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        if not bool((mask[:, -1] == 1).all()):
            raise ValueError("generate: the batch is padded on the right (attention_mask[:, -1] has zeros); "
                             "pad on the left")
    else:
        ids, mask = left_pad(batch, pad_token_id)
    b = ids.shape[0]
    if isinstance(model, MultiAdapterMoE):
        lm = model.model.lm
        which = model._per_token([None] * b if adapters is None else adapters, ids)[:, :1]  # [B, 1]
    elif isinstance(model, MoECausalLM):
        if adapters is not None and any(a is not None for a in adapters):
            raise ValueError(f"generate: adapters {sorted({a for a in adapters if a is not None})} given for a plain "
                             "MoECausalLM (serve them with MultiAdapterMoE, or merge one with apply_expert_adapter)")
        lm, which = model.lm, None
    else:
        raise ValueError(f"generate takes a MultiAdapterMoE or an MoECausalLM, got {type(model).__name__}")
    device = next(lm.parameters()).device
    ids, mask = ids.to(device), mask.to(device).long()
    which = None if which is None else which.to(device)
    eos = torch.tensor(_eos_ids(lm, eos_token_id), dtype=torch.long, device=device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # [B, S]: each request counts from its first real token
    step_ids, step_mask, cache = ids, mask, None
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out_tokens = []
    for _ in range(max_new_tokens):
        context = {"mask": step_mask}
        if which is not None:
            context[ADAPTER_KEY] = which.expand(step_ids.shape)  # [B, S_step]
        with routing_context(lm, **context):
            out = lm(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1].float().argmax(-1)  # [B]
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        out_tokens.append(nxt)
        done = done | torch.isin(nxt, eos)
        if bool(done.all()):
            break
        step_ids, step_mask = nxt[:, None], torch.ones(b, 1, dtype=torch.long, device=device)
        mask = torch.cat([mask, step_mask], dim=1)
        positions = positions[:, -1:] + 1
    tokens = torch.stack(out_tokens, dim=1).tolist()  # [B, n]
    result = []
    stop = set(eos.tolist())
    for row in tokens:
        cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        result.append(row[:cut])
    return result


__all__ = ["ADAPTER_KEY", "AdapterExpertMap", "MultiAdapterMoE", "generate", "left_pad"]
