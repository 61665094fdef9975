"""Sparse upcycling: turn a dense transformers causal LM into a sparse MoE LM (`UPCYCLERS`).

A transform over a built model (not a twin builder): each chosen decoder layer's dense FFN becomes
a `SparseMoE` whose experts an upcycler initializes from it, and a router is added (Komatsuzaki
et al. 2022, "Sparse Upcycling"; MoE-LLaVA stage 3). The FFN may be of any kind `ffn_spec` reads
(Llama/Qwen2/Mistral SwiGLU, Gemma GeGLU, Phi-3's fused `gate_up_proj`, Phi's fc1/fc2, GPT-2's
Conv1D); with `MoEConfig.experts == "auto"` the expert kind that holds it is chosen and recorded in
the returned model's config. Upcyclers are `UPCYCLERS` entries:

- `copy`: every expert is a copy of the dense FFN, so with renormalized top-k weights the
  upcycled model computes exactly what the dense one did, whatever the router says. Given
  specialized FFN copies (`expert_seeds`, Uni-MoE stage 2, MedPLIB), expert j copies copy j mod n
  instead (`upcycle_from_experts`).
- `noisy`: copies made different so experts can diverge: Gaussian noise scaled to each weight's
  std, or Drop-Upcycling's partial re-initialization.
- `split`: granularity decomposition (EMoE, FactorLLM, Dynamic-DINO): the FFN's f neurons
  partitioned into E experts of width f/E.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zoo.models.lm import MoEBlock, MoECausalLM, decoder_layers
from zoo.models.mlp import FFNSpec, ffn_spec
from zoo.moe.config import MoEConfig
from zoo.moe.experts import EXPERTS, copy_expert, expert_kind_for, neuron_rows
from zoo.moe.layer import build_sparse_moe
from zoo.registry import Registry

UPCYCLERS: Registry = Registry("upcycler")

ExpertSeeds = list  # n specialized FFN copies: models, or {layer index: FFN state dict | module}


def _generator(seed: int, layer: int) -> torch.Generator:
    """A CPU generator for layer `layer` of an upcycler seeded with `seed` (layers draw independently)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer)


@UPCYCLERS.register("copy")
@dataclass
class CopyUpcycler:
    """Experts start as copies of the dense FFN (or of specialized copies of it).

    Sparse Upcycling (Komatsuzaki et al. 2022): with renormalized top-k weights the MoE equals the
    dense FFN at initialization. With `seeds` (n specialized copies, each a 1-expert module of the
    same kind), expert j starts from copy `j % n` (Uni-MoE stage 2); the model then no longer equals
    the dense one at init.
    """

    preserves_dense = True  # without seeds

    def expert_width(self, spec: FFNSpec, cfg: MoEConfig, where: str) -> int:
        """Width of each expert: the dense FFN's (the experts are copies of it)."""
        f = spec.intermediate_size
        if cfg.expert_intermediate_size not in (None, f):
            raise ValueError(f"{where}: upcycler 'copy' copies the dense FFN (width {f}) into each expert, but "
                             f"expert_intermediate_size={cfg.expert_intermediate_size}")
        return f

    def experts(self, mlp: nn.Module, cfg: MoEConfig, *, layer: int, seeds: list | None = None, calibration=None) -> nn.Module:
        """The experts module for decoder layer `layer`, initialized from its dense `mlp`."""
        experts = EXPERTS.get(cfg.experts).from_dense(mlp, cfg.num_experts)
        for e in range(cfg.num_experts if seeds else 0):
            copy_expert(experts, e, seeds[e % len(seeds)])
        return experts

    def init_router(self, router: nn.Module, experts: nn.Module, cfg: MoEConfig) -> None:
        """Copies need no special router: it keeps its fresh initialization."""


