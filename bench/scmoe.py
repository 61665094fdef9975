"""SCMoE decoding speed against greedy decoding of the same model, side by side.

An upcycled Llama (random distinct experts) generates `--new` tokens after a `--prompt`-token
prompt, `--batch` sequences at once, greedy with KV cache. Each round runs, interleaved: greedy
(the model's own top-k), greedy under `override_routing(top_k=1)` (what the weak pass alone costs
as a model), SCMoE with the top-1 weak activation, SCMoE with the rank-2 weak activation. Reported:
median wall time and CPU time of this process per round, tokens/s (batch * new / time) and each
one's ratio to greedy (on a machine shared with other jobs the CPU-time ratio is the stable one).
EOS is off, so every run makes exactly `--new` tokens.

    python bench/scmoe.py                          # CPU defaults
    python bench/scmoe.py --batch 8 --new 64
    python bench/scmoe.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import zoo
from zoo.inference import override_routing, scmoe_generate
from zoo.moe import MoEConfig, SparseMoE


def build(args) -> zoo.MoECausalLM:
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                                      num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=1024))
    model = zoo.upcycle(lm, MoEConfig(num_experts=args.experts, router_options={"top_k": args.top_k}))
    with torch.no_grad():
        for moe in (m for m in model.modules() if isinstance(m, SparseMoE)):
            for p in moe.experts.parameters():
                p.normal_(0, 0.02)
            moe.router.weight.normal_(0, 0.5)
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()


def timed(fn, device: str) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call."""
    if device == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.prompt), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=args.new, do_sample=False, pad_token_id=0, eos_token_id=None)

    def greedy():
        return model.generate(input_ids=ids, attention_mask=mask, **kw)

    def weak_alone():
        with override_routing(model, top_k=1):
            return model.generate(input_ids=ids, attention_mask=mask, **kw)

    runs = {
        "greedy": greedy,
        "greedy, top-1 override": weak_alone,
        "SCMoE weak top-1": lambda: scmoe_generate(model, ids, mask, weak={"top_k": 1}, beta=args.beta, alpha=args.alpha, **kw),
        "SCMoE weak rank-2": lambda: scmoe_generate(model, ids, mask, weak={"rank": 2}, beta=args.beta, alpha=args.alpha, **kw),
    }
    outputs = {name: fn() for name, fn in runs.items()}  # warm-up, and the outputs
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn, args.device))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")
    print(f"model: Llama d={args.hidden} f={args.ffn} layers={args.layers} vocab={args.vocab}, E={args.experts} "
          f"top-{args.top_k} in every layer, {args.dtype}")
    print(f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, beta={args.beta} alpha={args.alpha}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"load average at the end: {load:.1f} (the CPU-time columns are what survives other jobs' load)")
    tokens = args.batch * args.new
    med = {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)) for name, ts in times.items()}
    wall0, cpu0 = med["greedy"]
    print(f"{'':24s} {'wall ms':>9s} {'tok/s':>8s} {'ratio':>6s} {'cpu ms':>9s} {'tok/cpu-s':>9s} {'ratio':>6s}  same tokens as greedy")
    for name, (wall, cpu) in med.items():
        same = (outputs[name] == outputs["greedy"])[:, args.prompt:].float().mean().item()
        print(f"{name:24s} {wall * 1e3:9.1f} {tokens / wall:8.1f} {wall0 / wall:5.2f}x {cpu * 1e3:9.1f} {tokens / cpu:9.1f} "
              f"{cpu0 / cpu:5.2f}x  {same:.2f}")


if __name__ == "__main__":
    main()
