"""The lm-evaluation-harness model `zoo`: a zoo checkpoint or card as an lm-eval `TemplateLM`.

    python -m zoo.pipelines.harness lm-eval --model zoo --model_args name=tiny-zoo-text \\
        --tasks my_task --include_path my_tasks/ --apply_chat_template

    from zoo.pipelines.harness.lm_eval_model import ZooLM
    lm_eval.simple_evaluate(model=ZooLM(name="RUN/lora/text/model"), tasks=[...], apply_chat_template=True)

Text goes through `model.language_model` with the processor's tokenizer; tokenization, the
empty-context prefix token, rolling windows and stop strings follow lm-eval's `hf` model, so a zoo
model and its `zoo export --format hf` copy score the same. The chat template is the tokenizer's own,
applied when lm-eval is asked to (`--apply_chat_template`). Generation takes the path `zoo eval`
takes (`MultimodalMoE.generate`, left padding, greedy, stop at eos).

lm-eval 0.4.13 finds third-party models only once their module is imported (no entry points), so
`lm_eval --model zoo` works through `python -m zoo.pipelines.harness lm-eval ...` (or
`zoo harness lm-eval ...`), which imports this module and then runs lm-eval's own command line.
"""

from __future__ import annotations

from typing import Any

from zoo.pipelines.harness import require

require("lm_eval")

from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from tqdm import tqdm  # noqa: E402

from zoo.pipelines.harness import HarnessError  # noqa: E402
from zoo.pipelines.harness.core import flag, generation_options, make_runner, parse_batch_size  # noqa: E402


@register_model("zoo")
class ZooLM(TemplateLM):
    """A zoo model in lm-eval (`--model zoo --model_args name=...`).

    Args:
        name: a checkpoint directory or a card `NAME[@VERSION]` (`pretrained` is taken as a synonym).
        model, processor: an already loaded `MultimodalMoE` and its `MultimodalProcessor` instead of `name`.
        device: where to run ("cpu", "cuda", "cuda:1", ...).
        dtype: cast the model ("float32", "bfloat16", ...; default: the saved dtype).
        batch_size: requests per forward / generate call ("auto" takes 8).
        max_length: the longest sequence the LM sees (default: its `max_position_embeddings`).
        max_gen_toks: new tokens when a task sets none (lm-eval's `hf` default, 256).
        add_bos_token: force the tokenizer's special tokens on (True) or off (False) when encoding.
        prefix_token_id: the token an empty context (and each rolling window) starts from (default: bos, else eos).
        cards_dir: the model cards directory for `name` (default: the shipped cards / $ZOO_MODEL_CARDS).
    """

    # Tasks with images or audio must reach `generate_until` so that the refusal names the cause
    # (which tower is missing, or that such tasks run through lmms-eval), not lm-eval's own list.
    MULTIMODAL = True

    def __init__(self, name: str | None = None, *, pretrained: str | None = None, model=None, processor=None,
                 device: str = "cpu", dtype: str | None = None, batch_size: Any = 8, max_batch_size: Any = None,
                 max_length: Any = None, max_gen_toks: Any = 256, add_bos_token: Any = None,
                 prefix_token_id: Any = None, cards_dir: str | None = None) -> None:
        super().__init__()
        self.runner = make_runner(model, processor, name=name, pretrained=pretrained, device=device, dtype=dtype,
                                  cards_dir=cards_dir, batch_size=batch_size, max_length=max_length)
        self.tokenizer = self.runner.tokenizer
        self.add_bos_token = flag(add_bos_token)
        self.custom_prefix_token_id = int(prefix_token_id) if prefix_token_id not in (None, "") else None
        self._max_gen_toks = int(max_gen_toks)
        self._device = self.runner.device

    # -- what lm-eval reads ---------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.runner.max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.runner.batch_size

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or self.runner.label).replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_name": self.runner.label, "model_num_parameters": sum(p.numel() for p in self.runner.model.parameters()),
                "model_dtype": str(next(self.runner.model.parameters()).dtype)}

    # -- tokenization (as lm-eval's `hf` model) -------------------------------------------------

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        options: dict[str, bool] = {}
        if add_special_tokens is not None:
            options["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            options["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False  # the string already starts with the prefix token
        encoding = self.tokenizer.encode(string, **options)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The tokenizer's own chat template (lm-eval calls this with `--apply_chat_template`)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise HarnessError(f"zoo: model {self.runner.label!r} has no chat template; run without --apply_chat_template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # -- requests -------------------------------------------------------------------------------

    def _refuse_media(self, requests) -> None:
        for req in requests:
            aux = req.args[2] if len(req.args) > 2 and isinstance(req.args[2], dict) else None
            if not aux:
                continue
            given = {m for m, key in (("image", "visual"), ("audio", "audio")) if aux.get(key)}
            task = getattr(req, "task_name", None)
            self.runner.check_media(given, task)  # names the missing tower first
            if given:
                raise HarnessError(f"zoo: task {task!r} gives {' and '.join(sorted(given))}; the lm-eval `zoo` model "
                                   "scores text only: run it through lmms-eval (python -m zoo.pipelines.harness "
                                   "lmms-eval --model zoo ...)")

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._refuse_media(requests)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self.runner.score_tokens([(ctx, cont) for _, ctx, cont in requests])
        for (request_str, _, _), answer in zip(requests, results):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's total log-probability over lm-eval's disjoint rolling windows of `max_length`
        tokens, the first one conditioned on `prefix_token_id` (every token is scored once)."""
        self._refuse_media(requests)
        windows, owners = [], []
        for i, req in enumerate(tqdm(requests, disable=disable_tqdm, desc="zoo: rolling windows")):
            string = req.args[0]
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((context, continuation))
                owners.append(i)
        scores = self.runner.score_tokens(windows) if windows else []
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self._refuse_media(requests)
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        for indices in groups.values():
            options = generation_options(dict(requests[indices[0]].args[1]), self.max_gen_toks, "generate_until")
            options["until"] = options["until"] + ([eos] if eos and eos not in options["until"] else [])
            texts = self.runner.generate([requests[i].args[0] for i in indices], [[] for _ in indices], **options)
            for i, text in zip(indices, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args[:2], text)
        return out  # type: ignore[return-value]


__all__ = ["ZooLM", "parse_batch_size"]
