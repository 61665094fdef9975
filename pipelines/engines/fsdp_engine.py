"""FSDP2 engine: every parameter sharded by PyTorch's `fully_shard`, experts over a 2-D EP x FSDP mesh.

DeepSpeed's ZeRO-3 refuses MoE (its partitioning spans the whole data-parallel group, while an
expert lives on one expert-parallel rank), so with the `deepspeed` engine every rank holds every
non-expert parameter. FSDP2 shards per parameter (DTensor), so torchtitan's layout is possible:

* dense mesh `("dp",)` over all N ranks: each decoder block is one `fully_shard` unit and the root
  unit holds the rest (embeddings, the tied head, the final norm, connectors and towers);
* expert mesh `("efsdp", "ep")` of shape `(N / ep, ep)`: each MoE layer's experts are split over the
  `ep` dimension (`zoo.moe.expert_parallel.shard_experts`: this rank's slice, dropless
  all-to-all), and this rank's slice is a `fully_shard` unit over `efsdp`, the ranks that hold the
  same experts. The all-to-all already sums the ep ranks' contributions to a local expert's
  gradient and FSDP averages over the N / ep efsdp ranks, so the engine divides expert gradients by
  ep once more: every gradient is then the mean over the global batch, as in one process.
  (torchtitan sets the units' gradient divide factor to N instead; with the sum-only reductions gloo
  needs, torch 2.14 divides by that factor twice when efsdp has one rank, i.e. ep = N, so the
  division is done here, in `step`.)

Choices, and why:

* Connectors and towers are in the root unit, not units of their own. A unit's all-gather is a
  collective that every rank must enter, and a connector runs only on ranks whose micro-batch holds
  its modality: a unit per connector deadlocks the first time one rank's batch has no audio. The
  root runs on every rank.
* Units whose parameters a rank's batch leaves unused (a connector, an expert with no token) still
  reduce-scatter zeros (`set_reduce_scatter_unused_params`), so every rank reduces the same set.
* Gradient clipping is over all shards: each rank sums the squares of its local gradient shards
  (every shard is distinct: dense over dp, experts over ep x efsdp), one all-reduce gives the
  global norm, and every shard is scaled by the same coefficient.
* Gradient row masks (ESFT's selected experts, MoExtend's frozen old experts: `GRAD_ROWS`) are
  hooks on the unsharded parameter in one process; FSDP2 replaces parameters by DTensors and
  reduces gradients outside autograd, so the engine keeps each mask's local rows and applies them
  to the reduced shards before clipping. Frozen parameters stay frozen under sharding.
* The trained module is a copy: `fully_shard` changes a module's class in place, and the runner
  evaluates and saves the ordinary model. The original's parameters are freed while the copy
  trains (frozen towers stay: the feature cache runs them), and `consolidate()` gathers the copy's
  full weights (experts all-gathered over ep) back into the original on every rank.
* Mixed precision: bf16 parameters in compute, fp32 gradient reduction, fp32 sharded weights and
  optimizer states (`optim.precision` "bf16" or "bf16_master"); fp32 otherwise. On gloo every
  reduction is a SUM followed by a division (gloo has no AVG or PREMUL_SUM).

Checkpoints go through `torch.distributed.checkpoint` (DCP) in a global view: dense parameters as
FSDP's DTensors, each expert stack as one DTensor of all E experts (sharded over ep, replicated
over efsdp), AdamW moments the same way. DCP reshards on load, so a run saved at N ranks and
expert-parallel size e resumes at N' and e'. A checkpoint is written under a temporary name and
renamed when every rank is done; `zoo_state.json` beside the shards holds the schedule, the
trainer's state and the layout it was written with.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zoo.models.checkpointing import causal_lm_of
from zoo.models.lm import decoder_layers
from zoo.moe.expert_parallel import GRAD_ROWS, expert_group_name, is_expert_param, shard_experts
from zoo.moe.experts import SwiGLUExperts
from zoo.moe.layer import SparseMoE
from zoo.pipelines.engines.base import NonFiniteError, StepResult, all_ranks_write, fingerprint, same_on_all_ranks
from zoo.pipelines.optim import OptimConfig, build_optimizer, decay_groups

STATE_FILE = "zoo_state.json"  # beside DCP's shards: schedule, trainer state, layout
_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def init_distributed() -> str:
    """Start the default process group once (nccl on GPUs, gloo on CPU) and return its backend.

    Raises:
        RuntimeError: no launcher set RANK and WORLD_SIZE (the fsdp engine needs torchrun or
            `pipelines/launch/*.sh` with ENGINE=fsdp; one process trains with the torch engine).
    """
    if dist.is_initialized():
        return dist.get_backend()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "the fsdp engine runs under a launcher, and RANK/WORLD_SIZE are not set: start it with "
            "`torchrun --nproc_per_node N -m zoo.pipelines.run ... --engine fsdp` or `ENGINE=fsdp "
            "pipelines/launch/recipe.sh ...`; for one process use --engine torch"
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return backend


def check_mesh(world_size: int, ep_size: int, expert_counts: list[int]) -> None:
    """The 2-D mesh `(world / ep, ep)` is well formed for these MoE layers.

    Raises:
        ValueError: naming the cause: ep < 1, ep not dividing the world size, ep larger than an
            expert count, or not dividing it.
    """
    if ep_size < 1:
        raise ValueError(f"fsdp: ep_size must be >= 1, got {ep_size}")
    if world_size % ep_size:
        raise ValueError(f"fsdp: a mesh of ep={ep_size} x fsdp=world/ep does not divide the world size {world_size}: "
                         f"choose an ep_size that divides {world_size}")
    if ep_size > 1 and not expert_counts:
        raise ValueError(f"fsdp: ep_size={ep_size} but the model has no MoE layer whose experts train")
    for count in sorted(set(expert_counts)):
        if ep_size > count:
            raise ValueError(f"fsdp: ep_size={ep_size} is larger than the number of experts ({count}) of an MoE layer")
        if count % ep_size:
            raise ValueError(f"fsdp: ep_size={ep_size} does not divide the expert count {count} of an MoE layer")


class FSDPEngine:
    """The trainer's engine on FSDP2: sharded parameters, gradients and optimizer states; EP x FSDP experts.

    Every rank builds the same model (same seed or checkpoint) and constructs the engine under a
    launcher. The trainer's `batch_at` comes through `rank_batches`: rank r of N reads micro-batches
    `i * N + r`, so one optimizer step sees N micro-batches, as the 1-process run with
    `grad_accum * N` does.

    Args:
        model: the built model; only parameters with `requires_grad` are optimized.
        optim: optimizer, schedule, accumulation, clip and precision of the stage.
        total_steps: optimizer steps of the stage (for the schedule).
        ep_size: expert-parallel size: must divide the world size and every expert count.
        reshard_after_forward: free each block's gathered parameters after its forward (ZeRO-3
            memory) or keep them until backward (ZeRO-2-like: less communication).

    Attributes:
        model, module: the sharded copy being trained (call it like the model).
        rank, world_size, ep_size, ep_rank: process layout.

    Raises:
        RuntimeError: no launcher; the ranks built different models.
        ValueError: a mesh that does not fit the world size or the expert counts; no trainable parameter.
    """

    def __init__(self, model: nn.Module, optim: OptimConfig, total_steps: int, *, ep_size: int = 1,
                 reshard_after_forward: bool = True) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        backend = init_distributed()
        self.optim_config = optim
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        trained_moes = _trained_moes(model)
        check_mesh(self.world_size, ep_size, [m.experts.num_experts for m in trained_moes])
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"FSDPEngine: {type(model).__name__} has no trainable parameters (every parameter is frozen)")
        if not same_on_all_ranks(fingerprint(list(model.parameters())), self.device):
            raise RuntimeError("FSDPEngine: the ranks built different models (parameter fingerprints differ); build the "
                               "model from the same seed or checkpoint on every rank")
        self.ep_size = ep_size
        self._original = model.to(self.device)
        no_decay = {n for n, p in model.named_parameters() if getattr(p, "zoo_no_decay", False)}
        module = copy.deepcopy(self._original)
        for (name, p), q in zip(model.named_parameters(), module.parameters()):
            q.requires_grad_(p.requires_grad)
            if hasattr(p, GRAD_ROWS):
                setattr(q, GRAD_ROWS, getattr(p, GRAD_ROWS))
        self._free_original()

        device_type = self.device.type
        self._dense_mesh = init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("dp",))
        trained = _trained_moes(module)
        self._ep_mesh = None
        if ep_size > 1:
            self._ep_mesh = init_device_mesh(device_type, (self.world_size // ep_size, ep_size), mesh_dim_names=("efsdp", "ep"))
            shard_experts(module, self._ep_mesh["ep"].get_group(), group_name=expert_group_name(ep_size), only=trained)
        self.ep_rank = self._ep_mesh["ep"].get_local_rank() if self._ep_mesh is not None else 0
        names = dict(module.named_parameters())
        self._expert_names = {n for n, p in names.items() if is_expert_param(p)}
        masks = {n: getattr(p, GRAD_ROWS) for n, p in names.items() if getattr(p, GRAD_ROWS, None) is not None}

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if optim.bf16
              else MixedPrecisionPolicy())
        units = []
        for moe in _lm_moes(module):
            if not any(True for _ in moe.experts.parameters()):
                continue
            sharded_by_ep = moe in trained and ep_size > 1
            unit = fully_shard(moe.experts, mesh=self._ep_mesh["efsdp"] if sharded_by_ep else self._dense_mesh,
                               mp_policy=mp, reshard_after_forward=reshard_after_forward)
            units.append(unit)
        for layer in decoder_layers(causal_lm_of(module)):
            units.append(fully_shard(layer, mesh=self._dense_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward))
        units.append(fully_shard(module, mesh=self._dense_mesh, mp_policy=mp))
        for unit in units:
            unit.set_reduce_scatter_unused_params(True, recurse=False)
            if backend == "gloo":
                unit.set_force_sum_reduction_for_comms(True)
        self.model = self.module = module

        self._trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        for n, p in self._trainable:
            if n in no_decay:
                p.zoo_no_decay = True
        self._masks = {n: _local_rows(masks[n], p) for n, p in self._trainable if n in masks}
        experts = [p for n, p in self._trainable if n in self._expert_names]
        dense = [p for n, p in self._trainable if n not in self._expert_names]
        groups = decay_groups(dense, optim.weight_decay) + decay_groups(experts, optim.weight_decay)  # one mesh per group
        self.optimizer, self.scheduler = build_optimizer(groups, optim, total_steps)
        self.micro_step = 0

    # -- the trainer's interface ----------------------------------------------------------------

    def rank_batches(self, batches: Callable[[int], dict]) -> Callable[[int], dict]:
        """Rank r of N reads micro-batches `i * N + r` (every rank is data parallel, ep ranks too)."""
        rank, ranks = self.rank, self.world_size
        return lambda i: batches(i * ranks + rank)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.optim_config.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of `loss / grad_accum`; FSDP reduce-scatters them into the shards."""
        (loss / self.optim_config.grad_accum).backward()

    def step(self) -> StepResult | None:
        """Count a micro-batch; at an accumulation boundary mask, clip over all shards, update, zero.

        Raises:
            NonFiniteError: the global gradient norm is NaN/inf (no update is applied).
        """
        self.micro_step += 1
        if self.micro_step % self.optim_config.grad_accum:
            return None
        grads = []
        for name, p in self._trainable:
            if p.grad is None:
                continue
            g = _local(p.grad)
            if name in self._masks:
                g.mul_(self._masks[name].to(g.dtype))
            if self.ep_size > 1 and name in self._expert_names:
                g.div_(self.ep_size)  # FSDP averaged over efsdp; the all-to-all summed the ep ranks
            grads.append(g)
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            sq += g.detach().double().square().sum()
        dist.all_reduce(sq)  # every local shard is distinct: the sum over ranks is the global sum
        norm = sq.sqrt().float()
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"gradient norm is {norm.item()} at optimizer step {self.scheduler.last_epoch}")
        clip = self.optim_config.grad_clip
        if clip > 0:
            coef = torch.clamp(clip / (norm + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
            for g in grads:
                g.mul_(coef.to(g.dtype))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm.item(), lr)

    def finish(self) -> None:
        """Nothing to undo: the sharded copy keeps fp32 weights (bf16 lives in the mixed-precision policy)."""

    def consolidate(self) -> nn.Module:
        """Gather the trained copy's full weights and buffers into the original model on every rank.

        A collective: every rank calls it, after training. Experts sharded over ep are all-gathered
        into the original's full `SwiGLUExperts` stacks.
        """
        from torch.distributed.tensor import DTensor

        full: dict[str, torch.Tensor] = {}
        for name, p in self.module.named_parameters():
            t = p.full_tensor() if isinstance(p, DTensor) else p
            if name in self._expert_names and self.ep_size > 1:
                t = _all_gather_rows(t.detach().contiguous(), self._ep_mesh["ep"].get_group())
            full[name] = t.detach().clone()
        with torch.no_grad():
            for name, p in self._original.named_parameters():
                p.data = full[name].to(p.dtype)
            originals = dict(self._original.named_buffers())
            for name, b in self.module.named_buffers():
                if name in originals:
                    originals[name].copy_(b.detach())
        return self._original

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self, path: Path, client_state: dict[str, Any]) -> Path:
        """DCP checkpoint of weights and AdamW moments (global view), plus `zoo_state.json`.

        Written to `.tmp-<name>` and renamed to `path` by rank 0 when every rank is done, so `path`
        only ever exists complete (the directory must be on a file system all ranks share).
        """
        import torch.distributed.checkpoint as dcp

        with all_ranks_write(path, self.is_main) as tmp:
            state, _ = self._global_state(with_optimizer=True)
            dcp.save(state, checkpoint_id=str(tmp))
            if self.is_main:
                scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
                (tmp / STATE_FILE).write_text(json.dumps({
                    "client_state": client_state, "scheduler": scheduler, "micro_step": self.micro_step,
                    "world_size": self.world_size, "ep_size": self.ep_size, "shapes": self._global_shapes(),
                }))
        return Path(path)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore what `save_checkpoint` wrote, at any world size and ep size; return `client_state`.

        Raises:
            FileNotFoundError: no checkpoint at `path`.
            ValueError: the checkpoint holds another model: the parameters it lacks or has more of,
                or shapes that differ (an expert count names both counts).
        """
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"no fsdp checkpoint at {path} ({STATE_FILE} is missing)")
        meta = json.loads((path / STATE_FILE).read_text())
        _check_same_model(meta["shapes"], self._global_shapes(), path)
        state, write_back = self._global_state(with_optimizer=True, for_load=True)
        dcp.load(state, checkpoint_id=str(path))
        write_back()
        # the schedule's position; param groups differ between layouts (experts get their own
        # groups when sharded by ep), and every group follows the same schedule
        sched = self.scheduler
        sched.last_epoch, sched._step_count = meta["scheduler"]["last_epoch"], meta["scheduler"]["_step_count"]
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr  # what optimizer.load_state_dict restores in one process
        sched._last_lr = lrs
        self.micro_step = meta["micro_step"]
        return meta["client_state"]

    # -- helpers --------------------------------------------------------------------------------

    def _free_original(self) -> None:
        """Drop the original's parameter storage while the copy trains, except frozen towers
        (the feature cache runs them); `consolidate` gives it the trained weights."""
        keep = tuple(f"{n}." for n in getattr(self._original, "frozen", ()) if n.startswith("encoders."))
        for name, p in self._original.named_parameters():
            if not (keep and name.startswith(keep)):
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def _global_shapes(self) -> dict[str, list[int]]:
        shapes = {}
        for name, p in self.module.named_parameters():
            shape = list(p.shape)  # a DTensor's shape is global over its mesh
            if name in self._expert_names and self.ep_size > 1:
                shape[0] *= self.ep_size
            shapes[name] = shape
        return shapes

    def _global_state(self, *, with_optimizer: bool, for_load: bool = False):
        """DCP's view: every tensor global. Returns `(state, write_back)`; after `dcp.load(state)`,
        `write_back()` copies what the expert views received into the sharded parameters."""
        from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

        pending: list[tuple[torch.Tensor, DTensor]] = []

        def view(name: str, t: torch.Tensor):
            if name in self._expert_names and self.ep_size > 1:
                # this rank's experts, whole over efsdp, as a slice of all E experts over ep
                local = torch.empty(t.shape, dtype=t.dtype, device=self.device) if for_load else t.full_tensor().contiguous()
                v = DTensor.from_local(local, self._ep_mesh, [Replicate(), Shard(0)], run_check=False)
                if for_load:
                    pending.append((t, v))
                return v
            return t

        model = {name: view(name, p.data) for name, p in self.module.named_parameters()}
        state: dict[str, Any] = {"model": model}
        if with_optimizer:
            optim: dict[str, Any] = {}
            for name, p in self._trainable:
                s = self.optimizer.state.get(p)
                if for_load:
                    s = {"step": torch.zeros((), dtype=torch.float32),
                         **{k: torch.zeros_like(p.data) for k in _ADAM_KEYS}}
                    self.optimizer.state[p] = s
                if s:
                    optim[name] = {"step": s["step"], **{k: view(name, s[k]) for k in _ADAM_KEYS}}
            state["optim"] = optim

        def write_back() -> None:
            with torch.no_grad():
                for target, v in pending:
                    shard = distribute_tensor(v.to_local(), target.device_mesh, target.placements, src_data_rank=None)
                    target.to_local().copy_(shard.to_local())

        return state, write_back


def _lm_moes(model: nn.Module) -> list[SparseMoE]:
    """The MoE layers of the LM's decoder blocks (which every rank runs on every micro-batch; an
    encoder's or a connector's MoE runs only where its modality is, so it stays in the root unit)."""
    return [m for layer in decoder_layers(causal_lm_of(model)) for m in layer.modules() if isinstance(m, SparseMoE)]


def _trained_moes(model: nn.Module) -> list[SparseMoE]:
    """LM MoE layers whose stacked experts train: the ones expert parallelism shards."""
    return [m for m in _lm_moes(model) if isinstance(m.experts, SwiGLUExperts)
            and any(p.requires_grad for p in m.experts.parameters())]


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _local_rows(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The rows of a `[E, 1, ...]` gradient row mask that this rank's shard of `param` holds."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return mask
    return distribute_tensor(mask.to(param.device), param.device_mesh, param.placements, src_data_rank=None).to_local()


def _all_gather_rows(local: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts)


def _check_same_model(saved: dict[str, list[int]], current: dict[str, list[int]], path: Path) -> None:
    """A DCP checkpoint of another model is refused, naming what differs."""
    missing = sorted(set(current) - set(saved))
    extra = sorted(set(saved) - set(current))
    if missing or extra:
        raise ValueError(f"{path}: a checkpoint of another model: it lacks {missing[:4]} and has {extra[:4]} "
                         f"({len(missing)} and {len(extra)} parameters)")
    for name in sorted(current):
        if saved[name] != current[name]:
            if "experts" in name and saved[name][1:] == current[name][1:]:
                raise ValueError(f"{path}: written with {saved[name][0]} experts in {name.rsplit('.', 1)[0]}, "
                                 f"but this model has {current[name][0]}")
            raise ValueError(f"{path}: parameter {name} has shape {saved[name]} there and {current[name]} in this model")


__all__ = ["FSDPEngine", "STATE_FILE", "check_mesh", "init_distributed"]
