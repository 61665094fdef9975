"""Worker for the FSDP2 engine tests: `moe-tune` steps of the tiny upcycled LM under `FSDPEngine`.

Run under torchrun, e.g. `torchrun --standalone --nproc_per_node 4 tests/fsdp_worker.py OUT --ep-size 2`.
The model, the global batches and the 1-process reference are `moe_tune_ds_worker`'s: every micro-batch
is a global batch of 4 sequences split over the N ranks, so the reference (`reference_run`, N accumulated
micro-batches per step) sees the same tokens.

Writes to OUT: the trainer's `metrics.jsonl` and `checkpoints/`, and per rank `rank<r>.json` (its losses
per micro-batch, grad norms per step, layout, bytes of parameters, gradients and optimizer states it
holds) plus `rank<r>-final.safetensors` (the consolidated model: every parameter whole).
"""

from __future__ import annotations

import argparse
import json
import os
import signal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from moe_tune_ds_worker import global_batch, optim_config, shard_of, tiny_moe_tune_model  # noqa: E402
from zoo.pipelines.train import TrainConfig, train  # noqa: E402


def local_bytes(engine) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer states this rank holds (its shards)."""
    from torch.distributed.tensor import DTensor

    def size(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = sum(size(p) for p in engine.module.parameters())
    state = sum(size(v) for s in engine.optimizer.state.values() for k, v in s.items() if k != "step")
    return {"params": params, "optimizer": state}


def run(a) -> None:
    from zoo.pipelines.engines.fsdp_engine import FSDPEngine

    torch.set_num_threads(1)
    model = tiny_moe_tune_model(a.esft, a.experts)
    if a.train_all:
        for p in model.parameters():
            p.requires_grad = True
    precision = a.precision
    cfg = TrainConfig(steps=a.steps, ckpt_every=a.ckpt_every, keep_checkpoints=50,
                      optim=optim_config(precision, weight_decay=0.1 if a.esft else 0.0),
                      activation_checkpointing=a.activation_checkpointing)
    engine = FSDPEngine(model, cfg.optim, cfg.steps, ep_size=a.ep_size)
    r, n = engine.rank, engine.world_size
    os.makedirs(a.out, exist_ok=True)
    losses: list[float] = []
    engine.module.register_forward_hook(lambda m, args, output: losses.append(output.loss.item()))
    grad_norms: list[float] = []
    grad_bytes: list[int] = []
    step = engine.step

    def recording_step():
        from torch.distributed.tensor import DTensor

        grad_bytes.append(sum((g.to_local() if isinstance(g, DTensor) else g).numel() * g.element_size()
                              for p in engine.module.parameters() if (g := p.grad) is not None))
        if a.die_at_step and len(grad_norms) + 1 == a.die_at_step and r == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-step: gradients reduced, no update, no checkpoint
        result = step()
        if result is not None:
            grad_norms.append(result.grad_norm)
        return result

    engine.step = recording_step
    train(engine, lambda i: shard_of(global_batch(i), r, n), cfg, a.out, resume=a.resume)
    held = local_bytes(engine)
    final = engine.consolidate()
    if r == 0 or a.all_ranks_dump:
        save_file({k: t.detach().float().contiguous() for k, t in final.named_parameters()},
                  os.path.join(a.out, f"rank{r}-final.safetensors"))
    with open(os.path.join(a.out, f"rank{r}.json"), "w") as f:
        json.dump({"losses": losses, "grad_norms": grad_norms, "world_size": n, "ep_size": engine.ep_size,
                   "ep_rank": engine.ep_rank, "bytes": {**held, "grads": max(grad_bytes, default=0)}}, f)


def every_router(a) -> None:
    """Each registered router kind (its registry example options): 3 fp32 steps under FSDPEngine in
    this process group; per kind, the losses and whether every trainable parameter moved."""
    from torch.distributed.tensor import DTensor

    from zoo.moe.routers import ROUTERS
    from zoo.pipelines.engines.fsdp_engine import FSDPEngine

    torch.set_num_threads(1)
    results = {}
    for name in ROUTERS.names():
        model = tiny_moe_tune_model(router=name, router_options=dict(ROUTERS.entry(name).example))
        cfg = TrainConfig(steps=3, optim=optim_config())
        engine = FSDPEngine(model, cfg.optim, cfg.steps, ep_size=a.ep_size)
        r, n = engine.rank, engine.world_size
        before = {k: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                  for k, p in engine.module.named_parameters() if p.requires_grad}
        result = train(engine, lambda i: shard_of(global_batch(i), r, n), cfg, os.path.join(a.out, name))
        after = {k: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
                 for k, p in engine.module.named_parameters() if p.requires_grad}
        still = sorted(k for k in before if torch.equal(before[k], after[k]))
        engine.consolidate()
        results[name] = {"final_loss": result.final_loss, "unchanged": still}
    with open(os.path.join(a.out, f"rank{dist_rank()}-routers.json"), "w") as f:
        json.dump(results, f)


def dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--ep-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--esft", action="store_true")
    p.add_argument("--train-all", action="store_true", help="every parameter trains (memory per rank)")
    p.add_argument("--precision", choices=["fp32", "bf16", "bf16_master"], default="fp32")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--die-at-step", type=int, default=0, help="rank 0 kills itself (SIGKILL) in this optimizer step")
    p.add_argument("--all-ranks-dump", action="store_true")
    p.add_argument("--every-router", action="store_true", help="3 steps of each registered router kind")
    a = p.parse_args()
    every_router(a) if a.every_router else run(a)


if __name__ == "__main__":
    main()
