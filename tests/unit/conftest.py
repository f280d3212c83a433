"""Shared helpers of the unit tests (no server, no network, no downloads).

* the shipped ``model_repository`` configs, parsed with Triton's own protobuf schema and turned into
  the JSON dict Triton hands to ``initialize`` (``args["model_config"]``);
* ``Params`` / ``ModelContext`` builders;
* TYPE_STRING columns as Triton delivers them;
* the tiny open_clip architecture (registered once) and its tokenizer.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmfuse.serving.params import ModelContext, Params
from mmfuse.wire import bytes_column  # noqa: F401 - the tests' TYPE_STRING columns

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
TINY = "mmfuse-tiny"
SHIPPED_MODEL = "mmfuse-demo"  # what the shipped repository serves (trained demo model)


def pytest_configure(config):
    # Safety net: nothing in the unit tests may reach the network. huggingface_hub reads this when it is
    # first imported, which happens after conftest is loaded.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


# -- model repository --------------------------------------------------------------------------------
def model_names() -> list[str]:
    return sorted(p.parent.name for p in MODEL_REPOSITORY.glob("*/config.pbtxt"))


def load_model_config_proto(name: str):
    """``model_repository/<name>/config.pbtxt`` as a ``ModelConfig`` message (fails on any schema error)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = (MODEL_REPOSITORY / name / "config.pbtxt").read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def load_model_config(name: str) -> dict[str, Any]:
    """The config as the JSON dict Triton passes to the Python backend (``data_type: "TYPE_FP32"``,
    ``parameters: {key: {"string_value": ...}}``)."""
    from google.protobuf import json_format

    return json_format.MessageToDict(load_model_config_proto(name), preserving_proto_field_name=True)


def triton_args(name: str, config: Mapping[str, Any] | None = None, **extra: str) -> dict[str, str]:
    """``args`` of ``TritonPythonModel.initialize`` for a model of the shipped repository."""
    config = load_model_config(name) if config is None else config
    return {
        "model_config": json.dumps(config),
        "model_name": name,
        "model_repository": str(MODEL_REPOSITORY / name),  # Triton passes the model's own folder
        "model_version": str(ModelContext.latest_version(MODEL_REPOSITORY / name)),  # the one Triton serves
        "model_instance_kind": "CPU",
        "model_instance_device_id": "0",
        **extra,
    }


def with_parameters(config: Mapping[str, Any], **values: str) -> dict[str, Any]:
    """A copy of a JSON model config with parameters added or replaced."""
    out = json.loads(json.dumps(config))
    out.setdefault("parameters", {}).update({k: {"string_value": v} for k, v in values.items()})
    return out


def late_fusion_config() -> dict[str, Any]:
    """The shipped fusion config switched to plain late fusion (fixed weights, no head): what the adapter
    tests exercise (the shipped attention head is covered by the strategy and e2e tests)."""
    return with_parameters(load_model_config("fusion"), strategy="late", head_dir="")


def context_for(name: str) -> ModelContext:
    return ModelContext.from_triton_args(triton_args(name))


# -- parameters ----------------------------------------------------------------------------------------
def make_params(model_name: str = "m", /, **raw: str) -> Params:
    return Params(model_name, raw)


def assert_names(error: BaseException, *fragments: str) -> None:
    """An error message must name every fragment (model, key, value, tensor ...)."""
    message = str(error)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message {message!r} does not name {missing}"


# -- Triton TYPE_STRING columns ---------------------------------------------------------------------------
def decode_column(array: np.ndarray) -> list[str]:
    return [item.decode() for item in array.reshape(-1)]


# -- open_clip ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def open_clip_tiny():
    """open_clip with the shipped ``mmfuse-tiny`` architecture registered."""
    import open_clip

    from mmfuse.serving.openclip_models import register_model_configs

    register_model_configs()
    return open_clip


@pytest.fixture(scope="session")
def tiny_tokenizer(open_clip_tiny):
    return open_clip_tiny.get_tokenizer(TINY)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
