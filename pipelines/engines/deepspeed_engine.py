"""DeepSpeed engine behind the trainer's `Engine` interface, with expert parallelism for `SparseMoE`.

DeepSpeed does what it is good at here: process groups, ZeRO 0-2, gradient reduction, checkpoints
and launch. The MoE layer, the routers and the dropless all-to-all stay ours
(`zoo.moe.expert_parallel`): DeepSpeed's own MoE layer drops tokens by capacity and knows top-1/2
gates only.

How the pieces fit:

* `deepspeed.init_distributed` with gloo on CPU, nccl on GPUs. On CPU the shared-memory
  all-reduce op is not built: DeepSpeed would compile it with g++ at first start (about 2 minutes
  here), and training never uses it (it serves `inference_all_reduce` only). Set
  `ZOO_DS_SHM_COMM=1` to let DeepSpeed build and use it anyway.
* DeepSpeed's expert groups (`ep_size_<P>`) are created, `shard_experts` shards every `SparseMoE`
  over them and flags the expert parameters (`allreduce=False`, `group_name`).
* DeepSpeed enables its MoE code paths (per-group gradient reduction, MoE optimizer groups, expert
  broadcast) only when the model holds a `deepspeed.moe.layer.MoE`; a parameter-free marker of
  that class is attached to a wrapper around the model. Its `num_local_experts` is 0, so
  DeepSpeed's layout-specific expert checkpoint files are skipped: this engine writes each expert
  shard itself, next to DeepSpeed's files.
* The optimizer is `torch.optim.AdamW` (DeepSpeed's FusedAdam would compile at start); expert
  parameters go into MoE param groups built from fresh dicts (DeepSpeed's splitter mutates what it
  is given), and the grouping is verified before training and again after the first update.

Configs are JSON files (`configs/deepspeed/*.json`). Keys set to "auto" are filled from the
stage's `OptimConfig`; explicit values that contradict it are an error.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from zoo.moe.expert_parallel import GRAD_ROWS, expert_group_name, is_expert_param, shard_experts
from zoo.moe.experts import SwiGLUExperts
from zoo.moe.layer import SparseMoE
from zoo.pipelines.engines.base import NonFiniteError, StepResult, all_ranks_write, fingerprint, same_on_all_ranks
from zoo.pipelines.optim import OptimConfig, build_optimizer, decay_groups
from zoo.resources import resource_dir

CONFIG_DIR = resource_dir("configs/deepspeed")
_EXPERT_DIR = "zoo_experts"
_SHARED_STATE = "shared_optimizer_state.safetensors"  # the non-expert parameters' AdamW moments, whole
_ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_MASTER = "fp32"  # the optimizer's fp32 master copy (ZeRO 1/2, bf16), whole
_STATE_SEP = "::"
_CLIENT_KEY = "zoo_client_state"


def config_path(name: str) -> Path:
    """Path of a shipped DeepSpeed config by name (e.g. `"zero2_bf16"`), or of a given file path.

    Raises:
        FileNotFoundError: neither a file nor a shipped config of that name (the message lists them).
    """
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name}.json"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    raise FileNotFoundError(f"DeepSpeed config {name!r} is neither a file nor a shipped config; shipped: {names}")


def resolve_config(ds_config: str | os.PathLike | dict[str, Any], optim: OptimConfig, *, has_experts: bool) -> dict[str, Any]:
    """Load a DeepSpeed config and fill its "auto" keys from `optim`.

    Filled keys: `gradient_accumulation_steps` (grad_accum), `gradient_clipping` (grad_clip),
    `train_micro_batch_size_per_gpu` (1: batches come from the trainer's `batch_at`, DeepSpeed
    only books it), `bf16.enabled` (precision "bf16" or "bf16_master"). `train_batch_size` is removed (DeepSpeed
    derives it). An optimizer or scheduler section is refused: the engine builds torch's.

    Args:
        ds_config: a dict, a JSON file path, or a shipped config name (`configs/deepspeed/<name>.json`);
            a name without precision (`"zero2"`) takes the stage's (`"zero2_bf16"` for bf16).
        optim: the stage's optimizer settings.
        has_experts: the model has `SparseMoE` layers (ZeRO-3 is then refused).

    Raises:
        ValueError: ZeRO-3 with MoE, fp16, an optimizer/scheduler section, or a value that
            contradicts `optim`.
    """
    if isinstance(ds_config, dict):
        cfg, where = json.loads(json.dumps(ds_config)), "the DeepSpeed config"
    else:
        name = str(ds_config)
        precision = "bf16" if optim.bf16 else optim.precision
        if not Path(name).is_file() and (CONFIG_DIR / f"{name}_{precision}.json").is_file():
            name = f"{name}_{precision}"  # "zero2" -> "zero2_bf16" for a bf16 stage (bf16 or bf16_master)
        path = config_path(name)
        cfg, where = json.loads(path.read_text()), str(path)
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    if stage == 3 and has_experts:
        raise ValueError(
            f"{where}: ZeRO stage 3 cannot train this MoE model: ZeRO-3 partitions every parameter over the "
            "whole data-parallel group, but expert parameters live on one expert-parallel rank and must be "
            "reduced over their expert-data-parallel group only (DeepSpeed refuses ZeRO-3 for MoE for the same "
            "reason). Use ZeRO stage 2 (configs/deepspeed/zero2_*.json) and a larger ep_size to fit the experts, or "
            "the fsdp engine (ENGINE=fsdp pipelines/launch/*.sh, or --engine fsdp), which shards every parameter, "
            "experts included."
        )
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise ValueError(
                f"{where}: has an {section!r} section; the engine builds torch AdamW and the cosine schedule from "
                "the stage's OptimConfig (DeepSpeed's FusedAdam would compile at start). Remove the section."
            )
    if cfg.get("fp16", {}).get("enabled") is True:
        raise ValueError(f"{where}: fp16 is not supported (use bf16: no loss scaling needed)")
    bf16 = optim.bf16  # "bf16" and "bf16_master" alike: DeepSpeed holds bf16 weights and fp32 masters itself
    wanted = {
        "gradient_accumulation_steps": optim.grad_accum,
        "gradient_clipping": float(optim.grad_clip),
        "train_micro_batch_size_per_gpu": 1,
    }
    for key, value in wanted.items():
        have = cfg.get(key, "auto")
        if have != "auto" and have != value:
            raise ValueError(f"{where}: {key}={have!r} contradicts the stage's OptimConfig ({value!r}); set it to \"auto\"")
        cfg[key] = value
    cfg.pop("train_batch_size", None)
    have_bf16 = cfg.setdefault("bf16", {}).get("enabled", "auto")
    if have_bf16 != "auto" and bool(have_bf16) != bf16:
        raise ValueError(
            f"{where}: bf16.enabled={have_bf16} but the stage's OptimConfig.precision is {optim.precision!r}; "
            f"pick the matching config (zero*_{'bf16' if bf16 else 'fp32'}.json) or set it to \"auto\""
        )
    cfg["bf16"]["enabled"] = bf16
    cfg["zero_allow_untested_optimizer"] = True  # a torch optimizer under ZeRO
    if has_experts and stage in (1, 2):
        zero = cfg["zero_optimization"]
        for key in ("contiguous_gradients", "reduce_scatter"):  # DeepSpeed asserts these for MoE
            if zero.get(key) is False:
                raise ValueError(f"{where}: zero_optimization.{key}=false; DeepSpeed's MoE support requires true")
            zero[key] = True
    return cfg


def moe_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer param groups with expert parameters in DeepSpeed MoE groups.

    Trainable parameters are split by decay (matrices decay, vectors do not), then DeepSpeed's
    `split_params_into_different_moe_groups_for_optimizer` moves expert parameters into groups
    with `moe=True` and `name=<their group_name>`. The splitter mutates the dicts it is given,
    so it gets fresh ones built here, and the result is checked.

    Raises:
        ValueError: no trainable parameter.
        RuntimeError: a trainable parameter is missing, duplicated, or in the wrong kind of group.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (every parameter is frozen)")
    groups = split_params_into_different_moe_groups_for_optimizer(decay_groups((p for _, p in params), weight_decay))
    groups = [g for g in groups if g["params"]]
    check_moe_param_groups(dict(params), groups)
    return groups


def check_moe_param_groups(named: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> None:
    """Every trainable parameter is in exactly one group; experts only in their MoE group.

    Args:
        named: name -> trainable parameter.
        groups: optimizer param groups.

    Raises:
        RuntimeError: naming the parameters that are missing (they would silently never update),
            duplicated, or grouped with the wrong kind.
    """
    seen: dict[int, int] = {}
    wrong = []
    for g in groups:
        for p in g["params"]:
            seen[id(p)] = seen.get(id(p), 0) + 1
            if is_expert_param(p) != bool(g.get("moe")) or (g.get("moe") and g.get("name") != p.group_name):
                wrong.append(g.get("name"))
    missing = [n for n, p in named.items() if id(p) not in seen]
    dup = [n for n, p in named.items() if seen.get(id(p), 0) > 1]
    if missing or dup or wrong:
        raise RuntimeError(
            "optimizer param groups are misbuilt: "
            f"missing (would never update) {missing[:8]}, duplicated {dup[:8]}, expert/shared mixed in groups {wrong[:8]}"
        )


def _same_on_all_ranks(value: torch.Tensor, group=None) -> bool:
    from deepspeed.accelerator import get_accelerator

    return same_on_all_ranks(value, get_accelerator().current_device_name(), group)  # nccl reduces device tensors only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None) -> str:
    """Start DeepSpeed's process group (once) and return the backend: nccl on GPUs, gloo on CPU.

    Without a launcher (no RANK in the environment) a 1-process group on localhost is started.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator().device_name()
    backend = backend or ("gloo" if accelerator == "cpu" else get_accelerator().communication_backend_name())
    if accelerator == "cpu" and os.environ.get("ZOO_DS_SHM_COMM", "0") != "1":
        # DeepSpeed compiles its shm all-reduce op with g++ on every fresh machine when its
        # process group starts; training never calls it (inference_all_reduce only).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)
    if accelerator != "cpu":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return backend


