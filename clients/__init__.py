"""gRPC clients for mmfuse's ensembles (thin layer over tritonclient.grpc)."""
from .client import (  # noqa: F401
    DeadlineExceeded,
    EmbedResult,
    FuseResult,
    InvalidRequest,
    MMFuseClient,
    MMFuseClientError,
    ServerUnavailable,
)
