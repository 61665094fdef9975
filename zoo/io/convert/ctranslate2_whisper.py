"""CTranslate2 Whisper (`model.bin`) -> a transformers `WhisperForConditionalGeneration` directory.

The CTranslate2 binary format is read here by hand with `struct` and torch: ctranslate2 is a C++
runtime with its own wheels and is not a run-time dependency of the zoo (only the tests use it, as
the reference), and the format is small. As CTranslate2's `ModelSpec._serialize` writes it and its
`models::Model::load` reads it (all little endian; `str` = u16 length counting a final NUL, the
UTF-8 bytes, the NUL):

    u32 binary_version                                  1 .. 6
    str spec_name, u32 spec_revision                    version >= 2
    u32 num_variables, then per variable:
        str name, u8 rank, u32 dims[rank],
        u8 dtype id, u32 num_bytes                      version >= 4 (float32, int8, int16, int32,
                                                        float16, bfloat16)
        u8 item size, u32 num_items                     version < 4 (4 float32, 2 int16, 1 int8)
        the data, C order
    u32 num_aliases, then per alias: str alias, str target       version >= 3

Quantized weights (int8, int16) come with a `<name>_scale` variable: per output row for int8
(`scale = 127 / amax(|row|)`), one scalar for int16; the float weight is `q / scale`. Scalar
attributes (`num_heads`, `pre_norm`, ...) are 0-d variables, booleans int8. The generation settings
(`config.json`) and the vocabulary (`vocabulary.json` or `.txt`) are files beside `model.bin`.

Name mapping (CTranslate2 -> transformers Whisper), per encoder / decoder layer i:
    self_attention/linear_0 [3d, d]   q_proj, k_proj, v_proj (the k bias is dropped: q . b_k is the
                                      same for every key, so softmax removes it; transformers has none)
    self_attention/linear_1           self_attn.out_proj
    attention/linear_0, 1 [2d, d], 2  encoder_attn.q_proj; k_proj, v_proj (k bias dropped); out_proj
    */layer_norm gamma, beta          the layer norm before that block: weight, bias
    ffn/linear_0, ffn/linear_1        fc1, fc2
    position_encodings/encodings      embed_positions.weight
    decoder/embeddings/weight         decoder.embed_tokens.weight; `decoder/projection/weight` (an
                                      alias of it when tied) is proj_out.weight
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: CTranslate2's DataType enum (include/ctranslate2/types.h), in id order.
CT2_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)
#: Binary versions before 4 stored an item size instead of a dtype id.
_ITEM_SIZE_DTYPES = {4: torch.float32, 2: torch.int16, 1: torch.int8}
SUPPORTED_VERSIONS = range(1, 7)

#: CTranslate2's Activation enum value for exact (erf) GELU, Whisper's activation.
_GELU = 3
#: Spec attributes (0-d variables) a Whisper model.bin holds, with the value this converter needs
#: (None: any value; read elsewhere or irrelevant to transformers).
_ATTRIBUTES = {
    "encoder/num_heads": None,
    "decoder/num_heads": None,
    "decoder/activation": _GELU,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/alibi": 0,
    "decoder/alibi_use_positive_positions": None,  # written by newer converters; unused without alibi
    "decoder/scale_alibi": None,
    "decoder/start_from_zero_embedding": 0,
    "decoder/alignment_heads": None,
    "decoder/alignment_layer": None,
}


@dataclass
class CT2Model:
    """The contents of a CTranslate2 `model.bin`.

    Attributes:
        path: the file read.
        version: its binary version.
        spec: the model spec name (e.g. "WhisperSpec"); None before binary version 2.
        revision: the spec revision.
        variables: name -> tensor as stored (dtype and shape of the file; 0-d for scalars).
        aliases: alias name -> the variable name it stands for.
    """

    path: Path
    version: int
    spec: str | None
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)

    def resolve(self, name: str) -> str:
        """The variable an alias (or a variable name) stands for."""
        return self.aliases.get(name, name)

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) in self.variables

    def scalar(self, name: str) -> int | float:
        """A 0-d attribute as a Python number (raises naming the variable when absent or not 0-d)."""
        value = self.raw(name)
        if value.dim() != 0:
            raise ValueError(f"{self.path}: {name} has shape {tuple(value.shape)}, expected a scalar attribute")
        return value.item()

    def raw(self, name: str) -> torch.Tensor:
        """A variable as stored, through aliases."""
        target = self.resolve(name)
        if target not in self.variables:
            raise ValueError(f"{self.path}: no variable {name!r} in this {self.spec or 'CTranslate2'} model.bin")
        return self.variables[target]

    def as_float(self, name: str) -> torch.Tensor:
        """A weight in float32, dequantized when stored as int8/int16 with a `<name>_scale`.

        Returns:
            the variable's shape, float32: `q / scale` (scale `[rows]` for int8, a scalar for int16).
        """
        value = self.raw(name)
        if value.is_floating_point():
            return value.float()
        scale_name = self.resolve(name) + "_scale"
        if scale_name not in self.variables:
            raise ValueError(f"{self.path}: {name} is {value.dtype} without a {scale_name!r}: cannot dequantize it")
        scale = self.variables[scale_name].float()
        if scale.dim() == 1:  # int8: one scale per output row (conv weights: per output channel)
            scale = scale.reshape(-1, *([1] * (value.dim() - 1)))
        return value.float() / scale


class _Cursor:
    """Bounds-checked little-endian reads over the bytes of one file."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(
                f"{self.path}: truncated CTranslate2 model.bin: {what} needs {n} bytes at offset {self.pos}, "
                f"the file has {len(self.data) - self.pos} left"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", f"the length of {what}")
        raw = self.take(n, what)
        if n == 0 or raw[-1] != 0:
            raise ValueError(f"{self.path}: corrupt CTranslate2 model.bin: {what} at offset {self.pos - n} is not NUL-terminated")
        return raw[:-1].decode("utf-8")


