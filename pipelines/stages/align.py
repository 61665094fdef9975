"""`align`: train the connectors that map encoder features into the LM (MoE-LLaVA / LLaVA stage 1)."""

from __future__ import annotations

from zoo.pipelines.stages.base import STAGES, NoOptions, default_trainable, keep, nothing_after, single_branch


@STAGES.register("align", options=NoOptions)
class Align:
    """Connectors only by default (the LM and frozen encoders stay bit-identical)."""

    default_trains = ["connectors.*"]
    forks = False
    evaluates = False

    def __init__(self) -> None:
        self.options = NoOptions()

    def branches(self, cfg):
        return single_branch(cfg)

    before_training = keep
    trainable = default_trainable
    after_training = nothing_after
