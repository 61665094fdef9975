"""One training step per engine at N processes: torch (1 process), DeepSpeed ZeRO-2, FSDP2.

    python bench/engines.py [--nproc 2] [--size tiny|small] [--ep-size 2] [--steps 8]

Launches itself under torchrun once per distributed engine (gloo on CPU, nccl on GPUs: the same
script runs on either) and prints, per engine and rank, the median step time, the bytes of
parameters, gradients and optimizer states the rank holds (its shards), and the process's peak
memory (CPU: max RSS, which includes the interpreter and libraries; GPU: `max_memory_allocated`).
The model is the MoE-tune model of the engine tests (a Llama upcycled to top-2 MoE, attention
frozen) at `--size tiny` (hidden 32, 2 layers, 4 experts) or `--size small` (hidden 512, 4 layers,
8 experts, vocab 8192), so byte counts are visible above the interpreter's footprint.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    "tiny": dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, experts=4, seq=16, batch=4),
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, experts=8, seq=128, batch=8),
}


def build(size: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from zoo import upcycle

    s = dict(SIZES[size])
    experts, seq, batch = s.pop("experts"), s.pop("seq"), s.pop("batch")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(max_position_embeddings=seq, **s))
    model = upcycle(lm, num_experts=experts, router_options={"top_k": 2})
    for name, p in model.named_parameters():
        p.requires_grad = "mlp" in name
    return model, seq, batch, s["vocab_size"]


def held_bytes(module, optimizer) -> dict[str, int]:
    import torch
    from torch.distributed.tensor import DTensor

    def size(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = sum(size(p) for p in module.parameters())
    grads = sum(size(p.grad) for p in module.parameters() if p.grad is not None)
    state = 0
    for s in getattr(optimizer, "state", {}).values():
        state += sum(size(v) for k, v in s.items() if isinstance(v, torch.Tensor) and k != "step")
    return {"params": params, "grads": grads, "optimizer": state}


def worker(a) -> None:
    """One engine under the launcher (or the torch engine in this process): time `--steps` steps."""
    import torch
    import torch.distributed as dist

    from zoo.pipelines.engines import EngineSpec, make_engine
    from zoo.pipelines.optim import OptimConfig

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, seq, batch, vocab = build(a.size)
    spec = EngineSpec(a.engine, "zero2_fp32", a.ep_size if a.engine != "torch" else 1)
    spec.init_distributed()
    engine = make_engine(spec, model, OptimConfig(lr=1e-3, warmup_steps=1), a.steps)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    g = torch.Generator().manual_seed(rank)
    times, grads = [], 0
    for _ in range(a.steps):
        ids = torch.randint(0, vocab, (max(1, batch // world), seq), generator=g).to(engine.device)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with engine.autocast():
            out = engine.model(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        module = getattr(engine, "module", engine.model)
        grads = max(grads, held_bytes(module, None)["grads"])
        engine.step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    module = getattr(engine, "module", engine.model)
    optimizer = getattr(engine, "optimizer", None) or getattr(getattr(engine, "ds", None), "optimizer", None)
    held = held_bytes(module, getattr(optimizer, "optimizer", optimizer))
    held["grads"] = grads  # DeepSpeed's ZeRO-2 keeps reduced gradients in its own partitioned buffers
    peak = (torch.cuda.max_memory_allocated() if engine.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    row = {"engine": a.engine, "rank": rank, "world": world, "ep_size": getattr(engine, "ep_size", 1),
           "step_ms": 1000 * statistics.median(times[1:] or times), "peak_bytes": peak, **held}
    with open(os.path.join(a.out, f"{a.engine}-rank{rank}.json"), "w") as f:
        json.dump(row, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--ep-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--engine", default=None, help=argparse.SUPPRESS)  # set in the launched workers
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.engine:
        return worker(a)
    import torch

    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "DS_ACCELERATOR": "cpu"} \
            if not torch.cuda.is_available() else dict(os.environ)
        base = [sys.argv[0], "--size", a.size, "--ep-size", str(a.ep_size), "--steps", str(a.steps), "--out", out]
        subprocess.run([sys.executable, *base, "--engine", "torch"], env=env, check=True)
        for engine, port in (("deepspeed", 29711), ("fsdp", 29712)):
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc),
                            "--master_addr", "127.0.0.1", "--master_port", str(port), *base, "--engine", engine],
                           env=env, check=True, capture_output=True)
        rows = [json.loads(f.read_text()) for f in sorted(Path(out).glob("*.json"))]
    device = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu (gloo; CPU figures)"
    print(f"size {a.size}: {SIZES[a.size]}; device {device}; torch {torch.__version__}; "
          f"threads/process {os.environ.get('OMP_NUM_THREADS', '1')}; N={a.nproc}, ep_size={a.ep_size}")
    print(f"{'engine':<10} {'rank':>4} {'ep':>3} {'step ms':>9} {'params MB':>10} {'grads MB':>9} {'optim MB':>9} {'peak MB':>9}")
    order = {"torch": 0, "deepspeed": 1, "fsdp": 2}
    for r in sorted(rows, key=lambda r: (order[r["engine"]], r["rank"])):
        print(f"{r['engine']:<10} {r['rank']:>4} {r['ep_size']:>3} {r['step_ms']:9.1f} {r['params'] / 2**20:10.3f} "
              f"{r['grads'] / 2**20:9.3f} {r['optimizer'] / 2**20:9.3f} {r['peak_bytes'] / 2**20:9.1f}")


if __name__ == "__main__":
    main()
