"""A thin client for the three ensembles: lists of bytes/str in, numpy out.

    from mmfuse.clients import MMFuseClient
    with MMFuseClient("127.0.0.1:8001") as client:
        result = client.fuse_image_text([jpeg_bytes, None], ["a red circle", "a dog"])
        result.fused          # float32 [B, D]
        result.mask           # bool [B, 2]  (image, text contributed)
        result.status         # [[image status, text status], ...]

``None`` or an empty element means that modality is missing for that row. Every
call has a deadline; failures raise MMFuseClientError subclasses that say which
ensemble failed and why. Lists longer than ``max_batch`` are sent in chunks.

It is a convenience layer over the generated clients (``clients/embed_image.py`` ...,
written by ``mmfuse gen-clients``) sharing one gRPC channel: statuses decoded to
``str``, ``valid`` flattened to ``[B]``. By default it does not retry (``retries=0``): an
overloaded server's UNAVAILABLE reaches the caller at once; ``retries=N`` retries UNAVAILABLE
(queue full, server restarting) N times with exponential back-off and jitter.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmfuse.wire import decode_statuses

from ._runtime import DEFAULT_URL, ClientOptions, call, connect
from .embed_image import EmbedImageClient
from .embed_text import EmbedTextClient
from .errors import DeadlineExceeded, InvalidRequest, MMFuseClientError, ServerUnavailable  # noqa: F401
from .fuse_image_text import FuseImageTextClient


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
    score: np.ndarray | None = None  # float32 [B] match probability, where the fusion has a task head


class MMFuseClient:
    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = 30.0, max_batch: int = 64, retries: int = 0,
                 **grpc_kwargs):
        """``grpc_kwargs`` go to ``tritonclient.grpc.InferenceServerClient`` (``ssl``, ``root_certificates`` ...)."""
        import tritonclient.grpc as grpcclient

        self.url = url
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self.options = ClientOptions(url=url, timeout_s=timeout_s, retries=retries, max_batch=max_batch,
                                     progress=False)
        self._client = (grpcclient.InferenceServerClient(url=url, **grpc_kwargs) if grpc_kwargs
                        else connect(self.options))
        self._embed_image = EmbedImageClient(options=self.options, connection=self._client)
        self._embed_text = EmbedTextClient(options=self.options, connection=self._client)
        self._fuse = FuseImageTextClient(options=self.options, connection=self._client)

    # -- plumbing ----------------------------------------------------------------------
    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> MMFuseClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready())
        except Exception:  # noqa: BLE001
            return False

    def infer(self, ensemble: str, inputs: dict[str, np.ndarray], outputs: Sequence[str],
              timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """One call, unchecked: named [B, ...] arrays in (data type from each array's dtype), named arrays out."""
        return call(self._client, ensemble, inputs, list(outputs), self.options, timeout_s)

    # -- the three ensembles ---------------------------------------------------------------
    @staticmethod
    def _embed(response) -> EmbedResult:
        return EmbedResult(response.embedding, response.valid.reshape(-1),
                           [s[0] for s in decode_statuses(response.status)])

    def embed_image(self, images: Sequence[bytes | None], timeout_s: float | None = None) -> EmbedResult:
        return self._embed(self._embed_image.embed_image(list(images), timeout_s=timeout_s))

    def embed_text(self, texts: Sequence[str | bytes | None], timeout_s: float | None = None) -> EmbedResult:
        return self._embed(self._embed_text.embed_text(list(texts), timeout_s=timeout_s))

    def fuse_image_text(self, images: Sequence[bytes | None], texts: Sequence[str | bytes | None],
                        timeout_s: float | None = None) -> FuseResult:
        out = self._fuse.fuse_image_text(list(images), list(texts), timeout_s=timeout_s)
        score = getattr(out, "score", None)
        return FuseResult(out.fused, out.modality_mask.astype(bool), decode_statuses(out.modality_status),
                          None if score is None else np.asarray(score, dtype=np.float32).reshape(-1))