def read_ct2_model(path: str | Path) -> CT2Model:
    """Read a CTranslate2 `model.bin` (binary versions 1-6) without ctranslate2.

    Args:
        path: the `model.bin` file.

    Returns:
        a `CT2Model` holding every variable as a CPU tensor of its stored dtype and shape.

    Raises:
        ValueError: a truncated or corrupt file, or an unsupported binary version (each naming it).
    """
    path = Path(path)
    cur = _Cursor(path.read_bytes(), path)
    version = cur.unpack("I", "the binary version")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"{path}: unsupported CTranslate2 binary version {version} (this reader handles "
            f"{SUPPORTED_VERSIONS.start}-{SUPPORTED_VERSIONS.stop - 1}); not a CTranslate2 model.bin, or a newer one"
        )
    spec, revision = None, 1
    if version >= 2:
        spec = cur.string("the spec name")
        revision = cur.unpack("I", "the spec revision")
    variables: dict[str, torch.Tensor] = {}
    for i in range(cur.unpack("I", "the variable count")):
        name = cur.string(f"the name of variable {i}")
        rank = cur.unpack("B", f"the rank of {name}")
        shape = [cur.unpack("I", f"the shape of {name}") for _ in range(rank)]
        if version >= 4:
            type_id = cur.unpack("B", f"the dtype of {name}")
            if type_id >= len(CT2_DTYPES):
                raise ValueError(f"{path}: {name} has unknown CTranslate2 dtype id {type_id} (known: 0-{len(CT2_DTYPES) - 1})")
            dtype = CT2_DTYPES[type_id]
            num_bytes = cur.unpack("I", f"the byte count of {name}")
        else:
            item_size = cur.unpack("B", f"the item size of {name}")
            if item_size not in _ITEM_SIZE_DTYPES:
                raise ValueError(f"{path}: {name} has item size {item_size}, not one of {sorted(_ITEM_SIZE_DTYPES)}")
            dtype = _ITEM_SIZE_DTYPES[item_size]
            num_bytes = cur.unpack("I", f"the item count of {name}") * item_size
        expected = math.prod(shape) * dtype.itemsize
        if num_bytes != expected:
            raise ValueError(f"{path}: {name} has {num_bytes} bytes, but shape {shape} of {dtype} needs {expected}")
        data = cur.take(num_bytes, f"the data of {name}")
        tensor = torch.frombuffer(bytearray(data), dtype=dtype) if num_bytes else torch.empty(0, dtype=dtype)
        variables[name] = tensor.reshape(shape)
    aliases: dict[str, str] = {}
    if version >= 3:
        for i in range(cur.unpack("I", "the alias count")):
            alias = cur.string(f"alias {i}")
            aliases[alias] = cur.string(f"the target of alias {alias}")
    for alias, target in aliases.items():
        if target not in variables:
            raise ValueError(f"{path}: alias {alias!r} points at {target!r}, which is not a variable")
    return CT2Model(path, version, spec, revision, variables, aliases)


