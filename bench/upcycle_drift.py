"""How far each upcycler's start is from the dense model: relative logit drift ||MoE - dense|| / ||dense||.

    python bench/upcycle_drift.py [--experts 8] [--hidden 64] [--ffn 256]

A random-init Llama (no hub access here), so the figures show the mechanics (what top-k, output
scaling and the router init do to a split FFN), not what a trained model's neurons would give.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zoo import upcycle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=256)
    args = p.parse_args()
    cfg = LlamaConfig(vocab_size=97, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))

    def dense():
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()

    with torch.no_grad():
        ref = dense()(input_ids=ids).logits
    e = args.experts
    cases = [("copy", {}, 2), ("noisy", {"scale": 0.01}, 2), ("noisy", {"mode": "drop", "ratio": 0.5}, 2)]
    cases += [("split", o, k) for k in sorted({1, 2, e // 2, e}) for o in ({}, {"router_scale": 0.0}, {"output_scale": "none"})]
    print(f"E={e}, d={args.hidden}, f={args.ffn}; relative logit drift at initialization")
    for method, options, k in cases:
        model = upcycle(dense(), num_experts=e, router_options={"top_k": k}, method=method, method_options=options).eval()
        with torch.no_grad():
            drift = ((model(input_ids=ids).logits - ref).norm() / ref.norm()).item()
        print(f"  {method:6s} k={k:<2d} {str(options or 'defaults'):40s} {drift:.4f}")


if __name__ == "__main__":
    main()
