#!/usr/bin/env bash
# Run every stage of a recipe, in order, in one DeepSpeed launch (variables: see _launch.sh and README.md here).
#   pipelines/launch/recipe.sh --recipe configs/recipes/<name>.yaml --out RUN_DIR [runner args...]
exec "$(dirname "$0")/_launch.sh" "$@"
