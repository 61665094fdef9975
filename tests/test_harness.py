"""Zoo models in lm-evaluation-harness and lmms-eval, offline, against the zoo's own numbers.

One tiny MoE model (micro-zoo's towers, a 4-expert LM) trained for a few steps on half of a handful
of text / vqa / asr items, saved as a checkpoint directory beside built data (shards), so that
`zoo eval` (`evaluate_checkpoint`) and the harnesses read the same items:

- lm-eval `zoo` on a local text task: per-item answers and accuracy equal `zoo eval`'s;
- `loglikelihood` equals a naive float64 loop over the LM's logits; `loglikelihood_rolling`
  (perplexity task) equals the LM's own loss, and `zoo eval`'s perplexity function;
- lmms-eval `zoo` on local vqa (images) and asr (audio) tasks: equal to `zoo eval`;
- `zoo export --format hf` through lm-eval's built-in `hf` model in a process without the zoo:
  the same answers and perplexity;
- bad input: an unknown model, images for a text-only model, audio for a model without an audio tower.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from zoo.pipelines.harness import HarnessError, missing

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12  # training steps of the tiny model (a few: some answers right, some wrong)
LM_EVAL = missing("lm_eval")
LMMS_EVAL = missing("lmms_eval")
needs_lm_eval = pytest.mark.skipif(LM_EVAL is not None, reason=f"lm-eval is not installed: {LM_EVAL}")
needs_lmms_eval = pytest.mark.skipif(LMMS_EVAL is not None, reason=f"lmms-eval is not installed: {LMMS_EVAL}")

CATEGORIES = [
    ("a domesticated carnivorous mammal that barks", "animal"), ("a large natural stream of water", "object"),
    ("a person who flies an aircraft", "person"), ("a tall perennial woody plant", "plant"),
    ("a meal eaten in the morning", "food"), ("a vehicle with four wheels", "artifact"),
    ("a feeling of great pleasure", "feeling"), ("the act of running quickly", "act"),
]
COLORS = [("red", (250, 0, 0)), ("green", (0, 250, 0)), ("blue", (0, 0, 250)), ("red", (210, 30, 20)),
          ("blue", (20, 40, 220))]
TONES = [("low", 220.0), ("high", 1760.0), ("low", 260.0), ("high", 1500.0)]
PARAGRAPHS = [
    "The river runs through the valley and the trees grow tall beside the water.",
    "A person who flies an aircraft is called a pilot, and a meal eaten in the morning is breakfast.",
    "Small dogs bark at the postman every morning, while the cat sleeps in the sun.",
]


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def tone(freq: float, seconds: float = 0.5, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.5 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def micro_config(encoders=("image", "audio"), moe: bool = True):
    from zoo.models import ModelConfig

    data = yaml.safe_load((ROOT / "configs" / "models" / "micro-zoo.yaml").read_text())
    data["encoders"] = {k: v for k, v in data["encoders"].items() if k in encoders}
    data["connectors"] = {k: v for k, v in data["connectors"].items() if k in encoders}
    if moe:
        data["moe"] = {"num_experts": 4, "router_options": {"top_k": 2}}
    return ModelConfig.from_dict(data)


def save(model, cfg, tokenizer, path: Path) -> Path:
    from zoo.io.model_dir import save_model_dir

    tok_dir = path.parent / (path.name + "-tokenizer")
    tokenizer.save_pretrained(str(tok_dir))
    save_model_dir(model, cfg, path, tok_dir)
    return path


@pytest.fixture(scope="module")
def zoo_setup(tmp_path_factory):
    """A trained tiny MoE checkpoint, its built data (text, vqa, asr, corpus) and a text-only model."""
    from zoo.models import build_model
    from zoo.pipelines.collate import collate
    from zoo.pipelines.data.schema import Media, Sample
    from zoo.pipelines.data.shards import write_dataset
    from zoo.processor import MultimodalProcessor
    from zoo.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("harness")
    text = {split: [Sample(f"{split}-t{i}", "text", split, f"What kind of thing is: {d}?", a)
                    for i, (d, a) in enumerate(CATEGORIES)] for split in ("train", "test")}
    vqa = {split: [Sample(f"{split}-v{i}", "vqa", split, "What color is the square?", a, (Media("image", png(c)),))
                   for i, (a, c) in enumerate(COLORS)] for split in ("train", "test")}
    asr = {split: [Sample(f"{split}-a{i}", "asr", split, "Transcribe the audio.", a, (Media("audio", tone(f)),))
                   for i, (a, f) in enumerate(TONES)] for split in ("train", "test")}
    data = root / "data"
    for family, splits in (("text", text), ("vqa", vqa), ("asr", asr)):
        write_dataset(splits, data / family, task_family=family, source="tests/test_harness.py")
    (data / "corpus").mkdir()
    (data / "corpus" / "val.txt").write_text("\n".join(PARAGRAPHS) + "\n")

    lines = [s.instruction + " " + s.answer for s in text["train"] + vqa["train"] + asr["train"]] + PARAGRAPHS
    tokenizer = train_tokenizer(lines * 4, vocab_size=400)
    torch.manual_seed(0)
    cfg = micro_config()
    model = build_model(cfg)
    processor = MultimodalProcessor.from_model(model, tokenizer)
    # A few steps on half the items: some answers right, some wrong (accuracy strictly between 0 and 1).
    train = text["train"][:4] + vqa["train"][:2] + asr["train"][:2]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(STEPS):
        loss = model(**collate(train, processor)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    checkpoint = save(model, cfg, tokenizer, root / "model")

    text_cfg = micro_config(encoders=(), moe=False)
    text_only = save(build_model(text_cfg), text_cfg, tokenizer, root / "text-only")
    image_cfg = micro_config(encoders=("image",), moe=False)
    image_only = save(build_model(image_cfg), image_cfg, tokenizer, root / "image-only")
    return {"root": root, "data": data, "checkpoint": checkpoint, "text_only": text_only, "image_only": image_only,
            "tasks": root / "tasks"}


def zoo_eval(setup, family: str) -> dict:
    """What `zoo eval CHECKPOINT --data DATA --family F` reports, with its per-item answers (once per family)."""
    cache = setup.setdefault("zoo_eval", {})
    if family not in cache:
        cache[family] = _zoo_eval(setup, family)
    return cache[family]


def _zoo_eval(setup, family: str) -> dict:
    from zoo.catalog.load import load_directory
    from zoo.pipelines.eval import SCORED, evaluate_checkpoint, generate_answers
    from zoo.pipelines.datasets import load_datasets

    (result,) = evaluate_checkpoint(setup["checkpoint"], [family], data_dir=setup["data"], quiet=True)
    model, processor, _ = load_directory(setup["checkpoint"])
    keep = SCORED.get(family, lambda s: True)
    samples = [s for s in load_datasets(setup["data"], {family}, "test")[family] if keep(s)]
    return {"value": result["value"], "answers": generate_answers(model, processor, samples, quiet=True),
            "prompts": [processor.apply_chat_template([{"role": "user", "content": s.instruction}],
                                                      add_generation_prompt=True) for s in samples]}


def lm_eval_run(model, tasks_dir: Path, tasks: list[str], **kw) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, tasks=tasks, task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                           log_samples=True, **kw)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    # the harnesses read local JSONL through `datasets`; keep its cache out of the home directory
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# -- lm-eval: generation, loglikelihood, perplexity ------------------------------------------------


@needs_lm_eval
def test_lm_eval_text_task_equals_zoo_eval(zoo_setup):
    from zoo.pipelines.harness.lm_eval_model import ZooLM
    from zoo.pipelines.harness.tasks import write_family_tasks

    write_family_tasks(zoo_setup["data"], ["text"], zoo_setup["tasks"])
    ours = zoo_eval(zoo_setup, "text")
    assert 0 < ours["value"] < 1  # a discriminating case: some right, some wrong
    out = lm_eval_run(ZooLM(name=str(zoo_setup["checkpoint"]), batch_size=3), zoo_setup["tasks"], ["zoo_text"],
                      apply_chat_template=True)
    assert out["results"]["zoo_text"]["accuracy,none"] == pytest.approx(ours["value"])
    samples = sorted(out["samples"]["zoo_text"], key=lambda s: s["doc_id"])
    assert [s["arguments"][0][0] for s in samples] == ours["prompts"]  # the same prompt, templated
    assert [s["filtered_resps"][0].strip() for s in samples] == ours["answers"]  # the same answer, item by item


@needs_lm_eval
def test_loglikelihood_equals_a_naive_float64_loop(zoo_setup):
    from lm_eval.api.instance import Instance

    from zoo.catalog.load import load_directory
    from zoo.pipelines.harness.lm_eval_model import ZooLM

    lm = ZooLM(name=str(zoo_setup["checkpoint"]), batch_size=2)
    tok = lm.tokenizer
    pairs = [(lm.apply_chat_template([{"role": "user", "content": f"What kind of thing is: {d}?"}]), a)
             for d, a in CATEGORIES[:4]]
    pairs += [("The river runs", " through the valley"), ("", "A person who flies")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)

    model, _, _ = load_directory(zoo_setup["checkpoint"])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if context:
            # lm-eval's rule: trailing whitespace of the context (the template's "<|assistant|>\n") is scored
            # with the continuation
            moved = context[len(context.rstrip()):]
            context, continuation = context.rstrip(), moved + continuation
            ctx = tok.encode(context)
            cont = tok.encode(context + continuation)[len(ctx):]
        else:  # lm-eval's empty-context rule: condition on the prefix token (bos)
            ctx, cont = [tok.bos_token_id], tok.encode(continuation)
        total, all_greedy = 0.0, True
        for j, token in enumerate(cont):  # one forward per continuation token, no batching, no padding
            with torch.no_grad():
                logits = model.language_model(input_ids=torch.tensor([ctx + cont[:j]])).logits[0, -1]
            logp = torch.log_softmax(logits.double(), dim=-1)
            total += float(logp[token])
            all_greedy &= int(logp.argmax()) == token
        assert logprob == pytest.approx(total, abs=1e-5, rel=1e-6)
        assert greedy == all_greedy


@needs_lm_eval
def test_perplexity_through_the_harness_equals_ours(zoo_setup):
    from lm_eval.api.instance import Instance

    from zoo.catalog.load import load_directory
    from zoo.pipelines.eval import perplexity
    from zoo.pipelines.harness.lm_eval_model import ZooLM
    from zoo.pipelines.harness.tasks import write_family_tasks

    write_family_tasks(zoo_setup["data"], ["corpus"], zoo_setup["tasks"])
    lm = ZooLM(name=str(zoo_setup["checkpoint"]), batch_size=2)
    out = lm_eval_run(lm, zoo_setup["tasks"], ["zoo_corpus"])
    model, processor, _ = load_directory(zoo_setup["checkpoint"])
    tok = processor.tokenizer

    # Our own: each paragraph after <s>, its NLL from the LM's loss (mean over predicted tokens) x count.
    nll, tokens = 0.0, 0
    for text in PARAGRAPHS:
        ids = torch.tensor([[tok.bos_token_id] + tok.encode(text)])
        with torch.no_grad():
            lm_out = model.language_model(input_ids=ids, labels=ids)
        nll += float(lm_out.lm_loss.double()) * (ids.shape[1] - 1)  # the LM loss (an MoE LM's `loss` adds router losses)
        tokens += ids.shape[1] - 1
    words = sum(len(re.split(r"\s+", t)) for t in PARAGRAPHS)
    result = out["results"]["zoo_corpus"]
    assert result["word_perplexity,none"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert result["byte_perplexity,none"] == pytest.approx(math.exp(nll / sum(len(t.encode()) for t in PARAGRAPHS)), rel=1e-5)
    # `zoo eval --perplexity`'s function on the same convention (each line after <s>): the token perplexity.
    harness_ll = sum(lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0) for t in PARAGRAPHS],
                                              disable_tqdm=True))
    assert perplexity(model.language_model, tok, [tok.bos_token + t for t in PARAGRAPHS]) == pytest.approx(
        math.exp(-harness_ll / tokens), rel=1e-5)

    # Rolling windows shorter than a paragraph: every token scored once, each window from its own context.
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    short = ZooLM(model=model, processor=processor, max_length=8, batch_size=3)
    (got,) = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (PARAGRAPHS[0],), 0)], disable_tqdm=True)
    ids = tok.encode(PARAGRAPHS[0])
    expected, scored = 0.0, 0
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, tok.bos_token_id, 8, 1)):
        window = torch.tensor([(ctx + cont)[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model.language_model(input_ids=window).logits[0].double(), dim=-1)
        expected += float(logp[-len(cont):].gather(-1, torch.tensor(cont)[:, None]).sum())
        scored += len(cont)
    assert scored == len(ids) and got == pytest.approx(expected, abs=1e-6)


# -- lmms-eval: images and audio -------------------------------------------------------------------


@needs_lmms_eval
@pytest.mark.parametrize("family", ["vqa", "asr"])
def test_lmms_eval_media_task_equals_zoo_eval(zoo_setup, family):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from zoo.pipelines.harness.lmms_eval_model import ZooLMMS
    from zoo.pipelines.harness.tasks import write_family_tasks

    (folder,) = write_family_tasks(zoo_setup["data"], [family], zoo_setup["tasks"])
    assert "doc_to_visual" in (folder / f"zoo_{family}.yaml").read_text()  # media: an lmms-eval task
    ours = zoo_eval(zoo_setup, family)
    out = simple_evaluate(model=ZooLMMS(name=str(zoo_setup["checkpoint"]), batch_size=2), tasks=[f"zoo_{family}"],
                          task_manager=TaskManager(include_path=str(zoo_setup["tasks"]), include_defaults=False),
                          log_samples=True)
    metric = "exact_match"
    assert out["results"][f"zoo_{family}"][f"{metric},none"] == pytest.approx(ours["value"])
    samples = sorted(out["samples"][f"zoo_{family}"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0].strip() for s in samples] == ours["answers"]


@needs_lmms_eval
def test_lmms_loglikelihood_with_media_scores_the_spliced_continuation(zoo_setup):
    """With an image, the continuation's log-probability is read off the spliced sequence; it equals
    the answer's share of the model's own loss on the answered prompt."""
    from types import SimpleNamespace

    from zoo.catalog.load import load_directory
    from zoo.pipelines.harness.lmms_eval_model import ZooLMMS

    model, processor, _ = load_directory(zoo_setup["checkpoint"])
    lmms = ZooLMMS(model=model, processor=processor)
    image = Image.open(io.BytesIO(png(COLORS[0][1]))).convert("RGB")
    lmms.task_dict = {"t": {"test": [{"img": image}]}}
    req = SimpleNamespace(args=("What color is the square?", "red", lambda doc: [doc["img"]], 0, "t", "test"))
    ((logprob, _),) = lmms.loglikelihood([req])
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\nWhat color is the square?"}],
                                           add_generation_prompt=True)
    batch = processor(prompt + "red", images=[image])
    n_prompt = len(processor.tokenizer(prompt)["input_ids"])
    labels = batch["input_ids"].clone()
    labels[:, :n_prompt] = -100
    with torch.no_grad():
        out = model(**batch, labels=labels)
    n_answer = int((labels != -100).sum())
    assert logprob == pytest.approx(-float(out.lm_loss) * n_answer, rel=1e-5)


# -- interop: the HF export through lm-eval's own `hf` model, no zoo code -------------------------


@needs_lm_eval
@pytest.mark.slow
def test_hf_export_scores_the_same_through_lm_evals_hf_model(zoo_setup, tmp_path):
    from zoo.pipelines.harness.lm_eval_model import ZooLM
    from zoo.pipelines.harness.tasks import write_family_tasks

    write_family_tasks(zoo_setup["data"], ["text", "corpus"], zoo_setup["tasks"])
    export = tmp_path / "export"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    subprocess.run([sys.executable, "-m", "zoo.cli", "export", str(zoo_setup["checkpoint"]), "--format", "hf",
                    "--out", str(export)], check=True, cwd=tmp_path, env=env, capture_output=True, text=True)
    script = f"""
