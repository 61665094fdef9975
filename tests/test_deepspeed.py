"""The DeepSpeed engine: configs, MoE param groups, and 2-process gloo runs of the `moe-tune` stage.

The 2-process runs (`pipelines/launch/moe-tune.sh` with torchrun and with the deepspeed launcher,
CPU, gloo, `tests/moe_tune_ds_worker.py` as the entry point) shard 4 experts over
ep_size=2 and must reproduce the 1-process TorchEngine run that sees the same tokens as 2
accumulated micro-batches: same losses (1e-5), same global grad norms, same final weights.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from zoo.moe.experts import SwiGLUExperts
from zoo.pipelines.engines.deepspeed_engine import CONFIG_DIR, check_moe_param_groups, config_path, moe_param_groups, resolve_config
from zoo.pipelines.optim import OptimConfig

sys.path.insert(0, str(Path(__file__).parent))
from moe_tune_ds_worker import ESFT_SELECTION, reference_run  # noqa: E402

WORKER = Path(__file__).parent / "moe_tune_ds_worker.py"
LAUNCH = Path(__file__).parent.parent / "pipelines" / "launch"


# ---------------------------------------------------------------- configs and param groups (no processes)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_config_resolves_for_its_precision(path):
    precision = "bf16" if "bf16" in path.stem else "fp32"
    cfg = resolve_config(path.stem, OptimConfig(grad_accum=3, grad_clip=0.7, precision=precision), has_experts=True)
    assert cfg["gradient_accumulation_steps"] == 3 and cfg["gradient_clipping"] == 0.7
    assert cfg["bf16"]["enabled"] is (precision == "bf16")
    assert cfg["zero_optimization"]["stage"] in (0, 1, 2)
    assert "optimizer" not in cfg  # torch AdamW, never FusedAdam
    with pytest.raises(ValueError, match="bf16.enabled=.* OptimConfig.precision"):
        resolve_config(path.stem, OptimConfig(precision="fp32" if precision == "bf16" else "bf16"), has_experts=True)
    assert {f"zero{s}_{p}" for s in (0, 1, 2) for p in ("fp32", "bf16")} <= {q.stem for q in CONFIG_DIR.glob("*.json")}


def test_zero3_with_moe_is_refused_with_the_reason_and_the_alternative():
    cfg = {"zero_optimization": {"stage": 3}}
    with pytest.raises(ValueError, match=r"ZeRO stage 3 cannot train this MoE model: .*expert-data-parallel.*Use ZeRO stage 2.*or the fsdp engine"):
        resolve_config(cfg, OptimConfig(), has_experts=True)
    assert resolve_config(cfg, OptimConfig(), has_experts=False)["zero_optimization"]["stage"] == 3


def test_config_errors_name_the_cause():
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=4 contradicts the stage's OptimConfig \(2\)"):
        resolve_config({"gradient_accumulation_steps": 4}, OptimConfig(grad_accum=2), has_experts=False)
    with pytest.raises(ValueError, match="'optimizer' section.*FusedAdam"):
        resolve_config({"optimizer": {"type": "Adam"}}, OptimConfig(), has_experts=False)
    with pytest.raises(FileNotFoundError, match=r"shipped: \[.*'zero2_fp32'"):
        config_path("zero9_fp64")


def _flagged_experts() -> nn.Module:
    model = nn.ModuleDict({"router": nn.Linear(4, 2, bias=True), "experts": SwiGLUExperts(2, 4, 6)})
    for p in model["experts"].parameters():
        p.allreduce, p.group_name = False, "ep_size_1"
    return model


def test_moe_param_groups_put_experts_in_their_moe_group_and_check_catches_a_reused_dict():
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    model = _flagged_experts()
    experts = set(map(id, model["experts"].parameters()))
    for _ in range(2):  # building twice must not lose anything (the splitter mutates its input)
        groups = moe_param_groups(model, weight_decay=0.1)
        moe = [g for g in groups if g.get("moe")]
        assert len(moe) == 1 and moe[0]["name"] == "ep_size_1" and moe[0]["weight_decay"] == 0.1
        assert {id(p) for p in moe[0]["params"]} == experts
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    named = dict(model.named_parameters())
    reused = {"name": "all", "params": list(model.parameters())}
    split_params_into_different_moe_groups_for_optimizer(reused)  # empties reused["params"] of experts
    with pytest.raises(RuntimeError, match=r"missing \(would never update\) \['experts.gate_up_proj', 'experts.down_proj'\]"):
        check_moe_param_groups(named, [reused])  # the group list someone would build from the reused dict


# ---------------------------------------------------------------- 2 processes, gloo, CPU


def _run_launcher(out: Path, *args: str, launcher: str, ds_config: str, ep_size: int) -> subprocess.CompletedProcess:
    """2 processes through pipelines/launch/moe-tune.sh with the worker as its entry point."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHON": sys.executable,
           "ENTRY": str(WORKER), "LAUNCHER": launcher, "GPUS_PER_NODE": "2", "EP_SIZE": str(ep_size),
           "DS_CONFIG": ds_config, "MASTER_PORT": str(_free_port())}
    return subprocess.run(["bash", str(LAUNCH / "moe-tune.sh"), str(out), *args], env=env, capture_output=True, text=True,
                          timeout=240)


