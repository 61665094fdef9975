"""Subprocess worker for the kill-and-resume test: trains a tiny upcycled LM with checkpoints."""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from zoo import upcycle  # noqa: E402
from zoo.pipelines.engines import TorchEngine  # noqa: E402
from zoo.pipelines.optim import OptimConfig  # noqa: E402
from zoo.pipelines.train import TrainConfig, train  # noqa: E402


ROUTERS = {  # what resume must restore: the RNG (jitter), a scheduled k, K-means centroids
    "topk": {"top_k": 2, "jitter_noise": 0.1},
    "smoe_dropout": {"k_min": 1},
    "kmeans": {"decay": 0.5},
}


def tiny_moe_lm(seed: int = 0, router: str = "topk"):
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    return upcycle(lm, num_experts=4, router=router, router_options=ROUTERS[router])


def batch_at(i: int) -> dict:
    g = torch.Generator().manual_seed(1000 + i)
    ids = torch.randint(0, 64, (4, 16), generator=g)
    return {"input_ids": ids, "labels": ids}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--router", default="topk", choices=sorted(ROUTERS))
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = TrainConfig(steps=a.steps, ckpt_every=5, optim=OptimConfig(lr=3e-3, warmup_steps=5, grad_accum=2))
    train(TorchEngine(tiny_moe_lm(router=a.router), cfg.optim, cfg.steps), batch_at, cfg, a.out, resume=a.resume)
