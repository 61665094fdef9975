"""Registry-driven: every entry of every registry, checked against its contract and an independent reference.

A new router, expert kind, upcycler, adapter, encoder, connector or stage is tested here with no
edit to this file (entries without usable defaults carry an `example` of tiny options).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import zoo
from zoo.encoders import CONNECTORS, ENCODERS
from zoo.models import EncoderConfig
from zoo.moe import EXPERTS, ROUTERS, MoEConfig, SparseMoE
from zoo.pipelines import STAGES
from zoo.pipelines.stages import StageConfig
from zoo.registry import Registry
from zoo.transforms import ADAPTERS, UPCYCLERS

D, E, F_ = 32, 4, 48
TINY_LM = dict(vocab_size=97, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)


def dense_lm() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**TINY_LM)).eval()


def _example(registry: Registry, name: str) -> dict:
    return dict(registry.entry(name).example)


# --- the Registry itself ------------------------------------------------------------------------


def test_registry_register_get_build_and_errors_name_the_cause():
    reg = Registry("widget", context=("size",))

    @dataclasses.dataclass
    class Opts:
        scale: float = 1.0

        def __post_init__(self):
            if self.scale <= 0:
                raise ValueError(f"scale={self.scale} must be > 0")

    @reg.register("lin", options=Opts)
    class Lin:
        def __init__(self, size, scale):
            self.size, self.scale = size, scale

    @reg.register("fn")
    def fn(*, size, depth=2):
        return (size, depth)

    assert reg.names() == ["fn", "lin"] and "lin" in reg and reg.get("lin") is Lin
    built = reg.build("lin", {"scale": 2.0}, size=3)
    assert (built.size, built.scale) == (3, 2.0)
    assert reg.build("fn", {"depth": 5}, size=1) == (1, 5)
    with pytest.raises(ValueError, match=r"unknown widget 'lni'; registered widgets: \['fn', 'lin'\] \(did you mean 'lin'\?\)"):
        reg.get("lni")
    with pytest.raises(ValueError, match=r"widget 'lin': Opts: unknown config key\(s\) \['scal'\] \(did you mean 'scale'\?\); known keys are \['scale'\]"):
        reg.build("lin", {"scal": 2.0}, size=3)
    with pytest.raises(ValueError, match=r"widget 'lin': scale=-1 must be > 0"):
        reg.build("lin", {"scale": -1}, size=3)
    with pytest.raises(ValueError, match=r"widget 'fn': unknown option\(s\) \['width'\]; accepted options are \['depth'\]"):
        reg.build("fn", {"width": 1}, size=1)
    with pytest.raises(ValueError, match=r"widget 'fn': unknown option\(s\) \['size'\]"):  # context, not an option
        reg.build("fn", {"size": 1}, size=1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("fn")(fn)
    reg.unregister("fn")
    assert reg.names() == ["lin"]


# --- routers ------------------------------------------------------------------------------------


def _router(name: str) -> nn.Module:
    torch.manual_seed(0)
    return ROUTERS.build(name, _example(ROUTERS, name), hidden_size=D, num_experts=E)


@pytest.mark.parametrize("name", ROUTERS.names())
def test_router_keeps_the_contract(name):
    router = _router(name).eval()
    x = torch.randn(13, D)
    out = router(x)
    T, K = out.indices.shape
    assert T == 13 and out.weights.shape == (T, K) and out.logits.shape[0] == T and out.logits.shape[1] >= E
    assert out.weights.dtype == torch.float32 and out.indices.dtype == torch.int64
    assert ((out.indices >= -1) & (out.indices < E)).all()
    assert (out.weights[out.indices < 0] == 0).all() and (out.weights >= 0).all() and torch.isfinite(out.weights).all()
    filled = out.indices.clone()
    for row in filled:  # an expert appears at most once per token
        real = row[row >= 0]
        assert len(real) == len(set(real.tolist()))
    # stateless: the same input gives the same decision; the module holds nothing new
    state = {k: v.clone() for k, v in router.state_dict().items()}
    again = router(x)
    assert torch.equal(again.indices, out.indices) and torch.equal(again.weights, out.weights)
    assert all(torch.equal(state[k], v) for k, v in router.state_dict().items())
    losses = router.aux_losses(out, torch.ones(T))
    assert set(losses) <= set(router.default_loss_coefs)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert router.hidden_size == D and router.num_experts == E


@pytest.mark.parametrize("name", ROUTERS.names())
def test_router_in_sparse_moe_matches_a_naive_per_token_loop(name):
    router = _router(name)
    experts = EXPERTS.build("swiglu", num_experts=E, hidden_size=D, intermediate_size=F_)
    moe = SparseMoE(router=router, experts=experts).train()
    x = torch.randn(2, 7, D, dtype=torch.float64, requires_grad=True)
    moe = moe.double()
    y, routing = moe(x)
    flat = x.reshape(-1, D)
    dense = [experts.expert(e).double() for e in range(E)]
    ref = torch.stack([
        sum((w * dense[int(i)](flat[t]) for w, i in zip(routing.weights[t].double(), routing.indices[t]) if i >= 0),
            torch.zeros(D, dtype=torch.float64))
        for t in range(flat.shape[0])
    ])
    torch.testing.assert_close(y.reshape(-1, D), ref)
    losses = router.aux_losses(routing)
    (y.square().sum() + sum(losses.values(), torch.zeros((), dtype=torch.float64))).backward()
    trainable = [p for p in router.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable), "a trainable router parameter got no gradient"


@pytest.mark.parametrize("name", ROUTERS.names())
def test_router_in_an_upcycled_lm_trains_with_its_losses(name):
    lm = dense_lm()
    cfg = MoEConfig(num_experts=E, router=name, router_options=_example(ROUTERS, name))
    model = zoo.upcycle(lm, cfg).train()
    ids = torch.randint(0, 97, (2, 6))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and len(out.routing) == 2
    assert set(out.aux_losses) <= set(ROUTERS.get(name).default_loss_coefs)
    assert all(0 <= s.experts_per_token <= E for s in out.routing)
    out.loss.backward()
    for moe in model.moe_layers().values():
        assert all(p.grad is not None for p in moe.router.parameters() if p.requires_grad)


# --- expert kinds -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", EXPERTS.names())
def test_experts_match_their_dense_experts_with_empty_slots(kind):
    torch.manual_seed(0)
    experts = EXPERTS.build(kind, _example(EXPERTS, kind), num_experts=E, hidden_size=D, intermediate_size=F_).double()
    x = torch.randn(11, D, dtype=torch.float64, requires_grad=True)
    indices = torch.randint(0, E, (11, 3))
    indices[0] = -1  # a token with no expert
    indices[3, 1] = -1
    indices[:, 2] = torch.where(indices[:, 2] == indices[:, 0], -1, indices[:, 2])
    indices[:, 1] = torch.where(indices[:, 1] == indices[:, 0], -1, indices[:, 1])
    weights = torch.rand(11, 3, dtype=torch.float64).masked_fill(indices < 0, 0.0).requires_grad_()
    y = experts(x, weights, indices)
    dense = [experts.expert(e) for e in range(E)]
    ref = torch.stack([
        sum((w * dense[int(i)](x[t]) for w, i in zip(weights[t], indices[t]) if i >= 0), torch.zeros(D, dtype=torch.float64))
        for t in range(11)
    ])
    torch.testing.assert_close(y, ref)
    assert torch.equal(y[0], torch.zeros(D, dtype=torch.float64))
    g_ours = torch.autograd.grad(y.square().sum(), [x, weights, *experts.parameters()])
    g_ref = torch.autograd.grad(ref.square().sum(), [x, weights, *experts.parameters()], allow_unused=True)
    for a, b in zip(g_ours[:2], g_ref[:2]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", EXPERTS.names())
def test_one_expert_equals_the_dense_ffn_it_was_made_from(kind):
    torch.manual_seed(0)
    source = EXPERTS.build(kind, _example(EXPERTS, kind), num_experts=2, hidden_size=D, intermediate_size=F_)
    dense = source.expert(1)
    one = EXPERTS.get(kind).from_dense(dense, 1)
    x = torch.randn(9, D)
    y = one(x, torch.ones(9, 1), torch.zeros(9, 1, dtype=torch.long))
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-6)
    y0 = one(torch.randn(0, D, requires_grad=True), torch.ones(0, 1), torch.zeros(0, 1, dtype=torch.long))
    y0.sum().backward()  # zero tokens: the output still reaches autograd
    assert all(p.grad is not None for p in one.parameters())


# --- upcyclers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", UPCYCLERS.names())
def test_upcycler_builds_an_moe_lm_and_keeps_the_dense_model_when_it_promises_to(name, tmp_path):
    from zoo.io.moe_lm import load_moe_lm, save_moe_lm

    lm = dense_lm()
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        ref = lm(input_ids=ids).logits
    model = zoo.upcycle(lm, MoEConfig(num_experts=E, router_options={"top_k": 2}), method=name,
                        method_options=_example(UPCYCLERS, name)).eval()
    assert len(model.moe_layers()) == 2
    with torch.no_grad():
        got = model(input_ids=ids).logits
    if UPCYCLERS.get(name).preserves_dense:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    loaded, _ = load_moe_lm(save_moe_lm(model, tmp_path / name))  # its config rebuilds it offline
    assert loaded.moe_config == model.moe_config
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, got)


# --- adapters -----------------------------------------------------------------------------------


def _perturb(module: nn.Module) -> None:
    with torch.no_grad():
        for n, p in module.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("base", ["dense", "moe"])
@pytest.mark.parametrize("kind", ADAPTERS.names())
def test_adapter_applies_trains_merges_and_rebuilds_from_its_config(kind, base):
    from zoo.io.checkpoint import load_strict
    from zoo.models.builders import apply_adapters
    from zoo.models.config import AdapterConfig

    torch.manual_seed(0)
    lm = dense_lm()
    if base == "moe":
        lm = zoo.upcycle(lm, MoEConfig(num_experts=E, router_options={"top_k": 2}, layers=[0]))
    pristine = copy.deepcopy(lm)
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        ref = lm(input_ids=ids).logits
    options = _example(ADAPTERS, kind)
    adapted = ADAPTERS.build(kind, options).apply(lm).eval()
    with torch.no_grad():
        start = adapted(input_ids=ids).logits
    if ADAPTERS.get(kind).preserves_output:
        torch.testing.assert_close(start, ref, rtol=1e-5, atol=1e-5)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable, "the adapter left nothing to train"
    _perturb(adapted)  # as if trained
    with torch.no_grad():
        trained = adapted(input_ids=ids).logits
    assert not torch.allclose(trained, ref, atol=1e-4)
    merged, remaining = ADAPTERS.build(kind, options).merge(adapted)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)
    # What the merge left is rebuilt on a fresh copy of the base from the recorded config alone.
    rebuilt = apply_adapters(pristine, [AdapterConfig(kind, remaining)] if remaining is not None else []).eval()
    load_strict(rebuilt, merged.state_dict(), "merged adapter")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)


# --- encoders and connectors --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ENCODERS.names())
def test_encoder_builds_from_its_config_and_returns_tokens(kind):
    from zoo.encoders.processing import AudioProcessor, ImageProcessor
    from zoo.models.builders import build_encoder

    enc = build_encoder(EncoderConfig(kind=kind, **_example(ENCODERS, kind))).eval()
    if hasattr(enc, "image_size"):
        media = ImageProcessor.from_encoder(enc)([torch.rand(3, 40, 40)] * 2)
    else:
        media = AudioProcessor.from_encoder(enc)([torch.randn(8000).numpy()] * 2)
    with torch.no_grad():
        out = enc(media)
    assert out.dim() == 3 and out.shape[0] == 2 and out.shape[2] == enc.output_dim and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=f"encoder {kind!r}"):
        ENCODERS.build(kind, {"nonsense": 1})


@pytest.mark.parametrize("kind", CONNECTORS.names())
def test_connector_maps_features_to_lm_tokens_and_trains(kind):
    torch.manual_seed(0)
    con = CONNECTORS.build(kind, _example(CONNECTORS, kind), in_dim=16, out_dim=D)
    feats = torch.randn(3, 5, 16)
    text, mask = torch.randn(3, 4, D), torch.ones(3, 4)
    tokens, routing = con(feats, text, mask)
    assert tokens.dim() == 3 and tokens.shape[0] == 3 and tokens.shape[2] == D
    if routing is not None:
        assert routing.indices.shape[0] == 3
        tokens = tokens + 0 * sum(con.router.aux_losses(routing).values())
    tokens.square().sum().backward()
    assert all(p.grad is not None for p in con.parameters()), "a connector parameter got no gradient"


# --- stages -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", STAGES.names())
def test_stage_kind_validates_options_and_names_unknown_ones(kind):
    cfg = StageConfig(name="s", kind=kind, data={"vqa": 1.0}, options=_example(STAGES, kind))
    stage = cfg.stage()
    branches = stage.branches(cfg)
    assert branches and all(b.output.startswith("s") for b in branches)
    assert isinstance(stage.default_trains, list) and isinstance(stage.forks, bool)
    with pytest.raises(ValueError, match=rf"stage 's': stage kind {kind!r}: .*unknown config key\(s\) \['no_such_option'\]"):
        StageConfig(name="s", kind=kind, data={"vqa": 1.0}, options={**_example(STAGES, kind), "no_such_option": 1})


def test_every_stage_kind_runs_in_the_micro_recipe():
    """The micro recipe (run end to end by test_stages.py) must use every registered stage kind."""
    from zoo.pipelines.stages import RecipeConfig

    used = {s.kind for s in RecipeConfig.load("micro").stages}
    assert used == set(STAGES.names()), f"add a stage of kind {sorted(set(STAGES.names()) - used)} to configs/recipes/micro.yaml"
