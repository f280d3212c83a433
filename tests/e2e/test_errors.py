"""Structurally wrong requests get INVALID_ARG naming the tensor; the server keeps serving."""
from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from mmfuse.wire import bytes_column, infer_inputs

pytestmark = pytest.mark.e2e


def _infer(server, model, inputs):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    return c.infer(model, infer_inputs(inputs), client_timeout=30)


def _text(*items):
    return bytes_column(items)


def test_wrong_dtype_names_the_tensor(server):
    with pytest.raises(InferenceServerException) as info:
        _infer(server, "embed_text", {"TEXT": np.zeros((1, 1), np.float32)})
    assert "INVALID_ARG" in str(info.value.status())
    assert "TEXT" in info.value.message()


def test_missing_tensor_names_the_tensor(server):
    with pytest.raises(InferenceServerException) as info:
        _infer(server, "fuse_image_text", {"IMAGE": _text(b"")})
    assert "INVALID_ARG" in str(info.value.status())
    assert "TEXT" in info.value.message()


def test_wrong_shape_is_rejected(server):
    with pytest.raises(InferenceServerException) as info:
        _infer(server, "embed_text", {"TEXT": np.array([[b"a", b"b"]], dtype=object)})
    assert "INVALID_ARG" in str(info.value.status())


def test_batch_over_max_batch_size_is_rejected(server):
    with pytest.raises(InferenceServerException) as info:
        _infer(server, "embed_text", {"TEXT": _text(*([b"a"] * 65))})
    assert "INVALID_ARG" in str(info.value.status())
    assert "batch" in info.value.message().lower()


def test_client_raises_typed_errors_and_server_keeps_serving(client, server):
    from mmfuse.clients import DeadlineExceeded, InvalidRequest

    with pytest.raises(InvalidRequest) as info:
        client.infer("embed_text", {"TEXT": np.zeros((1, 1), np.float32)}, ["EMBEDDING"])
    assert "embed_text" in str(info.value)
    with pytest.raises(DeadlineExceeded):
        client.embed_text(["a"] * 64, timeout_s=1e-4)
    assert client.embed_text(["still serving"]).valid.all()
