"""Zero-token batches: an MoE layer given no token stays in the autograd graph, for every router.

Registry-driven: every `ROUTERS` entry with every `EXPERTS` kind and both LoRA-expert kinds
(MixLoRA, LoRAMoE). On `x [0, d]` the output is `[0, d]`, `backward` runs, every gradient that
arrives is exactly 0, and every aux loss is 0 (connected to the graph, never NaN). Under expert
parallelism over 2 gloo processes where rank 1 has no token, every gradient equals the one-process
run on rank 0's tokens alone (the invariant: a rank with no token adds nothing).
"""

from __future__ import annotations

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from zoo.moe import EXPERTS, ROUTERS, SparseMoE
from zoo.moe.capture import capture_routing, routing_losses
from zoo.moe.experts import SwiGLU
from zoo.moe.routers import EMPTY
from zoo.transforms.adapters.loramoe import LoRAMoEExperts
from zoo.transforms.adapters.mixlora import MixLoRAExperts

D, E, F_ = 32, 4, 48


def _router(name: str) -> nn.Module:
    options = dict(ROUTERS.entry(name).example)
    if name == "loramoe":
        options["groups"] = [2, 2]  # so its localized balancing loss exists
    return ROUTERS.build(name, options, hidden_size=D, num_experts=E)


def _lora_experts(kind: str) -> nn.Module:
    base = SwiGLU(D, F_)
    if kind == "mixlora":
        experts = MixLoRAExperts(base, E, r=4, alpha=8)
        for name in ("gate_lora_B", "up_lora_B", "down_lora_B"):  # nonzero, so gradients reach A too
            nn.init.normal_(getattr(experts, name), std=0.1)
        return experts
    experts = LoRAMoEExperts(base, D, E, r=4, alpha=8)
    nn.init.normal_(experts.lora_B, std=0.1)
    return experts


EXPERT_KINDS = [*EXPERTS.names(), "mixlora", "loramoe"]


def _experts(kind: str) -> nn.Module:
    if kind in ("mixlora", "loramoe"):
        return _lora_experts(kind)
    return EXPERTS.build(kind, dict(EXPERTS.entry(kind).example), num_experts=E, hidden_size=D, intermediate_size=F_)


def _layer(router: str, kind: str, shared: bool = False) -> SparseMoE:
    torch.manual_seed(0)
    if shared:
        return SparseMoE(router=_router(router), experts=_experts(kind), shared_expert=SwiGLU(D, 16),
                         shared_expert_gate=nn.Linear(D, 1, bias=False))
    return SparseMoE(router=_router(router), experts=_experts(kind))


def _context(tokens: int) -> dict[str, torch.Tensor]:
    return {"mask": torch.ones(tokens, dtype=torch.bool), "sample_type": torch.zeros(tokens, dtype=torch.long),
            "sample_id": torch.zeros(tokens, dtype=torch.long)}


def _zero_token_backward(moe: SparseMoE, where: str) -> dict[str, torch.Tensor]:
    x = torch.randn(0, D, requires_grad=True)
    with capture_routing(moe) as records:
        y, routing = moe(x, context=_context(0))
    assert y.shape == (0, D) and y.dtype == x.dtype, f"{where}: output {tuple(y.shape)} {y.dtype}"
    assert routing.weights.shape[0] == routing.indices.shape[0] == 0, where
    losses = routing_losses(records).losses
    direct = {**moe.router.aux_losses(routing), **{f"masked {k}": v for k, v in
                                                  moe.router.aux_losses(routing, torch.zeros(0, dtype=torch.bool), _context(0)).items()}}
    for name, value in {**losses, **direct}.items():
        assert value.dim() == 0 and torch.isfinite(value) and value.item() == 0, f"{where}: loss {name} = {value}"
    total = y.sum() + sum(losses.values(), torch.zeros(()))
    assert total.requires_grad, f"{where}: the output is not connected to autograd"
    total.backward()
    assert x.grad is not None and x.grad.shape == (0, D), where
    grads = {n: p.grad for n, p in moe.named_parameters() if p.grad is not None}
    for n, g in grads.items():
        assert torch.isfinite(g).all() and not g.any(), f"{where}: {n} has a nonzero or non-finite gradient"
    return grads


@pytest.mark.parametrize("kind", EXPERT_KINDS)
@pytest.mark.parametrize("router", ROUTERS.names())
def test_zero_tokens_every_router_and_expert_kind(router, kind):
    moe = _layer(router, kind)
    grads = _zero_token_backward(moe, f"{router} + {kind}")
    trainable_experts = {n for n, p in moe.named_parameters() if p.requires_grad and n.startswith("experts.")}
    # every trainable expert parameter gets its (zero) gradient: the reduction over ranks needs one
    assert trainable_experts <= set(grads), f"{router} + {kind}: no gradient for {sorted(trainable_experts - set(grads))}"


@pytest.mark.parametrize("router", ROUTERS.names())
def test_zero_tokens_with_a_gated_shared_expert(router):
    moe = _layer(router, "swiglu", shared=True)
    grads = _zero_token_backward(moe, f"{router} + shared expert")
    assert {"shared_expert.gate_proj.weight", "shared_expert_gate.weight"} <= set(grads)


