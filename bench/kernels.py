"""Benchmark the Triton routed-SwiGLU experts on a GPU (issue 7): forward+backward TFLOP/s.

Compares, in one run and on the same inputs:
  triton     zoo.kernels.triton.moe_swiglu (grouped GEMMs, fused gather / weighted scatter)
  dense      one cuBLAS GEMM `[T*k, d] @ [d, 9f]` with the same FLOPs as the MoE fwd+bwd
  loop       a transformers-style loop over experts (MixtralSparseMoeBlock before transformers 5)
  reference  zoo.kernels.reference.moe_swiglu (sort once, per-expert F.linear), for information
and prints the ratios triton/dense and triton/loop (targets: >= 0.85 and >= 2). Before timing it
checks the kernels against the reference in fp32, fp16 and bf16 on small ragged shapes (bf16 can
only be checked on a GPU: the Triton interpreter computes it wrongly).

FLOPs of the routed experts, N = T*k rows: forward 2*N*d*2f + 2*N*f*d = 6*N*d*f, backward twice
that (input and weight gradients), so fwd+bwd = 18*N*d*f.

Run from the repository root on a machine with a CUDA GPU:
    pip install --no-deps --no-build-isolation -e . && python bench/kernels.py
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch
import torch.nn.functional as F

# name: (E, k, d, f)
SHAPES = {
    "mixtral-8x7b  E=8  top-2 d=4096 ff=14336": (8, 2, 4096, 14336),
    "fine-grained  E=64 top-8 d=2048 ff=1024": (64, 8, 2048, 1024),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICE = "cuda"


def loop_moe(x, weights, indices, gate_up, down):
    """transformers-style expert loop: one boolean mask per expert, gather, two linears, index_add."""
    num_experts = gate_up.shape[0]
    y = torch.zeros_like(x)
    expert_mask = F.one_hot(indices, num_experts).permute(2, 1, 0)  # [E, k, T]
    for e in range(num_experts):
        slot, tok = torch.where(expert_mask[e])  # [n], [n]
        h = F.linear(x[tok], gate_up[e])  # [n, 2f]
        gate, up = h.chunk(2, dim=-1)
        out = F.linear(F.silu(gate) * up, down[e]) * weights[tok, slot, None]  # [n, d]
        y.index_add_(0, tok, out.to(x.dtype))
    return y


def make_inputs(tokens, num_experts, top_k, hidden, inter, dtype, seed=0, empty_expert=False):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = torch.randn(tokens, num_experts, device=DEVICE, generator=gen)
    if empty_expert:
        logits[:, num_experts // 2] = -float("inf")
    weights, indices = logits.softmax(-1).topk(top_k, dim=-1)  # [T, k]
    x = torch.randn(tokens, hidden, device=DEVICE, generator=gen).to(dtype)
    gate_up = (torch.randn(num_experts, 2 * inter, hidden, device=DEVICE, generator=gen) / hidden**0.5).to(dtype)
    down = (torch.randn(num_experts, hidden, inter, device=DEVICE, generator=gen) / inter**0.5).to(dtype)
    dy = torch.randn(tokens, hidden, device=DEVICE, generator=gen).to(dtype)
    return x, weights.to(dtype), indices, gate_up, down, dy


def fwd_bwd(fn, x, weights, indices, gate_up, down, dy):
    leaves = [t.detach().requires_grad_() for t in (x, weights, gate_up, down)]
    y = fn(leaves[0], leaves[1], indices, leaves[2], leaves[3])
    return [y.detach(), *torch.autograd.grad(y, leaves, dy)]


def check(moe) -> bool:
    """Kernels vs the float64 reference on small ragged shapes; the same criterion as the CPU tests."""
    from zoo.kernels import reference

    rtol = {"fp32": 2e-6, "fp16": 2e-3, "bf16": 2e-2}
    ok = True
    for tokens, num_experts, top_k, hidden, inter in [(37, 6, 1, 33, 40), (130, 5, 2, 200, 136), (91, 7, 3, 64, 96)]:
        for name, dtype in DTYPES.items():
            args = make_inputs(tokens, num_experts, top_k, hidden, inter, dtype, seed=1, empty_expert=True)
            x, w, idx, gu, dn, dy = args
            truth = fwd_bwd(reference.moe_swiglu, x.double(), w.double(), idx, gu.double(), dn.double(), dy.double())
            ref = fwd_bwd(reference.moe_swiglu, *args)
            tri = fwd_bwd(moe, *args)
            worst = []
            for tname, t64, tr, tt in zip(("y", "dx", "dweights", "dgate_up", "ddown"), truth, ref, tri):
                err = (tt.double() - t64).abs().max().item()
                tol = 4 * (tr.double() - t64).abs().max().item() + rtol[name] * t64.abs().max().item()
                worst.append(f"{tname} {err:.1e}/{tol:.1e}")
                ok &= bool(err <= tol)
            print(f"  check T={tokens} E={num_experts} k={top_k} d={hidden} f={inter} {name}: err/tol " + ", ".join(worst))
    print(f"  correctness: {'PASS' if ok else 'FAIL'}")
    return ok


def bench_shape(name, num_experts, top_k, hidden, inter, tokens, dtype, moe, do_bench):
    from zoo.kernels import reference

    flops = 18 * tokens * top_k * hidden * inter
    args = make_inputs(tokens, num_experts, top_k, hidden, inter, dtype)
    results = {}
    for label, fn in (("triton", moe), ("loop", loop_moe), ("reference", reference.moe_swiglu)):
        ms = do_bench(lambda fn=fn: fwd_bwd(fn, *args), warmup=50, rep=200, return_mode="median")
        results[label] = ms
        torch.cuda.empty_cache()
    del args
    torch.cuda.empty_cache()
    a = torch.randn(tokens * top_k, hidden, device=DEVICE, dtype=dtype)
    b = torch.randn(hidden, 9 * inter, device=DEVICE, dtype=dtype)
    results["dense"] = do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    del a, b
    torch.cuda.empty_cache()
    print(f"\n{name}, T={tokens}, {dtype}, fwd+bwd {flops / 1e12:.1f} TFLOP")
    for label in ("triton", "dense", "loop", "reference"):
        print(f"  {label:<10} {results[label]:9.2f} ms  {flops / results[label] / 1e9:7.1f} TFLOP/s")
    print(
        f"  ratios: triton/dense {results['dense'] / results['triton']:.2f}x (target >= 0.85), "
        f"triton/loop {results['loop'] / results['triton']:.2f}x (target >= 2)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--shape", choices=list(SHAPES), action="append", help="default: all")
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU (it times Triton kernels and cuBLAS); none is visible here. "
                 "On CPU the kernels are only tested, through the interpreter: pytest tests/test_kernels_triton.py")  # fmt: skip
    import triton
    from triton.testing import do_bench

    from zoo.kernels.triton import moe_swiglu

    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"CUDA {torch.version.cuda} | python {platform.python_version()}"
    )
    ok = True if args.skip_check else check(moe_swiglu)
    for name in args.shape or list(SHAPES):
        bench_shape(name, *SHAPES[name], args.tokens, DTYPES[args.dtype], moe_swiglu, do_bench)
    if not ok:
        sys.exit("correctness check FAILED (see above); timings are not meaningful")


if __name__ == "__main__":
    main()
