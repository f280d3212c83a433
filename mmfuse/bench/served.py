"""Served: a real tritonserver on a generated copy of the repository (the model switched, random weights, a
profile's settings), loaded over loopback gRPC by Triton's perf_analyzer (mmfuse.perf_analyzer; mmfuse.loadgen's
Python client with ``ServedPlan.load_generator = "python"``), with Triton's statistics (mmfuse.triton_stats)
around each run. Every run says which made it (``load_generator``)."""
from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import loadgen, perf_analyzer, triton_stats
from ..export import OPEN_CLIP_MODELS
from ..profiles import Tuning, apply_profile, load_profile, profile_names
from ..wire import bytes_column, infer_inputs
from .inputs import cosines

BENCH_MODELS = ("image_preprocess", "text_preprocess", "image_encoder", "text_encoder", "fusion",
                "embed_image", "embed_text", "fuse_image_text")
ENSEMBLE_OUTPUTS = {
    "embed_image": ("EMBEDDING", "VALID", "STATUS"),
    "embed_text": ("EMBEDDING", "VALID", "STATUS"),
    "fuse_image_text": ("FUSED", "MODALITY_MASK", "MODALITY_STATUS"),
}


# -- profiles (data: mmfuse/profiles/*.json, applied by mmfuse.profiles.apply_profile) ---------------------------
class _Profiles(Mapping[str, Mapping[str, Tuning]]):
    """Profile name -> its settings per model, read from mmfuse/profiles/*.json when asked (nothing at import)."""

    def __getitem__(self, name: str) -> Mapping[str, Tuning]:
        if name not in profile_names():
            raise KeyError(name)
        return load_profile(name).models

    def __iter__(self) -> Iterator[str]:
        return iter(profile_names())

    def __len__(self) -> int:
        return len(profile_names())


PROFILES: Mapping[str, Mapping[str, Tuning]] = _Profiles()


