"""Imperfections at a level p in [0, 1]: image corruptions, text corruptions, modality dropout.

Every corruption is a pure function ``(value, p, rng) -> value`` of one row; ``p = 0`` returns the
input unchanged, and the same seed gives the same corrupted inputs everywhere (the evaluation, its
tests, a rerun). Every level uses the same random draws (common random numbers: the generator of a
corruption does not depend on p, and each row consumes the same draws whatever p is), so a row hit at
p is hit at every higher p, and a curve's steps are the corruption's, not resampling noise. Images
travel as encoded bytes (PNG from the shapes benchmark), exactly what a client sends; an empty result
means the modality is missing for that row.

==============  =====  ========================================================================
name            kind   level p
==============  =====  ========================================================================
noise           image  Gaussian pixel noise, standard deviation 128 * p (on 0..255)
blur            image  Gaussian blur, radius 4 * p pixels (the image is 64 x 64)
jpeg            image  re-compressed as JPEG, quality round(95 - 94 * p) (p = 1: quality 1)
occlusion       image  a grey square covering a fraction p of the image, at a random place
colour_shift    image  hue rotated by 180 * p degrees (a red circle drifts to cyan)
truncated       image  each row's bytes cut with probability p at a uniformly random length
typos           text   each word, with probability p, has one letter replaced by a keyboard neighbour
letter_swap     text   each word of 2+ letters, with probability p, has two adjacent letters swapped
dropped_words   text   each word dropped with probability p (all dropped: the text is missing)
dropout         both   each modality removed (empty) with probability p, independently per row
dropout_image   image  the image removed with probability p
dropout_text    text   the text removed with probability p
==============  =====  ========================================================================
"""
from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

IMAGE, TEXT, BOTH = "image", "text", "both"


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def noise(data: bytes, p: float, rng: np.random.Generator) -> bytes:
    image = _decode(data).astype(np.float32)
    draws = rng.standard_normal(size=image.shape)
    if p <= 0:
        return data
    return _png(np.clip(np.rint(image + 128.0 * p * draws), 0, 255).astype(np.uint8))


def blur(data: bytes, p: float, rng: np.random.Generator) -> bytes:
    from PIL import Image, ImageFilter

    if p <= 0:
        return data
    return _png(np.asarray(Image.fromarray(_decode(data)).filter(ImageFilter.GaussianBlur(radius=4.0 * p))))


def jpeg(data: bytes, p: float, rng: np.random.Generator) -> bytes:
    from PIL import Image

    if p <= 0:
        return data
    out = io.BytesIO()
    Image.fromarray(_decode(data)).save(out, format="JPEG", quality=int(round(95 - 94 * p)))
    return out.getvalue()


def occlusion(data: bytes, p: float, rng: np.random.Generator) -> bytes:
    u, v = rng.random(2)
    image = _decode(data).copy()
    h, w = image.shape[:2]
    side = int(round(np.sqrt(p) * min(h, w)))
    if p <= 0 or side <= 0:
        return data
    y, x = int(u * (h - side + 1)), int(v * (w - side + 1))
    image[y : y + side, x : x + side] = 128
    return _png(image)


