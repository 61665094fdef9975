"""Image and audio processors: raw media -> the tensors an encoder expects."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zoo.encoders.audio import log_mel_spectrogram, mel_filters


def _image_to_tensor(image: Any) -> torch.Tensor:
    """PIL image, `[H, W(, C)]` uint8/float array, or `[C, H, W]` float tensor in [0, 1] -> `[3, H, W]` float."""
    if isinstance(image, torch.Tensor):
        x = image.float()
        if x.dim() == 2:
            x = x[None]
        if x.dim() != 3 or x.shape[0] not in (1, 3, 4):
            raise ValueError(f"ImageProcessor: a tensor image must be [C, H, W] with C in 1/3/4, got {tuple(x.shape)}")
    else:
        if hasattr(image, "convert"):  # PIL
            image = image.convert("RGB")
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
            raise ValueError(f"ImageProcessor: an array image must be [H, W] or [H, W, C], got shape {arr.shape}")
        x = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).float()  # PIL arrays are read-only
        if arr.dtype == np.uint8:
            x = x / 255.0
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x[:3]


@dataclass
class ImageProcessor:
    """Resize the short side, center-crop, scale to [0, 1] and normalize (timm/CLIP evaluation transform).

    Attributes:
        image_size: output side length S.
        mean, std: per-channel normalization (the encoder's pretrained config).
        interpolation: "bicubic" or "bilinear".
        crop_pct: the short side is resized to `S / crop_pct` before the S x S center crop.
    """

    image_size: int = 224
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    @classmethod
    def from_encoder(cls, encoder: Any, crop_pct: float = 1.0) -> ImageProcessor:
        """The processor matching a vision encoder's `image_size`, `mean`, `std`, `interpolation`."""
        return cls(encoder.image_size[0], tuple(encoder.mean), tuple(encoder.std), encoder.interpolation, crop_pct)

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        """Process a list of images into `[n, 3, S, S]` float32 (an empty list gives `[0, 3, S, S]`)."""
        out = [self.process_one(im) for im in images]
        return torch.stack(out) if out else torch.zeros(0, 3, self.image_size, self.image_size)

    def process_one(self, image: Any) -> torch.Tensor:
        """One image -> `[3, S, S]`."""
        x = _image_to_tensor(image)[None]  # [1, 3, H, W]
        h, w = x.shape[-2:]
        short = int(math.floor(self.image_size / self.crop_pct))
        scale = short / min(h, w)
        nh, nw = max(short, round(h * scale)), max(short, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode=self.interpolation, align_corners=False, antialias=True)
        top, left = (nh - self.image_size) // 2, (nw - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size].clamp(0.0, 1.0)
        mean = torch.tensor(self.mean, dtype=x.dtype)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype)[:, None, None]
        return ((x[0] - mean) / std).contiguous()


@dataclass
class AudioProcessor:
    """Resample to `sampling_rate`, pad/trim to `num_frames * hop_length` samples, Whisper log-mel.

    Attributes:
        sampling_rate: target rate (Hz).
        n_mels: mel bins (the encoder's `num_mel_bins`).
        num_frames: frames per clip (the encoder's `2 * max_source_positions`; 3000 = 30 s for Whisper).
        n_fft: STFT window.
        hop_length: STFT hop.
    """

    sampling_rate: int = 16000
    n_mels: int = 80
    num_frames: int = 3000
    n_fft: int = 400
    hop_length: int = 160

    @classmethod
    def from_encoder(cls, encoder: Any, sampling_rate: int = 16000) -> AudioProcessor:
        """The processor matching a `WhisperAudioEncoder`'s mel bins and clip length."""
        return cls(sampling_rate=sampling_rate, n_mels=encoder.n_mels, num_frames=encoder.num_frames)

    @property
    def num_samples(self) -> int:
        """Samples per clip at `sampling_rate`."""
        return self.num_frames * self.hop_length

    def resample(self, waveform: np.ndarray, rate: int) -> np.ndarray:
        """Polyphase resampling (anti-aliased) from `rate` to `sampling_rate`; mono float32."""
        wave = np.asarray(waveform, dtype=np.float32)
        if wave.ndim == 2:  # [L, channels] or [channels, L] -> mono
            wave = wave.mean(axis=int(np.argmin(wave.shape)))
        if wave.ndim != 1:
            raise ValueError(f"AudioProcessor: a waveform must be [L] or [L, C], got shape {wave.shape}")
        if rate == self.sampling_rate:
            return wave
        from scipy.signal import resample_poly

        g = math.gcd(int(rate), self.sampling_rate)
        return resample_poly(wave, self.sampling_rate // g, int(rate) // g).astype(np.float32)

    def __call__(self, clips: Sequence[Any]) -> torch.Tensor:
        """Clips -> `[n, n_mels, num_frames]`.

        Args:
            clips: each a `(waveform, sampling_rate)` pair, or a bare waveform already at `sampling_rate`.
        """
        waves = []
        for clip in clips:
            wave, rate = clip if isinstance(clip, tuple) else (clip, self.sampling_rate)
            if isinstance(wave, torch.Tensor):
                wave = wave.detach().cpu().numpy()
            wave = self.resample(wave, rate)[: self.num_samples]
            waves.append(np.pad(wave, (0, self.num_samples - len(wave))))
        if not waves:
            return torch.zeros(0, self.n_mels, self.num_frames)
        batch = torch.from_numpy(np.stack(waves))  # [n, L]
        filters = mel_filters(self.n_mels, self.n_fft, self.sampling_rate)
        return log_mel_spectrogram(batch, filters=filters, n_fft=self.n_fft, hop_length=self.hop_length)
