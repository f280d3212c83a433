"""Raw KServe-v2 gRPC requests: whatever tensors a test wants, including ones no client library would build.

``statuses`` (a STATUS / MODALITY_STATUS output as lists of str) is mmfuse.wire's ``decode_statuses``."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc
import numpy as np
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc

from mmfuse.wire import decode_statuses as statuses  # noqa: F401 - imported by the tests from here
from tests.corpus import WireTensor, bytes_tensor

UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class Wire:
    """A raw gRPC connection to tritonserver's inference service."""

    def __init__(self, url: str, credentials: grpc.ChannelCredentials | None = None):
        self.channel = (grpc.secure_channel(url, credentials, options=UNLIMITED) if credentials is not None
                        else grpc.insecure_channel(url, options=UNLIMITED))
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def infer(self, model: str, tensors: Iterable[WireTensor], outputs: Sequence[str] = (),
              timeout: float = 120.0) -> dict[str, np.ndarray]:
        """Send; return every output as numpy (raises grpc.RpcError on an error status)."""
        request = service_pb2.ModelInferRequest(model_name=model)
        for tensor in tensors:
            entry = request.inputs.add()
            entry.name, entry.datatype = tensor.name, tensor.datatype
            entry.shape.extend(tensor.shape)
            request.raw_input_contents.append(tensor.raw)
        for name in outputs:
            request.outputs.add().name = name
        response = self.stub.ModelInfer(request, timeout=timeout)
        result = InferResult(response)
        return {out.name: result.as_numpy(out.name) for out in response.outputs}

    def rows(self, model: str, columns: dict[str, Sequence[bytes]], timeout: float = 120.0) -> dict[str, np.ndarray]:
        """TYPE_STRING columns (one bytes element per row) in, outputs out."""
        return self.infer(model, [bytes_tensor(name, list(items)) for name, items in columns.items()],
                          timeout=timeout)

    def server_ready(self, timeout: float = 10.0) -> bool:
        return self.stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout).ready

    def model_ready(self, model: str, timeout: float = 10.0) -> bool:
        return self.stub.ModelReady(service_pb2.ModelReadyRequest(name=model), timeout=timeout).ready
