"""A recipe that starts from a pretrained LM runs end to end: no BPE trained, the LM's tokenizer and
template with the placeholders added, checkpoints that load with their processor and keep the
pretrained rows (a tiny Llama saved with a ChatML tokenizer stands in for a real LM)."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from test_pretrained import save_pretrained_lm, tiny_tokenizer
from zoo.catalog.load import load_directory
from zoo.config import config_from_dict
from zoo.pipelines.runner import run_recipe
from zoo.pipelines.stages import RecipeConfig
from zoo.resources import config_path


@pytest.mark.slow
def test_recipe_from_a_pretrained_lm(tmp_path):
    lm_dir = tmp_path / "lm"
    tok = tiny_tokenizer()
    ref = save_pretrained_lm(lm_dir, "llama", tok)
    model = yaml.safe_load(config_path("models", "micro-zoo", ".yaml").read_text())
    model["lm"] = {"weights": str(lm_dir)}
    recipe = config_from_dict(RecipeConfig, {
        "name": "pretrained-micro", "model": model, "data": {"max_per_split": 8}, "eval": {"limit": 4, "max_new_tokens": 4},
        "stages": [
            {"name": "align", "kind": "align", "data": {"caption": 1.0, "asr": 1.0}, "batch_size": 4,
             "train": {"steps": 2, "optim": {"lr": 3.0e-3}}},
            {"name": "moe-tune", "kind": "moe-tune", "data": {"vqa": 1.0, "text": 1.0}, "batch_size": 4,
             "options": {"moe": {"num_experts": 4, "router_options": {"top_k": 2}, "layers": "every_other"}},
             "train": {"steps": 2, "optim": {"lr": 3.0e-3}}},
        ]})
    before = copy.deepcopy(recipe.model)
    outputs = run_recipe(recipe, tmp_path / "run")
    assert recipe.model == before, "the recipe's own config is left as written"

    saved = (tmp_path / "run" / "tokenizer")
    assert (saved / "tokenizer.json").is_file() and "<|im_start|>" in (saved / "tokenizer.json").read_text()
    model, processor, cfg = load_directory(outputs["moe-tune"])
    assert len(processor.tokenizer) == len(tok) + 2 and processor.tokenizer.chat_template
    assert (cfg.image_token_id, cfg.audio_token_id) == (len(tok), len(tok) + 1)
    assert cfg.lm.config["vocab_size"] == len(tok) + 2 and cfg.lm.weights == str(lm_dir)
    emb = model.language_model.lm.get_input_embeddings().weight
    torch.testing.assert_close(emb[: len(tok)], ref.get_input_embeddings().weight, rtol=0, atol=0,
                               msg="align and moe-tune do not train the embeddings: the pretrained rows are kept")
    prompt = processor.apply_chat_template([{"role": "user", "content": "what is this?"}], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    out = model.generate(**processor(prompt), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 3) or out.shape[1] <= 3
