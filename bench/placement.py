"""ExFlow expert placement: cross-device transitions and simulated all-to-all volume, ILP vs greedy vs
contiguous, on the tiny zoo's routing traces and on a synthetic 16-expert trace.

    python bench/placement.py [--checkpoint RUN/moe-tune/model] [--per-family 64] [--time-limit 60]

Placements are fit on a trace of the training split and scored on a trace of the held-out test
split (each family's first `--per-family` samples, teacher-forced: prompt and answer tokens, as in
a prefill). The tiny zoo has 4 experts per MoE layer, so G = 2, 4 there; G = 8 runs on a synthetic
trace of 16 experts over 4 MoE layers, top-2, whose tokens carry a latent topic that biases their
experts at every layer (an affinity of known strength, not a model's). With `--checkpoint` the ILP
placement is also applied to the checkpoint (`permute_model_dir`) and the permuted model's logits
are compared with the original's. Units: token vectors (d numbers each) sent between devices per
token per transition between consecutive MoE layers (`zoo.inference.placement` states the model).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from zoo.inference.placement import (RoutingTrace, affinity, contiguous_placement, greedy_placement, ilp_placement,
                                     permute_model_dir, placement_cost, routing_trace)


def synthetic_trace(tokens: int, *, layers: int = 4, experts: int = 16, top_k: int = 2, topics: int = 8,
                    strength: float = 2.0, seed: int = 0, rng_seed: int = 0) -> RoutingTrace:
    """Top-k routing of tokens with a latent topic: expert logits = strength * pref[l, topic] + Gumbel noise.

    `seed` fixes the model (each layer's topic preferences), `rng_seed` the tokens.
    """
    model = torch.Generator().manual_seed(seed)
    pref = torch.randn(layers, topics, experts, generator=model)  # [L, Z, E]
    g = torch.Generator().manual_seed(1000 + rng_seed)
    topic = torch.randint(0, topics, (tokens,), generator=g)
    idx = []
    for l in range(layers):
        noise = -torch.log(-torch.log(torch.rand(tokens, experts, generator=g).clamp_min(1e-12)))
        idx.append(torch.topk(strength * pref[l, topic] + noise, top_k, dim=-1).indices)
    return RoutingTrace(tuple(range(layers)), tuple(idx), (experts,) * layers)


def tiny_zoo_traces(checkpoint: Path, per_family: int, batch_size: int):
    """(model, fit trace on the train split, eval trace on the test split, one eval batch)."""
    from zoo.catalog.load import load_directory
    from zoo.pipelines.collate import collate
    from zoo.pipelines.datasets import load_datasets
    from zoo.pipelines.eval import find_run_data

    data = find_run_data(checkpoint)
    if data is None:
        raise SystemExit(f"no run data beside {checkpoint}")
    model, processor, _ = load_directory(checkpoint)
    families = {"vqa", "asr", "caption", "text"}
    out = []
    for split in ("train", "test"):
        sets = load_datasets(data, families, split)
        samples = [s for f in sorted(sets) for s in sets[f][:per_family]]
        batches = [collate(samples[i: i + batch_size], processor) for i in range(0, len(samples), batch_size)]
        out.append((routing_trace(model, batches), batches[0]))
    return model, out[0][0], out[1][0], out[1][1]


def table(name: str, fit: RoutingTrace, test: RoutingTrace, devices: list[int], time_limit: float) -> dict:
    """Print one table: per G, contiguous / greedy / ILP scored on the test trace. Returns G -> ILP placement."""
    transitions = len(test.layers) - 1
    per = test.num_tokens * transitions
    print(f"\n{name}: E={list(test.num_experts)}, MoE layers {list(test.layers)}, "
          f"fit on {fit.num_tokens} tokens, scored on {test.num_tokens} held-out tokens "
          f"({transitions} transition{'s' if transitions > 1 else ''} between MoE layers)")
    print("| G | placement | cross-device transitions | ExFlow a2a volume / token / transition | vs contiguous | "
          "plain EP (2 a2a) volume | solve s | optimal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    chosen = {}
    for g in devices:
        placements = [contiguous_placement(fit, g), greedy_placement(fit, g), ilp_placement(fit, g, time_limit=time_limit)]
        base = placement_cost(test, placements[0])
        fit_obj = [placement_cost(fit, p).cross_device for p in placements]
        for p, obj in zip(placements, fit_obj):
            c = placement_cost(test, p)
            if p.optimal is None:
                optimal = ""
            elif p.optimal:
                optimal = "yes"
            elif "fallback" in p.info:
                optimal = "no: nothing better than greedy found, greedy returned"
            else:
                optimal = f"no: gap {p.info['mip_gap']:.1%}"
            print(f"| {g} | {p.method} | {c.cross_fraction:.3f} | {c.exflow_volume / per:.3f} | "
                  f"{c.exflow_volume / base.exflow_volume:.3f} | {c.ep_volume / per:.3f} | {p.solve_seconds:.2f} | {optimal} |")
        if not fit_obj[2] <= fit_obj[1] + 1e-9:
            print(f"  note: the ILP's fit objective {fit_obj[2]:.0f} is above greedy's {fit_obj[1]:.0f} (time limit)")
        chosen[g] = placements[2]
    return chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="a tiny-zoo MoE model directory inside its run (RUN/moe-tune/model)")
    p.add_argument("--per-family", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--time-limit", type=float, default=60.0)
    p.add_argument("--synthetic-tokens", type=int, default=4096)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.checkpoint is not None:
        model, fit, test, batch = tiny_zoo_traces(args.checkpoint, args.per_family, args.batch_size)
        for pos, p_ij in enumerate(affinity(test)):
            k = float(test.chosen(pos + 1).sum(1).double().mean())
            print(f"tiny zoo affinity P(j at layer {test.layers[pos + 1]} | i at layer {test.layers[pos]}) (rows sum to "
                  f"~{k:.2f}; no affinity: {k / test.num_experts[pos + 1]:.2f} everywhere):")
            for row in p_ij.tolist():
                print("   ", " ".join(f"{v:.2f}" for v in row))
        chosen = table("tiny zoo (moe-tune)", fit, test, [g for g in (2, 4) if all(e % g == 0 for e in fit.num_experts)],
                       args.time_limit)
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            from zoo.io.model_dir import load_model_dir

            for g, placement in chosen.items():
                permute_model_dir(args.checkpoint, Path(tmp) / f"g{g}", placement)
                permuted, _, _ = load_model_dir(Path(tmp) / f"g{g}")
                permuted.eval()
                ref, got = model(**batch).logits, permuted(**batch).logits
                print(f"checkpoint permuted for the G={g} ILP placement: max |logit difference| "
                      f"{float((got - ref).abs().max()):.2e} (logits up to {float(ref.abs().max()):.1f})")
    fit = synthetic_trace(args.synthetic_tokens, rng_seed=0)
    test = synthetic_trace(args.synthetic_tokens, rng_seed=1)
    table("synthetic (16 experts, 4 MoE layers, top-2, 8 topics)", fit, test, [2, 4, 8], args.time_limit)


if __name__ == "__main__":
    main()
