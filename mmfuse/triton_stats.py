"""Triton's statistics API over a window, one shape for every report (``mmfuse bench``, ``mmfuse eval``).

``snapshot(client)`` reads the cumulative per-model statistics; ``delta(before, after)`` is what each
model did between two snapshots. Times are milliseconds per request, each phase divided by its own
count. The keys of one model's delta:

=================  ===============================================================================
requests           successful requests
failures           failed requests
executions         model executions (batches the dynamic batcher formed; 0 for an ensemble)
request_ms         end-to-end time per request inside the server (Triton's ``success`` duration)
queue_ms           waiting in the model's queue
compute_input_ms   copying the inputs in
compute_infer_ms   the model's own execution
compute_output_ms  copying the outputs out
compute_ms         the sum of the three compute phases
batch_sizes        {"rows": executions of that many rows} formed in the window
mean_batch_rows    rows per execution (inference_count / execution_count; None without executions)
=================  ===============================================================================
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


def snapshot(client) -> dict[str, dict]:
    """{model name: its statistics as JSON} from a ``tritonclient.grpc.InferenceServerClient`` (every
    version summed into one entry: a model serves one version here)."""
    return {m["name"]: m for m in client.get_inference_statistics(as_json=True).get("model_stats", [])}


def _phase(stats: Mapping, key: str) -> tuple[int, int]:
    entry = stats.get("inference_stats", {}).get(key, {})
    return int(entry.get("count", 0) or 0), int(entry.get("ns", 0) or 0)


def _batches(stats: Mapping) -> dict[int, int]:
    return {int(b["batch_size"]): int(b.get("compute_infer", {}).get("count", 0) or 0)
            for b in stats.get("batch_stats", [])}


def model_delta(before: Mapping, after: Mapping) -> dict[str, Any]:
    """What one model did between two of its snapshots (``before`` may be empty: since the server started)."""
    before = before or {}

    def diff(key: str) -> tuple[int, int]:
        (c1, n1), (c0, n0) = _phase(after, key), _phase(before, key)
        return c1 - c0, n1 - n0

    def counter(key: str) -> int:
        return int(after.get(key, 0) or 0) - int(before.get(key, 0) or 0)

    def ms(phase: tuple[int, int]) -> float:
        count, ns = phase
        return ns / count / 1e6 if count else 0.0

    requests, _ = success = diff("success")
    phases = {name: ms(diff(name)) for name in PHASES}
    b1, b0 = _batches(after), _batches(before)
    batches = {size: b1[size] - b0.get(size, 0) for size in sorted(b1) if b1[size] - b0.get(size, 0) > 0}
    executions, rows = counter("execution_count"), counter("inference_count")
    return {
        "requests": requests, "failures": diff("fail")[0], "executions": executions,
        "request_ms": ms(success), **{f"{name}_ms": value for name, value in phases.items()},
        "compute_ms": phases["compute_input"] + phases["compute_infer"] + phases["compute_output"],
        "batch_sizes": {str(k): v for k, v in batches.items()},
        "mean_batch_rows": rows / executions if executions > 0 else None,
    }


def delta(before: Mapping[str, Mapping], after: Mapping[str, Mapping],
          models: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """{model: ``model_delta``} for ``models`` (each of them, even idle), else every model that served a request."""
    if models is not None:
        return {name: model_delta(before.get(name, {}), after.get(name, {})) for name in models}
    out = {}
    for name, stats in after.items():
        d = model_delta(before.get(name, {}), stats)
        if d["requests"] > 0:
            out[name] = d
    return out
