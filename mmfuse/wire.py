"""What travels on the wire, written once for the server, the clients, the tools and the tests.

* the status vocabulary of the STATUS / MODALITY_STATUS tensors (``Status``);
* TYPE_STRING (BYTES) columns: building a ``[B, 1]`` object column, reading one back as bytes;
* input tensors for tritonclient (``infer_inputs``; tritonclient is imported only when called).

numpy only: the Triton python-backend stub imports this module (through mmfuse.serving), so it must not
pull in tritonclient, torch or anything of the client or tools extras.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from typing import Any

import numpy as np


class Status(str, Enum):
    """Why a modality of a row did or did not contribute. The value is what the tensor carries."""

    OK = "ok"
    MISSING = "missing"  # empty element (or whitespace-only text): the caller sent no data
    UNDECODABLE = "undecodable"  # not a readable image, truncated, wrong magic bytes; text not UTF-8
    TOO_LARGE = "too_large"  # over max_image_bytes, max_image_pixels or max_text_chars
    NON_FINITE = "non_finite"  # the encoder produced NaN/inf for the row: masked by the fusion step

    def __str__(self) -> str:
        return self.value


STATUSES = tuple(s.value for s in Status)


def as_bytes(item: Any) -> bytes:
    """One TYPE_STRING element as bytes (None -> b"", str -> UTF-8, surrogates kept)."""
    if item is None:
        return b""
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8", "surrogatepass")
    return bytes(item)


def bytes_column(items: Sequence[bytes | str | None]) -> np.ndarray:
    """[B] items -> the [B, 1] object array of bytes that a TYPE_STRING input with dims [1] takes."""
    column = np.empty((len(items), 1), dtype=object)
    for i, item in enumerate(items):
        column[i, 0] = as_bytes(item)
    return column


def column_bytes(array: np.ndarray) -> list[bytes]:
    """A [B, 1] TYPE_STRING column as a list of bytes (an empty row -> b"")."""
    flat = np.asarray(array, dtype=object).reshape(array.shape[0], -1)
    if flat.shape[1] == 0:
        return [b""] * array.shape[0]
    return [as_bytes(item) for item in flat[:, 0]]


def status_column(statuses: Sequence[str]) -> np.ndarray:
    """[B] statuses -> a [B, 1] object array of bytes (a STATUS output)."""
    return status_matrix([[str(s)] for s in statuses]) if statuses else np.empty((0, 1), dtype=object)


def status_matrix(rows: Iterable[Sequence[str]]) -> np.ndarray:
    """[B][M] statuses -> a [B, M] object array of bytes (a MODALITY_STATUS output)."""
    rows = list(rows)
    width = len(rows[0]) if rows else 0
    out = np.empty((len(rows), width), dtype=object)
    for i, row in enumerate(rows):
        for j, status in enumerate(row):
            out[i, j] = str(status).encode()
    return out


def decode_strings(array: np.ndarray) -> list[list[str]]:
    """A [B, M] TYPE_STRING output (statuses, labels) as lists of str."""
    flat = np.asarray(array, dtype=object).reshape(np.shape(array)[0], -1)
    return [[as_bytes(x).decode("utf-8", "replace") for x in row] for row in flat]


decode_statuses = decode_strings


def triton_datatype(array: np.ndarray) -> str:
    """The wire data type of an array: BYTES for object/bytes/str arrays, else tritonclient's name."""
    if array.dtype.kind in ("O", "S", "U"):
        return "BYTES"
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)


def infer_inputs(arrays: Mapping[str, np.ndarray], datatypes: Mapping[str, str] | None = None, *,
                 aio: bool = False) -> list:
    """tritonclient gRPC ``InferInput``s (``aio``: the asyncio module's); the data type comes from
    ``datatypes`` or from the array."""
    if aio:
        from tritonclient.grpc.aio import InferInput
    else:
        from tritonclient.grpc import InferInput

    inputs = []
    for name, array in arrays.items():
        datatype = (datatypes or {}).get(name) or triton_datatype(array)
        tensor = InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


# The members under their short names, for the handlers' row loops.
OK, MISSING, UNDECODABLE, TOO_LARGE, NON_FINITE = (Status.OK, Status.MISSING, Status.UNDECODABLE, Status.TOO_LARGE,
                                                   Status.NON_FINITE)
