"""Per-modality metrics on the real server's metrics port, under concurrent load.

Scrape /metrics, send a known mix of rows from several threads, scrape again: the mmfuse_* counters
grow by exactly what was sent, next to Triton's own nv_inference_* counters.
"""
from __future__ import annotations

import re
import time
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import encode
from tests.e2e.conftest import MAX_TEXT_CHARS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

THREADS, REQUESTS_PER_THREAD = 6, 4


def scrape(url: str) -> dict[tuple, float]:
    """Prometheus text format -> {(name, sorted label items): value}."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match and not line.startswith("#"):
            labels = tuple(sorted(_LABEL.findall(match.group(2) or "")))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def by_label(after: dict, before: dict, name: str, label: str, **fixed: str) -> dict[str, float]:
    """{value of `label`: delta} over the series of `name` that carry the `fixed` labels."""
    out = defaultdict(float)
    for (n, labels), value in after.items():
        d = dict(labels)
        if n == name and all(d.get(k) == v for k, v in fixed.items()):
            out[d.get(label, "")] += value - before.get((n, labels), 0.0)
    return {k: v for k, v in out.items() if v}


def test_metrics_count_every_modality_under_load(server, photos):
    from mmfuse.clients import MMFuseClient

    image = encode(photos["coffee"])
    # One request = 5 rows with a known status mix per modality.
    images = [image, b"", b"\xff\xd8 not a jpeg", image, image]
    texts = ["a cup of coffee", "a cup", "coffee", "x" * (MAX_TEXT_CHARS + 1), ""]
    expected_image = {"ok": 3, "missing": 1, "undecodable": 1}
    expected_text = {"ok": 3, "missing": 1, "too_large": 1}
    expected_patterns = {"image+text": 1, "text": 2, "image": 2}
    requests = THREADS * REQUESTS_PER_THREAD

    def worker(_):
        with MMFuseClient(server.grpc_url, timeout_s=60) as client:
            for _ in range(REQUESTS_PER_THREAD):
                result = client.fuse_image_text(images, texts)
                assert [s[0] for s in result.status] == ["ok", "missing", "undecodable", "ok", "ok"]

    before = scrape(server.metrics_url)
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(worker, range(THREADS)))
    # Triton's own counters are updated as the responses go out; give the last ones a moment.
    deadline = time.monotonic() + 10
    while True:
        after = scrape(server.metrics_url)
        if delta(after, before, "nv_inference_request_success", model="fuse_image_text", version="1") >= requests:
            break
        assert time.monotonic() < deadline, "Triton's request counter did not reach the number of requests"
        time.sleep(0.2)

    scale = lambda counts: {k: v * requests for k, v in counts.items()}  # noqa: E731
    rows = "mmfuse_modality_rows_total"
    # Preprocessing counts what came in, per modality ...
    assert by_label(after, before, rows, "status", model="image_preprocess", modality="image") == scale(expected_image)
    assert by_label(after, before, rows, "status", model="text_preprocess", modality="text") == scale(expected_text)
    # ... and fusion what it fused, per modality, with the mask patterns.
    assert by_label(after, before, rows, "status", model="fusion", modality="image") == scale(expected_image)
    assert by_label(after, before, rows, "status", model="fusion", modality="text") == scale(expected_text)
    assert by_label(after, before, "mmfuse_mask_pattern_rows_total", "pattern", model="fusion") == \
        scale(expected_patterns)

    # Timings per model execute: every stage of every modality ran, and saw every row.
    for model, modality, stage in [("image_preprocess", "image", "preprocess"), ("image_encoder", "image", "encode"),
                                   ("text_preprocess", "text", "preprocess"), ("text_encoder", "text", "encode"),
                                   ("fusion", "all", "fusion")]:
        labels = dict(model=model, modality=modality, stage=stage)
        calls = delta(after, before, "mmfuse_execute_total", **labels)
        assert 1 <= calls <= requests, (model, calls)  # dynamic batching merges requests
        assert delta(after, before, "mmfuse_execute_rows_total", **labels) == 5 * requests, model
        assert delta(after, before, "mmfuse_execute_duration_us_total", **labels) > 0, model
        assert delta(after, before, "mmfuse_execute_duration_seconds_count", **labels) == calls, model

    # Triton's own per-model latency and failure counters, on the same port.
    assert delta(after, before, "nv_inference_request_success", model="fuse_image_text", version="1") == requests
    assert delta(after, before, "nv_inference_request_failure", model="fuse_image_text", version="1") == 0
    from mmfuse.export import versions

    served = str(versions(server.config.model_repository / "fusion")[-1])  # Triton serves the latest version
    assert delta(after, before, "nv_inference_queue_duration_us", model="fusion", version=served) > 0
    assert delta(after, before, "nv_inference_request_duration_us", model="fuse_image_text", version="1") > 0


def test_the_tabular_modality_is_monitored_too(server):
    import tritonclient.grpc as grpcclient

    features = np.ones((3, 8), np.float32)
    features[1] = np.nan
    features[2, 0] = np.inf
    from mmfuse.wire import bytes_column, infer_inputs

    arrays = {"IMAGE": bytes_column([b"", b"", b""]), "TEXT": bytes_column([b"a", b"b", b"c"]), "FEATURES": features}
    before = scrape(server.metrics_url)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.infer("fuse_image_text_tabular", infer_inputs(arrays))
    after = scrape(server.metrics_url)
    rows = "mmfuse_modality_rows_total"
    expected = {"ok": 1, "missing": 1, "undecodable": 1}
    assert by_label(after, before, rows, "status", model="tabular_encoder", modality="tabular") == expected
    assert by_label(after, before, rows, "status", model="fusion_image_text_tabular", modality="tabular") == expected
    assert by_label(after, before, "mmfuse_mask_pattern_rows_total", "pattern",
                    model="fusion_image_text_tabular") == {"text+tabular": 1, "text": 2}
    assert delta(after, before, "mmfuse_execute_rows_total", model="tabular_encoder", modality="tabular",
                 stage="encode") == 3


def test_every_series_the_dashboard_and_autoscaler_query_is_on_the_metrics_port(server):
    """The Grafana dashboard and the HPA's adapter rule query names the real server exports."""
    import json
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    exprs = [t["expr"] for p in json.loads((root / "deploy/grafana/dashboards/mmfuse.json").read_text())["panels"]
             for t in p["targets"]]
    adapter = [d for d in yaml.safe_load_all((root / "deploy/k8s/prometheus-adapter-rules.yaml").read_text())][0]
    for rule in yaml.safe_load(adapter["data"]["config.yaml"])["rules"]:
        exprs += [rule["seriesQuery"], rule["metricsQuery"]]
    wanted = {n for e in exprs for n in re.findall(r"\b((?:nv|mmfuse)_[a-z0-9_]+)\b", e)}
    from mmfuse.clients import MMFuseClient

    with MMFuseClient(server.grpc_url, timeout_s=60) as client:  # series appear with the first request
        client.fuse_image_text([b""], ["a request"])
    exported = {name for name, _ in scrape(server.metrics_url)}
    assert wanted and wanted <= exported, sorted(wanted - exported)