def build_repository(target: Path, model_name: str, profile: str, source: Path | None = None,
                     extra_params: dict[str, dict[str, str]] | None = None, precision: str | None = None) -> Path:
    """A copy of the models the three ensembles need, switched to ``model_name`` with random weights,
    late fusion without a head, and the ``profile``'s settings (its encoders' precision replaced by
    ``precision`` where given)."""
    from ..export import set_fusion_head
    from ..paths import DEFAULT_MODEL_REPOSITORY
    from ..repository import set_parameters, set_sequence_routing

    source = Path(source or DEFAULT_MODEL_REPOSITORY)
    target.mkdir(parents=True, exist_ok=True)
    for model in BENCH_MODELS:
        shutil.copytree(source / model, target / model, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    for model in OPEN_CLIP_MODELS:
        values = {"model_name": model_name, "pretrained": ""}
        if model.endswith("encoder"):
            values.update(allow_random_init="true", seed="0")
        set_parameters(target, model, values)
    set_parameters(target, "fusion", {"strategy": "late", "weights": "0.5,0.5", "normalize": "true",
                                      "allow_random_init": "false"})
    set_fusion_head(target, "fusion", "late", "", has_head=False)
    # Late fusion reads the pooled embeddings only: a late deployment does not route the token sequences
    # (the encoders then skip converting and shipping them); the baseline keeps the shipped routing.
    settings = load_profile(profile, precision)
    set_sequence_routing(target, "fuse_image_text", "fusion", settings.route_sequences)
    apply_profile(target, settings, extra_params=extra_params)
    return target


def serving_precision(profile: str, device: str = "cpu", precision: str | None = None) -> str:
    """The precision the profile's image encoder computes in on this machine (``auto`` resolved here)."""
    from ..serving.hardware import resolve_precision

    tuning = load_profile(profile, precision).models.get("image_encoder") if profile in profile_names() else None
    if tuning is not None and "precision" in tuning.params:
        return resolve_precision(tuning.params["precision"], "GPU" if tuning.kind == "KIND_GPU" else "CPU")
    return "fp32"


def make_requests(ensemble: str, images: Sequence[bytes], captions: Sequence[str], rows: int,
                  count: int) -> list[dict[str, np.ndarray]]:
    """``count`` distinct requests of ``rows`` rows each (cycling through the inputs), as input arrays."""
    requests = []
    for r in range(count):
        picks = [(r * rows + i) for i in range(rows)]
        arrays = {}
        if ensemble in ("embed_image", "fuse_image_text"):
            arrays["IMAGE"] = bytes_column([images[i % len(images)] for i in picks])
        if ensemble in ("embed_text", "fuse_image_text"):
            arrays["TEXT"] = bytes_column([captions[i % len(captions)] for i in picks])
        requests.append(arrays)
    return requests


LOAD_GENERATORS = ("perf_analyzer", "python")


def _latency(result: loadgen.LoadResult) -> dict[str, float]:
    return {f"{k}_ms": v for k, v in result.percentiles_ms().items()}


def warmup_requests(concurrency: int, warmup_s: float) -> int:
    """perf_analyzer warms up by a request count (--warmup-request-count), not a duration: each closed-loop
    slot sends one request per second of the plan's warm-up (at least one)."""
    return concurrency * max(1, math.ceil(warmup_s))


def _perf_analyzer_keys(run: dict[str, Any]) -> dict[str, Any]:
    """The bench's keys from an mmfuse.perf_analyzer result, and perf_analyzer's own figures under ``perf_analyzer``."""
    keep = ("command_line", "wall_s", "cpu_s", "infer_per_s", "requests_per_s", "p90_ms", "client_send_ms",
            "network_server_ms", "server_queue_ms", "server_compute_input_ms", "server_compute_infer_ms",
            "server_compute_output_ms", "client_recv_ms", "send_rate_per_s", "delayed_fraction", "kept_up",
            "warmup_requests", "measurement")
    return {"requests": run["requests"], "errors": run["errors"], "p50_ms": run["p50_ms"], "p95_ms": run["p95_ms"],
            "p99_ms": run["p99_ms"], "mean_ms": run["avg_ms"], "server_cpu_cores": run.get("server_cpu_cores"),
            "load_generator": "perf_analyzer", "perf_analyzer": {k: run[k] for k in keep if k in run}}


def closed_loop_run(url: str, ensemble: str, requests, rows: int, concurrency: int, warmup_s: float, duration_s: float,
                    max_requests: int, server_pid: int | None = None,
                    load_generator: str = "perf_analyzer") -> dict[str, Any]:
    """Closed-loop throughput and latency of one ensemble, as the bench reports it.

    perf_analyzer (the default): ``warmup_requests`` requests, then three time windows of ``duration_s / 3``
    (their requests counted; ``max_requests`` does not apply); where a window is shorter than a request,
    three count windows of ``concurrency`` requests instead. ``python``: mmfuse.loadgen (``warmup_s`` seconds,
    then ``duration_s`` or ``max_requests``)."""
    if load_generator == "python":
        plan = loadgen.LoadPlan(concurrency=concurrency, max_requests=max_requests, max_seconds=duration_s,
                                warmup_s=warmup_s, timeout_s=120.0)
        run = loadgen.run_triton(url, ensemble, requests, ENSEMBLE_OUTPUTS[ensemble], plan, server_pid)
        return {"ensemble": ensemble, "rows_per_request": rows, "concurrency": concurrency, "seconds": run.seconds,
                "requests": run.completed, "errors": run.error_count,
                "items_per_s": run.completed * rows / run.seconds if run.seconds else math.nan, **_latency(run),
                "server_cpu_cores": run.server_cpu_cores, "load_generator": "python"}
    _check_load_generator(load_generator)
    warmup = warmup_requests(concurrency, warmup_s)
    window_ms = max(1, round(duration_s * 1e3 / 3))
    common = dict(concurrency=concurrency, warmup_requests=warmup, server_pid=server_pid,
                  timeout_s=max(300.0, 10 * (duration_s + warmup_s)))
    try:
        run = perf_analyzer.run(url, ensemble, requests, window_ms=window_ms, **common)
        run["measurement"] = f"3 time windows of {window_ms} ms"
    except perf_analyzer.PerfAnalyzerError as error:
        if error.returncode != 3:  # 3: "No valid requests recorded within time interval"
            raise
        run = perf_analyzer.run(url, ensemble, requests, window_requests=concurrency, **common)
        run["measurement"] = f"3 count windows of {concurrency} requests (a request outlasted a {window_ms} ms window)"
    run["warmup_requests"] = warmup
    return {"ensemble": ensemble, "rows_per_request": rows, "concurrency": concurrency, "seconds": run["seconds"],
            "items_per_s": run["items_per_s"], **_perf_analyzer_keys(run)}


def fixed_rate_run(url: str, ensemble: str, requests, rows: int, rate: float, duration_s: float, warmup_s: float,
                   max_requests: int, server_pid: int | None = None,
                   load_generator: str = "perf_analyzer") -> dict[str, Any]:
    """Requests sent at a constant rate (open loop): ``min(max_requests, rate x duration_s)`` requests measured
    after ``rate x warmup_s`` sent first.

    perf_analyzer (the default): asynchronous sends, three count windows of a third of the requests each (at
    least that many; a window ends on a whole second); latency from each request's send, ``delayed_fraction``
    the share sent late. ``python``: mmfuse.loadgen, latency from each request's due time."""
    total = max(1, min(max_requests, int(rate * duration_s)))
    if load_generator == "python":
        plan = loadgen.LoadPlan(rate=rate, max_requests=max_requests, max_seconds=duration_s, warmup_s=warmup_s,
                                timeout_s=120.0)
        run = loadgen.run_triton(url, ensemble, requests, ENSEMBLE_OUTPUTS[ensemble], plan, server_pid)
        return {"ensemble": ensemble, "rows_per_request": rows, "rate_requests_per_s": rate,
                "items_per_s_offered": rate * rows, "requests": run.completed, "errors": run.error_count,
                "late_sends": run.late_sends, **_latency(run), "server_cpu_cores": run.server_cpu_cores,
                "load_generator": "python"}
    _check_load_generator(load_generator)
    window = max(1, math.ceil(total / 3))
    run = perf_analyzer.run(url, ensemble, requests, request_rate=rate, window_requests=window,
                            warmup_requests=int(rate * warmup_s), server_pid=server_pid,
                            timeout_s=max(300.0, 10 * (total / rate + warmup_s)))
    run["measurement"] = f"3 count windows of {window} requests"
    run["warmup_requests"] = int(rate * warmup_s)
    return {"ensemble": ensemble, "rows_per_request": rows, "rate_requests_per_s": rate,
            "items_per_s_offered": rate * rows, "items_per_s": run["items_per_s"], "seconds": run["seconds"],
            "late_sends": None, "delayed_fraction": run["delayed_fraction"], **_perf_analyzer_keys(run)}


def _check_load_generator(name: str) -> None:
    if name not in LOAD_GENERATORS:
        raise ValueError(f"load generator must be one of {', '.join(LOAD_GENERATORS)}, got {name!r}")


def statistics(url: str) -> dict[str, dict]:
    """Triton's cumulative per-model statistics (``mmfuse.triton_stats.snapshot``) of the server at ``url``."""
    from tritonclient.grpc import InferenceServerClient

    with InferenceServerClient(url) as client:
        return triton_stats.snapshot(client)


def served_outputs_check(url: str, model_name: str, images: Sequence[bytes], captions: Sequence[str],
                         precision: str) -> dict[str, float]:
    """Served embeddings against the in-process fp32 towers on the same seeded weights: min cosine."""
    import torch
    from tritonclient.grpc import InferenceServerClient

    from mmfuse.serving.encoders import ImageEncoder, TextEncoder
    from mmfuse.serving.image_preprocess import ImagePreprocessor
    from mmfuse.serving.openclip_models import ClipSpec, load_tokenizer

    n = min(4, len(images))
    with InferenceServerClient(url) as client:
        def ask(model, name, items):
            return client.infer(model, infer_inputs({name: bytes_column(items)}))
        image_emb = ask("embed_image", "IMAGE", images[:n]).as_numpy("EMBEDDING")
        text_emb = ask("embed_text", "TEXT", captions[:n]).as_numpy("EMBEDDING")
    torch.set_num_threads(1)
    spec = ClipSpec(model_name, allow_random_init=True, seed=0)
    pre = ImagePreprocessor(ClipSpec(model_name), decode_threads=1)
    pixels = pre({"IMAGE": bytes_column(images[:n])}, frozenset({"PIXELS"}))["PIXELS"]
    pre.close()
    ref_image = ImageEncoder(spec)({"PIXELS": pixels}, frozenset({"EMBEDDING"}))["EMBEDDING"]
    tokens = load_tokenizer(spec)(list(captions[:n])).numpy()
    ref_text = TextEncoder(spec)({"TOKENS": tokens}, frozenset({"EMBEDDING"}))["EMBEDDING"]
    return {"served_precision": precision,
            "image_min_cosine_vs_fp32_in_process": float(cosines(image_emb, ref_image).min()),
            "text_min_cosine_vs_fp32_in_process": float(cosines(text_emb, ref_text).min())}


@dataclass
class ServedPlan:
    rows: int = 4
    concurrency: int = 8
    warmup_s: float = 5.0
    duration_s: float = 20.0
    text_duration_s: float = 8.0
    load_fraction: float = 0.7
    max_requests: int = 20_000
    # p99 from 200 requests is their 2nd-worst and moved 1.15-2.36 between two runs on the same settings: the
    # fixed-rate window runs until it has this many requests (at most at_load_max_s), so p99 is the 5th-worst.
    at_load_min_requests: int = 500
    at_load_max_s: float = 60.0
    # "perf_analyzer" (Triton's C++ client; an error if it cannot be found) or "python" (mmfuse.loadgen)
    load_generator: str = "perf_analyzer"


def served(repository: Path, model_name: str, images: Sequence[bytes], captions: Sequence[str], plan: ServedPlan,
           log_dir: Path, precision: str, ensembles: Sequence[str] = ("embed_image", "embed_text", "fuse_image_text"),
           fixed_rate: bool = True, check_outputs: bool = True, single: Sequence[str] = ()) -> dict[str, Any]:
    """Start a tritonserver on ``repository``; closed-loop runs of ``ensembles``, then the ``single`` ensembles
    one request of one row at a time (concurrency 1: ``ENSEMBLE_c1``, what a service sending single requests
    sees), then fuse_image_text at ``plan.load_fraction`` of its closed-loop peak; each with the models'
    statistics over the run."""
    from ..server import ServerConfig, ServerError, TritonServer

    _check_load_generator(plan.load_generator)
    if plan.load_generator == "perf_analyzer":  # before the server starts: a missing one fails at once
        perf_analyzer.find_perf_analyzer()
        perf_analyzer.library_dir()
    server = None
    for attempt in range(3):
        server = TritonServer(ServerConfig.on_free_ports(model_repository=repository),
                              log_path=log_dir / f"tritonserver.{attempt}.log")
        started = time.perf_counter()
        try:
            server.__enter__()
            break
        except ServerError:
            if attempt == 2:
                raise
    out: dict[str, Any] = {"startup_s": time.perf_counter() - started}
    url, pid = server.grpc_url, server.process.pid
    try:
        if check_outputs:
            out["outputs"] = served_outputs_check(url, model_name, images, captions, precision)
        for ensemble in ensembles:
            requests = make_requests(ensemble, images, captions, plan.rows, max(8, 2 * plan.concurrency))
            duration = plan.text_duration_s if ensemble == "embed_text" else plan.duration_s
            before = statistics(url)
            out[ensemble] = closed_loop_run(url, ensemble, requests, plan.rows, plan.concurrency, plan.warmup_s,
                                            duration, plan.max_requests, pid, plan.load_generator)
            out[ensemble]["models"] = triton_stats.delta(before, statistics(url))
        for ensemble in single:
            requests = make_requests(ensemble, images, captions, 1, 8)
            duration = (plan.text_duration_s if ensemble == "embed_text" else plan.duration_s) / 2
            before = statistics(url)
            out[f"{ensemble}_c1"] = closed_loop_run(url, ensemble, requests, 1, 1, plan.warmup_s, duration,
                                                    plan.max_requests, pid, plan.load_generator)
            out[f"{ensemble}_c1"]["models"] = triton_stats.delta(before, statistics(url))
        if fixed_rate and "fuse_image_text" in out:
            peak = out["fuse_image_text"]["items_per_s"]
            rate = max(plan.load_fraction * peak / plan.rows, 0.2)  # a stalled closed loop still gets a rate
            requests = make_requests("fuse_image_text", images, captions, plan.rows, 16)
            before = statistics(url)
            window = max(plan.duration_s, min(plan.at_load_min_requests / rate, plan.at_load_max_s))
            run = fixed_rate_run(url, "fuse_image_text", requests, plan.rows, rate, window, plan.warmup_s,
                                 plan.max_requests, pid, plan.load_generator)
            models = triton_stats.delta(before, statistics(url))
            fusion_ms = models.get("fusion", {}).get("request_ms", math.nan)
            run.update(load_fraction=plan.load_fraction, models=models, fusion_ms=fusion_ms,
                       fusion_share_of_p50=fusion_ms / run["p50_ms"] if run["p50_ms"] else math.nan,
                       p99_over_p50=run["p99_ms"] / run["p50_ms"] if run["p50_ms"] else math.nan)
            out["fuse_image_text_at_load"] = run
    finally:
        server.stop()
    return out
