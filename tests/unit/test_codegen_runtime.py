"""clients/_runtime.py without a server: inputs checked against the spec, batching, retries with back-off on
UNAVAILABLE only, option validation. The retry loop is driven by a typed fake connection here, and by a real
gRPC channel to a closed port (the e2e tests cover a real server)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from mmfuse.clients import ClientOptions, TLSOptions
from mmfuse.clients._runtime import EnsembleSpec, TensorSpec, batch_slices, call, encode_inputs
from mmfuse.clients.embed_text import EmbedTextClient, EmbedTextRequest
from mmfuse.clients.errors import DeadlineExceeded, InvalidRequest, MMFuseClientError, ServerUnavailable
from mmfuse.clients.fuse_image_text import SPEC as FUSE
from mmfuse.server import free_port

SPEC = EnsembleSpec("m", 4, (TensorSpec("X", "FP32", (2, -1), "x"), TensorSpec("S", "BYTES", (1,), "s")),
                    (TensorSpec("Y", "FP32", (-1,), "y"),))


def test_bytes_inputs_become_object_columns_with_every_byte_kept():
    arrays, n = encode_inputs(FUSE, {"IMAGE": [b"\xff\xd8jpeg\x00\x00", None], "TEXT": ["caf\u00e9", b""]})
    assert n == 2
    assert arrays["IMAGE"].shape == (2, 1) and arrays["IMAGE"].dtype == object
    assert arrays["IMAGE"][0, 0] == b"\xff\xd8jpeg\x00\x00", "trailing NULs must survive (numpy 'S' drops them)"
    assert arrays["IMAGE"][1, 0] == b"", "None is the empty element (a missing modality)"
    assert arrays["TEXT"][0, 0] == "caf\u00e9".encode()


def test_bytes_inputs_reject_a_single_string_and_foreign_types():
    with pytest.raises(ValueError, match=r"input text \(TEXT, BYTES \[B, 1\]\): give one item per row"):
        encode_inputs(FUSE, {"IMAGE": [b""], "TEXT": "a cat"})
    with pytest.raises(ValueError, match="elements must be bytes, str or None, got int"):
        encode_inputs(FUSE, {"IMAGE": [b""], "TEXT": [3]})


def test_shapes_dtypes_and_lengths_are_checked_before_sending():
    ok, n = encode_inputs(SPEC, {"X": np.zeros((3, 2, 7), np.float64), "S": [["a"], ["b"], ["c"]]})
    assert n == 3 and ok["X"].dtype == np.float32 and ok["S"].shape == (3, 1)
    with pytest.raises(ValueError, match=r"m: input x \(X, FP32 \[B, 2, -1\]\): got shape \[3, 3, 7\]"):
        encode_inputs(SPEC, {"X": np.zeros((3, 3, 7)), "S": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="expected float32 values, got an array of <U1"):
        encode_inputs(SPEC, {"X": np.full((1, 2, 1), "a"), "S": ["a"]})
    with pytest.raises(ValueError, match="m: inputs have different lengths: X=3, S=2"):
        encode_inputs(SPEC, {"X": np.zeros((3, 2, 1)), "S": ["a", "b"]})
    with pytest.raises(ValueError, match=r"m: input s \(S\) is required"):
        encode_inputs(SPEC, {"X": np.zeros((3, 2, 1))})


def test_integers_are_cast_only_when_they_fit():
    spec = EnsembleSpec("u", 0, (TensorSpec("N", "UINT8", (2,), "n"),), (TensorSpec("Y", "FP32", (1,), "y"),))
    assert encode_inputs(spec, {"N": [1, 255]})[0]["N"].dtype == np.uint8
    with pytest.raises(ValueError, match="expected uint8 values, got an array of int64"):
        encode_inputs(spec, {"N": [-1, 256]})


def test_batches():
    assert batch_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    client = EmbedTextClient(max_batch=500)
    assert client._batch_size(None) == 64, "never more than the ensemble's max_batch_size"
    assert EmbedTextClient(max_batch=16)._batch_size(None) == 16


# -- the retry loop ---------------------------------------------------------------------------------------
class FakeResult:
    def as_numpy(self, name: str) -> np.ndarray:
        return np.zeros((1, 2), np.float32)


@dataclass
class FakeConnection:
    """Answers each infer with the next status in ``script`` ("ok" returns a result)."""

    script: list[str]
    calls: list[dict] = field(default_factory=list)

    def infer(self, model_name, inputs, outputs=None, client_timeout=None, headers=None, compression_algorithm=None):
        self.calls.append({"timeout": client_timeout, "compression": compression_algorithm})
        status = self.script.pop(0)
        if status == "ok":
            return FakeResult()
        raise InferenceServerException(f"server said {status}", status=f"StatusCode.{status}")


ARRAYS = {"TEXT": np.array([[b"a"]], dtype=object)}


def test_unavailable_is_retried_with_back_off_then_succeeds():
    conn = FakeConnection(["UNAVAILABLE", "UNAVAILABLE", "ok"])
    options = ClientOptions(retries=3, backoff_s=0.04, backoff_max_s=1.0, timeout_s=5, compression="gzip")
    started = time.perf_counter()
    out = call(conn, "embed_text", ARRAYS, ["EMBEDDING"], options)
    elapsed = time.perf_counter() - started
    assert out["EMBEDDING"].shape == (1, 2)
    assert len(conn.calls) == 3
    assert elapsed >= 0.02 + 0.04, "equal jitter: at least half of 0.04 s, then of 0.08 s"
    assert conn.calls[0] == {"timeout": 5, "compression": "gzip"}


def test_retries_are_bounded_and_the_error_says_how_many_attempts():
    conn = FakeConnection(["UNAVAILABLE"] * 3)
    with pytest.raises(ServerUnavailable, match=r"embed_text at 127.0.0.1:8001 failed \(UNAVAILABLE\) after 3 attempts"):
        call(conn, "embed_text", ARRAYS, ["EMBEDDING"], ClientOptions(retries=2, backoff_s=0.001))
    assert conn.script == []


@pytest.mark.parametrize("status, error", [("INVALID_ARGUMENT", InvalidRequest),
                                           ("DEADLINE_EXCEEDED", DeadlineExceeded),
                                           ("INTERNAL", MMFuseClientError)])
def test_other_errors_are_not_retried(status, error):
    conn = FakeConnection([status, "ok"])
    with pytest.raises(error, match=f"failed \\({status}\\): server said {status}"):
        call(conn, "embed_text", ARRAYS, ["EMBEDDING"], ClientOptions(retries=5, backoff_s=0.001))
    assert len(conn.calls) == 1


def test_a_closed_port_is_unavailable_and_retried_on_a_real_channel():
    url = f"127.0.0.1:{free_port()}"
    started = time.perf_counter()
    with EmbedTextClient(url, retries=2, backoff_s=0.1, timeout_s=5) as client:
        with pytest.raises(ServerUnavailable, match=f"embed_text at {url} failed \\(UNAVAILABLE\\) after 3 attempts"):
            client.infer(EmbedTextRequest(text=["a"]))
    assert time.perf_counter() - started >= 0.05 + 0.1


def test_options_are_validated_with_messages_that_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="compression must be one of"):
        ClientOptions(compression="zstd")
    with pytest.raises(ValueError, match="retries must be >= 0"):
        ClientOptions(retries=-1)
    with pytest.raises(ValueError, match="max_in_flight must be >= 1"):
        ClientOptions(max_in_flight=0)
    with pytest.raises(ValueError, match="TLS: root_certificates file .*nope.pem does not exist"):
        TLSOptions(root_certificates=tmp_path / "nope.pem")
    with pytest.raises(ValueError, match="private_key and certificate_chain go together"):
        TLSOptions(private_key=tmp_path / "k.pem")
    with pytest.raises(TypeError, match="embed_text: expected request type EmbedTextRequest, got dict"):
        EmbedTextClient().infer({"text": ["a"]})
