"""Stage kinds, one file each, registered in `STAGES`; recipes list them (see `base.py`).

MoE-LLaVA / Uni-MoE order: `pretrain-lm` (the dense LM on text) -> `align` (connectors) ->
`specialize` (instruction-tune; optional FFN copies per group) -> `moe-tune` (upcycle, train
routers + experts) -> `lora` (one adapter per task family).
"""

from zoo.pipelines.stages import align, esft, extend, lora, moe_tune, pretrain_lm, specialize  # noqa: F401  (register)
from zoo.pipelines.stages.base import STAGES, Branch, Stage, StageConfig, StageContext
from zoo.pipelines.stages.recipe import EvalSpec, RecipeConfig

__all__ = ["Branch", "EvalSpec", "RecipeConfig", "STAGES", "Stage", "StageConfig", "StageContext"]
