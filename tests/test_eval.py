"""Eval metrics against hand-computed values, and the scoring path with oracle models."""

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from zoo.models import ModelConfig
from zoo.models import build_model
from zoo.pipelines.data.schema import Media, Sample
from zoo.pipelines.eval import evaluate, exact_match, majority_baseline, normalize, token_f1
from zoo.processor import MultimodalProcessor
from zoo.tokenizer import train_tokenizer

ANSWERS = ["ankle boot", "yes", "no", "sneaker"]


def test_metrics_against_hand_computed_values():
    assert normalize("  The Ankle-Boot!! ") == "the ankle boot"
    assert exact_match("Ankle boot.", "ankle boot") == 1.0 and exact_match("boot", "ankle boot") == 0.0
    # pred {red, apple, pie}, ref {red, apple}: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("red apple pie", "red apple") == pytest.approx(0.8)
    assert token_f1("green", "red apple") == 0.0 and token_f1("", "") == 1.0
    train = [Sample(f"k{i}", "vqa", "train", "q", a) for i, a in enumerate(["yes", "yes", "no"])]
    test = [Sample(f"t{i}", "vqa", "test", "q", a) for i, a in enumerate(["yes", "no", "no", "yes"])]
    assert majority_baseline(train, test, "exact_match") == 0.5


class Scripted(nn.Module):
    """Stands in for a model: `generate` returns scripted token ids, the rest is real."""

    def __init__(self, model, replies):
        super().__init__()
        self.inner, self.replies = model, replies

    def generate(self, input_ids, attention_mask=None, images=None, **kw):
        assert images is not None and images.shape[0] == input_ids.shape[0]  # media reached the model
        batch = [self.replies.pop(0) for _ in range(input_ids.shape[0])]
        width = max(len(r) for r in batch)
        return torch.tensor([r + [kw["pad_token_id"]] * (width - len(r)) for r in batch])


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig.load(str(Path(__file__).resolve().parents[1] / "configs" / "models" / "micro-zoo.yaml"))
    tok = train_tokenizer(ANSWERS * 20 + ["What is shown in this image?"], vocab_size=300)
    model = build_model(cfg)
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (120, 30, 200)).save(buf, format="PNG")
    samples = [Sample(f"s{i}", "vqa", "test", "What is shown in this image?", a, (Media("image", buf.getvalue()),))
               for i, a in enumerate(ANSWERS)]
    return model, MultimodalProcessor.from_model(model, tok), tok, samples


def test_an_oracle_scores_one_and_a_constant_scores_its_share(setup):
    model, processor, tok, samples = setup
    oracle = [tok(s.answer)["input_ids"] + [tok.eos_token_id] for s in samples]
    r = evaluate(Scripted(model, oracle), processor, samples, family="vqa", batch_size=3)
    assert r["value"] == 1.0 and r["n"] == 4 and r["metric"] == "exact_match"
    constant = [tok("yes")["input_ids"] for _ in samples]
    r = evaluate(Scripted(model, constant), processor, samples, family="vqa", batch_size=2)
    assert r["value"] == 0.25
    assert r["examples"][0][1] == "yes"


def test_real_model_generates_and_unknown_family_is_named(setup):
    model, processor, tok, samples = setup
    r = evaluate(model, processor, samples[:2], family="caption", max_new_tokens=3)
    assert 0.0 <= r["value"] <= 1.0 and len(r["examples"]) == 2
    with pytest.raises(ValueError, match="no metric for task family 'poetry'"):
        evaluate(model, processor, samples, family="poetry")


def test_bootstrap_interval_against_a_naive_loop():
    import numpy as np

    from zoo.pipelines.eval import bootstrap_interval

    scores = [1.0] * 30 + [0.0] * 20
    low, high = bootstrap_interval(scores, 500, seed=3)
    rng = np.random.default_rng(3)
    draws = rng.integers(0, 50, size=(500, 50))
    means = sorted(sum(scores[j] for j in row) / 50 for row in draws)  # the same resamples, summed by hand
    assert low == pytest.approx(float(np.quantile(means, 0.025))) and high == pytest.approx(float(np.quantile(means, 0.975)))
    assert low < 0.6 < high and 0.05 < high - low < 0.4  # a binomial mean's spread at n = 50
    assert bootstrap_interval([0.5] * 10, 100) == (0.5, 0.5)


def test_perplexity_is_the_exponent_of_the_mean_token_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    from zoo.pipelines.eval import perplexity

    tok = train_tokenizer(["the cat sat on the mat", "a dog ran in the park"] * 50, vocab_size=300)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4)).eval()
    texts = ["the cat sat on the mat", "a dog ran", "the park"]
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:  # one line at a time, no padding: transformers' own mean loss, weighted by tokens
            ids = tok(t, return_tensors="pt")["input_ids"]
            total += lm(ids, labels=ids).loss.double().item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert perplexity(lm, tok, texts, batch_size=2) == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_eval_spec_checks_metrics_and_counts():
    from zoo.pipelines.stages.recipe import EvalSpec

    assert EvalSpec(metrics={"asr": "wer"}, bootstrap=100).metrics == {"asr": "wer"}
    with pytest.raises(ValueError, match="unknown metric 'werr'"):
        EvalSpec(metrics={"asr": "werr"})
    with pytest.raises(ValueError, match="unknown task family 'sound'"):
        EvalSpec(metrics={"sound": "wer"})
    with pytest.raises(ValueError, match="bootstrap and perplexity must be >= 0"):
        EvalSpec(bootstrap=-1)


def test_cards_carry_a_bootstrap_interval(tmp_path):
    from zoo.catalog.cards import CatalogError, parse_card

    def card(boot):
        path = tmp_path / "m.md"
        path.write_text("---\nname: m\nversion: 1.0.0\ntask_family: vqa\ndescription: d\nlicense: mit\nconfig: c.yaml\n"
                        f"uri: /x\nmetrics:\n  vqa/exact_match: {{value: 0.5, command: zoo list, bootstrap: {boot}}}\n---\n# m\n")
        return parse_card(path)

    assert card("[0.4, 0.6]").metrics[0].bootstrap == (0.4, 0.6)
    with pytest.raises(CatalogError, match="bootstrap must be \\[low, high\\] around the value 0.5"):
        card("[0.6, 0.7]")
