"""The one load generator of ``mmfuse bench``, ``mmfuse eval`` and ``mmfuse bench-pipeline``.

A run sends requests through ``send(i)`` (an awaitable per request; ``i`` counts from 0, so a caller picks
request ``i`` of a pool) in one of two shapes, set by a ``LoadPlan``:

* closed loop (``rate`` 0): ``concurrency`` requests always in flight, each sent when one completes;
* fixed rate (``rate`` > 0, open loop): request ``i`` is due ``i / rate`` seconds after the start, sent
  then whatever is still in flight (sends more than 5 ms behind schedule are counted as late; beyond
  ``max_outstanding`` requests in flight a due request is not sent and counts as a ``client_backlog`` error).

The first ``warmup_s`` seconds are sent but not measured. The measured window then ends when it has sent
``max_requests`` requests or lasted ``max_seconds``, and the requests still in flight are waited for (they
count). Measured, in a ``LoadResult``: requests sent, completed, errors by status, the window's seconds
(throughput = completed / seconds), latencies (closed loop: from the send to the response; fixed rate: from
the request's due time, so that a client falling behind shows in the latency instead of hiding it), the
most requests in flight at once; with a ``server_pid``, the CPU time of the server's process tree over the
window and, with ``sample_memory``, its memory (PSS at the window's start, RSS then and its peak, sampled
every 50 ms).

``triton_sender`` makes ``send`` for a pool of tritonclient requests; ``run_triton`` is the whole run.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import processes

LATE_S = 0.005  # a fixed-rate send this far behind its due time counts as late


@dataclass(frozen=True)
class LoadPlan:
    concurrency: int = 1  # closed loop: requests in flight
    rate: float = 0.0  # requests per second; > 0: fixed rate (open loop) instead of the closed loop
    max_requests: int = 1000  # measured requests, at most
    max_seconds: float = 10.0  # measured seconds of sending, at most
    warmup_s: float = 0.0  # sent before the measured window, not counted
    timeout_s: float = 30.0  # per request (tritonclient's client_timeout)
    max_outstanding: int = 256  # fixed rate: most requests in flight before due ones are dropped

    @property
    def mode(self) -> str:
        return "rate" if self.rate > 0 else "closed"


@dataclass
class LoadResult:
    sent: int = 0
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    max_in_flight: int = 0
    late_sends: int = 0
    server_cpu_s: float | None = None
    rss_idle: int | None = None  # the server's tree at the window's start
    rss_peak: int | None = None
    pss_idle: int | None = None

    def error(self, key: str) -> None:
        self.errors[key] = self.errors.get(key, 0) + 1

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def throughput_per_s(self) -> float | None:
        return self.completed / self.seconds if self.seconds else None

    @property
    def server_cpu_cores(self) -> float | None:
        """CPU time of the server's processes per second of the window (of the machine's cores)."""
        return self.server_cpu_s / self.seconds if self.server_cpu_s is not None and self.seconds else None

    def percentiles_ms(self) -> dict[str, float]:
        """p50, p95, p99 and mean latency in ms (NaN without completed requests)."""
        if not self.latencies_ms:
            return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "mean": math.nan}
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        return {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                "p99": float(np.percentile(lat, 99)), "mean": float(lat.mean())}


def _error_key(error: BaseException) -> str:
    status = getattr(error, "status", None)
    value = status() if callable(status) else None
    return str(value or type(error).__name__)


class _Server:
    """CPU time and memory of the server's process tree over the measured window."""

    def __init__(self, pid: int | None, sample_memory: bool, interval_s: float = 0.05):
        self.pid, self.sample_memory, self.interval_s = pid, sample_memory and pid is not None, interval_s
        self.cpu0: float | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, result: LoadResult) -> None:
        if self.pid is None:
            return
        if self.sample_memory:
            result.pss_idle = processes.tree_pss_bytes(self.pid)
            result.rss_idle = self.peak = processes.tree_rss_bytes(self.pid)
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self.cpu0 = processes.tree_cpu_seconds(self.pid)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak or 0, processes.tree_rss_bytes(self.pid))

    def stop(self, result: LoadResult) -> None:
        if self.pid is None or self.cpu0 is None:
            return
        result.server_cpu_s = processes.tree_cpu_seconds(self.pid) - self.cpu0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            result.rss_peak = max(self.peak or 0, processes.tree_rss_bytes(self.pid))


