"""mmfuse.loadgen without a server: what the two loop shapes send, count and measure (no speed is asserted)."""
from __future__ import annotations

import asyncio
import math

from mmfuse.loadgen import LoadPlan, generate


class Refused(Exception):
    def status(self) -> str:
        return "StatusCode.UNAVAILABLE"


def run(plan: LoadPlan, fail_every: int = 0):
    seen: list[int] = []

    async def send(i: int) -> None:
        seen.append(i)
        await asyncio.sleep(0.001)
        if fail_every and i % fail_every == fail_every - 1:
            raise Refused()

    return asyncio.run(generate(send, plan)), seen


def test_closed_loop_sends_exactly_the_bound_and_counts_errors_by_status():
    result, seen = run(LoadPlan(concurrency=4, max_requests=20, max_seconds=math.inf), fail_every=5)
    assert seen == list(range(20)) and result.sent == 20
    assert result.errors == {"StatusCode.UNAVAILABLE": 4} and result.completed == 16
    assert len(result.latencies_ms) == 16 and all(x > 0 for x in result.latencies_ms)
    assert 1 <= result.max_in_flight <= 4 and result.seconds > 0
    p = result.percentiles_ms()
    assert p["p50"] <= p["p95"] <= p["p99"]


def test_warm_up_requests_are_sent_but_not_counted():
    result, seen = run(LoadPlan(concurrency=2, max_requests=6, max_seconds=math.inf, warmup_s=0.05))
    assert result.sent == result.completed == 6 and len(seen) > 6


def test_fixed_rate_sends_on_schedule_and_counts_what_it_could_not_send():
    result, seen = run(LoadPlan(rate=400.0, max_requests=1000, max_seconds=0.05))
    assert result.sent == 20 and seen == list(range(20)) and result.completed + result.error_count == 20
    backlog, _ = run(LoadPlan(rate=400.0, max_requests=10, max_seconds=1.0, max_outstanding=0))
    assert backlog.sent == 10 and backlog.errors == {"client_backlog": 10} and backlog.completed == 0
