"""Per-modality metrics of the Python models, exported on Triton's metrics port.

Plain module, no Triton import: ``ModelMetrics.create(pb, model_name, handler)``
receives the ``triton_python_backend_utils`` module and uses its custom-metric API
(``pb.MetricFamily(name, description, kind)`` then ``.Metric(labels)``). The
series appear on Triton's metrics port (``/metrics``, 8002 by default) next to
Triton's own per-model ``nv_inference_*`` counters. With a ``pb`` that has no
``MetricFamily`` (unit-test fakes, old Tritons) every call is a no-op.

Series (every name starts with ``mmfuse_``):

=================================  ====================================  =========================================
name                               labels                                what
=================================  ====================================  =========================================
mmfuse_modality_rows_total         model, modality, status               rows by status (ok, missing, undecodable,
                                                                         too_large, non_finite), read from the
                                                                         handler's STATUS / MODALITY_STATUS outputs
mmfuse_mask_pattern_rows_total     model, pattern                        fusion rows by which modalities contributed
                                                                         (``image+text``, ``text``, ``none``, ...)
mmfuse_execute_total               model, modality, stage                handler calls (one per dynamic batch)
mmfuse_execute_rows_total          model, modality, stage                rows processed
mmfuse_execute_duration_us_total   model, modality, stage                handler time, microseconds (cumulative)
mmfuse_execute_duration_seconds    model, modality, stage                handler time per call (histogram)
=================================  ====================================  =========================================

``stage`` is ``preprocess``, ``encode`` or ``fusion`` (``execute`` for a handler this
module does not know); ``modality`` is the handler's modality (``all`` for fusion).
Metrics never fail a request: an error while recording is logged once and ignored.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmfuse.wire import decode_strings

log = logging.getLogger("mmfuse")

PREFIX = "mmfuse_"
ROWS = "mmfuse_modality_rows_total"
MASK_PATTERNS = "mmfuse_mask_pattern_rows_total"
EXECUTIONS = "mmfuse_execute_total"
EXECUTED_ROWS = "mmfuse_execute_rows_total"
DURATION_US = "mmfuse_execute_duration_us_total"
DURATION_HISTOGRAM = "mmfuse_execute_duration_seconds"

# name -> (description, kind, label names). Kind names are pb.MetricFamily attributes.
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    ROWS: ("Rows per modality and status (ok, missing, undecodable, too_large, non_finite)", "COUNTER",
           ("model", "modality", "status")),
    MASK_PATTERNS: ("Fused rows per pattern of contributing modalities", "COUNTER", ("model", "pattern")),
    EXECUTIONS: ("Handler calls (one per dynamic batch)", "COUNTER", ("model", "modality", "stage")),
    EXECUTED_ROWS: ("Rows processed by the handler", "COUNTER", ("model", "modality", "stage")),
    DURATION_US: ("Cumulative handler time in microseconds", "COUNTER", ("model", "modality", "stage")),
    DURATION_HISTOGRAM: ("Handler time per call in seconds", "HISTOGRAM", ("model", "modality", "stage")),
}
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

def fusion_modalities(handler: Any) -> tuple[str, ...] | None:
    """The modalities of a fusion handler, in MODALITY_MASK order; None for other handlers.

    From ``handler.config.modalities`` when it has one, else from the N-modality contract itself:
    the handler reads ``<M>_EMBEDDING`` for each modality M, in order.
    """
    modalities = getattr(getattr(handler, "config", None), "modalities", None)
    if not modalities:
        suffix = "_EMBEDDING"
        names = [getattr(spec, "name", "") for spec in getattr(handler, "inputs", ()) or ()]
        modalities = [n[: -len(suffix)] for n in names if n.endswith(suffix) and len(n) > len(suffix)]
    return tuple(str(m).lower() for m in modalities) if modalities else None


def describe(model_name: str, handler: Any) -> tuple[str, str]:
    """(modality, stage) of a handler: its declared ``metrics_labels`` (every mmfuse.serving.handler.Handler has
    them); a handler of your own without them is labelled by its model."""
    declared = getattr(handler, "metrics_labels", None)
    if declared:
        return str(declared[0]), str(declared[1])
    return model_name, "execute"


def count_statuses(outputs: Mapping[str, np.ndarray], modality: str,
                   modalities: tuple[str, ...] | None) -> Counter:
    """{(modality, status): rows} from a STATUS [B,1] or MODALITY_STATUS [B,N] output."""
    counts: Counter = Counter()
    if "MODALITY_STATUS" in outputs and modalities:
        for row in decode_strings(outputs["MODALITY_STATUS"]):
            for name, status in zip(modalities, row):
                counts[(name, status)] += 1
    elif "STATUS" in outputs:
        for row in decode_strings(outputs["STATUS"]):
            counts[(modality, row[0] if row else "")] += 1
    return counts


def count_mask_patterns(outputs: Mapping[str, np.ndarray], modalities: tuple[str, ...] | None) -> Counter:
    """{pattern: rows} from a MODALITY_MASK [B,N] output, pattern = contributing modalities joined by '+'."""
    counts: Counter = Counter()
    if "MODALITY_MASK" in outputs and modalities:
        mask = np.asarray(outputs["MODALITY_MASK"], dtype=bool).reshape(outputs["MODALITY_MASK"].shape[0], -1)
        for row in mask:
            counts["+".join(m for m, on in zip(modalities, row) if on) or "none"] += 1
    return counts


class NullMetrics:
    """Records nothing (no custom-metric API available)."""

    def observe(self, outputs: Mapping[str, np.ndarray], rows: int, seconds: float) -> None:
        pass


@dataclass
class ModelMetrics:
    """The metrics of one model instance. ``observe`` is called once per handler call."""

    pb: Any
    model_name: str
    modality: str
    stage: str
    modalities: tuple[str, ...] | None

    def __post_init__(self) -> None:
        self._families: dict[str, Any] = {}
        self._metrics: dict[tuple, Any] = {}
        self._failed = False
        for name, (description, kind, _labels) in FAMILIES.items():
            kind_value = getattr(self.pb.MetricFamily, kind, None)
            if kind_value is not None:  # HISTOGRAM needs Triton >= 24.08
                self._families[name] = self.pb.MetricFamily(name=name, description=description, kind=kind_value)

    @classmethod
    def create(cls, pb: Any, model_name: str, handler: Any) -> ModelMetrics | NullMetrics:
        if getattr(pb, "MetricFamily", None) is None:
            return NullMetrics()
        modality, stage = describe(model_name, handler)
        try:
            return cls(pb, model_name, modality, stage, fusion_modalities(handler))
        except Exception as error:  # noqa: BLE001 - metrics must never stop a model from loading
            log.warning("model '%s': custom metrics disabled: %s", model_name, error)
            return NullMetrics()

    def _metric(self, family: str, **labels: str):
        key = (family, tuple(sorted(labels.items())))
        metric = self._metrics.get(key)
        if metric is None:
            kwargs = {"buckets": list(DURATION_BUCKETS)} if FAMILIES[family][1] == "HISTOGRAM" else {}
            metric = self._families[family].Metric(labels=labels, **kwargs)
            self._metrics[key] = metric
        return metric

    def observe(self, outputs: Mapping[str, np.ndarray], rows: int, seconds: float) -> None:
        try:
            stage = {"model": self.model_name, "modality": self.modality, "stage": self.stage}
            self._metric(EXECUTIONS, **stage).increment(1)
            self._metric(EXECUTED_ROWS, **stage).increment(rows)
            self._metric(DURATION_US, **stage).increment(seconds * 1e6)
            if DURATION_HISTOGRAM in self._families:
                self._metric(DURATION_HISTOGRAM, **stage).observe(seconds)
            for (modality, status), n in count_statuses(outputs, self.modality, self.modalities).items():
                self._metric(ROWS, model=self.model_name, modality=modality, status=status).increment(n)
            for pattern, n in count_mask_patterns(outputs, self.modalities).items():
                self._metric(MASK_PATTERNS, model=self.model_name, pattern=pattern).increment(n)
        except Exception as error:  # noqa: BLE001 - metrics never fail a request
            if not self._failed:
                self._failed = True
                log.warning("model '%s': recording metrics failed: %s", self.model_name, error)
