"""Bounded queues: overload is answered at once with UNAVAILABLE, not by a time-out."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mmfuse.repository import copy_repository, load_config, save_config
from tests.conftest import encode
from tests.e2e.conftest import start_server
from tests.paths import SHIPPED_REPOSITORY as DEFAULT_MODEL_REPOSITORY

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # starts a tritonserver of its own


@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory):
    repo = copy_repository(DEFAULT_MODEL_REPOSITORY, tmp_path_factory.mktemp("overload") / "repo")
    config = load_config(repo, "image_preprocess")
    config.dynamic_batching.default_queue_policy.max_queue_size = 1
    config.parameters["decode_threads"].string_value = "1"
    save_config(repo, "image_preprocess", config)
    server = start_server(repo, tmp_path_factory.mktemp("overload-logs") / "tritonserver")
    yield server
    server.stop()


def test_full_queue_is_rejected_at_once_and_the_server_recovers(small_queue_server):
    from mmfuse.clients import MMFuseClient, ServerUnavailable

    rng = np.random.default_rng(0)
    heavy = [encode(rng.integers(0, 256, (1500, 1500, 3), dtype=np.uint8), "JPEG", quality=95) for _ in range(4)]

    def call(_):
        with MMFuseClient(small_queue_server.grpc_url, timeout_s=120) as client:
            started = time.perf_counter()
            try:
                client.embed_image(heavy)
                return "ok", time.perf_counter() - started
            except ServerUnavailable as error:
                assert "queue" in str(error).lower()
                return "rejected", time.perf_counter() - started

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(call, range(32)))
    ok = [t for kind, t in outcomes if kind == "ok"]
    rejected = [t for kind, t in outcomes if kind == "rejected"]
    assert ok, "some requests must be served"
    assert rejected, "a queue of 1 under 16 concurrent callers must reject some requests"
    # Rejections do not wait for the work ahead of them.
    assert np.median(rejected) < np.median(ok)
    with MMFuseClient(small_queue_server.grpc_url) as client:
        assert client.embed_image(heavy[:1]).valid.all()