def _launch(out: Path, *args: str, launcher: str = "torchrun", ds_config: str = "zero2_fp32", ep_size: int = 2) -> None:
    proc = _run_launcher(out, *args, launcher=launcher, ds_config=ds_config, ep_size=ep_size)
    if proc.returncode:
        pytest.fail(f"{' '.join(proc.args)} ({launcher}) exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def _launch_expect_failure(out: Path, *args: str, ep_size: int = 2) -> str:
    """Like `_launch`, for a run that must fail: returns its output."""
    proc = _run_launcher(out, *args, launcher="torchrun", ds_config="zero2_fp32", ep_size=ep_size)
    assert proc.returncode != 0, "the run was expected to fail"
    return proc.stdout + proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _mean_losses(out: Path) -> list[float]:
    a, b = _ranks(out)
    return [(x + y) / 2 for x, y in zip(a["losses"], b["losses"])]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-process run: 4 steps, each global batch as 2 accumulated micro-batches."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference")
    model = reference_run(str(out), steps=4)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"losses": [r["loss"] for r in rows], "grad_norms": [r["grad_norm"] for r in rows],
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def _assert_matches_reference(out: Path, reference: dict, steps: int) -> None:
    assert _mean_losses(out) == pytest.approx(reference["losses"][:steps], abs=1e-5)
    for rank in _ranks(out):
        assert rank["grad_norms"] == pytest.approx(reference["grad_norms"][:steps], rel=1e-4)


