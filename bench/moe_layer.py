"""Side-by-side speed of our SparseMoE vs transformers' MixtralSparseMoeBlock vs a dense SwiGLU,
and of every router's variable-K path vs the fixed top-k path.

Same weights in all MoE layers; transformers' block runs with its eager experts and with its best
CPU implementation (`experts_implementation="grouped_mm"`); the dense SwiGLU has the active
parameters of one token (intermediate size k * f), so it does the same FLOPs as the MoE's expert
GEMMs. Runs are interleaved (ours, HF, dense, ours, ...) so drifting machine load hits all alike;
the median of each is reported with ratios.

`--router NAME` (or `all`) adds, per router: its mean experts per token m on the bench tokens,
its layer's fwd+bwd time, the top-k layer's at k = round(m), and their ratio per expert-token
(time ratio / (m / k)); and once, the variable-K path alone: K = 2k slots with exactly k filled
per token (empty slots, -1) against the dense [T, k] routing of the same assignments.

    python bench/moe_layer.py                       # CPU defaults: E=8 top-2 d=512 f=1024
    python bench/moe_layer.py --router all
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
from zoo.moe import ROUTERS, SparseMoE, SwiGLU, SwiGLUExperts, build_sparse_moe, experts_per_token


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
    p.add_argument("--router", default=None, help="a ROUTERS name, or 'all': compare its variable-K path to top-k")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    E, k, d, f = args.experts, args.top_k, args.hidden, args.ffn

    hf = MixtralSparseMoeBlock(MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=k,
                                             experts_implementation="eager"))
    with torch.no_grad():
        for prm in hf.parameters():
            prm.normal_(std=0.02)
    hf_best = MixtralSparseMoeBlock(MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E,
                                                  num_experts_per_tok=k, experts_implementation="grouped_mm"))
    hf_best.load_state_dict(hf.state_dict())
    ours = build_sparse_moe(MoEConfig(num_experts=E, router_options={"top_k": k}), d, f)
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf.experts.down_proj)
    dense = SwiGLU(d, k * f)
    for m in (hf, hf_best, ours, dense):
        m.to(device=args.device, dtype=dtype)

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device {args.device}")
    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")
    print(f"shape: E={E} top-{k} d={d} f={f} dtype={args.dtype}; dense SwiGLU f={k * f} (equal active params)\n")

    x = torch.randn(args.tokens, d, device=args.device, dtype=dtype)
    with torch.no_grad():
        y_hf = hf(x[None]).reshape(-1, d)
        y_best = hf_best(x[None]).reshape(-1, d)
        y_ours = ours(x)[0]
    print(f"max |ours - HF eager| on {args.tokens} tokens: {(y_ours - y_hf).abs().max().item():.2e}; "
          f"|ours - HF grouped_mm|: {(y_ours - y_best).abs().max().item():.2e}")

    def fwd_bwd(layer, take_first):
        def run():
            xi = x[None] if layer in (hf, hf_best) else x
            xi = xi.detach().requires_grad_()
            out = layer(xi)
            (out[0] if take_first else out).float().square().mean().backward()
            layer.zero_grad(set_to_none=True)

        return run

    ms = compare({"ours": fwd_bwd(ours, True), "hf": fwd_bwd(hf, False), "best": fwd_bwd(hf_best, False),
                  "dense": fwd_bwd(dense, False)}, args.repeats, args.device)
    print(f"\nforward+backward, {args.tokens} tokens (median ms; ratio = time / other's time)")
    print(f"  ours {ms['ours']:8.2f}   HF eager {ms['hf']:8.2f}   HF grouped_mm {ms['best']:8.2f}   dense {ms['dense']:8.2f}")
    print(f"  ours/HF-eager {ms['ours'] / ms['hf']:.2f}x   ours/HF-grouped_mm {ms['ours'] / ms['best']:.2f}x   "
          f"ours/dense {ms['ours'] / ms['dense']:.2f}x   HF-grouped_mm/dense {ms['best'] / ms['dense']:.2f}x")
    if args.router:
        compare_routers(args, x, ours, dtype)

    print("\ndecode-size forward (no grad), median ms")
    print(f"  {'tokens':>6} {'ours':>8} {'HF':>8} {'HF-gmm':>8} {'dense':>8} {'HF/ours':>8} {'gmm/ours':>8}")
    with torch.inference_mode():
        for t in args.decode:
            xt = torch.randn(t, d, device=args.device, dtype=dtype)
            ms = compare({"ours": lambda: ours(xt), "hf": lambda: hf(xt[None]), "best": lambda: hf_best(xt[None]),
                          "dense": lambda: dense(xt)}, args.repeats * 20, args.device)
            print(f"  {t:>6} {ms['ours']:8.3f} {ms['hf']:8.3f} {ms['best']:8.3f} {ms['dense']:8.3f} "
                  f"{ms['hf'] / ms['ours']:7.2f}x {ms['best'] / ms['ours']:7.2f}x")


def compare_routers(args, x: torch.Tensor, ours: SparseMoE, dtype: torch.dtype) -> None:
    """Each router's layer vs the top-k layer at its mean experts per token; the bare variable-K path."""
    E, k, d = args.experts, args.top_k, args.hidden
    experts = ours.experts

    def layer_fwd_bwd(layer):
        def run():
            xi = x.detach().requires_grad_()
            layer(xi)[0].float().square().mean().backward()
            layer.zero_grad(set_to_none=True)

        return run

    names = ROUTERS.names() if args.router == "all" else [args.router]
    print(f"\nrouters, forward+backward of the whole layer, {args.tokens} tokens (same experts; median ms)")
    print(f"  {'router':<14} {'experts/tok':>11} {'ms':>8} {'top-k k':>8} {'top-k ms':>9} {'ratio':>7} {'per expert-token':>17}")
    for name in names:
        torch.manual_seed(0)
        router = ROUTERS.build(name, dict(ROUTERS.entry(name).example), hidden_size=d, num_experts=E)
        with torch.no_grad():
            for attr in ("weight", "projection"):
                if hasattr(router, attr):
                    getattr(router, attr).normal_(std=0.5)  # a trained router's sharper decisions
        layer = SparseMoE(router=router, experts=experts).to(device=args.device, dtype=dtype)
        with torch.no_grad():
            m = experts_per_token(layer.router(x).indices).item()
        k_fix = max(1, round(m))
        fixed = build_sparse_moe(MoEConfig(num_experts=E, router_options={"top_k": k_fix}), d, args.ffn)
        fixed.experts = experts
        fixed.to(device=args.device, dtype=dtype)
        ms = compare({"var": layer_fwd_bwd(layer), "fix": layer_fwd_bwd(fixed)}, args.repeats, args.device)
        ratio = ms["var"] / ms["fix"]
        print(f"  {name:<14} {m:11.2f} {ms['var']:8.2f} {k_fix:8d} {ms['fix']:9.2f} {ratio:6.2f}x {ratio / (m / k_fix):16.2f}x")

    # The variable-K path alone: the same assignments as K=2k slots with k empty per token, vs [T, k].
    g = torch.Generator().manual_seed(0)
    w, idx = torch.randn(x.shape[0], E, generator=g).softmax(-1).topk(k)
    w, idx = w.to(x.device), idx.to(x.device)
    slots = torch.rand(x.shape[0], 2 * k, generator=g).argsort(dim=1)[:, :k].to(x.device)  # where the k filled go
    wv = torch.zeros(x.shape[0], 2 * k, device=x.device).scatter(1, slots, w)
    iv = torch.full((x.shape[0], 2 * k), -1, device=x.device, dtype=torch.long).scatter(1, slots, idx)

    def op(weights, indices):
        def run():
            xi = x.detach().requires_grad_()
            experts(xi, weights, indices).float().square().mean().backward()
            experts.zero_grad(set_to_none=True)

        return run

    ms = compare({"var": op(wv, iv), "fix": op(w, idx)}, args.repeats, args.device)
    print(f"\nvariable-K path alone, same {x.shape[0] * k} assignments: {2 * k} slots with {k} empty per token "
          f"{ms['var']:.2f} ms vs [T, {k}] {ms['fix']:.2f} ms: {ms['var'] / ms['fix']:.2f}x")


if __name__ == "__main__":
    main()
