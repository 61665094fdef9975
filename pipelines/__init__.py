"""Training pipelines (imported as `zoo.pipelines`): stages, trainer, engines, data, eval, launch scripts.

`STAGES` holds the stage kinds recipes use. The model library (`zoo`) never imports this package.
"""

from zoo.pipelines.stages import STAGES, RecipeConfig, StageConfig

__all__ = ["RecipeConfig", "STAGES", "StageConfig"]
