"""Triton's response cache on a real tritonserver: what it gives, and the two facts that limit it.

`mmfuse serve --response-cache-mb N` starts Triton's local cache; a model opts in with
`response_cache { enable: true }`. Two behaviours of Triton 2.51 are checked here because mmfuse's
guards rest on them (if an upgrade changes either, these tests fail and the guard can go):
its cache key ignores the outputs a request asks for, and a reload keeps the cached responses.
"""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from mmfuse.repository import set_parameters
from mmfuse.wire import bytes_column, infer_inputs
from tests.e2e.conftest import start_server, tiny_repository

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # starts a tritonserver of its own

CACHED = ("image_preprocess", "text_preprocess", "text_encoder")


@pytest.fixture(scope="module")
def cached(tmp_path_factory, checkpoint):
    repo = tiny_repository(tmp_path_factory.mktemp("cache") / "model_repository", checkpoint)
    for model in CACHED:
        path = repo / model / "config.pbtxt"
        path.write_text(path.read_text() + "\nresponse_cache { enable: true }\n")
    server = start_server(repo, tmp_path_factory.mktemp("cache-logs") / "tritonserver", model_control_mode="explicit",
                          load_models=("embed_image", "embed_text"), response_cache_bytes=16 << 20)
    yield server, repo
    server.stop()


def counts(client, model: str) -> dict[str, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
    return {k: int(stats.get(k, {}).get("count", 0)) for k in ("success", "cache_hit", "cache_miss")}


def column(name: str, values: list[bytes]) -> grpcclient.InferInput:
    return infer_inputs({name: bytes_column(values)})[0]


def jpeg(colour) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def test_a_repeated_image_is_answered_from_the_cache(cached):
    server, _ = cached
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        before = counts(client, "image_preprocess")
        first = client.infer("embed_image", [column("IMAGE", [jpeg((200, 30, 30))])]).as_numpy("EMBEDDING")
        again = client.infer("embed_image", [column("IMAGE", [jpeg((200, 30, 30))])]).as_numpy("EMBEDDING")
        other = client.infer("embed_image", [column("IMAGE", [jpeg((30, 30, 200))])]).as_numpy("EMBEDDING")
        after = counts(client, "image_preprocess")
    assert after["cache_miss"] - before["cache_miss"] == 2  # the first red image and the blue one
    assert after["cache_hit"] - before["cache_hit"] == 1  # the red image again: not decoded a second time
    np.testing.assert_array_equal(again, first)
    assert not np.allclose(other, first)


def test_triton_cache_key_ignores_the_outputs_asked_for(cached):
    """Why `mmfuse reconfigure` refuses a cache on a model whose ensembles ask it for different outputs."""
    server, _ = cached
    tokens = np.zeros((1, 77), np.int64)
    tokens[0, :4] = (49406, 320, 1000, 49407)
    request = grpcclient.InferInput("TOKENS", list(tokens.shape), "INT64")
    request.set_data_from_numpy(tokens)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.infer("text_encoder", [request], outputs=[grpcclient.InferRequestedOutput("EMBEDDING")])
        both = client.infer("text_encoder", [request], outputs=[grpcclient.InferRequestedOutput("EMBEDDING"),
                                                                  grpcclient.InferRequestedOutput("SEQUENCE")])
    assert [o.name for o in both.get_response().outputs] == ["EMBEDDING"]  # SEQUENCE asked for, silently missing


def test_triton_keeps_cached_responses_across_a_reload_and_reconfigure_refuses(cached):
    server, repo = cached
    caption = [b"a red circle left of a blue square"]
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        fp32 = client.infer("embed_text", [column("TEXT", caption)]).as_numpy("EMBEDDING")
        assert counts(client, "text_preprocess")["cache_miss"] > 0

        # mmfuse reconfigure refuses a live change to a model with cached responses; nothing is sent.
        set_parameters(repo, "text_preprocess", {"max_text_chars": "999"})
        out = subprocess.run([sys.executable, "-m", "mmfuse.cli", "reconfigure", "--model-repository", str(repo),
                              "--url", server.grpc_url, "text_preprocess"], capture_output=True, text=True, timeout=200)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "stale cached responses" in out.stderr and "model 'text_preprocess'" in out.stderr
        served = client.get_model_config("text_preprocess").config.parameters["max_text_chars"].string_value
        assert served != "999"

        # The fact behind it: text_encoder reloaded in bf16 still answers the same caption with its fp32 embedding.
        set_parameters(repo, "text_encoder", {"precision": "bf16"})
        client.load_model("text_encoder")
        assert client.get_model_config("text_encoder").config.parameters["precision"].string_value == "bf16"
        stale = client.infer("embed_text", [column("TEXT", caption)]).as_numpy("EMBEDDING")
        np.testing.assert_array_equal(stale, fp32)  # bit for bit: from the cache, not from the bf16 model
