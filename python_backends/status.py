"""Per-modality, per-row status strings (the MODALITY_STATUS / STATUS tensors).

A row whose modality cannot be used is masked, never failed; its status says why.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

OK = "ok"
MISSING = "missing"  # empty element: the caller sent no data for this modality
UNDECODABLE = "undecodable"  # bytes that are not a readable image / not valid UTF-8
TOO_LARGE = "too_large"  # over max_image_bytes, max_image_pixels or max_text_chars

ALL = (OK, MISSING, UNDECODABLE, TOO_LARGE)


def status_array(statuses: Sequence[str]) -> np.ndarray:
    """[B] strings -> a [B, 1] object array of bytes, as Triton TYPE_STRING wants."""
    out = np.empty((len(statuses), 1), dtype=object)
    for i, status in enumerate(statuses):
        out[i, 0] = status.encode()
    return out


def column_bytes(array: np.ndarray) -> list[bytes]:
    """The [B, 1] TYPE_STRING column of a request as a list of bytes (empty element -> b"")."""
    flat = array.reshape(array.shape[0], -1)
    if flat.shape[1] == 0:
        return [b""] * array.shape[0]
    return [_as_bytes(item) for item in flat[:, 0]]


def _as_bytes(item) -> bytes:
    if item is None:
        return b""
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8", "surrogatepass")
    return bytes(item)


def decode_statuses(array: np.ndarray) -> list[list[str]]:
    """Client side: a [B, M] status tensor as lists of str."""
    return [[_as_bytes(x).decode() for x in row] for row in np.asarray(array, dtype=object).reshape(array.shape[0], -1)]


def join(rows: Iterable[Sequence[str]]) -> np.ndarray:
    """[B][M] strings -> [B, M] object array of bytes."""
    rows = list(rows)
    width = len(rows[0]) if rows else 0
    out = np.empty((len(rows), width), dtype=object)
    for i, row in enumerate(rows):
        for j, status in enumerate(row):
            out[i, j] = status.encode()
    return out
