"""Emoji rendered from Noto Color Emoji (Debian ``fonts-noto-color-emoji``) -> image-caption pairs.

The font is a CBDT bitmap font: FreeType only renders it at its strike size (109 px), so each
glyph is drawn at 109 px and resized. Captions are the lower-cased Unicode names
(``unicodedata.name``), e.g. U+1F600 -> "grinning face".
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from zoo.progress import progress

from .fashion_mnist import png_bytes
from .schema import Media, Sample, split_of
from .select import pick_per_split

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
TASK_FAMILY = "caption"
STRIKE = 109
INSTRUCTION = "Describe this image."
# Planes/blocks where emoji live; every named "So" code point there is tried, and kept if the
# font draws a glyph for it (missing glyphs render empty).
RANGES = ((0x2000, 0x2BFF), (0x3000, 0x33FF), (0x1F000, 0x1FAFF))


@lru_cache(maxsize=2)
def _font(path: str) -> ImageFont.FreeTypeFont:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: install the Debian package fonts-noto-color-emoji (make setup)")
    return ImageFont.truetype(path, STRIKE)


def render_emoji(char: str, size: int = 32, font_path: str | os.PathLike = FONT) -> Image.Image | None:
    """Draw one emoji as an RGB image on white.

    Args:
        char: The emoji (one or more code points).
        size: Output width and height in pixels.
        font_path: The CBDT color font.

    Returns:
        The ``size x size`` RGB image, or None if the font has no glyph for `char`.
    """
    font = _font(str(font_path))
    canvas = Image.new("RGBA", (160, 160), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((0, 0), char, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    square.paste(glyph, ((side - glyph.size[0]) // 2, (side - glyph.size[1]) // 2))
    white = Image.new("RGBA", square.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, square).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def emoji_candidates() -> list[tuple[str, str]]:
    """Single-code-point emoji candidates ``(char, caption)``, in code point order (glyph not checked)."""
    out = []
    for lo, hi in RANGES:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            name = unicodedata.name(ch, None)
            if name and unicodedata.category(ch) == "So":
                out.append((ch, name.lower()))
    return out


@dataclass(frozen=True)
class _Candidate:
    char: str
    caption: str

    @property
    def key(self) -> str:
        return f"emoji-{ord(self.char):05x}"


def build_emoji_captions(
    max_per_split: int | None = None,
    *,
    size: int = 32,
    font_path: str | os.PathLike = FONT,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict[str, list[Sample]]:
    """Emoji images captioned with their Unicode names ("Describe this image." -> "grinning face").

    Split by the hash of the code point key. Candidates the font cannot draw are skipped, so a
    limited build renders only until each split is full.

    Args:
        max_per_split: Cap per split (None: every emoji the font has, about 1.4k in all).
        size: Image side in pixels.
        font_path: Noto Color Emoji TTF.
        val_fraction: Expected share of ``val``.
        test_fraction: Expected share of ``test``.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` of RGB PNG samples.
    """
    cands = [_Candidate(ch, cap) for ch, cap in emoji_candidates()]
    split = {c.key: split_of(c.key, val_fraction, test_fraction) for c in cands}
    ordered = pick_per_split(cands, lambda c: split[c.key], lambda c: c.key, None)
    out: dict[str, list[Sample]] = {}
    # the bar counts kept samples; it stops short of its total by the emoji the font cannot draw
    total = sum(len(items) if max_per_split is None else min(len(items), max_per_split) for items in ordered.values())
    with progress(total=total, desc=TASK_FAMILY, unit="sample") as bar:
        for s, items in ordered.items():
            out[s] = []
            for c in items:
                if max_per_split is not None and len(out[s]) >= max_per_split:
                    break
                image = render_emoji(c.char, size, font_path)
                if image is not None:
                    out[s].append(Sample(c.key, TASK_FAMILY, s, INSTRUCTION, c.caption, (Media("image", png_bytes(image)),)))
                    bar.update()
    return out