@dataclass
class NoisyUpcycler(CopyUpcycler):
    """Copies of the dense FFN, perturbed so that experts can diverge; the seed makes it reproducible.

    Modes:
        noise: every weight matrix of every expert gets `N(0, (scale * std(W))^2)` noise, with
            std(W) the dense matrix's own std (biases are left exact). All experts are perturbed,
            none privileged (a choice: papers that add noise to upcycled copies do not say).
        drop: Drop-Upcycling (Nakamura et al., ICLR 2025, "Drop-Upcycling: Training Sparse Mixture of
            Experts with Partial Re-initialization"): for each expert, a random subset of
            `round(ratio * f)` intermediate neurons is re-initialized: their rows of the input
            projection(s) (gate and up separately) and their column of the output projection drawn
            from `N(mean(W), std(W)^2)` of that dense matrix; ratio 0 is `copy`, ratio 1 a random
            init with the dense statistics. Biases of dropped neurons are kept (the paper's models
            have none).

    Attributes:
        mode: "noise" or "drop".
        scale: noise std relative to each matrix's std (mode "noise").
        ratio: r, the fraction of each expert's neurons re-initialized (mode "drop").
        seed: the perturbation seed (recorded in the stage options; layers draw independently).
    """

    mode: str = "noise"
    scale: float = 0.01
    ratio: float = 0.5
    seed: int = 0

    preserves_dense = False

    def __post_init__(self) -> None:
        if self.mode not in ("noise", "drop"):
            raise ValueError(f"noisy upcycler: mode={self.mode!r} is not 'noise' or 'drop'")
        if not self.scale >= 0:
            raise ValueError(f"noisy upcycler: scale must be >= 0, got {self.scale}")
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"noisy upcycler: ratio must be in [0, 1], got {self.ratio}")

    def experts(self, mlp: nn.Module, cfg: MoEConfig, *, layer: int, seeds: list | None = None, calibration=None) -> nn.Module:
        experts = super().experts(mlp, cfg, layer=layer, seeds=seeds)
        g = _generator(self.seed, layer)
        w_in, w_out = getattr(experts, experts.in_proj), getattr(experts, experts.out_proj)  # [E, f|2f, d], [E, d, f]
        f = experts.intermediate_size
        ins = [(0, f), (f, 2 * f)] if experts.gated else [(0, f)]
        with torch.no_grad():
            for e in range(cfg.num_experts):
                if self.mode == "noise":
                    for w in (w_in, w_out):
                        noise = torch.randn(w[e].shape, generator=g) * (self.scale * w[e].float().std().item())
                        w[e].add_(noise.to(w.dtype))
                    continue
                drop = torch.randperm(f, generator=g)[: round(self.ratio * f)]
                for lo, hi in ins:
                    block = w_in[e, lo:hi]
                    block[drop] = _like_stats(block, (len(drop), block.shape[1]), g)
                w_out[e][:, drop] = _like_stats(w_out[e], (w_out.shape[1], len(drop)), g)
        return experts


UPCYCLERS.register("noisy", options=NoisyUpcycler, example={"mode": "drop", "ratio": 0.5})(NoisyUpcycler)


