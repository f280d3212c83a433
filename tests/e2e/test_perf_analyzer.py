"""mmfuse.perf_analyzer against the real tritonserver of the session (the tiny repository): one closed-loop run and
one fixed-rate run of embed_text with requests of two distinct rows. Nothing about speed is asserted: what is
asserted is what perf_analyzer sent, counted by Triton's own statistics."""
from __future__ import annotations

import pytest

from mmfuse import perf_analyzer as pa
from mmfuse import triton_stats
from mmfuse.wire import bytes_column

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

ROWS = 2
POOL = [{"TEXT": bytes_column([f"a photo of thing {r}.{i}" for i in range(ROWS)])} for r in range(4)]


def _rows(stats: dict) -> int:
    return sum(int(size) * count for size, count in stats["batch_sizes"].items())


@pytest.fixture
def statistics(server):
    from tritonclient.grpc import InferenceServerClient

    with InferenceServerClient(server.grpc_url) as client:
        yield lambda: triton_stats.snapshot(client)


def test_closed_loop_run(server, statistics):
    before = statistics()
    r = pa.run(server.grpc_url, "embed_text", POOL, concurrency=2, window_ms=400, warmup_requests=2,
               server_pid=server.process.pid, timeout_s=60)
    after = triton_stats.delta(before, statistics(), ["embed_text", "text_preprocess"])
    assert r["load_generator"] == "perf_analyzer" and r["mode"] == "closed" and r["concurrency"] == 2
    assert r["batch"] == ROWS and f"-b {ROWS} --concurrency-range 2" in r["command_line"]
    assert r["requests"] > 0 and r["errors"] == 0
    assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"]
    assert r["items_per_s"] == pytest.approx(r["requests_per_s"] * ROWS)
    assert r["seconds"] == pytest.approx(r["requests"] / r["requests_per_s"])
    assert r["server_cpu_s"] is not None and r["server_cpu_s"] > 0
    # The three windows reported, the warm-up and the requests between windows: Triton got at least those.
    assert after["embed_text"]["requests"] >= r["requests"] + 2 and after["embed_text"]["failures"] == 0
    # Every request carried its two rows: the first step saw twice as many rows as requests.
    assert _rows(after["text_preprocess"]) == ROWS * after["text_preprocess"]["requests"]


def test_fixed_rate_run_of_an_exact_count(server, statistics):
    before = statistics()
    r = pa.run(server.grpc_url, "embed_text", POOL, request_rate=20, request_count=24, server_pid=server.process.pid,
               sample_memory=True, timeout_s=60)
    after = triton_stats.delta(before, statistics(), ["embed_text", "text_preprocess"])
    assert r["mode"] == "rate" and r["request_rate"] == 20 and "--async" in r["command"]
    assert r["requests"] == 24 and r["errors"] == 0 and len(r["latencies_ms"]) == 24
    assert after["embed_text"]["requests"] == 24  # no warm-up, no windows: exactly the count
    assert _rows(after["text_preprocess"]) == 24 * ROWS
    assert r["seconds"] > 0 and 1 <= r["max_in_flight"] <= 24
    assert 0 <= r["delayed_fraction"] <= 1 and r["rss_peak"] >= r["rss_idle"] > 0
    assert max(r["latencies_ms"]) >= r["p99_ms"] >= r["p50_ms"] > 0
