"""Multi-adapter serving (ExpertWeave) vs one merged model per adapter: expert memory and throughput.

    python bench/serving.py [--adapters 4] [--replace 2] [--requests 40] [--new-tokens 32] [--device cpu]

A random-init Llama upcycled to E experts and N ESFT-shaped adapters (each replaces `--replace`
random experts per MoE layer with perturbed rows); the requests cycle over the base and the
adapters. Side by side in one run, interleaved, medians:

- memory: bytes of expert weights in the pool (base experts once + every adapter's rows) against
  one merged copy per adapter (and one more for the base), and the whole models' bytes likewise;
- throughput: one greedy `generate` over the mixed batch on the pool, against serving the requests
  adapter by adapter (each adapter's requests as one batch on its merged copy, the copies built
  beforehand, so no weight swapping is counted), and the base alone on the whole batch (what the
  rerouting costs). Both paths give the same tokens (checked).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from zoo import upcycle
from zoo.inference import MultiAdapterMoE, generate
from zoo.io.checkpoint import weights_identity
from zoo.io.expert_adapter import ExpertAdapter
from zoo.io.moe_lm import load_moe_lm, save_moe_lm
from zoo.transforms.esft import apply_expert_adapter, stacked_params


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _adapter(model, base_sha256: str, num_replace: int, g: torch.Generator) -> ExpertAdapter:
    experts, tensors = {}, {}
    for layer, moe in model.moe_layers().items():
        ids = sorted(torch.randperm(moe.experts.num_experts, generator=g)[:num_replace].tolist())
        experts[layer] = ids
        for name, p in stacked_params(moe).items():
            rows = p.detach()[ids].cpu()
            tensors[f"{layer}/{name}"] = rows + 0.5 * rows.std() * torch.randn(rows.shape, generator=g, dtype=rows.dtype)
    return ExpertAdapter(experts, base_sha256, tensors)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--replace", type=int, default=2, help="experts each adapter replaces per MoE layer")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--prompt", type=int, default=32, help="longest prompt; lengths drawn from [prompt/2, prompt]")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                         initializer_range=0.1))
    base = upcycle(dense, num_experts=args.experts, router_options={"top_k": args.top_k}, method="noisy",
                   method_options={"scale": 0.1}).eval()
    g = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = save_moe_lm(base, Path(tmp) / "base")
        sha = weights_identity(base_dir)
        adapters = {f"task{i}": _adapter(base, sha, args.replace, g) for i in range(args.adapters)}
        merged = {None: load_moe_lm(base_dir)[0].eval().to(args.device)}
        for name, adapter in adapters.items():
            merged[name] = apply_expert_adapter(load_moe_lm(base_dir)[0].eval(), adapter, base_dir).to(args.device)
        server = MultiAdapterMoE(load_moe_lm(base_dir)[0].eval(), adapters, base_dir).to(args.device)

    names = [None, *adapters]
    which = [names[r % len(names)] for r in range(args.requests)]
    lengths = torch.randint(args.prompt // 2, args.prompt + 1, (args.requests,), generator=g)
    prompts = [torch.randint(0, args.vocab, (int(n),), generator=g).tolist() for n in lengths]
    groups = {name: [r for r, a in enumerate(which) if a == name] for name in names}
    kw = {"max_new_tokens": args.new_tokens, "eos_token_id": []}  # fixed length: no early stop

    def mixed():
        return generate(server, prompts, adapters=which, **kw)

    def one_by_one():
        out = [None] * len(prompts)
        for name, rows in groups.items():
            for r, tokens in zip(rows, generate(merged[name], [prompts[r] for r in rows], **kw), strict=True):
                out[r] = tokens
        return out

    def base_alone():
        return generate(merged[None], prompts, **kw)

    same = mixed() == one_by_one()
    cases = {"mixed batch on the pool": mixed, "adapter by adapter (merged copies)": one_by_one, "base alone, whole batch": base_alone}
    times = {k: [] for k in cases}
    for _ in range(args.repeats):
        for k, fn in cases.items():
            _sync(args.device)
            t0 = time.perf_counter()
            fn()
            _sync(args.device)
            times[k].append(time.perf_counter() - t0)

    pool_experts = server.expert_bytes()
    one_copy_experts = server.base_expert_bytes()
    pool_model = _bytes(server.parameters())
    one_model = _bytes(merged[None].parameters())
    n = args.adapters
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")
    print(f"model: d={args.hidden} f={args.ffn} layers={args.layers} E={args.experts} top-{args.top_k} vocab={args.vocab} "
          f"fp32; {n} adapters x {args.replace} experts per layer")
    print(f"requests: {args.requests} (cycling over the base and the {n} adapters), prompts {args.prompt // 2}-{args.prompt} "
          f"tokens, {args.new_tokens} new tokens each, greedy")
    print(f"same tokens, mixed vs adapter by adapter: {same}")
    print()
    print("memory (MiB)                        pool   merged copies   ratio")
    print(f"  expert weights, {n} adapters   {pool_experts / 2**20:9.2f}   {n * one_copy_experts / 2**20:13.2f}   "
          f"{pool_experts / (n * one_copy_experts):.3f}x")
    print(f"  expert weights, + the base    {pool_experts / 2**20:9.2f}   {(n + 1) * one_copy_experts / 2**20:13.2f}   "
          f"{pool_experts / ((n + 1) * one_copy_experts):.3f}x")
    print(f"  whole models, + the base      {pool_model / 2**20:9.2f}   {(n + 1) * one_model / 2**20:13.2f}   "
          f"{pool_model / ((n + 1) * one_model):.3f}x")
    print()
    tokens = args.requests * args.new_tokens
    print(f"throughput, median of {args.repeats} (s; new tokens/s)")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, t in med.items():
        print(f"  {k:36s} {t:8.3f} s  {tokens / t:9.1f} tok/s")
    print(f"  mixed / adapter-by-adapter throughput: {med['adapter by adapter (merged copies)'] / med['mixed batch on the pool']:.2f}x")
    print(f"  mixed / base-alone throughput:         {med['base alone, whole batch'] / med['mixed batch on the pool']:.2f}x")


if __name__ == "__main__":
    main()
