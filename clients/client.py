"""A thin client for the three ensembles: lists of bytes/str in, numpy out.

    from clients import MMFuseClient
    with MMFuseClient("127.0.0.1:8001") as client:
        result = client.fuse_image_text([jpeg_bytes, None], ["a red circle", "a dog"])
        result.fused          # float32 [B, D]
        result.mask           # bool [B, 2]  (image, text contributed)
        result.status         # [[image status, text status], ...]

``None`` or an empty element means that modality is missing for that row. Every
call has a deadline; failures raise MMFuseClientError subclasses that say which
ensemble failed and why. Lists longer than ``max_batch`` are sent in chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from python_backends.status import decode_statuses

DEFAULT_URL = "127.0.0.1:8001"


class MMFuseClientError(RuntimeError):
    """A call to an ensemble failed. ``status`` is the gRPC status name."""

    def __init__(self, message: str, status: str = ""):
        super().__init__(message)
        self.status = status


class InvalidRequest(MMFuseClientError):
    """INVALID_ARG: the request was malformed (the message names the tensor)."""


class ServerUnavailable(MMFuseClientError):
    """UNAVAILABLE: server down, model not ready, or queue full (overload): retry later."""


class DeadlineExceeded(MMFuseClientError):
    """The call did not finish within its deadline."""


@dataclass
class EmbedResult:
    embedding: np.ndarray  # float32 [B, D], zeros where not valid
    valid: np.ndarray  # bool [B]
    status: list[str]  # per row: ok, missing, undecodable, too_large


@dataclass
class FuseResult:
    fused: np.ndarray  # float32 [B, D]
    mask: np.ndarray  # bool [B, 2]: image, text contributed
    status: list[list[str]]  # per row: [image status, text status]


def _as_bytes(item: bytes | str | None) -> bytes:
    if item is None:
        return b""
    if isinstance(item, str):
        return item.encode("utf-8")
    return bytes(item)


def _string_column(items: Sequence[bytes | str | None]) -> np.ndarray:
    column = np.empty((len(items), 1), dtype=object)
    for i, item in enumerate(items):
        column[i, 0] = _as_bytes(item)
    return column


def _chunks(n: int, size: int) -> Iterable[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class MMFuseClient:
    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = 30.0, max_batch: int = 64, **grpc_kwargs):
        import tritonclient.grpc as grpcclient

        self.url = url
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(url=url, **grpc_kwargs)

    # -- plumbing ----------------------------------------------------------------------
    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "MMFuseClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready())
        except Exception:  # noqa: BLE001
            return False

    def _error(self, ensemble: str, error: Exception) -> MMFuseClientError:
        status = error.status() if hasattr(error, "status") and callable(error.status) else ""
        status = (status or "").replace("StatusCode.", "")
        message = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
        text = f"{ensemble} at {self.url} failed ({status or 'error'}): {message}"
        if status == "INVALID_ARGUMENT":
            return InvalidRequest(text, status)
        if status == "UNAVAILABLE" or "Exceeds maximum queue size" in (message or ""):
            return ServerUnavailable(text, status)
        if status == "DEADLINE_EXCEEDED" or "Deadline Exceeded" in (message or ""):
            return DeadlineExceeded(text, status)
        return MMFuseClientError(text, status)

    def infer(self, ensemble: str, inputs: dict[str, np.ndarray], outputs: Sequence[str],
              timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """One call: named [B, ...] arrays in, named arrays out."""
        grpc = self._grpc
        infer_inputs = []
        for name, array in inputs.items():
            datatype = "BYTES" if array.dtype == object else grpc.np_to_triton_dtype(array.dtype)
            tensor = grpc.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            infer_inputs.append(tensor)
        requested = [grpc.InferRequestedOutput(name) for name in outputs]
        try:
            result = self._client.infer(ensemble, infer_inputs, outputs=requested,
                                        client_timeout=timeout_s or self.timeout_s)
        except Exception as error:  # noqa: BLE001 - tritonclient raises InferenceServerException
            raise self._error(ensemble, error) from error
        return {name: result.as_numpy(name) for name in outputs}

    def _batched(self, ensemble: str, columns: dict[str, Sequence], outputs: Sequence[str],
                 timeout_s: float | None) -> dict[str, np.ndarray]:
        n = len(next(iter(columns.values())))
        if any(len(c) != n for c in columns.values()):
            raise ValueError(f"{ensemble}: inputs have different lengths: "
                             + ", ".join(f"{k}={len(v)}" for k, v in columns.items()))
        if n == 0:
            raise ValueError(f"{ensemble}: empty input list")
        parts = [
            self.infer(ensemble, {k: _string_column(v[s]) for k, v in columns.items()}, outputs, timeout_s)
            for s in _chunks(n, self.max_batch)
        ]
        return {name: np.concatenate([p[name] for p in parts], axis=0) for name in outputs}

    # -- the three ensembles ---------------------------------------------------------------
    def embed_image(self, images: Sequence[bytes | None], timeout_s: float | None = None) -> EmbedResult:
        out = self._batched("embed_image", {"IMAGE": list(images)}, ("EMBEDDING", "VALID", "STATUS"), timeout_s)
        return EmbedResult(out["EMBEDDING"], out["VALID"].reshape(-1), [s[0] for s in decode_statuses(out["STATUS"])])

    def embed_text(self, texts: Sequence[str | bytes | None], timeout_s: float | None = None) -> EmbedResult:
        out = self._batched("embed_text", {"TEXT": list(texts)}, ("EMBEDDING", "VALID", "STATUS"), timeout_s)
        return EmbedResult(out["EMBEDDING"], out["VALID"].reshape(-1), [s[0] for s in decode_statuses(out["STATUS"])])

    def fuse_image_text(self, images: Sequence[bytes | None], texts: Sequence[str | bytes | None],
                        timeout_s: float | None = None) -> FuseResult:
        out = self._batched("fuse_image_text", {"IMAGE": list(images), "TEXT": list(texts)},
                            ("FUSED", "MODALITY_MASK", "MODALITY_STATUS"), timeout_s)
        return FuseResult(out["FUSED"], out["MODALITY_MASK"].astype(bool), decode_statuses(out["MODALITY_STATUS"]))
