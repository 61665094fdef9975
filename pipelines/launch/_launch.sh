#!/usr/bin/env bash
# Shared by the stage and recipe scripts: put a distributed launcher in front of the zoo's runner.
#
# Usage (through a stage or recipe script, never directly):
#   [VARIABLES] pipelines/launch/<stage>.sh --recipe configs/recipes/<name>.yaml --out RUN_DIR [runner args...]
#   [VARIABLES] pipelines/launch/recipe.sh  --recipe configs/recipes/<name>.yaml --out RUN_DIR [runner args...]
#
# Variables (all optional):
#   GPUS_PER_NODE  processes per node: GPUs on a GPU node (default: all `nvidia-smi -L` lists),
#                  CPU processes on a CPU-only node (default 1; gloo backend).
#   HOSTFILE       several nodes, deepspeed launcher: a DeepSpeed hostfile ("host slots=N" per line);
#                  run this script once, on the first host (it reaches the others by passwordless ssh).
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
#                  several nodes, torchrun: run this script on every node with the same NNODES,
#                  MASTER_ADDR (the first node) and MASTER_PORT (default 29500), and NODE_RANK 0..NNODES-1.
#   EP_SIZE        expert-parallel group size (default 1): each MoE layer's experts are split over
#                  EP_SIZE ranks; it must divide the world size and the expert count.
#   DS_CONFIG      DeepSpeed config: a name in configs/deepspeed/ (zero0|zero1|zero2, optionally with
#                  _fp32|_bf16; without the suffix the stage's precision picks it) or a JSON path.
#                  Default zero2.
#   ENGINE         deepspeed | fsdp (default deepspeed). fsdp: PyTorch FSDP2, every parameter sharded,
#                  experts over an EP_SIZE x (world / EP_SIZE) mesh; always launched with torchrun.
#   LAUNCHER       deepspeed | torchrun (default: deepspeed when it is on PATH, else torchrun; fsdp: torchrun).
#   PYTHON         interpreter for `-m` (default: python).
#   ENTRY          what the launcher starts (default: "-m zoo.pipelines.run"); a script path also works.
#   OMP_NUM_THREADS  threads per process (default 1 on CPU-only nodes).
set -euo pipefail

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    GPUS_PER_NODE="${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}"
else
    GPUS_PER_NODE="${GPUS_PER_NODE:-1}"
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
EP_SIZE="${EP_SIZE:-1}"
DS_CONFIG="${DS_CONFIG:-zero2}"
MASTER_PORT="${MASTER_PORT:-29500}"
NNODES="${NNODES:-1}"
PYTHON="${PYTHON:-python}"
ENTRY="${ENTRY:--m zoo.pipelines.run}"
ENGINE="${ENGINE:-deepspeed}"
case "$ENGINE" in
deepspeed | fsdp) ;;
*) echo "launch: ENGINE=$ENGINE; expected deepspeed or fsdp" >&2; exit 2 ;;
esac
if [[ "$ENGINE" == fsdp ]]; then LAUNCHER="${LAUNCHER:-torchrun}"; fi
if [[ -z "${LAUNCHER:-}" ]]; then
    if command -v deepspeed >/dev/null 2>&1; then LAUNCHER=deepspeed; else LAUNCHER=torchrun; fi
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

read -r -a entry <<<"$ENTRY"
if [[ "$ENGINE" == fsdp ]]; then
    engine_args=(--engine fsdp --ep-size "$EP_SIZE")
else
    engine_args=(--engine deepspeed --ds-config "$DS_CONFIG" --ep-size "$EP_SIZE")
fi

case "$LAUNCHER" in
deepspeed)
    # --no_local_rank: the runner reads LOCAL_RANK from the environment, as under torchrun
    cmd=(deepspeed --no_local_rank --num_gpus "$GPUS_PER_NODE" --master_port "$MASTER_PORT")
    if [[ -n "${HOSTFILE:-}" ]]; then
        [[ -f "$HOSTFILE" ]] || { echo "launch: HOSTFILE=$HOSTFILE is not a file" >&2; exit 2; }
        cmd+=(--hostfile "$HOSTFILE")
    fi
    if [[ "${entry[0]}" == "-m" ]]; then cmd+=(--module "${entry[@]:1}"); else cmd+=("${entry[@]}"); fi
    ;;
torchrun)
    if [[ -n "${HOSTFILE:-}" ]]; then
        echo "launch: HOSTFILE is for LAUNCHER=deepspeed; with torchrun set NNODES, NODE_RANK and MASTER_ADDR on every node" >&2
        exit 2
    fi
    cmd=("$PYTHON" -m torch.distributed.run --nproc_per_node "$GPUS_PER_NODE")
    if [[ "$NNODES" -gt 1 ]]; then
        : "${NODE_RANK:?launch: NNODES=$NNODES needs NODE_RANK (0..NNODES-1) on every node}"
        : "${MASTER_ADDR:?launch: NNODES=$NNODES needs MASTER_ADDR (the first node) on every node}"
        cmd+=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    else
        cmd+=(--standalone)
    fi
    cmd+=("${entry[@]}")
    ;;
*)
    echo "launch: LAUNCHER=$LAUNCHER; expected deepspeed or torchrun" >&2
    exit 2
    ;;
esac

cmd+=("$@" "${engine_args[@]}")
echo "launch: ${cmd[*]}" >&2
exec "${cmd[@]}"
