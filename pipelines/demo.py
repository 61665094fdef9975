"""The README's main job: build a tiny upcycled MoE LM, train it a few steps, show its routing.

Text: docstrings of the Python standard library (always present offline), as bytes (vocab 256).
A dense tiny Llama is trained briefly, upcycled to 4 experts top-2 on every other layer (checked
to reproduce the dense logits), then the MoE model is trained with the balance loss on, and the
per-layer expert load and router entropy are printed.
"""

from __future__ import annotations

import argparse
import importlib
import math
import time
import warnings

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from zoo import MoEConfig, upcycle

_MODULES = ("argparse", "collections", "dataclasses", "functools", "itertools", "json", "os", "pathlib", "re", "typing")


def corpus() -> bytes:
    """Module, class and function docstrings of a fixed set of stdlib modules."""
    docs = []
    for name in _MODULES:
        mod = importlib.import_module(name)
        docs.append(mod.__doc__ or "")
        for attr in sorted(dir(mod)):
            with warnings.catch_warnings():  # typing.io / typing.re warn on access
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = getattr(getattr(mod, attr), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40:
                docs.append(doc)
    return "\n\n".join(docs).encode("utf-8", "ignore")


def batches(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        yield torch.stack([data[s : s + seq] for s in starts])


def train(model, steps: int, data, lr: float, desc: str) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    bar = tqdm(range(steps), desc=desc)
    loss = float("nan")
    for _ in bar:
        ids = next(data)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        bar.set_postfix(loss=f"{loss:.3f}", **({"aux": f"{out.aux_loss.item():.3f}"} if hasattr(out, "aux_loss") else {}))
    return loss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense-steps", type=int, default=150)
    parser.add_argument("--moe-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.tensor(list(corpus()), dtype=torch.long)
    print(f"corpus: {len(data):,} bytes of stdlib docstrings")
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        )
    )
    stream = batches(data, 16, 64, gen)
    t0 = time.time()
    train(lm, args.dense_steps, stream, 3e-3, "dense")

    probe = next(stream)
    with torch.no_grad():
        dense_logits = lm(probe).logits
    model = upcycle(lm, MoEConfig(num_experts=4, top_k=2, layers="every_other", aux_loss_coef=0.01))
    with torch.no_grad():
        diff = (model(input_ids=probe).logits - dense_logits).abs().max().item()
    print(f"upcycled layers {sorted(model.moe_layers())}: max |logit diff| vs dense = {diff:.2e}")

    loss = train(model, args.moe_steps, stream, 1e-3, "moe")
    model.eval()
    with torch.no_grad():
        out = model(input_ids=next(stream), labels=None)
    print(f"\nfinal train loss {loss:.3f} (uniform over bytes: {math.log(256):.3f}); {time.time() - t0:.0f}s")
    print(f"{'layer':>5}  {'entropy':>7}  load per expert (sums to 1)")
    for s in out.routing:
        print(f"{s.layer:>5}  {s.entropy.item():7.3f}  " + "  ".join(f"{v:.3f}" for v in s.load.tolist()))
    sample = model.generate(torch.tensor([list(b"Return the ")]), max_new_tokens=40, do_sample=False)
    print("greedy sample:", bytes(sample[0].tolist()).decode("utf-8", "replace"))


if __name__ == "__main__":
    main()
