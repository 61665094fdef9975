"""One training loop for every stage, behind the `Engine` interface.

Batches come from `batch_at(i)`, a deterministic function of the global micro-batch index, so a
resumed run sees exactly the batches an uninterrupted run would have seen. Checkpoints hold the
weights, optimizer and scheduler state, and the RNG state; after a kill, `resume=True` continues
from the newest complete checkpoint and reproduces the uninterrupted loss curve.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zoo.config import config_from_dict
from zoo.models.checkpointing import activation_checkpointing
from zoo.models.compile import compiled_layers
from zoo.models.lm import IGNORE_INDEX
from zoo.moe.losses import balance_window
from zoo.moe.trainer_hooks import capture_router_inputs, schedule_routers, update_routers
from zoo.pipelines.engines import Engine, NonFiniteError
from zoo.pipelines.nonfinite import nonfinite_message
from zoo.pipelines.optim import OptimConfig
from zoo.progress import progress

_CKPT_RE = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainConfig:
    """Loop settings of one stage.

    Attributes:
        steps: optimizer steps.
        optim: optimizer, schedule, accumulation and precision.
        seed: seeds torch at the start of a fresh run.
        log_every: refresh the progress bar postfix every N steps (metrics.jsonl gets every step).
        ckpt_every: save a resumable checkpoint every N steps (0: only at the end).
        keep_checkpoints: newest checkpoints kept on disk.
        wandb: log to Weights & Biases (offline unless WANDB_MODE says otherwise).
        wandb_project: its project name.
        activation_checkpointing: recompute each LM decoder layer's activations in backward
            instead of storing them (`zoo.models.checkpointing`; MoE routing, aux losses and
            gradients are unchanged): less memory for one more forward of the decoder.
        lm_loss_chunk: 0: transformers' LM loss over the full `[tokens, V]` logits; N: the same
            loss fused with the LM head over chunks of N tokens (`zoo.models.loss`), which the
            model's forward takes as `loss_chunk` (`MultimodalMoE`, `MoECausalLM`).
        compile: `torch.compile` each LM decoder layer's attention, norms and dense MLP while
            training (`zoo.models.compile`; MoE blocks stay eager): fused elementwise kernels, a
            compile on the first step (needs a C++ compiler on CPU).
    """

    steps: int = 100
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    wandb: bool = False
    wandb_project: str = "moe-zoo"
    activation_checkpointing: bool = False
    lm_loss_chunk: int = 0
    compile: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.optim, Mapping):
            self.optim = OptimConfig.from_dict(dict(self.optim))
        if self.steps < 1:
            raise ValueError(f"TrainConfig: steps must be >= 1, got {self.steps}")
        if self.lm_loss_chunk < 0:
            raise ValueError(f"TrainConfig: lm_loss_chunk must be >= 0 (0: the plain loss), got {self.lm_loss_chunk}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return config_from_dict(cls, data)


@dataclass
class TrainResult:
    """Where a finished run left things."""

    steps: int
    final_loss: float
    checkpoint: Path
    metrics_path: Path


def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under `out_dir/checkpoints`, oldest first (temp dirs are skipped)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CKPT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_CKPT_RE.match(p.name).group(1)))


def _say_partial_saves(out_dir: Path, name: str) -> None:
    """Name any checkpoint a kill cut short (a `.tmp-step-*` newer than the newest complete one)
    and the one the run resumes from instead."""
    root = Path(out_dir) / "checkpoints"
    complete = checkpoints(out_dir)
    newest = int(_CKPT_RE.match(complete[-1].name).group(1)) if complete else 0
    partial = sorted(p.name for p in root.glob(".tmp-step-*")
                     if (m := _CKPT_RE.match(p.name[len(".tmp-"):])) and int(m.group(1)) > newest) if root.is_dir() else []
    for p in partial:
        where = f"resuming from {complete[-1].name}" if complete else "starting from the beginning (no complete checkpoint)"
        print(f"{name}: the partial checkpoint {p} (a save cut short) is ignored; {where}", file=sys.stderr)


def _routing_metrics(routing) -> dict[str, Any]:
    return {
        str(s.layer): {"load": [round(v, 6) for v in s.load.tolist()], "entropy": round(s.entropy.item(), 6),
                       "experts_per_token": round(s.experts_per_token.item(), 4),
                       "flops_saved": round(s.flops_saved.item(), 4),
                       **({"max_vio": round(s.max_vio.item(), 4)} if s.max_vio is not None else {})}
        for s in routing or []
    }


class _Wandb:
    def __init__(self, cfg: TrainConfig, out_dir: Path, name: str):
        try:
            import wandb
        except ImportError:
            raise ImportError("TrainConfig.wandb=True needs wandb: pip install 'moe-zoo[wandb]'") from None
        os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(project=cfg.wandb_project, name=name, dir=str(out_dir), config={"steps": cfg.steps, **cfg.optim.to_dict()})

    def log(self, m: dict[str, Any]) -> None:
        flat = {k: v for k, v in m.items() if k != "routing"}
        for layer, r in m.get("routing", {}).items():
            flat[f"router_entropy/layer{layer}"] = r["entropy"]
            if "max_vio" in r:
                flat[f"max_vio/layer{layer}"] = r["max_vio"]
            flat.update({f"expert_load/layer{layer}/expert{e}": v for e, v in enumerate(r["load"])})
        self.run.log(flat, step=m["step"])

    def finish(self) -> None:
        self.run.finish()


def train(
    engine: Engine,
    batch_at: Callable[[int], dict[str, torch.Tensor]],
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    name: str = "train",
) -> TrainResult:
    """Train `engine.model` for `cfg.steps` optimizer steps.

    Args:
        engine: runs forward/backward/step and owns checkpoint I/O.
        batch_at: global micro-batch index -> keyword arguments of `engine.model` (must include
            what makes it return `.loss`, e.g. `labels`).
        cfg: loop settings.
        out_dir: gets `metrics.jsonl` (one line per step) and `checkpoints/step-XXXXXXXX/`.
        resume: continue from the newest complete checkpoint in `out_dir`, if any.
        name: progress-bar and run name.

    Returns:
        TrainResult with the final checkpoint.

    Raises:
        NonFiniteError: a loss or gradient norm is NaN/inf. The policy is to halt (see
            `zoo.pipelines.nonfinite`): the message names the stage, the step as metrics.jsonl
            counts it, and the last checkpoint whose weights and loss were finite (left untouched).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    start = 0
    if resume and engine.is_main:
        _say_partial_saves(out_dir, name)
    if resume and checkpoints(out_dir):
        ckpt = checkpoints(out_dir)[-1]
        state = engine.load_checkpoint(ckpt)
        start = state["step"]
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        if engine.is_main:  # only rank 0 owns metrics.jsonl: drop the steps the checkpoint does not hold
            kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start] if metrics_path.exists() else []
            metrics_path.write_text("".join(line + "\n" for line in kept))
    else:
        torch.manual_seed(cfg.seed)
        if engine.is_main and metrics_path.exists():
            metrics_path.unlink()
    accum = cfg.optim.grad_accum
    logger = _Wandb(cfg, out_dir, name) if cfg.wandb and engine.is_main else None
    engine.model.train()
    bar = progress(range(start, cfg.steps), initial=start, total=cfg.steps, desc=name, unit="step",
                   quiet=None if engine.is_main else True)  # rank 0 only; on a terminal unless ZOO_QUIET
    loss_value = float("nan")
    last_ckpt = checkpoints(out_dir)[-1] if checkpoints(out_dir) else None
    if cfg.lm_loss_chunk:
        batch_at = _with_loss_chunk(batch_at, cfg.lm_loss_chunk)
    with _training_mode(engine, cfg), open(metrics_path, "a") if engine.is_main else open(os.devnull, "w") as metrics_file:
        for step in bar:
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            tokens = 0
            result = None
            schedule_routers(engine.model, step, cfg.steps)  # trainer-driven router state (SMoE-Dropout's k)
            with capture_router_inputs(engine.model) as routed, balance_window():  # global balance: the step's counts
                for micro in range(accum):
                    step_result, tokens, out = _micro_step(engine, batch_at, step, micro, accum, sums, tokens, name, out_dir)
                    result = step_result if step_result is not None else result
            update_routers(routed)  # after the optimizer step: K-means centroids
            if result is None:
                raise RuntimeError(f"{type(engine).__name__}.step() made no update at an accumulation boundary")
            loss_value = sums["loss"]
            elapsed = time.perf_counter() - t0
            m = {"step": step + 1, **{k: round(v, 6) for k, v in sums.items()}, "lr": result.lr,
                 "grad_norm": round(result.grad_norm, 6), "tokens_per_s": round(tokens / elapsed, 1),
                 "routing": _routing_metrics(getattr(out, "routing", None))}
            if engine.is_main:
                metrics_file.write(json.dumps(m) + "\n")
                metrics_file.flush()
                if logger:
                    logger.log(m)
                if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                    bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{result.lr:.2e}")
            if (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0) or step + 1 == cfg.steps:
                last_ckpt = _save(engine, out_dir, step + 1, cfg.keep_checkpoints)
    if logger:
        logger.finish()
    if start >= cfg.steps:  # resumed a run that had already finished
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        loss_value = json.loads(lines[-1])["loss"] if lines else float("nan")
    return TrainResult(cfg.steps, loss_value, last_ckpt, metrics_path)


