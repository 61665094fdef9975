"""`pretrain-lm`: train the dense LM on text (the tiny zoo has no pretrained LM offline)."""

from __future__ import annotations

from zoo.pipelines.stages.base import STAGES, NoOptions, train_only_stage

PretrainLM = STAGES.register("pretrain-lm", options=NoOptions)(train_only_stage(
    ["language_model.*"], "Next-token training of the language model alone; encoders and connectors stay frozen."))
