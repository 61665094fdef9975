"""The lmms-eval model `zoo`: a zoo checkpoint or card answering with the images and audio of a task's visuals.

    lmms-eval eval --model zoo --model_args name=tiny-zoo-vqa --tasks my_vqa --include_path my_tasks/

lmms-eval finds it through the `lmms_eval.models` entry point this package declares
(`zoo.pipelines.harness.lmms_entry:manifest`),
so the command needs no import of ours first (`python -m zoo.pipelines.harness lmms-eval ...` is the
same). Each request's visuals (`doc_to_visual(doc)`: PIL images, audio dicts `{"array",
"sampling_rate"}`, or image / `.wav` paths) go to the model in order, one placeholder each put
before the question (the zoo's own prompt layout) unless the question already holds one per item;
the prompt is the tokenizer's chat template (`chat_template=False` passes the text as is).
Generation is the path `zoo eval` takes, so an lmms-eval task over a family's test split scores
what `zoo eval` scores.
"""

from __future__ import annotations

from typing import Any

from zoo.pipelines.harness import require

require("lmms_eval")

from lmms_eval.api.model import lmms  # noqa: E402

from zoo.pipelines.harness.lmms_entry import filelock_compat  # noqa: E402

from zoo.pipelines.harness import HarnessError  # noqa: E402
from zoo.pipelines.harness.core import classify_media, flag, generation_options, make_runner  # noqa: E402

filelock_compat()  # before any simple_evaluate of lmms-eval (see lmms_entry)


class ZooLMMS(lmms):
    """A zoo model in lmms-eval (`--model zoo --model_args name=...`).

    Args:
        name: a checkpoint directory or a card `NAME[@VERSION]` (`pretrained` is taken as a synonym).
        model, processor: an already loaded `MultimodalMoE` and its `MultimodalProcessor` instead of `name`.
        device: where to run.
        dtype: cast the model ("float32", "bfloat16", ...; default: the saved dtype).
        batch_size: requests per generate call.
        max_length: the longest text sequence the LM sees (default: its `max_position_embeddings`).
        max_new_tokens: new tokens when a task sets none.
        chat_template: wrap each question in the tokenizer's chat template (default True: zoo models are
            trained on it).
        cards_dir: the model cards directory for `name`.
    """

    is_simple = True

    def __init__(self, name: str | None = None, *, pretrained: str | None = None, model=None, processor=None,
                 device: str = "cpu", dtype: str | None = None, batch_size: Any = 8, max_batch_size: Any = None,
                 max_length: Any = None, max_new_tokens: Any = 256, chat_template: Any = True,
                 cards_dir: str | None = None) -> None:
        super().__init__()
        self.runner = make_runner(model, processor, name=name, pretrained=pretrained, device=device, dtype=dtype,
                                  cards_dir=cards_dir, batch_size=batch_size, max_length=max_length)
        self.chat_template = bool(flag(chat_template))
        self.max_new_tokens = int(max_new_tokens)
        self._device = self.runner.device

    @property
    def batch_size(self) -> int:
        return self.runner.batch_size

    @property
    def device(self):
        return self._device

    def _visuals(self, doc_to_visual, doc_id, task: str, split: str) -> list[tuple[str, Any]]:
        try:
            doc = self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as e:
            raise HarnessError(f"zoo: task {task!r}: no document {doc_id} in split {split!r}") from e
        visuals = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
        if visuals is not None and not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        media = classify_media(visuals, f"task {task!r}")
        self.runner.check_media({kind for kind, _ in media}, task)
        return media

    def generate_until(self, requests) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        prompts, media = [], []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args[:6]
            items = self._visuals(doc_to_visual, doc_id, task, split)
            prompts.append(self.runner.user_prompt(context, items, chat_template=self.chat_template))
            media.append(items)
            groups.setdefault(repr(sorted((gen_kwargs or {}).items())), []).append(i)
        for indices in groups.values():
            options = generation_options(dict(requests[indices[0]].args[1] or {}), self.max_new_tokens, "generate_until")
            texts = self.runner.generate([prompts[i] for i in indices], [media[i] for i in indices], **options)
            for i, text in zip(indices, texts):
                out[i] = text
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        contexts, continuations, media = [], [], []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args[:6]
            items = self._visuals(doc_to_visual, doc_id, task, split)
            continuation = target(self.task_dict[task][split][doc_id]) if callable(target) else target
            contexts.append(self.runner.user_prompt(context, items, chat_template=self.chat_template))
            continuations.append(str(continuation))
            media.append(items)
        return self.runner.score_with_media(contexts, continuations, media)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise HarnessError("zoo: multi-round generation is not supported by the zoo lmms-eval model")


__all__ = ["ZooLMMS"]
