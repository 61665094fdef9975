"""`align`: train the connectors that map encoder features into the LM (MoE-LLaVA / LLaVA stage 1)."""

from __future__ import annotations

from zoo.pipelines.stages.base import STAGES, NoOptions, train_only_stage

Align = STAGES.register("align", options=NoOptions)(train_only_stage(
    ["connectors.*"], "Connectors only by default (the LM and frozen encoders stay bit-identical)."))