def colour_shift(data: bytes, p: float, rng: np.random.Generator) -> bytes:
    from PIL import Image

    if p <= 0:
        return data
    hsv = np.asarray(Image.fromarray(_decode(data)).convert("HSV")).copy()
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(128 * p))) % 256).astype(np.uint8)
    return _png(np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB")))


def truncated(data: bytes, p: float, rng: np.random.Generator) -> bytes:
    u, fraction = rng.random(2)
    if p <= 0 or u >= p:
        return data
    return data[: int(fraction * len(data))]


# QWERTY neighbours of each letter (typos).
_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_NEIGHBOURS: dict[str, str] = {}
for _r, _row in enumerate(_ROWS):
    for _c, _ch in enumerate(_row):
        _near = [_row[j] for j in (_c - 1, _c + 1) if 0 <= j < len(_row)]
        for _dr in (-1, 1):
            if 0 <= _r + _dr < len(_ROWS):
                _other = _ROWS[_r + _dr]
                _near += [_other[j] for j in (_c - 1, _c, _c + 1) if 0 <= j < len(_other)]
        _NEIGHBOURS[_ch] = "".join(sorted(set(_near)))


def typos(text: str, p: float, rng: np.random.Generator) -> str:
    out = []
    for word in text.split(" "):
        u, a, b = rng.random(3)
        letters = [i for i, ch in enumerate(word) if ch in _NEIGHBOURS]
        if p > 0 and u < p and letters:
            i = letters[int(a * len(letters))]
            options = _NEIGHBOURS[word[i]]
            word = word[:i] + options[int(b * len(options))] + word[i + 1 :]
        out.append(word)
    return " ".join(out)


def letter_swap(text: str, p: float, rng: np.random.Generator) -> str:
    out = []
    for word in text.split(" "):
        u, a = rng.random(2)
        if p > 0 and u < p and len(word) >= 2:
            i = int(a * (len(word) - 1))
            word = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        out.append(word)
    return " ".join(out)


def dropped_words(text: str, p: float, rng: np.random.Generator) -> str:
    words = text.split(" ")
    draws = rng.random(len(words))
    return " ".join(w for w, u in zip(words, draws) if not (p > 0 and u < p))


@dataclass(frozen=True)
class Corruption:
    name: str
    modality: str  # image | text | both
    label: str
    function: Callable | None = None  # None: dropout (handled by ``apply``)


IMAGE_CORRUPTIONS = (
    Corruption("noise", IMAGE, "Gaussian noise", noise),
    Corruption("blur", IMAGE, "Gaussian blur", blur),
    Corruption("jpeg", IMAGE, "JPEG re-compression", jpeg),
    Corruption("occlusion", IMAGE, "occlusion", occlusion),
    Corruption("colour_shift", IMAGE, "colour (hue) shift", colour_shift),
    Corruption("truncated", IMAGE, "truncated bytes", truncated),
)
TEXT_CORRUPTIONS = (
    Corruption("typos", TEXT, "typos", typos),
    Corruption("letter_swap", TEXT, "letter swaps", letter_swap),
    Corruption("dropped_words", TEXT, "dropped words", dropped_words),
)
DROPOUTS = (
    Corruption("dropout", BOTH, "modality dropout (each)"),
    Corruption("dropout_image", IMAGE, "image dropout"),
    Corruption("dropout_text", TEXT, "text dropout"),
)
CORRUPTIONS = {c.name: c for c in IMAGE_CORRUPTIONS + TEXT_CORRUPTIONS + DROPOUTS}
LEVELS = tuple(round(0.1 * i, 1) for i in range(11))


def corruption_seed(seed: int, name: str) -> int:
    """A seed per corruption (not per level: common random numbers), stable across runs and processes."""
    return int(seed) * 1_000_003 + sum((i + 1) * ord(ch) for i, ch in enumerate(name))


def apply(name: str, level: float, images: list[bytes], texts: list[str],
          seed: int) -> tuple[list[bytes], list[str]]:
    """The rows of one condition: ``images`` and ``texts`` corrupted by ``name`` at ``level``.

    One generator per corruption, drawn row by row in order, the same draws at every level; a row's
    corruption does not depend on how rows are batched.
    """
    corruption = CORRUPTIONS[name]
    rng = np.random.default_rng(corruption_seed(seed, name))
    images, texts = list(images), list(texts)
    if corruption.function is None:  # dropout
        for i in range(len(images)):
            u_image, u_text = rng.random(2)
            if corruption.modality in (IMAGE, BOTH) and level > 0 and u_image < level:
                images[i] = b""
            if corruption.modality in (TEXT, BOTH) and level > 0 and u_text < level:
                texts[i] = ""
        return images, texts
    # A row whose modality is already missing (a dataset row without an image or text) stays missing.
    if corruption.modality == IMAGE:
        images = [corruption.function(x, level, rng) if x else x for x in images]
    else:
        texts = [corruption.function(t, level, rng) if t else t for t in texts]
    return images, texts