def _marker_class():
    from deepspeed.moe.layer import MoE

    class ZooMoEMarker(MoE):
        """Parameter-free `deepspeed.moe.layer.MoE` that switches on DeepSpeed's MoE code paths.

        `num_local_experts = 0`: DeepSpeed's expert checkpoint files (laid out for its own MoE
        layer) are skipped; `DeepSpeedEngine` saves the expert shards itself.
        """

        def __init__(self, num_experts: int, ep_size: int, group_name: str) -> None:
            nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts, no groups created here
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.expert_group_name = group_name
            self.num_local_experts = 0

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """The engine has created the groups before `deepspeed.initialize`."""

        def forward(self, *args, **kwargs):
            raise RuntimeError("ZooMoEMarker only marks the model for DeepSpeed; it is never called")

    return ZooMoEMarker


class _MarkedModel(nn.Module):
    """The model plus DeepSpeed's MoE marker; forwards to the model."""

    def __init__(self, module: nn.Module, marker: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.moe_marker = marker

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class DeepSpeedEngine:
    """The trainer's engine on DeepSpeed: ZeRO 0-2, fp32/bf16, expert parallelism, DS checkpoints.

    Every rank builds the same model (same seed or checkpoint) and constructs the engine; with
    `SparseMoE` layers the experts are then sharded over groups of `ep_size` ranks (ep_size=1:
    replicated experts, still reduced as expert parameters). The trainer's `batch_at(i)` should
    give each data-parallel rank its own slice of the global batch (`dp_rank`, `dp_world_size`).

    Args:
        model: the built model; only parameters with `requires_grad` are optimized.
        optim: optimizer, schedule, accumulation, clip and precision of the stage.
        total_steps: optimizer steps of the stage (for the schedule).
        ds_config: a shipped config name (`"zero2"`, `"zero2_fp32"`), a JSON path, or a dict.
        ep_size: expert-parallel group size; must divide the world size and the expert count.
        dist_backend: override the backend (default: gloo on CPU, nccl on GPUs).

    Attributes:
        model: the DeepSpeed engine module (call it like the model).
        module: the model itself (with sharded experts).
        ds: the `deepspeed.DeepSpeedEngine`.
        rank, world_size, dp_rank, dp_world_size, ep_rank, ep_size: process layout.

    Raises:
        ImportError: deepspeed is not installed.
        ValueError: ZeRO-3 with MoE, bad ep_size, a config contradicting `optim`, no trainable parameter.
        RuntimeError: the ranks built different models.
    """

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        total_steps: int,
        *,
        ds_config: str | os.PathLike | dict[str, Any] = "zero2",
        ep_size: int = 1,
        dist_backend: str | None = None,
    ) -> None:
        try:
            import deepspeed
        except ImportError:
            raise ImportError("DeepSpeedEngine needs deepspeed: pip install 'moe-zoo[deepspeed]'") from None
        from deepspeed.utils import groups as ds_groups

        # MoE layers whose experts train: they get expert parallelism and DeepSpeed's MoE groups.
        # Layers with frozen experts (a LoRA stage on attention) and LoRA experts (MixLoRA: tiny,
        # not shardable) are ordinary replicated, data-parallel modules.
        moes = [m for m in model.modules() if isinstance(m, SparseMoE) and isinstance(m.experts, SwiGLUExperts)
                and any(p.requires_grad for p in m.experts.parameters())]
        num_experts = moes[0].experts.num_experts if moes else 0
        self.config = resolve_config(ds_config, optim, has_experts=bool(moes))
        self.optim_config = optim
        self.backend = init_distributed(dist_backend)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        if ep_size < 1 or self.world_size % ep_size:
            raise ValueError(f"DeepSpeedEngine: ep_size={ep_size} must be >= 1 and divide the world size {self.world_size}")
        if ep_size > 1 and not moes:
            raise ValueError(f"DeepSpeedEngine: ep_size={ep_size} but {type(model).__name__} has no SparseMoE layer")
        if moes and any(m.experts.num_experts % ep_size for m in moes):
            counts = sorted({m.experts.num_experts for m in moes})
            raise ValueError(f"DeepSpeedEngine: ep_size={ep_size} does not divide the expert counts {counts}")
        if not _same_on_all_ranks(fingerprint(list(model.parameters()))):
            raise RuntimeError(
                "DeepSpeedEngine: the ranks built different models (parameter fingerprints differ); build the model "
                "from the same seed or checkpoint on every rank before sharding experts"
            )
        self.ep_size = ep_size
        wrapped: nn.Module = model
        if moes:
            name = expert_group_name(ep_size)
            if name not in ds_groups._get_expert_parallel_group_dict():  # a later stage in the same process reuses them
                ds_groups._create_expert_and_data_parallel(ep_size)
            shard_experts(model, ds_groups._get_expert_parallel_group(name), group_name=name, only=moes)
            wrapped = _MarkedModel(model, _marker_class()(num_experts, ep_size, name))
            self.ep_rank = ds_groups._get_expert_parallel_rank(name)
            self._edp_rank = ds_groups._get_expert_data_parallel_rank(name)
        else:
            self.ep_rank, self._edp_rank = 0, 0
        self.module = model
        groups = moe_param_groups(model, optim.weight_decay) if moes else decay_groups(
            (p for p in model.parameters() if p.requires_grad), optim.weight_decay)
        if not groups:
            raise ValueError(f"DeepSpeedEngine: {type(model).__name__} has no trainable parameters")
        optimizer, scheduler = build_optimizer(groups, optim, total_steps)
        self.zero_stage = int(self.config.get("zero_optimization", {}).get("stage", 0))
        # ZeRO-0 fp32: DeepSpeed averages per-rank norms when experts are sharded, which is not the
        # global norm; this engine clips with the exact global norm itself instead.
        self._own_clip = self.zero_stage == 0 and optim.precision == "fp32"
        config = dict(self.config, gradient_clipping=0.0) if self._own_clip else self.config
        self.ds, _, _, _ = deepspeed.initialize(
            model=wrapped, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
        )
        self.model = self.ds
        self.device = self.ds.device
        self.dp_rank, self.dp_world_size = ds_groups._get_data_parallel_rank(), ds_groups._get_data_parallel_world_size()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._expert_params = [(n, p) for n, p in named if is_expert_param(p)]
        self._shared_params = [(n, p) for n, p in named if not is_expert_param(p)]
        self._ep_group = ds_groups._get_expert_parallel_group(expert_group_name(ep_size)) if moes else None
        # Expert parameters that must move in the first update: not those whose rows on this rank are
        # all masked (ESFT selected none of them, MoExtend's old experts: `GRAD_ROWS`).
        self._checked_experts = [(n, p) for n, p in self._expert_params
                                 if getattr(p, GRAD_ROWS, None) is None or bool(getattr(p, GRAD_ROWS).any())]
        self._pending_update_check = bool(self._checked_experts)

    def autocast(self) -> contextlib.AbstractContextManager:
        """No autocast: with bf16 DeepSpeed holds bf16 weights and fp32 master weights itself."""
        return contextlib.nullcontext()

    def finish(self) -> None:
        """Nothing to undo here: the module's dtype is DeepSpeed's (bf16 under its bf16, with its fp32 masters)."""

    def rank_batches(self, batches):
        """Each data-parallel rank reads its own micro-batches: `batches(i * dp_world_size + dp_rank)`."""
        rank, ranks = self.dp_rank, self.dp_world_size
        return lambda i: batches(i * ranks + rank)

    def consolidate(self) -> nn.Module:
        """The model with full experts on every rank (expert shards all-gathered; a collective)."""
        if self.ep_size > 1:
            from zoo.moe.expert_parallel import unshard_experts

            unshard_experts(self.module)
        return self.module

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed's backward: scales by 1/grad_accum and reduces gradients at the boundary.

        A zero-weighted term touches every trainable parameter, so every rank produces a gradient
        for the same parameters even when its batch skips a branch (a modality absent from this
        rank's batch): DeepSpeed has no `find_unused_parameters`, and ranks that reduce different
        gradient sets deadlock or fail with a size mismatch.
        """
        touch = sum(p.reshape(-1)[:1].sum() for p in self.module.parameters() if p.requires_grad)
        self.ds.backward(loss + 0.0 * touch)

    def _global_grad_norm(self) -> torch.Tensor:
        """Exact L2 norm of all gradients: shared ones are replicated, expert shards add up over the EP group."""
        def sq(params):
            return sum((p.grad.detach().double().square().sum() for _, p in params if p.grad is not None),
                       torch.zeros((), dtype=torch.float64, device=self.device))
        expert = sq(self._expert_params).to(self.device)
        if self._ep_group is not None and self.ep_size > 1:
            dist.all_reduce(expert, group=self._ep_group)
        return (sq(self._shared_params).to(self.device) + expert).sqrt().float()

    def step(self) -> StepResult | None:
        """DeepSpeed's step: updates only at an accumulation boundary.

        Raises:
            NonFiniteError: the gradient norm is NaN/inf (ZeRO 1/2 and bf16: DeepSpeed has applied
                the update by then; resume from the last checkpoint).
            RuntimeError: after the first update no expert parameter changed on this rank (the
                experts are silently frozen: misbuilt optimizer groups).
        """
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()
            return None
        lr = float(self.ds.get_lr()[0])
        norm = None
        if self._own_clip:
            norm = self._global_grad_norm()
            if not torch.isfinite(norm):
                self.ds.zero_grad()
                raise NonFiniteError(f"gradient norm is {norm.item()} at optimizer step {self.ds.global_steps}")
            clip = self.optim_config.grad_clip
            if clip > 0 and norm > clip:
                for _, p in self._shared_params + self._expert_params:
                    if p.grad is not None:
                        p.grad.mul_(clip / (norm.item() + 1e-6))
        before = fingerprint([p for _, p in self._checked_experts]) if self._pending_update_check else None
        self.ds.step()
        if norm is None:
            value = self.ds.get_global_grad_norm()
            norm = torch.as_tensor(float("nan") if value is None else value, dtype=torch.float32)
        if not math.isfinite(float(norm)):
            raise NonFiniteError(f"gradient norm is {float(norm)} at optimizer step {self.ds.global_steps}; "
                                 "DeepSpeed applied the update: resume from the last good checkpoint")
        if before is not None:
            self._check_experts_updated(before)
        return StepResult(float(norm), lr)

    def _check_experts_updated(self, before: torch.Tensor) -> None:
        after = fingerprint([p for _, p in self._checked_experts])
        changed = (after != before).any(dim=1)
        self._pending_update_check = False
        if not bool(changed.any()):
            names = [n for n, _ in self._checked_experts]
            raise RuntimeError(
                f"rank {self.rank}: no trainable expert parameter changed in the first optimizer step ({names[:6]}...); "
                "the experts are frozen: their optimizer param groups are misbuilt (e.g. a reused param-group dict "
                "emptied by split_params_into_different_moe_groups_for_optimizer)"
            )

    def _expert_file(self, ckpt: Path, ep_rank: int) -> Path:
        return ckpt / _EXPERT_DIR / f"ep_rank_{ep_rank:03d}-of-{self.ep_size:03d}.safetensors"

    def save_checkpoint(self, path: Path, client_state: dict[str, Any]) -> Path:
        """DeepSpeed checkpoint of weights, optimizer (ZeRO shards), scheduler and `client_state`.

        Written under a temporary tag and renamed to `path` by rank 0 when every rank is done, so
        `path` only ever exists complete (the directory must be on a file system all ranks share).
        Each expert shard is saved by the first rank of its expert-data-parallel group.
        """
        path = Path(path)
        with all_ranks_write(path, self.is_main) as tmp:
            self.ds.save_checkpoint(str(path.parent), tag=tmp.name, client_state={_CLIENT_KEY: client_state}, save_latest=False)
            step, optim_state = self._optimizer_state()  # collective: every rank, every trainable parameter
            meta = {"ep_size": str(self.ep_size), "adam_step": str(step)}
            if self._expert_params and self._edp_rank == 0:
                tensors = {n: p.detach().cpu().contiguous() for n, p in self.module.named_parameters() if is_expert_param(p)}
                tensors.update({k: v for k, v in optim_state.items() if k.split(_STATE_SEP)[0] in dict(self._expert_params)})
                file = self._expert_file(tmp, self.ep_rank)
                file.parent.mkdir(parents=True, exist_ok=True)
                save_file(tensors, str(file), metadata={**meta, "ep_rank": str(self.ep_rank)})
            if self.is_main:
                shared = {k: v for k, v in optim_state.items() if k.split(_STATE_SEP)[0] in dict(self._shared_params)}
                (tmp / _EXPERT_DIR).mkdir(parents=True, exist_ok=True)
                save_file(shared, str(tmp / _EXPERT_DIR / _SHARED_STATE), metadata=meta)
        return path

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore what `save_checkpoint` wrote; return its `client_state`.

        Raises:
            FileNotFoundError: no DeepSpeed checkpoint or expert shard at `path`.
            ValueError: the checkpoint was written with another ep_size.
        """
        path = Path(path)
        written = self._written_ep_size(path)
        if written is not None and written != self.ep_size:
            return self._load_resharded(path, written)
        load_path, states = self.ds.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint at {path}")
        if self._expert_params:
            file = self._expert_file(path, self.ep_rank)
            if not file.is_file():
                found = sorted(p.name for p in (path / _EXPERT_DIR).glob("*.safetensors"))
                raise FileNotFoundError(f"{path}: no expert shard {file.name} for ep_size={self.ep_size}, "
                                        f"ep_rank={self.ep_rank}; found {found}")
            tensors = {k: v for k, v in load_file(str(file)).items() if _STATE_SEP not in k}
            params = dict(self.module.named_parameters())
            with torch.no_grad():
                for name, value in tensors.items():
                    params[name].copy_(value.to(params[name].device))
            # ZeRO/bf16 master weights were restored from this rank's own optimizer shard, which
            # holds this rank's experts: they agree with what was just copied.
        return states[_CLIENT_KEY]

    # ------------------------------------------------------------ layout-independent optimizer state

    def _adam_states(self, p: torch.Tensor):
        """Where `p`'s AdamW state lives: `(state dict, hp fragment address, lp fragment address)`.

        ZeRO 1/2 and DeepSpeed's bf16 optimizer keep the state on flat fp32 partitions, each rank a
        slice (`p._hp_mapping` locates this rank's fragment of `p`, or is None when it holds none);
        ZeRO-0 fp32 hands the parameters to torch's AdamW unchanged (state keyed by `p`).
        """
        opt = self.ds.optimizer
        if not hasattr(p, "_hp_mapping"):
            return opt.state.setdefault(p, {}), None, None
        mapping = p._hp_mapping
        if mapping is None:
            return None, None, None
        flats = getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_groups_flat_partition
        flat = flats[mapping.param_group_index]
        return opt.optimizer.state.setdefault(flat, {}), mapping.hp_fragment_address, mapping.lp_fragment_address

    def _optimizer_state(self) -> tuple[int, dict[str, torch.Tensor]]:
        """Every trainable parameter's AdamW moments, whole (`<name>::exp_avg`, `<name>::exp_avg_sq`,
        fp32, an expert shard's `[E / P, ...]` rows), and the AdamW step: a state that any expert-parallel
        layout can be restored from. A collective over each parameter's data-parallel group."""
        step, out = 0, {}
        for name, p in self._shared_params + self._expert_params:
            state, hp, lp = self._adam_states(p)
            if state and "step" in state:
                step = int(state["step"])
            partitioned = hasattr(p, "_hp_mapping")
            for key in (*_ADAM_KEYS, *((_MASTER,) if partitioned else ())):
                if not partitioned:  # ZeRO-0 fp32: the whole tensor is here (or no step yet)
                    value = state.get(key, torch.zeros_like(p, dtype=torch.float32)).detach().float()
                else:  # ZeRO 1/2, bf16: this rank's fragment, summed over the partition group
                    value = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                    if key == _MASTER and p._hp_mapping is not None:
                        value.narrow(0, lp.start, lp.numel).copy_(p._hp_mapping.hp_fragment.reshape(-1))
                    elif state is not None and key in state:
                        value.narrow(0, lp.start, lp.numel).copy_(state[key].narrow(0, hp.start, hp.numel))
                    dist.all_reduce(value, group=p._dp_group)
                    value = value.view_as(p)
                out[f"{name}{_STATE_SEP}{key}"] = value.cpu().contiguous()
        steps = torch.tensor([step], dtype=torch.float64)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)  # a rank holding no fragment has seen no step
        return int(steps.item()), out

    def _set_optimizer_state(self, step: int, values: dict[str, torch.Tensor]) -> None:
        """Put whole moments (as `_optimizer_state` wrote them, re-sliced to this layout) into the optimizer."""
        for name, p in self._shared_params + self._expert_params:
            state, hp, lp = self._adam_states(p)
            if state is None:
                continue
            if hp is None:
                state["step"] = torch.tensor(float(step))
                for key in _ADAM_KEYS:
                    state[key] = values[f"{name}{_STATE_SEP}{key}"].to(p.device, torch.float32).view_as(p).clone()
                continue
            flats = getattr(self.ds.optimizer, "single_partition_of_fp32_groups", None) or \
                self.ds.optimizer.fp32_groups_flat_partition
            flat = flats[p._hp_mapping.param_group_index]
            state.setdefault("step", torch.tensor(float(step)))
            state["step"] = torch.tensor(float(step))
            for key in _ADAM_KEYS:
                buf = state.setdefault(key, torch.zeros_like(flat))
                whole = values[f"{name}{_STATE_SEP}{key}"].to(buf.device, buf.dtype).reshape(-1)
                buf.narrow(0, hp.start, hp.numel).copy_(whole.narrow(0, lp.start, lp.numel))
            master = values.get(f"{name}{_STATE_SEP}{_MASTER}")  # bf16 weights alone would round it
            if master is not None:
                p._hp_mapping.hp_fragment.data.reshape(-1).copy_(master.reshape(-1).narrow(0, lp.start, lp.numel))

    def _written_ep_size(self, path: Path) -> int | None:
        files = sorted((path / _EXPERT_DIR).glob("ep_rank_*-of-*.safetensors"))
        sizes = {int(f.stem.rsplit("-of-", 1)[1]) for f in files}
        if len(sizes) > 1:
            raise ValueError(f"{path}: expert shards of several expert-parallel sizes {sorted(sizes)}: {[f.name for f in files]}")
        return sizes.pop() if sizes else None

    def _load_resharded(self, path: Path, written: int) -> dict[str, Any]:
        """Resume a checkpoint written at another ep_size: weights and AdamW state re-sliced to this layout.

        DeepSpeed's own files hold its partitions for the layout that wrote them; from them only the
        shared weights, the LR schedule, the step counters and the trainer's state are taken. The
        experts (every old shard, concatenated into the E experts, then this rank's slice) and all
        AdamW moments come from the layout-independent files `save_checkpoint` writes beside them.

        Raises:
            FileNotFoundError: a shard of the written layout is missing.
            ValueError: the checkpoint's experts or parameters differ from this model's (both named).
        """
        shards = []
        for r in range(written):
            file = path / _EXPERT_DIR / f"ep_rank_{r:03d}-of-{written:03d}.safetensors"
            if not file.is_file():
                raise FileNotFoundError(f"{path}: expert shard {file.name} of the ep_size={written} layout is missing")
            shards.append(load_file(str(file)))
        shared_file = path / _EXPERT_DIR / _SHARED_STATE
        if not shared_file.is_file():
            raise FileNotFoundError(f"{path}: no {shared_file.name}; this checkpoint predates resuming at another ep_size")
        shared = load_file(str(shared_file))
        with open(shared_file, "rb") as f:  # safetensors header: 8-byte length, then JSON with __metadata__
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        step = int(header["__metadata__"]["adam_step"])
        whole = {k: torch.cat([s[k] for s in shards]) for k in shards[0]} if self._expert_params else {}
        for name, p in self._expert_params:
            e = getattr(_owner(self.module, name), "num_experts", None)
            if name not in whole:
                raise ValueError(f"{path}: the checkpoint has no expert parameter {name} (it holds {sorted(whole)[:6]}...)")
            if whole[name].shape[0] != e or whole[name].shape[1:] != p.shape[1:]:
                raise ValueError(f"{path}: {name} holds {whole[name].shape[0]} experts of shape {tuple(whole[name].shape[1:])} "
                                 f"in the checkpoint, but the model has {e} of shape {tuple(p.shape[1:])}")
        for name, p in self._shared_params:
            key = f"{name}{_STATE_SEP}{_ADAM_KEYS[0]}"
            if key not in shared or shared[key].shape != p.shape:
                found = tuple(shared[key].shape) if key in shared else "nothing"
                raise ValueError(f"{path}: trainable {name} {tuple(p.shape)} is not what the checkpoint trained ({found})")

        experts = {n for n, _ in self._expert_params}

        def load_shared(src, dst):  # DeepSpeed's module file: everything but the (old-layout) expert shards
            own = dst.state_dict()
            missing = [k for k in own if k not in src and k.removeprefix("module.") not in experts]
            if missing:
                raise ValueError(f"{path}: the checkpoint's model has no {missing[:6]} (a different model)")
            dst.load_state_dict({k: v for k, v in src.items() if k.removeprefix("module.") not in experts}, strict=False)

        load_path, states = self.ds.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=False,
                                                    load_lr_scheduler_states=True, custom_load_fn=load_shared)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint at {path}")
        local = {}
        for name, p in self._expert_params:
            shard = _owner(self.module, name)
            rows = slice(shard.expert_offset, shard.expert_offset + shard.num_local_experts)
            local[name] = whole[name][rows]
            for key in (*_ADAM_KEYS, _MASTER):
                if f"{name}{_STATE_SEP}{key}" in whole:
                    local[f"{name}{_STATE_SEP}{key}"] = whole[f"{name}{_STATE_SEP}{key}"][rows]
            with torch.no_grad():
                p.copy_(local[name].to(p.device, p.dtype))
        if hasattr(self.ds.optimizer, "_restore_from_bit16_weights"):
            self.ds.optimizer._restore_from_bit16_weights()  # fp32 master weights from the weights just set
        self._set_optimizer_state(step, {**shared, **local})
        # DeepSpeed's optimizer file carried each group's current lr; restoring only the schedule leaves the base lr
        for group, lr in zip(self.ds.optimizer.param_groups, self.ds.lr_scheduler.get_last_lr()):
            group["lr"] = lr
        return states[_CLIENT_KEY]


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rsplit(".", 1)[0])


__all__ = [
    "CONFIG_DIR",
    "DeepSpeedEngine",
    "check_moe_param_groups",
    "config_path",
    "init_distributed",
    "moe_param_groups",
    "resolve_config",
]
