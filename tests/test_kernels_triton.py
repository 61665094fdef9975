"""Triton expert kernels against the pure-PyTorch reference, on CPU through the interpreter.

The kernels run in one subprocess with `TRITON_INTERPRET=1` (it must be set before triton
decorates the kernels, and an out-of-bounds store can crash the interpreter) and
`ZOO_KERNELS=triton` (so the calls go through the `zoo.kernels.ops` dispatcher). The worker
prints one JSON line per (case, dtype) with the max error of the output and of every gradient
against a float64 run of the reference, next to the error of the reference itself run in the
same dtype; the tests below judge those numbers. bf16 is not checked here: the interpreter
computes it wrongly (bench/kernels.py checks it on a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

# name: (T, k, E, d, f, skew, dy, empty). Every case leaves expert E // 2 without tokens; `empty`
# is the fraction of slots left empty (index -1, weight 0), and with it the first token has no
# expert at all. Interpreter tiles (kernels/triton): rows 16, columns 32, K 32; weight-grad 64 x 64
# over 16-row chunks.
CASES = {
    "k1": (19, 1, 4, 33, 40, 0.0, "random", 0.0),
    "k2": (23, 2, 5, 33, 24, 0.0, "random", 0.0),
    "k3": (17, 3, 6, 40, 20, 0.0, "random", 0.0),
    "k2_skewed_multi_tile": (40, 2, 3, 24, 48, 4.0, "random", 0.0),  # expert 0 spans several row tiles
    "k2_dy_zero_stride": (12, 2, 4, 17, 36, 0.0, "ones", 0.0),  # y.sum(): dy is an expanded view
    "k2_wide_odd": (9, 2, 4, 97, 72, 0.0, "random", 0.0),  # several K steps and f-tiles
    "one_token_k3": (1, 3, 4, 16, 16, 0.0, "random", 0.0),
    "k3_empty_slots": (21, 3, 4, 33, 40, 0.0, "random", 0.4),  # variable experts per token
    "k2_mostly_empty_multi_tile": (40, 2, 3, 24, 48, 4.0, "random", 0.7),
}
DTYPES = ("float32", "float16")
TENSORS = ("y", "x", "weights", "gate_up", "down")
# Allowed error of the Triton path: 4x the reference's own error in that dtype, plus this many
# units of the largest |value| (the kernels accumulate in fp32 in a different order).
RTOL = {"float32": 2e-6, "float16": 2e-3}


def _inputs(T, k, E, d, f, skew, dtype, seed=0, empty=0.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen)
    logits[:, 0] += skew
    logits[:, E // 2] = -float("inf")  # an expert that gets no tokens
    probs, indices = logits.softmax(-1).topk(k, dim=-1)
    if empty:
        drop = torch.rand(T, k, generator=gen) < empty
        drop[0] = True  # a token with no expert
        probs, indices = probs.masked_fill(drop, 0.0), indices.masked_fill(drop, -1)
    x = torch.randn(T, d, generator=gen)
    gate_up = torch.randn(E, 2 * f, d, generator=gen) / d**0.5
    down = torch.randn(E, d, f, generator=gen) / f**0.5
    grad = torch.randn(T, d, generator=gen)
    return [t.to(dtype) for t in (x, probs, indices, gate_up, down, grad)]


def _run(fn, x, weights, indices, gate_up, down, grad, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weights, gate_up, down)]
    y = fn(leaves[0], leaves[1], indices, leaves[2], leaves[3])
    loss = y.sum() if dy == "ones" else (y * grad).sum()
    return [y.detach()] + list(torch.autograd.grad(loss, leaves))


def _worker() -> None:
    """Runs in the subprocess: one JSON line per record."""
    from zoo.kernels import ops, reference, sort_by_expert
    from zoo.kernels.triton import route

    for name, (T, k, E, d, f, skew, dy, empty) in CASES.items():
        x, w, idx, gu, dn, g = _inputs(T, k, E, d, f, skew, torch.float32, empty=empty)
        r = route(idx.long(), E)
        order, counts = sort_by_expert(idx.long(), E)
        filled = len(order)  # the kernels' routing keeps empty slots after every expert's rows
        ok = torch.equal(r.order[:filled], order) and torch.equal(r.counts.long(), counts)
        ok = ok and torch.equal(r.token_of[:filled].long(), order // k) and filled == int((idx >= 0).sum())
        print(json.dumps({"kind": "routing", "case": name, "ok": bool(ok)}), flush=True)

    for name, (T, k, E, d, f, skew, dy, empty) in CASES.items():
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            x, w, idx, gu, dn, g = _inputs(T, k, E, d, f, skew, dtype, empty=empty)
            idx = idx.long()
            args64 = [t.double() for t in (x, w)] + [idx] + [t.double() for t in (gu, dn, g)]
            truth = _run(reference.moe_swiglu, *args64, dy)
            ref = _run(reference.moe_swiglu, x, w, idx, gu, dn, g, dy)
            tri = _run(ops.moe_swiglu, x, w, idx, gu, dn, g, dy)
            record = {"kind": "compare", "case": name, "dtype": dtype_name, "tensors": {}, "backend": ops.backend_for(x)}
            for tname, t64, tr, tt in zip(TENSORS, truth, ref, tri):
                record["tensors"][tname] = {
                    "shape_ok": tt.shape == t64.shape and tt.dtype == tr.dtype,
                    "finite": bool(torch.isfinite(tt).all()),
                    "err_triton": (tt.double() - t64).abs().max().item(),
                    "err_reference": (tr.double() - t64).abs().max().item(),
                    "scale": t64.abs().max().item(),
                }
            # The expert without tokens must get exactly zero weight gradients; a token with no
            # expert gets exactly 0 output, and empty slots exactly 0 weight gradient.
            record["empty_expert_grad"] = max(tri[3][E // 2].abs().max().item(), tri[4][E // 2].abs().max().item())
            none = (idx < 0).all(dim=1)
            record["no_expert_output"] = tri[0][none].abs().max().item() if none.any() else 0.0
            record["empty_slot_weight_grad"] = tri[2][idx < 0].abs().max().item() if (idx < 0).any() else 0.0
            print(json.dumps(record), flush=True)

    # Every registered router's decisions (variable K, empty slots) through the kernels.
    from zoo.moe import ROUTERS

    T, E, d, f = 19, 4, 24, 40
    for name in ROUTERS.names():
        torch.manual_seed(0)
        router = ROUTERS.build(name, dict(ROUTERS.entry(name).example), hidden_size=d, num_experts=E)
        x0 = torch.randn(T, d)
        with torch.no_grad():
            routing = router(x0 * 20)  # sharper decisions than a fresh router's near-uniform ones
        w, idx = routing.weights.detach(), routing.indices
        _, _, _, gu, dn, g = _inputs(T, 1, E, d, f, 0.0, torch.float32)
        args64 = [x0.double(), w.double(), idx, gu.double(), dn.double(), g.double()]
        truth = _run(reference.moe_swiglu, *args64, "random")
        tri = _run(ops.moe_swiglu, x0, w, idx, gu, dn, g, "random")
        err = max((a.double() - b).abs().max().item() / max(1.0, b.abs().max().item()) for a, b in zip(tri, truth))
        print(json.dumps({"kind": "router", "router": name, "err": err, "slots": list(idx.shape),
                          "empty": int((idx < 0).sum())}), flush=True)


@pytest.fixture(scope="module")
def worker_records():
    env = dict(os.environ, TRITON_INTERPRET="1", ZOO_KERNELS="triton", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"interpreter worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("case", list(CASES))
def test_routing_matches_reference_sort(worker_records, case):
    (record,) = [r for r in worker_records if r["kind"] == "routing" and r["case"] == case]
    assert record["ok"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference_outputs_and_all_gradients(worker_records, case, dtype):
    (record,) = [r for r in worker_records if r.get("case") == case and r.get("dtype") == dtype]
    bad = {}
    for name, m in record["tensors"].items():
        tol = 4 * m["err_reference"] + RTOL[dtype] * m["scale"]
        if not (m["shape_ok"] and m["finite"] and m["err_triton"] <= tol):
            bad[name] = {**m, "tol": tol}
    assert record["backend"] == "triton"  # the dispatcher really ran the kernels
    assert not bad, f"{case} {dtype}: {bad}"
    assert record["empty_expert_grad"] == 0.0
    assert record["no_expert_output"] == 0.0 and record["empty_slot_weight_grad"] == 0.0


ROUTER_NAMES = __import__("zoo.moe", fromlist=["ROUTERS"]).ROUTERS.names()


@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_every_router_runs_through_the_triton_kernels(worker_records, router):
    (record,) = [r for r in worker_records if r["kind"] == "router" and r["router"] == router]
    assert record["err"] < 1e-5, record


def test_dispatch_defaults_to_reference_on_cpu_and_validates_the_override(monkeypatch):
    from zoo.kernels import backend_for

    x = torch.zeros(2, 3)
    monkeypatch.delenv("ZOO_KERNELS", raising=False)
    assert backend_for(x) == "reference"
    monkeypatch.setenv("ZOO_KERNELS", "reference")
    assert backend_for(x) == "reference"
    monkeypatch.setenv("ZOO_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="ZOO_KERNELS"):
        backend_for(x)
    monkeypatch.setenv("ZOO_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend_for(x)


def test_reference_gradients_match_finite_differences():
    """The gradient oracle itself: the reference's autograd against float64 finite differences,
    with a token routed twice to one expert's neighbours and an expert without tokens."""
    from zoo.kernels.reference import moe_swiglu

    T, k, E, d, f = 4, 2, 3, 5, 3
    x, w, _, gu, dn, _ = _inputs(T, k, E, d, f, 0.0, torch.float64, seed=1)
    idx = torch.tensor([[0, 2], [2, 0], [0, 2], [2, 0]])  # expert 1 gets no tokens
    leaves = [t.requires_grad_() for t in (x, w, gu, dn)]
    assert torch.autograd.gradcheck(lambda a, b, c, e: moe_swiglu(a, b, idx, c, e), leaves)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker()
