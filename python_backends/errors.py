"""One exception hierarchy for the whole library.

Each error carries the Triton status it maps to (``code``); the Triton adapter
(mmfuse.serving.adapter) turns it into a per-request TritonError in one place.
The library itself never imports Triton.
"""
from __future__ import annotations


class MMFuseError(Exception):
    """Base class. ``code`` names a TritonError code."""

    code = "INTERNAL"


class ConfigError(MMFuseError):
    """A model's config.pbtxt parameters are missing or invalid (raised at load time)."""

    code = "INVALID_ARG"


class WeightsError(MMFuseError):
    """Model weights could not be found or loaded."""

    code = "UNAVAILABLE"


class InvalidInputError(MMFuseError):
    """A request is structurally wrong: missing tensor, wrong dtype or shape."""

    code = "INVALID_ARG"


class InternalError(MMFuseError):
    """A bug or an unexpected failure inside a model."""

    code = "INTERNAL"
