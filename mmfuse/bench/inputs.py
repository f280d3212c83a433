"""The bench's inputs (deterministic photo-like JPEGs and captions) and its two measuring helpers."""
from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

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


def bench_inputs(count: int, width: int, height: int) -> tuple[list[bytes], list[str]]:
    images = [photo_like_jpeg(width, height, seed) for seed in range(count)]
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(count)]
    return images, captions


def timed(fn: Callable[[], Any], seconds: float, min_reps: int = 2, max_reps: int = 10_000) -> float:
    """Mean seconds per call of ``fn`` over at least ``min_reps`` calls and about ``seconds``."""
    fn()
    reps, started = 0, time.perf_counter()
    while reps < min_reps or (time.perf_counter() - started < seconds and reps < max_reps):
        fn()
        reps += 1
    return (time.perf_counter() - started) / reps


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] arrays, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
