"""mmfuse.serving.metrics behind a typed fake of the python backend's custom-metric API.

The fake follows triton_python_backend_utils: ``MetricFamily(name, description, kind)`` with kinds
COUNTER / GAUGE / HISTOGRAM as class attributes, ``family.Metric(labels=dict[, buckets=list])``,
``metric.increment(value)`` (counters: value >= 0), ``metric.observe(value)`` (histograms), ``metric.value()``.
A family name may be created once per process (the stub refuses a second one).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from mmfuse.serving import metrics as m
from mmfuse.serving.adapter import TritonAdapter
from mmfuse.serving.fusion import FusionHandler
from mmfuse.serving.params import ModelContext, Params
from mmfuse.serving.tabular import TabularEncoder
from mmfuse.wire import status_column, status_matrix


class FakeMetric:
    def __init__(self, family: FakeMetricFamily, labels: dict[str, str], buckets=None):
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise TypeError("labels must be a dict of str to str")
        if (family.kind == FakeMetricFamily.HISTOGRAM) != (buckets is not None):
            raise ValueError("buckets are required for histograms and only for them")
        self.family, self.labels, self.buckets = family, labels, buckets
        self._value = 0.0
        self.observations: list[float] = []

    def increment(self, value: float) -> None:
        if self.family.kind == FakeMetricFamily.HISTOGRAM:
            raise TypeError("increment on a histogram")
        if self.family.kind == FakeMetricFamily.COUNTER and value < 0:
            raise ValueError("a counter cannot decrease")
        self._value += value

    def observe(self, value: float) -> None:
        if self.family.kind != FakeMetricFamily.HISTOGRAM:
            raise TypeError("observe on a non-histogram")
        self.observations.append(value)

    def value(self) -> float:
        return self._value


class FakeMetricFamily:
    COUNTER, GAUGE, HISTOGRAM = 0, 1, 2
    registry: dict[str, FakeMetricFamily] = {}

    def __init__(self, name: str, description: str, kind: int):
        if name in FakeMetricFamily.registry:
            raise ValueError(f"Metric family with name '{name}' already exists!")
        FakeMetricFamily.registry[name] = self
        self.name, self.description, self.kind = name, description, kind
        self.metrics: list[FakeMetric] = []

    def Metric(self, labels, buckets=None):  # noqa: N802 - the real API's name
        metric = FakeMetric(self, labels, buckets)
        self.metrics.append(metric)
        return metric


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class FakeRequest:
    def __init__(self, **arrays: np.ndarray):
        self.inputs = {k: FakeTensor(k, v) for k, v in arrays.items()}

    def requested_output_names(self) -> list[str]:
        return ["FUSED", "MODALITY_MASK", "MODALITY_STATUS"]  # what fuse_image_text asks of fusion


class FakeResponse:
    def __init__(self, output_tensors=(), error=None):
        self.output_tensors, self.error = list(output_tensors), error


class FakeTritonError(Exception):
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = INTERNAL):
        super().__init__(message)
        self.code = code


class FakePb:
    """triton_python_backend_utils, with custom metrics."""

    MetricFamily = FakeMetricFamily
    Tensor = FakeTensor
    InferenceResponse = FakeResponse
    TritonError = FakeTritonError

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.inputs.get(name)

    @staticmethod
    def triton_string_to_numpy(name: str):
        return {"TYPE_FP32": np.float32, "TYPE_BOOL": np.bool_, "TYPE_STRING": np.object_}[name]


class FakePbWithoutMetrics(FakePb):
    MetricFamily = None


@pytest.fixture(autouse=True)
def fresh_process():
    """Each test is a fresh stub process: no family exists yet."""
    FakeMetricFamily.registry = {}
    yield


def series(name: str) -> dict[tuple, float]:
    """{sorted label items: value} of one family."""
    family = FakeMetricFamily.registry[name]
    return {tuple(sorted(x.labels.items())): x.value() for x in family.metrics}


def value(name: str, **labels: str) -> float:
    return series(name).get(tuple(sorted(labels.items())), 0.0)


# -- pure helpers ------------------------------------------------------------------------------------------------
def fusion_handler(modalities: str = "image,text", weights: str = "1,1") -> FusionHandler:
    params = Params("fusion", {"modalities": modalities, "weights": weights})
    return FusionHandler.from_parameters(ModelContext("fusion", model_dir=None), params)


def test_describe_knows_every_shipped_handler_kind():
    from mmfuse.serving.handler import HANDLERS, resolve

    labels = {name: resolve(name).metrics_labels for name in HANDLERS}
    assert labels == {"image_preprocess": ("image", "preprocess"), "text_preprocess": ("text", "preprocess"),
                      "image_encoder": ("image", "encode"), "text_encoder": ("text", "encode"),
                      "tabular_encoder": ("tabular", "encode"), "fusion": ("all", "fusion")}
    assert m.describe("fusion", fusion_handler()) == ("all", "fusion")
    assert m.describe("tabular_encoder", TabularEncoder.__new__(TabularEncoder)) == ("tabular", "encode")
    assert m.describe("custom", object()) == ("custom", "execute")


def test_fusion_modalities_come_from_the_config_or_the_embedding_inputs():
    assert m.fusion_modalities(fusion_handler("image,text,tabular", "1,1,1")) == ("image", "text", "tabular")

    class ContractOnly:  # a fusion handler without a .config: the N-modality input contract names them
        inputs = [type("Spec", (), {"name": n})() for n in ("AUDIO_EMBEDDING", "AUDIO_VALID", "TEXT_EMBEDDING")]

    assert m.fusion_modalities(ContractOnly()) == ("audio", "text")
    assert m.fusion_modalities(object()) is None


def test_count_statuses_reads_status_and_modality_status():
    single = {"STATUS": status_column(["ok", "missing", "ok", "undecodable"])}
    assert m.count_statuses(single, "image", None) == {("image", "ok"): 2, ("image", "missing"): 1,
                                                      ("image", "undecodable"): 1}
    fused = {"MODALITY_STATUS": status_matrix([["ok", "too_large"], ["missing", "ok"]])}
    assert m.count_statuses(fused, "all", ("image", "text")) == {
        ("image", "ok"): 1, ("text", "too_large"): 1, ("image", "missing"): 1, ("text", "ok"): 1}


def test_mask_patterns_name_the_contributing_modalities():
    mask = np.array([[True, True], [False, True], [False, False], [True, False], [False, True]])
    assert m.count_mask_patterns({"MODALITY_MASK": mask}, ("image", "text")) == {
        "image+text": 1, "text": 2, "none": 1, "image": 1}


# -- ModelMetrics -------------------------------------------------------------------------------------------------
def test_every_family_is_created_once_with_an_mmfuse_name():
    m.ModelMetrics.create(FakePb, "fusion", fusion_handler())
    assert set(FakeMetricFamily.registry) == set(m.FAMILIES)
    assert all(name.startswith(m.PREFIX) for name in FakeMetricFamily.registry)
    assert FakeMetricFamily.registry[m.DURATION_HISTOGRAM].kind == FakeMetricFamily.HISTOGRAM
    assert FakeMetricFamily.registry[m.ROWS].kind == FakeMetricFamily.COUNTER


def test_no_metric_api_means_no_metrics():
    recorder = m.ModelMetrics.create(FakePbWithoutMetrics, "fusion", fusion_handler())
    assert isinstance(recorder, m.NullMetrics)
    recorder.observe({"STATUS": status_column(["ok"])}, 1, 0.1)  # does nothing, raises nothing
    assert FakeMetricFamily.registry == {}


def test_observe_counts_rows_statuses_patterns_and_time():
    recorder = m.ModelMetrics.create(FakePb, "fusion", fusion_handler())
    outputs = {
        "FUSED": np.zeros((3, 4), np.float32),
        "MODALITY_MASK": np.array([[True, True], [False, True], [False, True]]),
        "MODALITY_STATUS": status_matrix([["ok", "ok"], ["undecodable", "ok"], ["missing", "ok"]]),
    }
    recorder.observe(outputs, 3, 0.002)
    recorder.observe(outputs, 3, 0.004)
    stage = dict(model="fusion", modality="all", stage="fusion")
    assert value(m.EXECUTIONS, **stage) == 2
    assert value(m.EXECUTED_ROWS, **stage) == 6
    assert value(m.DURATION_US, **stage) == pytest.approx(6000)
    histogram = FakeMetricFamily.registry[m.DURATION_HISTOGRAM].metrics[0]
    assert histogram.observations == [0.002, 0.004] and histogram.buckets == list(m.DURATION_BUCKETS)
    assert value(m.ROWS, model="fusion", modality="image", status="ok") == 2
    assert value(m.ROWS, model="fusion", modality="image", status="undecodable") == 2
    assert value(m.ROWS, model="fusion", modality="image", status="missing") == 2
    assert value(m.ROWS, model="fusion", modality="text", status="ok") == 6
    assert value(m.MASK_PATTERNS, model="fusion", pattern="image+text") == 2
    assert value(m.MASK_PATTERNS, model="fusion", pattern="text") == 4
    # one Metric object per label set, reused
    assert len(FakeMetricFamily.registry[m.EXECUTIONS].metrics) == 1


def test_a_failing_metric_never_fails_the_caller(caplog):
    recorder = m.ModelMetrics.create(FakePb, "fusion", fusion_handler())

    def broken(value):
        raise RuntimeError("shared memory full")

    recorder._metric(m.EXECUTIONS, model="fusion", modality="all", stage="fusion").increment = broken
    recorder.observe({}, 1, 0.001)
    recorder.observe({}, 1, 0.001)
    assert sum("recording metrics failed" in r.message for r in caplog.records) == 1  # logged once


# -- through the adapter -------------------------------------------------------------------------------------------
def fusion_args() -> dict[str, str]:
    """``initialize`` args of the shipped fusion model, its config as the JSON Triton hands over."""
    from google.protobuf import json_format

    from mmfuse.repository import load_config
    from tests.paths import SHIPPED_REPOSITORY as DEFAULT_MODEL_REPOSITORY

    config = json_format.MessageToDict(load_config(DEFAULT_MODEL_REPOSITORY, "fusion"), preserving_proto_field_name=True)
    # plain late fusion (the requests below carry embeddings only, no token sequences)
    config["parameters"].update({"strategy": {"string_value": "late"}, "head_dir": {"string_value": ""}})
    return {"model_config": json.dumps(config), "model_name": "fusion",
            "model_repository": str(DEFAULT_MODEL_REPOSITORY / "fusion"),
            "model_version": str(ModelContext.latest_version(DEFAULT_MODEL_REPOSITORY / "fusion")),
            "model_instance_kind": "CPU", "model_instance_device_id": "0"}


def fusion_request(rows: int, image_valid: bool) -> FakeRequest:
    rng = np.random.default_rng(rows)
    return FakeRequest(
        IMAGE_EMBEDDING=rng.standard_normal((rows, 8)).astype(np.float32),
        IMAGE_VALID=np.full((rows, 1), image_valid),
        IMAGE_STATUS=status_column(["ok" if image_valid else "missing"] * rows),
        TEXT_EMBEDDING=rng.standard_normal((rows, 8)).astype(np.float32),
        TEXT_VALID=np.ones((rows, 1), bool),
    )


def test_the_adapter_records_each_dynamic_batch():
    adapter = TritonAdapter(FakePb, fusion_args(), FusionHandler.from_parameters)
    responses = adapter.execute([fusion_request(2, True), fusion_request(3, False)])
    assert all(r.error is None for r in responses)
    stage = dict(model="fusion", modality="all", stage="fusion")
    assert value(m.EXECUTIONS, **stage) == 1  # one handler call for the batch of two requests
    assert value(m.EXECUTED_ROWS, **stage) == 5
    assert value(m.ROWS, model="fusion", modality="image", status="ok") == 2
    assert value(m.ROWS, model="fusion", modality="image", status="missing") == 3
    assert value(m.ROWS, model="fusion", modality="text", status="ok") == 5
    assert value(m.MASK_PATTERNS, model="fusion", pattern="image+text") == 2
    assert value(m.MASK_PATTERNS, model="fusion", pattern="text") == 3


def test_a_request_that_fails_validation_is_not_counted_as_rows():
    adapter = TritonAdapter(FakePb, fusion_args(), FusionHandler.from_parameters)
    bad = fusion_request(2, True)
    del bad.inputs["TEXT_VALID"]
    responses = adapter.execute([bad, fusion_request(1, True)])
    assert responses[0].error is not None and responses[1].error is None
    assert value(m.EXECUTED_ROWS, model="fusion", modality="all", stage="fusion") == 1


def test_the_adapter_works_with_a_backend_that_has_no_metrics():
    adapter = TritonAdapter(FakePbWithoutMetrics, fusion_args(), FusionHandler.from_parameters)
    assert isinstance(adapter.metrics, m.NullMetrics)
    assert adapter.execute([fusion_request(1, True)])[0].error is None


def test_families_table_is_documented_in_the_module():
    for name in m.FAMILIES:
        assert name in m.__doc__, name
