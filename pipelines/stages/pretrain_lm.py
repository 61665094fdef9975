"""`pretrain-lm`: train the dense LM on text (the tiny zoo has no pretrained LM offline)."""

from __future__ import annotations

from zoo.pipelines.stages.base import STAGES, NoOptions, default_trainable, keep, nothing_after, single_branch


@STAGES.register("pretrain-lm", options=NoOptions)
class PretrainLM:
    """Next-token training of the language model alone; encoders and connectors stay frozen."""

    default_trains = ["language_model.*"]
    forks = False
    evaluates = False

    def __init__(self) -> None:
        self.options = NoOptions()

    def branches(self, cfg):
        return single_branch(cfg)

    before_training = keep
    trainable = default_trainable
    after_training = nothing_after