@pytest.mark.slow
def test_ep2_zero2_matches_one_process_shards_experts_and_resumes_exactly(tmp_path, reference):
    out = tmp_path / "run"
    _launch(out, "--steps", "4", "--ckpt-every", "2", ds_config="zero2")  # "zero2" + the stage's fp32
    ranks = _ranks(out)
    assert [(r["ep_rank"], r["ep_size"], r["dp_world_size"]) for r in ranks] == [(0, 2, 2), (1, 2, 2)]
    _assert_matches_reference(out, reference, 4)

    init = [load_file(str(out / f"rank{r}-init.safetensors")) for r in range(2)]
    final = [load_file(str(out / f"rank{r}-final.safetensors")) for r in range(2)]
    experts = [n for n in final[0] if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(experts) == 4  # 2 MoE layers x 2 stacked tensors
    for name in final[0]:
        if name in experts:
            assert final[0][name].shape[0] == 2, f"{name} is not sharded"
            assert not torch.equal(final[0][name], final[1][name]), f"{name}: both ranks hold the same experts"
            for r in range(2):
                assert not torch.equal(final[r][name], init[r][name]), f"{name} did not update on rank {r}"
                torch.testing.assert_close(final[r][name], reference["params"][name][2 * r:2 * r + 2], rtol=1e-3, atol=5e-5)
        else:
            assert torch.equal(final[0][name], final[1][name]), f"shared {name} differs across ranks"
            torch.testing.assert_close(final[0][name], reference["params"][name], rtol=1e-3, atol=5e-5)
            if "router" not in name:  # attention, embeddings, norms: frozen in moe-tune
                assert torch.equal(final[0][name], init[0][name]), f"frozen {name} changed"
            else:
                assert not torch.equal(final[0][name], init[0][name]), f"router {name} did not update"

    # resume from step 2: steps 3-4 reproduce the uninterrupted run exactly
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    _launch(resumed, "--steps", "4", "--ckpt-every", "2", "--resume", launcher="deepspeed")
    for r, rank in enumerate(_ranks(resumed)):
        assert rank["losses"] == ranks[r]["losses"][2:], f"rank {r} resumed losses differ"
        again = load_file(str(resumed / f"rank{r}-final.safetensors"))
        for name, value in final[r].items():
            assert torch.equal(again[name], value), f"rank {r}: {name} differs after resume"


@pytest.mark.slow
def test_aux_free_bias_under_expert_parallelism_matches_one_process(tmp_path):
    """DeepSeek-V3's gate at EP=2: the selection bias, updated from token counts summed over the
    step's micro-batches and all-reduced over the ranks, follows the 1-process run (losses, bias)."""
    torch.set_num_threads(1)
    ref_out = tmp_path / "reference"
    model = reference_run(str(ref_out), steps=4, router="deepseek_v3")
    ref_losses = [json.loads(line)["loss"] for line in (ref_out / "metrics.jsonl").read_text().splitlines()]
    _launch(tmp_path / "run", "--steps", "4", "--ckpt-every", "0", "--router", "deepseek_v3")
    assert _mean_losses(tmp_path / "run") == pytest.approx(ref_losses, abs=1e-5)
    final = [load_file(str(tmp_path / "run" / f"rank{r}-final.safetensors")) for r in range(2)]
    biases = {n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    assert biases and any(b.abs().sum() > 0 for b in biases.values()), "the bias never moved"
    for name, bias in biases.items():
        for r in range(2):
            torch.testing.assert_close(final[r][name], bias, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_ep2_zero0_zero1_and_bf16_in_one_process_each_match_one_process(tmp_path, reference):
    """Three engines one after the other in the same 2 processes (as a recipe's stages run)."""
    _launch(tmp_path, "--steps", "3", "--ckpt-every", "0", ds_config="zero0_fp32,zero1_fp32,zero2_bf16")
    _assert_matches_reference(tmp_path / "zero0_fp32", reference, 3)  # the engine's own exact clipping
    _assert_matches_reference(tmp_path / "zero1_fp32", reference, 3)
    bf16 = tmp_path / "zero2_bf16"
    assert _mean_losses(bf16) == pytest.approx(reference["losses"][:3], abs=0.05)
    for r in range(2):
        init, final = load_file(str(bf16 / f"rank{r}-init.safetensors")), load_file(str(bf16 / f"rank{r}-final.safetensors"))
        for name in ("lm.model.layers.0.mlp.moe.experts.down_proj", "lm.model.layers.1.mlp.moe.experts.gate_up_proj"):
            assert not torch.equal(init[name], final[name]), f"bf16 rank {r}: {name} did not update"


@pytest.mark.slow
def test_ep2_with_activation_checkpointing_and_the_fused_loss_matches_one_process(tmp_path, reference):
    """Checkpointed MoE layers (their all-to-alls rerun in backward) and the fused LM loss under DeepSpeed give the
    plain 1-process run; bf16_master is DeepSpeed's bf16 there (bf16 weights, fp32 masters) and trains alike."""
    _launch(tmp_path, "--steps", "3", "--ckpt-every", "0", "--activation-checkpointing", "--lm-loss-chunk", "16",
            "--bf16-precision", "bf16_master", ds_config="zero2_fp32,zero2_bf16")
    _assert_matches_reference(tmp_path / "zero2_fp32", reference, 3)
    assert _mean_losses(tmp_path / "zero2_bf16") == pytest.approx(reference["losses"][:3], abs=0.05)


@pytest.mark.slow
def test_esft_masks_hold_under_expert_parallelism(tmp_path):
    """ESFT at ep_size=2 (the masks set on the full experts, then sharded) equals the 1-process ESFT run,
    and every expert it did not select is bit-identical to its init on the rank that holds it."""
    torch.set_num_threads(1)
    ref_dir = tmp_path / "reference"
    ref = {n: p.detach().clone() for n, p in reference_run(str(ref_dir), steps=3, esft=True).named_parameters()}
    ref_losses = [json.loads(line)["loss"] for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    out = tmp_path / "run"
    _launch(out, "--steps", "3", "--ckpt-every", "0", "--esft", ds_config="zero2_fp32")
    assert _mean_losses(out) == pytest.approx(ref_losses, abs=1e-5)
    for r in range(2):
        init = load_file(str(out / f"rank{r}-init.safetensors"))
        final = load_file(str(out / f"rank{r}-final.safetensors"))
        for name, value in final.items():
            if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                assert torch.equal(value, init[name]), f"rank {r}: {name} is not an expert and changed"
                continue
            layer = int(name.split("layers.")[1].split(".")[0])
            assert value.shape[0] == 2, f"{name} is not sharded"
            for row in range(2):
                e = 2 * r + row
                if e in ESFT_SELECTION[layer]:
                    assert not torch.equal(value[row], init[name][row]), f"selected expert {e} of layer {layer} did not train"
                    torch.testing.assert_close(value[row], ref[name][e], rtol=1e-3, atol=5e-5)
                else:
                    assert torch.equal(value[row], init[name][row]), f"unselected expert {e} of layer {layer} moved on rank {r}"


def _consolidated(out: Path, ep_size: int) -> dict[str, torch.Tensor]:
    """The run's final weights with every expert shard put back in order (the full E experts)."""
    ranks = [load_file(str(out / f"rank{r}-final.safetensors")) for r in range(2)]
    if ep_size == 1:
        return ranks[0]
    return {n: torch.cat([ranks[0][n], ranks[1][n]]) if n.endswith(("experts.gate_up_proj", "experts.down_proj"))
            else ranks[0][n] for n in ranks[0]}


@pytest.mark.slow
def test_resume_across_expert_parallel_sizes_continues_the_uninterrupted_run(tmp_path):
    """Written at ep_size=2, resumed at 1; written at 1, resumed at 2: the losses continue the
    uninterrupted ep_size=2 run (AdamW moments included: without them step 3 would differ), and the
    consolidated weights are the same whatever layout wrote them."""
    straight = tmp_path / "straight"
    _launch(straight, "--steps", "6", "--ckpt-every", "2", ep_size=2)
    losses = [r["losses"] for r in _ranks(straight)]

    to_one = tmp_path / "to-one"  # ep_size=2's step-2 checkpoint, resumed at ep_size=1 (writes steps 4, 6 at 1)
    shutil.copytree(straight / "checkpoints" / "step-00000002", to_one / "checkpoints" / "step-00000002")
    _launch(to_one, "--steps", "6", "--ckpt-every", "2", "--resume", ep_size=1)
    assert [(r["ep_size"], r["dp_world_size"]) for r in _ranks(to_one)] == [(1, 2), (1, 2)]
    for r, rank in enumerate(_ranks(to_one)):
        assert rank["losses"] == pytest.approx(losses[r][2:], abs=1e-5), f"rank {r}: 2 -> 1 resumed losses differ"

    to_two = tmp_path / "to-two"  # ep_size=1's step-4 checkpoint, resumed at ep_size=2
    shutil.copytree(to_one / "checkpoints" / "step-00000004", to_two / "checkpoints" / "step-00000004")
    _launch(to_two, "--steps", "6", "--ckpt-every", "0", "--resume", ep_size=2)
    for r, rank in enumerate(_ranks(to_two)):
        assert rank["losses"] == pytest.approx(losses[r][4:], abs=1e-5), f"rank {r}: 1 -> 2 resumed losses differ"

    final = _consolidated(straight, 2)
    for other in (_consolidated(to_one, 1), _consolidated(to_two, 2)):
        assert other.keys() == final.keys()
        for name, value in final.items():
            torch.testing.assert_close(other[name], value, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_resume_with_other_experts_names_both_counts(tmp_path):
    """A checkpoint of 4 experts resumed into a model of 8 (at another ep_size): refused, naming both."""
    out = tmp_path / "run"
    _launch(out, "--steps", "2", "--ckpt-every", "2", ep_size=2)
    other = tmp_path / "other"
    shutil.copytree(out / "checkpoints" / "step-00000002", other / "checkpoints" / "step-00000002")
    env_fail = _launch_expect_failure(other, "--steps", "4", "--ckpt-every", "2", "--resume", "--experts", "8", ep_size=1)
    assert "4 experts" in env_fail and "8" in env_fail, env_fail[-2000:]