def read_vocabulary(model_dir: Path, vocab_size: int) -> dict[str, int]:
    """token -> id for the model beside `model_dir`'s `model.bin`.

    From CTranslate2's `vocabulary.json` (a list) or `vocabulary.txt` (one token a line), which must
    hold `vocab_size` tokens; else from a tokenizers `tokenizer.json` (its BPE vocabulary and added
    tokens; Whisper's timestamp tokens are not in it).
    """
    if (model_dir / "vocabulary.json").is_file():
        tokens = json.loads((model_dir / "vocabulary.json").read_text(encoding="utf-8"))
    elif (model_dir / "vocabulary.txt").is_file():
        tokens = (model_dir / "vocabulary.txt").read_text(encoding="utf-8").removesuffix("\n").split("\n")
    elif (model_dir / "tokenizer.json").is_file():
        tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        return {**tokenizer["model"]["vocab"], **{t["content"]: t["id"] for t in tokenizer["added_tokens"]}}
    else:
        raise FileNotFoundError(
            f"no vocabulary.json, vocabulary.txt or tokenizer.json in {model_dir}: Whisper's special token ids "
            "(<|startoftranscript|>, <|endoftext|>, <|notimestamps|>) are read from it"
        )
    if len(tokens) != vocab_size:
        raise ValueError(f"{model_dir}: the vocabulary has {len(tokens)} tokens, the embeddings {vocab_size} rows")
    return {token: i for i, token in enumerate(tokens)}