def _with_loss_chunk(batch_at, chunk: int):
    return lambda i: {**batch_at(i), "loss_chunk": chunk}


@contextlib.contextmanager
def _training_mode(engine: Engine, cfg: TrainConfig):
    """The loop's model settings: activation checkpointing and compiled layers inside, and the engine's
    `finish()` after (bf16_master weights back to fp32), also when training stops on an error."""
    model = getattr(engine, "module", engine.model)
    try:
        with contextlib.ExitStack() as stack:
            if cfg.activation_checkpointing:
                stack.enter_context(activation_checkpointing(model))
            if cfg.compile:
                stack.enter_context(compiled_layers(model))
            yield
    finally:
        finish = getattr(engine, "finish", None)
        if finish is not None:
            finish()


def _micro_step(engine: Engine, batch_at, step: int, micro: int, accum: int, sums: dict[str, float], tokens: int,
                name: str, out_dir: Path):
    """One micro-batch: forward, NaN check, backward, engine step; adds its losses to `sums`.

    Returns:
        `(engine.step() result, tokens so far, model output)`.
    """
    batch = batch_at(step * accum + micro)
    with engine.autocast():
        out = engine.model(**batch)
    if not torch.isfinite(out.loss):
        raise NonFiniteError(nonfinite_message(name, step, f"loss is {out.loss.item()}", checkpoints(out_dir),
                                               out_dir / "metrics.jsonl", micro))
    engine.backward(out.loss)
    try:
        result = engine.step()
    except NonFiniteError as e:  # the engine's gradient check: name the stage, step and checkpoint
        cause = str(e).split(" at optimizer step")[0]
        raise NonFiniteError(nonfinite_message(name, step, cause, checkpoints(out_dir), out_dir / "metrics.jsonl")) from None
    values = {k: getattr(out, k, None) for k in ("loss", "lm_loss", "aux_loss")}
    values.update({f"aux/{k}": v for k, v in (getattr(out, "aux_losses", None) or {}).items()})
    for key, value in values.items():
        if value is not None:
            sums[key] = sums.get(key, 0.0) + value.detach().item() / accum
    labels = batch.get("labels")
    tokens += int((labels != IGNORE_INDEX).sum()) if labels is not None else 0
    return result, tokens, out


def _save(engine: Engine, out_dir: Path, step: int, keep: int) -> Path:
    path = engine.save_checkpoint(
        out_dir / "checkpoints" / f"step-{step:08d}",
        {"step": step, "torch_rng": torch.get_rng_state().tolist()},
    )
    if engine.is_main:
        for old in checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path
