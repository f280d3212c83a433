"""mmfuse bench-pipeline: sequential vs pipelined asyncio calls from one client, against a running server.

Both runs send the same ``--requests`` requests of ``--batch`` rows through the generated clients, as closed
loops of mmfuse.loadgen (the load generator of ``mmfuse bench`` and ``mmfuse eval``): one request in flight
on the sync client, then ``--in-flight`` requests at once on the asyncio client (one channel, one event
loop). Triton's dynamic batcher merges the concurrent requests, so the pipelined run keeps the server busy
where the sequential one leaves it idle between round trips. Triton's statistics over each run
(mmfuse.triton_stats) are reported beside the timings: the requests each model served and the executions
(batches) they took.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import sys

import numpy as np

from ._client_args import add_connection_args, client_options


def register(sub) -> None:
    p = sub.add_parser("bench-pipeline", help="measure sequential vs pipelined (asyncio) throughput of one client "
                                              "against a running server and print the ratio")
    p.add_argument("--ensemble", default="embed_text", help="which generated ensemble client (default embed_text)")
    p.add_argument("--requests", type=int, default=128, help="requests per run (default 128)")
    p.add_argument("--batch", type=int, default=1, help="rows per request (default 1)")
    p.add_argument("--in-flight", type=int, default=8, help="pipelined: requests in flight (default 8)")
    p.add_argument("--warmup", type=int, default=8, help="requests before each run, not timed (default 8)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_connection_args(p)
    p.set_defaults(func=run)


def _sample_image() -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def sample_request(module, n: int):
    """``n`` rows of plausible inputs for any generated ensemble: images for IMAGE-like BYTES inputs,
    captions for other BYTES inputs, zeros (-1 dims as 1) for numeric ones."""
    from mmfuse.clients._runtime import NUMPY_DTYPES

    values = {}
    for t in module.SPEC.inputs:
        if t.datatype == "BYTES" and "IMAGE" in t.name.upper():
            values[t.field] = [_sample_image()] * n
        elif t.datatype == "BYTES":
            values[t.field] = [f"a photo of object number {i}" for i in range(n)]
        else:
            dims = tuple(d if d > 0 else 1 for d in t.dims)
            values[t.field] = np.zeros(((n,) if module.SPEC.batched else ()) + dims, NUMPY_DTYPES[t.datatype])
    return values


def _requests(module, request_type, count: int, batch: int) -> list:
    """``count`` requests of ``batch`` rows each (one request of sample values if the ensemble is not batched)."""
    if not module.SPEC.batched:
        return [request_type(**sample_request(module, batch))] * count
    rows = sample_request(module, count * batch)
    return [request_type(**{k: v[i * batch:(i + 1) * batch] for k, v in rows.items()}) for i in range(count)]


async def _closed_loop(infer, requests: list, in_flight: int) -> tuple[list, float]:
    """Every request through ``infer`` (a coroutine function), ``in_flight`` at once (mmfuse.loadgen); the
    responses in request order and the seconds it took. The first failure is raised."""
    from mmfuse.loadgen import LoadPlan, generate

    responses: list = [None] * len(requests)
    failures: list[BaseException] = []

    async def send(i: int) -> None:
        try:
            responses[i] = await infer(requests[i])
        except Exception as error:
            failures.append(error)
            raise

    result = await generate(send, LoadPlan(concurrency=in_flight, max_requests=len(requests), max_seconds=math.inf))
    if failures:
        raise failures[0]
    return responses, result.seconds


def measure(module, options, requests: int, batch: int, in_flight: int, warmup: int) -> dict:
    from mmfuse import triton_stats
    from mmfuse.clients._runtime import connect
    from mmfuse.clients.ensembles import ASYNC_CLIENTS, CLIENTS

    name = module.SPEC.name
    pool = _requests(module, CLIENTS[name].request_type, requests, batch)
    warm = CLIENTS[name].request_type(**sample_request(module, max(1, warmup) * batch))
    stats = connect(options)
    server: dict[str, dict] = {}

    with CLIENTS[name](options=options) as client:
        client.infer(warm, max_batch=batch, progress=False)
        before = triton_stats.snapshot(stats)

        async def one(request):
            return await asyncio.to_thread(client.infer, request, max_batch=batch, progress=False)

        sequential, sequential_s = asyncio.run(_closed_loop(one, pool, 1))
        server["sequential"] = triton_stats.delta(before, triton_stats.snapshot(stats))

    async def pipelined_run():
        async with ASYNC_CLIENTS[name](options=options) as aclient:
            await aclient.infer(warm, max_batch=batch, max_in_flight=in_flight, progress=False)
            start = triton_stats.snapshot(stats)

            async def one(request):
                return await aclient.infer(request, max_batch=batch, max_in_flight=1, progress=False)

            out = await _closed_loop(one, pool, in_flight)
            server["pipelined"] = triton_stats.delta(start, triton_stats.snapshot(stats))
            return out

    try:
        pipelined, pipelined_s = asyncio.run(pipelined_run())
    finally:
        stats.close()
    first = module.SPEC.outputs[0]
    a = np.concatenate([np.atleast_1d(getattr(r, first.field)) for r in sequential])
    b = np.concatenate([np.atleast_1d(getattr(r, first.field)) for r in pipelined])
    same = bool(np.allclose(a, b, atol=1e-4)) if a.dtype != object else bool((a == b).all())
    return {
        "ensemble": name, "url": options.url, "requests": requests, "batch": batch, "in_flight": in_flight,
        "sequential_s": sequential_s, "pipelined_s": pipelined_s,
        "sequential_req_per_s": requests / sequential_s, "pipelined_req_per_s": requests / pipelined_s,
        "ratio": sequential_s / pipelined_s, "same_results": same, "server": server,
    }


def run(args: argparse.Namespace) -> int:
    from mmfuse.clients import MMFuseClientError
    from mmfuse.clients.ensembles import MODULES

    if args.ensemble not in MODULES:
        print(f"mmfuse bench-pipeline: no generated client for {args.ensemble!r}; have {', '.join(MODULES)}",
              file=sys.stderr)
        return 2
    if min(args.requests, args.batch, args.in_flight) < 1 or args.warmup < 0:
        print("mmfuse bench-pipeline: --requests, --batch, --in-flight must be >= 1", file=sys.stderr)
        return 2
    try:
        options = client_options(args, progress=False)
        result = measure(MODULES[args.ensemble], options, args.requests, args.batch, args.in_flight, args.warmup)
    except ValueError as error:
        print(f"mmfuse bench-pipeline: {error}", file=sys.stderr)
        return 2
    except MMFuseClientError as error:
        print(f"mmfuse bench-pipeline: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    r = result
    print(f"{r['ensemble']} at {r['url']}: {r['requests']} requests of {r['batch']} row(s)")
    print(f"sequential (sync, 1 in flight):       {r['sequential_s']:7.3f} s  {r['sequential_req_per_s']:8.1f} req/s")
    print(f"pipelined (asyncio, {r['in_flight']:>2} in flight):   {r['pipelined_s']:7.3f} s  "
          f"{r['pipelined_req_per_s']:8.1f} req/s")
    print(f"ratio pipelined/sequential: {r['ratio']:.2f}x (same results: {'yes' if r['same_results'] else 'NO'})")
    return 0