def _like_stats(w: torch.Tensor, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Samples of `N(mean(w), std(w)^2)` of shape `shape` in `w`'s dtype."""
    w32 = w.float()
    return (torch.randn(shape, generator=g) * w32.std().item() + w32.mean().item()).to(w.dtype)


@dataclass
class SplitUpcycler:
    """Granularity decomposition: the dense FFN's f neurons partitioned into E experts of width f/E.

    EMoE (Qiu et al., 2024, "Unlocking Emergent Modularity in Large Language Models"), FactorLLM
    (Zhao et al., 2024) and Dynamic-DINO (Lu et al., ICCV 2025) build fine-grained experts from one
    FFN: expert e holds the rows of the input projection(s) and the columns of the output projection
    for its neurons, so the experts' outputs summed (all active, unit weights) equal the dense FFN
    exactly (the output bias is shared out as b/E per expert).

    Partitions: `random` (a seeded permutation) or `coactivation`: neurons clustered by their
    activation profiles `|act(gate x) * up x|` (plain: `|act(fc1 x)|`) on calibration tokens
    (`upcycle(calibration=...)`) with balanced spherical k-means, as MoEfication / EMoE cluster
    co-activated neurons.

    Start close to dense with k < E (our choice; the papers leave the router's form open or differ):
    each expert's output projection is multiplied by `top_k` (`output_scale="top_k"`), so
    renormalized top-k weights near 1/k give unit weights to the chosen pieces; and the router's
    row e is the mean of expert e's gate (plain: fc1) rows times `router_scale`, so a token picks
    the pieces its neurons respond to while the weights stay near uniform. With k = E the start is
    then exactly dense. Routers without a `[E, d]` `weight` keep their own initialization.

    Attributes:
        partition: "random" or "coactivation".
        seed: the partition (and k-means) seed.
        output_scale: "top_k" or "none" (experts unscaled: all active with unit weights == dense).
        router_scale: scale of the gate-mean router rows.
    """

    partition: str = "random"
    seed: int = 0
    output_scale: str = "top_k"
    router_scale: float = 0.1

    preserves_dense = False  # only with k = E (see above)

    def __post_init__(self) -> None:
        if self.partition not in ("random", "coactivation"):
            raise ValueError(f"split upcycler: partition={self.partition!r} is not 'random' or 'coactivation'")
        if self.output_scale not in ("top_k", "none"):
            raise ValueError(f"split upcycler: output_scale={self.output_scale!r} is not 'top_k' or 'none'")

    @property
    def needs_calibration(self) -> bool:
        return self.partition == "coactivation"

    def expert_width(self, spec: FFNSpec, cfg: MoEConfig, where: str) -> int:
        f, n = spec.intermediate_size, cfg.num_experts
        if f % n:
            raise ValueError(f"{where}: upcycler 'split' partitions the FFN's {f} neurons into num_experts={n} "
                             f"experts of equal width, but {n} does not divide {f}")
        if cfg.expert_intermediate_size not in (None, f // n):
            raise ValueError(f"{where}: upcycler 'split' makes experts of width {f}/{n} = {f // n}, but "
                             f"expert_intermediate_size={cfg.expert_intermediate_size}")
        return f // n

    def groups(self, mlp: nn.Module, cfg: MoEConfig, layer: int, calibration: torch.Tensor | None) -> torch.Tensor:
        """`[E, f/E]` neuron indices of each expert."""
        spec = ffn_spec(mlp, f"split upcycler: layer {layer}'s mlp")
        f, n = spec.intermediate_size, cfg.num_experts
        g = _generator(self.seed, layer)
        if self.partition == "random":
            return torch.randperm(f, generator=g).reshape(n, f // n)
        if calibration is None:
            raise ValueError("split upcycler: partition='coactivation' needs calibration inputs "
                             "(upcycle(calibration=input_ids); the moe-tune stage passes a batch of its training data)")
        profiles = neuron_activations(spec, calibration.to(spec.w_in.dtype)).t()  # [f, N]
        return balanced_kmeans(profiles, n, g).argsort(stable=True).reshape(n, f // n)

    def experts(self, mlp: nn.Module, cfg: MoEConfig, *, layer: int, seeds: list | None = None, calibration=None) -> nn.Module:
        if seeds:
            raise ValueError("split upcycler: specialized expert seeds are not split (use 'copy' or 'noisy' with them)")
        whole = EXPERTS.get(cfg.experts).from_dense(mlp, 1)
        groups = self.groups(mlp, cfg, layer, calibration)
        n, width = groups.shape
        ref = getattr(whole, whole.in_proj)
        experts = EXPERTS.build(cfg.experts, cfg.experts_options, num_experts=n, hidden_size=whole.hidden_size,
                                intermediate_size=width).to(device=ref.device, dtype=ref.dtype)
        scale = float(cfg.router_options.get("top_k", 1)) if self.output_scale == "top_k" else 1.0
        w_in, w_out = getattr(whole, whole.in_proj)[0], getattr(whole, whole.out_proj)[0]
        with torch.no_grad():
            for e in range(n):
                rows = neuron_rows(whole, groups[e])
                getattr(experts, experts.in_proj)[e].copy_(w_in[rows])
                getattr(experts, experts.out_proj)[e].copy_(w_out[:, groups[e]] * scale)
                if whole.in_bias is not None and getattr(whole, whole.in_bias) is not None:
                    getattr(experts, experts.in_bias)[e].copy_(getattr(whole, whole.in_bias)[0][rows])
                    getattr(experts, experts.out_bias)[e].copy_(getattr(whole, whole.out_bias)[0] * (scale / n))
        return experts

    def init_router(self, router: nn.Module, experts: nn.Module, cfg: MoEConfig) -> None:
        weight = getattr(router, "weight", None)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (cfg.num_experts, experts.hidden_size):
            return
        f = experts.intermediate_size
        gate = getattr(experts, experts.in_proj)[:, :f]  # [E, f/E, d]: gate (plain: fc1) rows
        with torch.no_grad():
            weight.copy_((gate.mean(dim=1) * self.router_scale).to(weight.dtype))


UPCYCLERS.register("split", options=SplitUpcycler)(SplitUpcycler)


def neuron_activations(spec: FFNSpec, x: torch.Tensor) -> torch.Tensor:
    """`|h|` `[N, f]` of the FFN's intermediate neurons on inputs `x [N, d]` (gated: `act(gate x) * up x`)."""
    from zoo.moe.activations import activation_fn

    act = activation_fn(spec.activation)
    with torch.no_grad():
        h = x @ spec.w_in.t() + (spec.b_in if spec.b_in is not None else 0)
        if spec.kind == "gated":
            g, u = h.chunk(2, dim=-1)
            h = act(g) * u
        else:
            h = act(h)
    return h.abs().float()


def balanced_kmeans(features: torch.Tensor, k: int, generator: torch.Generator, iters: int = 25) -> torch.Tensor:
    """Cluster the rows of `features [f, N]` into k clusters of exactly f/k rows (cosine similarity).

    Spherical k-means whose assignment step is greedy under a capacity of f/k per cluster (the
    most similar (row, cluster) pairs first). Returns the cluster id of each row, `[f]`.
    """
    f = features.shape[0]
    size = f // k
    x = torch.nn.functional.normalize(features.float(), dim=1)
    centroids = x[torch.randperm(f, generator=generator)[:k]]
    assign = torch.full((f,), -1, dtype=torch.long)
    for _ in range(iters):
        sim = x @ centroids.t()  # [f, k]
        new = torch.full((f,), -1, dtype=torch.long)
        counts = [0] * k
        for flat in sim.flatten().argsort(descending=True).tolist():
            i, c = divmod(flat, k)
            if new[i] < 0 and counts[c] < size:
                new[i] = c
                counts[c] += 1
        if torch.equal(new, assign):
            break
        assign = new
        centroids = torch.nn.functional.normalize(torch.stack([x[assign == c].mean(0) for c in range(k)]), dim=1)
    return assign


class _SkeletonUpcycler(CopyUpcycler):
    """Experts of the configured width with fresh weights (a loader fills them from a checkpoint)."""

    def expert_width(self, spec: FFNSpec, cfg: MoEConfig, where: str) -> int:
        return cfg.expert_intermediate_size or spec.intermediate_size

    def experts(self, mlp: nn.Module, cfg: MoEConfig, *, layer: int, seeds=None, calibration=None) -> nn.Module:
        spec = ffn_spec(mlp, f"layer {layer}'s mlp")
        return EXPERTS.build(cfg.experts, cfg.experts_options, num_experts=cfg.num_experts,
                             hidden_size=spec.hidden_size, intermediate_size=self.expert_width(spec, cfg, ""))


def _config(cfg: MoEConfig | None, kwargs: dict[str, Any], who: str) -> MoEConfig:
    if cfg is not None and kwargs:
        raise ValueError(f"{who}: pass either an MoEConfig or keyword fields, not both (got {sorted(kwargs)})")
    return cfg if cfg is not None else MoEConfig.from_dict(kwargs)


def resolve_experts(cfg: MoEConfig, spec: FFNSpec, where: str) -> MoEConfig:
    """`cfg` with `experts="auto"` replaced by the kind (and options) that holds the dense FFN `spec`;
    an explicit kind is kept (`upcycle_layers` then checks that it can hold the FFN)."""
    kind, options = expert_kind_for(spec)
    if cfg.experts == "auto":
        return dataclasses.replace(cfg, experts=kind, experts_options=options)
    return cfg


def upcycle(
    model: nn.Module,
    config: MoEConfig | None = None,
    *,
    method: str = "copy",
    method_options: dict[str, Any] | None = None,
    expert_seeds: ExpertSeeds | None = None,
    calibration: torch.Tensor | dict[str, torch.Tensor] | None = None,
    **kwargs,
) -> MoECausalLM:
    """Replace chosen dense MLPs of `model` by sparse MoE layers whose experts come from them.

    The model is changed in place and returned wrapped in `MoECausalLM`. Nothing is changed when
    it raises.

    Args:
        model: a built transformers causal LM (Llama, Qwen2, Mistral, Gemma, Phi, Phi-3, GPT-2, ...).
        config: an `MoEConfig`; or pass its fields as keywords (`num_experts=`,
            `router_options={"top_k": 2}`, `layers="every_other"`, `loss_coefs={"balance": 0.01}`, ...).
        method: the `UPCYCLERS` entry that initializes the experts.
        method_options: its options.
        expert_seeds: specialized FFN copies for the experts (see `upcycle_from_experts`).
        calibration: model inputs (`input_ids [B, L]`, or a dict of forward kwargs) for upcyclers
            that look at activations (`split` with `partition="coactivation"`).

    Returns:
        The MoE LM; its `moe_config` records the resolved expert kind and width. A shared expert,
        if configured, starts with a zero `down_proj` so it adds nothing at initialization.
    """
    upcycler = UPCYCLERS.build(method, method_options)
    return _upcycle(model, _config(config, kwargs, "upcycle"), upcycler, expert_seeds, calibration, "upcycle")


def moe_skeleton(model: nn.Module, config: MoEConfig) -> MoECausalLM:
    """The MoE LM `config` describes on top of dense `model`, for a loader that fills every weight.

    Experts as wide as the dense FFN are copies of it (the model equals the dense one, as `upcycle`
    gives); narrower ones (a `split` upcycling) get fresh weights.
    """
    f = None
    layers = decoder_layers(model)
    if layers and config.expert_intermediate_size is not None:
        f = ffn_spec(layers[config.moe_layer_indices(len(layers))[0]].mlp, "moe_skeleton").intermediate_size
    upcycler = CopyUpcycler() if config.expert_intermediate_size in (None, f) else _SkeletonUpcycler()
    return _upcycle(model, config, upcycler, None, None, "moe_skeleton")


def _upcycle(model, cfg: MoEConfig, upcycler, expert_seeds, calibration, who: str) -> MoECausalLM:
    if isinstance(model, MoECausalLM):
        raise ValueError(f"{who}: the model is already an MoECausalLM")
    layers = decoder_layers(model)
    std = getattr(getattr(model, "config", None), "initializer_range", 0.02)
    resolved = upcycle_layers(layers, cfg, upcycler, who=who, std=std, expert_seeds=expert_seeds,
                              inputs=lambda indices: _mlp_inputs(model, layers, indices, calibration))
    return MoECausalLM(model, resolved)


def upcycle_layers(layers, cfg: MoEConfig, upcycler, *, who: str, std: float = 0.02, expert_seeds=None,
                   inputs=None) -> MoEConfig:
    """Replace the `mlp` of the chosen blocks of `layers` (any sequence of blocks with an `mlp`) by
    `MoEBlock`s whose experts `upcycler` builds; returns the resolved config. Nothing changes when it raises.

    Args:
        layers: the blocks (a decoder's layers, a ViT's blocks).
        cfg: the MoE; `cfg.layers` indexes `layers`.
        upcycler: an `UPCYCLERS` instance.
        who: prefix for errors.
        std: the router's init std.
        expert_seeds: specialized copies (see `upcycle_from_experts`).
        inputs: `indices -> {index: MLP inputs [N, d]}` for upcyclers that need calibration.
    """
    indices = cfg.moe_layer_indices(len(layers))
    specs = {i: ffn_spec(layers[i].mlp, f"{who}: layer {i}'s mlp") for i in indices}
    kinds = {(k, tuple(sorted(o.items()))) for k, o in map(expert_kind_for, specs.values())}
    resolved = resolve_experts(cfg, specs[indices[0]], who) if indices else cfg
    if cfg.experts == "auto" and len(kinds) > 1:
        raise ValueError(f"{who}: the MoE layers' FFNs are of different kinds {sorted(kinds)}; one expert kind holds them all")
    widths = {upcycler.expert_width(specs[i], resolved, f"{who}: layer {i}") for i in indices}
    if len(widths) > 1:
        raise ValueError(f"{who}: the MoE layers' experts would have different widths {sorted(widths)}")
    with torch.random.fork_rng(devices=[]):  # a dry run that leaves the RNG stream as it was
        for i in indices:
            EXPERTS.get(resolved.experts).from_dense(layers[i].mlp, 1)  # raises if the kind cannot hold the FFN
    if widths and widths != {specs[indices[0]].intermediate_size}:
        resolved = dataclasses.replace(resolved, expert_intermediate_size=widths.pop())
    seeds = _seed_weights(expert_seeds, layers, indices, resolved) if expert_seeds is not None else {}
    calib = inputs(indices) if inputs is not None and getattr(upcycler, "needs_calibration", False) else {}
    built = {}
    for position, i in enumerate(indices):
        mlp = layers[i].mlp
        ref = specs[i].w_in
        here = resolved.for_layer(position)  # per-layer expert counts (PR-MoE)
        moe = build_sparse_moe(here, specs[i].hidden_size, resolved.expert_intermediate_size or specs[i].intermediate_size)
        moe.experts = upcycler.experts(mlp, here, layer=i, seeds=seeds.get(i), calibration=calib.get(i))
        with torch.no_grad():
            moe.router.reset_parameters(std)
            upcycler.init_router(moe.router, moe.experts, here)
            if here.residual:  # Residual-MoE: the dense FFN itself beside the experts
                moe.shared_expert = copy.deepcopy(mlp)
            elif moe.shared_expert is not None:
                moe.shared_expert.down_proj.weight.zero_()
        built[i] = MoEBlock(moe.to(device=ref.device, dtype=ref.dtype))
    for i, block in built.items():
        layers[i].mlp = block
    return resolved


def encoder_blocks(encoder: nn.Module) -> nn.Module:
    """The transformer blocks of a vision tower: the first `ModuleList`/`Sequential` whose every
    block has an `mlp` (timm ViT `blocks`, open_clip `transformer.resblocks`)."""
    for module in encoder.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0 and all(hasattr(m, "mlp") for m in module):
            return module
    raise ValueError(f"upcycle_encoder: {type(encoder).__name__} has no list of blocks with an `mlp` "
                     "(expected a timm ViT or an open_clip visual tower)")


def upcycle_encoder(encoder: nn.Module, config: MoEConfig | None = None, *, method: str = "copy",
                    method_options: dict[str, Any] | None = None, **kwargs) -> MoEConfig:
    """MoE inside a vision encoder (CLIP-MoE, SPMTrack, Dynamic-DINO): upcycle its blocks' MLPs in place.

    The same upcyclers as for LMs, applied to a timm ViT's `Mlp` (fc1/fc2, GELU) or an open_clip
    tower's MLP (c_fc/c_proj); with `copy` the encoder's features equal the dense ones at init. Its
    routing is captured like the LM's (`zoo.moe.capture_routing`) and `MultimodalMoE` adds the
    routers' losses to the training loss.

    Args:
        encoder: the encoder module (changed in place).
        config: the `MoEConfig` (`layers` indexes the tower's blocks), or its fields as keywords.
        method, method_options: the `UPCYCLERS` entry (co-activation `split` needs calibration and
            is refused here).

    Returns:
        The resolved `MoEConfig` (expert kind and width).
    """
    cfg = _config(config, kwargs, "upcycle_encoder")
    upcycler = UPCYCLERS.build(method, method_options)
    if getattr(upcycler, "needs_calibration", False):
        raise ValueError("upcycle_encoder: split with partition='coactivation' needs calibration inputs; use 'random'")
    if any(isinstance(m, MoEBlock) for m in encoder.modules()):
        raise ValueError("upcycle_encoder: the encoder already has MoE layers")
    return upcycle_layers(encoder_blocks(encoder), cfg, upcycler, who="upcycle_encoder")


def _mlp_inputs(model: nn.Module, layers: nn.ModuleList, indices: list[int], calibration) -> dict[int, torch.Tensor]:
    """Layer -> the dense MLP's inputs `[N, d]` on the calibration batch (real tokens only)."""
    if calibration is None:
        return {}
    batch = calibration if isinstance(calibration, dict) else {"input_ids": calibration}
    mask = batch.get("attention_mask")
    got: dict[int, torch.Tensor] = {}

    def hook(i):
        def record(module, args):
            x = args[0].detach()
            got[i] = x[mask.bool()] if mask is not None else x.reshape(-1, x.shape[-1])
        return record

    handles = [layers[i].mlp.register_forward_pre_hook(hook(i)) for i in indices]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return got


def _seed_weights(copies: ExpertSeeds, layers: nn.ModuleList, indices: list[int], cfg: MoEConfig) -> dict[int, list]:
    """Layer -> per copy a 1-expert module of `cfg.experts` holding it, checked against the model's FFNs."""
    if isinstance(copies, (nn.Module, dict)) or not copies:
        raise ValueError(
            "upcycle_from_experts: expert_mlps must be a non-empty list of specialized copies "
            f"(models or {{layer: FFN state dict}}), got {type(copies).__name__}"
        )
    n = len(copies)
    if cfg.num_experts % n:
        raise ValueError(
            f"upcycle_from_experts: num_experts={cfg.num_experts} is not a multiple of the {n} specialized copies "
            f"(expert j is seeded from copy j % {n}); use num_experts={n} or a multiple of it"
        )
    return {i: [_expert_weights(c, i, j, layers[i].mlp, cfg) for j, c in enumerate(copies)] for i in indices}


def _expert_weights(copy, index: int, j: int, like: nn.Module, cfg: MoEConfig) -> nn.Module:
    """Layer `index` of specialized copy `j` as a 1-expert module of `cfg.experts`, checked against `like`."""
    import copy as copying

    where = f"upcycle_from_experts: copy {j}, layer {index}"
    if isinstance(copy, nn.Module):
        try:
            mlp = decoder_layers(copy)[index].mlp
        except IndexError:
            raise ValueError(f"{where}: the copy ({type(copy).__name__}) has fewer decoder layers") from None
        state = mlp.state_dict()
        got, want = ffn_spec(mlp, f"{where}: the copy's mlp"), ffn_spec(like, "the model's mlp")
        if (got.kind, got.source) != (want.kind, want.source):
            raise ValueError(f"{where}: the copy's mlp ({type(mlp).__name__}) is a {got.kind} FFN ({got.source}) but the "
                             f"model's ({type(like).__name__}) is a {want.kind} FFN ({want.source})")
    else:
        keys = {int(k) for k in copy}
        if index not in keys:
            raise ValueError(f"{where}: the copy has no entry for layer {index} (it has layers {sorted(keys)})")
        entry = copy[index] if index in copy else copy[str(index)]
        state = entry.state_dict() if isinstance(entry, nn.Module) else dict(entry)
    expected = {k: v.shape for k, v in like.state_dict().items()}
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ValueError(f"{where}: unexpected keys {unknown} in the FFN state dict (expected exactly {sorted(expected)})")
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"{where}: the FFN state dict has no {key!r}")
        if tuple(state[key].shape) != tuple(shape):
            raise ValueError(f"{where}: {key} has shape {tuple(state[key].shape)} but the model's FFN has {tuple(shape)}")
    dense = copying.deepcopy(like)
    dense.load_state_dict(state)
    return EXPERTS.get(cfg.experts).from_dense(dense, 1)


def upcycle_from_experts(
    model: nn.Module, expert_mlps: ExpertSeeds, config: MoEConfig | None = None, **kwargs
) -> MoECausalLM:
    """Upcycle `model` with experts seeded from specialized FFN copies (Uni-MoE stage 2, MedPLIB).

    Expert j of every MoE layer i starts as copy `j % n` of layer i's dense FFN (n = number of
    copies), so `num_experts == n` gives one expert per copy and `num_experts = m * n` gives m
    experts per copy. Everything outside the FFNs (attention, norms, embeddings) comes from
    `model`; routers start fresh. Unlike `upcycle`, the result does not equal `model` at
    initialization: routing a token to expert j (top-1) gives copy j's FFN.

    Args:
        model: a built dense transformers causal LM (changed in place), the FFNs' shapes reference.
        expert_mlps: n specialized copies, each either a causal LM with the same decoder layout
            (its layer i's `mlp` is used) or a dict `{layer index: FFN}` where FFN is a state dict
            with exactly the keys and shapes of the model's dense FFN (Llama: `gate_proj.weight [f, d]`,
            `up_proj.weight [f, d]`, `down_proj.weight [d, f]`) or a module with them.
            A dict needs an entry for every MoE layer.
        config: an `MoEConfig`, or its fields as keywords (as in `upcycle`).

    Returns:
        The MoE LM (`MoECausalLM`).

    Raises:
        ValueError: no copies; `num_experts` not a multiple of the number of copies; a copy lacks a
            layer, has the wrong keys or shapes, or another FFN kind than the model; `model`'s
            MLPs are no FFN an expert kind holds (as in `upcycle`). Nothing is changed when it raises.
    """
    if isinstance(model, MoECausalLM):
        raise ValueError("upcycle_from_experts: the model is already an MoECausalLM")
    cfg = _config(config, kwargs, "upcycle_from_experts")
    if isinstance(expert_mlps, (nn.Module, dict)) or not expert_mlps:
        _seed_weights(expert_mlps, nn.ModuleList(), [], cfg)  # raises naming the cause
    return _upcycle(model, cfg, CopyUpcycler(), expert_mlps, None, "upcycle_from_experts")


__all__ = ["CopyUpcycler", "NoisyUpcycler", "SplitUpcycler", "UPCYCLERS", "balanced_kmeans", "encoder_blocks",
           "moe_skeleton", "neuron_activations", "resolve_experts", "upcycle", "upcycle_encoder", "upcycle_from_experts",
           "upcycle_layers"]
