"""Every ensemble through its generated client, sync and asyncio, on the real session server (plaintext).
TLS is in test_generated_clients_tls.py, the command line in test_generated_clients_cli.py."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mmfuse.clients import ClientOptions, DeadlineExceeded, InvalidRequest
from mmfuse.clients._runtime import NUMPY_DTYPES
from mmfuse.clients.embed_image import AsyncEmbedImageClient, EmbedImageClient
from mmfuse.clients.embed_text import AsyncEmbedTextClient, EmbedTextClient, EmbedTextRequest
from mmfuse.clients.ensembles import ASYNC_CLIENTS, CLIENTS, MODULES
from mmfuse.clients.fuse_image_text import AsyncFuseImageTextClient, FuseImageTextClient
from mmfuse.wire import decode_statuses
from tests.e2e.conftest import cosine

pytestmark = pytest.mark.e2e

CAPTIONS = ["an astronaut in a white suit", "a cup of coffee on a saucer", "a cat"]


def rows_for(module, n: int, images: list[bytes]) -> dict:
    """Inputs for any generated ensemble: photos for IMAGE-like BYTES inputs, captions for other BYTES inputs,
    seeded numbers for numeric ones (-1 dims as 3)."""
    rng = np.random.default_rng(0)
    values = {}
    for t in module.SPEC.inputs:
        if t.datatype == "BYTES":
            pool = images if "IMAGE" in t.name.upper() else CAPTIONS
            values[t.field] = [pool[i % len(pool)] for i in range(n)]
        else:
            dims = tuple(d if d > 0 else 3 for d in t.dims)
            values[t.field] = rng.standard_normal((n,) + dims).astype(NUMPY_DTYPES[t.datatype])
    return values


def assert_matches_spec(module, response, n: int) -> None:
    for t in module.SPEC.outputs:
        array = getattr(response, t.field)
        assert array.dtype == np.dtype(NUMPY_DTYPES[t.datatype]), (module.SPEC.name, t.name, array.dtype)
        assert array.shape[0] == n and len(array.shape) == 1 + len(t.dims), (t.name, array.shape)
        assert all(d == -1 or d == s for d, s in zip(t.dims, array.shape[1:])), (t.name, array.shape)


def assert_same(module, a, b) -> None:
    for t in module.SPEC.outputs:
        x, y = getattr(a, t.field), getattr(b, t.field)
        if x.dtype == object:
            assert x.tolist() == y.tolist(), t.name
        else:
            np.testing.assert_allclose(x, y, atol=1e-5, err_msg=t.name)


@pytest.mark.parametrize("name", sorted(CLIENTS))
def test_every_ensemble_sync_and_async_through_its_generated_client(server, name, images):
    module = MODULES[name]
    request = CLIENTS[name].request_type(**rows_for(module, 5, images))
    with CLIENTS[name](server.grpc_url, timeout_s=60) as client:
        assert client.is_ready()
        assert client.metadata()["name"] == name
        sync = client.infer(request, max_batch=2)  # three requests
        assert_matches_spec(module, sync, 5)

    async def run():
        async with ASYNC_CLIENTS[name](server.grpc_url, timeout_s=60) as client:
            assert await client.is_ready()
            return await client.infer(request, max_batch=2, max_in_flight=3)

    asynchronous = asyncio.run(run())
    assert_matches_spec(module, asynchronous, 5)
    assert_same(module, sync, asynchronous)


def test_generated_embeddings_match_open_clip(server, reference, images):
    with EmbedImageClient(server.grpc_url, timeout_s=60) as client:
        out = client.embed_image(images + [b"not an image", None])
    assert out.valid.reshape(-1).tolist() == [True, True, True, False, False]
    assert [s[0] for s in decode_statuses(out.status)] == ["ok", "ok", "ok", "undecodable", "missing"]
    for data, served in zip(images, out.embedding):
        assert cosine(served, reference.image(data)) >= 0.999

    async def texts():
        async with AsyncEmbedTextClient(server.grpc_url, timeout_s=60) as client:
            return await client.embed_text(CAPTIONS)

    out = asyncio.run(texts())
    for text, served in zip(CAPTIONS, out.embedding):
        assert cosine(served, reference.text(text)) >= 0.999


def test_fuse_through_the_generated_clients_equals_the_hand_written_client(server, client, images):
    with FuseImageTextClient(server.grpc_url) as generated:
        out = generated.fuse_image_text([images[0], None, images[2]], [CAPTIONS[0], CAPTIONS[1], None])
    expected = client.fuse_image_text([images[0], None, images[2]], [CAPTIONS[0], CAPTIONS[1], None])
    np.testing.assert_allclose(out.fused, expected.fused, atol=1e-6)
    assert out.modality_mask.tolist() == [[True, True], [False, True], [True, False]]
    assert decode_statuses(out.modality_status) == [["ok", "ok"], ["missing", "ok"], ["ok", "missing"]]


def inference_requests(connection, name: str) -> int:
    stats = connection.get_inference_statistics(name, as_json=True)["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0))


class Recorder:
    def __init__(self):
        self.updates: list[int] = []

    def update(self, n: int) -> None:
        self.updates.append(n)


def test_long_lists_are_split_into_batches_with_progress(server):
    texts = [f"caption number {i}" for i in range(37)]
    with EmbedTextClient(server.grpc_url, max_batch=8) as client:
        before = inference_requests(client.connection, "embed_text")
        recorder = Recorder()
        out = client.embed_text(texts, progress=recorder)
        assert inference_requests(client.connection, "embed_text") - before == 5, "37 rows in batches of 8"
        assert recorder.updates == [8, 8, 8, 8, 5]
        assert out.embedding.shape[0] == 37 and out.valid.all()
        one_batch = client.infer(EmbedTextRequest(texts), max_batch=64)
        np.testing.assert_allclose(out.embedding, one_batch.embedding, atol=1e-5)


def test_progress_bar_is_drawn_on_stderr(server, capsys):
    with EmbedTextClient(server.grpc_url, max_batch=8) as client:
        client.embed_text([f"t{i}" for i in range(20)], progress=True)
    err = capsys.readouterr().err
    assert "embed_text" in err and "20/20" in err, err


def encoder_counts(connection) -> tuple[int, int]:
    """text_encoder's (requests, executions): fewer executions than requests = requests batched together."""
    stats = connection.get_inference_statistics("text_encoder", as_json=True)["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0)), int(stats.get("execution_count", 0))


def test_pipelined_requests_reach_the_server_together_and_come_back_in_order(server):
    """Sequential calls never share a server batch; the asyncio client's in-flight requests do (the dynamic
    batcher merges them), which is what keeps the server busy. Rows come back in input order."""
    texts = [f"row {i}" for i in range(24)]
    with EmbedTextClient(server.grpc_url, max_batch=2) as client:
        r0, e0 = encoder_counts(client.connection)
        expected = client.embed_text(texts)
        r1, e1 = encoder_counts(client.connection)
        assert (r1 - r0, e1 - e0) == (12, 12), "one at a time: every request is its own execution"

        async def run():
            async with AsyncEmbedTextClient(server.grpc_url, max_batch=2, max_in_flight=8) as aclient:
                return await aclient.embed_text(texts)

        pipelined = asyncio.run(run())
        r2, e2 = encoder_counts(client.connection)
    assert r2 - r1 == 12
    assert e2 - e1 < 12, f"8 in flight: the server merged some of the 12 requests (executions: {e2 - e1})"
    np.testing.assert_allclose(pipelined.embedding, expected.embedding, atol=1e-5)


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_compressed_requests_give_the_same_answers(server, images, compression):
    with EmbedImageClient(server.grpc_url) as plain, EmbedImageClient(server.grpc_url, compression=compression) as c:
        np.testing.assert_allclose(c.embed_image(images).embedding, plain.embed_image(images).embedding, atol=1e-6)

    async def run():
        async with AsyncFuseImageTextClient(server.grpc_url, compression=compression) as client:
            return await client.fuse_image_text(images, CAPTIONS)

    assert asyncio.run(run()).modality_mask.all()


def test_a_deadline_too_short_raises_deadline_exceeded_and_is_not_retried(server, images):
    options = ClientOptions(url=server.grpc_url, timeout_s=0.001, retries=3, backoff_s=1.0)
    with EmbedImageClient(options=options) as client:
        with pytest.raises(DeadlineExceeded, match=r"embed_image at .* failed \(DEADLINE_EXCEEDED\):"):
            client.embed_image(images * 4)

    async def run():
        async with AsyncEmbedImageClient(options=options) as client:
            await client.embed_image(images * 4)

    with pytest.raises(DeadlineExceeded):
        asyncio.run(run())


def test_server_side_errors_keep_their_type(server):
    with EmbedTextClient(server.grpc_url) as client:
        with pytest.raises(InvalidRequest, match="INVALID_ARGUMENT"):
            # 65 rows in one request: over max_batch_size; only a caller that bypasses the batching can send it.
            from mmfuse.clients._runtime import call

            call(client.connection, "embed_text", {"TEXT": np.array([[b"a"]] * 65, dtype=object)}, ["EMBEDDING"],
                 client.options)
