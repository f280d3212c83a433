"""The errors every mmfuse client raises (hand-written and generated clients alike).

Each names the ensemble, the server address, the gRPC status and the server's message.
Checks made before anything is sent (lengths, shapes, dtypes) raise ``ValueError``.
"""
from __future__ import annotations


class MMFuseClientError(RuntimeError):
    """A call to an ensemble failed. ``status`` is the gRPC status name (``UNAVAILABLE`` ...)."""

    def __init__(self, message: str, status: str = ""):
        super().__init__(message)
        self.status = status


class InvalidRequest(MMFuseClientError):
    """INVALID_ARG: the request was malformed (the message names the tensor)."""


class ServerUnavailable(MMFuseClientError):
    """UNAVAILABLE: server down, model not ready, or queue full (overload): retry later."""


class DeadlineExceeded(MMFuseClientError):
    """The call did not finish within its deadline."""


def from_triton(error: Exception, ensemble: str, url: str, attempts: int = 1) -> MMFuseClientError:
    """Map a tritonclient ``InferenceServerException`` (or any exception) to the hierarchy above."""
    status = error.status() if callable(getattr(error, "status", None)) else ""
    status = (status or "").replace("StatusCode.", "")
    message = error.message() if callable(getattr(error, "message", None)) else str(error)
    message = message or ""
    tried = f" after {attempts} attempts" if attempts > 1 else ""
    text = f"{ensemble} at {url} failed ({status or 'error'}){tried}: {message}"
    if status == "INVALID_ARGUMENT":
        return InvalidRequest(text, status)
    if status == "UNAVAILABLE" or "Exceeds maximum queue size" in message:
        return ServerUnavailable(text, status or "UNAVAILABLE")
    if status == "DEADLINE_EXCEEDED" or "Deadline Exceeded" in message:
        return DeadlineExceeded(text, status or "DEADLINE_EXCEEDED")
    return MMFuseClientError(text, status)