@pytest.mark.parametrize("kind", EXPERT_KINDS)
def test_tokens_with_every_slot_empty_contribute_zero_and_stay_in_the_graph(kind):
    torch.manual_seed(0)
    experts = _experts(kind)
    x = torch.randn(3, D, requires_grad=True)
    weights = torch.zeros(3, 2)
    indices = torch.full((3, 2), EMPTY)
    y = experts(x, weights, indices)
    base = experts.base(x) if kind == "loramoe" else torch.zeros_like(x)  # LoRAMoE keeps its frozen FFN
    torch.testing.assert_close(y, base)
    y.sum().backward()
    assert x.grad is not None
    for n, p in experts.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and not p.grad.any(), f"{kind}: {n}"


def test_empty_mask_losses_are_zero_not_nan_for_every_router():
    """T > 0 but no real token (all padding): the same 0, not a 0/0."""
    for name in ROUTERS.names():
        router = _router(name)
        x = torch.randn(5, D, requires_grad=True)
        out = router(x)
        ctx = {**_context(5), "mask": torch.zeros(5, dtype=torch.bool)}
        for loss, value in router.aux_losses(out, ctx["mask"], ctx).items():
            assert torch.isfinite(value) and value.item() == 0, f"{name}: {loss} = {value}"


# --- expert parallelism: rank 1 has no token ---------------------------------------------------------

EP_TOKENS = 7


def _ep_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(EP_TOKENS, D, generator=g), torch.randn(EP_TOKENS, D, generator=g)  # rank 0's x, dy


def _one_process_run(name: str) -> dict:
    """The layer on rank 0's tokens alone, before the process joins any group (K-means updates locally)."""
    full = _layer(name, "swiglu", shared=True)
    x0, dy0 = _ep_tokens()
    x = x0.clone().requires_grad_()
    with capture_routing(full) as records:
        y, _ = full(x, context=_context(EP_TOKENS))
    losses = routing_losses(records).losses
    ((y * dy0).sum() + sum(losses.values(), torch.zeros(()))).backward()
    if hasattr(full.router, "update"):
        full.router.update(x0, None)
    return {"y": y.detach(), "dx": x.grad, "losses": {k: v.detach() for k, v in losses.items()},
            "grads": {n: p.grad for n, p in full.named_parameters() if p.requires_grad},
            "buffers": {n: b.clone() for n, b in full.router.named_buffers()}}


def _ep_check(rank: int, refs: dict[str, dict]) -> None:
    from zoo.moe.expert_parallel import shard_experts

    for name, ref in refs.items():
        ep = shard_experts(_layer(name, "swiglu", shared=True))
        x0, dy0 = _ep_tokens()
        tokens = EP_TOKENS if rank == 0 else 0  # rank 1 has no token
        x = x0[:tokens].clone().requires_grad_()
        with capture_routing(ep) as records:
            y, _ = ep(x, context=_context(tokens))
        losses = routing_losses(records).losses
        ((y * dy0[:tokens]).sum() + sum(losses.values(), torch.zeros(()))).backward()

        where = f"[{name}, rank {rank}]"
        assert y.shape == (tokens, D), where
        for loss, value in losses.items():
            assert torch.isfinite(value), f"{where} loss {loss} = {value}"
            expected = ref["losses"][loss] if rank == 0 else torch.zeros(())  # no token: 0, not NaN
            torch.testing.assert_close(value, expected, msg=lambda m: f"{where} loss {loss}: {m}")
        if rank == 0:
            torch.testing.assert_close(y, ref["y"], rtol=1e-5, atol=1e-6, msg=lambda m: f"{where} output: {m}")
            torch.testing.assert_close(x.grad, ref["dx"], rtol=1e-5, atol=1e-6, msg=lambda m: f"{where} dx: {m}")
        lo, hi = ep.experts.expert_offset, ep.experts.expert_offset + ep.experts.num_local_experts
        for n, p in ep.named_parameters():
            if not p.requires_grad:
                continue
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{where} {n}: missing or non-finite gradient"
            if n.startswith("experts."):  # this rank's shard: what rank 0's tokens sent to it
                torch.testing.assert_close(p.grad, ref["grads"][n][lo:hi], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{where} {n}: {m}")
                continue
            # replicated (router, shared expert): rank 1 adds exactly 0, so the data-parallel sum is the
            # one-process gradient
            if rank == 1:
                assert not p.grad.any(), f"{where} {n}: nonzero gradient from no token"
            total = p.grad.clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total, ref["grads"][n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{where} {n}: {m}")
        if hasattr(ep.router, "update"):  # K-means: the trainer's step on every rank, none on rank 1
            ep.router.update(x.detach(), None)
            for n, b in ep.router.named_buffers():
                torch.testing.assert_close(b, ref["buffers"][n], msg=lambda m: f"{where} router {n} after update: {m}")


def _ep_worker(rank: int, world: int, init_file: str, errors) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        refs = {name: _one_process_run(name) for name in ROUTERS.names()}
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        try:
            _ep_check(rank, refs)
        finally:
            dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


@pytest.mark.slow
def test_expert_parallel_rank_with_no_token_equals_one_process_run_for_every_router():
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        raised = None
        try:
            mp.start_processes(_ep_worker, args=(2, os.path.join(tmp, "init"), errors), nprocs=2, start_method="spawn")
        except mp.ProcessRaisedException as e:
            raised = e
        found = []
        while not errors.empty():
            found.append(errors.get())
    assert not found and raised is None, "\n".join(found) or str(raised)
