"""``mmfuse bench``: how close the serving path comes to the machine's compute limit, in one run.

Everything is measured in the same run, on the same machine and inputs, so that its ratios hold on
a shared machine where absolute figures move with the load:

* the limit: the machine's peak matrix-multiply rate (torch, fp32 and bf16, all threads and one
  thread per core) and the encoders' FLOPs per item (the analytic count of their matrix products,
  checked against torch.utils.flop_counter), so ``limit = peak / FLOPs per item``;
* a naive in-process loop: open_clip in fp32, one item at a time (torch's default threads and one
  thread: the faster is the reference);
* the preprocessing: decode, resize (open_clip's transform), the tensor tail, per image; the exact
  path against reduced-size JPEG decoding (``jpeg_draft``, which the cpu and gpu profiles serve), its
  pixel difference and what that does to the embedding (cosine);
* text trimming: the text tower on short captions, trimmed to the longest caption vs padded to the
  context length, and the largest difference between the two (fp32);
* precision: the towers in fp32 against the profile's precision (bf16 on a CPU, fp16 on a GPU):
  throughput and the cosine of the embeddings;
* served: a real tritonserver on a generated copy of the repository (the model switched to
  ``--model``, ViT-B-32 by default, random weights; the batching/instances/threads/precision of a
  *profile*, ``auto`` by default: chosen for this machine by mmfuse.auto), loaded over loopback gRPC by
  Triton's perf_analyzer: closed-loop throughput of embed_image, embed_text and fuse_image_text, single
  requests (concurrency 1, one row), then fuse_image_text at a fixed rate of 70 % of its peak for
  p50/p95/p99, and the fusion step's share of the end-to-end p50 from Triton's statistics API; then the
  hand-picked profiles, each on a server of its own under the same load, and the ``auto-latency``
  settings at concurrency 1;
* the targets (targets.json): auto against the best hand-picked profile, served against the ceiling,
  against other servers' figures (with the machine they came from), single-request p50 against one
  image in-process on every core; each with its figure and verdict;
* the ceiling: the in-process image tower plus its image's decoding on every core, with no serving
  overhead at all: served/limit cannot pass it on this machine with these kernels. Computed from the
  one-thread figures above, and measured: one process per core, each decoding and encoding batches of
  the bench's images in a loop, all at once (the served path without Triton, gRPC or a client).

The modules, by concern: ``limit`` (peak matmul, FLOPs per item, the machine), ``inputs`` (the generated
JPEGs and captions), ``inprocess`` (everything measured without a server), ``served`` (the generated
repository, the server, the load through mmfuse.perf_analyzer (or mmfuse.loadgen's Python client on
request), Triton's statistics through mmfuse.triton_stats), ``report`` (ratios, targets, table, JSON) and
``run`` (``run_bench``: all of it in order).

Profiles are data (mmfuse/profiles/*.json, one line of reason per setting; the figures that chose them
are in docs/performance.md); ``baseline`` is the shipped repository's settings (fp32, one instance of each
model, one thread) for the before/after figures.
"""
from __future__ import annotations

from ..processes import load_average
from .inprocess import (
    encoder_steps,
    measured_ceiling,
    naive_loop,
    precision_cost,
    preprocessing,
    profile_handlers,
    text_trimming,
)
from .inputs import CAPTIONS, bench_inputs, cosines, photo_like_jpeg, timed
from .limit import (
    counted_flops,
    machine_info,
    machine_peak,
    matmul_rate,
    model_flops,
    text_flops,
    tower_gemm_rate,
    vit_flops,
)
from .report import jsonable, serving_ceiling, summarise, table, write_json
from .run import BenchOptions, main_gpu, run_bench
from .served import (
    BENCH_MODELS,
    ENSEMBLE_OUTPUTS,
    OPEN_CLIP_MODELS,
    PROFILES,
    ServedPlan,
    build_repository,
    closed_loop_run,
    fixed_rate_run,
    make_requests,
    served,
    served_outputs_check,
    serving_precision,
    statistics,
)

__all__ = [
    "BENCH_MODELS", "CAPTIONS", "ENSEMBLE_OUTPUTS", "OPEN_CLIP_MODELS", "PROFILES", "BenchOptions", "ServedPlan",
    "bench_inputs", "build_repository", "closed_loop_run", "cosines", "counted_flops", "encoder_steps",
    "fixed_rate_run", "jsonable", "load_average", "machine_info", "machine_peak", "main_gpu", "make_requests",
    "matmul_rate", "measured_ceiling", "model_flops", "naive_loop", "photo_like_jpeg", "precision_cost",
    "preprocessing", "profile_handlers", "run_bench", "served", "served_outputs_check", "serving_ceiling",
    "serving_precision", "statistics", "summarise", "table", "text_flops", "text_trimming", "timed",
    "tower_gemm_rate", "vit_flops", "write_json",
]
