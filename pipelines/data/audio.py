"""WAV encode/decode (stdlib `wave` + numpy) and band-limited resampling.

webdataset has no WAV decoder; these are the ones the shards and the audio processor use.
"""

from __future__ import annotations

import io
import wave

import numpy as np


def encode_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    """Encode mono float audio in [-1, 1] as 16-bit PCM WAV bytes.

    Args:
        samples: ``[N]`` float array (clipped to [-1, 1]).
        sample_rate: Samples per second.

    Returns:
        The WAV file bytes.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"encode_wav wants mono [N] audio, got shape {x.shape}")
    pcm = np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Decode 8/16/32-bit PCM WAV bytes to mono float32 in [-1, 1].

    Args:
        data: WAV file bytes.

    Returns:
        ``(samples [N] float32, sample_rate)``; multi-channel audio is averaged to mono.

    Raises:
        ValueError: If the bytes are not a PCM WAV file the stdlib can read.
    """
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise ValueError(f"not a readable PCM WAV file: {e}") from e
    if width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 4:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"unsupported WAV sample width {width} bytes")
    if channels > 1:
        x = x[: len(x) // channels * channels].reshape(-1, channels).mean(axis=1)
    return x.astype(np.float32), rate


def resample(samples: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling by FFT (truncate/zero-pad the spectrum), deterministic.

    Fine for the short, silence-padded clips we build; for long streams use a polyphase filter.

    Args:
        samples: ``[N]`` float array.
        orig_rate: Its sample rate.
        new_rate: Wanted sample rate.

    Returns:
        ``[round(N * new_rate / orig_rate)]`` float64 array.
    """
    x = np.asarray(samples, dtype=np.float64)
    if orig_rate == new_rate or len(x) == 0:
        return x.copy()
    n_new = int(round(len(x) * new_rate / orig_rate))
    spec = np.fft.rfft(x)
    n_bins = n_new // 2 + 1
    out = np.zeros(n_bins, dtype=complex)
    keep = min(n_bins, len(spec))
    out[:keep] = spec[:keep]
    return np.fft.irfft(out, n=n_new) * (n_new / len(x))


def trim_silence(samples: np.ndarray, sample_rate: int, threshold: float = 0.01, pad_s: float = 0.05) -> np.ndarray:
    """Cut leading/trailing audio quieter than `threshold`, keeping `pad_s` seconds either side."""
    x = np.asarray(samples)
    loud = np.flatnonzero(np.abs(x) > threshold)
    if len(loud) == 0:
        return x
    pad = int(pad_s * sample_rate)
    return x[max(0, loud[0] - pad) : loud[-1] + 1 + pad]
