"""The one adapter between Triton's Python backend and mmfuse's handlers.

Every Python model of the repository runs the ``mmfuse`` backend, whose one
``model.py`` (``mmfuse/serving/triton_model.py``) is three lines around
``TritonAdapter``: it passes in the ``triton_python_backend_utils`` module (so
this file never imports Triton and is tested with a small typed fake). The adapter

* builds the handler config.pbtxt names (parameter ``handler``, see handler.py)
  from its parameters, once (``initialize``),
* checks each request's tensors against the handler's declared inputs and
  answers a structurally wrong request with INVALID_ARG naming the tensor,
* concatenates the rows of all requests in a dynamic batch, calls the handler
  once, and splits the outputs back,
* returns exactly one response per request, in order, always,
* maps the library's exceptions to TritonError codes in one place.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import ConfigError, InternalError, InvalidInputError, MMFuseError
from .handler import Handler, InputSpec, check_config, undeclared_inputs
from .metrics import ModelMetrics
from .params import ModelContext, Params

log = logging.getLogger("mmfuse")


HandlerFactory = Callable[[ModelContext, Params], Handler]

_KIND_NAMES = {"O": "TYPE_STRING (bytes)", "b": "TYPE_BOOL", "f": "a floating-point type", "i": "an integer type"}


def _kind_ok(array: np.ndarray, kind: str) -> bool:
    if kind == "O":
        return array.dtype.kind in ("O", "S", "U")
    if kind == "i":
        return array.dtype.kind in ("i", "u")
    return array.dtype.kind == kind


def validate_request_inputs(
    model_name: str, specs: Sequence[InputSpec], arrays: Mapping[str, np.ndarray | None]
) -> tuple[dict[str, np.ndarray], int]:
    """Check one request's tensors; return the present ones and the request's row count."""
    present: dict[str, np.ndarray] = {}
    rows = None
    for spec in specs:
        array = arrays.get(spec.name)
        if array is None:
            if spec.optional:
                continue
            raise InvalidInputError(f"model '{model_name}': required input tensor '{spec.name}' is missing")
        if not _kind_ok(array, spec.kind):
            raise InvalidInputError(
                f"model '{model_name}': input tensor '{spec.name}' has dtype {array.dtype}, "
                f"expected {_KIND_NAMES.get(spec.kind, spec.kind)}"
            )
        if array.ndim < 1:
            raise InvalidInputError(f"model '{model_name}': input tensor '{spec.name}' has no batch dimension")
        if spec.row_rank is not None and array.ndim - 1 != spec.row_rank:
            raise InvalidInputError(
                f"model '{model_name}': input tensor '{spec.name}' has shape {list(array.shape)}, "
                f"expected rank {spec.row_rank + 1} ([batch] + {spec.row_rank} dims)"
            )
        if rows is None:
            rows = array.shape[0]
        elif array.shape[0] != rows:
            raise InvalidInputError(
                f"model '{model_name}': input tensor '{spec.name}' has batch size {array.shape[0]}, "
                f"other inputs have {rows}"
            )
        present[spec.name] = array
    if rows is None:
        raise InvalidInputError(f"model '{model_name}': request has no input tensors")
    return present, rows


def concat_batches(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """Concatenate per-request inputs along the batch axis; None if their row shapes differ."""
    if len(parts) == 1:
        return dict(parts[0])
    names = set(parts[0])
    if any(set(p) != names for p in parts):
        return None
    out = {}
    for name in names:
        arrays = [p[name] for p in parts]
        if any(a.shape[1:] != arrays[0].shape[1:] for a in arrays):
            return None
        out[name] = np.concatenate(arrays, axis=0)
    return out


class TritonAdapter:
    """Runs a handler behind Triton's Python-backend interface. ``pb`` is triton_python_backend_utils."""

    def __init__(self, pb: Any, args: Mapping[str, str], factory: HandlerFactory | None = None):
        self.pb = pb
        config = json.loads(args["model_config"])
        self.context = ModelContext.from_triton_args(args)
        self.model_name = self.context.model_name
        params = Params.from_model_config(self.model_name, config)
        declared = [t["name"] for t in config.get("input", [])]
        if factory is None:  # the handler config.pbtxt names: its config checked in full before any weights load
            handler_class, parsed = check_config(self.context, params, declared,
                                                 [t["name"] for t in config.get("output", [])])
            self.handler = handler_class.build(self.context, parsed)
        else:  # a factory of a model.py of your own
            self.handler = factory(self.context, params)
            params.reject_unknown()
            undeclared = undeclared_inputs(self.model_name, self.handler.inputs, declared, type(self.handler).__name__)
            if undeclared:  # every request would fail: fail the load instead, saying why
                raise ConfigError("; ".join(undeclared))
        self.output_dtypes = {
            out["name"]: pb.triton_string_to_numpy(out["data_type"]) for out in config.get("output", [])
        }
        self.output_names = frozenset(self.output_dtypes)
        # Outputs the handler gives only in some configurations (e.g. SCORE without a task head).
        self.optional_outputs = frozenset(getattr(self.handler, "optional_outputs", ()))
        # Metrics hook (python_backends/metrics.py): per-modality series on Triton's metrics port.
        self.metrics = ModelMetrics.create(pb, self.model_name, self.handler)
        log.info("mmfuse model '%s' ready (%s)", self.model_name, type(self.handler).__name__)

    # -- helpers -------------------------------------------------------------------
    def _error_response(self, error: Exception):
        if isinstance(error, MMFuseError):
            code_name, message = error.code, str(error)
        else:
            code_name = "INTERNAL"
            message = f"model '{self.model_name}': internal error: {type(error).__name__}: {error}"
        code = getattr(self.pb.TritonError, code_name, self.pb.TritonError.INTERNAL)
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message, code))

    def _response(self, outputs: Mapping[str, np.ndarray], requested: frozenset[str]):
        tensors = []
        for name in sorted(requested):
            if name not in outputs:
                raise InternalError(f"model '{self.model_name}': handler produced no output '{name}'")
            array = np.ascontiguousarray(outputs[name], dtype=self.output_dtypes[name])
            tensors.append(self.pb.Tensor(name, array))
        return self.pb.InferenceResponse(output_tensors=tensors)

    def _requested(self, request) -> frozenset[str]:
        names = frozenset(request.requested_output_names() or ())
        # An empty list means "all outputs" (direct calls that name none): all the handler can give.
        return (names & self.output_names) or (self.output_names - self.optional_outputs)

    def _run(self, inputs: Mapping[str, np.ndarray], requested: frozenset[str]) -> dict[str, np.ndarray]:
        handler_started = time.perf_counter()
        outputs = self.handler(inputs, requested)
        handler_seconds = time.perf_counter() - handler_started
        rows = next(iter(inputs.values())).shape[0]
        for name in requested:
            if name in outputs and outputs[name].shape[0] != rows:
                raise InternalError(
                    f"model '{self.model_name}': output '{name}' has {outputs[name].shape[0]} rows for {rows} input rows"
                )
        self.metrics.observe(outputs, rows, handler_seconds)  # metrics hook
        return outputs

    # -- Triton entry point --------------------------------------------------------------
    def execute(self, requests: Sequence[Any]) -> list[Any]:
        """Exactly one response per request, in order, whatever happens."""
        responses: list[Any] = [None] * len(requests)
        valid: list[tuple[int, dict[str, np.ndarray], int, frozenset[str]]] = []
        for i, request in enumerate(requests):
            try:
                arrays = {}
                for spec in self.handler.inputs:
                    tensor = self.pb.get_input_tensor_by_name(request, spec.name)
                    arrays[spec.name] = None if tensor is None else tensor.as_numpy()
                present, rows = validate_request_inputs(self.model_name, self.handler.inputs, arrays)
                valid.append((i, present, rows, self._requested(request)))
            except Exception as error:  # noqa: BLE001 - every failure becomes that request's error
                responses[i] = self._error_response(error)

        if valid:
            started = time.perf_counter()
            batch = concat_batches([present for _, present, _, _ in valid])
            requested = frozenset().union(*(req for _, _, _, req in valid))
            if batch is not None:
                try:
                    outputs = self._run(batch, requested)
                    offset = 0
                    for i, _, rows, req in valid:
                        part = {name: outputs[name][offset : offset + rows] for name in req if name in outputs}
                        offset += rows
                        try:
                            responses[i] = self._response(part, req)
                        except Exception as error:  # noqa: BLE001
                            responses[i] = self._error_response(error)
                except Exception as error:  # noqa: BLE001 - a failed batch: retry request by request below
                    log.warning("model '%s': batched call failed (%s); retrying per request", self.model_name, error)
                    batch = None
            if batch is None:
                for i, present, _, req in valid:
                    try:
                        responses[i] = self._response(self._run(present, req), req)
                    except Exception as error:  # noqa: BLE001
                        responses[i] = self._error_response(error)
            log.debug("model '%s': %d requests in %.2f ms", self.model_name, len(valid),
                      1e3 * (time.perf_counter() - started))
        return responses

    def finalize(self) -> None:
        close = getattr(self.handler, "close", None)
        if close is not None:
            close()
