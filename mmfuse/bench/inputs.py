"""The bench's inputs (deterministic photo-like JPEGs and captions) and its two measuring helpers."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mmfuse.serving.calibration import CAPTIONS, photo_like_jpeg  # noqa: F401 - the bench's inputs


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