class _Mapper:
    """Builds the transformers state dict from a `CT2Model`, recording which variables it used."""

    def __init__(self, ct2: CT2Model) -> None:
        self.ct2, self.used, self.sd = ct2, set(), {}

    def get(self, name: str) -> torch.Tensor:
        target = self.ct2.resolve(name)
        self.used.update({name, target, target + "_scale"})
        return self.ct2.as_float(name)

    def linear(self, src: str, dst: str, *, bias: bool = True) -> None:
        self.sd[f"{dst}.weight"] = self.get(f"{src}/weight")
        if bias:
            self.sd[f"{dst}.bias"] = self.get(f"{src}/bias")

    def norm(self, src: str, dst: str) -> None:
        self.sd[f"{dst}.weight"] = self.get(f"{src}/gamma")
        self.sd[f"{dst}.bias"] = self.get(f"{src}/beta")

    def fused(self, src: str, dst: str, names: tuple[str, ...]) -> None:
        """A fused projection split row-wise into `names` (k gets no bias: see the module docstring)."""
        weights = self.get(f"{src}/weight").chunk(len(names))
        biases = self.get(f"{src}/bias").chunk(len(names))
        for name, w, b in zip(names, weights, biases):
            self.sd[f"{dst}.{name}.weight"] = w.clone()
            if name != "k_proj":
                self.sd[f"{dst}.{name}.bias"] = b.clone()

    def layer(self, src: str, dst: str, *, cross: bool) -> None:
        self.norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        self.fused(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj"))
        self.linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        if cross:
            self.norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
            self.linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
            self.fused(f"{src}/attention/linear_1", f"{dst}.encoder_attn", ("k_proj", "v_proj"))
            self.linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
        self.norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
        self.linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        self.linear(f"{src}/ffn/linear_1", f"{dst}.fc2")


def _num_layers(ct2: CT2Model, prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in ct2:
        n += 1
    if n == 0:
        raise ValueError(f"{ct2.path}: no {prefix}/layer_0 in this model.bin: not a Whisper model")
    return n


def ct2_whisper_state_dict(ct2: CT2Model) -> tuple[dict[str, torch.Tensor], dict]:
    """The transformers Whisper state dict (float32) and `WhisperConfig` fields a CT2 Whisper holds.

    Args:
        ct2: a `WhisperSpec` model from `read_ct2_model`.

    Returns:
        `(state_dict, config)`: keys of `WhisperForConditionalGeneration` (`model.encoder.*`,
        `model.decoder.*`, `proj_out.weight`); config with d_model, layers, heads, FFN widths,
        positions, mel bins, vocab size and `tie_word_embeddings`, all from shapes and the spec's
        `num_heads` attributes.

    Raises:
        ValueError: not a Whisper spec, an attribute Whisper does not have (e.g. another activation),
            or variables this mapping does not know (named).
    """
    if ct2.spec is not None and ct2.spec != "WhisperSpec":
        raise ValueError(f"{ct2.path}: holds a {ct2.spec}, not a WhisperSpec")
    for name, wanted in _ATTRIBUTES.items():
        if wanted is not None and name in ct2 and ct2.scalar(name) != wanted:
            raise ValueError(f"{ct2.path}: {name} = {ct2.scalar(name)}, transformers Whisper needs {wanted}")
    for side in ("encoder", "decoder"):
        if f"{side}/num_heads" not in ct2:
            raise ValueError(f"{ct2.path}: no {side}/num_heads attribute: the head count cannot be derived from shapes")
    m = _Mapper(ct2)
    m.used.update(_ATTRIBUTES)
    n_enc, n_dec = _num_layers(ct2, "encoder"), _num_layers(ct2, "decoder")
    for side in ("encoder", "decoder"):
        m.sd[f"model.{side}.embed_positions.weight"] = m.get(f"{side}/position_encodings/encodings")
        m.norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
    m.linear("encoder/conv1", "model.encoder.conv1")
    m.linear("encoder/conv2", "model.encoder.conv2")
    for i in range(n_enc):
        m.layer(f"encoder/layer_{i}", f"model.encoder.layers.{i}", cross=False)
    for i in range(n_dec):
        m.layer(f"decoder/layer_{i}", f"model.decoder.layers.{i}", cross=True)
    m.sd["model.decoder.embed_tokens.weight"] = m.get("decoder/embeddings/weight")
    tied = ct2.resolve("decoder/projection/weight") == ct2.resolve("decoder/embeddings/weight")
    m.sd["proj_out.weight"] = m.sd["model.decoder.embed_tokens.weight"] if tied else m.get("decoder/projection/weight")
    if "decoder/projection/bias" in ct2 and ct2.as_float("decoder/projection/bias").abs().max() > 0:
        raise ValueError(f"{ct2.path}: decoder/projection/bias is nonzero; transformers Whisper's proj_out has no bias")
    m.used.add("decoder/projection/bias")
    unknown = sorted(set(ct2.variables) - m.used)
    if unknown:
        raise ValueError(f"{ct2.path}: variables this Whisper mapping does not know: {unknown}")
    conv1 = m.sd["model.encoder.conv1.weight"]  # [d_model, n_mels, 3]
    config = dict(
        vocab_size=m.sd["model.decoder.embed_tokens.weight"].shape[0],
        num_mel_bins=conv1.shape[1],
        d_model=conv1.shape[0],
        encoder_layers=n_enc,
        decoder_layers=n_dec,
        encoder_attention_heads=int(ct2.scalar("encoder/num_heads")),
        decoder_attention_heads=int(ct2.scalar("decoder/num_heads")),
        encoder_ffn_dim=m.sd["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=m.sd["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=m.sd["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=m.sd["model.decoder.embed_positions.weight"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=tied,
    )
    return m.sd, config


def _token_ids(vocab: dict[str, int], names: dict[str, str], where: Path) -> dict[str, int]:
    """`{key: id of token}` for `names = {key: token}`, naming the tokens the vocabulary lacks."""
    missing = [tok for tok in names.values() if tok not in vocab]
    if missing:
        raise ValueError(f"{where}: the vocabulary lacks Whisper's special tokens {missing}")
    return {key: vocab[tok] for key, tok in names.items()}


def _generation_config(fields: dict, ids: dict[str, int], vocab: dict[str, int], ct2_config: dict, where: Path):
    """Whisper's `GenerationConfig`: prompt ids, suppressed tokens, languages / tasks when multilingual."""
    from transformers import GenerationConfig

    multilingual = fields["vocab_size"] >= 51865  # openai/whisper's rule: the .en models have 51864 tokens
    extra = {}
    if multilingual:
        names = {i: token for token, i in vocab.items()}
        extra["lang_to_id"] = {names[i]: i for i in ct2_config.get("lang_ids") or []}
        extra["task_to_id"] = _token_ids(vocab, {"transcribe": "<|transcribe|>", "translate": "<|translate|>"}, where)
    if ct2_config.get("alignment_heads"):
        extra["alignment_heads"] = [list(h) for h in ct2_config["alignment_heads"]]
    return GenerationConfig(
        decoder_start_token_id=ids["sot"], bos_token_id=ids["sot"], eos_token_id=ids["eot"], pad_token_id=ids["eot"],
        max_length=fields["max_target_positions"], suppress_tokens=fields["suppress_tokens"],
        begin_suppress_tokens=fields["begin_suppress_tokens"], no_timestamps_token_id=ids["no_ts"],
        is_multilingual=multilingual, return_timestamps=False, **extra,
    )


def _save_processor(fields: dict, ids: dict[str, int], tokenizer_json: Path, out_dir: Path) -> None:
    """The `WhisperFeatureExtractor` (+ the `WhisperTokenizer` of `tokenizer_json` when it exists) into `out_dir`.

    The feature extractor pads clips to whole seconds, so it is written only when the encoder's window
    (`2 * max_source_positions` frames of 10 ms) is a whole number of seconds (30 for every Whisper).
    """
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    seconds, rest = divmod(fields["max_source_positions"] * 2 * 160, 16000)
    if rest or not seconds:
        return
    feature_extractor = WhisperFeatureExtractor(
        feature_size=fields["num_mel_bins"], sampling_rate=16000, hop_length=160, n_fft=400, chunk_length=seconds
    )
    if not tokenizer_json.is_file():
        feature_extractor.save_pretrained(out_dir)
        return
    shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    tokenizer = WhisperTokenizer.from_pretrained(out_dir, pad_token="<|endoftext|>")
    for key, token in (("sot", "<|startoftranscript|>"), ("eot", "<|endoftext|>"), ("no_ts", "<|notimestamps|>")):
        if tokenizer.convert_tokens_to_ids(token) != ids[key]:
            raise ValueError(f"{tokenizer_json}: {token} is id {tokenizer.convert_tokens_to_ids(token)}, the vocabulary says {ids[key]}")
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out_dir)


def convert_ct2_whisper(model_bin: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> None:
    """Write a CTranslate2 Whisper as a transformers `WhisperForConditionalGeneration` directory.

    Writes into `out_dir`: `config.json`, `generation_config.json`, `model.safetensors` (weights in
    `dtype`; fp16 / bf16 / int8 / int16 CT2 weights upcast or dequantized as stored), the
    `WhisperFeatureExtractor` config (`num_mel_bins` mels, 16 kHz, hop 160, `max_source_positions / 50`
    seconds: tiny.en's 80 mels, 30 s), and when `tokenizer.json` sits beside `model.bin`, the
    `WhisperTokenizer` built from it (transformers loads it offline), saved with the feature
    extractor as a `WhisperProcessor`. Special token ids come from the vocabulary beside `model.bin`
    (`read_vocabulary`); suppressed tokens, alignment heads and language ids from its `config.json`
    when present (without it, generation suppresses nothing).

    Args:
        model_bin: the CTranslate2 `model.bin` of a Whisper model.
        out_dir: an existing, empty directory (the caller handles atomicity and caching).
        dtype: the saved weights' dtype.

    Raises:
        ValueError, FileNotFoundError: naming what in the CTranslate2 model cannot be converted.
    """
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    model_bin, out_dir = Path(model_bin), Path(out_dir)
    state_dict, fields = ct2_whisper_state_dict(read_ct2_model(model_bin))
    vocab = read_vocabulary(model_bin.parent, fields["vocab_size"])
    ids = _token_ids(vocab, {"sot": "<|startoftranscript|>", "eot": "<|endoftext|>", "no_ts": "<|notimestamps|>"}, model_bin.parent)
    ct2_config_path = model_bin.parent / "config.json"
    ct2_config = json.loads(ct2_config_path.read_text(encoding="utf-8")) if ct2_config_path.is_file() else {}
    fields.update(
        decoder_start_token_id=ids["sot"], bos_token_id=ids["sot"], eos_token_id=ids["eot"], pad_token_id=ids["eot"],
        suppress_tokens=ct2_config.get("suppress_ids") or [], begin_suppress_tokens=ct2_config.get("suppress_ids_begin") or [],
    )
    with torch.device("meta"):  # no random init: every tensor comes from the state dict
        model = WhisperForConditionalGeneration(WhisperConfig(**fields))
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    if fields["tie_word_embeddings"]:
        model.proj_out.weight = model.model.decoder.embed_tokens.weight
    model.generation_config = _generation_config(fields, ids, vocab, ct2_config, model_bin.parent)
    model.save_pretrained(out_dir)
    _save_processor(fields, ids, model_bin.parent / "tokenizer.json", out_dir)
