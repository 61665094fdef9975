"""Zoo models in the field's evaluation harnesses: lm-evaluation-harness (text) and lmms-eval (images, audio).

- `zoo.pipelines.harness.lm_eval_model.ZooLM`: the lm-eval model `zoo` (`loglikelihood`,
  `loglikelihood_rolling`, `generate_until`, chat template), text through `model.language_model`.
- `zoo.pipelines.harness.lmms_eval_model.ZooLMMS`: the lmms-eval model `zoo` (`generate_until` and
  `loglikelihood` with the images and audio of the task's `doc_to_visual`), found by lmms-eval through
  the `lmms_eval.models` entry point.
- `zoo.pipelines.harness.tasks`: our task families (or any samples, or plain text) written as local
  task folders (a YAML over a JSONL file, media beside it) that either harness runs offline.
- `python -m zoo.pipelines.harness lm-eval|lmms-eval|tasks ...` (also `zoo harness ...`): lm-eval
  finds third-party models only once they are imported (it has no entry-point discovery), so this
  registers `zoo` and then runs lm-eval's own command line.

The harnesses are optional (`pip install 'moe-zoo[eval]'`); nothing here imports them until a model
class is asked for, and the zoo imports without them.
"""

from __future__ import annotations

import importlib.util

INSTALL = {
    "lm_eval": "pip install 'moe-zoo[eval]' (or: pip install lm-eval==0.4.13)",
    "lmms_eval": ("pip install 'moe-zoo[eval]' && pip install --no-deps lmms-eval==0.7.3 "
                  "(its own requirements pin another wandb; the zoo's adapter needs only loguru and tenacity besides)"),
}


class HarnessError(ValueError):
    """Bad input to a harness adapter (unknown model, media the model has no tower for, ...); one line."""


def missing(module: str) -> str | None:
    """The install command for `module` ("lm_eval" / "lmms_eval") when it is not importable, else None."""
    return None if importlib.util.find_spec(module) is not None else INSTALL[module]


def require(module: str) -> None:
    """Raise `ImportError` naming the pip command when the harness `module` is not installed."""
    command = missing(module)
    if command is not None:
        raise ImportError(f"{module} is not installed: {command}")


def __getattr__(name: str):
    # The adapters import their harness; reach them lazily so `import zoo.pipelines.harness` never does.
    if name == "ZooLM":
        from zoo.pipelines.harness.lm_eval_model import ZooLM

        return ZooLM
    if name == "ZooLMMS":
        from zoo.pipelines.harness.lmms_eval_model import ZooLMMS

        return ZooLMMS
    raise AttributeError(name)


__all__ = ["INSTALL", "HarnessError", "ZooLM", "ZooLMMS", "missing", "require"]
