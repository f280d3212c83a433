"""Performance under load, on loopback: closed-loop concurrency and open-loop request rates.

The load is Triton's perf_analyzer's (mmfuse.perf_analyzer, as the bench's), or mmfuse.loadgen's asyncio
client with ``load_generator="python"``. Every run sends one-row requests drawn in turn from a small pool of
real inputs (shapes images, captions, embeddings the server made) and is bounded by a request count and a
duration: mmfuse.loadgen stops at whichever comes first; perf_analyzer sends exactly a request count
(``--request-count``, no warm-up: Triton's statistics over the run are those requests), chosen so that the
run fits the duration: at a fixed rate ``rate x seconds`` (at least one second of requests, perf_analyzer's
minimum), in a closed loop ``throughput_hint x seconds`` (the best throughput seen so far) where a hint is
given. What is measured per run:

* client side: requests sent, completed, errors (by gRPC status; with perf_analyzer a failed request ends
  the run: its exit status and message, the requests Triton saw succeed counted as completed), throughput
  (completed / the run's time: perf_analyzer's, from its first send to its last response), latency
  p50 / p95 / p99 / mean to the response from the moment a request is sent (mmfuse.loadgen's open loop:
  from its due time, equal while the client keeps its schedule); ``late_sends`` counts the sends that were
  late (perf_analyzer: its share of delayed requests times the requests);
* server memory, of the server's process tree (tritonserver and its python-backend stubs): the
  proportional set size before the run (PSS: each shared page split between the processes that map
  it; a sum of RSS would count torch's libraries once per stub), and the resident memory sampled
  every 50 ms: (peak - before) / the most requests in flight at once ("memory per request");
* Triton's statistics API, the difference over the run (mmfuse.triton_stats: milliseconds per request):
  per composing model of the ensemble, requests, executions, queue and compute time per request, and the
  batch sizes that dynamic batching formed; the fusion step's (queue + compute) share of the ensemble's
  end-to-end time.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from .. import perf_analyzer, triton_stats
from ..loadgen import LoadPlan, LoadResult, run_triton
from ..wire import bytes_column

FUSION_MODELS = ("fusion", "fusion_pooled", "fusion_image_text_tabular")


class Run(LoadResult):
    """One load run of an ensemble: the load generator's figures, the load that made them, Triton's statistics."""

    def __init__(self, ensemble: str, mode: str, load: float, load_generator: str = "python", **figures: Any):
        super().__init__(**figures)
        self.ensemble = ensemble
        self.mode = mode  # closed | open
        self.load = load  # concurrency (closed) or requests per second (open)
        self.load_generator = load_generator  # perf_analyzer | python
        self.perf_analyzer: dict[str, Any] | None = None  # its command line, wall and CPU time
        self.steps: dict[str, dict[str, Any]] = {}  # composing model -> mmfuse.triton_stats delta
        self.ensemble_stats: dict[str, Any] = {}

    def summary(self) -> dict[str, Any]:
        latency = {k: round(v, 3) if math.isfinite(v) else None for k, v in self.percentiles_ms().items()}
        per_request = None
        if self.rss_idle is not None and self.rss_peak is not None and self.max_in_flight:
            per_request = max(0, self.rss_peak - self.rss_idle) / self.max_in_flight
        fusion = [s for name, s in self.steps.items() if name in FUSION_MODELS]
        e2e_ms = self.ensemble_stats.get("request_ms")
        share = None
        if fusion and e2e_ms:
            share = round((fusion[0]["queue_ms"] + fusion[0]["compute_ms"]) / e2e_ms, 4)
        return {
            "ensemble": self.ensemble, "mode": self.mode,
            ("concurrency" if self.mode == "closed" else "rate_per_s"): self.load,
            "sent": self.sent, "completed": self.completed, "errors": dict(self.errors),
            "seconds": round(self.seconds, 6),
            "throughput_per_s": round(self.completed / self.seconds, 3) if self.seconds else None,
            "latency_ms": latency,
            "max_in_flight": self.max_in_flight, "late_sends": self.late_sends,
            "memory": {"idle_pss_bytes": self.pss_idle, "idle_rss_bytes": self.rss_idle,
                       "peak_rss_bytes": self.rss_peak,
                       "bytes_per_request_in_flight": None if per_request is None else int(per_request)},
            "server": {"ensemble": self.ensemble_stats, "steps": self.steps, "fusion_share": share},
            "load_generator": self.load_generator,
            **({"perf_analyzer": self.perf_analyzer} if self.perf_analyzer is not None else {}),
        }


# -- the ensemble's steps ------------------------------------------------------------------------------------
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
            model, column = ("embed_image", "IMAGE") if modality == "IMAGE" else ("embed_text", "TEXT")
            embeddings[modality] = call(client, model, {column: columns_in[column]}, ["EMBEDDING"],
                                        options)["EMBEDDING"]
        return embeddings[modality]

    columns_in = {"IMAGE": bytes_column(images), "TEXT": bytes_column(texts)}
    rng = np.random.default_rng(seed)
    columns: dict[str, np.ndarray] = {}
    for tensor in config.input:
        name = tensor.name
        dims = [d if d > 0 else 1 for d in tensor.dims]
        if name in columns_in:
            columns[name] = columns_in[name]
        elif name.endswith("_EMBEDDING"):
            columns[name] = embedding(name[: -len("_EMBEDDING")]).astype(np.float32)
        elif name.endswith("_VALID"):
            columns[name] = np.ones((n, 1), dtype=bool)
        else:
            columns[name] = rng.standard_normal((n, *dims)).astype(np.float32)
    return [{k: v[i : i + 1] for k, v in columns.items()} for i in range(n)]


def measure(client, url: str, ensemble: str, pool: list, outputs: Sequence[str], mode: str, load: float,
            max_requests: int, max_seconds: float, server_pid: int | None, timeout_s: float = 30.0,
            max_outstanding: int = 256, load_generator: str = "perf_analyzer",
            throughput_hint: float | None = None) -> Run:
    """One bounded run (``closed`` at ``load`` requests in flight, or ``open`` at ``load`` requests per second)
    by ``load_generator`` (perf_analyzer or python: mmfuse.loadgen), with Triton's statistics
    (mmfuse.triton_stats) and the server's memory around it. ``throughput_hint`` (requests per second): what
    bounds a perf_analyzer closed loop's request count to ``max_seconds``."""
    models = [ensemble] + composing_models(client, ensemble)
    before = triton_stats.snapshot(client)
    if load_generator == "python":
        plan = LoadPlan(concurrency=int(load) if mode == "closed" else 1, rate=float(load) if mode == "open" else 0.0,
                        max_requests=max_requests, max_seconds=max_seconds, timeout_s=timeout_s,
                        max_outstanding=max_outstanding)
        result = run_triton(url, ensemble, pool, outputs, plan, server_pid, sample_memory=True)
        stats = triton_stats.delta(before, triton_stats.snapshot(client), models)
        run = Run(ensemble, mode, load, "python", **{f.name: getattr(result, f.name) for f in fields(LoadResult)})
    elif load_generator == "perf_analyzer":
        count = request_count(mode, load, max_requests, max_seconds, throughput_hint)
        kind = {"concurrency": int(load)} if mode == "closed" else {"request_rate": float(load)}
        try:
            r = perf_analyzer.run(url, ensemble, pool, **kind, request_count=count, server_pid=server_pid,
                                  sample_memory=True, timeout_s=max(300.0, 30 * max_seconds) + timeout_s)
        except perf_analyzer.PerfAnalyzerError as error:
            if error.returncode is None and not error.command:  # not found or not runnable: nothing was measured
                raise
            stats = triton_stats.delta(before, triton_stats.snapshot(client), models)
            run = Run(ensemble, mode, load, "perf_analyzer", sent=count, completed=stats[ensemble]["requests"])
            run.errors = {f"perf_analyzer exit {error.returncode}: {str(error).splitlines()[0][:200]}":
                          max(1, count - run.completed)}
            run.perf_analyzer = {"command_line": " ".join(error.command), "error": str(error)}
        else:
            stats = triton_stats.delta(before, triton_stats.snapshot(client), models)
            run = Run(ensemble, mode, load, "perf_analyzer", sent=count, completed=r["requests"], seconds=r["seconds"],
                      latencies_ms=r["latencies_ms"], max_in_flight=r["max_in_flight"],
                      late_sends=round(r["delayed_fraction"] * r["requests"]), server_cpu_s=r.get("server_cpu_s"),
                      rss_idle=r.get("rss_idle"), rss_peak=r.get("rss_peak"), pss_idle=r.get("pss_idle"))
            run.perf_analyzer = {k: r[k] for k in ("command_line", "wall_s", "cpu_s", "delayed_fraction")}
    else:
        raise ValueError(f"load generator must be perf_analyzer or python, got {load_generator!r}")
    run.ensemble_stats = stats.pop(ensemble)
    run.steps = stats
    return run


def request_count(mode: str, load: float, max_requests: int, max_seconds: float,
                  throughput_hint: float | None = None) -> int:
    """The requests of one perf_analyzer run: ``max_requests``, or fewer where the duration bounds the run (a
    fixed rate: ``rate x max_seconds``; a closed loop: ``throughput_hint x max_seconds``), never under what
    perf_analyzer accepts (the concurrency; one second of requests at a rate)."""
    count = max(1, int(max_requests))
    if mode == "open":
        return max(1, min(count, int(load * max_seconds)), math.ceil(load))
    if mode != "closed":
        raise ValueError(f"mode must be closed or open, got {mode!r}")
    if throughput_hint and throughput_hint > 0:
        count = min(count, max(1, math.ceil(throughput_hint * max_seconds)))
    return max(count, int(load))


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

