"""Generated inputs: deterministic photo-like JPEGs and captions. ``mmfuse bench`` sends them, and precision
``int8`` calibrates and checks its quantisation on them (no user data, nothing downloaded)."""
from __future__ import annotations

import io

import numpy as np

CAPTIONS = (
    "a photo of a cat", "a red car parked on a quiet street", "two dogs playing in the snow",
    "a bowl of fruit on a wooden table", "an old man reading a newspaper", "a city skyline at night",
    "a child riding a bicycle", "a plate of pasta with tomato sauce", "a sailboat on a calm lake",
    "a black and white photo of a bridge", "a woman holding an umbrella in the rain",
    "a close-up of a yellow flower", "a train arriving at a station", "a cup of coffee",
    "a mountain covered in snow under a blue sky", "people walking through a busy market",
)


def photo_like_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A deterministic photo-like JPEG: smooth colour fields (bicubic-upsampled noise) plus grain."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def captions(count: int, offset: int = 0) -> list[str]:
    """``count`` captions: the bench's, then the same with a second clause (longer token sequences)."""
    out = []
    for i in range(offset, offset + count):
        first, second = CAPTIONS[i % len(CAPTIONS)], CAPTIONS[(i * 7 + 3) % len(CAPTIONS)]
        out.append(first if i < len(CAPTIONS) else f"{first}, next to {second}")
    return out


def image_pixels(spec, count: int, seed: int = 1000) -> np.ndarray:
    """[count, 3, H, W] float32: generated JPEGs through the model's own preprocessing."""
    from .image_preprocess import ImagePreprocessor

    pre = ImagePreprocessor(spec, decode_threads=1)
    data = np.empty((count, 1), dtype=object)
    for i in range(count):
        data[i, 0] = photo_like_jpeg(320 + 16 * (i % 5), 240 + 16 * (i % 3), seed + i)
    try:
        return pre({"IMAGE": data}, frozenset({"PIXELS"}))["PIXELS"]
    finally:
        pre.close()


def text_tokens(spec, count: int, offset: int = 0) -> list[np.ndarray]:
    """One [1, L] int64 token row per caption, cut after its end token (as trimming serves it)."""
    from .openclip_models import load_tokenizer

    tokens = load_tokenizer(spec)(captions(count, offset)).numpy()
    return [row[None, : int(row.argmax()) + 1].astype(np.int64) for row in tokens]
