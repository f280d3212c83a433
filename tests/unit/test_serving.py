"""mmfuse.serving.adapter.TritonAdapter behind a small typed fake of triton_python_backend_utils.

The fake implements only what the adapter uses, with the real signatures and semantics
(https://github.com/triton-inference-server/python_backend#usage): one InferenceResponse per request,
errors carried as TritonError(message, code) with the codes as class attributes.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from mmfuse.serving.adapter import TritonAdapter
from mmfuse.serving.errors import ConfigError, InvalidInputError
from mmfuse.serving.fusion import FusionHandler, late_fusion
from mmfuse.serving.handler import InputSpec
from mmfuse.serving.text_preprocess import TextPreprocessor
from tests.unit.conftest import (
    SHIPPED_MODEL,
    assert_names,
    bytes_column,
    decode_column,
    late_fusion_config,
    load_model_config,
    triton_args,
    with_parameters,
)


# -- the fake ----------------------------------------------------------------------------------------------
class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        if not isinstance(name, str) or not isinstance(array, np.ndarray):
            raise TypeError("Tensor(name: str, array: numpy.ndarray)")
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class TritonError(Exception):
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = INTERNAL):
        super().__init__(message)
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


@dataclass
class InferenceRequest:
    inputs: Sequence[Tensor]
    requested: Sequence[str] = ()

    def requested_output_names(self) -> list[str]:
        return list(self.requested)


@dataclass
class InferenceResponse:
    output_tensors: Sequence[Tensor] = field(default_factory=list)
    error: TritonError | None = None

    def __post_init__(self):
        if self.error is not None and not isinstance(self.error, TritonError):
            raise TypeError("error must be a TritonError")
        if not all(isinstance(t, Tensor) for t in self.output_tensors):
            raise TypeError("output_tensors must be Tensors")

    def has_error(self) -> bool:
        return self.error is not None

    def outputs(self) -> dict[str, np.ndarray]:
        return {t.name(): t.as_numpy() for t in self.output_tensors}


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    if not isinstance(request, InferenceRequest):
        raise TypeError("get_input_tensor_by_name expects an InferenceRequest")
    return next((t for t in request.inputs if t.name() == name), None)


_NUMPY_TYPES = {
    "TYPE_BOOL": bool, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32, "TYPE_FP64": np.float64, "TYPE_STRING": np.object_,
}


def triton_string_to_numpy(triton_type: str):
    return _NUMPY_TYPES[triton_type]


class FakePbUtils:
    """Stands in for the triton_python_backend_utils module."""

    Tensor = Tensor
    TritonError = TritonError
    InferenceRequest = InferenceRequest
    InferenceResponse = InferenceResponse
    get_input_tensor_by_name = staticmethod(get_input_tensor_by_name)
    triton_string_to_numpy = staticmethod(triton_string_to_numpy)


def request(requested: Sequence[str] = (), **arrays: np.ndarray) -> InferenceRequest:
    return InferenceRequest([Tensor(name, array) for name, array in arrays.items()], requested)


def execute(adapter: TritonAdapter, requests: Sequence[InferenceRequest]) -> list[InferenceResponse]:
    responses = adapter.execute(requests)
    assert len(responses) == len(requests), "exactly one response per request"
    assert all(isinstance(r, InferenceResponse) for r in responses)
    return responses


def assert_same_outputs(got: InferenceResponse, expected: InferenceResponse) -> None:
    assert not got.has_error() and not expected.has_error()
    got_outputs, expected_outputs = got.outputs(), expected.outputs()
    assert got_outputs.keys() == expected_outputs.keys()
    for name, array in expected_outputs.items():
        assert got_outputs[name].dtype == array.dtype, name
        np.testing.assert_array_equal(got_outputs[name], array, err_msg=name)


# -- the two real handlers, as the mmfuse backend builds them --------------------------------------------------------------
@pytest.fixture(scope="module")
def fusion_adapter() -> TritonAdapter:
    return TritonAdapter(FakePbUtils, triton_args("fusion", late_fusion_config()), FusionHandler.from_parameters)


@pytest.fixture(scope="module")
def text_adapter(open_clip_tiny) -> TritonAdapter:
    adapter = TritonAdapter(FakePbUtils, triton_args("text_preprocess"), TextPreprocessor.from_parameters)
    assert adapter.handler.spec.model_name == SHIPPED_MODEL
    return adapter


def fusion_request(seed: int, rows: int, requested: Sequence[str] = ()) -> InferenceRequest:
    rng = np.random.default_rng(seed)
    return request(
        requested,
        IMAGE_EMBEDDING=rng.standard_normal((rows, 8)).astype(np.float32),
        IMAGE_VALID=rng.random((rows, 1)) < 0.7,
        TEXT_EMBEDDING=rng.standard_normal((rows, 8)).astype(np.float32),
        TEXT_VALID=rng.random((rows, 1)) < 0.7,
    )


def text_request(seed: int, rows: int, requested: Sequence[str] = ()) -> InferenceRequest:
    words = ["a photo of a cat", "", "two dogs", "   ", "an astronaut on the moon", "x" * 5000, "coffee"]
    return request(requested, TEXT=bytes_column([words[(seed + i) % len(words)] for i in range(rows)]))


def malformed(good: InferenceRequest, kind: str, tensor: str) -> InferenceRequest:
    """A good request with ``tensor`` dropped (missing) or sent as int32/float32 (dtype)."""
    inputs = []
    for t in good.inputs:
        if t.name() != tensor:
            inputs.append(t)
        elif kind == "dtype":
            wrong = np.int32 if t.as_numpy().dtype.kind == "f" else np.float32
            inputs.append(Tensor(tensor, np.zeros(t.as_numpy().shape, wrong)))
    return InferenceRequest(inputs, good.requested)


MODELS = {
    # model: (adapter fixture, request builder, tensor to break)
    "fusion": ("fusion_adapter", fusion_request, "TEXT_VALID"),
    "fusion-embedding": ("fusion_adapter", fusion_request, "IMAGE_EMBEDDING"),
    "text_preprocess": ("text_adapter", text_request, "TEXT"),
}
PATTERNS = [
    ["good"],
    ["missing"],
    ["good", "dtype"],
    ["dtype", "good", "missing"],
    ["good", "good", "missing", "good"],
    ["missing", "good", "dtype", "good", "good"],
    ["dtype", "missing", "dtype", "missing", "dtype"],
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("model", MODELS)
def test_one_response_per_request_in_order(request, model, pattern):
    fixture, build, tensor = MODELS[model]
    adapter = request.getfixturevalue(fixture)
    requests = []
    for i, kind in enumerate(pattern):
        good = build(seed=i, rows=1 + i % 3)
        requests.append(good if kind == "good" else malformed(good, kind, tensor))

    responses = execute(adapter, requests)

    for i, (kind, req, response) in enumerate(zip(pattern, requests, responses)):
        if kind == "good":
            assert_same_outputs(response, execute(adapter, [req])[0])
            rows = req.inputs[0].as_numpy().shape[0]
            assert all(a.shape[0] == rows for a in response.outputs().values())
            continue
        assert response.has_error(), f"request {i} ({kind}) must fail"
        assert response.error.code() == TritonError.INVALID_ARG
        assert response.output_tensors == []
        if kind == "missing":
            assert_names(response.error.message(), adapter.model_name, f"'{tensor}'", "missing")
        else:
            assert_names(response.error.message(), adapter.model_name, f"'{tensor}'", "dtype",
                         str(get_input_tensor_by_name(req, tensor).as_numpy().dtype))


def test_fusion_outputs_are_correct(fusion_adapter):
    req = fusion_request(seed=42, rows=3)
    [response] = execute(fusion_adapter, [req])
    arrays = {t.name(): t.as_numpy() for t in req.inputs}
    embeddings = np.stack([arrays["IMAGE_EMBEDDING"], arrays["TEXT_EMBEDDING"]], axis=1)
    mask = np.concatenate([arrays["IMAGE_VALID"], arrays["TEXT_VALID"]], axis=1)
    expected, contributed = late_fusion(embeddings, mask, (0.5, 0.5))  # weights of the shipped config
    out = response.outputs()
    np.testing.assert_array_equal(out["FUSED"], expected)
    np.testing.assert_array_equal(out["MODALITY_MASK"], contributed)


def test_text_outputs_are_correct(text_adapter, tiny_tokenizer):
    texts = ["a photo of a cat", "", "two dogs"]
    [response] = execute(text_adapter, [request(TEXT=bytes_column(texts))])
    out = response.outputs()
    np.testing.assert_array_equal(out["TOKENS"][[0, 2]], tiny_tokenizer([texts[0], texts[2]]).numpy())
    np.testing.assert_array_equal(out["VALID"], [[True], [False], [True]])
    assert decode_column(out["STATUS"]) == ["ok", "missing", "ok"]


# -- output dtypes and requested outputs ----------------------------------------------------------------------
def test_output_dtypes_come_from_the_config(fusion_adapter, text_adapter):
    fused = execute(fusion_adapter, [fusion_request(0, 2)])[0].outputs()
    assert {k: v.dtype for k, v in fused.items()} == {
        "FUSED": np.float32, "MODALITY_MASK": np.bool_, "MODALITY_STATUS": np.object_}
    text = execute(text_adapter, [text_request(0, 2)])[0].outputs()
    assert {k: v.dtype for k, v in text.items()} == {"TOKENS": np.int64, "VALID": np.bool_, "STATUS": np.object_}


def test_output_dtype_follows_an_edited_config():
    config = late_fusion_config()
    next(o for o in config["output"] if o["name"] == "FUSED")["data_type"] = "TYPE_FP16"
    adapter = TritonAdapter(FakePbUtils, triton_args("fusion", config), FusionHandler.from_parameters)
    out = execute(adapter, [fusion_request(0, 2)])[0].outputs()
    assert out["FUSED"].dtype == np.float16


def test_only_requested_outputs_are_returned(fusion_adapter):
    requests = [
        fusion_request(1, 2, requested=["FUSED"]),
        fusion_request(2, 1, requested=["MODALITY_STATUS", "MODALITY_MASK"]),
        fusion_request(3, 3, requested=[]),  # none named: all outputs
    ]
    responses = execute(fusion_adapter, requests)
    assert [set(r.outputs()) for r in responses] == [
        {"FUSED"}, {"MODALITY_STATUS", "MODALITY_MASK"}, {"FUSED", "MODALITY_MASK", "MODALITY_STATUS"}]
    alone = execute(fusion_adapter, [fusion_request(1, 2)])[0].outputs()
    np.testing.assert_array_equal(responses[0].outputs()["FUSED"], alone["FUSED"])


# -- a handler that fails: per-request retry ----------------------------------------------------------------------
class Doubler:
    """X [B,D] -> Y = 2X. Refuses negative input (InvalidInputError), crashes on NaN (ValueError)."""

    inputs = (InputSpec("X", "f", row_rank=1),)

    def __init__(self):
        self.calls: list[int] = []
        self.closed = False

    def __call__(self, batch: Mapping[str, np.ndarray], requested: frozenset[str]) -> dict[str, np.ndarray]:
        x = batch["X"]
        self.calls.append(x.shape[0])
        if np.isnan(x).any():
            raise ValueError("cannot double NaN")
        if (x < 0).any():
            raise InvalidInputError("model 'doubler': input tensor 'X' holds a negative value")
        return {"Y": 2 * x}

    def close(self) -> None:
        self.closed = True


DOUBLER_CONFIG = {
    "name": "doubler",
    "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [-1]}],
    "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [-1]}],
}


def doubler_adapter(handler: Doubler | None = None) -> TritonAdapter:
    handler = handler or Doubler()
    return TritonAdapter(FakePbUtils, triton_args("doubler", DOUBLER_CONFIG), lambda context, params: handler)


@pytest.mark.parametrize("bad_value, code", [(-1.0, TritonError.INVALID_ARG), (np.nan, TritonError.INTERNAL)])
@pytest.mark.parametrize("bad_index", [0, 2, 4])
def test_failing_request_is_isolated_by_per_request_retry(bad_index, bad_value, code):
    handler = Doubler()
    adapter = doubler_adapter(handler)
    xs = [np.full((1 + i % 2, 3), float(i + 1), np.float32) for i in range(5)]
    xs[bad_index][0, 1] = bad_value
    responses = execute(adapter, [request(X=x) for x in xs])

    assert handler.calls == [sum(x.shape[0] for x in xs)] + [x.shape[0] for x in xs], "batched once, then per request"
    for i, (x, response) in enumerate(zip(xs, responses)):
        if i == bad_index:
            assert response.has_error() and response.error.code() == code
            assert "doubler" in response.error.message()
        else:
            np.testing.assert_array_equal(response.outputs()["Y"], 2 * x)


def test_good_batch_calls_the_handler_once():
    handler = Doubler()
    responses = execute(doubler_adapter(handler), [request(X=np.ones((n, 2), np.float32)) for n in (1, 3, 2)])
    assert handler.calls == [6]
    assert [r.outputs()["Y"].shape for r in responses] == [(1, 2), (3, 2), (2, 2)]


def test_wrong_row_count_from_handler_fails_every_request_but_answers_all():
    class Shrinker(Doubler):
        def __call__(self, batch, requested):
            return {"Y": batch["X"][:-1]}

    responses = execute(doubler_adapter(Shrinker()), [request(X=np.ones((2, 2), np.float32)) for _ in range(3)])
    for response in responses:
        assert response.has_error() and response.error.code() == TritonError.INTERNAL
        assert_names(response.error.message(), "doubler", "'Y'", "rows")


def test_finalize_closes_the_handler():
    handler = Doubler()
    doubler_adapter(handler).finalize()
    assert handler.closed


# -- configuration errors fail the load ----------------------------------------------------------------------------
@pytest.mark.parametrize("model, factory, typo", [
    ("fusion", FusionHandler.from_parameters, "weigths"),
    ("text_preprocess", TextPreprocessor.from_parameters, "max_text_char"),
])
def test_unknown_parameter_fails_construction(open_clip_tiny, model, factory, typo):
    config = with_parameters(load_model_config(model), **{typo: "1"})
    with pytest.raises(ConfigError) as info:
        TritonAdapter(FakePbUtils, triton_args(model, config), factory)
    assert_names(info.value, model, typo)


def test_invalid_parameter_value_fails_construction():
    config = with_parameters(late_fusion_config(), weights="0.5,0.5,0.5")
    with pytest.raises(ConfigError) as info:
        TritonAdapter(FakePbUtils, triton_args("fusion", config), FusionHandler.from_parameters)
    assert_names(info.value, "fusion", "weights")


def test_a_required_input_the_config_does_not_declare_fails_the_load(open_clip_tiny):
    """decode_images set on an image_encoder whose config still declares PIXELS: refused at load, not per request."""
    from mmfuse.serving.encoders import ImageEncoder

    config = with_parameters(load_model_config("image_encoder"), model_name="mmfuse-tiny", pretrained="",
                             allow_random_init="true", decode_images="true")
    with pytest.raises(ConfigError) as info:
        TritonAdapter(FakePbUtils, triton_args("image_encoder", config), ImageEncoder.from_parameters)
    assert_names(info.value, "image_encoder", "'IMAGE'", "PIXELS", "decode_images")


def test_the_adapter_builds_the_handler_config_pbtxt_names():
    adapter = TritonAdapter(FakePbUtils, triton_args("fusion_pooled"))
    assert type(adapter.handler).__name__ == "FusionHandler" and adapter.handler.config.strategy == "late"


def test_a_bad_config_fails_the_load_before_the_handler_is_built(monkeypatch):
    from mmfuse.serving import fusion
    from mmfuse.serving.errors import ConfigError

    def never(*args, **kwargs):
        raise AssertionError("a config with an unknown key must not get as far as building the handler")

    monkeypatch.setattr(fusion.FusionHandler, "build", classmethod(never))
    config = load_model_config("fusion_pooled")
    config["parameters"]["wieghts"] = {"string_value": "1,1"}
    with pytest.raises(ConfigError, match="unknown parameter.*wieghts"):
        TritonAdapter(FakePbUtils, triton_args("fusion_pooled", config))
