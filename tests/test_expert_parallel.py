"""Expert parallelism over 2 gloo processes: the sharded layer equals the unsharded one.

Each rank routes its own tokens; the sharded layer's outputs and input/router gradients must equal
the full layer's on the same tokens, and each expert shard's gradient must equal the slice of the
full layer's expert gradient summed over both ranks' tokens (what data parallelism reduces).
"""

import os
import sys
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from zoo.moe.experts import SwiGLU, SwiGLUExperts
from zoo.moe.expert_parallel import ExpertParallelSwiGLUExperts, is_expert_param, shard_experts, unshard_experts
from zoo.moe.layer import SparseMoE
from zoo.moe.routers import ROUTERS, RouterOutput

E, D, F_ = 4, 8, 12


class FirstShardRouter(nn.Module):
    """Sends every token to experts 0 and 1 (both on rank 0): rank 1's shard receives nothing."""

    default_loss_coefs = {}

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.randn(E, hidden_size) * 0.1)

    def forward(self, x, mask=None):
        logits = x @ self.weight.t()  # [T, E]
        weights = torch.softmax(logits[:, :2], dim=-1)  # [T, 2]
        indices = torch.tensor([0, 1]).expand(x.shape[0], 2)
        return RouterOutput(logits, weights, indices)

    def aux_losses(self, output, mask=None, context=None):
        return {}


def _layers():
    """(name, builder) of every registered router (its example options), topk at k = 1 and 2, and
    the skewed router."""
    out = [(f"topk-top{k}", lambda k=k: ROUTERS.build("topk", {"top_k": k}, hidden_size=D, num_experts=E)) for k in (1, 2)]
    for name in ROUTERS.names():
        out.append((name, lambda name=name: ROUTERS.build(name, dict(ROUTERS.entry(name).example), hidden_size=D,
                                                          num_experts=E)))
    out.append(("first-shard", lambda: FirstShardRouter(D)))
    return out


def _build(router_fn, shared: bool) -> SparseMoE:
    torch.manual_seed(0)
    router = router_fn()
    experts = SwiGLUExperts(E, D, F_)
    if shared:
        return SparseMoE(router=router, experts=experts, shared_expert=SwiGLU(D, 6), shared_expert_gate=nn.Linear(D, 1, bias=False))
    return SparseMoE(router=router, experts=experts)


def _check(rank: int, world: int) -> None:
    cases = [(label, fn, shared, counts) for label, fn in _layers() for shared in (False, True)
             for counts in ((5, 9), (6, 0))]  # unequal token counts; rank 1 with no token at all
    for label, router_fn, shared, counts in cases:
        full, ep = _build(router_fn, shared), _build(router_fn, shared)
        shard_experts(ep)
        g = torch.Generator().manual_seed(100 + rank)
        tokens = counts[rank]
        x = torch.randn(tokens, D, generator=g)
        dy = torch.randn(tokens, D, generator=g)

        xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        yf, rf = full(xf)
        ye, re = ep(xe)
        (yf * dy).sum().backward()
        (ye * dy).sum().backward()
        where = f"[{label}, shared={shared}, tokens {counts}, rank {rank}]"
        torch.testing.assert_close(ye, yf, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where} output: {m}")
        torch.testing.assert_close(re.indices, rf.indices, msg=lambda m: f"{where} routing: {m}")
        torch.testing.assert_close(xe.grad, xf.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where} dx: {m}")
        for (n, pf), pe in zip(full.router.named_parameters(), ep.router.parameters()):
            torch.testing.assert_close(pe.grad, pf.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where} router {n}: {m}")
        lo, hi = ep.experts.expert_offset, ep.experts.expert_offset + ep.experts.num_local_experts
        for name in ("gate_up_proj", "down_proj"):
            total = getattr(full.experts, name).grad.clone()
            dist.all_reduce(total)  # what the other rank's tokens add to this rank's experts
            got = getattr(ep.experts, name).grad
            assert got is not None, f"{where} {name} has no gradient"
            torch.testing.assert_close(got, total[lo:hi], rtol=1e-5, atol=1e-6, msg=lambda m: f"{where} {name}: {m}")
            assert is_expert_param(getattr(ep.experts, name)) and getattr(ep.experts, name).group_name == "ep_size_2"
        assert not any(is_expert_param(p) for p in ep.router.parameters())

    # unshard gathers the exact original experts on every rank
    moe = _build(_layers()[0][1], False)
    original = {n: p.detach().clone() for n, p in moe.experts.named_parameters()}
    shard_experts(moe)
    assert moe.experts.gate_up_proj.shape[0] == E // world
    unshard_experts(moe)
    assert isinstance(moe.experts, SwiGLUExperts)
    for n, p in moe.experts.named_parameters():
        assert torch.equal(p, original[n]), n


def _worker(rank: int, world: int, init_file: str, errors) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _check(rank, world)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_layer_equals_full_layer_for_every_router_on_two_gloo_ranks():
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        raised = None
        try:
            mp.start_processes(_worker, args=(2, os.path.join(tmp, "init"), errors), nprocs=2, start_method="spawn")
        except mp.ProcessRaisedException as e:  # a worker failed, possibly before it could report
            raised = e
        found = []
        while not errors.empty():
            found.append(errors.get())
    assert not found and raised is None, "\n".join(found) or str(raised)


def test_shard_errors_name_the_cause():
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
            ExpertParallelSwiGLUExperts(E, D, F_, None)
    with pytest.raises(ValueError, match="contains no SparseMoE"):
        shard_experts(nn.Linear(2, 2))


if __name__ == "__main__":  # pragma: no cover - manual debugging
    sys.exit(pytest.main([__file__, "-q"]))
