"""Spoken words and digits synthesized by ``espeak-ng`` (Debian) -> speech-to-text samples."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .audio import decode_wav, encode_wav, resample, trim_silence
from .schema import Media, Sample, split_of
from .select import materialize, pick_per_split

TASK_FAMILY = "asr"
INSTRUCTION = "Transcribe the audio."
SAMPLE_RATE = 16_000
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The Speech Commands core words (Warden 2018) plus a few more, all short and distinct.
WORDS = (
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
    "cat", "dog", "bird", "house", "tree", "happy", "water", "music", "light", "red",
)  # fmt: skip
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-us+f2", "en-us+m3", "en-gb-x-rp", "en-us+klatt2")
SPEEDS = (130, 170, 210)  # words per minute
PITCHES = (35, 65)  # espeak 0..99


@dataclass(frozen=True)
class _Candidate:
    text: str
    voice: str
    speed: int
    pitch: int

    @property
    def key(self) -> str:
        voice = self.voice.replace("+", "_")
        return f"speech-{self.text.replace(' ', '_')}-{voice}-s{self.speed}-p{self.pitch}"


def espeak_wav(text: str, voice: str = "en-us", speed: int = 170, pitch: int = 50, sample_rate: int = SAMPLE_RATE, max_seconds: float = 2.0) -> bytes:
    """Synthesize `text` with espeak-ng to 16-bit mono WAV bytes, silence-trimmed and resampled.

    Args:
        text: What to say.
        voice: espeak-ng voice, optionally with a ``+variant``.
        speed: Words per minute.
        pitch: 0..99.
        sample_rate: Output rate (espeak-ng speaks at 22.05 kHz).
        max_seconds: Clips longer than this are cut (keeps the CPU demo cheap).

    Returns:
        WAV file bytes.

    Raises:
        FileNotFoundError: If espeak-ng is not installed.
        RuntimeError: If espeak-ng fails (message includes its stderr).
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng is not on PATH: install the Debian package espeak-ng (make setup)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.wav"
        proc = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), "--", text], capture_output=True, text=True)
        if proc.returncode != 0 or not path.is_file():
            raise RuntimeError(f"espeak-ng -v {voice} failed on {text!r} (rc={proc.returncode}): {proc.stderr.strip()}")
        x, rate = decode_wav(path.read_bytes())
    x = trim_silence(x, rate)
    x = resample(x, rate, sample_rate)[: int(max_seconds * sample_rate)]
    return encode_wav(x, sample_rate)


def build_spoken_words(
    max_per_split: int | None = None,
    *,
    words: tuple[str, ...] = DIGITS + WORDS,
    voices: tuple[str, ...] = VOICES,
    speeds: tuple[int, ...] = SPEEDS,
    pitches: tuple[int, ...] = PITCHES,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict[str, list[Sample]]:
    """Every (word, voice, speed, pitch) as an ASR sample ("Transcribe the audio." -> "seven").

    Splits are by the hash of the whole combination: the vocabulary is shared across splits and
    held-out samples are new renditions (voice/speed/pitch) of known words.

    Args:
        max_per_split: Cap per split (None: all 30 x 8 x 3 x 2 = 1440 combinations).
        words: Vocabulary.
        voices: espeak-ng voices.
        speeds: Words per minute.
        pitches: espeak pitches.
        val_fraction: Expected share of ``val``.
        test_fraction: Expected share of ``test``.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` of 16 kHz mono WAV samples.
    """
    cands = [_Candidate(w, v, s, p) for w in words for v in voices for s in speeds for p in pitches]
    picked = pick_per_split(cands, lambda c: split_of(c.key, val_fraction, test_fraction), lambda c: c.key, max_per_split)

    def make(c: _Candidate, split: str) -> Sample:
        return Sample(c.key, TASK_FAMILY, split, INSTRUCTION, c.text, (Media("audio", espeak_wav(c.text, c.voice, c.speed, c.pitch)),))

    return materialize(picked, make, TASK_FAMILY)
