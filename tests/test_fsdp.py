"""The FSDP2 engine on CPU/gloo at 2 and 4 processes (`tests/fsdp_worker.py` under torchrun).

Each global batch of 4 sequences is split over the N ranks; the 1-process reference
(`TorchEngine`) sees the same batch as N accumulated micro-batches. Checked: losses per micro-batch
within 1e-5 over 20 fp32 steps (EP 1 and 2, EP=2 x FSDP=2 on 4 processes), the consolidated
weights, activation checkpointing, ESFT's masks, bf16, bytes per rank, DCP checkpoints resumed at
other world and ep sizes and after kill -9, and each bad input's message. Every stage kind and
every router kind under fsdp: `test_launch_recipe.py` (the micro recipe) and
`test_every_router_kind_trains_under_fsdp` here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from moe_tune_ds_worker import global_batch, optim_config, shard_of, tiny_moe_tune_model  # noqa: E402

STEPS = 20
_PORT = [29600]


def launch(out: Path, n: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """torchrun N processes of the worker into `out` (gloo, one thread each)."""
    _PORT[0] += 1
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                           "--master_addr", "127.0.0.1", "--master_port", str(_PORT[0]), str(HERE / "fsdp_worker.py"), str(out), *args],
                          env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def ranks(out: Path, n: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def reference(parts: int, steps: int = STEPS, esft: bool = False):
    """Per-micro-batch losses and the final weights of the 1-process run."""
    from zoo.pipelines.engines import TorchEngine
    from zoo.pipelines.train import TrainConfig, train

    torch.set_num_threads(1)
    model = tiny_moe_tune_model(esft)
    losses: list[float] = []
    model.register_forward_hook(lambda m, a, o: losses.append(o.loss.item()))
    cfg = TrainConfig(steps=steps, optim=optim_config(grad_accum=parts, weight_decay=0.1 if esft else 0.0))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        train(TorchEngine(model, cfg.optim, steps), lambda i: shard_of(global_batch(i // parts), i % parts, parts), cfg, tmp)
    return losses, {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.fixture(scope="module")
def ref2():
    return reference(2)


@pytest.fixture(scope="module")
def ref4():
    return reference(4)


def assert_matches(out: Path, n: int, ref, tol: float = 1e-5) -> list[dict]:
    """Rank r's losses are the reference's micro-batches r, r + n, ...; the consolidated model equals it."""
    losses, weights = ref
    got = ranks(out, n)
    for r, rank in enumerate(got):
        want = losses[r::n]
        assert len(rank["losses"]) == len(want), (r, len(rank["losses"]), len(want))
        diff = max(abs(a - b) for a, b in zip(rank["losses"], want))
        assert diff < tol, f"rank {r}: loss differs from the 1-process run by {diff}"
    final = load_file(str(out / "rank0-final.safetensors"))
    assert set(final) == set(weights)
    worst = max((final[k] - weights[k].float()).abs().max().item() for k in weights)
    assert worst < tol, f"consolidated weights differ from the 1-process run by {worst}"
    return got


@pytest.mark.parametrize("n,ep", [(2, 1), (2, 2), (4, 2)])
def test_training_equals_the_one_process_run(tmp_path, n, ep, ref2, ref4):
    launch(tmp_path, n, "--ep-size", str(ep), "--steps", str(STEPS))
    got = assert_matches(tmp_path, n, ref2 if n == 2 else ref4)
    assert [(g["ep_size"], g["ep_rank"]) for g in got] == [(ep, r % ep) for r in range(n)]
    # bytes per rank: every parameter sharded over N, the trainable ones' grads and AdamW moments too
    model = tiny_moe_tune_model()
    total = sum(p.numel() * 4 for p in model.parameters())
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    for g in got:
        print(f"N={n} ep={ep} rank bytes: {g['bytes']} (whole model: params {total}, trainable {trainable})")
        assert total / n <= g["bytes"]["params"] <= 1.1 * total / n
        assert 2 * trainable / n <= g["bytes"]["optimizer"] <= 1.1 * 2 * trainable / n
        assert trainable / n <= g["bytes"]["grads"] <= 1.1 * trainable / n


@pytest.fixture(scope="module")
def ref2_6():
    return reference(2, steps=6)


def test_activation_checkpointing_and_bf16(tmp_path, ref2_6):
    launch(tmp_path / "ac", 2, "--ep-size", "2", "--steps", "6", "--activation-checkpointing")
    assert_matches(tmp_path / "ac", 2, ref2_6)
    launch(tmp_path / "bf16", 2, "--ep-size", "2", "--steps", "6", "--precision", "bf16")
    losses, _ = ref2_6
    for r, rank in enumerate(ranks(tmp_path / "bf16", 2)):
        assert len(rank["losses"]) == 6
        assert all(abs(a - b) < 0.05 for a, b in zip(rank["losses"], losses[r::2])), rank["losses"]


def test_esft_masks_hold_under_sharding(tmp_path):
    """Only the experts ESFT selected move (their rows of the expert stacks), as in one process."""
    from moe_tune_ds_worker import ESFT_SELECTION

    launch(tmp_path, 2, "--ep-size", "2", "--steps", "4", "--esft")
    assert_matches(tmp_path, 2, reference(2, steps=4, esft=True))
    init = {k: v.detach() for k, v in tiny_moe_tune_model(esft=True).named_parameters()}
    final = load_file(str(tmp_path / "rank0-final.safetensors"))
    for layer, chosen in ESFT_SELECTION.items():
        key = f"lm.model.layers.{layer}.mlp.moe.experts.gate_up_proj"
        for e in range(4):
            assert (not torch.equal(final[key][e], init[key][e])) == (e in chosen), (layer, e)


def _continuation(src_parts: int, parts: int, first: int, steps: int) -> list[float]:
    """The 1-process run whose first `first` steps split each global batch in `src_parts` and the
    rest in `parts`: the later steps' mean losses, which a resharded resume must reproduce (the
    balance loss depends on how a batch is split, so the split of each step matters)."""
    import tempfile

    from zoo.pipelines.engines import TorchEngine
    from zoo.pipelines.train import TrainConfig, train

    torch.set_num_threads(1)
    model = tiny_moe_tune_model()
    engine = TorchEngine(model, optim_config(grad_accum=src_parts), steps)
    with tempfile.TemporaryDirectory() as tmp:
        train(engine, lambda i: shard_of(global_batch(i // src_parts), i % src_parts, src_parts),
              TrainConfig(steps=first, optim=engine.optim_config), tmp)
    engine.optim_config, engine.micro_step = optim_config(grad_accum=parts), 0
    means = []
    for s in range(first, steps):
        total = 0.0
        for p in range(parts):
            out = engine.model(**shard_of(global_batch(s), p, parts))
            total += out.loss.item() / parts
            engine.backward(out.loss)
            engine.step()
        means.append(total)
    return means


def test_checkpoints_reshard_across_world_and_expert_parallel_sizes(tmp_path):
    """Saved at (N, ep), resumed at (N', ep'): 2 -> 4 and 4 -> 2 processes, and EP 2 -> 1; each
    resumed step's global loss is the 1-process run's with the same splits (1e-5)."""
    saved = {}
    for n in (2, 4):
        saved[n] = tmp_path / f"n{n}"
        launch(saved[n], n, "--ep-size", "2", "--steps", "6", "--ckpt-every", "3")
    for src, n, ep in [(2, 4, 2), (4, 2, 2), (2, 2, 1)]:
        dst = tmp_path / f"{src}to{n}-ep{ep}"
        shutil.copytree(saved[src] / "checkpoints" / "step-00000003", dst / "checkpoints" / "step-00000003")
        launch(dst, n, "--ep-size", str(ep), "--steps", "6", "--resume")
        got = ranks(dst, n)
        means = [sum(g["losses"][s] for g in got) / n for s in range(len(got[0]["losses"]))]
        want = _continuation(src_parts=src, parts=n, first=3, steps=6)
        assert len(means) == 3 and max(abs(a - b) for a, b in zip(means, want)) < 1e-5, (dst.name, means, want)


def test_kill_mid_step_then_resume_continues_exactly(tmp_path, ref2_6):
    out = tmp_path / "run"
    proc = launch(out, 2, "--ep-size", "2", "--steps", "6", "--ckpt-every", "2", "--die-at-step", "4", check=False)
    assert proc.returncode != 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    (out / "checkpoints" / ".tmp-step-00000004").mkdir()  # as a kill during a save leaves it
    resumed = launch(out, 2, "--ep-size", "2", "--steps", "6", "--ckpt-every", "2", "--resume")
    assert "the partial checkpoint .tmp-step-00000004" in resumed.stderr and "resuming from step-00000002" in resumed.stderr
    losses, weights = ref2_6
    for r, rank in enumerate(ranks(out, 2)):  # steps 3-6 again, as the uninterrupted run had them
        assert max(abs(a - b) for a, b in zip(rank["losses"], losses[r::2][2:])) < 1e-5
        assert len(rank["losses"]) == 4
    final = load_file(str(out / "rank0-final.safetensors"))
    assert max((final[k] - weights[k]).abs().max().item() for k in weights) < 1e-5
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_bad_input_is_named(tmp_path):
    # a mesh that does not divide the world size; EP larger than the experts
    proc = launch(tmp_path / "mesh", 2, "--ep-size", "3", "--steps", "1", check=False)
    assert "does not divide the world size 2" in proc.stderr
    proc = launch(tmp_path / "big-ep", 4, "--ep-size", "4", "--experts", "2", "--steps", "1", check=False)
    assert "ep_size=4 is larger than the number of experts (2)" in proc.stderr
    # a checkpoint of another expert count names both counts
    launch(tmp_path / "e4", 2, "--ep-size", "1", "--steps", "2", "--ckpt-every", "2")
    other = tmp_path / "e2"
    shutil.copytree(tmp_path / "e4" / "checkpoints", other / "checkpoints")
    proc = launch(other, 2, "--ep-size", "1", "--experts", "2", "--steps", "3", "--resume", check=False)
    assert "written with 4 experts" in proc.stderr and "this model has 2" in proc.stderr


def test_fsdp_without_a_launcher_says_how_to_launch(monkeypatch):
    from zoo.pipelines.engines.fsdp_engine import FSDPEngine

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="runs under a launcher.*torchrun.*--engine torch"):
        FSDPEngine(tiny_moe_tune_model(), optim_config(), 1)


def test_mesh_checks_name_the_cause():
    from zoo.pipelines.engines.fsdp_engine import check_mesh

    check_mesh(4, 2, [4, 4])
    with pytest.raises(ValueError, match="does not divide the world size 4"):
        check_mesh(4, 3, [6])
    with pytest.raises(ValueError, match="larger than the number of experts"):
        check_mesh(8, 8, [4])
    with pytest.raises(ValueError, match="does not divide the expert count 6"):
        check_mesh(4, 4, [6, 8])
    with pytest.raises(ValueError, match="no MoE layer whose experts train"):
        check_mesh(2, 2, [])


def test_every_router_kind_trains_under_fsdp(tmp_path):
    """Registry-driven: each router kind (its example options) trains 3 steps at N=2, EP=2; every
    trainable parameter moves, and rank 0's last loss is the 1-process run's (its half of the batch)."""
    import tempfile

    from zoo.moe.routers import ROUTERS
    from zoo.pipelines.engines import TorchEngine
    from zoo.pipelines.train import TrainConfig, train

    launch(tmp_path, 2, "--ep-size", "2", "--every-router")
    got = json.loads((tmp_path / "rank0-routers.json").read_text())
    assert sorted(got) == sorted(ROUTERS.names())
    torch.set_num_threads(1)
    for name, result in got.items():
        assert result["unchanged"] == [], (name, result["unchanged"])
        model = tiny_moe_tune_model(router=name, router_options=dict(ROUTERS.entry(name).example))
        losses: list[float] = []
        model.register_forward_hook(lambda m, a, o: losses.append(o.loss.item()))
        cfg = TrainConfig(steps=3, optim=optim_config(grad_accum=2))
        with tempfile.TemporaryDirectory() as tmp:
            train(TorchEngine(model, cfg.optim, 3), lambda i: shard_of(global_batch(i // 2), i % 2, 2), cfg, tmp)
        if name == "kmeans":  # its first centroids are rank 0's tokens (the router's documented choice),
            continue          # one process places them over the whole batch: equal runs are not expected
        assert abs(result["final_loss"] - losses[-2]) < 1e-5, (name, result["final_loss"], losses[-2])
