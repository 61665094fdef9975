"""Audio: Whisper-style log-mel features and the transformers Whisper encoder built from a config."""

from __future__ import annotations

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


class WhisperAudioEncoder(nn.Module):
    """The transformers Whisper encoder, built from a config (random init, or weights from a file).

    Args:
        config: `WhisperConfig` fields (e.g. `{"d_model": 32, "encoder_layers": 2,
            "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "num_mel_bins": 16,
            "max_source_positions": 16}`); the decoder fields are irrelevant here.
        feature_layer: which hidden state to return (-1 the final, layer-normed one).
        weights: path of a state dict for the encoder, or None.
    """

    def __init__(self, config: dict[str, Any] | None = None, *, feature_layer: int = -1, weights: str | None = None) -> None:
        super().__init__()
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        self.config = WhisperConfig(**(config or {}))
        self.model = WhisperEncoder(self.config)
        if weights is not None and not self.model.conv1.weight.is_meta:  # meta: shape-only build
            self.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
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
    """`EncoderConfig(kind="whisper")`: the Whisper encoder from `WhisperConfig` fields (`options`).

    Audio has no prefix tokens, so `select` does not apply; `name` and `image_size` must be unset.
    """
    reject_unused("whisper", name=name, image_size=image_size)
    return WhisperAudioEncoder(options, feature_layer=-1 if feature_layer is None else feature_layer, weights=weights)