import json, sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
out = simple_evaluate(model="hf", model_args={{"pretrained": {str(export / "language_model")!r}, "dtype": "float32"}},
                      tasks=["zoo_text", "zoo_corpus"], apply_chat_template=True, log_samples=True, batch_size=3, device="cpu",
                      task_manager=TaskManager(include_path={str(zoo_setup["tasks"])!r}, include_defaults=False))
assert not [m for m in sys.modules if m == "zoo" or m.startswith("zoo.")], "the zoo was imported"
answers = [s["filtered_resps"][0] for s in sorted(out["samples"]["zoo_text"], key=lambda s: s["doc_id"])]
print(json.dumps({{"accuracy": out["results"]["zoo_text"]["accuracy,none"], "answers": answers,
                  "word_perplexity": out["results"]["zoo_corpus"]["word_perplexity,none"]}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    hf = json.loads(done.stdout.strip().splitlines()[-1])
    # The same tasks through the zoo's own model, with lm-eval's own (not the zoo's) flags.
    # With the chat template on, the corpus task's documents are scored the same (no template for rolling).
    ours = lm_eval_run(ZooLM(name=str(zoo_setup["checkpoint"]), batch_size=3), zoo_setup["tasks"],
                       ["zoo_text", "zoo_corpus"], apply_chat_template=True)
    answers = [s["filtered_resps"][0] for s in sorted(ours["samples"]["zoo_text"], key=lambda s: s["doc_id"])]
    assert hf["answers"] == answers
    assert hf["accuracy"] == ours["results"]["zoo_text"]["accuracy,none"] == zoo_eval(zoo_setup, "text")["value"]
    assert hf["word_perplexity"] == pytest.approx(ours["results"]["zoo_corpus"]["word_perplexity,none"], rel=1e-4)


@needs_lm_eval
@pytest.mark.slow
def test_lm_eval_command_line_finds_zoo_through_the_wrapper(zoo_setup, tmp_path):
    from zoo.pipelines.harness.tasks import write_family_tasks

    write_family_tasks(zoo_setup["data"], ["text"], zoo_setup["tasks"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "c")}
    done = subprocess.run([sys.executable, "-m", "zoo.pipelines.harness", "lm-eval", "--model", "zoo", "--model_args",
                           f"name={zoo_setup['checkpoint']}", "--batch_size", "4", "--tasks", "zoo_text", "--include_path",
                           str(zoo_setup["tasks"]), "--apply_chat_template", "--output_path", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    value = json.loads(results.read_text())["results"]["zoo_text"]["accuracy,none"]
    assert value == pytest.approx(zoo_eval(zoo_setup, "text")["value"])


@needs_lmms_eval
@pytest.mark.slow
def test_lmms_eval_command_line_finds_zoo_by_its_entry_point(zoo_setup, tmp_path):
    """`lmms-eval eval --model zoo ...` in a process that imports nothing of ours first."""
    from zoo.pipelines.harness.tasks import write_family_tasks

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "c")}
    probe = ("from importlib.metadata import entry_points; "
             "print(any(ep.name == 'zoo' for ep in entry_points(group='lmms_eval.models')))")
    if subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True).stdout.strip() != "True":
        pytest.skip("moe-zoo is installed without its lmms_eval.models entry point: reinstall it (pip install -e .)")
    write_family_tasks(zoo_setup["data"], ["vqa"], zoo_setup["tasks"])
    script = ("import sys; from lmms_eval.cli.dispatch import main; sys.argv = ['lmms-eval', *sys.argv[1:]]; "
              "sys.exit(main())")
    done = subprocess.run([sys.executable, "-c", script, "eval", "--model", "zoo", "--model_args",
                           f"name={zoo_setup['checkpoint']}", "--batch_size", "2", "--tasks", "zoo_vqa", "--include_path",
                           str(zoo_setup["tasks"]), "--output_path", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    (results,) = (tmp_path / "out").rglob("*results.json")
    value = json.loads(results.read_text())["results"]["zoo_vqa"]["exact_match,none"]
    assert value == pytest.approx(zoo_eval(zoo_setup, "vqa")["value"])


# -- install, registration, task files -------------------------------------------------------------


def test_the_zoo_imports_without_the_harnesses():
    code = ("import sys; import zoo, zoo.pipelines.harness, zoo.pipelines.harness.tasks, zoo.pipelines.harness.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('lm_eval', 'lmms_eval')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT.parent, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@needs_lm_eval
def test_zoo_is_an_lm_eval_model():
    import zoo.pipelines.harness.lm_eval_model as module
    from lm_eval.api.registry import get_model

    assert get_model("zoo") is module.ZooLM


@needs_lmms_eval
def test_the_lmms_eval_entry_point_names_the_adapter():
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from zoo.pipelines.harness.lmms_entry import manifest

    registry = ModelRegistryV2()
    registry.register_manifest(manifest())
    assert registry.get_model_class("zoo").__name__ == "ZooLMMS"


def test_pyproject_declares_the_eval_extra_and_entry_point():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(r.startswith("lm-eval") for r in project["optional-dependencies"]["eval"])
    assert project["entry-points"]["lmms_eval.models"]["zoo"] == "zoo.pipelines.harness.lmms_entry:manifest"
    pins = (ROOT / "constraints.txt").read_text()
    assert "lm-eval==0.4.13" in pins and "lmms-eval==0.7.3" in pins


def test_task_scorers_equal_the_zoos(tmp_path):
    from zoo.pipelines.data.schema import Sample
    from zoo.pipelines.eval import SCORERS
    from zoo.pipelines.harness.tasks import write_task

    folder = write_task([Sample("a", "caption", "test", "q", "a")], tmp_path, name="t")
    spec = importlib.util.spec_from_file_location("task_utils", folder / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    cases = [("The Ankle-Boot!!", "the ankle boot"), ("red apple pie", "red apple"), ("", ""), ("x", ""),
             ("a cat sat", "the cat sat down"), ("  Yes. ", "yes"), ("naïve café", "naive cafe"), ("1,000", "1000")]
    for name, fn in SCORERS.items():
        for p, r in cases:
            assert utils.SCORERS[name](p, r) == pytest.approx(fn(p, r)), (name, p, r)


def test_task_writer_refuses_media_for_lm_eval_and_mixed_families(tmp_path):
    from zoo.pipelines.data.schema import Media, Sample
    from zoo.pipelines.harness.tasks import write_task

    image = Sample("v", "vqa", "test", "q", "red", (Media("image", png((1, 2, 3))),))
    with pytest.raises(ValueError, match="lm-eval tasks here are text only: write an lmms-eval task"):
        write_task([image], tmp_path, name="t", harness="lm-eval")
    with pytest.raises(ValueError, match="several task families"):
        write_task([image, Sample("t", "text", "test", "q", "a")], tmp_path, name="t", harness="lmms-eval")
    folder = write_task([image], tmp_path, name="t", harness="lmms-eval")
    row = json.loads((folder / "test.jsonl").read_text())
    assert row["media"] == ["media/v-0.png"] and (folder / row["media"][0]).read_bytes() == image.media[0].data


# -- bad input: one line naming the cause ----------------------------------------------------------


@needs_lm_eval
def test_unknown_model_is_named():
    from zoo.pipelines.harness.lm_eval_model import ZooLM

    with pytest.raises(HarnessError, match=r"unknown zoo model 'no-such-model' in --model_args name=.*registered: \["):
        ZooLM(name="no-such-model")


@needs_lm_eval
@pytest.mark.slow
def test_unknown_model_through_the_command_line_is_one_line(zoo_setup, capsys):
    from zoo.pipelines.harness.cli import main
    from zoo.pipelines.harness.tasks import write_family_tasks

    write_family_tasks(zoo_setup["data"], ["text"], zoo_setup["tasks"])
    status = main(["lm-eval", "--model", "zoo", "--model_args", "name=no-such-model", "--tasks", "zoo_text",
                   "--include_path", str(zoo_setup["tasks"])])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err  # lm-eval's own log lines come first, then our one line
    assert err.strip().splitlines()[-1].startswith("zoo harness: error: zoo: unknown zoo model 'no-such-model'")


@needs_lmms_eval
@pytest.mark.parametrize("model_key, family, cause", [
    ("text_only", "vqa", r"task 'zoo_vqa' gives images but zoo model .* has no image encoder \(its media: none, text only\)"),
    ("image_only", "asr", r"task 'zoo_asr' gives audio but zoo model .* has no audio tower \(its media: \['image'\]\)"),
])
def test_media_the_model_has_no_tower_for(zoo_setup, model_key, family, cause):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from zoo.pipelines.harness.lmms_eval_model import ZooLMMS
    from zoo.pipelines.harness.tasks import write_family_tasks

    write_family_tasks(zoo_setup["data"], [family], zoo_setup["tasks"])
    with pytest.raises(HarnessError, match=cause):
        simple_evaluate(model=ZooLMMS(name=str(zoo_setup[model_key])), tasks=[f"zoo_{family}"],
                        task_manager=TaskManager(include_path=str(zoo_setup["tasks"]), include_defaults=False))


@needs_lm_eval
def test_lm_eval_refuses_images_naming_the_missing_tower(zoo_setup):
    from lm_eval.api.instance import Instance

    from zoo.pipelines.harness.lm_eval_model import ZooLM

    image = Image.new("RGB", (8, 8))
    request = Instance("generate_until", {}, ("What color?", {"max_gen_toks": 2}, {"visual": [image]}), 0, metadata=("img", 0, 1))
    with pytest.raises(HarnessError, match=r"task 'img' gives images but zoo model .* has no image encoder"):
        ZooLM(name=str(zoo_setup["text_only"])).generate_until([request])
    with pytest.raises(HarnessError, match="scores text only: run it through lmms-eval"):
        ZooLM(name=str(zoo_setup["checkpoint"])).generate_until([request])
