#!/usr/bin/env bash
# Run the `pretrain-lm` stage of a recipe on DeepSpeed (variables: see _launch.sh and README.md here).
#   pipelines/launch/pretrain-lm.sh --recipe configs/recipes/<name>.yaml --out RUN_DIR [runner args...]
exec "$(dirname "$0")/_launch.sh" --stage pretrain-lm "$@"
