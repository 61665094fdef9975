"""Worker for the DeepSpeed tests: a few `moe-tune` steps of a tiny upcycled LM (attention frozen).

Run under a launcher, e.g. `torchrun --standalone --nproc_per_node 2 tests/moe_tune_ds_worker.py OUT
--ep-size 2`, or through the launch scripts: `ENTRY=tests/moe_tune_ds_worker.py GPUS_PER_NODE=2 EP_SIZE=2
pipelines/launch/moe-tune.sh OUT`. Every micro-batch is a global batch of 4 sequences split over the data-parallel
ranks, so the 1-process reference (`reference_run`) sees the same tokens as grad_accum=dp micro-batches.

Writes to OUT: the trainer's `metrics.jsonl` and `checkpoints/`, and per rank `rank<r>.json`
(local loss per micro-batch, global grad norm per step, layout) plus `rank<r>-init.safetensors` / `rank<r>-final.safetensors`
(the rank's parameters before and after training, expert shards included).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from zoo import upcycle  # noqa: E402
from zoo.pipelines.optim import OptimConfig  # noqa: E402
from zoo.pipelines.train import TrainConfig, train  # noqa: E402

GLOBAL_BATCH = 4


# DeepSeek-V3's gate with its aux-loss-free bias moving fast enough to change routing in a few steps
ROUTER_OPTIONS = {"deepseek_v3": {"top_k": 2, "n_group": 2, "topk_group": 1, "bias_update_rate": 0.05}}

ESFT_SELECTION = {0: [1, 2], 1: [0]}  # under ep_size=2: one selected expert per rank, then rank 1 has none


def tiny_moe_tune_model(esft: bool = False, num_experts: int = 4, router: str = "topk", router_options: dict | None = None):
    """Tiny Llama upcycled to 4 experts top-2, no jitter; only the MoE layers (router + experts) train.

    With `esft`: only the experts in `ESFT_SELECTION` train, through ESFT's gradient row masks (set
    before the engine shards the experts, as the `esft` stage does), with no weight decay on them.
    """
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    model = upcycle(lm, num_experts=num_experts, router=router,
                    router_options={"top_k": 2} if router_options is None else router_options)
    with torch.no_grad():  # break the copies' symmetry so each expert (and shard) is distinct
        for moe in model.moe_layers().values():
            moe.experts.gate_up_proj.add_(torch.randn_like(moe.experts.gate_up_proj) * 0.02)
    for name, p in model.named_parameters():
        p.requires_grad = "mlp" in name
    if esft:
        from zoo.transforms.esft import expert_gradient_masks, stacked_params

        stacked = {id(p) for moe in model.moe_layers().values() for p in stacked_params(moe).values()}
        for p in model.parameters():
            p.requires_grad = id(p) in stacked
            if p.requires_grad:
                p.zoo_no_decay = True
        expert_gradient_masks(model, ESFT_SELECTION)
    return model


def global_batch(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    ids = torch.randint(0, 64, (GLOBAL_BATCH, 16), generator=g)
    return {"input_ids": ids, "labels": ids}


def shard_of(batch: dict[str, torch.Tensor], part: int, parts: int) -> dict[str, torch.Tensor]:
    n = GLOBAL_BATCH // parts
    return {k: v[part * n:(part + 1) * n] for k, v in batch.items()}


def optim_config(precision: str = "fp32", grad_accum: int = 1, weight_decay: float = 0.0) -> OptimConfig:
    return OptimConfig(lr=1e-2, warmup_steps=1, grad_clip=0.13, grad_accum=grad_accum, precision=precision,
                       weight_decay=weight_decay)


def reference_run(out: str, steps: int, parts: int = 2, esft: bool = False, router: str = "topk"):
    """The 1-process run: TorchEngine, each global batch as `parts` accumulated micro-batches."""
    from zoo.pipelines.engines import TorchEngine

    model = tiny_moe_tune_model(esft, router=router, router_options=ROUTER_OPTIONS.get(router))
    cfg = TrainConfig(steps=steps, optim=optim_config(grad_accum=parts, weight_decay=0.1 if esft else 0.0))
    train(TorchEngine(model, cfg.optim, steps), lambda i: shard_of(global_batch(i // parts), i % parts, parts), cfg, out)
    return model


def run(out: str, ds_config: str, ep_size: int, steps: int, ckpt_every: int, resume: bool, esft: bool = False,
        num_experts: int = 4, activation_checkpointing: bool = False, lm_loss_chunk: int = 0,
        bf16_precision: str = "bf16", router: str = "topk") -> None:
    """Train with one DeepSpeed config into `out`; precision follows the config's name (`bf16_precision` for bf16)."""
    from zoo.pipelines.engines.deepspeed_engine import DeepSpeedEngine

    model = tiny_moe_tune_model(esft, num_experts, router=router, router_options=ROUTER_OPTIONS.get(router))
    precision = bf16_precision if "bf16" in ds_config else "fp32"
    cfg = TrainConfig(steps=steps, ckpt_every=ckpt_every, keep_checkpoints=5, optim=optim_config(precision, weight_decay=0.1 if esft else 0.0),
                      activation_checkpointing=activation_checkpointing, lm_loss_chunk=lm_loss_chunk)
    engine = DeepSpeedEngine(model, cfg.optim, cfg.steps, ds_config=ds_config, ep_size=ep_size)
    r = engine.rank
    os.makedirs(out, exist_ok=True)

    def dump(tag: str) -> None:
        bias = {n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}  # aux-free bias
        save_file({n: t.detach().float().cpu().contiguous() for n, t in [*model.named_parameters(), *bias.items()]},
                  os.path.join(out, f"rank{r}-{tag}.safetensors"))

    dump("init")
    losses: list[float] = []
    model.register_forward_hook(lambda m, args, output: losses.append(output.loss.item()))
    grad_norms: list[float] = []
    step = engine.step

    def recording_step():
        result = step()
        if result is not None:
            grad_norms.append(result.grad_norm)
        return result

    engine.step = recording_step
    dp, dpn = engine.dp_rank, engine.dp_world_size
    train(engine, lambda i: shard_of(global_batch(i), dp, dpn), cfg, out, resume=resume)
    dump("final")
    with open(os.path.join(out, f"rank{r}.json"), "w") as f:
        json.dump({"losses": losses, "grad_norms": grad_norms, "dp_rank": dp, "dp_world_size": dpn,
                   "ep_rank": engine.ep_rank, "ep_size": engine.ep_size, "world_size": engine.world_size}, f)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--ds-config", default="zero2_fp32", help="one config, or several comma-separated: run one after "
                   "the other in this process, each into OUT/<config> (a recipe's stages share a process too)")
    p.add_argument("--ep-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ckpt-every", type=int, default=2)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--experts", type=int, default=4, help="experts per MoE layer")
    p.add_argument("--esft", action="store_true", help="train only ESFT_SELECTION's experts (gradient row masks)")
    p.add_argument("--activation-checkpointing", action="store_true", help="TrainConfig.activation_checkpointing")
    p.add_argument("--lm-loss-chunk", type=int, default=0, help="TrainConfig.lm_loss_chunk (0: the plain loss)")
    p.add_argument("--bf16-precision", choices=["bf16", "bf16_master"], default="bf16", help="precision of bf16 configs")
    p.add_argument("--router", default="topk", choices=["topk", *ROUTER_OPTIONS], help="the MoE layers' router")
    p.add_argument("--stage", choices=["moe-tune"], default="moe-tune", help="what pipelines/launch/<stage>.sh passes")
    p.add_argument("--engine", choices=["deepspeed"], default="deepspeed", help="what pipelines/launch/*.sh passes")
    a = p.parse_args()
    torch.set_num_threads(1)
    configs = a.ds_config.split(",")
    for config in configs:
        out = a.out if len(configs) == 1 else os.path.join(a.out, config)
        run(out, config, a.ep_size, a.steps, a.ckpt_every, a.resume, a.esft, a.experts, a.activation_checkpointing,
            a.lm_loss_chunk, a.bf16_precision, a.router)


if __name__ == "__main__":
    main()
