"""Side-by-side speed of our SparseMoE vs transformers' MixtralSparseMoeBlock vs a dense SwiGLU.

Same weights in both MoE layers; the dense SwiGLU has the active parameters of one token
(intermediate size k * f), so it does the same FLOPs as the MoE's expert GEMMs. Runs are
interleaved (ours, HF, dense, ours, ...) so drifting machine load hits all three alike; the
median of each is reported with ratios.

    python bench/moe_layer.py                       # CPU defaults: E=8 top-2 d=512 f=1024
    python bench/moe_layer.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import transformers
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from zoo import MoEConfig
from zoo.moe import SwiGLU, build_sparse_moe


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def compare(fns: dict, repeats: int, device: str) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--decode", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    E, k, d, f = args.experts, args.top_k, args.hidden, args.ffn

    hf = MixtralSparseMoeBlock(MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=k))
    with torch.no_grad():
        for prm in hf.parameters():
            prm.normal_(std=0.02)
    ours = build_sparse_moe(MoEConfig(num_experts=E, router_options={"top_k": k}), d, f)
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf.experts.down_proj)
    dense = SwiGLU(d, k * f)
    for m in (hf, ours, dense):
        m.to(device=args.device, dtype=dtype)

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device {args.device}")
    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")
    print(f"shape: E={E} top-{k} d={d} f={f} dtype={args.dtype}; dense SwiGLU f={k * f} (equal active params)\n")

    x = torch.randn(args.tokens, d, device=args.device, dtype=dtype)
    with torch.no_grad():
        y_hf = hf(x[None]).reshape(-1, d)
        y_ours = ours(x)[0]
    print(f"max |ours - HF| on {args.tokens} tokens: {(y_ours - y_hf).abs().max().item():.2e}")

    def fwd_bwd(layer, take_first):
        def run():
            xi = x[None] if layer is hf else x
            xi = xi.detach().requires_grad_()
            out = layer(xi)
            (out[0] if take_first else out).float().square().mean().backward()
            layer.zero_grad(set_to_none=True)

        return run

    ms = compare({"ours": fwd_bwd(ours, True), "hf": fwd_bwd(hf, False), "dense": fwd_bwd(dense, False)},
                 args.repeats, args.device)
    print(f"\nforward+backward, {args.tokens} tokens (median ms; ratio = time / other's time)")
    print(f"  ours {ms['ours']:8.2f}   HF {ms['hf']:8.2f}   dense {ms['dense']:8.2f}")
    print(f"  ours/HF {ms['ours'] / ms['hf']:.2f}x   ours/dense {ms['ours'] / ms['dense']:.2f}x   HF/dense {ms['hf'] / ms['dense']:.2f}x")

    print("\ndecode-size forward (no grad), median ms")
    print(f"  {'tokens':>6} {'ours':>8} {'HF':>8} {'dense':>8} {'HF/ours':>8}")
    with torch.inference_mode():
        for t in args.decode:
            xt = torch.randn(t, d, device=args.device, dtype=dtype)
            ms = compare({"ours": lambda: ours(xt), "hf": lambda: hf(xt[None]), "dense": lambda: dense(xt)},
                         args.repeats * 20, args.device)
            print(f"  {t:>6} {ms['ours']:8.3f} {ms['hf']:8.3f} {ms['dense']:8.3f} {ms['hf'] / ms['ours']:7.2f}x")


if __name__ == "__main__":
    main()