async def generate(send: Callable[[int], Awaitable[Any]], plan: LoadPlan, server_pid: int | None = None,
                   sample_memory: bool = False) -> LoadResult:
    """One bounded run of ``plan`` through ``send`` (see the module's docstring for what is measured)."""
    if plan.mode == "closed" and plan.concurrency < 1:
        raise ValueError(f"closed loop: concurrency must be >= 1, got {plan.concurrency}")
    result, server = LoadResult(), _Server(server_pid, sample_memory)
    try:
        if plan.mode == "closed":
            await _closed(send, plan, result, server)
        else:
            await _fixed_rate(send, plan, result, server)
    finally:
        server.stop(result)
    return result


async def _request(send, i: int, since: float, measured: bool, result: LoadResult) -> None:
    """Send request ``i``; if ``measured``, record its latency from ``since`` or its error."""
    try:
        await send(i)
    except Exception as error:  # noqa: BLE001 - counted by status, reported
        if measured:
            result.error(_error_key(error))
    else:
        if measured:
            result.latencies_ms.append((time.perf_counter() - since) * 1e3)
            result.completed += 1


async def _closed(send, plan: LoadPlan, result: LoadResult, server: _Server) -> None:
    started = time.perf_counter()
    window = {"start": started + plan.warmup_s, "open": plan.warmup_s <= 0, "end": None}
    if window["open"]:
        server.start(result)
    count, in_flight = 0, 0

    def sending() -> bool:
        now = time.perf_counter()
        if not window["open"] and now >= window["start"]:
            window["open"] = True
            window["start"] = now
            server.start(result)
        return not window["open"] or (result.sent < plan.max_requests and now < window["start"] + plan.max_seconds)

    async def worker() -> None:
        nonlocal count, in_flight
        while sending():
            i, measured = count, window["open"]
            count += 1
            result.sent += measured
            in_flight += 1
            result.max_in_flight = max(result.max_in_flight, in_flight)
            try:
                await _request(send, i, time.perf_counter(), measured, result)
            finally:
                in_flight -= 1

    try:
        await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
    finally:
        result.seconds = time.perf_counter() - window["start"] if window["open"] else 0.0


async def _fixed_rate(send, plan: LoadPlan, result: LoadResult, server: _Server) -> None:
    rate = plan.rate
    first = int(rate * plan.warmup_s)
    total = first + max(1, min(plan.max_requests, int(rate * plan.max_seconds)))
    in_flight, tasks = 0, []
    window_start = None

    async def one(i: int, due: float, measured: bool) -> None:
        nonlocal in_flight
        try:
            await _request(send, i, due, measured, result)
        finally:
            in_flight -= 1

    started = time.perf_counter()
    try:
        for i in range(total):
            due = started + i / rate
            delay = due - time.perf_counter()
            measured = i >= first
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -LATE_S and measured:
                result.late_sends += 1
            if i == first:
                window_start = time.perf_counter()
                server.start(result)
            result.sent += measured
            if in_flight >= plan.max_outstanding:  # the server is not keeping up: do not queue without bound
                if measured:
                    result.error("client_backlog")
                continue
            in_flight += 1
            result.max_in_flight = max(result.max_in_flight, in_flight)
            tasks.append(asyncio.ensure_future(one(i, due, measured)))
        await asyncio.gather(*tasks)
    finally:
        result.seconds = time.perf_counter() - window_start if window_start is not None else 0.0


@asynccontextmanager
async def triton_sender(url: str, model: str, requests: Sequence[Mapping[str, np.ndarray]],
                        outputs: Sequence[str], timeout_s: float = 30.0,
                        client_kwargs: Mapping[str, Any] | None = None) -> AsyncIterator[Callable[[int], Awaitable]]:
    """``send(i)``: request ``i % len(requests)`` of the pool to ``model`` on one asyncio gRPC channel."""
    import tritonclient.grpc.aio as aio

    from .wire import infer_inputs

    prepared = [infer_inputs(r, aio=True) for r in requests]
    requested = [aio.InferRequestedOutput(name) for name in outputs]
    client = aio.InferenceServerClient(url, **(client_kwargs or {}))

    async def send(i: int):
        return await client.infer(model, prepared[i % len(prepared)], outputs=requested, client_timeout=timeout_s)

    try:
        yield send
    finally:
        await client.close()


def run_triton(url: str, model: str, requests: Sequence[Mapping[str, np.ndarray]], outputs: Sequence[str],
               plan: LoadPlan, server_pid: int | None = None, sample_memory: bool = False) -> LoadResult:
    """``generate`` with ``triton_sender``, in an event loop of its own."""
    async def main() -> LoadResult:
        async with triton_sender(url, model, requests, outputs, plan.timeout_s) as send:
            return await generate(send, plan, server_pid, sample_memory)

    return asyncio.run(main())
