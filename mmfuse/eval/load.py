"""Performance under load, on loopback: closed-loop concurrency and open-loop request rates.

Every run is bounded twice, by a request count and by a duration, and sends one-row requests drawn
in turn from a small pool of real inputs (shapes images, captions, embeddings the server made). What
is measured per run:

* client side: requests sent, completed, errors by gRPC status, throughput (completed / wall time),
  latency p50 / p95 / p99 / mean from the moment a request is handed to gRPC to its response (as
  perf_analyzer measures it);
* server memory, of the server's process tree (tritonserver and its python-backend stubs): the
  proportional set size before the run (PSS: each shared page split between the processes that map
  it; a sum of RSS would count torch's libraries once per stub), and the resident memory sampled
  every 50 ms: (peak - before) / the most requests in flight at once ("memory per request");
* Triton's statistics API, the difference over the run: per composing model of the ensemble, requests,
  executions, queue and compute time per request, and the batch sizes that dynamic batching formed;
  the fusion step's (queue + compute) share of the ensemble's end-to-end time.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .served_heads import tree_pss_bytes, tree_rss_bytes

FUSION_MODELS = ("fusion", "fusion_pooled", "fusion_image_text_tabular")


@dataclass
class Run:
    ensemble: str
    mode: str  # closed | open
    load: float  # concurrency (closed) or requests per second (open)
    sent: int = 0
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    max_in_flight: int = 0
    late_sends: int = 0  # open loop: sends more than 5 ms behind schedule
    rss_idle: int | None = None
    rss_peak: int | None = None
    pss_idle: int | None = None
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    ensemble_stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        pct = (lambda q: round(float(np.percentile(lat, q)), 3)) if len(lat) else (lambda q: None)
        per_request = None
        if self.rss_idle is not None and self.rss_peak is not None and self.max_in_flight:
            per_request = max(0, self.rss_peak - self.rss_idle) / self.max_in_flight
        fusion = [s for name, s in self.steps.items() if name in FUSION_MODELS]
        e2e_us = self.ensemble_stats.get("request_us")
        share = None
        if fusion and e2e_us:
            share = round((fusion[0]["queue_us"] + fusion[0]["compute_us"]) / e2e_us, 4)
        return {
            "ensemble": self.ensemble, "mode": self.mode,
            ("concurrency" if self.mode == "closed" else "rate_per_s"): self.load,
            "sent": self.sent, "completed": self.completed, "errors": dict(self.errors),
            "seconds": round(self.seconds, 6),
            "throughput_per_s": round(self.completed / self.seconds, 3) if self.seconds else None,
            "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99),
                           "mean": round(float(lat.mean()), 3) if len(lat) else None},
            "max_in_flight": self.max_in_flight, "late_sends": self.late_sends,
            "memory": {"idle_pss_bytes": self.pss_idle, "idle_rss_bytes": self.rss_idle,
                       "peak_rss_bytes": self.rss_peak,
                       "bytes_per_request_in_flight": None if per_request is None else int(per_request)},
            "server": {"ensemble": self.ensemble_stats, "steps": self.steps, "fusion_share": share},
        }


# -- Triton's statistics API -------------------------------------------------------------------------------------
def statistics(client) -> dict[str, dict]:
    """{model name: its statistics} (every version summed into one entry: a model serves one version here)."""
    out: dict[str, dict] = {}
    for m in client.get_inference_statistics(as_json=True).get("model_stats", []):
        out[m["name"]] = m
    return out


def _ns(stats: Mapping, key: str) -> tuple[int, int]:
    entry = stats.get("inference_stats", {}).get(key, {})
    return int(entry.get("count", 0) or 0), int(entry.get("ns", 0) or 0)


def _batches(stats: Mapping) -> dict[int, int]:
    return {int(b["batch_size"]): int(b.get("compute_infer", {}).get("count", 0) or 0)
            for b in stats.get("batch_stats", [])}


def step_delta(before: Mapping, after: Mapping) -> dict[str, Any]:
    """What one model did between two statistics snapshots."""
    def diff(key):
        c1, n1 = _ns(after, key)
        c0, n0 = _ns(before, key) if before else (0, 0)
        return c1 - c0, n1 - n0

    requests, success_ns = diff("success")
    queue_c, queue_ns = diff("queue")
    comp = {k: diff(k) for k in ("compute_input", "compute_infer", "compute_output")}
    b1, b0 = _batches(after), _batches(before) if before else {}
    batches = {size: b1[size] - b0.get(size, 0) for size in sorted(b1) if b1[size] - b0.get(size, 0) > 0}
    executions = int(after.get("execution_count", 0) or 0) - int((before or {}).get("execution_count", 0) or 0)
    per = (lambda ns, c: round(ns / c / 1000.0, 3) if c else 0.0)
    compute_us = sum(per(ns, c) for c, ns in comp.values())
    return {
        "requests": requests, "failures": diff("fail")[0], "executions": executions,
        "request_us": per(success_ns, requests), "queue_us": per(queue_ns, queue_c),
        "compute_input_us": per(comp["compute_input"][1], comp["compute_input"][0]),
        "compute_infer_us": per(comp["compute_infer"][1], comp["compute_infer"][0]),
        "compute_output_us": per(comp["compute_output"][1], comp["compute_output"][0]),
        "compute_us": round(compute_us, 3),
        "batch_sizes": {str(k): v for k, v in batches.items()},
        "mean_batch": round(sum(k * v for k, v in batches.items()) / max(1, sum(batches.values())), 3),
    }


def composing_models(client, ensemble: str) -> list[str]:
    config = client.get_model_config(ensemble).config
    out = []
    for step in config.ensemble_scheduling.step:
        if step.model_name not in out:
            out.append(step.model_name)
    return out


# -- inputs ------------------------------------------------------------------------------------------------------
def request_pool(client, options, ensemble: str, images: Sequence[bytes], texts: Sequence[str],
                 seed: int = 0) -> list[dict[str, np.ndarray]]:
    """One-row requests for any ensemble, from its served config: IMAGE -> images, TEXT -> captions,
    <M>_EMBEDDING / <M>_VALID -> what embed_image / embed_text return for them, FEATURES -> seeded normals."""
    from mmfuse.clients._runtime import call

    config = client.get_model_config(ensemble).config
    n = len(images)
    embeddings: dict[str, np.ndarray] = {}

    def embedding(modality: str) -> np.ndarray:
        if modality not in embeddings:
            if modality == "IMAGE":
                column = np.array([[x] for x in images], dtype=object)
                embeddings[modality] = call(client, "embed_image", {"IMAGE": column}, ["EMBEDDING"], options)["EMBEDDING"]
            else:
                column = np.array([[t.encode()] for t in texts], dtype=object)
                embeddings[modality] = call(client, "embed_text", {"TEXT": column}, ["EMBEDDING"], options)["EMBEDDING"]
        return embeddings[modality]

    rng = np.random.default_rng(seed)
    columns: dict[str, np.ndarray] = {}
    for tensor in config.input:
        name = tensor.name
        dims = [d if d > 0 else 1 for d in tensor.dims]
        if name == "IMAGE":
            columns[name] = np.array([[x] for x in images], dtype=object)
        elif name == "TEXT":
            columns[name] = np.array([[t.encode()] for t in texts], dtype=object)
        elif name.endswith("_EMBEDDING"):
            columns[name] = embedding(name[: -len("_EMBEDDING")]).astype(np.float32)
        elif name.endswith("_VALID"):
            columns[name] = np.ones((n, 1), dtype=bool)
        else:
            columns[name] = rng.standard_normal((n, *dims)).astype(np.float32)
    return [{k: v[i : i + 1] for k, v in columns.items()} for i in range(n)]


def _infer_inputs(request: Mapping[str, np.ndarray]) -> list:
    import tritonclient.grpc.aio as aio
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in request.items():
        datatype = "BYTES" if array.dtype == object else np_to_triton_dtype(array.dtype)
        tensor = aio.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


# -- memory ------------------------------------------------------------------------------------------------------
class MemorySampler:
    def __init__(self, pid: int | None, interval_s: float = 0.05):
        self.pid, self.interval_s = pid, interval_s
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def idle(self) -> int | None:
        return tree_rss_bytes(self.pid) if self.pid else None

    def __enter__(self) -> "MemorySampler":
        if self.pid:
            self.peak = tree_rss_bytes(self.pid)
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak or 0, tree_rss_bytes(self.pid))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak = max(self.peak or 0, tree_rss_bytes(self.pid))


# -- the two load shapes -----------------------------------------------------------------------------------------
async def _closed(url: str, ensemble: str, pool: list, outputs: Sequence[str], concurrency: int,
                  max_requests: int, max_seconds: float, timeout_s: float, run: Run) -> None:
    import tritonclient.grpc.aio as aio
    from tritonclient.utils import InferenceServerException

    requested = [aio.InferRequestedOutput(o) for o in outputs]
    prepared = [_infer_inputs(r) for r in pool]
    client = aio.InferenceServerClient(url)
    in_flight = 0
    started = time.perf_counter()
    deadline = started + max_seconds

    async def worker() -> None:
        nonlocal in_flight
        while run.sent < max_requests and time.perf_counter() < deadline:
            inputs = prepared[run.sent % len(prepared)]
            run.sent += 1
            in_flight += 1
            run.max_in_flight = max(run.max_in_flight, in_flight)
            t0 = time.perf_counter()
            try:
                await client.infer(ensemble, inputs, outputs=requested, client_timeout=timeout_s)
                run.latencies_ms.append((time.perf_counter() - t0) * 1000.0)
                run.completed += 1
            except InferenceServerException as error:
                key = str(error.status() or "error")
                run.errors[key] = run.errors.get(key, 0) + 1
            finally:
                in_flight -= 1

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        run.seconds = time.perf_counter() - started
        await client.close()


async def _open(url: str, ensemble: str, pool: list, outputs: Sequence[str], rate: float, max_requests: int,
                max_seconds: float, timeout_s: float, max_outstanding: int, run: Run) -> None:
    import tritonclient.grpc.aio as aio
    from tritonclient.utils import InferenceServerException

    requested = [aio.InferRequestedOutput(o) for o in outputs]
    prepared = [_infer_inputs(r) for r in pool]
    client = aio.InferenceServerClient(url)
    in_flight = 0
    tasks = []

    async def one(inputs) -> None:
        nonlocal in_flight
        t0 = time.perf_counter()
        try:
            await client.infer(ensemble, inputs, outputs=requested, client_timeout=timeout_s)
            run.latencies_ms.append((time.perf_counter() - t0) * 1000.0)
            run.completed += 1
        except InferenceServerException as error:
            key = str(error.status() or "error")
            run.errors[key] = run.errors.get(key, 0) + 1
        finally:
            in_flight -= 1

    total = max(1, min(max_requests, int(rate * max_seconds)))
    started = time.perf_counter()
    try:
        for i in range(total):
            target = started + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.005:
                run.late_sends += 1
            if in_flight >= max_outstanding:  # the server is not keeping up: do not queue without bound
                run.errors["client_backlog"] = run.errors.get("client_backlog", 0) + 1
                run.sent += 1
                continue
            in_flight += 1
            run.sent += 1
            run.max_in_flight = max(run.max_in_flight, in_flight)
            tasks.append(asyncio.ensure_future(one(prepared[i % len(prepared)])))
        await asyncio.gather(*tasks)
    finally:
        run.seconds = time.perf_counter() - started
        await client.close()


def measure(client, url: str, ensemble: str, pool: list, outputs: Sequence[str], mode: str, load: float,
            max_requests: int, max_seconds: float, server_pid: int | None, timeout_s: float = 30.0,
            max_outstanding: int = 256) -> Run:
    """One bounded run, with statistics and memory around it."""
    run = Run(ensemble, mode, load)
    models = [ensemble] + composing_models(client, ensemble)
    sampler = MemorySampler(server_pid)
    run.pss_idle = tree_pss_bytes(server_pid) if server_pid else None
    run.rss_idle = sampler.idle()
    before = statistics(client)
    with sampler:
        if mode == "closed":
            coro = _closed(url, ensemble, pool, outputs, int(load), max_requests, max_seconds, timeout_s, run)
        else:
            coro = _open(url, ensemble, pool, outputs, float(load), max_requests, max_seconds, timeout_s,
                         max_outstanding, run)
        asyncio.run(coro)
    run.rss_peak = sampler.peak
    after = statistics(client)
    for name in models:
        delta = step_delta(before.get(name, {}), after.get(name, {}))
        if name == ensemble:
            run.ensemble_stats = delta
        else:
            run.steps[name] = delta
    return run


def warm_up(client, options, ensemble: str, pool: list, outputs: Sequence[str], rounds: int = 2) -> None:
    from mmfuse.clients._runtime import call

    for request in pool[: max(1, rounds)]:
        call(client, ensemble, request, list(outputs), options)


def default_rates(capacity_per_s: float, fractions: Sequence[float] = (0.25, 0.5, 0.9)) -> list[float]:
    """Open-loop rates as fractions of the best closed-loop throughput, rounded to 2 significant digits."""
    out = []
    for f in fractions:
        r = max(0.5, capacity_per_s * f)
        digits = max(0, 1 - int(np.floor(np.log10(r))))
        out.append(round(r, digits))
    return sorted(set(out))

