"""Spoken words and digits synthesized by ``espeak-ng`` (Debian) -> speech-to-text samples."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .audio import decode_wav, encode_wav, resample, trim_silence
from .schema import Media, Sample, hash_unit, split_of
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
# Short sentences (3-6 words, mostly the words above) for `sentences=True`: longer targets, so word
# error rate measures more than a word's exact match.
SENTENCES = (
    "the cat is on the tree", "the dog can go up", "turn left at the red house", "the bird likes music",
    "stop the music now", "go right and then down", "the water is cold", "turn off the light",
    "turn on the red light", "the happy dog says yes", "three birds sit in the tree", "my house has two doors",
    "the cat and the dog", "five red birds fly up", "go down to the water", "the light is on",
    "she said no to the dog", "seven cats are happy", "the tree is near the house", "play the music again",
    "put the cat down", "it is one two three", "four dogs ran left", "the bird sang in the rain",
    "nine trees by the water", "open the door please", "the light is off now", "we go up and down",
    "six happy birds", "eight red houses",
)  # fmt: skip
SENTENCE_MAX_SECONDS = 4.0  # a sentence clip's cap (words: `max_seconds`); the longest is 2.1 s at 130 wpm
SEEN, UNSEEN = "seen_voice", "unseen_voice"  # subtypes when `test_voices` holds voices out of training


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
    test_voices: tuple[str, ...] = (),
    sentences: bool = False,
    max_seconds: float = 2.0,
) -> dict[str, list[Sample]]:
    """Every (word, voice, speed, pitch) as an ASR sample ("Transcribe the audio." -> "seven").

    Splits are by the hash of the whole combination: the vocabulary is shared across splits and
    held-out samples are new renditions (voice/speed/pitch) of known words.

    With `test_voices`, those voices are never in ``train``: their renditions go to ``val`` and
    ``test`` only (in the ratio `val_fraction` : `test_fraction`, by the hash of the combination),
    while the other voices keep the default rule (so val and test also hold new renditions by
    voices training heard). Every sample then carries `Sample.subtype` ``seen_voice`` or
    ``unseen_voice``, and evaluation reports the metric on each beside the overall one. Without
    it (the default) the build is exactly the one before this option existed.

    Args:
        max_per_split: Cap per split (None: all 30 x 8 x 3 x 2 = 1440 combinations).
        words: Vocabulary.
        voices: espeak-ng voices.
        speeds: Words per minute.
        pitches: espeak pitches.
        val_fraction: Expected share of ``val``.
        test_fraction: Expected share of ``test``.
        test_voices: Voices (among `voices`) heard only in ``val``/``test``, never in ``train``.
        sentences: Also speak the short `SENTENCES` (3-6 words; clips up to `SENTENCE_MAX_SECONDS`).
        max_seconds: Cap on a word clip's length.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` of 16 kHz mono WAV samples.

    Raises:
        ValueError: A test voice is not among `voices`, or every voice is held out.
    """
    test_voices = tuple(test_voices or ())
    unknown = [v for v in test_voices if v not in voices]
    if unknown:
        raise ValueError(f"test_voices {unknown} are not among the voices {tuple(voices)}")
    if test_voices and set(voices) <= set(test_voices):
        raise ValueError(f"test_voices {test_voices} hold out every voice: training would hear none")
    if test_voices and val_fraction + test_fraction <= 0:
        raise ValueError("test_voices needs val_fraction + test_fraction > 0 (where the held-out voices go)")
    texts = tuple(words) + (SENTENCES if sentences else ())
    cands = [_Candidate(w, v, s, p) for w in texts for v in voices for s in speeds for p in pitches]

    def split(c: _Candidate) -> str:
        if c.voice not in test_voices:
            return split_of(c.key, val_fraction, test_fraction)
        return "test" if hash_unit(c.key, "split") < test_fraction / (val_fraction + test_fraction) else "val"

    picked = pick_per_split(cands, split, lambda c: c.key, max_per_split)
    subtype = (lambda c: UNSEEN if c.voice in test_voices else SEEN) if test_voices else (lambda c: "")

    def make(c: _Candidate, split: str) -> Sample:
        limit = max(max_seconds, SENTENCE_MAX_SECONDS) if c.text in SENTENCES and c.text not in words else max_seconds
        wav = espeak_wav(c.text, c.voice, c.speed, c.pitch, max_seconds=limit)
        return Sample(c.key, TASK_FAMILY, split, INSTRUCTION, c.text, (Media("audio", wav),), subtype=subtype(c))

    return materialize(picked, make, TASK_FAMILY)
